"""Blockwise block-sparse attention in plain PyTorch (backend "torch").

The readable statement of the kernel contract (:mod:`effattn.ops.backend`) that every backend
implements (Triton, CUDA, C++ CPU): one query block at a time, only the layout's key blocks,
the pattern's predicate on partial blocks evaluated from the packed term table or the stored
tiles, memory O(block_m x visited keys). It runs on any device and dtype (fp64 for
gradcheck); the C++ CPU backend is the fast path on CPU.
"""

from __future__ import annotations

import torch

from effattn.patterns import BlockLayout, Term

__all__ = ["BLOCK", "check", "plan_blocks", "sparse_backward", "sparse_forward", "terms_allowed"]

BLOCK = 64


def terms_allowed(terms: torch.Tensor, p: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """OR of the packed terms [T, Term.NUM_FIELDS] at positions (p, j): each row unpacked into
    the :class:`effattn.patterns.Term` it was packed from, which evaluates itself."""
    out = torch.zeros(torch.broadcast_shapes(p.shape, j.shape), dtype=torch.bool, device=p.device)
    for row in terms.tolist():
        out |= Term(*row).allowed(p, j)
    return out


def _row_blocks(layout: BlockLayout, c: int, qb: int):
    """(key block ids, partial flags, tile ids or None) visited by query block qb of class c."""
    nf, npart = int(layout.kv_full_num[c, qb]), int(layout.kv_part_num[c, qb])
    full = layout.kv_full_idx[c, qb, :nf].tolist()
    part = layout.kv_part_idx[c, qb, :npart].tolist()
    tiles = None
    if layout.kv_part_tile is not None:
        tiles = [None] * nf + layout.kv_part_tile[c, qb, :npart].tolist()
    return full + part, [False] * nf + [True] * npart, tiles


def _block_mask(layout: BlockLayout, c: int, rows: torch.Tensor, blocks, partial, tiles, device):
    """Allowed [n_rows, n_cols] for the visited key blocks (bounds not included)."""
    pieces = []
    p = (rows + layout.q_offset).view(-1, 1)
    for n, (kb, is_part) in enumerate(zip(blocks, partial, strict=True)):
        j = torch.arange(
            kb * layout.block_n, min((kb + 1) * layout.block_n, layout.n_k), device=device
        )
        if not is_part:
            pieces.append(torch.ones(rows.numel(), j.numel(), dtype=torch.bool, device=device))
        elif layout.terms is not None:
            pieces.append(terms_allowed(layout.terms[c], p, j.view(1, -1)))
        elif layout.tiles is not None and tiles is not None:
            tile = layout.tiles[tiles[n]].to(device)
            r0 = int(rows[0]) - (int(rows[0]) // layout.block_m) * layout.block_m
            pieces.append(tile[r0 : r0 + rows.numel(), : j.numel()])
    return torch.cat(pieces, dim=1)


def _columns(layout: BlockLayout, blocks, device) -> torch.Tensor:
    return torch.cat(
        [
            torch.arange(
                kb * layout.block_n, min((kb + 1) * layout.block_n, layout.n_k), device=device
            )
            for kb in blocks
        ]
    )


def _class_heads(num_heads: int, num_classes: int, device) -> list[torch.Tensor]:
    return [torch.arange(c, num_heads, num_classes, device=device) for c in range(num_classes)]


def _visible(layout, c, rows, blocks, partial, tiles, cols, heads, key_mask, shape):
    """Bool [B, Hc, n_rows, n_cols]: pattern and key mask together."""
    allowed = _block_mask(layout, c, rows, blocks, partial, tiles, rows.device)
    vis = allowed.expand(shape)
    if key_mask is not None:
        km = key_mask.expand(shape[0], -1, -1)
        km = km[:, heads] if km.shape[1] > 1 else km
        vis = vis & ~km[:, :, cols].unsqueeze(2)
    return vis


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not q.is_floating_point():
        raise TypeError(f"the torch backend needs floating-point q, k, v, got {q.dtype}")


def plan_blocks(q: torch.Tensor) -> tuple[int, int]:
    return BLOCK, BLOCK


def sparse_forward(q, k, v, layout_fn, *, scale: float, key_mask=None):
    """Block-sparse attention forward: (out [B, H, n_q, D], lse [B, H, n_q])."""
    layout = layout_fn(BLOCK, BLOCK)
    b, h, n_q, d = q.shape
    group = h // k.shape[1]
    acc = _acc_dtype(q)
    out = torch.zeros(b, h, n_q, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, n_q), float("-inf"), dtype=acc, device=q.device)
    for c, heads in enumerate(_class_heads(h, layout.num_classes, q.device)):
        kc, vc = k[:, heads // group].to(acc), v[:, heads // group].to(acc)
        for qb in range(layout.num_q_blocks):
            blocks, partial, tiles = _row_blocks(layout, c, qb)
            if not blocks:
                continue
            rows = torch.arange(
                qb * layout.block_m, min((qb + 1) * layout.block_m, n_q), device=q.device
            )
            cols = _columns(layout, blocks, q.device)
            qr = q[:, heads][:, :, rows].to(acc)
            s = torch.matmul(qr, kc[:, :, cols].transpose(-1, -2)) * scale
            vis = _visible(layout, c, rows, blocks, partial, tiles, cols, heads, key_mask, s.shape)
            s = s.masked_fill(~vis, float("-inf"))
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.exp(s - m)
            den = e.sum(-1, keepdim=True)
            o = torch.matmul(e, vc[:, :, cols]) / den.clamp(min=torch.finfo(acc).tiny)
            row_lse = torch.where(den > 0, torch.log(den) + m, float("-inf")).squeeze(-1)
            out[:, heads, rows.min() : rows.max() + 1] = o.to(q.dtype)
            lse[:, heads, rows.min() : rows.max() + 1] = row_lse
    return out, lse


def sparse_backward(q, k, v, dout, lse, delta, layout_fn, *, scale: float, key_mask=None):
    """Gradients (dq, dk, dv) of this part in the accumulation dtype, from the merged lse and
    delta [B, H, n_q]."""
    layout = layout_fn(BLOCK, BLOCK)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    acc = _acc_dtype(q)
    dq = torch.zeros(b, h, n_q, d, dtype=acc, device=q.device)
    dk_h = torch.zeros(b, h, n_k, d, dtype=acc, device=q.device)
    dv_h = torch.zeros(b, h, n_k, d, dtype=acc, device=q.device)
    finite = torch.isfinite(lse)
    lse_safe = torch.where(finite, lse, 0).to(acc)
    for c, heads in enumerate(_class_heads(h, layout.num_classes, q.device)):
        kc, vc = k[:, heads // group].to(acc), v[:, heads // group].to(acc)
        for qb in range(layout.num_q_blocks):
            blocks, partial, tiles = _row_blocks(layout, c, qb)
            if not blocks:
                continue
            rows = torch.arange(
                qb * layout.block_m, min((qb + 1) * layout.block_m, n_q), device=q.device
            )
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            cols = _columns(layout, blocks, q.device)
            qr = q[:, heads, r0:r1].to(acc)
            dor = dout[:, heads, r0:r1].to(acc)
            s = torch.matmul(qr, kc[:, :, cols].transpose(-1, -2)) * scale
            vis = _visible(layout, c, rows, blocks, partial, tiles, cols, heads, key_mask, s.shape)
            vis = vis & finite[:, heads, r0:r1].unsqueeze(-1)
            pr = torch.where(vis, torch.exp(s - lse_safe[:, heads, r0:r1].unsqueeze(-1)), 0)
            dp = torch.matmul(dor, vc[:, :, cols].transpose(-1, -2))
            ds = pr * (dp - delta[:, heads, r0:r1].to(acc).unsqueeze(-1)) * scale
            dq[:, heads, r0:r1] += torch.matmul(ds, kc[:, :, cols])
            dk_sel = dk_h[:, heads]
            dk_sel.index_add_(2, cols, torch.matmul(ds.transpose(-1, -2), qr))
            dk_h[:, heads] = dk_sel
            dv_sel = dv_h[:, heads]
            dv_sel.index_add_(2, cols, torch.matmul(pr.transpose(-1, -2), dor))
            dv_h[:, heads] = dv_sel
    dk = dk_h.view(b, h_kv, group, n_k, d).sum(2)
    dv = dv_h.view(b, h_kv, group, n_k, d).sum(2)
    return dq, dk, dv
