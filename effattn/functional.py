"""Public attention functions: validation, backend dispatch, plans, autograd, torch.compile.

``sparse_attention`` runs a pattern as the parts of its plan (:mod:`effattn.decompose`) on one
backend's block-sparse kernels and merges them by log-sum-exp (a backend with ``RESUMES`` lets
each later part join its result into the earlier parts' in its kernel instead); the backward
hands every part the merged LSE and delta, so each part's gradients are its share of the full
softmax. Both directions are ``torch.library`` custom ops, so ``torch.compile`` traces them
without graph breaks and, the op being opaque, without specializing on the sequence length.

Backends (``backend=``): "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cuda" (CUDA C++ extension), "cpu" (C++ extension), "torch" (blockwise PyTorch, any device, the
fallback for CPU tensors when the extension is missing) and "reference" (dense O(n^2) oracle,
only when asked for by name). "auto" picks Triton for CUDA tensors and "cpu", else "torch", for
CPU tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os

import torch

from effattn import _extension, reference
from effattn.decompose import Part, plan
from effattn.patterns import Pattern, from_key, from_mask

__all__ = ["backends", "sparse_attention", "xl_attention"]

_BACKEND_MODULES = {
    "triton": "effattn.ops.triton_sparse",
    "cuda": "effattn.ops.cuda",
    "cpu": "effattn.ops.cpu",
    "torch": "effattn.ops.torch_sparse",
}
_XL_MODULES = {
    "triton": "effattn.ops.triton_xl",
    "cuda": "effattn.ops.cuda",
    "cpu": "effattn.ops.cpu",
    "torch": "effattn.ops.torch_xl",
}
_NAMES = ("auto", "reference", *_BACKEND_MODULES)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


# --------------------------------------------------------------------------- backends
def _triton_ready() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _module(table: dict[str, str], name: str):
    try:
        return importlib.import_module(table[name])
    except ImportError as e:
        raise ValueError(f"backend {name!r} is not available here: {e}") from e


def backends() -> list[str]:
    """Names of the backends that can run here, among "triton", "cuda", "cpu", "reference"."""
    names = []
    if _triton_ready():
        names.append("triton")
    if _extension.has_cuda() and torch.cuda.is_available():
        names.append("cuda")
    if _extension.has_cpu():
        names.append("cpu")
    names.append("reference")
    return names


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _NAMES:
        raise ValueError(f"backend must be one of {_NAMES}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if _triton_ready():
            return "triton"
        raise ValueError(
            "no backend for CUDA tensors: install triton (or build with EFFATTN_CUDA=1)"
        )
    if device.type == "cpu":
        return "cpu" if _extension.has_cpu() else "torch"
    raise ValueError(f"no backend for tensors on {device}")


# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, backend: str) -> None:
    reference._check_qkv(q, k, v)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must be fp16, bf16, fp32 or fp64, got {q.dtype}")
    if backend != "reference" and not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D={q.shape[-1]} is not supported: the kernels take 16 <= D <= 256 "
            "(backend='reference' takes any)"
        )


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_key_padding_mask(kpm, q, k) -> None:
    if kpm is None:
        return
    if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor [B, Nk], got {getattr(kpm, 'dtype', type(kpm))}"
        )
    if kpm.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must have shape [B, Nk] = {[k.shape[0], k.shape[2]]}, "
            f"got {list(kpm.shape)}"
        )
    if kpm.device != q.device:
        raise ValueError(f"key_padding_mask is on {kpm.device}, q on {q.device}")


# --------------------------------------------------------------------------- plan execution
def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _to_chunks(t: torch.Tensor, part: Part, front: int, fill: float = 0.0) -> torch.Tensor:
    """Rows [B, H, N, ...] of the original sequence (the first at slot ``front``) in the
    part's transposed order [B, H, l * m, ...] (see Part.chunk), padded with ``fill``."""
    n_slots = part.n_q
    extra = t.shape[3:]
    t = t.reshape(*t.shape[:3], -1)
    if t.shape[2] != n_slots:
        t = torch.nn.functional.pad(t, (0, 0, front, n_slots - front - t.shape[2]), value=fill)
    b, h = t.shape[:2]
    t = t.view(b, h, n_slots // part.chunk, part.chunk, -1).transpose(2, 3)
    return t.reshape(b, h, n_slots, *extra)


def _from_chunks(t: torch.Tensor, part: Part, front: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: the n rows starting at slot ``front``."""
    b, h, n_slots = t.shape[:3]
    extra = t.shape[3:]
    t = t.reshape(b, h, part.chunk, n_slots // part.chunk, -1).transpose(2, 3)
    return t.reshape(b, h, n_slots, *extra)[:, :, front : front + n]


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


def _foldable(part: Part, q, k, v, kpm) -> bool:
    """Whether the chunk part can run as B * H * l sequences of m rows on views of q, k, v:
    every slot a real row, no key mask, one kv head per query head, (B, H) foldable."""
    return (
        part.folded is not None
        and kpm is None
        and q.shape[1] == k.shape[1]
        and q.shape[2] == k.shape[2] == part.n_q
        and all(t.is_contiguous() for t in (q, k, v))
    )


def _fold(part: Part, t: torch.Tensor) -> torch.Tensor:
    """[B, H, m * l, ...] -> [B * H, l, m, ...]: chunk b of the rows a * l + b as a head (a view
    for contiguous t, so the column part reads q, k, v in place instead of copying them)."""
    b, h, n = t.shape[:3]
    return t.reshape(b * h, n // part.chunk, part.chunk, *t.shape[3:]).transpose(1, 2)


def _unfold(t: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """Inverse of :func:`_fold` as a [B, H, m, l, ...] view (row a * l + b at [.., a, b])."""
    l, m = t.shape[1:3]
    return t.view(b, h, l, m, *t.shape[3:]).transpose(2, 3)


def _part_rows(part: Part, t: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """A part's per-row result [B, H, part rows, ...] back in original query order."""
    return t if part.chunk is None else _from_chunks(t, part, n_k - n_q, n_q)


def _sparse_kernels(backend: str, q, k, v):
    """The backend module serving these tensors. Runs inside the custom ops, so that
    torch.compile never traces the imports that resolving and loading a backend involves."""
    kern = _module(_BACKEND_MODULES, _resolve_backend(backend, q.device))
    kern.check(q, k, v)
    return kern


def _run_forward(q, k, v, kpm, pattern: Pattern, scale: float, backend: str):
    kern = _sparse_kernels(backend, q, k, v)
    bm, bn = kern.plan_blocks(q)
    parts = plan(pattern, q.shape[2], k.shape[2], bm, bn, device=q.device)
    b, h, n_q, d = q.shape
    out = lse = None
    for part in parts:
        fold = out is not None and _foldable(part, q, k, v, kpm)
        if fold:
            qp, kp, vp = (_fold(part, t) for t in (q, k, v))
            km = None
            layout_for = part.folded.layout_for
        else:
            qp, kp, vp, km = _gather_part(part, q, k, v, kpm)
            layout_for = part.layout_for
        joins = fold or part.chunk is None  # the part's rows are views of out's rows
        if out is not None and joins and getattr(kern, "RESUMES", False) and out.dtype == _acc(q):
            # The backend joins this part's result into (out, lse) in its kernel.
            state = tuple(_fold(part, t) for t in (out, lse)) if fold else (out, lse)
            kern.sparse_forward(qp, kp, vp, layout_for, scale=scale, key_mask=km, state=state)
            continue
        o, part_lse = kern.sparse_forward(qp, kp, vp, layout_for, scale=scale, key_mask=km)
        if fold:
            m_rows = part.n_q // part.chunk
            out5, lse5 = _merge(
                out.view(b, h, m_rows, part.chunk, d),
                lse.view(b, h, m_rows, part.chunk),
                _unfold(o, b, h),
                _unfold(part_lse, b, h),
            )
            out, lse = out5.reshape(b, h, n_q, d), lse5.reshape(b, h, n_q)
            continue
        o = _part_rows(part, o, q.shape[2], k.shape[2])
        part_lse = _part_rows(part, part_lse, q.shape[2], k.shape[2])
        if out is None:
            out, lse = o, part_lse
            continue
        out, lse = _merge(out, lse, o, part_lse)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _merge(out, lse, o, part_lse):
    """(out, lse) of the union of two disjoint key sets from each one's; updates out in place
    when it already has the accumulation dtype."""
    # Softmaxes over disjoint key sets combine by their log-sum-exp weights.
    merged = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(merged), merged, 0)
    acc = out.to(merged.dtype).mul_(torch.exp(lse - safe).unsqueeze(-1))
    return acc.addcmul_(o, torch.exp(part_lse - safe).unsqueeze(-1)), merged


def _run_backward(dout, dlse, q, k, v, out, lse, kpm, pattern: Pattern, scale: float, backend: str):
    kern = _sparse_kernels(backend, q, k, v)
    bm, bn = kern.plan_blocks(q)
    parts = plan(pattern, q.shape[2], k.shape[2], bm, bn, device=q.device)
    acc = _acc(q)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse = lse.to(acc)
    # (dq, dk, dv) summed over the parts so far, in the accumulation dtype.
    grads = None
    for part in parts:
        if _foldable(part, q, k, v, kpm):
            qf, kf, vf, dof = (_fold(part, t) for t in (q, k, v, dout))
            lsef, deltaf = (_fold(part, t).contiguous() for t in (lse, delta))
            part_grads = kern.sparse_backward(
                qf, kf, vf, dof, lsef, deltaf, part.folded.layout_for, scale=scale
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
        dqp, dkp, dvp = kern.sparse_backward(
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
    dq, dk, dv = grads or _zero_grads(q, k, v, acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _zero_grads(q, k, v, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))


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


# --------------------------------------------------------------------------- custom ops
# Custom ops take tensors, strings and numbers, not Patterns: a built-in pattern travels as its
# key, a custom one (which has a fixed size anyway) as its element mask.
def _op_pattern(pattern_key: str, custom_mask: torch.Tensor | None) -> Pattern:
    if custom_mask is None:
        return from_key(pattern_key)
    return _custom_pattern(custom_mask)


_CUSTOM_CACHE: dict[tuple, Pattern] = {}


def _custom_pattern(mask: torch.Tensor) -> Pattern:
    """from_mask(mask), cached by content so that repeated calls reuse the layouts."""
    cpu = mask.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(cpu.shape), hashlib.sha1(cpu.numpy().tobytes()).hexdigest())
    if key not in _CUSTOM_CACHE:
        if len(_CUSTOM_CACHE) >= 16:
            _CUSTOM_CACHE.pop(next(iter(_CUSTOM_CACHE)))
        _CUSTOM_CACHE[key] = from_mask(cpu)
    return _CUSTOM_CACHE[key]


@torch.library.custom_op("effattn::sparse_attention", mutates_args=())
def _sparse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    pattern_key: str,
    custom_mask: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = _op_pattern(pattern_key, custom_mask)
    return _run_forward(q, k, v, key_padding_mask, pattern, scale, backend)


@_sparse_op.register_fake
def _(q, k, v, key_padding_mask, pattern_key, custom_mask, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q))


@torch.library.custom_op("effattn::sparse_attention_backward", mutates_args=())
def _sparse_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    pattern_key: str,
    custom_mask: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pattern = _op_pattern(pattern_key, custom_mask)
    return _run_backward(dout, dlse, q, k, v, out, lse, key_padding_mask, pattern, scale, backend)


@_sparse_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, pattern_key, custom_mask, scale, backend):
    # The kernels return contiguous tensors, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _sparse_setup(ctx, inputs, output):
    q, k, v, kpm, pattern_key, custom_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, custom_mask)
    ctx.pattern_key, ctx.scale, ctx.backend = pattern_key, scale, backend


