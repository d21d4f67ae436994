"""The hang-proof multi-process harness (tests/distributed_workers.py) works as promised."""

import time

import pytest
import torch
from distributed_workers import run_workers


def _rank_sum(rank, world, offset):
    import torch.distributed as dist

    x = torch.tensor([float(rank + offset)])
    dist.all_reduce(x)
    return {"rank": rank, "sum": x}


def _sleep_forever(rank, world):
    if rank == 1:
        time.sleep(3600)
    return rank


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    return rank


def test_results_come_back_in_rank_order():
    results = run_workers(_rank_sum, 3, 10)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["sum"].item() == 33.0 for r in results)


def test_a_hanging_worker_is_killed_and_the_test_named():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        run_workers(_sleep_forever, 2, timeout_s=5)
    msg = str(info.value)
    assert "test_a_hanging_worker_is_killed_and_the_test_named" in msg
    assert "still running" in msg and "killed" in msg
    # Rank 0 waits in the barrier for the sleeping rank: both are stopped, well before an hour.
    assert time.monotonic() - start < 60


def test_a_raising_worker_reports_its_traceback():
    with pytest.raises(pytest.fail.Exception) as info:
        run_workers(_raise_on_rank_1, 2, timeout_s=60)
    msg = str(info.value)
    # Rank 0's barrier fails too once rank 1 has left; rank 1's own traceback is in the report.
    rank1 = msg.split("--- rank 1:")[1]
    assert "rank 1 failed on purpose" in rank1 and "_raise_on_rank_1" in rank1


def test_world_must_be_positive():
    with pytest.raises(ValueError, match="world"):
        run_workers(_rank_sum, 0, 0)
