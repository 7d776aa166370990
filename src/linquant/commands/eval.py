"""``linquant eval REFERENCE QUANTIZED``: run both models on the same inputs, compare outputs.

* sentence-embedding models (a sentence-transformers folder): cosine similarity of embeddings;
* causal language models (``*ForCausalLM`` / ``*LMHeadModel``) and encoder-decoder language
  models (``*ForConditionalGeneration`` with ``is_encoder_decoder``: T5, BART; the text is both
  the encoder's input and the decoder's target): perplexity of both and the difference, and
  how far the quantized model's next-token distributions moved from the reference's: the KL
  divergence ``KL(reference || quantized)`` per scored token (mean and max) and how often both
  rank the same token first;
* any other transformers model: SQNR of its first output (``last_hidden_state``, or
  ``logits`` for a model with a head), both models built as the quantized folder's class; an
  encoder-decoder model (T5, BART) gets the same text, shifted right, as its decoder input.

Inputs default to the bundled sentences (``linquant/data/sentences.txt``). With
``--per-layer`` each quantized layer is also measured on the input its float counterpart gets
(:func:`linquant.layer_errors.compare_layers`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linquant.commands import add_text_arguments, check_output_file
from linquant.errors import LinquantError

__all__ = ["add_arguments", "compare_outputs", "evaluate", "load_model", "model_inputs",
           "model_kind", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", type=Path, metavar="REFERENCE",
                   help="the float model folder (Hugging Face / sentence-transformers)")
    p.add_argument("quantized", type=Path, metavar="QUANTIZED",
                   help="the quantized folder (linquant quantize / lq.save)")
    add_text_arguments(p)
    p.add_argument("--per-layer", action="store_true",
                   help="also measure each quantized layer on the input its float layer gets "
                        "(output SQNR and max error per layer; the lowest named last)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="draw the per-layer output SQNR (implies --per-layer; needs "
                        "matplotlib: pip install 'linquant[plot]')")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _is_linquant(folder: Path) -> bool:
    """Whether ``folder`` holds a linquant checkpoint: a ``.safetensors`` file in it says so in
    its header (a damaged file, or a missing shard, still leaves the folder linquant's, for
    :func:`linquant.load` to name what is wrong)."""
    from linquant.io.checkpoint import raw_header
    from linquant.io.format import FORMAT_NAME

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]:
        try:
            meta = raw_header(file)[0].get("__metadata__")
        except LinquantError:
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME:
            return True
    return False


# config.json sizes that two folders of the same model share; eval refuses to compare folders
# that differ in one (building the reference as the other's class once took 24 GB: a GPT-2
# folder read as LlamaConfig's defaults)
_SIZE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
              "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "n_embd", "n_layer", "n_head", "n_inner", "d_model", "d_ff", "d_kv", "num_layers",
              "num_decoder_layers", "encoder_layers", "decoder_layers", "n_positions",
              "max_position_embeddings", "type_vocab_size")


def _check_same_model(reference: Path, quantized: Path) -> None:
    """Refuse folders whose ``config.json`` name different model types or sizes."""
    configs = []
    for folder in (reference, quantized):
        try:
            configs.append(json.loads((folder / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return  # no config to compare (a bare folder): loading says what is wrong
    a, b = configs
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return
    differ = [f"{k} {a[k]!r} / {b[k]!r}" for k in _SIZE_KEYS
              if k in a and k in b and a[k] != b[k]]
    if differ:
        raise LinquantError(f"{reference} and {quantized} are not the same model (config.json: "
                            f"{', '.join(differ[:4])}); compare a quantized folder with the "
                            "float model it was made from")


def model_kind(folder: Path) -> str:
    """What :func:`evaluate` compares for the model in ``folder``: ``sentence-embedding``,
    ``causal-lm``, ``seq2seq-lm`` or ``transformers``."""
    if (folder / "modules.json").is_file():
        return "sentence-embedding"
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
            archs = config.get("architectures") or []
        except (OSError, ValueError, AttributeError) as e:
            raise LinquantError(f"{cfg}: cannot read: {e}") from e
        if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            return "causal-lm"
        if any(str(a).endswith("ForConditionalGeneration") for a in archs) and \
                config.get("is_encoder_decoder"):
            return "seq2seq-lm"
        return "transformers"
    raise LinquantError(f"{folder}: no modules.json or config.json; eval needs a model folder")


def load_model(folder: Path, kind: str, like: nn.Module | None = None) -> nn.Module:
    """The model of ``folder``: a linquant folder through :func:`linquant.load`, a float one
    as ``like`` (the quantized model) is built where that is a transformers model, so both
    sides are the same class (a ``BartForConditionalGeneration`` folder quantized and loaded
    back is compared with the float ``BartForConditionalGeneration``, not a ``BartModel``)."""
    if not folder.is_dir():
        raise LinquantError(f"{folder}: not a folder")
    if _is_linquant(folder):
        from linquant.io.save import load

        return load(folder)
    from linquant.io.hf import no_progress_bars

    with no_progress_bars():
        if kind == "sentence-embedding":
            from sentence_transformers import SentenceTransformer

            model: nn.Module = SentenceTransformer(str(folder), device="cpu")
        else:
            import transformers

            cls: Any = {"causal-lm": transformers.AutoModelForCausalLM,
                        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM}.get(
                kind, transformers.AutoModel)
            if isinstance(like, transformers.PreTrainedModel):
                cls = type(like)
            model = cls.from_pretrained(str(folder))
    return model.eval()


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keyword arguments that run ``model`` on the token ids ``ids``: ``input_ids``, and
    for an encoder-decoder model (T5, BART, ...) the same text as ``decoder_input_ids``,
    shifted right as for training (``labels=ids`` would give them), since T5 does not make
    them itself."""
    kwargs = {"input_ids": ids}
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return kwargs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    shift = getattr(model, "_shift_right", None)  # T5's base model has only this
    try:
        kwargs["decoder_input_ids"] = prepare(labels=ids) if callable(prepare) else \
            shift(ids) if callable(shift) else ids
    except Exception:  # a model's own shift that needs more (a start token it lacks)
        kwargs["decoder_input_ids"] = ids
    return kwargs


