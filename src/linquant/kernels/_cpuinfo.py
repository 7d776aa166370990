"""Which x86 instruction-set extensions this CPU has, for choosing kernels.

PyTorch's own probes answer first: ``torch.cpu._is_<feature>_supported`` (PyTorch 2.5 and
later), then the names PyTorch 2.4 used (``torch.cpu._is_cpu_support_<feature>``, for AVX2,
AVX-512 and VNNI only). Where neither exists, the ``flags`` line of ``/proc/cpuinfo`` answers:
Linux lists there what the CPU has and the kernel enabled (it drops the AVX-512 flags when it
does not save their registers). Elsewhere, without a probe, the answer is no: the caller takes
a portable path.

Features asked for (:func:`has`): ``avx2``, ``avx512`` (F, BW and VL, as PyTorch's probe
means it), ``vnni`` (AVX512-VNNI), ``avx512_bf16``, ``amx_tile``, ``amx_fp16``.
"""

from __future__ import annotations

import functools

import torch

# feature -> the /proc/cpuinfo flags that must all be present
_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "avx512": ("avx512f", "avx512bw", "avx512vl"),
    "vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "amx_tile": ("amx_tile",),
    "amx_fp16": ("amx_fp16",),
}
# PyTorch 2.4's names for the probes it had
_OLD_PROBES = {"avx2": "_is_cpu_support_avx2", "avx512": "_is_cpu_support_avx512",
               "vnni": "_is_cpu_support_vnni"}
CPUINFO = "/proc/cpuinfo"


@functools.cache  # the hardware does not change
def has(feature: str) -> bool:
    """Whether this CPU has ``feature`` (one of the keys above; others are False)."""
    if feature not in _FLAGS:
        return False
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    if probe is None and feature in _OLD_PROBES:
        probe = getattr(torch.cpu, _OLD_PROBES[feature], None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            return False
    flags = cpuinfo_flags()
    return all(f in flags for f in _FLAGS[feature])


@functools.cache
def cpuinfo_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open(CPUINFO, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
