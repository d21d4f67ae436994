// The attention kernels compiled for AVX-512 (F, VL, BW, DQ) with FMA: 64-byte vectors, 32
// registers for the accumulator tiles.
// Only called after a runtime check of the CPU (dispatch.cpp).
#include "cpu/kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// Vectors only travel between always-inlined helpers (simd.h): no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EFFATTN_ISA avx512
#define EFFATTN_ISA_NAME "avx512"
#define EFFATTN_VEC_BYTES 64
#define EFFATTN_TILE_RS 8
#define EFFATTN_TILE_NVS 2
#define EFFATTN_TILE_RO 4
#define EFFATTN_TILE_NVO 4
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,f16c"))), \
                              apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,f16c")
// GCC ignores a target pragma it cannot parse (a warning only): this builtin exists only
// under the target, so such a build fails instead of silently running baseline code.
typedef float EffattnIsaCheck __attribute__((vector_size(64)));
__attribute__((used)) static EffattnIsaCheck effattn_isa_check(EffattnIsaCheck x) {
  return __builtin_ia32_rcp14ps512_mask(x, x, static_cast<unsigned short>(-1));
}
#endif
#include "cpu/attention_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#define EFFATTN_HAVE_ISA 1
#endif

namespace effattn {
namespace cpu {
Kernels kernels_avx512() {
#ifdef EFFATTN_HAVE_ISA
  return avx512::table();
#else
  return {"avx512", nullptr, nullptr, nullptr, nullptr};
#endif
}
}  // namespace cpu
}  // namespace effattn