def _token_ids(folder: Path, model: nn.Module, texts: list[str]) -> tuple[list[torch.Tensor],
                                                                          str]:
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                 "tokenizer.model")
    if any((folder / f).is_file() for f in tok_files):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise LinquantError(f"{folder}: cannot load the tokenizer: {e}") from e
        ids = [torch.tensor([tok(t)["input_ids"]]) for t in texts]
        return _fit(ids, model, getattr(tok, "model_max_length", None), "tokenizer")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
    ids = [torch.tensor([[b % vocab for b in t.encode("utf-8")]]) for t in texts]
    return _fit(ids, model, None, "UTF-8 bytes (no tokenizer in the folder)")


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
_NO_LIMIT = 1 << 30  # tokenizers without a length limit report about 1e30


def _max_tokens(model: nn.Module, tokenizer_limit: object = None) -> int | None:
    """How many tokens one input may hold: the least of the config's position count
    (``max_position_embeddings``, ``n_positions`` or ``n_ctx``, the first that is set) and
    the tokenizer's ``model_max_length`` (RoBERTa's config counts two positions its inputs
    cannot use); None where neither says."""
    config = getattr(model, "config", None)
    positions = next((v for v in (getattr(config, k, None) for k in _POSITION_KEYS)
                      if isinstance(v, int) and v > 0), None)
    limits = [] if positions is None else [positions]
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _NO_LIMIT:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def _fit(ids: list[torch.Tensor], model: nn.Module, tokenizer_limit: object,
         how: str) -> tuple[list[torch.Tensor], str]:
    """``ids`` cut to :func:`_max_tokens` (a longer input would index past the position
    embeddings); ``how`` then says how many were cut."""
    limit = _max_tokens(model, tokenizer_limit)
    if limit is None:
        return ids, how
    cut = sum(1 for x in ids if x.shape[1] > limit)
    if not cut:
        return ids, how
    return ([x[:, :limit] for x in ids],
            f"{how}; {cut} of {len(ids)} inputs cut to the model's {limit} tokens")


