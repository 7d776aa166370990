"""QuantizedTensor: packed codes + scales (+ zero points or offsets) + scheme + shape/dtype."""

from __future__ import annotations

import math
from typing import Any

import torch

from linquant.errors import LinquantError
from linquant.ops.affine import codes_unpacked, dequantize_packed, quantize_packed
from linquant.ops.grouping import Granules, granules, scale_shape
from linquant.ops.metrics import cosine_similarity, max_abs_error, mse, sqnr
from linquant.ops.packing import pack, unpack
from linquant.ops.qparams import QParams, choose_qparams
from linquant.scheme import QuantScheme

__all__ = ["FLOAT_DTYPES", "QuantizedTensor", "compare", "dequantize", "quantize"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantizedTensor:
    """A quantized tensor as stored in memory.

    Attributes:
        qdata: 1-D uint8, the packed code stream (row-major order of ``shape``; see
            :mod:`linquant.ops.packing` for bit order, :mod:`linquant.ops.affine` for the code
            convention).
        scale: ``scale_dtype``, shape :func:`~linquant.ops.grouping.scale_shape`.
        zero_point_packed: 1-D uint8, integer zero points packed at ``bits`` (asym, int), or None.
        offset: ``scale_dtype`` offsets ``m`` in ``r ≈ s q + m`` (asym, float), or None.
        scheme, shape, dtype: what it was quantized with and what it dequantizes to.
    """

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        zero_point_packed: torch.Tensor | None,
        offset: torch.Tensor | None,
        scheme: QuantScheme,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        check: bool = True,
    ) -> None:
        self.qdata = qdata
        self.scale = scale
        self.zero_point_packed = zero_point_packed
        self.offset = offset
        self.scheme = scheme
        self.shape = torch.Size(shape)
        self.dtype = dtype
        if check:
            self._check()

    @classmethod
    def _trusted(cls, qdata: torch.Tensor, scale: torch.Tensor,
                 zero_point_packed: torch.Tensor | None, offset: torch.Tensor | None,
                 scheme: QuantScheme, shape: tuple[int, ...], dtype: torch.dtype
                 ) -> QuantizedTensor:
        """The constructor without :meth:`_check`, for parts known to fit: a layer's own
        buffers, which it builds this view of on every call that needs it (the check doubled
        that cost, 2 to 4.4 us)."""
        # (through __init__: Dynamo on PyTorch 2.4 breaks the graph on a bare cls.__new__)
        return cls(qdata, scale, zero_point_packed, offset, scheme, shape, dtype, check=False)

    def _check(self) -> None:
        """Raise if the parts do not fit together (sizes and dtypes only: no data is read).
        Built by hand, a truncated code stream failed deep inside unpacking, and a missing
        zero point dequantized wrong without a word."""
        def bad(what: str) -> LinquantError:
            return LinquantError(f"QuantizedTensor of shape {tuple(self.shape)}, {self.scheme}: "
                                 f"{what}")

        if not isinstance(self.scheme, QuantScheme):
            raise LinquantError(f"QuantizedTensor: scheme must be a QuantScheme, got "
                                f"{type(self.scheme).__name__}")
        if self.dtype not in (*FLOAT_DTYPES, torch.float64):
            raise bad(f"dtype must be a float dtype, got {self.dtype}")
        parts = {"qdata": self.qdata, "scale": self.scale,
                 "zero_point_packed": self.zero_point_packed, "offset": self.offset}
        for name, t in parts.items():
            if t is not None and not isinstance(t, torch.Tensor):
                raise bad(f"{name} must be a tensor, got {type(t).__name__}")
        bits = self.scheme.bits
        count = math.prod(scale_shape(tuple(self.shape), self.scheme))
        if self.qdata.dtype not in (torch.uint8, torch.int8):
            raise bad(f"qdata must be uint8 bytes, got {self.qdata.dtype}")
        if self.qdata.numel() != -(-self.numel * bits // 8):
            raise bad(f"qdata holds {self.qdata.numel()} bytes, {self.numel} codes of {bits} "
                      f"bits need {-(-self.numel * bits // 8)}")
        if self.scale.dtype != self.scheme.scale_dtype or self.scale.numel() != count:
            raise bad(f"scale must hold {count} {self.scheme.scale_dtype} value(s), got "
                      f"{self.scale.numel()} {self.scale.dtype}")
        zp = self.zero_point_packed
        if self.scheme.has_int_zero_point != (zp is not None):
            raise bad("zero_point_packed must be " + (
                "given" if self.scheme.has_int_zero_point else "None"))
        if zp is not None and (zp.dtype != torch.uint8 or zp.numel() != -(-count * bits // 8)):
            raise bad(f"zero_point_packed must hold {-(-count * bits // 8)} uint8 byte(s), got "
                      f"{zp.numel()} {zp.dtype}")
        if self.scheme.has_offset != (self.offset is not None):
            raise bad("offset must be " + ("given" if self.scheme.has_offset else "None"))
        if self.offset is not None and (self.offset.dtype != self.scheme.scale_dtype
                                        or self.offset.numel() != count):
            raise bad(f"offset must hold {count} {self.scheme.scale_dtype} value(s), got "
                      f"{self.offset.numel()} {self.offset.dtype}")

    # ---- derived views ---------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def granules(self) -> Granules:
        return granules(tuple(self.shape), self.scheme)

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def zero_point(self) -> torch.Tensor | None:
        """Integer zero points (uint8, scale-shaped), or None for schemes without one."""
        if self.zero_point_packed is None:
            return None
        n = self.scale.numel()
        return unpack(self.zero_point_packed, self.scheme.bits, n).reshape(self.scale.shape)

    def qparams(self) -> QParams:
        """Parameters in the flat per-granule form the ops use."""
        zp = self.zero_point
        return QParams(
            self.scale.reshape(-1),
            None if zp is None else zp.reshape(-1),
            None if self.offset is None else self.offset.reshape(-1),
        )

    def codes(self) -> torch.Tensor:
        """Unpacked codes in the tensor's shape: int8 (symmetric) or uint8 (asymmetric)."""
        return codes_unpacked(self.qdata, self.scheme, self.numel).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """Float tensor of the original shape and dtype (or ``dtype``: a float
        ``torch.dtype`` or its name, ``"float16"`` / ``"fp16"``, ...)."""
        g = self.granules
        out = dequantize_packed(self.qdata, self.qparams(), self.scheme, g.shape3,
                                self.dtype if dtype is None else _float_dtype(dtype))
        return out.reshape(self.shape)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def bits_per_weight(self) -> float:
        """Stored bits per element: codes + scales + zero points/offsets (no padding)."""
        n_params = self.scale.numel()
        extra = n_params * self.scheme.scale_bits
        if self.scheme.has_int_zero_point:
            extra += n_params * self.scheme.bits
        if self.scheme.has_offset:
            extra += n_params * self.scheme.scale_bits
        return self.scheme.bits + extra / self.numel

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed codes + scales + zero points/offsets."""
        total = self.qdata.nbytes + self.scale.nbytes
        if self.zero_point_packed is not None:
            total += self.zero_point_packed.nbytes
        if self.offset is not None:
            total += self.offset.nbytes
        return total

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role: ``qdata``, ``scale`` and ``zero_point`` or ``offset``."""
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero_point_packed is not None:
            out["zero_point"] = self.zero_point_packed
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def to(self, device: torch.device | str) -> QuantizedTensor:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedTensor(
            self.qdata.to(device), self.scale.to(device), mv(self.zero_point_packed),
            mv(self.offset), self.scheme, tuple(self.shape), self.dtype,
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"scheme={self.scheme}, bits_per_weight={self.bits_per_weight:.4g}, "
            f"nbytes={self.nbytes})"
        )


def _check_input(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise LinquantError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise LinquantError(
            f"{name}: expected a float32, float16, bfloat16 or float64 tensor, got {x.dtype}"
        )
    if x.is_meta:
        raise LinquantError(f"{name}: a meta tensor has no values to quantize (shape "
                            f"{tuple(x.shape)}); load or materialize the weights first")
    if x.numel() == 0:
        raise LinquantError(f"{name}: cannot quantize an empty tensor (shape {tuple(x.shape)})")
    return x


def quantize(
    x: torch.Tensor, scheme: QuantScheme | str | None = None, *, name: str = "tensor",
    **fields: Any,
) -> QuantizedTensor:
    """Quantize a float tensor of any rank.

    Args:
        x: fp32/fp16/bf16 tensor, contiguous or not; never modified. fp64 too: quantized from
            its fp32 values, and dequantized back to fp64.
        scheme: a :class:`QuantScheme` or its text form (``"int4-sym-g32-fp16"``); None: the
            defaults (int8 symmetric, one scale per output channel).
        name: used in error messages (e.g. the parameter name).
        **fields: :class:`QuantScheme` fields that change ``scheme``
            (:meth:`QuantScheme.resolve`: ``bits=4, group_size=32`` means group-wise).

    Example::

        >>> qt = quantize(torch.randn(64, 128), "int4-sym-g32-fp16")
        >>> qt.bits_per_weight
        4.5
        >>> str(quantize(torch.randn(64, 128), bits=4, group_size=32, scale_dtype="fp16").scheme)
        'int4-sym-g32-fp16'
    """
    if not isinstance(scheme, (QuantScheme, str)) and scheme is not None:
        raise LinquantError(f"{name}: scheme must be a QuantScheme or str, got {scheme!r}")
    if fields or not isinstance(scheme, QuantScheme):
        try:
            scheme = QuantScheme.resolve(scheme, **fields)
        except LinquantError as e:
            raise LinquantError(f"{name}: {e}") from None
    x = _check_input(x, name)
    dtype = x.dtype
    if dtype == torch.float64:  # quantized from its fp32 values; dequantizes to fp64
        x64, x = x, x.float()
        if not bool(torch.isfinite(x64).all()):  # named in float64 (1e300 is not one of them)
            from linquant.ops.qparams import _raise_nonfinite

            _raise_nonfinite(x64, name, tuple(x64.shape))
        if not bool(torch.isfinite(x).all()):
            raise LinquantError(
                f"{name}: float64 values beyond float32's range (max |x| "
                f"{float(x64.abs().max()):.4g}): a float64 tensor is quantized from its "
                "float32 values")
    shape = tuple(x.shape)
    g = granules(shape, scheme, name)
    if x.device.type == "cuda":
        fast = _quantize_triton(x, scheme, g, dtype)
        if fast is not None:
            return fast
    x3 = x.detach().contiguous().view(g.shape3)  # [outer, C, inner]
    qp = choose_qparams(x3, g, scheme, name, shape)
    qdata = quantize_packed(x3, qp, scheme)
    sshape = scale_shape(shape, scheme)
    zp = None if qp.zero_point is None else pack(qp.zero_point, scheme.bits)
    offset = None if qp.offset is None else qp.offset.reshape(sshape)
    return QuantizedTensor(qdata, qp.scale.reshape(sshape), zp, offset, scheme, shape, dtype)


def _quantize_triton(
    x: torch.Tensor, scheme: QuantScheme, g: Granules, dtype: torch.dtype
) -> QuantizedTensor | None:
    """The one-kernel CUDA path (:mod:`linquant.kernels.triton_quant`): the same bytes as the
    torch ops below, or None where it does not apply (then they run, and raise on bad input)."""
    from linquant.kernels import triton_quant

    out = triton_quant.quantize(x, scheme, g)
    if out is None:
        return None
    qdata, scale, zp, offset = out
    shape = tuple(x.shape)
    sshape = scale_shape(shape, scheme)
    return QuantizedTensor(qdata, scale.reshape(sshape), zp,
                           None if offset is None else offset.reshape(sshape),
                           scheme, shape, dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Same as ``qt.dequantize(dtype)``."""
    if not isinstance(qt, QuantizedTensor):  # a tensor's own .dequantize() returned it as is
        raise LinquantError(f"dequantize: expected a QuantizedTensor (from linquant.quantize), "
                            f"got {type(qt).__name__}")
    return qt.dequantize(dtype)


_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "fp64": torch.float64, "half": torch.float16, "float": torch.float32,
                "double": torch.float64}


def _float_dtype(dtype: object) -> torch.dtype:
    """A float dtype given as itself or by name, else a LinquantError (an int8 dequantize
    truncated the values, a name failed inside torch)."""
    d = dtype if isinstance(dtype, torch.dtype) else _DTYPE_NAMES.get(
        str(dtype).removeprefix("torch."), getattr(torch, str(dtype).removeprefix("torch."), None))
    if not isinstance(d, torch.dtype) or d not in (*FLOAT_DTYPES, torch.float64):
        raise LinquantError(f"dequantize: dtype must be float32, float16, bfloat16 or float64, "
                            f"got {dtype!r}")
    return d


def compare(x: torch.Tensor, qt: QuantizedTensor) -> dict[str, float]:
    """All error metrics of ``qt`` against ``x`` plus bits per weight."""
    if not isinstance(x, torch.Tensor) or not isinstance(qt, QuantizedTensor):
        raise LinquantError(
            f"compare: expected a tensor and a QuantizedTensor, got {type(x).__name__} and "
            f"{type(qt).__name__}"
        )
    y = qt.dequantize()
    if tuple(x.shape) != tuple(qt.shape):
        raise LinquantError(f"compare: shapes differ, {tuple(x.shape)} vs {tuple(qt.shape)}")
    return {
        "sqnr_db": sqnr(x, y),
        "mse": mse(x, y),
        "max_abs_error": max_abs_error(x, y),
        "cosine_similarity": cosine_similarity(x, y),
        "bits_per_weight": qt.bits_per_weight,
    }
