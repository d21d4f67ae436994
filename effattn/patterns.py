"""Attention patterns: exact element-level definitions, block layouts and pictures.

A pattern decides, for an absolute query position ``p`` and a key position ``j``, whether the
query may attend to the key (DESIGN.md, "Patterns"). Queries are aligned to the end of the keys:
query row ``i`` sits at ``p = i + (n_k - n_q)``.

Built-in patterns are written in a small predicate language that every backend evaluates with
integer arithmetic, so no element mask is ever stored for them. A pattern has ``period`` head
classes (head ``h`` uses class ``h % period``); each class is an OR of :class:`Term` s, and a
term is an AND of at most four constraints on ``(p, j)``::

    band     lo <= p - j <= hi
    modulus  (p - j) % mod == 0                                   (mod > 0)
    group    j // gk  REL  p // gq,  REL in {==, <, !=}           (gq > 0)
    columns  smin <= j % smod <= smax                             (smod > 0)

``strided(l)`` is ``band(0, l-1) OR (band(0, inf) AND modulus l)``; ``fixed(l, c)`` is
``band(0, inf) AND (group(l, l, ==) OR columns)``; the pieces of their decompositions
(:mod:`effattn.decompose`) use ``group`` with unequal widths for compact key sets.

``from_mask`` patterns (and unions or per-head mixes that contain one) are custom: their
partial blocks carry deduplicated stored tile masks instead of terms.

>>> from effattn import patterns
>>> patterns.strided(4).mask(8, 8)[0].int()
tensor([[1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "BIG",
    "BlockLayout",
    "Pattern",
    "Term",
    "causal",
    "fixed",
    "from_key",
    "from_mask",
    "full",
    "local",
    "per_head",
    "strided",
    "union",
]

# Stands for "no bound" in band constraints; far beyond any sequence length, and p - j +- BIG
# still fits in int32 arithmetic inside kernels.
BIG = 1 << 30

GROUP_EQ, GROUP_LT, GROUP_NE = 0, 1, 2

# Uncertain blocks are resolved element by element in chunks of this many elements, which
# bounds the memory of layout construction.
_REFINE_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class Term:
    """An AND of constraints on (p, j); the defaults leave every constraint off (always true)."""

    lo: int = -BIG
    hi: int = BIG
    mod: int = 0
    gq: int = 0
    gk: int = 0
    grel: int = GROUP_EQ
    smod: int = 0
    smin: int = 0
    smax: int = 0

    NUM_FIELDS = 9

    def as_tuple(self) -> tuple[int, ...]:
        return (
            self.lo,
            self.hi,
            self.mod,
            self.gq,
            self.gk,
            self.grel,
            self.smod,
            self.smin,
            self.smax,
        )

    def allowed(self, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Element predicate on broadcastable int64 tensors of absolute positions."""
        d = p - j
        ok = (d >= self.lo) & (d <= self.hi)
        if self.mod > 0:
            ok = ok & (d.remainder(self.mod) == 0)
        if self.gq > 0:
            qg, kg = p // self.gq, j // self.gk
            if self.grel == GROUP_EQ:
                ok = ok & (kg == qg)
            elif self.grel == GROUP_LT:
                ok = ok & (kg < qg)
            else:
                ok = ok & (kg != qg)
        if self.smod > 0:
            r = j.remainder(self.smod)
            ok = ok & (r >= self.smin) & (r <= self.smax)
        return ok

    def block_bounds(self, p0, p1, j0, j1):
        """(any_lo, any_hi, all_) over rectangles [p0, p1] x [j0, j1] (int64 tensors).

        ``all_`` is exact; ``any_lo`` (surely some allowed element) and ``any_hi`` (possibly
        some) are equal when a single constraint is active, or when all but one are satisfied
        everywhere in the rectangle.
        """
        anys, alls = [], []
        dmin, dmax = p0 - j1, p1 - j0
        if self.lo > -BIG or self.hi < BIG:
            anys.append(
                torch.maximum(dmin, _full(dmin, self.lo))
                <= torch.minimum(dmax, _full(dmax, self.hi))
            )
            alls.append((dmin >= self.lo) & (dmax <= self.hi))
        if self.mod > 1:
            anys.append((dmax // self.mod) * self.mod >= dmin)
            alls.append((dmin == dmax) & (dmin.remainder(self.mod) == 0))
        if self.gq > 0:
            a0, a1 = p0 // self.gq, p1 // self.gq
            b0, b1 = j0 // self.gk, j1 // self.gk
            single = (a0 == a1) & (b0 == b1) & (a0 == b0)
            if self.grel == GROUP_EQ:
                anys.append(torch.maximum(a0, b0) <= torch.minimum(a1, b1))
                alls.append(single)
            elif self.grel == GROUP_LT:
                anys.append(b0 < a1)
                alls.append(b1 < a0)
            else:
                anys.append(~single)
                alls.append((b1 < a0) | (a1 < b0))
        if self.smod > 0:
            count = _count_columns(j1, self) - _count_columns(j0 - 1, self)
            anys.append(count > 0)
            alls.append(count == j1 - j0 + 1)
        if not anys:
            true = torch.ones_like(p0, dtype=torch.bool)
            return true, true, true
        any_hi = functools.reduce(torch.logical_and, anys)
        all_ = functools.reduce(torch.logical_and, alls)
        any_lo = torch.zeros_like(any_hi)
        for k, a in enumerate(anys):
            others = [alls[m] for m in range(len(alls)) if m != k]
            any_lo |= functools.reduce(torch.logical_and, others, a)
        return any_lo, any_hi, all_


def _full(like: torch.Tensor, value: int) -> torch.Tensor:
    return torch.full_like(like, value)


def _count_columns(x: torch.Tensor, t: Term) -> torch.Tensor:
    """Number of j in [0, x] with smin <= j % smod <= smax (0 for x < 0)."""
    width = t.smax - t.smin + 1
    xc = x.clamp(min=-1)
    per = (xc + 1) // t.smod * width
    rem = ((xc + 1).remainder(t.smod) - t.smin).clamp(0, width)
    return per + rem


_NEVER = Term(lo=1, hi=0)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block visits, for one pattern and one problem size.

    ``P`` is the number of head classes (head ``h`` uses class ``h % P``), ``nqb`` / ``nkb``
    the number of query / key blocks. All index tensors are int32 on ``device``; the ``*_idx``
    rows are sorted ascending and padded with -1 past their ``*_num`` count.

    Forward view (per query block, its key blocks):
        kv_full_num [P, nqb], kv_full_idx [P, nqb, max_full]    blocks needing no mask
        kv_part_num [P, nqb], kv_part_idx [P, nqb, max_part]    blocks needing the predicate
    Transposed view (per key block, its query blocks), for the dk/dv backward:
        q_full_num [P, nkb], q_full_idx [P, nkb, max]; q_part_num, q_part_idx likewise.
    Predicate for partial blocks, exactly one of:
        terms [P, T, Term.NUM_FIELDS] int32: class c allows (p, j) iff any of its T terms does
            (padding terms never allow anything);
        tiles [U, block_m, block_n] bool (deduplicated) with kv_part_tile [P, nqb, max_part]
            and q_part_tile [P, nkb, max] int32 giving each partial block's tile.
    Bounds (rows >= n_q, keys >= n_k) are not part of the pattern: kernels mask them.
    """

    n_q: int
    n_k: int
    q_offset: int
    block_m: int
    block_n: int
    kv_full_num: torch.Tensor
    kv_full_idx: torch.Tensor
    kv_part_num: torch.Tensor
    kv_part_idx: torch.Tensor
    q_full_num: torch.Tensor
    q_full_idx: torch.Tensor
    q_part_num: torch.Tensor
    q_part_idx: torch.Tensor
    terms: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    kv_part_tile: torch.Tensor | None = None
    q_part_tile: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.kv_full_num.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_full_num.shape[1]

    @property
    def num_k_blocks(self) -> int:
        return self.q_full_num.shape[1]

    def computed_entries(self) -> list[int]:
        """Per head class, entries inside visited blocks (clipped to the sequence ends)."""
        dev = self.kv_full_num.device
        rows = _block_extent(self.n_q, self.block_m, self.num_q_blocks, dev)
        cols = _block_extent(self.n_k, self.block_n, self.num_k_blocks, dev)
        total = torch.zeros(self.num_classes, dtype=torch.int64, device=dev)
        for idx in (self.kv_full_idx, self.kv_part_idx):
            width = torch.where(idx >= 0, cols[idx.long().clamp(min=0)], 0).sum(-1)
            total += (width * rows).sum(-1)
        return total.tolist()


def _block_extent(n: int, block: int, num: int, device) -> torch.Tensor:
    start = torch.arange(num, device=device, dtype=torch.int64) * block
    return (n - start).clamp(max=block)


class Pattern:
    """An attention pattern; build one with the constructors of this module.

    Attributes:
        period: number of head classes; head ``h`` follows class ``h % period``.
        head_divisor: the number of heads must be a multiple of this (``per_head``).
        name: a readable description, e.g. ``"strided(128)"``.
    """

    def __init__(
        self,
        name: str,
        classes: tuple[tuple[Term, ...], ...] | None,
        *,
        custom: tuple[torch.Tensor, ...] | None = None,
        head_divisor: int = 1,
        kind: tuple | None = None,
        parts: tuple[Pattern, ...] = (),
        combine: str | None = None,
    ):
        self.name = name
        self._classes = classes
        self._custom = custom
        self.head_divisor = head_divisor
        # ("strided", l, causal) or ("fixed", l, c, num_patterns, causal): what the
        # decomposition of effattn.decompose recognizes.
        self.kind = kind
        # Custom unions / per-head mixes keep their sub-patterns to evaluate elements.
        self._parts = parts
        self._combine = combine
        self.period = len(classes) if classes is not None else self._custom_period()
        # The whole built-in pattern as a string, for custom ops, which take no Python objects
        # (from_key rebuilds it). Made here, once: torch.compile then reads a plain attribute.
        self.key = None
        if classes is not None:
            terms = tuple(tuple(t.as_tuple() for t in ts) for ts in classes)
            self.key = str((name, terms, kind, head_divisor))

    # ----------------------------------------------------------------- element level
    def __repr__(self) -> str:
        return f"Pattern({self.name})"

    @property
    def is_custom(self) -> bool:
        """True when partial blocks need stored tile masks (the pattern holds a from_mask)."""
        return self._classes is None

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(n_q, n_k) that a custom pattern is bound to, or None for any size."""
        if self._custom is not None:
            m = self._custom[0]
            return m.shape[-2], m.shape[-1]
        for sub in self._parts:
            if sub.fixed_size is not None:
                return sub.fixed_size
        return None

    def classes(self) -> tuple[tuple[Term, ...], ...]:
        """Per head class, the OR-ed terms (not available for custom patterns)."""
        if self._classes is None:
            raise ValueError(f"{self.name} is a custom pattern: it has stored masks, not terms")
        return self._classes

    def _custom_period(self) -> int:
        if self._custom is not None:
            return self._custom[0].shape[0]
        return _lcm(
            *(s.period for s in self._parts),
            len(self._parts) if self._combine == "per_head" else 1,
        )

    def _allowed(self, p: torch.Tensor, j: torch.Tensor, h: int, i: torch.Tensor) -> torch.Tensor:
        """Element predicate for head ``h``; ``p`` absolute query positions, ``i`` query rows."""
        if self._classes is not None:
            out = None
            for t in self._classes[h % self.period]:
                a = t.allowed(p, j)
                out = a if out is None else out | a
            return (
                out
                if out is not None
                else torch.zeros(
                    torch.broadcast_shapes(p.shape, j.shape),
                    dtype=torch.bool,
                    device=p.device,
                )
            )
        if self._custom is not None:
            m = self._custom[0].to(p.device)
            return m[h % m.shape[0]][i, j]
        if self._combine == "per_head":
            sub = self._parts[h % len(self._parts)]
            return sub._allowed(p, j, h, i)
        out = self._parts[0]._allowed(p, j, h, i)
        for sub in self._parts[1:]:
            out = out | sub._allowed(p, j, h, i)
        return out

    def _check_heads(self, num_heads: int) -> None:
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if num_heads % self.head_divisor:
            raise ValueError(
                f"num_heads={num_heads} is not divisible by {self.head_divisor}, the number of "
                f"per-head patterns in {self.name}"
            )

    def _check_size(self, n_q: int, n_k: int) -> None:
        for name, n in (("n_q", n_q), ("n_k", n_k)):
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        if n_q > n_k:
            raise ValueError(f"n_q={n_q} > n_k={n_k}: queries are aligned to the end of the keys")
        size = self.fixed_size
        if size is not None and size != (n_q, n_k):
            raise ValueError(
                f"{self.name} holds a mask for n_q={size[0]}, n_k={size[1]}; "
                f"it cannot serve n_q={n_q}, n_k={n_k}"
            )

    def mask(self, n_q: int, n_k: int, num_heads: int = 1, device=None) -> torch.Tensor:
        """Element mask, bool [1 or num_heads, n_q, n_k] (True = allowed).

        One head when every head has the same pattern, else ``num_heads``. Query row ``i`` is at
        absolute position ``i + n_k - n_q``. O(n_q * n_k) memory: for tests and pictures.
        """
        self._check_size(n_q, n_k)
        self._check_heads(num_heads)
        i = torch.arange(n_q, device=device).view(-1, 1)
        p = i + (n_k - n_q)
        j = torch.arange(n_k, device=device).view(1, -1)
        heads = 1 if self.period == 1 else num_heads
        return torch.stack([self._allowed(p, j, h, i).expand(n_q, n_k) for h in range(heads)])

    def density(self, n_q: int, n_k: int | None = None, num_heads: int | None = None) -> float:
        """Fraction of the n_q x n_k entries that are allowed, averaged over heads."""
        n_k = n_q if n_k is None else n_k
        heads = self.head_divisor if num_heads is None else num_heads
        return self.count_allowed(n_q, n_k, heads) / max(1, n_q * n_k * heads)

    def count_allowed(self, n_q: int, n_k: int | None = None, num_heads: int | None = None) -> int:
        """Allowed (head, query, key) entries, counted block by block (no n x n mask).

        Summed over ``num_heads`` heads (default: one period of the per-head patterns).
        """
        from effattn.decompose import count_allowed

        n_k = n_q if n_k is None else n_k
        heads = self.head_divisor if num_heads is None else num_heads
        self._check_size(n_q, n_k)
        self._check_heads(heads)
        return count_allowed(self, n_q, n_k, heads)

    def work_efficiency(
        self, n_q: int, n_k: int | None = None, block_m: int = 64, block_n: int = 64
    ) -> float:
        """Useful entries / entries inside the visited blocks, visiting in natural order.

        Summed over one period of heads. :func:`effattn.decompose.work_efficiency` gives the
        figure for the decomposed execution that the kernels use.
        """
        n_k = n_q if n_k is None else n_k
        heads = _lcm(self.period, self.head_divisor)
        computed = self.layout(n_q, n_k, block_m, block_n).computed_entries()
        total = sum(computed[h % len(computed)] for h in range(heads))
        return self.count_allowed(n_q, n_k, heads) / max(1, total)

    # ----------------------------------------------------------------- block level
    def layout(
        self,
        n_q: int,
        n_k: int,
        block_m: int = 64,
        block_n: int = 64,
        *,
        q_offset: int | None = None,
        device=None,
    ) -> BlockLayout:
        """Block layout for n_q queries (at absolute positions q_offset + i) and n_k keys.

        ``q_offset`` defaults to ``n_k - n_q`` (end alignment). Built-in patterns are classified
        analytically per block, plus an element check of the few blocks where two constraints
        meet; nothing of size n_q x n_k is built. Results are cached.
        """
        if q_offset is None:
            self._check_size(n_q, n_k)
            q_offset = n_k - n_q
        for name, b in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(b, int) or b < 1:
                raise ValueError(f"{name} must be a positive int, got {b!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (n_q, n_k, q_offset, block_m, block_n)
        if self._classes is not None:
            lay = _term_layout(self._classes, *key)
        else:
            cache = self.__dict__.setdefault("_layout_cache", {})
            if key not in cache:
                cache[key] = _custom_layout(self, *key)
            lay = cache[key]
        return _layout_to(lay, device)

    # ----------------------------------------------------------------- pictures
    def plot(
        self,
        n: int = 256,
        block: int = 32,
        *,
        n_k: int | None = None,
        head: int = 0,
        path: str | None = None,
        ax=None,
        title: str | None = None,
    ):
        """Draw the element mask of one head with its block grid (needs matplotlib).

        Visited blocks are shaded (full darker than partial). Saves a PNG when ``path`` is
        given; returns the matplotlib Axes.
        """
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.patches import Rectangle
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("Pattern.plot needs matplotlib: pip install 'effattn[plot]'") from e
        n_k = n if n_k is None else n_k
        heads = max(head + 1, self.head_divisor)
        heads += (-heads) % self.head_divisor
        m = self.mask(n, n_k, heads)[head if self.period > 1 else 0]
        lay = self.layout(n, n_k, block, block)
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(4, 4 * n / max(n_k, 1)), dpi=150)
        ax.imshow(m.numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1.6)
        c = head % lay.num_classes
        for num, idx, color in (
            (lay.kv_full_num, lay.kv_full_idx, "tab:blue"),
            (lay.kv_part_num, lay.kv_part_idx, "tab:orange"),
        ):
            for qb in range(lay.num_q_blocks):
                for kb in idx[c, qb, : int(num[c, qb])].tolist():
                    ax.add_patch(
                        Rectangle(
                            (kb * block - 0.5, qb * block - 0.5),
                            block,
                            block,
                            facecolor=color,
                            alpha=0.25,
                            edgecolor="none",
                        )
                    )
        for x in range(0, n_k + 1, block):
            ax.axvline(x - 0.5, color="0.7", lw=0.3)
        for y in range(0, n + 1, block):
            ax.axhline(y - 0.5, color="0.7", lw=0.3)
        ax.set_title(title or f"{self.name}: density {m.float().mean():.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if own and path is not None:
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
        return ax


# --------------------------------------------------------------------- layout building
def _layout_to(lay: BlockLayout, device: torch.device) -> BlockLayout:
    if lay.kv_full_num.device == device:
        return lay
    return _layout_on_device(lay, device)


@functools.lru_cache(maxsize=256)
def _layout_on_device(lay: BlockLayout, device: torch.device) -> BlockLayout:
    moved = {
        f.name: (v.to(device) if isinstance(v := getattr(lay, f.name), torch.Tensor) else v)
        for f in dataclasses.fields(lay)
    }
    return BlockLayout(**moved)


def _block_rects(n_q, n_k, q_offset, block_m, block_n):
    """Clipped rectangles of every (query block, key block) pair, each [nqb, nkb] int64."""
    nqb, nkb = -(-n_q // block_m), -(-n_k // block_n)
    qs = torch.arange(nqb, dtype=torch.int64) * block_m
    ks = torch.arange(nkb, dtype=torch.int64) * block_n
    p0 = (qs + q_offset).view(-1, 1).expand(nqb, nkb)
    p1 = ((qs + block_m).clamp(max=n_q) - 1 + q_offset).view(-1, 1).expand(nqb, nkb)
    j0 = ks.view(1, -1).expand(nqb, nkb)
    j1 = ((ks + block_n).clamp(max=n_k) - 1).view(1, -1).expand(nqb, nkb)
    return p0, p1, j0, j1


def block_elements(n_q, n_k, block_m, block_n, qb, kb):
    """Yield (i, j, valid) element grids [U, block_m, block_n] for listed blocks, in chunks."""
    per = max(1, _REFINE_CHUNK // (block_m * block_n))
    ii = torch.arange(block_m).view(1, -1, 1)
    jj = torch.arange(block_n).view(1, 1, -1)
    for s in range(0, qb.numel(), per):
        i = qb[s : s + per].view(-1, 1, 1) * block_m + ii
        j = kb[s : s + per].view(-1, 1, 1) * block_n + jj
        yield i, j, (i < n_q) & (j < n_k)


def _classify_terms(terms: Sequence[Term], rects, refine) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (any, all) per block for an OR of terms; ``refine`` settles uncertain blocks."""
    p0, p1, j0, j1 = rects
    if not terms:
        z = torch.zeros_like(p0, dtype=torch.bool)
        return z, z
    any_lo = any_hi = all_ = None
    n_possible = torch.zeros_like(p0, dtype=torch.int32)
    for t in terms:
        a_lo, a_hi, al = t.block_bounds(p0, p1, j0, j1)
        any_lo = a_lo if any_lo is None else any_lo | a_lo
        any_hi = a_hi if any_hi is None else any_hi | a_hi
        all_ = al if all_ is None else all_ | al
        n_possible += a_hi.int()
    # A union can cover a block that no single term covers, when two terms meet in it.
    all_hi = all_ | (n_possible >= 2)
    uncertain = (any_lo != any_hi) | (all_hi & ~all_)
    if uncertain.any():
        qb, kb = uncertain.nonzero(as_tuple=True)
        r_any, r_all = refine(qb, kb)
        any_lo = any_lo.clone()
        all_ = all_.clone()
        any_lo[qb, kb] = r_any
        all_[qb, kb] = r_all
    return any_lo, all_


def _or_terms(terms: Sequence[Term], p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(torch.broadcast_shapes(p.shape, j.shape), dtype=torch.bool, device=p.device)
    for t in terms:
        out |= t.allowed(p, j)
    return out


@functools.lru_cache(maxsize=256)
def _term_layout(classes, n_q, n_k, q_offset, block_m, block_n) -> BlockLayout:
    rects = _block_rects(n_q, n_k, q_offset, block_m, block_n)
    fulls, parts = [], []
    for terms in classes:

        def refine(qb, kb, terms=terms):
            anys, alls = [], []
            for i, j, valid in block_elements(n_q, n_k, block_m, block_n, qb, kb):
                ok = _or_terms(terms, i + q_offset, j)
                anys.append((ok & valid).flatten(1).any(1))
                alls.append((ok | ~valid).flatten(1).all(1))
            return torch.cat(anys), torch.cat(alls)

        any_, all_ = _classify_terms(terms, rects, refine)
        fulls.append(all_ & any_)
        parts.append(any_ & ~all_)
    width = max(1, max(len(t) for t in classes))
    rows = [[t.as_tuple() for t in ts] + [_NEVER.as_tuple()] * (width - len(ts)) for ts in classes]
    table = torch.tensor(rows, dtype=torch.int32)
    return _assemble(
        n_q,
        n_k,
        q_offset,
        block_m,
        block_n,
        torch.stack(fulls),
        torch.stack(parts),
        terms=table,
    )


def _custom_layout(pattern: Pattern, n_q, n_k, q_offset, block_m, block_n) -> BlockLayout:
    nqb, nkb = -(-n_q // block_m), -(-n_k // block_n)
    pad_q, pad_k = nqb * block_m - n_q, nkb * block_n - n_k
    i = torch.arange(n_q).view(-1, 1)
    j = torch.arange(n_k).view(1, -1)
    fulls, parts, tiles_all = [], [], []
    for h in range(pattern.period):
        m = pattern._allowed(i + q_offset, j, h, i).expand(n_q, n_k)
        valid = torch.ones(n_q, n_k, dtype=torch.bool)
        m = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q))
        valid = torch.nn.functional.pad(valid, (0, pad_k, 0, pad_q))
        mb = m.view(nqb, block_m, nkb, block_n).transpose(1, 2)
        vb = valid.view(nqb, block_m, nkb, block_n).transpose(1, 2)
        any_ = mb.flatten(2).any(-1)
        all_ = (mb | ~vb).flatten(2).all(-1)
        fulls.append(any_ & all_)
        parts.append(any_ & ~all_)
        tiles_all.append(mb)
    full, part = torch.stack(fulls), torch.stack(parts)
    blocks = torch.stack(tiles_all)  # [P, nqb, nkb, BM, BN]
    sel = blocks[part]
    if sel.shape[0]:
        tiles, inverse = torch.unique(sel.flatten(1), dim=0, return_inverse=True)
        tiles = tiles.view(-1, block_m, block_n)
    else:
        tiles, inverse = (
            torch.zeros(1, block_m, block_n, dtype=torch.bool),
            torch.zeros(0, dtype=torch.int64),
        )
    tile_id = torch.full(part.shape, -1, dtype=torch.int32)
    tile_id[part] = inverse.to(torch.int32)
    return _assemble(n_q, n_k, q_offset, block_m, block_n, full, part, tiles=tiles, tile_id=tile_id)


def _pack(mask: torch.Tensor, payload: torch.Tensor | None = None):
    """Row-wise sorted column indices of True entries, padded with -1: (num, idx[, payload])."""
    n = mask.shape[-1]
    num = mask.sum(-1, dtype=torch.int32)
    width = max(1, int(num.max()) if num.numel() else 0)
    cols = torch.arange(n, dtype=torch.int64).expand_as(mask)
    key = torch.where(mask, cols, n + cols)
    order = key.argsort(dim=-1, stable=True)[..., :width]
    idx = torch.where(mask.gather(-1, order), order, -1).to(torch.int32)
    if payload is None:
        return num, idx
    pay = torch.where(idx >= 0, payload.gather(-1, order), -1).to(torch.int32)
    return num, idx, pay


def _assemble(
    n_q,
    n_k,
    q_offset,
    block_m,
    block_n,
    full,
    part,
    terms=None,
    tiles=None,
    tile_id=None,
):
    kv_full_num, kv_full_idx = _pack(full)
    q_full_num, q_full_idx = _pack(full.transpose(1, 2))
    if tile_id is None:
        kv_part_num, kv_part_idx = _pack(part)
        q_part_num, q_part_idx = _pack(part.transpose(1, 2))
        kv_tile = q_tile = None
    else:
        kv_part_num, kv_part_idx, kv_tile = _pack(part, tile_id)
        q_part_num, q_part_idx, q_tile = _pack(part.transpose(1, 2), tile_id.transpose(1, 2))
    return BlockLayout(
        n_q=n_q,
        n_k=n_k,
        q_offset=q_offset,
        block_m=block_m,
        block_n=block_n,
        kv_full_num=kv_full_num,
        kv_full_idx=kv_full_idx,
        kv_part_num=kv_part_num,
        kv_part_idx=kv_part_idx,
        q_full_num=q_full_num,
        q_full_idx=q_full_idx,
        q_part_num=q_part_num,
        q_part_idx=q_part_idx,
        terms=terms,
        tiles=tiles,
        kv_part_tile=kv_tile,
        q_part_tile=q_tile,
    )


# --------------------------------------------------------------------- constructors
def _lcm(*xs: int) -> int:
    return functools.reduce(lambda a, b: a * b // math.gcd(a, b), xs, 1)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    return causal


def full() -> Pattern:
    """Every query attends to every key (dense, not causal)."""
    return Pattern("full()", ((Term(),),))


def causal() -> Pattern:
    """Key j is allowed for query position p iff j <= p."""
    return Pattern("causal()", ((Term(lo=0),),))


def local(window: int, *, causal: bool = True) -> Pattern:
    """``window`` keys ending at the query (0 <= p - j < window).

    With ``causal=False`` the window is symmetric: |p - j| < window.
    """
    _check_int("window", window)
    c = _check_causal(causal)
    t = Term(lo=0, hi=window - 1) if c else Term(lo=-(window - 1), hi=window - 1)
    return Pattern(f"local({window}{'' if c else ', causal=False'})", ((t,),))


def strided(stride: int, *, causal: bool = True) -> Pattern:
    """Sparse Transformer strided pattern, both heads merged (Child et al. 2019).

    0 <= p - j < stride, or (p - j) % stride == 0 with j <= p. With ``causal=False``:
    |p - j| < stride, or (p - j) % stride == 0 in both directions.
    """
    _check_int("stride", stride)
    c = _check_causal(causal)
    if c:
        terms = (Term(lo=0, hi=stride - 1), Term(lo=0, mod=stride))
    else:
        terms = (Term(lo=-(stride - 1), hi=stride - 1), Term(mod=stride))
    if stride == 1:
        terms = terms[1:]
    name = f"strided({stride}{'' if c else ', causal=False'})"
    return Pattern(name, (terms,), kind=("strided", stride, c))


def fixed(stride: int, summary: int, num_patterns: int = 1, *, causal: bool = True) -> Pattern:
    """Sparse Transformer fixed pattern, both heads merged.

    A query attends to its own window of ``stride`` keys (j // stride == p // stride) and to
    the ``summary`` columns of every window: stride - (r+1)*summary <= j % stride <=
    stride - r*summary - 1, where r = head % num_patterns; causal patterns also need j <= p.
    """
    _check_int("stride", stride)
    _check_int("summary", summary)
    _check_int("num_patterns", num_patterns)
    if summary > stride:
        raise ValueError(f"summary={summary} must be <= stride={stride}")
    if num_patterns * summary > stride:
        raise ValueError(
            f"num_patterns * summary = {num_patterns * summary} must be <= stride={stride}: "
            "each pattern needs its own summary columns"
        )
    c = _check_causal(causal)
    lo = 0 if c else -BIG
    classes = tuple(
        (
            Term(lo=lo, gq=stride, gk=stride, grel=GROUP_EQ),
            Term(
                lo=lo,
                smod=stride,
                smin=stride - (r + 1) * summary,
                smax=stride - r * summary - 1,
            ),
        )
        for r in range(num_patterns)
    )
    args = f"{stride}, {summary}" + (f", num_patterns={num_patterns}" if num_patterns > 1 else "")
    name = f"fixed({args}{'' if c else ', causal=False'})"
    return Pattern(name, classes, kind=("fixed", stride, summary, num_patterns, c))


def _check_patterns(name: str, patterns) -> tuple[Pattern, ...]:
    if not patterns:
        raise ValueError(f"{name} needs at least one pattern")
    for k, p in enumerate(patterns):
        if not isinstance(p, Pattern):
            raise TypeError(f"{name}: argument {k} must be a Pattern, got {type(p).__name__}")
    sizes = {p.fixed_size for p in patterns} - {None}
    if len(sizes) > 1:
        raise ValueError(f"{name}: masks of different sizes {sorted(sizes)} cannot be combined")
    return tuple(patterns)


def union(*patterns: Pattern) -> Pattern:
    """A key is allowed if any of the patterns allows it (one merged head)."""
    ps = _check_patterns("union", patterns)
    name = "union(" + ", ".join(p.name for p in ps) + ")"
    divisor = _lcm(*(p.head_divisor for p in ps))
    if any(p.is_custom for p in ps):
        return Pattern(name, None, parts=ps, head_divisor=divisor, combine="union")
    period = _lcm(*(p.period for p in ps))
    classes = tuple(tuple(t for p in ps for t in p.classes()[h % p.period]) for h in range(period))
    return Pattern(name, _dedup(classes), head_divisor=divisor)


def per_head(*patterns: Pattern) -> Pattern:
    """Head h uses ``patterns[h % len(patterns)]`` (heads must be a multiple of the count)."""
    ps = _check_patterns("per_head", patterns)
    name = "per_head(" + ", ".join(p.name for p in ps) + ")"
    divisor = _lcm(len(ps), *(p.head_divisor for p in ps))
    if any(p.is_custom for p in ps):
        return Pattern(name, None, parts=ps, head_divisor=divisor, combine="per_head")
    period = _lcm(len(ps), *(p.period for p in ps))
    classes = tuple(ps[h % len(ps)].classes()[h % ps[h % len(ps)].period] for h in range(period))
    return Pattern(name, classes, head_divisor=divisor)


def _dedup(classes):
    return tuple(tuple(dict.fromkeys(terms)) for terms in classes)


@functools.lru_cache(maxsize=256)
def from_key(key: str) -> Pattern:
    """The built-in pattern whose :attr:`Pattern.key` is ``key``."""
    name, terms, kind, head_divisor = ast.literal_eval(key)
    classes = tuple(tuple(Term(*t) for t in ts) for ts in terms)
    return Pattern(name, classes, kind=kind, head_divisor=head_divisor)


def from_mask(mask: torch.Tensor) -> Pattern:
    """A custom pattern from a bool mask [1 or H, n_q, n_k] (True = allowed), fixed size."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"mask must have shape [1 or H, n_q, n_k], got {tuple(mask.shape)}")
    if mask.shape[1] > mask.shape[2]:
        raise ValueError(f"mask has n_q={mask.shape[1]} > n_k={mask.shape[2]}")
    m = mask.detach().to("cpu").contiguous()
    return Pattern(f"from_mask({list(m.shape)})", None, custom=(m,), head_divisor=m.shape[0])
