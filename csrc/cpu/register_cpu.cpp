// Bindings of the C++ CPU backend.
//
// Each kernel takes one argument object, CpuSparseArgs or CpuXlArgs: the fields of the structs
// of kernels.h (data pointers as ints, shapes, element strides as tuples), given by keyword when
// effattn/ops/cpu.py builds it. A required field left out or an unknown keyword raises
// TypeError, and each kernel raises ValueError when an output or input of its direction is
// absent; the values themselves are validated in Python, not here. The GIL is released while
// the kernels run.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "bind.h"
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

// The fields every kernel takes; each direction needs its own outputs and backward inputs.
template <class S>
std::vector<bind::Field<S>> attention_fields() {
  return {
      EFFATTN_FIELD(S, dtype, kRequired),  EFFATTN_FIELD(S, threads, kRequired),
      EFFATTN_FIELD(S, B, kRequired),      EFFATTN_FIELD(S, H, kRequired),
      EFFATTN_FIELD(S, Hkv, kRequired),    EFFATTN_FIELD(S, D, kRequired),
      EFFATTN_FIELD(S, q, kRequired),      EFFATTN_FIELD(S, k, kRequired),
      EFFATTN_FIELD(S, v, kRequired),      EFFATTN_FIELD(S, sq, kRequired),
      EFFATTN_FIELD(S, sk, kRequired),     EFFATTN_FIELD(S, sv, kRequired),
      EFFATTN_FIELD(S, scale, kRequired),  EFFATTN_FIELD(S, BM, kRequired),
      EFFATTN_FIELD(S, BN, kRequired),     EFFATTN_FIELD(S, out, kOptional),
      EFFATTN_FIELD(S, lse, kOptional),    EFFATTN_FIELD(S, dout, kOptional),
      EFFATTN_FIELD_WITH(S, sdo, dout),    EFFATTN_FIELD(S, lse_in, kOptional),
      EFFATTN_FIELD(S, delta, kOptional),  EFFATTN_FIELD(S, dq, kOptional),
      EFFATTN_FIELD(S, dk, kOptional),     EFFATTN_FIELD(S, dv, kOptional),
  };
}

std::vector<bind::Field<cpu::SparseArgs>> sparse_fields() {
  using S = cpu::SparseArgs;
  std::vector<bind::Field<S>> f = attention_fields<S>();
  f.insert(f.end(), {
      EFFATTN_FIELD(S, n_q, kRequired),          EFFATTN_FIELD(S, n_k, kRequired),
      EFFATTN_FIELD(S, key_mask, kOptional),     EFFATTN_FIELD_WITH(S, skm, key_mask),
      EFFATTN_FIELD_WITH(S, so, out),            EFFATTN_FIELD_WITH(S, sl, lse),
      EFFATTN_FIELD(S, join, kOptional),         EFFATTN_FIELD(S, q_offset, kRequired),
      EFFATTN_FIELD(S, P, kRequired),            EFFATTN_FIELD(S, nqb, kRequired),
      EFFATTN_FIELD(S, nkb, kRequired),          EFFATTN_FIELD(S, kv_full_num, kRequired),
      EFFATTN_FIELD(S, kv_full_idx, kRequired),  EFFATTN_FIELD(S, kv_part_num, kRequired),
      EFFATTN_FIELD(S, kv_part_idx, kRequired),  EFFATTN_FIELD_WITH(S, kv_part_tile, tiles),
      EFFATTN_FIELD(S, kv_full_w, kRequired),    EFFATTN_FIELD(S, kv_part_w, kRequired),
      EFFATTN_FIELD(S, q_full_num, kRequired),   EFFATTN_FIELD(S, q_full_idx, kRequired),
      EFFATTN_FIELD(S, q_part_num, kRequired),   EFFATTN_FIELD(S, q_part_idx, kRequired),
      EFFATTN_FIELD_WITH(S, q_part_tile, tiles), EFFATTN_FIELD(S, q_full_w, kRequired),
      EFFATTN_FIELD(S, q_part_w, kRequired),     EFFATTN_FIELD(S, terms, kOptional),
      EFFATTN_FIELD_WITH(S, num_terms, terms),   EFFATTN_FIELD(S, tiles, kOptional),
  });
  return f;
}

