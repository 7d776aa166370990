"""Quantize a whole model in place: one walk, swap the supported layers, report every layer.

>>> report = quantize_model(model, "w4a16-g32", exclude=["lm_head"])   # doctest: +SKIP
>>> print(report)                                                     # doctest: +SKIP

Rules (each one shows up in the report, nothing is skipped silently):

* **Layers** are the modules that own parameters directly (``Linear``, ``Embedding``,
  ``LayerNorm``, ...). Supported types are swapped for their quantized module found with
  :func:`linquant.nn.quant_module_for`; every other layer is listed as float with its reason.
* **MoE experts** (transformers' fused experts modules, :mod:`linquant.nn.experts`): each 3-D
  projection is a layer of its own, named ``<experts>.gate_up_proj`` / ``<experts>.down_proj``,
  selected, reported and quantized (per expert) like any layer: weight-only, or with int8
  activations under a W8A8 config (per token, or one calibrated scale per projection); the
  module becomes a :class:`~linquant.nn.experts.QuantExperts` holding whichever
  projections were quantized.
* **Selection** by shell-style patterns (:func:`fnmatch.fnmatchcase`, ``*`` also crosses dots)
  on module names. A pattern matches a module when it matches its name or the name of one of
  its ancestors, so ``exclude=["encoder.layer.0"]`` keeps that whole block float. ``exclude``
  wins over ``include``. With a dict config the first pattern (in dict order) that matches picks
  the config; ``None`` keeps the layer float.
* **Group sizes** that do not divide a layer's row (``in_features`` of a linear layer, the
  embedding dimension) fall back to the largest group size below that divides it (576 columns
  with group 128 quantize with group 96); the report says so. ``strict=True`` raises instead,
  before any layer is touched.
* **Tied weights** (one ``Parameter`` in several modules, e.g. an input embedding shared with
  an LM head, or one module object at several names) are quantized once and stay tied: every
  module that shared the float weight holds the *same* quantized buffer objects. If the sharing
  modules do not all get the same weight scheme (one excluded, different configs, a layout that
  differs), all of them stay float and the report names the partner and the reason.
  ``model.to(device)`` keeps the tie too: PyTorch moves each module's buffers separately, and
  the quantized layers reuse the first move of a shared buffer
  (:meth:`linquant.nn.base.QuantModule._apply`), so the device holds one copy.
  ``model.to(dtype)`` keeps it as well (quantized buffers are never cast).
* **Memory**: the float module is dropped from the model as soon as its replacement is in, so
  its weight is freed (unless the caller holds another reference). Peak memory is the float
  model plus one layer.
* **compute_dtype** (``w8a16``): after swapping, the model is cast with
  ``model.to(compute_dtype)``; quantized layers keep their codes and scales and compute in that
  dtype. Feed it inputs of that dtype (token ids need nothing). Float buffers that the model
  does not persist (computed at construction) get the dtype they have in the model loaded in
  that dtype by transformers' ``from_pretrained`` or by ``linquant.load``: a rotary
  embedding's ``inv_freq`` stays fp32 (cast to bf16 it would lose precision), a table that
  transformers builds in the default dtype (M2M100's sinusoidal positions) is cast, or the
  float32 table would turn the activations back to fp32 and meet bf16 layer norms. Outside
  transformers models such buffers keep their dtype.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from linquant.config import W8A8_WEIGHT, QuantConfig, get_config
from linquant.errors import LinquantError
from linquant.io import hf
from linquant.nn.base import (
    PlainRefs,
    _memory_key,
    carry_hooks,
    find_module,
    keep_bias,
    plain_references,
    replace_plain_references,
    weight_dims,
)
from linquant.ops.metrics import sqnr
from linquant.report import Column, csv_text, format_table, json_text
from linquant.scheme import QuantScheme
from linquant.tensor import QuantizedTensor

if TYPE_CHECKING:
    from linquant.nn.experts import QuantExpertsProj

__all__ = [
    "LayerReport", "ModelPlan", "ModelReport", "model_nbytes", "plan_model", "quantize_model",
]

ConfigLike = str | QuantConfig
ModelConfig = str | QuantConfig | Mapping[str, "ConfigLike | None"]


# ---- report ---------------------------------------------------------------------------------
_CSV_FIELDS = ("name", "type", "shape", "quantized", "scheme", "bits_per_weight", "bytes_before",
               "bytes_after", "sqnr_db", "reason", "note", "tied_to")


@dataclass
class LayerReport:
    """One layer of the model: what it became, or why it stayed float.

    ``reason`` is None for a quantized layer. ``bytes_before``/``bytes_after`` count the
    module's own tensors (weight, bias, scales, ...). ``tied_to`` names the layer whose
    quantized buffers this one shares (stored once).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    scheme: str | None = None
    bits_per_weight: float | None = None
    sqnr_db: float | None = None
    reason: str | None = None
    note: str = ""
    tied_to: str | None = None

    @property
    def quantized(self) -> bool:
        return self.reason is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "shape": list(self.shape),
            "quantized": self.quantized,
            "scheme": self.scheme,
            "bits_per_weight": self.bits_per_weight,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "sqnr_db": self.sqnr_db,
            "reason": self.reason,
            "note": self.note,
            "tied_to": self.tied_to,
        }


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


_COLUMNS: list[Column] = [
    ("name", "layer", ""),
    ("type", "type", ""),
    ("shape", "shape", lambda s: "x".join(str(n) for n in s)),
    ("scheme", "scheme", ""),
    ("bits_per_weight", "bits/w", ".3f"),
    ("bytes_before", "before", _human),
    ("bytes_after", "after", _human),
    ("sqnr_db", "SQNR dB", ".1f"),
    ("note", "note / reason kept float", ""),
]


