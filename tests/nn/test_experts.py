"""Mixture-of-experts layers (linquant.nn.experts): QuantExpertsProj against per-expert
quantization and the reference linear, QuantExperts against the float experts' own loop, and the
whole path through quantize_model, save and load.

``ToyExperts`` has the interface of transformers' fused experts modules (what its
``use_experts_implementation`` decorator gives them: ``num_experts``, ``has_gate``,
``is_transposed``, ``has_bias``, ``_apply_gate``) and, as its forward, the token-by-token loop
of their eager implementation, so these tests need no transformers; tests/test_hf_architectures.py
and tests/io/test_stream.py run real transformers models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linquant as lq
from linquant.errors import FormatError, LinquantError
from linquant.nn.experts import (
    QuantExperts,
    QuantExpertsProj,
    expert_rows,
    is_hf_experts,
    projection_names,
)
from linquant.ops.metrics import sqnr
from linquant.tensor import quantize


class ToyExperts(nn.Module):
    def __init__(self, num_experts: int = 4, hidden: int = 24, inter: int = 16, *,
                 has_gate: bool = True, transposed: bool = False, bias: bool = False,
                 post_norm: bool = False) -> None:
        super().__init__()
        self.num_experts, self.has_gate, self.is_transposed = num_experts, has_gate, transposed
        self.has_bias, self.has_post_expert_norm = bias, post_norm
        self.act_fn = nn.SiLU()
        up = 2 * inter if has_gate else inter
        first = "gate_up_proj" if has_gate else "up_proj"
        shapes = {first: (num_experts, hidden, up) if transposed else (num_experts, up, hidden),
                  "down_proj": (num_experts, inter, hidden) if transposed
                  else (num_experts, hidden, inter)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * 0.2))
            if bias:
                out = shape[2] if transposed else shape[1]
                self.register_parameter(f"{name}_bias",
                                        nn.Parameter(torch.randn(num_experts, out) * 0.1))
        if post_norm:
            self.post_expert_norm = nn.LayerNorm(hidden)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _linear(self, part: str, e: int, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, part)[e]
        y = x @ w if self.is_transposed else x @ w.t()
        return y + getattr(self, f"{part}_bias")[e] if self.has_bias else y

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        first, _ = projection_names(self)
        for t in range(hidden.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                h = self._linear(first, e, hidden[t:t + 1])
                h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
                y = self._linear("down_proj", e, h)
                if self.has_post_expert_norm:
                    y = self.post_expert_norm(y)
                out[t] += (y * top_k_weights[t, j])[0]
        return out


class Block(nn.Module):
    """An MoE block: a router picks 2 of the experts per token."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.experts = ToyExperts(**kwargs)
        hidden = self.experts.down_proj.shape[2 if self.experts.is_transposed else 1]
        self.router = nn.Linear(hidden, self.experts.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
        return x + self.experts(x, idx, w / w.sum(-1, keepdim=True))


def _routing(tokens: int, num_experts: int = 4, k: int = 2) -> tuple[torch.Tensor, ...]:
    idx = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k)
    return idx, w / w.sum(-1, keepdim=True)


VARIANTS = {
    "gated": {},
    "no-gate": {"has_gate": False},
    "transposed-bias": {"transposed": True, "bias": True},
    "post-norm": {"post_norm": True},
}


# ---- recognising and wrapping ------------------------------------------------------------------
def test_recognised_by_the_decorator_interface_only() -> None:
    assert is_hf_experts(ToyExperts())
    assert not is_hf_experts(nn.Linear(4, 4))
    broken = ToyExperts()
    broken.down_proj = nn.Parameter(torch.zeros(4, 8))  # not 3-D
    assert not is_hf_experts(broken)
    assert not is_hf_experts(QuantExperts.wrap(ToyExperts()))
    with pytest.raises(LinquantError, match="not a transformers experts module"):
        QuantExperts.wrap(nn.Linear(4, 4))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wrapped_float_experts_compute_what_the_module_does(variant: str) -> None:
    toy = ToyExperts(**VARIANTS[variant])
    x = torch.randn(7, 24)
    idx, w = _routing(7)
    want = toy(x, idx, w)
    got = QuantExperts.wrap(toy)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tokens_routed_to_no_expert_and_experts_without_tokens() -> None:
    toy = ToyExperts()
    wrapped = QuantExperts.wrap(toy)
    x = torch.randn(3, 24)
    idx = torch.tensor([[1, 1], [1, 1], [1, 1]])  # experts 0, 2, 3 get nothing
    w = torch.tensor([[0.5, 0.5]] * 3)
    torch.testing.assert_close(wrapped(x, idx, w), toy(x, idx, w), rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, 24)
    assert wrapped(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).shape == (0, 24)
    # a negative id went to expert 0 (the clamp that counts sentinels >= num_experts)
    with pytest.raises(LinquantError, match=r"expert ids must be >= 0, got -1"):
        wrapped(x, torch.tensor([[1, -1], [1, 1], [1, 1]]), w)


