"""The per-layer plot of a model report (ModelReport.plot, linquant quantize --plot)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from linquant.cli import main
from linquant.convert import LayerReport, ModelReport, quantize_model
from linquant.errors import LinquantError

matplotlib = pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report() -> ModelReport:
    rows = [
        LayerReport("embed", "Embedding", (40, 32), 5120, 720, "int4-asym-g32-fp16", 4.625, 21.5),
        LayerReport("blocks.0.fc", "Linear", (64, 32), 8448, 1432, "int4-asym-g32-fp16", 4.625,
                    20.9),
        LayerReport("blocks.0.norm", "LayerNorm", (32,), 256, 256,
                    reason="unsupported type LayerNorm"),
        LayerReport("blocks.0.proj", "Linear", (32, 64), 8320, 2304, "int8-sym-ch0-fp32", 8.125,
                    12.25),
        LayerReport("blocks.0.zeros", "Linear", (32, 32), 4096, 1152, "int8-sym-ch0-fp32", 8.125,
                    math.inf),
        LayerReport("lm_head", "Linear", (40, 32), 5120, 720, "int4-asym-g32-fp16", 4.625, 21.5,
                    note="tied to embed (weight stored once)", tied_to="embed"),
    ]
    return ModelReport(rows, bytes_before=26000, bytes_after=5600)


def _svg_text(report: ModelReport, path: Path, title: str = "") -> str:
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, to read it back
        report.plot(path, title)
    return path.read_text()


def test_plot_names_the_worst_layers_and_counts_the_float_ones(tmp_path: Path) -> None:
    svg = _svg_text(_report(), tmp_path / "layers.svg")
    for text in ("blocks.0.proj", "blocks.0.fc", "kept float (1)", "median 21.5 dB",
                 "int8-sym-ch0-fp32", "int4-asym-g32-fp16", "weight SQNR (dB)",
                 "per-layer report: 5 of 6 layers quantized, 4.64x smaller"):
        assert text in svg, text
    # 6 layers: every one named on the x axis; the worst three finite ones annotated
    for name in ("embed", "blocks.0.norm", "blocks.0.zeros", "lm_head"):
        assert re.search(rf">{re.escape(name)}<", svg), name
    assert svg.count(">blocks.0.proj<") == 2  # tick label and annotation
    assert svg.count(">blocks.0.zeros<") == 1  # exact (inf): drawn at the top, not annotated


def test_plot_png_is_written_atomically_with_a_title(tmp_path: Path) -> None:
    out = tmp_path / "layers.png"
    _report().plot(out, title="mine")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temp file left
    assert "mine" in _svg_text(_report(), tmp_path / "t.svg", "mine")


def test_plot_of_a_large_model_numbers_its_layers(tmp_path: Path) -> None:
    rows = [LayerReport(f"layers.{i}.mlp", "Linear", (64, 64), 16384, 2304,
                        "int4-sym-g32-fp16", 4.5, 20 + (i % 7) * 0.1) for i in range(120)]
    svg = _svg_text(ModelReport(rows, 120 * 16384, 120 * 2304), tmp_path / "big.svg")
    assert "layer (module order)" in svg
    assert sum(f">layers.{i}.mlp<" in svg for i in range(120)) == 3  # only the worst three


def test_plot_with_nothing_quantized(tmp_path: Path) -> None:
    report = ModelReport([LayerReport("norm", "LayerNorm", (8,), 64, 64, reason="unsupported")],
                         64, 64)
    assert "kept float (1)" in _svg_text(report, tmp_path / "f.svg")


def test_plot_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LinquantError, match=r"cannot plot to a \.xyz file"):
        _report().plot(tmp_path / "layers.xyz")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LinquantError, match=r"pip install 'linquant\[plot\]'"):
        _report().plot(tmp_path / "layers.png")
    assert not list(tmp_path.iterdir())


def test_quantize_model_report_plots(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 16))
    report = quantize_model(model, "w4a16-g32")
    svg = _svg_text(report, tmp_path / "m.svg")
    assert "kept float (1)" in svg and "int4-asym-g32-fp16, compute bf16" in svg


def test_cli_quantize_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    src = tmp_path / "m.safetensors"
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--preset", "w8a32",
                 "--no-progress", "--plot", str(tmp_path / "layers.png")]) == 0
    assert (tmp_path / "layers.png").read_bytes().startswith(PNG_MAGIC)
    assert "plot:" in capsys.readouterr().err
    # a bad suffix is refused before anything is quantized or written
    assert main(["quantize", str(src), "-o", str(tmp_path / "q2"), "--no-progress",
                 "--plot", str(tmp_path / "layers.xyz")]) == 1
    assert "cannot plot to a .xyz file" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()


def test_plot_marks_exact_tied_and_float_layers() -> None:
    from linquant.report import _layers_figure

    top, _ = _layers_figure(_report(), "").axes
    lo, hi = top.get_ylim()
    points = []  # (x, y, hollow) of every marker drawn on the SQNR axes
    for c in top.collections:
        hollow = len(c.get_facecolors()) == 0 or float(c.get_facecolors()[0][3]) == 0.0
        points += [(float(x), float(y), hollow) for x, y in c.get_offsets()]
    assert (4.0, hi, False) in points  # blocks.0.zeros: exact, a marker on the top edge
    assert (2.0, lo, False) in points  # blocks.0.norm: kept float, on the bottom edge
    assert (5.0, 21.5, True) in points  # lm_head: tied to embed, hollow
    assert (0.0, 21.5, False) in points and (3.0, 12.25, False) in points
    assert len(points) == 6


# ---- the per-layer output error (lq.compare_layers, linquant eval --plot) ----------------------
def test_layer_errors_plot_names_the_worst_and_the_uncompared(tmp_path: Path) -> None:
    from linquant.layer_errors import LayerError, LayerErrors

    errors = LayerErrors([
        LayerError("emb", "QuantEmbedding", "int4-asym-g32-fp16", 2, 19.5, 0.06, 21.0),
        LayerError("fc1", "QuantLinear", "int4-asym-g32-fp16", 2, 25.0, 0.5),
        LayerError("fc2", "W8A8Linear", "int8-sym-ch0-fp32, act int8 dynamic", 2, 31.0, 0.1),
        LayerError("exact", "QuantLinear", "int8-sym-ch0-fp32", 2, math.inf, 0.0),
        LayerError("head", "QuantLinear", "int4-asym-g32-fp16", reason="not reached by the inputs"),
    ])
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        errors.plot(tmp_path / "e.svg")
    svg = (tmp_path / "e.svg").read_text()
    for text in ("not compared (1)", "median 25.0 dB", "int8-sym-ch0-fp32, act int8 dynamic",
                 "weight SQNR",
                 "output SQNR on the float layer", "per-layer output error: 5 quantized layers"):
        assert text in svg, text
    assert svg.count(">emb<") == 2 and svg.count(">fc2<") == 2  # tick and annotation
    assert svg.count(">exact<") == 1 and svg.count(">head<") == 1  # ticks only


def test_cli_eval_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(
        str(tmp_path / "gpt2"))
    assert main(["quantize", str(tmp_path / "gpt2"), "-o", str(tmp_path / "q"), "--preset",
                 "w8a8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--plot",
                 str(tmp_path / "e.png")]) == 0
    out, err = capsys.readouterr()
    assert "lowest output SQNR: " in out and f"plot: {tmp_path / 'e.png'}" in err
    assert (tmp_path / "e.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["eval", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--plot",
                 str(tmp_path / "e.nope")]) == 1
    assert "cannot plot to a .nope file" in capsys.readouterr().err
