"""GPU first contact: build, GPU tests and a reduced benchmark in one command, results in OUT_DIR.

    python bench/gpu_check.py OUT_DIR              # on a GPU machine, within 8 minutes
    python bench/gpu_check.py OUT_DIR --dry-run    # the same steps on CPU, tiny sizes

For the first minutes a GPU machine is lent (15 minutes in all, its start and every idle wait
included), with the image's torch and Triton and nothing downloadable. Steps, in order, each in
a subprocess with a time limit, each failure recorded and the next step run anyway:

1. environment  device name, capability and memory, driver (nvidia-smi), nvcc, CMake, pybind11,
                torch, Triton, pytest and pytest-timeout versions.
2. build        CMake directly (the image has CMake, ninja and pybind11; the packaging layer is
                left out so that its setuptools version cannot matter): the C++ CPU and CUDA C++
                kernels, CUDA for the present architecture only, into effattn/ in place. The
                dry run configures only (with CUDA off) and uses the extension already built.
3. tests        ``pytest -m gpu`` over the test files that have gpu-marked tests, each test
                limited to --test-timeout seconds (pytest-timeout), JUnit XML kept.
4. benchmark    block-sparse strided(128) / fixed(128, 16) / causal() at n = 8192 and 16384
                (B * n = 16384 tokens, 16 heads), D = 64 and 128, bf16: effattn's Triton and
                CUDA C++ kernels against SDPA's flash kernel (causal: the baseline of every
                ratio) and compiled FlexAttention with the same mask; Transformer-XL at
                L = M = 2048 (B = 2, 8 heads, D = 64 and 128) against the original formulation
                (materialized AC + BD, rel_shift; bench/xl_attention.py); forward and
                forward + backward. TFLOP/s count useful entries only: 4 D flops per allowed
                (query, key) pair forward (6 D for XL: the positional term too), 3.5x that for
                forward + backward (bench/sparse_attention.py's convention). Cases run in
                order of value (Triton and SDPA, then XL, CUDA C++, FlexAttention, whose
                compilation is slowest), each guarded; the worker stops at its deadline and
                the cases not reached are listed as such.

The whole run keeps to --budget-s seconds (default 480, 8 minutes) by its own clock: each step
gets what is left, less a reserve for writing, and a step still running at its limit is
killed. Whatever happened, OUT_DIR gets (at most 8 files, for the device tool to bring back):

    gpu_check.json    everything: machine, versions, steps (status, seconds, detail), test
                      counts and failures, benchmark rows (each naming its backend), summary
    summary.md        the summary tables
    build.log, tests.log, tests.xml, bench.log   the steps' own output
    bench_rows.jsonl  the benchmark rows as measured (one JSON object per line)

The dry run substitutes on CPU: effattn's "cpu" backend for Triton (Triton runs on CPU only in
its interpreter), SDPA's default kernel for flash, FlexAttention uneager (no compile; it has no
backward on CPU, which its rows record), n = 256 and 512, D = 64, XL at L = M = 128; the CUDA
C++ rows are skipped with the reason. Exit status 0 when every step succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUDGET_S = 480.0
RESERVE_S = 10.0  # kept back from every step for writing the results
TEST_TIMEOUT_S = 90
# Largest share of the budget each step may take; the benchmark takes what is left.
CAPS = {"environment": 60.0, "build": 210.0, "tests": 150.0}
BENCH_MIN_S = 120.0  # what the tests leave to the benchmark at least
RESTART = 3  # a worker's exit status after an error that leaves its CUDA context unusable


# --------------------------------------------------------------------------- orchestration
class Check:
    """The run's state: its clock, its steps, and the files in OUT_DIR."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, test_timeout_s: int):
        self.out, self.dry_run, self.budget_s = out, dry_run, budget_s
        self.test_timeout_s = test_timeout_s
        self.t0 = time.monotonic()
        self.doc = {
            "family": "gpu_check",
            "device": "cpu" if dry_run else "cuda",
            "dry_run": dry_run,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": {"budget_s": budget_s, "test_timeout_s": test_timeout_s, "dry_run": dry_run},
            "machine": {},
            "versions": {},
            "steps": [],
            "tests": None,
            "rows": [],
        }
        self.env = dict(os.environ)
        # The checkout's effattn, ahead of any installed one: this run builds and checks it.
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else [])
        )
        self.env["PYTHONUNBUFFERED"] = "1"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str, fn, cap: float | None) -> None:
        """Run one step with its share of the time left; record its status, never raise."""
        limit = self.left() - RESERVE_S if cap is None else min(cap, self.left() - RESERVE_S)
        record = {"name": name, "status": "not reached", "seconds": 0.0, "limit_s": limit}
        self.doc["steps"].append(record)
        if limit < 5:
            record["detail"] = "out of time before it started"
            self.write()
            return
        start = time.monotonic()
        try:
            status, detail = fn(limit)
        except Exception as e:  # any failure is a result here, and the run goes on
            status, detail = "failed", f"{type(e).__name__}: {e}"
            record["traceback"] = traceback.format_exc()
        record.update(status=status, detail=detail, seconds=round(time.monotonic() - start, 1))
        print(f"[gpu_check +{time.monotonic() - self.t0:5.0f}s] {name}: {status}: {detail}")
        self.write()

    def run(self, cmd: list[str], log: Path, timeout: float, append: bool = False) -> int | None:
        """Run cmd from the checkout's root with its output in log; None when it was killed
        at its time limit (its whole process group, so compilers and workers go too)."""
        with open(log, "a" if append else "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                return proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write(f"\n*** killed at its time limit ({timeout:.0f} s)\n")
                return None
            except BaseException:  # SIGTERM or Ctrl-C on this process: take the step along
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write("\n*** killed: gpu_check itself was stopped\n")
                raise

    def write(self) -> None:
        """gpu_check.json and summary.md as they stand (after every step, and at the end)."""
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.doc["summary"] = summary(self.doc)
        (self.out / "gpu_check.json").write_text(json.dumps(self.doc, indent=1) + "\n")
        (self.out / "summary.md").write_text(self.doc["summary"] + "\n")

    # ----------------------------------------------------------------------- steps
    def environment(self, limit: float):
        probe = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable,
        "cpus": os.cpu_count(), "platform": platform.platform()}
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
            cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, capability=[p.major, p.minor],
                memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
