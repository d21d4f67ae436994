"""C++ CPU backend (backend "cpu"): block-sparse and Transformer-XL attention in ``effattn._C``.

Implements the backend contract of :mod:`effattn.ops.torch_sparse` (``check``, ``plan_blocks``,
``sparse_forward``, ``sparse_backward``) and the Transformer-XL pair ``xl_forward`` /
``xl_backward`` with the semantics of :func:`effattn.reference.xl_attention`. The kernels
(csrc/cpu/attention_impl.h) are flash-style: tiles of ``BLOCK_M`` queries x ``BLOCK_N`` keys,
online softmax, memory linear in the sequence length; partial blocks evaluate the pattern's
packed terms with integer arithmetic (or its stored tiles for custom patterns) and skip their
fully masked sub-tiles. Instruction sets: AVX-512, AVX2 or baseline, chosen at run time.

This module validates and converts; the extension's argument classes (``CpuSparseArgs``,
``CpuXlArgs``) refuse a missing or unknown field but trust the values. fp32 and fp64 run
natively (fp64 for gradcheck); fp16 and bf16 inputs are computed in fp32. Kernels use
``torch.get_num_threads()`` threads and give bitwise identical results for any thread count.
"""

from __future__ import annotations

import functools

import torch

from effattn import _extension

__all__ = [
    "BLOCK_M",
    "BLOCK_N",
    "XL_BLOCK_M",
    "XL_BLOCK_N",
    "check",
    "isas",
    "plan_blocks",
    "run_sparse_backward",
    "run_sparse_forward",
    "run_xl_backward",
    "run_xl_forward",
    "sparse_backward",
    "sparse_forward",
    "xl_backward",
    "xl_forward",
]

# Tile sizes, multiples of 16. With 64 x 64 the GEMM micro-kernels run at the FMA peak and the
# kernels skip the fully masked sub-tiles of partial blocks; 32 x 32 and 128 x 128 measured
# within 10% of it for strided(128) and fixed(128, 16) at n = 8192 (one thread, CPU time).
BLOCK_M = 64
BLOCK_N = 64
XL_BLOCK_M = 64
XL_BLOCK_N = 64


ISA: str | None = None
"""Instruction set of the kernels: None for the widest this CPU runs (see :func:`isas`)."""

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ext():
    mod = _extension.load()
    if mod is None or not hasattr(mod, "cpu_sparse_forward"):
        reason = _extension.load_error or "effattn._C was built without the CPU kernels"
        raise ValueError(f"backend 'cpu' is not available: {reason}")
    return mod


@functools.cache
def _dtype_codes() -> dict[torch.dtype, int]:
    """The extension's codes (csrc/constants.h) of the dtypes the kernels compute in."""
    codes = _ext().DTYPE_CODES
    return {dt: codes[str(dt).removeprefix("torch.")] for dt in (torch.float32, torch.float64)}


def isas() -> list[str]:
    """Instruction sets of the compiled kernels that run on this CPU, the default first."""
    return list(_ext().cpu_isas())


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, t, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"backend 'cpu' takes CPU tensors, got {name} on {t.device}")
    if t.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64 for backend 'cpu', got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have q's dtype {dtype}, got {t.dtype}")


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError / TypeError naming what this backend cannot serve."""
    _ext()
    _check_tensor("q", q)
    _check_tensor("k", k, q.dtype)
    _check_tensor("v", v, q.dtype)


def plan_blocks(q: torch.Tensor) -> tuple[int, int]:
    """(block_m, block_n) of the kernels, for choosing the plan."""
    return BLOCK_M, BLOCK_N


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The keyword arguments that every kernel's argument class takes for q, k and v."""
    b, h, _, d = q.shape
    return dict(
        dtype=_dtype_codes()[q.dtype],
        threads=torch.get_num_threads(),
        B=b,
        H=h,
        Hkv=k.shape[1],
        D=d,
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        sq=q.stride(),
        sk=k.stride(),
        sv=v.stride(),
    )


