"""Patterns: a small algebra of exact attention patterns.

A pattern decides, for an absolute query position ``p`` and a key position ``j``, whether the
query may attend to the key. Queries are aligned to the end of the keys: query row ``i`` sits at
``p = i + (n_k - n_q)``. A pattern has ``period`` head classes (head ``h`` uses class
``h % period``). There are two kinds:

- :class:`TermPattern`: per class an OR of :class:`~effattn.patterns.terms.Term` s, valid for
  any length, with analytic layouts. The built-in constructors make these; ``strided`` and
  ``fixed`` also carry a :class:`Strided` / :class:`Fixed` kind that the planner
  (:mod:`effattn.decompose`) turns into exact decompositions.
- custom patterns (:class:`MaskPattern` from ``from_mask``, and any union, per-head mix or
  intersection holding one: :class:`CombinedPattern`): bound to one (n_q, n_k), with stored
  tiles for partial blocks.

Two more kinds describe block-sparse layouts made elsewhere (DeepSpeed's sparsity configs,
Triton's blocksparse): :class:`BlockPattern` (``from_blocks``), a bool grid of coarse blocks
serving every length up to the grid's, laid out from its set cells with deduplicated tiles; and
:class:`LengthPattern`, whose definition depends on the number of keys (a layout made for one
sequence length), which hands each length to a concrete pattern. Both travel to the kernels as
keys like term patterns, never as n_q x n_k masks.

``union`` (``|``), ``intersect`` (``&``) and ``per_head`` combine patterns; combinations of term
patterns stay term patterns (``strided(l, causal=False) & causal()`` is ``strided(l)``, with its
decomposition).
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import functools
import importlib
import math
import zlib
from collections.abc import Callable

import torch

from effattn.patterns import count
from effattn.patterns.layout import (
    BlockLayout,
    allowed_entries,
    block_grid_layout,
    custom_layout,
    layout_to,
    term_layout,
)
from effattn.patterns.plot import plot
from effattn.patterns.terms import BIG, GROUP_EQ, NotExpressible, Term, and_terms, or_terms

__all__ = [
    "BlockPattern",
    "CombinedPattern",
    "Fixed",
    "LengthPattern",
    "MaskPattern",
    "Pattern",
    "Strided",
    "TermPattern",
    "axial",
    "causal",
    "column",
    "fixed",
    "from_blocks",
    "from_key",
    "from_mask",
    "full",
    "intersect",
    "local",
    "per_head",
    "strided",
    "union",
]


@dataclasses.dataclass(frozen=True)
class Strided:
    """The kind of ``strided(stride, causal=causal)``."""

    stride: int
    causal: bool


@dataclasses.dataclass(frozen=True)
class Fixed:
    """The kind of ``fixed(stride, summary, num_patterns, causal=causal)``.

    ``moved``: when set, per head class the first key of a range [moved[c], n) that class also
    sees from every window (-1: none), beside the summary columns: DeepSpeed moves the global
    blocks of a short last window to the sequence's end (:mod:`effattn.compat.deepspeed`).
    """

    stride: int
    summary: int
    num_patterns: int
    causal: bool
    moved: tuple[int, ...] | None = None


Kind = Strided | Fixed
Classes = tuple[tuple[Term, ...], ...]


class Pattern:
    """An attention pattern; build one with the constructors of :mod:`effattn.patterns`.

    Attributes:
        name: a readable description, e.g. ``"strided(128)"``.
        period: number of head classes; head ``h`` follows class ``h % period``.
        head_divisor: the number of heads must be a multiple of this (``per_head``).
        key: for term patterns, the whole pattern as a string (custom ops take no Python
            objects; :func:`from_key` rebuilds it); None for custom patterns.
    """

    is_custom: bool = False
    key: str | None = None

    def __init__(self, name: str, period: int, head_divisor: int = 1):
        self.name = name
        self.period = period
        self.head_divisor = head_divisor

    def __repr__(self) -> str:
        return f"Pattern({self.name})"

    def __or__(self, other: Pattern) -> Pattern:
        return union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return intersect(self, other)

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(n_q, n_k) that a custom pattern is bound to, or None for any size."""
        return None

    def classes(self) -> Classes:
        """Per head class, the OR-ed terms (not available for custom patterns)."""
        raise ValueError(f"{self.name} is a custom pattern: it has stored masks, not terms")

    def _allowed(self, p: torch.Tensor, j: torch.Tensor, h: int, i: torch.Tensor) -> torch.Tensor:
        """Element predicate for head ``h``; ``p`` absolute query positions, ``i`` query rows."""
        raise NotImplementedError

    # ----------------------------------------------------------------- checks
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

    # ----------------------------------------------------------------- element level
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

    def count_allowed(self, n_q: int, n_k: int | None = None, num_heads: int | None = None) -> int:
        """Allowed (head, query, key) entries, without an n x n mask for term patterns.

        Summed over ``num_heads`` heads (default: one period of the per-head patterns).
        """
        n_k = n_q if n_k is None else n_k
        heads = self.head_divisor if num_heads is None else num_heads
        self._check_size(n_q, n_k)
        self._check_heads(heads)
        return self._count(n_q, n_k, heads)

    def _count(self, n_q: int, n_k: int, heads: int) -> int:
        return int(self.mask(n_q, n_k, heads).expand(heads, n_q, n_k).sum())

    def density(self, n_q: int, n_k: int | None = None, num_heads: int | None = None) -> float:
        """Fraction of the n_q x n_k entries that are allowed, averaged over heads."""
        n_k = n_q if n_k is None else n_k
        heads = self.head_divisor if num_heads is None else num_heads
        return self.count_allowed(n_q, n_k, heads) / max(1, n_q * n_k * heads)

    def natural_work_efficiency(
        self, n_q: int, n_k: int | None = None, block_m: int = 64, block_n: int = 64
    ) -> float:
        """Useful entries / entries inside the visited blocks, visiting in natural order.

        Summed over one period of heads. :func:`effattn.decompose.planned_work_efficiency`
        gives the figure for the plan the kernels run (decomposed where that is cheaper).
        """
        n_k = n_q if n_k is None else n_k
        heads = math.lcm(self.period, self.head_divisor)
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

        ``q_offset`` defaults to ``n_k - n_q`` (end alignment). Term patterns are laid out
        analytically in time proportional to the blocks visited; results are cached.
        """
        if q_offset is None:
            self._check_size(n_q, n_k)
            q_offset = n_k - n_q
        for name, b in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(b, int) or b < 1:
                raise ValueError(f"{name} must be a positive int, got {b!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        return layout_to(self._layout(n_q, n_k, q_offset, block_m, block_n), device)

    def _layout(self, n_q, n_k, q_offset, block_m, block_n) -> BlockLayout:
        cache = self.__dict__.setdefault("_layout_cache", {})
        key = (n_q, n_k, q_offset, block_m, block_n)
        if key not in cache:
            cache[key] = custom_layout(self._allowed, self.period, *key)
        return cache[key]

    # ----------------------------------------------------------------- pictures
    def plot(self, n: int = 256, block: int = 32, **kwargs):
        """Draw one head's element mask with its block grid: see :func:`effattn.patterns.plot.plot`."""
        return plot(self, n, block, **kwargs)


