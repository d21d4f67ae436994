"""Replacements for attention code that other libraries removed.

- :mod:`effattn.compat.deepspeed`: DeepSpeed's sparse attention (its sparsity configs with
  ``make_layout`` and a ``pattern()`` for effattn, and ``SparseSelfAttention``).
"""
