"""Block layouts: which key blocks each query block visits, and how partial blocks are masked.

Layouts of term patterns are built analytically in time and memory proportional to the blocks
they visit: each term bounds the keys a block row can reach (:meth:`Term.key_range`), only
those candidate blocks are classified (:meth:`Term.block_bounds`), and only the few where two
constraints meet are settled element by element. No n_q x n_k mask and no list of all block
pairs is ever made. Custom (mask) patterns hold an n_q x n_k mask anyway; their layouts carry
deduplicated tiles of it. Block-granular patterns (a bool grid of coarser blocks, as DeepSpeed's
sparsity layouts) are laid out from the set cells of their grid, with one tile per distinct
arrangement of cells in a kernel block.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from effattn.patterns.terms import NEVER, Term, or_terms

__all__ = [
    "BlockLayout",
    "allowed_entries",
    "block_elements",
    "block_grid_layout",
    "custom_layout",
    "layout_to",
    "term_layout",
]

# Uncertain blocks are resolved element by element in chunks of this many elements, which
# bounds the memory of layout construction.
_REFINE_CHUNK = 1 << 22


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


def layout_to(lay: BlockLayout, device: torch.device) -> BlockLayout:
    """``lay`` with its tensors on ``device`` (cached per layout and device)."""
    if lay.kv_full_num.device == device:
        return lay
    return _layout_on_device(lay, device)


@functools.lru_cache(maxsize=256)
def _layout_on_device(lay: BlockLayout, device: torch.device) -> BlockLayout:
    moved: dict[str, Any] = {
        f.name: v.to(device)
        for f in dataclasses.fields(lay)
        if isinstance(v := getattr(lay, f.name), torch.Tensor)
    }
    return dataclasses.replace(lay, **moved)


def block_elements(n_q, n_k, block_m, block_n, qb, kb):
    """Yield (i, j, valid) element grids [U, block_m, block_n] for listed blocks, in chunks."""
    per = max(1, _REFINE_CHUNK // (block_m * block_n))
    ii = torch.arange(block_m).view(1, -1, 1)
    jj = torch.arange(block_n).view(1, 1, -1)
    for s in range(0, qb.numel(), per):
        i = qb[s : s + per].view(-1, 1, 1) * block_m + ii
        j = kb[s : s + per].view(-1, 1, 1) * block_n + jj
        yield i, j, (i < n_q) & (j < n_k)


# --------------------------------------------------------------------- term layouts
def _candidates(t: Term, rows: torch.Tensor, p0, p1, n_k: int, block_n: int):
    """(query block, key block) pairs whose keys the term's band and group can reach."""
    j_lo, j_hi = t.key_range(p0, p1)
    j_lo, j_hi = j_lo.clamp(min=0), j_hi.clamp(max=n_k - 1)
    kb_lo, kb_hi = j_lo // block_n, j_hi // block_n
    count = torch.where(j_lo <= j_hi, kb_hi - kb_lo + 1, 0)
    qb = torch.repeat_interleave(rows, count)
    start = torch.cumsum(count, 0) - count
    kb = kb_lo[qb] + torch.arange(qb.numel()) - start[qb]
    return qb, kb


