// Vector helpers and GEMM micro-kernels of the CPU attention kernels.
//
// Written with GCC/Clang vector extensions: the same source becomes AVX-512, AVX2 or baseline
// SSE2 / NEON code depending on the target of the translation unit that includes it
// (isa_*.cpp), which sets the vector width (EFFATTN_VEC_BYTES) and the tile shapes
// (EFFATTN_TILE_*) so that the accumulators fit its register file.
//
// Include only from attention_impl.h, inside its anonymous namespace: everything here must have
// internal linkage (see kernels.h).

typedef int64_t i64;

// Vector helpers are always inlined: no function ever passes a vector by value, whose calling
// convention differs between targets.
#define EFFATTN_VINLINE inline __attribute__((always_inline))

constexpr int kRowsAbt = EFFATTN_TILE_RS;   // rows of a C = A * B^T tile
constexpr int kVecsAbt = EFFATTN_TILE_NVS;  // vectors per row of a C = A * B^T tile
constexpr int kRowsAb = EFFATTN_TILE_RO;    // rows of a C += A * B tile
constexpr int kVecsAb = EFFATTN_TILE_NVO;   // vectors per row of a C += A * B tile

// Native vector width of the target: 64 bytes (AVX-512), 32 (AVX2) or 16 (baseline).
constexpr int kVecBytes = EFFATTN_VEC_BYTES;

template <class T>
struct VT;
template <>
struct VT<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 4;
};
template <>
struct VT<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
};

template <class T>
using Vec = typename VT<T>::V;

