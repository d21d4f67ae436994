// Launching a kernel on the GPU. Each kernel is a struct Op (kThreads, kSmemBytes and a device
// function run(params)) with a __global__ entry point named effattn_<kernel><E, D> in the
// global namespace (EFFATTN_ENTRY), which keeps the names that ptxas and
// bench/compile_report.py print short; dynamic shared memory is opted in above 48 KiB.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/launch.h"

namespace effattn {
namespace cuda {

// Defines the entry point `name`<E, D> of kernel struct Op<E, D> taking a P. minBlocks = 1 lets
// ptxas use up to 255 registers per thread (the accumulators of D = 128 need them).
#define EFFATTN_ENTRY(name, Op, P)                                                          \
  template <class E, int D>                                                                 \
  __global__ void __launch_bounds__(::effattn::cuda::Op<E, D>::kThreads, 1) name(const P p) { \
    ::effattn::cuda::Op<E, D>::run(p);                                                      \
  }

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

template <class Op, class P>
void launch(void (*kernel)(P), const P& p, const Launch& l, const char* what) {
  check_geometry(l, Op::kThreads, Op::kSmemBytes, what);
  if (Op::kSmemBytes > 48 * 1024) {
    // Per device and kernel; cheap enough to repeat on every launch (the current device may
    // change between calls).
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    Op::kSmemBytes),
               what);
  }
  kernel<<<dim3(l.grid_x, l.grid_y), Op::kThreads, Op::kSmemBytes,
           reinterpret_cast<cudaStream_t>(l.stream)>>>(p);
  check_cuda(cudaGetLastError(), what);
}

}  // namespace cuda
}  // namespace effattn
