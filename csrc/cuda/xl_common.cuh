// Transformer-XL tiles: (q + u, q + vb) tiles, the band of r rows a tile's distances span, and
// the scores of a warp's sub-tile with the position term read skewed from the band product.
//
// Semantics (effattn.reference.xl_attention): with M = N - L memory positions, query i and key j
// are at distance d = M + i - j, allowed iff 0 <= d < window, and
//     S[i, j] = scale * ((q_i + u) . k_j + (q_i + vb) . r[min(d, R - 1)]).
// Query and key blocks are both 64 long, so the distances of the tile (i0.., j0..) are
// dmin .. dmin + 126 with dmin = M + i0 - j0 - 63: the tile needs the 128 r rows ("band")
// clamp(dmin + t, 0, R - 1), t = 0 .. 127 (clamping the row index is the clamp_len of the
// original), and element (a, c) of the tile reads band column t = a - c + 63.
#pragma once

#include "cuda/attention_common.cuh"
#include "cuda/params.h"

namespace effattn {
namespace cuda {

constexpr int kXlBlock = kBlock;
constexpr int kXlBand = 2 * kXlBlock;

// Scratch of one warp for the band product of a [16 x 8*NT] sub-tile: 16 rows of 8*NT + 16
// band columns (fp32), padded by 4 to spread the skewed reads over the banks.
template <int NT>
struct XlScratch {
  static constexpr int kCols = 8 * NT + 16;
  static constexpr int kLd = kCols + 4;
  static constexpr int kFloats = 16 * kLd;
};

EFFATTN_DEVICE bool xl_allowed(int mem, int i, int j, int window, int n_k) {
  const int d = mem + i - j;
  return d >= 0 && d < window && j < n_k;
}

// Issues the cp.async copies of the band: r rows clamp(dmin + t, 0, n_r - 1) for t < 128,
// into sR (stride ld). `r` points at this head's [n_r x D] rows.
template <int D, int THREADS>
EFFATTN_DEVICE void load_band_async(uint16_t* sR, int ld, const uint16_t* r, int dmin, int n_r) {
  constexpr int kChunksPerRow = D / 8;
  for (int c = dev::thread_id(); c < kXlBand * kChunksPerRow; c += THREADS) {
    const int t = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int row = dev::imin(dev::imax(dmin + t, 0), n_r - 1);
    dev::cp_async16(sR + t * ld + col, r + static_cast<int64_t>(row) * D + col, true);
  }
}

// sQu holds a raw Q tile (rows row0 .. of the segment, zero past n_rows); turns it into
// q + u in place and writes q + vb to sQv, rounded to E as the reference adds in the input
// dtype; rows past n_rows become zero. u, vb point at this head's D values. Every thread reads
// only the elements it writes: the caller synchronizes before (the Q copies landed) and after.
template <class E, int D, int THREADS>
EFFATTN_DEVICE void add_biases(uint16_t* sQu, uint16_t* sQv, int ld, const uint16_t* u,
                               const uint16_t* vb, int row0, int n_rows) {
  for (int x = dev::thread_id(); x < kXlBlock * D; x += THREADS) {
    const int row = x / D, col = x % D;
    const bool inside = row0 + row < n_rows;
    const float q = dev::to_float<E>(sQu[row * ld + col]);
    sQu[row * ld + col] =
        inside ? dev::from_float<E>(q + dev::to_float<E>(dev::gload(u + col))) : uint16_t(0);
    sQv[row * ld + col] =
        inside ? dev::from_float<E>(q + dev::to_float<E>(dev::gload(vb + col))) : uint16_t(0);
  }
}

// Unscaled scores of a warp's [16 x 8*NT] sub-tile: rows r0 .. r0 + 15 of the tile (sQu, sQv),
// keys c0 .. c0 + 8*NT - 1 (sK), band rows in sR (all [rows x D], stride D + 8):
//     s[a][c] = (q_a + u) . k_c + ((q_a + vb) . r_band[t])  at t = a - c + 63.
// The warp's elements need band columns t0 .. t0 + 8*NT + 14 with t0 = r0 - c0 - 8*NT + 64;
// their product with (q + vb) goes through `scratch` (XlScratch<NT>::kFloats, this warp's own)
// to be read skewed.
template <class E, int D, int NT>
EFFATTN_DEVICE void xl_scores(float (&s)[NT][4], const uint16_t* sQu, const uint16_t* sQv,
                              const uint16_t* sK, const uint16_t* sR, float* scratch, int r0,
                              int c0) {
  using Scratch = XlScratch<NT>;
  constexpr int kLd = D + 8;
  const int lane = dev::thread_id() & 31;
  const int g = lane >> 2, t = lane & 3;
  zero(s);
  mma_smem_nt<E, D, 8 * NT>(s, sQu + r0 * kLd, kLd, sK + c0 * kLd, kLd);
  const int t0 = r0 - c0 - 8 * NT + 64;
  {
    float band[Scratch::kCols / 8][4];
    zero(band);
    mma_smem_nt<E, D, Scratch::kCols>(band, sQv + r0 * kLd, kLd, sR + t0 * kLd, kLd);
    EFFATTN_UNROLL
    for (int nt = 0; nt < Scratch::kCols / 8; ++nt) {
      EFFATTN_UNROLL
      for (int e = 0; e < 4; ++e)
        scratch[(g + 8 * (e >> 1)) * Scratch::kLd + 8 * nt + 2 * t + (e & 1)] = band[nt][e];
    }
  }
  dev::sync_warp();
  EFFATTN_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    EFFATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int a = g + 8 * (e >> 1), c = 8 * nt + 2 * t + (e & 1);
      // Band column (r0 + a) - (c0 + c) + 63, relative to t0.
      s[nt][e] += scratch[a * Scratch::kLd + a - c + 8 * NT - 1];
    }
  }
  dev::sync_warp();  // the scratch is rewritten by the next call
}

}  // namespace cuda
}  // namespace effattn