class TermPattern(Pattern):
    """A pattern written in terms: per head class, an OR of :class:`Term` s; any size."""

    key: str

    def __init__(
        self, name: str, classes: Classes, *, head_divisor: int = 1, kind: Kind | None = None
    ):
        super().__init__(name, len(classes), head_divisor)
        self._classes = tuple(
            tuple(dict.fromkeys(t for t in ts if not t.is_never)) for ts in classes
        )
        self.kind = kind
        # Made once: torch.compile then reads a plain attribute.
        terms = tuple(tuple(t.as_tuple() for t in ts) for ts in self._classes)
        self.key = str((name, terms, _kind_tuple(kind), head_divisor))

    def classes(self) -> Classes:
        return self._classes

    def _allowed(self, p, j, h, i):
        return or_terms(self._classes[h % self.period], p, j)

    def _count(self, n_q, n_k, heads):
        kind = self.kind
        if isinstance(kind, Strided):
            return heads * count.count_strided(kind.stride, kind.causal, n_q, n_k)
        if isinstance(kind, Fixed) and kind.moved is None:
            return count.count_fixed(
                kind.stride, kind.summary, kind.num_patterns, kind.causal, n_q, n_k, heads
            )
        return count.count_terms(self._classes, n_q, n_k, heads)

    def _layout(self, n_q, n_k, q_offset, block_m, block_n):
        return term_layout(self._classes, n_q, n_k, q_offset, block_m, block_n)