# ---- one projection: exact against per-expert quantization -------------------------------------
SCHEMES = ["int8-sym-ch0", "int4-asym-g8-fp16", "int4-sym-g24", "int3-sym-g8",
           "int2-asym-ch0", "int5-asymf-g12-bf16", "int4-sym-tensor", "int3-asym-ch1"]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_expert_is_quantized_as_its_own_matrix(scheme: str, transposed: bool) -> None:
    toy = ToyExperts(transposed=transposed)
    w = toy.gate_up_proj.detach()
    proj = QuantExpertsProj.from_float(w, scheme, transposed=transposed, name="gate_up_proj")
    assert proj.qweight_shape == (4 * 32, 24)
    whole = quantize(expert_rows(w, transposed), proj.scheme)
    for e in range(4):
        qt, _ = proj.expert(e)
        we = w[e].t() if transposed else w[e]
        assert qt.shape == (32, 24)
        assert torch.equal(qt.dequantize(), whole.dequantize()[e * 32:(e + 1) * 32])
        if "tensor" not in scheme and "ch1" not in scheme:  # else scales shared by experts
            alone = quantize(we.contiguous(), proj.scheme)
            assert torch.equal(qt.codes(), alone.codes())
            assert torch.equal(qt.dequantize(), alone.dequantize())


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_reads_back_in_the_float_layout(transposed: bool) -> None:
    toy = ToyExperts(transposed=transposed)
    proj = QuantExpertsProj.from_float(toy.down_proj, "int8-sym-ch0", transposed=transposed)
    assert proj.weight.shape == toy.down_proj.shape
    assert sqnr(toy.down_proj.detach(), proj.weight) > 38
    with pytest.raises(LinquantError, match="read-only"):
        proj.weight = toy.down_proj  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g8-fp16", "int4-sym-g24-bf16"])
def test_expert_linear_equals_the_reference(scheme: str, tokens: int, dtype: torch.dtype) -> None:
    toy = ToyExperts()
    proj = QuantExpertsProj.from_float(toy.gate_up_proj, scheme, transposed=False)
    deq = proj.weight.float()
    x = torch.randn(tokens, 24).to(dtype)
    for e in (0, 3):
        want = F.linear(x.float(), deq[e])
        got = proj(x, e)
        assert got.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), experts=st.integers(1, 5),
       out=st.sampled_from([2, 6, 8]), group=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_expert_slices_cover_the_stored_weight(bits: int, sym: bool, experts: int, out: int,
                                                group: int, seed: int) -> None:
    torch.manual_seed(seed)
    w = torch.randn(experts, out, 16)
    scheme = f"int{bits}-{'sym' if sym else 'asym'}-g{group}"
    why = QuantExpertsProj.cannot_quantize((experts, out, 16), lq.QuantScheme.parse(scheme))
    if why is not None:
        with pytest.raises(LinquantError, match="whole bytes"):
            QuantExpertsProj.from_float(w, scheme, transposed=False)
        return
    proj = QuantExpertsProj.from_float(w, scheme, transposed=False)
    joined = torch.cat([proj.expert(e)[0].dequantize() for e in range(experts)])
    assert torch.equal(joined, proj.qweight.dequantize())


