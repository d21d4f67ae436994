"""Build effattn._C through CMake (see CMakeLists.txt); metadata lives in pyproject.toml.

The extension is optional: when it cannot be built (no C++ compiler, a failed compile) the
install still succeeds, without the C++ CPU and CUDA C++ kernels, and the build log (shown by
``pip install -v``) ends with one warning saying so and why. ``effattn/_build.json`` records
the outcome, so that at run time ``effattn._extension.load_error`` can say what happened.

Environment variables read at build time:

  EFFATTN_SKIP_EXTENSION=1   do not build the extension at all (a pure-Python install: Triton on
                             GPU, the blockwise PyTorch path on CPU), without the warning.
  EFFATTN_CUDA=1             also build the CUDA C++ kernels, when nvcc is found (CUDACXX,
                             $CUDA_HOME/bin, PATH, /usr/local/cuda/bin); without nvcc, or when
                             the CUDA part fails to build, a warning is printed and only the CPU
                             part is built. `effattn._C.with_cuda` tells which one you got.
  EFFATTN_CUDA_ARCHS="80;90" CMAKE_CUDA_ARCHITECTURES for the CUDA part.
  EFFATTN_PTXAS_VERBOSE=1    pass -Xptxas -v to nvcc (register/spill/smem report in the build log).
  EFFATTN_DEBUG=1            CMake Debug build instead of Release.
  EFFATTN_BUILD_DIR=DIR      where CMake builds (default: build/ in the source tree).
  MAX_JOBS=N                 parallel compile jobs (default: os.cpu_count()).
  CMAKE_ARGS="..."           extra arguments for the CMake configure step.
  CXX, CC, CUDACXX           the compilers, as CMake reads them.

The CMake build directory is the same for every install from one source tree (one per Python,
configuration and CUDA setting), so a second ``pip install -e .`` recompiles only what changed.
pip builds each time in a fresh isolated environment, with CMake, ninja and pybind11 at new
temporary paths: the configure step is redone then, and pybind11 is used from a copy kept in the
build directory, so that the compile lines stay the same and ninja finds nothing to rebuild.

The compiled module lands next to effattn/__init__.py's build location: in the source tree for
`pip install -e .` and in the wheel for `pip install .`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
RECORD = "_build.json"


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
        raise CompileError("CMake >= 3.24 was not found")
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


def _run(cmd: list[str], step: str) -> None:
    """Run a CMake step, its output passed through; raise CompileError naming the first error
    line on failure."""
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        raise CompileError(f"{step} could not start {cmd[0]}: {e}") from e
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line.rstrip())
    if proc.wait() == 0:
        return
    first = next((i for i, ln in enumerate(lines) if re.search(r"CMake Error|error:", ln)), None)
    if first is None:
        detail = ""
    elif lines[first].startswith("CMake Error"):
        # CMake puts its message on the lines after "CMake Error at <file>:<line> (message):".
        words = []
        for ln in lines[first + 1 : first + 10]:
            if ln.startswith(("Call Stack", "  It fails with")):
                break
            words += ln.split()
        detail = ": " + (" ".join(words) or lines[first].strip())
    else:
        detail = ": " + lines[first].strip()
    raise CompileError(f"{step} failed (exit {proc.returncode}){detail}")


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        # optional: setuptools goes on without it when build_extension raises CompileError.
        super().__init__(name, sources=[], optional=True)
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def run(self) -> None:
        self._records: dict[str, dict] = {}
        super().run()

    def copy_extensions_to_source(self) -> None:
        # In-place builds copy the module next to the sources; unlinking the old file first makes
        # the copy a new file, so a process that has the old one loaded keeps its mapping. A
        # skipped or failed build leaves no module there: an old one would not match the code.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package_dir = Path(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            for old in package_dir.glob("_C*"):
                old.unlink()
            if ext.name in self._records:
                _write_record(package_dir, self._records[ext.name])
        super().copy_extensions_to_source()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        # get_ext_fullpath is the build_lib location (the wheel's; editable installs copy from
        # there in copy_extensions_to_source).
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        extdir.mkdir(parents=True, exist_ok=True)
        if _env_flag("EFFATTN_SKIP_EXTENSION"):
            print("effattn: EFFATTN_SKIP_EXTENSION=1: effattn._C is not built", flush=True)
            return self._record(ext, extdir, "skipped", "EFFATTN_SKIP_EXTENSION=1 at install")
        cuda = _env_flag("EFFATTN_CUDA")
        if cuda and _find_nvcc() is None:
            _warn("EFFATTN_CUDA=1 but nvcc was not found: building the CPU part only")
            cuda = False
        try:
            self._cmake_build(ext, extdir, cuda)
        except CompileError as e:
            if not cuda:
                return self._fail(ext, extdir, str(e))
            _warn(f"the CUDA C++ kernels did not build ({e}): building the CPU part only")
            try:
                self._cmake_build(ext, extdir, cuda=False)
            except CompileError as e2:
                return self._fail(ext, extdir, str(e2))
            cuda = False
        self._record(ext, extdir, "built", None, cuda=cuda)

    def _record(self, ext, extdir: Path, status: str, reason: str | None, cuda=False) -> None:
        record = {"extension": status, "reason": reason, "cuda": cuda}
        self._records[ext.name] = record
        if status != "built":  # a module left from an earlier build would not match the code
            for old in extdir.glob("_C*"):
                old.unlink()
        _write_record(extdir, record)

    def _fail(self, ext, extdir: Path, reason: str) -> None:
        self._record(ext, extdir, "failed", reason)
        # setuptools prints this as one line, 'building extension "effattn._C" failed: ...',
        # and goes on without the (optional) extension.
        raise CompileError(
            f"{reason.rstrip('.')}. effattn installs WITHOUT its C++ extension: the C++ CPU kernels are "
            'missing (CPU tensors run the blockwise PyTorch path, backend "torch", about 180x '
            'slower; backend="cpu" raises). To build them, install a C++17 compiler (CXX picks '
            "it) and reinstall; `pip install -v` shows this log. To install without them on "
            "purpose, set EFFATTN_SKIP_EXTENSION=1."
        )

    def _cmake_build(self, ext: Extension, extdir: Path, cuda: bool) -> None:
        try:
            import pybind11
        except ImportError as e:
            raise CompileError(f"pybind11 is needed to build the extension ({e})") from e

        cfg = "Debug" if (self.debug or _env_flag("EFFATTN_DEBUG")) else "Release"
        cmake = _cmake_exe()
        ninja = _ninja_exe()
        build_root = self._build_root()
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_stable_pybind11(pybind11, build_root)}",
            f"-DEFFATTN_VERSION={self.distribution.get_version()}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        else:
            _warn("ninja not found, using CMake's default generator")
        archs = os.environ.get("EFFATTN_CUDA_ARCHS", "80;90")
        if cuda:
            args += [
                "-DEFFATTN_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}",
                f"-DEFFATTN_CUDA_ARCHS={archs}",
                f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            ]
            if _env_flag("EFFATTN_PTXAS_VERBOSE"):
                args.append("-DEFFATTN_PTXAS_VERBOSE=ON")
        else:
            args.append("-DEFFATTN_CUDA=OFF")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # One build directory per interpreter, configuration, generator and CUDA setting, kept
        # between installs (module docstring).
        flavour = [sysconfig.get_config_var("EXT_SUFFIX") or sys.version, cfg, bool(ninja)]
        flavour += [cuda and archs]
        tag = hashlib.sha256(json.dumps(flavour).encode()).hexdigest()[:12]
        build_dir = build_root / f"cmake-{cfg.lower()}-{'cuda' if cuda else 'cpu'}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        # The configure step starts from an empty cache whenever its inputs change: a cache from
        # another pip build environment points to that environment's deleted cmake and ninja.
        # Only the cache goes (CMake's --fresh would delete the object files too): ninja then
        # recompiles just the objects whose compile line changed.
        compilers = {v: os.environ.get(v) for v in ("CXX", "CC", "CUDACXX", "CXXFLAGS")}
        stamp = build_dir / "effattn-configure.json"
        key = json.dumps(
            {"cmake": cmake, "source": ext.sourcedir, "args": args, "env": compilers},
            sort_keys=True,
        )
        out = build_dir / "out"
        configure = [cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args]
        configure.append(f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}")
        if not stamp.exists() or stamp.read_text() != key:
            stamp.unlink(missing_ok=True)
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        _run(configure, "CMake configure")
        stamp.write_text(key)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _run([cmake, "--build", str(build_dir), "--config", cfg, "--parallel", jobs], "CMake build")
        # Replace the module by rename, never by writing into it: a process that has the old
        # one loaded keeps its mapping instead of crashing.
        for built in out.glob("_C*"):
            tmp = extdir / f".{built.name}.tmp"
            shutil.copy2(built, tmp)
            os.replace(tmp, extdir / built.name)

    def _build_root(self) -> Path:
        """EFFATTN_BUILD_DIR, else build/ in the source tree where it is writable, else
        setuptools' (temporary) build_temp."""
        if os.environ.get("EFFATTN_BUILD_DIR"):
            return Path(os.environ["EFFATTN_BUILD_DIR"]).resolve()
        root = ROOT / "build"
        try:
            root.mkdir(exist_ok=True)
        except OSError:
            return Path(self.build_temp).resolve()
        return root if os.access(root, os.W_OK) else Path(self.build_temp).resolve()


def _stable_pybind11(pybind11, build_root: Path) -> str:
    """pybind11's CMake directory, from a copy of its headers and CMake files kept in the build
    root per version: pip's isolated build environments put pybind11 at a new temporary path
    each time, and compile lines naming that path would make every install recompile the
    bindings and relink (the link-time optimisation is most of the build)."""
    stable = build_root / f"pybind11-{pybind11.__version__}"
    if not stable.is_dir():
        source = Path(pybind11.__file__).resolve().parent
        tmp = build_root / f".{stable.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("include", "share"):
            shutil.copytree(source / part, tmp / part)
        try:
            os.replace(tmp, stable)
        except OSError:  # another build put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    relative = (
        Path(pybind11.get_cmake_dir())
        .resolve()
        .relative_to(Path(pybind11.__file__).parent.resolve())
    )
    return str(stable / relative)


def _write_record(package_dir: Path, record: dict) -> None:
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")


setup(
    ext_modules=[CMakeExtension("effattn._C")],
    cmdclass={"build_ext": CMakeBuild},
)
