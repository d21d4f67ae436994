// Transformer-XL attention forward (the kernel; the launcher is in xl_fwd.cu).
//
// One thread block of 4 warps per (query block of 64 rows, batch x head); warp w owns query rows
// 16w .. 16w + 15. Only key blocks holding an allowed distance are visited: for the query block
// at i0, keys max(0, M + i0 - window + 1) .. M + i0 + 63. Per key block: the content scores
// (q + u) K^T, the band product (q + vb) r_band^T read skewed (xl_common.cuh), the online
// softmax and P V, all on tensor cores with fp32 accumulation. The K and r-band loads of a block
// are waited for before its scores, the V load only before P V.
#pragma once

#include "cuda/xl_common.cuh"

namespace effattn {
namespace cuda {

template <class E, int D>
struct XlForward {
  static constexpr int kThreads = 128;
  static constexpr int kLd = D + 8;
  static constexpr int kTile = kXlBlock * kLd;
  using Scratch = XlScratch<8>;
  // q + u, q + vb, K, V tiles; the 128-row r band; the band scratch of 4 warps.
  static constexpr int kSmemBytes = (4 * kTile + kXlBand * kLd) * 2 + 4 * Scratch::kFloats * 4;

  static EFFATTN_DEVICE void run(const XlParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    uint16_t* sQu = reinterpret_cast<uint16_t*>(smem);
    uint16_t* sQv = sQu + kTile;
    uint16_t* sK = sQv + kTile;
    uint16_t* sV = sK + kTile;
    uint16_t* sR = sV + kTile;
    float* scratch = reinterpret_cast<float*>(sR + kXlBand * kLd);

    const int tid = dev::thread_id(), warp = tid >> 5;
    const int qb = dev::block_x(), bh = dev::block_y();
    const int h = bh % p.heads, b = bh / p.heads;
    const int kv = b * p.kv_heads + h / (p.heads / p.kv_heads);
    const int mem = p.n_k - p.n_q;
    const int i0 = qb * kXlBlock;
    const auto* Q = reinterpret_cast<const uint16_t*>(p.q) + static_cast<int64_t>(bh) * p.n_q * D;
    const auto* K = reinterpret_cast<const uint16_t*>(p.k) + static_cast<int64_t>(kv) * p.n_k * D;
    const auto* V = reinterpret_cast<const uint16_t*>(p.v) + static_cast<int64_t>(kv) * p.n_k * D;
    const auto* R = reinterpret_cast<const uint16_t*>(p.r) + static_cast<int64_t>(h) * p.n_r * D;

    load_tile_async<kXlBlock, D, kThreads>(sQu, kLd, Q, D, i0, p.n_q);
    dev::cp_async_commit();
    dev::cp_async_wait<0>();
    dev::sync_block();
    add_biases<E, D, kThreads>(sQu, sQv, kLd, reinterpret_cast<const uint16_t*>(p.u) + h * D,
                               reinterpret_cast<const uint16_t*>(p.vb) + h * D, i0, p.n_q);

    float o[D / 8][4];
    zero(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int lo = dev::imax(mem + i0 - p.window + 1, 0) / kXlBlock * kXlBlock;
    const int hi = dev::imin(mem + i0 + kXlBlock, p.n_k);
    for (int j0 = lo; j0 < hi; j0 += kXlBlock) {
      dev::sync_block();  // the previous block is done with sK, sV, sR (and sQu, sQv are built)
      load_tile_async<kXlBlock, D, kThreads>(sK, kLd, K, D, j0, p.n_k);
      load_band_async<D, kThreads>(sR, kLd, R, mem + i0 - j0 - (kXlBlock - 1), p.n_r);
      dev::cp_async_commit();
      load_tile_async<kXlBlock, D, kThreads>(sV, kLd, V, D, j0, p.n_k);
      dev::cp_async_commit();
      dev::cp_async_wait<1>();  // K and the band
      dev::sync_block();

      float sc[8][4];
      xl_scores<E, D, 8>(sc, sQu, sQv, sK, sR, scratch + warp * Scratch::kFloats, warp * 16, 0);
      const int row0 = i0 + warp * 16;
      const uint32_t vis = fragment_bits<8>(
          [&](int r, int c) { return xl_allowed(mem, row0 + r, j0 + c, p.window, p.n_k); });
      uint32_t pa[4][4];
      online_softmax<E, 8, D / 8>(sc, vis, p.scale_log2, m, l, o, pa);
      dev::cp_async_wait<0>();  // V
      dev::sync_block();
      mma_reg_nn<E, 64, D>(o, pa, sV, kLd);
    }
    dev::cp_async_wait<0>();

    auto* out = reinterpret_cast<uint16_t*>(p.out) + static_cast<int64_t>(bh) * p.n_q * D;
    float* lse = reinterpret_cast<float*>(p.lse) + static_cast<int64_t>(bh) * p.n_q;
    store_output<E, D / 8>(o, m, l, out, D, lse, i0 + warp * 16, p.n_q);
  }
};

}  // namespace cuda
}  // namespace effattn
