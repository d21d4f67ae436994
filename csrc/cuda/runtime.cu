// Device queries of the CUDA part (see runtime.h).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/runtime.h"

namespace effattn {
namespace cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // reset the runtime error state so later calls start clean
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int max_shared_memory_optin(int device) {
  int bytes = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin): ") +
                             cudaGetErrorString(err));
  }
  return bytes;
}

}  // namespace cuda
}  // namespace effattn
