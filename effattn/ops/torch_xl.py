"""Blockwise Transformer-XL attention in plain PyTorch (backend "torch" for xl_attention).

The readable statement of the XL kernel contract, and the CPU fallback when the C++ extension
is missing. Semantics: :func:`effattn.reference.xl_attention`; with M = N - L memory
positions, query i and key j are at distance d = M + i - j, allowed iff 0 <= d < window, and
S[i, j] = scale * ((q_i + u) . k_j + (q_i + vb) . r[min(d, R - 1)]).

One query block [i0, i1) at a time, it touches only the keys the block can see,
[max(0, M + i0 - window + 1), M + i1), and only the r rows their distances reach (0 ..
min(dmax, R - 1), a slice of r): the product (q + vb) r_rows^T [B, H, rows, band] is read
skewed with a gather (query i, key j read column min(M + i - j, R - 1)), what the fused
kernels do per tile. Memory is O(block x keys); nothing [L, M + L] is ever formed.

Backend contract (also met by effattn.ops.triton_xl and effattn.ops.cpu):
    xl_forward(q, k, v, r, u, vb, *, scale, window) -> out [B, H, L, D] in q.dtype,
        lse [B, H, L] fp32 (fp64 for fp64 inputs).
    xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, *, scale, window)
        -> (dq, dk, dv, dr, du, dvb), with delta = rowsum(dout * out) - dlse [B, H, L].
    q [B, H, L, D]; k, v [B, Hkv, M + L, D], H % Hkv == 0; r [H, R, D]; u, vb [H, D];
    window None or an int >= 1.
    xl_check(q) (optional): raise ValueError / TypeError for inputs the backend cannot serve.
Gradients of r are summed per distance with slices (no index_add_ with repeated indices), so
the result is deterministic on every device.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK", "xl_backward", "xl_forward"]

BLOCK = 128


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocks(n_q: int, n_k: int, window: int | None):
    """(i0, i1, j0, j1, dmin, dmax) per query block: its rows, visible keys, distances."""
    mem = n_k - n_q
    for i0 in range(0, n_q, BLOCK):
        i1 = min(i0 + BLOCK, n_q)
        j0 = 0 if window is None else max(0, mem + i0 - window + 1)
        j1 = mem + i1
        yield i0, i1, j0, j1, mem + i0 - (j1 - 1), mem + i1 - 1 - j0


def _grouped(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[B, H, n, D] -> [B, Hkv, G * n, D]: a GQA group's queries against its kv head."""
    b, h, n, d = x.shape
    return x.reshape(b, h_kv, (h // h_kv) * n, d)


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, K] @ w [H, K, P] -> [B, H, n, P] as one [B * n, K] product per head.

    Broadcasting w over the batch in matmul would copy it B times (r is as long as the keys).
    """
    b, h, n, _ = x.shape
    out = x.transpose(0, 1).reshape(h, b * n, -1) @ w
    return out.view(h, b, n, -1).transpose(0, 1)


def _tile(q, k, v, r, u, vb, i0, i1, j0, j1, dmin, dmax, scale, window):
    """What a query block needs: (qu, qv, k, v, r rows 0:hi, dist, scores).

    The block's distances span dmin .. dmax, dmin <= 0 (its keys reach its first query's
    own position); the r rows they use are 0 .. hi - 1 (negative distances are masked,
    distances >= R - 1 all use row R - 1): a slice of r, no copy.
    """
    acc = _acc(q)
    b, h, _, d = q.shape
    h_kv = k.shape[1]
    mem = k.shape[2] - q.shape[2]
    qb = q[:, :, i0:i1].to(acc)
    qu, qv = qb + u.to(acc)[:, None], qb + vb.to(acc)[:, None]
    kb, vb_ = k[:, :, j0:j1].to(acc), v[:, :, j0:j1].to(acc)
    hi = min(dmax, r.shape[1] - 1) + 1
    r_rows = r[:, :hi].to(acc)  # [H, hi, D]
    i = torch.arange(i0, i1, device=q.device).view(-1, 1)
    j = torch.arange(j0, j1, device=q.device).view(1, -1)
    dist = mem + i - j
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window
    n = i1 - i0
    ac = (_grouped(qu, h_kv) @ kb.transpose(-1, -2)).view(b, h, n, j1 - j0)
    by_row = _per_head(qv, r_rows.transpose(-1, -2))  # [B, H, n, hi]: (q_i + vb) . r[t]
    bd = by_row.gather(-1, dist.clamp(0, hi - 1).expand(b, h, -1, -1))
    s = ((ac + bd) * scale).masked_fill(~allowed, float("-inf"))
    return qu, qv, kb, vb_, r_rows, dist, s


def xl_forward(q, k, v, r, u, vb, *, scale: float, window: int | None):
    """Forward. q [B, H, L, D]; k, v [B, Hkv, M + L, D]; r [H, R, D]; u, vb [H, D].

    Returns out [B, H, L, D] (q.dtype) and lse [B, H, L] (fp32, fp64 for fp64).
    """
    b, h, n_q, d = q.shape
    h_kv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, dtype=_acc(q), device=q.device)
    for i0, i1, j0, j1, dmin, dmax in _blocks(n_q, k.shape[2], window):
        *_, vv, _, _, s = _tile(q, k, v, r, u, vb, i0, i1, j0, j1, dmin, dmax, scale, window)
        # Distance 0 is always allowed, so every row has a key and a finite max.
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        o = (_grouped(e / den, h_kv) @ vv).view(b, h, i1 - i0, d)
        out[:, :, i0:i1] = o.to(q.dtype)
        lse[:, :, i0:i1] = (m + den.log()).squeeze(-1)
    return out, lse


def xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, *, scale: float, window: int | None):
    """Gradients (dq, dk, dv, dr, du, dvb), shaped like q, k, v, r, u, vb.

    dout [B, H, L, D]; lse [B, H, L] from the forward; delta = rowsum(dout * out) - dlse.
    """
    acc = _acc(q)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dr = torch.zeros(r.shape, dtype=acc, device=q.device)
    du = torch.zeros(u.shape, dtype=acc, device=q.device)
    dvb = torch.zeros(vb.shape, dtype=acc, device=q.device)
    for i0, i1, j0, j1, dmin, dmax in _blocks(n_q, n_k, window):
        qu, qv, kk, vv, r_rows, dist, s = _tile(
            q, k, v, r, u, vb, i0, i1, j0, j1, dmin, dmax, scale, window
        )
        n, nk = i1 - i0, j1 - j0
        p = torch.exp(s - lse[:, :, i0:i1, None].to(acc))
        do = dout[:, :, i0:i1].to(acc)
        dp = (_grouped(do, h_kv) @ vv.transpose(-1, -2)).view(b, h, n, nk)
        ds = p * (dp - delta[:, :, i0:i1, None].to(acc)) * scale
        g_ds = _grouped(ds, h_kv)
        dq_ac = (g_ds @ kk).view(b, h, n, d)
        # The position part of dS by r row: each (query, key) has its own band column
        # (dist - dmin), then the columns of distances >= R - 1 fold into row R - 1 with
        # slice sums (no repeated-index adds: deterministic on every device).
        band = ds.new_zeros(b, h, n, dmax - dmin + 1)
        band.scatter_(-1, (dist - dmin).expand(b, h, -1, -1), ds)
        hi = r_rows.shape[1]
        ds_rows = band[..., -dmin : hi - dmin].clone()
        ds_rows[..., -1] += band[..., hi - dmin :].sum(-1)
        dq_bd = _per_head(ds_rows, r_rows)
        dq[:, :, i0:i1] = dq_ac + dq_bd
        du += dq_ac.sum((0, 2))
        dvb += dq_bd.sum((0, 2))
        dk[:, :, j0:j1] += g_ds.transpose(-1, -2) @ _grouped(qu, h_kv)
        dv[:, :, j0:j1] += _grouped(p, h_kv).transpose(-1, -2) @ _grouped(do, h_kv)
        dr[:, :hi] += (ds_rows.transpose(-1, -2) @ qv).sum(0)
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dr.to(r.dtype),
        du.to(u.dtype),
        dvb.to(vb.dtype),
    )
