"""quantize_model on small models built here: swaps, reasons, patterns, ties, memory, reports."""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import re
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from linquant.calibrate import calibrate
from linquant.config import PRESETS, QuantConfig
from linquant.convert import _largest_divisor_below, model_nbytes, quantize_model
from linquant.errors import LinquantError
from linquant.nn import QuantConv2d, QuantEmbedding, QuantLinear, W8A8Linear
from linquant.ops.metrics import sqnr
from linquant.scheme import QuantScheme

# The w4a16 presets' weights, without their bf16 compute dtype: these tests compare fp32 outputs.
W4 = QuantConfig(QuantScheme.parse("int4-asym-g32-fp16"))
W4G128 = QuantConfig(QuantScheme.parse("int4-asym-g128-fp16"))
W4SYM = QuantConfig(QuantScheme.parse("int4-sym-g32-fp16"))


class Tiny(nn.Module):
    """Embedding, Conv2d, LayerNorm, an odd in_features (72) and parameter-free modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.LayerNorm(64)
        self.block = nn.Sequential(nn.Linear(64, 72), nn.GELU(), nn.Linear(72, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.emb(ids))
        return self.head(self.block(h)), self.conv(img)


class TiedLM(nn.Module):
    """An input embedding shared with the output head (one Parameter in two modules)."""

    def __init__(self, vocab: int = 40, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(torch.tanh(self.mix(self.embed(ids))))
        return out


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (3, 5), generator=g), torch.randn(2, 2, 6, 6, generator=g)


def _tensor_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())


def _fake_quantized(model: nn.Module, qmodel: nn.Module) -> nn.Module:
    """``model`` with each weight replaced by its quantized twin's dequantized weight."""
    by_name = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            q = by_name.get(name)
            if isinstance(q, (QuantLinear, QuantEmbedding, QuantConv2d, W8A8Linear)):
                m.weight.copy_(q.qweight.dequantize(torch.float32).reshape(m.weight.shape))
    return model


# ---- swapping and the report -------------------------------------------------------------------
def test_weight_only_swaps_every_supported_layer_and_reports_every_layer() -> None:
    model = Tiny()
    reference = Tiny()
    reference.load_state_dict(model.state_dict())
    report = quantize_model(model, W4)
    assert isinstance(model.emb, QuantEmbedding)
    assert isinstance(model.conv, QuantConv2d)
    assert isinstance(model.block[0], QuantLinear) and isinstance(model.block[2], QuantLinear)
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.block[1], nn.GELU)
    names = [r.name for r in report.layers]
    assert names == ["emb", "conv", "norm", "block.0", "block.2", "head"]  # module order
    assert [r.name for r in report.skipped] == ["norm"]
    assert report["norm"].reason == "unsupported type LayerNorm"
    fc = report["block.0"]
    assert (fc.type, fc.shape, fc.scheme) == ("Linear", (72, 64), "int4-asym-g32-fp16")
    assert fc.bits_per_weight == pytest.approx(4 + 20 / 32)
    assert fc.bytes_before == (72 * 64 + 72) * 4
    assert fc.bytes_after == _tensor_bytes(model.block[0]) < fc.bytes_before
    assert fc.sqnr_db is not None and 15 < fc.sqnr_db < 40
    # The quantized model computes exactly what the float model with dequantized weights does.
    ids, img = _inputs()
    with torch.no_grad():
        got = model(ids, img)
        want = _fake_quantized(reference, model)(ids, img)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_group_size_falls_back_to_the_largest_divisor_and_says_so() -> None:
    model = Tiny()
    report = quantize_model(model, W4)
    fc2 = report["block.2"]  # in_features 72: 32 does not divide it, 24 is the largest that does
    assert fc2.scheme == "int4-asym-g24-fp16"
    assert "group size 32 -> 24" in fc2.note and "in_features 72" in fc2.note
    fc2_module = model.block[2]
    assert isinstance(fc2_module, QuantLinear) and fc2_module.scheme.group_size == 24
    conv = report["conv"]  # conv rows are in/groups*kh*kw = 2*3*3 = 18 long
    assert conv.scheme == "int4-asym-g18-fp16" and "18" in conv.note
    assert report["block.0"].note == ""


def test_576_columns_with_group_128_use_group_96() -> None:
    model = nn.Sequential(nn.Linear(576, 8))
    report = quantize_model(model, W4G128)
    assert report["0"].scheme == "int4-asym-g96-fp16"
    assert "group size 128 -> 96" in report["0"].note


def test_strict_refuses_the_fallback_and_changes_nothing() -> None:
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LinquantError, match=r"'block\.2'.*group size 32 does not divide "
                                            r"in_features 72.*24"):
        quantize_model(model, W4, strict=True)
    assert all(isinstance(m, nn.Linear) for m in (model.block[0], model.block[2], model.head))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = quantize_model(model, W4, strict=True, exclude=["block.2", "conv"])
    assert report["block.0"].quantized


@given(n=st.integers(1, 5000), g=st.integers(1, 512))
def test_fallback_group_divides_the_row_and_is_the_largest(n: int, g: int) -> None:
    d = _largest_divisor_below(n, g)
    assert n % d == 0 and 1 <= d <= g
    assert all(n % e for e in range(d + 1, min(g, n) + 1))


# ---- selection -----------------------------------------------------------------------------------
def test_include_and_exclude_patterns_with_reasons() -> None:
    model = Tiny()
    report = quantize_model(model, "w8a32", include=["block.*", "head", "norm"],
                            exclude=["*.2"])
    assert report["block.0"].quantized and report["head"].quantized
    assert report["block.2"].reason == "excluded by pattern '*.2'"
    assert report["emb"].reason == "not matched by include ['block.*', 'head', 'norm']"
    assert report["conv"].reason is not None and report["conv"].reason.startswith("not matched")
    assert report["norm"].reason == "unsupported type LayerNorm"
    assert isinstance(model.block[2], nn.Linear) and isinstance(model.emb, nn.Embedding)


def test_a_pattern_also_matches_the_descendants_of_a_module() -> None:
    model = Tiny()
    report = quantize_model(model, "w8a32", exclude="block")
    assert report["block.0"].reason == report["block.2"].reason == "excluded by pattern 'block'"
    assert report["head"].quantized


def test_patterns_that_match_nothing_are_reported() -> None:
    report = quantize_model(Tiny(), "w8a32", exclude=["decoder.*"], include=["*", "hed"])
    assert report.unmatched_patterns == ("hed", "decoder.*")
    assert report.shadowed_patterns == ()
    assert "patterns that matched no layer: 'hed', 'decoder.*'" in str(report)


