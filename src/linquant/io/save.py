"""Save a (quantized) model as linquant safetensors shards and load it back.

Layout of a saved folder (the Hugging Face layout, plus linquant metadata in every shard)::

    out/
      config.json, tokenizer files, ...        copied from the model (HF / sentence-transformers)
      model.safetensors                        one shard, or
      model-00001-of-00003.safetensors ...     several, listed in
      model.safetensors.index.json             {"metadata": {...}, "weight_map": {name: shard}}

A quantized weight ``N`` (``encoder.layer.0.attention.self.query.weight``) is stored with
:func:`linquant.io.format.encode_quantized` as ``N.qdata``/``N.scale``/...; every other tensor of
the ``state_dict`` as itself. Each shard's ``linquant`` metadata has ``tensors`` (the quantized
tensors *it* holds), and, repeated in every shard, ``modules`` (quantized module name -> type and
settings), ``aliases`` (a tied tensor's second name -> the name it is stored under) and
``model`` (what kind of model it was, and ``buffer_dtypes``: the dtype of each float buffer
the model computes at construction and does not store). The whole output is written in a temp
folder next to the destination and renamed into place last.

>>> lq.save(model, "out/")                        # doctest: +SKIP
>>> model = lq.load("out/")                       # HF model / SentenceTransformer  # doctest: +SKIP
>>> lq.load_into(skeleton, "out/")                # a model the caller built        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linquant.errors import FormatError, LinquantError
from linquant.io import hf, mapped
from linquant.io.atomic import staged_folder
from linquant.io.checkpoint import INDEX_NAME, TensorInfo, read_tensors, tensor_infos
from linquant.io.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    decode_quantized,
    dtype_name,
    encode_quantized,
    header_metadata,
    read_header_metadata,
    split_part,
)
from linquant.nn.base import (
    PlainRefs,
    QuantModule,
    _memory_key,
    carry_hooks,
    find_module,
    keep_bias,
    plain_references,
    qualified_name,
    replace_plain_references,
)
from linquant.tensor import QuantizedTensor

__all__ = ["ShardWriter", "load", "load_into", "parse_size", "save", "staged_folder"]

_QUANT_BUFFERS = ("weight_qdata", "weight_scale", "weight_zero_point", "weight_offset")
_WEIGHT_FILE_RE = re.compile(r"(\.safetensors(\.index\.json)?|\.bin|\.pt|\.pth|\.ckpt)$")


# ---- sizes ------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``"2GB"`` (10^9, as Hugging Face counts), ``"500MiB"`` (2^20) or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if m is None:
            raise LinquantError(f"bad size {size!r}; expected e.g. 2GB, 500MB, 1GiB or bytes")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    else:
        raise LinquantError(f"size must be an int or a string like '2GB', got {size!r}")
    if n <= 0:
        raise LinquantError(f"size must be positive, got {size!r}")
    return n


# ---- writing shards ----------------------------------------------------------------------------
class ShardWriter:
    """Write groups of tensors into shards of at most ``max_shard_size`` bytes in ``folder``.

    A group (a quantized tensor's parts) never straddles two shards; a single group larger than
    the limit gets a shard of its own. Call :meth:`finish` to name the shards and write the index.
    """

    def __init__(self, folder: Path, max_shard_size: int | str, meta: Mapping[str, Any]) -> None:
        self.folder = folder
        self.limit = parse_size(max_shard_size)
        self.meta = dict(meta)
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: dict[str, Any] = {}
        self._size = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, tensors: Mapping[str, torch.Tensor], entries: Mapping[str, Any]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._tensors and self._size + size > self.limit:
            self.flush()
        for k, t in tensors.items():
            self._tensors[k] = t.detach().to("cpu").contiguous()
        self._entries.update(entries)
        self._size += size
        self.total_size += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._tensors and self._shards:
            return
        path = self.folder / f".shard-{len(self._shards):05d}.tmp"
        meta = dict(self.meta, tensors=self._entries)
        from safetensors import SafetensorError

        try:
            save_file(self._tensors, str(path), metadata=header_metadata(meta))
        except (OSError, SafetensorError) as e:  # a full disk is a SafetensorError
            reason = getattr(e, "strerror", None) or str(e).removeprefix(
                "Error while serializing: ")
            raise LinquantError(f"{path}: cannot write shard: {reason}") from e
        self._shards.append((path, list(self._tensors)))
        self._tensors, self._entries, self._size = {}, {}, 0

    def finish(self) -> list[Path]:
        """Flush, rename shards to their final names and write the index (several shards)."""
        self.flush()
        n = len(self._shards)
        out: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(path, self.folder / name)
            out.append(self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_size, "format": FORMAT_NAME,
                                  "format_version": FORMAT_VERSION},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n",
                                                  encoding="utf-8")
        return out


# ---- save --------------------------------------------------------------------------------------
def module_entry(module: QuantModule) -> dict[str, Any]:
    """What a loader needs to rebuild ``module`` from its float counterpart."""
    from linquant.nn.experts import QuantExpertsProj

    entry: dict[str, Any] = {"type": type(module).__name__, "scheme": str(module.scheme)}
    if isinstance(module, QuantExpertsProj):
        entry["num_experts"] = module.num_experts
        entry["transposed"] = module.stored_transposed
    activation = getattr(module, "activation", None)
    if activation is not None:
        entry["activation"] = activation
        entry["act_symmetric"] = bool(getattr(module, "act_symmetric", True))
    return entry


def _model_kind(model: nn.Module) -> dict[str, Any]:
    cls = type(model)
    if qualified_name(cls).startswith("sentence_transformers."):
        return {"kind": "sentence-transformers", "class": cls.__name__}
    if hasattr(model, "config") and hasattr(getattr(model, "config", None), "save_pretrained"):
        return {"kind": "transformers", "class": cls.__name__}
    return {"kind": "module", "class": qualified_name(cls)}


def _write_side_files(model: nn.Module, kind: str, folder: Path) -> None:
    """config.json, tokenizer and sentence-transformers module files (never weights)."""
    if kind == "sentence-transformers":
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _save_st_configs(model, Path(tmp))
            for f in Path(tmp).rglob("*"):
                rel = f.relative_to(tmp)
                if f.is_dir():
                    (folder / rel).mkdir(parents=True, exist_ok=True)
                elif not _WEIGHT_FILE_RE.search(f.name) or len(rel.parts) > 1:
                    # a module folder's weights (Dense, ...: kept float, see
                    # convert._st_side_modules), which sentence-transformers reads itself
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, folder / rel)
    elif kind == "transformers":
        config: Any = getattr(model, "config")  # noqa: B009
        try:
            config.save_pretrained(str(folder))
        except OSError:
            raise
        except Exception as e:  # transformers' own validation of the config's fields
            raise LinquantError(
                f"save: {type(model).__name__}'s config cannot be written by transformers "
                f"({type(e).__name__}: {e}); fix the config (model.config), nothing was "
                "written") from e
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            with contextlib.suppress(Exception):
                gen.save_pretrained(str(folder))


def _save_st_configs(model: Any, folder: Path) -> None:
    """Run SentenceTransformer.save with the HF weight writer stubbed out (configs only); the
    class's method: a quantized model's own ``save`` refuses (``hf.RefusedSave``)."""
    from unittest import mock

    import transformers

    def no_weights(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
        self.config.save_pretrained(save_directory)

    with mock.patch.object(transformers.PreTrainedModel, "save_pretrained", no_weights):
        type(model).save(model, str(folder))


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> list[Path]:
    """Save ``model`` (quantized or not) as linquant safetensors in the folder ``path``.

    Returns the shard files written. Raises :class:`LinquantError` if ``path`` exists (unless
    ``overwrite``) or cannot be written; nothing is left under ``path`` on failure.
    """
    if not isinstance(model, nn.Module):
        raise LinquantError(f"save needs an nn.Module, got {type(model).__name__}")
    limit = parse_size(max_shard_size)
    kind = _model_kind(model)

    qmods: dict[str, QuantModule] = {}
    modules: dict[str, Any] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, QuantModule) and name:
            qmods[name] = mod
            modules[name] = module_entry(mod)

    aliases: dict[str, str] = {}
    groups: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    seen: dict[object, str] = {}
    for name, mod in qmods.items():  # quantized weights, each buffer set once
        key = _memory_key(mod.weight_qdata)  # tied W8A8Linear codes: a view of another dtype
        if key in seen:
            aliases[f"{name}.weight"] = seen[key]
            continue
        seen[key] = f"{name}.weight"
        tensors, entry = encode_quantized(f"{name}.weight", mod.qweight)
        groups.append((tensors, {f"{name}.weight": entry}))
    skip = {f"{n}.{b}" for n in qmods for b in _QUANT_BUFFERS}
    for key_name, t in model.state_dict(keep_vars=True).items():
        if key_name in skip:
            continue
        if id(t) in seen:
            aliases[key_name] = seen[id(t)]
            continue
        seen[id(t)] = key_name
        groups.append(({key_name: t.detach()}, {}))

    buffer_dtypes = {n: dtype_name(b.dtype)
                     for n, (_, _, b) in hf.unpersisted_float_buffers(model).items()}
    if buffer_dtypes:  # computed at construction, not stored: load builds them, in these dtypes
        kind["buffer_dtypes"] = buffer_dtypes
    meta = {"modules": modules, "aliases": aliases, "model": kind}
    with staged_folder(path, overwrite=overwrite) as tmp:
        _write_side_files(model, kind["kind"], tmp)
        if qmods:
            hf.mark_config_file(tmp)  # from_pretrained refuses it, naming linquant.load
        writer = ShardWriter(tmp, limit, meta)
        for tensors, entries in groups:
            writer.add(tensors, entries)
        files = writer.finish()
    return [Path(path) / f.name for f in files]


# ---- reading -----------------------------------------------------------------------------------
class LoadedCheckpoint:
    """All tensors of a linquant folder/file, validated: quantized ones decoded."""

    def __init__(self) -> None:
        self.quantized: dict[str, QuantizedTensor] = {}
        self.plain: dict[str, torch.Tensor] = {}
        self.where: dict[str, str] = {}
        self.modules: dict[str, Any] = {}
        self.aliases: dict[str, str] = {}
        self.model: dict[str, Any] = {}
        self.format_version = FORMAT_VERSION


def _group_infos(infos: list[TensorInfo]) -> dict[Path, list[TensorInfo]]:
    out: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        out.setdefault(info.file, []).append(info)
    return out


def _file_metadata(file: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        handle: Any = safe_open(str(file), framework="pt")
        with handle:
            raw = handle.metadata()
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{file}: cannot open as safetensors: {e}") from e
    return read_header_metadata(raw, str(file))


# The parts of a stored quantized tensor that loading maps (see _read_file), with the dtypes a
# valid file has for them (anything else is read, and decode_quantized says what is wrong).
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_MAPPED_PARTS = {"qdata": (torch.uint8,), "zero_point": (torch.uint8,), "scale": _FLOATS,
                 "offset": _FLOATS}


def _read_file(file: Path, infos: list[TensorInfo], entries: Mapping[str, Any], use_mmap: bool
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for the tensors ``infos`` of one file. With ``use_mmap``, the parts of
    its quantized tensors (codes, zero points, and scales and offsets whose place in the file
    suits their dtype) are views of a private mapping of the file (:mod:`linquant.io.mapped`);
    everything else is read into memory."""
    def mapped_part(info: TensorInfo) -> bool:
        sp = split_part(info.name)
        dtype = info.torch_dtype
        return (use_mmap and sp is not None and sp[0] in entries and info.nbytes > 0
                and dtype in _MAPPED_PARTS.get(sp[1], ())
                and info.nbytes == info.numel * dtype.itemsize
                and (info.data_start + info.offset) % dtype.itemsize == 0)

    maps: dict[str, torch.Tensor] = {}
    wanted = [i for i in infos if mapped_part(i)]
    if wanted:
        try:
            with open(file, "rb") as f:
                for info in wanted:
                    dtype = info.torch_dtype
                    assert dtype is not None
                    t = mapped.map_tensor(f.fileno(), info.data_start + info.offset,
                                          info.nbytes)
                    with torch.inference_mode(False):  # a dtype view made under inference
                        # mode would be an inference tensor, without a version counter
                        maps[info.name] = t.view(dtype).view(info.shape)
        except (OSError, ValueError):  # no mmap here (another OS, a special file system)
            maps = {}
    for name, t in read_tensors([i for i in infos if i.name not in maps]):
        if t.numel() and t.data_ptr() % 64:  # safetensors data may sit at any offset;
            t = t.clone()  # fast kernels (torch._weight_int8pack_mm) crash on that
        yield name, t
    yield from maps.items()


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = True) -> LoadedCheckpoint:
    """Read and validate every tensor of a linquant checkpoint (file, folder or index).

    ``mmap``: the codes, zero points and scales of quantized tensors are views of the files,
    mapped privately, not copies (see :mod:`linquant.io.mapped`: a running model then holds its
    codes once)."""
    try:
        infos = tensor_infos(path, strict_index=True)
    except FormatError:
        raise
    except LinquantError as e:
        raise FormatError(str(e)) from e
    ck = LoadedCheckpoint()
    first: tuple[str, Any] | None = None
    for file, file_infos in _group_infos(infos).items():
        meta = _file_metadata(file)
        shared = {k: meta.get(k, {}) for k in ("modules", "aliases", "model")}
        for k, v in shared.items():
            if not isinstance(v, dict):
                raise FormatError(f"{file}: linquant metadata {k!r} must be an object")
        if first is None:
            first = (str(file), shared)
            ck.modules, ck.aliases, ck.model = (shared["modules"], shared["aliases"],
                                                shared["model"])
        elif shared != first[1]:
            raise FormatError(f"{file}: linquant metadata (modules/aliases/model) differs from "
                              f"that of {first[0]}")
        entries: dict[str, Any] = meta.get("tensors", {})
        parts: dict[str, dict[str, torch.Tensor]] = {q: {} for q in entries}
        for name, t in _read_file(file, file_infos, entries, mmap):
            sp = split_part(name)
            if sp is not None and sp[0] in entries:
                parts[sp[0]][sp[1]] = t
            else:
                if name in ck.plain or name in ck.quantized:
                    raise FormatError(f"{file}: tensor {name!r} is stored twice")
                ck.plain[name] = t
                ck.where[name] = str(file)
        for qname, entry in entries.items():
            if qname in ck.quantized or qname in ck.plain:
                raise FormatError(f"{file}: tensor {qname!r} is stored twice")
            ck.quantized[qname] = decode_quantized(qname, parts[qname], entry, str(file))
            ck.where[qname] = str(file)
    for alias, target in ck.aliases.items():
        if not isinstance(target, str) or (target not in ck.plain and target not in ck.quantized):
            raise FormatError(f"{path}: tensor {alias!r} is an alias of {target!r}, which is "
                              "not stored")
    _check_modules(ck, str(path))
    return ck


