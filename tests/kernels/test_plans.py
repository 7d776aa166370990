"""CPU plans (linquant.kernels.plans): a layer's repeat call with the same input signature runs
what its first call chose, with the same output bits as an unplanned call, and the plan is
dropped whenever it no longer applies (weight or bias replaced or modified, autograd, a new
signature, too many signatures)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linquant as lq
from linquant import kernels
from linquant.kernels import cpu, plans
from linquant.kernels import reference as ref
from linquant.nn import QuantLinear, W8A8Linear, clear_kernel_caches

BF = torch.bfloat16
# (scheme, activation dtype, tokens): every CPU path the dispatcher can pick, where this
# machine has the kernels (the test asserts the plan ran the path select_path names)
CASES = [
    ("int4-asym-g32-fp16", BF, 1), ("int4-asym-g32-fp16", BF, 17), ("int4-asym-g32-fp16", BF, 300),
    ("int4-sym-g64", torch.float32, 3), ("int4-sym-g64", torch.float32, 140),
    ("int4-asym-g32-fp16", torch.float16, 5), ("int4-asym-g32-fp16", torch.float16, 200),
    ("int8-sym-ch0", BF, 1), ("int8-sym-ch0", BF, 40), ("int8-sym-ch0", BF, 300),
    ("int8-sym-ch0", torch.float32, 2), ("int8-asym-g32", torch.float64, 3),
    ("int3-sym-g32", BF, 4), ("int2-asym-ch0", torch.float32, 70),
]


def _layer(scheme: str, dtype: torch.dtype, n: int = 384, k: int = 256,
           seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_float(nn.Linear(k, n), scheme).to(dtype)


def _plans(q: QuantLinear) -> dict[tuple[object, ...], plans.Plan]:
    found: dict[tuple[object, ...], plans.Plan] = q.kernel_cache().get("cpu_plans", {})
    return found


@pytest.mark.parametrize(("scheme", "dtype", "m"), CASES)
def test_plan_runs_the_chosen_path_with_the_same_bits(scheme: str, dtype: torch.dtype,
                                                      m: int) -> None:
    q = _layer(scheme, dtype)
    x = torch.randn(2, m, 256).to(dtype)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # another layout, the same signature
    with torch.no_grad():
        want = kernels.linear_weight_only(x, q.qweight, q.bias)  # no cache: no plan
        want_t = kernels.linear_weight_only(xt, q.qweight, q.bias)  # (BLAS may sum otherwise)
        first = q(x)
        (p,) = _plans(q).values()
        assert p.path == kernels.select_path(x, q.qweight)
        second = q(x)  # through the plan
        third = q(xt)
    assert len(_plans(q)) == 1
    for y, w in ((first, want), (second, want), (third, want_t)):
        assert y.dtype == dtype and torch.equal(y, w), p.path


@pytest.mark.parametrize(("scheme", "m", "n", "k", "path"), [
    pytest.param("int4-asym-g32-fp16", 3, 384, 256, "cpu_int4pack",
                 marks=pytest.mark.skipif(not cpu.HAS_INT4PACK,
                                          reason="no CPU int4 op")),
    ("int8-sym-ch0", 1, 384, 256, "cpu_int8pack"),
    ("int8-sym-ch0", 5, 1024, 1024, "cpu_int8split"),
    ("int8-sym-ch0", 40, 384, 256, "cpu_blocked"),
    ("int4-sym-g32", 3, 128, 256, "reference"),  # a weight too small for the fast paths
])
@torch.no_grad()
def test_plan_runs_pytorchs_paths_too(scheme: str, m: int, n: int, k: int, path: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without linquant's native kernels (as on CPUs they do not build for)."""
    from linquant.kernels import native

    monkeypatch.setattr(native, "available", lambda kernel="w4a16": False)
    q = _layer(scheme, BF, n, k)
    x = torch.randn(m, k).to(BF)
    want = kernels.linear_weight_only(x, q.qweight, q.bias)
    assert torch.equal(q(x), want)
    (p,) = _plans(q).values()
    assert p.path == path
    assert torch.equal(q(x), want)


