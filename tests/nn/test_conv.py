"""QuantConv1d, QuantConv2d: F.conv1d / F.conv2d on the dequantized weight, SQNR floors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linquant as lq
from linquant.nn import QuantConv1d, QuantConv2d

# Output SQNR (dB) vs nn.Conv2d(16, 32, 3, padding=1) on x ~ N(0, 1) [2, 16, 8, 8], measured over
# 20 seeds (min / mean): int8-sym-ch0 47.8/48.2, int4-sym-g48 23.0/23.2, int4-asym-g48
# 23.4/23.8, int4-asymf-g48 23.9/24.0 (g48 = 16 channels x 3x3 / 3: whole input channels).
SQNR_FLOORS = {
    "int8-sym-ch0": 46.8,
    "int4-sym-g48-fp16": 22.0,
    "int4-asym-g48-fp16": 22.4,
    "int4-asymf-g48-fp16": 22.8,
}


@pytest.mark.parametrize("scheme", list(SQNR_FLOORS))
def test_sqnr_floor(scheme: str) -> None:
    c = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    assert lq.sqnr(c(x), QuantConv2d.from_float(c, scheme)(x)) >= SQNR_FLOORS[scheme]


CONVS = {
    "plain": dict(in_channels=8, out_channels=12, kernel_size=3),
    "stride-pad-dil": dict(in_channels=8, out_channels=12, kernel_size=(3, 2), stride=2,
                           padding=(2, 1), dilation=(2, 1)),
    "groups-no-bias": dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, bias=False),
    "same-reflect": dict(in_channels=8, out_channels=4, kernel_size=3, padding="same",
                         padding_mode="reflect"),
}


def test_per_channel_codes_equal_4d_quantization() -> None:
    c = nn.Conv2d(6, 10, 3)
    q = QuantConv2d.from_float(c, "int8-sym-ch0")
    ref = lq.quantize(c.weight.detach(), "int8-sym-ch0")
    assert torch.equal(q.qweight.codes().reshape(c.weight.shape), ref.codes())
    assert torch.equal(q.weight_scale.reshape(-1), ref.scale.reshape(-1))


def test_groups_run_along_flattened_in_kh_kw() -> None:
    c = nn.Conv2d(4, 2, 3, bias=False)  # row length 4*9 = 36
    q = QuantConv2d.from_float(c, "int4-sym-g18")  # 2 groups per row, each 2 whole channels
    assert q.weight_scale.shape == (2, 2)
    ref = lq.quantize(c.weight.detach().reshape(2, 36), "int4-sym-g18")
    assert torch.equal(q.weight_scale, ref.scale)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(q(x), F.conv2d(x, ref.dequantize().reshape(2, 4, 3, 3)),
                               rtol=0, atol=0)


def test_state_dict_round_trip_and_repr() -> None:
    c = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    q = QuantConv2d.from_float(c, "int4-sym-g36-fp16", name="stem")
    fresh = QuantConv2d.skeleton(c, "int4-sym-g36-fp16")
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(fresh(x), q(x))
    assert repr(q) == ("QuantConv2d(8, 12, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), "
                       "groups=2, bias=True, scheme=int4-sym-g36-fp16)")


def test_bad_inputs_name_the_layer() -> None:
    q = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), "int8-sym-ch0", name="features.0")
    with pytest.raises(lq.LinquantError, match=r"'features\.0'.*\[N, 3, H, W\]"):
        q(torch.randn(1, 4, 8, 8))
    with pytest.raises(lq.LinquantError, match=r"'c1'.*Linear"):
        QuantConv2d.from_float(nn.Linear(3, 3), "int8-sym-ch0", name="c1")
    with pytest.raises(lq.LinquantError, match=r"'c2'.*group_size 32"):
        QuantConv2d.from_float(nn.Conv2d(3, 4, 3), "int4-sym-g32", name="c2")


# ---- QuantConv1d: the same layer one rank down (Whisper's and wav2vec2's front ends) ----------
CONVS_1D = {
    "plain": dict(in_channels=8, out_channels=12, kernel_size=3),
    "stride-pad-dil": dict(in_channels=8, out_channels=12, kernel_size=5, stride=2, padding=3,
                           dilation=2),
    "groups-no-bias": dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, bias=False),
    "depthwise-same-circular": dict(in_channels=8, out_channels=8, kernel_size=4, groups=8,
                                    padding="same", padding_mode="circular"),
}


CASES = [*((nn.Conv2d, QuantConv2d, k, (2, 8, 9, 11)) for k in CONVS),
         *((nn.Conv1d, QuantConv1d, k, (2, 8, 23)) for k in CONVS_1D)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("float_cls", "cls", "kind", "shape"), CASES,
                         ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
def test_equals_float_conv_with_dequantized_weight(float_cls: type[nn.Module], cls: Any,
                                                   kind: str, shape: tuple[int, ...],
                                                   dtype: torch.dtype) -> None:
    table = CONVS if float_cls is nn.Conv2d else CONVS_1D
    c: Any = float_cls(**table[kind])
    q = cls.from_float(c, "int4-asym-ch0-fp16")
    assert tuple(q.qweight.shape) == (c.out_channels, c.weight[0].numel())
    w = q.qweight.dequantize().reshape(c.weight.shape)
    assert torch.equal(q.weight, w)
    ref: Any = float_cls(**table[kind]).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(w)
        if c.bias is not None:
            ref.bias.copy_(c.bias)
    x = torch.randn(*shape, dtype=dtype)
    y = q(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(q(x[0]), ref(x[0]), rtol=0, atol=0)  # unbatched input


def test_conv1d_sqnr_codes_state_dict_and_errors() -> None:
    c = nn.Conv1d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 40)
    assert lq.sqnr(c(x), QuantConv1d.from_float(c, "int8-sym-ch0")(x)) > 45
    q = QuantConv1d.from_float(c, "int4-sym-g24-fp16", name="conv1")  # 16 x 3 = 2 groups a row
    ref = lq.quantize(c.weight.detach().reshape(32, 48), "int4-sym-g24-fp16")
    assert torch.equal(q.qweight.codes(), ref.codes()) and q.weight_scale.shape == (32, 2)
    fresh = QuantConv1d.skeleton(c, "int4-sym-g24-fp16")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert repr(q) == ("QuantConv1d(16, 32, kernel_size=(3,), stride=(1,), padding=(1,), "
                       "bias=True, scheme=int4-sym-g24-fp16)")
    with pytest.raises(lq.LinquantError, match=r"'conv1'.*\[N, 16, L\]"):
        q(torch.randn(2, 15, 40))
    with pytest.raises(lq.LinquantError, match=r"'c2'.*expected nn.Conv1d"):
        QuantConv1d.from_float(nn.Conv2d(3, 4, 3), "int8-sym-ch0", name="c2")


def test_models_with_conv1d_quantize_save_and_load(tmp_path: Path) -> None:
    from linquant.io.save import load_into, save

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv1d(4, 32, 3, padding=1), nn.GELU(),
                             nn.Conv1d(32, 32, 3, stride=2), nn.Flatten(), nn.LazyLinear(8))

    torch.manual_seed(0)
    m = model()
    x = torch.randn(2, 4, 16)
    m(x)  # materialise the lazy layer
    report = lq.quantize_model(m, "w8a32")
    assert isinstance(m[0], QuantConv1d) and isinstance(m[2], QuantConv1d)
    assert report["2"].bits_per_weight is not None and report["2"].sqnr_db > 40
    save(m, tmp_path / "q")
    back = model()
    back(x)
    load_into(back, tmp_path / "q")
    assert isinstance(back[2], QuantConv1d)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
