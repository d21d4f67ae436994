"""The plan executor: runs the parts of a plan (:mod:`effattn.decompose`) on one backend.

Forward: each part runs as a block-sparse attention on its own index space, and the parts'
softmaxes over disjoint key sets combine by their log-sum-exp weights. A backend that ``joins``
(:mod:`effattn.ops.backend`) extends the earlier parts' (out, lse) in its kernel for every part
whose rows are views of those rows; other parts come back as (out, lse) and are merged here.

Backward: every part gets the *merged* lse and delta = rowsum(dout * out) - dlse, so its
gradients are its share of the full softmax's; the parts' gradients are summed in the
accumulation dtype and rounded to the inputs' dtypes once, at the end.

Parts whose rows are the strided pattern's chunks (``Part.chunk``) move rows with views:
padded and transposed (:func:`_to_chunks`), or, when every slot is a real row, folded into
B * H * l sequences of m rows on strided views (:func:`_fold`) that read q, k, v in place.

A plan split per head class (``Part.heads``) runs each class's parts on that class's heads
(and the key / value heads they read), then writes the results back into the heads' places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn.decompose import Part, plan
from effattn.ops.backend import Backend, acc_dtype
from effattn.patterns import Pattern

__all__ = ["sparse_backward", "sparse_forward"]


# --------------------------------------------------------------------------- row maps
def _chunk(part: Part) -> int:
    """l of a part whose rows are the strided pattern's transposed chunks (Part.chunk)."""
    if part.chunk is None:
        raise ValueError("the part has no chunked rows")
    return part.chunk


