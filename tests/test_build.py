"""The build: the compiled extension loads and reports itself; an install without a compiler
still succeeds; Triton AOT compiles for sm_80/90.

The AOT tooling is development code in bench/ (aot.py, triton_configs.py), imported from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from effattn import _extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import aot  # noqa: E402


def test_extension_imports():
    mod = _extension.load()
    assert mod is not None, f"effattn._C did not load: {_extension.load_error}"
    assert _extension.load_error is None
    assert _extension.load() is mod  # cached
    assert _extension.require() is mod
    assert isinstance(mod.version(), str) and mod.version()
    assert isinstance(mod.with_openmp, bool)


def test_cuda_flag_consistent():
    mod = _extension.load()
    assert mod is not None, _extension.load_error
    assert isinstance(mod.with_cuda, bool)
    assert _extension.has_cpu() is True
    assert _extension.has_cuda() is mod.with_cuda
    # The CUDA bindings exist exactly when the CUDA part was built.
    assert hasattr(mod, "cuda_device_count") is mod.with_cuda
    if mod.with_cuda:
        assert mod.cuda_device_count() >= 0  # 0 without a GPU or driver, never an exception
        assert mod.cuda_runtime_version() >= 11000


def test_num_threads():
    mod = _extension.load()
    assert mod is not None, _extension.load_error
    n = mod.num_threads()
    assert isinstance(n, int) and n >= 1
    try:
        mod.set_num_threads(1)
        assert mod.num_threads() == 1
        mod.set_num_threads(n + 1)
        assert mod.num_threads() == n + 1
        with pytest.raises(ValueError):
            mod.set_num_threads(0)
    finally:
        mod.set_num_threads(n)
    assert mod.num_threads() == n


# --------------------------------------------------------------------------------------------
# installing without the extension
# --------------------------------------------------------------------------------------------
needs_build_tools = pytest.mark.skipif(
    importlib.util.find_spec("pybind11") is None
    or (importlib.util.find_spec("cmake") is None and shutil.which("cmake") is None),
    reason="needs pybind11 and CMake (the build requirements)",
)


def _build_ext(tmp_path, **env):
    """setup.py's build_ext into tmp_path, as pip's build step runs it: (exit code, output,
    the build record, the files built)."""
    lib = tmp_path / "lib"
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib)]
    cmd += ["--build-temp", str(tmp_path / "temp")]
    env = {**os.environ, "EFFATTN_BUILD_DIR": str(tmp_path / "cmake"), **env}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    record = json.loads((lib / "effattn" / "_build.json").read_text())
    return res.returncode, res.stdout + res.stderr, record, sorted(lib.glob("effattn/_C*"))


@needs_build_tools
def test_a_failed_build_still_installs_with_one_warning(tmp_path):
    rc, out, record, built = _build_ext(tmp_path, CXX="/bin/false", CC="/bin/false")
    assert rc == 0, out
    warnings = [ln for ln in out.splitlines() if 'building extension "effattn._C" failed' in ln]
    assert len(warnings) == 1, out
    assert "C++ CPU kernels are missing" in warnings[0] and "EFFATTN_SKIP_EXTENSION" in warnings[0]
    assert "/bin/false" in warnings[0]  # the reason, from CMake's own message
    assert record["extension"] == "failed" and "/bin/false" in record["reason"]
    assert built == []


@needs_build_tools
def test_the_extension_can_be_skipped_on_purpose(tmp_path):
    rc, out, record, built = _build_ext(tmp_path, EFFATTN_SKIP_EXTENSION="1")
    assert rc == 0, out
    assert "failed" not in out and "effattn build WARNING" not in out
    assert record == {"extension": "skipped", "reason": "EFFATTN_SKIP_EXTENSION=1 at install",
                      "cuda": False}  # fmt: skip
    assert built == []


@pytest.mark.parametrize("status", ["failed", "skipped", None])
@pytest.mark.parametrize("checkout", [True, False])
def test_missing_extension_advice_fits_the_install(tmp_path, monkeypatch, status, checkout):
    package = tmp_path / "site" / "effattn"
    package.mkdir(parents=True)
    if checkout:
        (package.parent / "setup.py").write_text("")
    if status:
        record = {"extension": status, "reason": "CMake configure failed: no compiler"}
        (package / "_build.json").write_text(json.dumps(record))
    monkeypatch.setattr(_extension, "_PACKAGE", package)
    advice = _extension._advice(ImportError("No module named 'effattn._C'"))
    if status == "failed":
        assert "build failed at install (CMake configure failed: no compiler)" in advice
        assert "C++17 compiler" in advice
    elif status == "skipped":
        assert "EFFATTN_SKIP_EXTENSION=1" in advice
    else:
        assert "No module named 'effattn._C'" in advice
    if checkout:
        assert f"pip install -e {package.parent}" in advice
    else:
        assert "--no-binary effattn" in advice and "pip install -e" not in advice
    assert "EFFATTN_CUDA=1" in advice


def test_build_record_of_this_install():
    record = _extension.build_record()
    if record is not None:  # an install by this setup.py: it built (test_extension_imports)
        assert record["extension"] == "built" and record["reason"] is None


# --------------------------------------------------------------------------------------------
# Triton ahead-of-time compilation (no GPU needed)
# --------------------------------------------------------------------------------------------

HAS_TRITON = importlib.util.find_spec("triton") is not None


class _Gather(NamedTuple):
    """A NamedTuple kernel argument (the kernels group strides and layout tables so)."""

    start: int
    stride: int


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled(x, SCALE: tl.constexpr):  # a helper: exercises calls between jit functions
        return x * SCALE

    @triton.jit
    def _tiny_row_softmax(X, Y, n_cols, stride_x, BLOCK: tl.constexpr, SCALE: tl.constexpr = 1.0):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=-float("inf")).to(tl.float32)
        x = _scaled(x, SCALE)
        p = tl.exp(x - tl.max(x, axis=0))
        y = p / tl.sum(p, axis=0)
        tl.store(Y + row * stride_x + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _tiny_dot(A, B, C, M, stride_am, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(B + rk[:, None] * BN + rn[None, :])
        c = tl.dot(a, b)
        tl.store(C + rm[:, None] * BN + rn[None, :], c.to(tl.float16), mask=rm[:, None] < M)

    @triton.jit
    def _tiny_gather(X, Y, gather, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + gather.start + offs * gather.stride, mask=offs < n)
        tl.store(Y + offs, x, mask=offs < n)


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SOFTMAX_SIG = {"X": "*fp16", "Y": "*fp16", "n_cols": "i32", "stride_x": "i32"}
DOT_SIG = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "M": "i32", "stride_am": "i32"}
GATHER_SIG = {"X": "*fp16", "Y": "*fp16", "gather": _Gather("i32", "i32"), "n": "i32"}


@pytest.fixture(scope="module")
def compiled():
    """Every AOT build of this module in one batch (one child process under TRITON_INTERPRET)."""
    KernelConfig = aot.KernelConfig
    configs = [
        # SCALE is left out: it takes its default, as with the JIT
        KernelConfig("softmax", _tiny_row_softmax, SOFTMAX_SIG, {"BLOCK": 1024}, 4, 1),
        KernelConfig("dot64", _tiny_dot, DOT_SIG, {"BM": 64, "BN": 64, "BK": 32}, 4, 2),
        # a plain tuple works too; BK=8 is below tl.dot's minimum of 16: a compile error
        ("dot-bad", _tiny_dot, DOT_SIG, {"BM": 64, "BN": 64, "BK": 8}, 4, 2, None, (80,)),
        KernelConfig(
            "gather", _tiny_gather, GATHER_SIG, {"BLOCK": 128}, 4, 1, ("X", "Y", "gather.stride")
        ),
    ]
    rows = aot.aot_compile_configs(configs, archs=(80, 90))
    return {(r["kernel"], r["arch"]): r for r in rows}


@needs_triton
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_softmax(compiled, arch):
    info = compiled[("softmax", arch)]
    assert info["problems"] == [], info.get("error")
    assert info["arch"] == arch
    assert info["sm"].startswith(f"sm_{arch}")
    assert 0 < info["regs"] <= 255
    assert info["spills"] == 0
    assert 0 <= info["smem"] <= info["smem_limit"]
    assert info["threads"] == 128


@needs_triton
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_dot_uses_shared_memory(compiled, arch):
    info = compiled[("dot64", arch)]
    assert info["problems"] == [], info.get("error")
    assert info["spills"] == 0
    assert info["smem"] > 0  # dot operands are staged through shared memory


@needs_triton
def test_aot_compile_error_is_reported(compiled):
    assert ("dot-bad", 90) not in compiled  # restricted to sm_80 by its config
    bad = compiled[("dot-bad", 80)]
    assert "error" in bad and bad["problems"][0].startswith("compile error")


@needs_triton
def test_aot_compile_single(compiled):
    info = aot.aot_compile(_tiny_dot, DOT_SIG, {"BM": 64, "BN": 64, "BK": 32}, 90, 4, 2)
    assert aot.check(info) == []
    # Same numbers as the batch (served from Triton's cache and effattn's ptxas record).
    batch = compiled[("dot64", 90)]
    assert {k: batch[k] for k in info} == info


@needs_triton
def test_aot_compile_rejects_incomplete_signature():
    with pytest.raises(ValueError, match="stride_x"):
        aot.aot_compile(
            _tiny_row_softmax, {"X": "*fp32", "Y": "*fp32", "n_cols": "i32"}, {"BLOCK": 64}
        )
    with pytest.raises(ValueError, match="nope"):
        aot.aot_compile(
            _tiny_row_softmax,
            {"X": "*fp32", "Y": "*fp32", "n_cols": "i32", "stride_x": "i32", "nope": "i32"},
            {"BLOCK": 64},
        )


@needs_triton
def test_aot_namedtuple_parameter(compiled):
    assert compiled[("gather", 80)]["problems"] == []
    assert compiled[("gather", 90)]["problems"] == []
    sig, _ = aot._full_signature(_tiny_gather, GATHER_SIG, {"BLOCK": 128})
    names = list(_tiny_gather.arg_names)
    # Element j of tuple parameter i is (i, j), as the JIT keys its specializations.
    div = {(0,), (1,), (2, 1)}
    assert set(aot._divisibility_attrs(names, sig, ("X", "Y", "gather.stride"))) == div
    assert set(aot._divisibility_attrs(names, sig, ("gather",))) == {(2, 0), (2, 1)}
    assert set(aot._divisibility_attrs(names, sig, None)) == {(0,), (1,)}
    with pytest.raises(ValueError, match="no field 'step'"):
        aot._divisibility_attrs(names, sig, ("gather.step",))


def test_parse_ptxas_log():
    log = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 368 bytes cmem[0]
ptxas-blackwell info    : Compiling entry function 'k' for 'sm_90a'
ptxas-blackwell info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 40 registers, used 0 barriers
"""
    recs = aot.parse_ptxas_log(log)
    foo = recs[("_Z3fooPf", "sm_80")]
    assert foo["regs"] == 255 and foo["static_smem"] == 2048 and foo["spills"] == 8
    k = recs[("k", "sm_90a")]
    assert k["regs"] == 40 and k["spills"] == 0 and k["static_smem"] == 0
    info = {**foo, "smem": 2048, "smem_limit": 1024, "threads": 512}
    problems = aot.check(info)
    assert len(problems) == 3  # spills, shared memory, 255 regs x 512 threads


