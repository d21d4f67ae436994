"""Shared pieces of the benchmark scripts: machine and versions, timing, peak memory, JSON.

Every family script (cpu_attention.py, xl_attention.py, paper_table2.py, and bench/run.py for
sparse_attention.py) writes one JSON file per run with the same header:

    {"family": ..., "device": "cpu" | "cuda", "machine": {...}, "versions": {...},
     "date": ISO 8601 UTC, "args": {...}, "rows": [...], ...family-specific keys}

``machine`` names the device (GPU name, or CPU model and torch threads), and holds the load
average at the start and at the end of the run: these machines are shared, and a loaded
machine inflates wall times, so a reader needs it to judge the figures. ``rows`` holds every
figure; timed rows carry the raw samples and their summary (``summarize``).

Timing (``measure``): warm-up calls first (compilation, layouts, caches), then ``repeats``
timed calls. On CUDA each call is timed by CUDA events around it (the GPU's own clock, no
host-side launch noise); on CPU by ``time.perf_counter`` plus ``time.process_time``, the
process's CPU time over all its threads, which other processes' load does not inflate (it
does include idle worker threads spinning).

What ran: the scripts import effattn as installed (an editable install of this checkout, or a
wheel), and use the checkout's own package only where none is installed. Each family asks
``require_backend`` for the effattn backend it measures (on CPU the C++ kernels, "cpu"; on CUDA,
"triton"; or the one given with --backend), passes that name explicitly to every effattn call,
so that no call can fall back to another backend, and writes it into every row it measures
(``"backend"``; rows of other implementations name theirs: "sdpa", "flex_attention",
"pytorch"). A family whose backend is missing refuses to run (``BackendMissing``) and says why:
a checkout without the built extension would otherwise time the blockwise "torch" path, up to
180x slower, under the C++ kernels' name. ``versions()`` records which effattn was imported.

Peak memory (``PeakMemory``): on CUDA, ``torch.cuda.max_memory_allocated`` over the call minus
what was allocated before it. On CPU (Linux), the growth of the process's resident set over
the call: free heap memory is returned to the OS (``malloc_trim``) and the high-water mark
VmHWM is reset (``/proc/self/clear_refs``) just before it, so peak - baseline counts every page
the call touched (PyTorch's allocations, an extension's own buffers, library internals) and
nothing left over from earlier cases. Inputs that exist before the call are in the baseline;
outputs and gradients count as extra. ``None`` where /proc is missing.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
try:  # the installed effattn first (module docstring)
    import effattn  # noqa: F401
except ImportError:  # run from a checkout without installing: its package, last on the path
    sys.path.append(str(ROOT))

# What each device's families measure when --backend is "auto": what effattn's "auto" picks
# when everything is built.
INTENDED_BACKEND = {"cpu": "cpu", "cuda": "triton"}


class BackendMissing(RuntimeError):
    """The effattn backend a family measures cannot run here (the message says why)."""


def require_backend(family: str, device: str, backend: str = "auto") -> str:
    """The effattn backend name ``family`` measures on ``device``: ``backend``, or for "auto"
    the device's intended one (``INTENDED_BACKEND``). Raises BackendMissing when it cannot run
    here. The family passes the name to every effattn call and records it in its rows."""
    import effattn
    from effattn.ops import dispatch

    name = INTENDED_BACKEND[device] if backend == "auto" else backend
    if name == "reference" or name in effattn.backends():
        return name
    why = dispatch.get(name).unavailable() if name in dispatch.NAMES[2:] else None
    why = why or "effattn has no such backend"
    raise BackendMissing(
        f"{family} on {device} measures effattn backend {name!r}, which cannot run here: {why}. "
        f"(effattn imported from {Path(effattn.__file__).parent}; --backend torch measures the "
        "blockwise PyTorch path on purpose, where the script takes --backend.)"
    )


# --------------------------------------------------------------------------- machine
def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS does not report them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """A human-readable name: the GPU's name, or the CPU model and the torch thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def machine(device: str) -> dict:
    """Description of the machine at the start of a run (call it before measuring)."""
    info = {
        "name": device_name(device),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_capability"] = [props.major, props.minor]
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def versions() -> dict:
    """Versions of everything that shapes the figures, and the git commit measured."""
    import effattn

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    def git(*cmd: str) -> str | None:
        try:
            res = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        except OSError:
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    from effattn import _extension

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "effattn": getattr(effattn, "__version__", None),
        # Which effattn ran, and with which compiled parts (module docstring).
        "effattn_path": str(Path(effattn.__file__).parent),
        "effattn_backends": effattn.backends(),
        "effattn_extension": "loaded" if _extension.load() is not None else _extension.load_error,
        "git_commit": git("rev-parse", "HEAD"),
        # Uncommitted changes to tracked files: the commit alone does not describe the code.
        "git_dirty": None if status is None else bool(status),
    }


