"""Back to float: replace a model's quantized layers by float layers of the types they came from.

>>> dequantize_model(model)                 # doctest: +SKIP
>>> dequantize_model(model, torch.float32)  # doctest: +SKIP

Each weight becomes its dequantized values (what the quantized layer computed with), so the
float model reproduces the quantized one's outputs up to the float kernels' rounding, not the
original float model: quantization error is not undone. For exporting a quantized model to
tools that only read float weights, fine-tuning it, or comparing layouts. transformers'
``model.dequantize()`` calls this for a model linquant quantized or loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linquant.errors import LinquantError
from linquant.nn.base import (
    _MODULE_STATE,
    QuantModule,
    _memory_key,
    carry_hooks,
    plain_references,
    replace_plain_references,
)
from linquant.nn.experts import QuantExperts, QuantExpertsProj, projection_names

__all__ = ["dequantize_model"]

# attributes QuantExperts has of its own (see QuantExperts.wrap)
_EXPERTS_OWN = ("float_class", "dense_dispatch", "added_attributes", "param_order")


def _dtype(dtype: torch.dtype | str | None, who: str) -> torch.dtype | None:
    if dtype is None:
        return None
    d = dtype if isinstance(dtype, torch.dtype) else \
        getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise LinquantError(f"{who}: dtype must be a float torch.dtype, got {dtype!r}")
    return d


def _float_weight(q: QuantModule, dtype: torch.dtype | None) -> torch.Tensor:
    """``q.weight`` (dequantized, in the float layer's layout), in ``dtype``, contiguous."""
    w = q.weight
    return w.to(dtype or w.dtype).contiguous()


def _weight(q: QuantModule, dtype: torch.dtype | None,
            shared: dict[object, nn.Parameter]) -> nn.Parameter:
    """``q``'s weight as a float Parameter in its float layer's layout; one Parameter for
    layers that share their codes (tied weights)."""
    key = _memory_key(q.weight_qdata)
    p = shared.get(key)
    if p is not None:
        return p
    p = nn.Parameter(_float_weight(q, dtype))
    shared[key] = p
    return p


def _cast(p: nn.Parameter | None, dtype: torch.dtype | None) -> nn.Parameter | None:
    """``p`` itself, or a Parameter of it in ``dtype`` when one is given and differs."""
    if p is None or dtype is None or not p.is_floating_point() or p.dtype == dtype:
        return p
    return nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


def _float_layer(q: Any, dtype: torch.dtype | None,
                 shared: dict[object, nn.Parameter]) -> nn.Module:
    """The float layer for the quantized layer ``q``."""
    from linquant.nn.conv import _QuantConv
    from linquant.nn.embedding import QuantEmbedding

    weight = _weight(q, dtype, shared)
    new: Any
    with torch.device("meta"):  # no init of a weight that is replaced at once
        if isinstance(q, QuantEmbedding):
            new = nn.Embedding(q.num_embeddings, q.embedding_dim, padding_idx=q.padding_idx,
                               scale_grad_by_freq=q.scale_grad_by_freq, sparse=q.sparse)
        elif isinstance(q, _QuantConv):
            new = q._float_type(q.in_channels, q.out_channels, q.kernel_size, stride=q.stride,
                                padding=q.padding, dilation=q.dilation, groups=q.groups,
                                bias=False, padding_mode=q.padding_mode)
        elif hasattr(q, "in_features") and hasattr(q, "out_features"):
            if q.stored_transposed:  # transformers' Conv1D (GPT-2): weight [in, out]
                from transformers.pytorch_utils import Conv1D

                new = Conv1D(q.out_features, q.in_features)  # type: ignore[no-untyped-call]
            else:  # nn.Linear, or a subclass with its constructor (FalconLinear)
                cls = q.float_class if isinstance(q.float_class, type) and \
                    issubclass(q.float_class, nn.Linear) else nn.Linear
                new = cls(q.in_features, q.out_features, bias=False)
        else:
            raise LinquantError(f"dequantize_model: no float layer for {type(q).__name__} "
                                f"{q._label()}")
    new.weight = weight
    if "bias" in q._parameters or hasattr(new, "bias"):
        new.bias = _cast(q._parameters.get("bias"), dtype)
    new.train(q.training)
    out: nn.Module = new
    return out


def _float_experts(qe: QuantExperts, dtype: torch.dtype | None,
                   shared: dict[object, nn.Parameter]) -> nn.Module:
    """The float experts module ``qe`` wrapped: same attributes and submodules, its quantized
    projections back as 3-D parameters."""
    cls: Any = qe.float_class
    new: nn.Module = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in vars(qe).items():
        if k in _MODULE_STATE or k in _EXPERTS_OWN or k in qe.added_attributes:
            continue
        new.__dict__[k] = v
    new.training = qe.training
    new._parameters.update(qe._parameters)
    new._buffers.update(qe._buffers)
    new._non_persistent_buffers_set.update(qe._non_persistent_buffers_set)
    parts = projection_names(qe)
    for name, sub in qe._modules.items():
        if name in parts and isinstance(sub, QuantExpertsProj):
            new._parameters[name] = nn.Parameter(_float_weight(sub, dtype))
        else:
            new._modules[name] = sub
    for name, p in list(new._parameters.items()):  # biases and float projections
        new._parameters[name] = _cast(p, dtype)
    order = {name: i for i, name in enumerate(qe.param_order)}  # the float module's order
    params = sorted(new._parameters.items(), key=lambda kv: order.get(kv[0], len(order)))
    new._parameters.clear()
    new._parameters.update(params)
    return new


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every quantized layer of ``model`` (in place) by a float layer of the type it
    replaced, holding its dequantized weight; returns ``model``.

    ``QuantLinear`` and ``W8A8Linear`` become the linear layer they replaced (``nn.Linear``,
    transformers' ``Conv1D`` or ``FalconLinear``; ``nn.Linear`` for a layer built without one),
    ``QuantEmbedding`` ``nn.Embedding``, ``QuantConv1d`` / ``QuantConv2d`` the convolution with
    its geometry, and ``QuantExperts`` the transformers experts module it wrapped, its
    projections back as 3-D parameters in their stored layout. Biases are kept (the same
    Parameter objects). Layers that share their codes (a tied embedding and head) get one
    Parameter, so they stay tied. Weights are in ``dtype`` (default: each layer's own, the
    dtype the layer computed in); biases are cast to ``dtype`` when one is given. A model with
    no quantized layers is returned unchanged. transformers models lose linquant's
    ``hf_quantizer`` and ``quantization_config`` (``save_pretrained`` works again).
    """
    if not isinstance(model, nn.Module):
        raise LinquantError(f"dequantize_model needs an nn.Module, got {type(model).__name__}")
    want = _dtype(dtype, "dequantize_model")
    if isinstance(model, (QuantModule, QuantExperts)):
        raise LinquantError(f"dequantize_model: {type(model).__name__} is a quantized layer "
                            "itself; pass the model that holds it")
    shared: dict[object, nn.Parameter] = {}
    done: dict[int, nn.Module] = {}
    spots: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if isinstance(child, QuantExperts) or (isinstance(child, QuantModule)
                                                   and not isinstance(child, QuantExpertsProj)):
                spots.append((parent, attr, child))
    refs = plain_references(model)  # layers also held in plain lists (Mask2Former)
    for parent, attr, child in spots:
        new = done.get(id(child))
        if new is None:
            new = (_float_experts(child, want, shared) if isinstance(child, QuantExperts)
                   else _float_layer(child, want, shared))
            done[id(child)] = new
        parent._modules[attr] = new
        carry_hooks(child, new)
        replace_plain_references(refs, child, new)
    if done:
        from linquant.io import hf

        hf.unmark_model(model)
    return model