# What the ``modules`` metadata may name (``auto``: `linquant quantize` of a bare file, the
# model's own layer type)
_MODULE_TYPES = ("QuantLinear", "W8A8Linear", "QuantEmbedding", "QuantConv1d", "QuantConv2d",
                 "QuantExpertsProj", "auto")


def _check_modules(ck: LoadedCheckpoint, where: str) -> None:
    """The ``modules`` metadata agrees with the tensors, without a model: every entry has a
    known type, its quantized weight ``NAME.weight`` (stored or an alias) and, for a static
    W8A8 layer, its ``NAME.input_scale``; W8A8 entries state their activations; every
    quantized tensor belongs to an entry. (Loading checks the rest against the model.)"""
    quantized = set(ck.quantized) | {a for a, t in ck.aliases.items() if t in ck.quantized}
    plain = set(ck.plain) | {a for a, t in ck.aliases.items() if t in ck.plain}
    for name, entry in ck.modules.items():
        if not isinstance(entry, dict) or entry.get("type") not in _MODULE_TYPES:
            kind = entry.get("type") if isinstance(entry, dict) else entry
            raise FormatError(f"{where}: module {name!r}: unknown quantized module type "
                              f"{kind!r} (expected one of {', '.join(_MODULE_TYPES)})")
        if f"{name}.weight" not in quantized:
            shard = Path(where)
            hint = (f"; {shard.name} is one shard of the checkpoint in {shard.parent}: give "
                    "the folder" if shard.suffix == ".safetensors"
                    and (shard.parent / INDEX_NAME).is_file() else "")
            raise FormatError(f"{where}: module {name!r} ({entry['type']}) has no quantized "
                              f"tensor {name}.weight in the file{hint}")
        act, sym = entry.get("activation"), entry.get("act_symmetric", True)
        if (entry["type"] == "W8A8Linear" or act is not None) and (
                act not in ("dynamic", "static") or not isinstance(sym, bool)):
            raise FormatError(f"{where}: module {name!r} ({entry['type']}): bad activation "
                              f"settings {act!r} / {sym!r}: expected 'activation' 'dynamic' or "
                              "'static' and 'act_symmetric' a bool")
        if entry["type"] == "W8A8Linear" and act == "static" and \
                f"{name}.input_scale" not in plain:
            raise FormatError(f"{where}: module {name!r}: static activations but no tensor "
                              f"{name}.input_scale in the file")
    for qname in sorted(quantized):
        if not qname.endswith(".weight") or qname.removesuffix(".weight") not in ck.modules:
            raise FormatError(f"{where}: tensor {qname!r} is quantized but the metadata names "
                              f"no module {qname.removesuffix('.weight')!r} for it")