def test_patterns_that_match_layers_but_decide_none_are_reported_apart() -> None:
    """The first matching pattern wins: a '*' first leaves 'head' nothing to decide, and an
    excluded layer's pattern decides nothing either; they match layers, so they are no typos."""
    report = quantize_model(Tiny(), {"*": "w8a32", "head": "w4a16-g32", "emb": "w8a16",
                                     "nothing": "w8a32"}, exclude=["emb"], include=["*", "emb"])
    assert report["head"].scheme == "int8-sym-ch0-fp32"
    assert report.unmatched_patterns == ("nothing",)
    assert report.shadowed_patterns == ("head", "emb")
    assert ("patterns that decided no layer (an exclude, the include list or an earlier "
            "pattern settled every layer they match): 'head', 'emb'") in str(report)
    assert json.loads(report.to_json())["shadowed_patterns"] == ["head", "emb"]


def test_dict_config_mixed_precision_first_match_wins() -> None:
    model = Tiny()
    w3 = QuantConfig(QuantScheme.parse("int3-sym-ch0"))
    report = quantize_model(model, {"block.2": None, "block.*": W4SYM, "emb": w3,
                                    "conv": "w8a32", "head": "float", "nothing": "w8a32"})
    assert report["block.0"].scheme == "int4-sym-g32-fp16"
    assert report["block.2"].reason == "kept float by pattern 'block.2'"
    assert report["emb"].scheme == "int3-sym-ch0-fp32"
    assert report["conv"].scheme == "int8-sym-ch0-fp32"
    assert report["head"].reason == "kept float by pattern 'head'"
    assert report["norm"].reason == "not matched by any config pattern"
    assert report.unmatched_patterns == ("nothing",)
    assert isinstance(model.block[2], nn.Linear)


@pytest.mark.parametrize("preset", ["w4a16-g32", "w8a8"])
def test_a_nan_weight_is_refused_before_anything_changes(preset: str) -> None:
    """The last layer's NaN is found before the first layer is replaced: the model keeps every
    float layer and value (a NaN met mid-walk used to leave it half quantized)."""
    model = Tiny()
    with torch.no_grad():
        model.head.weight[3, 5] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LinquantError, match=re.escape(
            "head.weight: input holds 1 NaN/Inf value(s), first at index (3, 5)")):
        quantize_model(model, preset)
    assert not [m for m in model.modules() if isinstance(m, (QuantLinear, W8A8Linear,
                                                              QuantEmbedding, QuantConv2d))]
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(torch.nan_to_num(after[k]), torch.nan_to_num(v))
               for k, v in state.items())


def test_fp16_scales_that_would_overflow_are_refused_before_anything_changes() -> None:
    """int4 with fp16 scales cannot hold a scale of 1e6 / 7: the last layer's weight is refused
    before the first layer is replaced (it used to fail mid-walk, the model half quantized)."""
    model = Tiny()
    with torch.no_grad():
        model.head.weight[3, 5] = 1e6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LinquantError, match=r"head.*scale.*overflow float16 storage"):
        quantize_model(model, "w4a16-sym-g32")
    assert not [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding,
                                                              QuantConv2d))]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_wide_range_whose_groups_fit_fp16_scales_is_quantized() -> None:
    """The tensor's range says a scale could overflow, its groups' ranges say none does: the
    pre-check quantizes that weight to find out and lets it through."""
    model = Tiny()
    with torch.no_grad():
        model.head.weight[0, :32] = 6e5  # one group of 32 at +6e5 ...
        model.head.weight[1, :32] = -6e5  # ... another at -6e5: (6e5 + 6e5) / 15 > 65504
    report = quantize_model(model, "w4a16-g32")
    assert report["head"].scheme == "int4-asym-g32-fp16, compute bf16"
    assert isinstance(model.head, QuantLinear)


# allow_subnormal=False: an exponent is never subnormal, and hypothesis refuses the default in a
# process where some library has set flush-to-zero (seen in the torch 2.4.1 environment)
_MAGNITUDES = st.builds(lambda e, sign: sign * 10.0**e,
                        st.floats(0.0, 6.5, allow_subnormal=False), st.sampled_from([-1.0, 1.0]))


@settings(max_examples=300, deadline=None)
@example(-6e5, 6e5, "int4-asym-g32-fp16")  # each side fits, the range does not: 1.2e6 / 15
@example(-5e5, 0.0, "int4-sym-g32-fp16")  # 5e5 / 7
@given(_MAGNITUDES, _MAGNITUDES,
       st.sampled_from(["int4-sym-g32-fp16", "int4-asym-g32-fp16", "int8-sym-ch0-fp16",
                        "int2-asym-g32-fp16", "int3-asymf-g32-fp16", "int8-asym-ch0-fp16"]))
def test_may_overflow_never_calls_an_overflowing_range_safe(a: float, b: float, text: str
                                                           ) -> None:
    """The pre-check's bound: a range it calls safe quantizes (the bound is never too low)."""
    from linquant.ops.qparams import may_overflow, qparams_from_range

    lo, hi, scheme = min(a, b), max(a, b), QuantScheme.parse(text)
    if not may_overflow(lo, hi, scheme):
        qparams_from_range(torch.tensor([lo]), torch.tensor([hi]), scheme)


def test_bad_arguments() -> None:
    with pytest.raises(LinquantError, match="unknown preset 'w5'"):
        quantize_model(Tiny(), "w5")
    with pytest.raises(LinquantError, match="unknown preset 'w5'"):
        quantize_model(Tiny(), {"*": "w5"})
    with pytest.raises(LinquantError, match="empty"):
        quantize_model(Tiny(), {})
    with pytest.raises(LinquantError, match="config must be"):
        quantize_model(Tiny(), 8)  # type: ignore[arg-type]
    with pytest.raises(LinquantError, match="patterns must be strings"):
        quantize_model(Tiny(), "w8a32", exclude=[3])  # type: ignore[list-item]
    with pytest.raises(LinquantError, match=r"needs an nn\.Module"):
        quantize_model("model", "w8a32")  # type: ignore[arg-type]
    with pytest.raises(LinquantError, match="different compute dtypes"):
        quantize_model(Tiny(), {"emb": "w8a16",
                                "head": QuantConfig(PRESETS["w8a32"].weight,
                                                    compute_dtype=torch.float16)})


