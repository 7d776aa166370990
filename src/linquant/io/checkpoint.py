"""Read safetensors checkpoints tensor by tensor: one file, a folder of files, or a sharded folder.

A checkpoint source is one of:

* a ``.safetensors`` file;
* a folder with a sharded index (``model.safetensors.index.json``, or the folder's only
  ``*.safetensors.index.json``): the index's ``weight_map`` says which shard holds which tensor,
  and only the tensors it lists are read;
* a folder without an index: every ``*.safetensors`` file directly inside it, in name order
  (a tensor name found in two files is an error);
* a ``*.safetensors.index.json`` file itself.

:func:`tensor_infos` reads only the headers (names, dtypes, shapes, byte sizes), so a caller can
decide what to read before reading anything. :func:`iter_safetensors` then yields one tensor at
a time, in file order and, within a file, in storage order; it holds no reference to a tensor
once it is yielded, so memory stays at about one tensor however big the checkpoint is::

    >>> for name, tensor in iter_safetensors("model/"):        # doctest: +SKIP
    ...     print(name, tuple(tensor.shape))

Every problem with the source (missing path, empty folder, broken header, shard missing from
the folder) raises :class:`~linquant.errors.LinquantError` or
:class:`~linquant.errors.FormatError` naming the path.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linquant.errors import FormatError, LinquantError

__all__ = [
    "INDEX_NAME",
    "TensorInfo",
    "checkpoint_files",
    "iter_safetensors",
    "read_tensors",
    "tensor_infos",
]

INDEX_NAME = "model.safetensors.index.json"
_INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on header size

# safetensors dtype codes -> torch dtypes (codes torch lacks are still listed, read as None).
_TORCH_DTYPES: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": getattr(torch, "uint16", None),
    "I16": torch.int16,
    "U32": getattr(torch, "uint32", None),
    "I32": torch.int32,
    "U64": getattr(torch, "uint64", None),
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
}


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint header says about one tensor (nothing of its data is read).

    Attributes:
        name: the tensor's name in the checkpoint.
        dtype: the safetensors dtype code (``"F32"``, ``"BF16"``, ``"I64"``, ...).
        shape: the tensor's shape.
        nbytes: bytes the tensor takes in the file.
        file: the ``.safetensors`` file that holds it.
        offset: start of its data within the file's data section (storage order).
        data_start: where the data section starts in the file (after the header).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int = 0
    data_start: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_floating_point(self) -> bool:
        """True for every float code (F64, F32, F16, BF16 and the F8/F6/F4 formats)."""
        return self.dtype.startswith(("F", "BF"))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The matching torch dtype, or None where this torch has none."""
        return _TORCH_DTYPES.get(self.dtype)


# ---- locating the files ------------------------------------------------------------------------


