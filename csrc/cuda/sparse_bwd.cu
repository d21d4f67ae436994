// Launchers of the block-sparse backward kernels (csrc/cuda/sparse_bwd.cuh).
//
// Dynamic shared memory (for bench/compile_report.py):
//   dq:   6 tiles of 64 x (D + 8) 16-bit elements plus 2 x 64 key flags;
//   dkdv: 6 tiles, 2 x 64 lse and 2 x 64 delta (fp32), 2 x 64 row and key flags, 2 x 4 int32.
// effattn:dynamic-smem effattn_sparse_bwd_dq<[^>]*\b64> 55424
// effattn:dynamic-smem effattn_sparse_bwd_dq<[^>]*\b128> 104576
// effattn:dynamic-smem effattn_sparse_bwd_dkdv<[^>]*\b64> 56608
// effattn:dynamic-smem effattn_sparse_bwd_dkdv<[^>]*\b128> 105760
#include "cuda/gpu_launch.cuh"
#include "cuda/sparse_bwd.cuh"

EFFATTN_ENTRY(effattn_sparse_bwd_dq, SparseBackwardDq, effattn::cuda::SparseParams)
EFFATTN_ENTRY(effattn_sparse_bwd_dkdv, SparseBackwardDkDv, effattn::cuda::SparseParams)

namespace effattn {
namespace cuda {

void sparse_backward_dq(const SparseParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "sparse_backward_dq", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<SparseBackwardDq<E, D>>(&effattn_sparse_bwd_dq<E, D>, p, l, "sparse_backward_dq");
  });
}

void sparse_backward_dkdv(const SparseParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "sparse_backward_dkdv", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<SparseBackwardDkDv<E, D>>(&effattn_sparse_bwd_dkdv<E, D>, p, l,
                                     "sparse_backward_dkdv");
  });
}

}  // namespace cuda
}  // namespace effattn
