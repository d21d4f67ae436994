// Plain C++ interface of the CUDA attention kernels: parameter blocks and launchers.
//
// No CUDA, torch or pybind11 header here: the launchers are defined in csrc/cuda/*.cu (nvcc),
// bound in csrc/cuda/register_cuda.cpp (host compiler), and the same kernels run on the host in
// the emulator of csrc/cuda/emu/ (tests). Device buffers cross this boundary as addresses
// (uintptr_t), streams as the handle torch.cuda.current_stream().cuda_stream.
//
// Python (effattn/ops/cuda.py) validates every field and computes the launch geometry; each
// launcher re-checks what it depends on (threads, shared memory, grid bounds) and throws
// std::invalid_argument on a mismatch, so a disagreement between the two sides is loud.
#pragma once

#include <cstdint>

#include "constants.h"

namespace effattn {
namespace cuda {

// Query and key blocks of every kernel (effattn.ops.cuda.BLOCK): sparse layouts are built for
// kBlock x kBlock blocks.
constexpr int kBlock = 64;
// Head dims the kernels are compiled for (effattn.ops.cuda.HEAD_DIMS); Python pads the others.
constexpr int kHeadDims[] = {64, 128};

// Launch geometry, filled by Python (effattn.ops.cuda.launch_geometry).
struct Launch {
  int grid_x = 0;
  int grid_y = 0;
  int threads = 0;
  int smem_bytes = 0;
  uintptr_t stream = 0;
};

// Block-sparse attention over one part of a plan (the backend contract of
// effattn/ops/torch_sparse.py). Strides are in elements; the head dim has stride 1.
struct SparseParams {
  // q [B, H, n_q, D], k and v [B, Hkv, n_k, D] (dtype), out and dout [B, H, n_q, D] (dtype).
  uintptr_t q = 0, k = 0, v = 0, out = 0, dout = 0;
  int64_t q_sb = 0, q_sh = 0, q_sn = 0;
  int64_t k_sb = 0, k_sh = 0, k_sn = 0;
  int64_t v_sb = 0, v_sh = 0, v_sn = 0;
  int64_t o_sb = 0, o_sh = 0, o_sn = 0;
  int64_t do_sb = 0, do_sh = 0, do_sn = 0;
  // lse (written by the forward, read by the backward) and delta: contiguous fp32 [B, H, n_q].
  uintptr_t lse = 0, delta = 0;
  // Backward outputs, contiguous fp32: dq [B, H, n_q, D], dk and dv [B, Hkv, n_k, D].
  uintptr_t dq = 0, dk = 0, dv = 0;
  // Key mask, uint8 (non-zero = hidden) addressed b * km_sb + h * km_sh + j * km_sn; 0 = none.
  uintptr_t key_mask = 0;
  int64_t km_sb = 0, km_sh = 0, km_sn = 0;

  // BlockLayout (effattn.patterns), int32, contiguous, for kBlock x kBlock blocks.
  uintptr_t kv_full_num = 0, kv_full_idx = 0, kv_part_num = 0, kv_part_idx = 0;
  uintptr_t kv_part_tile = 0;  // int32 [P, nqb, max_kv_part]; used with tiles only
  uintptr_t q_full_num = 0, q_full_idx = 0, q_part_num = 0, q_part_idx = 0;
  uintptr_t q_part_tile = 0;  // int32 [P, nkb, max_q_part]; used with tiles only
  int max_kv_full = 1, max_kv_part = 1, max_q_full = 1, max_q_part = 1;
  // Partial blocks: terms int32 [P, num_terms, term::kNumFields], or tiles uint8
  // [U, kBlock, kBlock] when use_tiles.
  uintptr_t terms = 0, tiles = 0;
  int num_terms = 0;
  int use_tiles = 0;

  int batch = 0, heads = 0, kv_heads = 0;
  int n_q = 0, n_k = 0, q_offset = 0, head_dim = 0;
  int num_classes = 0, num_q_blocks = 0, num_k_blocks = 0;
  int dtype = kFloat16;  // of q, k, v, out, dout: kFloat16 or kBFloat16; accumulation in fp32
  float scale = 0.f;       // score scale
  float scale_log2 = 0.f;  // scale * log2(e): the kernels exponentiate in base 2
};

// Transformer-XL relative attention (effattn/ops/torch_xl.py contract). Every tensor is
// contiguous: q, out, dout [B, H, L, D]; k, v [B, Hkv, N, D]; r [H, R, D]; u, vb [H, D].
struct XlParams {
  uintptr_t q = 0, k = 0, v = 0, r = 0, u = 0, vb = 0, out = 0, dout = 0;
  uintptr_t lse = 0, delta = 0;  // fp32 [B, H, L]
  // Backward outputs (fp32): dq [B, H, L, D]; dk, dv [B, Hkv, N, D];
  // colsum [B, H, N] (sum over queries of dS per key, for du);
  // dr_part [B, H, num_diags, 128, D] and w_part [B, H, num_diags, 128] (per block diagonal,
  // the band gradient of r and the band sums of dS, for dr and dvb).
  uintptr_t dq = 0, dk = 0, dv = 0, colsum = 0, dr_part = 0, w_part = 0;
  int batch = 0, heads = 0, kv_heads = 0;
  int n_q = 0, n_k = 0, n_r = 0, head_dim = 0;
  int window = 0;      // min(window, N), N when there is none
  int first_diag = 0;  // block diagonal (query block - key block) of program 0 of the dr kernel
  int dtype = kFloat16;  // of q, k, v, r, u, vb, out, dout: kFloat16 or kBFloat16
  float scale = 0.f;
  float scale_log2 = 0.f;
};

// Launchers (csrc/cuda/sparse_fwd.cu, sparse_bwd.cu, xl_fwd.cu, xl_bwd.cu). Each checks
// `launch` against its kernel, launches it on launch.stream and throws std::runtime_error on a
// CUDA error (std::invalid_argument on bad arguments).
void sparse_forward(const SparseParams& p, const Launch& launch);
void sparse_backward_dq(const SparseParams& p, const Launch& launch);
void sparse_backward_dkdv(const SparseParams& p, const Launch& launch);
void xl_forward(const XlParams& p, const Launch& launch);
void xl_backward_dkdv(const XlParams& p, const Launch& launch);
void xl_backward_dq(const XlParams& p, const Launch& launch);
void xl_backward_dr(const XlParams& p, const Launch& launch);

}  // namespace cuda
}  // namespace effattn