for mod in ("triton", "pybind11", "pytest", "pytest_timeout", "cmake", "ninja"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "present")
    except ImportError:
        info[mod] = None
print(json.dumps(info))
"""
        res = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env=self.env, capture_output=True,
            text=True, timeout=limit,
        )  # fmt: skip
        if res.returncode != 0:
            return "failed", f"python probe exited {res.returncode}: {res.stderr[-2000:]}"
        info = json.loads(res.stdout.strip().splitlines()[-1])
        tools = {"nvcc": _find_nvcc(), "cmake": _tool("cmake"), "ninja": _tool("ninja")}
        info["tools"] = {k: v and _version_line([v, "--version"]) for k, v in tools.items()}
        info["tools"]["nvidia-smi"] = shutil.which("nvidia-smi") and _version_line(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        )
        self.doc["machine"] = {
            "name": info.get("name") or f"CPU ({info['cpus']} cores)",
            "capability": info.get("capability"),
            "memory_gib": info.get("memory_gib"),
            "cpus": info["cpus"],
            "platform": info["platform"],
            "driver": info["tools"]["nvidia-smi"],
        }
        self.doc["versions"] = info
        if not self.dry_run and not info["cuda_available"]:
            return "failed", "torch sees no CUDA device (the later steps run anyway)"
        return (
            "ok",
            f"{self.doc['machine']['name']}, torch {info['torch']}, triton {info['triton']}",
        )

    def build(self, limit: float):
        log = self.out / "build.log"
        cmake = _tool("cmake")
        if cmake is None:
            return "failed", "cmake not found"
        res = subprocess.run(
            [sys.executable, "-c", "import pybind11; print(pybind11.get_cmake_dir())"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if res.returncode != 0:
            return "failed", "pybind11 not importable"
        capability = self.doc["machine"].get("capability")
        nvcc = None if self.dry_run else _find_nvcc()
        cuda = nvcc is not None and capability is not None
        arch = f"{capability[0]}{capability[1]}" if capability else None
        version = re.search(r'__version__ = "([^"]+)"', (ROOT / "effattn/__init__.py").read_text())
        build_dir = ROOT / "build" / ("gpu-check-dry" if self.dry_run else f"gpu-check-sm{arch}")
        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={res.stdout.strip()}",
            f"-DEFFATTN_VERSION={version.group(1) if version else '0+unknown'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ROOT / 'effattn'}",
            # No link-time optimisation: it is most of the CPU part's build time (~40 s on one
            # core), and the CPU kernels' speed is not measured here.
            "-DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF",
        ]
        ninja = _tool("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if cuda:
            args += ["-DEFFATTN_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
            args += [f"-DEFFATTN_CUDA_ARCHS={arch}", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
        else:
            args.append("-DEFFATTN_CUDA=OFF")
        start = time.monotonic()
        rc = self.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], log, limit)
        if rc != 0:
            return "failed", "CMake configure " + ("timed out" if rc is None else f"exited {rc}")
        if self.dry_run:
            return "ok", "dry run: configured only; the extension as installed is used"
        jobs = str(os.cpu_count() or 1)
        left = limit - (time.monotonic() - start)
        rc = self.run([cmake, "--build", str(build_dir), "--parallel", jobs], log, left, True)
        if rc != 0:
            return "failed", "CMake build " + ("timed out" if rc is None else f"exited {rc}")
        probe = "import effattn, effattn._C as m; print(m.with_cuda, effattn.backends())"
        res = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env=self.env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        if res.returncode != 0:
            return "failed", f"built, but effattn._C does not load: {res.stderr[-1500:]}"
        detail = f"effattn._C with_cuda, backends: {res.stdout.strip()}"
        if not cuda:
            why = "nvcc not found" if nvcc is None else "no CUDA device capability"
            return "failed", f"CPU part only ({why}); {detail}"
        return "ok", f"sm_{arch}; {detail}"

    def tests(self, limit: float):
        files = sorted(
            str(p.relative_to(ROOT))
            for p in (ROOT / "tests").glob("test_*.py")
            if "mark.gpu" in p.read_text()
        )
        xml = self.out / "tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={xml}"]
        if self.doc["versions"].get("pytest_timeout"):
            cmd.append(f"--timeout={self.test_timeout_s}")
        else:  # the configuration's `timeout` key is unknown then: no strict configuration
            cmd += ["-o", "addopts=-ra"]
        rc = self.run(cmd + files, self.out / "tests.log", limit)
        counts = _junit(xml) if rc is not None else None
        self.doc["tests"] = {"files": files, "exit_code": rc, **(counts or {})}
        if rc is None:
            return "timeout", f"pytest killed at {limit:.0f} s (tests.log has what ran)"
        if counts is None:
            return "failed", f"pytest exited {rc} without a report"
        detail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        return ("ok" if rc in (0, 5) else "failed"), detail

    def benchmark(self, limit: float):
        """The worker, restarted after a case that crashed it or broke its CUDA context (a
        fault in an untried kernel must not take the cases after it along)."""
        rows_path = self.out / "bench_rows.jsonl"
        rows_path.write_text("")
        end = time.monotonic() + limit
        # Each worker stops itself before its limit; a case that runs on past it is killed.
        grace = 15.0
        starts, rc = 0, 0
        while starts < 6:
            left = end - time.monotonic()
            if left < grace + 1:
                break
            cmd = [sys.executable, str(Path(__file__).resolve()), str(self.out), "--worker"]
            cmd += ["--deadline-s", f"{left - grace:.0f}"] + (["--dry-run"] if self.dry_run else [])
            rc = self.run(cmd, self.out / "bench.log", left, append=starts > 0)
            starts += 1
            plan, rows, started = _read_rows(rows_path)
            lost = [c for c in started if c not in {r["case"] for r in rows}]
            if lost:  # the case a worker was in when it died or was killed
                why = "killed at the time limit" if rc is None else f"the worker died (exit {rc})"
                with open(rows_path, "a") as f:
                    for case in lost:
                        f.write(
                            json.dumps({**plan.get(case, {}), "case": case, "error": why}) + "\n"
                        )
            if rc != RESTART and (rc == 0 or rc is None or not lost):
                break
        plan, rows, _ = _read_rows(rows_path)
        done = {r["case"] for r in rows}
        rows += [
            {**c, "skipped": "not reached: out of time"} for k, c in plan.items() if k not in done
        ]
        self.doc["rows"] = rows
        measured = sum("ms" in r for r in rows)
        detail = f"{measured} of {len(plan)} cases measured"
        errors = sum("error" in r for r in rows)
        detail += f", {errors} errors" if errors else ""
        detail += f", {starts} worker starts" if starts > 1 else ""
        if rc is None:
            return "timeout", f"worker killed at its limit; {detail}"
        if rc not in (0, RESTART) and not measured:
            return "failed", f"worker exited {rc}; {detail}"
        return ("ok" if measured else "failed"), detail


def _read_rows(path: Path):
    """(plan by case, finished rows, cases started) from the worker's rows file."""
    plan, rows, started = {}, [], []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if "plan" in item:
            plan = {c["case"]: c for c in item["plan"]}
        elif "started" in item:
            started.append(item["started"])
        else:
            rows.append(item)
    return plan, rows, started


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]  # fmt: skip
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _tool(name: str) -> str | None:
    """A build tool: on PATH, beside this Python (a virtual environment's bin/), or from its
    Python package (the cmake and ninja wheels)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    probe = {"cmake": "import cmake; print(cmake.CMAKE_BIN_DIR)", "ninja": "import ninja; print(ninja.BIN_DIR)"}  # fmt: skip
    if name not in probe:
        return None
    try:
        res = subprocess.run([sys.executable, "-c", probe[name]], capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    exe = Path(res.stdout.strip()) / name
    return str(exe) if res.returncode == 0 and os.access(exe, os.X_OK) else None


def _version_line(cmd: list[str]) -> str | None:
    """The line of a --version style output that names the version (nvcc's "release" line),
    None when the command fails."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        return None
    return next((ln for ln in lines if re.search(r"release|version", ln, re.I)), lines[0])


def _junit(path: Path) -> dict | None:
    """Test counts and the failed tests' names and messages from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or "").splitlines()
            counts["failures"].append({"test": name, "message": (message or [""])[0][:500]})
    return counts


# --------------------------------------------------------------------------- summary
def _cell(row: dict | None, tflops: bool = True) -> str:
    if row is None:
        return "-"
    if "ms" not in row:
        return "error" if "error" in row else "skipped"
    tf = f" ({row['tflops']:.3g})" if tflops and row.get("tflops") is not None else ""
    return f"{row['ms']:.3f}{tf}"


def summary(doc: dict) -> str:
    """Markdown: the steps, the tests, and the benchmark tables (ms, TFLOP/s on useful
    entries in parentheses)."""
    name = doc["machine"].get("name", "?")
    lines = [f"# GPU check{' (dry run)' if doc['dry_run'] else ''}: {name}, {doc['date']}", ""]
    lines += ["| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in doc["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('detail', '')} |")
    t = doc.get("tests")
    if t and "failures" in t:
        lines += ["", f"Tests (`pytest -m gpu`): {t['passed']} passed, {t['failed']} failed, "
                  f"{t['errors']} errors, {t['skipped']} skipped."]  # fmt: skip
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in t["failures"][:30]]
    rows = [r for r in doc["rows"] if "family" in r]
    index = {}
    for r in rows:
        index[(r["family"], r["method"], r.get("backend"), r.get("pattern"), r.get("n"),
               r["d"], r["pass"])] = r  # fmt: skip
    # In the order measured: patterns as bench_patterns lists them, then n, D and pass.
    order = list(PATTERN_NAMES)
    sparse = sorted(
        {(r["pattern"], r["n"], r["d"], r["pass"]) for r in rows if r["family"] == "sparse"},
        key=lambda c: (order.index(c[0]) if c[0] in order else len(order), *c[1:]),
    )
    if sparse:
        fast = "cpu" if doc["dry_run"] else "triton"
        lines += ["", "Block-sparse attention, ms (TFLOP/s on useful entries):", ""]
        lines += [f"| pattern | n | D | pass | SDPA causal | effattn {fast} | effattn cuda "
                  f"| FlexAttention | {fast} vs SDPA | {fast} vs Flex |",
                  "|" + " --- |" * 10]  # fmt: skip
        for pattern, n, d, ps in sparse:
            base = index.get(("sparse", "sdpa", _sdpa(doc), "causal()", n, d, ps))
            main = index.get(("sparse", "effattn", fast, pattern, n, d, ps))
            cuda = index.get(("sparse", "effattn", "cuda", pattern, n, d, ps))
            flex = index.get(("sparse", "flex", "flex_attention", pattern, n, d, ps))
            lines.append(
                f"| `{pattern}` | {n} | {d} | {ps} | {_cell(base)} | {_cell(main)} | "
                f"{_cell(cuda)} | {_cell(flex)} | {_ratio(base, main)} | {_ratio(flex, main)} |"
            )
    xl = sorted({(r["n"], r["d"], r["pass"]) for r in rows if r["family"] == "xl"})
    if xl:
        fast = "cpu" if doc["dry_run"] else "triton"
        lines += ["", "Transformer-XL attention (L = M), ms (TFLOP/s on useful entries):", ""]
        lines += [f"| L = M | D | pass | original | effattn {fast} | effattn cuda | {fast} vs "
                  "original |", "|" + " --- |" * 7]  # fmt: skip
        for n, d, ps in xl:
            orig = index.get(("xl", "original", "pytorch", None, n, d, ps))
            main = index.get(("xl", "effattn", fast, None, n, d, ps))
            cuda = index.get(("xl", "effattn", "cuda", None, n, d, ps))
            lines.append(
                f"| {n} | {d} | {ps} | {_cell(orig)} | {_cell(main)} | {_cell(cuda)} | "
                f"{_ratio(orig, main)} |"
            )
    problems = [r for r in doc["rows"] if "error" in r]
    if problems:
        lines += ["", "Errors:"]
        lines += [f"- {r['case']}: {r['error'][:300]}" for r in problems[:40]]
    unreached = [r["case"] for r in doc["rows"] if r.get("skipped", "").startswith("not reached")]
    if unreached:
        lines += ["", f"Not reached in time: {len(unreached)} cases ({', '.join(unreached[:12])}"
                  f"{', ...' if len(unreached) > 12 else ''})."]  # fmt: skip
    return "\n".join(lines)


def _sdpa(doc: dict) -> str:
    return "sdpa" if doc["dry_run"] else "sdpa_flash"


def _ratio(slow: dict | None, fast: dict | None) -> str:
    if not slow or not fast or "ms" not in slow or "ms" not in fast:
        return "-"
    return f"{slow['ms'] / fast['ms']:.2f}x"


# --------------------------------------------------------------------------- benchmark worker
PATTERN_NAMES = ("strided(128)", "fixed(128, 16)", "causal()")
"""The block-sparse patterns measured (names only: the parent process never imports effattn,
so that the results are written whatever state the checkout is in)."""


def bench_patterns() -> dict:
    """The block-sparse patterns measured, by name."""
    from effattn import patterns

    pats = {p.name: p for p in (patterns.strided(128), patterns.fixed(128, 16), patterns.causal())}
    if tuple(pats) != PATTERN_NAMES:
        raise RuntimeError(f"pattern names changed: {tuple(pats)} != {PATTERN_NAMES}")
    return pats


def bench_cases(dry_run: bool) -> list[dict]:
    """The cases in the order they run (module docstring): each a dict of what identifies its
    row ("case", "family", "method", "backend", pattern, sizes, "pass")."""
    fast = "cpu" if dry_run else "triton"
    sdpa = _sdpa(dict(dry_run=dry_run))
    sizes, d_list = ([256, 512], [64]) if dry_run else ([8192, 16384], [64, 128])
    xl_sizes = [128] if dry_run else [2048]
    groups: list[list[dict]] = [[], [], [], []]  # Triton + SDPA, XL, CUDA C++, FlexAttention
    for n in sizes:
        for d in d_list:
            for ps in ("fwd", "fwd+bwd"):
                base = {"family": "sparse", "n": n, "d": d, "pass": ps}
                groups[0].append({**base, "method": "sdpa", "backend": sdpa, "pattern": "causal()"})
                for name in PATTERN_NAMES:
                    case = {**base, "pattern": name}
                    groups[0].append({**case, "method": "effattn", "backend": fast})
                    groups[2].append({**case, "method": "effattn", "backend": "cuda"})
                    groups[3].append({**case, "method": "flex", "backend": "flex_attention"})
    for n in xl_sizes:
        for d in d_list:
            for ps in ("fwd", "fwd+bwd"):
                base = {"family": "xl", "n": n, "L": n, "M": n, "d": d, "pass": ps}
                groups[1].append({**base, "method": "original", "backend": "pytorch"})
                groups[1].append({**base, "method": "effattn", "backend": fast})
                groups[2].append({**base, "method": "effattn", "backend": "cuda"})
    cases = [c for g in groups for c in g]
    for c in cases:
        where = c["pattern"] if c["family"] == "sparse" else "XL L=M"
        c["case"] = f"{c['method']}/{c['backend']} {where} n={c['n']} D={c['d']} {c['pass']}"
    return cases


def bench_worker(out: Path, deadline_s: float, dry_run: bool) -> int:
    """Measure the cases (module docstring) until the deadline, one JSON line per row."""
    end = time.monotonic() + deadline_s
    sys.path.insert(0, str(BENCH))
    import common  # noqa: F401  (it decides which effattn is imported)
    import sparse_attention
    import torch
    import xl_attention

    import effattn
    from effattn import patterns

    device = "cpu" if dry_run else "cuda"
    dtype = torch.bfloat16
    fast = "cpu" if dry_run else "triton"
    available = set(effattn.backends())
    # FlexAttention recompiles for every pattern and shape (12 here, fwd and bwd): past
    # dynamo's default limit of 8 it would silently run uncompiled, materializing the scores.
    import torch._dynamo

    limit = next(n for n in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, n))  # fmt: skip
    setattr(torch._dynamo.config, limit, 64)
    print(f"effattn from {Path(effattn.__file__).parent}; backends {sorted(available)}")
    timer = _timer(device)
    state = {}  # the compiled flex_attention
    outputs = {}  # effattn's forward outputs, for the other methods' differences

    def sparse(c):
        n, d = c["n"], c["d"]
        b, h = (1, 2) if dry_run else (max(1, 16384 // n), 16)
        q, k, v, dout = _inputs(b, h, n, d, device, dtype, grad=c["pass"] == "fwd+bwd")
        pattern = None if c["method"] == "sdpa" else bench_patterns()[c["pattern"]]
        causal_useful = b * patterns.causal().count_allowed(n, n, h)
        useful = causal_useful if pattern is None else b * pattern.count_allowed(n, n, h)
        if c["method"] == "sdpa":
            fn = _sdpa_fn(q, k, v, device)
        elif c["method"] == "effattn":
            fn = lambda: effattn.sparse_attention(q, k, v, pattern, backend=c["backend"])
        else:
            mask_mod = sparse_attention.flex_mask_mod(pattern)
            fn = _flex_fn(q, k, v, mask_mod, n, device, state)
        ms, peak, out = _measure(fn, (q, k, v), dout, timer, device)
        row = {"b": b, "h": h, "dtype": "bfloat16", "useful": useful, "ms": ms, "peak_mib": peak}
        row.update(density_vs_causal=useful / causal_useful)
        row["tflops"] = _tflops(4 * d * useful, c["pass"], ms)
        key = (c["pattern"], n, d)
        if c["method"] == "flex":
            row["compiled"] = device == "cuda"
        if c["pass"] == "fwd" and c["method"] == "effattn" and c["backend"] == fast:
            outputs[key] = out
        elif c["pass"] == "fwd" and key in outputs and c["method"] != "sdpa":
            row[f"max_abs_diff_vs_{fast}"] = (out.float() - outputs[key].float()).abs().max().item()
        return row

    def xl(c):
        n, d = c["n"], c["d"]
        b, h = (1, 2) if dry_run else (2, 8)
        grad = c["pass"] == "fwd+bwd"
        inputs = xl_attention.kernel_inputs(b, h, n, d, device, dtype, grad)
        q, k, v, r, u, vb = inputs
        if c["method"] == "original":
            fn = lambda: xl_attention.original_xl(q, k, v, r.flip(1), u, vb, d**-0.5)
        else:
            fn = lambda: effattn.xl_attention(q, k, v, r, u, vb, backend=c["backend"])
        ms, peak, _ = _measure(fn, inputs, torch.randn_like(q), timer, device)
        useful = b * h * (n * n + n * (n + 1) // 2)  # L = M = n: query i sees M + i + 1 keys
        tflops = _tflops(6 * d * useful, c["pass"], ms)
        return {"b": b, "h": h, "dtype": "bfloat16", "useful": useful, "ms": ms,
                "peak_mib": peak, "tflops": tflops}  # fmt: skip

    cases = bench_cases(dry_run)
    _, finished, _ = _read_rows(out / "bench_rows.jsonl")  # by an earlier worker of this run
    done = {r["case"] for r in finished}
    with open(out / "bench_rows.jsonl", "a") as rows:

        def emit(item: dict) -> None:
            rows.write(json.dumps(item) + "\n")
            rows.flush()  # what is written stays when the parent kills this process
            if "case" in item:
                what = item.get("error") or item.get("skipped") or f"{item['ms']:.3f} ms"
                tf = f", {item['tflops']:.1f} TFLOP/s" if item.get("tflops") else ""
                took = deadline_s - (end - time.monotonic())
                print(f"[+{took:5.0f}s] {item['case']}: {what}{tf}", flush=True)

        if not done:
            emit({"plan": cases})
        for c in cases:
            if c["case"] in done:
                continue
            if time.monotonic() > end:
                break  # the parent lists the cases not reached
            if c["backend"] in ("triton", "cuda", "cpu") and c["backend"] not in available:
                emit({**c, "skipped": f"effattn backend {c['backend']!r} is not available here"})
                continue
            emit({"started": c["case"]})
            try:
                row = sparse(c) if c["family"] == "sparse" else xl(c)
            except Exception as e:  # one case's failure is its row; the benchmark goes on
                oom = device == "cuda" and isinstance(e, torch.OutOfMemoryError)
                row = {"error": "out of memory" if oom else f"{type(e).__name__}: {str(e)[:2000]}"}
                if device == "cuda" and _breaks_the_context(e):
                    emit({**c, **row, "restart": True})
                    return RESTART  # a fresh process gets a fresh CUDA context
            emit({**c, **row})
            if device == "cuda":
                torch.cuda.empty_cache()
    return 0


def _breaks_the_context(e: Exception) -> bool:
    """Whether a CUDA error is sticky: after an illegal address, a device-side assert or a
    launch failure every later call in the process fails too."""
    text = str(e)
    sticky = ("illegal memory access", "illegal address", "device-side assert",
              "unspecified launch failure", "misaligned address", "illegal instruction")  # fmt: skip
    return type(e).__name__ == "AcceleratorError" or any(m in text for m in sticky)


def _inputs(b, h, n, d, device, dtype, grad: bool):
    """q, k, v (requiring grad for a backward) and an output gradient, the same values for
    every method of a case."""
    import torch

    g = torch.Generator(device=device).manual_seed(n * 1000 + d)
    q, k, v, dout = (
        torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(4)
    )
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), dout


def _sdpa_fn(q, k, v, device):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device != "cuda":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _flex_fn(q, k, v, mask_mod, n, device, state):
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)
    if device == "cuda":
        if "compiled" not in state:
            import torch

            state["compiled"] = torch.compile(flex_attention)
        fa = state["compiled"]
        return lambda: fa(q, k, v, block_mask=block_mask)

    def eager():  # the dry run: uncompiled, which flex_attention warns about on every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, block_mask=block_mask)

    return eager


def _timer(device: str):
    """ms of one call: do_bench's median on CUDA, the median of 3 timed calls on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn, grads: do_bench(
            fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median"
        )

    def cpu(fn, grads):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            for g in grads:
                g.grad = None
        return sorted(times)[1]

    return cpu