def _run(model: nn.Module, folder: Path, kwargs: dict[str, torch.Tensor]) -> Any:
    """``model(**kwargs)``; a model that takes other inputs than token ids is a LinquantError
    naming ``folder``."""
    try:
        return model(**kwargs)
    except Exception as e:  # a model that takes other inputs (pixels, audio)
        raise LinquantError(
            f"{folder}: running {type(model).__name__} on token ids failed "
            f"({type(e).__name__}: {e}); eval feeds text only: compare a model "
            "that takes other inputs in Python (lq.load, then your inputs through "
            "both models; lq.compare_layers for each layer)") from e


_KL_BLOCK = 256  # tokens whose next-token distributions are compared at once


def _language_model(ref: nn.Module, qm: nn.Module, ids: list[torch.Tensor],
                    reference: Path, quantized: Path) -> dict[str, float]:
    """Perplexity of both models on ``ids`` (each input its own target: the next token of a
    causal model, the decoder's target of an encoder-decoder one; from the logits, as the
    models' own loss computes it) and, over the same scored tokens, the reference's
    next-token distribution against the quantized model's: KL divergence (nats, mean and max
    over tokens) and the share of tokens where both put the same token first."""
    nll_ref = nll_q = kl_sum = kl_max = 0.0
    n = same = 0
    seq2seq = bool(getattr(getattr(ref, "config", None), "is_encoder_decoder", False))
    with torch.inference_mode():
        for x in ids:
            k = x.shape[1] - (0 if seq2seq else 1)  # the tokens the loss scores
            if k < 1:
                continue
            out_r = _run(ref, reference, model_inputs(ref, x))
            out_q = _run(qm, quantized, model_inputs(qm, x))
            # position i predicts token i + 1 (causal) or token i (the decoder's target)
            targets = x[0, (0 if seq2seq else 1):]
            for i in range(0, k, _KL_BLOCK):  # fp32 copies of a few hundred rows at a time
                j = min(k, i + _KL_BLOCK)
                lr = torch.log_softmax(out_r.logits[0, i:j].float(), dim=-1)
                lq = torch.log_softmax(out_q.logits[0, i:j].float(), dim=-1)
                t = targets[i:j, None]
                nll_ref -= float(lr.gather(-1, t).sum())
                nll_q -= float(lq.gather(-1, t).sum())
                kl = (lr.exp() * (lr - lq)).sum(-1).clamp_min(0)
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                same += int((lr.argmax(-1) == lq.argmax(-1)).sum())
            n += k
    if n == 0:
        raise LinquantError(f"no input has {'a token' if seq2seq else 'two or more tokens'}; "
                            "cannot compute perplexity")
    return {"perplexity_reference": math.exp(nll_ref / n),
            "perplexity_quantized": math.exp(nll_q / n),
            "perplexity_delta": math.exp(nll_q / n) - math.exp(nll_ref / n),
            "scored_tokens": n, "kl_divergence_mean": kl_sum / n,
            "kl_divergence_max": kl_max, "top1_agreement": same / n}


def _first_output(out: Any) -> tuple[str, torch.Tensor]:
    """A model output's first tensor, in fp32, and its name (``last_hidden_state``,
    ``logits``; ``output`` for a plain tuple)."""
    keys = list(out.keys()) if hasattr(out, "keys") else []
    return (str(keys[0]) if keys else "output"), out[0].float()


def evaluate(reference: Path, quantized: Path, sentences: Path | None = None,
             text: Path | None = None, per_layer: bool = False) -> dict[str, Any]:
    """The comparison as a dict (``kind`` says which metric applies); with ``per_layer``,
    ``layers`` holds :func:`~linquant.layer_errors.compare_layers`' rows over the same inputs
    (:meth:`~linquant.layer_errors.LayerError.to_dict`)."""
    from linquant import demo

    kind = model_kind(reference)
    _check_same_model(reference, quantized)
    if model_kind(quantized) != kind:
        raise LinquantError(f"{reference} is a {kind} model but {quantized} is a "
                            f"{model_kind(quantized)} model")
    texts = demo.load_sentences(text or sentences, minimum=1)
    ref_q, q_q = _is_linquant(reference), _is_linquant(quantized)
    if ref_q and not q_q:
        raise LinquantError(f"{reference} is quantized and {quantized} is not: give the float "
                            "model first (linquant eval REFERENCE QUANTIZED)")
    qm = load_model(quantized, kind)
    ref = load_model(reference, kind, like=qm)
    out = compare_outputs(ref, qm, kind, texts, reference, quantized, per_layer)
    if not q_q:
        out["note"] = f"{quantized} is not quantized by linquant: two float models compared"
    return out


