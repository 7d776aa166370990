"""Quantize a checkpoint on disk tensor by tensor (``linquant quantize``).

Peak memory is about the largest tensor plus one output shard, not the model: tensors are read
one at a time with ``safe_open``, quantized, and written shard by shard (:class:`ShardWriter`),
in a staging folder renamed onto the destination at the end. (MoE checkpoints stored one tensor
per expert: transformers stacks them into fused projections while loading, and so does the
stream, quantizing each expert's tensor into its rows as it is read where the scheme allows,
else holding one float projection at a time; see :class:`_Merge`.)

Which tensors are quantized, and how, is decided as :func:`linquant.quantize_model` decides:

* **model config** rule: the source folder has a ``config.json``; the transformers model is
  built on the meta device (no memory) and planned with :func:`linquant.convert.plan_model`, so
  each weight gets its layer's type, group-size fallback, include/exclude and tie decisions;
* **bare file** rule: otherwise every 2-D float ``*.weight`` tensor is quantized with the
  config's weight scheme (weight-only), and stored with module type ``"auto"`` (the loader
  uses the quantized type of the layer it finds in the caller's model).

The output is the format :func:`linquant.io.save.save` writes and loads with
:func:`~linquant.io.save.load` / :func:`~linquant.io.save.load_into`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from linquant.config import QuantConfig
from linquant.convert import (
    _ST_INNER,
    LayerReport,
    ModelConfig,
    ModelReport,
    _build,
    _float_like,
    _group_fallback,
    _is_conv1d,
    _join,
    _normalize_config,
    _patterns,
    _Plan,
    _select,
    _type_name,
    _uses_w8a8,
    compute_dtype_of,
    experts_activation,
    pattern_misses,
    plan_model,
    scheme_text,
    strict_refusal,
    with_alts,
)
from linquant.errors import FormatError, LinquantError
from linquant.io import hf
from linquant.io.checkpoint import TensorInfo, read_tensors, tensor_infos
from linquant.io.format import encode_quantized
from linquant.io.save import (
    _QUANT_BUFFERS,
    _WEIGHT_FILE_RE,
    ShardWriter,
    _hf_class,
    module_entry,
    parse_size,
    read_hf_config,
    staged_folder,
)
from linquant.nn.base import QuantModule
from linquant.nn.experts import QuantExpertsProj, expert_rows, experts_dims, experts_transposed
from linquant.ops.grouping import scale_shape
from linquant.ops.metrics import sqnr_from_sums
from linquant.ops.packing import packed_nbytes
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor, quantize

__all__ = ["StreamResult", "quantize_checkpoint"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class StreamResult:
    """What :func:`quantize_checkpoint` did: the per-layer report, the rule, the files."""

    report: ModelReport
    rule: str
    files: list[Path] = field(default_factory=list)
    max_error: dict[str, float] = field(default_factory=dict)
    # the source folder's weight-like files (.safetensors, .bin, .pt, ...) that the model's
    # checkpoint does not include and that were not copied: a consolidated.safetensors next to
    # the shards, training_args.bin, original/...
    left_out: list[str] = field(default_factory=list)


@dataclass
class _Job:
    """How to quantize one stored weight."""

    module_name: str
    config: QuantConfig
    scheme: QuantScheme
    note: str
    module: nn.Module | None  # the meta module (model config rule) or None (bare file)
    entry: dict[str, Any]
    part: str = ""  # a projection of an experts module (linquant.nn.experts)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that would lose data when replaced: the source,
    a folder inside it or one that holds it (``--overwrite`` would delete the source), the
    current folder or one above it, a file; and one that exists, without ``overwrite``."""
    if not src.exists():
        raise LinquantError(f"{src}: no such file or folder")
    s = src.resolve()
    exists = dst.exists() or dst.is_symlink()
    d = dst.resolve() if exists else dst.parent.resolve() / dst.name
    if d == s or s in d.parents:
        raise LinquantError(f"destination {dst} is {'inside ' if d != s else ''}the source "
                            f"{src}; choose a folder outside it")
    if src.is_file() and d == s.parent:
        raise LinquantError(f"destination {dst} is the folder holding the source {src}")
    if d in s.parents:
        raise LinquantError(f"destination {dst} holds the source {src}; replacing it would "
                            "delete the source: choose a folder outside it")
    cwd = Path.cwd().resolve()
    if exists and (d == cwd or d in cwd.parents):
        raise LinquantError(f"destination {dst} is the current folder or holds it; choose "
                            "another folder")
    if exists and not overwrite:
        raise LinquantError(f"{dst} already exists (pass overwrite=True / --overwrite to "
                            "replace it)")
    if exists and not dst.is_dir() and not dst.is_symlink():
        raise LinquantError(f"{dst} is a file, not a folder; --overwrite replaces a folder "
                            "only")
    parent = d.parent
    if not parent.is_dir():
        raise LinquantError(f"{dst}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LinquantError(f"{dst}: folder {parent} is not writable")


def _is_pickle_source(src: Path) -> list[Path] | None:
    if src.is_file():
        return [src] if src.suffix in PICKLE_SUFFIXES else None
    if src.is_dir() and not any(src.glob("*.safetensors")) and not any(
            src.glob("*.safetensors.index.json")):
        found = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        return found or None
    return None


def _pickle_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise LinquantError(f"{f}: cannot read with torch.load(weights_only=True): {e}") \
                from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise LinquantError(f"{f}: expected a dict of tensors, got {type(state).__name__}")
        if state and not any(isinstance(v, torch.Tensor) for v in state.values()):
            keys = ", ".join(repr(k) for k in list(state)[:3])
            raise LinquantError(f"{f}: a dict without tensors (keys {keys}"
                                f"{', ...' if len(state) > 3 else ''}); expected a state dict "
                                "(name -> tensor), or one under the key 'state_dict'")
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                yield str(k), v


def _check_against_model(model: nn.Module, names: set[str], src: Path) -> set[str]:
    """The stored tensors (``names``, the model's names for them) against what ``model``
    (built from config.json) holds, as ``lq.load`` will check the output: a tensor the model
    needs that is missing (transformers would initialise it at random), or one the model has
    no place for, is a :class:`LinquantError` before anything is written. Returns the tensors
    to leave out: those the class's ``_keys_to_ignore_on_load_unexpected`` names (GPT-2's
    ``attn.bias`` of old checkpoints), which from_pretrained ignores too."""
    expected = set(model.state_dict())
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    tied: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)
    covered = {n for group in tied.values() if any(g in names for g in group) for n in group}

    def ignored(name: str, attr: str) -> bool:
        patterns = getattr(model, attr, None) or ()
        return any(re.search(p, name) for p in patterns if isinstance(p, str))

    missing = sorted(n for n in expected - names - covered
                     if not ignored(n, "_keys_to_ignore_on_load_missing"))
    extra = sorted(n for n in names - expected - buffers)
    dropped = {n for n in extra if ignored(n, "_keys_to_ignore_on_load_unexpected")}
    extra = [n for n in extra if n not in dropped]
    cls = type(model).__name__
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LinquantError(f"{src}: the checkpoint has no {missing[0]!r}{more}, which {cls} "
                            "(config.json) needs; transformers would initialise it at random. "
                            "Quantize a complete checkpoint")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise LinquantError(f"{src}: the checkpoint holds {extra[0]!r}{more}, which {cls} "
                            "(config.json) has no place for: the checkpoint and its config.json "
                            "do not match")
    return dropped