def slug(name: str) -> str:
    """A file-name-safe lower-case form of a name ("NVIDIA H100 80GB" -> "nvidia_h100_80gb")."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


# --------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def summarize(samples: list[float], prefix: str = "") -> dict:
    """Median, min, max, quartiles and IQR of samples, keyed ``<prefix>median_s`` etc."""
    s = sorted(samples)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {
        f"{prefix}median_s": statistics.median(s),
        f"{prefix}min_s": s[0],
        f"{prefix}max_s": s[-1],
        f"{prefix}q1_s": q1,
        f"{prefix}q3_s": q3,
        f"{prefix}iqr_s": q3 - q1,
    }


def measure(
    fn: Callable[[], object],
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    slow_s: float | None = None,
    slow_repeats: int = 3,
    memory: bool = True,
) -> dict:
    """Time ``fn`` (module docstring): the samples, their summary and the extra peak memory.

    Returns {"times_s": [...], "median_s", "min_s", "max_s", "q1_s", "q3_s", "iqr_s",
    "repeats", "extra_peak_mib"} and on CPU also "cpu_times_s" and "cpu_median_s" etc.
    When a warm-up call takes longer than ``slow_s``, at most ``slow_repeats`` timed calls run
    (a 30 s case repeated 5 times would dominate a suite). The peak memory comes from the first
    timed call, its reset made before the clock starts.
    """
    slow = False
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        sync(device)
        slow |= slow_s is not None and time.perf_counter() - t > slow_s
    if slow:
        repeats = min(repeats, slow_repeats)
    wall, cpu, peak = [], [], None
    for i in range(repeats):
        mem = PeakMemory(device) if memory and i == 0 else None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            wall.append(start.elapsed_time(end) / 1e3)
        else:
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        if mem is not None:
            peak = mem.extra_mib()
    row = {"times_s": wall, **summarize(wall), "repeats": len(wall), "extra_peak_mib": peak}
    if cpu:
        row["cpu_times_s"] = cpu
        row.update(summarize(cpu, "cpu_"))
    return row


# --------------------------------------------------------------------------- memory
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory a region adds (module docstring): create it just before, then extra_mib()."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            self.base = None
            return
        self.base = _status_kib("VmRSS")

    def extra_mib(self) -> float | None:
        """MiB above the baseline at the highest point since construction (None if unknown)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self.base is None or (hwm := _status_kib("VmHWM")) is None:
            return None
        return max(0, hwm - self.base) / 1024


# --------------------------------------------------------------------------- output
class Progress:
    """Prints ``[label +m:ss] message`` lines, flushed, with the time since creation."""

    def __init__(self, label: str):
        self.label, self.t0 = label, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        m, s = divmod(int(self.elapsed()), 60)
        print(f"[{self.label} +{m}:{s:02d}] {message}", flush=True)


def payload(family: str, device: str, machine_info: dict, args: dict, rows: list, **extra) -> dict:
    """The standard result document; machine_info from machine() at the start of the run."""
    info = dict(machine_info, load_average_end=load_average())
    return {
        "family": family,
        "device": device,
        "machine": info,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": args,
        "rows": rows,
        **extra,
    }


def result_path(family: str, device: str, quick: bool = False, tag: str = "") -> Path:
    """bench/results/<family>_<device>[_<tag>][_quick].json; on CUDA the device is the GPU's
    name, so that runs on different GPUs do not overwrite each other."""
    dev = slug(torch.cuda.get_device_name()) if device == "cuda" else "cpu"
    parts = [family, dev] + ([tag] if tag else []) + (["quick"] if quick else [])
    return RESULTS / ("_".join(parts) + ".json")


def write_json(doc: dict, path: Path) -> Path:
    """Write a result document (indented JSON) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def is_result(doc: object) -> bool:
    """Whether a loaded JSON document has the standard header (older files do not)."""
    keys = {"family", "device", "machine", "versions", "date", "args", "rows"}
    return isinstance(doc, dict) and keys <= doc.keys()


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted with str)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