def test_experts_whose_codes_do_not_fill_whole_bytes_stay_float() -> None:
    scheme = lq.QuantScheme.parse("int3-sym-ch0")
    assert "whole bytes" in (QuantExpertsProj.cannot_quantize((2, 5, 3), scheme) or "")
    assert QuantExpertsProj.cannot_quantize((1, 5, 3), scheme) is None  # one expert: no slicing
    # per input channel: 9 zero points shared by the experts, never sliced (27 bits is fine)
    shared = lq.QuantScheme.parse("int3-asym-ch1")
    assert QuantExpertsProj.cannot_quantize((4, 8, 9), shared) is None
    assert "zero points" in (QuantExpertsProj.cannot_quantize(
        (4, 1, 8), lq.QuantScheme.parse("int3-asym-g8")) or "")  # 1 per expert
    model = Block(hidden=4, inter=5)  # per expert: gate_up 10x4 (120 bits), down 4x5 (60 bits)
    report = lq.quantize_model(model, "int3-sym-ch0")
    assert report["experts.gate_up_proj"].quantized
    assert "whole bytes" in (report["experts.down_proj"].reason or "")
    assert isinstance(model.experts.down_proj, nn.Parameter)


def test_projection_errors_name_the_layer() -> None:
    proj = QuantExpertsProj.from_float(torch.randn(2, 8, 16), "int8-sym-ch0", transposed=False,
                                       name="blk.experts.down_proj")
    with pytest.raises(LinquantError, match=r"'blk.experts.down_proj'.*expert 2 out of range"):
        proj(torch.randn(1, 16), 2)
    with pytest.raises(LinquantError, match=r"'blk.experts.down_proj'.*\[\.\.\., 16\]"):
        proj(torch.randn(1, 8), 0)
    with pytest.raises(LinquantError, match="3-D experts weight"):
        QuantExpertsProj.from_float(torch.randn(8, 16), "int8-sym-ch0", transposed=False)


@pytest.mark.parametrize("preset", ["w8a8", "w4a16-g8"])
def test_expert_views_made_under_inference_mode_keep_version_counters(preset: str) -> None:
    # the per-expert views (and W8A8's int8 codes) are made on the first call, usually under
    # inference_mode, where a dtype view is an inference tensor: without a version counter a
    # loaded model's mapped codes could never be released once a kernel layout held them
    wrapped = QuantExperts.wrap(ToyExperts())
    for part in projection_names(wrapped):
        wrapped.set_projection(part, QuantExpertsProj.from_float(
            wrapped._parameters[part], "int8-sym-ch0-fp32" if preset == "w8a8"
            else "int4-asym-g8-fp16", transposed=wrapped.is_transposed,
            activation="dynamic" if preset == "w8a8" else None))
    idx, w = _routing(5)
    projs = [m for m in wrapped.modules() if isinstance(m, QuantExpertsProj)]
    assert len(projs) == 2
    for proj in projs:
        proj.kernel_cache().clear()  # as loaded: no views yet
    with torch.inference_mode():
        wrapped(torch.randn(5, 24), idx, w)
    for proj in projs:
        cache = proj.kernel_cache()
        views = [t for qt in cache["expert_views"][1] for t in qt.tensors().values()]
        views += [c["w8a8_codes"] for c in cache["expert_caches"] if "w8a8_codes" in c]
        assert views and not any(t.is_inference() for t in views)