# ---- loading into a model ------------------------------------------------------------------------
def _skeleton(float_mod: nn.Module, entry: Any, name: str, where: str) -> QuantModule:
    from linquant.nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, W8A8Linear

    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise FormatError(f"{where}: module {name!r}: metadata entry must have a 'type'")
    kind = entry["type"]
    if kind == "auto":  # written by `linquant quantize` for a bare file: the model's own type
        from linquant.nn import quant_module_for

        found = quant_module_for(float_mod, "weight_only")
        if found is None:
            raise FormatError(f"{where}: module {name!r}: no quantized type for "
                              f"{type(float_mod).__name__}")
        kind = found.__name__
    try:
        if kind == "W8A8Linear":  # its settings were checked with the file (_check_modules)
            act, sym = entry["activation"], entry.get("act_symmetric", True)
            return W8A8Linear.skeleton(float_mod, activation=act, act_symmetric=sym, name=name,
                                       device="meta")
        table: dict[str, Any] = {"QuantLinear": QuantLinear, "QuantEmbedding": QuantEmbedding,
                                 "QuantConv1d": QuantConv1d, "QuantConv2d": QuantConv2d}
        cls = table.get(kind)
        if cls is None:
            raise FormatError(f"{where}: module {name!r}: unknown quantized module type {kind!r}")
        scheme = entry.get("scheme")
        if not isinstance(scheme, str):
            raise FormatError(f"{where}: module {name!r}: metadata has no scheme")
        q: QuantModule = cls.skeleton(float_mod, scheme, name=name, device="meta")
        return q
    except FormatError:
        raise
    except (LinquantError, TypeError, AttributeError, AssertionError) as e:
        raise FormatError(f"{where}: module {name!r}: cannot rebuild {kind} from "
                          f"{type(float_mod).__name__}: {e}") from None


