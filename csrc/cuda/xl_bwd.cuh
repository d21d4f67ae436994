// Transformer-XL attention backward: three kernels, no atomics, deterministic (launchers in
// xl_bwd.cu). Each recomputes the tiles it needs; 8 warps per block. In the "score phase" warp
// w computes the [16 x 32] sub-tile rows 16 (w % 4) .., keys 32 (w / 4) .. of a 64 x 64 tile:
// scores with the band term (xl_common.cuh), P = exp(S - lse), dP = dO V^T and
// dS = P (dP - delta) (without the final scale).
//
// dkdv: one block per (key block, batch x kv head), looping over the query heads of the group and
//       the query blocks that reach the key block. P and dS go through shared memory, and warp w
//       then accumulates dv += P^T dO and dk += dS^T (q + u) for keys 16 (w % 4) .. and one half
//       of the head dim. Also the column sums of dS per key and head (colsum), for du.
// dq:   one block per (query block, batch x head), over the key blocks of the forward:
//       dq += dS K + dS_band r_band, dS_band being dS read back in band order (the gradient of
//       the skewed read); each warp sums over its 32 keys, the two halves are added at the end.
// dr:   one block per (block diagonal e = query block - key block, batch x head): all tiles of a
//       diagonal read the same band of r rows, so the band's gradient, dS_band^T (q + vb)
//       [128 x D], and the band sums of dS (for dvb) accumulate in registers over the diagonal.
//       Python folds the diagonals' overlapping bands into dr (effattn.ops.cuda.fold_bands).
#pragma once

#include "cuda/xl_common.cuh"

namespace effattn {
namespace cuda {

template <class E, int D>
struct XlBackwardBase {
  static constexpr int kThreads = 256;
  static constexpr int kWarps = 8;
  static constexpr int kLd = D + 8;
  static constexpr int kTile = kXlBlock * kLd;
  using Scratch = XlScratch<4>;
  // q + u, q + vb, dO, K, V tiles; the r band; the band scratch of 8 warps; lse (base 2) and
  // delta of the 64 query rows (fp32); their row flags.
  static constexpr int kBaseBytes = (5 * kTile + kXlBand * kLd) * 2 +
                                    kWarps * Scratch::kFloats * 4 + 2 * kXlBlock * 4 + kXlBlock;

  struct Smem {
    uint16_t *qu, *qv, *dout, *k, *v, *r;
    float* scratch;  // per warp; reused by dkdv (P, dS) and dr (dS) between barriers
    float *lse2, *delta;
    uint8_t* row_ok;
    unsigned char* extra;  // kernel-specific, past the base
  };

  static EFFATTN_DEVICE Smem carve(unsigned char* smem) {
    Smem s;
    s.qu = reinterpret_cast<uint16_t*>(smem);
    s.qv = s.qu + kTile;
    s.dout = s.qv + kTile;
    s.k = s.dout + kTile;
    s.v = s.k + kTile;
    s.r = s.v + kTile;
    s.scratch = reinterpret_cast<float*>(s.r + kXlBand * kLd);
    s.lse2 = s.scratch + kWarps * Scratch::kFloats;
    s.delta = s.lse2 + kXlBlock;
    s.row_ok = reinterpret_cast<uint8_t*>(s.delta + kXlBlock);
    s.extra = s.row_ok + kXlBlock;
    return s;
  }

