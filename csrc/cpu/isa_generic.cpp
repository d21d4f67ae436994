// The attention kernels for the compiler's baseline target (SSE2 on x86-64, NEON on aarch64):
// 16-byte vectors, the fallback on any CPU.
#include "cpu/kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// Vectors only travel between always-inlined helpers (simd.h): no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define EFFATTN_ISA generic
#define EFFATTN_ISA_NAME "generic"
#define EFFATTN_VEC_BYTES 16
#define EFFATTN_TILE_RS 4
#define EFFATTN_TILE_NVS 2
#define EFFATTN_TILE_RO 4
#define EFFATTN_TILE_NVO 2
#include "cpu/attention_impl.h"

namespace effattn {
namespace cpu {
Kernels kernels_generic() { return generic::table(); }
}  // namespace cpu
}  // namespace effattn
