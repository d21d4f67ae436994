// Argument blocks and entry points of the C++ CPU attention kernels.
//
// Python (effattn/ops/cpu.py) validates every argument and passes raw data pointers, shapes and
// element strides; nothing here checks them again. Kernels exist once per instruction set
// (isa_*.cpp compile the same templates, attention_impl.h, for different targets) and the
// dispatcher (dispatch.cpp) picks the widest one this CPU supports.
//
// Every header included by an isa_*.cpp file before its target pragma must be declarations
// only (no inline functions or templates that get instantiated): an inline function emitted in
// the AVX-512 translation unit could otherwise be the copy the linker keeps for everyone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>  // std::index_sequence (attention_impl.h): types only

#include "constants.h"

namespace effattn {
namespace cpu {

// What every attention kernel takes: q [B, H, n_q, D], k / v [B, Hkv, n_k, D] with element
// strides {b, h, n, d}, the forward's outputs out and lse, and the backward's inputs (dout
// strided; lse_in and delta contiguous [B, H, n_q], in the accumulation dtype) and outputs
// dq, dk, dv (contiguous, shaped like q, k, v).
struct AttentionArgs {
  int dtype = kFloat32;
  int threads = 1;
  int64_t B = 0, H = 0, Hkv = 0, D = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t sq[4] = {}, sk[4] = {}, sv[4] = {};
  double scale = 1.0;
  int64_t BM = 64, BN = 64;
  void* out = nullptr;
  void* lse = nullptr;
  const void* dout = nullptr;
  int64_t sdo[4] = {};
  const void* lse_in = nullptr;
  const void* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

// Block-sparse attention over one part of a plan (see effattn/ops/torch_sparse.py for the
// contract), n_q queries over n_k keys. Outputs, lse and delta are in the accumulation dtype;
// out [B, H, n_q, D] has element strides so {b, h, n} (unit along D), lse [B, H, n_q] strides
// sl (natural log, -inf for empty rows). With `join` they hold on entry the result over a
// disjoint set of keys, which the kernel extends to the union.
struct SparseArgs : AttentionArgs {
  int64_t n_q = 0, n_k = 0;
  // bool [B, H, n_k] through strides (0 on broadcast dims), true = the key is hidden.
  const uint8_t* key_mask = nullptr;
  int64_t skm[3] = {};
  int64_t so[3] = {}, sl[3] = {};
  bool join = false;
  // Block layout (effattn.patterns.BlockLayout), int32 contiguous; *_w are the row widths.
  int64_t q_offset = 0, P = 1, nqb = 0, nkb = 0;
  const int32_t* kv_full_num = nullptr;
  const int32_t* kv_full_idx = nullptr;
  const int32_t* kv_part_num = nullptr;
  const int32_t* kv_part_idx = nullptr;
  const int32_t* kv_part_tile = nullptr;
  int64_t kv_full_w = 0, kv_part_w = 0;
  const int32_t* q_full_num = nullptr;
  const int32_t* q_full_idx = nullptr;
  const int32_t* q_part_num = nullptr;
  const int32_t* q_part_idx = nullptr;
  const int32_t* q_part_tile = nullptr;
  int64_t q_full_w = 0, q_part_w = 0;
  // Partial-block predicate: terms [P, T, term::kNumFields] or tiles [U, BM, BN] (bool).
  const int32_t* terms = nullptr;
  int64_t num_terms = 0;
  const uint8_t* tiles = nullptr;
};

// Transformer-XL relative attention (DESIGN.md): q [B, H, L, D], k / v [B, Hkv, N, D] with
// N = M + L, r [H, R, D] by distance (clamped at R - 1), u / vb [H, D]; window 0 = none. out,
// lse and the backward's extra outputs dr [H, R, D], du / dvb [H, D] are contiguous.
struct XlArgs : AttentionArgs {
  int64_t L = 0, N = 0, R = 0, window = 0;
  const void* r = nullptr;
  const void* u = nullptr;
  const void* vb = nullptr;
  int64_t sr[3] = {}, su[2] = {}, svb[2] = {};
  void* dr = nullptr;
  void* du = nullptr;
  void* dvb = nullptr;
};

struct Kernels {
  const char* name;
  void (*sparse_forward)(const SparseArgs&);
  void (*sparse_backward)(const SparseArgs&);
  void (*xl_forward)(const XlArgs&);
  void (*xl_backward)(const XlArgs&);
};

// One table per instruction set; a table whose ISA was not compiled in has null entries.
Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_generic();

// Runs fn(ctx, task, thread) for task in [0, n) on `threads` threads (the caller's thread
// included, thread < threads), handing tasks out dynamically: OpenMP when the build has it
// (the runtime PyTorch uses), else std::thread. Results must not depend on which thread runs a
// task: kernels give every task its own outputs or per-task buffers reduced in a fixed order.
void parallel_for(int64_t n, int threads, void (*fn)(void* ctx, int64_t task, int thread),
                  void* ctx);

// 64-byte aligned storage, zero-filled; free with free_buffer (null is fine).
void* alloc_buffer(size_t bytes);
void free_buffer(void* p);

}  // namespace cpu
}  // namespace effattn