def compare_outputs(ref: nn.Module, qm: nn.Module, kind: str, texts: list[str],
                    reference: Path, quantized: Path,
                    per_layer: bool = False) -> dict[str, Any]:
    """:func:`evaluate` on models already loaded: ``ref`` and ``qm`` run on ``texts`` and
    compared as ``kind`` (:func:`model_kind`) says; ``reference`` and ``quantized`` name
    them in errors, ``reference`` is where the tokenizer is."""
    from linquant import demo
    from linquant.layer_errors import LayerErrors, compare_layers
    from linquant.ops.metrics import sqnr, sqnr_from_sums

    out: dict[str, Any] = {"kind": kind, "inputs": len(texts)}
    layers: AbstractContextManager[LayerErrors | None] = \
        compare_layers(ref, qm) if per_layer else nullcontext()
    if kind == "sentence-embedding":
        feats = demo.tokenize(ref, texts)
        with layers as errors:
            a = demo.encode(ref, feats)
        b = demo.encode(qm, feats)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                   sqnr_db=sqnr(a, b))
    elif kind in ("causal-lm", "seq2seq-lm"):
        ids, how = _token_ids(reference, ref, texts)
        with layers as errors:
            out.update(tokenized_with=how, **_language_model(ref, qm, ids, reference,
                                                             quantized))
    else:
        ids, how = _token_ids(reference, ref, texts)
        with torch.inference_mode():
            with layers as errors:
                refs = [_first_output(_run(ref, reference, model_inputs(ref, x))) for x in ids]
            num = den = 0.0
            for x, (_, ra) in zip(ids, refs, strict=True):
                _, rb = _first_output(_run(qm, quantized, model_inputs(qm, x)))
                num += float((ra * ra).sum())
                den += float(((ra - rb) ** 2).sum())
        out.update(tokenized_with=how, output=refs[0][0] if refs else "output",
                   sqnr_db=sqnr_from_sums(num, den))
    if errors is not None:
        out["layers"] = errors.to_dicts()
    return out


def run(args: argparse.Namespace) -> int:
    from linquant.layer_errors import LayerError, LayerErrors
    from linquant.report import json_text

    check_output_file(args.plot, "--plot", (args.reference, args.quantized, args.sentences,
                                           args.text))
    if args.plot is not None:
        from linquant.report import plot_format

        plot_format(args.plot)  # matplotlib and the suffix, before the long part
    res = evaluate(args.reference, args.quantized, args.sentences, args.text,
                   args.per_layer or args.plot is not None)
    errors = None if "layers" not in res else LayerErrors(
        [LayerError(**row) for row in res["layers"]])
    if args.plot is not None and errors is not None:
        errors.plot(args.plot, f"{args.quantized.name} against {args.reference.name}: output "
                               f"SQNR of each quantized layer on the float layer's input")
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        print(json_text(res), end="")
        return 0
    if errors is not None:
        print(errors)
    if "note" in res:
        print(f"note: {res['note']}")
    if res["kind"] == "sentence-embedding":
        print(f"sentence embeddings of {res['inputs']} inputs: cosine similarity mean "
              f"{res['cosine_mean']:.4f}, min {res['cosine_min']:.4f}; SQNR "
              f"{res['sqnr_db']:.1f} dB")
    elif res["kind"] in ("causal-lm", "seq2seq-lm"):
        print(f"perplexity over {res['inputs']} inputs ({res['tokenized_with']}): reference "
              f"{res['perplexity_reference']:.3f}, quantized {res['perplexity_quantized']:.3f}, "
              f"difference {res['perplexity_delta']:+.3f}\n"
              f"next-token distributions over {res['scored_tokens']} tokens: KL divergence "
              f"mean {res['kl_divergence_mean']:.5f}, max {res['kl_divergence_max']:.5f} "
              f"nats; same top-1 token {100 * res['top1_agreement']:.1f}%")
    else:
        print(f"{res['output']} over {res['inputs']} inputs ({res['tokenized_with']}): SQNR "
              f"{res['sqnr_db']:.1f} dB")
    return 0
