// Launching a kernel "Op" (a struct with kThreads, kSmemBytes and a device function run(params))
// on the GPU: one __global__ entry point per Op, dynamic shared memory opted in above 48 KiB.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/launch.h"

namespace effattn {
namespace cuda {

template <class Op, class P>
__global__ void __launch_bounds__(Op::kThreads, 1) attention_kernel(const P p) {
  Op::run(p);
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

template <class Op, class P>
void launch(const P& p, const Launch& l, const char* what) {
  check_geometry(l, Op::kThreads, Op::kSmemBytes, what);
  auto* kernel = &attention_kernel<Op, P>;
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
