"""Shared test set-up.

Without a GPU, Triton kernels run in its CPU interpreter; the flag must be set before Triton is
first imported, so it is set here, ahead of every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels compiled for the host with the emulator (tests/cuda_emulator.py)."""
    import cuda_emulator

    try:
        return cuda_emulator.load()
    except RuntimeError as e:
        pytest.fail(str(e))
