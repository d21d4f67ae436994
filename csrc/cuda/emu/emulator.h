// Host emulation of the device primitives of csrc/cuda/device.cuh, to run the CUDA kernels on a
// CPU (tests, machines without a GPU). Not a general CUDA emulator: exactly the primitives the
// kernels use, each with the semantics the PTX ISA gives it.
//
// A thread block runs as one fiber (ucontext) per thread on one OS thread. Fibers switch only at
// barriers and warp collectives; warps run one at a time, each as far as it can get (to a block
// barrier), in a random order, so that warps drift as far apart as the barriers allow and a
// missing barrier shows up as wrong results rather than being hidden by a lucky schedule:
//   * __syncthreads / __syncwarp: real barriers; a barrier some thread never reaches (divergence,
//     an early return) is reported as a deadlock;
//   * ldmatrix, mma.sync, shuffles: warp collectives, computed by the last lane to arrive from
//     all lanes' operands with the fragment layouts of the PTX ISA;
//   * cp.async: each copy lands either at once or, deferred, when the issuing thread's
//     cp.async.wait_group retires its group (at random), so that reading a buffer too early and
//     overwriting one still in use both show up; copies never waited for are reported;
//   * shared memory starts as 0xff bytes (NaN in fp16, bf16 and fp32), so reading unwritten
//     shared memory poisons results;
//   * every global load and store, and every shared memory address of ldmatrix and cp.async, is
//     bounds-checked against the buffers registered for the launch.
// Errors stop the launch and surface as std::runtime_error.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define EFFATTN_DEVICE inline
#define EFFATTN_UNROLL
#define EFFATTN_DYNAMIC_SMEM(name) unsigned char* name = ::effattn::emu::dynamic_smem()

namespace effattn {
namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<AsyncCopy> open;                // issued, not committed
  std::deque<std::vector<AsyncCopy>> groups;  // committed, not yet waited for
};

// Operands and results of the warp collective in flight.
struct Warp {
  int arrived = 0;
  long generation = 0;
  int op = 0;
  const unsigned char* addr[kWarpSize];
  uint32_t a[kWarpSize][4];
  uint32_t b[kWarpSize][2];
  float c[kWarpSize][4];
  float f[kWarpSize];
  uint32_t out[kWarpSize][4];
  float fout[kWarpSize][4];
  bool bf16 = false;
};

enum Op { kSyncWarp = 1, kLdsm, kLdsmTrans, kMmaF16, kMmaBF16, kQuadMax, kQuadSum, kColumnSum };

struct State {
  int threads = 0;
  int grid_x = 0;
  int bx = 0, by = 0;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int barrier_arrived = 0;
  long barrier_generation = 0;
  long progress = 0;
  std::vector<Warp> warps;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // [begin, end) of global buffers
  std::string error;
  std::function<void()> body;
  std::mt19937 rng{12345};
};

inline State& state() {
  static State s;
  return s;
}

inline Fiber& self() { return state().fibers[state().current]; }

inline void yield() { swapcontext(&self().ctx, &state().scheduler); }

// Records the first error and parks this fiber for good: the scheduler stops the launch.
[[noreturn]] inline void fail(const std::string& msg) {
  State& s = state();
  if (s.error.empty()) {
    std::ostringstream os;
    os << "block (" << s.bx << ", " << s.by << ") thread " << s.current << ": " << msg;
    s.error = os.str();
  }
  for (;;) yield();
}

inline unsigned char* dynamic_smem() { return state().smem.data(); }

inline void check_global(const void* p, size_t bytes, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (const auto& r : state().ranges)
    if (a >= r.first && a + bytes <= r.second) return;
  std::ostringstream os;
  os << what << " of " << bytes << " bytes at " << p << " is outside every buffer of the launch";
  fail(os.str());
}

inline void check_shared(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  const State& s = state();
  if (c < s.smem.data() || c + bytes > s.smem.data() + s.smem.size()) {
    std::ostringstream os;
    os << what << ": shared offset " << (c - s.smem.data()) << " + " << bytes
       << " is outside the " << s.smem.size() << " bytes of dynamic shared memory";
    fail(os.str());
  }
  if ((c - s.smem.data()) % align) fail(std::string(what) + ": misaligned shared address");
}

