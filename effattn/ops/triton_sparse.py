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

Each kernel reads top to bottom: a prologue (``_query_prologue``, shared by the forward and
dq) finds the program's block and head and advances the base pointers to them once; one
inner-loop helper per direction (``_fwd_inner``, ``_dq_inner``, ``_dkdv_inner``) runs over the
row's full blocks and then, with the pattern predicate, over its partial ones; an epilogue
stores the result. Strides travel as ``_Strides`` and a layout view as ``_Blocks`` (NamedTuple
kernel arguments), and the launchers pass every argument by keyword.

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

from effattn.patterns import GROUP_EQ, GROUP_LT, BlockLayout, Term

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
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- kernel arguments
class _Strides(NamedTuple):
    """Element strides of a [B, H, n, D] tensor's batch, head and row dims (D has stride 1)."""

    batch: int
    head: int
    row: int


class _Blocks(NamedTuple):
    """One view of a BlockLayout as a kernel reads it: for each head class c < C and row r < R
    (query block of the forward and dq, key block of dk / dv) the blocks of the other side to
    visit. Of ``terms`` and ``tiles`` the layout uses one; the other is any tensor of the right
    dtype (never read), as is ``part_tile`` under the term table."""

    full_num: torch.Tensor  # [C, R] int32: how many blocks row r sees entirely
    full_idx: torch.Tensor  # [C, R, max_full] int32: which
    part_num: torch.Tensor  # [C, R] int32: how many blocks need the pattern predicate
    part_idx: torch.Tensor  # [C, R, max_part] int32: which
    part_tile: torch.Tensor  # [C, R, max_part] int32: their stored tiles (custom patterns)
    terms: torch.Tensor  # [C, NUM_TERMS, Term.NUM_FIELDS] int32 term table (built-in patterns)
    tiles: torch.Tensor  # [U, BLOCK_M, BLOCK_N] uint8 stored tiles (custom patterns)
    num_rows: int  # R
    max_full: int
    max_part: int
    num_classes: int  # C: head h follows class h % C
    q_offset: int  # absolute position of query row 0


# --------------------------------------------------------------------------- kernels
# Nested @triton.jit calls cost nothing on the GPU (they are inlined) but about half a
# millisecond each in the interpreter: a kernel makes one call per list of blocks (an inner
# loop inlining its per-block steps), whose blocks call out only for the pattern predicate of
# partial blocks, the bf16 rounding of the interpreter and the dk / dv row statistics.

_LOG2E = tl.constexpr(1.4426950408889634)
# A packed pattern term (effattn.patterns.Term.as_tuple): the offsets of its int32 fields.
_TERM_SIZE = tl.constexpr(Term.NUM_FIELDS)
_LO, _HI, _MOD, _GQ, _GK, _GREL, _SMOD, _SMIN, _SMAX = map(tl.constexpr, range(Term.NUM_FIELDS))
_GROUP_EQ = tl.constexpr(GROUP_EQ)
_GROUP_LT = tl.constexpr(GROUP_LT)