def test_root_module_already_quantized_and_unmaterialized_layers() -> None:
    lin = nn.Linear(8, 8)
    report = quantize_model(lin, "w8a32")
    assert report[""].reason is not None and "root module" in report[""].reason
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, device="meta"))
    quantize_model(model, "w8a32", exclude="1")
    again = quantize_model(model, "w8a32")
    # the layer as it is: its type, weight shape and scheme (it said "Linear", no shape)
    assert again["0"].reason == "already quantized (QuantLinear, int8-sym-ch0-fp32)"
    assert (again["0"].type, again["0"].shape) == ("QuantLinear", (8, 8))
    assert again["1"].reason == "weight not materialized (lazy or meta)"


def test_lazy_float8_and_root_layers_stay_float_with_their_reasons() -> None:
    """An uninitialised ``LazyLinear`` made quantize_model raise torch's ValueError while
    sizing the model, having quantized the layers before it; a float8 weight raised
    NotImplementedError from the range check. Both are kept float with a reason and the other
    layers are quantized. A root module of an unsupported type is reported as that, not as
    "wrap it" (wrapping would not help)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4))
    report = quantize_model(model, "w8a32")
    assert isinstance(model[0], QuantLinear) and type(model[1]) is nn.LazyLinear
    assert report["1"].reason == "unsupported type LazyLinear"
    if hasattr(torch, "float8_e4m3fn"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        model[1].weight.data = model[1].weight.data.to(torch.float8_e4m3fn)
        report = quantize_model(model, "w8a32")
        assert isinstance(model[0], QuantLinear) and type(model[1]) is nn.Linear
        assert report["1"].reason == ("weight dtype torch.float8_e4m3fn: only fp32, fp16, bf16 "
                                      "and fp64 weights are quantized")

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(8, 8)

    report = quantize_model(Root(), "w8a32")
    assert report[""].reason == "unsupported type Root"


def test_a_weight_held_as_a_buffer_is_a_layer() -> None:
    """A Linear / Embedding whose frozen weight is a buffer had no report row and stayed float
    (the walk looked only at modules with parameters); it is quantized like any other."""
    model = nn.Sequential(nn.Linear(16, 8), nn.Embedding(10, 16))
    for m in model:
        w = m._parameters.pop("weight")
        assert w is not None
        m.register_buffer("weight", w.detach())
    want = model[0](torch.randn(2, 16))
    report = quantize_model(model, "w8a32")
    assert [type(m).__name__ for m in model] == ["QuantLinear", "QuantEmbedding"]
    assert report["0"].reason is None and report["1"].reason is None
    x = torch.randn(2, 16)
    assert sqnr(nn.functional.linear(x, model[0].weight, model[0].bias), model[0](x)) > 35
    assert want.shape == (2, 8)


def test_hooks_and_train_mode_move_to_the_quantized_layer() -> None:
    """Forward (pre-)hooks and backward hooks on a layer were dropped by the swap (a hook that
    changed the output silently stopped); the quantized layer runs them, their handles still
    remove them, and dequantize_model carries them back. The layer keeps the model's
    train / eval mode (quantized layers were left in train mode)."""
    model = Tiny().eval()
    seen: list[str] = []
    handles = [
        model.head.register_forward_pre_hook(lambda m, a: seen.append("pre")),
        model.head.register_forward_hook(lambda m, a, out: out * 0),
        model.emb.register_forward_hook(lambda m, a, kw, out: seen.append("emb"),
                                        with_kwargs=True),
        model.head.register_full_backward_hook(lambda m, gi, go: seen.append("back")),
    ]
    quantize_model(model, "w8a32")
    assert isinstance(model.head, QuantLinear) and isinstance(model.emb, QuantEmbedding)
    assert not any(m.training for m in model.modules())
    x = torch.randn(3, 64, requires_grad=True)
    out = model.head(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    model.emb(torch.tensor([1, 2]))
    assert seen == ["pre", "back", "emb"]
    from linquant.restore import dequantize_model

    dequantize_model(model)
    assert type(model.head) is nn.Linear
    seen.clear()
    model.head(x)
    assert seen == ["pre"]
    for h in handles:
        h.remove()
    model.head(x)
    model.emb(torch.tensor([1]))
    assert seen == ["pre"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # weight_norm's deprecation
@pytest.mark.parametrize("reparam", ["weight_norm", "spectral_norm", "prune"])
def test_legacy_weight_reparametrizations_are_baked_in(reparam: str) -> None:
    """``weight_norm`` / ``spectral_norm`` / ``prune`` rebuild ``weight`` in a forward
    pre-hook from parameters the quantized layer does not have: carried over with the other
    hooks, they failed on every call ("no attribute 'weight_g'"). Their effect is in the
    quantized weight; they are dropped, and the layer's other hooks still run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv1d(4, 4, 3))
    for layer in model:
        if reparam == "weight_norm":
            nn.utils.weight_norm(layer)
        elif reparam == "spectral_norm":
            nn.utils.spectral_norm(layer)
        else:
            nn.utils.prune.l1_unstructured(layer, "weight", 0.5)
    calls: list[int] = []
    model[0].register_forward_hook(lambda m, a, out: calls.append(1))
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = F.linear(x, model[0].weight, model[0].bias)
    quantize_model(model, "w8a32")
    assert isinstance(model[0], QuantLinear)
    with torch.no_grad():
        assert sqnr(want, model[0](x)) > 35
        model[1](torch.randn(1, 4, 8))
    assert calls == [1]


