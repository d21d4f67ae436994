"""Exact strided and fixed patterns at block speed: split into parts, merge by log-sum-exp.

The softmax over a union of disjoint key sets is the LSE-weighted combination of the softmaxes
over each set, so a pattern can be computed as several block-sparse attentions ("parts"), each
over a re-indexed sequence in which its keys form dense blocks:

``strided(l)``
    local band ``0 <= p - j < l``, in natural order; plus the columns ``(p - j) % l == 0,
    p - j >= l``. Viewing the sequence as [m, l] (m = ceil(n_k / l)) and transposing, the
    columns become strictly causal attention inside l contiguous chunks of length m.
``fixed(l, c, P)``
    same-window keys (block diagonal) in natural order; plus the summary columns of the other
    windows, gathered per head class into a compact key list in which a query of window W sees
    the first W * c keys (a prefix; all but its own window's when not causal).

A :class:`Part` carries its pattern in its own index space and the index maps from and to the
original rows: every backend runs the same generic block-sparse kernel on each part, and
:mod:`effattn.execute` merges the parts (and splits the gradients) with torch ops.
:func:`plan` keeps the natural order when the decomposition would not compute fewer entries
(short sequences, a few queries against many keys, parameters beyond the sequence). It decides
without laying out the natural order when a lower bound of that order's work already exceeds
the decomposition's, so that long sequences cost time in the blocks the parts visit.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from effattn.patterns import (
    BIG,
    GROUP_EQ,
    GROUP_LT,
    GROUP_NE,
    BlockLayout,
    Fixed,
    Pattern,
    Strided,
    Term,
    TermPattern,
)

__all__ = ["Part", "plan", "planned_work_efficiency"]


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
    """One block-sparse attention of a plan.

    Attributes:
        pattern: the pattern in this part's index space.
        n_q, n_k: the part's number of query rows and keys.
        q_offset: absolute position of part row 0 (part row i is at q_offset + i).
        q_index: int64 [n_q] original query row of each part row, -1 for a row computed only
            to keep blocks dense (its output is dropped); None for the identity.
        k_index: int64 [C, n_k] original key of each part key, for head class C (query head h
            uses class h % C), -1 for a padding key; None for the identity.
        key_padding: bool [C, n_k] True where k_index is -1 and the pattern could reach that
            key, so kernels must mask it; None when no such key exists.
        layout: the part's block layout for the block sizes the plan was made with.
        chunk: when set (to l), q_index and k_index are the transposition that sends slot
            x = a * l + b of the keys, padded to m * l rows, to b * m + a, so executors move
            rows with views instead of gathers. Parts without it keep the query rows as they
            are (q_index None).
        folded: with chunk, the same attention as l independent sequences of m rows (one
            chunk each, no grouping terms): for executors that can run the chunks as extra
            heads on strided views when every slot is a real row (n_q == n_k == m * l).
    """

    pattern: Pattern
    n_q: int
    n_k: int
    q_offset: int
    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    key_padding: torch.Tensor | None
    layout: BlockLayout
    chunk: int | None = None
    folded: Part | None = None

    def layout_for(self, block_m: int, block_n: int) -> BlockLayout:
        """This part's layout for other block sizes (e.g. the backward kernels'), cached."""
        device = self.layout.kv_full_num.device
        return self.pattern.layout(
            self.n_q, self.n_k, block_m, block_n, q_offset=self.q_offset, device=device
        )


def plan(
    pattern: Pattern, n_q: int, n_k: int, block_m: int = 64, block_n: int = 64, device=None
) -> tuple[Part, ...]:
    """The parts that compute ``pattern`` for n_q queries and n_k keys, cheapest first.

    Natural order (one part, identity maps) unless the pattern is a single ``strided`` or
    ``fixed`` and its decomposition computes fewer entries for these block sizes.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if pattern.is_custom:
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    kind = getattr(pattern, "kind", None)
    return _plan_cached(pattern.classes(), kind, n_q, n_k, block_m, block_n, device)