@triton.jit
def _pattern_allowed(
    Tile, tile_offs, Terms, c, p, j,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr,
):  # fmt: skip
    """Which entries of a partial block the pattern allows, as a bool tile.

    Tile: the block's stored [BLOCK_M, BLOCK_N] uint8 tile (custom patterns), read at
    tile_offs (that shape, or its transpose); Terms [C, NUM_TERMS, _TERM_SIZE]: the term table
    (built-in patterns), whose terms of head class c are OR-ed at absolute query positions p and
    keys j (int32, broadcastable to the tile's shape).
    """
    if USE_TILES:
        return tl.load(Tile + tile_offs) != 0
    d = p - j
    ok = d != d
    for t in tl.static_range(NUM_TERMS):
        term = Terms + (c * NUM_TERMS + t) * _TERM_SIZE
        allowed = (d >= tl.load(term + _LO)) & (d <= tl.load(term + _HI))
        if USE_MOD:
            mod = tl.load(term + _MOD)
            # p - j may be negative: only "divisible" is asked, where C and floor remainders agree.
            allowed = allowed & ((mod <= 0) | (d % tl.maximum(mod, 1) == 0))
        if USE_GROUP:
            gq = tl.load(term + _GQ)
            grel = tl.load(term + _GREL)
            qg = p // tl.maximum(gq, 1)
            kg = j // tl.maximum(tl.load(term + _GK), 1)
            rel = tl.where(grel == _GROUP_LT, kg < qg, kg != qg)
            rel = tl.where(grel == _GROUP_EQ, kg == qg, rel)
            allowed = allowed & ((gq <= 0) | rel)
        if USE_COLS:
            smod = tl.load(term + _SMOD)
            r = j % tl.maximum(smod, 1)
            in_cols = (r >= tl.load(term + _SMIN)) & (r <= tl.load(term + _SMAX))
            allowed = allowed & ((smod <= 0) | in_cols)
        ok = ok | allowed
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
def _query_prologue(
    Q, K, V, KeyMask, stride_q, stride_k, stride_v, stride_mask, layout, num_heads, group, n_q,
    NUM_TERMS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """The start of a forward or dq program, one per (query block, batch x head).

    Takes the kernel's arguments of the same names. Returns the program's batch b and head h,
    offs_m [BLOCK_M] (the block's query rows), q_mask [BLOCK_M, BLOCK_D] (those inside
    n_q x HEAD_DIM), the q tile [BLOCK_M, BLOCK_D] as tl.dot operand, K, V and KeyMask advanced
    to the program's batch and head (K and V to its kv head), its head class c and its row
    c * R + query block in the layout's tables.
    """
    # Last query blocks first: under causal-like patterns they carry the most key blocks.
    qb = layout.num_rows - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    c = h % layout.num_classes
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    Q += b64 * stride_q.batch + h64 * stride_q.head
    q = tl.load(Q + offs_m[:, None] * stride_q.row + offs_d[None, :], mask=q_mask, other=0.0)
    K += b64 * stride_k.batch + hk64 * stride_k.head
    V += b64 * stride_v.batch + hk64 * stride_v.head
    KeyMask += b64 * stride_mask.batch + h64 * stride_mask.head
    row = c * layout.num_rows + qb
    return b, h, offs_m, q_mask, q.to(DOT_DTYPE), K, V, KeyMask, c, row


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, offs_m,
    K, V, KeyMask, stride_k, stride_v, stride_mask, n_k, qk_scale,
    layout, row, c,
    PARTIAL: tl.constexpr,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EXP2: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """The online softmax over the full (PARTIAL False) or partial key blocks of a layout row.

    acc [BLOCK_M, BLOCK_D], m_i, l_i [BLOCK_M]: the running output, row max and row sum, which
    it returns updated; q [BLOCK_M, BLOCK_D]: the query tile; offs_m [BLOCK_M]: its rows; K, V
    [n_k, D], KeyMask [n_k], the layout row and head class c as _query_prologue returns them;
    the rest as in _fwd_kernel.
    """
    if PARTIAL:
        n_blocks = tl.load(layout.part_num + row)
        BlockIdx = layout.part_idx + row * layout.max_part
        BlockTile = layout.part_tile + row * layout.max_part
    else:
        n_blocks = tl.load(layout.full_num + row)
        BlockIdx = layout.full_idx + row * layout.max_full
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]
    for t in range(n_blocks):
        cols = tl.load(BlockIdx + t) * BLOCK_N + offs_n
        # The stored tile's index is read with the block's: read later in the body, ptxas of
        # Triton 3.6 spilled registers in two dq configs.
        Tile = layout.tiles
        if PARTIAL and USE_TILES:
            Tile += tl.load(BlockTile + t).to(tl.int64) * (BLOCK_M * BLOCK_N)
        col_ok = cols < n_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_k.row + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_v.row + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        if HAS_KEY_MASK:
            hidden = tl.load(KeyMask + cols * stride_mask.row, mask=col_ok, other=1)
            col_ok = col_ok & (hidden == 0)
        vis = col_ok[None, :]
        if PARTIAL:
            vis = vis & _pattern_allowed(
                Tile, tile_offs, layout.terms, c, (offs_m + layout.q_offset)[:, None],
                cols[None, :], NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES,
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
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KeyMask, Out, Lse,
    stride_q, stride_k, stride_v, stride_mask, stride_o,
    layout, qk_scale, num_heads, group, n_q, n_k,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, EXP2: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Attention of one query block and head over the key blocks its layout row lists.

    Grid: (layout.num_rows query blocks, B x H).

    Args:
        Q [B, H, n_q, D]; K, V [B, Hkv, n_k, D] (H = Hkv x group); KeyMask [B, H, n_k] uint8,
            nonzero = key hidden (read only with HAS_KEY_MASK); Out [B, H, n_q, D]; Lse
            [B x H, n_q] in ACC_DTYPE (contiguous); each with its stride_* (_Strides; D has
            stride 1, KeyMask's "row" is its key stride).
        layout: the _Blocks of the layout's query rows (kv_* tensors).
        qk_scale: the score scale, times log2(e) under EXP2.
        num_heads: H; group: H / Hkv; n_q, n_k: sequence lengths.
        NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS: the term table's width and the constraint
            kinds its terms use (the others compile out); USE_TILES: stored tiles instead.
        ACC_DTYPE: accumulation dtype; EXP2: softmax in base 2; DOT_DTYPE, DOT_PRECISION:
            tl.dot operand dtype and precision; RNE_BF16: round to bf16 as the GPU does.
        BLOCK_M x BLOCK_N: the layout's blocks; BLOCK_D: HEAD_DIM = D padded to a power of two.
    """
    b, h, offs_m, q_mask, q, K, V, KeyMask, c, row = _query_prologue(
        Q, K, V, KeyMask, stride_q, stride_k, stride_v, stride_mask, layout, num_heads, group,
        n_q, NUM_TERMS, DOT_DTYPE, BLOCK_M, BLOCK_D, HEAD_DIM,
    )  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    # Full blocks first (no pattern test), then the partial ones.
    for PARTIAL in tl.static_range(2):
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, offs_m, K, V, KeyMask, stride_k, stride_v, stride_mask, n_k,
            qk_scale, layout, row, c, PARTIAL == 1,
            NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, HAS_KEY_MASK,
            EXP2, DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM,
        )  # fmt: skip

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    if EXP2:
        lse = (m_i + tl.log2(l_safe)) / _LOG2E
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(nonempty, lse, float("-inf"))
    if RNE_BF16:
        out = _rne_bf16(out)
    offs_d = tl.arange(0, BLOCK_D)
    Out += b.to(tl.int64) * stride_o.batch + h.to(tl.int64) * stride_o.head
    Lse += tl.program_id(1).to(tl.int64) * n_q  # row b x H + h of [B x H, n_q]
    o_offs = offs_m[:, None] * stride_o.row + offs_d[None, :]
    tl.store(Out + o_offs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _row_stats(Lse, Delta, offs_m, n_q, EXP2: tl.constexpr):
    """(lse in the kernels' exponent base, delta, row visible) of query rows offs_m [BLOCK_M].

    Lse, Delta [n_q]: the head's merged statistics. Rows past n_q and rows whose lse is +-inf
    (no visible key, or kept only to fill a dense block) get visible = False, so they
    contribute nothing.
    """
    in_rows = offs_m < n_q
    lse = tl.load(Lse + offs_m, mask=in_rows, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=in_rows, other=0.0)
    ok = (lse > float("-inf")) & (lse < float("inf"))
    if EXP2:
        lse = lse * _LOG2E
    lse = tl.where(ok, lse, 0.0)
    delta = tl.where(ok, delta, 0.0)
    return lse, delta, ok


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, row_vis, offs_m,
    K, V, KeyMask, stride_k, stride_v, stride_mask, n_k, qk_scale,
    layout, row, c,
    PARTIAL: tl.constexpr,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EXP2: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """dq += dS K (dS without the final scale) over the full or partial key blocks of a row.

    dq, q, do [BLOCK_M, BLOCK_D]; lse, delta, row_vis [BLOCK_M] from _row_stats; the rest as
    in _fwd_inner.
    """
    if PARTIAL:
        BlockIdx = layout.part_idx
        first = row * layout.max_part
        n_blocks = tl.load(layout.part_num + row)
    else:
        BlockIdx = layout.full_idx
        first = row * layout.max_full
        n_blocks = tl.load(layout.full_num + row)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]
    for t in range(n_blocks):
        cols = tl.load(BlockIdx + (first + t)) * BLOCK_N + offs_n
        # The stored tile's index is read with the block's: read later in the body, ptxas of
        # Triton 3.6 spilled registers in two dq configs.
        Tile = layout.tiles
        if PARTIAL and USE_TILES:
            Tile += tl.load(layout.part_tile + (first + t)).to(tl.int64) * (BLOCK_M * BLOCK_N)
        col_ok = cols < n_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_k.row + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_v.row + offs_d[None, :], mask=kv_mask, other=0.0)
        k_dot = k.to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k_dot), input_precision=DOT_PRECISION) * qk_scale
        if HAS_KEY_MASK:
            hidden = tl.load(KeyMask + cols * stride_mask.row, mask=col_ok, other=1)
            col_ok = col_ok & (hidden == 0)
        vis = col_ok[None, :] & row_vis[:, None]
        if PARTIAL:
            vis = vis & _pattern_allowed(
                Tile, tile_offs, layout.terms, c, (offs_m + layout.q_offset)[:, None],
                cols[None, :], NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES,
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
    Q, K, V, KeyMask, DO, Lse, Delta, DQ,
    stride_q, stride_k, stride_v, stride_mask, stride_do,
    layout, qk_scale, sm_scale, num_heads, group, n_q, n_k,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, EXP2: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """dq of one query block and head over the key blocks of its layout row (as the forward).

    Grid: (layout.num_rows query blocks, B x H). DO [B, H, n_q, D] with stride_do; Lse,
    Delta [B x H, n_q] in ACC_DTYPE: the merged lse and rowsum(dout * out) - dlse of the
    plan; DQ [B, H, n_q, D] in ACC_DTYPE (contiguous); sm_scale: the score scale (qk_scale
    without log2(e)); the rest as in _fwd_kernel.
    """
    b, h, offs_m, q_mask, q, K, V, KeyMask, c, row = _query_prologue(
        Q, K, V, KeyMask, stride_q, stride_k, stride_v, stride_mask, layout, num_heads, group,
        n_q, NUM_TERMS, DOT_DTYPE, BLOCK_M, BLOCK_D, HEAD_DIM,
    )  # fmt: skip
    bh = b * num_heads + h
    DO += b.to(tl.int64) * stride_do.batch + h.to(tl.int64) * stride_do.head
    offs_d = tl.arange(0, BLOCK_D)
    do = tl.load(DO + offs_m[:, None] * stride_do.row + offs_d[None, :], mask=q_mask, other=0.0)
    do = do.to(DOT_DTYPE)
    Lse += bh.to(tl.int64) * n_q
    Delta += bh.to(tl.int64) * n_q
    lse, delta, row_vis = _row_stats(Lse, Delta, offs_m, n_q, EXP2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for PARTIAL in tl.static_range(2):  # full blocks, then partial ones
        dq = _dq_inner(
            dq, q, do, lse, delta, row_vis, offs_m, K, V, KeyMask, stride_k, stride_v,
            stride_mask, n_k, qk_scale, layout, row, c, PARTIAL == 1,
            NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES, HAS_KEY_MASK,
            EXP2, DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM,
        )  # fmt: skip

    dq_ptrs = DQ + bh.to(tl.int64) * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq * sm_scale, mask=q_mask)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, cols, col_ok,
    Q, DO, Lse, Delta, stride_q, stride_do, n_q, qk_scale,
    layout, row, c,
    PARTIAL: tl.constexpr,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr,
    EXP2: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """dv += P^T dO and dk += dS^T Q over the full or partial query blocks of a key-block row,
    in the transposed [BLOCK_N, BLOCK_M] orientation.

    dk, dv [BLOCK_N, BLOCK_D]: the accumulators, returned updated; k, v [BLOCK_N, BLOCK_D]: the
    key block as tl.dot operands; cols [BLOCK_N]: its keys; col_ok [BLOCK_N]: those inside n_k
    and not hidden; Q, DO [n_q, D] and Lse, Delta [n_q]: one query head's, advanced to it; the
    layout's row and the head class c as in _fwd_inner.
    """
    if PARTIAL:
        n_blocks = tl.load(layout.part_num + row)
        BlockIdx = layout.part_idx + row * layout.max_part
        BlockTile = layout.part_tile + row * layout.max_part
    else:
        n_blocks = tl.load(layout.full_num + row)
        BlockIdx = layout.full_idx + row * layout.max_full
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Tiles are stored [BLOCK_M, BLOCK_N]; read them transposed.
    tile_offs = offs_r[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    for t in range(n_blocks):
        offs_m = tl.load(BlockIdx + t) * BLOCK_M + offs_r
        # The stored tile's index is read with the block's: read later in the body, ptxas of
        # Triton 3.6 spilled registers in two dq configs.
        Tile = layout.tiles
        if PARTIAL and USE_TILES:
            Tile += tl.load(BlockTile + t).to(tl.int64) * (BLOCK_M * BLOCK_N)
        q_mask = (offs_m < n_q)[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_q.row + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_do.row + offs_d[None, :], mask=q_mask, other=0.0)
        q_dot, do_dot = q.to(DOT_DTYPE), do.to(DOT_DTYPE)
        lse, delta, row_vis = _row_stats(Lse, Delta, offs_m, n_q, EXP2)
        st = tl.dot(k, tl.trans(q_dot), input_precision=DOT_PRECISION) * qk_scale
        vis = col_ok[:, None] & row_vis[None, :]
        if PARTIAL:
            vis = vis & _pattern_allowed(
                Tile, tile_offs, layout.terms, c, (offs_m + layout.q_offset)[None, :],
                cols[:, None], NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES,
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
    Q, K, V, KeyMask, DO, Lse, Delta, DK, DV,
    stride_q, stride_k, stride_v, stride_mask, stride_do,
    layout, qk_scale, sm_scale, num_heads, group, n_q, n_k,
    NUM_TERMS: tl.constexpr, USE_MOD: tl.constexpr, USE_GROUP: tl.constexpr,
    USE_COLS: tl.constexpr, USE_TILES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, EXP2: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """dk and dv of one key block and kv head over the query blocks of its layout row.

    Grid: (layout.num_rows key blocks, B x Hkv). layout: the _Blocks of the layout's key rows
    (q_* tensors); DK, DV [B, Hkv, n_k, D] in ACC_DTYPE (contiguous); the rest as in
    _bwd_dq_kernel. The query heads of the GQA group are visited one after the other inside
    the program: a deterministic reduction, without atomics.
    """
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    num_kv_heads = num_heads // group
    b = bhk // num_kv_heads
    hk = bhk % num_kv_heads
    b64 = b.to(tl.int64)
    K += b64 * stride_k.batch + hk.to(tl.int64) * stride_k.head
    V += b64 * stride_v.batch + hk.to(tl.int64) * stride_v.head
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_keys = cols < n_k
    kv_mask = in_keys[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + cols[:, None] * stride_k.row + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols[:, None] * stride_v.row + offs_d[None, :], mask=kv_mask, other=0.0)
    k, v = k.to(DOT_DTYPE), v.to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for g in range(group):
        h = hk * group + g
        c = h % layout.num_classes
        h64 = h.to(tl.int64)
        bh = b64 * num_heads + h64
        Q_h = Q + b64 * stride_q.batch + h64 * stride_q.head
        DO_h = DO + b64 * stride_do.batch + h64 * stride_do.head
        col_ok = in_keys
        if HAS_KEY_MASK:
            KeyMask_h = KeyMask + b64 * stride_mask.batch + h64 * stride_mask.head
            hidden = tl.load(KeyMask_h + cols * stride_mask.row, mask=in_keys, other=1)
            col_ok = col_ok & (hidden == 0)
        for PARTIAL in tl.static_range(2):  # full blocks, then partial ones
            dk, dv = _dkdv_inner(
                dk, dv, k, v, cols, col_ok, Q_h, DO_h, Lse + bh * n_q, Delta + bh * n_q,
                stride_q, stride_do, n_q, qk_scale, layout, c * layout.num_rows + kb, c,
                PARTIAL == 1, NUM_TERMS, USE_MOD, USE_GROUP, USE_COLS, USE_TILES,
                EXP2, DOT_DTYPE, DOT_PRECISION, RNE_BF16, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM,
            )  # fmt: skip

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
    """A layout in kernel form (cached per layout): its two views and the predicate flags."""

    def __init__(self, layout: BlockLayout):
        if layout.tiles is not None:
            tiles = layout.tiles.to(torch.uint8).contiguous()
            terms = tiles
            self.flags = {"NUM_TERMS": 1, "USE_MOD": False, "USE_GROUP": False, "USE_COLS": False}
            kv_tile, q_tile = layout.kv_part_tile, layout.q_part_tile
        else:
            terms = layout.terms.to(device=layout.kv_full_num.device).contiguous()
            tiles = terms
            used = [Term(*t) for cls in layout.terms.tolist() for t in cls]
            self.flags = {
                "NUM_TERMS": layout.terms.shape[1],
                "USE_MOD": any(t.mod > 0 for t in used),
                "USE_GROUP": any(t.gq > 0 for t in used),
                "USE_COLS": any(t.smod > 0 for t in used),
            }
            kv_tile, q_tile = layout.kv_part_idx, layout.q_part_idx
        self.flags["USE_TILES"] = layout.tiles is not None
        shared = {"num_classes": layout.num_classes, "q_offset": layout.q_offset}
        self.kv = _Blocks(
            layout.kv_full_num, layout.kv_full_idx, layout.kv_part_num, layout.kv_part_idx,
            kv_tile, terms, tiles, layout.num_q_blocks, layout.kv_full_idx.shape[-1],
            layout.kv_part_idx.shape[-1], **shared,
        )  # fmt: skip
        self.q = _Blocks(
            layout.q_full_num, layout.q_full_idx, layout.q_part_num, layout.q_part_idx,
            q_tile, terms, tiles, layout.num_k_blocks, layout.q_full_idx.shape[-1],
            layout.q_part_idx.shape[-1], **shared,
        )  # fmt: skip


_LAYOUT_ARGS: weakref.WeakKeyDictionary[BlockLayout, _LayoutArgs] = weakref.WeakKeyDictionary()


def _layout_args(layout: BlockLayout) -> _LayoutArgs:
    args = _LAYOUT_ARGS.get(layout)
    if args is None:
        args = _LAYOUT_ARGS[layout] = _LayoutArgs(layout)
    return args


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> _Strides:
    return _Strides(*t.stride()[:3])


def _key_mask_args(key_mask, b, h, n_k, fallback):
    """(pointer tensor, strides) of the key mask expanded to [B, H, n_k] (stride 0 where it
    broadcasts), or a placeholder pointer when there is none."""
    if key_mask is None:
        return fallback, _Strides(0, 0, 0)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor, got {key_mask.dtype}")
    km = key_mask.expand(b, h, n_k)
    return km.view(torch.uint8), _Strides(*km.stride())


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
    return q, scale * _LOG2E.value if _exp2(q.dtype) else scale, scale


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


def _launch_args(cfg: _Config, head_dim: int) -> dict:
    """The tile constexprs and launch options of a kernel under this config."""
    return {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_D": _block_d(head_dim),
        "HEAD_DIM": head_dim,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _numerics(dtype: torch.dtype) -> dict:
    """The kernels' numeric constexprs for inputs of this dtype: ACC_DTYPE (accumulation),
    EXP2, DOT_DTYPE and DOT_PRECISION (tl.dot operand dtype and precision), RNE_BF16."""
    acc = {"ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32, "EXP2": _exp2(dtype)}
    if dtype == torch.bfloat16 and _interpreting():
        # Triton's interpreter multiplies bf16 tiles as their uint16 storage and truncates
        # fp32 -> bf16. Widening the operands to fp32 is exact (bf16 x bf16 products fit fp32)
        # and accumulates in fp32, and RNE_BF16 rounds as the GPU does.
        return {**acc, "DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee", "RNE_BF16": True}
    # fp32 gets fp32 products (TF32 would lose 3 decimal digits); ignored for 16-bit operands.
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return {**acc, "DOT_DTYPE": _TL_DTYPES[dtype], "DOT_PRECISION": precision, "RNE_BF16": False}


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
    km, stride_mask = _key_mask_args(key_mask, b, h, n_k, lse)
    _fwd_kernel[(layout.num_q_blocks, b * h)](
        Q=qs, K=k, V=v, KeyMask=km, Out=out, Lse=lse,
        stride_q=_strides(qs), stride_k=_strides(k), stride_v=_strides(v),
        stride_mask=stride_mask, stride_o=_strides(out),
        layout=la.kv, qk_scale=qk_scale, num_heads=h, group=h // h_kv, n_q=n_q, n_k=n_k,
        HAS_KEY_MASK=key_mask is not None, **la.flags, **_numerics(q.dtype),
        **_launch_args(cfg, d),
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
    km, stride_mask = _key_mask_args(key_mask, b, h, n_k, lse)
    args = dict(
        Q=qs, K=k, V=v, KeyMask=km, DO=dout, Lse=lse, Delta=delta,
        stride_q=_strides(qs), stride_k=_strides(k), stride_v=_strides(v),
        stride_mask=stride_mask, stride_do=_strides(dout),
        qk_scale=qk_scale, sm_scale=sm_scale, num_heads=h, group=h // h_kv, n_q=n_q, n_k=n_k,
        HAS_KEY_MASK=key_mask is not None, **_numerics(q.dtype),
    )  # fmt: skip

    cfg = _config("dq", q.dtype, d, q.device)
    layout = layout_fn(cfg.block_m, cfg.block_n)
    la = _layout_args(layout)
    _bwd_dq_kernel[(layout.num_q_blocks, b * h)](
        DQ=dq, layout=la.kv, **args, **la.flags, **_launch_args(cfg, d)
    )

    cfg = _config("dkdv", q.dtype, d, q.device)
    layout = layout_fn(cfg.block_m, cfg.block_n)
    la = _layout_args(layout)
    _bwd_dkdv_kernel[(layout.num_k_blocks, b * h_kv)](
        DK=dk, DV=dv, layout=la.q, **args, **la.flags, **_launch_args(cfg, d)
    )
    if q.dtype == torch.float64:
        dq = dq * scale
    return dq, dk, dv
