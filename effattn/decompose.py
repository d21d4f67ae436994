"""Exact patterns at block speed: split into parts, merge by log-sum-exp.

The softmax over a union of disjoint key sets is the LSE-weighted combination of the softmaxes
over each set, so a pattern can be computed as several block-sparse attentions ("parts"), each
over a re-indexed sequence in which its keys form dense blocks:

column terms (``strided``, ``column``, ``axial``, their unions with ``local``)
    a term ``lo <= p - j <= hi, (p - j) % l == 0`` allows one key in l. Viewing the sequence as
    [m, l] (m = ceil(n_k / l)) and transposing, its keys become a band inside l contiguous
    chunks of length m (``p - j = s * l`` is s slots apart in one chunk): dense blocks. The
    class's other terms run in natural order, disjoint from the column terms once those are cut
    off the bands they share (``strided(l)``: the band ``0 <= p - j < l``, then the columns
    ``p - j >= l``; ``axial(w)``: the rows, then the columns beyond them).
``fixed(l, c, P)``
    same-window keys (block diagonal) in natural order; plus the summary columns of the other
    windows, gathered per head class into a compact key list in which a query of window W sees
    the first W * c keys (a prefix; all but its own window's when not causal).
head classes of other patterns (``per_head(local(l), column(l))``)
    each class is planned on its own, its parts serving only its heads (``Part.heads``).

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
import itertools

import torch

from effattn.patterns import (
    BIG,
    GROUP_EQ,
    GROUP_LT,
    GROUP_NE,
    BlockLayout,
    Fixed,
    LengthPattern,
    Pattern,
    Term,
    TermPattern,
)
from effattn.patterns.terms import disjoint

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
        heads: None when the part serves every head (head h follows class h % C of its
            pattern); (c, P) when it serves only the heads h with h % P == c, with the one class
            of its pattern (a plan split per head class).
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
    heads: tuple[int, int] | None = None

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

    Natural order (one part, identity maps) unless the pattern has column terms or is a
    ``fixed`` and the decomposition computes fewer entries for these block sizes.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(pattern, LengthPattern):
        pattern = pattern.at(n_k)
    if not isinstance(pattern, TermPattern):
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    return _plan_cached(pattern.classes(), pattern.kind, n_q, n_k, block_m, block_n, device)


@functools.lru_cache(maxsize=128)
def _plan_cached(classes, kind, n_q, n_k, block_m, block_n, device) -> tuple[Part, ...]:
    pattern = TermPattern("plan", classes, kind=kind)
    # The decompositions compute every key slot as a row (the columns' chunks hold all n_k
    # positions): with few queries (decoding, short segments over long memories) that is more
    # than the natural order visits.
    if 2 * n_q < n_k:
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    heads = len(classes)
    if isinstance(kind, Fixed) and n_q > 0 and n_k > kind.stride:
        parts = _fixed_parts(
            kind.stride, kind.summary, kind.num_patterns, kind.causal, n_q, n_k, block_m,
            block_n, device, kind.moved,
        )  # fmt: skip
        bound = heads * _fixed_work_bound(kind.stride, n_q, n_k, block_m, block_n)
    elif n_q > 0 and heads > 1 and not isinstance(kind, Fixed):
        parts = _per_class(classes, n_q, n_k, block_m, block_n, device)
        if parts is not None:
            return parts  # every class already chose its cheaper plan
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    elif n_q > 0 and heads == 1 and (split := _column_split(classes[0], n_k)) is not None:
        parts = _column_parts(*split, n_q, n_k, block_m, block_n, device)
        bound = _column_work_bound(classes[0], n_q, n_k, block_m, block_n)
    else:
        return (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    work = _work(parts, heads)
    if work < bound:
        return parts
    natural = (_natural(pattern, n_q, n_k, block_m, block_n, device),)
    return parts if work < _work(natural, heads) else natural


def _per_class(classes, n_q, n_k, block_m, block_n, device) -> tuple[Part, ...] | None:
    """Each head class planned on its own, its parts serving only its heads; None when no class
    decomposes (one natural part then serves them all)."""
    plans = [_plan_cached((c,), None, n_q, n_k, block_m, block_n, device) for c in classes]
    if all(len(parts) == 1 and parts[0].q_index is None for parts in plans):
        return None
    period = len(classes)
    return tuple(
        dataclasses.replace(part, heads=(c, period))
        for c, parts in enumerate(plans)
        for part in parts
    )


def _min_key_block(n_k: int, block_n: int) -> int:
    """The narrowest key block's width (the last one may be cut by the sequence end)."""
    return min(block_n, n_k - (-(-n_k // block_n) - 1) * block_n)


def _fixed_work_bound(stride: int, n_q: int, n_k: int, block_m: int, block_n: int) -> int:
    """A lower bound of the entries one head class of ``fixed`` computes in natural order, in
    O(n_q / block_m).

    The summary columns of the windows before a block row lie ``stride`` apart, so for
    stride >= block_n each lies in a key block of its own; for stride < block_n every key block
    left of the row holds one. Those blocks are visited.
    """
    qb = torch.arange(-(-n_q // block_m), dtype=torch.int64)
    p0 = qb * block_m + (n_k - n_q)
    rows = (n_q - qb * block_m).clamp(max=block_m)
    blocks = (p0 + 1) // block_n if stride < block_n else p0 // stride
    return int((rows * _min_key_block(n_k, block_n) * blocks).sum())


def _column_work_bound(terms, n_q: int, n_k: int, block_m: int, block_n: int) -> int:
    """A lower bound of the entries a class with column terms computes in natural order, in
    O(n_q / block_m) per term.

    For the last query p of a block row, a column term's keys p - s * mod lie ``mod`` apart:
    each in a key block of its own for mod >= block_n, and one in every key block between the
    outermost keys otherwise. Those blocks are visited (the most over the terms is a bound).
    """
    qb = torch.arange(-(-n_q // block_m), dtype=torch.int64)
    rows = (n_q - qb * block_m).clamp(max=block_m)
    p = qb * block_m + rows - 1 + (n_k - n_q)
    blocks = torch.zeros_like(p)
    for t in terms:
        if not _is_column(t):
            continue
        s_lo = -(-(p - (n_k - 1)).clamp(min=t.lo) // t.mod)
        s_hi = p.clamp(max=t.hi) // t.mod
        count = (s_hi - s_lo + 1).clamp(min=0)
        if t.mod < block_n:
            first, last = p - s_hi * t.mod, p - s_lo * t.mod
            inner = (last + 1) // block_n - (-(-first // block_n))
            count = torch.where(count > 0, inner.clamp(min=0), 0)
        blocks = torch.maximum(blocks, count)
    return int((rows * _min_key_block(n_k, block_n) * blocks).sum())


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
        served = range(heads) if part.heads is None else range(part.heads[0], heads, part.heads[1])
        total += sum(per_class[h % len(per_class)] for h in served)
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


# --------------------------------------------------------------------------- column terms
def _is_column(t: Term) -> bool:
    """A band with a modulus and nothing else: keys that a chunk transposition makes dense."""
    return t.mod > 1 and t.gq == 0 and t.smod == 0


def _is_band(t: Term) -> bool:
    return t.mod <= 1 and t.gq == 0 and t.smod == 0


def _minus_band(t: Term, band: Term) -> list[Term]:
    """The pieces of column term ``t`` outside the band [band.lo, band.hi]."""
    pieces = ((t.lo, min(t.hi, band.lo - 1)), (max(t.lo, band.hi + 1), t.hi))
    return [dataclasses.replace(t, lo=lo, hi=hi) for lo, hi in pieces if lo <= hi]


def _column_split(
    terms: tuple[Term, ...], n_k: int
) -> tuple[list[Term], dict[int, list[Term]]] | None:
    """(natural terms, {modulus: column terms}) of one class: its column terms shorter than the
    sequence, cut off the class's bands, each part's terms disjoint from every other part's;
    None without such column terms or when the parts cannot be shown disjoint."""
    bands = [t for t in terms if _is_band(t)]
    natural: list[Term] = []
    columns: dict[int, list[Term]] = {}
    for t in terms:
        if not (_is_column(t) and t.mod < n_k):
            natural.append(t)
            continue
        pieces = [t]
        for band in bands:
            pieces = [q for piece in pieces for q in _minus_band(piece, band)]
        columns.setdefault(t.mod, []).extend(pieces)
    if not columns:
        return None
    for a, b in itertools.combinations([natural, *columns.values()], 2):
        if not all(disjoint(x, y) for x in a for y in b):
            return None
    return natural, columns


def _slot_term(t: Term, l: int, m: int) -> Term:
    """Column term ``t`` (modulus l) on the transposed slots: ``p - j = s * l`` is s slots apart
    in one chunk of m, for s in [ceil(lo / l), floor(hi / l)]."""
    lo = -BIG if t.lo <= -BIG else -(-t.lo // l)
    hi = BIG if t.hi >= BIG else t.hi // l
    return Term(lo=lo, hi=hi, gq=m, gk=m, grel=GROUP_EQ)


def _column_parts(natural, columns, n_q, n_k, block_m, block_n, device) -> tuple[Part, ...]:
    parts = []
    if natural:
        pattern = TermPattern("natural", (tuple(natural),))
        parts.append(_natural(pattern, n_q, n_k, block_m, block_n, device))
    for l, terms in sorted(columns.items()):
        part = _chunk_part(l, terms, n_q, n_k, block_m, block_n, device)
        if part is not None:
            parts.append(part)
    return tuple(parts)


def _chunk_part(l, terms, n_q, n_k, block_m, block_n, device) -> Part | None:
    """Column terms of modulus l as bands inside the l transposed chunks (None when none of
    their slot distances exists)."""
    m = -(-n_k // l)
    slot_terms = [st for t in terms if (st := _slot_term(t, l, m)).lo <= st.hi]
    if not slot_terms:
        return None
    # Slot x = a * l + b (a < m) goes to y = b * m + a: residue b becomes chunk b.
    y = torch.arange(m * l)
    x = (y % m) * l + y // m
    k_index = torch.where(x < n_k, x, -1).view(1, -1)
    row = x - (n_k - n_q)
    q_index = torch.where((row >= 0) & (x < n_k), row, -1)
    # Padding keys sit at the last slot of their chunk, after every real query there: only
    # terms reaching later slots (p - j < 0) can see them.
    key_padding = None
    if any(t.lo < 0 for t in slot_terms) and (k_index < 0).any():
        key_padding = k_index < 0
    cols = _part(
        slot_terms, m * l, m * l, 0, q_index, k_index, key_padding, block_m, block_n, device
    )
    one_chunk = [dataclasses.replace(t, gq=0, gk=0) for t in slot_terms]
    folded = _part(one_chunk, m, m, 0, None, None, None, block_m, block_n, device)
    return dataclasses.replace(cols, chunk=l, folded=folded)


# --------------------------------------------------------------------------- fixed
def _fixed_parts(
    stride, summary, num_patterns, causal, n_q, n_k, block_m, block_n, device, moved=None
):
    lo = 0 if causal else -BIG
    rel = GROUP_LT if causal else GROUP_NE
    window = TermPattern("window", ((Term(lo=lo, gq=stride, gk=stride, grel=GROUP_EQ),),))
    parts = [_natural(window, n_q, n_k, block_m, block_n, device)]
    if moved is not None:
        # The moved keys form one contiguous range per class: dense key blocks in natural
        # order, for the queries of the other windows (their own window sees them already).
        ranges = tuple(
            (Term(lo=lo, gq=stride, gk=stride, grel=rel, smod=BIG, smin=m, smax=BIG - 1),)
            if m >= 0
            else ()
            for m in moved
        )
        parts.append(_natural(TermPattern("moved", ranges), n_q, n_k, block_m, block_n, device))

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
        end = n_k if moved is None or moved[r] < 0 else moved[r]  # the moved part has the rest
        index.append(torch.where(cols < end, cols, -1))
    k_index = torch.stack(index)
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
