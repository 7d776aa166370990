"""The float-type -> quantized-module table."""

from __future__ import annotations

import pytest
from torch import nn

import linquant as lq
from linquant.nn import (
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantModule,
    W8A8Linear,
    quant_module_for,
    register_qmodule,
    registered,
)


@pytest.mark.parametrize(
    "module, mode, expected",
    [
        (nn.Linear(4, 4), "weight_only", QuantLinear),
        (nn.Embedding(4, 4), "weight_only", QuantEmbedding),
        (nn.Conv2d(4, 4, 1), "weight_only", QuantConv2d),
        (nn.Linear(4, 4), "w8a8", W8A8Linear),
        (nn.Embedding(4, 4), "w8a8", None),
        (nn.LayerNorm(4), "weight_only", None),
        (nn.Conv1d(4, 4, 1), "weight_only", QuantConv1d),
        (nn.Conv3d(4, 4, 1), "weight_only", None),
    ],
    ids=["linear", "embedding", "conv2d", "linear-w8a8", "embedding-w8a8", "layernorm", "conv1d",
         "conv3d"],
)
def test_lookup(module: nn.Module, mode: str, expected: type | None) -> None:
    assert quant_module_for(module, mode) is expected  # type: ignore[arg-type]


def test_subclasses_are_not_matched() -> None:
    # nn.MultiheadAttention reads out_proj.weight itself: swapping its Linear subclass breaks it
    mha = nn.MultiheadAttention(8, 2)
    assert quant_module_for(mha.out_proj) is None


def test_hf_conv1d_matched_by_name() -> None:
    pu = pytest.importorskip("transformers.pytorch_utils",
                             reason="transformers is not installed (Conv1D tests)")
    c = pu.Conv1D(4, 4)
    assert quant_module_for(c) is QuantLinear
    assert quant_module_for(c, "w8a8") is W8A8Linear

    class Conv1D(nn.Module):  # same class name, other module: not matched
        pass

    assert quant_module_for(Conv1D()) is None


def test_falcon_linear_matched_by_name_and_quantized() -> None:
    # FalconLinear subclasses nn.Linear with the same product (x @ W.T + b), so it is swapped;
    # Falcon models once kept every projection float ("unsupported type FalconLinear")
    transformers = pytest.importorskip("transformers")
    import torch

    from linquant.ops.metrics import sqnr

    falcon = transformers.models.falcon.modeling_falcon
    layer = falcon.FalconLinear(8, 4)
    assert quant_module_for(layer) is QuantLinear
    assert quant_module_for(layer, "w8a8") is W8A8Linear
    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=96)
    model = transformers.FalconForCausalLM(config).eval()
    reference = transformers.FalconForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    report = lq.quantize_model(model, "w8a8")
    kinds = {r.type for r in report.quantized}
    assert "FalconLinear" in kinds
    assert not any(isinstance(m, falcon.FalconLinear) for m in model.modules())
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert sqnr(reference(ids).logits, model(ids).logits) > 30


def test_register_and_conflicts() -> None:
    class MyLinear(nn.Linear):
        pass

    @register_qmodule(MyLinear)
    class MyQuantLinear(QuantLinear):
        pass

    assert quant_module_for(MyLinear(2, 2)) is MyQuantLinear
    assert any(name.endswith("MyLinear") for name in registered())
    with pytest.raises(lq.LinquantError, match=r"already registered"):
        register_qmodule(nn.Linear)(MyQuantLinear)
    with pytest.raises(lq.LinquantError, match=r"mode"):
        register_qmodule(nn.Linear, mode="w4a4")  # type: ignore[arg-type]
    with pytest.raises(lq.LinquantError, match=r"mode"):
        quant_module_for(nn.Linear(2, 2), "int4")  # type: ignore[arg-type]


def test_all_weight_only_modules_take_any_scheme() -> None:
    scheme = "int3-asymf-g8-bf16"
    for float_module in (nn.Linear(16, 4), nn.Embedding(5, 16), nn.Conv2d(8, 4, 1)):
        cls = quant_module_for(float_module)
        assert cls is not None and issubclass(cls, QuantModule)
        q = cls.from_float(float_module, scheme, name="m")  # type: ignore[attr-defined]
        assert str(q.scheme) == scheme and q.qweight.bits_per_weight > 3


def test_linquant_import_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, linquant, linquant.nn, linquant.calibrate; " \
           "print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
