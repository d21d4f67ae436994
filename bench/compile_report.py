"""Compile every shipped GPU kernel for sm_80 and sm_90 without a GPU; report and gate resources.

    python bench/compile_report.py [--arch 80 90] [--filter SUBSTR] [--json PATH]
                                   [--no-triton] [--no-cuda]

For each kernel and architecture it prints registers per thread, spill bytes (stores + loads),
shared memory per block (dynamic + static) and the limit, and exits non-zero when any kernel
spills, needs more shared memory than a block may have (163 KiB on sm_80, 227 KiB on sm_90:
the opt-in per-block maximum, i.e. 164 / 228 KiB per SM less the 1 KiB reserved per block), needs
more registers than an SM has for one block, or fails to compile.

Triton kernels
--------------
``bench/triton_configs.py`` lists, per kernel module, every configuration its launchers can
pick (``CONFIGS``: module name -> generator of ``aot.KernelConfig``), i.e. one entry per
(kernel, constexpr specialisation, num_warps, num_stages): the report is only as complete as
these lists, and every module ``effattn.ops.triton_*`` must have an entry.  Signature strings
are Triton's (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``, ...); see ``bench/aot.py``
for the exact format, which Triton 3.6 and 3.9 share.  Configs are collected into
``TRITON_CONFIGS`` and compiled with ``aot.aot_compile`` (``triton.compile`` with a
``GPUTarget``, ptxas' own -v log).

CUDA C++ kernels
----------------
Every ``csrc/cuda/*.cu`` is compiled with nvcc (flags as in CMakeLists.txt) for the same
architectures with ``-Xptxas -v``.  Kernels that use dynamic shared memory declare the most they
request at launch in a comment, anywhere in a .cu/.cuh/.h file under csrc/cuda::

    // effattn:dynamic-smem <regex on the demangled kernel name> <bytes, may be a product: 2*64*128*2>

The CUDA part is skipped (with a message) where nvcc is absent; the Triton part where triton is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import aot  # noqa: E402  (bench/ is sys.path[0] when run as a script)

TRITON_CONFIGS: list[tuple[str, aot.KernelConfig]] = []
"""(module, config) pairs, filled by ``collect_triton_configs()``."""

NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DEFFATTN_WITH_CUDA"]
DYN_SMEM_RE = re.compile(r"//\s*effattn:dynamic-smem\s+(\S+)\s+([0-9*+ ()]+?)\s*$", re.M)


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------


def collect_triton_configs() -> list[str]:
    """Fill TRITON_CONFIGS; return error messages (a broken or unlisted kernel module)."""
    try:
        import triton_configs

        ops = importlib.import_module("effattn.ops")
    except Exception as e:  # report it as a collection error, like a broken module
        return [f"importing the kernel configs: {type(e).__name__}: {e}"]
    errors = [
        f"effattn.ops.{m.name} has no entry in bench/triton_configs.py CONFIGS"
        for m in pkgutil.iter_modules(ops.__path__)
        if m.name.startswith("triton") and f"effattn.ops.{m.name}" not in triton_configs.CONFIGS
    ]
    TRITON_CONFIGS.clear()
    for name, gen in sorted(triton_configs.CONFIGS.items()):
        try:
            TRITON_CONFIGS.extend((name, aot.KernelConfig(*c)) for c in gen())
        except Exception as e:
            errors.append(f"{name} configs: {type(e).__name__}: {e}")
    return errors


def _triton_share(archs, pattern, share: int, shares: int) -> list[dict]:
    """Compile every ``shares``-th selected config, starting at ``share`` (one worker's part)."""
    if not TRITON_CONFIGS:
        collect_triton_configs()
    selected = [(m, c) for m, c in TRITON_CONFIGS if not pattern or pattern in c.name]
    mine = selected[share::shares]
    rows = aot.aot_compile_configs([c for _, c in mine], archs)
    module_of = {c.name: m for m, c in mine}
    for row in rows:
        row.update(kind="triton", module=module_of.get(row["kernel"], "?"))
    return rows


def triton_rows(archs, pattern) -> list[dict]:
    # Triton compiles on one core: split the configs over worker processes (spawned, so each
    # imports the kernel modules afresh) to use all of them.
    jobs = min(os.cpu_count() or 1, max(1, len(TRITON_CONFIGS) // 8))
    if jobs == 1:
        return _triton_share(archs, pattern, 0, 1)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        shares = [pool.submit(_triton_share, archs, pattern, s, jobs) for s in range(jobs)]
        return [row for share in shares for row in share.result()]


# --------------------------------------------------------------------------------------------
# CUDA C++
# --------------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def _dynamic_smem_rules(cuda_dir: Path) -> list[tuple[re.Pattern, int]]:
    rules = []
    for f in sorted(cuda_dir.glob("*")):
        if f.suffix in (".cu", ".cuh", ".h", ".hpp"):
            for pat, expr in DYN_SMEM_RE.findall(f.read_text(errors="replace")):
                value = 1
                for factor in re.split(r"\*", expr.replace("(", "").replace(")", "")):
                    value *= sum(int(t) for t in factor.split("+"))
                rules.append((re.compile(pat), value))
    return rules


def _nvcc_one(nvcc: str, src: Path, archs) -> tuple[Path, int, str]:
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, "-c", str(src), "-o", os.path.join(d, "k.o"), "-I", str(ROOT / "csrc")]
        cmd += [*NVCC_FLAGS, "-Xptxas", "-v", *gencode]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return src, res.returncode, res.stdout + res.stderr


def cuda_rows(nvcc: str, archs, pattern) -> list[dict]:
    cuda_dir = ROOT / "csrc" / "cuda"
    sources = sorted(cuda_dir.glob("*.cu"))
    rules = _dynamic_smem_rules(cuda_dir)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda s: _nvcc_one(nvcc, s, archs), sources))
    for src, rc, log in results:
        rel = str(src.relative_to(ROOT))
        if rc != 0:
            rows.append(
                {
                    "kind": "cuda",
                    "module": rel,
                    "kernel": f"{rel} (nvcc)",
                    "arch": "-",
                    "problems": [f"nvcc failed with exit code {rc} (details below)"],
                    "error": log.strip(),
                }
            )
            continue
        records = aot.parse_ptxas_log(log)
        pretty = _demangle(sorted({name for name, _ in records}))
        for (name, sm), rec in sorted(records.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            arch = int(re.sub(r"\D", "", sm) or 0)
            label = pretty.get(name, name)
            if pattern and pattern not in label:
                continue
            dynamic = max((v for r, v in rules if r.search(label)), default=0)
            static = rec.get("static_smem", 0)
            info = {
                "kind": "cuda" if rec.get("entry") else "cuda-func",
                "module": rel,
                "kernel": label,
                "mangled": name,
                "arch": arch,
                "sm": sm,
                "regs": rec.get("regs", 0),
                "spills": rec.get("spills", 0),
                "spill_stores": rec.get("spill_stores", 0),
                "spill_loads": rec.get("spill_loads", 0),
                "stack": rec.get("stack", 0),
                "smem": static + dynamic,
                "smem_static": static,
                "smem_dynamic": dynamic,
                "smem_limit": aot.SMEM_LIMIT.get(arch, 48 * 1024),
            }
            info["problems"] = aot.check(info)
            if static > 48 * 1024:
                info["problems"].append(f"static shared memory {static} B > 48 KiB")
            rows.append(info)
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    head = f"{'kind':<9} {'kernel':<56} {'arch':>6} {'regs':>5} {'spill B':>8} {'smem B':>8} "
    head += f"{'limit B':>8}  status"
    print(head)
    print("-" * len(head))
    for r in rows:
        status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        print(
            f"{r['kind']:<9} {_short(r['kernel'], 56):<56} {str(r.get('sm', r['arch'])):>6} "
            f"{r.get('regs', '-'):>5} {r.get('spills', '-'):>8} {r.get('smem', '-'):>8} "
            f"{r.get('smem_limit', '-'):>8}  {status}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS))
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    args = ap.parse_args(argv)
    # The report compiles real kernels, which Triton in interpreter mode cannot: drop the flag
    # before any kernel module is imported (here, not at import, so that importing this module
    # from a test session leaves its interpreter alone).
    os.environ.pop("TRITON_INTERPRET", None)

    rows: list[dict] = []
    errors: list[str] = []
    t0 = time.perf_counter()

    if not args.no_cuda:
        nvcc = find_nvcc()
        if nvcc is None:
            print("compile_report: nvcc not found, skipping the CUDA C++ kernels")
        else:
            n_cu = len(list((ROOT / "csrc" / "cuda").glob("*.cu")))
            print(f"compile_report: CUDA C++: {n_cu} source(s) with {nvcc}")
            cuda = cuda_rows(nvcc, args.arch, args.filter)
            if not any(r["kind"] == "cuda" for r in cuda):
                print("compile_report: (no CUDA kernels in csrc/cuda yet)")
            rows += cuda

    if not args.no_triton:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            print(f"compile_report: triton not importable ({e}), skipping the Triton kernels")
        else:
            errors += collect_triton_configs()
            print(f"compile_report: Triton {triton.__version__}: {len(TRITON_CONFIGS)} config(s)")
            if not TRITON_CONFIGS:
                print("compile_report: (no Triton kernel configs registered yet)")
            rows += triton_rows(args.arch, args.filter)

    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        if r.get("error"):
            print(f"\n---- {r['kind']} {r['kernel']} (arch {r['arch']}):\n{r['error']}\n")
    for e in errors:
        print(f"compile_report: ERROR {e}")
    print(
        f"compile_report: {len(rows)} kernel build(s) checked in {time.perf_counter() - t0:.1f} s, "
        f"{len(bad)} with problems, {len(errors)} collection error(s)"
    )
    return 1 if (bad or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
