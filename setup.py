"""Build effattn._C through CMake (see CMakeLists.txt); metadata lives in pyproject.toml.

Environment variables read at build time:

  EFFATTN_CUDA=1             also build the CUDA C++ kernels, when nvcc is found (CUDACXX,
                             $CUDA_HOME/bin, PATH, /usr/local/cuda/bin); without nvcc a warning is
                             printed (visible with `pip install -v`) and only the CPU part is built.
                             `effattn._C.with_cuda` tells which one you got.
  EFFATTN_CUDA_ARCHS="80;90" CMAKE_CUDA_ARCHITECTURES for the CUDA part.
  EFFATTN_PTXAS_VERBOSE=1    pass -Xptxas -v to nvcc (register/spill/smem report in the build log).
  EFFATTN_DEBUG=1            CMake Debug build instead of Release.
  MAX_JOBS=N                 parallel compile jobs (default: os.cpu_count()).
  CMAKE_ARGS="..."           extra arguments for the CMake configure step.

The compiled module lands next to effattn/__init__.py's build location: in the source tree for
`pip install -e .` and in the wheel for `pip install .`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c)
    return None


def _cmake_exe() -> str:
    try:  # the `cmake` build requirement (PyPI wheel) first: known to be recent enough
        import cmake

        exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("effattn: CMake >= 3.24 is required to build the extension")
    return exe


def _ninja_exe() -> str | None:
    try:
        import ninja

        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    return shutil.which("ninja")


def _warn(msg: str) -> None:
    print(f"\n*** effattn build WARNING: {msg}\n", file=sys.stderr, flush=True)


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def copy_extensions_to_source(self) -> None:
        # In-place builds copy the module next to the sources; unlinking the old file first makes
        # the copy a new file, so a process that has the old one loaded keeps its mapping.
        if self.inplace:
            for ext in self.extensions:
                for old in Path(self.get_ext_fullpath(ext.name)).parent.glob("_C*"):
                    old.unlink()
        super().copy_extensions_to_source()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        # get_ext_fullpath honours --inplace (editable installs) and the wheel's build_lib.
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        extdir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / f"cmake-{ext.name}"
        cfg = "Debug" if (self.debug or _env_flag("EFFATTN_DEBUG")) else "Release"

        cmake = _cmake_exe()
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'out'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DEFFATTN_VERSION={self.distribution.get_version()}",
        ]
        ninja = _ninja_exe()
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        else:
            _warn("ninja not found, using CMake's default generator")

        if _env_flag("EFFATTN_CUDA"):
            nvcc = _find_nvcc()
            if nvcc is None:
                _warn("EFFATTN_CUDA=1 but nvcc was not found: building the CPU part only")
                args.append("-DEFFATTN_CUDA=OFF")
            else:
                archs = os.environ.get("EFFATTN_CUDA_ARCHS", "80;90")
                args += [
                    "-DEFFATTN_CUDA=ON",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}",
                    f"-DEFFATTN_CUDA_ARCHS={archs}",
                    f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                ]
                if _env_flag("EFFATTN_PTXAS_VERBOSE"):
                    args.append("-DEFFATTN_PTXAS_VERBOSE=ON")
        else:
            args.append("-DEFFATTN_CUDA=OFF")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # A build directory configured from another (isolated, now deleted) build environment
        # caches stale paths to cmake/ninja/pybind11: start afresh whenever the inputs change.
        stamp = build_dir / "effattn-configure.json"
        key = json.dumps({"cmake": cmake, "source": ext.sourcedir, "args": args}, sort_keys=True)
        if build_dir.exists() and (not stamp.exists() or stamp.read_text() != key):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args], check=True)
        stamp.write_text(key)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", cfg, "--parallel", jobs], check=True
        )
        # Replace the module by rename, never by writing into it: a process that has the old
        # one loaded keeps its mapping instead of crashing.
        for built in (build_dir / "out").glob("_C*"):
            tmp = extdir / f".{built.name}.tmp"
            shutil.copy2(built, tmp)
            os.replace(tmp, extdir / built.name)


setup(
    ext_modules=[CMakeExtension("effattn._C")],
    cmdclass={"build_ext": CMakeBuild},
)
