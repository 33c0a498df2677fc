"""Loads the compiled modules once (_C always, _cuda where nvcc was found at install time); says whether
kernels are used or the torch reference is forced."""

from __future__ import annotations

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


def cuda_module() -> ModuleType | None:
    """The CUDA module, or None where it was not built (no nvcc at install time) or is forced off."""
    return None if use_reference() else _CUDA


def cuda_built() -> bool:
    return _CUDA is not None


def use_reference() -> bool:
    """True when `STRATA_KERNELS=reference` forces the pure-torch path."""
    return os.environ.get("STRATA_KERNELS", "").strip().lower() == "reference"


def available() -> bool:
    """True when the compiled CPU module is importable (and not overridden by STRATA_KERNELS=reference)."""
    return _C is not None and not use_reference()


def cpu_module() -> ModuleType:
    if _C is None:
        raise RuntimeError(f"the kernels' CPU module is not built ({_IMPORT_ERROR}): run `make install`")
    return _C