@pytest.mark.parametrize("patch", ["forward", "compile"])
def test_a_layer_patched_on_its_instance_stays_float(patch: str) -> None:
    """A layer whose instance replaces its forward (accelerate's hooks for device_map and
    offloading do) or that was compiled in place (``module.compile()``) is kept float with the
    reason: a quantized layer in its place would compute without the patch (experts modules
    copied the patched forward and so computed with their float weights)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    if patch == "forward":
        original = model[1].forward
        model[1].forward = lambda x: original(x) * 2  # type: ignore[method-assign]
    else:
        model[1].compile(backend="eager")
    report = quantize_model(model, "w8a32")
    assert isinstance(model[0], QuantLinear) and type(model[1]) is nn.Linear
    reason = report["1"].reason
    assert reason is not None and ("replaced on the instance" if patch == "forward"
                                   else "compiled in place") in reason


def test_a_bias_keeps_its_parameter_and_its_tie() -> None:
    """The quantized layer holds the float layer's bias Parameter (it held a copy): an
    optimizer built before quantizing still trains it, and a bias tied to another module's
    (BERT's masked-LM decoder.bias is cls.predictions.bias) no longer keeps the layer, and
    through its tied weight the word embeddings, float."""

    class Head(nn.Module):  # BertLMPredictionHead's shape: an unsupported owner of the bias
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Linear(16, 32)
            self.bias = self.decoder.bias

    model = nn.Sequential(nn.Embedding(32, 16), Head())
    model[1].decoder.weight = model[0].weight
    bias = model[1].bias
    opt = torch.optim.SGD([bias], lr=1.0)
    report = quantize_model(model, "w8a32")
    assert isinstance(model[1].decoder, QuantLinear) and isinstance(model[0], QuantEmbedding)
    assert report["1.decoder"].tied_to == "0"
    assert model[1].decoder.bias is bias and model[1].bias is bias
    model[1].decoder(torch.randn(2, 16)).sum().backward()
    before = bias.detach().clone()
    opt.step()
    assert not torch.equal(bias, before)


# ---- W8A8 and compute dtype ---------------------------------------------------------------------
def test_w8a8_dynamic_linear_layers_and_weight_only_embeddings() -> None:
    model = Tiny()
    report = quantize_model(model, "w8a8")
    assert isinstance(model.head, W8A8Linear) and model.head.activation == "dynamic"
    assert report["head"].scheme == "int8-sym-ch0-fp32, act int8-sym-token dynamic"
    assert isinstance(model.emb, QuantEmbedding)
    assert report["emb"].scheme == "int8-sym-ch0-fp32"
    assert "weight-only: no int8-activation layer for Embedding" in report["emb"].note
    assert report["head"].bits_per_weight == pytest.approx(8 + 32 / 64)
    with torch.no_grad():
        model(*_inputs())


def test_w8a8_static_needs_calibration() -> None:
    model = Tiny()
    reference = Tiny()
    reference.load_state_dict(model.state_dict())
    quantize_model(model, "w8a8-static")
    assert isinstance(model.head, W8A8Linear) and model.head.activation == "static"
    ids, img = _inputs()
    with pytest.raises(LinquantError, match="needs a range"), torch.no_grad():
        model(ids, img)
    with calibrate(model), torch.no_grad():
        model(ids, img)
    with torch.no_grad():
        out, _ = model(ids, img)
        ref, _ = reference(ids, img)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_w8a16_casts_the_model_but_not_the_quantized_buffers() -> None:
    model = Tiny()
    reference = Tiny()
    reference.load_state_dict(model.state_dict())
    report = quantize_model(model, "w8a16")
    assert report.compute_dtype == torch.bfloat16
    assert "model cast to bfloat16" in str(report)
    assert report["head"].scheme == "int8-sym-ch0-fp32, compute bf16"
    assert model.norm.weight.dtype == torch.bfloat16
    assert model.head.bias is not None and model.head.bias.dtype == torch.bfloat16
    assert model.head.weight_scale.dtype == torch.float32  # codes were made with fp32 scales
    ids, img = _inputs()
    with torch.no_grad():
        out, conv = model(ids, img.bfloat16())
        ref, _ = reference(ids, img)
    assert out.dtype == conv.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.995


def test_hf_conv1d_is_quantized_in_its_transposed_layout() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(16, 72))  # weight [in=72, out=16]
    x = torch.randn(3, 72)
    with torch.no_grad():
        ref = model(x)
    report = quantize_model(model, W4)
    row = report["0"]
    assert row.type == "Conv1D" and row.shape == (72, 16)
    assert row.scheme == "int4-asym-g24-fp16" and "in_features 72" in row.note
    assert row.sqnr_db is not None and row.sqnr_db > 15
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0)
    assert cos > 0.98


def test_square_hf_conv1d_reports_the_error_of_its_transposed_weight() -> None:
    # A square Conv1D weight has the quantized weight's shape: only the module type says that
    # it is stored [in, out] (the report once compared it untransposed: -3 dB for 20).
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(48, 48))
    nn.init.normal_(model[0].weight)
    w = model[0].weight.detach().clone()
    report = quantize_model(model, "w4a16-sym-g32")
    deq = model[0].qweight.dequantize(torch.float32)
    assert report["0"].sqnr_db == pytest.approx(sqnr(w.t(), deq), rel=1e-9)
    assert report["0"].sqnr_db > 15 > sqnr(w, deq)


# ---- tied weights ----------------------------------------------------------------------------
def test_tied_weight_is_quantized_once_and_stays_tied() -> None:
    model = TiedLM()
    reference = TiedLM()
    reference.load_state_dict(model.state_dict())
    before = _tensor_bytes(model)
    report = quantize_model(model, W4)
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    for buf in ("weight_qdata", "weight_scale", "weight_zero_point"):
        assert getattr(model.lm_head, buf) is getattr(model.embed, buf)
    head = report["lm_head"]
    assert head.tied_to == "embed" and "tied to embed (weight stored once)" in head.note
    assert report.bytes_before == before == 40 * 32 * 4 + (32 * 32 + 32) * 4
    assert report.bytes_after == _tensor_bytes(model)
    # The shared table is counted once, in the model total and in bits per weight.
    assert report.bytes_after < report["embed"].bytes_after + report["lm_head"].bytes_after + (
        report["mix"].bytes_after)
    assert report.bits_per_weight == pytest.approx(4.625)
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        want = _fake_quantized(reference, model)(ids)
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["w4a16-g32", "w8a8"])
def test_a_layer_takes_its_weights_shape_not_its_stale_attributes(preset: str,
                                                                   tmp_path: Path) -> None:
    """A head built for 40 outputs, then tied to an embedding of 56 rows (what transformers'
    tying does when a config's two vocabulary sizes differ, as in Marian): its float forward
    computes 56 outputs with the weight, and so do the quantized layers, saved and loaded."""
    from linquant.io.save import load_into, save

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Module()
        model.embed = nn.Embedding(56, 32)
        model.lm_head = nn.Linear(32, 40, bias=False)
        model.lm_head.weight = model.embed.weight
        model.lm_head.in_features = 30  # a stale attribute on the other side too
        return model

    model, float_model = build(), build()
    x = torch.randn(3, 32)
    report = quantize_model(model, preset)
    assert report["lm_head"].quantized and report["lm_head"].shape == (56, 32)
    with torch.no_grad():
        y = model.lm_head(x)
        assert y.shape == (3, 56) and model.embed(torch.tensor([55])).shape == (1, 32)
        assert sqnr(float_model.lm_head(x), y) > 15
    save(model, tmp_path / "q")
    loaded = load_into(build(), tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded.lm_head(x), y)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        pytest.param({"config": "w4a16-g32", "exclude": ["lm_head"]},
                     "'lm_head' stays float (excluded by pattern 'lm_head')", id="one-excluded"),
        pytest.param({"config": {"embed": "w4a16-g32", "lm_head": "w4a16-sym-g32", "mix": "w8a32"}},
                     "different weight schemes", id="different-schemes"),
    ],
)
def test_tied_weight_left_float_when_the_partners_disagree(
    kwargs: dict[str, object], why: str
) -> None:
    model = TiedLM()
    report = quantize_model(model, **kwargs)  # type: ignore[arg-type]
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.embed.weight
    embed_reason = report["embed"].reason
    assert embed_reason is not None and "tied weight shared with 'lm_head'" in embed_reason
    assert why in embed_reason
    assert report["mix"].quantized


def test_w8a8_head_shares_the_int8_codes_of_its_tied_embedding(tmp_path: Path) -> None:
    # The embedding is quantized weight-only to int8-sym-ch0-fp32, the W8A8 head's weight
    # scheme: the same bytes, held once (the head's int8 [N, K] codes a view of the table's).
    from linquant.io.save import load_into, save

    torch.manual_seed(0)
    model, reference = TiedLM(), TiedLM()
    reference.load_state_dict(model.state_dict())
    before = model.embed.weight.detach().clone()
    report = quantize_model(model, "w8a8")
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.lm_head, W8A8Linear)
    head, embed = model.lm_head, model.embed
    assert head.weight_qdata.dtype == torch.int8 and embed.weight_qdata.dtype == torch.uint8
    assert head.weight_qdata.data_ptr() == embed.weight_qdata.data_ptr()
    assert head.weight_scale is embed.weight_scale
    assert report["lm_head"].tied_to == "embed" and report["embed"].reason is None
    table = 40 * 32 + 40 * 4  # int8 codes + fp32 row scales, once
    assert report.bytes_after == table + 32 * 32 + 32 * 4 + 32 * 4  # + mix: codes, scales, bias
    assert report.bytes_after == model_nbytes(model)
    alone = W8A8Linear.from_float(reference.lm_head)  # what an untied head would hold
    assert torch.equal(alone.weight_qdata, head.weight_qdata)
    assert torch.equal(embed.qweight.dequantize(), lq_dequant := alone.qweight.dequantize())
    assert sqnr(before, lq_dequant) > 35
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        y = model(ids)
    save(model, tmp_path / "q")
    again = TiedLM()
    load_into(again, tmp_path / "q")
    assert again.lm_head.weight_qdata.data_ptr() == again.embed.weight_qdata.data_ptr()
    with torch.no_grad():
        assert torch.equal(again(ids), y)


def _convert(where: str) -> tuple[Callable[[nn.Module], object], torch.device]:
    """A conversion that makes new buffers, as a device move does."""
    if where == "clone":
        return (lambda m: m._apply(lambda t: t.clone())), torch.device("cpu")
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return (lambda m: m.to(where)), torch.device(where)


@pytest.mark.parametrize("where", ["clone", "meta", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("preset", ["w4a16-g32", "w8a8"])
def test_tied_quantized_weights_stay_one_buffer_after_a_device_move(
        preset: str, where: str) -> None:
    # PyTorch converts each module's buffers separately: without linquant's memo the two
    # layers would each hold a copy on the new device.
    from linquant.nn import base

    torch.manual_seed(0)
    model = TiedLM()
    quantize_model(model, preset)
    codes = model.embed.weight_qdata.clone()
    size = model_nbytes(model)
    move, device = _convert(where)
    move(model)
    head, embed, mix = model.lm_head, model.embed, model.mix
    assert head.weight_qdata.device == embed.weight_qdata.device == device
    assert head.weight_scale is embed.weight_scale
    assert head.weight_qdata.data_ptr() == embed.weight_qdata.data_ptr() or where == "meta"
    if where != "meta":  # no addresses there
        assert torch.equal(embed.weight_qdata.cpu(), codes)
        assert model_nbytes(model) == size  # the table counted once, as before the move
    assert mix.weight_qdata.data_ptr() != embed.weight_qdata.data_ptr() or where == "meta"
    assert not base._TIED_MEMO  # the memo lives as long as the call


def test_a_kept_conversion_function_never_ties_what_was_not_tied() -> None:
    # A kept fn keeps its memo between calls; the memo holds the old tensors, so no address
    # of an earlier call can come back as a false match.
    torch.manual_seed(0)
    model = TiedLM()
    quantize_model(model, "w4a16-g32")
    model.mix = QuantLinear.from_float(nn.Linear(32, 32), "int4-asym-g32-fp16")
    want = {n: b.clone() for n, b in model.named_buffers()}

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    for _ in range(4):
        model._apply(fn)
        got = dict(model.named_buffers(remove_duplicate=False))
        for n, b in want.items():
            assert torch.equal(got[n], b), n
        ptrs = {n: b.data_ptr() for n, b in got.items()}
        assert ptrs["lm_head.weight_qdata"] == ptrs["embed.weight_qdata"]
        assert len(set(ptrs.values()) - {ptrs["embed.weight_qdata"],
                                         ptrs["embed.weight_scale"],
                                         ptrs["embed.weight_zero_point"]}) == len(ptrs) - 6


def test_a_shared_bias_stays_shared() -> None:
    """Layers sharing only their bias are quantized and keep sharing it (they were kept float,
    when quantized layers copied their biases); a layer whose weight a float module holds
    stays float."""
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.bias = a.bias
    model = nn.Sequential(a, b, nn.Linear(8, 8))
    report = quantize_model(model, "w8a32")
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear)
    assert model[0].bias is model[1].bias is a.bias
    assert all(r.quantized for r in report.layers)
    norm, c = nn.LayerNorm(8), nn.Linear(8, 8)
    c.bias = norm.weight  # the bias of one, another parameter of the other: kept too
    model = nn.Sequential(norm, c)
    quantize_model(model, "w8a32")
    assert isinstance(model[1], QuantLinear) and model[1].bias is model[0].weight
    holder, d = nn.Module(), nn.Linear(8, 8)
    holder.p = d.weight  # a layer's weight held by a module of an unsupported type
    model = nn.Sequential(holder, d)
    report = quantize_model(model, "w8a32")
    assert type(model[1]) is nn.Linear
    assert "stays float (unsupported type Module)" in (report["1"].reason or "")


def test_one_module_object_at_two_names_is_swapped_at_both() -> None:
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quantize_model(model, "w8a32")
    assert model[0] is model[2] and isinstance(model[0], QuantLinear)
    assert [r.name for r in report.layers] == ["0"] and "also at 2" in report["0"].note
    model = nn.Sequential(shared2 := nn.Linear(16, 16), nn.ReLU(), shared2)
    report = quantize_model(model, "w8a32", exclude=["2"])
    assert isinstance(model[0], nn.Linear) and model[0] is model[2]
    assert "selected differently" in (report["0"].reason or "")


# ---- memory ------------------------------------------------------------------------------------
def test_float_weights_are_freed() -> None:
    model = Tiny()
    with torch.no_grad():
        model(*_inputs())
    before = _tensor_bytes(model)
    refs = [weakref.ref(m.weight) for m in (model.emb, model.block[0], model.head, model.conv)]
    report = quantize_model(model, "w8a32")
    gc.collect()
    assert all(r() is None for r in refs)
    after = _tensor_bytes(model)
    assert report.bytes_before == before == model_nbytes(Tiny())
    assert report.bytes_after == after
    float_weights = (50 * 64 + 72 * 64 + 64 * 72 + 10 * 64 + 4 * 2 * 9) * 4
    # Every float weight is gone; what is left is int8 codes, fp32 scales, biases, LayerNorm.
    assert before - after == pytest.approx(float_weights * 3 / 4, rel=0.05)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in model.parameters())


# ---- output ------------------------------------------------------------------------------------
def test_repr_shows_the_scheme_of_each_layer() -> None:
    model = Tiny()
    quantize_model(model, W4)
    text = repr(model)
    assert text.count("scheme=int4-asym-g32-fp16") == 3  # emb, block.0, head
    assert "scheme=int4-asym-g24-fp16" in text and "scheme=int4-asym-g18-fp16" in text


def test_str_is_an_aligned_table_with_totals() -> None:
    report = quantize_model(Tiny(), W4)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["layer", "type", "shape", "scheme"]
    assert set(lines[1]) <= {"-", " "}
    table = lines[: 2 + len(report.layers)]
    for title in ("type", "shape", "scheme", "note / reason kept float"):  # aligned columns
        col = lines[0].index(title)
        rows = [line for line in table[2:] if len(line) > col]
        assert all(line[col - 1] == " " and line[col] != " " for line in rows), title
    assert "unsupported type LayerNorm" in text
    assert "quantized 5 of 6 layers" in lines[-1] and "bits per quantized weight" in lines[-1]


def test_to_json_and_to_csv() -> None:
    report = quantize_model(Tiny(), W4)
    data = json.loads(report.to_json())
    assert data["bytes_before"] == report.bytes_before
    assert data["bytes_after"] == report.bytes_after
    assert math.isclose(data["bits_per_weight"], report.bits_per_weight or 0.0)
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["norm"]["reason"] == "unsupported type LayerNorm"
    assert by_name["block.2"]["scheme"] == "int4-asym-g24-fp16"
    assert by_name["block.2"]["shape"] == [64, 72]
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["name"] for r in rows] == [r.name for r in report.layers]
    assert rows[0]["shape"] == "50x64" and rows[0]["quantized"] == "True"
    assert float(rows[3]["sqnr_db"]) == pytest.approx(report["block.0"].sqnr_db)
    assert rows[2]["reason"] == "unsupported type LayerNorm" and rows[2]["sqnr_db"] == ""


def test_json_writes_an_exact_reconstruction_as_inf() -> None:
    lin = nn.Linear(4, 2)
    model = nn.Sequential(lin)
    with torch.no_grad():  # integers with max |w| = 127 per row: int8 codes are exact
        lin.weight.copy_(torch.tensor([[127.0, -3.0, 0.0, 5.0], [-127.0, 1.0, 2.0, 0.0]]))
    report = quantize_model(model, "w8a32")
    assert report["0"].sqnr_db == math.inf
    assert json.loads(report.to_json())["layers"][0]["sqnr_db"] == "inf"


def test_layers_a_model_keeps_in_fp32_stay_float_with_the_reason() -> None:
    # transformers' own quantizers leave _keep_in_fp32_modules alone (T5's wo overflows in fp16)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    assert "wo" in model._keep_in_fp32_modules
    report = quantize_model(model, "w8a32")
    wo = [r for r in report.layers if r.name.endswith(".wo")]
    assert len(wo) == 2  # encoder and decoder feed-forward
    for r in wo:
        assert r.reason == ("T5ForConditionalGeneration._keep_in_fp32_modules lists 'wo' "
                            "(transformers keeps it in fp32 for accuracy; its own quantizers "
                            "leave it alone)")
    assert report["encoder.block.0.layer.1.DenseReluDense.wi"].quantized
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert model(ids, decoder_input_ids=ids[:, :3]).logits.isfinite().all()


def test_keep_in_fp32_names_match_whole_name_parts() -> None:
    class Block(nn.Module):
        _keep_in_fp32_modules = ("proj", "head.out")

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(32, 32)
            self.proj2 = nn.Linear(32, 32)  # "proj" is not a part of "proj2" or "outproj"
            self.outproj = nn.Linear(32, 32)
            self.head = nn.Module()
            self.head.out = nn.Linear(32, 32)
            self.head.inner = nn.Linear(32, 32)

    model = nn.Sequential(Block())
    report = quantize_model(model, "w8a32")
    kept = {r.name for r in report.skipped}
    assert kept == {"0.proj", "0.head.out"}
    assert report["0.proj2"].quantized and report["0.head.inner"].quantized
    assert report["0.outproj"].quantized


def test_config_texts_are_accepted_where_presets_are() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    report = quantize_model(model, {"0": "int3-asym-g16-fp16", "2": "int8-sym-ch0-fp32, act "
                                    "int8-sym-token dynamic"})
    assert report["0"].scheme == "int3-asym-g16-fp16"
    assert isinstance(model[2], W8A8Linear)
    assert report.compute_dtype is None
    again = nn.Sequential(nn.Linear(64, 64))
    assert quantize_model(again, "int4-sym-g32-fp16, compute bf16").compute_dtype == (
        torch.bfloat16)


def test_a_layer_its_quantized_class_cannot_take_is_planned_float() -> None:
    # max_norm renormalises the table in place at every forward: refused while planning, so
    # nothing is replaced halfway (it once raised after the layers before it were swapped)
    model = nn.Sequential(nn.Linear(64, 64), nn.Embedding(100, 64, max_norm=1.0),
                          nn.Linear(64, 8))
    report = quantize_model(model, "w8a32")
    assert report["1"].reason == ("max_norm=1.0 renormalises the table in place at every "
                                  "forward, which a quantized table cannot do")
    assert isinstance(model[1], nn.Embedding)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)


def test_rows_hold_the_sizes_after_the_cast_to_the_compute_dtype() -> None:
    """Under a bf16 preset the rows say what the layers hold after the cast, as the total does:
    a kept-float layer norm half its fp32 bytes, a quantized layer's bias in bf16 (before, the
    rows kept the sizes measured before the cast and did not add up to the total)."""
    model = Tiny()
    report = quantize_model(model, "w4a16-g32")
    assert report.compute_dtype == torch.bfloat16
    norm = report["norm"]
    assert norm.reason is not None and norm.bytes_after == norm.bytes_before // 2
    assert norm.bytes_after == _tensor_bytes(model.norm)
    fc = report["block.0"]
    assert fc.bytes_after == _tensor_bytes(model.block[0])
    assert model.block[0].bias.dtype == torch.bfloat16
    assert sum(r.bytes_after for r in report.layers) == report.bytes_after


def test_compute_dtype_keeps_buffers_the_model_does_not_persist() -> None:
    """A rotary table computed at construction stays fp32, as in a model loaded in bf16 (by
    transformers or linquant.load, which build it anew); persistent float buffers are cast."""

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.register_buffer("inv_freq", torch.rand(8), persistent=False)
            self.register_buffer("running", torch.rand(8))
            self.register_buffer("ids", torch.arange(8), persistent=False)

    m = Rotary()
    table = m.inv_freq.clone()
    report = quantize_model(m, "w8a16")
    assert report.compute_dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, table)
    assert m.running.dtype == torch.bfloat16 and m.ids.dtype == torch.int64
    assert m.fc.bias.dtype == torch.bfloat16


def _tiny_hf(arch: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if arch == "m2m_100":
        return transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(
            vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1,
            decoder_start_token_id=2)).eval()
    if arch == "gemma3":  # composite: its text model is built in its sub-config's dtype
        return transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             vocab_size=128, layer_types=["full_attention"]),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=8),
            mm_tokens_per_image=4)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128)).eval()


@pytest.mark.parametrize("arch", ["m2m_100", "llama", "gemma3"])
def test_unpersisted_buffers_get_the_dtype_from_pretrained_gives_them(
        tmp_path: Path, arch: str) -> None:
    """M2M100 builds its sinusoidal position tables in the default dtype, so
    ``from_pretrained(..., dtype=bf16)`` has them in bf16; Llama makes its rotary ``inv_freq``
    in fp32 on purpose. quantize_model's cast to bf16, and linquant.load of the saved model
    (built in fp32, filled with bf16 tensors), give both what from_pretrained gives. Before, an
    M2M100 kept fp32 tables either way: they turned its activations back to fp32, and its
    first layer norm (bf16) raised."""
    import transformers

    from linquant.io.save import load, save

    def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
        return {f"{prefix}.{n}": b.dtype for prefix, m in model.named_modules()
                for n, b in m._buffers.items()
                if n in m._non_persistent_buffers_set and b is not None and b.is_floating_point()}

    model = _tiny_hf(arch)
    model.save_pretrained(tmp_path / "float")
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    reference = type(model).from_pretrained(tmp_path / "float", **{key: torch.bfloat16})
    expected = dtypes(reference)
    assert set(expected.values()) == {"m2m_100": {torch.bfloat16}, "llama": {torch.float32},
                                      "gemma3": {torch.bfloat16, torch.float32}}[arch]
    quantize_model(model, "w4a16-g32")
    assert dtypes(model) == expected
    ids = torch.randint(3, 100, (1, 9))
    kwargs = {"decoder_input_ids": ids[:, :4]} if arch == "m2m_100" else {}
    with torch.no_grad():
        y = model(ids, **kwargs).logits
        assert sqnr(reference(ids, **kwargs).logits.float(), y.float()) > 10
    save(model, tmp_path / "q")
    back = load(tmp_path / "q")
    assert dtypes(back) == expected
    with torch.no_grad():
        assert torch.equal(back(ids, **kwargs).logits, y)


@pytest.mark.parametrize(("arch", "dtype", "preset"), [
    ("llama", torch.bfloat16, "w8a8"), ("llama", torch.float16, "w8a16"),
    ("llama", torch.bfloat16, "w4a16-g32"), ("m2m_100", torch.float16, "w8a32")])
def test_a_model_cast_to_16_bits_computes_the_same_after_save_and_load(
        tmp_path: Path, arch: str, dtype: torch.dtype, preset: str) -> None:
    """A model cast with ``.to(dtype)`` before quantizing has its rotary ``inv_freq`` rounded to
    16 bits. Non-persistent buffers are not stored: load builds them again (fp32, freshly
    computed) and gave them from_pretrained's dtype, so the loaded model's logits differed
    from the saved model's (0.006 for Llama in bf16 with w8a8). Now save records each one's
    dtype and load restores it; the cast to a preset's compute dtype no longer widens a 16-bit
    buffer to fp32 (which kept its rounded values, unlike the fresh ones load builds)."""
    from linquant.io import hf
    from linquant.io.save import load, save

    model = _tiny_hf(arch).to(dtype)
    before = {n: b.dtype for n, (_, _, b) in hf.unpersisted_float_buffers(model).items()}
    quantize_model(model, preset)
    kept = {n: b.dtype for n, (_, _, b) in hf.unpersisted_float_buffers(model).items()}
    assert before and all(kept[n].itemsize <= before[n].itemsize for n in before)
    save(model, tmp_path / "q")
    back = load(tmp_path / "q")
    assert {n: b.dtype for n, (_, _, b) in hf.unpersisted_float_buffers(back).items()} == kept
    ids = torch.randint(3, 100, (1, 9))
    kwargs = {"decoder_input_ids": ids[:, :4]} if arch == "m2m_100" else {}
    with torch.no_grad():
        assert torch.equal(back(ids, **kwargs).logits, model(ids, **kwargs).logits)


def test_the_buffer_dtypes_lookup_prints_no_transformers_deprecation(tmp_path: Path) -> None:
    """Finding the buffers' dtypes rebuilds the model from its config with the config's dtype
    set. transformers 5's ``config.torch_dtype`` is a property that logs "`torch_dtype` is
    deprecated!"; reading it there printed that line on every ``linquant quantize``."""
    import logging

    from linquant.io.save import load, save

    model = _tiny_hf("llama")
    model.config.dtype = torch.float32  # as a loaded model's config has it
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers' own
    hf_logger.addHandler(handler)
    try:
        quantize_model(model, "w4a16-g32")
        save(model, tmp_path / "q")
        load(tmp_path / "q")
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "torch_dtype" in r.getMessage()]


