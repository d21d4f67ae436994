// The effattn._C extension module: build facts, the shared constants and the per-backend
// registrations.
#include <pybind11/pybind11.h>

#include "bind.h"
#include "register.h"

#ifndef EFFATTN_VERSION
#define EFFATTN_VERSION "0+unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "effattn native kernels (C++ CPU and, when built with EFFATTN_CUDA=1, CUDA C++)";

#ifdef EFFATTN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef EFFATTN_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif

  m.def("version", []() { return std::string(EFFATTN_VERSION); },
        "Version of effattn the extension was built from.");

  effattn::bind::export_constants(m);
  effattn::register_cpu(m);
#ifdef EFFATTN_WITH_CUDA
  effattn::register_cuda(m);
#endif
}
