// Warp-level tensor-core matrix products on shared-memory tiles, and tile loads.
//
// Shared tiles hold 16-bit elements row-major with a row stride of `ld` elements; the kernels pad
// rows by 8 elements (16 bytes), so the 8 row addresses of an ldmatrix fall in distinct banks, and
// keep every row start 16-byte aligned (ldmatrix and cp.async need it).
//
// Fragments (PTX mma.m16n8k16, g = lane / 4, t = lane % 4):
//   accumulator c[4] of a 16 x 8 tile: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8;
//   A a[4] of 16 x 16: a[0] row g, columns 2t, 2t+1; a[1] row g + 8; a[2], a[3] the same at
//   columns + 8;  B b0, b1 of 16 x 8: rows 2t, 2t+1 (b1: + 8), column g.
// An accumulator tile Acc[N / 8][4] covers 16 rows x N columns, n-tile by n-tile.
#pragma once

#include "cuda/device.cuh"

namespace effattn {
namespace cuda {

// acc[16 x N] += A B, A = 16 rows of sA ([16 x K], stride lda) and B = X^T for X = sB
// ([N x K], stride ldb): "A times the transpose of B" (Q K^T, dO V^T).
template <class E, int K, int N>
EFFATTN_DEVICE void mma_smem_nt(float (&acc)[N / 8][4], const uint16_t* sA, int lda,
                                const uint16_t* sB, int ldb) {
  static_assert(K % 16 == 0 && N % 16 == 0, "K and N must be multiples of 16");
  const int lane = dev::thread_id() & 31;
  const int r = lane & 7, m = lane >> 3;
  // Matrices 0..3 of the A load: (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7,
  // cols 8-15), (rows 8-15, cols 8-15) -> a[0..3]. Of the B load: rows n 0-7 / 8-15 (two
  // n-tiles) x columns k 0-7 / 8-15 -> (b0, b1) of n-tile 0, then of n-tile 1.
  const uint16_t* a_ptr = sA + (r + (m & 1) * 8) * lda + (m >> 1) * 8;
  const uint16_t* b_ptr = sB + (r + (m >> 1) * 8) * ldb + (m & 1) * 8;
  EFFATTN_UNROLL
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    dev::ldsm_x4(a, a_ptr + kk * 16);
    EFFATTN_UNROLL
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      dev::ldsm_x4(b, b_ptr + nn * 16 * ldb + kk * 16);
      dev::mma16816<E>(acc[2 * nn], a, b[0], b[1]);
      dev::mma16816<E>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x N] += A B with A in registers (K / 16 A fragments) and B = sB ([K x N], stride ldb)
// read transposed by ldmatrix (P V, dS K, P^T dO, ...).
template <class E, int K, int N>
EFFATTN_DEVICE void mma_reg_nn(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                               const uint16_t* sB, int ldb) {
  static_assert(K % 16 == 0 && N % 16 == 0, "K and N must be multiples of 16");
  const int lane = dev::thread_id() & 31;
  const int r = lane & 7, m = lane >> 3;
  // Matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), transposed
  // -> (b0, b1) of n-tile 0, then of n-tile 1.
  const uint16_t* b_ptr = sB + (r + (m & 1) * 8) * ldb + (m >> 1) * 8;
  EFFATTN_UNROLL
  for (int kk = 0; kk < K / 16; ++kk) {
    EFFATTN_UNROLL
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      dev::ldsm_x4_trans(b, b_ptr + kk * 16 * ldb + nn * 16);
      dev::mma16816<E>(acc[2 * nn], a[kk], b[0], b[1]);
      dev::mma16816<E>(acc[2 * nn + 1], a[kk], b[2], b[3]);
    }
  }
}

// One A fragment (16 x 16, columns k0 .. k0 + 15) read transposed from sT, a row-major [K x 16]
// tile holding A^T (A[m][k] = sT[k * ld + m]): the A operand of P^T dO when P sits in shared
// memory as [queries x keys].
EFFATTN_DEVICE void load_a_trans(uint32_t (&a)[4], const uint16_t* sT, int ld, int k0) {
  const int lane = dev::thread_id() & 31;
  const int r = lane & 7, m = lane >> 3;
  // a[0]: A rows 0-7, cols 0-7 = stored rows k 0-7, cols m 0-7; a[1]: A rows 8-15 = stored
  // cols 8-15; a[2]: A cols 8-15 = stored rows 8-15; a[3]: both.
  dev::ldsm_x4_trans(a, sT + (k0 + r + (m >> 1) * 8) * ld + (m & 1) * 8);
}

template <int N>
EFFATTN_DEVICE void zero(float (&acc)[N][4]) {
  EFFATTN_UNROLL
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// The accumulator of a [16 x N] product as the A operand of the next product (N = its K).
template <class E, int N>
EFFATTN_DEVICE void acc_to_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
  EFFATTN_UNROLL
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = dev::pack2<E>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = dev::pack2<E>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = dev::pack2<E>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = dev::pack2<E>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// Issues cp.async copies of rows row0 .. row0 + ROWS - 1 of a global [n_rows x D] matrix
// (`g` points at row 0, rows `stride` elements apart) into the tile s (stride lds); rows past
// n_rows are zero-filled. The caller commits and waits.
template <int ROWS, int D, int THREADS>
EFFATTN_DEVICE void load_tile_async(uint16_t* s, int lds, const uint16_t* g, int64_t stride,
                                    int row0, int n_rows) {
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  EFFATTN_UNROLL
  for (int c = dev::thread_id(); c < ROWS * kChunksPerRow; c += THREADS) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int row = row0 + r;
    const bool valid = row < n_rows;
    dev::cp_async16(s + r * lds + col, valid ? g + row * stride + col : g, valid);
  }
}

}  // namespace cuda
}  // namespace effattn