@functools.lru_cache(maxsize=128)
def _plan_cached(classes, kind, n_q, n_k, block_m, block_n, device) -> tuple[Part, ...]:
    pattern = TermPattern("plan", classes, kind=kind)
    # The decompositions compute every key slot as a row (the columns' chunks hold all n_k
    # positions): with few queries (decoding, short segments over long memories) that is more
    # than the natural order visits.
    few_queries = 2 * n_q < n_k
    if few_queries:
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    if isinstance(kind, Strided) and n_q > 0 and n_k > kind.stride:
        parts = _strided_parts(kind.stride, kind.causal, n_q, n_k, block_m, block_n, device)
    elif isinstance(kind, Fixed) and n_q > 0 and n_k > kind.stride:
        parts = _fixed_parts(
            kind.stride, kind.summary, kind.num_patterns, kind.causal, n_q, n_k, block_m,
            block_n, device,
        )  # fmt: skip
    else:
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    heads = len(classes)
    work = _work(parts, heads)
    if work < heads * _natural_work_bound(kind, n_q, n_k, block_m, block_n):
        return parts
    natural = (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    return parts if work < _work(natural, heads) else natural


def _natural_work_bound(kind: Strided | Fixed, n_q: int, n_k: int, block_m: int, block_n: int):
    """A lower bound of the entries one head class computes in natural order, in O(n_q / block_m).

    The column keys of a block row (strided: p - j = t * l; fixed: the summary columns of the
    windows before the row's) lie l apart, so for l >= block_n each lies in a key block of its
    own; for l < block_n every key block left of the row holds one. Those blocks are visited.
    """
    qb = torch.arange(-(-n_q // block_m), dtype=torch.int64)
    p0 = qb * block_m + (n_k - n_q)
    rows = (n_q - qb * block_m).clamp(max=block_m)
    last = n_k - (-(-n_k // block_n) - 1) * block_n  # the last key block's width
    width = min(block_n, last)
    l = kind.stride
    if l < block_n:
        blocks = (p0 + 1) // block_n
    elif isinstance(kind, Strided):
        blocks = (p0 + rows - 1) // l
    else:
        blocks = p0 // l
    return int((rows * width * blocks).sum())


def planned_work_efficiency(
    pattern: Pattern, n_q: int, n_k: int | None = None, block_m: int = 64, block_n: int = 64
) -> float:
    """Useful entries / computed entries of the plan the kernels run (decomposed if cheaper).

    :meth:`Pattern.natural_work_efficiency` gives the figure for the natural order.
    """
    n_k = n_q if n_k is None else n_k
    heads = pattern.period
    parts = plan(pattern, n_q, n_k, block_m, block_n)
    return pattern.count_allowed(n_q, n_k, heads) / max(1, _work(parts, heads))


def _work(parts: tuple[Part, ...], heads: int) -> int:
    total = 0
    for part in parts:
        per_class = part.layout.computed_entries()
        total += sum(per_class[h % len(per_class)] for h in range(heads))
    return total


def _natural(pattern, n_q, n_k, block_m, block_n, device) -> Part:
    lay = pattern.layout(n_q, n_k, block_m, block_n, device=device)
    return Part(pattern, n_q, n_k, n_k - n_q, None, None, None, lay)


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _part(terms, n_q, n_k, q_offset, q_index, k_index, key_padding, block_m, block_n, device):
    """A part in its own index space (n_q, n_k, q_offset are the part's)."""
    pattern = TermPattern("part", (tuple(terms),))
    lay = pattern.layout(n_q, n_k, block_m, block_n, q_offset=q_offset, device=device)
    maps = (_to(t, device) for t in (q_index, k_index, key_padding))
    return Part(pattern, n_q, n_k, q_offset, *maps, lay)


def _strided_parts(stride, causal, n_q, n_k, block_m, block_n, device):
    lo = 0 if causal else -(stride - 1)
    local = TermPattern("local", ((Term(lo=lo, hi=stride - 1),),))
    band = _natural(local, n_q, n_k, block_m, block_n, device)

    # Slot x = a * stride + b (a < m) goes to y = b * m + a: residue b becomes chunk b.
    m = -(-n_k // stride)
    y = torch.arange(m * stride)
    x = (y % m) * stride + y // m
    k_index = torch.where(x < n_k, x, -1).view(1, -1)
    row = x - (n_k - n_q)
    q_index = torch.where((row >= 0) & (x < n_k), row, -1)
    # Within a chunk, slot a attends to a' < a (and a' > a when not causal); padding keys sit
    # at the last slot of their chunk, which only non-causal queries can reach.
    terms = [Term(lo=1, gq=m, gk=m, grel=GROUP_EQ)]
    key_padding = None
    if not causal:
        terms.append(Term(hi=-1, gq=m, gk=m, grel=GROUP_EQ))
        if (k_index < 0).any():
            key_padding = k_index < 0
    cols = _part(
        terms, m * stride, m * stride, 0, q_index, k_index, key_padding, block_m, block_n, device
    )
    one_chunk = [dataclasses.replace(t, gq=0, gk=0) for t in terms]
    folded = _part(one_chunk, m, m, 0, None, None, None, block_m, block_n, device)
    return (band, dataclasses.replace(cols, chunk=stride, folded=folded))


def _fixed_parts(stride, summary, num_patterns, causal, n_q, n_k, block_m, block_n, device):
    lo = 0 if causal else -BIG
    window = TermPattern("window", ((Term(lo=lo, gq=stride, gk=stride, grel=GROUP_EQ),),))
    parts = [_natural(window, n_q, n_k, block_m, block_n, device)]

    # Causal queries of window W see the summary columns of windows < W, all of them complete.
    last = (n_k - 1) // stride
    windows = last if causal else last + 1
    if windows == 0:
        return tuple(parts)
    w = torch.arange(windows).view(-1, 1)
    t = torch.arange(summary).view(1, -1)
    index = []
    for r in range(num_patterns):
        cols = (w * stride + stride - (r + 1) * summary + t).flatten()
        index.append(torch.where(cols < n_k, cols, -1))
    k_index = torch.stack(index)
    rel = GROUP_LT if causal else GROUP_NE
    key_padding = (k_index < 0) if (k_index < 0).any() else None
    n_s = k_index.shape[1]
    parts.append(
        _part(
            [Term(gq=stride, gk=summary, grel=rel)],
            n_q,
            n_s,
            n_k - n_q,
            None,
            k_index,
            key_padding,
            block_m,
            block_n,
            device,
        )
    )
    return tuple(parts)