def test_a_row_counts_only_the_tensors_its_module_holds_itself() -> None:
    """GPT-OSS's attention owns its ``sinks`` besides its projections: its row (kept float)
    counts the sinks, not the projections, which have rows of their own."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sinks = nn.Parameter(torch.zeros(4))
            self.q_proj = nn.Linear(64, 64, bias=False)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()

    report = quantize_model(Net(), "w8a32")
    assert report["attn"].reason == "unsupported type Attention"
    assert report["attn"].bytes_before == report["attn"].bytes_after == 16
    assert report["attn.q_proj"].bytes_before == 64 * 64 * 4
    assert report.bytes_before == 16 + 64 * 64 * 4


@pytest.mark.parametrize("preset", ["w8a32", "w8a8", "w8a8-static", "w4a16-g32"])
def test_gradients_flow_through_a_quantized_transformer(preset: str) -> None:
    """A step of training through a quantized GPT-2 (what LoRA-style fine-tuning and gradient
    attribution do): the input embeddings' gradient follows the float model's, the float
    parameters left (norms, biases) get gradients, the quantized weights none. W8A8's gradient
    is the straight-through one (its int8 activation codes carry none: autograd through them
    once reached one element per token)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=64,
                                  n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    quantize_model(model, preset)
    emb = torch.randn(3, 9, 128) * 0.5
    if preset == "w8a8-static":
        with calibrate(model), torch.no_grad():
            model(inputs_embeds=emb)

    def grad(m: nn.Module) -> torch.Tensor:
        dtype = next(p.dtype for p in m.parameters() if p.is_floating_point())  # bf16: *a16
        x = emb.to(dtype).clone().requires_grad_(True)
        m(inputs_embeds=x).logits.float().pow(2).mean().backward()
        assert x.grad is not None
        return x.grad.float()

    g_ref, g = grad(ref), grad(model)
    cos = nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0)
    assert cos > 0.95, float(cos)
    assert all(int((r != 0).sum()) > 0.9 * r.numel() for r in g.reshape(-1, 128))
    h0 = model.transformer.h[0]
    assert h0.ln_1.weight.grad is not None and h0.mlp.c_fc.bias.grad is not None
    assert all(not b.requires_grad for b in h0.mlp.c_fc.buffers())


