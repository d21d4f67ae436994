// Bindings of the C++ CPU backend.  Kernels live in other csrc/cpu/*.cpp files (each is picked up
// by CMake's GLOB) and are bound here.
#include <algorithm>
#include <atomic>
#include <thread>

#include "cpu/parallel.h"
#include "register.h"

#ifdef EFFATTN_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace effattn {
namespace {

int default_threads() {
#ifdef EFFATTN_OPENMP
  return std::max(1, omp_get_max_threads());  // honours OMP_NUM_THREADS
#else
  return std::max(1u, std::thread::hardware_concurrency());
#endif
}

std::atomic<int> g_num_threads{0};  // 0: not set yet, use default_threads()

}  // namespace

int num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_threads();
}

void set_num_threads(int n) {
  if (n < 1) throw py::value_error("set_num_threads: n must be >= 1");
  g_num_threads.store(n, std::memory_order_relaxed);
}

void register_cpu(py::module_& m) {
  m.def("num_threads", &num_threads, "Threads used by the CPU kernels (>= 1).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the threads used by the CPU kernels' parallel loops.");
}

}  // namespace effattn