  // Issues the copies of the query-side tiles of query block i0 of head bh: q (raw, into s.qu)
  // and dO; and records lse / delta of its rows. The caller commits, waits and synchronizes,
  // then calls add_biases.
  static EFFATTN_DEVICE void load_queries(const XlParams& p, const Smem& s, int bh, int i0) {
    const auto* Q = reinterpret_cast<const uint16_t*>(p.q) + static_cast<int64_t>(bh) * p.n_q * D;
    const auto* DO =
        reinterpret_cast<const uint16_t*>(p.dout) + static_cast<int64_t>(bh) * p.n_q * D;
    load_tile_async<kXlBlock, D, kThreads>(s.qu, kLd, Q, D, i0, p.n_q);
    load_tile_async<kXlBlock, D, kThreads>(s.dout, kLd, DO, D, i0, p.n_q);
    const int tid = dev::thread_id();
    if (tid < kXlBlock) {
      const int r = i0 + tid;
      const int64_t at = static_cast<int64_t>(bh) * p.n_q + r;
      const float x = r < p.n_q ? dev::gload(reinterpret_cast<const float*>(p.lse) + at) : 0.f;
      const bool ok = r < p.n_q && dev::finite(x);
      s.lse2[tid] = ok ? x * kLog2e : 0.f;
      s.delta[tid] = ok ? dev::gload(reinterpret_cast<const float*>(p.delta) + at) : 0.f;
      s.row_ok[tid] = ok;
    }
  }

  static EFFATTN_DEVICE void add_biases(const XlParams& p, const Smem& s, int h, int i0) {
    cuda::add_biases<E, D, kThreads>(s.qu, s.qv, kLd,
                                     reinterpret_cast<const uint16_t*>(p.u) + h * D,
                                     reinterpret_cast<const uint16_t*>(p.vb) + h * D, i0, p.n_q);
  }

  // Score phase of this warp for the tile (i0, j0): P and dS / scale of its [16 x 32] sub-tile.
  static EFFATTN_DEVICE void probs(const XlParams& p, const Smem& s, int i0, int j0,
                                   float (&pr)[4][4], float (&ds)[4][4]) {
    const int warp = dev::thread_id() >> 5, lane = dev::thread_id() & 31;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = 16 * (warp % 4), c0 = 32 * (warp / 4);
    xl_scores<E, D, 4>(pr, s.qu, s.qv, s.k, s.r, s.scratch + warp * Scratch::kFloats, r0, c0);
    zero(ds);
    mma_smem_nt<E, D, 32>(ds, s.dout + r0 * kLd, kLd, s.v + c0 * kLd, kLd);
    const int mem = p.n_k - p.n_q;
    EFFATTN_UNROLL
    for (int nt = 0; nt < 4; ++nt) {
      EFFATTN_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int a = r0 + g + 8 * (e >> 1), c = c0 + 8 * nt + 2 * t + (e & 1);
        const bool ok = s.row_ok[a] && xl_allowed(mem, i0 + a, j0 + c, p.window, p.n_k);
        const float x = ok ? dev::fast_exp2(pr[nt][e] * p.scale_log2 - s.lse2[a]) : 0.f;
        pr[nt][e] = x;
        ds[nt][e] = x * (ds[nt][e] - s.delta[a]);
      }
    }
  }
};

template <class E, int D>
struct XlBackwardDkDv : XlBackwardBase<E, D> {
  using Base = XlBackwardBase<E, D>;
  using Base::kLd;
  using Base::kThreads;
  static constexpr int kPLd = kXlBlock + 8;  // P and dS tiles [64 queries x 64 keys], 16-bit
  // Base, then the per-row-group column sums of dS [4 x 64] (fp32). P and dS use the scratch.
  static constexpr int kSmemBytes = Base::kBaseBytes + 4 * kXlBlock * 4;
  static_assert(2 * kXlBlock * kPLd * 2 <= Base::kWarps * Base::Scratch::kFloats * 4,
                "P and dS must fit in the scratch");

