"""Loader for the compiled extension ``effattn._C`` (built from csrc/ by setup.py).

The extension is optional at import time: a pure-Python install (or a failed build) still gives
the Triton and reference backends.  ``load()`` returns the module or ``None``; when it is ``None``,
``load_error`` holds the reason and what to do about it, for error messages such as::

    raise RuntimeError(f"the CPU backend needs effattn._C: {_extension.load_error}")

setup.py records how the install went in ``effattn/_build.json`` (built, skipped on purpose with
EFFATTN_SKIP_EXTENSION=1, or failed, with the reason): ``build_record()`` reads it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

__all__ = ["build_record", "has_cpu", "has_cuda", "load", "load_error", "require"]

load_error: str | None = None
"""Why ``effattn._C`` could not be imported (``None`` if it loaded or was not tried yet)."""

_module: ModuleType | None = None
_tried = False
_PACKAGE = Path(__file__).resolve().parent


def build_record() -> dict | None:
    """What setup.py recorded at install: {"extension": "built" | "skipped" | "failed",
    "reason": str | None, "cuda": bool}, or None when there is no record (a checkout that was
    never built, or an install older than the record)."""
    try:
        record = json.loads((_PACKAGE / "_build.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _advice(error: ImportError) -> str:
    """Why the import failed and how to get the extension, for this kind of install."""
    record = build_record() or {}
    status, reason = record.get("extension"), str(record.get("reason")).rstrip(".")
    if status == "skipped":
        why = "it was left out on purpose at install (EFFATTN_SKIP_EXTENSION=1)"
        fix = "reinstall without EFFATTN_SKIP_EXTENSION"
    elif status == "failed":
        why = f"its build failed at install ({reason})"
        fix = "install a C++17 compiler (CXX picks it) and reinstall"
    else:
        why = f"{type(error).__name__}: {error}"
        fix = "reinstall with a C++17 compiler present"
    if (_PACKAGE.parent / "setup.py").is_file():  # a source checkout (editable install)
        command = f"`pip install -e {_PACKAGE.parent}`"
    else:  # a wheel: the build happens when installing from the source distribution
        command = (
            "`pip install --force-reinstall --no-deps --no-binary effattn effattn` "
            "(or `pip install .` in a checkout)"
        )
    return (
        f"{why}. To build it, {fix}: {command}; `pip install -v` shows the build log, and "
        "EFFATTN_CUDA=1 adds the CUDA C++ kernels"
    )


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
            load_error = _advice(e)
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