def _classify_class(terms: Sequence[Term], n_q, n_k, q_offset, block_m, block_n):
    """(query blocks, key blocks, full) of the visited blocks of one class, sorted by
    (query block, key block); ``full`` marks blocks every element of which is allowed."""
    nqb, nkb = -(-n_q // block_m), -(-n_k // block_n)
    rows = torch.arange(nqb, dtype=torch.int64)
    p0 = rows * block_m + q_offset
    p1 = (rows * block_m + block_m).clamp(max=n_q) - 1 + q_offset
    ids, lo, al = [], [], []
    for t in terms:
        qb, kb = _candidates(t, rows, p0, p1, n_k, block_n)
        j0 = kb * block_n
        j1 = (j0 + block_n).clamp(max=n_k) - 1
        a_lo, a_hi, a_all = t.block_bounds(p0[qb], p1[qb], j0, j1)
        ids.append((qb * nkb + kb)[a_hi])
        lo.append(a_lo[a_hi])
        al.append(a_all[a_hi])
    empty = torch.zeros(0, dtype=torch.int64)
    if not ids:
        return empty, empty, torch.zeros(0, dtype=torch.bool)
    if len(ids) == 1:
        # One term's candidates are already distinct and sorted.
        pair, any_lo, all_ = ids[0], lo[0].clone(), al[0].clone()
        uncertain = ~any_lo
    else:
        pair, inverse = torch.unique(torch.cat(ids), return_inverse=True)
        n_pairs = pair.numel()

        def any_of(flags: list[torch.Tensor]) -> torch.Tensor:
            out = torch.zeros(n_pairs, dtype=torch.int64)
            return out.scatter_reduce_(0, inverse, torch.cat(flags).long(), "amax").bool()

        any_lo, all_ = any_of(lo), any_of(al)
        n_terms = torch.bincount(inverse, minlength=n_pairs)
        # A union can cover a block that no single term covers, when two terms meet in it.
        uncertain = ~any_lo | (~all_ & (n_terms >= 2))
    qb, kb = pair // nkb, pair % nkb
    if uncertain.any():
        sel = uncertain.nonzero().squeeze(1)
        r_any, r_all = [], []
        for i, j, valid in block_elements(n_q, n_k, block_m, block_n, qb[sel], kb[sel]):
            ok = or_terms(terms, i + q_offset, j)
            r_any.append((ok & valid).flatten(1).any(1))
            r_all.append((ok | ~valid).flatten(1).all(1))
        any_lo[sel] = torch.cat(r_any)
        all_[sel] = torch.cat(r_all)
    keep = any_lo
    return qb[keep], kb[keep], all_[keep]


def _pack(num_classes: int, n_rows: int, per_class, with_values: bool = False):
    """Padded row lists: (num [P, n_rows] int32, idx [P, n_rows, width] int32[, values of the
    same shape]), -1 past each row's count.

    ``per_class[c]`` is (rows, cols[, values]) sorted by row, then col.
    """
    counts = [torch.bincount(rows, minlength=n_rows) for rows, *_ in per_class]
    width = max([1] + [int(c.max()) for c in counts if c.numel()])
    num = torch.stack(counts).to(torch.int32)
    idx = torch.full((num_classes, n_rows, width), -1, dtype=torch.int32)
    pay = torch.full_like(idx, -1) if with_values else None
    for c, (rows, cols, *values) in enumerate(per_class):
        start = torch.cumsum(counts[c], 0) - counts[c]
        slot = torch.arange(rows.numel()) - start[rows]
        idx[c, rows, slot] = cols.to(torch.int32)
        if pay is not None:
            pay[c, rows, slot] = values[0].to(torch.int32)
    return (num, idx) if pay is None else (num, idx, pay)


def _transposed(qb: torch.Tensor, kb: torch.Tensor, nqb: int, *values: torch.Tensor):
    """The same pairs sorted by (key block, query block)."""
    order = torch.argsort(kb * nqb + qb)
    return (kb[order], qb[order], *(v[order] for v in values))


def assemble(n_q, n_k, q_offset, block_m, block_n, full_pairs, part_pairs, **predicate):
    """A BlockLayout from per-class (query blocks, key blocks[, tile ids]) of full and partial
    blocks, each sorted by (query block, key block)."""
    nqb, nkb = -(-n_q // block_m), -(-n_k // block_n)
    n_cls = len(full_pairs)
    kv_full_num, kv_full_idx = _pack(n_cls, nqb, full_pairs)
    q_full_num, q_full_idx = _pack(n_cls, nkb, [_transposed(q, k, nqb) for q, k in full_pairs])
    tiles = "tiles" in predicate
    kv_part = _pack(n_cls, nqb, part_pairs, tiles)
    q_part = _pack(n_cls, nkb, [_transposed(*pp[:2], nqb, *pp[2:]) for pp in part_pairs], tiles)
    return BlockLayout(
        n_q=n_q,
        n_k=n_k,
        q_offset=q_offset,
        block_m=block_m,
        block_n=block_n,
        kv_full_num=kv_full_num,
        kv_full_idx=kv_full_idx,
        kv_part_num=kv_part[0],
        kv_part_idx=kv_part[1],
        q_full_num=q_full_num,
        q_full_idx=q_full_idx,
        q_part_num=q_part[0],
        q_part_idx=q_part[1],
        terms=predicate.get("terms"),
        tiles=predicate.get("tiles"),
        kv_part_tile=kv_part[2] if tiles else None,
        q_part_tile=q_part[2] if tiles else None,
    )


@functools.lru_cache(maxsize=256)
def term_layout(
    classes: tuple[tuple[Term, ...], ...], n_q: int, n_k: int, q_offset: int, block_m: int,
    block_n: int,
) -> BlockLayout:  # fmt: skip
    """The layout of a term pattern (per class, an OR of terms), built analytically."""
    fulls, parts = [], []
    for terms in classes:
        qb, kb, full = _classify_class(terms, n_q, n_k, q_offset, block_m, block_n)
        fulls.append((qb[full], kb[full]))
        parts.append((qb[~full], kb[~full]))
    width = max(1, max(len(t) for t in classes))
    rows = [[t.as_tuple() for t in ts] + [NEVER.as_tuple()] * (width - len(ts)) for ts in classes]
    table = torch.tensor(rows, dtype=torch.int32).view(len(classes), width, Term.NUM_FIELDS)
    return assemble(n_q, n_k, q_offset, block_m, block_n, fulls, parts, terms=table)


# --------------------------------------------------------------------- custom layouts
def custom_layout(
    allowed: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor],
    period: int, n_q: int, n_k: int, q_offset: int, block_m: int, block_n: int,
) -> BlockLayout:  # fmt: skip
    """The layout of a custom pattern from its element predicate ``allowed(p, j, h, i)``,
    with deduplicated tiles for the partial blocks (O(n_q * n_k), as the mask itself)."""
    nqb, nkb = -(-n_q // block_m), -(-n_k // block_n)
    pad_q, pad_k = nqb * block_m - n_q, nkb * block_n - n_k
    i = torch.arange(n_q).view(-1, 1)
    j = torch.arange(n_k).view(1, -1)
    valid = torch.nn.functional.pad(torch.ones(n_q, n_k, dtype=torch.bool), (0, pad_k, 0, pad_q))
    vb = valid.view(nqb, block_m, nkb, block_n).transpose(1, 2)
    fulls, parts, tiles = [], [], []
    for h in range(period):
        m = allowed(i + q_offset, j, h, i).expand(n_q, n_k)
        mb = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q))
        mb = mb.view(nqb, block_m, nkb, block_n).transpose(1, 2)
        any_ = mb.flatten(2).any(-1)
        all_ = (mb | ~vb).flatten(2).all(-1)
        fulls.append((any_ & all_).nonzero(as_tuple=True))
        part = (any_ & ~all_).nonzero(as_tuple=True)
        parts.append(part)
        tiles.append(mb[part])
    uniq, ids = _dedup_tiles(tiles, block_m, block_n)
    parts = [(qb, kb, tid) for (qb, kb), tid in zip(parts, ids, strict=True)]
    return assemble(n_q, n_k, q_offset, block_m, block_n, fulls, parts, tiles=uniq)


