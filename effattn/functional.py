"""Public attention functions and their custom ops.

``sparse_attention`` and ``xl_attention`` validate their arguments once
(:mod:`effattn._validation`) and call a ``torch.library`` custom op; the op picks the backend
(:mod:`effattn.ops.dispatch`) and runs it: a pattern's plan through the executor
(:mod:`effattn.execute`), Transformer-XL as one kernel. Being custom ops with fake kernels and
registered autograd, both trace under ``torch.compile`` without graph breaks and, the ops being
opaque, without specializing on the sequence length. Backends are resolved and loaded inside
the ops, so compiled graphs never trace imports.

Backends (``backend=``): "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cuda" (CUDA C++ extension, by name only), "cpu" (C++ extension), "torch" (blockwise PyTorch,
any device), "reference" (dense O(n^2) oracle, only when asked for by name) and "auto": Triton
for CUDA tensors; "cpu", else "torch" with a one-time warning, for CPU tensors.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal, overload

import torch

from effattn import _validation, execute, reference
from effattn.ops import dispatch
from effattn.ops.backend import acc_dtype
from effattn.patterns import Pattern, TermPattern, from_key, from_mask

__all__ = ["backend_for", "backends", "sparse_attention", "xl_attention"]

MIN_HEAD_DIM, MAX_HEAD_DIM = _validation.MIN_HEAD_DIM, _validation.MAX_HEAD_DIM
BACKENDS = dispatch.NAMES


def backends() -> list[str]:
    """Names of the backends that can run here, among "triton", "cuda", "cpu", "torch" and
    "reference" (always)."""
    return dispatch.available()


def backend_for(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
) -> str:
    """The name of the backend that a call of ``op`` ("sparse" or "xl") on these inputs runs
    on (what benchmarks record), or an UnsupportedError saying why none can.

    q [B, H, Nq, D]; k [B, Hkv, Nk, D]; only their metadata is read.
    """
    if op not in ("sparse", "xl"):
        raise ValueError(f"op must be 'sparse' or 'xl', got {op!r}")
    backend = _validation.check_backend(backend, BACKENDS)
    if backend == "reference":
        return backend
    return dispatch.select(backend, op, q, k, key_mask=key_padding_mask is not None).name


def _no_function_transforms(name: str, *tensors: torch.Tensor) -> None:
    # torch.func transforms (grad, vmap, jvp, ...) need an autograd.Function with functorch
    # rules, which these ops do not have: say so instead of failing deep inside torch.
    if torch.compiler.is_compiling():
        return
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise RuntimeError(
            f"effattn.{name} does not support torch.func transforms (grad, vmap, jvp, ...): "
            "use torch.autograd.grad or .backward()"
        )


def _no_double_backward(name: str) -> None:
    # The backward ops have no derivative of their own: differentiating them again would
    # return gradients that are silently missing terms, so refuse where it starts.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"effattn.{name} does not support double backward: its gradient is not "
            "differentiable (create_graph=True, torch.func.grad of a gradient, ...)"
        )


# --------------------------------------------------------------------------- custom patterns
# Custom ops take tensors, strings and numbers, not Patterns: a built-in pattern travels as its
# key, a custom one (bound to one size) as its element mask. Each mask tensor remembers the
# pattern that made it, so the op finds that pattern, its plan and its layouts again without
# rebuilding or hashing anything; a mask that arrives without it (a graph constant after
# serialization, say) is rebuilt once and kept in a cache bounded in bytes.
_MASK_CACHE: dict[tuple, tuple[Pattern, int]] = {}
_MASK_CACHE_BYTES = 256 << 20


def _op_mask(pattern: Pattern, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    heads = math.lcm(pattern.period, pattern.head_divisor)
    cache = pattern.__dict__.setdefault("_op_masks", {})
    key = (n_q, n_k, heads, device)
    if key not in cache:
        mask = pattern.mask(n_q, n_k, heads, device=device)
        setattr(mask, "_effattn_pattern", pattern)  # noqa: B010 - Tensor declares no such field
        cache[key] = mask
    return cache[key]


def _op_pattern(pattern_key: str, custom_mask: torch.Tensor | None) -> Pattern:
    if custom_mask is None:
        return from_key(pattern_key)
    pattern = getattr(custom_mask, "_effattn_pattern", None)
    if pattern is not None:
        return pattern
    cpu = custom_mask.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(cpu.shape), hashlib.sha1(cpu.numpy().tobytes()).hexdigest())
    if key not in _MASK_CACHE:
        while _MASK_CACHE and sum(n for _, n in _MASK_CACHE.values()) + cpu.numel() > (
            _MASK_CACHE_BYTES
        ):
            _MASK_CACHE.pop(next(iter(_MASK_CACHE)))
        _MASK_CACHE[key] = (from_mask(cpu), cpu.numel())
    return _MASK_CACHE[key][0]


# --------------------------------------------------------------------------- op definitions
# Defined on a Library rather than with torch.library.custom_op, whose kernels import
# torch._dynamo, and with it Triton (0.9 s, 150 MiB), on the first call even for CPU tensors.
_LIB = torch.library.Library("effattn", "DEF")


def _define(schema: str):
    """Define ``effattn::<schema>`` with the decorated function as its kernel on every device;
    returns the op."""

    def wrap(fn):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        torch.library.impl(f"effattn::{name}", "CompositeExplicitAutograd", fn, lib=_LIB)
        return getattr(torch.ops.effattn, name).default

    return wrap


def _fake(op):
    return torch.library.register_fake(op, lib=_LIB)


# --------------------------------------------------------------------------- sparse ops
def _sparse_backend(backend: str, q, k, kpm):
    return dispatch.select(backend, "sparse", q, k, key_mask=kpm is not None)


@_define(
    "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, str pattern_key, "
    "Tensor? custom_mask, float scale, str backend) -> (Tensor, Tensor)"
)
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
    chosen = _sparse_backend(backend, q, k, key_padding_mask)
    return execute.sparse_forward(chosen, q, k, v, key_padding_mask, pattern, scale)


@_fake(_sparse_op)
def _(q, k, v, key_padding_mask, pattern_key, custom_mask, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@_define(
    "sparse_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, "
    "Tensor out, Tensor lse, Tensor? key_padding_mask, str pattern_key, Tensor? custom_mask, "
    "float scale, str backend) -> (Tensor, Tensor, Tensor)"
)
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
    chosen = _sparse_backend(backend, q, k, key_padding_mask)
    return execute.sparse_backward(
        chosen, dout, dlse, q, k, v, out, lse, key_padding_mask, pattern, scale
    )


@_fake(_sparse_backward_op)
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, pattern_key, custom_mask, scale, backend):
    # The executor returns contiguous tensors, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _sparse_setup(ctx, inputs, output):
    q, k, v, kpm, pattern_key, custom_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, custom_mask)
    ctx.pattern_key, ctx.scale, ctx.backend = pattern_key, scale, backend


def _sparse_autograd(ctx, dout, dlse):
    _no_double_backward("sparse_attention")
    q, k, v, out, lse, kpm, custom_mask = ctx.saved_tensors
    dq, dk, dv = _sparse_backward_op(
        dout.contiguous(), dlse, q, k, v, out, lse, kpm,
        ctx.pattern_key, custom_mask, ctx.scale, ctx.backend,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(_sparse_op, _sparse_autograd, setup_context=_sparse_setup, lib=_LIB)


@overload
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = ...,
    key_padding_mask: torch.Tensor | None = ...,
    backend: str = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = ...,
    key_padding_mask: torch.Tensor | None = ...,
    backend: str = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with an exact pattern.

    Args:
        q: [B, H, Nq, D] queries; row i sits at absolute position i + Nk - Nq.
        k, v: [B, Hkv, Nk, D] keys and values, H % Hkv == 0 (grouped-query attention).
        pattern: a :class:`effattn.patterns.Pattern` (e.g. ``patterns.strided(128)``).
        scale: score scale, default D ** -0.5 (a float, numpy scalar or 0-d tensor; finite).
        key_padding_mask: bool [B, Nk], True = ignore that key (as nn.MultiheadAttention);
            what a hidden key holds never changes any output.
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
    backend = _validation.check_backend(backend, BACKENDS)
    _validation.check_qkv(q, k, v)
    _validation.check_dtype(q, backend)
    pattern._check_size(q.shape[2], k.shape[2])
    pattern._check_heads(q.shape[1])
    scale = _validation.check_scale(scale, q.shape[-1])
    _validation.check_key_padding_mask(key_padding_mask, q, k)
    if backend == "reference":
        mask = pattern.mask(q.shape[2], k.shape[2], q.shape[1], device=q.device).unsqueeze(0)
        if key_padding_mask is not None:
            mask = mask & ~key_padding_mask[:, None, None, :]
        return reference.attention(q, k, v, mask, scale=scale, return_lse=return_lse)
    _no_function_transforms("sparse_attention", q, k, v)
    if isinstance(pattern, TermPattern):
        key, custom_mask = pattern.key, None
    else:
        key, custom_mask = "", _op_mask(pattern, q.shape[2], k.shape[2], q.device)
    out, lse = _sparse_op(q, k, v, key_padding_mask, key, custom_mask, scale, backend)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- Transformer-XL ops
def _xl_delta(out, dout, dlse):
    acc = acc_dtype(out.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    return delta if dlse is None else delta - dlse.to(acc)


@_define(
    "xl_attention(Tensor q, Tensor k, Tensor v, Tensor r, Tensor u, Tensor vb, float scale, "
    "int? window, str backend) -> (Tensor, Tensor)"
)
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
    chosen = dispatch.select(backend, "xl", q, k, key_mask=False)
    if q.numel() == 0:
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        return q.new_zeros(q.shape), lse
    out, lse = chosen.xl_forward(q, k, v, r, u, vb, scale=scale, window=window)
    return out.to(q.dtype).contiguous(), lse.contiguous()


@_fake(_xl_op)
def _(q, k, v, r, u, vb, scale, window, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@_define(
    "xl_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor r, "
    "Tensor u, Tensor vb, Tensor out, Tensor lse, float scale, int? window, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
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
) -> tuple[torch.Tensor, ...]:
    chosen = dispatch.select(backend, "xl", q, k, key_mask=False)
    if q.numel() == 0:
        return tuple(t.new_zeros(t.shape) for t in (q, k, v, r, u, vb))
    delta = _xl_delta(out, dout, dlse)
    grads = chosen.xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window)
    # Kernels may return the accumulation dtype (the CPU and CUDA ones do): round once, here.
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, r, u, vb)))


@_fake(_xl_backward_op)
def _(dout, dlse, q, k, v, r, u, vb, out, lse, scale, window, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, r, u, vb))


def _xl_setup(ctx, inputs, output):
    q, k, v, r, u, vb, scale, window, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, r, u, vb, out, lse)
    ctx.scale, ctx.window, ctx.backend = scale, window, backend


def _xl_autograd(ctx, dout, dlse):
    _no_double_backward("xl_attention")
    q, k, v, r, u, vb, out, lse = ctx.saved_tensors
    grads = _xl_backward_op(
        dout.contiguous(), dlse, q, k, v, r, u, vb, out, lse, ctx.scale, ctx.window, ctx.backend
    )
    return (*grads, None, None, None)


torch.library.register_autograd(_xl_op, _xl_autograd, setup_context=_xl_setup, lib=_LIB)


@overload
def xl_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    *,
    scale: float | None = ...,
    window: int | None = ...,
    backend: str = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def xl_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    *,
    scale: float | None = ...,
    window: int | None = ...,
    backend: str = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        scale: score scale, default D ** -0.5 (a float, numpy scalar or 0-d tensor; finite).
        window: None, or an int >= 1: only distances < window (Transformer-XL's same_length
            with window = mem_len).
        backend: "auto", "triton", "cuda", "cpu", "torch" or "reference" (module docstring).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out [B, H, L, D] in q's dtype; with ``return_lse`` also lse [B, H, L] (fp32, fp64 for
        fp64 inputs). Gradients flow to q, k, v, r, u and vb.
    """
    backend = _validation.check_backend(backend, BACKENDS)
    _validation.check_qkv(q, k, v)
    _validation.check_dtype(q, backend)
    _validation.check_xl(q, r, u, vb, window)
    scale = _validation.check_scale(scale, q.shape[-1])
    if backend == "reference":
        return reference.xl_attention(
            q, k, v, r, u, vb, scale=scale, window=window, return_lse=return_lse
        )
    _no_function_transforms("xl_attention", q, k, v, r, u, vb)
    out, lse = _xl_op(q, k, v, r, u, vb, scale, window, backend)
    return (out, lse) if return_lse else out