def _as_in_file(q: QuantModule, entry: Any, name: str, where: str) -> QuantModule:
    """A layer the model already holds quantized, used for the file's entry: as it is where
    the settings agree; a static W8A8 layer that the file has with dynamic activations
    (calibrated with ``unreached="dynamic"``) switches to them; any other difference is a
    :class:`FormatError` (the tensors would not fit)."""
    from linquant.nn.w8a8 import StaticActivations

    have = module_entry(q)

    def agrees(*but: str) -> bool:  # what an older file does not say is taken as it is
        return all(have.get(k) == v for k, v in entry.items() if k not in but)

    if not isinstance(entry, dict) or agrees():
        return q
    if isinstance(q, StaticActivations) and q.activation == "static" and \
            entry.get("activation") == "dynamic" and agrees("activation", "act_symmetric"):
        q.use_dynamic_activations()
        return q
    raise FormatError(f"{where}: module {name!r} is quantized in the model as {have} but the "
                      f"file has {entry}; load into the float model")


def _experts_skeleton(model: nn.Module, experts: nn.Module, part: str, name: str, entry: Any,
                      where: str, wrapped: dict[int, nn.Module], refs: PlainRefs) -> None:
    """Make the projection ``part`` of the experts module ``experts`` (float, or already
    wrapped) an empty :class:`~linquant.nn.experts.QuantExpertsProj` for the file's entry."""
    from linquant.nn.experts import (
        QuantExperts,
        QuantExpertsProj,
        experts_transposed,
        is_hf_experts,
    )

    owner = name.rsplit(".", 1)[0]
    if not isinstance(experts, QuantExperts):
        if not is_hf_experts(experts):
            raise FormatError(f"{where}: module {name!r}: the file has a quantized experts "
                              f"projection but {owner!r} is a {type(experts).__name__}, not a "
                              "transformers experts module")
        wrapper = wrapped.get(id(experts))
        if wrapper is None:
            wrapper = wrapped[id(experts)] = QuantExperts.wrap(experts)
        spot = _owner(model, owner)
        assert spot is not None
        setattr(spot[0], spot[1], wrapper)
        if wrapper is not experts:
            carry_hooks(experts, wrapper)
        replace_plain_references(refs, experts, wrapper)
        experts = wrapper
    assert isinstance(experts, QuantExperts)
    activation = entry.get("activation")
    sym = entry.get("act_symmetric", True)
    if activation not in (None, "dynamic", "static") or not isinstance(sym, bool) or (
            activation != "static" and not sym):
        raise FormatError(f"{where}: module {name!r}: bad activation settings for experts "
                          f"{activation!r}/{sym!r} (expected none, 'dynamic' and symmetric, "
                          "or 'static')")
    current = experts._modules.get(part)
    if isinstance(current, QuantExpertsProj) and str(current.scheme) == entry.get("scheme") \
            and (current.activation, current.act_symmetric) == (activation, sym):
        return  # loading into a model quantized the same way
    weight = experts._parameters.get(part)
    scheme = entry.get("scheme")
    if not isinstance(weight, torch.Tensor) or not isinstance(scheme, str):
        raise FormatError(f"{where}: module {name!r}: expected a float 3-D projection {part!r} "
                          "in the model and a scheme in the file")
    transposed = experts_transposed(experts)
    if entry.get("transposed", transposed) != transposed or entry.get(
            "num_experts", weight.shape[0]) != weight.shape[0]:
        raise FormatError(f"{where}: module {name!r}: the file's experts "
                          f"({entry.get('num_experts')}, transposed={entry.get('transposed')}) "
                          f"are not the model's ({weight.shape[0]}, transposed={transposed})")
    try:
        proj = QuantExpertsProj.skeleton(weight, scheme, transposed=transposed,
                                         activation=activation, act_symmetric=sym, name=name,
                                         device="meta")
    except LinquantError as e:
        raise FormatError(f"{where}: module {name!r}: cannot rebuild QuantExpertsProj: {e}"
                          ) from None
    experts.set_projection(part, proj)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    prefix, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return None
    return mod, attr