class MaskPattern(Pattern):
    """A custom pattern from a bool mask [C, n_q, n_k] (head h uses mask[h % C])."""

    is_custom = True

    def __init__(self, mask: torch.Tensor):
        super().__init__(f"from_mask({list(mask.shape)})", mask.shape[0], mask.shape[0])
        self._mask = mask

    @property
    def fixed_size(self):
        return self._mask.shape[1], self._mask.shape[2]

    def _allowed(self, p, j, h, i):
        return self._mask[h % self.period].to(p.device)[i, j]


class CombinedPattern(Pattern):
    """A union, per-head mix or intersection that holds a custom pattern (bound to its size)."""

    is_custom = True

    def __init__(self, name: str, op: str, parts: tuple[Pattern, ...], head_divisor: int):
        per = len(parts) if op == "per_head" else 1
        super().__init__(name, math.lcm(per, *(p.period for p in parts)), head_divisor)
        self.op = op
        self.parts = parts

    @property
    def fixed_size(self):
        return next(s for p in self.parts if (s := p.fixed_size) is not None)

    def _allowed(self, p, j, h, i):
        if self.op == "per_head":
            return self.parts[h % len(self.parts)]._allowed(p, j, h, i)
        combine = torch.logical_or if self.op == "union" else torch.logical_and
        out = self.parts[0]._allowed(p, j, h, i)
        for sub in self.parts[1:]:
            out = combine(out, sub._allowed(p, j, h, i))
        return out