inline i64 imin(i64 a, i64 b) { return a < b ? a : b; }
inline i64 imax(i64 a, i64 b) { return a > b ? a : b; }
inline i64 floordiv(i64 a, i64 b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline i64 posmod(i64 a, i64 b) {
  const i64 r = a % b;
  return r < 0 ? r + b : r;
}

template <class T>
inline T neg_inf() {
  return -static_cast<T>(__builtin_inf());
}
template <class T>
inline T pos_inf() {
  return static_cast<T>(__builtin_inf());
}
inline float sexp2(float x) { return __builtin_exp2f(x); }
inline double sexp2(double x) { return __builtin_exp2(x); }
inline float slog2(float x) { return __builtin_log2f(x); }
inline double slog2(double x) { return __builtin_log2(x); }

template <class T>
EFFATTN_VINLINE Vec<T> vld(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <class T>
EFFATTN_VINLINE void vst(T* p, Vec<T> v) {
  __builtin_memcpy(p, &v, sizeof v);
}
template <class T>
EFFATTN_VINLINE Vec<T> vset(T x) {
  return Vec<T>{} + x;
}
// Lane-wise m ? a : b for a comparison mask m (all ones / all zeros per lane); bit operations
// rather than the vector ?: operator, which not every compiler accepts in C++.
template <class T, class Mask>
EFFATTN_VINLINE Vec<T> vsel(Mask m, Vec<T> a, Vec<T> b) {
  return (Vec<T>)((m & (Mask)a) | (~m & (Mask)b));
}
template <class T>
EFFATTN_VINLINE Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return vsel<T>(a > b, a, b);
}
template <class T>
EFFATTN_VINLINE T hmax(Vec<T> v) {
  T m = v[0];
  for (int l = 1; l < VT<T>::W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
template <class T>
EFFATTN_VINLINE T hsum(Vec<T> v) {
  T s = 0;
  for (int l = 0; l < VT<T>::W; ++l) s += v[l];
  return s;
}

// 2^x lane-wise, exactly 0 below -126 (so -inf gives 0). fp32: x = n + f with |f| <= 1/2 and a
// degree-6 polynomial for 2^f fitted for relative error (at most 1.7 ulp over [-1/2, 1/2]).
EFFATTN_VINLINE Vec<float> vexp2(Vec<float> x) {
  typedef Vec<float> V;
  const V lo = vset<float>(-126.0f), hi = vset<float>(127.0f);
  const auto under = x < lo;
  V xc = vsel<float>(under, lo, x);
  xc = vsel<float>(xc > hi, hi, xc);
  // Adding 1.5 * 2^23 and subtracting it again rounds to the nearest integer.
  const V shifter = vset<float>(12582912.0f);
  const V n = (xc + shifter) - shifter;
  const V f = xc - n;
  V p = vset<float>(1.5337577e-4f);
  p = p * f + 1.3399860e-3f;
  p = p * f + 9.6185198e-3f;
  p = p * f + 5.5503290e-2f;
  p = p * f + 2.4022646e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const typename VT<float>::I e = (__builtin_convertvector(n, typename VT<float>::I) + 127) << 23;
  return vsel<float>(under, V{}, p * (V)e);
}
// fp64 runs for gradcheck and accuracy, not speed: libm per lane.
EFFATTN_VINLINE Vec<double> vexp2(Vec<double> x) {
  Vec<double> r;
  for (int l = 0; l < VT<double>::W; ++l) r[l] = __builtin_exp2(x[l]);
  return r;
}

// ------------------------------------------------------------------------------- transpose
// A W x W block transposed in registers: log2(W) steps, step S exchanging the off-diagonal
// S x S blocks of rows i and i + S (i & S == 0), each row a two-source lane permute (index W + x
// is lane x of the second source). GCC builds element lists lane by lane, hence its builtin.
template <class T, int S, std::size_t... X>
EFFATTN_VINLINE void swap_blocks(Vec<T>& a, Vec<T>& b, std::index_sequence<X...>) {
  constexpr int W = VT<T>::W;
#if defined(__clang__)
  const Vec<T> lo = __builtin_shufflevector(a, b, ((X & S) ? W + (X ^ S) : X)...);
  const Vec<T> hi = __builtin_shufflevector(a, b, ((X & S) ? W + X : X ^ S)...);
#else
  typedef typename VT<T>::I I;
  const Vec<T> lo = __builtin_shuffle(a, b, I{((X & S) ? W + (X ^ S) : X)...});
  const Vec<T> hi = __builtin_shuffle(a, b, I{((X & S) ? W + X : X ^ S)...});
#endif
  a = lo;
  b = hi;
}
template <class T, int S>
EFFATTN_VINLINE void transpose_steps(Vec<T>* r) {
  if constexpr (S > 0) {
    constexpr int W = VT<T>::W;
#pragma GCC unroll 32
    for (int i = 0; i < W; ++i)
      if (!(i & S)) swap_blocks<T, S>(r[i], r[i + S], std::make_index_sequence<W>{});
    transpose_steps<T, S / 2>(r);
  }
}
// dst[x * ld + y] = mul * src[y * ls + x] for x, y < W.
template <class T>
EFFATTN_VINLINE void transpose_block(const T* src, i64 ls, T mul, T* dst, i64 ld) {
  constexpr int W = VT<T>::W;
  Vec<T> r[W];
#pragma GCC unroll 32
  for (int y = 0; y < W; ++y) r[y] = vld(src + y * ls) * mul;
  transpose_steps<T, W / 2>(r);
#pragma GCC unroll 32
  for (int x = 0; x < W; ++x) vst(dst + x * ld, r[x]);
}

// ------------------------------------------------------------------------------- GEMM tiles
// C[R, NV*W] (+)= sum_k A(r, k) B[k, NV*W] with A(r, k) = A[r * sa + k * sk] (so A or its
// transpose), B row-major (ldb), C row-major (ldc); ACC adds to C, else C is overwritten.
template <class T, int R, int NV, bool ACC>
inline void tile(const T* A, i64 sa, i64 sk, const T* B, i64 ldb, i64 K, T* C, i64 ldc) {
  constexpr int W = VT<T>::W;
  Vec<T> acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? vld(C + r * ldc + v * W) : Vec<T>{};
  for (i64 k = 0; k < K; ++k) {
    Vec<T> b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = vld(B + k * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T a = A[r * sa + k * sk];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vst(C + r * ldc + v * W, acc[r][v]);
}

// tile with n vectors per row, 1 <= n <= NV (none when NV = 0), n known at run time.
template <class T, int R, int NV, bool ACC>
inline void tile_n(int n, const T* A, i64 sa, i64 sk, const T* B, i64 ldb, i64 K, T* C,
                   i64 ldc) {
  if constexpr (NV > 0) {
    if (n < NV) return tile_n<T, R, NV - 1, ACC>(n, A, sa, sk, B, ldb, K, C, ldc);
    tile<T, R, NV, ACC>(A, sa, sk, B, ldb, K, C, ldc);
  }
}

// C[R, NV*W] = A[R, K] * Bt[K, NV*W]; A row-major (lda), Bt row-major (ldb), C row-major (ldc).
template <class T, int R, int NV>
inline void tile_abt(const T* A, i64 lda, const T* Bt, i64 ldb, i64 K, T* C, i64 ldc) {
  tile<T, R, NV, false>(A, lda, 1, Bt, ldb, K, C, ldc);
}

// C[M, N] = A[M, K] * Bt[K, N]; M a multiple of kRowsAbt, N of W.
template <class T>
void gemm_abt(i64 M, i64 N, i64 K, const T* A, i64 lda, const T* Bt, i64 ldb, T* C, i64 ldc) {
  constexpr int W = VT<T>::W;
  for (i64 i = 0; i < M; i += kRowsAbt) {
    i64 j = 0;
    for (; j + kVecsAbt * W <= N; j += kVecsAbt * W)
      tile_abt<T, kRowsAbt, kVecsAbt>(A + i * lda, lda, Bt + j, ldb, K, C + i * ldc + j, ldc);
    for (; j < N; j += W)
      tile_abt<T, kRowsAbt, 1>(A + i * lda, lda, Bt + j, ldb, K, C + i * ldc + j, ldc);
  }
}

// C[kRowsAb, N] += A(kRowsAb, K) * B[K, N] (A(r, k) = A[r * sa + k * sk]); N a multiple of W.
template <class T>
EFFATTN_VINLINE void rows_ab(i64 N, i64 K, const T* A, i64 sa, i64 sk, const T* B, i64 ldb, T* C,
                             i64 ldc) {
  constexpr int W = VT<T>::W;
  i64 j = 0;
  for (; j + kVecsAb * W <= N; j += kVecsAb * W)
    tile<T, kRowsAb, kVecsAb, true>(A, sa, sk, B + j, ldb, K, C + j, ldc);
  if (j < N)
    tile_n<T, kRowsAb, kVecsAb - 1, true>(static_cast<int>((N - j) / W), A, sa, sk, B + j, ldb,
                                          K, C + j, ldc);
}

// C[M, N] += A(M, K) * B[K, N]; M a multiple of kRowsAb, N of W.
template <class T>
void gemm_ab(i64 M, i64 N, i64 K, const T* A, i64 sa, i64 sk, const T* B, i64 ldb, T* C,
             i64 ldc) {
  for (i64 i = 0; i < M; i += kRowsAb) rows_ab(N, K, A + i * sa, sa, sk, B, ldb, C + i * ldc, ldc);
}

// ------------------------------------------------------------------------------- masked tiles
// Sparse tiles skip work that the mask would zero anyway. Row r of A only meets columns
// [lo[r], hi[r]] of the result (empty when lo > hi).

// C[M, N] = A[M, K] * Bt[K, N] on the tiles that meet some row's [lo, hi]; the others are
// filled with `fill`. M a multiple of kRowsAbt, N of W.
template <class T>
void gemm_abt_hull(i64 M, i64 N, i64 K, const T* A, i64 lda, const T* Bt, i64 ldb, T* C,
                   i64 ldc, const int32_t* lo, const int32_t* hi, T fill) {
  constexpr int W = VT<T>::W;
  const Vec<T> fv = vset<T>(fill);
  for (i64 i = 0; i < M; i += kRowsAbt) {
    i64 tlo = N, thi = -1;
    for (int r = 0; r < kRowsAbt; ++r) {
      tlo = imin(tlo, lo[i + r]);
      thi = imax(thi, hi[i + r]);
    }
    auto skip = [&](i64 j, i64 width) {
      if (j + width - 1 >= tlo && j <= thi) return false;
      for (int r = 0; r < kRowsAbt; ++r)
        for (i64 x = 0; x < width; x += W) vst(C + (i + r) * ldc + j + x, fv);
      return true;
    };
    i64 j = 0;
    for (; j + kVecsAbt * W <= N; j += kVecsAbt * W) {
      // The rows' hull is one interval: the vectors that meet it are consecutive.
      int v0 = 0, v1 = kVecsAbt - 1;
      while (v0 <= v1 && skip(j + v0 * W, W)) ++v0;
      while (v1 > v0 && skip(j + v1 * W, W)) --v1;
      if (v0 <= v1)
        tile_n<T, kRowsAbt, kVecsAbt, false>(v1 - v0 + 1, A + i * lda, lda, 1, Bt + j + v0 * W,
                                             ldb, K, C + i * ldc + j + v0 * W, ldc);
    }
    for (; j < N; j += W)
      if (!skip(j, W))
        tile_abt<T, kRowsAbt, 1>(A + i * lda, lda, Bt + j, ldb, K, C + i * ldc + j, ldc);
  }
}

// C[M, N] += A(M, K) * B[K, N] where the rows of tile t (kRowsAb rows) only need k in
// [klo[t], khi[t]] (A is zero elsewhere). M a multiple of kRowsAb, N of W.
template <class T>
void gemm_ab_ranged(i64 M, i64 N, const T* A, i64 sa, i64 sk, const T* B, i64 ldb, T* C,
                    i64 ldc, const int32_t* klo, const int32_t* khi) {
  for (i64 i = 0, t = 0; i < M; i += kRowsAb, ++t)
    if (klo[t] <= khi[t])
      rows_ab(N, khi[t] - klo[t] + 1, A + i * sa + klo[t] * sk, sa, sk, B + klo[t] * ldb, ldb,
              C + i * ldc, ldc);
}

// Per tile of kRowsAb rows, the union of the rows' ranges [lo[r], hi[r]].
inline void ranges_by_rows(i64 M, const int32_t* lo, const int32_t* hi, int32_t* tlo,
                           int32_t* thi) {
  for (i64 i = 0, t = 0; i < M; i += kRowsAb, ++t) {
    int32_t a = INT32_MAX, z = -1;
    for (int r = 0; r < kRowsAb; ++r) {
      a = lo[i + r] < a ? lo[i + r] : a;
      z = hi[i + r] > z ? hi[i + r] : z;
    }
    tlo[t] = a;
    thi[t] = z;
  }
}

// The transpose: rows [lo[k], hi[k]] of the result meet column k (k < K); per tile of
// kRowsAb result rows, the first and last such k.
inline void ranges_by_cols(i64 M, i64 K, const int32_t* lo, const int32_t* hi, int32_t* tlo,
                           int32_t* thi) {
  for (i64 i = 0, t = 0; i < M; i += kRowsAb, ++t) {
    const i64 r0 = i, r1 = i + kRowsAb - 1;
    i64 a = 0, z = K - 1;
    while (a < K && (lo[a] > r1 || hi[a] < r0)) ++a;
    while (z > a && (lo[z] > r1 || hi[z] < r0)) --z;
    tlo[t] = static_cast<int32_t>(a);
    thi[t] = static_cast<int32_t>(a < K ? z : -1);
  }
}