  static EFFATTN_DEVICE void run(const XlParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    const typename Base::Smem s = Base::carve(smem);
    uint16_t* sP = reinterpret_cast<uint16_t*>(s.scratch);
    uint16_t* sDS = sP + kXlBlock * kPLd;
    float* sCol = reinterpret_cast<float*>(s.extra);  // [4][64]

    const int tid = dev::thread_id(), warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int kb = dev::block_x();
    const int b = dev::block_y() / p.kv_heads, hk = dev::block_y() % p.kv_heads;
    const int group = p.heads / p.kv_heads;
    const int mem = p.n_k - p.n_q;
    const int j0 = kb * kXlBlock;
    const int rg = warp % 4, kh = warp / 4;
    const int kr = 16 * rg;             // GEMM phase: this warp's keys kr .. kr + 15
    const int d0 = kh * (D / 2);        // and head-dim columns d0 .. d0 + D/2 - 1
    const int64_t kv_row0 = static_cast<int64_t>(dev::block_y()) * p.n_k;

    load_tile_async<kXlBlock, D, kThreads>(
        s.k, kLd, reinterpret_cast<const uint16_t*>(p.k) + kv_row0 * D, D, j0, p.n_k);
    load_tile_async<kXlBlock, D, kThreads>(
        s.v, kLd, reinterpret_cast<const uint16_t*>(p.v) + kv_row0 * D, D, j0, p.n_k);
    dev::cp_async_commit();

    float dk[D / 16][4], dv[D / 16][4];
    zero(dk);
    zero(dv);
    float colsum = 0.f;  // thread tid < 64: key j0 + tid, current head
    // Queries reaching this key block: 0 <= M + i - j < window for some j in it.
    const int lo = dev::imax(j0 - mem, 0) / kXlBlock * kXlBlock;
    const int hi = dev::imin(j0 + kXlBlock - 1 - mem + p.window, p.n_q);
    for (int gi = 0; gi < group; ++gi) {
      const int h = hk * group + gi;
      const int bh = b * p.heads + h;
      for (int i0 = lo; i0 < hi; i0 += kXlBlock) {
        dev::sync_block();  // the previous step is done with every shared buffer
        Base::load_queries(p, s, bh, i0);
        load_band_async<D, kThreads>(s.r, kLd,
                                     reinterpret_cast<const uint16_t*>(p.r) +
                                         static_cast<int64_t>(h) * p.n_r * D,
                                     mem + i0 - j0 - (kXlBlock - 1), p.n_r);
        dev::cp_async_commit();
        dev::cp_async_wait<0>();
        dev::sync_block();
        Base::add_biases(p, s, h, i0);
        dev::sync_block();

        float pr[4][4], ds[4][4];
        Base::probs(p, s, i0, j0, pr, ds);
        const int r0 = 16 * rg, c0 = 32 * kh;
        // Column sums of this warp's 16 rows of dS, per key.
        EFFATTN_UNROLL
        for (int nt = 0; nt < 4; ++nt) {
          EFFATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            const float cs = dev::column_sum(ds[nt][e] + ds[nt][e + 2]);
            if (g == 0) sCol[rg * kXlBlock + c0 + 8 * nt + 2 * t + e] = cs;
          }
        }
        dev::sync_block();  // every warp is done with the scratch, which now takes P and dS
        EFFATTN_UNROLL
        for (int nt = 0; nt < 4; ++nt) {
          EFFATTN_UNROLL
          for (int i = 0; i < 2; ++i) {
            const int at = (r0 + g + 8 * i) * kPLd + c0 + 8 * nt + 2 * t;
            *reinterpret_cast<uint32_t*>(sP + at) =
                dev::pack2<E>(pr[nt][2 * i], pr[nt][2 * i + 1]);
            *reinterpret_cast<uint32_t*>(sDS + at) =
                dev::pack2<E>(ds[nt][2 * i], ds[nt][2 * i + 1]);
          }
        }
        dev::sync_block();

        // dv += P^T dO and dk += dS^T (q + u) for keys kr.., columns d0..: A = P^T (resp. dS^T)
        // read transposed from the [queries x keys] tiles.
        uint32_t a[4][4];
        EFFATTN_UNROLL
        for (int kk = 0; kk < 4; ++kk) load_a_trans(a[kk], sP + kr, kPLd, kk * 16);
        mma_reg_nn<E, 64, D / 2>(dv, a, s.dout + d0, kLd);
        EFFATTN_UNROLL
        for (int kk = 0; kk < 4; ++kk) load_a_trans(a[kk], sDS + kr, kPLd, kk * 16);
        mma_reg_nn<E, 64, D / 2>(dk, a, s.qu + d0, kLd);
        if (tid < kXlBlock) {
          colsum += (sCol[tid] + sCol[kXlBlock + tid]) +
                    (sCol[2 * kXlBlock + tid] + sCol[3 * kXlBlock + tid]);
        }
      }
      if (tid < kXlBlock && j0 + tid < p.n_k) {
        float* dst = reinterpret_cast<float*>(p.colsum) + static_cast<int64_t>(bh) * p.n_k;
        dev::gstore(dst + j0 + tid, colsum * p.scale);
      }
      colsum = 0.f;
    }
    dev::cp_async_wait<0>();  // K and V when no query block reached this key block

