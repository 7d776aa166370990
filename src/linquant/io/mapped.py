"""Quantized codes read straight from the checkpoint file, so a running model holds them once.

A CPU kernel that runs on its own layout (linquant's native kernels, PyTorch's int4 and oneDNN /
fbgemm int8 packs) builds it from the canonical codes on the layer's first forward and keeps it.
Loaded into ordinary memory, the canonical codes would then sit beside the layout for as long as
the model lives: the codes held twice.

``linquant.load`` and ``linquant.load_into`` instead map each checkpoint file privately
(:func:`map_file`: ``mmap``, copy-on-write) and make the codes (with their zero points and
scales) views of it. Such pages are clean copies of the file: the OS may drop them whenever it
needs memory and read them back on the next access. Loading drops them once it has validated
them; once a layer's kernel layout holds its codes, :func:`held_by_layout` (called by the
kernels' layout cache) drops them again (``madvise(MADV_DONTNEED)``), so the process's resident
memory holds the codes once, in the layout. Anything that reads the codes later (saving,
``dequantize``, a path that works from the canonical codes) reads them back from the file,
transparently; a path that dequantizes the whole weight drops them again afterwards where a
layout holds them (:func:`release_if_held`).

Codes changed in place (``load_state_dict`` into the layer, any in-place op) are private
copies, which dropping would lose: a mapping whose tensors were written to is never released
again (the version counter every view of it shares says so). Replacing a loaded checkpoint's
files, as ``linquant.save`` and ``linquant quantize`` do (write, then rename), leaves the
mapped file intact; writing into it in place while a model loaded from it runs does not.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["held_by_layout", "is_mapped", "map_file", "mapped_rss", "release", "release_if_held"]

_PAGE = mmap.PAGESIZE
_CAN_RELEASE = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


_lock = threading.Lock()
# start address -> the mapping. Weakly: the mmap object lives exactly as long as some tensor's
# storage (a view of the file) exports its buffer, so the entry goes when the last view does.
_maps: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()


def map_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """The whole file as a uint8 tensor backed by a private (copy-on-write) mapping of it; its
    slices are the tensors :func:`release` can drop."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return torch.empty(0, dtype=torch.uint8)
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    # a normal tensor even under inference_mode, so its views keep a version counter
    with torch.inference_mode(False):
        base = torch.frombuffer(mm, dtype=torch.uint8)  # its storage keeps ``mm`` alive
    start = base.data_ptr()
    with _lock:
        _maps[start] = mm
    weakref.finalize(mm, _forget, start, mm_id=id(mm))
    return base


def _forget(start: int, mm_id: int) -> None:
    with _lock:
        held = _held.get(start)
        if held is not None and held[0] == mm_id:
            del _held[start]


def _mapping_of(t: torch.Tensor) -> tuple[mmap.mmap, int] | None:
    """``(mapping, t's byte offset in it)`` for a view of a mapped file, else None."""
    if t.device.type != "cpu" or not t.numel():
        return None
    try:
        start = t.untyped_storage().data_ptr()
    except RuntimeError:
        return None
    with _lock:
        mm = _maps.get(start)
    if mm is None:
        return None
    lo = t.data_ptr() - start
    if lo < 0 or lo + t.numel() * t.element_size() > len(mm):
        return None
    return mm, lo


def is_mapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of a checkpoint file mapped by :func:`map_file`."""
    return _mapping_of(t) is not None


def release(t: torch.Tensor, *, whole_file: bool = False) -> int:
    """Drop the pages of ``t`` (a view of a mapped checkpoint file) from this process; they are
    read back from the file if anything reads ``t`` again. Returns the bytes released: 0 where
    ``t`` is not such a view, where any tensor of its mapping was written to (those pages are
    private copies now: every view of a mapping shares one version counter), or where the OS
    has no ``MADV_DONTNEED``. Only whole pages inside ``t`` are dropped, or with
    ``whole_file`` every page of the file's mapping (reading a page maps its neighbours in the
    OS's page cache too, tensors that were never read among them)."""
    found = _mapping_of(t)
    if found is None or not _CAN_RELEASE:
        return 0
    try:
        if t._version != 0:
            return 0
    except RuntimeError:  # an inference tensor keeps no version counter: cannot tell
        return 0
    mm, lo = found
    hi = lo + t.numel() * t.element_size()
    if whole_file:
        lo, hi = 0, len(mm)
    lo, hi = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
    if hi <= lo:
        return 0
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return hi - lo


# per mapping (by start address): id of its mmap, and the (address, bytes) of the tensors a
# kernel layout holds (see held_by_layout); an entry goes with its mapping
_held: dict[int, tuple[int, set[tuple[int, int]]]] = {}


def held_by_layout(t: torch.Tensor) -> int:
    """A kernel layout now holds the codes ``t``: drop their pages (:func:`release`) and
    remember it, so that :func:`release_if_held` drops them again after a path that reads the
    canonical codes once more (dequantizing the whole weight at many tokens). Returns the bytes
    released."""
    found = _mapping_of(t)
    if found is None:
        return 0
    start = t.untyped_storage().data_ptr()
    with _lock:
        entry = _held.get(start)
        if entry is None or entry[0] != id(found[0]):
            entry = _held[start] = (id(found[0]), set())
        entry[1].add((t.data_ptr(), t.numel() * t.element_size()))
    return release(t)


def release_if_held(t: torch.Tensor) -> int:
    """:func:`release` ``t`` if a kernel layout holds it (:func:`held_by_layout`): its pages,
    just read back from the file, would otherwise sit beside the layout. Codes that only such
    paths read stay (they are the one copy in use; dropping them would only cost reading them
    back on every call)."""
    found = _mapping_of(t)
    if found is None:
        return 0
    with _lock:
        entry = _held.get(t.untyped_storage().data_ptr())
        held = (entry is not None and entry[0] == id(found[0])
                and (t.data_ptr(), t.numel() * t.element_size()) in entry[1])
    return release(t) if held else 0


def mapped_rss(tensors: Iterable[torch.Tensor] | None = None) -> int | None:
    """Bytes of the mapped checkpoint files resident in this process (``Rss`` of each mapping
    in ``/proc/self/smaps``): of every mapped file, or of those that ``tensors`` are views of.
    None where the system has no ``/proc/self/smaps``."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return None
    with _lock:
        ranges = set(_maps.keys())
    if tensors is not None:
        ranges &= {t.untyped_storage().data_ptr() for t in tensors if is_mapped(t)}
    total, current = 0, False
    with open(smaps) as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in ranges
            elif current and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total
