// Bindings of the CUDA C++ backend (built only with EFFATTN_CUDA=ON).  Compiled by the host
// compiler: the .cu files stay free of pybind11/Python headers and expose plain C++ launchers
// (params.h), called with raw device addresses, strides and the current stream's handle.
#include "cuda/bind_params.h"
#include "cuda/params.h"
#include "cuda/runtime.h"
#include "register.h"

namespace py = pybind11;

namespace effattn {

void register_cuda(py::module_& m) {
  m.def("cuda_device_count", &cuda::device_count,
        "Visible CUDA devices (0 when no driver or device is present).");
  m.def("cuda_runtime_version", &cuda::runtime_version,
        "CUDA runtime version the extension was built with (e.g. 13000).");
  m.def("cuda_max_shared_memory_optin", &cuda::max_shared_memory_optin, py::arg("device"),
        "Shared memory (bytes) a block may use on `device` after opting in.");
  cuda::bind_params(m);
  cuda::bind_launchers(m);
}

}  // namespace effattn