def _strip_prefix(model: nn.Module, ck: LoadedCheckpoint, where: str) -> None:
    """Match the names of a checkpoint to the model they load into, as ``from_pretrained``
    does: a bare base model's checkpoint to a model with a head (names get the model's
    ``base_model_prefix``), a model with a head's to its base model (the prefix is dropped, and
    the head's tensors left out, with a warning naming them), and a ``SentenceTransformer``
    saved by :func:`save` (``0.model.encoder...``) to the transformers model it wraps."""
    import warnings

    from linquant.convert import _ST_INNER

    state = set(model.state_dict())
    names = set(ck.plain) | {f"{q}.qdata" for q in ck.quantized}
    if any(n in state for n in ck.plain):
        return
    inner = {m.group(0) for n in (*ck.plain, *ck.quantized) if (m := _ST_INNER.match(n))}
    prefix = getattr(model, "base_model_prefix", "")

    def keep(n: str) -> bool:  # which of the file's names stay
        return True

    if len(inner) == 1 and all(_ST_INNER.match(n) for n in (*ck.plain, *ck.quantized)):
        st = inner.pop()

        def fix(n: str) -> str:
            return n.removeprefix(st)
    elif prefix and hasattr(model, prefix):

        def fix(n: str) -> str:
            return f"{prefix}.{n}"
    elif prefix and any(n.startswith(f"{prefix}.") for n in names):
        head = f"{prefix}."

        def fix(n: str) -> str:
            return n.removeprefix(head)

        def keep(n: str) -> bool:  # the head's tensors go
            return n.startswith(head)
    else:
        return
    if not any(fix(n) in state for n in names if keep(n)):
        return
    left = sorted(n for n in (*ck.plain, *ck.quantized) if not keep(n))
    if left:
        more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
        warnings.warn(f"{where}: {len(left)} tensor(s) of the file are not in "
                      f"{type(model).__name__} (the head of the model saved): "
                      f"{', '.join(left[:3])}{more}; left out", stacklevel=3)

    def rename(entries: dict[str, Any]) -> dict[str, Any]:
        return {fix(k): v for k, v in entries.items() if keep(k)}

    ck.plain, ck.quantized, ck.where = rename(ck.plain), rename(ck.quantized), rename(ck.where)
    ck.modules = rename(ck.modules)
    ck.aliases = {fix(k): fix(v) for k, v in ck.aliases.items() if keep(k) and keep(v)}
    if isinstance(ck.model.get("buffer_dtypes"), dict):
        ck.model = {**ck.model, "buffer_dtypes": rename(ck.model["buffer_dtypes"])}


