// Device primitives of the attention kernels: thread indices, barriers, warp shuffles, global
// loads and stores, cp.async, ldmatrix, mma.sync and 16-bit float conversions.
//
// The kernels (csrc/cuda/*.cuh) use nothing else, so that they compile two ways:
//   * by nvcc for sm_80+ (the real kernels), with the inline PTX below;
//   * by a host compiler with EFFATTN_EMULATE defined (csrc/cuda/emu/), where every primitive
//     is emulated per thread on the CPU with the semantics of the PTX ISA. The tests run the very
//     same kernel source that way on machines without a GPU.
//
// Elements of q, k, v, ... are handled as their 16-bit storage (uint16_t); the element type is a
// tag (F16 or BF16) that selects conversions and the mma variant.
#pragma once

#include <cstdint>

namespace effattn {
namespace cuda {
// Element type tags.
struct F16 {};
struct BF16 {};
}  // namespace cuda
}  // namespace effattn

#ifdef EFFATTN_EMULATE
#include "cuda/emu/emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace effattn {
namespace cuda {

#define EFFATTN_DEVICE __device__ __forceinline__
#define EFFATTN_UNROLL _Pragma("unroll")
#define EFFATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

namespace dev {

EFFATTN_DEVICE int thread_id() { return static_cast<int>(threadIdx.x); }
EFFATTN_DEVICE int block_x() { return static_cast<int>(blockIdx.x); }
EFFATTN_DEVICE int block_y() { return static_cast<int>(blockIdx.y); }
EFFATTN_DEVICE int block_x_count() { return static_cast<int>(gridDim.x); }
EFFATTN_DEVICE void sync_block() { __syncthreads(); }
EFFATTN_DEVICE void sync_warp() { __syncwarp(); }

// Reductions over the 4 lanes of a quad (lane ^ 1, lane ^ 2): the lanes that share the rows of an
// mma accumulator fragment.
EFFATTN_DEVICE float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
EFFATTN_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
// Sum over the 8 quads of a warp (lane ^ 4, ^ 8, ^ 16): lanes that share the columns.
EFFATTN_DEVICE float column_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

// Read-only global data (layouts, masks, lse): through the non-coherent cache.
template <class T>
EFFATTN_DEVICE T gload(const T* p) {
  return __ldg(p);
}
template <class T>
EFFATTN_DEVICE void gstore(T* p, T v) {
  *p = v;
}

EFFATTN_DEVICE unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read but
// must still be a valid address).
EFFATTN_DEVICE void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}
EFFATTN_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N committed groups of this thread are pending.
template <int N>
EFFATTN_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8m .. 8m+7 give the row addresses of matrix m, and register m of
// lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix m (.trans: row 2(l%4) and
// 2(l%4)+1 of column l/4, i.e. the transposed matrix).
EFFATTN_DEVICE void ldsm_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
EFFATTN_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// c[16 x 8] += a[16 x 16] b[16 x 8] in fp32 (fragment layouts of PTX's mma.m16n8k16).
template <class E>
EFFATTN_DEVICE void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
EFFATTN_DEVICE void mma16816<F16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
EFFATTN_DEVICE void mma16816<BF16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class E>
EFFATTN_DEVICE float to_float(uint16_t x);
template <>
EFFATTN_DEVICE float to_float<F16>(uint16_t x) {
  return __half2float(__ushort_as_half(x));
}
template <>
EFFATTN_DEVICE float to_float<BF16>(uint16_t x) {
  return __bfloat162float(__ushort_as_bfloat16(x));
}

template <class E>
EFFATTN_DEVICE uint16_t from_float(float x);
template <>
EFFATTN_DEVICE uint16_t from_float<F16>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
template <>
EFFATTN_DEVICE uint16_t from_float<BF16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Two floats rounded to E and packed, `lo` in the low half (the lower column of a fragment).
template <class E>
EFFATTN_DEVICE uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float<E>(lo)) |
         (static_cast<uint32_t>(from_float<E>(hi)) << 16);
}

// 2^x with the hardware approximation (relative error ~2^-22); 2^-inf = 0.
EFFATTN_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace dev
}  // namespace cuda
}  // namespace effattn

#endif  // EFFATTN_EMULATE

namespace effattn {
namespace cuda {
namespace dev {

EFFATTN_DEVICE int imin(int a, int b) { return a < b ? a : b; }
EFFATTN_DEVICE int imax(int a, int b) { return a > b ? a : b; }
// Neither infinite nor NaN.
EFFATTN_DEVICE bool finite(float x) { return fabsf(x) < INFINITY; }

}  // namespace dev
}  // namespace cuda
}  // namespace effattn
