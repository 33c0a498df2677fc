"""Loads the compiled modules once (_C always, _cuda where nvcc was found at install time); says whether
kernels are used or the torch reference is forced."""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType

_C: ModuleType | None
try:
    from kernels import _C  # type: ignore[attr-defined, no-redef]
    _IMPORT_ERROR: str | None = None
except ImportError as exc:   # not built: `make install` builds it
    _C = None
    _IMPORT_ERROR = str(exc)


_CUDA: ModuleType | None
try:
    from kernels import _cuda as _CUDA  # type: ignore[attr-defined, no-redef]
except ImportError:                      # built only where nvcc was found
    _CUDA = None


# instruction-set levels of the CPU kernels, in order (csrc/cpu/simd.h)
ISA_LEVELS = ("scalar", "avx2", "avxvnni", "avx512vnni")


def cpu_isa() -> str:
    """The level the CPU kernels run at now: the best this CPU has, unless capped by set_cpu_isa or
    STRATA_CPU_ISA."""
    return ISA_LEVELS[cpu_module().active_isa()]


def _isa_index(level: str, what: str) -> int:
    if level not in ISA_LEVELS:
        raise ValueError(f"{what} must be one of {', '.join(ISA_LEVELS)}, got {level!r}")
    return ISA_LEVELS.index(level)


def set_cpu_isa(level: str) -> str:
    """Caps the CPU kernels at `level` (one of ISA_LEVELS; a level above the CPU's best runs the best, and
    avxvnni on a CPU with AVX512-VNNI but not AVX-VNNI runs avx2); returns the previous cap's effective level.
    Every level computes the same GGUF products bit for bit."""
    index = _isa_index(level, "CPU instruction-set level")
    before = cpu_isa()
    cpu_module().set_isa_cap(index)
    return before


def _cap_from_env() -> None:
    level = os.environ.get("STRATA_CPU_ISA", "").strip().lower()
    if level and _C is not None:
        _C.set_isa_cap(_isa_index(level, "STRATA_CPU_ISA"))


_cap_from_env()


def _kernels_env() -> str:
    return os.environ.get("STRATA_KERNELS", "").strip().lower()


def cuda_module() -> ModuleType | None:
    """The CUDA module, or None where it was not built (no nvcc at install time) or is forced off
    (STRATA_KERNELS=reference, or =triton to run the Triton kernels on a GPU instead)."""
    return None if _kernels_env() in ("reference", "triton") else _CUDA


def triton_module() -> ModuleType | None:
    """kernels.triton for CUDA tensors the CUDA module does not take (not built, or STRATA_KERNELS=triton),
    where Triton is installed and a GPU is visible; None otherwise (and under STRATA_KERNELS=reference)."""
    if _kernels_env() == "reference" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return _triton_on_gpu()


@functools.cache
def _triton_on_gpu() -> ModuleType | None:
    """kernels.triton where Triton imports and torch sees a GPU (asked once: every kernel call consults it)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        from kernels import triton as triton_kernels
    except ImportError:
        return None
    return triton_kernels


def device_of(t) -> "contextlib.AbstractContextManager":
    """A context that makes t's CUDA device the current one, for launches (kernels run on the current
    device): a no-op when it already is, so the common single-GPU case costs one query."""
    import torch
    index = t.device.index
    if index is None or index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def cuda_built() -> bool:
    return _CUDA is not None


def use_reference() -> bool:
    """True when `STRATA_KERNELS=reference` forces the pure-torch path."""
    return _kernels_env() == "reference"


def available() -> bool:
    """True when the compiled CPU module is importable (and not overridden by STRATA_KERNELS=reference)."""
    return _C is not None and not use_reference()


def cpu_module() -> ModuleType:
    if _C is None:
        raise RuntimeError(f"the kernels' CPU module is not built ({_IMPORT_ERROR}): run `make install`")
    return _C
