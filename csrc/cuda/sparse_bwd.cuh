// Block-sparse flash attention backward: two kernels, no atomics, deterministic (launchers in
// sparse_bwd.cu). Both take the merged lse and delta = rowsum(dout * out) - dlse of the whole
// plan, so probabilities are exp(s - lse) and each part's gradients are its share of the full
// softmax's; rows whose lse is +-inf (no visible key, or rows kept only to fill a dense block)
// contribute nothing.
//
// dq:   one block per (query block, batch x head), over the forward layout: S = Q K^T,
//       dP = dO V^T, dS = P (dP - delta), dq += dS K; 4 warps x 16 query rows.
// dkdv: one block per (key block, batch x kv head), over the transposed layout, looping over the
//       query heads of its GQA group: S^T = K Q^T, dP^T = V dO^T, dv += P^T dO, dk += dS^T Q;
//       4 warps x 16 key rows. Query blocks go through in sub-blocks of QS rows, which bounds the
//       registers of S^T and dP^T next to the dk and dv accumulators.
#pragma once

#include "cuda/sparse_common.cuh"

namespace effattn {
namespace cuda {

template <class E, int D>
struct SparseBackwardDq {
  static constexpr int kThreads = 128;
  static constexpr int kLd = D + 8;
  static constexpr int kTile = kSparseBlock * kLd;
  // Q, dO, K x 2, V x 2 tiles, then the key flags of the two K / V buffers.
  static constexpr int kSmemBytes = 6 * kTile * 2 + 2 * kSparseBlock;

  static EFFATTN_DEVICE void run(const SparseParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
    uint16_t* sDO = sQ + kTile;
    uint16_t* sK = sDO + kTile;     // two buffers
    uint16_t* sV = sK + 2 * kTile;  // two buffers
    uint8_t* sKeyOk = reinterpret_cast<uint8_t*>(sV + 2 * kTile);  // [2][64]

    const int tid = dev::thread_id(), warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2;
    const int qb = p.num_q_blocks - 1 - dev::block_x();
    const int bh = dev::block_y();
    const int b = bh / p.heads, h = bh % p.heads;
    const int cls = h % p.num_classes, hk = h / (p.heads / p.kv_heads);
    const auto* Q = reinterpret_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh;
    const auto* DO = reinterpret_cast<const uint16_t*>(p.dout) + b * p.do_sb + h * p.do_sh;
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

    // This thread's two rows: lse in base 2 and delta, zeroed with the row switched off when it
    // is past n_q or its lse is not finite.
    const int row0 = qb * kSparseBlock + warp * 16;
    float lse2[2], delta[2];
    bool row_ok[2];
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + g + 8 * i;
      const int64_t at = static_cast<int64_t>(bh) * p.n_q + r;
      const float x = r < p.n_q ? dev::gload(reinterpret_cast<const float*>(p.lse) + at) : 0.f;
      row_ok[i] = r < p.n_q && dev::finite(x);
      lse2[i] = row_ok[i] ? x * kLog2e : 0.f;
      delta[i] = row_ok[i] ? dev::gload(reinterpret_cast<const float*>(p.delta) + at) : 0.f;
    }

    auto key_block = [&](int s) {
      return s < n_full ? dev::gload(full_idx + s) : dev::gload(part_idx + (s - n_full));
    };
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
    load_tile_async<kSparseBlock, D, kThreads>(sDO, kLd, DO, p.do_sn, qb * kSparseBlock, p.n_q);
    dev::cp_async_commit();
    if (total > 0) issue(0);
    dev::cp_async_commit();

    float dq[D / 8][4];
    zero(dq);
    for (int s = 0; s < total; ++s) {
      const int buf = s & 1;
      if (s + 1 < total) issue(s + 1);
      dev::cp_async_commit();
      dev::cp_async_wait<1>();
      dev::sync_block();

      const int kb = key_block(s);
      float sc[8][4], dp[8][4];
      zero(sc);
      zero(dp);
      mma_smem_nt<E, D, 64>(sc, sQ + warp * 16 * kLd, kLd, sK + buf * kTile, kLd);
      mma_smem_nt<E, D, 64>(dp, sDO + warp * 16 * kLd, kLd, sV + buf * kTile, kLd);
      const uint8_t* key_ok = sKeyOk + buf * kSparseBlock;
      uint32_t vis =
          fragment_bits<8>([&](int r, int c) { return row_ok[r >> 3] && key_ok[c] != 0; });
      if (s >= n_full) {
        const int tile = part_tile ? dev::gload(part_tile + (s - n_full)) : 0;
        vis &= pattern_bits<8, false>(p, cls, tile, row0, kb * kSparseBlock);
      }
      EFFATTN_UNROLL
      for (int nt = 0; nt < 8; ++nt) {
        EFFATTN_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const float pr =
              (vis >> (4 * nt + e)) & 1u ? dev::fast_exp2(sc[nt][e] * p.scale_log2 - lse2[i])
                                         : 0.f;
          sc[nt][e] = pr * (dp[nt][e] - delta[i]);  // dS / scale
        }
      }
      uint32_t ds[4][4];
      acc_to_a<E, 64>(ds, sc);
      mma_reg_nn<E, 64, D>(dq, ds, sK + buf * kTile, kLd);
      dev::sync_block();
    }
    dev::cp_async_wait<0>();