std::vector<bind::Field<cpu::XlArgs>> xl_fields() {
  using S = cpu::XlArgs;
  std::vector<bind::Field<S>> f = attention_fields<S>();
  f.insert(f.end(), {
      EFFATTN_FIELD(S, L, kRequired),   EFFATTN_FIELD(S, N, kRequired),
      EFFATTN_FIELD(S, R, kRequired),   EFFATTN_FIELD(S, window, kOptional),
      EFFATTN_FIELD(S, r, kRequired),   EFFATTN_FIELD(S, u, kRequired),
      EFFATTN_FIELD(S, vb, kRequired),  EFFATTN_FIELD(S, sr, kRequired),
      EFFATTN_FIELD(S, su, kRequired),  EFFATTN_FIELD(S, svb, kRequired),
      EFFATTN_FIELD(S, dr, kOptional),  EFFATTN_FIELD(S, du, kOptional),
      EFFATTN_FIELD(S, dvb, kOptional),
  });
  return f;
}

// What the constructors check beyond single fields: the codes the kernels dispatch on, and
// one predicate for partial blocks.
void check_attention(const cpu::AttentionArgs& a, const char* cls) {
  if (a.dtype != kFloat32 && a.dtype != kFloat64) {
    throw py::value_error(std::string(cls) + "(): dtype must be the code of float32 (" +
                          std::to_string(kFloat32) + ") or float64 (" + std::to_string(kFloat64) +
                          "), got " + std::to_string(a.dtype));
  }
  if (a.threads < 1) throw py::value_error(std::string(cls) + "(): threads must be >= 1");
}

void finish_sparse(cpu::SparseArgs& a) {
  check_attention(a, "CpuSparseArgs");
  if ((a.terms == nullptr) == (a.tiles == nullptr))
    throw py::value_error("CpuSparseArgs(): give exactly one of terms and tiles");
  if (a.terms != nullptr && a.num_terms < 1)
    throw py::value_error("CpuSparseArgs(): num_terms must be >= 1");
}

void finish_xl(cpu::XlArgs& a) { check_attention(a, "CpuXlArgs"); }

// The fields each direction reads or writes besides the inputs.
template <class Args>
void forward_needs(const Args& a, const char* what) {
  bind::need(a.out, what, "out");
  bind::need(a.lse, what, "lse");
}

template <class Args>
void backward_needs(const Args& a, const char* what) {
  bind::need(a.dout, what, "dout");
  bind::need(a.lse_in, what, "lse_in");
  bind::need(a.delta, what, "delta");
  bind::need(a.dq, what, "dq");
  bind::need(a.dk, what, "dk");
  bind::need(a.dv, what, "dv");
}

void xl_backward_needs(const cpu::XlArgs& a, const char* what) {
  backward_needs<cpu::XlArgs>(a, what);
  bind::need(a.dr, what, "dr");
  bind::need(a.du, what, "du");
  bind::need(a.dvb, what, "dvb");
}

// Binds one kernel of the table: (args, isa="") -> None, run without the GIL; isa names the
// instruction set ("" for the widest this CPU runs).
template <class Args>
void def_kernel(py::module_& m, const char* name, void (*cpu::Kernels::*kernel)(const Args&),
                void (*needs)(const Args&, const char*), const char* doc) {
  m.def(
      name,
      [name, kernel, needs](const Args& a, const std::string& isa) {
        needs(a, name);
        const cpu::Kernels k = cpu::select_kernels(isa);
        if (k.name == nullptr)
          throw py::value_error("CPU kernels for '" + isa + "' are not available");
        py::gil_scoped_release release;
        (k.*kernel)(a);
      },
      py::arg("args"), py::arg("isa") = "", doc);
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
  bind::struct_class(m, "CpuSparseArgs",
                     "Arguments of the block-sparse CPU kernels (csrc/cpu/kernels.h, SparseArgs).",
                     sparse_fields(), &finish_sparse);
  bind::struct_class(m, "CpuXlArgs",
                     "Arguments of the Transformer-XL CPU kernels (csrc/cpu/kernels.h, XlArgs).",
                     xl_fields(), &finish_xl);
  def_kernel(m, "cpu_sparse_forward", &cpu::Kernels::sparse_forward,
             &forward_needs<cpu::SparseArgs>,
             "Block-sparse attention forward of one plan part (see effattn.ops.cpu).");
  def_kernel(m, "cpu_sparse_backward", &cpu::Kernels::sparse_backward,
             &backward_needs<cpu::SparseArgs>, "Block-sparse attention backward of one plan part.");
  def_kernel(m, "cpu_xl_forward", &cpu::Kernels::xl_forward, &forward_needs<cpu::XlArgs>,
             "Transformer-XL attention forward.");
  def_kernel(m, "cpu_xl_backward", &cpu::Kernels::xl_backward, &xl_backward_needs,
             "Transformer-XL attention backward.");
}

}  // namespace effattn