@dataclass
class ModelReport:
    """What :func:`quantize_model` did, layer by layer.

    Attributes:
        layers: every layer in module order, quantized or not (``.quantized`` and ``.skipped``
            are the two halves; ``report["encoder.fc"]`` looks one up by name).
        bytes_before, bytes_after: whole-model bytes (parameters + buffers, each tensor once).
        compute_dtype: the dtype the model was cast to, or None.
        unmatched_patterns: include/exclude/config patterns that match no layer (typos?).
        shadowed_patterns: config patterns that match layers but decided none of them: each
            layer they match was excluded, not included, or taken by an earlier pattern (in a
            dict, the first matching pattern wins, so ``{"*": a, "*.value": b}`` never applies
            ``b``).
    """

    layers: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    compute_dtype: torch.dtype | None = None
    unmatched_patterns: tuple[str, ...] = ()
    shadowed_patterns: tuple[str, ...] = ()

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.quantized]

    @property
    def skipped(self) -> list[LayerReport]:
        """The layers left float, each with its ``reason``."""
        return [r for r in self.layers if not r.quantized]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after`` for the whole model."""
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    @property
    def bits_per_weight(self) -> float | None:
        """Stored bits per element over the quantized weights (tied weights counted once)."""
        rows = [r for r in self.quantized if r.tied_to is None and r.bits_per_weight is not None]
        n = sum(r.numel for r in rows)
        if n == 0:
            return None
        return sum(r.numel * (r.bits_per_weight or 0.0) for r in rows) / n

    # ---- output ----------------------------------------------------------------------------
    def summary(self) -> str:
        bpw = self.bits_per_weight
        lines = [
            f"quantized {len(self.quantized)} of {len(self.layers)} layers; "
            f"model {_human(self.bytes_before)} -> {_human(self.bytes_after)} "
            f"({self.ratio:.2f}x smaller)"
            + ("" if bpw is None else f"; {bpw:.3f} bits per quantized weight"),
        ]
        if self.compute_dtype is not None:
            lines.append(f"model cast to {str(self.compute_dtype).replace('torch.', '')}")
        if self.unmatched_patterns:
            lines.append("patterns that matched no layer: " + ", ".join(
                repr(p) for p in self.unmatched_patterns))
        if self.shadowed_patterns:
            lines.append("patterns that decided no layer (an exclude, the include list or an "
                         "earlier pattern settled every layer they match): " + ", ".join(
                             repr(p) for p in self.shadowed_patterns))
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = []
        for r in self.layers:
            d = r.to_dict()
            d["scheme"] = r.scheme or "float"
            d["note"] = r.note if r.quantized else _join(r.reason or "", r.note)
            rows.append(d)
        return format_table(rows, _COLUMNS) + "\n" + self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "bits_per_weight": self.bits_per_weight,
            "compute_dtype": None if self.compute_dtype is None
            else str(self.compute_dtype).replace("torch.", ""),
            "unmatched_patterns": list(self.unmatched_patterns),
            "shadowed_patterns": list(self.shadowed_patterns),
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self) -> str:
        """Strict JSON (an infinite SQNR is the string ``"inf"``)."""
        return json_text(self.to_dict())

    def plot(self, path: str | os.PathLike[str], title: str = "") -> None:
        """Draw the report to an image file (:func:`linquant.report.plot_layers`; needs
        matplotlib): each layer's weight SQNR and bytes before / after, in module order."""
        from linquant.report import plot_layers

        plot_layers(self, path, title)

    def to_csv(self) -> str:
        """One row per layer with raw numbers (bytes, dB); the shape as ``768x3072``."""
        rows = []
        for r in self.layers:
            d = r.to_dict()
            d["shape"] = "x".join(str(n) for n in r.shape)
            rows.append(d)
        return csv_text(rows, _CSV_FIELDS)


# ---- sizes ----------------------------------------------------------------------------------
_UNINITIALIZED = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)


