"""Fused Transformer-XL relative attention in Triton (backend "triton").

Semantics: :func:`effattn.reference.xl_attention`. With M = N - L memory positions, query i
(absolute position M + i) and key j are at distance d = M + i - j; key j is allowed iff
0 <= d < window, and

    S[i, j] = scale * ((q_i + u) . k_j + (q_i + vb) . r[min(d, R - 1)]).

Nothing of size [L, N] is ever formed. Query and key blocks have the same size B, so the
distances of a (query block, key block) tile span 2B - 1 consecutive values starting at
dmin = M + i0 - j0 - B + 1. Each tile multiplies (Q_tile + vb) [B, D] with only that band of r
rows, as two [B, B] halves (lo: distances dmin .. dmin + B - 1, hi: the next B; row indices
clamped to [0, R - 1], which is all that clamp_len takes), and reads the products skewed with
``tl.gather``: query a and key c read column a - c + B - 1 of the band, in lo when c >= a, in
hi otherwise. Walking the keys of a query block, the next key block's hi half is this block's
lo half, so the forward (and dq) multiply one new [B, D] block of r per step: the position
term costs as much as the content term. ``tl.gather`` exists since Triton 3.3 (so in 3.6 and
3.9, the versions this project targets) and runs in the interpreter.

Only key blocks holding an allowed distance are visited: for query block [i0, i0 + B) keys
from max(0, M + i0 - window + 1) to M + i0 + B - 1.

Backward, three kernels, no atomics:
    dkdv: one program per (key block, batch, kv head), looping over the query blocks that
        reach it and over the q heads of its GQA group; dk and dv stay in registers.
    dq:   one program per (query block, batch, head), looping over key blocks as the forward;
        also writes its block's partial sums of du (the content part of dq) and dvb (the
        position part), reduced over blocks and batch afterwards.
    dr:   one program per (block diagonal, batch, head). With BM = BN, all tiles with the same
        qb - kb read the same band of r rows, so a program walks one block diagonal and
        accumulates the band's gradient, two [B, D] halves, in registers (the position
        part of dS read back into band order with gathers, times Q_tile + vb). Adjacent
        diagonals' bands overlap by B - 1 rows; the partials are folded and summed over batch with slicing,
        deterministically, and distances >= R - 1 are summed into r[R - 1].

Precision: dot products take the input dtype and accumulate in fp32; fp32 inputs multiply in
3xTF32 (fp32 accuracy on tensor cores; head dims up to 64, larger fp32 head dims are refused
with a clear error: their tiles spill), fp64 inputs in fp64 (interpreter only: gradcheck).
Head dims: zero-padded in memory to a multiple of 16 when they are not one (41 -> 48: rows
load as 16-byte vectors; unaligned rows would load element by element and spill), and to a
power of two in registers (BLOCK_D) with masked loads.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["block_config", "xl_check", "xl_backward", "xl_forward"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Sizes compile once for all values; only D is specialized, and it is always a multiple of 16
# (_padded), so the variants that run are exactly those bench/triton_configs.py lists.
_NO_SPECIALIZE = ["L", "N", "R_LEN", "WINDOW", "H", "GROUP"]


# --------------------------------------------------------------------------- kernels
@triton.jit
def _mm(a, b, ACC: tl.constexpr):
    # fp32 inputs: 3xTF32 keeps fp32 accuracy on tensor cores (plain "ieee" falls back to
    # FMA and its register use spills); fp16/bf16 (and fp64, interpreted) multiply exactly.
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3", out_dtype=ACC)
    else:
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _load_rows(X, offs, n, offs_d, d_ok, D):
    """Rows offs of a row-major [n, D] matrix, zero outside."""
    return tl.load(
        X + offs[:, None] * D + offs_d[None, :], mask=(offs[:, None] < n) & d_ok[None, :], other=0.0
    )


@triton.jit
def _r_rows(R, dmin, R_LEN, offs_d, d_ok, D, BLOCK: tl.constexpr):
    """r rows of distances dmin .. dmin + B - 1, clamped to [0, R - 1] (clamp_len)."""
    rows = tl.minimum(tl.maximum(dmin + tl.arange(0, BLOCK), 0), R_LEN - 1)
    return tl.load(R + rows[:, None] * D + offs_d[None, :], mask=d_ok[None, :], other=0.0)


@triton.jit
def _skewed(lo, hi, BLOCK: tl.constexpr):
    """The tile's position scores from the two halves of its band product.

    lo[a, t] = (q_a + vb) . r[dmin + t] and hi[a, t] = (q_a + vb) . r[dmin + B + t]; query a
    and key c are at distance dmin + a - c + B - 1, so c >= a reads lo, c < a reads hi.
    """
    idx = tl.arange(0, BLOCK)[:, None] - tl.arange(0, BLOCK)[None, :] + BLOCK - 1
    from_lo = tl.gather(lo, tl.minimum(idx, BLOCK - 1), axis=1)
    from_hi = tl.gather(hi, tl.maximum(idx - BLOCK, 0), axis=1)
    return tl.where(idx < BLOCK, from_lo, from_hi)


@triton.jit
def _unskewed(ds, BLOCK: tl.constexpr):
    """The inverse reading: dS of the tile as its lo and hi band halves (0 off the band)."""
    a = tl.arange(0, BLOCK)[:, None]
    t = tl.arange(0, BLOCK)[None, :]
    lo = tl.where(t >= a, tl.gather(ds, tl.minimum(a - t + BLOCK - 1, BLOCK - 1), axis=1), 0.0)
    hi = tl.where(t < a, tl.gather(ds, tl.maximum(a - t - 1, 0), axis=1), 0.0)
    return lo, hi


@triton.jit
def _allowed(offs_m, offs_k, mem, N, WINDOW):
    dist = mem + offs_m[:, None] - offs_k[None, :]
    return (dist >= 0) & (dist < WINDOW) & (offs_k[None, :] < N)


@triton.jit
def _query_tile(Q, U, VB, h, offs_m, offs_d, d_ok, L, D, ACC: tl.constexpr):
    """(q + u, q + vb) in q's dtype for the dot products, zero outside [L, D]."""
    q = _load_rows(Q, offs_m, L, offs_d, d_ok, D).to(ACC)
    u = tl.load(U + h * D + offs_d, mask=d_ok, other=0.0).to(ACC)
    vb = tl.load(VB + h * D + offs_d, mask=d_ok, other=0.0).to(ACC)
    inside = (offs_m < L)[:, None] & d_ok[None, :]
    qu = tl.where(inside, q + u[None, :], 0.0).to(Q.dtype.element_ty)
    qv = tl.where(inside, q + vb[None, :], 0.0).to(Q.dtype.element_ty)
    return qu, qv


