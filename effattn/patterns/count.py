"""Counting allowed entries without an n x n mask.

The planner and the patterns both count (densities, work efficiencies, FLOPs in benchmarks),
so the counts live here, below both: strided and fixed have closed forms per query row, and so
does every class whose terms are pairwise disjoint bands, moduli and same-group constraints
(``column``, ``axial``, unions of ``local`` and ``column``); other term patterns are counted
block by block from their layouts (full blocks in bulk, partial ones element by element).
"""

from __future__ import annotations

import torch

from effattn.patterns.layout import block_elements, term_layout
from effattn.patterns.terms import GROUP_EQ, GROUP_LT, Term, count_columns, disjoint, or_terms

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


def _term_rows(t: Term, p: torch.Tensor, n_k: int) -> torch.Tensor | None:
    """Keys that ``t`` allows per query row at positions ``p``, or None without a closed form
    (columns constraints, groups of unequal sizes or "another group")."""
    if t.smod > 0 or (t.gq > 0 and (t.gq != t.gk or t.grel not in (GROUP_EQ, GROUP_LT))):
        return None
    j_lo = (p - t.hi).clamp(min=0)
    j_hi = (p - t.lo).clamp(max=n_k - 1)
    if t.gq > 0:
        start = (p // t.gq) * t.gq
        if t.grel == GROUP_EQ:
            j_lo, j_hi = torch.maximum(j_lo, start), torch.minimum(j_hi, start + t.gq - 1)
        else:
            j_hi = torch.minimum(j_hi, start - 1)
    if t.mod > 1:
        # Multiples of mod among the distances p - j in [p - j_hi, p - j_lo].
        d_lo, d_hi = p - j_hi, p - j_lo
        rows = d_hi // t.mod - (-(-d_lo // t.mod)) + 1
    else:
        rows = j_hi - j_lo + 1
    return torch.where(j_lo <= j_hi, rows.clamp(min=0), 0)


def _closed_form(terms: tuple[Term, ...], p: torch.Tensor, n_k: int) -> int | None:
    """Allowed entries of one class when its terms are pairwise disjoint and each has a
    closed form per row, else None."""
    if any(not disjoint(a, b) for k, a in enumerate(terms) for b in terms[k + 1 :]):
        return None
    total = 0
    for t in terms:
        rows = _term_rows(t, p, n_k)
        if rows is None:
            return None
        total += int(rows.sum())
    return total


def count_terms(
    classes: tuple[tuple[Term, ...], ...], n_q: int, n_k: int, heads: int, block: int = 128
) -> int:
    """Allowed entries of a term pattern over ``heads`` heads (head h uses class h % P)."""
    per_class: list[int | None] = [_closed_form(terms, _rows(n_q, n_k), n_k) for terms in classes]
    if any(c is None for c in per_class):
        lay = term_layout(classes, n_q, n_k, n_k - n_q, block, block)
        rows = (n_q - torch.arange(lay.num_q_blocks) * block).clamp(max=block)
        cols = (n_k - torch.arange(lay.num_k_blocks) * block).clamp(max=block)
    for c, terms in enumerate(classes):
        if per_class[c] is not None:
            continue
        idx = lay.kv_full_idx[c].long()
        total = int((torch.where(idx >= 0, cols[idx.clamp(min=0)], 0).sum(-1) * rows).sum())
        pidx = lay.kv_part_idx[c].long()
        qb, slot = (pidx >= 0).nonzero(as_tuple=True)
        for i, j, valid in block_elements(n_q, n_k, block, block, qb, pidx[qb, slot]):
            total += int((or_terms(terms, i + lay.q_offset, j) & valid).sum())
        per_class[c] = total
    counts = [n for n in per_class if n is not None]
    return sum(counts[h % len(classes)] for h in range(heads))
