// pybind11 classes of the parameter blocks of params.h and the bindings of their launchers,
// shared by the extension's CUDA bindings (register_cuda.cpp) and the host emulator module of
// the tests (emu/module.cpp), so that effattn/ops/cuda.py fills both the same way.
//
// Each class is built from keyword arguments only (csrc/bind.h): a required field left out or
// an unknown keyword raises TypeError, and each launcher raises ValueError when a buffer of its
// own (an output, the backward's dout and delta) is absent.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "bind.h"
#include "cuda/params.h"

namespace effattn {
namespace cuda {

inline std::vector<bind::Field<Launch>> launch_fields() {
  using S = Launch;
  return {
      EFFATTN_FIELD(S, grid_x, kRequired),     EFFATTN_FIELD(S, grid_y, kRequired),
      EFFATTN_FIELD(S, threads, kRequired),    EFFATTN_FIELD(S, smem_bytes, kRequired),
      EFFATTN_FIELD(S, stream, kRequired),
  };
}

inline std::vector<bind::Field<SparseParams>> sparse_fields() {
  using S = SparseParams;
  return {
      EFFATTN_FIELD(S, q, kRequired),             EFFATTN_FIELD(S, k, kRequired),
      EFFATTN_FIELD(S, v, kRequired),             EFFATTN_FIELD(S, out, kOptional),
      EFFATTN_FIELD(S, dout, kOptional),          EFFATTN_FIELD(S, q_sb, kRequired),
      EFFATTN_FIELD(S, q_sh, kRequired),          EFFATTN_FIELD(S, q_sn, kRequired),
      EFFATTN_FIELD(S, k_sb, kRequired),          EFFATTN_FIELD(S, k_sh, kRequired),
      EFFATTN_FIELD(S, k_sn, kRequired),          EFFATTN_FIELD(S, v_sb, kRequired),
      EFFATTN_FIELD(S, v_sh, kRequired),          EFFATTN_FIELD(S, v_sn, kRequired),
      EFFATTN_FIELD_WITH(S, o_sb, out),           EFFATTN_FIELD_WITH(S, o_sh, out),
      EFFATTN_FIELD_WITH(S, o_sn, out),           EFFATTN_FIELD_WITH(S, do_sb, dout),
      EFFATTN_FIELD_WITH(S, do_sh, dout),         EFFATTN_FIELD_WITH(S, do_sn, dout),
      EFFATTN_FIELD(S, lse, kRequired),           EFFATTN_FIELD(S, delta, kOptional),
      EFFATTN_FIELD(S, dq, kOptional),            EFFATTN_FIELD(S, dk, kOptional),
      EFFATTN_FIELD(S, dv, kOptional),            EFFATTN_FIELD(S, key_mask, kOptional),
      EFFATTN_FIELD_WITH(S, km_sb, key_mask),     EFFATTN_FIELD_WITH(S, km_sh, key_mask),
      EFFATTN_FIELD_WITH(S, km_sn, key_mask),     EFFATTN_FIELD(S, kv_full_num, kRequired),
      EFFATTN_FIELD(S, kv_full_idx, kRequired),   EFFATTN_FIELD(S, kv_part_num, kRequired),
      EFFATTN_FIELD(S, kv_part_idx, kRequired),   EFFATTN_FIELD_WITH(S, kv_part_tile, tiles),
      EFFATTN_FIELD(S, q_full_num, kRequired),    EFFATTN_FIELD(S, q_full_idx, kRequired),
      EFFATTN_FIELD(S, q_part_num, kRequired),    EFFATTN_FIELD(S, q_part_idx, kRequired),
      EFFATTN_FIELD_WITH(S, q_part_tile, tiles),  EFFATTN_FIELD(S, max_kv_full, kRequired),
      EFFATTN_FIELD(S, max_kv_part, kRequired),   EFFATTN_FIELD(S, max_q_full, kRequired),
      EFFATTN_FIELD(S, max_q_part, kRequired),    EFFATTN_FIELD(S, terms, kOptional),
      EFFATTN_FIELD_WITH(S, num_terms, terms),    EFFATTN_FIELD(S, tiles, kOptional),
      EFFATTN_FIELD(S, use_tiles, kDerived),      EFFATTN_FIELD(S, batch, kRequired),
      EFFATTN_FIELD(S, heads, kRequired),         EFFATTN_FIELD(S, kv_heads, kRequired),
      EFFATTN_FIELD(S, n_q, kRequired),           EFFATTN_FIELD(S, n_k, kRequired),
      EFFATTN_FIELD(S, q_offset, kRequired),      EFFATTN_FIELD(S, head_dim, kRequired),
      EFFATTN_FIELD(S, num_classes, kRequired),   EFFATTN_FIELD(S, num_q_blocks, kRequired),
      EFFATTN_FIELD(S, num_k_blocks, kRequired),  EFFATTN_FIELD(S, dtype, kRequired),
      EFFATTN_FIELD(S, scale, kRequired),         EFFATTN_FIELD(S, scale_log2, kRequired),
  };
}

inline std::vector<bind::Field<XlParams>> xl_fields() {
  using S = XlParams;
  return {
      EFFATTN_FIELD(S, q, kRequired),          EFFATTN_FIELD(S, k, kRequired),
      EFFATTN_FIELD(S, v, kRequired),          EFFATTN_FIELD(S, r, kRequired),
      EFFATTN_FIELD(S, u, kRequired),          EFFATTN_FIELD(S, vb, kRequired),
      EFFATTN_FIELD(S, out, kOptional),        EFFATTN_FIELD(S, dout, kOptional),
      EFFATTN_FIELD(S, lse, kRequired),        EFFATTN_FIELD(S, delta, kOptional),
      EFFATTN_FIELD(S, dq, kOptional),         EFFATTN_FIELD(S, dk, kOptional),
      EFFATTN_FIELD(S, dv, kOptional),         EFFATTN_FIELD(S, colsum, kOptional),
      EFFATTN_FIELD(S, dr_part, kOptional),    EFFATTN_FIELD(S, w_part, kOptional),
      EFFATTN_FIELD(S, batch, kRequired),      EFFATTN_FIELD(S, heads, kRequired),
      EFFATTN_FIELD(S, kv_heads, kRequired),   EFFATTN_FIELD(S, n_q, kRequired),
      EFFATTN_FIELD(S, n_k, kRequired),        EFFATTN_FIELD(S, n_r, kRequired),
      EFFATTN_FIELD(S, head_dim, kRequired),   EFFATTN_FIELD(S, window, kRequired),
      EFFATTN_FIELD(S, first_diag, kOptional), EFFATTN_FIELD(S, dtype, kRequired),
      EFFATTN_FIELD(S, scale, kRequired),      EFFATTN_FIELD(S, scale_log2, kRequired),
  };
}

// A layout's partial blocks come with exactly one predicate, which use_tiles then names.
inline void finish_sparse(SparseParams& p) {
  if ((p.terms == 0) == (p.tiles == 0))
    throw pybind11::value_error("CudaSparseParams(): give exactly one of terms and tiles");
  if (p.terms != 0 && p.num_terms < 1)
    throw pybind11::value_error("CudaSparseParams(): num_terms must be >= 1");
  p.use_tiles = p.tiles != 0;
}

// Binds the parameter classes, and the constants that effattn.ops.cuda.BLOCK and HEAD_DIMS
// must equal (CUDA_BLOCK, CUDA_HEAD_DIMS).
inline void bind_params(pybind11::module_& m) {
  bind::struct_class(m, "CudaLaunch", "Grid, block, shared memory and stream of a kernel launch.",
                     launch_fields());
  bind::struct_class(m, "CudaSparseParams", "Arguments of the block-sparse kernels.",
                     sparse_fields(), &finish_sparse);
  bind::struct_class(m, "CudaXlParams", "Arguments of the Transformer-XL kernels.", xl_fields());
  m.attr("CUDA_BLOCK") = kBlock;
  m.attr("CUDA_HEAD_DIMS") = pybind11::make_tuple(kHeadDims[0], kHeadDims[1]);
}

// Binds launcher `fn` of params.h as `name`, taking (params, launch) and run without the GIL
// (the emulator's launches run the kernels there and then); `needs` checks the buffers of this
// launcher's direction.
template <class P>
void def_launcher(pybind11::module_& m, const char* name, void (*fn)(const P&, const Launch&),
                  void (*needs)(const P&, const char*), const char* doc) {
  namespace py = pybind11;
  m.def(
      name,
      [name, fn, needs](const P& p, const Launch& l) {
        needs(p, name);
        py::gil_scoped_release release;
        fn(p, l);
      },
      py::arg("params"), py::arg("launch"), doc);
}

template <class P>
void forward_needs(const P& p, const char* what) {
  bind::need(p.out, what, "out");
}

template <class P>
void dq_needs(const P& p, const char* what) {
  bind::need(p.dout, what, "dout");
  bind::need(p.delta, what, "delta");
  bind::need(p.dq, what, "dq");
}

template <class P>
void dkdv_needs(const P& p, const char* what) {
  bind::need(p.dout, what, "dout");
  bind::need(p.delta, what, "delta");
  bind::need(p.dk, what, "dk");
  bind::need(p.dv, what, "dv");
}

inline void xl_dkdv_needs(const XlParams& p, const char* what) {
  dkdv_needs(p, what);
  bind::need(p.colsum, what, "colsum");
}

inline void xl_dr_needs(const XlParams& p, const char* what) {
  bind::need(p.dout, what, "dout");
  bind::need(p.delta, what, "delta");
  bind::need(p.dr_part, what, "dr_part");
  bind::need(p.w_part, what, "w_part");
}

// Binds the launchers of params.h: the real ones (csrc/cuda/*.cu) in the extension, the
// emulated ones in the emulator's module (csrc/cuda/emu/module.cpp).
inline void bind_launchers(pybind11::module_& m) {
  def_launcher(m, "cuda_sparse_forward", &sparse_forward, &forward_needs<SparseParams>,
               "Block-sparse attention forward over one part (see effattn.ops.cuda).");
  def_launcher(m, "cuda_sparse_backward_dq", &sparse_backward_dq, &dq_needs<SparseParams>,
               "Block-sparse attention backward, dq.");
  def_launcher(m, "cuda_sparse_backward_dkdv", &sparse_backward_dkdv, &dkdv_needs<SparseParams>,
               "Block-sparse attention backward, dk and dv.");
  def_launcher(m, "cuda_xl_forward", &xl_forward, &forward_needs<XlParams>,
               "Transformer-XL attention forward.");
  def_launcher(m, "cuda_xl_backward_dkdv", &xl_backward_dkdv, &xl_dkdv_needs,
               "Transformer-XL attention backward: dk, dv and the column sums of dS.");
  def_launcher(m, "cuda_xl_backward_dq", &xl_backward_dq, &dq_needs<XlParams>,
               "Transformer-XL attention backward: dq.");
  def_launcher(m, "cuda_xl_backward_dr", &xl_backward_dr, &xl_dr_needs,
               "Transformer-XL attention backward: per-diagonal band gradients of r and band sums "
               "of dS.");
}

}  // namespace cuda
}  // namespace effattn
