// Device queries of the CUDA part (see runtime.h).
#include <cuda_runtime.h>

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

}  // namespace cuda
}  // namespace effattn
