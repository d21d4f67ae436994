// Kernel selection by CPU features, the thread pool of the kernels and their buffers.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#ifdef EFFATTN_OPENMP
#include <omp.h>
#endif

namespace effattn {
namespace cpu {

namespace {

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (isa == "avx512")
    // libgcc's checks include the OS saving the wider registers (XCR0).
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
#endif
  return isa == "generic";
}

}  // namespace

std::vector<Kernels> available_kernels() {
  std::vector<Kernels> out;
  for (const Kernels& k : {kernels_avx512(), kernels_avx2(), kernels_generic()})
    if (k.sparse_forward != nullptr && cpu_has(k.name)) out.push_back(k);
  return out;
}

Kernels select_kernels(const std::string& isa) {
  static const std::vector<Kernels> all = available_kernels();
  if (isa.empty() || isa == "auto") return all.front();
  for (const Kernels& k : all)
    if (isa == k.name) return k;
  return {nullptr, nullptr, nullptr, nullptr, nullptr};
}

void parallel_for(int64_t n, int threads, void (*fn)(void*, int64_t, int), void* ctx) {
  if (n <= 0) return;
  const int workers = static_cast<int>(threads < 1 ? 1 : (threads < n ? threads : n));
  if (workers == 1) {
    for (int64_t t = 0; t < n; ++t) fn(ctx, t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
#ifdef EFFATTN_OPENMP
  // With PyTorch loaded this is its OpenMP runtime (libgomp is shared by soname): the workers
  // that spin for a while after every torch op take these tasks, where a second pool of
  // threads would compete with them for the cores.
#pragma omp parallel num_threads(workers)
  {
    const int thread = omp_get_thread_num();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(ctx, t, thread);
  }
#else
  auto run = [&](int thread) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(ctx, t, thread);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(run, w);
  run(0);
  for (std::thread& t : pool) t.join();
#endif
}

// calloc: large blocks come zeroed from the OS without a pass over them. The offset to the
// aligned address is kept just before it.
void* alloc_buffer(size_t bytes) {
  constexpr size_t kAlign = 64;
  void* raw = std::calloc(1, bytes + kAlign);
  if (raw == nullptr) throw std::bad_alloc();
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (base + kAlign) & ~(uintptr_t)(kAlign - 1);
  const unsigned char offset = static_cast<unsigned char>(aligned - base);
  std::memcpy(reinterpret_cast<void*>(aligned - 1), &offset, 1);
  return reinterpret_cast<void*>(aligned);
}

void free_buffer(void* p) {
  if (p == nullptr) return;
  unsigned char offset;
  std::memcpy(&offset, static_cast<unsigned char*>(p) - 1, 1);
  std::free(static_cast<unsigned char*>(p) - offset);
}

}  // namespace cpu
}  // namespace effattn
