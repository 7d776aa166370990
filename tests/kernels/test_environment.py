"""What the kernels learn about their environment: the CPU's instruction sets and whether Triton
is recent enough. Both must answer correctly on the oldest PyTorch and Triton linquant
supports, where PyTorch's private probes have other names or do not exist."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from linquant.errors import LinquantError
from linquant.kernels import _cpuinfo, _triton_env

# ---- CPU features ----------------------------------------------------------------------------

FLAGS = ("flags\t\t: fpu vme sse sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni\n")


@pytest.fixture
def fresh_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake /proc/cpuinfo and empty caches; PyTorch's probes removed (as in a PyTorch
    without them)."""
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n" + FLAGS + "\nprocessor\t: 1\n")
    monkeypatch.setattr(_cpuinfo, "CPUINFO", str(path))
    for feature in _cpuinfo._FLAGS:
        monkeypatch.delattr(torch.cpu, f"_is_{feature}_supported", raising=False)
    for name in _cpuinfo._OLD_PROBES.values():
        monkeypatch.delattr(torch.cpu, name, raising=False)
    _cpuinfo.has.cache_clear()
    _cpuinfo.cpuinfo_flags.cache_clear()
    yield path
    _cpuinfo.has.cache_clear()
    _cpuinfo.cpuinfo_flags.cache_clear()


def test_cpuinfo_flags_answer_without_pytorchs_probes(fresh_cpuinfo: Path) -> None:
    assert _cpuinfo.cpuinfo_flags() >= {"avx2", "fma", "avx512_vnni"}
    assert _cpuinfo.has("avx2") and _cpuinfo.has("avx512") and _cpuinfo.has("vnni")
    assert not _cpuinfo.has("avx512_bf16") and not _cpuinfo.has("amx_tile")
    assert not _cpuinfo.has("no_such_feature")


def test_avx512_needs_f_bw_and_vl(fresh_cpuinfo: Path) -> None:
    fresh_cpuinfo.write_text(FLAGS.replace(" avx512bw", ""))
    assert _cpuinfo.has("avx2") and not _cpuinfo.has("avx512")


def test_no_cpuinfo_means_no_feature(fresh_cpuinfo: Path) -> None:
    fresh_cpuinfo.unlink()
    assert _cpuinfo.cpuinfo_flags() == frozenset()
    assert not _cpuinfo.has("avx2")


def test_pytorch_24_probe_names_are_used(fresh_cpuinfo: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch 2.4 named them ``_is_cpu_support_<feature>``; they answer before the file."""
    monkeypatch.setattr(torch.cpu, "_is_cpu_support_vnni", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_cpu_support_avx512", lambda: True, raising=False)
    assert not _cpuinfo.has("vnni")  # the file says yes, the probe no
    assert _cpuinfo.has("avx512")


def test_current_probe_wins_and_a_failing_probe_is_no(fresh_cpuinfo: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)

    def broken() -> bool:
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", broken, raising=False)
    assert _cpuinfo.has("avx512_bf16")  # the file lacks it
    assert not _cpuinfo.has("avx2")  # the file has it


def test_this_machine_agrees_with_its_cpuinfo() -> None:
    """Where both exist, PyTorch's probe and /proc/cpuinfo agree on AVX2 and VNNI."""
    flags = _cpuinfo.cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo here")
    for feature in ("avx2", "vnni"):
        assert _cpuinfo.has(feature) == all(f in flags for f in _cpuinfo._FLAGS[feature])


# ---- Triton ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("3.2.0", (3, 2)), ("3.5.0+git1a2b3c", (3, 5)), ("10.0", (10, 0)), ("3", None), ("", None),
])
def test_parse_version(text: str, want: tuple[int, int] | None) -> None:
    assert _triton_env.parse_version(text) == want


def _fake_triton(monkeypatch: pytest.MonkeyPatch, version: str, div_rn: bool = True) -> None:
    triton = types.ModuleType("triton")
    triton.__version__ = version  # type: ignore[attr-defined]
    lang = types.ModuleType("triton.language")
    lang.math = types.SimpleNamespace(**({"div_rn": object()} if div_rn else {}))  # type: ignore[attr-defined]

    def autotune(configs: object, key: object, do_bench: object = None) -> object:
        return None

    triton.autotune = autotune  # type: ignore[attr-defined]
    triton.language = lang  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", lang)
    _triton_env.status.cache_clear()


