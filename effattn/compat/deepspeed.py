"""DeepSpeed's sparse attention on effattn's kernels.

DeepSpeed removed ``deepspeed.ops.sparse_attention`` (its Triton kernels had long stopped
building). This module keeps its API: the sparsity configs, with DeepSpeed's constructor
arguments and defaults, and ``SparseSelfAttention`` with its forward signature::

    # before: from deepspeed.ops.sparse_attention import FixedSparsityConfig, SparseSelfAttention
    from effattn.compat.deepspeed import FixedSparsityConfig, SparseSelfAttention

``make_layout(seq_len)`` returns exactly DeepSpeed's layout tensor (int64 [num_heads, nb, nb],
nb = seq_len / block), drawing the random blocks of ``VariableSparsityConfig`` and
``BigBirdSparsityConfig`` from Python's ``random`` module with the same calls in the same
order, so the same ``random.seed`` gives the same layout.

``pattern(causal=False)`` is an effattn pattern for any sequence length n: its element mask is
DeepSpeed's layout for n (nb = ceil(n / block) blocks) expanded block by block, with DeepSpeed's
block-granular visibility (a "unidirectional" layout shows a query every key of its own
diagonal block, later ones included); ``causal=True`` intersects that with j <= p, which is what
a DeepSpeed model with a causal ``attn_mask`` computed. Where that mask is a term pattern for
every length it is one, decomposed like the built-in patterns: ``DenseSparsityConfig``, and
``FixedSparsityConfig`` bidirectional or with ``causal=True`` (without horizontal global
attention) is ``fixed(num_local_blocks * block, num_global_blocks * block, ...)``, plus the
relocated global block of a short last window at lengths that have one. The other layouts have
block-granular edges (a window measured in blocks, rows of global blocks, random blocks), which
the term language (bands on p - j) cannot state in a bounded number of terms: they are
block-granular patterns (:func:`effattn.patterns.from_blocks`), laid out from DeepSpeed's block
grid for that length (n^2 / block^2 cells, never an element mask). Random blocks are drawn
per length from ``random.Random(seed)``, exactly as ``random.seed(seed)`` then DeepSpeed's
``make_layout(n)`` would draw them. A length for which DeepSpeed has no layout (fewer blocks
than its sliding window, its global or its random blocks per row) raises ValueError, as its
``make_layout`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import torch
from torch import nn

from effattn import functional
from effattn.patterns import (
    BIG,
    LengthPattern,
    Pattern,
    Term,
    TermPattern,
    fixed,
    from_blocks,
    from_mask,
    full,
    intersect,
)
from effattn.patterns import (
    causal as causal_pattern,
)

__all__ = [
    "BSLongformerSparsityConfig",
    "BigBirdSparsityConfig",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "SparseSelfAttention",
    "SparsityConfig",
    "VariableSparsityConfig",
]

_ATTENTION = ("unidirectional", "bidirectional")


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _attention(value) -> str:
    if value not in _ATTENTION:
        raise NotImplementedError(
            f'attention must be "unidirectional" or "bidirectional", got {value!r}'
        )
    return value


def _int_list(name: str, value) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise TypeError(f"{name} must be a list of ints, got {value!r}")
    return list(value)


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    return causal


# --------------------------------------------------------------------------- configs
class SparsityConfig:
    """DeepSpeed's base class: ``num_heads``, ``block`` (the block size of the layout) and
    ``different_layout_per_head`` (one layout per head, else head 0's for all)."""

    def __init__(self, num_heads, block=16, different_layout_per_head=False):
        self.num_heads = _int("num_heads", num_heads)
        self.block = _int("block", block)
        if not isinstance(different_layout_per_head, bool):
            raise TypeError(
                "different_layout_per_head must be True or False, got "
                f"{different_layout_per_head!r}"
            )
        self.different_layout_per_head = different_layout_per_head
        self.num_layout_heads = num_heads if different_layout_per_head else 1
        # The arguments as given: pattern() keys rebuild the config from them.
        self._args = {
            "num_heads": num_heads,
            "block": block,
            "different_layout_per_head": different_layout_per_head,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args.items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- DeepSpeed's layout
    def setup_layout(self, seq_len):
        """A zero layout, int64 [num_heads, seq_len / block, seq_len / block]."""
        _int("seq_len", seq_len)
        if seq_len % self.block != 0:
            raise ValueError(
                f"Sequence Length, {seq_len}, needs to be dividable by Block size {self.block}!"
            )
        nb = seq_len // self.block
        return torch.zeros((self.num_heads, nb, nb), dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout):
        """Head 0's layout for every head unless ``different_layout_per_head``."""
        if not self.different_layout_per_head:
            layout[1 : self.num_heads, :, :] = layout[0, :, :]
        return layout

    def make_layout(self, seq_len):
        """DeepSpeed's layout for ``seq_len``: int64 [num_heads, nb, nb], 1 = visible block."""
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout[h] = self._head_grid(h, layout.shape[1], random).to(torch.int64)
        return self.check_and_propagate_first_head_layout(layout)

    def _head_grid(self, h: int, nb: int, rng) -> torch.Tensor:
        """Head h's block grid (bool [nb, nb]); random blocks drawn from ``rng`` in
        DeepSpeed's order."""
        raise NotImplementedError(
            "SparsityConfig is DeepSpeed's abstract base: use DenseSparsityConfig, "
            "FixedSparsityConfig, VariableSparsityConfig, BigBirdSparsityConfig, "
            "BSLongformerSparsityConfig or LocalSlidingWindowSparsityConfig"
        )

    # ----------------------------------------------------------------- effattn's pattern
    @property
    def _random(self) -> bool:
        return False

    @property
    def _period(self) -> int:
        """Head classes of pattern(): heads h with equal h % period have one layout."""
        return self.num_layout_heads if self._random else 1

    def pattern(self, causal=False) -> Pattern:
        """An effattn pattern for any length: DeepSpeed's layout for that length, expanded
        block by block (``causal=True``: and j <= p). See the module docstring."""
        return self._length_pattern(_check_causal(causal), None)

    def _length_pattern(self, causal: bool, seed: int | None) -> Pattern:
        args = tuple(self._args.items())
        spec = ("effattn.compat.deepspeed", "_rebuild", (type(self).__name__, args, causal, seed))
        tail = "causal=True" if causal else ""
        if seed is not None:
            tail = f"{tail}, seed={seed}" if tail else f"seed={seed}"
        name = f"{self!r}.pattern({tail})"
        build = functools.partial(self._at, causal=causal, seed=seed)
        return LengthPattern(name, self._period, build, spec)

    def _at(self, n_k: int, *, causal: bool, seed: int | None) -> Pattern:
        """The concrete pattern for n_k keys."""
        if n_k == 0:  # nothing to attend: any pattern of the right period
            return TermPattern("empty", ((),) * self._period)
        return from_blocks(self._grid(-(-n_k // self.block), seed), self.block, causal=causal)

    def _grid(self, nb: int, seed: int | None) -> torch.Tensor:
        """bool [period, nb, nb]: the layouts of the head classes, random blocks from a
        generator seeded with ``seed``."""
        rng = random.Random(seed)
        return torch.stack([self._head_grid(h, nb, rng) for h in range(self._period)])


class _RandomBlocks:
    """Configs with random blocks: pattern() takes the seed they are drawn with."""

    num_random_blocks: int

    @property
    def _random(self) -> bool:
        return self.num_random_blocks > 0

    def pattern(self, causal=False, *, seed=None) -> Pattern:
        """An effattn pattern for any length: DeepSpeed's layout for that length, expanded
        block by block (``causal=True``: and j <= p).

        The random blocks for length n are the ones DeepSpeed's ``make_layout(n)`` draws after
        ``random.seed(seed)``; ``seed=None`` draws a seed from Python's ``random`` (so a
        ``random.seed`` before makes the pattern reproducible too).
        """
        causal = _check_causal(causal)
        if seed is not None:
            _int("seed", seed, minimum=0)
        if not self._random:  # nothing is drawn: the seed changes nothing
            return self._length_pattern(causal, None)
        if seed is None:
            seed = random.getrandbits(63)
        return self._length_pattern(causal, _int("seed", seed, minimum=0))


def _band(nb: int, below: int, above: int) -> torch.Tensor:
    """Blocks (R, C) with -below <= C - R <= above."""
    r = torch.arange(nb)
    d = r.view(1, -1) - r.view(-1, 1)
    return (d >= -below) & (d <= above)


def _check_blocks(what: str, needed: int, nb: int) -> None:
    if nb < needed:
        raise ValueError(
            f"Number of {what}, {needed}, must be smaller than overall number of blocks in a "
            f"row, {nb}!"
        )


class DenseSparsityConfig(SparsityConfig):
    """Every block (dense attention), for comparison."""

    def _head_grid(self, h, nb, rng):
        return torch.ones(nb, nb, dtype=torch.bool)

    def _at(self, n_k, *, causal, seed):
        return causal_pattern() if causal else full()


class FixedSparsityConfig(SparsityConfig):
    """Sparse Transformer's fixed pattern in blocks: windows of ``num_local_blocks`` blocks,
    the last ``num_global_blocks`` of each window as global columns (earlier ones for other
    head classes with ``num_different_global_patterns``), optionally also as global rows
    (``horizontal_global_attention``, bidirectional only)."""

    def __init__(
        self,
        num_heads,
        block=16,
        different_layout_per_head=False,
        num_local_blocks=4,
        num_global_blocks=1,
        attention="bidirectional",
        horizontal_global_attention=False,
        num_different_global_patterns=1,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_local_blocks = _int("num_local_blocks", num_local_blocks)
        self.num_global_blocks = _int("num_global_blocks", num_global_blocks)
        if num_local_blocks % num_global_blocks != 0:
            raise ValueError(
                f"Number of blocks in a local window, {num_local_blocks}, must be dividable by "
                f"number of global blocks, {num_global_blocks}!"
            )
        self.attention = _attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError(
                "horizontal_global_attention=True needs attention='bidirectional', got "
                f"{attention!r}"
            )
        self.horizontal_global_attention = bool(horizontal_global_attention)
        _int("num_different_global_patterns", num_different_global_patterns)
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError(
                f"num_different_global_patterns={num_different_global_patterns} needs "
                "different_layout_per_head=True: one layout for all heads has one global pattern"
            )
        limit = num_local_blocks // num_global_blocks
        if num_different_global_patterns > limit:
            raise ValueError(
                f"num_different_global_patterns={num_different_global_patterns} cannot be "
                f"larger than num_local_blocks / num_global_blocks = {num_local_blocks} / "
                f"{num_global_blocks} = {limit}"
            )
        self.num_different_global_patterns = num_different_global_patterns
        self._args.update(
            num_local_blocks=num_local_blocks,
            num_global_blocks=num_global_blocks,
            attention=attention,
            horizontal_global_attention=horizontal_global_attention,
            num_different_global_patterns=num_different_global_patterns,
        )

    @property
    def _period(self) -> int:
        return self.num_different_global_patterns

    def _first_global(self, h: int) -> int:
        """The first global block of head h within a window."""
        g = self.num_global_blocks
        return self.num_local_blocks - (1 + h % self.num_different_global_patterns) * g

    def _head_grid(self, h, nb, rng):
        L, G = self.num_local_blocks, self.num_global_blocks
        uni = self.attention == "unidirectional"
        r = torch.arange(nb).view(-1, 1)
        c = torch.arange(nb).view(1, -1)
        grid = (r // L) == (c // L)
        if uni:
            grid &= c <= r
        g0 = self._first_global(h)
        end = nb - nb % L  # blocks in complete windows
        in_group = (c < end) & (c % L >= g0) & (c % L < g0 + G)
        # Unidirectional: a global block is seen from its own row on (block-granular).
        grid |= in_group & (r >= (c // L) * L + g0) if uni else in_group
        if self.horizontal_global_attention:
            grid |= ((r < end) & (r % L >= g0) & (r % L < g0 + G)).expand(nb, nb)
        if end < nb:
            # The last, short window's global blocks: moved to its end when they fall past it
            # (as DeepSpeed does, with Python's slice semantics).
            start = min(end + g0, nb - G)
            grid[0 if not uni else start :, start : start + G] = True
            if self.horizontal_global_attention:
                grid[start : start + G, :] = True
        return grid

    def _at(self, n_k, *, causal, seed):
        if (
            n_k == 0
            or self.horizontal_global_attention
            or not (causal or self.attention == "bidirectional")
        ):
            return super()._at(n_k, causal=causal, seed=seed)
        # Window-aligned blocks plus global columns: fixed(), with j <= p when causal (the
        # unidirectional layout's block-granular parts are exactly what j <= p removes).
        b, L, G = self.block, self.num_local_blocks, self.num_global_blocks
        nb = -(-n_k // b)
        end = nb - nb % L
        lo = 0 if causal else -BIG
        base = fixed(L * b, G * b, self._period, causal=causal)
        classes, moved = [], []
        for h, terms in enumerate(base.classes()):
            start = min(end + self._first_global(h), nb - G)
            if end < nb and start != end + self._first_global(h):
                if start < 0:  # shorter than one global group: DeepSpeed's negative slices
                    return super()._at(n_k, causal=causal, seed=seed)
                # The moved blocks [start, nb) hold the window's own partial global blocks.
                terms = (*terms, Term(lo=lo, smod=BIG, smin=start * b, smax=BIG - 1))
                moved.append(start * b)
            else:
                moved.append(-1)
            classes.append(terms)
        if max(moved) < 0:
            return base
        kind = dataclasses.replace(base.kind, moved=tuple(moved))
        name = f"{base.name} + the last window's global blocks at {moved}"
        return TermPattern(name, tuple(classes), kind=kind)


class VariableSparsityConfig(_RandomBlocks, SparsityConfig):
    """Random blocks per row, local windows of listed sizes (the last size repeating), global
    blocks at listed indices (columns, and rows with ``horizontal_global_attention``)."""

    def __init__(
        self,
        num_heads,
        block=16,
        different_layout_per_head=False,
        num_random_blocks=0,
        local_window_blocks=[4],  # noqa: B006 - DeepSpeed's default, never mutated
        global_block_indices=[0],  # noqa: B006
        global_block_end_indices=None,
        attention="bidirectional",
        horizontal_global_attention=False,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = _int("num_random_blocks", num_random_blocks, minimum=0)
        self.local_window_blocks = _int_list("local_window_blocks", local_window_blocks)
        if not self.local_window_blocks or min(self.local_window_blocks) < 1:
            raise ValueError(
                f"local_window_blocks must be a non-empty list of positive ints, got "
                f"{local_window_blocks!r}"
            )
        self.global_block_indices = _int_list("global_block_indices", global_block_indices)
        self.global_block_end_indices = _global_ends(
            self.global_block_indices, global_block_end_indices
        )
        self.attention = _attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError(
                "horizontal_global_attention=True needs attention='bidirectional', got "
                f"{attention!r}"
            )
        self.horizontal_global_attention = bool(horizontal_global_attention)
        self._args.update(
            num_random_blocks=num_random_blocks,
            local_window_blocks=list(local_window_blocks),
            global_block_indices=list(global_block_indices),
            global_block_end_indices=None
            if global_block_end_indices is None
            else list(global_block_end_indices),
            attention=attention,
            horizontal_global_attention=horizontal_global_attention,
        )

    def _head_grid(self, h, nb, rng):
        grid = torch.zeros(nb, nb, dtype=torch.bool)
        _random_rows(grid, self.num_random_blocks, rng, unidirectional=False)
        uni = self.attention == "unidirectional"
        windows, start, end = [], 0, 0
        for size in self.local_window_blocks:
            end = min(end + size, nb)
            windows.append((start, end))
            start += size
        # The remaining blocks in windows of the last size.
        windows += [(i, min(i + size, nb)) for i in range(start, nb, size)]
        for s, e in windows:
            if s < e:
                grid[s:e, s:e] |= torch.ones(e - s, e - s, dtype=torch.bool).tril() if uni else True
        for s, e in _global_ranges(self, nb):
            if self.horizontal_global_attention:
                grid[s:e, :] = True
            grid[0 if not uni else s :, s:e] = True
        return grid


def _global_ends(starts: list[int], ends) -> list[int] | None:
    if ends is None:
        return None
    ends = _int_list("global_block_end_indices", ends)
    if len(ends) != len(starts):
        raise ValueError(
            f"global_block_end_indices has {len(ends)} entries, global_block_indices "
            f"{len(starts)}: they must pair up"
        )
    for s, e in zip(starts, ends, strict=True):
        if s >= e:
            raise ValueError(f"global block start index {s} must be smaller than its end {e}")
    return ends


def _global_ranges(config, nb: int):
    """(start, end) of each global block range inside nb blocks, as DeepSpeed indexes them (an
    index below nb counts, negative ones from the end)."""
    if config.global_block_end_indices is None:
        for idx in config.global_block_indices:
            if idx < nb:
                yield idx, (idx + 1) if idx != -1 else None
    else:
        for s, e in zip(config.global_block_indices, config.global_block_end_indices, strict=True):
            if s < nb:
                yield s, min(e, nb)


def _random_rows(grid: torch.Tensor, count: int, rng, unidirectional: bool) -> None:
    """``count`` random blocks in every row, drawn with rng.sample as DeepSpeed draws them."""
    nb = grid.shape[0]
    if count == 0:
        return
    _check_blocks("random blocks", count, nb)
    if unidirectional and count > 1:
        raise ValueError(
            f"num_random_blocks={count} with attention='unidirectional': row 0 has only 1 "
            "block to draw from (DeepSpeed raises here too)"
        )
    for row in range(nb):
        cols = rng.sample(range(row + 1) if unidirectional else range(nb), count)
        grid[row, cols] = True


class BigBirdSparsityConfig(_RandomBlocks, SparsityConfig):
    """BigBird in blocks: random blocks per row, a sliding window of blocks, and the first
    ``num_global_blocks`` blocks as global rows and columns."""

    def __init__(
        self,
        num_heads,
        block=16,
        different_layout_per_head=False,
        num_random_blocks=1,
        num_sliding_window_blocks=3,
        num_global_blocks=1,
        attention="bidirectional",
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = _int("num_random_blocks", num_random_blocks, minimum=0)
        self.num_sliding_window_blocks = _int(
            "num_sliding_window_blocks", num_sliding_window_blocks
        )
        self.num_global_blocks = _int("num_global_blocks", num_global_blocks)
        self.attention = _attention(attention)
        self._args.update(
            num_random_blocks=num_random_blocks,
            num_sliding_window_blocks=num_sliding_window_blocks,
            num_global_blocks=num_global_blocks,
            attention=attention,
        )

    def _head_grid(self, h, nb, rng):
        uni = self.attention == "unidirectional"
        grid = torch.zeros(nb, nb, dtype=torch.bool)
        _random_rows(grid, self.num_random_blocks, rng, unidirectional=uni)
        _check_blocks("sliding window blocks", self.num_sliding_window_blocks, nb)
        w = self.num_sliding_window_blocks // 2
        grid |= _band(nb, w, w)
        _check_blocks("global blocks", self.num_global_blocks, nb)
        grid[: self.num_global_blocks, :] = True
        grid[:, : self.num_global_blocks] = True
        return grid.tril() if uni else grid


class BSLongformerSparsityConfig(SparsityConfig):
    """Longformer in blocks: a sliding window of blocks and global blocks at listed indices
    (rows and columns)."""

    def __init__(
        self,
        num_heads,
        block=16,
        different_layout_per_head=False,
        num_sliding_window_blocks=3,
        global_block_indices=[0],  # noqa: B006 - DeepSpeed's default, never mutated
        global_block_end_indices=None,
        attention="bidirectional",
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_sliding_window_blocks = _int(
            "num_sliding_window_blocks", num_sliding_window_blocks
        )
        self.global_block_indices = _int_list("global_block_indices", global_block_indices)
        self.global_block_end_indices = _global_ends(
            self.global_block_indices, global_block_end_indices
        )
        self.attention = _attention(attention)
        self._args.update(
            num_sliding_window_blocks=num_sliding_window_blocks,
            global_block_indices=list(global_block_indices),
            global_block_end_indices=None
            if global_block_end_indices is None
            else list(global_block_end_indices),
            attention=attention,
        )

    def _head_grid(self, h, nb, rng):
        _check_blocks("sliding window blocks", self.num_sliding_window_blocks, nb)
        w = self.num_sliding_window_blocks // 2
        grid = _band(nb, w, w)
        for s, e in _global_ranges(self, nb):
            grid[s:e, :] = True
            grid[:, s:e] = True
        return grid.tril() if self.attention == "unidirectional" else grid


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """A sliding window of ``num_sliding_window_blocks`` blocks (only the earlier half and the
    own block when unidirectional)."""

    def __init__(
        self, num_heads, block=16, num_sliding_window_blocks=3, attention="unidirectional"
    ):
        super().__init__(num_heads, block)
        self.num_sliding_window_blocks = _int(
            "num_sliding_window_blocks", num_sliding_window_blocks
        )
        self.attention = _attention(attention)
        del self._args["different_layout_per_head"]
        self._args.update(num_sliding_window_blocks=num_sliding_window_blocks, attention=attention)

    def _head_grid(self, h, nb, rng):
        _check_blocks("sliding window blocks", self.num_sliding_window_blocks, nb)
        w = self.num_sliding_window_blocks // 2
        return _band(nb, w, w if self.attention == "bidirectional" else 0)


_CONFIGS = {
    cls.__name__: cls
    for cls in (
        DenseSparsityConfig,
        FixedSparsityConfig,
        VariableSparsityConfig,
        BigBirdSparsityConfig,
        BSLongformerSparsityConfig,
        LocalSlidingWindowSparsityConfig,
    )
}


def _rebuild(name: str, args: tuple, causal: bool, seed: int | None) -> Pattern:
    """The pattern a config's pattern() made, from its key (see LengthPattern)."""
    config = _CONFIGS[name](**dict(args))
    if seed is None:
        return config.pattern(causal)
    return config.pattern(causal, seed=seed)


# --------------------------------------------------------------------------- the module
_MASK_MODES = ("add", "mul")
# Most distinct finite values a key_padding_mask in "add" mode may hold: one kernel pass each.
_MAX_KEY_BIASES = 8


class SparseSelfAttention(nn.Module):
    """DeepSpeed's ``SparseSelfAttention`` on effattn's kernels: the same constructor, buffer
    (``master_layout``, made by ``sparsity_config.make_layout(max_seq_length)`` and saved in the
    state dict) and forward.

    A sequence of length L uses the top-left corner of ``master_layout`` (as DeepSpeed), run as
    the config's analytic pattern when the layout is the config's own (not random, not loaded
    from elsewhere), else as :func:`effattn.patterns.from_blocks` of the layout. Unlike
    DeepSpeed it takes any dtype the backend does (not only fp16) and any L up to
    ``max_seq_length`` (the last block may be partial).

    Args:
        sparsity_config: one of this module's sparsity configs.
        key_padding_mask_mode: "add" (the mask's values are added to the scores: 0 keeps a key,
            -inf or a large negative number hides it) or "mul" (0 hides a key, nonzero keeps it).
        attn_mask_mode: the same for ``attn_mask``; in "add" mode its values must be 0 or -inf.
        max_seq_length: the longest sequence, the size of ``master_layout``.
        backend: effattn's backend ("auto", "cpu", "triton", ...).
    """

    def __init__(
        self,
        sparsity_config=SparsityConfig(num_heads=4),  # noqa: B008 - DeepSpeed's default
        key_padding_mask_mode="add",
        attn_mask_mode="mul",
        max_seq_length=2048,
        *,
        backend="auto",
    ):
        super().__init__()
        if not isinstance(sparsity_config, SparsityConfig):
            raise TypeError(
                "sparsity_config must be a SparsityConfig of effattn.compat.deepspeed, got "
                f"{type(sparsity_config).__name__}"
            )
        for name, mode in (
            ("key_padding_mask_mode", key_padding_mask_mode),
            ("attn_mask_mode", attn_mask_mode),
        ):
            if mode not in _MASK_MODES:
                raise ValueError(f"{name} must be 'add' or 'mul', got {mode!r}")
        self.sparsity_config = sparsity_config
        self.register_buffer("master_layout", sparsity_config.make_layout(max_seq_length))
        self.key_padding_mask_mode = key_padding_mask_mode
        self.attn_mask_mode = attn_mask_mode
        self.max_seq_length = max_seq_length
        self.backend = backend
        self._patterns: dict = {}

    def get_layout(self, L):
        """The layout blocks a sequence of length L uses (DeepSpeed's method)."""
        nb = -(-_int("L", L) // self.sparsity_config.block)
        return self.master_layout[..., :nb, :nb].cpu()

    def _pattern(self, causal: bool) -> Pattern:
        """The pattern of ``master_layout`` (with j <= p when ``causal``), made once per layout
        version."""
        layout = self.master_layout
        key = (layout.data_ptr(), layout._version, tuple(layout.shape), causal)
        if key not in self._patterns:
            config = self.sparsity_config
            n = layout.shape[1] * config.block
            own = not config._random and torch.equal(layout.cpu(), config.make_layout(n))
            if own:
                pattern = config.pattern(causal)
                pattern = pattern.at(n) if isinstance(pattern, LengthPattern) else pattern
            else:
                pattern = from_blocks(layout, config.block, causal=causal)
            self._patterns = {key: pattern}
        return self._patterns[key]

    def forward(self, query, key, value, rpe=None, key_padding_mask=None, attn_mask=None):
        """Sparse self-attention (DeepSpeed's signature).

        Args:
            query, value: [B, H, L, D]; key: [B, H, L, D] or transposed [B, H, D, L].
            rpe: not supported (an additive score bias over [L, L]: effattn's kernels take
                masks, not biases); must be None.
            key_padding_mask: [B, L] (or [B, 1, 1, L]), in ``key_padding_mask_mode``.
            attn_mask: [L, L], in ``attn_mask_mode``.

        Returns:
            [B, H, L, D] in query's dtype.
        """
        if rpe is not None:
            raise NotImplementedError(
                "rpe (an additive [L, L] score bias) is not supported: effattn's kernels take "
                "masks, not score biases"
            )
        if query.dim() != 4:
            raise ValueError(f"query must be [B, H, L, D], got shape {tuple(query.shape)}")
        L = query.shape[2]
        if key.dim() == 4 and key.shape[2] != L:
            key = key.transpose(2, 3)  # DeepSpeed accepts keys already transposed for Q K^T
        if query.shape != key.shape or key.shape != value.shape:
            raise NotImplementedError(
                "only self-attention is supported (query, key and value of one shape), got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if L > self.max_seq_length:
            raise ValueError(f"sequence length {L} exceeds max_seq_length={self.max_seq_length}")
        causal, allowed = self._attn_mask(attn_mask, L, query.device)
        pattern = self._pattern(causal)
        if allowed is not None:
            pattern = intersect(pattern, from_mask(allowed))
        hidden, bias = self._key_padding(key_padding_mask, query)
        return _biased_keys(query, key, value, pattern, hidden, bias, self.backend)

    def _attn_mask(self, attn_mask, L: int, device):
        """(causal, bool [L, L] mask or None) for attn_mask: causal when it is the lower
        triangle (then the pattern stays analytic), else the mask itself when it hides
        anything."""
        if attn_mask is None:
            return False, None
        m = attn_mask.squeeze()
        if m.shape != (L, L):
            raise ValueError(f"attn_mask must be [L, L] = [{L}, {L}], got {tuple(attn_mask.shape)}")
        m = m.to(device)
        if self.attn_mask_mode == "mul":
            allowed = m != 0
        else:
            bad = ~((m == 0) | torch.isneginf(m.float()))
            if bad.any():
                raise ValueError(
                    "attn_mask in 'add' mode must hold 0 (keep) or -inf (hide): other values "
                    "are an additive [L, L] score bias, which effattn's kernels do not take"
                )
            allowed = m == 0
        if bool(allowed.all()):
            return False, None
        tril = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        if torch.equal(allowed, tril):
            return True, None
        return False, allowed.cpu()

    def _key_padding(self, mask, query):
        """(hidden bool [B, L] or None, bias [B, L] or None) of key_padding_mask: hidden keys,
        and in 'add' mode the finite values added to the scores of the others."""
        if mask is None:
            return None, None
        b, _, L, _ = query.shape
        m = mask
        for d in range(m.dim() - 1, 0, -1):  # DeepSpeed's squeeze of [B, 1, 1, L]
            m = m.squeeze(d)
        if m.shape != (b, L):
            raise ValueError(
                f"key_padding_mask must be [B, L] = [{b}, {L}], got {tuple(mask.shape)}"
            )
        m = m.to(query.device)
        if self.key_padding_mask_mode == "mul":
            return m == 0, None
        m = m.to(torch.float64 if query.dtype == torch.float64 else torch.float32)
        if torch.isnan(m).any() or torch.isposinf(m).any():
            raise ValueError("key_padding_mask in 'add' mode holds NaN or +inf")
        hidden = torch.isneginf(m)
        bias = torch.where(hidden, 0, m)
        return hidden, (bias if bool((bias != 0).any()) else None)


def _biased_keys(q, k, v, pattern, hidden, bias, backend):
    """softmax(q k^T / sqrt(D) + bias[key]) v over the pattern's keys that are not hidden.

    A per-key bias that takes a few values splits the keys into sets of one bias each; the
    softmax over their union is the log-sum-exp merge of the softmaxes over each (one kernel
    pass per value, its lse raised by the value). A value whose weight underflows to zero in
    the merge for every query (it lies so far below the largest that no score difference can
    make up for it) is skipped: the merge would add exactly zero.
    """
    kw = {"scale": q.shape[-1] ** -0.5, "backend": backend}
    if bias is None:
        return functional.sparse_attention(q, k, v, pattern, key_padding_mask=hidden, **kw)
    values = torch.unique(bias[~hidden]).tolist()
    if len(values) > _MAX_KEY_BIASES:
        raise ValueError(
            f"key_padding_mask in 'add' mode holds {len(values)} distinct finite values; "
            f"effattn runs one pass per value, at most {_MAX_KEY_BIASES}: use 0 / -inf (or "
            "'mul' mode) for padding"
        )
    # |score| <= scale * max |q| * max |k|; the lse of n keys exceeds its largest score by at
    # most log n.
    reach = 2 * kw["scale"] * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max())
    reach += math.log(k.shape[2])
    underflow = 760.0 if q.dtype == torch.float64 else 110.0  # exp(-x) == 0 in the lse dtype
    out = lse = None
    top = max(values)
    for beta in sorted(values, reverse=True):
        if lse is not None and bool(torch.isfinite(lse).all()) and beta - top + reach < -underflow:
            continue
        mask = hidden | (bias != beta)
        o, part_lse = functional.sparse_attention(
            q, k, v, pattern, key_padding_mask=mask, return_lse=True, **kw
        )
        part_lse = part_lse + beta
        if out is None:
            out, lse = o.to(part_lse.dtype), part_lse
            continue
        merged = torch.logaddexp(lse, part_lse)
        safe = torch.where(torch.isfinite(merged), merged, 0)
        out = out * torch.exp(lse - safe).unsqueeze(-1) + o * torch.exp(part_lse - safe).unsqueeze(
            -1
        )
        lse = merged
    return out.to(q.dtype)