def _sparse_autograd(ctx, dout, dlse):
    q, k, v, out, lse, kpm, custom_mask = ctx.saved_tensors
    dq, dk, dv = _sparse_backward_op(
        dout.contiguous(),
        dlse,
        q,
        k,
        v,
        out,
        lse,
        kpm,
        ctx.pattern_key,
        custom_mask,
        ctx.scale,
        ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None


_sparse_op.register_autograd(_sparse_autograd, setup_context=_sparse_setup)


# --------------------------------------------------------------------------- public API
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Block-sparse attention with an exact pattern.

    Args:
        q: [B, H, Nq, D] queries; row i sits at absolute position i + Nk - Nq.
        k, v: [B, Hkv, Nk, D] keys and values, H % Hkv == 0 (grouped-query attention).
        pattern: a :class:`effattn.patterns.Pattern` (e.g. ``patterns.strided(128)``).
        scale: score scale, default D ** -0.5.
        key_padding_mask: bool [B, Nk], True = ignore that key (as nn.MultiheadAttention).
        backend: "auto", "triton", "cuda", "cpu", "torch" or "reference" (module docstring).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out [B, H, Nq, D] in q's dtype; with ``return_lse`` also lse [B, H, Nq] (fp32, fp64 for
        fp64 inputs), -inf for a query with no allowed key (whose output is 0).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be an effattn.patterns.Pattern, got {type(pattern).__name__}"
        )
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in _NAMES:
        raise ValueError(f"backend must be one of {_NAMES}, got {backend!r}")
    _check_inputs(q, k, v, backend)
    pattern._check_size(q.shape[2], k.shape[2])
    pattern._check_heads(q.shape[1])
    scale = _check_scale(scale, q.shape[-1])
    _check_key_padding_mask(key_padding_mask, q, k)
    if backend == "reference":
        mask = pattern.mask(q.shape[2], k.shape[2], q.shape[1], device=q.device).unsqueeze(0)
        if key_padding_mask is not None:
            mask = mask & ~key_padding_mask[:, None, None, :]
        return reference.attention(q, k, v, mask, scale=scale, return_lse=return_lse)
    if pattern.is_custom:
        heads = math.lcm(pattern.period, pattern.head_divisor)
        key, custom_mask = "", pattern.mask(q.shape[2], k.shape[2], heads, device=q.device)
    else:
        key, custom_mask = pattern.key, None
    out, lse = _sparse_op(q, k, v, key_padding_mask, key, custom_mask, scale, backend)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- Transformer-XL