class _ListBlock(nn.Module):
    """Runs its layers from a plain list that it also registers, as Mask2Former's
    ``PredictionBlock`` does; a dict and a tuple hold some of them too."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)]
        self.by_role = {"head": self.layers[2]}
        self.first = (self.layers[0], "input")
        for i, layer in enumerate(self.layers):
            self.add_module(str(i), layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_layers_also_held_in_plain_lists_are_replaced_there_too(tmp_path: Path) -> None:
    """Mask2Former keeps ``self.layers = [nn.Linear(...), activation]`` beside registering
    them. quantize_model replaced the registered child only: the report said quantized, the
    forward ran the old float layer (and after lq.load, a float layer left on the meta device).
    Now quantize_model, load_into and dequantize_model follow the replacement into plain lists,
    dicts and tuples."""
    from linquant.io.save import load_into, save
    from linquant.restore import dequantize_model

    torch.manual_seed(0)
    model = _ListBlock()
    x = torch.randn(3, 32)
    reference = model(x).detach()
    report = quantize_model(model, "w8a8")
    assert {r.name for r in report.quantized} == {"0", "2"}
    save(model, tmp_path / "q")
    for m in (model, load_into(_ListBlock(), tmp_path / "q")):
        assert m.layers[0] is m._modules["0"] and m.layers[2] is m._modules["2"]
        assert m.by_role["head"] is m._modules["2"] and m.first[0] is m._modules["0"]
        assert type(m.layers[0]).__name__ == "W8A8Linear"
        with torch.no_grad():
            y = m(x)
        assert 30 < sqnr(reference, y) < 60  # the int8 layers ran, not the float ones
    dequantize_model(model)
    assert type(model.layers[0]) is nn.Linear and model.layers[0] is model._modules["0"]
    assert model.by_role["head"] is model._modules["2"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_an_empty_layer_is_kept_float_with_a_reason_before_anything_changes() -> None:
    """A zero-size layer (a head with no labels) raised "cannot quantize an empty tensor"
    after the layers before it were replaced: the model was left half quantized."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 0))
    report = quantize_model(model, "w8a32")
    assert [type(m).__name__ for m in model] == ["QuantLinear", "Linear"]
    assert report["1"].reason == "empty weight (shape (0, 64)): nothing to quantize"