def _tie_to_the_file(model: nn.Module, ck: LoadedCheckpoint) -> None:
    """A linear layer whose weight the model ties (one parameter object) to a weight the file
    holds quantized, while the file has nothing for the layer itself (a head tied to its
    embedding, loaded from the checkpoint of a base model, which has no head): the layer
    becomes a weight-only :class:`~linquant.nn.QuantLinear` on the same codes, as the tie
    says, stored once."""
    tied: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(pname)
    for group in tied.values():
        held = [n for n in group if n in ck.quantized]
        if len(group) < 2 or len(held) != 1:
            continue
        for other in group:
            layer = other.removesuffix(".weight")
            if (other == held[0] or not other.endswith(".weight") or other in ck.aliases
                    or other in ck.plain or layer in ck.modules
                    or type(find_module(model, layer)) is not nn.Linear):
                continue
            ck.modules[layer] = {"type": "QuantLinear", "scheme": str(ck.quantized[held[0]].scheme)}
            ck.aliases[other] = held[0]


def load_into(model: nn.Module, path: str | os.PathLike[str], *, mmap: bool = True
              ) -> nn.Module:
    """Fill ``model`` (float layers, possibly on the meta device) from a linquant checkpoint.

    Float layers named in the file's ``modules`` metadata are replaced by quantized skeletons,
    then every tensor is assigned (no copy). Raises :class:`FormatError` naming the file and
    tensor for anything that does not fit: unknown or missing tensors, shape mismatches.

    ``mmap`` (default): the quantized codes, zero points and scales are views of the checkpoint
    files, mapped privately (copy-on-write), not copies; once a layer's kernel layout holds them,
    their pages are dropped from memory and read back from the file only if something reads
    them again (:mod:`linquant.io.mapped`). Do not write into the files in place while the model
    runs; replacing them (``save``, ``linquant quantize``) is safe. ``mmap=False`` reads them
    into memory.
    """
    # the layers' tensors are normal ones, also under inference_mode (see nn.base._normal):
    # read, tied and assigned outside it, so that nothing is copied twice
    with torch.inference_mode(False), torch.no_grad():
        return _load_into(model, path, mmap)