def _check_xl(q, k, v, r, u, vb, window) -> None:
    """Shapes, dtypes and devices of r, u, vb and the window (q, k, v already checked)."""
    h, d = q.shape[1], q.shape[3]
    for name, t, dims in (("r", r, "[H, R, D]"), ("u", u, "[H, D]"), ("vb", vb, "[H, D]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if r.dim() != 3 or r.shape[0] != h or r.shape[2] != d:
        raise ValueError(f"r must be [H, R, D] = [{h}, R, {d}], got shape {tuple(r.shape)}")
    if r.shape[1] < 1:
        raise ValueError("r must have at least one row (distance 0), got R = 0")
    for name, t in (("u", u), ("vb", vb)):
        if t.shape != (h, d):
            raise ValueError(f"{name} must be [H, D] = [{h}, {d}], got shape {tuple(t.shape)}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (distance 0 is the query itself), got {window}")


def _resolve_xl_backend(backend: str, device: torch.device) -> str:
    """As _resolve_backend, except that "auto" takes "cpu" only once the C++ module serves XL."""
    name = _resolve_backend(backend, device)
    if backend == "auto" and name == "cpu":
        try:
            cpu = importlib.import_module(_XL_MODULES["cpu"])
        except ImportError:
            return "torch"
        if not hasattr(cpu, "xl_forward"):
            return "torch"
    return name


def _xl_kernels(backend: str, q: torch.Tensor):
    """The backend module serving q. Runs inside the custom ops, so that torch.compile never
    traces the imports that resolving and loading a backend involves."""
    kern = _module(_XL_MODULES, _resolve_xl_backend(backend, q.device))
    if hasattr(kern, "xl_check"):
        kern.xl_check(q)
    return kern


def _xl_delta(out, dout, dlse):
    acc = _acc(out)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    return delta if dlse is None else delta - dlse.to(acc)


@torch.library.custom_op("effattn::xl_attention", mutates_args=())
def _xl_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    scale: float,
    window: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _xl_kernels(backend, q)
    return kern.xl_forward(q, k, v, r, u, vb, scale=scale, window=window)


@_xl_op.register_fake
def _(q, k, v, r, u, vb, scale, window, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q))


@torch.library.custom_op("effattn::xl_attention_backward", mutates_args=())
def _xl_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    window: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = _xl_kernels(backend, q)
    delta = _xl_delta(out, dout, dlse)
    grads = kern.xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window)
    # Kernels may return the accumulation dtype (the CPU and CUDA ones do): round once, here.
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, r, u, vb)))