    float* dst = reinterpret_cast<float*>(p.dq) + static_cast<int64_t>(bh) * p.n_q * D;
    store_rows_f32<D / 8>(dq, p.scale, dst, D, row0, p.n_q);
  }
};

template <class E, int D>
struct SparseBackwardDkDv {
  static constexpr int kThreads = 128;
  static constexpr int kLd = D + 8;
  static constexpr int kTile = kSparseBlock * kLd;
  // Query rows per sub-block: with D = 128 the dk and dv accumulators take 128 registers.
  static constexpr int QS = D > 64 ? 32 : 64;
  // K, V, Q x 2, dO x 2 tiles; per buffer 64 lse and 64 delta (fp32), 64 row and 64 key
  // flags; per buffer the step's query block, class, partial flag and tile (int32).
  static constexpr int kSmemBytes =
      6 * kTile * 2 + 2 * 2 * kSparseBlock * 4 + 2 * 2 * kSparseBlock + 2 * 4 * 4;

  static EFFATTN_DEVICE void run(const SparseParams& p) {
    EFFATTN_DYNAMIC_SMEM(smem);
    uint16_t* sK = reinterpret_cast<uint16_t*>(smem);
    uint16_t* sV = sK + kTile;
    uint16_t* sQ = sV + kTile;       // two buffers
    uint16_t* sDO = sQ + 2 * kTile;  // two buffers
    float* sLse2 = reinterpret_cast<float*>(sDO + 2 * kTile);  // [2][64]
    float* sDelta = sLse2 + 2 * kSparseBlock;                   // [2][64]
    uint8_t* sRowOk = reinterpret_cast<uint8_t*>(sDelta + 2 * kSparseBlock);  // [2][64]
    uint8_t* sKeyOk = sRowOk + 2 * kSparseBlock;                              // [2][64]
    int32_t* sStep = reinterpret_cast<int32_t*>(sKeyOk + 2 * kSparseBlock);   // [2][4]

    const int tid = dev::thread_id(), warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int kb = dev::block_x();
    const int b = dev::block_y() / p.kv_heads, hk = dev::block_y() % p.kv_heads;
    const int group = p.heads / p.kv_heads;
    const auto* K = reinterpret_cast<const uint16_t*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const auto* V = reinterpret_cast<const uint16_t*>(p.v) + b * p.v_sb + hk * p.v_sh;
    const auto* full_num = reinterpret_cast<const int32_t*>(p.q_full_num);
    const auto* part_num = reinterpret_cast<const int32_t*>(p.q_part_num);

    // Steps: for each query head of the group, its full then its partial query blocks.
    int total = 0;
    for (int gi = 0; gi < group; ++gi) {
      const int64_t row = static_cast<int64_t>((hk * group + gi) % p.num_classes) *
                              p.num_k_blocks + kb;
      total += dev::gload(full_num + row) + dev::gload(part_num + row);
    }
    // Starts the loads of step s into buffer s % 2 and records the step in sStep[s % 2].
    auto issue = [&](int s) {
      const int buf = s & 1;
      int gi = 0, i = s;
      int64_t row = 0;
      int n_full = 0;
      for (;; ++gi) {
        row = static_cast<int64_t>((hk * group + gi) % p.num_classes) * p.num_k_blocks + kb;
        n_full = dev::gload(full_num + row);
        const int n = n_full + dev::gload(part_num + row);
        if (i < n) break;
        i -= n;
      }
      const int h = hk * group + gi;
      const bool partial = i >= n_full;
      const int qb =
          partial ? dev::gload(reinterpret_cast<const int32_t*>(p.q_part_idx) +
                               row * p.max_q_part + (i - n_full))
                  : dev::gload(reinterpret_cast<const int32_t*>(p.q_full_idx) +
                               row * p.max_q_full + i);
      const auto* Q = reinterpret_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh;
      const auto* DO = reinterpret_cast<const uint16_t*>(p.dout) + b * p.do_sb + h * p.do_sh;
      load_tile_async<kSparseBlock, D, kThreads>(sQ + buf * kTile, kLd, Q, p.q_sn,
                                                 qb * kSparseBlock, p.n_q);
      load_tile_async<kSparseBlock, D, kThreads>(sDO + buf * kTile, kLd, DO, p.do_sn,
                                                 qb * kSparseBlock, p.n_q);
      if (tid < kSparseBlock) {
        const int r = qb * kSparseBlock + tid;
        const int64_t at = (static_cast<int64_t>(b) * p.heads + h) * p.n_q + r;
        const float x = r < p.n_q ? dev::gload(reinterpret_cast<const float*>(p.lse) + at) : 0.f;
        const bool ok = r < p.n_q && dev::finite(x);
        sLse2[buf * kSparseBlock + tid] = ok ? x * kLog2e : 0.f;
        sDelta[buf * kSparseBlock + tid] =
            ok ? dev::gload(reinterpret_cast<const float*>(p.delta) + at) : 0.f;
        sRowOk[buf * kSparseBlock + tid] = ok;
      } else {
        const int j = kb * kSparseBlock + tid - kSparseBlock;
        bool ok = j < p.n_k;
        if (ok && p.key_mask) {
          ok = dev::gload(reinterpret_cast<const uint8_t*>(p.key_mask) + b * p.km_sb +
                          h * p.km_sh + j * p.km_sn) == 0;
        }
        sKeyOk[buf * kSparseBlock + tid - kSparseBlock] = ok;
      }
      if (tid == 0) {
        sStep[buf * 4 + 0] = qb;
        sStep[buf * 4 + 1] = h % p.num_classes;
        sStep[buf * 4 + 2] = partial;
        sStep[buf * 4 + 3] =
            partial && p.use_tiles
                ? dev::gload(reinterpret_cast<const int32_t*>(p.q_part_tile) +
                             row * p.max_q_part + (i - n_full))
                : 0;
      }
    };

    load_tile_async<kSparseBlock, D, kThreads>(sK, kLd, K, p.k_sn, kb * kSparseBlock, p.n_k);
    load_tile_async<kSparseBlock, D, kThreads>(sV, kLd, V, p.v_sn, kb * kSparseBlock, p.n_k);
    dev::cp_async_commit();
    if (total > 0) issue(0);
    dev::cp_async_commit();

    float dk[D / 8][4], dv[D / 8][4];
    zero(dk);
    zero(dv);
    const int key0 = kb * kSparseBlock + warp * 16;  // this warp's first key row
    for (int s = 0; s < total; ++s) {
      const int buf = s & 1;
      if (s + 1 < total) issue(s + 1);
      dev::cp_async_commit();
      dev::cp_async_wait<1>();
      dev::sync_block();

      const int qb = sStep[buf * 4 + 0], cls = sStep[buf * 4 + 1];
      const bool partial = sStep[buf * 4 + 2] != 0;
      const int tile = sStep[buf * 4 + 3];
      const uint16_t* q_tile = sQ + buf * kTile;
      const uint16_t* do_tile = sDO + buf * kTile;
      const bool key_ok[2] = {sKeyOk[buf * kSparseBlock + warp * 16 + g] != 0,
                              sKeyOk[buf * kSparseBlock + warp * 16 + g + 8] != 0};
      EFFATTN_UNROLL
      for (int sub = 0; sub < kSparseBlock / QS; ++sub) {
        const int c0 = sub * QS;  // first query row of the sub-block within the block
        float st[QS / 8][4], dpt[QS / 8][4];
        zero(st);
        zero(dpt);
        mma_smem_nt<E, D, QS>(st, sK + warp * 16 * kLd, kLd, q_tile + c0 * kLd, kLd);
        mma_smem_nt<E, D, QS>(dpt, sV + warp * 16 * kLd, kLd, do_tile + c0 * kLd, kLd);
        const uint8_t* row_ok = sRowOk + buf * kSparseBlock + c0;
        uint32_t vis = fragment_bits<QS / 8>(
            [&](int r, int c) { return key_ok[r >> 3] && row_ok[c] != 0; });
        if (partial) {
          vis &= pattern_bits<QS / 8, true>(p, cls, tile, key0, qb * kSparseBlock + c0);
        }
        const float* lse2 = sLse2 + buf * kSparseBlock + c0;
        const float* delta = sDelta + buf * kSparseBlock + c0;
        EFFATTN_UNROLL
        for (int nt = 0; nt < QS / 8; ++nt) {
          EFFATTN_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int c = 8 * nt + 2 * t + (e & 1);
            const float pr =
                (vis >> (4 * nt + e)) & 1u ? dev::fast_exp2(st[nt][e] * p.scale_log2 - lse2[c])
                                           : 0.f;
            st[nt][e] = pr;
            dpt[nt][e] = pr * (dpt[nt][e] - delta[c]);  // dS^T / scale
          }
        }
        uint32_t a[QS / 16][4];
        acc_to_a<E, QS>(a, st);
        mma_reg_nn<E, QS, D>(dv, a, do_tile + c0 * kLd, kLd);
        acc_to_a<E, QS>(a, dpt);
        mma_reg_nn<E, QS, D>(dk, a, q_tile + c0 * kLd, kLd);
      }
      dev::sync_block();
    }
    dev::cp_async_wait<0>();

    const int64_t head_row0 = (static_cast<int64_t>(b) * p.kv_heads + hk) * p.n_k;
    store_rows_f32<D / 8>(dk, p.scale, reinterpret_cast<float*>(p.dk) + head_row0 * D, D, key0,
                          p.n_k);
    store_rows_f32<D / 8>(dv, 1.f, reinterpret_cast<float*>(p.dv) + head_row0 * D, D, key0,
                          p.n_k);
  }
};

}  // namespace cuda
}  // namespace effattn
