"""Loader for the compiled extension ``effattn._C`` (built from csrc/ by setup.py).

The extension is optional at import time: a pure-Python install (or a failed build) still gives
the Triton and reference backends.  ``load()`` returns the module or ``None``; when it is ``None``,
``load_error`` holds the reason, for error messages such as::

    raise RuntimeError(f"the CPU backend needs effattn._C: {_extension.load_error}")
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["load", "has_cpu", "has_cuda", "load_error", "require"]

load_error: str | None = None
"""Why ``effattn._C`` could not be imported (``None`` if it loaded or was not tried yet)."""

_module: ModuleType | None = None
_tried = False


def load() -> ModuleType | None:
    """Import ``effattn._C`` once; return it, or ``None`` (see ``load_error``)."""
    global _module, _tried, load_error
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("effattn._C")
            load_error = None
        except ImportError as e:  # not built, or built for another Python / missing symbols
            _module = None
            load_error = (
                f"{type(e).__name__}: {e} (build it with `pip install -e .`, "
                "adding EFFATTN_CUDA=1 for the CUDA kernels)"
            )
    return _module


def require() -> ModuleType:
    """Return ``effattn._C`` or raise ``ImportError`` carrying ``load_error``."""
    mod = load()
    if mod is None:
        raise ImportError(f"effattn._C is not available: {load_error}")
    return mod


def has_cpu() -> bool:
    """True when the loaded extension carries the C++ CPU attention kernels."""
    mod = load()
    return mod is not None and hasattr(mod, "cpu_sparse_forward")


def has_cuda() -> bool:
    """True when the extension was built with its CUDA C++ part (EFFATTN_CUDA=1).

    Says nothing about a GPU being present: see ``torch.cuda.is_available()``.
    """
    mod = load()
    return mod is not None and bool(getattr(mod, "with_cuda", False))