def test_jit_trace_refuses_quantized_experts() -> None:
    # the routing is data-dependent, and the eager kernels' outputs would be recorded as
    # constants: a clear error instead of a trace that ignores its input
    import warnings

    toy = ToyExperts()
    wrapped = QuantExperts.wrap(toy)
    idx, w = _routing(7)
    proj = QuantExpertsProj.from_float(torch.randn(2, 8, 16), "int8-sym-ch0", transposed=False,
                                       name="blk.experts.down_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LinquantError, match=r"torch\.jit\.trace cannot record"):
            torch.jit.trace(wrapped, (torch.randn(7, 24), idx, w))
        with pytest.raises(LinquantError, match=r"'blk\.experts\.down_proj'.*jit\.trace"):
            torch.jit.trace(lambda x: proj(x, 1), torch.randn(1, 16))


# ---- quantized experts: accuracy ---------------------------------------------------------------
# Output SQNR (dB) of QuantExperts vs the float ToyExperts (7 tokens, 2 of 4 experts each), over
# 20 seeds x the four variants (min / mean): int8-sym-ch0 36.4/41.4, int4-asym-g8-fp16 15.5/20.2
# (the gate's product doubles the relative error of the first projection).
EXPERT_FLOORS = {"int8-sym-ch0": 35.0, "int4-asym-g8-fp16": 14.5}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scheme", list(EXPERT_FLOORS))
def test_quantized_experts_sqnr_floor(scheme: str, variant: str) -> None:
    toy = ToyExperts(**VARIANTS[variant])
    x = torch.randn(7, 24)
    idx, w = _routing(7)
    want = toy(x, idx, w)
    q = QuantExperts.wrap(copy.deepcopy(toy))
    for part in projection_names(q):
        q.set_projection(part, QuantExpertsProj.from_float(
            q._parameters[part], scheme, transposed=q.is_transposed))
    assert q.num_quantized == 2
    assert sqnr(want, q(x, idx, w)) > EXPERT_FLOORS[scheme]


# ---- the whole path: quantize_model, report, save, load ----------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_model_reports_each_projection(transposed: bool) -> None:
    model = Block(transposed=transposed)
    report = lq.quantize_model(model, "w4a16-g32")  # group 32 does not divide hidden 24 / 16
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"experts.gate_up_proj", "experts.down_proj", "router"}
    up, down = rows["experts.gate_up_proj"], rows["experts.down_proj"]
    shapes = ((4, 24, 32), (4, 16, 24)) if transposed else ((4, 32, 24), (4, 24, 16))
    assert (up.type, up.shape, down.shape) == ("ToyExperts", *shapes)
    assert up.note == "group size 32 -> 24: 32 does not divide in_features 24"
    assert down.note == "group size 32 -> 16: 32 does not divide in_features 16"
    assert up.bytes_before == 4 * 32 * 24 * 4
    assert up.bits_per_weight == pytest.approx(4 + 16 / 24 + 4 / 24)
    assert up.sqnr_db is not None and up.sqnr_db > 15
    assert isinstance(model.experts, QuantExperts)
    assert isinstance(model.experts.down_proj, QuantExpertsProj)
    assert model.experts.gate_up_proj.scheme.group_size == 24
    with pytest.raises(LinquantError, match="group size"):
        lq.quantize_model(Block(), "w4a16-g32", strict=True)


@pytest.mark.parametrize("transposed", [False, True])
def test_experts_scales_that_would_overflow_are_refused_before_anything_changes(
        transposed: bool) -> None:
    """fp16 scales cannot hold 1e6 / 7: the down projection is refused before the first
    projection (or the router) is replaced. It used to fail mid-walk, the experts module already
    wrapped and its first projection quantized."""
    model = Block(transposed=transposed)
    with torch.no_grad():
        model.experts.down_proj[2, 5, 3] = 1e6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LinquantError, match=r"experts\.down_proj.*overflow float16 storage"):
        lq.quantize_model(model, "int4-sym-g8-fp16")
    assert type(model.experts) is ToyExperts and type(model.router) is nn.Linear
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # a range that only looks dangerous: each group of 8 fits (+-6e5 / 7 < 65504 apiece)
    model = Block(transposed=transposed)
    with torch.no_grad():
        model.experts.down_proj[0] = 6e5
        model.experts.down_proj[1] = -6e5
    report = lq.quantize_model(model, "int4-asym-g8-fp16")
    assert report["experts.down_proj"].quantized and isinstance(model.experts, QuantExperts)


@pytest.mark.parametrize("patch", ["forward", "compile"])
def test_experts_patched_on_their_instance_stay_float(patch: str) -> None:
    """An experts module whose instance replaces its forward (accelerate's hooks) or that was
    compiled in place: the wrapper copied that attribute and so computed with the float
    weights while the report said quantized. Now kept float with the reason; a forward hook
    moves to the wrapper and runs."""
    model = Block()
    if patch == "forward":
        original = model.experts.forward
        model.experts.forward = original  # type: ignore[method-assign]
    else:
        model.experts.compile(backend="eager")
    report = lq.quantize_model(model, "int8-sym-ch0")
    assert not isinstance(model.experts, QuantExperts)
    for part in ("gate_up_proj", "down_proj"):
        reason = report[f"experts.{part}"].reason
        assert reason is not None and ("replaced on the instance" if patch == "forward"
                                       else "compiled in place") in reason
    model = Block()
    calls: list[int] = []
    model.experts.register_forward_hook(lambda m, a, out: calls.append(1))
    lq.quantize_model(model, "int8-sym-ch0")
    assert isinstance(model.experts, QuantExperts)
    model(torch.randn(5, 24))
    assert calls == [1]