def _build_meta_model(folder: Path) -> nn.Module | None:
    """The transformers model of ``folder``'s config.json on the meta device, or None."""
    if not (folder / "config.json").is_file():
        return None
    try:
        config = read_hf_config(folder)
    except FormatError as e:
        raise FormatError(f"{e} (to quantize without the config, pass the .safetensors file "
                          "itself: every 2-D float *.weight tensor is then quantized; or load "
                          "the model yourself and use linquant.quantize_model)") from e
    archs = getattr(config, "architectures", None) or []
    cls = _hf_class(folder, config, archs[0] if archs else None)
    with torch.device("meta"):
        model: nn.Module = cls.from_config(config) if not hasattr(cls, "_from_config") \
            else cls._from_config(config)
    return model


class _RowQuantizer:
    """A weight ``[n_rows, k]`` quantized block of rows by block, under a scheme that quantizes
    rows independently (groups, or per output channel) with every block on whole bytes
    (:meth:`fits`): each block's codes, scales and zero points go straight to their place, so
    the float weight is never needed whole (nor a float copy of it, nor its full-size
    dequantization: the error sums are gathered block by block). Equal to quantizing the whole
    weight at once."""

    def __init__(self, n_rows: int, k: int, scheme: QuantScheme) -> None:
        self.k, self.scheme = k, scheme
        self.shape = (n_rows, k)
        sshape = scale_shape(self.shape, scheme)
        self.parts = {"qdata": torch.empty(packed_nbytes(n_rows * k, scheme.bits),
                                           dtype=torch.uint8),
                      "scale": torch.empty(sshape, dtype=scheme.scale_dtype)}
        if scheme.has_int_zero_point:
            self.parts["zero_point"] = torch.empty(packed_nbytes(math.prod(sshape), scheme.bits),
                                                   dtype=torch.uint8)
        if scheme.has_offset:
            self.parts["offset"] = torch.empty(sshape, dtype=scheme.scale_dtype)
        self.sums = (0.0, 0.0, 0.0)  # signal, noise, max |error|

    @staticmethod
    def fits(rows: int, k: int, scheme: QuantScheme) -> bool:
        """Whether blocks of ``rows`` rows of length ``k`` can be quantized one by one."""
        if not (scheme.granularity == "group" or (
                scheme.granularity == "channel" and scheme.axis in (0, -2))):
            return False
        per_row = k // (scheme.group_size or k) if scheme.granularity == "group" else 1
        return (rows * k * scheme.bits) % 8 == 0 and not (
            scheme.has_int_zero_point and (rows * per_row * scheme.bits) % 8)

    def add(self, r0: int, block: torch.Tensor, name: str) -> None:
        """Quantize ``block`` (rows ``r0 ..`` of the weight) into place."""
        scheme, k = self.scheme, self.k
        qb = quantize(block, scheme, name=name)
        rows = int(block.shape[0])
        start = r0 * k * scheme.bits // 8
        self.parts["qdata"][start:start + qb.qdata.numel()] = qb.qdata
        self.parts["scale"][r0:r0 + rows] = qb.scale
        if qb.zero_point_packed is not None:
            start = r0 * (qb.scale.numel() // rows) * scheme.bits // 8
            self.parts["zero_point"][start:start + qb.zero_point_packed.numel()] = (
                qb.zero_point_packed)
        if qb.offset is not None:
            self.parts["offset"][r0:r0 + rows] = qb.offset
        signal, noise, worst = _error_sums(block.float(), qb.dequantize(torch.float32))
        self.sums = (self.sums[0] + signal, self.sums[1] + noise, max(self.sums[2], worst))

    def result(self, dtype: torch.dtype) -> tuple[QuantizedTensor, tuple[float, float]]:
        """The quantized weight (dequantizing to ``dtype``) and its ``(SQNR dB, max error)``."""
        p = self.parts
        qt = QuantizedTensor(p["qdata"], p["scale"], p.get("zero_point"), p.get("offset"),
                             self.scheme, self.shape, dtype)
        return qt, (sqnr_from_sums(self.sums[0], self.sums[1]), self.sums[2])


@dataclass
class _Merge:
    """Checkpoint tensors that transformers merges into one of the model's (per-expert MoE
    weights into a fused experts projection ``[E, out, in]``): expert ``e`` of source pattern
    ``j`` is rows ``j * out / patterns ..`` of ``[e]`` (stacked over the experts, the patterns'
    stacks concatenated along ``dim 1``: gate, then up).

    With a :class:`_RowQuantizer` (:meth:`quantize_by_rows`: a row-wise scheme, whole bytes)
    each source is quantized into its rows of the merged weight ``[E * out, in]`` as it
    arrives; otherwise it is copied into the float merged tensor as it arrives."""

    target: str
    patterns: int  # how many source patterns (2: gate and up)
    shape: tuple[int, int, int]  # the model's [E, out, in]
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (pattern, expert)
    seen: set[tuple[int, int]] = field(default_factory=set)
    merged: torch.Tensor | None = None
    rows_q: _RowQuantizer | None = None
    dtype: torch.dtype | None = None

    @property
    def rows(self) -> int:
        return self.shape[1] // self.patterns

    def quantize_by_rows(self, scheme: QuantScheme) -> None:
        """Quantize source by source under ``scheme`` where that equals quantizing the merged
        weight."""
        if _RowQuantizer.fits(self.rows, self.shape[2], scheme):
            self.rows_q = _RowQuantizer(self.shape[0] * self.shape[1], self.shape[2], scheme)

    def add(self, name: str, t: torch.Tensor
            ) -> torch.Tensor | tuple[QuantizedTensor, tuple[float, float]] | None:
        """Take ``t`` in; once every source is in, the merged tensor, or with a row quantizer
        the quantized one and its errors."""
        j, e = self.sources[name]
        rows = self.rows
        if tuple(t.shape) != (rows, self.shape[2]) or not t.is_floating_point() or (
                self.dtype is not None and t.dtype != self.dtype):
            raise LinquantError(f"{name}: {t.dtype} {tuple(t.shape)} cannot be expert {e} of "
                                f"{self.target} {list(self.shape)}")
        self.dtype = t.dtype
        if self.rows_q is not None:
            self.rows_q.add((e * self.patterns + j) * rows, t, name)
        else:
            if self.merged is None:
                self.merged = torch.empty(self.shape, dtype=t.dtype)
            self.merged[e, j * rows:(j + 1) * rows] = t
        self.seen.add((j, e))
        if len(self.seen) < len(self.sources):
            return None
        if self.rows_q is not None:
            rows_q, self.rows_q = self.rows_q, None
            return rows_q.result(t.dtype)
        merged, self.merged = self.merged, None
        return merged

    @property
    def incomplete(self) -> bool:
        return 0 < len(self.seen) < len(self.sources)


@dataclass
class _Concat:
    """Checkpoint tensors that transformers concatenates along their rows into one of the
    model's (``Concatenate(dim=0)``: Kimi-Linear's ``q_conv1d``, ``k_conv1d``, ``v_conv1d``
    into ``conv1d``, Molmo2's two embedding tables): source pattern ``j`` is the ``j``-th
    block of rows. Held as they arrive, concatenated once all are in."""

    target: str
    patterns: int
    shape: tuple[int, ...]  # the model's
    sources: dict[str, int] = field(default_factory=dict)  # stored name -> pattern
    parts: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """Take ``t`` in; once every source is in, the concatenated tensor."""
        self.parts[self.sources[name]] = t
        if len(self.parts) < len(self.sources):
            return None
        parts, self.parts = self.parts, {}
        out = torch.cat([parts[j] for j in range(self.patterns)], dim=0)
        if tuple(out.shape) != self.shape:
            raise LinquantError(f"{self.target}: the checkpoint's {self.patterns} parts make "
                                f"{list(out.shape)}, the model holds {list(self.shape)}")
        return out

    @property
    def incomplete(self) -> bool:
        return 0 < len(self.parts) < len(self.sources)


def _concat_source(name: str, new: str, pattern: str, converters: list[Any],
                   meta: dict[str, torch.Tensor], concats: dict[str, _Concat]) -> bool:
    """Record the stored ``name`` as its pattern's block of rows of the concatenation into
    ``new``; False where the conversion is not such a concatenation."""
    converter = _converter_of(pattern, converters)
    if converter is None or len(list(converter.target_patterns)) != 1 or \
            len(converter.operations) != 1:
        return False
    op = converter.operations[0]
    target = meta.get(new)
    if type(op).__name__ != "Concatenate" or getattr(op, "dim", None) != 0 or \
            getattr(op, "num_shards_attribute", None) is not None or target is None:
        return False
    patterns = list(converter.source_patterns)
    concat = concats.setdefault(new, _Concat(new, len(patterns), tuple(target.shape)))
    if pattern in [patterns[j] for j in concat.sources.values()]:
        return False  # two stored tensors for one part
    concat.sources[name] = patterns.index(pattern)
    return True


def _converter_of(pattern: str, converters: list[Any]) -> Any:
    """The transformers ``WeightConverter`` whose source patterns hold ``pattern``, or None."""
    return next((c for c in converters if pattern in list(c.source_patterns)), None)


def _merge_rule(converter: Any) -> int | None:
    """How many source patterns a transformers ``WeightConverter`` stacks per expert, when its
    operations are the ones :class:`_Merge` repeats (``MergeModulelist(dim=0)``, then
    ``Concatenate(dim=1)`` for several patterns); None for any other conversion."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    patterns = list(converter.source_patterns)
    if len(patterns) == 1 and ops == [("MergeModulelist", 0)]:
        return 1
    if len(patterns) > 1 and ops == [("MergeModulelist", 0), ("Concatenate", 1)]:
        return len(patterns)
    return None


def _checkpoint_renames(model: nn.Module, shapes: dict[str, tuple[int, ...]], src: Path
                        ) -> tuple[dict[str, str], dict[str, _Merge], dict[str, list[_Piece]],
                                   dict[str, _Concat]]:
    """Stored tensor name -> the model's name for it, for the names transformers (5 and later)
    renames while loading: its conversion rules for the architecture (GPT-NeoX's
    ``embed_out`` is the model's ``lm_head``), legacy names (``gamma`` / ``beta``) and the base
    model prefix; the merges: per-expert MoE tensors that transformers stacks into a fused
    experts projection (Mixtral's ``experts.{e}.w1/w3.weight`` into ``experts.gate_up_proj``),
    by the model's name; and the splits: stored tensors that transformers cuts along their rows
    into several of the model's (a fused ``Wqkv`` into ``q_proj``, ``k_proj``, ``v_proj``:
    Nomic BERT, GTE, Jina v3), or transposes (Qwen3-VL-MoE's experts), by the stored name: the
    model's tensors they become (:class:`_Piece`); and the concatenations (:class:`_Concat`),
    by the model's name. A checkpoint tensor that any other rule combines or splits cannot be
    streamed: :class:`LinquantError`. Empty with transformers 4, which loads checkpoints under
    the model's own names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return {}, {}, {}, {}
    renames: dict[str, str] = {}
    merges: dict[str, _Merge] = {}
    splits: dict[str, list[_Piece]] = {}
    concats: dict[str, _Concat] = {}
    refused: list[str] = []
    try:  # private API of transformers: where it changes, names stay as stored
        transforms = get_model_conversion_mapping(cast(Any, model))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None) or None
        meta = model.state_dict()  # on the meta device: names and shapes only
        stored = list(shapes)
        for name in stored:
            new, pattern = rename_source_key(name, renamings, converters, prefix, meta)
            if pattern is None:
                if new != name:
                    renames[name] = new
                continue
            where = _merge_source(name, new, pattern, converters, renamings, meta, merges)
            pieces = None if where is not None else (
                _split_source(new, pattern, converters, meta, shapes[name])
                or _transpose_source(new, pattern, converters, meta, shapes[name]))
            if pieces is not None:
                splits[name] = pieces
            elif where is None and not _concat_source(name, new, pattern, converters, meta,
                                                      concats):
                refused.append(f"{name} -> {new}")
    except (TypeError, AttributeError, ValueError, KeyError):
        return {}, {}, {}, {}
    if refused:
        raise LinquantError(
            f"{src}: {len(refused)} tensor(s) are combined by transformers while loading "
            f"{type(model).__name__} (e.g. {refused[0]}) in a way linquant quantize cannot "
            "repeat tensor by tensor; load the model with transformers, then "
            "linquant.quantize_model and linquant.save")
    for m in merges.values():
        counts = {j: sum(1 for jj, _ in m.sources.values() if jj == j)
                  for j in range(m.patterns)}
        experts = m.shape[0]
        if set(m.sources.values()) != {(j, e) for j in range(m.patterns)
                                       for e in range(experts)}:
            raise LinquantError(f"{src}: {m.target}: the checkpoint holds {counts} per-expert "
                                f"tensors per pattern for {experts} experts")
    if len(set(renames.values()) | (set(stored) - set(renames))) < len(stored):
        raise LinquantError(f"{src}: transformers' renaming rules map two tensors to one name")
    for c in concats.values():
        if len(c.sources) != c.patterns:
            raise LinquantError(f"{src}: {c.target}: the checkpoint holds {len(c.sources)} of "
                                f"the {c.patterns} tensors transformers concatenates into it")
    return renames, merges, splits, concats


def _merge_source(name: str, new: str, pattern: str, converters: list[Any],
                  renamings: list[Any], meta: dict[str, torch.Tensor],
                  merges: dict[str, _Merge]) -> tuple[int, int] | None:
    """Record the stored ``name`` as expert ``e`` of pattern ``j`` of the merge into ``new``;
    None where the conversion is not such a merge."""
    import re

    from transformers.core_model_loading import rename_source_key

    converter = _converter_of(pattern, converters)
    if converter is None:
        return None
    n_patterns = _merge_rule(converter)
    target = meta.get(new)
    if n_patterns is None or target is None or target.dim() != 3 or pattern.count("*") != 1:
        return None
    renamed, _ = rename_source_key(name, renamings, [])
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, renamed)
    if found is None:
        return None
    j = list(converter.source_patterns).index(pattern)
    where = (j, int(found.group(1)))
    shape = (int(target.shape[0]), int(target.shape[1]), int(target.shape[2]))
    merge = merges.setdefault(new, _Merge(new, n_patterns, shape))
    merge.sources[name] = where
    return where


@dataclass(frozen=True)
class _Piece:
    """Rows ``start .. start + rows`` of a stored tensor, which transformers loads as the
    model's tensor ``name`` (:func:`_split_source`), with dimensions ``transpose`` swapped
    where set (:func:`_transpose_source`)."""

    name: str
    start: int
    rows: int
    transpose: tuple[int, int] | None = None


def _split_source(new: str, pattern: str, converters: list[Any], meta: dict[str, torch.Tensor],
                  shape: tuple[int, ...]) -> list[_Piece] | None:
    """The pieces transformers cuts a stored tensor of ``shape`` into along its rows
    (``Chunk(dim=0)``: equal pieces; ``Split(dim=0)``: each sized like its target), named as
    transformers names them (``new``, the first piece's name, with the converter's first target
    pattern replaced by each target's); None where the conversion is not such a split or the
    model's shapes do not fit it."""
    converter = _converter_of(pattern, converters)
    if converter is None or len(list(converter.source_patterns)) != 1 or \
            len(converter.operations) != 1:
        return None
    op = converter.operations[0]
    kind = type(op).__name__
    if kind not in ("Chunk", "Split") or getattr(op, "dim", None) != 0 or \
            getattr(op, "num_shards_attribute", None) is not None or not shape:
        return None
    targets = list(converter.target_patterns)
    if targets[0] not in new:
        return None
    names = [new.replace(targets[0], t) for t in targets]
    found = [meta.get(n) for n in names]
    if any(t is None or tuple(t.shape[1:]) != tuple(shape[1:]) for t in found):
        return None
    rows = [int(t.shape[0]) for t in found if t is not None]
    if kind == "Chunk":  # torch.chunk's sizes
        size = -(-shape[0] // len(rows))
        if rows != [min(size, shape[0] - i * size) for i in range(len(rows))]:
            return None
    if sum(rows) != shape[0]:
        return None
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return [_Piece(n, a, r) for n, a, r in zip(names, starts, rows, strict=True)]


def _transpose_source(new: str, pattern: str, converters: list[Any],
                      meta: dict[str, torch.Tensor], shape: tuple[int, ...]
                      ) -> list[_Piece] | None:
    """The stored tensor of ``shape`` as the model's ``new`` where transformers transposes it
    while loading (``Transpose``: Qwen3-VL-MoE's fused experts, published ``[E, in, out]``;
    with ``check_dims`` only where the shapes differ): one piece, transposed or not; None
    where the conversion is not such a transpose or the model's shape does not fit it."""
    converter = _converter_of(pattern, converters)
    if converter is None or len(list(converter.source_patterns)) != 1 or \
            len(list(converter.target_patterns)) != 1 or len(converter.operations) != 1:
        return None
    op = converter.operations[0]
    target = meta.get(new)
    if type(op).__name__ != "Transpose" or target is None or not shape:
        return None
    dims = (int(op.dim0) % len(shape), int(op.dim1) % len(shape))
    swapped = list(shape)
    swapped[dims[0]], swapped[dims[1]] = shape[dims[1]], shape[dims[0]]
    want = tuple(target.shape)
    if getattr(op, "check_dims", False) and tuple(shape) == want:
        return [_Piece(new, 0, shape[0])]
    if tuple(swapped) != want:
        return None
    return [_Piece(new, 0, shape[0], dims)]


def _plan_config(model: nn.Module, names: set[str], pairs: list[tuple[str, QuantConfig | None]],
                 include: tuple[str, ...], exclude: tuple[str, ...], used: set[str],
                 strict: bool = False
                 ) -> tuple[dict[str, _Job], dict[str, str], dict[str, Any], list[LayerReport],
                            dict[str, _Tie], dict[str, list[str]]]:
    """Jobs by stored weight name, aliases, module entries, skipped-layer rows, the rows of
    layers whose weight is tied to another module's stored one (by the stored weight's name;
    filled in from that layer's row once it is quantized), and the skipped layers with
    parameters stored under another layer's names (layer -> those names: BART's
    ``encoder.embed_tokens``, tied to ``shared``). Adds the patterns that picked a layer's
    config to ``used``."""
    mplan = plan_model(model, dict(pairs), include=include, exclude=exclude, strict=strict,
                       allow_meta=True)
    used.update(mplan.used)
    jobs: dict[str, _Job] = {}
    aliases: dict[str, str] = {}
    modules: dict[str, Any] = {}
    skipped: list[LayerReport] = []
    stored_by_param: dict[int, str] = {}
    tied: list[tuple[int, _Tie]] = []
    stored_ids = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)
                  if n in names}
    float_ties: dict[str, list[str]] = {}
    for plan in mplan.plans.values():
        mod = plan.module
        assert mod is not None
        if plan.part:
            _plan_experts_part(plan, names, jobs, modules, skipped)
            continue
        w = getattr(mod, "weight", None)
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
        first = plan.names[0]
        if plan.reason is not None or plan.config is None or plan.scheme is None:
            own = [*mod._parameters, *(b for b in mod._buffers
                                       if b not in mod._non_persistent_buffers_set)]
            prefix = f"{first}." if first else ""  # the root module's tensors: bare names
            listed = any(f"{prefix}{t}" in names for t in own)  # bytes counted as written
            elsewhere = [stored_ids[id(p)] for n, p in mod._parameters.items()
                         if f"{prefix}{n}" not in names and id(p) in stored_ids]
            if elsewhere:  # tied parameters, stored under another layer's names
                float_ties[first] = elsewhere
            if listed or elsewhere or not own:  # (or it holds only buffers it builds
                # itself, counted by _count_unpersisted)
                skipped.append(LayerReport(first, type(mod).__name__, shape, 0, 0,
                                           reason=plan.reason, note=plan.note))
            continue
        entry = _entry_for(mod, plan.config, plan.scheme)
        stored = next((f"{n}.weight" for n in plan.names if f"{n}.weight" in names), None)
        pid = id(w)
        if stored is None and pid in stored_by_param:
            stored = None  # a tied weight stored under another module's name
        if stored is None and pid not in stored_by_param:
            # weight not in the file: maybe tied to a later module; decided below
            pass
        for n in plan.names:
            modules[n] = entry
        if stored is not None:
            jobs[stored] = _Job(stored.removesuffix(".weight"), plan.config, plan.scheme,
                                plan.note, mod, entry)
            stored_by_param.setdefault(pid, stored)
        else:
            text = scheme_text(plan.config, plan.scheme, entry["type"] == "W8A8Linear")
            row = LayerReport(first, type(mod).__name__, shape, 0, 0, scheme=text,
                              note=plan.note)
            tied.append((pid, (row, _activation_buffers(first, entry))))
        for n in plan.names:
            if f"{n}.weight" != stored:
                aliases[f"{n}.weight"] = "?" + str(pid)
    # resolve aliases to the stored name of the same parameter
    resolved: dict[str, str] = {}
    for alias, target in aliases.items():
        stored = stored_by_param.get(int(target[1:]))
        if stored is None:
            raise LinquantError(f"layer {alias.removesuffix('.weight')!r}: its weight is not in "
                                "the checkpoint; exclude it to keep it float")
        resolved[alias] = stored
    ties = {tie[0].name: tie for pid, tie in tied if pid in stored_by_param}
    for pid, (row, _) in tied:
        row.tied_to = stored_by_param[pid].removesuffix(".weight")
    return jobs, resolved, modules, skipped, ties, float_ties