@torch.no_grad()
def test_plan_is_the_dispatchers_entry_too() -> None:
    """``kernels.linear_weight_only`` with a cache keeps and uses plans like the layer does."""
    q = _layer("int4-asym-g32-fp16", BF)
    cache: dict[str, object] = {}
    x = torch.randn(5, 256).to(BF)
    y = kernels.linear_weight_only(x, q.qweight, q.bias, cache)
    assert list(cache["cpu_plans"]) == [plans.key(x, q.bias)]  # type: ignore[call-overload]
    assert torch.equal(kernels.linear_weight_only(x, q.qweight, q.bias, cache), y)


@torch.no_grad()
def test_repeat_call_skips_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    q = _layer("int8-sym-ch0", BF)
    x = torch.randn(7, 256).to(BF)
    y = q(x)

    def no(*a: object) -> str:
        raise AssertionError("the dispatcher ran again")

    monkeypatch.setattr(kernels, "select_path", no)
    assert torch.equal(q(x), y)
    with pytest.raises(AssertionError, match="dispatcher ran again"):
        q(torch.randn(8, 256).to(BF))  # a new signature is checked and planned afresh


def test_layers_made_in_inference_mode_replay_plans_without_exceptions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An inference tensor keeps no version counter: reading ``_version`` raises, and the
    # exception cost about 10 us each, four times per call (a layer quantized or loaded under
    # torch.inference_mode ran 2-4x slower per call than the same layer made outside it).
    with torch.inference_mode():
        layers = [_layer("int4-asym-g32-fp16", BF), _layer("int8-sym-ch0", torch.float32)]
        w8 = W8A8Linear.from_float(nn.Linear(256, 384))
        emb = lq.nn.QuantEmbedding.from_float(nn.Embedding(50, 256), "int8-sym-ch0")
    reads: list[bool] = []
    base = torch.Tensor._version

    def version(t: torch.Tensor) -> int:
        reads.append(t.is_inference())
        return base.__get__(t)  # type: ignore[no-any-return]

    ids = torch.tensor([[1, 4, 9]])
    with torch.inference_mode():
        calls = [(layers[0], torch.randn(5, 256).to(BF)),
                 (layers[1], torch.randn(5, 256)), (w8, torch.randn(5, 256)), (emb, ids)]
        want = [m(x) for m, x in calls]  # first calls: plans kept
        monkeypatch.setattr(torch.Tensor, "_version", property(version))
        got = [m(x) for m, x in calls]  # replayed
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not any(reads), "read the version counter of an inference tensor"
    assert all(_plans(q) for q in layers)


def test_layers_made_in_inference_mode_hold_normal_tensors_and_see_in_place_changes() -> None:
    """Under torch.inference_mode a layer's tensors were inference tensors, which keep no
    version counter: a plan or layout made from them never saw them change in place. Scaling
    the weight's scales gave the old output; recalibrating a static W8A8 layer
    (set_activation_range, what lq.calibrate does on exit) kept running with the old input
    scale. Now a layer's tensors are normal tensors, also when built or converted there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 96), nn.Linear(96, 64))
    with torch.inference_mode():
        q = QuantLinear.from_float(nn.Linear(256, 384), "int4-asym-g32-fp16").to(BF)
        w8 = W8A8Linear.from_float(nn.Linear(256, 384), activation="static")
        w8.set_activation_range(-3.0, 3.0)
        lq.quantize_model(model, {"0": "int8-sym-ch0", "1": "w4a16-g32", "2": "w8a8"})
        model.to(BF)
        tensors = [*q.parameters(), *q.buffers(), *w8.parameters(), *w8.buffers(),
                   *model.parameters(), *model.buffers()]
        assert tensors and not any(t.is_inference() for t in tensors)
        x = torch.randn(5, 256)
        y0 = q(x.to(BF))
        q.weight_scale.mul_(2)  # every output doubles (exactly: a power of two)
        assert torch.equal(q(x.to(BF)), kernels.linear_weight_only(x.to(BF), q.qweight, q.bias))
        assert not torch.equal(q(x.to(BF)), y0)
        w8(x)
        w8.set_activation_range(-0.5, 0.5)
        assert torch.equal(w8(x), ref.linear_w8a8(x, w8.weight_qdata, w8.weight_scale, w8.bias,
                                                  w8.input_scale))


def test_a_model_quantized_in_inference_mode_runs_after_a_cast_outside_it() -> None:
    """Parameters made under inference_mode and cast by ``.to()`` outside it say they are not
    inference tensors, yet reading their version counter raises: every call failed with
    "Inference tensors do not track version counter"."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
        lq.quantize_model(model, "w8a8")
        float_layer = nn.Linear(8, 8)
    model.to(BF)
    with torch.no_grad():
        assert model(torch.randn(2, 64).to(BF)).shape == (2, 64)
    float_layer.to(BF)  # a caller's tensor of that kind: no version to read, no exception
    assert not float_layer.weight.is_inference() and cpu._version(float_layer.weight) is None


