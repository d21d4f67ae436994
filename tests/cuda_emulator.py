"""The CUDA kernels of csrc/cuda compiled for the host with the emulator of csrc/cuda/emu, as
the Python module ``effattn_cuda_emu`` (tests only; the real bindings' names and classes)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def sources() -> list[Path]:
    """Everything the module is built from: csrc/cuda and the shared headers of csrc/."""
    cuda = (p for p in (CSRC / "cuda").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu"))
    return sorted([*cuda, *CSRC.glob("*.h")])


def load():
    """Build the module unless a build of the same sources exists (~30 s), and import it.

    Raises RuntimeError with the compiler's output when the build fails.
    """
    import pybind11

    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.read_bytes())
    out_dir = ROOT / "build" / "cuda_emu" / digest.hexdigest()[:16]
    name = "effattn_cuda_emu"
    target = out_dir / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            os.environ.get("CXX", "g++"),
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-DEFFATTN_EMULATE",
            "-I",
            str(CSRC),
            "-I",
            sysconfig.get_paths()["include"],
            "-I",
            pybind11.get_include(),
            str(CSRC / "cuda" / "emu" / "module.cpp"),
            "-o",
            str(tmp),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
        if res.returncode:
            raise RuntimeError(f"building the emulator failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, target)
    spec = importlib.util.spec_from_file_location(name, target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
