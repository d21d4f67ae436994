"""Block-sparse flash attention in Triton (backend "triton").

Implements the backend contract of :mod:`effattn.ops.torch_sparse` (read it first) with three
kernels, each visiting only the blocks of the part's :class:`effattn.patterns.BlockLayout`:

``_fwd_kernel``
    one program per (query block, batch x head): online softmax over the full key blocks (no
    pattern test) and then the partial ones (pattern predicate), saves the LSE.
``_bwd_dq_kernel``
    one program per (query block, batch x head): dq over the same key blocks as the forward.
``_bwd_dkdv_kernel``
    one program per (key block, batch x kv head): dk and dv over the transposed layout
    (``q_full_*`` / ``q_part_*``), looping over the query heads of the GQA group inside the
    program, so that the result is deterministic and needs no atomics.

Partial blocks are resolved from the packed term table (built-in patterns; the constraint kinds
no term uses are compiled out through constexpr flags) or from the deduplicated stored tiles
(custom patterns). Rows past n_q and keys past n_k are always masked, and head dims that are not
powers of two are padded inside the kernels with masked loads.

Numerics: fp32 accumulation; fp16 / bf16 take the softmax in base 2 with log2(e) folded into
the score scale; fp32 stays in base e and multiplies in IEEE fp32 (no TF32), to be as accurate
as plain fp32 attention. fp64 (interpreter only, for gradcheck) accumulates in fp64, with q
pre-scaled in fp64 because Triton passes Python floats to kernels as fp32. dq, dk and dv come
back in the accumulator dtype so that the parts of a plan add up before one final rounding.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from effattn.patterns import BlockLayout

__all__ = [
    "BLOCKS_OVERRIDE",
    "check",
    "plan_blocks",
    "sparse_backward",
    "sparse_forward",
]

BLOCKS_OVERRIDE: tuple[int, int] | None = None
"""(block_m, block_n) for every kernel instead of the tuned table: tests set (16, 16) so that
plans decompose (strided / fixed parts, padding keys, dummy rows) at interpreter-sized n."""

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- kernels
# Nested @triton.jit calls cost nothing on the GPU (they are inlined) but a few milliseconds
# each in the interpreter, so the per-block bodies below inline their small steps.
@triton.jit
def _pattern_allowed(
    tile_ptrs,
    Terms,
    c,
    p,
    j,
    USE_TILES: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
):
    """Which entries of a partial block the pattern allows: the stored tile (custom patterns)
    or the OR of class c's terms at absolute query positions p and keys j (broadcastable
    int32)."""
    if USE_TILES:
        return tl.load(tile_ptrs) != 0
    d = p - j
    ok = d != d
    for t in tl.static_range(NUM_TERMS):
        base = Terms + (c * NUM_TERMS + t) * 9
        term = (d >= tl.load(base)) & (d <= tl.load(base + 1))
        if USE_MOD:
            mod = tl.load(base + 2)
            # p - j may be negative: only "divisible" is asked, where C and floor remainders agree.
            term = term & ((mod <= 0) | (d % tl.maximum(mod, 1) == 0))
        if USE_GROUP:
            gq = tl.load(base + 3)
            grel = tl.load(base + 5)
            qg = p // tl.maximum(gq, 1)
            kg = j // tl.maximum(tl.load(base + 4), 1)
            rel = tl.where(grel == 0, kg == qg, tl.where(grel == 1, kg < qg, kg != qg))
            term = term & ((gq <= 0) | rel)
        if USE_COLS:
            smod = tl.load(base + 6)
            r = j % tl.maximum(smod, 1)
            term = term & ((smod <= 0) | ((r >= tl.load(base + 7)) & (r <= tl.load(base + 8))))
        ok = ok | term
    return ok


@triton.jit
def _rne_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), still as fp32.

    Only for Triton's interpreter, whose fp32 -> bf16 conversion truncates where the GPU rounds
    to nearest: with this, interpreted bf16 results carry the GPU's rounding errors.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fwd_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    kb,
    offs_m,
    offs_n,
    offs_d,
    d_ok,
    q_offset,
    n_k,
    qk_scale,
    key_mask_base,
    stride_mn,
    tile_ptrs,
    Terms,
    c,
    PARTIAL: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
    USE_TILES: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    EXP2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i)."""
    cols = kb * BLOCK_N + offs_n
    col_ok = cols < n_k
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
    if HAS_KEY_MASK:
        col_ok = col_ok & (tl.load(key_mask_base + cols * stride_mn, mask=col_ok, other=1) == 0)
    vis = col_ok[None, :]
    if PARTIAL:
        vis = vis & _pattern_allowed(
            tile_ptrs, Terms, c, (offs_m + q_offset)[:, None], cols[None, :],
            USE_TILES, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS,
        )  # fmt: skip
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible so far keep m = -inf: shift them by 0 so exp gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    if EXP2:
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
    else:
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if RNE_BF16:
        p = _rne_bf16(p)
    pv = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    KeyMask,
    FullNum,
    FullIdx,
    PartNum,
    PartIdx,
    PartTile,
    Terms,
    Tiles,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_mb,
    stride_mh,
    stride_mn,
    num_heads,
    group,
    num_classes,
    n_q,
    n_k,
    q_offset,
    num_q_blocks,
    max_full,
    max_part,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
    USE_TILES: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    EXP2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # Last query blocks first: under causal-like patterns they carry the most key blocks.
    qb = num_q_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    c = h % num_classes
    hk = h // group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < n_q
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    key_mask_base = KeyMask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l_i = tl.zeros([BLOCK_M], dtype=acc_dtype)
    row = c * num_q_blocks + qb

    n_full = tl.load(FullNum + row)
    for t in range(n_full):
        kb = tl.load(FullIdx + row * max_full + t)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, kb, offs_m, offs_n, offs_d,
            d_ok, q_offset, n_k, qk_scale, key_mask_base, stride_mn, Tiles, Terms, c,
            False, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, HAS_KEY_MASK, EXP2,
            DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_N,
        )  # fmt: skip
    n_part = tl.load(PartNum + row)
    for t in range(n_part):
        kb = tl.load(PartIdx + row * max_part + t)
        tile_ptrs = Tiles + tile_offs
        if USE_TILES:
            tile = tl.load(PartTile + row * max_part + t)
            tile_ptrs += tile.to(tl.int64) * (BLOCK_M * BLOCK_N)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, kb, offs_m, offs_n, offs_d,
            d_ok, q_offset, n_k, qk_scale, key_mask_base, stride_mn, tile_ptrs, Terms, c,
            True, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, HAS_KEY_MASK, EXP2,
            DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_N,
        )  # fmt: skip

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    if EXP2:
        lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(nonempty, lse, float("-inf"))
    if RNE_BF16:
        out = _rne_bf16(out)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + bh.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_row_stats(Lse, Delta, bh, n_q, offs_m, EXP2: tl.constexpr):
    """(lse in the kernels' exponent base, delta, row visible) for query rows offs_m.

    Rows past n_q and rows whose merged lse is +-inf (no visible key, or kept only to fill a
    dense block) get visible = False, so they contribute nothing.
    """
    in_rows = offs_m < n_q
    lse = tl.load(Lse + bh.to(tl.int64) * n_q + offs_m, mask=in_rows, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * n_q + offs_m, mask=in_rows, other=0.0)
    ok = (lse > float("-inf")) & (lse < float("inf"))
    if EXP2:
        lse = lse * 1.4426950408889634
    lse = tl.where(ok, lse, 0.0)
    delta = tl.where(ok, delta, 0.0)
    return lse, delta, ok


