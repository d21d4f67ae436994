// Plain C++ interface of the CUDA part: declared here without any CUDA or pybind11 header, defined
// in csrc/cuda/*.cu (compiled by nvcc), bound in csrc/cuda/register_cuda.cpp (host compiler).
// Streams cross this boundary as uintptr_t (torch.cuda.current_stream().cuda_stream).
#pragma once

namespace effattn {
namespace cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

// CUDA runtime version the extension was built with (e.g. 13000), from cudaRuntimeGetVersion.
int runtime_version();

// Shared memory a block of `device` may use after opting in
// (cudaDevAttrMaxSharedMemoryPerBlockOptin); throws std::runtime_error on a CUDA error.
int max_shared_memory_optin(int device);

}  // namespace cuda
}  // namespace effattn