def _to_chunks(t: torch.Tensor, part: Part, front: int, fill: float = 0.0) -> torch.Tensor:
    """Rows [B, H, N, ...] of the original sequence (the first at slot ``front``) in the
    part's transposed order [B, H, l * m, ...] (see Part.chunk), padded with ``fill``."""
    n_slots, l = part.n_q, _chunk(part)
    extra = t.shape[3:]
    t = t.reshape(*t.shape[:3], -1)
    if t.shape[2] != n_slots:
        t = F.pad(t, (0, 0, front, n_slots - front - t.shape[2]), value=fill)
    b, h = t.shape[:2]
    t = t.view(b, h, n_slots // l, l, -1).transpose(2, 3)
    return t.reshape(b, h, n_slots, *extra)


def _from_chunks(t: torch.Tensor, part: Part, front: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: the n rows starting at slot ``front``."""
    b, h, n_slots = t.shape[:3]
    extra, l = t.shape[3:], _chunk(part)
    t = t.reshape(b, h, l, n_slots // l, -1).transpose(2, 3)
    return t.reshape(b, h, n_slots, *extra)[:, :, front : front + n]


def _folded(part: Part, q, k, v, kpm) -> Part | None:
    """The chunk part as B * H * l sequences of m rows on views of q, k, v (Part.folded), when
    it can run so: every slot a real row, no key mask, one kv head per query head, (B, H)
    foldable into one dimension without a copy (so also every other head of a per-class plan)."""
    foldable = (
        kpm is None
        and q.shape[1] == k.shape[1]
        and q.shape[2] == k.shape[2] == part.n_q
        and all(_merges_batch_and_heads(t) for t in (q, k, v))
    )
    return part.folded if foldable else None


def _merges_batch_and_heads(t: torch.Tensor) -> bool:
    rows = t.stride(3) == 1 and t.stride(2) == t.shape[3]
    return rows and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))


def _fold(part: Part, t: torch.Tensor) -> torch.Tensor:
    """[B, H, m * l, ...] -> [B * H, l, m, ...]: chunk b of the rows a * l + b as a head, a view
    (so the column part reads q, k, v in place and writes its results into the sums; view()
    refuses a tensor whose batch and heads do not merge rather than copy it)."""
    b, h, n = t.shape[:3]
    l = _chunk(part)
    return t.view(b * h, n // l, l, *t.shape[3:]).transpose(1, 2)


def _unfold(t: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """Inverse of :func:`_fold` as a [B, H, m, l, ...] view (row a * l + b at [.., a, b])."""
    l, m = t.shape[1:3]
    return t.view(b, h, l, m, *t.shape[3:]).transpose(2, 3)


def _part_rows(part: Part, t: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """A part's per-row result [B, H, part rows, ...] back in original query order."""
    return t if part.chunk is None else _from_chunks(t, part, n_k - n_q, n_q)


def _gather_part(part: Part, q, k, v, kpm):
    """q, k, v and the key mask in the part's index space."""
    key_mask = None if kpm is None else kpm[:, None, :]
    if part.chunk is not None:
        q = _to_chunks(q, part, k.shape[2] - q.shape[2])
        k, v = _to_chunks(k, part, 0), _to_chunks(v, part, 0)
        if key_mask is not None:
            key_mask = _to_chunks(key_mask.unsqueeze(-1), part, 0, fill=True).squeeze(-1)
    elif part.k_index is not None:
        h, h_kv = q.shape[1], k.shape[1]
        idx = part.k_index.clamp(min=0)
        if idx.shape[0] == 1:
            k, v = k.index_select(2, idx[0]), v.index_select(2, idx[0])
        else:
            # Head class c = h % C gathers its own keys: expand the kv heads to the q heads.
            per_head = idx[torch.arange(h, device=idx.device) % idx.shape[0]]
            gather = per_head[None, :, :, None].expand(k.shape[0], h, -1, k.shape[3])
            k = torch.gather(k.repeat_interleave(h // h_kv, 1), 2, gather)
            v = torch.gather(v.repeat_interleave(h // h_kv, 1), 2, gather)
        if key_mask is not None:
            key_mask = key_mask[:, :, idx].squeeze(2) if idx.shape[0] == 1 else kpm[:, per_head]
    if part.key_padding is not None:
        c = part.key_padding.shape[0]
        pad = part.key_padding[torch.arange(q.shape[1], device=q.device) % c][None]
        key_mask = pad if key_mask is None else key_mask | pad
    return q, k, v, key_mask


# --------------------------------------------------------------------------- head classes
def _head_groups(parts: tuple[Part, ...]) -> list[tuple[tuple[int, int] | None, list[Part]]]:
    """The plan's parts by the heads they serve: [(None, parts)] unless split per head class."""
    groups: dict[tuple[int, int] | None, list[Part]] = {}
    for part in parts:
        groups.setdefault(part.heads, []).append(part)
    return list(groups.items())


def _class(heads: tuple[int, int] | None) -> tuple[int, int]:
    """(class, period) of a per-class group of parts."""
    if heads is None:
        raise ValueError("the plan is not split per head class")
    return heads


def _kv_heads(h: int, h_kv: int, c: int, period: int, device):
    """The key / value heads that query heads c, c + period, ... read, in their order: every kv
    head (each serving several of them), a strided slice, or (irregular groups) an index."""
    group = h // h_kv
    if group % period == 0:
        return slice(None)
    if period % group == 0:
        return slice(c // group, None, period // group)
    return (c + period * torch.arange(h // period, device=device)) // group


def _take(t: torch.Tensor, sel) -> torch.Tensor:
    """Heads ``sel`` of t: a view for a slice (kernels take any strides), else a gather."""
    return t[:, sel] if isinstance(sel, slice) else t.index_select(1, sel)


def _add_heads(total: torch.Tensor, sel, g: torch.Tensor) -> None:
    if isinstance(sel, slice):
        total[:, sel] += g
    else:
        total.index_add_(1, sel, g)


# --------------------------------------------------------------------------- forward
def _merge(out, lse, o, part_lse):
    """(out, lse) of the union of two disjoint key sets from each one's; updates out in place
    when it already has the accumulation dtype."""
    merged = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(merged), merged, 0)
    acc = out.to(merged.dtype).mul_(torch.exp(lse - safe).unsqueeze(-1))
    return acc.addcmul_(o, torch.exp(part_lse - safe).unsqueeze(-1)), merged


def _parts(backend: Backend, pattern: Pattern, q, k) -> tuple[Part, ...]:
    bm, bn = backend.plan_blocks(q)
    return plan(pattern, q.shape[2], k.shape[2], bm, bn, device=q.device)


def _hide_keys(k, v, kpm):
    """k and v with the hidden keys' rows zeroed: kernels multiply them by zero probabilities,
    and NaN or inf there (an unwritten cache slot, say) would reach every output row and
    gradient. One O(Nk * D) copy of each when there is a key mask."""
    if kpm is None:
        return k, v
    hidden = kpm[:, None, :, None]
    return k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)


def _empty(q, k) -> bool:
    return q.numel() == 0 or k.numel() == 0


def sparse_forward(backend: Backend, q, k, v, kpm, pattern: Pattern, scale: float):
    """(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq]) of ``pattern`` on ``backend``.

    q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; kpm None or bool [B, Nk] (True = hidden); inputs
    already validated.
    """
    b, h, n_q, d = q.shape
    if _empty(q, k):
        lse = torch.full((b, h, n_q), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        return q.new_zeros(q.shape), lse
    k, v = _hide_keys(k, v, kpm)
    groups = _head_groups(_parts(backend, pattern, q, k))
    if groups[0][0] is None:
        out, lse = _forward(backend, groups[0][1], q, k, v, kpm, scale)
        return out.to(q.dtype).contiguous(), lse.contiguous()
    # Each head class writes its heads of (out, lse) in place: a joining backend extends them
    # from the empty result (zero rows, lse -inf), the others' results are copied in.
    acc = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((b, h, n_q), float("-inf"), dtype=acc, device=q.device)
    for heads, parts in groups:
        c, period = _class(heads)
        sel = _kv_heads(h, k.shape[1], c, period, q.device)
        qc, kc, vc = _take(q, slice(c, None, period)), _take(k, sel), _take(v, sel)
        into = (out[:, c::period], lse[:, c::period])
        _forward(backend, parts, qc, kc, vc, kpm, scale, into=into)
    return out.to(q.dtype), lse


def _forward(backend: Backend, parts: list[Part], q, k, v, kpm, scale: float, into=None):
    """(out, lse) of a plan's parts that serve every head of q (hidden keys already zeroed),
    out in the accumulation dtype or q's. ``into``: (out, lse) views in the accumulation dtype
    holding the empty result, which receive the result (and are returned)."""
    acc = acc_dtype(q.dtype)
    b, h, n_q, d = q.shape
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    if into is not None and backend.joins:
        out, lse = into
    for part in parts:
        folded = _folded(part, q, k, v, kpm)
        if folded is not None:
            qp, kp, vp = (_fold(part, t) for t in (q, k, v))
            km = None
            layout_for = folded.layout_for
        else:
            qp, kp, vp, km = _gather_part(part, q, k, v, kpm)
            layout_for = part.layout_for
        # The part's rows are views of out's rows: a joining backend extends them in place.
        joins = folded is not None or part.chunk is None
        if out is not None and lse is not None and joins and backend.joins and out.dtype == acc:
            state = (_fold(part, out), _fold(part, lse)) if folded is not None else (out, lse)
            backend.sparse_forward(qp, kp, vp, layout_for, scale=scale, key_mask=km, state=state)
            continue
        o, part_lse = backend.sparse_forward(qp, kp, vp, layout_for, scale=scale, key_mask=km)
        if folded is not None:
            o, part_lse = _unfold(o, b, h), _unfold(part_lse, b, h)
            if out is None or lse is None:
                out, lse = o.reshape(b, h, n_q, d), part_lse.reshape(b, h, n_q)
                continue
            l = _chunk(part)
            out5, lse5 = _merge(
                out.view(b, h, part.n_q // l, l, d), lse.view(b, h, part.n_q // l, l), o, part_lse
            )
            out, lse = out5.view(b, h, n_q, d), lse5.view(b, h, n_q)
            continue
        o = _part_rows(part, o, q.shape[2], k.shape[2])
        part_lse = _part_rows(part, part_lse, q.shape[2], k.shape[2])
        if out is None or lse is None:
            out, lse = o, part_lse
            continue
        out, lse = _merge(out, lse, o, part_lse)
    if out is None or lse is None:
        raise ValueError("a plan has at least one part")
    if into is not None:
        for dest, t in zip(into, (out, lse), strict=True):
            if t.data_ptr() != dest.data_ptr():
                dest.copy_(t)
        return into
    return out, lse


# --------------------------------------------------------------------------- backward
def sparse_backward(backend: Backend, dout, dlse, q, k, v, out, lse, kpm, pattern, scale):
    """(dq, dk, dv) in the inputs' dtypes; dout [B, H, Nq, D], dlse None or [B, H, Nq]; out and
    lse from :func:`sparse_forward`; the rest as there."""
    acc = acc_dtype(q.dtype)
    if _empty(q, k):
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    k, v = _hide_keys(k, v, kpm)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse = lse.to(acc)
    groups = _head_groups(_parts(backend, pattern, q, k))
    if groups[0][0] is None:
        dq, dk, dv = _backward(backend, groups[0][1], dout, q, k, v, lse, delta, kpm, scale)
    else:
        dq, dk, dv = _zero_grads(q, k, v, acc)
        h = q.shape[1]
        for key, parts in groups:
            c, period = _class(key)
            heads = slice(c, None, period)
            sel = _kv_heads(h, k.shape[1], c, period, q.device)
            dout_c, q_c, lse_c, delta_c = (_take(t, heads) for t in (dout, q, lse, delta))
            k_c, v_c = _take(k, sel), _take(v, sel)
            args = (backend, parts, dout_c, q_c, k_c, v_c, lse_c, delta_c, kpm, scale)
            if isinstance(sel, slice):  # the class's gradients add up in place
                _backward(*args, into=(dq[:, heads], dk[:, sel], dv[:, sel]))
                continue
            g = _backward(*args)
            dq[:, heads] = g[0]
            _add_heads(dk, sel, g[1])
            _add_heads(dv, sel, g[2])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward(
    backend: Backend, parts: list[Part], dout, q, k, v, lse, delta, kpm, scale, into=None
):
    """(dq, dk, dv) in the accumulation dtype of a plan's parts that serve every head of q.
    ``into``: views of gradient sums (accumulation dtype) that the parts' gradients are added
    to (and that are returned)."""
    acc = acc_dtype(q.dtype)
    # (dq, dk, dv) summed over the parts so far, in the accumulation dtype.
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = into
    for part in parts:
        folded = _folded(part, q, k, v, kpm)
        if folded is not None:
            qf, kf, vf, dof = (_fold(part, t) for t in (q, k, v, dout))
            lsef, deltaf = (_fold(part, t).contiguous() for t in (lse, delta))
            part_grads = backend.sparse_backward(
                qf, kf, vf, dof, lsef, deltaf, folded.layout_for, scale=scale
            )
            grads = grads or _zero_grads(q, k, v, acc)
            for total, g in zip(grads, part_grads, strict=True):
                _fold(part, total).add_(g)
            continue
        qp, kp, vp, km = _gather_part(part, q, k, v, kpm)
        dop, lsep, deltap = dout, lse, delta
        # Rows kept only for dense blocks get no gradient: zero dout and an lse of +inf.
        if part.chunk is not None:
            front = k.shape[2] - q.shape[2]
            dop = _to_chunks(dout, part, front)
            lsep = _to_chunks(lse.unsqueeze(-1), part, front, fill=float("inf")).squeeze(-1)
            deltap = _to_chunks(delta.unsqueeze(-1), part, front).squeeze(-1)
        dqp, dkp, dvp = backend.sparse_backward(
            qp, kp, vp, dop, lsep, deltap, part.layout_for, scale=scale, key_mask=km
        )
        if grads is None and part.chunk is None and part.k_index is None and dqp.dtype == acc:
            # A first part in the original order: its fresh gradients start the sums (saves
            # three zero-filled tensors and a pass over each).
            grads = (dqp, dkp, dvp)
            continue
        grads = grads or _zero_grads(q, k, v, acc)
        dq, dk, dv = grads
        dq += _part_rows(part, dqp, q.shape[2], k.shape[2])
        _add_key_grads(part, dk, dkp)
        _add_key_grads(part, dv, dvp)
    return grads or _zero_grads(q, k, v, acc)


def _zero_grads(q, k, v, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(q.shape, dtype=acc, device=q.device),
        torch.zeros(k.shape, dtype=acc, device=q.device),
        torch.zeros(v.shape, dtype=acc, device=q.device),
    )


def _add_key_grads(part: Part, dk: torch.Tensor, dkp: torch.Tensor) -> None:
    """Add a part's key gradient back at the original keys (summing GQA groups)."""
    if part.k_index is None:
        dk += dkp
        return
    if part.chunk is not None:
        dk += _from_chunks(dkp, part, 0, dk.shape[2])
        return
    valid = part.k_index >= 0
    if part.k_index.shape[0] == 1:
        sel = valid[0].nonzero().squeeze(1)
        dk.index_add_(2, part.k_index[0, sel], dkp.index_select(2, sel).to(dk.dtype))
        return
    b, h, _, d = dkp.shape
    h_kv = dk.shape[1]
    c = part.k_index.shape[0]
    heads = torch.arange(h, device=dkp.device) % c
    idx = part.k_index[heads].clamp(min=0)
    contrib = torch.where(valid[heads][None, :, :, None], dkp.to(dk.dtype), 0)
    per_head = torch.zeros(b, h, dk.shape[2], d, dtype=dk.dtype, device=dk.device)
    per_head.scatter_add_(2, idx[None, :, :, None].expand(b, h, -1, d), contrib)
    dk += per_head.view(b, h_kv, h // h_kv, -1, d).sum(2)
