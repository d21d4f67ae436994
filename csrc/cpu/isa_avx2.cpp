// The attention kernels compiled for AVX2 with FMA: 32-byte vectors, 16 registers.
// Only called after a runtime check of the CPU (dispatch.cpp).
#include "cpu/kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// Vectors only travel between always-inlined helpers (simd.h): no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EFFATTN_ISA avx2
#define EFFATTN_ISA_NAME "avx2"
#define EFFATTN_VEC_BYTES 32
#define EFFATTN_TILE_RS 4
#define EFFATTN_TILE_NVS 2
#define EFFATTN_TILE_RO 4
#define EFFATTN_TILE_NVO 2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,bmi2,f16c"))), \
                              apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
// GCC ignores a target pragma it cannot parse (a warning only): this builtin exists only
// under the target, so such a build fails instead of silently running baseline code.
typedef float EffattnIsaCheck __attribute__((vector_size(32)));
__attribute__((used)) static EffattnIsaCheck effattn_isa_check(EffattnIsaCheck x) {
  return __builtin_ia32_vfmaddps256(x, x, x);
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
Kernels kernels_avx2() {
#ifdef EFFATTN_HAVE_ISA
  return avx2::table();
#else
  return {"avx2", nullptr, nullptr, nullptr, nullptr};
#endif
}
}  // namespace cpu
}  // namespace effattn