def test_excluded_projection_stays_float_and_the_rest_runs() -> None:
    model = Block()
    ref = copy.deepcopy(model)
    report = lq.quantize_model(model, "int8-sym-ch0", exclude=["*.down_proj"])
    assert report["experts.down_proj"].reason == "excluded by pattern '*.down_proj'"
    assert isinstance(model.experts.down_proj, nn.Parameter)
    x = torch.randn(9, 24)
    assert sqnr(ref(x), model(x)) > 35
    # a second pass quantizes what was left float
    again = lq.quantize_model(model, "int8-sym-ch0")
    assert again["experts.down_proj"].quantized
    assert "already quantized" in (again["experts.gate_up_proj"].reason or "")
    assert model.experts.num_quantized == 2


def test_w8a8_configs_and_the_experts() -> None:
    """W8A8 configs quantize the experts with int8 activations: per token (dynamic), or with one
    calibrated input scale per projection (static)."""
    model = Block(hidden=32, inter=32)
    report = lq.quantize_model(model, "w8a8")
    for part in ("gate_up_proj", "down_proj"):
        row = report[f"experts.{part}"]
        assert (row.scheme, row.note) == ("int8-sym-ch0-fp32, act int8-sym-token dynamic", "")
        assert getattr(model.experts, part).activation == "dynamic"
    assert "activation=dynamic" in repr(model.experts)
    assert type(model.router).__name__ == "W8A8Linear"
    torch.manual_seed(3)
    static = Block(hidden=32, inter=32)
    float_block = copy.deepcopy(static)
    report = lq.quantize_model(static, "w8a8-static")
    row = report["experts.gate_up_proj"]
    assert (row.scheme, row.note) == ("int8-sym-ch0-fp32, act int8-sym-tensor static", "")
    proj = static.experts.gate_up_proj
    assert proj.activation == "static" and not proj.calibrated
    x = torch.randn(13, 32)
    with pytest.raises(LinquantError, match=r"experts.gate_up_proj.*needs a range first"):
        static.experts(x, *_routing(13))  # (the router, a static W8A8Linear, would raise too)
    with lq.calibrate(static) as observers:
        static(x)
    assert set(observers) == {"experts.gate_up_proj", "experts.down_proj", "router"}
    # every token reaches the first projection (through two experts): its range is x's
    bound = float(x.abs().max())
    torch.testing.assert_close(proj.input_scale, torch.tensor(bound / 127), rtol=1e-6, atol=0)
    assert proj.calibrated and static.experts.down_proj.calibrated
    assert sqnr(float_block(x), static(x)) > 25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 40])
def test_w8a8_expert_equals_the_reference(tokens: int, dtype: torch.dtype) -> None:
    """Each expert's W8A8 product is the reference's (per-token int8 activations, int8 x int8,
    one rescale), bit for bit, whatever fast path the dispatcher takes; the plan kept by the
    first call serves the next."""
    from linquant import kernels
    from linquant.kernels import native, reference

    torch.manual_seed(0)
    toy = ToyExperts(num_experts=3, hidden=260, inter=132)  # 264 x 260 per expert: fast paths
    proj = QuantExpertsProj.from_float(toy.gate_up_proj, "int8-sym-ch0-fp32", transposed=False,
                                       activation="dynamic")
    x = torch.randn(tokens, 260).to(dtype)
    for e in (0, 2):
        qt = proj.expert(e)[0]
        codes = qt.qdata.view(torch.int8).view(264, 260)
        want = reference.linear_w8a8(x, codes, qt.scale)
        if native.w8a8_supported(x, codes):  # this CPU has VNNI: linquant's own kernel
            assert kernels.select_w8a8_path(x, codes) == "cpu_native_w8a8"
        for _ in range(2):
            got = proj(x, e)
            assert got.dtype == dtype and torch.equal(got, want), (e, tokens)
        assert len(proj.expert(e)[1]["w8a8_plans"]) == 1
    # against the float experts: activation and weight rounding only
    deq = toy.gate_up_proj.detach()
    assert sqnr(F.linear(x.float(), deq[1]), proj(x, 1).float()) > 30
    with pytest.raises(LinquantError, match="int8 activations need the weight scheme"):
        QuantExpertsProj.from_float(toy.gate_up_proj, "int4-sym-g4", transposed=False,
                                    activation="dynamic")
    with pytest.raises(LinquantError, match="activation must be None"):
        QuantExpertsProj(3, 260, 264, "int8-sym-ch0-fp32", activation="token")  # type: ignore
    with pytest.raises(LinquantError, match="True for dynamic activations"):
        QuantExpertsProj(3, 260, 264, "int8-sym-ch0-fp32", activation="dynamic",
                         act_symmetric=False)


