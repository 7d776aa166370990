"""Atomic file writes: temp file in the destination folder, fsync, rename.

A crash or Ctrl-C part way leaves the temp file (named ``.{name}.tmp-*``) at worst, never a
half-written file under the final name. Folders (:func:`staged_folder`) are built under a
temp name too and put in place with one rename: on Linux ``renameat2`` swaps a new folder
with the one it replaces atomically (``RENAME_EXCHANGE``) and refuses to replace one that
appeared meanwhile (``RENAME_NOREPLACE``); elsewhere plain renames, with a short window.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from linquant.errors import LinquantError

__all__ = ["atomic_write", "staged_folder", "write_text_atomic"]


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file next to ``path`` for writing; on success fsync and rename onto ``path``."""
    if "r" in mode or "a" in mode:
        raise LinquantError(f"atomic_write only writes new files, got mode {mode!r}")
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise LinquantError(f"{dest}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=folder)
    except OSError as e:
        raise LinquantError(f"{dest}: cannot write in {folder}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a normal file follows the umask
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---- folders ------------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system has no such call (not Linux, an
    old C library, a file system without the flag), so the caller falls back; an error the
    call reports otherwise (``dst`` exists under ``RENAME_NOREPLACE``) raises ``OSError``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_tag() -> str:
    """``host-pid``: whose temp folder this is (see :func:`_remove_stale`)."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove the temp folders of ``name`` that a killed run of this machine left in ``parent``
    (``.{name}.tmp-{host}-{pid}-*`` / ``.{name}.old-...``, the process gone); returns them."""
    host = socket.gethostname().replace("-", "_")
    removed = []
    for kind in ("tmp", "old"):
        for p in parent.glob(f".{name}.{kind}-{host}-*-*"):
            pid = p.name[len(f".{name}.{kind}-{host}-"):].split("-", 1)[0]
            if p.is_dir() and not p.is_symlink() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _follow_umask(folder: Path) -> None:
    """Give ``folder`` and what it holds the permissions new files get (``mkdtemp`` makes the
    folder 0700, safetensors' files are 0600)."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~_UMASK)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~_UMASK)
    os.chmod(folder, 0o777 & ~_UMASK)


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A temp folder next to ``dest``; on success it is fsynced and renamed onto ``dest``.

    On error (Ctrl-C, or SIGTERM in the CLI) the temp folder is removed and ``dest`` is
    untouched; a hard kill leaves at most a hidden ``.{name}.tmp-{host}-{pid}-*`` folder, never
    a partial ``dest``, and the next run into ``dest`` removes it. With ``overwrite`` an
    existing ``dest`` folder is swapped for the new one in one step where the system can (Linux),
    so a kill leaves one or the other under the name. Without it, a ``dest`` that appeared
    while this one was written (another run) is a :class:`LinquantError`, not replaced. The
    folder and its files get the permissions the umask gives new files.
    """
    dst = Path(dest)
    parent = dst.parent if str(dst.parent) else Path(".")
    exists = os.path.lexists(dst)
    if exists and not overwrite:
        raise LinquantError(f"{dst} already exists (pass overwrite=True / --overwrite to replace)")
    if exists and not dst.is_dir() and not dst.is_symlink():
        raise LinquantError(f"{dst} is a file, not a folder; overwrite replaces a folder only")
    if not parent.is_dir():
        raise LinquantError(f"{dst}: folder {parent} does not exist")
    _remove_stale(parent, dst.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{_temp_tag()}-", dir=parent))
    except OSError as e:
        raise LinquantError(f"{dst}: cannot write in {parent}: {e.strerror}") from e
    try:
        yield tmp
        _follow_umask(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp)
        if not overwrite:
            try:
                placed = _renameat2(tmp, dst, _RENAME_NOREPLACE)
            except FileExistsError:
                placed = False
            if not placed:
                if os.path.lexists(dst):
                    raise LinquantError(f"{dst} appeared while this run wrote it (another "
                                        "run?); not replaced: pass overwrite=True / "
                                        "--overwrite to replace")
                os.rename(tmp, dst)
        elif not os.path.lexists(dst):
            os.rename(tmp, dst)
        elif dst.is_dir() and not dst.is_symlink() and \
                _renameat2(tmp, dst, _RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        else:
            trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{_temp_tag()}-", dir=parent))
            os.rename(dst, trash / "old")
            os.rename(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
