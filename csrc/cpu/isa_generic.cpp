// The attention kernels for the compiler's baseline target (SSE2 on x86-64, NEON on aarch64):
// the fallback on any CPU, four registers per 64-byte vector on x86-64.
#include "cpu/kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors only travel between always-inlined helpers (simd.h): no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define EFFATTN_ISA generic
#define EFFATTN_ISA_NAME "generic"
#define EFFATTN_TILE_RS 2
#define EFFATTN_TILE_NVS 1
#define EFFATTN_TILE_RO 2
#define EFFATTN_TILE_NVO 1
#include "cpu/attention_impl.h"

namespace effattn {
namespace cpu {
Kernels kernels_generic() { return generic::table(); }
}  // namespace cpu
}  // namespace effattn