_Tie = tuple[LayerReport, dict[str, torch.Tensor]]


def _plan_experts_part(plan: _Plan, names: set[str], jobs: dict[str, _Job],
                       modules: dict[str, Any], skipped: list[LayerReport]) -> None:
    """The job for one projection of an experts module, stored under its own name (a fused
    ``[E, out, in]`` tensor, as GPT-OSS checkpoints hold them)."""
    mod = plan.module
    assert mod is not None
    w = mod._parameters[plan.part]
    assert w is not None
    first = plan.names[0]
    if plan.reason is not None or plan.config is None or plan.scheme is None:
        if first in names:
            skipped.append(LayerReport(first, _type_name(mod), tuple(w.shape), 0, 0,
                                       reason=plan.reason, note=plan.note))
        return
    stored = next((n for n in plan.names if n in names), None)
    if stored is None:
        raise LinquantError(f"layer {first!r}: its weight is not in the checkpoint; exclude it "
                            "to keep it float")
    activation, act_symmetric = experts_activation(plan.config)
    entry = module_entry(QuantExpertsProj.skeleton(
        w, plan.scheme, device="meta", transposed=experts_transposed(mod),
        activation=activation, act_symmetric=act_symmetric))
    for n in plan.names:
        modules[n] = entry
    jobs[stored] = _Job(stored, plan.config, plan.scheme, plan.note, mod, entry, plan.part)