@settings(max_examples=30, deadline=None)
@given(experts=st.integers(1, 4), out=st.sampled_from([8, 36, 264]),
       k=st.sampled_from([4, 36, 260]), tokens=st.integers(1, 20), transposed=st.booleans(),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_w8a8_expert_is_a_dynamic_w8a8_linear(experts: int, out: int, k: int, tokens: int,
                                              transposed: bool, bf16: bool, seed: int) -> None:
    """Each expert of a dynamic W8A8 projection has the codes and scales, and computes the
    output, of a dynamic W8A8Linear built from that expert's float matrix, bit for bit."""
    from linquant.nn import W8A8Linear

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((experts, k, out) if transposed else (experts, out, k), generator=gen)
    proj = QuantExpertsProj.from_float(w, "int8-sym-ch0-fp32", transposed=transposed,
                                       activation="dynamic")
    x = torch.randn(tokens, k, generator=gen)
    if bf16:
        x = x.bfloat16()
    for e in range(experts):
        linear = nn.Linear(k, out, bias=False)
        linear.weight.data = w[e].t().contiguous() if transposed else w[e]
        ref = W8A8Linear.from_float(linear)
        qt = proj.expert(e)[0]
        assert torch.equal(qt.qdata.view(torch.int8).view(out, k), ref.weight_qdata)
        assert torch.equal(qt.scale, ref.weight_scale)
        assert torch.equal(proj(x, e), ref(x)), e


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_w8a8_experts_sqnr_floor(variant: str) -> None:
    block = Block(**VARIANTS[variant])
    x = torch.randn(11, 24)
    want = block(x)
    lq.quantize_model(block, "w8a8", exclude=["router"])
    assert block.experts.num_quantized == 2
    assert sqnr(want, block(x)) > 30


@pytest.mark.parametrize(("preset", "mode"), [
    ("w8a8", "dynamic"), ("w8a8-static", "static"),
    ("int8-sym-ch0-fp32, act int8-asym-tensor static", "static"),  # with a zero point
])
def test_w8a8_experts_save_and_load(tmp_path: Path, preset: str, mode: str) -> None:
    torch.manual_seed(2)
    model = Block(transposed=True, bias=True)
    lq.quantize_model(model, preset)
    x = torch.randn(6, 24)
    if mode == "static":
        with lq.calibrate(model):
            model(x)
        zp = model.experts.down_proj._buffers.get("input_zero_point")
        assert (zp is None) == ("act int8-asym" not in preset)
    lq.save(model, tmp_path / "q")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert '"type":"QuantExpertsProj"' in meta["linquant"].replace(" ", "")
    assert f'"activation":"{mode}"' in meta["linquant"].replace(" ", "")
    fresh = Block(transposed=True, bias=True)
    lq.load_into(fresh, tmp_path / "q")
    assert fresh.experts.down_proj.activation == mode and fresh.experts.down_proj.calibrated
    assert torch.equal(model(x), fresh(x))
    # a file whose experts claim activations linquant does not know is refused, naming them
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    meta["linquant"] = meta["linquant"].replace(f'"activation":"{mode}"', '"activation":"odd"'
                                                ).replace(f'"activation": "{mode}"',
                                                          '"activation": "odd"')
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match=r"module '(router|experts\.\w+)' \(\w+\): bad "
                                          r"activation settings 'odd'"):
        lq.load_into(Block(transposed=True, bias=True), tmp_path / "q")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Block(transposed=True, bias=True)
    lq.quantize_model(model, "int4-asym-g8-fp16", exclude=["router"])
    lq.save(model, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {"experts.gate_up_proj.weight.qdata", "experts.gate_up_proj.weight.scale",
            "experts.gate_up_proj.weight.zero_point", "experts.gate_up_proj_bias",
            "experts.down_proj_bias", "router.weight"} <= keys
    assert '"num_experts":4' in meta["linquant"] and '"transposed":true' in meta["linquant"]
    from linquant.commands.inspect import inspect_checkpoint

    rows = {r["name"]: r for r in inspect_checkpoint(tmp_path / "q")["tensors"]}
    assert rows["experts.down_proj.weight"]["experts"] == 4  # stored [E*out, in]
    assert rows["experts.down_proj.weight"]["shape"] == [4 * 24, 16]
    assert "experts" not in rows["experts.down_proj_bias"]
    fresh = Block(transposed=True, bias=True)
    lq.load_into(fresh, tmp_path / "q")
    assert isinstance(fresh.experts, QuantExperts)
    x = torch.randn(5, 24)
    assert torch.equal(model(x), fresh(x))
    # ... and into a model of other experts the file does not fit
    with pytest.raises(FormatError, match="not the model's"):
        lq.load_into(Block(transposed=False, bias=True), tmp_path / "q")


def test_compare_layers_measures_an_experts_block_as_one_layer() -> None:
    """lq.compare_layers runs the QuantExperts block on the float block's input and routing."""
    torch.manual_seed(0)
    ref = Block().eval()
    model = copy.deepcopy(ref)
    report = lq.quantize_model(model, "int4-asym-g8-fp16", exclude=["*.down_proj", "router"])
    seen: list[tuple[torch.Tensor, ...]] = []
    ref.experts.register_forward_pre_hook(lambda m, a: seen.append(a))
    x = torch.randn(9, 24)
    with lq.compare_layers(ref, model) as errors, torch.no_grad():
        ref(x)
    assert [r.name for r in errors.rows] == ["experts"]
    row = errors["experts"]
    assert row.type == "QuantExperts" and row.scheme == "int4-asym-g8-fp16 / float"
    with torch.no_grad():
        expected = sqnr(ref.experts(*seen[0]), model.experts(*seen[0]))
    assert row.calls == 1 and row.sqnr_db == pytest.approx(expected, rel=1e-5)
    assert row.weight_sqnr_db == pytest.approx(report["experts.gate_up_proj"].sqnr_db, rel=1e-6)


def test_copies_dtype_casts_and_kernel_caches() -> None:
    model = Block()
    lq.quantize_model(model, "int4-sym-g8")
    x = torch.randn(6, 24)
    y = model(x)
    assert torch.equal(copy.deepcopy(model)(x), y)
    codes = model.experts.gate_up_proj.weight_qdata.clone()
    model.to(torch.bfloat16)
    assert torch.equal(model.experts.gate_up_proj.weight_qdata, codes)
    assert model(x.bfloat16()).dtype == torch.bfloat16
    assert lq.nn.clear_kernel_caches(model) >= 2  # each projection's expert views and caches
    assert sqnr(y, model(x.bfloat16()).float()) > 25


# ---- experts that run on every token (Llama 4's layout) ----------------------------------------
class ToyDenseExperts(nn.Module):
    """Llama4TextExperts' layout: tokens arrive [E * T, H] (each copy scaled by its router
    score), weights [E, in, out], the default gate."""

    def __init__(self, num_experts: int = 3, hidden: int = 16, inter: int = 8) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = num_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, hidden, 2 * inter) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.2)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(self.num_experts, -1, self.hidden_size)
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(up * self.act_fn(gate), self.down_proj).view(-1, self.hidden_size)


class DenseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = ToyDenseExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x.repeat(3, 1)).view(3, -1, 16).sum(0)


@pytest.fixture
def dense_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    import linquant.nn.experts as experts

    name = f"{ToyDenseExperts.__module__}.{ToyDenseExperts.__qualname__}"
    monkeypatch.setattr(experts, "DENSE_EXPERTS", (*experts.DENSE_EXPERTS, name))


def test_dense_experts_quantize_save_and_load(tmp_path: Path, dense_registered: None) -> None:
    from linquant.nn.experts import experts_transposed

    model = DenseBlock()
    assert is_hf_experts(model.experts) and experts_transposed(model.experts)
    x = torch.randn(5, 16)
    want = model(x)
    wrapped = QuantExperts.wrap(copy.deepcopy(model.experts))
    assert wrapped.dense_dispatch
    torch.testing.assert_close(wrapped(x.repeat(3, 1)), model.experts(x.repeat(3, 1)),
                               rtol=1e-5, atol=1e-6)
    report = lq.quantize_model(model, "int8-sym-ch0")
    assert report["experts.gate_up_proj"].shape == (3, 16, 16)
    assert report["experts.gate_up_proj"].quantized and report["experts.down_proj"].quantized
    assert model.experts.gate_up_proj.stored_transposed
    assert sqnr(want, model(x)) > 35
    lq.save(model, tmp_path / "q")
    fresh = DenseBlock()
    lq.load_into(fresh, tmp_path / "q")
    assert torch.equal(fresh(x), model(x))