@torch.no_grad()
def test_plan_is_dropped_when_weight_or_bias_change() -> None:
    q = _layer("int4-asym-g32-fp16", BF)
    x = torch.randn(3, 256).to(BF)
    q(x)
    q.bias.add_(1.0)  # in place: the plan's bias version is stale
    assert torch.equal(q(x), kernels.linear_weight_only(x, q.qweight, q.bias))
    q.bias = nn.Parameter(torch.zeros(384, dtype=BF))  # a new bias object
    assert torch.equal(q(x), kernels.linear_weight_only(x, q.qweight, q.bias))
    other = _layer("int4-asym-g32-fp16", BF, seed=1)
    q.weight_qdata.copy_(other.weight_qdata)  # codes modified in place, scales kept
    assert torch.equal(q(x), kernels.linear_weight_only(x, q.qweight, q.bias))
    q._set_qweight(other.qweight)  # new buffer objects
    assert torch.equal(q(x), kernels.linear_weight_only(x, q.qweight, q.bias))
    (p,) = _plans(q).values()
    assert p.tensors[0] is q.weight_qdata


@pytest.mark.parametrize(("scheme", "dtype", "m"), [
    ("int4-asym-g32-fp16", BF, 3), ("int8-sym-ch0", torch.float32, 2),
    ("int4-asym-g32-fp16", BF, 300), ("int4-sym-g64", torch.float32, 140)])
def test_input_that_needs_grad_runs_the_fast_path_and_the_references_backward(
        scheme: str, dtype: torch.dtype, m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # every layer after the first of a model run outside no_grad gets such an input; it used
    # to take the reference (dequantize the whole weight, then F.linear) on every call
    q = _layer(scheme, dtype)
    x = torch.randn(m, 256).to(dtype)
    with torch.no_grad():
        want = q(x)  # the fast path, with the bias inside the kernel where it is native
    gy = torch.randn(m, 384).to(dtype)
    xr = x.clone().requires_grad_(True)
    br = q.bias.detach().clone().requires_grad_(True)
    ref.linear_weight_only(xr, q.qweight, br).backward(gy)

    def no(*a: object) -> torch.Tensor:
        raise AssertionError("the reference ran in the forward")

    monkeypatch.setattr(ref, "linear_weight_only", no)
    for _ in range(2):  # the second call replays the plan kept by the first
        xg = x.clone().requires_grad_(True)
        q.bias.grad = None
        y = q(xg)
        assert y.requires_grad and y.dtype == dtype
        # the no-grad call's result but for the bias's rounding: added after the product here
        assert float((y.detach() - want).abs().max()) <= float(want.abs().max()) * 2**-7
        y.backward(gy)
        assert xg.grad is not None and q.bias.grad is not None
        assert torch.equal(q.bias.grad, br.grad)
        # grad_y @ W: the same product as F.linear's backward, which BLAS may sum otherwise
        torch.testing.assert_close(xg.grad, xr.grad)
    assert all(p.bias is None for p in _plans(q).values() if p.bias is not q.bias)
    y = q(x.clone().requires_grad_(True))
    with torch.no_grad():
        q.weight_scale.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["int4", "w8a8", "scratch"])