def _measure(fn, inputs, dout, timer, device: str):
    """(median ms, extra peak MiB or None, the forward output) of fn, and of its backward
    when the inputs require grad."""
    import torch

    backward = any(t.requires_grad for t in inputs)

    def step():
        out = fn()
        if backward:
            out.backward(dout)
        return out

    def clear():
        for t in inputs:
            t.grad = None

    out = step().detach()  # compilation and JIT outside the measurement
    clear()
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        clear()
    return timer(step, inputs), peak, out


def _tflops(fwd_flops: float, ps: str, ms: float) -> float:
    return fwd_flops * (3.5 if ps == "fwd+bwd" else 1.0) / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, help="where the results go (created)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU, tiny sizes")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's limit")
    ap.add_argument(
        "--test-timeout", type=int, default=TEST_TIMEOUT_S, help="each GPU test's limit, s"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return bench_worker(args.out_dir.resolve(), args.deadline_s, args.dry_run)

    check = Check(args.out_dir.resolve(), args.dry_run, args.budget_s, args.test_timeout)

    def stop(signum, frame):  # an outer limit: leave through the finally below
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        check.step("environment", check.environment, CAPS["environment"])
        check.step("build", check.build, CAPS["build"])
        check.step("tests", check.tests, max(30.0, min(CAPS["tests"], check.left() - BENCH_MIN_S)))
        check.step("benchmark", check.benchmark, None)
    finally:
        check.write()
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'summary.md'}")
    return 0 if all(s["status"] == "ok" for s in check.doc["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