def _activation_buffers(name: str, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The buffers beside the weight that a layer tied to another one's stored weight still
    needs of its own: a static W8A8Linear's (uncalibrated) input scale and zero point."""
    return {f"{name}.{k}": v for k, v in _uncalibrated_inputs(entry).items()}


def _uncalibrated_inputs(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A static W8A8 layer's input buffers as they are before calibration (the scale NaN),
    by buffer name; nothing for other layers."""
    if entry.get("activation") != "static":
        return {}
    out = {"input_scale": torch.full((), float("nan"), dtype=torch.float32)}
    if not entry.get("act_symmetric", True):
        out["input_zero_point"] = torch.zeros((), dtype=torch.uint8)
    return out


def _entry_for(module: nn.Module, config: QuantConfig, scheme: QuantScheme) -> dict[str, Any]:
    from linquant.config import W8A8_WEIGHT
    from linquant.nn import quant_module_for

    if _uses_w8a8(module, config):
        assert config.activation is not None
        return {"type": "W8A8Linear", "scheme": str(W8A8_WEIGHT),
                "activation": config.activation_mode,
                "act_symmetric": config.activation.symmetric}
    cls = quant_module_for(module, "weight_only")
    assert cls is not None
    return {"type": cls.__name__, "scheme": str(scheme)}


def _plan_bare(infos: list[TensorInfo], pairs: list[tuple[str, QuantConfig | None]],
               include: tuple[str, ...], exclude: tuple[str, ...], used: set[str],
               strict: bool = False) -> tuple[dict[str, _Job], dict[str, Any],
                                              list[LayerReport]]:
    """:func:`_plan_config` for a file without a model: every 2-D float ``*.weight`` tensor is a
    layer named by the rest of its name, its config the first pattern's that matches it."""
    jobs: dict[str, _Job] = {}
    modules: dict[str, Any] = {}
    skipped: list[LayerReport] = []
    refusals: list[str] | None = [] if strict else None
    for info in infos:
        if not (info.name.endswith("weight") and info.ndim == 2):
            continue
        floating = info.dtype in ("F32", "F16", "BF16", "F64")
        if info.name == "weight" and floating:  # a lone module's state dict: no layer name
            skipped.append(LayerReport(info.name, "tensor", info.shape, 0, 0,
                                       reason="the root module cannot be replaced in place "
                                              "(save it inside a parent module)"))
            continue
        if not info.name.endswith(".weight"):
            continue
        mname = info.name.removesuffix(".weight")
        why = None if floating else (
            f"weight dtype {info.dtype}: only F32, F16, BF16 and F64 weights are quantized")
        if why is None and 0 in info.shape:  # the whole command stopped on it
            why = f"empty weight (shape {tuple(info.shape)}): nothing to quantize"
        if why is not None:  # (an fp64 weight was left out of the report altogether)
            skipped.append(LayerReport(mname, "tensor", info.shape, 0, 0, reason=why))
            continue
        config, reason = _select(mname, pairs, include, exclude, used, ())
        if config is None:
            skipped.append(LayerReport(mname, "tensor", info.shape, 0, 0, reason=reason))
            continue
        scheme, note = _group_fallback(mname, config.weight, info.shape[-1], "row length",
                                       refusals)
        if config.is_w8a8 and not note:
            note = "weight-only: a bare file has no layer types (no config.json)"
        entry = {"type": "auto", "scheme": str(scheme)}
        jobs[info.name] = _Job(mname, config, scheme, note, None, entry)
        modules[mname] = entry
    if refusals:
        raise strict_refusal(refusals)
    return jobs, modules, skipped


_TRIM_EVERY = 128 << 20  # input bytes between two release_freed_memory() calls


def source_path(src: str | os.PathLike[str]) -> Path:
    """The checkpoint ``src`` names: a folder's ``model.safetensors.index.json`` stands for the
    folder (its config.json, tokenizer, ...; it was read as a bare file, its config.json
    ignored and the embedding quantized as a plain matrix)."""
    p = Path(src)
    return p.parent if p.is_file() and p.name.endswith(".safetensors.index.json") else p


def release_freed_memory() -> None:
    """Give the C allocator's freed memory back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). The stream frees each tensor's temporaries before the next one, but glibc
    keeps freed blocks below its mmap threshold (which rises to 32 MiB as large blocks are
    freed) in its heap, fragmented between the output shard's kept tensors: a 1.4 GB fp32
    checkpoint peaked at 1.5 GB of anonymous memory for a 195 MB output (0.6 GB trimmed every
    128 MiB of input; after every tensor cost 40% more time, a fixed mmap threshold 2x)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def _copy_side_files(src: Path, dst: Path, compute_dtype: torch.dtype | None = None,
                     read: frozenset[Path] = frozenset(),
                     left_out: list[str] | None = None) -> list[LayerReport]:
    """Everything of a model folder but the model's weights and hidden files (configs,
    tokenizer, ...). The weight files of a sentence-transformers folder's other modules
    (``2_Dense/model.safetensors``: sentence-transformers loads them itself) are copied as
    they are, or with their float tensors in ``compute_dtype`` (as ``lq.save`` writes them
    after ``quantize_model``'s cast: a float32 Dense after a bf16 transformer failed on every
    call); returns a report row (kept float) for each such module. Other weight-like files
    that are not among the checkpoint's ``read`` files are named in ``left_out``."""
    if not src.is_dir():
        return []
    modules = _st_module_folders(src)
    rows: dict[str, LayerReport] = {}
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or (f.is_symlink()
                                                               and not f.exists()):
            continue
        module = modules.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if (left_out is not None and f.is_file() and module is None
                and _WEIGHT_FILE_RE.search(f.name) and f.resolve() not in read):
            left_out.append(str(rel))
        if f.is_dir():  # made for the files copied into it (original/ held only weights)
            continue
        if not _WEIGHT_FILE_RE.search(f.name) or module is not None:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            weights = module is not None and _WEIGHT_FILE_RE.search(f.name) is not None
            cast = weights and compute_dtype is not None and _cast_module_weights(
                f, dst / rel, compute_dtype)
            if not cast:
                shutil.copy2(f, dst / rel)
            if module is not None and weights:
                name, kind = module
                row = rows.setdefault(name, LayerReport(
                    name, kind, (), 0, 0,
                    reason=(f"sentence-transformers module {name} ({kind}): saved in its own "
                            "folder in sentence-transformers' float format"),
                    note=f"{rel.parts[0]}/ " + (
                        f"copied in {str(compute_dtype).replace('torch.', '')}, the model's "
                        "compute dtype" if cast else "copied unchanged")))
                row.bytes_before += f.stat().st_size
                row.bytes_after += (dst / rel).stat().st_size
    return list(rows.values())


def _cast_module_weights(src: Path, dst: Path, dtype: torch.dtype) -> bool:
    """Write the safetensors file ``src`` to ``dst`` with its float tensors in ``dtype``;
    False (nothing written) for another kind of file or one with no float tensor to cast."""
    if src.suffix != ".safetensors":
        return False
    from safetensors import safe_open
    from safetensors.torch import save_file

    try:
        with safe_open(str(src), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata()
    except Exception as e:  # safetensors' own errors: a damaged module file
        raise LinquantError(f"{src}: cannot read this sentence-transformers module's "
                            f"weights ({e})") from e
    if not any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
        return False
    save_file({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()},
              str(dst), metadata=metadata)
    return True


def _st_module_folders(src: Path) -> dict[str, tuple[str, str]]:
    """``{folder: (module name, class name)}`` of a sentence-transformers folder's modules
    that live in their own folder (``modules.json`` entries with a ``path``)."""
    try:
        entries = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, tuple[str, str]] = {}
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]:
            out[Path(e["path"]).parts[0]] = (str(e.get("name", e.get("idx", e["path"]))),
                                             str(e.get("type", "")).rsplit(".", 1)[-1])
    return out


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: ModelConfig,
    *,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] = (),
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    strict: bool = False,
) -> StreamResult:
    """Quantize the checkpoint ``src`` (``.safetensors`` file or model folder; a folder's
    ``model.safetensors.index.json`` stands for the folder) into ``dst``.

    ``config`` is what :func:`linquant.quantize_model` takes: a preset name, a config or its
    text, or a dict of name patterns to configs (first match wins; None keeps a layer float),
    matched against the model's layer names (with a ``config.json``) or, in a bare file, against
    each ``*.weight`` tensor's name without ``.weight``.

    Raises :class:`LinquantError` (nothing written under ``dst``, ``src`` untouched) for a
    source already quantized by linquant, a
    destination equal to or inside the source, an existing destination without ``overwrite``,
    an unwritable destination, a pickle source without ``allow_pickle``, or with ``strict``
    layers whose rows a group size does not divide (as ``quantize_model(strict=True)``).
    """
    src_p, dst_p = source_path(src), Path(dst)
    _check_paths(src_p, dst_p, overwrite)
    pairs = _normalize_config(config)
    used: set[str] = set()
    limit = parse_size(max_shard_size)
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    if (src_p / "modules.json").is_file():  # names as the loaded SentenceTransformer has them
        def alias(p: str) -> str:  # ("0.model.encoder.layer.0.*": eval --per-layer's) work too
            return with_alts(p, _ST_INNER.sub("", p))

        pairs = [(alias(p), c) for p, c in pairs]
        inc, exc = tuple(alias(p) for p in inc), tuple(alias(p) for p in exc)

    pickles = _is_pickle_source(src_p)
    if pickles is not None and not allow_pickle:
        raise LinquantError(f"{src_p}: pickle checkpoint ({', '.join(p.name for p in pickles)}); "
                            "pass allow_pickle=True / --allow-pickle to read it with "
                            "torch.load(weights_only=True)")
    if pickles is not None:
        tensors_by_name = dict(_pickle_tensors(pickles))
        infos = [TensorInfo(n, {torch.float32: "F32", torch.float16: "F16",
                                torch.bfloat16: "BF16"}.get(t.dtype, "X"),
                            tuple(t.shape), t.numel() * t.element_size(), pickles[0])
                 for n, t in tensors_by_name.items()]
        source: Iterator[tuple[str, torch.Tensor]] = iter(tensors_by_name.items())
    else:
        infos = tensor_infos(src_p)
        source = read_tensors(infos)
    quantized = next((i.name for i in infos if i.name.endswith(".weight.qdata")), None)
    if quantized is not None:
        raise LinquantError(
            f"{src_p}: already quantized by linquant (it holds {quantized!r}); quantize the "
            "float checkpoint instead, or load this one with lq.load (lq.dequantize_model "
            "gives back a float model)")
    folder = src_p if src_p.is_dir() else None
    meta_model = _build_meta_model(folder) if folder is not None else None
    renames, merges, splits, concats = _checkpoint_renames(
        meta_model, {i.name: tuple(i.shape) for i in infos}, src_p) \
        if meta_model is not None else ({}, {}, {}, {})
    merge_of: dict[str, _Merge | _Concat] = {n: m for m in merges.values() for n in m.sources}
    merge_of.update({n: c for c in concats.values() for n in c.sources})
    if renames:
        source = ((renames.get(n, n), t) for n, t in source)

    def model_names(info: TensorInfo) -> list[tuple[str, int]]:
        """The model's names for a stored tensor, each with its share of the bytes."""
        if info.name in splits:
            total = sum(p.rows for p in splits[info.name])
            return [(p.name, info.nbytes * p.rows // total) for p in splits[info.name]]
        m = merge_of.get(info.name)
        return [(m.target if m is not None else renames.get(info.name, info.name), info.nbytes)]

    names = {n for i in infos for n, _ in model_names(i)}

    aliases: dict[str, str] = {}
    ties: dict[str, _Tie] = {}
    float_ties: dict[str, list[str]] = {}
    dropped: set[str] = set()
    if meta_model is not None:
        dropped = _check_against_model(meta_model, names, src_p)
        names -= dropped
        jobs, aliases, modules, skipped, ties, float_ties = _plan_config(
            meta_model, names, pairs, inc, exc, used, strict)
        rule = (f"model config: {type(meta_model).__name__} built from config.json on the meta "
                "device; layers chosen as quantize_model would")
        if renames:
            first = next(iter(renames.items()))
            rule += (f"; {len(renames)} tensor name(s) mapped to the model's as transformers "
                     f"maps them while loading (e.g. {first[0]} -> {first[1]})")
        if merges:
            stacked = sum(len(m.sources) for m in merges.values())
            rule += (f"; {stacked} per-expert tensor(s) stacked into {len(merges)} fused "
                     "experts projection(s) as transformers does while loading (one layer's "
                     "experts held at a time)")
        cut = {n: p for n, p in splits.items() if len(p) > 1}
        if cut:
            first_cut = next(iter(cut.items()))
            rule += (f"; {len(cut)} tensor(s) cut into {sum(len(p) for p in cut.values())} "
                     "along their rows as transformers does while loading (e.g. "
                     f"{first_cut[0]} -> {', '.join(p.name for p in first_cut[1])})")
        if concats:
            first_concat = next(iter(concats.values()))
            rule += (f"; {sum(len(c.sources) for c in concats.values())} tensor(s) "
                     f"concatenated into {len(concats)} as transformers does while loading "
                     f"(e.g. {', '.join(first_concat.sources)} -> {first_concat.target})")
        turned = [n for n, p in splits.items() if len(p) == 1 and p[0].transpose]
        if turned:
            rule += (f"; {len(turned)} tensor(s) transposed as transformers does while loading "
                     f"(e.g. {turned[0]})")
        kind = {"kind": "sentence-transformers" if (src_p / "modules.json").is_file()
                else "transformers", "class": type(meta_model).__name__}
    else:
        jobs, modules, skipped = _plan_bare(infos, pairs, inc, exc, used, strict)
        rule = "bare file: every 2-D float *.weight tensor (no config.json to learn layer types)"
        kind = {"kind": "module", "class": ""}
    compute_dtype = compute_dtype_of(job.config for job in jobs.values())

    # the stored tensors from_pretrained(dtype=compute_dtype) loads in another dtype (a MoE
    # router's weight in fp32: _keep_in_fp32_modules_strict), as quantize_model's cast does
    loaded = {} if meta_model is None or compute_dtype is None else \
        hf.loaded_dtypes(meta_model, compute_dtype)
    stored_dtypes = {n: d for n, d in loaded.items() if d != compute_dtype}
    report = ModelReport(bytes_before=sum(i.nbytes for i in infos), compute_dtype=compute_dtype)
    result = StreamResult(report, rule)
    rows: dict[str, LayerReport] = {r.name: r for r in skipped}
    sizes: dict[str, int] = {}
    for info in infos:
        for n, nbytes in model_names(info):
            sizes[n] = sizes.get(n, 0) + nbytes
    meta = {"modules": modules, "aliases": aliases, "model": kind}
    stored_sizes = {i.name: i.nbytes for i in infos}
    bar = _progress(sum(sizes.values()), len(infos), progress)
    with staged_folder(dst_p, overwrite=overwrite) as tmp:
        sources = frozenset(Path(f).resolve() for f in [*(i.file for i in infos), *(
            pickles or []), src_p / "model.safetensors.index.json"] if Path(f).is_file())
        copied = _copy_side_files(folder, tmp, compute_dtype, sources, result.left_out) \
            if folder is not None else []
        if jobs:
            hf.mark_config_file(tmp)  # from_pretrained refuses it, naming linquant.load
        for row in copied:  # other sentence-transformers modules' weights, as they are
            rows[row.name] = row
            report.bytes_before += row.bytes_before
        writer = ShardWriter(tmp, limit, meta)
        # bytes read and written of the tensors written as they are (and of a quantized
        # layer's input scales), by name: added to their layer's row at the end, so a row
        # counts every tensor its layer holds itself, as quantize_model's rows do
        plain: dict[str, list[int]] = {}

        def emit(name: str, t: torch.Tensor) -> None:
            job = jobs.get(name)
            if job is None:
                if compute_dtype is not None and t.is_floating_point():
                    t = t.to(stored_dtypes.get(name, compute_dtype))
                writer.add({name: t}, {})
                plain[name] = [sizes[name], t.numel() * t.element_size()]
            elif job.part and _experts_by_rows(job, t):
                # a fused experts projection: expert by expert, as _Merge does
                assert job.module is not None
                transposed = experts_transposed(job.module)
                n_exp, out, k = experts_dims(t.shape, transposed)
                rows_q = _RowQuantizer(n_exp * out, k, job.scheme)
                for e in range(n_exp):
                    rows_q.add(e * out, expert_rows(t[e:e + 1], transposed), name)
                qt, errors = rows_q.result(t.dtype)
                write_quantized(name, job, qt, tuple(t.shape), errors, {})
            elif _matrix_by_rows(job, t):
                # a weight-only matrix quantized as stored: blocks of rows
                n, k = (int(d) for d in t.shape)
                step = _block_rows(k)
                rows_q = _RowQuantizer(n, k, job.scheme)
                for r0 in range(0, n, step):
                    rows_q.add(r0, t[r0:r0 + step], name)
                qt, errors = rows_q.result(t.dtype)
                write_quantized(name, job, qt, tuple(t.shape), errors, {})
            else:
                qt, extra = _quantize_one(job, name, t)
                deq = qt.dequantize(torch.float32)
                if job.part and job.module is not None:
                    ref = expert_rows(t, experts_transposed(job.module))
                else:
                    conv1d = job.module is not None and _is_conv1d(job.module)
                    ref = _float_like(t, qt.shape, conv1d)
                errors = _errors(ref.float(), deq)
                del deq, ref
                write_quantized(name, job, qt, tuple(t.shape), errors, extra)

        def write_quantized(name: str, job: _Job, qt: QuantizedTensor, shape: tuple[int, ...],
                            errors: tuple[float, float], extra: dict[str, torch.Tensor]) -> None:
            if compute_dtype is not None:
                qt = QuantizedTensor(qt.qdata, qt.scale, qt.zero_point_packed, qt.offset,
                                     qt.scheme, tuple(qt.shape), compute_dtype)
            qname = f"{job.module_name}.weight"  # the stored name, or an experts part's
            tensors, entry = encode_quantized(qname, qt)
            writer.add(tensors, {qname: entry})
            if job.part:  # an experts projection quantized whole, by rows or stacked
                extra = {**_uncalibrated_inputs(job.entry), **extra}
            for k, v in extra.items():
                writer.add({f"{job.module_name}.{k}": v}, {})
                if not job.part:
                    plain[f"{job.module_name}.{k}"] = [0, v.numel() * v.element_size()]
            # W8A8Linear, and experts with int8 activations ("activation": dynamic / static)
            text = scheme_text(job.config, job.scheme, bool(job.entry.get("activation")))
            rows[job.module_name] = LayerReport(
                job.module_name, _type_name(job.module) if job.module is not None
                else "tensor", shape, sizes[name], qt.nbytes, scheme=text,
                bits_per_weight=qt.bits_per_weight, note=job.note)
            rows[job.module_name].sqnr_db, result.max_error[job.module_name] = errors

        for m in merges.values():  # quantized source by source where that is the same
            job = jobs.get(m.target)
            if job is not None and job.part and job.module is not None and \
                    not experts_transposed(job.module):
                m.quantize_by_rows(job.scheme)
        since_trim = 0  # bytes read since the allocator last gave memory back
        for i, (name, t) in enumerate(source):
            if name in dropped:  # a tensor the model does not have, which transformers ignores
                bar.update(stored_sizes.get(name, 0), i + 1)
                continue
            merge = merge_of.get(name)
            if name in splits:
                for piece in splits[name]:
                    part = t[piece.start:piece.start + piece.rows]
                    emit(piece.name, part if piece.transpose is None
                         else part.transpose(*piece.transpose).contiguous())
                    del part
            elif merge is None:
                emit(name, t)
            else:
                fused = merge.add(name, t)
                if isinstance(fused, tuple):
                    assert isinstance(merge, _Merge)
                    qt, errors = fused
                    write_quantized(merge.target, jobs[merge.target], qt, merge.shape, errors, {})
                elif fused is not None:
                    emit(merge.target, fused)
                del fused
            del t
            since_trim += stored_sizes.get(name, 0)
            if since_trim >= _TRIM_EVERY:
                release_freed_memory()
                since_trim = 0
            bar.update(stored_sizes.get(name, sizes.get(name, 0)), i + 1)
        left = [m.target for m in merge_of.values() if m.incomplete]
        if left:
            raise LinquantError(f"{src_p}: the per-expert tensors of {left[0]} ended incomplete")
        for _, extra in ties.values():  # a tied static W8A8 head's own input scale
            if extra:
                writer.add(extra, {})
        result.files = [dst_p / f.name for f in writer.finish()]
        report.bytes_after = writer.total_size + sum(r.bytes_after for r in copied)
    bar.close()
    for name, (read, written) in plain.items():
        proj = name.removesuffix("_bias")  # an experts projection's bias: a tensor beside it
        owner = rows.get(name) or (rows.get(proj) if proj != name and proj in names else None) \
            or rows.get(name.rpartition(".")[0])  # an experts projection, or a layer's tensor
        if owner is not None:
            owner.bytes_before += read
            owner.bytes_after += written
    for layer, stored_names in float_ties.items():  # a float layer holds its tied ones too
        for stored_name in stored_names:
            read, written = plain.get(stored_name, (0, 0))
            rows[layer].bytes_before += read
            rows[layer].bytes_after += written
    if meta_model is not None:  # what kept-float layers build themselves and do not save
        _count_unpersisted(meta_model, rows, loaded)
    for row, _ in ties.values():  # as quantize_model reports a tied layer: the weight's numbers
        assert row.tied_to is not None
        target = rows[row.tied_to]
        row.bits_per_weight, row.sqnr_db = target.bits_per_weight, target.sqnr_db
        row.bytes_before, row.bytes_after = target.bytes_before, target.bytes_after
        row.note = _join(row.note, f"tied to {row.tied_to} (weight stored once)")
        rows[row.name] = row
    # the model's order where a config built one (as quantize_model reports), else the file's
    order: dict[str, int] = {}
    for key in meta_model.state_dict() if meta_model is not None else ():
        order.setdefault(key.rpartition(".")[0], len(order))  # a layer, then its parameters
        order.setdefault(key, len(order))  # (an experts projection is a parameter)
    for info in infos:
        for n, _ in model_names(info):
            order.setdefault(n.removesuffix(".weight"), len(order))
    report.layers = sorted(rows.values(), key=lambda r: order.get(r.name, len(order)))
    report.unmatched_patterns, report.shadowed_patterns = pattern_misses(
        (r.name for r in report.layers), (*inc, *exc), (p for p, _ in pairs), used)
    return result


def _count_unpersisted(model: nn.Module, rows: dict[str, LayerReport],
                       wanted: dict[str, torch.dtype]) -> None:
    """Add to each kept-float layer's row the buffers it builds itself and a checkpoint does
    not hold (position ids, an embedding's scale), in the dtype quantize_model's cast leaves
    them (``wanted``: :func:`linquant.io.hf.loaded_dtypes` for the compute dtype; empty
    without one), as quantize_model's rows count them."""
    for name, mod in model.named_modules():
        row = rows.get(name)
        if row is None or row.scheme is not None:
            continue
        for bname, b in mod._buffers.items():
            if b is None or bname not in mod._non_persistent_buffers_set:
                continue
            dtype = wanted.get(f"{name}.{bname}" if name else bname, b.dtype)  # others: theirs
            row.bytes_before += b.numel() * b.element_size()
            row.bytes_after += b.numel() * dtype.itemsize


def _error_sums(ref: torch.Tensor, deq: torch.Tensor, chunk: int = 1 << 20
                ) -> tuple[float, float, float]:
    """``(sum ref^2, sum (ref - deq)^2, max |ref - deq|)`` in float64 chunks (no full-size
    float64 copies: the memory bound of streaming holds)."""
    a, b = ref.reshape(-1), deq.reshape(-1)
    signal = noise = worst = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        signal += float((x * x).sum())
        noise += float(((x - y) ** 2).sum())
        worst = max(worst, float((x - y).abs().max()))
    return signal, noise, worst


def _errors(ref: torch.Tensor, deq: torch.Tensor) -> tuple[float, float]:
    """``(SQNR dB, max |error|)`` of ``deq`` against ``ref``."""
    signal, noise, worst = _error_sums(ref, deq)
    return sqnr_from_sums(signal, noise), worst


def _experts_by_rows(job: _Job, t: torch.Tensor) -> bool:
    """Whether the fused experts projection ``t`` of ``job`` can be quantized expert by expert
    (:class:`_RowQuantizer`); its shape is checked against the model's first."""
    mod = job.module
    assert mod is not None
    meta_p = mod._parameters[job.part]
    if meta_p is not None and tuple(meta_p.shape) != tuple(t.shape):
        raise LinquantError(f"{job.module_name}: shape {tuple(t.shape)} in the checkpoint, "
                            f"{tuple(meta_p.shape)} in the model built from config.json")
    if t.dim() != 3 or not t.is_floating_point():
        return False
    _, out, k = experts_dims(t.shape, experts_transposed(mod))
    return _RowQuantizer.fits(out, k, job.scheme)


_BLOCK_ELEMS = 1 << 22  # elements per block of rows (16 MiB of fp32)


def _block_rows(k: int) -> int:
    """Rows per block of a matrix with rows of ``k``: a multiple of 8, so every block but the
    last starts and ends on whole bytes of codes and zero points at any bit width."""
    return max(8, (_BLOCK_ELEMS // max(1, k)) // 8 * 8)


def _matrix_by_rows(job: _Job, t: torch.Tensor) -> bool:
    """Whether ``job``'s weight ``t`` is quantized exactly as stored (a weight-only linear or
    embedding layer, or a bare file's matrix), so that blocks of its rows can be quantized one
    by one (:class:`_RowQuantizer`)."""
    if job.entry.get("type") not in ("QuantLinear", "QuantEmbedding", "auto") or t.dim() != 2:
        return False
    if not t.is_floating_point() or (job.module is not None and _is_conv1d(job.module)):
        return False
    if job.module is not None:
        meta_w = job.module._parameters.get("weight")
        if meta_w is None or tuple(meta_w.shape) != tuple(t.shape):
            return False  # _quantize_one says what does not fit
    return _RowQuantizer.fits(_block_rows(int(t.shape[1])), int(t.shape[1]), job.scheme)



def _quantize_one(job: _Job, name: str, t: torch.Tensor
                  ) -> tuple[QuantizedTensor, dict[str, torch.Tensor]]:
    """The quantized weight and any extra buffers of its layer (static W8A8 input scale)."""
    if job.module is None:
        return quantize(t, job.scheme, name=name), {}
    mod = job.module
    if job.part:
        meta_p = mod._parameters[job.part]
        if meta_p is not None and tuple(meta_p.shape) != tuple(t.shape):
            raise LinquantError(f"{name}: shape {tuple(t.shape)} in the checkpoint, "
                                f"{tuple(meta_p.shape)} in the model built from config.json")
        activation, act_symmetric = experts_activation(job.config)
        proj = QuantExpertsProj.from_float(t, job.scheme, name=job.module_name,
                                           transposed=experts_transposed(mod),
                                           activation=activation, act_symmetric=act_symmetric)
        return proj.qweight, {}  # a static projection's input scale: write_quantized
    meta_w = mod._parameters["weight"]
    if meta_w is not None and tuple(meta_w.shape) != tuple(t.shape):
        raise LinquantError(f"{name}: shape {tuple(t.shape)} in the checkpoint, "
                            f"{tuple(meta_w.shape)} in the model built from config.json")
    mod._parameters["weight"] = nn.Parameter(t, requires_grad=False)
    try:
        new = _build(job.module_name, mod, job.config, job.scheme)
    finally:
        mod._parameters["weight"] = meta_w
    built = module_entry(new) if isinstance(new, QuantModule) else None
    if built != job.entry:
        raise LinquantError(f"{name}: built {built}, planned {job.entry}")
    extra = {k: v for k, v in new.named_buffers(recurse=False) if k not in _QUANT_BUFFERS}
    qweight = getattr(new, "qweight")  # noqa: B009
    assert isinstance(qweight, QuantizedTensor)
    return qweight, extra


class _Bar:
    def __init__(self, total: int, n: int, enabled: bool) -> None:
        self.n = n
        self.tq: Any = None
        if enabled:
            from tqdm import tqdm

            self.tq = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                           file=sys.stderr, desc="quantize", dynamic_ncols=True)

    def update(self, nbytes: int, done: int) -> None:
        if self.tq is not None:
            self.tq.set_postfix_str(f"{done}/{self.n} tensors", refresh=False)
            self.tq.update(nbytes)

    def close(self) -> None:
        if self.tq is not None:
            self.tq.close()


def _progress(total: int, n: int, enabled: bool) -> _Bar:
    return _Bar(total, n, enabled)
