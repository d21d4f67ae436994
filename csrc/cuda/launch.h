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
// the kernels are compiled for fp16 / bf16 and D in {64, 128} (Python pads other head dims).
template <class F>
void dispatch(int dtype, int head_dim, const char* what, F&& f) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument(std::string(what) +
                                ": dtype code must be 0 (fp16) or 1 (bf16), got " +
                                std::to_string(dtype));
  }
  if (head_dim != 64 && head_dim != 128) {
    throw std::invalid_argument(std::string(what) + ": head_dim must be 64 or 128, got " +
                                std::to_string(head_dim));
  }
  if (dtype == kFloat16) {
    if (head_dim == 64) f(F16{}, D64{});
    else f(F16{}, D128{});
  } else {
    if (head_dim == 64) f(BF16{}, D64{});
    else f(BF16{}, D128{});
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