def test_grad_mode_replays_the_bias_free_native_plan(kind: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # outside no_grad the trainable bias needs its gradient: the native kernels run planned
    # without it and the bias is added where autograd sees it, on repeat calls too
    if kind == "w8a8":
        torch.manual_seed(0)
        q: nn.Module = W8A8Linear.from_float(nn.Linear(256, 384))
        x, select = torch.randn(3, 256), "select_w8a8_path"
    else:
        q = _layer("int4-asym-g32-fp16", BF)
        x, select = torch.randn(3 if kind == "int4" else 300, 256).to(BF), "select_path"
    chosen = (kernels.select_w8a8_path(x, q.weight_qdata, None) if kind == "w8a8"
              else kernels.select_path(x, q.qweight))
    if kind != "scratch" and not chosen.startswith("cpu_native"):
        pytest.skip(f"no native kernel here ({chosen})")
    first = q(x)
    kept = q.kernel_cache().get("w8a8_plans" if kind == "w8a8" else "cpu_plans", {})
    if kind == "scratch":  # PyTorch's ops take the bias themselves: nothing planned
        assert not kept
    else:  # a repeat call: the plan (kept without the bias), not the dispatcher
        (p,) = kept.values()
        assert p.bias is None and p.path.startswith("cpu_native"), p.path

        def no(*a: object) -> str:
            raise AssertionError("the dispatcher ran again")

        monkeypatch.setattr(kernels, select, no)
    second = q(x)
    assert torch.equal(first, second) and second.requires_grad
    second.float().sum().backward()
    assert q.bias.grad is not None and torch.equal(
        q.bias.grad, torch.full_like(q.bias, 3 if kind != "scratch" else 300))


def test_plans_are_bounded_and_cleared() -> None:
    q = _layer("int8-sym-ch0", torch.float32)
    with torch.no_grad():
        for m in range(1, plans.MAX_PLANS + 3):
            q(torch.randn(m, 256))
    assert 1 <= len(_plans(q)) <= plans.MAX_PLANS
    assert clear_kernel_caches(q) >= 0 and "cpu_plans" not in q.kernel_cache()


@torch.no_grad()
def test_plan_keeps_the_fallback_for_non_finite_tokens() -> None:
    """Per-call decisions stay inside the plan: a token holding NaN sends the native kernel's
    call to the reference, planned or not."""
    q = _layer("int4-asym-g32-fp16", BF)
    x = torch.randn(4, 256).to(BF)
    q(x)
    x[1, 3] = float("nan")
    want = kernels.linear_weight_only(x, q.qweight, q.bias)
    got = q(x)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_quantize_model_then_plans_give_the_same_model_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    lq.quantize_model(model, "w4a16-g32")
    x = torch.randn(9, 256).to(BF)
    with torch.no_grad():
        outs = [model(x) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert all("cpu_plans" in m.kernel_cache() for m in model if isinstance(m, QuantLinear))


# ---- W8A8 layers ----------------------------------------------------------------------------

# native: "vnni" (linquant's VNNI kernel), "avx2" (its AVX2 kernel only), "" (neither)
W8A8_CASES = [("dynamic", "vnni", 1), ("dynamic", "vnni", 40), ("static-sym", "vnni", 7),
              ("static-asym", "vnni", 300), ("dynamic", "", 3), ("dynamic", "", 100),
              ("static-asym", "", 5), ("dynamic", "", 1), ("dynamic", "avx2", 6),
              ("static-sym", "avx2", 1), ("static-asym", "avx2", 3)]


def _w8(kind: str, seed: int = 0) -> W8A8Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(256, 384)
    if kind == "dynamic":
        return W8A8Linear.from_float(lin)
    q = W8A8Linear.from_float(lin, activation="static", act_symmetric=kind == "static-sym")
    q.set_activation_range(-3.0, 2.5)
    return q


@pytest.mark.parametrize(("kind", "native_ok", "m"), W8A8_CASES)
@torch.no_grad()
def test_w8a8_plan_runs_the_chosen_path_bit_identically(kind: str, native_ok: str, m: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CPU W8A8 path (linquant's native kernels; without them fbgemm, oneDNN, the
    reference), planned, gives the unplanned call's bits."""
    from linquant.kernels import native

    if native_ok != "vnni":
        monkeypatch.setattr(native, "w8a8_supported", lambda x, w: False)
    if native_ok != "avx2":
        monkeypatch.setattr(native, "w8a8_avx2_supported", lambda x, w: False)
    q = _w8(kind)
    x = torch.randn(m, 256) * 2
    static = kind != "dynamic"
    args = (q.weight_qdata, q.weight_scale, q.bias,
            q.input_scale if static else None, q._buffers.get("input_zero_point"))
    want = kernels.linear_w8a8(x, *args)
    assert torch.equal(q(x), want)
    (p,) = q.kernel_cache()["w8a8_plans"].values()
    assert p.path == kernels.select_w8a8_path(x, q.weight_qdata, args[3])
    assert torch.equal(q(x), want)


@torch.no_grad()
def test_w8a8_plan_is_dropped_when_the_activation_range_changes() -> None:
    q = _w8("static-asym")
    x = torch.randn(6, 256) * 2
    y = q(x)
    q.set_activation_range(-1.0, 1.0)
    want = kernels.linear_w8a8(x, q.weight_qdata, q.weight_scale, q.bias, q.input_scale,
                               q._buffers.get("input_zero_point"))
    assert torch.equal(q(x), want) and not torch.equal(want, y)


@torch.no_grad()
def test_casting_or_moving_the_layer_drops_its_plans() -> None:
    """``model.half()`` replaces the bias's ``.data`` in place (same object, same version):
    the layer clears its cache, so no plan keeps the old bias; a cast back gives the
    reference's bits for the bias it now has."""
    q = _layer("int4-asym-g32-fp16", BF)
    x = torch.randn(3, 256).to(BF)
    q(x)
    assert "cpu_plans" in q.kernel_cache()
    with torch.no_grad():
        q.bias.copy_(torch.randn(384) * 1e4)  # values that fp16 rounds differently
    q(x)
    q.half()
    assert q.kernel_cache() == {}
    q.to(BF)
    assert torch.equal(q(x), kernels.linear_weight_only(x, q.qweight, q.bias))
    q(x)
    q.to(BF)  # nothing moved or cast: the cache stays
    assert "cpu_plans" in q.kernel_cache()


def test_not_a_tensor_is_still_a_clear_error_with_a_cache() -> None:
    q = _layer("int4-asym-g32-fp16", BF)
    with pytest.raises(lq.LinquantError):
        kernels.linear_weight_only([1.0, 2.0], q.qweight, q.bias, {})  # type: ignore[arg-type]


# ---- embeddings -----------------------------------------------------------------------------


@pytest.mark.parametrize("native_ok", [True, False])
@torch.no_grad()
def test_embedding_plan_gathers_the_same_bits_and_still_checks_indices(
        native_ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from linquant.kernels import native
    from linquant.nn import QuantEmbedding

    if not native_ok:
        monkeypatch.setattr(native, "gather_supported", lambda qt, dtype: False)
    torch.manual_seed(0)
    q = QuantEmbedding.from_float(nn.Embedding(500, 64), "int4-asym-g32-bf16").to(BF)
    ids = torch.randint(0, 500, (3, 7))
    want = kernels.embedding_weight_only(ids, q.qweight, BF)
    assert torch.equal(q(ids), want)
    (p,) = q.kernel_cache()["gather_plans"].values()
    assert p.path == ("cpu_native_gather" if native_ok and native.available("avx2")
                      else "reference")

    def no(*a: object) -> object:
        raise AssertionError("planned afresh")

    monkeypatch.setattr(kernels, "embedding_runner", no)
    assert torch.equal(q(ids), want)  # the plan
    bad = ids.clone()
    bad[1, 2] = 500
    with pytest.raises(lq.LinquantError, match=r"indices must be in \[0, 500\)"):
        q(bad)  # checked before the plan's unchecked gather
    monkeypatch.undo()
    q.float()  # a new output dtype: the plans go
    assert "gather_plans" not in q.kernel_cache()
    assert torch.equal(q(ids), kernels.embedding_weight_only(ids, q.qweight, torch.float32))


# ---- property: any sequence of calls and changes -------------------------------------------

_ACTIONS = st.lists(st.one_of(
    # few signatures, so that a change often falls between two calls of the same one
    st.tuples(st.just("call"), st.sampled_from([1, 300]), st.sampled_from([torch.float32, BF])),
    st.tuples(st.sampled_from(["bias", "new_bias", "codes", "scale"]), st.floats(0.5, 2.0)),
    st.tuples(st.just("grad"), st.just(1))), min_size=2, max_size=14)


@settings(max_examples=100, deadline=None)
@given(scheme=st.sampled_from(["int4-asym-g32-fp16", "int8-sym-ch0", "int4-sym-ch0"]),
       actions=_ACTIONS, seed=st.integers(0, 2**16))
def test_planned_calls_equal_unplanned_calls_property(
        scheme: str, actions: list[tuple[object, ...]], seed: int) -> None:
    """Whatever the sequence of calls (shapes, dtypes, with and without autograd) and of
    in-place or wholesale changes to the weight and bias, every call of the layer gives the
    bits of an unplanned call on the layer's current tensors (with autograd: without the
    bias, which is added after)."""
    q = _layer(scheme, torch.float32, seed=seed)  # 384 x 256: large enough for the fast paths
    g = torch.Generator().manual_seed(seed)
    for act in actions:
        kind = act[0]
        with torch.no_grad():
            if kind == "bias":
                q.bias.add_(float(act[1]))  # type: ignore[arg-type]
            elif kind == "new_bias":
                q.bias = nn.Parameter(torch.full((384,), float(act[1])))  # type: ignore[arg-type]
            elif kind == "codes":
                q.weight_qdata[0] = int(100 * float(act[1]))  # type: ignore[arg-type]
            elif kind == "scale":
                q.weight_scale.mul_(float(act[1]))  # type: ignore[arg-type]
        if kind == "call":
            m, dtype = act[1], act[2]
            x = torch.randn(int(m), 256, generator=g).to(dtype)  # type: ignore[call-overload]
            with torch.no_grad():
                want = kernels.linear_weight_only(x, q.qweight, q.bias)
                got = q(x)
            assert got.dtype == dtype and torch.equal(got, want), (act, got.dtype)
        elif kind == "grad":
            x = torch.randn(int(act[1]), 256, generator=g,  # type: ignore[call-overload]
                            requires_grad=True)
            y = q(x)  # autograd: the fast path without the bias, the bias added after
            with torch.no_grad():
                want = kernels.linear_weight_only(x.detach(), q.qweight, None) + q.bias
            assert torch.equal(y.detach(), want)
            q.bias.grad = None
            y.sum().backward()
            assert x.grad is not None and q.bias.grad is not None  # the bias is trained too


@pytest.mark.parametrize("kind", ["dynamic", "static-asym"])
@torch.no_grad()
def test_w8a8_layer_replays_its_plan_before_the_dispatcher(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q = _w8(kind)
    x = torch.randn(5, 256)
    y = q(x)

    def no(*a: object, **k: object) -> object:
        raise AssertionError("the dispatcher ran again")

    monkeypatch.setattr(kernels, "linear_w8a8", no)
    assert torch.equal(q(x), y)
    if kind != "dynamic":
        q.observing = True  # calibrating: the weight-only forward, never the W8A8 plan
        assert q(x).shape == y.shape
