"""The key/value cache of :meth:`effattn.nn.SparseMultiheadAttention.decode`.

Streams of a batch may have different lengths (prompts of different lengths, beams dropped).
The kernels align queries to the end of the keys, so each stream's keys are stored
*right-aligned*: all streams of a storage end at the same column, and a shorter stream has more
padding on the left, hidden by the key mask. Distances p - j are then right for every stream.
Patterns that also look at absolute positions (``fixed``'s windows and summary columns: group
and column constraints) repeat with a period P; a stream whose padding is a multiple of P sees
exactly its own positions. So streams are kept in groups by ``length % P``, one storage per
group, each decoded with one kernel call (P = 1, one group, for patterns of distances only:
causal, local, strided).

Appending writes in place after a storage's last column, in storage grown by doubling
(amortized O(1) copies per token). A cache that is not its storage's latest (decoding twice
from the same cache: branching) copies instead of overwriting its successor's keys.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from effattn.patterns import Pattern

__all__ = ["SparseCache", "position_period"]


def position_period(pattern: Pattern) -> int | None:
    """P such that moving every query and key position by a multiple of P changes nothing
    (1 for patterns of distances only); None when there is none (custom patterns, groups of
    unequal widths)."""
    if pattern.is_custom:
        return None
    period = 1
    for terms in pattern.classes():
        for t in terms:
            if t.gq > 0:
                if t.gq != t.gk:
                    return None
                period = math.lcm(period, t.gq)
            if t.smod > 0:
                period = math.lcm(period, t.smod)
    return period


class _Storage:
    """k, v [Bg, H, capacity, D] of one group; ``filled`` columns hold keys."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, filled: int):
        self.k, self.v, self.filled = k, v, filled


@dataclass(frozen=True)
class _Group:
    """Streams ``members`` (their indices in the batch) stored right-aligned in ``storage``,
    ending at column ``end``; stream i's keys start at column ``pads[i]``."""

    members: torch.Tensor  # int64 [Bg]
    storage: _Storage
    end: int
    pads: torch.Tensor  # int64 [Bg], multiples of the period

    def key_padding_mask(self, n: int) -> torch.Tensor:
        """bool [Bg, n]: True on each stream's left padding."""
        cols = torch.arange(n, device=self.pads.device)
        return cols[None, :] < self.pads[:, None]


@dataclass(frozen=True)
class SparseCache:
    """Decoding state of one :class:`effattn.nn.SparseMultiheadAttention` (from ``decode``).

    Attributes:
        lengths: int64 [B] positions each stream holds.
        owner: the module that made it (weak reference).
        period: the position period of the module's pattern when the cache was made.
    """

    groups: tuple[_Group, ...]
    lengths: torch.Tensor
    owner: weakref.ref
    period: int
    dtype: torch.dtype
    device: torch.device

    def __len__(self) -> int:
        """The batch size B."""
        return self.lengths.numel()

    def select(self, indices) -> SparseCache:
        """The cache of streams ``indices`` (int64 [B'], may repeat: beam search reorders and
        drops streams), copying the selected keys and values."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.lengths.device)
        if idx.dim() != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= len(self))):
            raise ValueError(
                f"indices must be a 1-D sequence of stream indices in [0, {len(self)}), got "
                f"{indices!r}"
            )
        groups = []
        for g in self.groups:
            # Position of each member in the new batch; a member may be picked several times.
            where = (idx[:, None] == g.members[None, :].to(idx.device)).nonzero()
            if where.numel() == 0:
                continue
            new_pos, rows = where[:, 0], where[:, 1]
            rows_dev = rows.to(g.storage.k.device)
            k = g.storage.k[:, :, : g.end].index_select(0, rows_dev)
            v = g.storage.v[:, :, : g.end].index_select(0, rows_dev)
            groups.append(_Group(new_pos, _Storage(k, v, g.end), g.end, g.pads[rows_dev]))
        return SparseCache(
            tuple(groups), self.lengths[idx], self.owner, self.period, self.dtype, self.device
        )


def _grow(storage: _Storage, end: int, t: int) -> _Storage:
    """``storage`` itself when t more columns fit after ``end`` and nothing follows them
    there; else a copy of its first ``end`` columns with room to double."""
    k = storage.k
    if storage.filled == end and end + t <= k.shape[2]:
        return storage
    room = max(2 * (end + t), 16)
    new_k = k.new_empty(k.shape[0], k.shape[1], room, k.shape[3])
    new_v = storage.v.new_empty(new_k.shape)
    new_k[:, :, :end], new_v[:, :, :end] = k[:, :, :end], storage.v[:, :, :end]
    return _Storage(new_k, new_v, end)


def new_group(members: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pads: torch.Tensor):
    """A group of streams ``members`` holding k, v [Bg, H, end, D] (right-aligned, ``pads``
    int64 [Bg] columns of left padding each), with room to double."""
    end = k.shape[2]
    storage = _grow(_Storage(k, v, end), end, end + 16)
    return _Group(members, storage, end, pads.to(k.device))


def append(group: _Group, k_new: torch.Tensor, v_new: torch.Tensor) -> _Group:
    """The group with [Bg, H, T, D] new keys and values after its last column."""
    t = k_new.shape[2]
    storage = _grow(group.storage, group.end, t)
    storage.k[:, :, group.end : group.end + t] = k_new
    storage.v[:, :, group.end : group.end + t] = v_new
    storage.filled = group.end + t
    return _Group(group.members, storage, group.end + t, group.pads)


def prefill_groups(lengths: torch.Tensor, period: int) -> list[tuple[torch.Tensor, int]]:
    """(members, end) of the groups of streams with ``lengths`` (int64 [B]): one group per
    length % period, ending at the group's longest stream."""
    out = []
    residues = lengths % period
    for r in torch.unique(residues).tolist():
        members = (residues == r).nonzero().squeeze(1)
        out.append((members, int(lengths[members].max())))
    return out


def right_aligned(x: torch.Tensor, lengths: torch.Tensor, end: int) -> torch.Tensor:
    """x [Bg, H, T, D] (stream i's first lengths[i] rows valid) as [Bg, H, end, D] with stream
    i's rows at columns end - lengths[i] ... end - 1 and zeros before."""
    bg, h, t, d = x.shape
    cols = torch.arange(end, device=x.device)
    src = cols[None, :] - (end - lengths.to(x.device))[:, None]  # [Bg, end]
    valid = src >= 0
    gathered = x.gather(2, src.clamp(min=0)[:, None, :, None].expand(bg, h, end, d))
    return torch.where(valid[:, None, :, None], gathered, 0)