def test_a_float64_model_quantizes_saves_and_loads() -> None:
    """fp64 weights were refused by lq.quantize partway through quantize_model, and a model
    cast with .double() after quantizing saved a file load refused (its dtype "float64")."""
    import tempfile

    from linquant.io.save import load_into, save
    from linquant.tensor import quantize

    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.float64)
    # half of the values just past a .5 boundary of the codes, by less than fp32 can tell: the
    # fp64 quotient rounded once to fp32 and then to the code took the other side
    s = float(quantize(w.float(), "int8-sym-tensor").scale)
    near = (torch.randint(-5, 5, (32, 64)).double() + 0.5 + 2.0**-20 * torch.rand(32, 64,
            dtype=torch.float64)) * s
    w = torch.where(torch.arange(64) % 2 == 0, w, near)
    with pytest.raises(LinquantError, match=r"float64 values beyond float32's range"):
        quantize(torch.tensor([1.0, 1e300], dtype=torch.float64))
    with pytest.raises(LinquantError, match=r"holds 1 NaN/Inf value\(s\), first at index \(1,\)"):
        quantize(torch.tensor([1e300, float("nan")], dtype=torch.float64))
    for scheme in ("int8-sym-tensor", "int8-sym-ch0", "int4-asym-g32-fp16",
                   "int4-asymf-g32-bf16"):
        qt, q32 = quantize(w, scheme), quantize(w.float(), scheme)
        assert all(torch.equal(a, b) for a, b in zip(qt.tensors().values(),
                                                     q32.tensors().values(), strict=True))
        assert qt.dequantize().dtype == torch.float64
        assert torch.equal(qt.dequantize(), q32.dequantize(torch.float64))

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).double()

    x = torch.randn(3, 64, dtype=torch.float64)
    for preset, cast_after in (("w4a16-g32", False), ("w8a32", True)):
        model = make() if not cast_after else make().float()
        quantize_model(model, preset)
        if cast_after:
            model.double()
        with tempfile.TemporaryDirectory() as tmp:
            save(model, Path(tmp) / "m")
            back = load_into(make(), Path(tmp) / "m")
        with torch.no_grad():
            assert model(x).dtype == torch.float64
            assert torch.equal(back(x), model(x))
