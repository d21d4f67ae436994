// Launcher of the Transformer-XL forward kernel (csrc/cuda/xl_fwd.cuh).
//
// Dynamic shared memory (for bench/compile_report.py): 4 tiles of 64 x (D + 8) and the 128-row
// band of 16-bit elements, plus the fp32 band scratch of 4 warps (16 x 84 each).
// effattn:dynamic-smem effattn_xl_fwd<[^>]*\b64> 76800
// effattn:dynamic-smem effattn_xl_fwd<[^>]*\b128> 125952
#include "cuda/gpu_launch.cuh"
#include "cuda/xl_fwd.cuh"

EFFATTN_ENTRY(effattn_xl_fwd, XlForward, effattn::cuda::XlParams)

namespace effattn {
namespace cuda {

void xl_forward(const XlParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "xl_forward", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<XlForward<E, D>>(&effattn_xl_fwd<E, D>, p, l, "xl_forward");
  });
}

}  // namespace cuda
}  // namespace effattn
