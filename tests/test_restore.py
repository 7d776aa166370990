"""dequantize_model: quantized layers back to float layers of their original types, holding
exactly the dequantized weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import linquant as lq
from linquant.errors import LinquantError
from linquant.nn import QuantModule
from linquant.nn.experts import QuantExperts
from linquant.ops.metrics import sqnr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=3)
        self.conv = nn.Conv1d(32, 32, 3, padding=1, groups=2)
        self.img = nn.Conv2d(1, 4, (3, 2), stride=(1, 2), padding=(1, 0), bias=False)
        self.fc = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)                                   # [B, T, 32]
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.img(x[:, None]).mean(1).repeat_interleave(2, -1)
        return self.head(self.norm(self.fc(x)))


def _types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _no_quantized_layers(model: nn.Module) -> None:
    assert not [n for n, m in model.named_modules() if isinstance(m, (QuantModule, QuantExperts))]


@pytest.mark.parametrize("preset", ["w8a32", "w8a16", "w4a16-g32", "w4a16-sym-g32", "w8a8"])
def test_layers_come_back_as_their_float_types(preset: str) -> None:
    float_model = Net().eval()
    model = copy.deepcopy(float_model)
    lq.quantize_model(model, preset, exclude=["img"] if preset == "w8a8" else [])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    weights = {n: m.weight.clone() for n, m in layers.items()}
    biases = {n: getattr(m, "bias", None) for n, m in layers.items()}
    ids = torch.randint(0, 50, (2, 8))
    with torch.inference_mode():
        want = model(ids).float()
    assert lq.dequantize_model(model) is model
    _no_quantized_layers(model)
    assert _types(model) == _types(float_model)
    assert list(model.state_dict()) == list(float_model.state_dict())
    for n, w in weights.items():
        m = model.get_submodule(n)
        assert isinstance(m.weight, nn.Parameter) and torch.equal(m.weight, w)
        assert getattr(m, "bias", None) is biases[n]  # the same Parameter
    assert model.emb.padding_idx == 3 and model.conv.groups == 2 and model.img.stride == (1, 2)
    with torch.inference_mode():
        got = model(ids).float()
    # same weights, float kernels instead of the quantized ones (w8a8: no activation rounding)
    assert sqnr(want, got) > (25 if preset == "w8a8" else 40)


def test_dtype_and_errors() -> None:
    model = Net()
    lq.quantize_model(model, "w4a16-g32")  # bf16 model
    lq.dequantize_model(model, "float32")
    assert model.fc.weight.dtype == torch.float32 and model.fc.bias is not None
    assert model.fc.bias.dtype == torch.float32
    assert model.norm.weight.dtype == torch.bfloat16  # float layers are left as they are
    assert lq.dequantize_model(model) is model  # nothing quantized: unchanged
    with pytest.raises(LinquantError, match="dtype"):
        lq.dequantize_model(Net(), torch.int8)
    with pytest.raises(LinquantError, match="dtype"):
        lq.dequantize_model(Net(), "float99")
    with pytest.raises(LinquantError, match=r"nn\.Module"):
        lq.dequantize_model("model")  # type: ignore[arg-type]
    q = lq.nn.QuantLinear.from_float(nn.Linear(8, 8), "int8-sym-ch0")
    with pytest.raises(LinquantError, match="quantized layer itself"):
        lq.dequantize_model(q)


def test_tied_weights_stay_tied() -> None:
    model = Net()
    model.fc = nn.Linear(32, 32)
    model.norm = nn.LayerNorm(32)
    model.head = nn.Linear(32, 50, bias=False)
    model.head.weight = model.emb.weight  # [50, 32] both
    lq.quantize_model(model, "w8a32")
    assert model.head.weight_qdata is model.emb.weight_qdata
    lq.dequantize_model(model)
    assert model.head.weight is model.emb.weight
    assert len(list(model.parameters())) == len(list(Net().parameters())) - 1


def test_hf_model_dequantize_then_save_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.quantizers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    model: Any = transformers.GPT2LMHeadModel(cfg).eval()
    types = _types(model)
    lq.quantize_model(model, "w8a8")
    lq.save(model, tmp_path / "q")
    loaded: Any = lq.load(tmp_path / "q")
    x = torch.randint(0, 128, (1, 9))
    with torch.inference_mode():
        want = loaded(x).logits
    assert loaded.dequantize() is loaded  # transformers' own call
    _no_quantized_layers(loaded)
    assert _types(loaded) == types  # Conv1D back as Conv1D
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert getattr(loaded, "hf_quantizer", None) is None
    assert getattr(loaded.config, "quantization_config", None) is None
    with torch.inference_mode():
        got = loaded(x).logits
    assert sqnr(want, got) > 25
    loaded.save_pretrained(str(tmp_path / "hf"))  # an ordinary float checkpoint again
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.inference_mode():
        assert torch.equal(again(x).logits, got)


def test_hf_resize_token_embeddings_after_dequantize() -> None:
    """What the README says: transformers' resize_token_embeddings refuses a quantized table;
    dequantize, resize, quantize again works, and the old tokens keep their embeddings."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=128,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    model: Any = transformers.GPT2LMHeadModel(cfg).eval()
    lq.quantize_model(model, "w8a16")
    table = model.transformer.wte.weight.clone()
    with pytest.raises(TypeError, match="QuantEmbedding"):
        model.resize_token_embeddings(136)
    lq.dequantize_model(model)
    model.resize_token_embeddings(136)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert torch.equal(model.transformer.wte.weight[:128], table)
    lq.quantize_model(model, "w8a16")
    assert type(model.transformer.wte).__name__ == "QuantEmbedding"
    with torch.inference_mode():
        assert model(torch.tensor([[1, 135]])).logits.shape == (1, 2, 136)