def _load_into(model: nn.Module, path: str | os.PathLike[str], mmap: bool) -> nn.Module:
    ck = read_checkpoint(path, mmap=mmap)
    where = str(path)
    _strip_prefix(model, ck, where)
    _tie_to_the_file(model, ck)

    # 1. Swap float layers for quantized skeletons (one object per float module object).
    built: dict[int, QuantModule] = {}
    wrapped: dict[int, nn.Module] = {}  # id(float experts module) -> its QuantExperts
    refs = plain_references(model)  # float layers also held in plain lists (Mask2Former)
    for name, entry in ck.modules.items():
        found = _owner(model, name)
        if found is None or not name:
            raise FormatError(f"{where}: module {name!r} of the file is not in the model")
        parent, attr = found
        if isinstance(entry, dict) and entry.get("type") == "QuantExpertsProj":
            _experts_skeleton(model, parent, attr, name, entry, where, wrapped, refs)
            continue
        float_mod = parent._modules.get(attr)
        if float_mod is None:
            raise FormatError(f"{where}: module {name!r} of the file is not in the model")
        q = built.get(id(float_mod))
        if q is None:
            q = _as_in_file(float_mod, entry, name, where) if isinstance(
                float_mod, QuantModule) and type(float_mod).__name__ == entry.get("type") else \
                _skeleton(float_mod, entry, name, where)
            keep_bias(float_mod, q)  # a tied bias stays tied (BERT's decoder.bias)
            built[id(float_mod)] = q
        setattr(parent, attr, q)
        if q is not float_mod:
            carry_hooks(float_mod, q)
        replace_plain_references(refs, float_mod, q)

    # 2. Quantized weights.
    filled: set[str] = set()
    for qname, qt in [*ck.quantized.items(),
                      *((a, ck.quantized[t]) for a, t in ck.aliases.items()
                        if t in ck.quantized)]:
        mod_name = qname.removesuffix(".weight")
        file = ck.where.get(qname, where)
        mod = find_module(model, mod_name)
        if not qname.endswith(".weight") or not isinstance(mod, QuantModule):
            raise FormatError(f"{file}: tensor {qname!r} is quantized but {mod_name!r} is not a "
                              "quantized module of the model")
        try:
            mod._set_qweight(qt)
        except LinquantError as e:
            raise FormatError(f"{file}: tensor {qname!r}: {e}") from None
        filled.update(f"{mod_name}.{b}" for b in _QUANT_BUFFERS)

    # 3. Plain tensors (aliases get the very same tensor object).
    assigned: dict[str, torch.Tensor | nn.Parameter] = {}
    tied_names: dict[int, list[str]] = {}  # parameters tied in the model itself
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied_names.setdefault(id(p), []).append(pname)
    plain_items = [*ck.plain.items(),
                   *((a, ck.plain[t]) for a, t in ck.aliases.items() if t in ck.plain)]
    for name, t in plain_items:
        file = ck.where.get(name, where)
        target = ck.aliases.get(name)
        found = _owner(model, name)
        if found is None:
            raise FormatError(f"{file}: tensor {name!r} is not in the model")
        mod, attr = found
        old: torch.Tensor | None
        if attr in mod._parameters:
            old = mod._parameters[attr]
            kind = "parameter"
        elif attr in mod._buffers:
            old = mod._buffers[attr]
            kind = "buffer"
        else:
            raise FormatError(f"{file}: tensor {name!r} is not in the model")
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise FormatError(f"{file}: tensor {name!r}: shape {tuple(t.shape)}, the model "
                              f"expects {tuple(old.shape)}")
        if kind == "parameter":
            new: torch.Tensor | nn.Parameter
            if target is not None and target in assigned:
                new = assigned[target]
            else:
                new = nn.Parameter(t, requires_grad=bool(old is None or old.requires_grad)
                                   and t.is_floating_point())
            mod._parameters[attr] = new  # type: ignore[assignment]
            for other in tied_names.get(id(old), []) if old is not None else []:
                spot = _owner(model, other)
                if other not in ck.plain and other not in ck.aliases and spot is not None:
                    spot[0]._parameters[spot[1]] = new  # type: ignore[assignment]
                    filled.add(other)
        else:
            new = assigned.get(target, t) if target is not None else t
            mod._buffers[attr] = new
        assigned[name] = new
        filled.add(name)

    # 4. Nothing the model persists may be missing.
    missing = [n for n in model.state_dict() if n not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"{where}: tensor {missing[0]!r}{more} is missing from the file")
    for mname, mod in model.named_modules():
        for bname, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf.is_meta:
                raise FormatError(f"{where}: buffer {mname}.{bname} is not in the file and "
                                  "the model has no value for it")
    for n, p in model.named_parameters():
        if p.is_meta:
            raise FormatError(f"{where}: tensor {n!r} is missing from the file")
    _follow_parameter_dtype(model, ck.model.get("buffer_dtypes"), where)
    from linquant.nn.w8a8 import StaticActivations

    for mod in model.modules():
        if isinstance(mod, StaticActivations) and mod.activation == "static":
            mod._update_calibrated()
    for qt in ck.quantized.values():  # validating read them; the first forward reads them
        for t in qt.tensors().values():  # again, from the file
            mapped.release(t)
    hf.mark_model(model)
    return model


def _follow_parameter_dtype(model: nn.Module, saved: object, where: str) -> None:
    """Give the model's non-persistent float buffers (computed at construction, not stored) the
    dtypes they had in the saved model (``saved``: the metadata's ``buffer_dtypes``), so a
    model loaded back computes what the saved one did: a model cast with ``.to(torch.bfloat16)``
    keeps its rotary ``inv_freq`` in bf16 too. Buffers the metadata does not name (files written
    before it did, or by ``linquant quantize``): where the model's float parameters are all of
    one dtype (a checkpoint saved after a cast to bf16, loaded into a model built in fp32), its
    transformers models' buffers of another dtype take the one ``from_pretrained`` in that
    dtype gives them (:func:`linquant.io.hf.follow_loaded_dtypes`): an fp32 sinusoidal position
    table would turn bf16 activations back to fp32."""
    if saved is not None and not isinstance(saved, dict):
        raise FormatError(f"{where}: linquant metadata 'buffer_dtypes' must be an object")
    recorded: dict[str, torch.dtype] = {}
    for name, text in (saved or {}).items():
        dtype = getattr(torch, text, None) if isinstance(text, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise FormatError(f"{where}: buffer {name!r}: linquant metadata 'buffer_dtypes' "
                              f"names {text!r}, not a float dtype")
        recorded[name] = dtype
    rest = {}
    for name, (mod, attr, buf) in hf.unpersisted_float_buffers(model).items():
        if name in recorded:
            mod._buffers[attr] = buf.to(recorded[name])
        else:
            rest[name] = (mod, attr, buf)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or not rest:
        return
    dtype = dtypes.pop()
    hf.follow_loaded_dtypes(model, dtype, {k: v for k, v in rest.items() if v[2].dtype != dtype})


# ---- load a whole model ------------------------------------------------------------------------
@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real: non-persistent buffers such as
    position ids are computed at construction and not stored)."""
    old = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        old(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    setattr(nn.Module, "register_parameter", register)  # noqa: B010
    try:
        yield
    finally:
        setattr(nn.Module, "register_parameter", old)  # noqa: B010


def read_hf_config(folder: Path) -> Any:
    """``transformers.AutoConfig`` of ``folder``'s config.json (transformers imported lazily)."""
    try:
        import transformers
    except ImportError as e:
        raise LinquantError(f"{folder}: a Hugging Face folder needs transformers "
                            "(pip install 'linquant[hf]')") from e
    hf.register()
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        text = " ".join(str(e).split("\n\n")[0].split())  # transformers' first paragraph
        raise FormatError(f"{folder}/config.json: cannot read the model config "
                          f"(transformers {transformers.__version__}): {text}") from e


