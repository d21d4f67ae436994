// Launcher of the block-sparse forward kernel (csrc/cuda/sparse_fwd.cuh).
//
// Dynamic shared memory (for bench/compile_report.py): 5 tiles of 64 x (D + 8) 16-bit elements
// plus 2 x 64 key flags.
// effattn:dynamic-smem effattn_sparse_fwd<[^>]*\b64> 46208
// effattn:dynamic-smem effattn_sparse_fwd<[^>]*\b128> 87168
#include "cuda/gpu_launch.cuh"
#include "cuda/sparse_fwd.cuh"

EFFATTN_ENTRY(effattn_sparse_fwd, SparseForward, effattn::cuda::SparseParams)

namespace effattn {
namespace cuda {

void sparse_forward(const SparseParams& p, const Launch& l) {
  dispatch(p.dtype, p.head_dim, "sparse_forward", [&](auto e, auto d) {
    using E = decltype(e);
    constexpr int D = decltype(d)::value;
    launch<SparseForward<E, D>>(&effattn_sparse_fwd<E, D>, p, l, "sparse_forward");
  });
}

}  // namespace cuda
}  // namespace effattn
