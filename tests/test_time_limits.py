"""The pytest configuration turns a hanging test into a named failure instead of a hung run.

Each case runs pytest in a subprocess on a generated test file, with the repository's own
configuration and only its limits shortened.
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _run_pytest(tmp_path, body, *overrides):
    (tmp_path / "test_hang.py").write_text(textwrap.dedent(body))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(PYPROJECT),
           "--rootdir", str(tmp_path), *overrides, str(tmp_path / "test_hang.py")]  # fmt: skip
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return res, time.monotonic() - start


def test_a_hanging_test_fails_by_its_time_limit_and_the_run_goes_on(tmp_path):
    res, took = _run_pytest(
        tmp_path,
        """
        import time

        def test_sleeps_far_too_long():
            time.sleep(3600)

        def test_after_it():
            pass
        """,
        "-o", "timeout=3",
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout and "test_sleeps_far_too_long" in res.stdout, res.stdout
    assert "Timeout" in res.stdout and "1 failed, 1 passed" in res.stdout, res.stdout
    assert took < 60


def test_a_test_stuck_where_no_signal_lands_ends_the_run_with_its_stack(tmp_path):
    """With SIGALRM blocked (as in C code that never returns), faulthandler ends the run."""
    res, took = _run_pytest(
        tmp_path,
        """
        import signal
        import time

        def test_stuck_without_signals():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        """,
        "-o", "timeout=2", "-o", "faulthandler_timeout=5",
    )  # fmt: skip
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Timeout" in out and "in test_stuck_without_signals" in out, out
    assert took < 60
