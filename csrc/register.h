// Registration hooks of the effattn._C pybind11 module.
//
// bindings.cpp defines the module and calls one register_* function per backend; each backend
// keeps its own bindings next to its kernels (csrc/cpu/, csrc/cuda/).  Bindings take raw data
// pointers (uintptr_t), shapes, strides, dtype codes and, for CUDA, a stream handle: the module
// never sees a torch::Tensor (see DESIGN.md, "The extension is independent of PyTorch's C++ ABI").
#pragma once

#include <pybind11/pybind11.h>

namespace effattn {

// csrc/cpu/register_cpu.cpp (always built).
void register_cpu(pybind11::module_& m);

#ifdef EFFATTN_WITH_CUDA
// csrc/cuda/register_cuda.cpp (built only with EFFATTN_CUDA=ON).
void register_cuda(pybind11::module_& m);
#endif

}  // namespace effattn
