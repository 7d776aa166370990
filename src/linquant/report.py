"""Reports: aligned plain-text tables, CSV and JSON files (written atomically), plots.

Rows are plain dicts; a table is described by ``(key, header, fmt)`` columns, where ``fmt`` is
a :func:`format` spec (``".2f"``, ``"d"``, ``""``) or a callable ``value -> str``. Missing or
``None`` values print as ``-``; numbers are right-aligned, text left-aligned::

    >>> print(format_table([{"name": "a", "db": 31.234}, {"name": "bb", "db": None}],
    ...                    [("name", "layer", ""), ("db", "SQNR dB", ".1f")]))
    layer  SQNR dB
    -----  -------
    a         31.2
    bb           -

JSON has no infinity: :func:`json_text` writes non-finite floats as the strings ``"inf"``,
``"-inf"`` and ``"nan"`` (an exactly reconstructed tensor has an SQNR of ``inf``).

matplotlib is optional (``pip install 'linquant[plot]'``) and imported only inside
:func:`plot_sweep` and :func:`plot_layers`, which draw with the Agg canvas and never touch
pyplot's global state.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from linquant.errors import LinquantError
from linquant.io.atomic import atomic_write

if TYPE_CHECKING:
    from linquant.convert import ModelReport
    from linquant.layer_errors import LayerErrors
    from linquant.sweep import SweepResult

__all__ = [
    "csv_text",
    "format_table",
    "json_text",
    "plot_format",
    "plot_layer_errors",
    "plot_layers",
    "plot_sweep",
    "require_matplotlib",
    "write_csv",
    "write_json",
]

Formatter: TypeAlias = str | Callable[[Any], str]
Column: TypeAlias = tuple[str, str, Formatter]


def _cell(value: Any, fmt: Formatter) -> str:
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan" whatever the spec
    return format(value, fmt)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """An aligned plain-text table: a header line, a dashed rule, one line per row.

    A column is right-aligned when every non-missing value in it is a number.
    """
    headers = [header for _, header, _ in columns]
    cells = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    right = [
        all(_is_number(row.get(key)) for row in rows if row.get(key) is not None)
        for key, _, _ in columns
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        cols = zip(values, widths, right, strict=True)
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in cols]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


# ---- CSV and JSON ------------------------------------------------------------------------------


def csv_text(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """CSV with a header line of ``fields``; missing values are empty, floats in full precision."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], fields: Sequence[str]
) -> None:
    """Write :func:`csv_text` to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(csv_text(rows, fields))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON (non-finite floats as strings), indented, ending in a newline."""
    return json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write :func:`json_text` to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json_text(obj))


# ---- plots -------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Raise a :class:`LinquantError` with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LinquantError(
            "plotting needs matplotlib, which is not installed: pip install 'linquant[plot]'"
        ) from None


