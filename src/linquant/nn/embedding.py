"""QuantEmbedding: weight-only quantized embedding table.

The table ``[num_embeddings, embedding_dim]`` is quantized with any scheme; the natural ones are
per row (``channel`` on axis 0) or per group along the embedding dimension (``g32`` ...).
A forward gathers the requested rows' codes and parameters and dequantizes only those rows
(:func:`linquant.kernels.embedding_weight_only`); the table is never dequantized as a whole.
The output dtype is ``weight_dtype`` (the float table's dtype; follows ``model.to(dtype)``).

Example::

    >>> emb = nn.Embedding(1000, 64, padding_idx=0)
    >>> q = QuantEmbedding.from_float(emb, "int4-sym-g32-fp16", name="embed")
    >>> q(torch.tensor([[1, 2, 0]])).shape
    torch.Size([1, 3, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linquant import kernels
from linquant.errors import LinquantError
from linquant.kernels import plans, reference
from linquant.nn.base import QuantModule, as_scheme, from_float_label, weight_dims
from linquant.nn.registry import register_qmodule
from linquant.scheme import QuantScheme
from linquant.tensor import quantize

__all__ = ["QuantEmbedding"]

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@register_qmodule(nn.Embedding)
class QuantEmbedding(QuantModule):
    """Embedding with a quantized table. ``padding_idx``, ``scale_grad_by_freq`` and ``sparse``
    are kept as attributes (they only matter for training); ``max_norm`` is refused, since it
    renormalises the table in place during the forward."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        scheme: QuantScheme | str,
        *,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_embeddings = self._size(num_embeddings, "num_embeddings")
        self.embedding_dim = self._size(embedding_dim, "embedding_dim")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.num_embeddings
        if padding_idx is not None and not 0 <= padding_idx < self.num_embeddings:
            raise LinquantError(
                f"{self._label()}: padding_idx must be within num_embeddings "
                f"({self.num_embeddings}), got {padding_idx}"
            )
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        scheme = as_scheme(scheme, self._label())
        self._register_qweight((self.num_embeddings, self.embedding_dim), scheme, device)

    @classmethod
    def skeleton(
        cls,
        embedding: nn.Module,
        scheme: QuantScheme | str,
        *,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> QuantEmbedding:
        """An empty QuantEmbedding shaped for ``embedding``."""
        label = from_float_label(cls, name)
        if not isinstance(embedding, nn.Embedding):
            raise LinquantError(
                f"{label}: cannot convert a {type(embedding).__name__}; expected nn.Embedding"
            )
        why = cls.cannot_convert(embedding)
        if why is not None:
            raise LinquantError(f"{label}: {why}")
        rows, dim = weight_dims(embedding, ("num_embeddings", "embedding_dim"))
        return cls(
            rows,
            dim,
            scheme,
            padding_idx=embedding.padding_idx,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            dtype=embedding.weight.dtype,
            device=device,
            name=name,
        )

    @classmethod
    def cannot_convert(cls, module: nn.Module) -> str | None:
        max_norm = getattr(module, "max_norm", None)
        if max_norm is not None:
            return (f"max_norm={max_norm} renormalises the table in place at every forward, "
                    "which a quantized table cannot do")
        return None

    @classmethod
    def from_float(
        cls, embedding: nn.Module, scheme: QuantScheme | str, *, name: str = ""
    ) -> QuantEmbedding:
        """Quantize an ``nn.Embedding`` (built on the meta device, then filled)."""
        q = cls.skeleton(embedding, scheme, name=name, device="meta")
        w = embedding.weight
        assert isinstance(w, torch.Tensor)
        q._set_qweight(quantize(w.detach(), q.scheme, name=f"{name}.weight" if name else "weight"))
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise LinquantError(f"{self._label()}: expected an integer index tensor (int64, "
                                f"int32, int16, int8 or uint8), got {got}")
        # the range check reads the indices on the host: not under torch.compile, where it
        # would split the graph (out-of-range indices then fail in the gather, as for
        # nn.Embedding)
        self._refuse_jit_trace()
        if reference.functorch_active():  # vmap ...: PyTorch ops, no host-side check; the
            # table dequantized whole (gathering packed rows needs a batching rule for dtype
            # views, which PyTorch 2.4 lacks)
            return F.embedding(ids.long(), self.qweight.dequantize(self.weight_dtype))
        if torch.compiler.is_compiling() or ids.is_meta or self.weight_qdata.is_meta:
            # (meta: shapes only, as nn.Embedding on meta gives them; no values to check)
            return kernels.embedding_weight_only(ids, self.qweight, self.weight_dtype)
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < 0 or hi >= self.num_embeddings:
                raise LinquantError(
                    f"{self._label()}: indices must be in [0, {self.num_embeddings}), "
                    f"got values in [{lo}, {hi}]"
                )
        # eager: the plan for this index signature (kernels.plans), with the table bound; the
        # indices were checked just above, so the native gather reads them as they are
        cache = self.kernel_cache()
        p = plans.find(ids, self._stored_weight(), None, cache, "gather_plans")
        if p is not None:
            return p.run(ids)
        qt = self.qweight
        path, run = kernels.embedding_runner(ids, qt, self.weight_dtype)
        plans.keep(cache, "gather_plans", ids, qt, None, run, path)
        return run(ids)

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text + f", scheme={self.scheme}"
