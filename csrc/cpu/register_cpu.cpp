// Bindings of the C++ CPU backend.
//
// The kernels take one dict of plain ints per call (data pointers as ints, shapes, element
// strides as lists), built and validated by effattn/ops/cpu.py; missing keys raise KeyError.
// The GIL is released while they run.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "register.h"

#include <pybind11/stl.h>

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

int64_t get_int(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw py::key_error(std::string("missing argument '") + key + "'");
  return d[key].cast<int64_t>();
}

int64_t get_int(const py::dict& d, const char* key, int64_t fallback) {
  return d.contains(key) ? d[key].cast<int64_t>() : fallback;
}

template <class T>
T* get_ptr(const py::dict& d, const char* key) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(get_int(d, key, 0)));
}

void get_strides(const py::dict& d, const char* key, int64_t* out, size_t n) {
  if (!d.contains(key)) throw py::key_error(std::string("missing argument '") + key + "'");
  const auto s = d[key].cast<std::vector<int64_t>>();
  if (s.size() != n)
    throw py::value_error(std::string(key) + ": expected " + std::to_string(n) + " strides");
  std::copy(s.begin(), s.end(), out);
}

cpu::Kernels kernels_for(const py::dict& d) {
  const std::string isa = d.contains("isa") ? d["isa"].cast<std::string>() : "";
  const cpu::Kernels k = cpu::select_kernels(isa);
  if (k.name == nullptr) throw py::value_error("CPU kernels for '" + isa + "' are not available");
  return k;
}

// The fields every kernel takes (absent outputs and backward inputs stay null).
void attention_args(const py::dict& d, cpu::AttentionArgs& a) {
  a.dtype = static_cast<int>(get_int(d, "dtype"));
  a.threads = static_cast<int>(std::max<int64_t>(1, get_int(d, "threads")));
  a.B = get_int(d, "B");
  a.H = get_int(d, "H");
  a.Hkv = get_int(d, "Hkv");
  a.D = get_int(d, "D");
  a.q = get_ptr<const void>(d, "q");
  a.k = get_ptr<const void>(d, "k");
  a.v = get_ptr<const void>(d, "v");
  get_strides(d, "sq", a.sq, 4);
  get_strides(d, "sk", a.sk, 4);
  get_strides(d, "sv", a.sv, 4);
  a.scale = d["scale"].cast<double>();
  a.BM = get_int(d, "BM");
  a.BN = get_int(d, "BN");
  a.out = get_ptr<void>(d, "out");
  a.lse = get_ptr<void>(d, "lse");
  a.dout = get_ptr<const void>(d, "dout");
  if (a.dout) get_strides(d, "sdo", a.sdo, 4);
  a.lse_in = get_ptr<const void>(d, "lse_in");
  a.delta = get_ptr<const void>(d, "delta");
  a.dq = get_ptr<void>(d, "dq");
  a.dk = get_ptr<void>(d, "dk");
  a.dv = get_ptr<void>(d, "dv");
}

cpu::SparseArgs sparse_args(const py::dict& d) {
  cpu::SparseArgs a;
  attention_args(d, a);
  a.n_q = get_int(d, "n_q");
  a.n_k = get_int(d, "n_k");
  a.key_mask = get_ptr<const uint8_t>(d, "key_mask");
  if (a.key_mask) get_strides(d, "skm", a.skm, 3);
  if (a.out) {
    get_strides(d, "so", a.so, 3);
    get_strides(d, "sl", a.sl, 3);
    a.join = d.contains("join") && d["join"].cast<bool>();
  }
  a.q_offset = get_int(d, "q_offset");
  a.P = get_int(d, "P");
  a.nqb = get_int(d, "nqb");
  a.nkb = get_int(d, "nkb");
  a.kv_full_num = get_ptr<const int32_t>(d, "kv_full_num");
  a.kv_full_idx = get_ptr<const int32_t>(d, "kv_full_idx");
  a.kv_part_num = get_ptr<const int32_t>(d, "kv_part_num");
  a.kv_part_idx = get_ptr<const int32_t>(d, "kv_part_idx");
  a.kv_part_tile = get_ptr<const int32_t>(d, "kv_part_tile");
  a.kv_full_w = get_int(d, "kv_full_w");
  a.kv_part_w = get_int(d, "kv_part_w");
  a.q_full_num = get_ptr<const int32_t>(d, "q_full_num");
  a.q_full_idx = get_ptr<const int32_t>(d, "q_full_idx");
  a.q_part_num = get_ptr<const int32_t>(d, "q_part_num");
  a.q_part_idx = get_ptr<const int32_t>(d, "q_part_idx");
  a.q_part_tile = get_ptr<const int32_t>(d, "q_part_tile");
  a.q_full_w = get_int(d, "q_full_w");
  a.q_part_w = get_int(d, "q_part_w");
  a.terms = get_ptr<const int32_t>(d, "terms");
  a.num_terms = get_int(d, "num_terms", 0);
  a.tiles = get_ptr<const uint8_t>(d, "tiles");
  return a;
}

cpu::XlArgs xl_args(const py::dict& d) {
  cpu::XlArgs a;
  attention_args(d, a);
  a.L = get_int(d, "L");
  a.N = get_int(d, "N");
  a.R = get_int(d, "R");
  a.window = get_int(d, "window", 0);
  a.r = get_ptr<const void>(d, "r");
  a.u = get_ptr<const void>(d, "u");
  a.vb = get_ptr<const void>(d, "vb");
  get_strides(d, "sr", a.sr, 3);
  get_strides(d, "su", a.su, 2);
  get_strides(d, "svb", a.svb, 2);
  a.dr = get_ptr<void>(d, "dr");
  a.du = get_ptr<void>(d, "du");
  a.dvb = get_ptr<void>(d, "dvb");
  return a;
}

// Binds one kernel of the table: (args dict) -> None, parsed with the GIL held, run without.
template <class Args>
void def_kernel(py::module_& m, const char* name, Args (*parse)(const py::dict&),
                void (*cpu::Kernels::*kernel)(const Args&), const char* doc) {
  m.def(
      name,
      [parse, kernel](const py::dict& d) {
        const cpu::Kernels k = kernels_for(d);
        const Args a = parse(d);
        py::gil_scoped_release release;
        (k.*kernel)(a);
      },
      py::arg("args"), doc);
}

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
  m.def("num_threads", &num_threads, "Default thread count of the CPU kernels (>= 1).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Set the default thread count of the CPU kernels.");
  m.def(
      "cpu_isas",
      []() {
        std::vector<std::string> names;
        for (const cpu::Kernels& k : cpu::available_kernels()) names.emplace_back(k.name);
        return names;
      },
      "Instruction sets of the CPU kernels that run here, the default (widest) first.");
  def_kernel(m, "cpu_sparse_forward", &sparse_args, &cpu::Kernels::sparse_forward,
             "Block-sparse attention forward of one plan part (see effattn.ops.cpu).");
  def_kernel(m, "cpu_sparse_backward", &sparse_args, &cpu::Kernels::sparse_backward,
             "Block-sparse attention backward of one plan part.");
  def_kernel(m, "cpu_xl_forward", &xl_args, &cpu::Kernels::xl_forward,
             "Transformer-XL attention forward.");
  def_kernel(m, "cpu_xl_backward", &xl_args, &cpu::Kernels::xl_backward,
             "Transformer-XL attention backward.");
}

}  // namespace effattn
