"""A quantized layer's ``weight``: the dequantized weight in the float layer's layout, read-only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linquant.convert import quantize_model
from linquant.errors import LinquantError
from linquant.nn import QuantConv2d, QuantEmbedding, QuantLinear, W8A8Linear
from linquant.ops.metrics import sqnr


@pytest.mark.parametrize("square", [False, True])
def test_linear_and_conv1d_weights_come_back_in_their_own_layout(square: bool) -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    out_f = 48 if square else 80
    conv1d = pytorch_utils.Conv1D(out_f, 48)  # weight [in=48, out]
    nn.init.normal_(conv1d.weight)
    linear = nn.Linear(48, out_f)
    for float_layer, cls in ((conv1d, QuantLinear), (linear, QuantLinear), (conv1d, W8A8Linear),
                             (linear, W8A8Linear)):
        w = float_layer.weight.detach().clone()
        q = (cls.from_float(float_layer, "int8-sym-ch0") if cls is QuantLinear
             else cls.from_float(float_layer))
        got = q.weight
        assert got.shape == w.shape and got.dtype == torch.float32
        want = q.qweight.dequantize(torch.float32)
        assert torch.equal(got, want.t() if float_layer is conv1d else want)
        assert sqnr(w, got) > 35  # the orientation is right: a square one included
        assert q.stored_transposed == (float_layer is conv1d)


def test_embedding_and_conv2d_weights_and_dtype() -> None:
    torch.manual_seed(0)
    emb = QuantEmbedding.from_float(nn.Embedding(30, 32), "int4-asym-g16-fp16")
    assert torch.equal(emb.weight, emb.qweight.dequantize())
    conv = nn.Conv2d(4, 8, 3)
    qc = QuantConv2d.from_float(conv, "int8-sym-ch0")
    assert qc.weight.shape == conv.weight.shape == (8, 4, 3, 3)
    assert sqnr(conv.weight.detach(), qc.weight) > 35
    qc.to(torch.bfloat16)
    assert qc.weight.dtype == torch.bfloat16  # the layer's compute dtype


def test_weight_is_read_only_and_not_a_parameter() -> None:
    q = QuantLinear.from_float(nn.Linear(32, 16), "int8-sym-ch0")
    for value in (nn.Parameter(torch.zeros(16, 32)), torch.zeros(16, 32)):
        with pytest.raises(LinquantError, match=r"QuantLinear: weight is read-only"):
            q.weight = value
    assert "weight" not in dict(q.named_parameters()) and "weight" not in q.state_dict()
    w = q.weight
    w.zero_()  # a fresh tensor: the layer is unchanged
    assert q.weight.abs().sum() > 0


def test_vision_models_that_read_the_patch_embedding_weight_run() -> None:
    # CLIP / SigLIP / BLIP vision embeddings cast pixels to patch_embedding.weight.dtype
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           image_size=32, patch_size=8)
    model = transformers.CLIPVisionModel(config).eval()
    reference = transformers.CLIPVisionModel(config).eval()
    reference.load_state_dict(model.state_dict())
    report = quantize_model(model, "w8a32")
    patch = [r for r in report.layers if r.name.endswith("embeddings.patch_embedding")]
    assert len(patch) == 1 and patch[0].quantized  # "vision_model." before transformers 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = model(pixel_values=x).pooler_output, reference(pixel_values=x).pooler_output
    assert sqnr(want, got) > 30