inline void block_barrier() {
  State& s = state();
  const long gen = s.barrier_generation;
  ++s.progress;
  if (++s.barrier_arrived == s.threads) {
    s.barrier_arrived = 0;
    ++s.barrier_generation;
  } else {
    while (s.barrier_generation == gen) yield();
  }
}

inline int lane() { return state().current % kWarpSize; }
inline Warp& my_warp() { return state().warps[state().current / kWarpSize]; }

// Arrive with this lane's operands already stored in the Warp; the last lane computes.
template <class F>
inline void collective(int op, F&& compute) {
  State& s = state();
  Warp& w = my_warp();
  const long gen = w.generation;
  ++s.progress;
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("lanes of a warp are in different collectives (divergence)");
  }
  if (++w.arrived == kWarpSize) {
    compute(w);
    w.arrived = 0;
    ++w.generation;
  } else {
    while (w.generation == gen) yield();
  }
}

// ---------------------------------------------------------------- 16-bit floats (round to even)
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
  const float a = std::fabs(f);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {
    // Subnormal: a multiple of 2^-24; nearbyint rounds half to even in the default mode.
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24))));
  }
  const uint32_t ua = float_to_bits(a);
  uint32_t exp = (ua >> 23) - 112;
  uint32_t man = ua & 0x7fffffu;
  uint32_t rest = man & 0x1fffu;
  man >>= 13;
  if (rest > 0x1000u || (rest == 0x1000u && (man & 1u))) {
    if (++man == 0x400u) {
      man = 0;
      ++exp;
    }
  }
  return static_cast<uint16_t>(sign | (exp << 10) | man);
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

// ---------------------------------------------------------------- launch
// Runs body() as every thread of every block of the grid; returns the first error ("" if none).
inline std::string run(int grid_x, int grid_y, int threads, int smem_bytes,
                       const std::vector<std::pair<uintptr_t, uintptr_t>>& ranges,
                       std::function<void()> body) {
  State& s = state();
  s.threads = threads;
  s.grid_x = grid_x;
  s.ranges = ranges;
  s.body = std::move(body);
  s.error.clear();
  s.fibers.resize(threads);
  s.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp());
  for (auto& f : s.fibers)
    if (f.stack.size() != kStackBytes) f.stack.assign(kStackBytes, 0);
  std::vector<int> order;
  for (int by = 0; by < grid_y && s.error.empty(); ++by) {
    for (int bx = 0; bx < grid_x && s.error.empty(); ++bx) {
      s.bx = bx;
      s.by = by;
      s.smem.assign(static_cast<size_t>(smem_bytes), 0xff);
      s.barrier_arrived = 0;
      for (auto& w : s.warps) w.arrived = 0;
      for (int t = 0; t < threads; ++t) {
        Fiber& f = s.fibers[t];
        f.done = false;
        f.open.clear();
        f.groups.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &s.scheduler;
        makecontext(&f.ctx, +[]() {
          State& st = state();
          st.body();
          Fiber& me = st.fibers[st.current];
          if (!me.open.empty() || !me.groups.empty())
            fail("thread exits with cp.async copies that were never waited for");
          me.done = true;
          ++st.progress;
        }, 0);
      }
      // One warp at a time, as far as it gets (until all its threads wait at a block barrier
      // or are done), warps in random order: warps drift as far apart as barriers allow.
      const int n_warps = static_cast<int>(s.warps.size());
      for (;;) {
        order.clear();
        for (int w = 0; w < n_warps; ++w) order.push_back(w);
        std::shuffle(order.begin(), order.end(), s.rng);
        const long before_pass = s.progress;
        bool all_done = true;
        for (int w : order) {
          for (;;) {
            const long before = s.progress;
            for (int t = w * kWarpSize; t < std::min(threads, (w + 1) * kWarpSize); ++t) {
              if (s.fibers[t].done) continue;
              all_done = false;
              s.current = t;
              swapcontext(&s.scheduler, &s.fibers[t].ctx);
              if (!s.error.empty()) break;
            }
            if (!s.error.empty() || s.progress == before) break;
          }
          if (!s.error.empty()) break;
        }
        if (!s.error.empty() || all_done) break;
        if (s.progress == before_pass) {
          std::ostringstream os;
          os << "block (" << bx << ", " << by
             << "): deadlock: threads wait at a barrier that the others never reach";
          s.error = os.str();
          break;
        }
      }
    }
  }
  s.current = -1;
  return s.error;
}

}  // namespace emu