@pytest.fixture
def clean_status() -> object:
    _triton_env.status.cache_clear()
    yield None
    _triton_env.status.cache_clear()


@pytest.mark.parametrize("version", ["3.0.0", "3.1.0", "2.3.1"])
def test_old_triton_is_not_used(monkeypatch: pytest.MonkeyPatch, clean_status: object,
                                version: str) -> None:
    _fake_triton(monkeypatch, version)
    assert not _triton_env.available()
    assert _triton_env.status() == (f"unavailable: triton {version} is older than 3.2, the "
                                    f"oldest the kernels are tested with")
    from linquant.kernels import triton_linear, triton_w8a8

    assert not triton_linear.triton_available() and not triton_w8a8.triton_available()


def test_recent_triton_is_used(monkeypatch: pytest.MonkeyPatch, clean_status: object) -> None:
    _fake_triton(monkeypatch, "3.2.0")
    assert _triton_env.status() == "available: triton 3.2.0" and _triton_env.available()
    _fake_triton(monkeypatch, "3.4.0", div_rn=False)
    assert _triton_env.status() == "unavailable: triton 3.4.0 lacks tl.math.div_rn"


def test_missing_triton_says_why(monkeypatch: pytest.MonkeyPatch, clean_status: object) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # import raises ImportError
    assert _triton_env.status().startswith("unavailable: triton does not import (ModuleNotFound")


def test_autotune_options_keep_what_this_triton_takes(monkeypatch: pytest.MonkeyPatch,
                                                      clean_status: object) -> None:
    _fake_triton(monkeypatch, "3.3.1")  # its autotune takes do_bench, not cache_results
    timer = object()
    assert _triton_env.autotune_options() == {}
    assert _triton_env.autotune_options(None, True) == {}
    assert _triton_env.autotune_options(timer, False) == {"do_bench": timer}

    def old_autotune(configs: object, key: object) -> object:
        return None

    monkeypatch.setattr(sys.modules["triton"], "autotune", old_autotune)
    with pytest.raises(LinquantError, match=r"triton 3\.3\.1: triton\.autotune takes no do_bench"):
        _triton_env.autotune_options(timer)

    def new_autotune(configs: object, key: object, do_bench: object = None,
                     cache_results: bool = False) -> object:
        return None

    monkeypatch.setattr(sys.modules["triton"], "autotune", new_autotune)
    assert _triton_env.autotune_options(timer, True) == {"do_bench": timer,
                                                         "cache_results": True}


def test_public_status_is_the_checks(monkeypatch: pytest.MonkeyPatch, clean_status: object) -> None:
    from linquant import kernels

    _fake_triton(monkeypatch, "3.1.0")
    assert kernels.triton_status() == _triton_env.status()
    assert kernels.triton_status().startswith("unavailable: triton 3.1.0 is older than 3.2")


def test_tuned_or_fixed_keeps_the_autotuner_out_of_a_capture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a CUDA graph capture before the first tuned launch: the fixed config; after a
    launch outside a capture: the tuned one, captured or not."""
    calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []
    capture = [True]
    monkeypatch.setattr(_triton_env, "capturing", lambda: capture[0])
    launch = _triton_env.tuned_or_fixed(lambda *a, **k: calls.append(("tuned", a, k)),
                                        lambda *a, **k: calls.append(("fixed", a, k)))
    launch(1, 2, flag=True)  # captured first: fixed
    capture[0] = False
    launch(3)  # outside: tuned (and now tuned)
    capture[0] = True
    launch(4)  # captured again: the autotuner has the key
    assert calls == [("fixed", (1, 2), {"flag": True}), ("tuned", (3,), {}), ("tuned", (4,), {})]
    other = _triton_env.tuned_or_fixed(lambda: calls.append(("tuned2", (), {})),
                                       lambda: calls.append(("fixed2", (), {})))
    other()  # each launch keeps its own flag
    assert calls[-1][0] == "fixed2"


def test_capturing_is_false_without_cuda() -> None:
    if not torch.cuda.is_available():
        assert _triton_env.capturing() is False