def _tensors(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    seen: set[object] = set()
    out: list[torch.Tensor] = []
    for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
        if isinstance(t, _UNINITIALIZED):
            continue  # a lazy module's: no size yet
        key = _memory_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _own_nbytes(module: nn.Module) -> int:
    """Bytes of the tensors ``module`` holds itself (not its submodules'): a layer's row in the
    report (an attention module that owns a parameter besides its projections counts only it)."""
    return sum(t.numel() * t.element_size() for t in _tensors(module, recurse=False))


def model_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each tensor (or view of the same bytes)
    counted once."""
    return sum(t.numel() * t.element_size() for t in _tensors(module))


# ---- planning ---------------------------------------------------------------------------------
class _Pattern(str):
    """A name pattern (the text the user gave) that also matches as its ``alts``: the same
    layer spelled with or without a ``SentenceTransformer``'s prefix (:func:`with_alts`)."""

    alts: tuple[str, ...] = ()


def with_alts(pattern: str, *alts: str) -> str:
    """``pattern``, also matching as each of ``alts`` (where they differ from it)."""
    extra = tuple(a for a in alts if a != pattern)
    if not extra:
        return pattern
    out = _Pattern(pattern)
    out.alts = extra
    return out


_ST_INNER = re.compile(r"^\d+\.(?:auto_model|model)\.")  # "0.model." / "0.auto_model."


def st_prefix(model: nn.Module) -> str:
    """``"0.model."``: where a ``SentenceTransformer`` keeps its transformer's layers (the
    names a sentence-transformers folder's checkpoint and ``linquant quantize`` use lack it);
    ``""`` for any other model."""
    from linquant.nn.base import qualified_name

    if not qualified_name(type(model)).startswith("sentence_transformers."):
        return ""
    for name, child in model.named_children():
        inner = getattr(child, "auto_model", None)
        for attr, grandchild in child.named_children():
            if inner is not None and grandchild is inner:
                return f"{name}.{attr}."
        return ""
    return ""


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` (or one of its :func:`with_alts` spellings) matches ``name`` or one of its
    dotted ancestors."""
    parts = name.split(".")
    for p in (pattern, *getattr(pattern, "alts", ())):
        if fnmatchcase(name, p) or any(
                fnmatchcase(".".join(parts[:i]), p) for i in range(1, len(parts))):
            return True
    return False


def _patterns(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    out = tuple(value)
    for p in out:
        if not isinstance(p, str):
            raise LinquantError(f"{what} patterns must be strings, got {p!r}")
    return out


def _normalize_config(config: ModelConfig) -> list[tuple[str, QuantConfig | None]]:
    """``(pattern, config)`` pairs in priority order; a single config is ``[("*", config)]``."""
    if isinstance(config, (str, QuantConfig)):
        return [("*", get_config(config))]
    if isinstance(config, Mapping):
        pairs: list[tuple[str, QuantConfig | None]] = []
        for pattern, value in config.items():
            if not isinstance(pattern, str):
                raise LinquantError(f"config dict keys must be name patterns, got {pattern!r}")
            if value is None or (isinstance(value, str) and value.strip() == "float"):
                pairs.append((pattern, None))
            else:
                pairs.append((pattern, get_config(value)))
        if not pairs:
            raise LinquantError("config dict is empty: map name patterns to presets or configs")
        return pairs
    raise LinquantError(
        "config must be a preset name, a QuantConfig, or a dict {name pattern: preset | "
        f"QuantConfig | None | 'float'}}, got {type(config).__name__}"
    )


def compute_dtype_of(configs: Iterable[QuantConfig]) -> torch.dtype | None:
    """The one compute dtype that the configs of the quantized layers ask for (None: keep the
    model's); :class:`LinquantError` where they ask for two (one model runs in one dtype)."""
    dtypes = {c.compute_dtype for c in configs}
    dtypes.discard(None)
    if len(dtypes) > 1:
        raise LinquantError(
            "the configs ask for different compute dtypes "
            f"({', '.join(sorted(str(d) for d in dtypes))}); one model runs in one dtype"
        )
    return next(iter(dtypes)) if dtypes else None


def _is_quantized_module(module: nn.Module) -> bool:
    from linquant.nn.base import QuantModule

    return isinstance(module, QuantModule)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    from linquant.nn.base import is_hf_conv1d

    return is_hf_conv1d(module)


def _row_length(module: nn.Module) -> tuple[int, str]:
    """Length of the rows the groups run along, and what to call it in messages."""
    if isinstance(module, nn.Linear):
        return weight_dims(module, ("out_features", "in_features"))[1], "in_features"
    if isinstance(module, nn.Embedding):
        return weight_dims(module, ("num_embeddings", "embedding_dim"))[1], "embedding_dim"
    w = _weight(module)
    if w is None or w.dim() == 0:
        return 0, "row length"
    if _is_conv1d(module):  # weight [in, out]
        return int(w.shape[0]), "in_features"
    if isinstance(module, nn.Conv2d):  # quantized as [out, in/groups * kh * kw]
        return int(w[0].numel()), "in_channels/groups*kh*kw"
    if isinstance(module, nn.Conv1d):  # quantized as [out, in/groups * k]
        return int(w[0].numel()), "in_channels/groups*k"
    return int(w.shape[-1]), "row length"


def _largest_divisor_below(n: int, limit: int) -> int:
    for d in range(min(limit, n), 0, -1):
        if n % d == 0:
            return d
    return 1


def _weight(module: nn.Module) -> torch.Tensor | None:
    """A float layer's weight; None for a quantized one (whose ``weight`` dequantizes)."""
    if _is_quantized_module(module):
        return None
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


@dataclass
class _Plan:
    """The decision for one module object (possibly at several names)."""

    names: list[str]
    module: nn.Module | None
    config: QuantConfig | None = None
    scheme: QuantScheme | None = None
    reason: str | None = None
    note: str = ""
    part: str = ""  # a projection of an experts module (linquant.nn.experts): its name


_FP32_ATTRS = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")


# A layer the model itself keeps float: (name, how it matches, reason). "part": the layer's
# dotted name equals the name, ends with it or starts with it; "module": the layer is that
# module or inside it.
_KeepFloat = tuple[str, str, str]


def _kept_float(model: nn.Module) -> list[_KeepFloat]:
    """What ``model`` asks to keep float, whatever the config says:

    * module names that Hugging Face models list in ``_keep_in_fp32_modules`` (and
      ``_strict``) anywhere in ``model``: layers whose accuracy the model needs (T5's ``wo``,
      which overflows in fp16), which transformers' own quantizers leave alone;
    * a ``SentenceTransformer``'s modules besides its transformer (``Dense``, ...), which
      sentence-transformers saves and loads from their own folders in its float format
      (``linquant.save`` writes those files, ``linquant quantize`` copies them)."""
    from linquant.nn.base import qualified_name

    rules: dict[str, _KeepFloat] = {}
    for module in model.modules():
        for attr in _FP32_ATTRS:
            names = getattr(module, attr, None)
            if isinstance(names, (list, tuple, set, frozenset)):
                for entry in sorted(n for n in names if isinstance(n, str) and n):
                    rules.setdefault(entry, (entry, "part", (
                        f"{type(module).__name__}.{attr} lists {entry!r} (transformers keeps it "
                        "in fp32 for accuracy; its own quantizers leave it alone)")))
    out = list(rules.values())
    if qualified_name(type(model)).startswith("sentence_transformers."):
        for name, child in model.named_children():
            if getattr(child, "auto_model", None) is None and any(
                    True for _ in child.parameters()):
                out.append((name, "module", (
                    f"sentence-transformers module {name} ({type(child).__name__}): saved in "
                    "its own folder in sentence-transformers' float format")))
    return out


def _keeps_float(name: str, rules: Iterable[_KeepFloat]) -> str | None:
    """The reason of the first rule of :func:`_kept_float` that ``name`` matches, or None."""
    for entry, how, why in rules:
        if name == entry or name.startswith(f"{entry}.") or (
                how == "part" and name.endswith(f".{entry}")):
            return why
    return None


def _select(
    name: str,
    pairs: list[tuple[str, QuantConfig | None]],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    used: set[str],
    keep_float: Iterable[_KeepFloat],
) -> tuple[QuantConfig | None, str]:
    """The config that the patterns pick for the layer ``name``, or None and why not; the
    config pattern that decided is added to ``used``."""
    for pat in exclude:
        if _matches(name, pat):
            return None, f"excluded by pattern {pat!r}"
    kept = _keeps_float(name, keep_float)
    if kept is not None:
        return None, kept
    hits = [pat for pat in include if _matches(name, pat)]
    if not hits:
        return None, f"not matched by include {list(include)}"
    for pat, cfg in pairs:
        if _matches(name, pat):
            used.add(pat)
            if cfg is None:
                return None, f"kept float by pattern {pat!r}"
            return cfg, ""
    return None, "not matched by any config pattern"


def pattern_misses(names: Iterable[str], filters: Iterable[str], config_patterns: Iterable[str],
                   used: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(unmatched, shadowed)`` for a report whose layers are ``names``: the include/exclude
    (``filters``) and config patterns that match none of them, and the config patterns that
    match some but were never applied (not in ``used``: :func:`_select` settled each of their
    layers first). ``"*"`` is never listed."""
    names = list(names)
    config_patterns = tuple(config_patterns)

    def hits(pat: str) -> bool:
        return any(_matches(n, pat) for n in names)

    unmatched = dict.fromkeys(
        p for p in (*filters, *config_patterns) if p != "*" and not hits(p))
    shadowed = dict.fromkeys(
        p for p in config_patterns if p != "*" and p not in used and p not in unmatched)
    return tuple(unmatched), tuple(shadowed)


def strict_refusal(refusals: list[str]) -> LinquantError:
    """The error of strict mode for the layers that would need a group size fallback."""
    return LinquantError(
        f"strict=True: {len(refusals)} layer(s) need a group size fallback: "
        + "; ".join(refusals)
        + ". Exclude them, pick a group size that divides their rows, or pass strict=False "
          "(on the command line: leave out --strict)"
    )


def _group_fallback(name: str, scheme: QuantScheme, n: int, what: str,
                    refusals: list[str] | None) -> tuple[QuantScheme, str]:
    """``scheme`` with a group size that divides rows of length ``n``, and the note saying so
    (recorded in ``refusals`` in strict mode)."""
    if scheme.granularity != "group":
        return scheme, ""
    assert scheme.group_size is not None
    g = scheme.group_size
    if n % g == 0:
        return scheme, ""
    fallback = _largest_divisor_below(n, g)
    if refusals is not None:
        refusals.append(f"{name!r}: group size {g} does not divide {what} {n} "
                        f"(fallback would be {fallback})")
    return scheme.with_(group_size=fallback), (
        f"group size {g} -> {fallback}: {g} does not divide {what} {n}")


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _weight_dtype_reason(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:  # float8: no aminmax, no matmul on the CPU
        return f"weight dtype {dtype}: only fp32, fp16, bf16 and fp64 weights are quantized"
    return f"weight dtype {dtype} is not float"


def _patched_instance(module: nn.Module) -> str | None:
    """Why a layer whose instance overrides its class's behaviour stays float, or None: the
    quantized layer that replaces it would drop the override and compute without it."""
    own = vars(module)
    if "forward" in own:
        return ("its forward is replaced on the instance (an accelerate hook from device_map "
                "or offloading, or a patch), which the quantized layer would not run: quantize "
                "before dispatching the model, or remove the patch")
    if own.get("_compiled_call_impl") is not None:
        return ("compiled in place (module.compile()), which the quantized layer would not "
                "be: quantize first, then compile")
    return None


def _decide(
    name: str,
    module: nn.Module,
    pairs: list[tuple[str, QuantConfig | None]],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    used: set[str],
    refusals: list[str] | None,
    allow_meta: bool = False,
    keep_float: Iterable[_KeepFloat] = (),
) -> tuple[QuantConfig | None, QuantScheme | None, str | None, str]:
    """``(config, effective weight scheme, reason, note)``; reason None means quantize.

    With ``refusals`` (strict mode) a group size fallback is also recorded there.
    ``keep_float``: what the model keeps float (:func:`_kept_float`).
    """
    if _is_quantized_module(module):
        return None, None, (f"already quantized ({type(module).__name__}, "
                            f"{getattr(module, 'scheme', '?')})"), ""
    config, why = _select(name, pairs, include, exclude, used, keep_float)
    if config is None:
        return None, None, why, ""
    from linquant.nn import quant_module_for

    cls = (quant_module_for(module, "w8a8") if config.is_w8a8 else None) or quant_module_for(
        module, "weight_only")
    if cls is None:
        return None, None, f"unsupported type {type(module).__name__}", ""
    if name == "":
        return None, None, "the root module cannot be replaced in place (wrap it)", ""
    refusal = cls.cannot_convert(module) or _patched_instance(module)
    if refusal is not None:
        return None, None, refusal, ""
    w = _weight(module)
    if w is None:
        return None, None, f"{type(module).__name__} has no weight tensor", ""
    if isinstance(w, nn.parameter.UninitializedParameter) or (w.is_meta and not allow_meta):
        return None, None, "weight not materialized (lazy or meta)", ""
    if w.dtype not in _WEIGHT_DTYPES:
        return None, None, _weight_dtype_reason(w.dtype), ""
    if w.numel() == 0:
        return None, None, f"empty weight (shape {tuple(w.shape)}): nothing to quantize", ""
    note = ""
    if config.is_w8a8 and not _uses_w8a8(module, config):
        note = f"weight-only: no int8-activation layer for {type(module).__name__}"
    scheme, fell_back = _group_fallback(name, config.weight, *_row_length(module), refusals)
    return config, scheme, None, fell_back or note


def _decide_experts(
    name: str,
    module: nn.Module,
    part: str,
    pairs: list[tuple[str, QuantConfig | None]],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    used: set[str],
    refusals: list[str] | None,
    allow_meta: bool,
    keep_float: Iterable[_KeepFloat],
) -> tuple[QuantConfig | None, QuantScheme | None, str | None, str]:
    """:func:`_decide` for the projection ``part`` of an experts module (``name`` is the
    projection's: ``...experts.gate_up_proj``)."""
    from linquant.nn.experts import (
        QuantExperts,
        QuantExpertsProj,
        experts_dims,
        experts_transposed,
    )

    config, why = _select(name, pairs, include, exclude, used, keep_float)
    if config is None:
        return None, None, why, ""
    refusal = QuantExperts.cannot_convert(module) or (
        None if isinstance(module, QuantExperts) else _patched_instance(module))
    if refusal is not None:
        return None, None, refusal, ""
    w = module._parameters[part]
    assert w is not None
    if isinstance(w, nn.parameter.UninitializedParameter) or (w.is_meta and not allow_meta):
        return None, None, "weight not materialized (lazy or meta)", ""
    if w.dtype not in _WEIGHT_DTYPES:
        return None, None, _weight_dtype_reason(w.dtype), ""
    if w.numel() == 0:
        return None, None, f"empty weight (shape {tuple(w.shape)}): nothing to quantize", ""
    e, out, k = experts_dims(w.shape, experts_transposed(module))
    scheme, note = _group_fallback(name, config.weight, k, "in_features", refusals)
    refusal = QuantExpertsProj.cannot_quantize((e, out, k), scheme)
    if refusal is not None:
        return None, None, refusal, ""
    return config, scheme, None, note


def experts_activation(config: QuantConfig) -> tuple[Literal["dynamic", "static"] | None, bool]:
    """What an experts projection quantized under ``config`` does with its activations, and
    whether symmetrically: ``("dynamic", True)`` or ``("static", sym)`` under a W8A8 config,
    ``(None, True)`` (weight-only) otherwise."""
    if config.activation is None:
        return None, True
    return config.activation_mode, config.activation.symmetric


def _experts_parts(module: nn.Module) -> list[str] | None:
    """The float projections of an experts module (a float one, or a :class:`QuantExperts`
    with projections left float); None for any other module."""
    from linquant.nn.experts import QuantExperts, is_hf_experts, projection_names

    if isinstance(module, QuantExperts):
        return [p for p in projection_names(module)
                if isinstance(module._parameters.get(p), torch.Tensor)]
    return list(projection_names(module)) if is_hf_experts(module) else None


def _uses_w8a8(module: nn.Module, config: QuantConfig) -> bool:
    """Whether ``module`` becomes an int8-activation layer under ``config``."""
    from linquant.nn import quant_module_for

    return config.is_w8a8 and quant_module_for(module, "w8a8") is not None


def scheme_text(config: QuantConfig, scheme: QuantScheme, int8_activations: bool) -> str:
    """The report's scheme column for a layer quantized under ``config``: the whole config for a
    layer with int8 activations, else the weight scheme it got (after any group size fallback)
    and the compute dtype."""
    if int8_activations:
        return str(config)
    return str(QuantConfig(scheme, compute_dtype=config.compute_dtype))  # weight-only


def _build(name: str, module: nn.Module, config: QuantConfig, scheme: QuantScheme) -> nn.Module:
    from linquant.nn import quant_module_for

    if _uses_w8a8(module, config):
        assert config.activation is not None
        w8a8: Any = quant_module_for(module, "w8a8")
        new: nn.Module = w8a8.from_float(
            module, activation=config.activation_mode,
            act_symmetric=config.activation.symmetric, name=name,
        )
    else:
        weight_only: Any = quant_module_for(module, "weight_only")
        new = weight_only.from_float(module, scheme, name=name)
    keep_bias(module, new)
    return new


def _float_like(weight: torch.Tensor, shape: torch.Size, transposed: bool) -> torch.Tensor:
    """The float weight in the layout of the quantized weight ``[out, in]``: ``transposed`` for
    a Conv1D's ``[in, out]`` weight (decided by the module, never by the shapes: a square
    Conv1D weight has the quantized weight's shape, stored the other way round), reshaped for
    a convolution's."""
    if transposed:
        return weight.t()
    return weight if weight.shape == shape else weight.reshape(shape)


def _qweight(module: nn.Module) -> QuantizedTensor | None:
    q = getattr(module, "qweight", None)
    return q if isinstance(q, QuantizedTensor) else None


@dataclass
class ModelPlan:
    """The decisions of :func:`plan_model`: one :class:`_Plan` per module object, in order."""

    plans: dict[object, _Plan]
    parents: dict[str, nn.Module]
    tied: set[int]
    compute_dtype: torch.dtype | None
    used: set[str]  # the config patterns that decided a layer
    filters: tuple[str, ...]  # include and exclude patterns
    config_patterns: tuple[str, ...]  # the config dict's patterns, in order


def plan_model(
    model: nn.Module,
    config: ModelConfig,
    *,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] = (),
    strict: bool = False,
    allow_meta: bool = False,
) -> ModelPlan:
    """Decide, without changing anything, what :func:`quantize_model` does to each layer.

    With ``allow_meta`` the model may live on the meta device (``linquant quantize`` plans a
    checkpoint on disk this way, from the model built from its config).
    """
    pairs = _normalize_config(config)
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")
    prefix = st_prefix(model)
    if prefix:  # a SentenceTransformer: its layers also answer to the checkpoint's names
        def alias(p: str) -> str:  # ("encoder.layer.0.*", as linquant quantize takes them;
            bare = _ST_INNER.sub("", p)  # "0.auto_model." of older sentence-transformers too)
            return p if p == "*" else with_alts(p, prefix + bare)

        pairs = [(alias(p), c) for p, c in pairs]
        inc, exc = tuple(alias(p) for p in inc), tuple(alias(p) for p in exc)
    used: set[str] = set()

    plans: dict[object, _Plan] = {}
    parents: dict[str, nn.Module] = {}
    refusals: list[str] | None = [] if strict else None
    keep_float = _kept_float(model)
    for name, module in model.named_modules(remove_duplicate=False):
        for cname in module._modules:  # not named_children(): it hides repeated children
            parents[f"{name}.{cname}" if name else cname] = module
        parts = _experts_parts(module)
        if parts is not None:  # an experts module: one layer per 3-D projection
            for part in parts:
                pname = f"{name}.{part}" if name else part
                decision = _decide_experts(pname, module, part, pairs, inc, exc, used,
                                           refusals, allow_meta, keep_float) if name else (
                    None, None, "the root module cannot be replaced in place (wrap it)", "")
                _add_plan(plans, (id(module), part), pname, module, decision, part)
            continue
        if not any(True for _ in module.parameters(recurse=False)) and not (
            _is_quantized_module(module) and name
        ) and not isinstance(module._buffers.get("weight"), torch.Tensor):  # a frozen weight
            continue
        decision = _decide(name, module, pairs, inc, exc, used, refusals, allow_meta, keep_float)
        _add_plan(plans, id(module), name, module, decision)
    if refusals:
        raise strict_refusal(refusals)
    tied = _resolve_ties(list(plans.values()))
    compute_dtype = compute_dtype_of(
        p.config for p in plans.values() if p.reason is None and p.config is not None)
    return ModelPlan(plans, parents, tied, compute_dtype, used, (*inc, *exc),
                     tuple(pat for pat, _ in pairs))


def _add_plan(plans: dict[object, _Plan], key: object, name: str, module: nn.Module,
              decision: tuple[QuantConfig | None, QuantScheme | None, str | None, str],
              part: str = "") -> None:
    """Record ``decision`` for the layer ``name``; a module object met again under another name
    joins the first plan, or stays float when the two names are selected differently."""
    plan = plans.get(key)
    if plan is None:
        plans[key] = _Plan([name], module, *decision, part=part)
        return
    plan.names.append(name)
    if (plan.config, plan.scheme, plan.reason) != decision[:3]:
        plan.config, plan.scheme = None, None
        plan.reason = (f"one module object at {plan.names[0]!r} and {name!r}, which are "
                       "selected differently")


# ---- the walk -----------------------------------------------------------------------------------
def quantize_model(
    model: nn.Module,
    config: ModelConfig,
    *,
    include: str | Iterable[str] = ("*",),
    exclude: str | Iterable[str] = (),
    strict: bool = False,
) -> ModelReport:
    """Quantize ``model`` in place and report every layer.

    Args:
        model: any ``nn.Module``; supported layers (see :func:`linquant.nn.quant_module_for`)
            are replaced by quantized modules.
        config: a preset name (``"w4a16-g32"``, see :mod:`linquant.config`), a
            :class:`QuantConfig`, or a dict ``{name pattern: preset | QuantConfig | None}`` for
            mixed precision (first matching pattern wins; ``None`` or ``"float"`` keeps float).
        include, exclude: shell-style name patterns; a layer is quantized when it matches an
            ``include`` pattern and no ``exclude`` pattern (a pattern also matches descendants).
        strict: raise :class:`LinquantError` (before changing anything) when a group size does
            not divide a layer's row, instead of using a smaller group size.

    Returns:
        A :class:`ModelReport`: every layer with its scheme, bits/weight, bytes before/after and
        weight SQNR, or the reason it stayed float; whole-model bytes before and after.

    For ``w8a8-static`` the linear layers need calibration before use::

        quantize_model(model, "w8a8-static")
        with linquant.calibrate.calibrate(model):
            model(sample_batch)
    """
    if not isinstance(model, nn.Module):
        raise LinquantError(f"quantize_model needs an nn.Module, got {type(model).__name__}")
    from linquant.nn.experts import QuantExperts, is_hf_experts

    mplan = plan_model(model, config, include=include, exclude=exclude, strict=strict)
    plans, parents, tied = mplan.plans, mplan.parents, mplan.tied
    compute_dtype = mplan.compute_dtype
    refs = plain_references(model)
    _check_finite_weights(plans)  # before anything changes: a NaN found mid-walk would leave
    # the model half quantized, its float layers already dropped

    # 2. Apply, layer by layer, dropping each float module as soon as it is replaced.
    report = ModelReport(bytes_before=model_nbytes(model), compute_dtype=compute_dtype)
    shared: dict[int, tuple[str, nn.Module]] = {}  # id(tied float weight) -> first quantized
    done: list[str] = []
    wrappers: dict[int, nn.Module] = {}  # id(float experts module) -> its QuantExperts
    for plan in plans.values():
        module = plan.module
        assert module is not None
        name = plan.names[0]
        w = _plan_weight(plan)
        before = _experts_part_nbytes(module, plan.part) if plan.part else _own_nbytes(module)
        qweight = _qweight(module) if _is_quantized_module(module) else None
        shape = tuple(qweight.shape) if qweight is not None else (
            () if w is None or isinstance(w, _UNINITIALIZED)
            else tuple(w.shape))
        row = LayerReport(name, type(module).__name__ if qweight is not None else
                          _type_name(module), shape, before, before, reason=plan.reason,
                          note=plan.note)
        if len(plan.names) > 1:
            row.note = _join(row.note, "also at " + ", ".join(plan.names[1:]))
        report.layers.append(row)
        if plan.reason is not None:
            plan.module = None
            continue
        assert plan.config is not None and plan.scheme is not None and w is not None
        try:
            if plan.part:
                _quantize_experts_part(model, parents, plan, row, wrappers, refs)
                plan.module = None
                done.append(name)
                continue
            new = _build(name, module, plan.config, plan.scheme)
        except LinquantError as e:
            if done:
                raise LinquantError(
                    f"{e} (model partly quantized: {len(done)} layer(s) before {name!r} were "
                    "already replaced)"
                ) from e
            raise
        qw = _qweight(new)
        if qw is not None:
            row.bits_per_weight = qw.bits_per_weight
            row.sqnr_db = sqnr(_float_like(w, qw.shape, _is_conv1d(module)),
                               qw.dequantize(torch.float32))
        partner = shared.get(id(w)) if id(w) in tied else None
        if partner is not None:
            if _share_buffers(partner[1], new):
                row.tied_to = partner[0]
                row.note = _join(row.note, f"tied to {partner[0]} (weight stored once)")
            else:
                row.note = _join(row.note, f"tied to {partner[0]} in float but stored twice: "
                                 "the quantized buffers differ")
        elif id(w) in tied:
            shared[id(w)] = (name, new)
        row.scheme = scheme_text(plan.config, plan.scheme, _uses_w8a8(module, plan.config))
        row.bytes_after = _own_nbytes(new)
        for n in plan.names:
            _set_submodule(model, parents, n, new, refs)
        plan.module = None
        done.append(name)
        del module, w, new
    plans.clear()
    shared.clear()
    wrappers.clear()
    if compute_dtype is not None:
        _cast(model, compute_dtype)
    # each row's bytes again, as the model now holds them: a kept-float norm and a quantized
    # layer's bias after the cast, an experts projection with the bias its wrapper took
    for row in report.layers:
        parent_name, _, part = row.name.rpartition(".")
        parent = find_module(model, parent_name)
        if parent is not None and (isinstance(parent, QuantExperts) or is_hf_experts(parent)) \
                and (part in parent._modules or part in parent._parameters):
            row.bytes_after = _experts_part_nbytes(parent, part)
        elif (mod := find_module(model, row.name)) is not None:
            row.bytes_after = _own_nbytes(mod)
    report.bytes_after = model_nbytes(model)
    report.unmatched_patterns, report.shadowed_patterns = pattern_misses(
        (r.name for r in report.layers), mplan.filters, mplan.config_patterns, mplan.used)
    hf.mark_model(model)  # transformers' save_pretrained now refuses, naming linquant.save
    return report


def _plan_weight(plan: _Plan) -> torch.Tensor | None:
    """The float weight ``plan`` quantizes: its experts projection, or its module's weight."""
    assert plan.module is not None
    return plan.module._parameters[plan.part] if plan.part else _weight(plan.module)


def _check_finite_weights(plans: dict[object, _Plan]) -> None:
    """Raise :class:`LinquantError` naming the first planned weight that holds NaN or Inf, or
    whose scales would overflow their storage dtype (fp16 scales of values in the hundreds of
    thousands): a weight whose range could (:func:`~linquant.ops.qparams.may_overflow`) is
    quantized once here to find out."""
    from linquant.ops.qparams import check_finite, may_overflow

    for plan in plans.values():
        if plan.reason is not None or plan.module is None:
            continue
        w = _plan_weight(plan)
        if w is None or w.is_meta:
            continue
        name = plan.names[0]
        lo, hi = check_finite(w.detach(), name if plan.part else f"{name}.weight")
        assert plan.config is not None and plan.scheme is not None
        if plan.part:  # an experts projection: quantized with its plan's scheme
            if may_overflow(lo, hi, plan.scheme):
                _experts_projection(plan, w)  # raises if it does overflow
            continue
        scheme = W8A8_WEIGHT if _uses_w8a8(plan.module, plan.config) else plan.scheme
        if may_overflow(lo, hi, scheme):
            _build(name, plan.module, plan.config, plan.scheme)  # raises if it does overflow


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, except where ``from_pretrained(..., dtype=dtype)`` gives a
    transformers model's float tensors another dtype (:func:`linquant.io.hf.loaded_dtypes`):
    the stored tensors it loads in fp32 (``_keep_in_fp32_modules(_strict)``: a MoE router's
    weight, which the model's forward multiplies in fp32) stay fp32; the buffers it does not
    persist get the dtype it builds them in (a rotary ``inv_freq`` fp32), unless that would
    only widen a 16-bit buffer (:func:`linquant.io.hf.follow_loaded_dtypes`). Other buffers
    outside transformers models keep their dtype."""
    wanted = hf.loaded_dtypes(model, dtype)
    kept = hf.unpersisted_float_buffers(model)
    stored: list[tuple[nn.Module, str, torch.Tensor, torch.dtype]] = []
    for prefix, m in model.named_modules():
        for n, t in [*m._parameters.items(), *m._buffers.items()]:
            want = wanted.get(f"{prefix}.{n}" if prefix else n)
            if t is not None and t.is_floating_point() and want not in (None, dtype) and \
                    n not in m._non_persistent_buffers_set:
                stored.append((m, n, t.detach(), want))
    model.to(dtype)
    for m, n, before, want in stored:
        param = m._parameters.get(n)
        if param is not None:
            param.data = before.to(want)  # the same Parameter: ties and optimizers keep it
        else:
            m._buffers[n] = before.to(want)
    hf.follow_loaded_dtypes(model, dtype, kept, wanted)


def _type_name(module: nn.Module) -> str:
    """A layer's type for the report: an experts module's float class even once wrapped."""
    float_class = getattr(module, "float_class", None)
    return float_class.__name__ if isinstance(float_class, type) else type(module).__name__


def _experts_part_nbytes(module: nn.Module, part: str) -> int:
    """Bytes of one projection of an experts module (float or quantized) and its bias."""
    tensors: list[torch.Tensor] = []
    proj = module._modules.get(part)
    if proj is not None:
        tensors += _tensors(proj)
    else:
        w = module._parameters.get(part)
        if w is not None:
            tensors.append(w)
    bias = module._parameters.get(f"{part}_bias")
    if bias is not None:
        tensors.append(bias)
    return sum(t.numel() * t.element_size() for t in tensors)


def _experts_projection(plan: _Plan, w: torch.Tensor) -> QuantExpertsProj:
    """The :class:`~linquant.nn.experts.QuantExpertsProj` of ``plan``'s projection ``w``."""
    from linquant.nn.experts import QuantExpertsProj, experts_transposed

    assert plan.module is not None and plan.config is not None and plan.scheme is not None
    activation, act_symmetric = experts_activation(plan.config)
    return QuantExpertsProj.from_float(w, plan.scheme, transposed=experts_transposed(plan.module),
                                       activation=activation, act_symmetric=act_symmetric,
                                       name=plan.names[0])


def _quantize_experts_part(model: nn.Module, parents: Mapping[str, nn.Module], plan: _Plan,
                           row: LayerReport, wrappers: dict[int, nn.Module],
                           refs: PlainRefs) -> None:
    """Quantize one projection of an experts module: the module is replaced by its
    :class:`~linquant.nn.experts.QuantExperts` (once), which then takes the projection."""
    from linquant.nn.experts import QuantExperts, expert_rows, experts_transposed

    module, part = plan.module, plan.part
    assert module is not None and plan.config is not None and plan.scheme is not None
    w = module._parameters[part]
    assert w is not None
    transposed = experts_transposed(module)
    new = _experts_projection(plan, w)
    qw = new.qweight
    row.bits_per_weight = qw.bits_per_weight
    row.sqnr_db = sqnr(expert_rows(w.detach(), transposed), qw.dequantize(torch.float32))
    row.scheme = scheme_text(plan.config, plan.scheme, plan.config.is_w8a8)
    wrapper = wrappers.get(id(module))
    if wrapper is None:
        wrapper = module if isinstance(module, QuantExperts) else QuantExperts.wrap(module)
        wrappers[id(module)] = wrapper
        for n in plan.names:
            _set_submodule(model, parents, n.rsplit(".", 1)[0], wrapper, refs)
    assert isinstance(wrapper, QuantExperts)
    wrapper.set_projection(part, new)
    row.bytes_after = _experts_part_nbytes(wrapper, part)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


def _set_submodule(model: nn.Module, parents: Mapping[str, nn.Module], name: str,
                   new: nn.Module, refs: PlainRefs) -> None:
    """``new`` in place of the child ``name``, also in the plain lists / tuples / dicts that
    hold the old one (``refs``: :func:`linquant.nn.base.plain_references`)."""
    parent = parents[name]
    attr = name.rsplit(".", 1)[-1]
    old = parent._modules.get(attr)
    setattr(parent, attr, new)
    if old is not None and old is not new:
        carry_hooks(old, new)
        replace_plain_references(refs, old, new)


def _resolve_ties(plans: list[_Plan]) -> set[int]:
    """Keep tied float parameters tied: all their modules get the same weight scheme, or none
    is quantized (repeated until nothing changes, since one module can be in several ties).

    Returns the ids of the tied weights that will be quantized (their modules share buffers).
    """
    by_param: dict[int, list[_Plan]] = {}
    for plan in plans:
        for t in _tie_keys(plan):
            by_param.setdefault(id(t), []).append(plan)
    groups = {pid: group for pid, group in by_param.items() if len(group) > 1}
    changed = True
    while changed:
        changed = False
        for pid, group in groups.items():
            why = _tie_conflict(pid, group)
            if why is None:
                continue
            names = [g.names[0] for g in group]
            what = "weight" if all(
                g.module is not None and id(_weight(g.module)) == pid for g in group
            ) else "parameter"
            for g in group:
                if g.reason is None:
                    g.config, g.scheme = None, None
                    others = ", ".join(repr(n) for n in names if n != g.names[0])
                    g.reason = f"tied {what} shared with {others}; {why}"
                    changed = True
    return {pid for pid, group in groups.items() if all(g.reason is None for g in group)}


def _tie_keys(plan: _Plan) -> list[torch.Tensor]:
    """The tensors of ``plan``'s layer that tie it to the layers sharing them: its parameters
    and a weight held as a buffer, but not the bias of a layer linquant quantizes, which the
    quantized layer keeps (:func:`linquant.nn.base.keep_bias`)."""
    from linquant.nn import quant_module_for

    module = plan.module
    assert module is not None
    if plan.part:
        w = module._parameters[plan.part]
        assert w is not None
        return [w]
    supported = quant_module_for(module, "weight_only") is not None
    keys: list[torch.Tensor] = [p for n, p in module._parameters.items()
                                if p is not None and not (n == "bias" and supported)]
    weight = _weight(module)
    if weight is not None and not any(weight is k for k in keys):
        keys.append(weight)
    return keys


def _tie_conflict(pid: int, group: list[_Plan]) -> str | None:
    """Why the modules sharing parameter ``pid`` cannot be quantized together, or None."""
    floats = [g for g in group if g.reason is not None]
    if len(floats) == len(group):
        return None
    if floats:
        return f"{floats[0].names[0]!r} stays float ({floats[0].reason})"
    weights = [_weight(g.module) if g.module is not None else None for g in group]
    if any(w is None or id(w) != pid for w in weights):
        return "the shared parameter is not the weight of each (kept float to stay tied)"
    schemes = {str(g.scheme) for g in group}
    if len(schemes) > 1:
        return f"they get different weight schemes ({', '.join(sorted(schemes))})"
    if len({_layout(g) for g in group}) > 1:
        return "their quantized weights have different layouts"
    return None


def _layout(plan: _Plan) -> str:
    """Modules whose quantized weights can share buffers: same stored shape and kernel type."""
    assert plan.module is not None
    w = _weight(plan.module)
    shape = tuple(w.shape) if w is not None else ()
    if _is_conv1d(plan.module):
        shape = shape[::-1]
    w8a8 = plan.config is not None and _uses_w8a8(plan.module, plan.config)
    if w8a8 and plan.scheme == W8A8_WEIGHT:
        w8a8 = False  # W8A8Linear's int8 [N, K] codes are the int8-sym-ch0 byte stream
    return f"{shape}{'-w8a8' if w8a8 else ''}"


def _share_buffers(first: nn.Module, second: nn.Module) -> bool:
    """Point ``second``'s weight buffers at ``first``'s; False (nothing changed) if they differ.

    They hold the same values when both come from one float weight with one scheme and layout
    (checked in planning); the comparison guards against a module type that stores differently.
    Buffers holding the same bytes under another dtype of the same width or another shape (an
    embedding's uint8 code stream, a W8A8Linear's int8 ``[N, K]`` codes) are shared as views.
    """
    src = dict(first.named_buffers(recurse=False))
    mine = {k: v for k, v in second.named_buffers(recurse=False) if k.startswith("weight")}
    if not mine:
        return False
    for bname, buf in mine.items():
        other = src.get(bname)
        if (other is None or other.numel() != buf.numel()
                or other.element_size() != buf.element_size()
                or other.is_floating_point() != buf.is_floating_point()
                or not other.is_contiguous() or not buf.is_contiguous()):
            return False
        if not torch.equal(_as_bytes(other), _as_bytes(buf)):
            return False
    for bname, buf in mine.items():
        other = src[bname]
        with torch.inference_mode(False):  # a view made under inference_mode would be an
            second._buffers[bname] = other if (other.dtype == buf.dtype  # inference tensor
                                               and other.shape == buf.shape) else (
                other.view(buf.dtype).view(buf.shape))
    return True


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)