class BlockPattern(Pattern):
    """A block-granular pattern: (p, j) is allowed iff ``grid[h % P, p // block, j // block]``
    (and j <= p when ``causal``). Serves any n_k up to nb * block (a shorter sequence sees the
    grid's top-left corner, as DeepSpeed's sparse attention crops its layout)."""

    def __init__(self, grid: torch.Tensor, block: int, causal: bool, name: str | None = None):
        p, nb = grid.shape[0], grid.shape[1]
        tail = ", causal=True" if causal else ""
        super().__init__(name or f"from_blocks([{p}, {nb}, {nb}], {block}{tail})", p)
        self.grid, self.block, self.causal = grid.to(torch.bool).contiguous(), block, causal
        # Packed bits, compressed: block-sparse layouts are regular and shrink to a few KiB.
        bits = torch.nn.functional.pad(self.grid.flatten(), (0, -grid.numel() % 8)).view(-1, 8)
        packed = (bits.to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(1)
        data = base64.b64encode(zlib.compress(packed.to(torch.uint8).numpy().tobytes())).decode()
        self.key = str(("effattn.blocks", (self.name, p, nb, block, causal, data)))

    @property
    def size(self) -> int:
        """The most keys this pattern serves (nb * block)."""
        return self.grid.shape[1] * self.block

    def _check_size(self, n_q: int, n_k: int) -> None:
        super()._check_size(n_q, n_k)
        if n_k > self.size:
            raise ValueError(
                f"{self.name} covers {self.size} positions ({self.grid.shape[1]} blocks of "
                f"{self.block}); it cannot serve n_k={n_k}"
            )

    def _allowed(self, p, j, h, i):
        grid = self.grid[h % self.period].to(p.device)
        ok = grid[p // self.block, j // self.block]
        return ok & (j <= p) if self.causal else ok

    def _count(self, n_q, n_k, heads):
        per_class = allowed_entries(self.layout(n_q, n_k))
        return sum(per_class[h % self.period] for h in range(heads))

    def _layout(self, n_q, n_k, q_offset, block_m, block_n):
        cache = self.__dict__.setdefault("_layout_cache", {})
        key = (n_q, n_k, q_offset, block_m, block_n)
        if key not in cache:
            cache[key] = block_grid_layout(self.grid, self.block, self.causal, *key)
        return cache[key]


class LengthPattern(Pattern):
    """A pattern whose definition depends on the number of keys n_k: ``at(n_k)`` is the concrete
    pattern (term or block-granular) for that many keys, queries aligned to their end as always.

    ``spec`` = (module, factory, args) rebuilds it: ``module.factory(*args)`` (a module of
    effattn; literal args), so that it travels to the kernels as a key.
    """

    def __init__(
        self, name: str, period: int, build: Callable[[int], Pattern], spec: tuple[str, str, tuple]
    ):
        super().__init__(name, period)
        if not spec[0].startswith("effattn."):
            raise ValueError(f"a LengthPattern's factory must live in effattn, got {spec[0]!r}")
        self._build = build
        self._at: dict[int, Pattern] = {}
        self.key = str(("effattn.length", spec))

    # Lengths whose concrete patterns (and their layouts) are kept, the most recent ones.
    KEEP = 64

    def at(self, n_k: int) -> Pattern:
        """The concrete pattern for n_k keys (made once per length while it is recent)."""
        concrete = self._at.pop(n_k, None)
        if concrete is None:
            concrete = self._build(n_k)
            if concrete.period != self.period:
                raise RuntimeError(f"{self.name} at n_k={n_k} has {concrete.period} classes")
            if len(self._at) >= self.KEEP:
                self._at.pop(next(iter(self._at)))
        self._at[n_k] = concrete
        return concrete

    def _check_size(self, n_q: int, n_k: int) -> None:
        super()._check_size(n_q, n_k)
        self.at(n_k)._check_size(n_q, n_k)

    def mask(self, n_q: int, n_k: int, num_heads: int = 1, device=None) -> torch.Tensor:
        self._check_size(n_q, n_k)
        self._check_heads(num_heads)
        return self.at(n_k).mask(n_q, n_k, num_heads, device)

    def _count(self, n_q, n_k, heads):
        return self.at(n_k)._count(n_q, n_k, heads)

    def _layout(self, n_q, n_k, q_offset, block_m, block_n):
        return self.at(n_k)._layout(n_q, n_k, q_offset, block_m, block_n)


# --------------------------------------------------------------------- constructors
def _kind_tuple(kind: Kind | None) -> tuple | None:
    if kind is None:
        return None
    return (type(kind).__name__, *dataclasses.astuple(kind))


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > BIG:
        raise ValueError(
            f"{name}={value} exceeds 2**30, the largest parameter the kernels' int32 position "
            "arithmetic represents"
        )
    return value


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    return causal


def full() -> Pattern:
    """Every query attends to every key (dense, not causal)."""
    return TermPattern("full()", ((Term(),),))


def causal() -> Pattern:
    """Key j is allowed for query position p iff j <= p."""
    return TermPattern("causal()", ((Term(lo=0),),))


def local(window: int, *, causal: bool = True) -> Pattern:
    """``window`` keys ending at the query (0 <= p - j < window).

    With ``causal=False`` the window is symmetric: |p - j| < window.
    """
    _check_int("window", window)
    c = _check_causal(causal)
    t = Term(lo=0, hi=window - 1) if c else Term(lo=-(window - 1), hi=window - 1)
    return TermPattern(f"local({window}{'' if c else ', causal=False'})", ((t,),))


def _strided_terms(stride: int, causal: bool) -> tuple[Term, ...]:
    if causal:
        terms = (Term(lo=0, hi=stride - 1), Term(lo=0, mod=stride))
    else:
        terms = (Term(lo=-(stride - 1), hi=stride - 1), Term(mod=stride))
    return terms[1:] if stride == 1 else terms


def strided(stride: int, *, causal: bool = True) -> Pattern:
    """Sparse Transformer strided pattern, both heads merged (Child et al. 2019).

    0 <= p - j < stride, or (p - j) % stride == 0 with j <= p. With ``causal=False``:
    |p - j| < stride, or (p - j) % stride == 0 in both directions.
    """
    _check_int("stride", stride)
    c = _check_causal(causal)
    name = f"strided({stride}{'' if c else ', causal=False'})"
    return TermPattern(name, (_strided_terms(stride, c),), kind=Strided(stride, c))


def _column_terms(stride: int, causal: bool) -> tuple[Term, ...]:
    mod = stride if stride > 1 else 0  # a modulus of 1 holds everywhere
    up = Term(lo=stride, mod=mod)
    return (up,) if causal else (up, Term(hi=-stride, mod=mod))


def column(stride: int, *, causal: bool = True) -> Pattern:
    """The column half of ``strided``: (p - j) % stride == 0 and p - j >= stride (|p - j| >=
    stride with ``causal=False``), so that ``union(local(l), column(l))`` is ``strided(l)``.

    The paper's other strided formulation is ``per_head(local(l), column(l))``: one head
    attends locally, the next along the columns.
    """
    _check_int("stride", stride)
    c = _check_causal(causal)
    name = f"column({stride}{'' if c else ', causal=False'})"
    return TermPattern(name, (_column_terms(stride, c),))


def axial(width: int, *, causal: bool = True) -> Pattern:
    """Row and column attention over a row-major image ``width`` pixels wide: the same row
    (j // width == p // width) or the same column ((p - j) % width == 0); causal patterns (the
    default) also need j <= p."""
    _check_int("width", width)
    c = _check_causal(causal)
    row = Term(lo=0 if c else -BIG, gq=width, gk=width, grel=GROUP_EQ)
    # The column terms leave out |p - j| < width, which only the same row can reach.
    name = f"axial({width}{'' if c else ', causal=False'})"
    return TermPattern(name, ((row, *_column_terms(width, c)),))


def _fixed_classes(stride, summary, num_patterns, causal) -> Classes:
    lo = 0 if causal else -BIG
    return tuple(
        (
            Term(lo=lo, gq=stride, gk=stride, grel=GROUP_EQ),
            Term(
                lo=lo, smod=stride, smin=stride - (r + 1) * summary, smax=stride - r * summary - 1
            ),
        )
        for r in range(num_patterns)
    )


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
    args = f"{stride}, {summary}" + (f", num_patterns={num_patterns}" if num_patterns > 1 else "")
    name = f"fixed({args}{'' if c else ', causal=False'})"
    classes = _fixed_classes(stride, summary, num_patterns, c)
    return TermPattern(name, classes, kind=Fixed(stride, summary, num_patterns, c))


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


def _per_class(period: int, pick: Callable[[int], list[Pattern]]) -> list[list[tuple[Term, ...]]]:
    """Per head class h < period, the class h of each pattern ``pick(h)``."""
    return [[p.classes()[h % p.period] for p in pick(h)] for h in range(period)]


def union(*patterns: Pattern) -> Pattern:
    """A key is allowed if any of the patterns allows it (one merged head)."""
    ps = _check_patterns("union", patterns)
    name = "union(" + ", ".join(p.name for p in ps) + ")"
    divisor = math.lcm(*(p.head_divisor for p in ps))
    if any(p.is_custom for p in ps):
        return CombinedPattern(name, "union", ps, divisor)
    period = math.lcm(*(p.period for p in ps))
    classes = tuple(sum(cs, ()) for cs in _per_class(period, lambda h: list(ps)))
    return TermPattern(name, classes, head_divisor=divisor)


def per_head(*patterns: Pattern) -> Pattern:
    """Head h uses ``patterns[h % len(patterns)]`` (heads must be a multiple of the count)."""
    ps = _check_patterns("per_head", patterns)
    name = "per_head(" + ", ".join(p.name for p in ps) + ")"
    divisor = math.lcm(len(ps), *(p.head_divisor for p in ps))
    if any(p.is_custom for p in ps):
        return CombinedPattern(name, "per_head", ps, divisor)
    period = math.lcm(len(ps), *(p.period for p in ps))
    classes = tuple(cs[0] for cs in _per_class(period, lambda h: [ps[h % len(ps)]]))
    return TermPattern(name, classes, head_divisor=divisor)


def intersect(*patterns: Pattern) -> Pattern:
    """A key is allowed if every pattern allows it (``a & b``).

    Term patterns intersect into a term pattern (analytic layouts, any size) whenever each pair
    of their terms combines into one term (two different group or column constraints cannot);
    ``strided`` and ``fixed`` intersected with ``causal()`` keep their decompositions. With a
    custom pattern among them the result is custom too.
    """
    ps = _check_patterns("intersect", patterns)
    name = " & ".join(p.name for p in ps)
    divisor = math.lcm(*(p.head_divisor for p in ps))
    if any(p.is_custom for p in ps):
        return CombinedPattern(name, "intersect", ps, divisor)
    period = math.lcm(*(p.period for p in ps))
    classes = []
    for terms_per_pattern in _per_class(period, lambda h: list(ps)):
        acc: tuple[Term, ...] = (Term(),)
        for terms in terms_per_pattern:
            try:
                acc = tuple(and_terms(a, b) for a in acc for b in terms)
            except NotExpressible as e:
                raise ValueError(
                    f"intersect({', '.join(p.name for p in ps)}) has no analytic form: {e}; "
                    "intersect a from_mask pattern instead"
                ) from None
        classes.append(acc)
    return _recognized(name, tuple(classes), divisor, ps)


def _recognized(name: str, classes: Classes, divisor: int, ps: tuple[Pattern, ...]) -> Pattern:
    """The intersection as a strided / fixed pattern when it is exactly one (their causal
    versions, which keep the decompositions), else as a plain term pattern."""
    result = TermPattern(name, classes, head_divisor=divisor)
    for p in ps:
        if p.head_divisor == divisor and _same_classes(p, result):
            return p
    for p in ps:
        kind = getattr(p, "kind", None)
        if kind is None or divisor != 1:
            continue
        candidate = (
            strided(kind.stride)
            if isinstance(kind, Strided)
            else fixed(kind.stride, kind.summary, kind.num_patterns)
        )
        if _same_classes(candidate, result):
            return candidate
    return result


def _same_classes(a: Pattern, b: Pattern) -> bool:
    if a.period != b.period:
        return False
    return all(set(x) == set(y) for x, y in zip(a.classes(), b.classes(), strict=True))


_KINDS = {"Strided": Strided, "Fixed": Fixed}


@functools.lru_cache(maxsize=256)
def from_key(key: str) -> Pattern:
    """The term, block-granular or length-dependent pattern whose :attr:`Pattern.key` is
    ``key``."""
    value = ast.literal_eval(key)
    if value[0] == "effattn.blocks":
        name, period, nb, block, causal, data = value[1]
        packed = torch.frombuffer(
            bytearray(zlib.decompress(base64.b64decode(data))), dtype=torch.uint8
        )
        bits = (packed.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        grid = bits.flatten()[: period * nb * nb].bool().view(period, nb, nb)
        return BlockPattern(grid, block, causal, name)
    if value[0] == "effattn.length":
        module, factory, args = value[1]
        if not module.startswith("effattn."):
            raise ValueError(f"pattern key names module {module!r}, outside effattn")
        return getattr(importlib.import_module(module), factory)(*args)
    name, terms, kind, head_divisor = value
    classes = tuple(tuple(Term(*t) for t in ts) for ts in terms)
    kind = None if kind is None else _KINDS[kind[0]](*kind[1:])
    return TermPattern(name, classes, kind=kind, head_divisor=head_divisor)


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
    return MaskPattern(mask.detach().to("cpu").contiguous())


def from_blocks(layout: torch.Tensor, block: int, *, causal: bool = False) -> Pattern:
    """A block-granular pattern from a block layout [1 or H, nb, nb] (bool or integer, nonzero =
    the block is visible), as DeepSpeed's sparsity configs and Triton's blocksparse ops take:
    (p, j) is allowed iff ``layout[h % C, p // block, j // block]``, and j <= p too when
    ``causal``. It serves every n_k up to nb * block (shorter sequences see the top-left
    corner); layouts never hold an element mask.
    """
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"layout must be a torch.Tensor, got {type(layout).__name__}")
    _check_int("block", block)
    c = _check_causal(causal)
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    if layout.dim() != 3 or layout.shape[1] != layout.shape[2] or layout.shape[0] < 1:
        raise ValueError(f"layout must have shape [1 or H, nb, nb], got {tuple(layout.shape)}")
    if layout.dtype.is_floating_point or layout.dtype.is_complex:
        raise TypeError(f"layout must be bool or integer, got {layout.dtype}")
    return BlockPattern(layout.detach().to("cpu") != 0, block, c)