@triton.jit
def _row_stats(Lse, Delta, offs_m, L):
    """lse in log2 units (+inf for padded rows and rows without keys, so P = 0) and delta."""
    lse = tl.load(Lse + offs_m, mask=offs_m < L, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + offs_m, mask=offs_m < L, other=0.0)
    return lse * _LOG2E, delta


@triton.jit
def _probs_and_ds(s, ok, lse2, delta, do, v, qk_scale, ACC: tl.constexpr):
    """(P, dS / scale) of one tile from its unscaled scores."""
    p = tl.where(ok, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    return p, p * (_mm(do, tl.trans(v), ACC) - delta[:, None])


@triton.jit
def _query_prologue(
    Q, K, V, R, U, VB, L, N, R_LEN, WINDOW, H, GROUP, D,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The start of a forward or dq program, one per (query block, batch x head).

    Takes the kernel's arguments of the same names. Returns bh (batch x head, int64), pos0 (the
    absolute position M + i0 of the block's first query), offs_m [BLOCK] (its rows), q + u and
    q + vb [BLOCK, BLOCK_D] (_query_tile), K and V advanced to the program's kv head, R to its
    head, and the keys [lo, hi) of the key blocks that hold an allowed distance.
    """
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    kv = (bh // H) * (H // GROUP) + h // GROUP
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    qu, qv = _query_tile(Q + bh * L * D, U, VB, h, offs_m, offs_d, offs_d < D, L, D, ACC)
    pos0 = N - L + qb * BLOCK
    # From the first query's WINDOW - 1 keys back (block-aligned) to the last query's own key.
    lo = (tl.maximum(pos0 - WINDOW + 1, 0) // BLOCK) * BLOCK
    hi = tl.minimum(pos0 + BLOCK, N)
    return bh, pos0, offs_m, qu, qv, K + kv * N * D, V + kv * N * D, R + h * R_LEN * D, lo, hi


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _xl_fwd_kernel(
    Q, K, V, R, U, VB, Scale, Out, Lse,
    L, N, R_LEN, WINDOW, H, GROUP, D,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """XL attention of one query block and head. Grid: (cdiv(L, BLOCK), B x H).

    Args:
        Q [B, H, L, D]; K, V [B, Hkv, N, D] (H = Hkv x GROUP); R [H, R_LEN, D]; U, VB [H, D];
            Scale [1]: the score scale, in ACC; Out [B, H, L, D]; Lse [B, H, L] in ACC; all
            contiguous, D a multiple of 16 (_padded).
        L, N: query and key lengths (M = N - L memory positions); R_LEN: rows of R; WINDOW:
            allowed distances 0 .. WINDOW - 1; H: heads; GROUP: H / Hkv; D: the head dim.
        BLOCK: query and key block size; BLOCK_D: D padded to a power of two; ACC: the
            accumulation dtype (fp32, fp64 for fp64).
    """
    bh, pos0, offs_m, qu, qv, K, V, R, lo, hi = _query_prologue(
        Q, K, V, R, U, VB, L, N, R_LEN, WINDOW, H, GROUP, D, BLOCK, BLOCK_D, ACC
    )
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qk_scale = tl.load(Scale).to(ACC) * _LOG2E
    m_i = tl.full([BLOCK], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, BLOCK_D], ACC)
    # The next key block's distances are B lower: its band's hi half is this block's lo half,
    # so each step multiplies one new [B, D] block of r (the band's first hi half comes first).
    band_hi = _mm(qv, tl.trans(_r_rows(R, pos0 - lo + 1, R_LEN, offs_d, d_ok, D, BLOCK)), ACC)
    for start in range(lo, hi, BLOCK):
        offs_k = start + tl.arange(0, BLOCK)
        r_lo = _r_rows(R, pos0 - start - BLOCK + 1, R_LEN, offs_d, d_ok, D, BLOCK)
        band_lo = _mm(qv, tl.trans(r_lo), ACC)
        k = _load_rows(K, offs_k, N, offs_d, d_ok, D)
        s = _mm(qu, tl.trans(k), ACC) + _skewed(band_lo, band_hi, BLOCK)
        s = tl.where(_allowed(offs_m, offs_k, N - L, N, WINDOW), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, offs_k, N, offs_d, d_ok, D)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, ACC)
        m_i = m_new
        band_hi = band_lo

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    row_ok = offs_m < L
    tl.store(
        Out + bh * L * D + offs_m[:, None] * D + offs_d[None, :],
        (acc / l_safe[:, None]).to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + bh * L + offs_m, lse.to(Lse.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _xl_bwd_dkdv_kernel(
    Q, K, V, R, U, VB, Scale, DO, Lse, Delta, DK, DV,
    L, N, R_LEN, WINDOW, H, GROUP, D,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dk and dv of one key block and kv head, over the query blocks that reach it and the
    query heads of its GQA group. Grid: (cdiv(N, BLOCK), B x Hkv).

    DK, DV [B, Hkv, N, D]; the rest as in _xl_bwd_dq_kernel.
    """
    kb = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    h_kv = H // GROUP
    b = bkv // h_kv
    mem = N - L
    j0 = kb * BLOCK
    offs_k = j0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    scale = tl.load(Scale).to(ACC)
    K += bkv * N * D
    V += bkv * N * D
    k = _load_rows(K, offs_k, N, offs_d, d_ok, D)
    v = _load_rows(V, offs_k, N, offs_d, d_ok, D)
    dk = tl.zeros([BLOCK, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK, BLOCK_D], ACC)
    # Queries reaching this key block: 0 <= M + i - j < window for some j in it.
    lo = (tl.maximum(j0 - mem, 0) // BLOCK) * BLOCK
    hi = tl.minimum(j0 + BLOCK - 1 - mem + WINDOW, L)
    for g in range(0, GROUP):
        h = (bkv % h_kv) * GROUP + g
        bh = b * H + h
        Q_h, DO_h, R_h = Q + bh * L * D, DO + bh * L * D, R + h * R_LEN * D
        Lse_h, Delta_h = Lse + bh * L, Delta + bh * L
        # The next query block's distances are B higher: its lo half of r is this hi half.
        r_lo = _r_rows(R_h, mem + lo - j0 - BLOCK + 1, R_LEN, offs_d, d_ok, D, BLOCK)
        for i0 in range(lo, hi, BLOCK):
            offs_m = i0 + tl.arange(0, BLOCK)
            qu, qv = _query_tile(Q_h, U, VB, h, offs_m, offs_d, d_ok, L, D, ACC)
            r_hi = _r_rows(R_h, mem + i0 - j0 + 1, R_LEN, offs_d, d_ok, D, BLOCK)
            s = _mm(qu, tl.trans(k), ACC) + _skewed(
                _mm(qv, tl.trans(r_lo), ACC), _mm(qv, tl.trans(r_hi), ACC), BLOCK
            )
            do = _load_rows(DO_h, offs_m, L, offs_d, d_ok, D)
            lse2, delta = _row_stats(Lse_h, Delta_h, offs_m, L)
            ok = _allowed(offs_m, offs_k, mem, N, WINDOW)
            p, ds = _probs_and_ds(s, ok, lse2, delta, do, v, scale * _LOG2E, ACC)
            dv += _mm(tl.trans(p.to(do.dtype)), do, ACC)
            dk += _mm(tl.trans(ds.to(qu.dtype)), qu, ACC)
            r_lo = r_hi
    dst = bkv * N * D + offs_k[:, None] * D + offs_d[None, :]
    kv_mask = (offs_k[:, None] < N) & d_ok[None, :]
    tl.store(DK + dst, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dst, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _xl_bwd_dq_kernel(
    Q, K, V, R, U, VB, Scale, DO, Lse, Delta, DQ, DU_part, DVB_part,
    L, N, R_LEN, WINDOW, H, GROUP, D,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dq of one query block and head, over the key blocks of the forward, and the block's
    partial sums of du and dvb. Grid: (cdiv(L, BLOCK), B x H).

    DO, DQ [B, H, L, D]; Lse, Delta [B, H, L] in ACC: the forward's lse and rowsum(dout * out)
    - dlse; DU_part, DVB_part [B x H, cdiv(L, BLOCK), D] in ACC; the rest as in _xl_fwd_kernel.
    """
    bh, pos0, offs_m, qu, qv, K, V, R, lo, hi = _query_prologue(
        Q, K, V, R, U, VB, L, N, R_LEN, WINDOW, H, GROUP, D, BLOCK, BLOCK_D, ACC
    )
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    scale = tl.load(Scale).to(ACC)
    do = _load_rows(DO + bh * L * D, offs_m, L, offs_d, d_ok, D)
    lse2, delta = _row_stats(Lse + bh * L, Delta + bh * L, offs_m, L)
    dq_ac = tl.zeros([BLOCK, BLOCK_D], ACC)
    dq_bd = tl.zeros([BLOCK, BLOCK_D], ACC)
    r_hi = _r_rows(R, pos0 - lo + 1, R_LEN, offs_d, d_ok, D, BLOCK)
    band_hi = _mm(qv, tl.trans(r_hi), ACC)
    for start in range(lo, hi, BLOCK):  # carrying the band's halves as the forward does
        offs_k = start + tl.arange(0, BLOCK)
        r_lo = _r_rows(R, pos0 - start - BLOCK + 1, R_LEN, offs_d, d_ok, D, BLOCK)
        band_lo = _mm(qv, tl.trans(r_lo), ACC)
        k = _load_rows(K, offs_k, N, offs_d, d_ok, D)
        s = _mm(qu, tl.trans(k), ACC) + _skewed(band_lo, band_hi, BLOCK)
        v = _load_rows(V, offs_k, N, offs_d, d_ok, D)
        ok = _allowed(offs_m, offs_k, N - L, N, WINDOW)
        p, ds = _probs_and_ds(s, ok, lse2, delta, do, v, scale * _LOG2E, ACC)
        dq_ac += _mm(ds.to(k.dtype), k, ACC)
        ds_lo, ds_hi = _unskewed(ds, BLOCK)
        dq_bd += _mm(ds_lo.to(r_lo.dtype), r_lo, ACC) + _mm(ds_hi.to(r_hi.dtype), r_hi, ACC)
        r_hi = r_lo
        band_hi = band_lo
    dq_ac *= scale
    dq_bd *= scale
    tl.store(
        DQ + bh * L * D + offs_m[:, None] * D + offs_d[None, :],
        (dq_ac + dq_bd).to(DQ.dtype.element_ty),
        mask=(offs_m[:, None] < L) & d_ok[None, :],
    )
    part = (bh * tl.num_programs(0) + tl.program_id(0)) * D + offs_d
    tl.store(DU_part + part, tl.sum(dq_ac, 0), mask=d_ok)
    tl.store(DVB_part + part, tl.sum(dq_bd, 0), mask=d_ok)


@triton.jit(do_not_specialize=[*_NO_SPECIALIZE, "DIAG0"])
def _xl_bwd_dr_kernel(
    Q, K, V, R, U, VB, Scale, DO, Lse, Delta, DR_part,
    L, N, R_LEN, WINDOW, H, GROUP, D, DIAG0,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The gradient of the r band of one block diagonal qb - kb = DIAG0 + program 0, for one
    batch x head. Grid: (number of diagonals, B x H).

    DR_part [B x H, diagonals, 2 BLOCK, D] in ACC: the band's two halves, rows of distances
    M - BLOCK + 1 + (DIAG0 + program) BLOCK onwards (_fold_bands sums them into dr); the rest
    as in _xl_bwd_dq_kernel.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    kv = (bh // H) * (H // GROUP) + h // GROUP
    mem = N - L
    e = DIAG0 + pid  # this program's tiles have qb - kb == e, hence one band of r rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    scale = tl.load(Scale).to(ACC)
    Q += bh * L * D
    DO += bh * L * D
    K += kv * N * D
    V += kv * N * D
    R += h * R_LEN * D
    dmin = mem - BLOCK + 1 + e * BLOCK
    r_lo = _r_rows(R, dmin, R_LEN, offs_d, d_ok, D, BLOCK)
    r_hi = _r_rows(R, dmin + BLOCK, R_LEN, offs_d, d_ok, D, BLOCK)
    dr_lo = tl.zeros([BLOCK, BLOCK_D], ACC)
    dr_hi = tl.zeros([BLOCK, BLOCK_D], ACC)
    for qb in range(tl.maximum(e, 0), tl.minimum(tl.cdiv(L, BLOCK), tl.cdiv(N, BLOCK) + e)):
        offs_m = qb * BLOCK + tl.arange(0, BLOCK)
        offs_k = (qb - e) * BLOCK + tl.arange(0, BLOCK)
        qu, qv = _query_tile(Q, U, VB, h, offs_m, offs_d, d_ok, L, D, ACC)
        k = _load_rows(K, offs_k, N, offs_d, d_ok, D)
        s = _mm(qu, tl.trans(k), ACC) + _skewed(
            _mm(qv, tl.trans(r_lo), ACC), _mm(qv, tl.trans(r_hi), ACC), BLOCK
        )
        v = _load_rows(V, offs_k, N, offs_d, d_ok, D)
        do = _load_rows(DO, offs_m, L, offs_d, d_ok, D)
        lse2, delta = _row_stats(Lse + bh * L, Delta + bh * L, offs_m, L)
        ok = _allowed(offs_m, offs_k, mem, N, WINDOW)
        p, ds = _probs_and_ds(s, ok, lse2, delta, do, v, scale * _LOG2E, ACC)
        ds_lo, ds_hi = _unskewed(ds, BLOCK)
        dr_lo += _mm(tl.trans(ds_lo.to(qv.dtype)), qv, ACC)
        dr_hi += _mm(tl.trans(ds_hi.to(qv.dtype)), qv, ACC)
    offs_t = tl.arange(0, BLOCK)
    dst = ((bh * tl.num_programs(0) + pid) * 2 * BLOCK + offs_t[:, None]) * D + offs_d[None, :]
    tl.store(DR_part + dst, dr_lo * scale, mask=d_ok[None, :])
    tl.store(DR_part + dst + BLOCK * D, dr_hi * scale, mask=d_ok[None, :])


# --------------------------------------------------------------------------- launchers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# kernel -> BLOCK_D -> (BLOCK, num_warps): the largest tiles that ptxas fits in registers
# without spilling on sm_80 and sm_90 with Triton 3.6 and 3.9 (bench/compile_report.py checks
# every entry). The band product adds a [B, B] accumulator and two r tiles to flash
# attention's working set; the backward kernels hold more tiles still.
_HALF = {
    "fwd": {16: (64, 8), 32: (64, 8), 64: (64, 8), 128: (32, 4), 256: (32, 4)},
    "bwd_dkdv": {16: (32, 4), 32: (32, 4), 64: (32, 4), 128: (32, 8), 256: (16, 8)},
    "bwd_dq": {16: (32, 4), 32: (32, 4), 64: (32, 4), 128: (32, 8), 256: (16, 8)},
    "bwd_dr": {16: (32, 4), 32: (32, 4), 64: (32, 4), 128: (32, 8), 256: (32, 8)},
}
# fp32 multiplies in 3xTF32 (operands split in two: fp32 accuracy on tensor cores), which
# doubles the operand registers: up to head dim 64 only (FP32_MAX_HEAD_DIM). Larger fp32
# head dims spill even at 16-row tiles; they are refused rather than run in plain TF32.
_FP32 = {
    "fwd": {16: (32, 8), 32: (32, 8), 64: (32, 8)},
    "bwd_dkdv": {16: (16, 8), 32: (16, 8), 64: (16, 8)},
    "bwd_dq": {16: (16, 4), 32: (16, 4), 64: (16, 8)},
    "bwd_dr": {16: (16, 4), 32: (16, 4), 64: (16, 4)},
}
FP32_MAX_HEAD_DIM = 64


def block_config(head_dim: int, dtype: torch.dtype, *, kernel: str = "fwd", interpreted=False):
    """(BLOCK, num_warps, num_stages) of ``kernel`` ("fwd", "bwd_dkdv", "bwd_dq", "bwd_dr").

    Each kernel tiles independently (query and key blocks equal within a kernel). The
    interpreter takes small blocks, so tiny test shapes still cross many tiles and diagonals.
    """
    if interpreted:
        return 16, 4, 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    block, warps = (_FP32 if dtype == torch.float32 else _HALF)[kernel][block_d]
    return block, warps, 2


def xl_check(q: torch.Tensor) -> None:
    """Raise ValueError / TypeError for inputs this backend cannot serve."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"the triton backend takes fp16, bf16, fp32 or fp64, got {q.dtype}")
    if q.is_cuda:
        if q.dtype == torch.float64:
            raise TypeError("the triton backend runs fp64 only in the interpreter (CPU tensors)")
        if q.dtype == torch.float32 and q.shape[-1] > FP32_MAX_HEAD_DIM:
            raise TypeError(
                f"the triton XL kernels take fp32 only up to head dim {FP32_MAX_HEAD_DIM} "
                f"(got {q.shape[-1]}): use fp16/bf16, or backend='torch' for fp32"
            )
    elif not (q.device.type == "cpu" and _interpreting()):
        raise ValueError(
            "the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got {q.device}"
        )


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _setup(q, k, r, scale, window):
    """(the kernels' size arguments, the scale as a 1-element tensor).

    The scale travels as a tensor: a Python float argument would be an fp32 scalar, too
    coarse for the fp64 path.
    """
    h, n_k = q.shape[1], k.shape[2]
    sizes = {
        "L": q.shape[2],
        "N": n_k,
        "R_LEN": r.shape[1],
        "WINDOW": n_k if window is None else min(int(window), n_k),
        "H": h,
        "GROUP": h // k.shape[1],
        "D": q.shape[3],
    }
    scale_t = torch.tensor([scale], dtype=_acc(q.dtype), device=q.device)
    return sizes, scale_t


def _padded(ts):
    """Contiguous tensors, the head dim zero-padded to a multiple of 16 when it is not one.

    Rows then start 16-byte aligned and the kernels, specialized on D % 16 == 0, load them
    as vectors (unaligned rows load element by element and spill registers). Zeros add
    nothing to the scores and give zero output columns; this copies O((L + N) D), not more.
    """
    pad = -ts[0].shape[-1] % 16
    return [F.pad(t, (0, pad)).contiguous() if pad else t.contiguous() for t in ts]


def _unpadded(t: torch.Tensor, d: int) -> torch.Tensor:
    return t if t.shape[-1] == d else t[..., :d].contiguous()


def _launch(q, kernel: str) -> tuple[int, dict]:
    """(BLOCK, launch keywords) of one kernel for q's head dim and dtype."""
    block, warps, stages = block_config(
        q.shape[3], q.dtype, kernel=kernel, interpreted=not q.is_cuda
    )
    return block, {
        "BLOCK": block,
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[3])),
        "ACC": tl.float64 if q.dtype == torch.float64 else tl.float32,
        "num_warps": warps,
        "num_stages": stages,
    }


def xl_forward(q, k, v, r, u, vb, *, scale: float, window: int | None):
    """Forward. q [B, H, L, D]; k, v [B, Hkv, N, D]; r [H, R, D]; u, vb [H, D].

    Returns out [B, H, L, D] (q.dtype) and lse [B, H, L] (fp32, fp64 for fp64).
    """
    d = q.shape[3]
    q, k, v, r, u, vb = _padded((q, k, v, r, u, vb))
    sizes, scale_t = _setup(q, k, r, scale, window)
    block, meta = _launch(q, "fwd")
    b, h, n_q = q.shape[:3]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, dtype=_acc(q.dtype), device=q.device)
    if out.numel():
        grid = (triton.cdiv(n_q, block), b * h)
        _xl_fwd_kernel[grid](
            Q=q, K=k, V=v, R=r, U=u, VB=vb, Scale=scale_t, Out=out, Lse=lse, **sizes, **meta
        )
    return _unpadded(out, d), lse


def _fold_bands(parts: torch.Tensor, base: int, n_r: int) -> torch.Tensor:
    """Sum per-diagonal band gradients [B, H, n_diag, 2B, D] into dr [H, R, D].

    Band row t of diagonal p holds distance base + p * B + t, so consecutive bands overlap by
    B - 1 rows (row 2B - 1 is always zero). Rows at negative distances hold zeros (masked
    scores); distances >= R - 1 all used r[R - 1].
    """
    _, h, n_diag, two_b, d = parts.shape
    block = two_b // 2
    parts = parts.sum(0)
    by_dist = parts.new_zeros(h, n_diag + 1, block, d)
    by_dist[:, :n_diag] += parts[:, :, :block]
    by_dist[:, 1:] += parts[:, :, block:]
    by_dist = by_dist.view(h, (n_diag + 1) * block, d)[:, max(0, -base) :]
    first = max(0, base)
    dr = parts.new_zeros(h, n_r, d)
    exact = max(0, min(n_r - 1 - first, by_dist.shape[1]))
    dr[:, first : first + exact] = by_dist[:, :exact]
    dr[:, n_r - 1] += by_dist[:, exact:].sum(1)
    return dr


def xl_backward(q, k, v, r, u, vb, out, dout, lse, delta, *, scale: float, window: int | None):
    """Gradients (dq, dk, dv, dr, du, dvb), shaped like q, k, v, r, u, vb.

    dout [B, H, L, D]; lse [B, H, L] from the forward; delta = rowsum(dout * out) - dlse.
    """
    if q.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (q, k, v, r, u, vb))
    d_in = q.shape[3]
    q, k, v, r, u, vb, dout = _padded((q, k, v, r, u, vb, dout))
    lse, delta = lse.contiguous(), delta.to(lse.dtype).contiguous()
    sizes, scale_t = _setup(q, k, r, scale, window)
    n_q, n_k, n_r, win = sizes["L"], sizes["N"], sizes["R_LEN"], sizes["WINDOW"]
    b, h, _, d = q.shape
    acc = _acc(q.dtype)
    inputs = dict(Q=q, K=k, V=v, R=r, U=u, VB=vb, Scale=scale_t, DO=dout, Lse=lse, Delta=delta)

    block, meta = _launch(q, "bwd_dkdv")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = (triton.cdiv(n_k, block), b * k.shape[1])
    _xl_bwd_dkdv_kernel[grid](**inputs, DK=dk, DV=dv, **sizes, **meta)

    block, meta = _launch(q, "bwd_dq")
    n_qb = triton.cdiv(n_q, block)
    dq = torch.empty_like(q)
    du_part = torch.empty(b * h, n_qb, d, dtype=acc, device=q.device)
    dvb_part = torch.empty_like(du_part)
    _xl_bwd_dq_kernel[(n_qb, b * h)](
        **inputs, DQ=dq, DU_part=du_part, DVB_part=dvb_part, **sizes, **meta
    )
    du = du_part.view(b, h, n_qb, d).sum((0, 2))
    dvb = dvb_part.view(b, h, n_qb, d).sum((0, 2))

    block, meta = _launch(q, "bwd_dr")
    # Block diagonals e = qb - kb whose band [dmin, dmin + 2B - 2], dmin = M - B + 1 + e B,
    # meets the allowed distances [0, window - 1].
    n_qb, n_kb = triton.cdiv(n_q, block), triton.cdiv(n_k, block)
    mem = n_k - n_q
    e_lo = max(-(n_kb - 1), -((mem + block - 1) // block))
    e_hi = min(n_qb - 1, (win - 1 - mem + block - 1) // block)
    n_diag = e_hi - e_lo + 1
    dr_part = torch.empty(b * h, n_diag, 2 * block, d, dtype=acc, device=q.device)
    _xl_bwd_dr_kernel[(n_diag, b * h)](**inputs, DR_part=dr_part, DIAG0=e_lo, **sizes, **meta)
    dr = _fold_bands(dr_part.view(b, h, n_diag, 2 * block, d), mem - block + 1 + e_lo * block, n_r)
    grads = (dq, dk, dv, dr.to(r.dtype), du.to(u.dtype), dvb.to(vb.dtype))
    return tuple(_unpadded(g, d_in) for g in grads)
