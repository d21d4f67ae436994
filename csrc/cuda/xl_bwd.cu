// Launchers of the Transformer-XL backward kernels (csrc/cuda/xl_bwd.cuh).
//
// Dynamic shared memory (for bench/compile_report.py): 5 tiles of 64 x (D + 8) and the 128-row
// band of 16-bit elements, the fp32 band scratch of 8 warps (16 x 52 each), 64 lse and delta
// (fp32) and 64 row flags; dkdv adds 4 x 64 fp32 column sums.
// effattn:dynamic-smem effattn_xl_bwd_dq<[^>]*\b64> 91712
// effattn:dynamic-smem effattn_xl_bwd_dq<[^>]*\b128> 149056
// effattn:dynamic-smem effattn_xl_bwd_dr<[^>]*\b64> 91712
// effattn:dynamic-smem effattn_xl_bwd_dr<[^>]*\b128> 149056
// effattn:dynamic-smem effattn_xl_bwd_dkdv<[^>]*\b64> 92736
// effattn:dynamic-smem effattn_xl_bwd_dkdv<[^>]*\b128> 150080
#include "cuda/gpu_launch.cuh"
#include "cuda/xl_bwd.cuh"

EFFATTN_ENTRY(effattn_xl_bwd_dkdv, XlBackwardDkDv, effattn::cuda::XlParams)
EFFATTN_ENTRY(effattn_xl_bwd_dq, XlBackwardDq, effattn::cuda::XlParams)
EFFATTN_ENTRY(effattn_xl_bwd_dr, XlBackwardDr, effattn::cuda::XlParams)

namespace effattn {
namespace cuda {

void xl_backward_dkdv(const XlParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "xl_backward_dkdv", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<XlBackwardDkDv<E, D>>(&effattn_xl_bwd_dkdv<E, D>, p, l, "xl_backward_dkdv");
  });
}

void xl_backward_dq(const XlParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "xl_backward_dq", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<XlBackwardDq<E, D>>(&effattn_xl_bwd_dq<E, D>, p, l, "xl_backward_dq");
  });
}

void xl_backward_dr(const XlParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "xl_backward_dr", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<XlBackwardDr<E, D>>(&effattn_xl_bwd_dr<E, D>, p, l, "xl_backward_dr");
  });
}

}  // namespace cuda
}  // namespace effattn