    float* dk_out = reinterpret_cast<float*>(p.dk) + kv_row0 * D + d0;
    float* dv_out = reinterpret_cast<float*>(p.dv) + kv_row0 * D + d0;
    store_rows_f32<D / 16>(dk, p.scale, dk_out, D, j0 + kr, p.n_k);
    store_rows_f32<D / 16>(dv, 1.f, dv_out, D, j0 + kr, p.n_k);
  }
};

template <class E, int D>
struct XlBackwardDq : XlBackwardBase<E, D> {
  using Base = XlBackwardBase<E, D>;
  using Base::kLd;
  using Base::kThreads;
  static constexpr int kSmemBytes = Base::kBaseBytes;

  static EFFATTN_DEVICE void run(const XlParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    const typename Base::Smem s = Base::carve(smem);
    const int tid = dev::thread_id(), warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int qb = dev::block_x(), bh = dev::block_y();
    const int h = bh % p.heads, b = bh / p.heads;
    const int64_t kv_row0 =
        (static_cast<int64_t>(b) * p.kv_heads + h / (p.heads / p.kv_heads)) * p.n_k;
    const int mem = p.n_k - p.n_q;
    const int i0 = qb * kXlBlock;
    const int rg = warp % 4, kh = warp / 4;
    const int r0 = 16 * rg, c0 = 32 * kh;
    float* scratch = s.scratch + warp * Base::Scratch::kFloats;
    constexpr int kSLd = Base::Scratch::kLd;

    Base::load_queries(p, s, bh, i0);
    dev::cp_async_commit();
    dev::cp_async_wait<0>();
    dev::sync_block();
    Base::add_biases(p, s, h, i0);

    float dq[D / 8][4];
    zero(dq);
    const int lo = dev::imax(mem + i0 - p.window + 1, 0) / kXlBlock * kXlBlock;
    const int hi = dev::imin(mem + i0 + kXlBlock, p.n_k);
    for (int j0 = lo; j0 < hi; j0 += kXlBlock) {
      dev::sync_block();  // previous block done with K, V, band (and the biases are added)
      load_tile_async<kXlBlock, D, kThreads>(
          s.k, kLd, reinterpret_cast<const uint16_t*>(p.k) + kv_row0 * D, D, j0, p.n_k);
      load_tile_async<kXlBlock, D, kThreads>(
          s.v, kLd, reinterpret_cast<const uint16_t*>(p.v) + kv_row0 * D, D, j0, p.n_k);
      load_band_async<D, kThreads>(
          s.r, kLd, reinterpret_cast<const uint16_t*>(p.r) + static_cast<int64_t>(h) * p.n_r * D,
          mem + i0 - j0 - (kXlBlock - 1), p.n_r);
      dev::cp_async_commit();
      dev::cp_async_wait<0>();
      dev::sync_block();

      float pr[4][4], ds[4][4];
      Base::probs(p, s, i0, j0, pr, ds);
      // Content part: dq += dS K over this warp's 32 keys.
      uint32_t a[2][4];
      acc_to_a<E, 32>(a, ds);
      mma_reg_nn<E, 32, D>(dq, a, s.k + c0 * kLd, kLd);
      // Position part: dS in band order, dS_band[a][t'] = dS[a][a - t' + 31] over the 48 band
      // rows t0 .. of this sub-tile (xl_scores), times those r rows.
      EFFATTN_UNROLL
      for (int nt = 0; nt < 4; ++nt) {
        EFFATTN_UNROLL
        for (int e = 0; e < 4; ++e)
          scratch[(g + 8 * (e >> 1)) * kSLd + 8 * nt + 2 * t + (e & 1)] = ds[nt][e];
      }
      dev::sync_warp();
      uint32_t band[3][4];
      EFFATTN_UNROLL
      for (int kk = 0; kk < 3; ++kk) {
        EFFATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i & 1);
          const int col = 16 * kk + 8 * (i >> 1) + 2 * t;  // band column t' (and t' + 1)
          const int c_lo = row - col + 31, c_hi = c_lo - 1;
          const float lo_v = c_lo >= 0 && c_lo < 32 ? scratch[row * kSLd + c_lo] : 0.f;
          const float hi_v = c_hi >= 0 && c_hi < 32 ? scratch[row * kSLd + c_hi] : 0.f;
          band[kk][i] = dev::pack2<E>(lo_v, hi_v);
        }
      }
      mma_reg_nn<E, 48, D>(dq, band, s.r + (r0 - c0 + 32) * kLd, kLd);
    }
    dev::cp_async_wait<0>();

    // The two warps of a row group hold partial sums over their halves of the keys.
    float* red = reinterpret_cast<float*>(s.k);  // [64 x D] fp32 over the K and V tiles
    dev::sync_block();
    if (kh == 1) {
      EFFATTN_UNROLL
      for (int dt = 0; dt < D / 8; ++dt) {
        EFFATTN_UNROLL
        for (int e = 0; e < 4; ++e)
          red[(r0 + g + 8 * (e >> 1)) * D + 8 * dt + 2 * t + (e & 1)] = dq[dt][e];
      }
    }
    dev::sync_block();
    if (kh == 0) {
      EFFATTN_UNROLL
      for (int dt = 0; dt < D / 8; ++dt) {
        EFFATTN_UNROLL
        for (int e = 0; e < 4; ++e)
          dq[dt][e] += red[(r0 + g + 8 * (e >> 1)) * D + 8 * dt + 2 * t + (e & 1)];
      }
      float* dst = reinterpret_cast<float*>(p.dq) + static_cast<int64_t>(bh) * p.n_q * D;
      store_rows_f32<D / 8>(dq, p.scale, dst, D, i0 + r0, p.n_q);
    }
  }
};