def _dedup_tiles(tiles: list[torch.Tensor], block_m: int, block_n: int):
    """(unique tiles [U, block_m, block_n], per input list the index of each tile in them)."""
    sel = torch.cat(tiles)
    if sel.shape[0]:
        uniq, inverse = torch.unique(sel.flatten(1), dim=0, return_inverse=True)
        uniq = uniq.view(-1, block_m, block_n)
    else:
        uniq = torch.zeros(1, block_m, block_n, dtype=torch.bool)
        inverse = torch.zeros(0, dtype=torch.int64)
    return uniq, torch.split(inverse, [t.shape[0] for t in tiles])


# --------------------------------------------------------------------------- block-granular layouts
def block_grid_layout(
    grid: torch.Tensor, block: int, causal: bool, n_q: int, n_k: int, q_offset: int,
    block_m: int, block_n: int,
) -> BlockLayout:  # fmt: skip
    """The layout of a block-granular pattern: (p, j) allowed iff ``grid[c, p // block,
    j // block]`` (and j <= p when ``causal``); grid bool [P, nb, nb] with nb * block >= n_k.

    Kernel blocks are found from the set cells (time proportional to those and to the visited
    blocks). A kernel block's tile depends only on the cells it covers, its phase against the
    grid, its clipping at the sequence ends and its offset from the diagonal: blocks sharing
    that signature share one tile, built once.
    """
    nkb = -(-n_k // block_n)
    nb = grid.shape[1]
    # Grid cells a kernel block can cover, per side.
    n_r, n_c = (block_m + block - 2) // block + 1, (block_n + block - 2) // block + 1
    ii = torch.arange(block_m).view(1, -1, 1)
    jj = torch.arange(block_n).view(1, 1, -1)
    fulls, parts, tiles = [], [], []
    for c in range(grid.shape[0]):
        pair = torch.zeros(0, dtype=torch.int64)
        if n_q and n_k:
            r_lo, r_hi = q_offset // block, (q_offset + n_q - 1) // block
            rr, cc = grid[c, r_lo : r_hi + 1, : (n_k - 1) // block + 1].nonzero(as_tuple=True)
            rr = rr + r_lo
            if causal:  # cells right of the diagonal hold only keys j > p
                rr, cc = rr[cc <= rr], cc[cc <= rr]
            i0 = (rr * block - q_offset).clamp(min=0) // block_m
            i1 = ((rr + 1) * block - 1 - q_offset).clamp(max=n_q - 1) // block_m
            k0 = cc * block // block_n
            k1 = ((cc + 1) * block - 1).clamp(max=n_k - 1) // block_n
            width = k1 - k0 + 1
            count = (i1 - i0 + 1) * width
            cell = torch.repeat_interleave(torch.arange(rr.numel()), count)
            off = torch.arange(cell.numel()) - (torch.cumsum(count, 0) - count)[cell]
            qb = i0[cell] + off // width[cell]
            kb = k0[cell] + off % width[cell]
            pair = torch.unique(qb * nkb + kb)
        qb, kb = pair // nkb, pair % nkb
        p0, j0 = qb * block_m + q_offset, kb * block_n
        rows = (n_q - qb * block_m).clamp(max=block_m)
        cols = (n_k - j0).clamp(max=block_n)
        gr = (p0 // block).view(-1, 1) + torch.arange(n_r)
        gc = (j0 // block).view(-1, 1) + torch.arange(n_c)
        inside_r = gr <= ((p0 + rows - 1) // block).view(-1, 1)
        inside_c = gc <= ((j0 + cols - 1) // block).view(-1, 1)
        cells = grid[c][gr.clamp(max=nb - 1)[:, :, None], gc.clamp(max=nb - 1)[:, None, :]]
        cells = cells & inside_r[:, :, None] & inside_c[:, None, :]
        diag = (p0 - j0).clamp(-block_m, block_n - 1) if causal else torch.zeros_like(p0)
        extra = torch.stack([p0 % block, j0 % block, rows, cols, diag], 1)
        sig, inverse = torch.unique(
            torch.cat([cells.flatten(1).long(), extra], 1), dim=0, return_inverse=True
        )
        g = sig[:, : n_r * n_c].bool().view(-1, n_r, n_c)
        ph_r, ph_c, s_rows, s_cols, s_diag = (
            sig[:, n_r * n_c + f].view(-1, 1, 1) for f in range(5)
        )
        valid = (ii < s_rows) & (jj < s_cols)
        r_idx = (ph_r + ii) // block
        c_idx = (ph_c + jj) // block
        tile = g[torch.arange(g.shape[0]).view(-1, 1, 1), r_idx, c_idx] & valid
        if causal:
            tile &= jj - ii <= s_diag
        any_ = tile.flatten(1).any(1)[inverse]
        all_ = (tile | ~valid).flatten(1).all(1)[inverse]
        full, part = any_ & all_, any_ & ~all_
        fulls.append((qb[full], kb[full]))
        parts.append((qb[part], kb[part], inverse[part]))
        tiles.append(tile)
    uniq, ids = _dedup_tiles(tiles, block_m, block_n)
    parts = [(qb, kb, remap[sig]) for (qb, kb, sig), remap in zip(parts, ids, strict=True)]
    return assemble(n_q, n_k, q_offset, block_m, block_n, fulls, parts, tiles=uniq)


def allowed_entries(lay: BlockLayout) -> list[int]:
    """Per head class, the allowed entries of a layout with tiles: its full blocks (clipped to
    the sequence ends) plus the set entries of its partial blocks' tiles."""
    rows = _block_extent(lay.n_q, lay.block_m, lay.num_q_blocks, torch.device("cpu"))
    cols = _block_extent(lay.n_k, lay.block_n, lay.num_k_blocks, torch.device("cpu"))
    if lay.tiles is None or lay.kv_part_tile is None:
        raise ValueError("allowed_entries counts layouts with tiles")
    per_tile = lay.tiles.flatten(1).sum(1)
    out = []
    for c in range(lay.num_classes):
        idx = lay.kv_full_idx[c].long()
        full = (torch.where(idx >= 0, cols[idx.clamp(min=0)], 0).sum(-1) * rows).sum()
        tid = lay.kv_part_tile[c].long()
        out.append(int(full + torch.where(tid >= 0, per_tile[tid.clamp(min=0)], 0).sum()))
    return out
