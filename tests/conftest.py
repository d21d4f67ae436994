"""Shared test set-up.

Without a GPU, Triton kernels run in its CPU interpreter; the flag must be set before Triton is
first imported, so it is set here, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
