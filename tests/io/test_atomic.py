"""Writing output folders without losing anything: the destination checks of ``linquant
quantize`` / ``calibrate`` (a destination that holds the source, the current folder, a file, a
dangling link), :func:`linquant.io.atomic.staged_folder` (one-step replacement, a destination
that appears meanwhile, a killed run's temp folders, permissions) and SIGTERM in the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from linquant.cli import main
from linquant.errors import LinquantError
from linquant.io import atomic
from linquant.io.atomic import staged_folder


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def gpt2(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path / "parent" / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(str(folder))
    (tmp_path / "parent" / "notes.txt").write_text("mine\n")
    return folder


def test_a_destination_that_holds_the_source_is_refused(
        tmp_path: Path, gpt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``quantize parent/model -o parent --overwrite`` deleted the source model and everything
    else in ``parent`` (the check only looked the other way: a destination inside the source);
    ``calibrate`` shared it."""
    parent = gpt2.parent
    before = _digest(parent)
    for src in (gpt2, gpt2 / "model.safetensors"):
        assert main(["quantize", str(src), "-o", str(parent), "--preset", "w8a16",
                     "--overwrite", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"destination {parent} holds the source {src}; replacing it would delete the " \
               "source" in err
    assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q"), "--preset", "w8a8-static",
                 "--no-progress"]) == 0
    moved = tmp_path / "q" / "inner"
    os.rename(tmp_path / "q", tmp_path / "q0")
    (tmp_path / "q").mkdir()
    os.rename(tmp_path / "q0", moved)
    capsys.readouterr()
    assert main(["calibrate", str(moved), "-o", str(tmp_path / "q"), "--overwrite"]) == 1
    assert "holds the source" in capsys.readouterr().err
    assert _digest(parent) == before and (moved / "model.safetensors").is_file()


def test_the_current_folder_a_file_and_a_dangling_link_are_refused(
        tmp_path: Path, gpt2: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = ["quantize", str(gpt2), "--preset", "w8a16", "--no-progress"]
    here = tmp_path / "here"
    (here / "inner").mkdir(parents=True)
    monkeypatch.chdir(here / "inner")
    # `-o .` quantized the whole model, then failed on renaming the current folder
    for dst in (".", ".."):
        assert main([*run, "-o", dst, "--overwrite"]) == 1
        assert "is the current folder or holds it" in capsys.readouterr().err
    (tmp_path / "f.txt").write_text("keep\n")
    assert main([*run, "-o", str(tmp_path / "f.txt"), "--overwrite"]) == 1
    assert "is a file, not a folder; --overwrite replaces a folder only" in \
        capsys.readouterr().err
    assert (tmp_path / "f.txt").read_text() == "keep\n"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert main([*run, "-o", str(tmp_path / "link")]) == 1  # it was replaced by a folder
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "link").is_symlink()
    assert main([*run, "-o", str(tmp_path / "link"), "--overwrite"]) == 0
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink()


def test_overwrite_swaps_the_folders_in_one_step(tmp_path: Path) -> None:
    """Replacing was two renames (old folder away, new one in): a kill between them left no
    folder under the name. On Linux the two folders are now exchanged in one call."""
    old = tmp_path / "out"
    old.mkdir()
    (old / "a.txt").write_text("old\n")
    if sys.platform.startswith("linux"):
        other = tmp_path / "other"
        other.mkdir()
        (other / "b.txt").write_text("new\n")
        assert atomic._renameat2(other, old, atomic._RENAME_EXCHANGE)
        assert (old / "b.txt").is_file() and (other / "a.txt").is_file()
        os.rename(old / "b.txt", other / "b.txt")
        os.rename(other / "a.txt", old / "a.txt")
    with staged_folder(old, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new\n")
    assert sorted(p.name for p in old.iterdir()) == ["b.txt"]
    want = ["other", "out"] if sys.platform.startswith("linux") else ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == want  # no temp folder left


def test_a_destination_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """Two runs into one new folder: both passed the "already exists" check at their start and
    the second silently replaced the first's output."""
    dst = tmp_path / "out"
    with pytest.raises(LinquantError, match="appeared while this run wrote it"), \
            staged_folder(dst) as tmp:
        (tmp / "mine.txt").write_text("second\n")
        dst.mkdir()
        (dst / "theirs.txt").write_text("first\n")
    assert sorted(p.name for p in dst.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temp folder removed


def test_a_killed_runs_temp_folders_are_removed_by_the_next_run(tmp_path: Path) -> None:
    host = socket.gethostname().replace("-", "_")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)  # a process that has ended
    stale = [tmp_path / f".out.tmp-{host}-{dead}-abc", tmp_path / f".out.old-{host}-{dead}-x"]
    kept = [tmp_path / f".out.tmp-{host}-{os.getpid()}-live",  # a run still going
            tmp_path / f".out.tmp-otherhost-{dead}-abc",  # another machine's (shared disk)
            tmp_path / ".other.tmp-x"]
    for p in stale + kept:
        p.mkdir()
        (p / "shard").write_bytes(b"x" * 100)
    with staged_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new\n")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_output_follows_the_umask(tmp_path: Path, gpt2: Path) -> None:
    """The folder was 0700 and the shards 0600 (mkdtemp's and safetensors' modes), while
    config.json followed the umask."""
    old = os.umask(0o022)
    try:
        assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q"), "--preset", "w8a16",
                     "--no-progress"]) == 0
    finally:
        os.umask(old)
    q = tmp_path / "q"
    assert q.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in q.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path: Path, gpt2: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``kill`` / ``timeout`` ended the process without cleanup: the temp folder stayed."""
    from linquant.io import save

    def finish(self: save.ShardWriter) -> list[Path]:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, in the main thread
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(save.ShardWriter, "finish", finish)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q"), "--preset", "w8a16",
                 "--no-progress"]) == 143
    assert "linquant: terminated" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the CLI's only


def test_save_into_a_folder_a_file_holds(tmp_path: Path) -> None:
    from linquant.convert import quantize_model
    from linquant.io.save import save

    m = nn.Sequential(nn.Linear(32, 8))
    quantize_model(m, "w8a16")
    (tmp_path / "f").write_text("keep\n")
    with pytest.raises(LinquantError, match="is a file, not a folder"):
        save(m, tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "keep\n"


def test_a_full_disk_is_an_error_naming_the_shard(tmp_path: Path, gpt2: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports a full disk as a SafetensorError: that was an "internal error"."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["quantize", str(gpt2), "-o", str(tmp_path / "q"), "--preset", "w8a16",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot write shard: I/O error: No space left on device (os error 28)" in err
    assert "internal error" not in err and not (tmp_path / "q").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]