# ---- back to float (linquant.restore) ------------------------------------------------------
def test_experts_come_back_as_the_float_module() -> None:
    for kwargs in ({}, {"transposed": True, "bias": True}, {"has_gate": False}):
        block = Block(**kwargs)
        keys = list(block.state_dict())
        attrs = set(vars(block.experts))
        lq.quantize_model(block, "int4-asym-g8-fp16")
        assert isinstance(block.experts, QuantExperts)
        w = {p: getattr(block.experts, p).weight.clone() for p in ("down_proj",)}
        x = torch.randn(7, 24)
        want = block(x)
        lq.dequantize_model(block)
        assert type(block.experts) is ToyExperts and set(vars(block.experts)) == attrs
        assert list(block.state_dict()) == keys  # the float module's order, too
        assert torch.equal(block.experts.down_proj, w["down_proj"])
        torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)


def test_dense_experts_lose_the_attributes_wrap_added(dense_registered: None) -> None:
    block = DenseBlock()
    attrs = set(vars(block.experts))
    lq.quantize_model(block, "int8-sym-ch0")
    x = torch.randn(5, 16)
    want = block(x)
    lq.dequantize_model(block)
    assert type(block.experts) is ToyDenseExperts and set(vars(block.experts)) == attrs
    torch.testing.assert_close(block(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int4-asym-g32-fp16", "int4-sym-g128", "int8-sym-ch0", "w8a8"])
def test_quantized_experts_on_cuda_match_the_cpu(scheme: str) -> None:
    """On a GPU each expert's call takes the CUDA paths (tinygemm, Triton; Triton's W8A8 GEMM
    under ``w8a8``) of its token count."""
    torch.manual_seed(0)
    model = Block(hidden=256, inter=128, num_experts=8).eval()
    lq.quantize_model(model, scheme)
    model.to(torch.bfloat16)
    for tokens in (1, 5, 64):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16)
        with torch.inference_mode():
            want = model(x).float()
            gpu = copy.deepcopy(model).cuda()
            got = gpu(x.cuda()).float().cpu()
        assert sqnr(want, got) > 35, (scheme, tokens)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5),
                    reason="PyTorch 2.4's grad transform cannot read the routing counts on "
                           "the host (.tolist() of a wrapped tensor)")
@pytest.mark.parametrize("preset", ["int8-sym-ch0", "w8a8"])
def test_torch_func_grad_goes_through_quantized_experts(preset: str) -> None:
    """``torch.func.grad`` through quantized experts failed (the kernels' autograd functions
    do not compose with it); under a transform each expert's projection computes with the
    reference's PyTorch ops: the eager gradient."""
    from torch.func import grad

    model = Block()
    lq.quantize_model(model, preset)
    x = torch.randn(5, 24)
    xg = x.clone().requires_grad_(True)
    model(xg).pow(2).sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(grad(lambda t: model(t).pow(2).sum())(x), xg.grad,
                               rtol=1e-5, atol=1e-5)