def _tiles(n_q: int, n_k: int) -> tuple[int, int]:
    """Tile sizes for one call: BLOCK_M x BLOCK_N, shrunk (in steps of 16) for sequences shorter
    than a tile, such as the strided column part's chunks of n / stride rows run as heads."""
    short = max(16, -(-max(n_q, n_k) // 16) * 16)
    return min(BLOCK_M, short), min(BLOCK_N, short)


# The BlockLayout tensors the kernels read: int32 index tables, bool tiles.
_LAYOUT_TENSORS = (
    "kv_full_num",
    "kv_full_idx",
    "kv_part_num",
    "kv_part_idx",
    "q_full_num",
    "q_full_idx",
    "q_part_num",
    "q_part_idx",
    "kv_part_tile",
    "q_part_tile",
    "terms",
    "tiles",
)


def _layout_args(layout, block_m: int, block_n: int) -> tuple[dict, list]:
    """The keyword arguments of CpuSparseArgs for the layout, and the tensors they point into
    (which must outlive the call)."""
    if layout.block_m != block_m or layout.block_n != block_n:
        raise ValueError(
            f"layout_fn returned {layout.block_m}x{layout.block_n} blocks, asked for "
            f"{block_m}x{block_n}"
        )
    if block_m % 16 or block_n % 16 or block_m < 16 or block_n < 16:
        raise ValueError(f"CPU tiles must be multiples of 16, got {block_m} x {block_n}")
    keep, args = [], {}
    for name in _LAYOUT_TENSORS:
        t = getattr(layout, name)
        if t is None:
            continue
        t = t.to(device="cpu", dtype=torch.bool if name == "tiles" else torch.int32).contiguous()
        keep.append(t)
        args[name] = t.data_ptr()
    if layout.tiles is None:
        args["num_terms"] = layout.terms.shape[1]
    args.update(
        q_offset=layout.q_offset,
        BM=block_m,
        BN=block_n,
        P=layout.num_classes,
        nqb=layout.num_q_blocks,
        nkb=layout.num_k_blocks,
        kv_full_w=layout.kv_full_idx.shape[-1],
        kv_part_w=layout.kv_part_idx.shape[-1],
        q_full_w=layout.q_full_idx.shape[-1],
        q_part_w=layout.q_part_idx.shape[-1],
    )
    return args, keep


def _key_mask_args(key_mask, b: int, h: int, n_k: int) -> tuple[dict, list]:
    """The keyword arguments of CpuSparseArgs for the key mask (none without one), and the
    tensor they point into."""
    if key_mask is None:
        return {}, []
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise TypeError(
            f"key_mask must be a bool tensor, got {getattr(key_mask, 'dtype', key_mask)}"
        )
    if key_mask.device.type != "cpu":
        raise ValueError(f"key_mask must be on the CPU, got {key_mask.device}")
    try:
        km = torch.broadcast_to(key_mask, (b, h, n_k))
    except RuntimeError:
        raise ValueError(
            f"key_mask of shape {tuple(key_mask.shape)} does not broadcast to [B, H, n_k] = "
            f"{[b, h, n_k]}"
        ) from None
    return {"key_mask": km.data_ptr(), "skm": km.stride()}, [km]


def _sparse_args(q, k, v, layout_fn, scale, key_mask, **direction):
    """CpuSparseArgs of one call of a sparse kernel, and the tensors it points into beside q, k,
    v and ``direction`` (the outputs and backward inputs)."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    bm, bn = _tiles(n_q, n_k)
    layout, keep = _layout_args(layout_fn(bm, bn), bm, bn)
    km, keep_km = _key_mask_args(key_mask, b, h, n_k)
    args = _ext().CpuSparseArgs(
        **_common(q, k, v), **layout, **km, n_q=n_q, n_k=n_k, scale=float(scale), **direction
    )
    return args, keep + keep_km


def _check_state(state, q: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError("state must be a tuple (out, lse)")
    out, lse = state
    b, h, n_q, d = q.shape
    for name, t, shape in (("out", out, (b, h, n_q, d)), ("lse", lse, (b, h, n_q))):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != acc:
            raise TypeError(f"state {name} must be a CPU {acc} tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"state {name} must have shape {list(shape)}, got {list(t.shape)}")
    if d > 1 and out.stride(3) != 1:
        raise ValueError("state out must be contiguous along D")
    return out, lse


def _check_backward(q, dout, lse, delta) -> None:
    """The backward's inputs beside q, k, v: dout shaped like q, lse and delta [B, H, n_q]."""
    _check_tensor("dout", dout)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    for name, t in (("lse", lse), ("delta", delta)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape[:3]:
            raise ValueError(f"{name} must be a tensor of shape {tuple(q.shape[:3])}")


def sparse_forward(q, k, v, layout_fn, *, scale: float, key_mask=None, state=None):
    """Block-sparse attention forward of one plan part.

    Args:
        q: [B, H, n_q, D]; k, v: [B, Hkv, n_k, D], H % Hkv == 0.
        layout_fn: (block_m, block_n) -> the part's BlockLayout.
        scale: score scale.
        key_mask: None or bool broadcastable to [B, H, n_k], True = the key is hidden.
        state: None, or (out [B, H, n_q, D], lse [B, H, n_q]) in the accumulation dtype (fp32,
            fp64 for fp64), any strides but unit along D: the result over a set of keys
            disjoint from this part's, which the kernel extends to the union in place.

    Returns:
        out [B, H, n_q, D] (q.dtype) and lse [B, H, n_q] (fp32, fp64 for fp64), -inf and a zero
        row for a query without visible keys; with ``state``, its two tensors.
    """
    check(q, k, v)
    if state is not None:
        state = _check_state(state, q, _acc(q.dtype))
    return run_sparse_forward(q, k, v, layout_fn, scale=scale, key_mask=key_mask, state=state)


def run_sparse_forward(q, k, v, layout_fn, *, scale: float, key_mask=None, state=None):
    """:func:`sparse_forward` on inputs already validated (what the dispatcher calls)."""
    b, h, n_q, d = q.shape
    acc = _acc(q.dtype)
    if state is None:
        # The kernel writes every element (zeros and -inf for rows without visible keys).
        out = torch.empty(b, h, n_q, d, dtype=acc)
        lse = torch.empty(b, h, n_q, dtype=acc)
    else:
        out, lse = state
    if out.numel():
        qc, kc, vc = q.to(acc), k.to(acc), v.to(acc)
        args, keep = _sparse_args(
            qc, kc, vc, layout_fn, scale, key_mask,
            out=out.data_ptr(), so=out.stride()[:3], lse=lse.data_ptr(), sl=lse.stride(),
            join=state is not None,
        )  # fmt: skip
        _ext().cpu_sparse_forward(args, ISA or "")
        del keep
    return (out, lse) if state is not None else (out.to(q.dtype), lse)


def sparse_backward(q, k, v, dout, lse, delta, layout_fn, *, scale: float, key_mask=None):
    """Gradients (dq, dk, dv) of one plan part, from the merged lse and delta.

    Args:
        q, k, v, layout_fn, scale, key_mask: as in :func:`sparse_forward`.
        dout: [B, H, n_q, D] gradient of the merged output.
        lse: [B, H, n_q] merged log-sum-exp; rows at +-inf get no gradient.
        delta: [B, H, n_q] rowsum(dout * out) - dlse of the whole plan.

    Returns:
        dq [B, H, n_q, D], dk and dv [B, Hkv, n_k, D] in the accumulation dtype (fp32, fp64 for
        fp64): the caller sums a plan's parts before rounding once.
    """
    check(q, k, v)
    _check_backward(q, dout, lse, delta)
    return run_sparse_backward(q, k, v, dout, lse, delta, layout_fn, scale=scale, key_mask=key_mask)


def run_sparse_backward(q, k, v, dout, lse, delta, layout_fn, *, scale: float, key_mask=None):
    """:func:`sparse_backward` on inputs already validated (what the dispatcher calls)."""
    acc = _acc(q.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros(t.shape, dtype=acc) for t in (q, k, v))
    # The kernel writes every element.
    dq = torch.empty(q.shape, dtype=acc)
    dk = torch.empty(k.shape, dtype=acc)
    dv = torch.empty(v.shape, dtype=acc)
    qc, kc, vc, doc = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    lse_c = lse.to(device="cpu", dtype=acc).contiguous()
    delta_c = delta.to(device="cpu", dtype=acc).contiguous()
    args, keep = _sparse_args(
        qc, kc, vc, layout_fn, scale, key_mask,
        dout=doc.data_ptr(), sdo=doc.stride(), lse_in=lse_c.data_ptr(),
        delta=delta_c.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(),
    )  # fmt: skip
    _ext().cpu_sparse_backward(args, ISA or "")
    del keep
    return dq, dk, dv


# --------------------------------------------------------------------------- Transformer-XL
def _check_xl(q, k, v, r, u, vb, window) -> None:
    check(q, k, v)
    h, d = q.shape[1], q.shape[3]
    for name, t in (("r", r), ("u", u), ("vb", vb)):
        _check_tensor(name, t, q.dtype)
    if r.dim() != 3 or r.shape[0] != h or r.shape[2] != d or r.shape[1] < 1:
        raise ValueError(f"r must be [H, R >= 1, D] = [{h}, R, {d}], got {tuple(r.shape)}")
    for name, t in (("u", u), ("vb", vb)):
        if t.shape != (h, d):
            raise ValueError(f"{name} must be [H, D] = [{h}, {d}], got {tuple(t.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def _xl_args(q, k, v, r, u, vb, scale, window, **direction):
    """CpuXlArgs of one call of an XL kernel; ``direction``: its outputs and backward inputs."""
    return _ext().CpuXlArgs(
        **_common(q, k, v),
        L=q.shape[2],
        N=k.shape[2],
        R=r.shape[1],
        window=window or 0,
        r=r.data_ptr(),
        u=u.data_ptr(),
        vb=vb.data_ptr(),
        sr=r.stride(),
        su=u.stride(),
        svb=vb.stride(),
        scale=float(scale),
        BM=XL_BLOCK_M,
        BN=XL_BLOCK_N,
        **direction,
    )


def xl_forward(q, k, v, r, u, vb, *, scale: float, window: int | None = None):
    """Transformer-XL attention forward (semantics: :func:`effattn.reference.xl_attention`).

    Args:
        q: [B, H, L, D]; k, v: [B, Hkv, M + L, D]; r: [H, R, D] by distance (clamped at R - 1);
        u, vb: [H, D]; scale: score scale; window: keep only distances < window (None: all).

    Returns:
        out [B, H, L, D] (q.dtype) and lse [B, H, L] (fp32, fp64 for fp64).
    """
    _check_xl(q, k, v, r, u, vb, window)
    return run_xl_forward(q, k, v, r, u, vb, scale=scale, window=window)


def run_xl_forward(q, k, v, r, u, vb, *, scale: float, window: int | None = None):
    """:func:`xl_forward` on inputs already validated (what the dispatcher calls)."""
    b, h, n_q, d = q.shape
    acc = _acc(q.dtype)
    out = torch.empty(b, h, n_q, d, dtype=acc)
    lse = torch.empty(b, h, n_q, dtype=acc)
    if out.numel() == 0:
        return out.to(q.dtype), lse
    ts = [t.detach().to(acc) for t in (q, k, v, r, u, vb)]
    args = _xl_args(*ts, scale, window, out=out.data_ptr(), lse=lse.data_ptr())
    _ext().cpu_xl_forward(args, ISA or "")
    return out.to(q.dtype), lse


def xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, *, scale: float, window=None):
    """Transformer-XL attention backward.

    Args:
        q, k, v, r, u, vb, scale, window: as in :func:`xl_forward`.
        out: [B, H, L, D] the forward output (unused: delta carries what is needed).
        dout: [B, H, L, D]; lse: [B, H, L] from the forward; delta: [B, H, L] equal to
            rowsum(dout * out) - dlse.

    Returns:
        (dq, dk, dv, dr, du, dvb) shaped like q, k, v, r, u, vb, in the accumulation dtype
        (fp32, fp64 for fp64).
    """
    _check_xl(q, k, v, r, u, vb, window)
    _check_backward(q, dout, lse, delta)
    return run_xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window)


def run_xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, *, scale: float, window=None):
    """:func:`xl_backward` on inputs already validated (what the dispatcher calls)."""
    acc = _acc(q.dtype)
    grads = [torch.zeros(t.shape, dtype=acc) for t in (q, k, v, r, u, vb)]
    if q.numel():
        ts = [t.detach().to(acc) for t in (q, k, v, r, u, vb)]
        doc = dout.detach().to(acc)
        lse_c = lse.detach().to(dtype=acc).contiguous()
        delta_c = delta.detach().to(dtype=acc).contiguous()
        args = _xl_args(
            *ts, scale, window,
            dout=doc.data_ptr(), sdo=doc.stride(), lse_in=lse_c.data_ptr(),
            delta=delta_c.data_ptr(),
            **{n: g.data_ptr() for n, g in zip(("dq", "dk", "dv", "dr", "du", "dvb"), grads)},
        )  # fmt: skip
        _ext().cpu_xl_backward(args, ISA or "")
    return tuple(grads)
