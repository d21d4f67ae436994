// Host-side launch helpers shared by the GPU launchers (csrc/cuda/*.cu) and the emulator
// (csrc/cuda/emu/): dispatch on (dtype, head dim) and checks of the launch geometry that Python
// computed (effattn.ops.cuda.launch_geometry) against the kernel's own.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/device.cuh"
#include "cuda/params.h"

namespace effattn {
namespace cuda {

// Calls f(E{}, std::integral_constant<int, D>{}) for the element type and head dim of a call;
// the kernels are compiled for fp16 / bf16 and the two head dims of kHeadDims.
template <class F>
void dispatch(int dtype, int head_dim, const char* what, F&& f) {
  using Small = std::integral_constant<int, kHeadDims[0]>;
  using Large = std::integral_constant<int, kHeadDims[1]>;
  static_assert(sizeof(kHeadDims) == 2 * sizeof(int), "dispatch covers two head dims");
  if (dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument(std::string(what) + ": dtype code must be " +
                                std::to_string(kFloat16) + " (fp16) or " +
                                std::to_string(kBFloat16) + " (bf16), got " +
                                std::to_string(dtype));
  }
  if (head_dim != Small::value && head_dim != Large::value) {
    throw std::invalid_argument(std::string(what) + ": head_dim must be " +
                                std::to_string(Small::value) + " or " +
                                std::to_string(Large::value) + ", got " +
                                std::to_string(head_dim));
  }
  if (dtype == kFloat16) {
    if (head_dim == Small::value) f(F16{}, Small{});
    else f(F16{}, Large{});
  } else {
    if (head_dim == Small::value) f(BF16{}, Small{});
    else f(BF16{}, Large{});
  }
}

inline void check_geometry(const Launch& l, int threads, int smem_bytes, const char* what) {
  const std::string name(what);
  if (l.threads != threads) {
    throw std::invalid_argument(name + ": launch.threads = " + std::to_string(l.threads) +
                                ", the kernel runs " + std::to_string(threads));
  }
  if (l.smem_bytes != smem_bytes) {
    throw std::invalid_argument(name + ": launch.smem_bytes = " + std::to_string(l.smem_bytes) +
                                ", the kernel needs " + std::to_string(smem_bytes));
  }
  if (l.grid_x < 1 || l.grid_y < 1 || l.grid_y > 65535) {
    throw std::invalid_argument(name + ": grid (" + std::to_string(l.grid_x) + ", " +
                                std::to_string(l.grid_y) +
                                ") must have x >= 1 and 1 <= y <= 65535");
  }
}

}  // namespace cuda
}  // namespace effattn
