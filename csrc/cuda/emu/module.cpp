// effattn_cuda_emu: the CUDA kernels of csrc/cuda compiled for the host and run by the emulator
// of emulator.h, with the bindings of the real extension (same names, same parameter classes).
// Built by tests/test_cuda.py with the host compiler; never part of the installed package.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "bind.h"
#include "cuda/bind_params.h"
#include "cuda/launch.h"
#include "cuda/sparse_bwd.cuh"
#include "cuda/sparse_fwd.cuh"
#include "cuda/xl_bwd.cuh"
#include "cuda/xl_fwd.cuh"

namespace py = pybind11;

namespace effattn {
namespace cuda {
namespace {

std::vector<std::pair<uintptr_t, uintptr_t>> g_ranges;

template <class Op, class P>
void emulate(const P& p, const Launch& l, const char* what) {
  check_geometry(l, Op::kThreads, Op::kSmemBytes, what);
  const std::string err = emu::run(l.grid_x, l.grid_y, Op::kThreads, Op::kSmemBytes, g_ranges,
                                   [&p] { Op::run(p); });
  if (!err.empty()) throw std::runtime_error(std::string(what) + ": " + err);
}

}  // namespace

// The launchers of params.h, emulated: each dispatches like its GPU version in csrc/cuda/*.cu.
#define EFFATTN_EMULATED(fn, Op, P)                                                \
  void fn(const P& p, const Launch& l) {                                           \
    dispatch(p.dtype, p.head_dim, #fn, [&](auto e, auto d) {                        \
      emulate<Op<decltype(e), decltype(d)::value>>(p, l, #fn);                      \
    });                                                                            \
  }
EFFATTN_EMULATED(sparse_forward, SparseForward, SparseParams)
EFFATTN_EMULATED(sparse_backward_dq, SparseBackwardDq, SparseParams)
EFFATTN_EMULATED(sparse_backward_dkdv, SparseBackwardDkDv, SparseParams)
EFFATTN_EMULATED(xl_forward, XlForward, XlParams)
EFFATTN_EMULATED(xl_backward_dkdv, XlBackwardDkDv, XlParams)
EFFATTN_EMULATED(xl_backward_dq, XlBackwardDq, XlParams)
EFFATTN_EMULATED(xl_backward_dr, XlBackwardDr, XlParams)
#undef EFFATTN_EMULATED

}  // namespace cuda
}  // namespace effattn

PYBIND11_MODULE(effattn_cuda_emu, m) {
  m.doc() = "effattn's CUDA kernels run on the host by an emulator (tests only)";
  effattn::bind::export_constants(m);
  effattn::cuda::bind_params(m);
  effattn::cuda::bind_launchers(m);
  m.def(
      "emulator_ranges",
      [](std::vector<std::pair<uintptr_t, uintptr_t>> ranges) {
        effattn::cuda::g_ranges.clear();
        for (const auto& r : ranges)
          effattn::cuda::g_ranges.emplace_back(r.first, r.first + r.second);
      },
      py::arg("ranges"),
      "Buffers (address, bytes) the next launches may access; every other global access fails.");
}