@_xl_backward_op.register_fake
def _(dout, dlse, q, k, v, r, u, vb, out, lse, scale, window, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, r, u, vb))


def _xl_setup(ctx, inputs, output):
    q, k, v, r, u, vb, scale, window, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, r, u, vb, out, lse)
    ctx.scale, ctx.window, ctx.backend = scale, window, backend


def _xl_autograd(ctx, dout, dlse):
    q, k, v, r, u, vb, out, lse = ctx.saved_tensors
    grads = _xl_backward_op(
        dout.contiguous(), dlse, q, k, v, r, u, vb, out, lse, ctx.scale, ctx.window, ctx.backend
    )
    return (*grads, None, None, None)


_xl_op.register_autograd(_xl_autograd, setup_context=_xl_setup)


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
    backend: str = "auto",
    return_lse: bool = False,
):
    """Transformer-XL relative-position attention, fused (never forms an [L, M + L] matrix).

    With M = Nk - L memory positions, query i (absolute position M + i) and key j are at
    distance d = M + i - j; key j is allowed iff 0 <= d (and d < window when given), and

        S[i, j] = scale * ((q_i + u) . k_j + (q_i + vb) . r[min(d, R - 1)])

    (semantics of :func:`effattn.reference.xl_attention`; the original code's r, ordered from
    the largest distance down to 0, is ``r.flip(1)`` here: see :mod:`effattn.nn.xl`).

    Args:
        q: [B, H, L, D] the current segment's queries.
        k, v: [B, Hkv, M + L, D] memory then segment, H % Hkv == 0 (grouped-query attention).
        r: [H, R, D] projected relative embeddings indexed by distance, R >= 1; distances
            >= R use r[:, R - 1] (Transformer-XL's clamp_len).
        u, vb: [H, D] content and position biases (the original's r_w_bias, r_r_bias).
        scale: score scale, default D ** -0.5.
        window: None, or an int >= 1: only distances < window (Transformer-XL's same_length
            with window = mem_len).
        backend: "auto", "triton", "cuda", "cpu", "torch" or "reference" (module docstring).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out [B, H, L, D] in q's dtype; with ``return_lse`` also lse [B, H, L] (fp32, fp64 for
        fp64 inputs). Gradients flow to q, k, v, r, u and vb.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in _NAMES:
        raise ValueError(f"backend must be one of {_NAMES}, got {backend!r}")
    _check_inputs(q, k, v, backend)
    _check_xl(q, k, v, r, u, vb, window)
    scale = _check_scale(scale, q.shape[-1])
    if backend == "reference":
        return reference.xl_attention(
            q, k, v, r, u, vb, scale=scale, window=window, return_lse=return_lse
        )
    out, lse = _xl_op(q, k, v, r, u, vb, scale, window, backend)
    return (out, lse) if return_lse else out
