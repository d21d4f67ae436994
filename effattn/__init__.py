"""effattn: fast attention kernels for long sequences.

Sparse Transformer patterns (strided, fixed, local, causal, custom) at block speed and fused
Transformer-XL relative attention, in Triton, CUDA C++ and C++ CPU kernels behind one API.
"""

from effattn import patterns, reference
from effattn.functional import backends, sparse_attention, xl_attention

__all__ = ["backends", "patterns", "reference", "sparse_attention", "xl_attention"]
__version__ = "0.1.0"
