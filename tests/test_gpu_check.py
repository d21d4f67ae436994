"""bench/gpu_check.py: its dry run walks every step on CPU and writes every result; the clock
stops a step that runs out of time, and the results are still written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import effattn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

OUTPUTS = {"gpu_check.json", "summary.md", "build.log", "tests.log", "tests.xml", "bench.log",
           "bench_rows.jsonl"}  # fmt: skip


@pytest.mark.timeout(150)  # the run's own budget (120 s, --budget-s) and a margin
def test_dry_run_walks_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/gpu_check.py", str(out), "--dry-run", "--budget-s", "120"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=145)
    doc = json.loads((out / "gpu_check.json").read_text())
    assert {p.name for p in out.iterdir()} == OUTPUTS  # at most 8 files come back from a GPU
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == ["environment", "build", "tests", "benchmark"]
    can_build = shutil.which("cmake") is not None
    want = {"environment": "ok", "build": "ok" if can_build else "failed"}
    want |= {"tests": "ok", "benchmark": "ok"}
    assert {k: s["status"] for k, s in steps.items()} == want, res.stdout + res.stderr
    assert res.returncode == (0 if can_build else 1)
    assert doc["dry_run"] and doc["device"] == "cpu" and doc["elapsed_s"] < 120
    assert doc["tests"]["failed"] == 0 and doc["tests"]["skipped"] > 0  # gpu tests skip on CPU

    rows = doc["rows"]
    assert [r["case"] for r in rows] == [c["case"] for c in gpu_check.bench_cases(True)]
    measured = [r for r in rows if "ms" in r]
    ours = [r for r in measured if r["method"] == "effattn"]
    assert {(r["family"], r["backend"]) for r in ours} == {("sparse", "cpu"), ("xl", "cpu")}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in measured)
    assert {r["backend"] for r in rows} >= {"sdpa", "cpu", "cuda", "flex_attention", "pytorch"}
    if "cuda" not in effattn.backends():
        assert all("skipped" in r for r in rows if r["backend"] == "cuda")
    # FlexAttention has no CPU backward: recorded as the error it raises, and the run went on
    flex_bwd = [r for r in rows if r["method"] == "flex" and r["pass"] == "fwd+bwd"]
    assert flex_bwd and all("backward on CPU" in r["error"] for r in flex_bwd)

    summary = (out / "summary.md").read_text()
    assert summary == doc["summary"] + "\n"
    assert "| `strided(128)` | 512 | 64 | fwd+bwd |" in summary and "| 128 | 64 | fwd |" in summary


def test_a_step_out_of_time_is_stopped_and_the_results_are_written(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True, budget_s=60, test_timeout_s=10)
    log = tmp_path / "sleep.log"
    assert check.run([sys.executable, "-c", "import time; time.sleep(60)"], log, 1) is None
    assert "killed at its time limit" in log.read_text()

    # the benchmark worker stops at its deadline (the limit less 15 s of grace for its last
    # case: 2 s here, about its imports), and the cases it did not reach are listed
    status, detail = check.benchmark(17)
    rows = check.doc["rows"]
    unreached = [r for r in rows if r.get("skipped") == "not reached: out of time"]
    assert unreached and len(rows) == len(gpu_check.bench_cases(True))
    measured = sum("ms" in r for r in rows)
    assert detail.startswith(f"{measured} of {len(rows)} cases measured")
    assert status == ("ok" if measured else "failed")
    assert "Not reached in time" in gpu_check.summary(check.doc)

    # a step whose time is gone is not started; the document is still written
    check.budget_s = 0
    check.step("tests", check.tests, 150)
    assert check.doc["steps"][-1]["status"] == "not reached"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][-1]["name"] == "tests"


FAKE_WORKER = """
import json, os, sys
rows = os.path.join(sys.argv[1], "bench_rows.jsonl")
lines = open(rows).read().splitlines()
emit = lambda item: open(rows, "a").write(json.dumps(item) + "\\n")
plan = [{"case": c, "family": "xl", "method": "effattn", "backend": "triton", "n": 1, "d": 64,
         "pass": "fwd"} for c in ("a", "b", "c")]
if not lines:  # the first worker: its first case takes the process down
    emit({"plan": plan})
    emit({"started": "a"})
    os._exit(139)
if any('"ms"' in line for line in lines):  # the third: nothing left to do
    sys.exit(0)
emit({"started": "b"})
emit({**plan[1], "ms": 1.0, "tflops": 1.0})
emit({"started": "c"})
emit({**plan[2], "error": "AcceleratorError: illegal memory access", "restart": True})
sys.exit(3)  # the second: a sticky CUDA error asks for a fresh process
"""


def test_a_crashed_worker_is_restarted_after_the_case_it_died_in(tmp_path, monkeypatch):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setattr(gpu_check, "__file__", str(fake))
    check = gpu_check.Check(tmp_path, dry_run=True, budget_s=60, test_timeout_s=10)
    status, detail = check.benchmark(40)
    assert [r["case"] for r in check.doc["rows"]] == ["a", "b", "c"]
    rows = {r["case"]: r for r in check.doc["rows"]}
    assert rows["a"]["error"] == "the worker died (exit 139)" and rows["a"]["backend"] == "triton"
    assert rows["b"]["ms"] == 1.0 and "illegal memory access" in rows["c"]["error"]
    assert status == "ok" and "3 worker starts" in detail
