"""Dense references: O(n^2) memory, any dtype (fp64 too), the oracle of every test.

Conventions (docs/design.md): ``q`` [B, H, Nq, D]; ``k``, ``v`` [B, Hkv, Nk, D] with H % Hkv == 0;
query row i sits at absolute position ``i + Nk - Nq``; ``scale`` defaults to ``D ** -0.5``;
a query with no allowed key returns 0 with LSE -inf, and its gradients are 0 (never NaN).
Scores and the weighted sum use the input dtype; the softmax runs in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch

from effattn._validation import check_qkv
from effattn.patterns import Pattern

__all__ = ["attention", "xl_attention"]


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def _masked_softmax_attend(s: torch.Tensor, mask: torch.Tensor | None, v: torch.Tensor):
    """softmax(s) @ v over allowed entries; rows without any give 0 and LSE -inf."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    if s.shape[-1] == 0:
        lse = torch.full(s.shape[:-1], float("-inf"), dtype=acc, device=s.device)
        return torch.matmul(s.to(v.dtype), v), lse  # zeros, still in the autograd graph
    s = s.to(acc)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    nonempty = den > 0
    den_safe = torch.where(nonempty, den, torch.ones_like(den))
    p = e / den_safe
    lse = torch.where(nonempty, torch.log(den_safe) + m, torch.full_like(m, float("-inf")))
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse.squeeze(-1)


def _resolve_mask(mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    if mask is None:
        return None
    if isinstance(mask, Pattern):
        return mask.mask(n_q, n_k, h, device=q.device).unsqueeze(0)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None, a Pattern or a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = allowed), got {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, (b, h, n_q, n_k))
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [B, H, Nq, Nk] = "
            f"{[b, h, n_q, n_k]}"
        ) from None
    return mask.to(q.device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Pattern | torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Dense masked attention.

    Args:
        q: [B, H, Nq, D].
        k, v: [B, Hkv, Nk, D], H % Hkv == 0.
        mask: None (all keys), a Pattern, or a bool tensor broadcastable to [B, H, Nq, Nk]
            (True = allowed). Key padding is expressed through it, e.g. ``~kpm[:, None, None]``.
        scale: score scale, default D ** -0.5.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out [B, H, Nq, D] (q's dtype), and with ``return_lse`` lse [B, H, Nq] (fp32, fp64 for
        fp64 inputs; -inf for a query with no allowed key).
    """
    check_qkv(q, k, v)
    h = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    m = _resolve_mask(mask, q, k)
    s = torch.matmul(q, _expand_kv(k, h).transpose(-1, -2)) * scale
    out, lse = _masked_softmax_attend(s, m, _expand_kv(v, h))
    return (out, lse) if return_lse else out


def xl_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
):
    """Transformer-XL relative attention by direct distance indexing (no rel_shift).

    With M = Nk - L memory positions, query i (absolute position M + i) and key j are at
    distance d = M + i - j; key j is allowed iff 0 <= d (and d < window when given), and

        S[i, j] = scale * ((q_i + u) . k_j + (q_i + vb) . r[min(d, R - 1)])

    Args:
        q: [B, H, L, D] the current segment's queries.
        k, v: [B, Hkv, M + L, D] memory then segment, H % Hkv == 0.
        r: [H, R, D] projected relative embeddings indexed by distance (r[:, d]); distances
            >= R use r[:, R - 1] (Transformer-XL's clamp_len).
        u, vb: [H, D] the content and position biases (r_w_bias, r_r_bias).
        scale: default D ** -0.5.
        window: if given, only the ``window`` most recent positions (d < window).
        return_lse: also return the LSE [B, H, L].

    Returns:
        out [B, H, L, D], and with ``return_lse`` the LSE as in :func:`attention`.
    """
    check_qkv(q, k, v)
    b, h, n_q, d_head = q.shape
    n_k = k.shape[2]
    if r.dim() != 3 or r.shape[0] != h or r.shape[2] != d_head or r.shape[1] < 1:
        raise ValueError(f"r must be [H, R >= 1, D] = [{h}, R, {d_head}], got {tuple(r.shape)}")
    for name, t in (("u", u), ("vb", vb)):
        if t.shape != (h, d_head):
            raise ValueError(f"{name} must be [H, D] = [{h}, {d_head}], got {tuple(t.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scale = d_head**-0.5 if scale is None else scale
    mem = n_k - n_q
    dist = (torch.arange(n_q, device=q.device).view(-1, 1) + mem) - torch.arange(
        n_k, device=q.device
    ).view(1, -1)
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window
    ac = torch.matmul(q + u[:, None, :], _expand_kv(k, h).transpose(-1, -2))
    bd_by_distance = torch.matmul(q + vb[:, None, :], r.transpose(-1, -2))  # [B, H, L, R]
    idx = dist.clamp(0, r.shape[1] - 1).expand(b, h, n_q, n_k)
    bd = torch.gather(bd_by_distance, -1, idx)
    out, lse = _masked_softmax_attend((ac + bd) * scale, allowed, _expand_kv(v, h))
    return (out, lse) if return_lse else out
