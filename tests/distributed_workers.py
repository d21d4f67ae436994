"""Multi-process tests that cannot hang.

`run_workers(target, world)` runs `target(rank, world, *args)` in `world` spawned processes joined
by a gloo process group, and returns the value each rank returned, in rank order.

Two things make it hang-proof:

- A worker never runs torch's distributed teardown. Freeing a DDP model's `Reducer` after the
  process group is destroyed joins gloo's run-loop thread while the main thread holds the GIL,
  and that thread waits for the GIL to decref a Python object: the worker never exits. So a
  worker saves its result, meets the other ranks at a barrier (every collective of every rank is
  then complete), and leaves with `os._exit`, running no destructor at all.
- The parent never waits forever: it joins with a deadline; workers still alive then are killed
  and the test fails naming itself. Collectives get the same deadline as their own timeout, so a
  rank whose peer died raises instead of blocking.

Every multi-process test uses this module; none calls `mp.spawn` or `Process.join()` without a
limit.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

# Under pytest-timeout's per-test default (pyproject.toml) with room for the parent to kill the
# workers and report.
DEFAULT_TIMEOUT_S = 120.0


def _worker(target, rank, world, init_file, out_dir, timeout_s, args):
    """Body of one spawned worker; never returns (leaves through `os._exit`)."""
    import torch.distributed as dist

    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = target(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:  # a worker reports every failure, KeyboardInterrupt too, then exits
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]


def run_workers(target, world: int, *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Run `target(rank, world, *args)` on `world` gloo ranks; return each rank's result.

    target: a module-level function (spawned workers import it by name); its result must be
        picklable by `torch.save`. args: picklable extra arguments.
    timeout_s: wall-clock limit for the whole group, also each collective's timeout.

    Fails the calling test (naming it) if a worker raises, exits abnormally or outlives the limit;
    live workers are killed first.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="effattn-workers-") as out_dir:
        init_file = os.path.join(out_dir, "init")
        procs = [
            ctx.Process(
                target=_worker,
                args=(target, rank, world, init_file, out_dir, timeout_s, args),
                daemon=True,  # if the parent itself dies, the workers die with it
            )
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(10.0)
        errors = {
            rank: Path(out_dir, f"rank{rank}.err").read_text()
            for rank in range(world)
            if Path(out_dir, f"rank{rank}.err").exists()
        }
        if errors:
            details = "\n".join(f"--- rank {rank}:\n{tb}" for rank, tb in sorted(errors.items()))
            pytest.fail(f"{_current_test()}: worker(s) {sorted(errors)} raised\n{details}")
        if alive:
            pytest.fail(
                f"{_current_test()}: worker(s) {alive} of {world} still running after "
                f"{timeout_s:g} s; killed"
            )
        bad = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode != 0}
        if bad:
            pytest.fail(f"{_current_test()}: worker(s) exited abnormally (rank: code) {bad}")
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(world)]
