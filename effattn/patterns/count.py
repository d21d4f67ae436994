"""Counting allowed entries without an n x n mask.

The planner and the patterns both count (densities, work efficiencies, FLOPs in benchmarks),
so the counts live here, below both: strided and fixed have closed forms per query row, other
term patterns are counted block by block from their layouts (full blocks in bulk, partial ones
element by element).
"""

from __future__ import annotations

import torch

from effattn.patterns.layout import block_elements, term_layout
from effattn.patterns.terms import Term, count_columns, or_terms

__all__ = ["count_fixed", "count_strided", "count_terms"]


def _rows(n_q: int, n_k: int) -> torch.Tensor:
    """Absolute positions of the query rows (end-aligned), int64."""
    return torch.arange(n_k - n_q, n_k, dtype=torch.int64)


def count_strided(stride: int, causal: bool, n_q: int, n_k: int) -> int:
    """Allowed entries of ``strided(stride, causal=causal)`` for one head."""
    p = _rows(n_q, n_k)
    if causal:
        # The band's min(l, p + 1) keys, then one key per multiple of l up to p.
        per_row = (p + 1).clamp(max=stride) + p // stride
    else:
        band = (p + stride - 1).clamp(max=n_k - 1) - (p - stride + 1).clamp(min=0) + 1
        per_row = band + p // stride + (n_k - 1 - p) // stride
    return int(per_row.sum())


def count_fixed(
    stride: int, summary: int, num_patterns: int, causal: bool, n_q: int, n_k: int, heads: int
) -> int:
    """Allowed entries of ``fixed(stride, summary, num_patterns, causal=causal)`` over heads."""
    p = _rows(n_q, n_k)
    w0 = (p // stride) * stride
    total = 0
    for h in range(heads):
        r = h % num_patterns
        cols = Term(smod=stride, smin=stride - (r + 1) * summary, smax=stride - r * summary - 1)
        if causal:
            per_row = (p - w0 + 1) + count_columns(w0 - 1, cols)
        else:
            w1 = (w0 + stride - 1).clamp(max=n_k - 1)
            in_window = count_columns(w1, cols) - count_columns(w0 - 1, cols)
            per_row = (w1 - w0 + 1) + count_columns(torch.tensor(n_k - 1), cols) - in_window
        total += int(per_row.sum())
    return total


def count_terms(
    classes: tuple[tuple[Term, ...], ...], n_q: int, n_k: int, heads: int, block: int = 128
) -> int:
    """Allowed entries of a term pattern over ``heads`` heads (head h uses class h % P)."""
    lay = term_layout(classes, n_q, n_k, n_k - n_q, block, block)
    per_class = []
    rows = (n_q - torch.arange(lay.num_q_blocks) * block).clamp(max=block)
    cols = (n_k - torch.arange(lay.num_k_blocks) * block).clamp(max=block)
    for c, terms in enumerate(classes):
        idx = lay.kv_full_idx[c].long()
        total = int((torch.where(idx >= 0, cols[idx.clamp(min=0)], 0).sum(-1) * rows).sum())
        pidx = lay.kv_part_idx[c].long()
        qb, slot = (pidx >= 0).nonzero(as_tuple=True)
        for i, j, valid in block_elements(n_q, n_k, block, block, qb, pidx[qb, slot]):
            total += int((or_terms(terms, i + lay.q_offset, j) & valid).sum())
        per_class.append(total)
    return sum(per_class[h % len(classes)] for h in range(heads))
