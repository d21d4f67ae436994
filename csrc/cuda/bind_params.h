// pybind11 classes of the parameter blocks of params.h, shared by the extension's CUDA bindings
// (register_cuda.cpp) and the host emulator module of the tests (emu/module.cpp), so that
// effattn/ops/cuda.py fills both the same way.
#pragma once

#include <pybind11/pybind11.h>

#include "cuda/params.h"

namespace effattn {
namespace cuda {

inline void bind_params(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Launch>(m, "CudaLaunch", "Grid, block, shared memory and stream of a kernel launch.")
      .def(py::init<>())
      .def_readwrite("grid_x", &Launch::grid_x)
      .def_readwrite("grid_y", &Launch::grid_y)
      .def_readwrite("threads", &Launch::threads)
      .def_readwrite("smem_bytes", &Launch::smem_bytes)
      .def_readwrite("stream", &Launch::stream);

#define EFFATTN_FIELD(name) .def_readwrite(#name, &SparseParams::name)
  py::class_<SparseParams>(m, "CudaSparseParams", "Arguments of the block-sparse kernels.")
      .def(py::init<>())
      EFFATTN_FIELD(q) EFFATTN_FIELD(k) EFFATTN_FIELD(v) EFFATTN_FIELD(out) EFFATTN_FIELD(dout)
      EFFATTN_FIELD(q_sb) EFFATTN_FIELD(q_sh) EFFATTN_FIELD(q_sn)
      EFFATTN_FIELD(k_sb) EFFATTN_FIELD(k_sh) EFFATTN_FIELD(k_sn)
      EFFATTN_FIELD(v_sb) EFFATTN_FIELD(v_sh) EFFATTN_FIELD(v_sn)
      EFFATTN_FIELD(o_sb) EFFATTN_FIELD(o_sh) EFFATTN_FIELD(o_sn)
      EFFATTN_FIELD(do_sb) EFFATTN_FIELD(do_sh) EFFATTN_FIELD(do_sn)
      EFFATTN_FIELD(lse) EFFATTN_FIELD(delta) EFFATTN_FIELD(dq) EFFATTN_FIELD(dk)
      EFFATTN_FIELD(dv) EFFATTN_FIELD(key_mask)
      EFFATTN_FIELD(km_sb) EFFATTN_FIELD(km_sh) EFFATTN_FIELD(km_sn)
      EFFATTN_FIELD(kv_full_num) EFFATTN_FIELD(kv_full_idx) EFFATTN_FIELD(kv_part_num)
      EFFATTN_FIELD(kv_part_idx) EFFATTN_FIELD(kv_part_tile)
      EFFATTN_FIELD(q_full_num) EFFATTN_FIELD(q_full_idx) EFFATTN_FIELD(q_part_num)
      EFFATTN_FIELD(q_part_idx) EFFATTN_FIELD(q_part_tile)
      EFFATTN_FIELD(max_kv_full) EFFATTN_FIELD(max_kv_part) EFFATTN_FIELD(max_q_full)
      EFFATTN_FIELD(max_q_part) EFFATTN_FIELD(terms) EFFATTN_FIELD(tiles)
      EFFATTN_FIELD(num_terms) EFFATTN_FIELD(use_tiles)
      EFFATTN_FIELD(batch) EFFATTN_FIELD(heads) EFFATTN_FIELD(kv_heads)
      EFFATTN_FIELD(n_q) EFFATTN_FIELD(n_k) EFFATTN_FIELD(q_offset) EFFATTN_FIELD(head_dim)
      EFFATTN_FIELD(num_classes) EFFATTN_FIELD(num_q_blocks) EFFATTN_FIELD(num_k_blocks)
      EFFATTN_FIELD(dtype) EFFATTN_FIELD(scale) EFFATTN_FIELD(scale_log2);
#undef EFFATTN_FIELD

#define EFFATTN_FIELD(name) .def_readwrite(#name, &XlParams::name)
  py::class_<XlParams>(m, "CudaXlParams", "Arguments of the Transformer-XL kernels.")
      .def(py::init<>())
      EFFATTN_FIELD(q) EFFATTN_FIELD(k) EFFATTN_FIELD(v) EFFATTN_FIELD(r) EFFATTN_FIELD(u)
      EFFATTN_FIELD(vb) EFFATTN_FIELD(out) EFFATTN_FIELD(dout) EFFATTN_FIELD(lse)
      EFFATTN_FIELD(delta) EFFATTN_FIELD(dq) EFFATTN_FIELD(dk) EFFATTN_FIELD(dv)
      EFFATTN_FIELD(colsum) EFFATTN_FIELD(dr_part) EFFATTN_FIELD(w_part)
      EFFATTN_FIELD(batch) EFFATTN_FIELD(heads) EFFATTN_FIELD(kv_heads)
      EFFATTN_FIELD(n_q) EFFATTN_FIELD(n_k) EFFATTN_FIELD(n_r) EFFATTN_FIELD(head_dim)
      EFFATTN_FIELD(window) EFFATTN_FIELD(first_diag) EFFATTN_FIELD(dtype)
      EFFATTN_FIELD(scale) EFFATTN_FIELD(scale_log2);
#undef EFFATTN_FIELD
}

// Binds the launchers of params.h, each taking (params, launch): the real ones (csrc/cuda/*.cu)
// in the extension, the emulated ones in the emulator's module (csrc/cuda/emu/module.cpp).
inline void bind_launchers(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_sparse_forward", &sparse_forward, py::arg("params"), py::arg("launch"),
        "Block-sparse attention forward over one part (see effattn.ops.cuda).");
  m.def("cuda_sparse_backward_dq", &sparse_backward_dq, py::arg("params"), py::arg("launch"),
        "Block-sparse attention backward, dq.");
  m.def("cuda_sparse_backward_dkdv", &sparse_backward_dkdv, py::arg("params"),
        py::arg("launch"), "Block-sparse attention backward, dk and dv.");
  m.def("cuda_xl_forward", &xl_forward, py::arg("params"), py::arg("launch"),
        "Transformer-XL attention forward.");
  m.def("cuda_xl_backward_dkdv", &xl_backward_dkdv, py::arg("params"), py::arg("launch"),
        "Transformer-XL attention backward: dk, dv and the column sums of dS.");
  m.def("cuda_xl_backward_dq", &xl_backward_dq, py::arg("params"), py::arg("launch"),
        "Transformer-XL attention backward: dq.");
  m.def("cuda_xl_backward_dr", &xl_backward_dr, py::arg("params"), py::arg("launch"),
        "Transformer-XL attention backward: per-diagonal band gradients of r and band sums of dS.");
}

}  // namespace cuda
}  // namespace effattn
