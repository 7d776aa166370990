"""Quantized codes read straight from the checkpoint file, so a running model holds them once.

A CPU kernel that runs on its own layout (linquant's native kernels, PyTorch's int4 and oneDNN /
fbgemm int8 packs) builds it from the canonical codes on the layer's first forward and keeps it.
Loaded into ordinary memory, the canonical codes would then sit beside the layout for as long as
the model lives: the codes held twice.

``linquant.load`` and ``linquant.load_into`` instead map the codes, zero points and scales of
each quantized tensor from its file, privately (:func:`map_tensor`: ``mmap``, copy-on-write; one
mapping per tensor, so each has a storage of its own, which ``torch.save`` and views of another
dtype need). Such pages are clean copies of the file: the OS may drop them whenever it needs
memory and read them back on the next access. Loading drops them once it has validated them;
once a layer's kernel layout holds its codes, :func:`held_by_layout` (called by the kernels'
layout cache) drops them again (``madvise(MADV_DONTNEED)``), so the process's resident memory
holds the codes once, in the layout. Anything that reads the codes later (saving,
``dequantize``, a path that works from the canonical codes) reads them back from the file,
transparently; a path that dequantizes the whole weight drops them again afterwards where a
layout holds them (:func:`release_if_held`).

Tensors changed in place (``load_state_dict`` into the layer, any in-place op) are private
copies, which dropping would lose: a tensor that was written to is never released again (the
version counter it shares with its views says so). Replacing a loaded checkpoint's files, as
``linquant.save`` and ``linquant quantize`` do (write, then rename), leaves the mapped file
intact; writing into it in place while a model loaded from it runs does not.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["active", "held_by_layout", "is_mapped", "map_tensor", "mapped_rss", "release",
           "release_if_held"]

_PAGE = mmap.PAGESIZE
_PROT_READ, _PROT_WRITE, _MAP_PRIVATE = 1, 2, 2  # the same on Linux and macOS
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_CAN_RELEASE = sys.platform.startswith("linux") and _MADV_DONTNEED is not None


def _libc() -> ctypes.CDLL | None:
    if os.name != "posix":
        return None
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value

_lock = threading.Lock()
# storage address of each mapped tensor -> (address and length of its mapping, whether a
# kernel layout holds it); an entry goes when the mapping is unmapped
_maps: dict[int, tuple[int, int, bool]] = {}


def _unmap(start: int, addr: int, length: int) -> None:
    with _lock:
        _maps.pop(start, None)
    if _LIBC is not None:
        _LIBC.munmap(addr, length)


def map_tensor(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """Bytes ``[offset, offset + nbytes)`` of the open file ``fd`` as a uint8 tensor backed by
    a private (copy-on-write) mapping of them, with a storage of its own (view it as the
    tensor's dtype and shape). The mapping lives as long as the storage: it is unmapped when
    the last tensor viewing it goes. Raises OSError where the system cannot map the file."""
    if _LIBC is None:
        raise OSError("no mmap on this system")
    if nbytes <= 0:
        raise ValueError(f"map_tensor: {nbytes} bytes")
    lo = offset - offset % _PAGE
    length = offset + nbytes - lo
    addr = _LIBC.mmap(None, length, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE, fd, lo)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    buf = (ctypes.c_uint8 * length).from_address(addr)
    # a normal tensor even under inference_mode, so it keeps a version counter
    with torch.inference_mode(False):
        t = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset - lo)
    start = t.data_ptr()
    with _lock:
        _maps[start] = (addr, length, False)
    # the storage holds ``buf`` (the buffer it exports) until the last view of it goes
    weakref.finalize(buf, _unmap, start, addr, length)
    return t


def active() -> bool:
    """Whether any tensor is mapped now."""
    return bool(_maps)


def _mapping_of(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(storage address, mapping address, mapping length)`` of a mapped tensor, else None."""
    if not _maps or t.device.type != "cpu" or not t.numel():  # nothing mapped: no cost
        return None
    try:
        start = t.untyped_storage().data_ptr()
    except RuntimeError:
        return None
    with _lock:
        entry = _maps.get(start)
    return None if entry is None else (start, entry[0], entry[1])


def is_mapped(t: torch.Tensor) -> bool:
    """Whether ``t`` (or the tensor it views) was mapped from a file by :func:`map_tensor`."""
    return _mapping_of(t) is not None


def release(t: torch.Tensor) -> int:
    """Drop the pages of the mapping ``t`` views from this process; they are read back from the
    file if anything reads ``t`` again. Returns the bytes released: 0 where ``t`` is not mapped,
    where it was written to (its pages are private copies now: ``t`` and its views share one
    version counter), or where the OS cannot drop pages (Linux only). The pages are those of its
mapping: the tensor's bytes and the rest of the file pages they start and end in."""
    found = _mapping_of(t)
    if found is None or not _CAN_RELEASE or _LIBC is None:
        return 0
    try:
        if t._version != 0:
            return 0
    except RuntimeError:  # an inference tensor keeps no version counter: cannot tell
        return 0
    _, addr, length = found
    if _LIBC.madvise(addr, length, _MADV_DONTNEED) != 0:
        return 0
    return -(-length // _PAGE) * _PAGE


def held_by_layout(t: torch.Tensor) -> int:
    """A kernel layout now holds ``t`` (codes, scales): drop its pages (:func:`release`) and
    remember it, so that :func:`release_if_held` drops them again after a path that reads the
    canonical tensors once more (dequantizing the whole weight at many tokens). Returns the bytes
    released."""
    found = _mapping_of(t)
    if found is None:
        return 0
    start, addr, length = found
    with _lock:
        if start in _maps:
            _maps[start] = (addr, length, True)
    return release(t)


def release_if_held(t: torch.Tensor) -> int:
    """:func:`release` ``t`` if a kernel layout holds it (:func:`held_by_layout`): its pages,
    just read back from the file, would otherwise sit beside the layout. Tensors that only such
    paths read stay (they are the one copy in use; dropping them would only cost reading them
    back on every call)."""
    found = _mapping_of(t)
    if found is None:
        return 0
    with _lock:
        entry = _maps.get(found[0])
    return release(t) if entry is not None and entry[2] else 0


def mapped_rss(tensors: Iterable[torch.Tensor] | None = None) -> int | None:
    """Bytes of mapped tensors resident in this process (``Rss`` of their mappings in
    ``/proc/self/smaps``): of every mapped tensor, or of ``tensors``. None where the system has
    no ``/proc/self/smaps``."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return None
    if tensors is None:
        with _lock:
            ranges = {addr for addr, _, _ in _maps.values()}
    else:
        ranges = {found[1] for t in tensors if (found := _mapping_of(t)) is not None}
    total, current = 0, False
    with open(smaps) as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in ranges
            elif current and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total
