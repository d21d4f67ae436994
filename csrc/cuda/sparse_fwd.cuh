// Block-sparse flash attention forward (the kernel; the launcher is in sparse_fwd.cu).
//
// One thread block of 4 warps per (query block of 64 rows, batch x head); warp w owns query rows
// 16w .. 16w + 15. It visits the layout's full key blocks (no pattern test) and then its partial
// ones (pattern on every element), each of 64 keys: S = Q K^T and P V on tensor cores
// (mma.m16n8k16, fp32 accumulation), online softmax in base 2 in registers. K and V tiles are
// double-buffered with cp.async: the next block is in flight while the current one is computed.
#pragma once

#include "cuda/sparse_common.cuh"

namespace effattn {
namespace cuda {

template <class E, int D>
struct SparseForward {
  static constexpr int kThreads = 128;
  static constexpr int kLd = D + 8;  // shared row stride (elements), see warp_mma.cuh
  static constexpr int kTile = kSparseBlock * kLd;
  // Q, K x 2, V x 2 tiles, then the key flags of the two K / V buffers.
  static constexpr int kSmemBytes = 5 * kTile * 2 + 2 * kSparseBlock;

  static EFFATTN_DEVICE void run(const SparseParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
    uint16_t* sK = sQ + kTile;      // two buffers
    uint16_t* sV = sK + 2 * kTile;  // two buffers
    uint8_t* sKeyOk = reinterpret_cast<uint8_t*>(sV + 2 * kTile);  // [2][64]: key visible

    const int tid = dev::thread_id(), warp = tid >> 5;
    // Last query blocks first: under causal-like patterns they visit the most key blocks.
    const int qb = p.num_q_blocks - 1 - dev::block_x();
    const int bh = dev::block_y();
    const int b = bh / p.heads, h = bh % p.heads;
    const int cls = h % p.num_classes, hk = h / (p.heads / p.kv_heads);
    const auto* Q = reinterpret_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh;
    const auto* K = reinterpret_cast<const uint16_t*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const auto* V = reinterpret_cast<const uint16_t*>(p.v) + b * p.v_sb + hk * p.v_sh;
    const uint8_t* km = p.key_mask ? reinterpret_cast<const uint8_t*>(p.key_mask) +
                                         b * p.km_sb + h * p.km_sh
                                   : nullptr;
    const int64_t row = static_cast<int64_t>(cls) * p.num_q_blocks + qb;
    const auto* full_idx = reinterpret_cast<const int32_t*>(p.kv_full_idx) + row * p.max_kv_full;
    const auto* part_idx = reinterpret_cast<const int32_t*>(p.kv_part_idx) + row * p.max_kv_part;
    const auto* part_tile =
        p.use_tiles ? reinterpret_cast<const int32_t*>(p.kv_part_tile) + row * p.max_kv_part
                    : nullptr;
    const int n_full = dev::gload(reinterpret_cast<const int32_t*>(p.kv_full_num) + row);
    const int total = n_full + dev::gload(reinterpret_cast<const int32_t*>(p.kv_part_num) + row);

    auto key_block = [&](int s) {
      return s < n_full ? dev::gload(full_idx + s) : dev::gload(part_idx + (s - n_full));
    };
    // Starts the loads of step s into buffer s % 2 (the caller commits).
    auto issue = [&](int s) {
      const int kb = key_block(s), buf = s & 1;
      load_tile_async<kSparseBlock, D, kThreads>(sK + buf * kTile, kLd, K, p.k_sn,
                                                 kb * kSparseBlock, p.n_k);
      load_tile_async<kSparseBlock, D, kThreads>(sV + buf * kTile, kLd, V, p.v_sn,
                                                 kb * kSparseBlock, p.n_k);
      if (tid < kSparseBlock) {
        const int j = kb * kSparseBlock + tid;
        bool ok = j < p.n_k;
        if (ok && km) ok = dev::gload(km + j * p.km_sn) == 0;
        sKeyOk[buf * kSparseBlock + tid] = ok;
      }
    };

    load_tile_async<kSparseBlock, D, kThreads>(sQ, kLd, Q, p.q_sn, qb * kSparseBlock, p.n_q);
    dev::cp_async_commit();
    if (total > 0) issue(0);
    dev::cp_async_commit();

    float o[D / 8][4];
    zero(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    for (int s = 0; s < total; ++s) {
      const int buf = s & 1;
      if (s + 1 < total) issue(s + 1);
      dev::cp_async_commit();
      dev::cp_async_wait<1>();  // all but the prefetch just issued
      dev::sync_block();

      const int kb = key_block(s);
      float sc[8][4];
      zero(sc);
      mma_smem_nt<E, D, 64>(sc, sQ + warp * 16 * kLd, kLd, sK + buf * kTile, kLd);
      const uint8_t* key_ok = sKeyOk + buf * kSparseBlock;
      uint32_t vis = fragment_bits<8>([&](int, int c) { return key_ok[c] != 0; });
      if (s >= n_full) {
        const int tile = part_tile ? dev::gload(part_tile + (s - n_full)) : 0;
        vis &= pattern_bits<8, false>(p, cls, tile, qb * kSparseBlock + warp * 16,
                                      kb * kSparseBlock);
      }
      uint32_t pa[4][4];
      online_softmax<E, 8, D / 8>(sc, vis, p.scale_log2, m, l, o, pa);
      mma_reg_nn<E, 64, D>(o, pa, sV + buf * kTile, kLd);
      dev::sync_block();  // buffer `buf` is refilled by the next iteration's prefetch
    }
    dev::cp_async_wait<0>();

    auto* out = reinterpret_cast<uint16_t*>(p.out) + b * p.o_sb + h * p.o_sh;
    float* lse = reinterpret_cast<float*>(p.lse) + static_cast<int64_t>(bh) * p.n_q;
    store_output<E, D / 8>(o, m, l, out, p.o_sn, lse, qb * kSparseBlock + warp * 16, p.n_q);
  }
};

}  // namespace cuda
}  // namespace effattn
