"""Attention patterns: exact element-level definitions, block layouts and pictures.

A pattern decides, for an absolute query position ``p`` and a key position ``j``, whether the
query may attend to the key. Queries are aligned to the end of the keys: query row ``i`` sits at
``p = i + (n_k - n_q)``.

Built-in patterns are written in a small predicate language (:mod:`effattn.patterns.terms`)
that every backend evaluates with integer arithmetic, so no element mask is ever stored for
them and their layouts (:mod:`effattn.patterns.layout`) are computed analytically.
``strided(l)`` is ``band(0, l-1) OR (band(0, inf) AND modulus l)``; ``fixed(l, c)`` is
``band(0, inf) AND (group(l, l, ==) OR columns)``; ``column(l)`` is ``band(l, inf) AND modulus
l`` and ``axial(w)`` is ``(band(0, inf) AND group(w, w, ==)) OR column(w)``. ``from_mask``
patterns (and combinations holding one) are custom: their partial blocks carry deduplicated
stored tile masks. ``from_blocks`` patterns (block-granular grids, DeepSpeed-style) carry tiles
too, made from the grid's cells for any length up to the grid's.

Modules: ``terms`` (the predicate language), ``layout`` (block layouts), ``count`` (counting
allowed entries), ``core`` (the Pattern kinds and constructors), ``plot`` (pictures).

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

from effattn.patterns.core import (
    BlockPattern,
    CombinedPattern,
    Fixed,
    LengthPattern,
    MaskPattern,
    Pattern,
    Strided,
    TermPattern,
    axial,
    causal,
    column,
    fixed,
    from_blocks,
    from_key,
    from_mask,
    full,
    intersect,
    local,
    per_head,
    strided,
    union,
)
from effattn.patterns.layout import BlockLayout, block_elements
from effattn.patterns.terms import BIG, GROUP_EQ, GROUP_LT, GROUP_NE, TERM_FIELDS, Term

__all__ = [
    "BIG",
    "GROUP_EQ",
    "GROUP_LT",
    "GROUP_NE",
    "TERM_FIELDS",
    "BlockLayout",
    "BlockPattern",
    "CombinedPattern",
    "Fixed",
    "LengthPattern",
    "MaskPattern",
    "Pattern",
    "Strided",
    "TermPattern",
    "Term",
    "axial",
    "block_elements",
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