@triton.jit
def _bwd_dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    row_vis,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    kb,
    offs_m,
    offs_n,
    offs_d,
    d_ok,
    q_offset,
    n_k,
    qk_scale,
    key_mask_base,
    stride_mn,
    tile_ptrs,
    Terms,
    c,
    PARTIAL: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
    USE_TILES: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    EXP2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq += dS K over one key block (dS without the final scale)."""
    cols = kb * BLOCK_N + offs_n
    col_ok = cols < n_k
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    k_dot = k.to(DOT_DTYPE)
    s = tl.dot(q, tl.trans(k_dot), input_precision=DOT_PRECISION) * qk_scale
    if HAS_KEY_MASK:
        col_ok = col_ok & (tl.load(key_mask_base + cols * stride_mn, mask=col_ok, other=1) == 0)
    vis = col_ok[None, :] & row_vis[:, None]
    if PARTIAL:
        vis = vis & _pattern_allowed(
            tile_ptrs, Terms, c, (offs_m + q_offset)[:, None], cols[None, :],
            USE_TILES, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS,
        )  # fmt: skip
    x = tl.where(vis, s - lse[:, None], float("-inf"))
    if EXP2:
        p = tl.exp2(x)
    else:
        p = tl.exp(x)
    dp = tl.dot(do, tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if RNE_BF16:
        ds = _rne_bf16(ds)
    dq += tl.dot(ds.to(k.dtype).to(DOT_DTYPE), k_dot, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    KeyMask,
    FullNum,
    FullIdx,
    PartNum,
    PartIdx,
    PartTile,
    Terms,
    Tiles,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_mb,
    stride_mh,
    stride_mn,
    num_heads,
    group,
    num_classes,
    n_q,
    n_k,
    q_offset,
    num_q_blocks,
    max_full,
    max_part,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
    USE_TILES: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    EXP2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    qb = num_q_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    c = h % num_classes
    hk = h // group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_m < n_q)[:, None] & d_ok[None, :]
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do_ptrs = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    do = tl.load(do_ptrs + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    q, do = q.to(DOT_DTYPE), do.to(DOT_DTYPE)
    lse, delta, row_vis = _bwd_row_stats(Lse, Delta, bh, n_q, offs_m, EXP2)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    key_mask_base = KeyMask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
    row = c * num_q_blocks + qb

    n_full = tl.load(FullNum + row)
    for t in range(n_full):
        kb = tl.load(FullIdx + row * max_full + t)
        dq = _bwd_dq_block(
            dq, q, do, lse, delta, row_vis, k_base, v_base, stride_kn, stride_vn, kb, offs_m,
            offs_n, offs_d, d_ok, q_offset, n_k, qk_scale, key_mask_base, stride_mn, Tiles,
            Terms, c, False, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, HAS_KEY_MASK,
            EXP2, DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_N,
        )  # fmt: skip
    n_part = tl.load(PartNum + row)
    for t in range(n_part):
        kb = tl.load(PartIdx + row * max_part + t)
        tile_ptrs = Tiles + tile_offs
        if USE_TILES:
            tile = tl.load(PartTile + row * max_part + t)
            tile_ptrs += tile.to(tl.int64) * (BLOCK_M * BLOCK_N)
        dq = _bwd_dq_block(
            dq, q, do, lse, delta, row_vis, k_base, v_base, stride_kn, stride_vn, kb, offs_m,
            offs_n, offs_d, d_ok, q_offset, n_k, qk_scale, key_mask_base, stride_mn, tile_ptrs,
            Terms, c, True, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, HAS_KEY_MASK,
            EXP2, DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_N,
        )  # fmt: skip

    # DQ is a contiguous [B, H, n_q, D] accumulator-dtype tensor.
    dq_ptrs = DQ + bh.to(tl.int64) * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq * sm_scale, mask=q_mask)


@triton.jit
def _bwd_dkdv_block(
    dk,
    dv,
    k,
    v,
    col_ok,
    cols,
    q_base,
    do_base,
    stride_qm,
    stride_dom,
    Lse,
    Delta,
    bh,
    qb,
    offs_r,
    offs_d,
    d_ok,
    n_q,
    q_offset,
    qk_scale,
    tile_ptrs,
    Terms,
    c,
    PARTIAL: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
    USE_TILES: tl.constexpr,
    EXP2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dv += P^T dO, dk += dS^T Q over one query block, in the transposed [BN, BM] orientation."""
    offs_m = qb * BLOCK_M + offs_r
    q_mask = (offs_m < n_q)[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    q_dot, do_dot = q.to(DOT_DTYPE), do.to(DOT_DTYPE)
    lse, delta, row_vis = _bwd_row_stats(Lse, Delta, bh, n_q, offs_m, EXP2)
    st = tl.dot(k, tl.trans(q_dot), input_precision=DOT_PRECISION) * qk_scale
    vis = col_ok[:, None] & row_vis[None, :]
    if PARTIAL:
        vis = vis & _pattern_allowed(
            tile_ptrs, Terms, c, (offs_m + q_offset)[None, :], cols[:, None],
            USE_TILES, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS,
        )  # fmt: skip
    x = tl.where(vis, st - lse[None, :], float("-inf"))
    if EXP2:
        pt = tl.exp2(x)
    else:
        pt = tl.exp(x)
    if RNE_BF16:
        pt = _rne_bf16(pt)
    dv += tl.dot(pt.to(do.dtype).to(DOT_DTYPE), do_dot, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do_dot), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    if RNE_BF16:
        dst = _rne_bf16(dst)
    dk += tl.dot(dst.to(q.dtype).to(DOT_DTYPE), q_dot, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    KeyMask,
    FullNum,
    FullIdx,
    PartNum,
    PartIdx,
    PartTile,
    Terms,
    Tiles,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_mb,
    stride_mh,
    stride_mn,
    num_heads,
    group,
    num_classes,
    n_q,
    n_k,
    q_offset,
    num_k_blocks,
    max_full,
    max_part,
    NUM_TERMS: tl.constexpr,
    USE_MOD: tl.constexpr,
    USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr,
    USE_TILES: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    EXP2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    num_kv_heads = num_heads // group
    b = bhk // num_kv_heads
    hk = bhk % num_kv_heads
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    in_keys = cols < n_k
    kv_mask = in_keys[:, None] & d_ok[None, :]
    k_ptrs = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_ptrs = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k = tl.load(k_ptrs + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    k, v = k.to(DOT_DTYPE), v.to(DOT_DTYPE)
    # Tiles are stored [BM, BN]; read them transposed.
    tile_offs = offs_r[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    # The query heads of this kv head, one after the other: a deterministic GQA reduction.
    for g in range(group):
        h = hk * group + g
        bh = b * num_heads + h
        c = h % num_classes
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        col_ok = in_keys
        if HAS_KEY_MASK:
            km_ptrs = KeyMask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
            col_ok = col_ok & (tl.load(km_ptrs + cols * stride_mn, mask=in_keys, other=1) == 0)
        row = c * num_k_blocks + kb
        n_full = tl.load(FullNum + row)
        for t in range(n_full):
            qb = tl.load(FullIdx + row * max_full + t)
            dk, dv = _bwd_dkdv_block(
                dk, dv, k, v, col_ok, cols, q_base, do_base, stride_qm, stride_dom, Lse, Delta,
                bh, qb, offs_r, offs_d, d_ok, n_q, q_offset, qk_scale, Tiles, Terms, c, False,
                NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, EXP2, DOT_DTYPE,
                DOT_PRECISION, RNE_BF16, BLOCK_M,
            )  # fmt: skip
        n_part = tl.load(PartNum + row)
        for t in range(n_part):
            qb = tl.load(PartIdx + row * max_part + t)
            tile_ptrs = Tiles + tile_offs
            if USE_TILES:
                tile = tl.load(PartTile + row * max_part + t)
                tile_ptrs += tile.to(tl.int64) * (BLOCK_M * BLOCK_N)
            dk, dv = _bwd_dkdv_block(
                dk, dv, k, v, col_ok, cols, q_base, do_base, stride_qm, stride_dom, Lse, Delta,
                bh, qb, offs_r, offs_d, d_ok, n_q, q_offset, qk_scale, tile_ptrs, Terms, c, True,
                NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, EXP2, DOT_DTYPE,
                DOT_PRECISION, RNE_BF16, BLOCK_M,
            )  # fmt: skip

    # DK and DV are contiguous [B, Hkv, n_k, D] accumulator-dtype tensors.
    out_offs = bhk.to(tl.int64) * n_k * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, dk * sm_scale, mask=kv_mask)
    tl.store(DV + out_offs, dv, mask=kv_mask)


# --------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    # triton.jit returns an interpreter stand-in (not a JITFunction) under TRITON_INTERPRET=1.
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


class _Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _table(rows: str) -> dict[tuple[str, bool, int], dict[int, _Config]]:
    """Parse "kernel dtype D | sm_80 BMxBN/warps/stages | sm_90 ..." rows."""
    table = {}
    for line in rows.strip().splitlines():
        key, *per_arch = (f.split() for f in line.split("|"))
        kernel, dtype, d = key
        configs = {}
        for arch, spec in zip((80, 90), per_arch, strict=True):
            blocks, warps, stages = spec[0].split("/")
            bm, bn = blocks.split("x")
            configs[arch] = _Config(int(bm), int(bn), int(warps), int(stages))
        table[(kernel, dtype == "fp32", int(d))] = configs
    return table


# The shipped configs per kernel, operand width and BLOCK_D, on sm_80 (used below sm_90 too)
# and sm_90: the largest tiles and most pipeline stages that compile without register spills
# with Triton 3.6 and 3.9 and, on sm_80, within the 99 KiB of shared memory that sm_86 / sm_89
# also have (bench/compile_report.py checks them all, from bench/triton_configs.py; untimed: no
# GPU was at hand when they were chosen). The forward's 64-row
# query blocks keep the work efficiency of strided(128) and fixed(128, c) above 50% at n >= 4096
# (128-row blocks drop strided(128) to 37%: its column part is causal inside chunks of n / 128
# keys). fp32 multiplies in IEEE fp32 without tensor cores, hence its smaller tiles.
_CONFIGS = _table(
    """
    fwd  fp16  16 | 64x64/4/3 | 64x64/4/3
    fwd  fp16  32 | 64x64/4/3 | 64x64/4/3
    fwd  fp16  64 | 64x64/4/3 | 64x64/4/3
    fwd  fp16 128 | 64x32/4/3 | 64x64/4/3
    fwd  fp16 256 | 64x32/8/2 | 64x32/8/2
    dq   fp16  16 | 64x64/4/2 | 64x64/4/2
    dq   fp16  32 | 64x64/4/2 | 64x64/4/2
    dq   fp16  64 | 64x64/4/2 | 64x64/4/2
    dq   fp16 128 | 64x32/4/2 | 64x32/4/2
    dq   fp16 256 | 64x32/8/1 | 32x32/8/1
    dkdv fp16  16 | 32x64/4/1 | 32x64/4/2
    dkdv fp16  32 | 32x64/4/1 | 32x64/4/2
    dkdv fp16  64 | 32x64/8/2 | 32x64/4/2
    dkdv fp16 128 | 32x32/4/1 | 32x32/4/1
    dkdv fp16 256 | 16x32/4/1 | 16x32/4/1
    fwd  fp32  16 | 64x32/8/2 | 64x32/8/2
    fwd  fp32  32 | 64x32/8/2 | 64x32/8/2
    fwd  fp32  64 | 64x32/8/2 | 64x16/8/2
    fwd  fp32 128 | 64x16/4/2 | 32x16/8/2
    fwd  fp32 256 | 64x16/8/1 | 32x16/8/1
    dq   fp32  16 | 32x32/4/2 | 32x32/4/2
    dq   fp32  32 | 32x32/4/2 | 32x32/4/2
    dq   fp32  64 | 32x32/8/2 | 32x16/4/2
    dq   fp32 128 | 32x16/4/2 | 32x16/8/2
    dq   fp32 256 | 16x16/4/1 | 16x16/4/1
    dkdv fp32  16 | 16x32/4/2 | 32x32/8/2
    dkdv fp32  32 | 32x32/4/2 | 16x32/4/2
    dkdv fp32  64 | 32x32/8/2 | 16x32/8/2
    dkdv fp32 128 | 16x32/4/1 | 16x32/8/2
    dkdv fp32 256 | 16x16/8/1 | 16x16/8/1
    """
)


class _LayoutArgs:
    """A layout's tensors and constexpr flags in kernel form (cached per layout)."""

    def __init__(self, layout: BlockLayout):
        self.use_tiles = layout.tiles is not None
        if self.use_tiles:
            self.tiles = layout.tiles.to(torch.uint8).contiguous()
            self.terms = self.tiles  # unused: any pointer will do
            self.num_terms, self.use_mod, self.use_group, self.use_cols = 1, False, False, False
            self.kv_tile, self.q_tile = layout.kv_part_tile, layout.q_part_tile
        else:
            self.terms = layout.terms.to(device=layout.kv_full_num.device).contiguous()
            self.tiles = self.terms  # unused: any pointer will do
            rows = [t for cls in layout.terms.tolist() for t in cls]
            self.num_terms = layout.terms.shape[1]
            self.use_mod = any(t[2] > 0 for t in rows)
            self.use_group = any(t[3] > 0 for t in rows)
            self.use_cols = any(t[6] > 0 for t in rows)
            self.kv_tile, self.q_tile = layout.kv_part_idx, layout.q_part_idx

    def constexprs(self) -> dict:
        return {
            "NUM_TERMS": self.num_terms,
            "USE_MOD": self.use_mod,
            "USE_GROUP": self.use_group,
            "USE_COLS": self.use_cols,
            "USE_TILES": self.use_tiles,
        }


_LAYOUT_ARGS: weakref.WeakKeyDictionary[BlockLayout, _LayoutArgs] = weakref.WeakKeyDictionary()


def _layout_args(layout: BlockLayout) -> _LayoutArgs:
    args = _LAYOUT_ARGS.get(layout)
    if args is None:
        args = _LAYOUT_ARGS[layout] = _LayoutArgs(layout)
    return args


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _key_mask_args(key_mask, b, h, n_k, fallback):
    """(pointer tensor, strides) of the key mask expanded to [B, H, n_k] (stride 0 where it
    broadcasts), or a placeholder pointer when there is none."""
    if key_mask is None:
        return fallback, (0, 0, 0)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor, got {key_mask.dtype}")
    km = key_mask.expand(b, h, n_k)
    return km.view(torch.uint8), km.stride()


def _exp2(dtype: torch.dtype) -> bool:
    """Whether the kernels use base 2 with log2(e) folded into the score scale.

    That saves a multiply per score for fp16 / bf16, whose rounding dwarfs the extra rounding
    of the exponent's argument; fp32 and fp64 stay in base e, as accurate as plain softmax.
    """
    return dtype in (torch.float16, torch.bfloat16)


def _scales(q: torch.Tensor, scale: float):
    """(q as the kernels read it, qk_scale, sm_scale)."""
    if q.dtype == torch.float64:
        # Kernel float arguments are fp32: scale q in fp64 here instead.
        return q * scale, 1.0, 1.0
    return q, scale * _LOG2E if _exp2(q.dtype) else scale, scale


def _check_grid(q):
    # Batch x heads is the second grid axis, which CUDA caps at 65535.
    b, h = q.shape[:2]
    if b * h > 65535:
        raise ValueError(f"q has batch x heads = {b} x {h} > 65535, more than a grid axis holds")


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 80  # the interpreter ignores launch options
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _config(kernel: str, dtype: torch.dtype, head_dim: int, device: torch.device) -> _Config:
    """The shipped config for these inputs, with ``BLOCKS_OVERRIDE`` replacing its blocks."""
    wide = dtype in (torch.float32, torch.float64)
    cfg = _CONFIGS[(kernel, wide, _block_d(head_dim))][_arch(device)]
    if BLOCKS_OVERRIDE is not None:
        cfg = cfg._replace(block_m=BLOCKS_OVERRIDE[0], block_n=BLOCKS_OVERRIDE[1])
    return cfg


def _launch_options(cfg: _Config) -> dict:
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _dot_args(dtype: torch.dtype) -> dict:
    """DOT_DTYPE, DOT_PRECISION: the kernels' tl.dot operand dtype and precision; RNE_BF16."""
    if dtype == torch.bfloat16 and _interpreting():
        # Triton's interpreter multiplies bf16 tiles as their uint16 storage and truncates
        # fp32 -> bf16. Widening the operands to fp32 is exact (bf16 x bf16 products fit fp32)
        # and accumulates in fp32, and RNE_BF16 rounds as the GPU does.
        return {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee", "RNE_BF16": True}
    # fp32 gets fp32 products (TF32 would lose 3 decimal digits); ignored for 16-bit operands.
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return {"DOT_DTYPE": _TL_DTYPES[dtype], "DOT_PRECISION": precision, "RNE_BF16": False}


# --------------------------------------------------------------------------- backend contract
def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise for what the Triton kernels cannot serve (q, k, v already validated together)."""
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"the triton backend takes fp16, bf16, fp32 (fp64 interpreted), got {q.dtype}"
        )
    if q.device.type == "cpu":
        if not _interpreting():
            raise ValueError(
                "the triton backend needs CUDA tensors; CPU tensors run only in Triton's "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
    elif q.device.type == "cuda":
        if q.dtype == torch.float64 and not _interpreting():
            raise TypeError(
                "the triton backend takes fp64 only in Triton's interpreter (for gradcheck); "
                "use fp32, fp16 or bf16 on the GPU"
            )
    else:
        raise ValueError(f"the triton backend needs CUDA tensors, got tensors on {q.device}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"the triton backend takes head dims {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM}, got D={d}"
        )


def plan_blocks(q: torch.Tensor) -> tuple[int, int]:
    """(block_m, block_n) of the forward kernel for q's head dim: they choose the plan."""
    cfg = _config("fwd", q.dtype, q.shape[-1], q.device)
    return cfg.block_m, cfg.block_n


def sparse_forward(q, k, v, layout_fn, *, scale: float, key_mask=None):
    """Block-sparse attention forward over one part.

    Args:
        q: [B, H, n_q, D]; k, v: [B, Hkv, n_k, D], H % Hkv == 0; CUDA (or CPU when interpreted).
        layout_fn: (block_m, block_n) -> the part's BlockLayout on q's device.
        scale: score scale.
        key_mask: None or bool broadcastable to [B, H, n_k], True = key hidden.

    Returns:
        out [B, H, n_q, D] in q's dtype and lse [B, H, n_q] fp32 (fp64 for fp64), -inf and a
        zero row where a query sees no key.
    """
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(b, h, n_q, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=acc, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _check_grid(q)
    cfg = _config("fwd", q.dtype, d, q.device)
    layout = layout_fn(cfg.block_m, cfg.block_n)
    la = _layout_args(layout)
    qs, qk_scale, _ = _scales(q, scale)
    qs, k, v = _rows_contiguous(qs), _rows_contiguous(k), _rows_contiguous(v)
    km, km_strides = _key_mask_args(key_mask, b, h, n_k, lse)
    grid = (layout.num_q_blocks, b * h)
    _fwd_kernel[grid](
        qs, k, v, out, lse, km,
        layout.kv_full_num, layout.kv_full_idx, layout.kv_part_num, layout.kv_part_idx,
        la.kv_tile, la.terms, la.tiles,
        qk_scale,
        *qs.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *km_strides,
        h, h // h_kv, layout.num_classes, n_q, n_k, layout.q_offset,
        layout.num_q_blocks, layout.kv_full_idx.shape[-1], layout.kv_part_idx.shape[-1],
        HAS_KEY_MASK=key_mask is not None,
        IS_FP64=q.dtype == torch.float64,
        EXP2=_exp2(q.dtype),
        **_dot_args(q.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=_block_d(d),
        HEAD_DIM=d,
        **la.constexprs(),
        **_launch_options(cfg),
    )  # fmt: skip
    return out, lse


def sparse_backward(q, k, v, dout, lse, delta, layout_fn, *, scale: float, key_mask=None):
    """Gradients of one part from the merged lse and delta of the whole plan.

    Args:
        q: [B, H, n_q, D]; k, v: [B, Hkv, n_k, D]; dout: [B, H, n_q, D].
        lse: [B, H, n_q] merged log-sum-exp; rows at +-inf contribute nothing.
        delta: [B, H, n_q] rowsum(dout * out) - dlse of the whole plan.
        layout_fn, scale, key_mask: as in :func:`sparse_forward`.

    Returns:
        dq [B, H, n_q, D], dk and dv [B, Hkv, n_k, D], in fp32 (fp64 for fp64) so that the parts
        of a plan add up without rounding to the input dtype in between.
    """
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(b, h, n_q, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, h_kv, n_k, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, h_kv, n_k, d, dtype=acc, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq, dk, dv
    _check_grid(q)
    qs, qk_scale, sm_scale = _scales(q, scale)
    qs, k, v = _rows_contiguous(qs), _rows_contiguous(k), _rows_contiguous(v)
    dout = _rows_contiguous(dout)
    lse = lse.to(acc).contiguous()
    delta = delta.to(acc).contiguous()
    km, km_strides = _key_mask_args(key_mask, b, h, n_k, lse)
    strides = (*qs.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *km_strides)
    flags = dict(
        HAS_KEY_MASK=key_mask is not None,
        IS_FP64=q.dtype == torch.float64,
        EXP2=_exp2(q.dtype),
        **_dot_args(q.dtype),
        BLOCK_D=_block_d(d),
        HEAD_DIM=d,
    )

    cfg = _config("dq", q.dtype, d, q.device)
    layout = layout_fn(cfg.block_m, cfg.block_n)
    la = _layout_args(layout)
    _bwd_dq_kernel[(layout.num_q_blocks, b * h)](
        qs, k, v, dout, lse, delta, dq, km,
        layout.kv_full_num, layout.kv_full_idx, layout.kv_part_num, layout.kv_part_idx,
        la.kv_tile, la.terms, la.tiles,
        qk_scale, sm_scale, *strides,
        h, h // h_kv, layout.num_classes, n_q, n_k, layout.q_offset,
        layout.num_q_blocks, layout.kv_full_idx.shape[-1], layout.kv_part_idx.shape[-1],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags, **la.constexprs(),
        **_launch_options(cfg),
    )  # fmt: skip

    cfg = _config("dkdv", q.dtype, d, q.device)
    layout = layout_fn(cfg.block_m, cfg.block_n)
    la = _layout_args(layout)
    _bwd_dkdv_kernel[(layout.num_k_blocks, b * h_kv)](
        qs, k, v, dout, lse, delta, dk, dv, km,
        layout.q_full_num, layout.q_full_idx, layout.q_part_num, layout.q_part_idx,
        la.q_tile, la.terms, la.tiles,
        qk_scale, sm_scale, *strides,
        h, h // h_kv, layout.num_classes, n_q, n_k, layout.q_offset,
        layout.num_k_blocks, layout.q_full_idx.shape[-1], layout.q_part_idx.shape[-1],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags, **la.constexprs(),
        **_launch_options(cfg),
    )  # fmt: skip
    if q.dtype == torch.float64:
        dq = dq * scale
    return dq, dk, dv