def _from_config(cls: Any, config: Any) -> Any:
    with _params_on_meta():
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = cls.from_config(config)
    return model


def _hf_class(folder: Path, config: Any, class_name: str | None) -> Any:
    import transformers

    if class_name and isinstance(getattr(transformers, class_name, None), type):
        return getattr(transformers, class_name)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load(path: str | os.PathLike[str], *, mmap: bool = True) -> nn.Module:
    """Load a folder written by :func:`save` or ``linquant quantize``.

    ``mmap``: as for :func:`load_into` (default: the codes are views of the mapped files).

    A sentence-transformers folder (``modules.json``) comes back as a ``SentenceTransformer``; a
    folder with a ``config.json`` as the transformers model its metadata names (built from the
    config with parameters on the meta device, then filled). Anything else needs
    :func:`load_into` with a model the caller builds.
    """
    folder = Path(path)
    if not folder.exists():
        raise LinquantError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise LinquantError(f"{folder}: load needs a folder written by linquant.save; use "
                            "load_into(model, file) for a single file")
    ck_meta = _first_metadata(folder)
    kind = ck_meta.get("model", {}) if isinstance(ck_meta.get("model"), dict) else {}
    if (folder / "modules.json").is_file():
        model = _load_sentence_transformer(folder)
    elif (folder / "config.json").is_file():
        config = read_hf_config(folder)
        cls = _hf_class(folder, config, kind.get("class"))
        model = _from_config(cls, config)
        _read_generation_config(model, folder)
    else:
        raise LinquantError(f"{folder}: no config.json or modules.json; build the model and "
                            "call linquant.load_into(model, path)")
    target = model
    if (folder / "modules.json").is_file():
        stored = {i.name for i in tensor_infos(folder)}
        if not stored & set(model.state_dict()):  # written by `linquant quantize` from the
            first_module: Any = model[0]  # type: ignore[index]
            inner = getattr(first_module, "auto_model", None)  # HF weights of module 0
            if isinstance(inner, nn.Module):
                target = inner
    load_into(target, folder, mmap=mmap)
    if (folder / "modules.json").is_file():
        _modules_in_the_model_dtype(model)
    model.eval()
    return model


def _read_generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's ``generation_config.json`` (which :func:`save` writes), as
    ``from_pretrained`` reads it: built from config.json alone, a model would generate with the
    config's defaults, losing its stop tokens, length and sampling settings."""
    file = folder / "generation_config.json"
    can_generate = getattr(model, "can_generate", None)
    if not file.is_file() or not callable(can_generate) or not can_generate():
        return
    from transformers import GenerationConfig

    try:
        setattr(model, "generation_config", GenerationConfig.from_pretrained(str(folder)))  # noqa: B010
    except (OSError, ValueError) as e:
        text = " ".join(str(e).split())
        raise FormatError(f"{file}: cannot read the generation config: {text}") from e


def _first_metadata(folder: Path) -> dict[str, Any]:
    try:
        infos = tensor_infos(folder)
    except FormatError:
        raise
    except LinquantError as e:
        raise FormatError(str(e)) from e
    if not infos:
        return {}
    return _file_metadata(infos[0].file)


def _load_sentence_transformer(folder: Path) -> nn.Module:
    """Build the SentenceTransformer from its module files with HF weights not read."""
    from unittest import mock

    import transformers
    from sentence_transformers import SentenceTransformer
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def fake(cls: Any, name: str, /, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        if config is None:
            config = transformers.AutoConfig.from_pretrained(name)
        return _from_config(cls, config)

    with mock.patch.object(transformers.PreTrainedModel, "from_pretrained", classmethod(fake)), \
            mock.patch.object(_BaseAutoModelClass, "from_pretrained", classmethod(fake)), \
            mock.patch.object(SentenceTransformer, "to", lambda self, *a, **k: self):
        model: nn.Module = SentenceTransformer(str(folder), device="cpu")
    return model


def _modules_in_the_model_dtype(model: nn.Module) -> None:
    """A loaded SentenceTransformer's later modules (a ``Dense``) in its transformer's float
    dtype: sentence-transformers builds them in fp32 from their own folders, so after a bf16
    transformer every call failed ("mat1 and mat2 must have the same dtype"); a folder written
    by ``linquant quantize`` before its Dense was stored in bf16 loads right too."""
    children = list(model.children())
    if not children:
        return
    dtypes = {p.dtype for p in children[0].parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    dtype = dtypes.pop()
    for child in children[1:]:
        if any(p.is_floating_point() and p.dtype != dtype for p in child.parameters()):
            child.to(dtype)
