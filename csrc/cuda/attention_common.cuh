// Pieces shared by the attention kernels: score-fragment masks, the online softmax step of the
// forward kernels and the final normalisation and store.
//
// A warp's scores live in an accumulator tile float s[NT][4] of 16 rows x 8*NT columns (see
// warp_mma.cuh); its visibility is a bit mask, bit 4*nt + e for element s[nt][e], which sits at
// fragment row g + 8*(e >> 1), column 8*nt + 2t + (e & 1) (g = lane / 4, t = lane % 4).
#pragma once

#include "cuda/warp_mma.cuh"

namespace effattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Bits of the elements of a [16 x 8*NT] fragment for which allowed(row, column) holds.
template <int NT, class F>
EFFATTN_DEVICE uint32_t fragment_bits(F&& allowed) {
  static_assert(NT * 4 <= 32, "at most 32 elements per thread");
  const int lane = dev::thread_id() & 31;
  const int g = lane >> 2, t = lane & 3;
  uint32_t bits = 0;
  EFFATTN_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    EFFATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      if (allowed(g + 8 * (e >> 1), 8 * nt + 2 * t + (e & 1))) bits |= 1u << (4 * nt + e);
    }
  }
  return bits;
}

// One key block of the online softmax over a warp's 16 query rows (two per thread: g, g + 8).
// s: unscaled scores, visible where vis has a bit; m: running max of the base-2 scaled scores
// (-inf while nothing was visible); l: this thread's part of the running denominator; o: output
// accumulator, rescaled here. Returns the probabilities (not yet normalised) as A fragments
// for o += P V.
template <class E, int NT, int DT>
EFFATTN_DEVICE void online_softmax(float (&s)[NT][4], uint32_t vis, float scale_log2,
                                   float (&m)[2], float (&l)[2], float (&o)[DT][4],
                                   uint32_t (&p)[NT / 2][4]) {
  float mx[2] = {m[0], m[1]};
  EFFATTN_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    EFFATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const float x = (vis >> (4 * nt + e)) & 1u ? s[nt][e] * scale_log2 : -INFINITY;
      s[nt][e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  }
  float shift[2], alpha[2];
  EFFATTN_UNROLL
  for (int i = 0; i < 2; ++i) {
    mx[i] = dev::quad_max(mx[i]);
    // Rows with nothing visible yet keep m = -inf: shift by 0 so that exp2 gives 0, not NaN.
    shift[i] = mx[i] == -INFINITY ? 0.f : mx[i];
    alpha[i] = dev::fast_exp2(m[i] - shift[i]);
    m[i] = mx[i];
    l[i] *= alpha[i];
  }
  EFFATTN_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    EFFATTN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const float x = dev::fast_exp2(s[nt][e] - shift[e >> 1]);
      s[nt][e] = x;
      l[e >> 1] += x;
    }
  }
  EFFATTN_UNROLL
  for (int dt = 0; dt < DT; ++dt) {
    EFFATTN_UNROLL
    for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
  }
  acc_to_a<E, 8 * NT>(p, s);
}

// out[row] = o / l and lse[row] = (m + log2 l) ln 2 for the warp's rows row0 + g (+ 8) that are
// < n_rows; a row that saw no key gets 0 and -inf. `out` points at row 0 of this head (rows
// out_stride elements apart), `lse` at its fp32 row 0.
template <class E, int DT>
EFFATTN_DEVICE void store_output(const float (&o)[DT][4], const float (&m)[2], const float (&l)[2],
                                 uint16_t* out, int64_t out_stride, float* lse, int row0,
                                 int n_rows) {
  const int lane = dev::thread_id() & 31;
  const int g = lane >> 2, t = lane & 3;
  EFFATTN_UNROLL
  for (int i = 0; i < 2; ++i) {
    const float total = dev::quad_sum(l[i]);
    const int row = row0 + g + 8 * i;
    if (row >= n_rows) continue;
    const float inv = total > 0.f ? 1.f / total : 0.f;
    uint16_t* dst = out + row * out_stride + 2 * t;
    EFFATTN_UNROLL
    for (int dt = 0; dt < DT; ++dt) {
      dev::gstore(reinterpret_cast<uint32_t*>(dst + 8 * dt),
                  dev::pack2<E>(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv));
    }
    if (t == 0) dev::gstore(lse + row, total > 0.f ? (m[i] + log2f(total)) * kLn2 : -INFINITY);
  }
}

// Stores a warp's fp32 accumulator [16 x 8*DT] times `scale` into rows row0 + g (+ 8) < n_rows
// of an fp32 matrix with row stride ld (`dst` points at its row 0, first column).
template <int DT>
EFFATTN_DEVICE void store_rows_f32(const float (&acc)[DT][4], float scale, float* dst, int64_t ld,
                                   int row0, int n_rows) {
  const int lane = dev::thread_id() & 31;
  const int g = lane >> 2, t = lane & 3;
  EFFATTN_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + g + 8 * i;
    if (row >= n_rows) continue;
    float* d = dst + row * ld + 2 * t;
    EFFATTN_UNROLL
    for (int dt = 0; dt < DT; ++dt) {
      dev::gstore(d + 8 * dt, acc[dt][2 * i] * scale);
      dev::gstore(d + 8 * dt + 1, acc[dt][2 * i + 1] * scale);
    }
  }
}

}  // namespace cuda
}  // namespace effattn