def _index_in_folder(folder: Path) -> Path | None:
    """The folder's sharded index, or None; several candidate indexes are an error."""
    preferred = folder / INDEX_NAME
    if preferred.is_file():
        return preferred
    found = sorted(p for p in folder.glob("*" + _INDEX_SUFFIX) if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LinquantError(
            f"{folder}: several sharded indexes ({names}) and no {INDEX_NAME}; "
            "pass the index file you mean as the path"
        )
    return found[0] if found else None


def _read_index(index: Path) -> dict[str, Path]:
    """``tensor name -> shard file`` from a sharded index, every shard checked to exist."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{index}: cannot read the sharded index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: a sharded index needs a non-empty 'weight_map' object")
    folder = index.parent
    out: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() \
                or ".." in Path(shard).parts:
            raise FormatError(
                f"{index}: tensor {name!r} maps to {shard!r}; expected a file name in {folder}"
            )
        path = folder / shard
        if not path.is_file():
            raise FormatError(f"{index}: shard {shard} (holding {name!r}) is not in {folder}")
        out[name] = path
    return out


def _resolve(path: str | os.PathLike[str]) -> tuple[list[Path], dict[str, Path] | None]:
    """The files to read and, for a sharded source, the index's ``name -> file`` map."""
    p = Path(path)
    if p.is_dir():
        index = _index_in_folder(p)
        if index is not None:
            weight_map = _read_index(index)
            return sorted(set(weight_map.values())), weight_map
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise LinquantError(f"{p}: no .safetensors files (and no {INDEX_NAME}) in this folder")
        return files, None
    if p.is_file():
        if p.name.endswith(_INDEX_SUFFIX):
            weight_map = _read_index(p)
            return sorted(set(weight_map.values())), weight_map
        return [p], None
    if not p.exists():
        raise LinquantError(f"{p}: no such file or folder")
    raise LinquantError(f"{p}: not a .safetensors file or a folder")


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The ``.safetensors`` files a checkpoint source stands for (see the module docstring)."""
    return _resolve(path)[0]


# ---- headers -----------------------------------------------------------------------------------


def _read_header(file: Path) -> list[TensorInfo]:
    """The tensors a ``.safetensors`` file holds, in storage order, from its JSON header."""
    header, size, n = raw_header(file)
    data_size = size - 8 - n
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos.append(_info(file, name, entry, data_size, 8 + n))
    infos.sort(key=lambda i: (i.offset, i.name))
    return infos


def raw_header(file: Path) -> tuple[dict[str, Any], int, int]:
    """``(header, file size, header length)`` of a ``.safetensors`` file, the entries not
    checked (a file whose data is cut short still has its header).

    Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
    data section the offsets point into.
    """
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{file}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise FormatError(
                    f"{file}: not a safetensors file (header length {n} for a {size}-byte file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise LinquantError(f"{file}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{file}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header, size, n


def _info(file: Path, name: str, entry: Any, data_size: int, data_start: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        ok = (isinstance(dtype, str) and all(type(d) is int and d >= 0 for d in shape)
              and type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]
                and offsets[1] > data_size):
            raise FormatError(f"{file}: the file is cut short (truncated?): tensor {name!r} "
                              f"ends at data byte {offsets[1]:,}, the file holds "
                              f"{max(data_size, 0):,} bytes of data")
        raise FormatError(f"{file}: tensor {name!r} has a malformed header entry: {entry!r}")
    return TensorInfo(name, dtype, shape, end - begin, file, begin, data_start)


def tensor_infos(path: str | os.PathLike[str], *, strict_index: bool = False
                 ) -> list[TensorInfo]:
    """Header facts for every tensor of a checkpoint source, in reading order; reads no data.

    A shard's tensors that its index does not list are not read (as transformers does), or
    with ``strict_index`` (linquant's own files, whose index lists everything) a
    :class:`FormatError`."""
    files, weight_map = _resolve(path)
    out: list[TensorInfo] = []
    seen: dict[str, Path] = {}
    for file in files:
        infos = _read_header(file)
        if weight_map is not None:
            present = {i.name for i in infos}
            missing = [n for n, f in weight_map.items() if f == file and n not in present]
            if missing:
                raise FormatError(
                    f"{file}: the index says this shard holds {missing[0]!r}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + ", but it does not"
                )
            unlisted = [i.name for i in infos if i.name not in weight_map]
            if strict_index and unlisted:
                raise FormatError(
                    f"{file}: holds {unlisted[0]!r}"
                    + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
                    + ", which the index does not list"
                )
            infos = [i for i in infos if weight_map.get(i.name) == file]
        for info in infos:
            if info.name in seen:
                raise FormatError(
                    f"tensor {info.name!r} is in both {seen[info.name]} and {file}; "
                    "cannot tell which to read"
                )
            seen[info.name] = file
            out.append(info)
    return out


# ---- data --------------------------------------------------------------------------------------


def read_tensors(infos: Iterable[TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for each info, in the given order, one tensor in memory at a time.

    Consecutive infos from the same file share one open file.
    """
    from safetensors import SafetensorError, safe_open

    for file, group in itertools.groupby(infos, key=lambda i: i.file):
        try:
            handle: Any = safe_open(str(file), framework="pt")  # stub leaves methods untyped
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{file}: cannot open as safetensors: {e}") from e
        with handle:
            for info in group:
                try:
                    tensor = handle.get_tensor(info.name)
                except (SafetensorError, OSError, TypeError) as e:
                    raise FormatError(f"{file}: cannot read tensor {info.name!r}: {e}") from e
                yield info.name, tensor
                del tensor


def iter_safetensors(
    path: str | os.PathLike[str], *, names: Collection[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint source (or only ``names``).

    Headers are all read (and checked) before the first tensor is yielded.
    """
    infos = tensor_infos(path)
    if names is not None:
        wanted = set(names)
        unknown = wanted - {i.name for i in infos}
        if unknown:
            raise LinquantError(f"{path}: no tensor named {sorted(unknown)[0]!r}")
        infos = [i for i in infos if i.name in wanted]
    return read_tensors(infos)