namespace cuda {
namespace dev {

inline int thread_id() { return emu::state().current; }
inline int block_x() { return emu::state().bx; }
inline int block_y() { return emu::state().by; }
inline int block_x_count() { return emu::state().grid_x; }
inline void sync_block() { emu::block_barrier(); }
inline void sync_warp() {
  emu::collective(emu::kSyncWarp, [](emu::Warp&) {});
}

inline float quad_max(float v) {
  emu::Warp& w = emu::my_warp();
  const int l = emu::lane();
  w.f[l] = v;
  emu::collective(emu::kQuadMax, [](emu::Warp& w) {
    for (int i = 0; i < emu::kWarpSize; ++i) {
      const int q = i & ~3;
      w.fout[i][0] = std::fmax(std::fmax(w.f[q], w.f[q + 1]), std::fmax(w.f[q + 2], w.f[q + 3]));
    }
  });
  return w.fout[l][0];
}

inline float quad_sum(float v) {
  emu::Warp& w = emu::my_warp();
  const int l = emu::lane();
  w.f[l] = v;
  emu::collective(emu::kQuadSum, [](emu::Warp& w) {
    // The butterfly order of the shuffles: (x0 + x1) + (x2 + x3).
    for (int i = 0; i < emu::kWarpSize; ++i) {
      const int q = i & ~3;
      w.fout[i][0] = (w.f[q] + w.f[q + 1]) + (w.f[q + 2] + w.f[q + 3]);
    }
  });
  return w.fout[l][0];
}

inline float column_sum(float v) {
  emu::Warp& w = emu::my_warp();
  const int l = emu::lane();
  w.f[l] = v;
  emu::collective(emu::kColumnSum, [](emu::Warp& w) {
    for (int i = 0; i < emu::kWarpSize; ++i) {
      float acc = 0.f;
      for (int q = 0; q < 8; ++q) acc += w.f[(i & 3) + 4 * q];
      w.fout[i][0] = acc;
    }
  });
  return w.fout[l][0];
}

template <class T>
inline T gload(const T* p) {
  emu::check_global(p, sizeof(T), "global load");
  return *p;
}
template <class T>
inline void gstore(T* p, T v) {
  emu::check_global(p, sizeof(T), "global store");
  *p = v;
}

inline void cp_async16(void* smem, const void* gmem, bool valid) {
  emu::check_shared(smem, 16, 16, "cp.async destination");
  if (valid) {
    emu::check_global(gmem, 16, "cp.async source");
    if (reinterpret_cast<uintptr_t>(gmem) % 16) emu::fail("cp.async: misaligned global source");
  }
  // The hardware may land a copy any time between issue and wait: land it now or at the wait,
  // at random, so that both reading too early and overwriting a buffer still in use show up.
  if (emu::state().rng() & 1u) {
    if (valid) {
      std::memcpy(smem, gmem, 16);
    } else {
      std::memset(smem, 0, 16);
    }
    return;
  }
  emu::self().open.push_back({static_cast<unsigned char*>(smem),
                              static_cast<const unsigned char*>(gmem), valid});
}
inline void cp_async_commit() {
  emu::Fiber& f = emu::self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  emu::Fiber& f = emu::self();
  while (static_cast<int>(f.groups.size()) > N) {
    for (const auto& c : f.groups.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    f.groups.pop_front();
  }
}

namespace detail {
inline void ldsm(uint32_t (&r)[4], const void* smem, bool trans) {
  emu::Warp& w = emu::my_warp();
  const int l = emu::lane();
  emu::check_shared(smem, 16, 16, "ldmatrix row address");
  w.addr[l] = static_cast<const unsigned char*>(smem);
  emu::collective(trans ? emu::kLdsmTrans : emu::kLdsm, [trans](emu::Warp& w) {
    auto elem = [&](int row_lane, int col) {
      uint16_t x;
      std::memcpy(&x, w.addr[row_lane] + 2 * col, 2);
      return static_cast<uint32_t>(x);
    };
    for (int i = 0; i < emu::kWarpSize; ++i) {
      for (int m = 0; m < 4; ++m) {
        if (!trans) {
          // Row i/4 of matrix m, columns 2(i%4) and 2(i%4)+1.
          const int row = 8 * m + i / 4;
          w.out[i][m] = elem(row, 2 * (i % 4)) | (elem(row, 2 * (i % 4) + 1) << 16);
        } else {
          // Column i/4 of matrix m, rows 2(i%4) and 2(i%4)+1.
          const int row = 8 * m + 2 * (i % 4);
          w.out[i][m] = elem(row, i / 4) | (elem(row + 1, i / 4) << 16);
        }
      }
    }
  });
  for (int m = 0; m < 4; ++m) r[m] = w.out[l][m];
}

inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  emu::Warp& w = emu::my_warp();
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) {
    w.a[l][i] = a[i];
    w.c[l][i] = c[i];
  }
  w.b[l][0] = b0;
  w.b[l][1] = b1;
  emu::collective(bf16 ? emu::kMmaBF16 : emu::kMmaF16, [bf16](emu::Warp& w) {
    auto val = [bf16](uint32_t reg, int half) {
      const auto x = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
      return bf16 ? emu::bf16_to_float(x) : emu::half_to_float(x);
    };
    float A[16][16], B[16][8], C[16][8];
    for (int i = 0; i < emu::kWarpSize; ++i) {
      const int g = i >> 2, t = i & 3;
      // A (PTX "Matrix fragments for mma.m16n8k16", f16/bf16): element a_e of lane i, e = 0..7,
      // sits at row g (+8 for e in {2,3,6,7}), column 2t + (e & 1) (+8 for e >= 4).
      for (int e = 0; e < 8; ++e) {
        const int row = g + ((e >> 1) & 1) * 8;
        const int col = 2 * t + (e & 1) + (e >= 4 ? 8 : 0);
        A[row][col] = val(w.a[i][e >> 1], e & 1);
      }
      // B: b_e at row 2t + (e & 1) (+8 for e >= 2), column g.
      for (int e = 0; e < 4; ++e)
        B[2 * t + (e & 1) + (e >= 2 ? 8 : 0)][g] = val(w.b[i][e >> 1], e & 1);
      // C / D: c_e at row g (+8 for e >= 2), column 2t + (e & 1).
      for (int e = 0; e < 4; ++e) C[g + (e >= 2 ? 8 : 0)][2 * t + (e & 1)] = w.c[i][e];
    }
    for (int i = 0; i < emu::kWarpSize; ++i) {
      const int g = i >> 2, t = i & 3;
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        // Products of 16-bit floats are exact in double; the sum is rounded once to fp32.
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
        w.fout[i][e] = static_cast<float>(acc);
      }
    }
  });
  for (int e = 0; e < 4; ++e) c[e] = w.fout[l][e];
}
}  // namespace detail

inline void ldsm_x4(uint32_t (&r)[4], const void* smem) { detail::ldsm(r, smem, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* smem) { detail::ldsm(r, smem, true); }

template <class E>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
inline void mma16816<F16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma(c, a, b0, b1, false);
}
template <>
inline void mma16816<BF16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma(c, a, b0, b1, true);
}

template <class E>
inline float to_float(uint16_t x);
template <>
inline float to_float<F16>(uint16_t x) {
  return emu::half_to_float(x);
}
template <>
inline float to_float<BF16>(uint16_t x) {
  return emu::bf16_to_float(x);
}
template <class E>
inline uint16_t from_float(float x);
template <>
inline uint16_t from_float<F16>(float x) {
  return emu::float_to_half(x);
}
template <>
inline uint16_t from_float<BF16>(float x) {
  return emu::float_to_bf16(x);
}
template <class E>
inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float<E>(lo)) |
         (static_cast<uint32_t>(from_float<E>(hi)) << 16);
}

inline float fast_exp2(float x) { return std::exp2(x); }

}  // namespace dev
}  // namespace cuda
}  // namespace effattn