def plot_format(path: str | os.PathLike[str]) -> str:
    """The image format for ``path`` from its suffix (``png`` when it has none); raises a
    :class:`LinquantError` for a suffix matplotlib cannot write, or when matplotlib is missing."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dest = Path(path)
    fmt = dest.suffix.lower().lstrip(".") or "png"
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if fmt not in supported:
        raise LinquantError(
            f"{dest}: cannot plot to a .{fmt} file; use one of "
            + ", ".join("." + k for k in sorted(supported))
        )
    return fmt


_GRAN_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_MODE_STYLES = {"sym": ("-", "o"), "asym": ("--", "s"), "asymf": (":", "^")}


def plot_sweep(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Plot mean SQNR (dB) against bits per weight, one line per mode + granularity (+ clip).

    Colour is the granularity, line style and marker the mode; each point is labelled with its
    code width. Points without a finite value (nothing quantized, exact reconstruction) are
    left out. The image format follows the suffix of ``path`` (``.png`` unless another one
    matplotlib knows); the file is written to a temp file and renamed into place.
    """
    dest = Path(path)
    fmt = plot_format(dest)  # checks matplotlib is there first
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[tuple[str, str, str], list[tuple[float, float, int]]] = {}
    for row in result.rows:
        bpw, db = row.bits_per_weight, row.mean_sqnr_db
        if bpw is None or db is None or not math.isfinite(db):
            continue
        key = (row.mode, row.granularity, row.scheme.clip)
        lines.setdefault(key, []).append((bpw, db, row.scheme.bits))
    grans = list(dict.fromkeys(g for _, g, _ in lines))
    clips = {c for _, _, c in lines}
    for (mode, gran, clip), points in lines.items():
        points.sort()
        style, marker = _MODE_STYLES.get(mode, ("-.", "x"))
        label = f"{mode} {gran}" + (f" {clip}" if len(clips) > 1 else "")
        color = _GRAN_COLORS[grans.index(gran) % len(_GRAN_COLORS)]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, linestyle=style, marker=marker, color=color, label=label,
                alpha=0.6 if clip == "mse" else 1.0)
        for x, y, bits in points:
            ax.annotate(str(bits), (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    ax.set_title(f"SQNR against bits per weight: {result.model_name}")
    ax.set_xlabel("bits per weight (codes + scales + zero points)")
    ax.set_ylabel("mean SQNR over weight matrices (dB)")
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=8, ncols=2)
    with atomic_write(dest, "wb") as f:
        fig.savefig(f, format=fmt, dpi=120)


_LABELLED_LAYERS = 48  # up to this many layers, every one is named on the x axis
_WORST_NAMED = 3


def plot_layers(report: ModelReport, path: str | os.PathLike[str], title: str = "") -> None:
    """Plot what quantizing did to each layer of a model (:class:`linquant.ModelReport`).

    Top: the weight SQNR (dB) of each quantized layer in module order, coloured by scheme,
    with the median as a dashed line and the lowest few named; a layer tied to another one is
    drawn hollow (its weight is the other's), an exactly reconstructed one as a triangle on the
    top edge, and every layer kept float as a grey cross on the bottom edge (the reasons are in
    the table). Bottom: each layer's bytes before and after, on a log scale. Layers are named
    on the x axis when there are at most 48 of them, else numbered. The image format follows
    the suffix of ``path``; the file is written to a temp file and renamed into place.
    """
    dest = Path(path)
    fmt = plot_format(dest)  # checks matplotlib is there first
    fig = _layers_figure(report, title)
    with atomic_write(dest, "wb") as f:
        fig.savefig(f, format=fmt, dpi=120)


@dataclass(frozen=True)
class _Point:
    """One layer on a per-layer SQNR axis: ``missing`` draws it as a grey cross on the bottom
    edge (kept float, not compared), ``db`` inf as a triangle on the top edge (exact)."""

    name: str
    scheme: str
    db: float | None
    hollow: bool = False  # a tied layer: its weight is another layer's
    missing: bool = False


def _draw_sqnr(ax: Any, points: Sequence[_Point], ylabel: str, missing: str,
               context: Sequence[float | None] = (), context_label: str = "") -> None:
    """Each point's SQNR in order on ``ax``, coloured by scheme, with the median dashed and
    the lowest few named; ``missing`` labels the points without a value. ``context``: one more
    value per point (None: none), drawn as grey dashes labelled ``context_label``."""
    n = len(points)
    scored = [(i, p.db, p) for i, p in enumerate(points)
              if not p.missing and p.db is not None and math.isfinite(p.db)]
    finite = [db for _, db, _ in scored]
    extra = [(i, v) for i, v in enumerate(context) if v is not None and math.isfinite(v)]
    lo = min(finite + [v for _, v in extra], default=0.0)
    hi = max(finite + [v for _, v in extra], default=1.0)
    pad = max(1.0, 0.08 * (hi - lo))
    floor, ceiling = lo - pad, hi + pad
    schemes = list(dict.fromkeys(p.scheme for p in points if not p.missing))
    for k, scheme in enumerate(schemes):
        color = _GRAN_COLORS[k % len(_GRAN_COLORS)]
        own = [(i, db) for i, db, p in scored if p.scheme == scheme and not p.hollow]
        tied = [(i, db) for i, db, p in scored if p.scheme == scheme and p.hollow]
        exact = [i for i, p in enumerate(points)
                 if not p.missing and p.scheme == scheme and p.db == math.inf]
        ax.scatter([i for i, _ in own], [d for _, d in own], color=color, s=22,
                   label=scheme or "quantized", zorder=3)
        if tied:
            ax.scatter([i for i, _ in tied], [d for _, d in tied], facecolors="none",
                       edgecolors=color, s=22, zorder=3)
        if exact:
            ax.scatter(exact, [ceiling] * len(exact), marker="^", color=color, s=28, zorder=3,
                       clip_on=False)
    if extra:
        ax.scatter([i for i, _ in extra], [v for _, v in extra], marker="_", color="tab:gray",
                   s=60, zorder=2, label=context_label)
    kept = [i for i, p in enumerate(points) if p.missing]
    if kept:
        ax.scatter(kept, [floor] * len(kept), marker="x", color="tab:gray", s=22, zorder=3,
                   clip_on=False, label=f"{missing} ({len(kept)})")
    if finite:
        median = sorted(finite)[len(finite) // 2]
        ax.axhline(median, color="black", linestyle="--", linewidth=0.8, alpha=0.6,
                   label=f"median {median:.1f} dB")
        worst = sorted((db, i, p.name) for i, db, p in scored)[:_WORST_NAMED]
        for db, i, name in worst:  # right of the point, or left of it in the right half
            left = i > n / 2
            ax.annotate(name, (i, db), textcoords="offset points", xytext=(-5 if left else 5, -3),
                        ha="right" if left else "left", fontsize=7)
    ax.set_ylim(floor, ceiling)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if schemes or kept or extra:
        ax.legend(fontsize=8, loc="best")


def _layer_ticks(ax: Any, names: Sequence[str]) -> None:
    if len(names) <= _LABELLED_LAYERS:
        ax.set_xticks(list(range(len(names))), list(names), rotation=90, fontsize=7)
    else:
        ax.set_xlabel("layer (module order)")


def _layers_figure(report: ModelReport, title: str) -> Any:
    """The matplotlib Figure of :func:`plot_layers` (axes: SQNR on top, bytes below)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = report.layers
    n = len(layers)
    fig = Figure(figsize=(min(20.0, max(8.0, 0.22 * n + 3)), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _draw_sqnr(top, [_Point(r.name, r.scheme or "", r.sqnr_db, r.tied_to is not None,
                            not r.quantized) for r in layers],
               "weight SQNR (dB)", "kept float")
    top.set_title(title or f"per-layer report: {len(report.quantized)} of {n} layers "
                  f"quantized, {report.ratio:.2f}x smaller")
    xs = list(range(n))
    before = [max(r.bytes_before, 1) for r in layers]
    after = [max(r.bytes_after, 1) for r in layers]
    bottom.bar(xs, before, width=0.8, color="tab:gray", alpha=0.35, label="before")
    bottom.bar(xs, after, width=0.5, color="tab:blue", label="after")
    bottom.set_yscale("log")
    bottom.set_ylabel("bytes")
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.legend(fontsize=8, loc="best")
    _layer_ticks(bottom, [r.name for r in layers])
    return fig


def plot_layer_errors(errors: LayerErrors, path: str | os.PathLike[str], title: str = "") -> None:
    """Plot :func:`linquant.compare_layers`' rows: each layer's output SQNR (dB) in module
    order, coloured by scheme, with the median dashed and the lowest few named, and its weight
    SQNR as a grey dash; a layer not compared is a grey cross on the bottom edge, an exact one
    a triangle on the top edge. The
    image format follows the suffix of ``path``; the file is written to a temp file and renamed
    into place."""
    dest = Path(path)
    fmt = plot_format(dest)  # checks matplotlib is there first
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = errors.rows
    fig = Figure(figsize=(min(20.0, max(8.0, 0.22 * len(rows) + 3)), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw_sqnr(ax, [_Point(r.name, r.scheme, r.sqnr_db, missing=r.sqnr_db is None) for r in rows],
               "output SQNR on the float layer's input (dB)", "not compared",
               [r.weight_sqnr_db for r in rows], "weight SQNR")
    _layer_ticks(ax, [r.name for r in rows])
    ax.set_title(title or f"per-layer output error: {len(rows)} quantized layers")
    with atomic_write(dest, "wb") as f:
        fig.savefig(f, format=fmt, dpi=120)
