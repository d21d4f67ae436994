"""The predicate language of built-in patterns: a :class:`Term` is an AND of constraints on an
absolute query position ``p`` and a key position ``j``; a head class allows (p, j) iff any of
its terms does. Every backend evaluates terms with integer arithmetic, reading the packed
fields in the order of :data:`TERM_FIELDS`::

    band     lo <= p - j <= hi
    modulus  (p - j) % mod == 0                                   (mod > 0)
    group    j // gk  REL  p // gq,  REL in {==, <, !=}           (gq > 0)
    columns  smin <= j % smod <= smax                             (smod > 0)

This module also bounds a term over rectangles of positions (is some / every element of a
block allowed?), which is what makes layouts analytic.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

__all__ = [
    "BIG",
    "GROUP_EQ",
    "GROUP_LT",
    "GROUP_NE",
    "NEVER",
    "TERM_FIELDS",
    "Term",
    "and_terms",
    "disjoint",
    "implied_band",
    "or_terms",
]

# Stands for "no bound" in band constraints; far beyond any sequence length, and p - j +- BIG
# still fits in int32 arithmetic inside kernels. Pattern parameters must not exceed it.
BIG = 1 << 30

GROUP_EQ, GROUP_LT, GROUP_NE = 0, 1, 2

TERM_FIELDS = ("lo", "hi", "mod", "gq", "gk", "grel", "smod", "smin", "smax")
"""The packed order of a term's fields in every backend's term table."""


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

    NUM_FIELDS = len(TERM_FIELDS)

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in TERM_FIELDS)

    @property
    def is_never(self) -> bool:
        """True when no (p, j) satisfies the band (lo > hi)."""
        return self.lo > self.hi

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

    def key_range(self, p0: torch.Tensor, p1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [j_lo, j_hi] (int64, maybe empty) outside of which no query in [p0, p1] is
        allowed by this term's band and group constraints: the candidate keys of a block row."""
        j_lo = (p0 - self.hi).clamp(min=-BIG)
        j_hi = (p1 - self.lo).clamp(max=3 * BIG)
        if self.gq > 0 and self.grel == GROUP_EQ:
            j_lo = torch.maximum(j_lo, (p0 // self.gq) * self.gk)
            j_hi = torch.minimum(j_hi, (p1 // self.gq) * self.gk + self.gk - 1)
        elif self.gq > 0 and self.grel == GROUP_LT:
            j_hi = torch.minimum(j_hi, (p1 // self.gq) * self.gk - 1)
        return j_lo, j_hi

    def block_bounds(self, p0, p1, j0, j1):
        """(any_lo, any_hi, all_) over rectangles [p0, p1] x [j0, j1] (int64 tensors).

        ``all_`` is exact; ``any_lo`` (surely some allowed element) and ``any_hi`` (possibly
        some) are equal when a single constraint is active, or when all but one are satisfied
        everywhere in the rectangle.
        """
        anys, alls = [], []
        dmin, dmax = p0 - j1, p1 - j0
        if self.lo > -BIG or self.hi < BIG:
            anys.append(dmin.clamp(min=self.lo) <= dmax.clamp(max=self.hi))
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
            count = count_columns(j1, self) - count_columns(j0 - 1, self)
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


NEVER = Term(lo=1, hi=0)
"""A term no (p, j) satisfies: pads a class's term list to the table's width."""


def count_columns(x: torch.Tensor, t: Term) -> torch.Tensor:
    """Number of j in [0, x] with smin <= j % smod <= smax (0 for x < 0)."""
    width = t.smax - t.smin + 1
    xc = x.clamp(min=-1)
    per = (xc + 1) // t.smod * width
    rem = ((xc + 1).remainder(t.smod) - t.smin).clamp(0, width)
    return per + rem


def or_terms(terms, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The OR of ``terms`` at broadcastable positions (False for no terms)."""
    out = torch.zeros(torch.broadcast_shapes(p.shape, j.shape), dtype=torch.bool, device=p.device)
    for t in terms:
        out |= t.allowed(p, j)
    return out


class NotExpressible(ValueError):
    """The AND of two terms needs two constraints of one kind in one term."""


def and_terms(a: Term, b: Term) -> Term:
    """The term allowing exactly what both allow (NEVER if nothing).

    Raises NotExpressible when both carry different group or column constraints: one term
    holds one of each.
    """
    lo, hi = max(a.lo, b.lo), min(a.hi, b.hi)
    if lo > hi:
        return NEVER
    mod = a.mod if b.mod <= 0 else b.mod if a.mod <= 0 else math.lcm(a.mod, b.mod)
    if mod > BIG:
        raise NotExpressible(f"the moduli {a.mod} and {b.mod} combine to {mod} > 2**30")
    group = _same("group", (a.gq, a.gk, a.grel), (b.gq, b.gk, b.grel))
    cols = _same("column", (a.smod, a.smin, a.smax), (b.smod, b.smin, b.smax))
    return Term(lo, hi, mod, *group, *cols)


def _same(kind: str, x: tuple[int, int, int], y: tuple[int, int, int]) -> tuple[int, int, int]:
    if x[0] <= 0:
        return y
    if y[0] <= 0 or x == y:
        return x
    raise NotExpressible(f"two different {kind} constraints {x} and {y} cannot share one term")


def implied_band(t: Term) -> tuple[int, int]:
    """[lo, hi] bounding p - j over what ``t`` allows: its band, tightened by a group constraint
    on equal group sizes (the same group implies |p - j| < g, an earlier one p - j >= 1)."""
    lo, hi = t.lo, t.hi
    if t.gq > 0 and t.gq == t.gk:
        if t.grel == GROUP_EQ:
            lo, hi = max(lo, 1 - t.gq), min(hi, t.gq - 1)
        elif t.grel == GROUP_LT:
            lo = max(lo, 1)
    return lo, hi


def disjoint(a: Term, b: Term) -> bool:
    """True when no (p, j) satisfies both terms, as far as their bands, moduli, groups and
    columns show it (False does not prove an overlap). Decompositions merge parts by their
    log-sum-exp, which is exact only for disjoint key sets; counts add disjoint terms."""
    (lo_a, hi_a), (lo_b, hi_b) = implied_band(a), implied_band(b)
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if lo > hi:
        return True
    mods = [m for m in (a.mod, b.mod) if m > 1]
    if mods and -BIG < lo and hi < BIG:
        step = math.lcm(*mods)
        if -(-lo // step) * step > hi:  # no multiple of the moduli in the common band
            return True
    if a.gq > 0 and (a.gq, a.gk) == (b.gq, b.gk) and GROUP_EQ in (a.grel, b.grel):
        if a.grel != b.grel:  # the same group against an earlier / another one
            return True
    if a.smod > 0 and a.smod == b.smod:
        return a.smax < b.smin or b.smax < a.smin
    return False