template <class E, int D>
struct XlBackwardDr : XlBackwardBase<E, D> {
  using Base = XlBackwardBase<E, D>;
  using Base::kLd;
  using Base::kThreads;
  static constexpr int kDsLd = kXlBlock + 4;  // fp32 dS tile [64 x 64] in the scratch
  static constexpr int kSmemBytes = Base::kBaseBytes;
  static_assert(kXlBlock * kDsLd * 4 <= Base::kWarps * Base::Scratch::kFloats * 4,
                "dS must fit in the scratch");

  static EFFATTN_DEVICE void run(const XlParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    const typename Base::Smem s = Base::carve(smem);
    float* sDS = s.scratch;
    const int tid = dev::thread_id(), warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int diag = p.first_diag + dev::block_x();  // query block - key block of every tile
    const int bh = dev::block_y();
    const int h = bh % p.heads, b = bh / p.heads;
    const int64_t kv_row0 =
        (static_cast<int64_t>(b) * p.kv_heads + h / (p.heads / p.kv_heads)) * p.n_k;
    const int mem = p.n_k - p.n_q;
    const int rg = warp % 4, kh = warp / 4;
    const int r0 = 16 * rg, c0 = 32 * kh;
    const int tb = 16 * warp;  // this warp's band rows tb .. tb + 15 of the gradient

    load_band_async<D, kThreads>(
        s.r, kLd, reinterpret_cast<const uint16_t*>(p.r) + static_cast<int64_t>(h) * p.n_r * D,
        mem + diag * kXlBlock - (kXlBlock - 1), p.n_r);
    dev::cp_async_commit();

    float grad[D / 8][4];
    zero(grad);
    float wsum[2] = {0.f, 0.f};
    const int n_qb = (p.n_q + kXlBlock - 1) / kXlBlock, n_kb = (p.n_k + kXlBlock - 1) / kXlBlock;
    for (int qb = dev::imax(diag, 0); qb < dev::imin(n_qb, n_kb + diag); ++qb) {
      const int i0 = qb * kXlBlock, j0 = (qb - diag) * kXlBlock;
      dev::sync_block();  // the previous tile is done with every shared buffer
      Base::load_queries(p, s, bh, i0);
      load_tile_async<kXlBlock, D, kThreads>(
          s.k, kLd, reinterpret_cast<const uint16_t*>(p.k) + kv_row0 * D, D, j0, p.n_k);
      load_tile_async<kXlBlock, D, kThreads>(
          s.v, kLd, reinterpret_cast<const uint16_t*>(p.v) + kv_row0 * D, D, j0, p.n_k);
      dev::cp_async_commit();
      dev::cp_async_wait<0>();
      dev::sync_block();
      Base::add_biases(p, s, h, i0);
      dev::sync_block();

      float pr[4][4], ds[4][4];
      Base::probs(p, s, i0, j0, pr, ds);
      dev::sync_block();  // every warp is done with the scratch, which now takes dS
      EFFATTN_UNROLL
      for (int nt = 0; nt < 4; ++nt) {
        EFFATTN_UNROLL
        for (int e = 0; e < 4; ++e)
          sDS[(r0 + g + 8 * (e >> 1)) * kDsLd + c0 + 8 * nt + 2 * t + (e & 1)] = ds[nt][e];
      }
      dev::sync_block();

      // grad[tb + x] += sum_a dS_band^T[tb + x][a] (q_a + vb), with dS_band^T[t][a] =
      // dS[a][a - t + 63]: A (band rows x tile rows) gathered from the dS tile.
      uint32_t a[4][4];
      EFFATTN_UNROLL
      for (int kk = 0; kk < 4; ++kk) {
        EFFATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int band_row = tb + g + 8 * (i & 1);
          const int row = 16 * kk + 8 * (i >> 1) + 2 * t;  // tile rows row, row + 1
          const int c_lo = row - band_row + 63, c_hi = c_lo + 1;
          const float lo_v = c_lo >= 0 && c_lo < kXlBlock ? sDS[row * kDsLd + c_lo] : 0.f;
          const float hi_v =
              c_hi >= 0 && c_hi < kXlBlock ? sDS[(row + 1) * kDsLd + c_hi] : 0.f;
          wsum[i & 1] += lo_v + hi_v;
          a[kk][i] = dev::pack2<E>(lo_v, hi_v);
        }
      }
      mma_reg_nn<E, 64, D>(grad, a, s.qv, kLd);
    }
    dev::cp_async_wait<0>();  // the band when the diagonal holds no tile

    const int64_t part = static_cast<int64_t>(bh) * dev::block_x_count() + dev::block_x();
    float* dst = reinterpret_cast<float*>(p.dr_part) + part * kXlBand * D;
    store_rows_f32<D / 8>(grad, p.scale, dst, D, tb, kXlBand);
    EFFATTN_UNROLL
    for (int i = 0; i < 2; ++i) {
      const float w = dev::quad_sum(wsum[i]);
      if (t == 0) {
        dev::gstore(reinterpret_cast<float*>(p.w_part) + part * kXlBand + tb + g + 8 * i,
                    w * p.scale);
      }
    }
  }
};

}  // namespace cuda
}  // namespace effattn