# --------------------------------------------------------------------------------------------
# The shipped Triton configurations (bench/triton_configs.py)
# --------------------------------------------------------------------------------------------


@needs_triton
def test_every_triton_module_has_configs():
    import pkgutil

    import triton_configs

    import effattn.ops

    modules = {
        f"effattn.ops.{m.name}"
        for m in pkgutil.iter_modules(effattn.ops.__path__)
        if m.name.startswith("triton")
    }
    assert modules == set(triton_configs.CONFIGS)


@needs_triton
def test_sparse_configs_cover_every_kernel_and_parameter():
    import triton_configs

    configs = list(triton_configs.sparse_configs())
    names = {c.name for c in configs}
    assert len(names) == len(configs)
    for kernel in ("fwd", "dq", "dkdv"):
        for d in (16, 32, 64, 128, 256):
            for dtype in ("fp16", "bf16", "fp32"):
                assert any(n.startswith(f"sparse_{kernel}[D={d},{dtype},") for n in names)
    for c in configs:
        sig, cst = aot._full_signature(c.fn, c.signature, c.constexprs)
        assert set(sig) == set(c.fn.arg_names)
        assert c.archs is not None and len(c.archs) == 1


@needs_triton
def test_xl_configs_cover_every_kernel_and_parameter():
    import triton_configs

    configs = list(triton_configs.xl_configs())
    names = {c.name for c in configs}
    assert len(names) == len(configs)
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq", "bwd_dr"):
        for d in (16, 32, 64, 128, 256):
            for dtype in ("fp16", "bf16") + (("fp32",) if d <= 64 else ()):
                assert f"xl_{kernel}[D<={d},{dtype}]" in names
    for c in configs:
        sig, cst = aot._full_signature(c.fn, c.signature, c.constexprs)
        assert set(sig) == set(c.fn.arg_names)
