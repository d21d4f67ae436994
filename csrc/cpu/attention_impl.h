// Block-sparse and Transformer-XL attention on CPU: flash-style tiles, online softmax in base 2.
//
// Compiled once per instruction set by isa_*.cpp, which define EFFATTN_ISA (the namespace of the
// exported entry points) and the EFFATTN_TILE_* shapes before including this file, after
// kernels.h and under their target pragma. Everything but the entry points has internal linkage
// (see kernels.h for why).
//
// Scores are kept in base 2: s2 = (q . k) * scale * log2(e), p = 2^(s2 - m), and
// lse = (m + log2(l)) * ln(2); the backward recomputes s2 and takes p = 2^(s2 - lse * log2(e)).
// D is padded to Dp (a multiple of 16) wherever a row must be whole vectors.
//
// Tile orientation follows the loop order. The sparse forward (tasks own query blocks) computes
// transposed tiles St = K . Qt [keys][queries]: K and V are read in place, one transposed query
// block is packed per task, and the softmax runs down columns as plain vector operations. The
// sparse backward (tasks own key blocks) computes row tiles S = Q . Kt [queries][keys] with Kt and
// Vt packed once per key block, Q and dO read in place. Sparse tiles skip the sub-tiles the
// pattern masks entirely (simd.h, "masked tiles"). Transformer-XL keeps row tiles (its
// relative-position terms are read skewed along rows) with r packed once per call; its forward
// transposes each K tile as it uses it and reads V in place (a copy of K and V for every key
// block, made up front, cost more than the tiles for short segments over a long memory: a pass
// through memory that the tiles then read again), its backward packs K and V once per call.
//
// Parallelism and determinism. Forward: one task per (batch, head, query block), each writing
// its own rows. Backward: one task per (batch, kv head, segment of key blocks); a task owns the
// dk / dv rows of its key blocks and accumulates its query gradients into its segment's buffer,
// visiting key blocks, heads of the group and query blocks in a fixed order; the segment
// buffers are then summed in segment order. The number of segments depends only on the problem
// (never on the thread count), so results are bitwise identical for any number of threads.

namespace effattn {
namespace cpu {
namespace {

#include "cpu/simd.h"

constexpr i64 kPad = 16;  // D is padded to a multiple of this many elements (64 B in fp32)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
// Rows this many bytes apart or more are copied before a GEMM reads them repeatedly: they map
// to few cache sets (a page apart, always the same ones), and evict each other when read in place.
constexpr i64 kFarRows = 4096;

inline i64 round_up(i64 x, i64 m) { return (x + m - 1) / m * m; }

template <class T>
class Buf {
 public:
  explicit Buf(i64 n) : p_(static_cast<T*>(alloc_buffer(sizeof(T) * static_cast<size_t>(n)))) {}
  ~Buf() { free_buffer(p_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

template <class F>
void run_parallel(i64 n, int threads, F& f) {
  parallel_for(
      n, threads, [](void* ctx, i64 task, int thread) { (*static_cast<F*>(ctx))(task, thread); },
      &f);
}

// Backward segments: split so that every task has work even with few batch x kv-head pairs,
// from the problem size alone (see the top of the file).
inline int num_segments(i64 pairs, i64 nkb) {
  const i64 want = pairs >= 8 ? 1 : (8 + pairs - 1) / pairs;
  return static_cast<int>(imax(1, imin(imin(want, 4), nkb)));
}

// bounds[0..S]: contiguous key-block ranges of about equal total work.
inline void split_segments(const i64* work, i64 nkb, int S, i64* bounds) {
  i64 total = 0;
  for (i64 kb = 0; kb < nkb; ++kb) total += work[kb];
  bounds[0] = 0;
  i64 acc = 0, kb = 0;
  for (int s = 1; s < S; ++s) {
    const i64 target = total * s / S;
    while (kb < nkb && acc + work[kb] <= target) acc += work[kb++];
    bounds[s] = imax(kb, bounds[s - 1]);
  }
  bounds[S] = nkb;
}

// ------------------------------------------------------------------------------- packing
// Panels of the rows of a [N, D] matrix (element strides sn, sd), zero past n and D:
// transposed blocks dst[kb][d][BN] when `transposed`, else rows dst[j][Dp].
template <class T>
void pack_block(const T* src, i64 sn, i64 sd, i64 n, i64 D, i64 Dp, i64 BN, i64 kb,
                bool transposed, T* dst) {
  const i64 j0 = kb * BN, cnt = imin(BN, n - j0);
  if (transposed) {
    T* blk = dst + kb * D * BN;
    for (i64 jj = 0; jj < cnt; ++jj) {
      const T* row = src + (j0 + jj) * sn;
      for (i64 d = 0; d < D; ++d) blk[d * BN + jj] = row[d * sd];
    }
  } else {
    for (i64 jj = 0; jj < cnt; ++jj) {
      const T* row = src + (j0 + jj) * sn;
      T* out = dst + (j0 + jj) * Dp;
      if (sd == 1) {
        __builtin_memcpy(out, row, sizeof(T) * static_cast<size_t>(D));
      } else {
        for (i64 d = 0; d < D; ++d) out[d] = row[d * sd];
      }
    }
  }
}

// ------------------------------------------------------------------------------- masks
// What one packed term (effattn.patterns.Term: band, modulus, group, columns) allows of a tile
// row or column: the positions i (0 <= i < size) in [a, z], minus [ex_a, ex_z], stepping by
// `step` from a, and (smod > 0) only those with smin <= (base + i) % smod <= smax. Each
// constraint is an interval, so no division runs per element.
struct TermSpan {
  i64 a, z, ex_a, ex_z, step, smod, smin, smax;
};
typedef bool (*SpanOf)(const int32_t* f, i64 x, i64 base, i64 size, TermSpan& out);

// The span of query rows il (position p0 + il, il < BM) that term f allows key j (the columns
// constraint gates j itself).
inline bool term_rows(const int32_t* f, i64 j, i64 p0, i64 BM, TermSpan& out) {
  const i64 lo = f[term::lo], hi = f[term::hi], mod = f[term::mod];
  const i64 gq = f[term::gq], gk = f[term::gk], grel = f[term::grel];
  const i64 smod = f[term::smod], smin = f[term::smin], smax = f[term::smax];
  if (smod > 0) {
    const i64 rem = posmod(j, smod);
    if (rem < smin || rem > smax) return false;
  }
  i64 a = imax(0, j + lo - p0), z = imin(BM - 1, j + hi - p0);  // lo <= p - j <= hi
  i64 ex_a = BM, ex_z = -1;
  if (gq > 0) {
    const i64 g0 = floordiv(j, gk) * gq - p0, g1 = g0 + gq - 1;  // rows of j's group
    if (grel == kGroupEq) {
      a = imax(a, g0);
      z = imin(z, g1);
    } else if (grel == kGroupLt) {
      a = imax(a, g1 + 1);
    } else {
      ex_a = imax(g0, -1);
      ex_z = imin(g1, BM);
    }
  }
  if (mod > 0) {
    a += posmod(j - p0 - a, mod);  // (p - j) % mod == 0
    if (a <= z) z = a + (z - a) / mod * mod;
  }
  out = {a, z, ex_a, ex_z, mod > 0 ? mod : 1, 0, 0, 0};
  return a <= z;
}

// Hull [lo, hi] of the positions that an OR of terms [nt, term::kNumFields] may allow x (Of:
// term_rows or term_cols).
template <SpanOf Of>
inline void term_hull(const int32_t* terms, i64 nt, i64 x, i64 base, i64 size, int32_t& lo,
                      int32_t& hi) {
  i64 l = size, h = -1;
  TermSpan sp;
  for (i64 t = 0; t < nt; ++t)
    if (Of(terms + term::kNumFields * t, x, base, size, sp)) {
      l = imin(l, sp.a);
      h = imax(h, sp.z);
    }
  lo = static_cast<int32_t>(l);
  hi = static_cast<int32_t>(h);
}

// Hides (sets to -inf) the scores s [size] of x at the positions that no term allows:
// intervals (one per period under a columns constraint) compared lane-wise, modulus terms
// position by position. keep: size lanes of scratch.
template <class T, SpanOf Of>
void apply_terms(const int32_t* terms, i64 nt, i64 x, i64 base, i64 size, T* s,
                 typename VT<T>::I* keep) {
  typedef typename VT<T>::I I;
  typedef decltype(I{}[0]) Lane;
  constexpr int W = VT<T>::W;
  I iota;
  for (int l = 0; l < W; ++l) iota[l] = static_cast<Lane>(l);
  for (i64 c = 0; c < size / W; ++c) keep[c] = I{};
  auto add = [&](i64 a, i64 z, i64 ex_a, i64 ex_z) {
    const I va = I{} + static_cast<Lane>(a), vz = I{} + static_cast<Lane>(z);
    const I vea = I{} + static_cast<Lane>(ex_a), vez = I{} + static_cast<Lane>(ex_z);
    for (i64 c = a / W; c <= z / W; ++c) {
      const I i = iota + static_cast<Lane>(c * W);
      keep[c] |= (I)((i >= va) & (i <= vz) & ((i < vea) | (i > vez)));
    }
  };
  TermSpan sp;
  for (i64 t = 0; t < nt; ++t) {
    if (!Of(terms + term::kNumFields * t, x, base, size, sp)) continue;
    if (sp.step > 1) {
      Lane* lanes = reinterpret_cast<Lane*>(keep);
      for (i64 i = sp.a; i <= sp.z; i += sp.step) {
        const i64 rem = sp.smod > 0 ? posmod(base + i, sp.smod) : 0;
        const bool cols_ok = sp.smod == 0 || (rem >= sp.smin && rem <= sp.smax);
        if (cols_ok && (i < sp.ex_a || i > sp.ex_z)) lanes[i] = static_cast<Lane>(-1);
      }
    } else if (sp.smod == 0) {
      add(sp.a, sp.z, sp.ex_a, sp.ex_z);
    } else {
      // Periods [start + smin, start + smax] of the columns constraint, from the one holding a.
      for (i64 st = sp.a - posmod(base + sp.a - sp.smin, sp.smod); st <= sp.z; st += sp.smod)
        add(imax(st, sp.a), imin(st + sp.smax - sp.smin, sp.z), sp.ex_a, sp.ex_z);
    }
  }
  const Vec<T> ninf = vset<T>(neg_inf<T>());
  for (i64 c = 0; c < size / W; ++c) vst(s + c * W, vsel<T>(keep[c], vld(s + c * W), ninf));
}

// Rows [j0, j0 + BN) of an [n, D] matrix (element strides sn, sd) as a row-major block: the
// rows in place when they are contiguous in D, all exist and (need_pad) D fills whole vectors;
// else a copy in `scratch` [BN][Dp], zero past n and D. Sets ld to the row stride.
template <class T>
const T* rows_block(const T* src, i64 sn, i64 sd, i64 n, i64 D, i64 Dp, i64 j0, i64 BN,
                    bool need_pad, T* scratch, i64& ld) {
  const bool far = sn * static_cast<i64>(sizeof(T)) >= kFarRows;
  if (sd == 1 && !far && j0 + BN <= n && (!need_pad || D == Dp)) {
    ld = sn;
    return src + j0 * sn;
  }
  ld = Dp;
  const i64 cnt = imin(BN, n - j0);
  for (i64 jj = 0; jj < BN; ++jj) {
    T* row = scratch + jj * Dp;
    const T* from = src + (j0 + jj) * sn;
    i64 d = 0;
    if (jj < cnt && sd == 1) {
      __builtin_memcpy(row, from, sizeof(T) * static_cast<size_t>(D));
      d = D;
    } else if (jj < cnt) {
      for (; d < D; ++d) row[d] = from[d * sd];
    }
    for (; d < Dp; ++d) row[d] = T(0);
  }
  return scratch;
}

// dst[d][r] = mul * src[r][d] for r < rows (zero for rows <= r < BM): a block of rows transposed.
template <class T>
void pack_t(const T* src, i64 sn, i64 sd, i64 rows, i64 D, i64 BM, T mul, T* dst) {
  constexpr int W = VT<T>::W;
  // W rows at a time, in W x W blocks transposed in registers; the rest element by element.
  // Every element is read once: rows far apart alias in the caches.
  const i64 rv = sd == 1 ? rows / W * W : 0, dv = D / W * W;
  for (i64 r = 0; r < rv; r += W) {
    for (i64 d = 0; d < dv; d += W)
      transpose_block(src + r * sn + d, sn, mul, dst + d * BM + r, BM);
    for (i64 y = r; y < r + W; ++y)
      for (i64 d = dv; d < D; ++d) dst[d * BM + y] = src[y * sn + d] * mul;
  }
  for (i64 r = rv; r < BM; ++r)
    for (i64 d = 0; d < D; ++d) dst[d * BM + r] = r < rows ? src[r * sn + d * sd] * mul : T(0);
}

// ------------------------------------------------------------------------------- softmax
// In place: s[0, n) (base-2 scores) -> 2^(s - m) with m = max(floor, max of s); returns m and
// sets sum. A row with m = -inf (nothing visible) becomes zeros.
template <class T>
T softmax_row(T* s, i64 n, T floor, T& sum) {
  constexpr int W = VT<T>::W;
  const i64 nv = n / W * W;
  Vec<T> mx = vset<T>(floor);
  for (i64 x = 0; x < nv; x += W) mx = vmax<T>(mx, vld(s + x));
  T m = hmax<T>(mx);
  for (i64 x = nv; x < n; ++x) m = s[x] > m ? s[x] : m;
  // Exponents against 0 where nothing is visible: every 2^(-inf) is then 0, never NaN.
  const T safe = m == neg_inf<T>() ? T(0) : m;
  const Vec<T> mv = vset<T>(safe);
  Vec<T> acc = Vec<T>{};
  for (i64 x = 0; x < nv; x += W) {
    const Vec<T> p = vexp2(vld(s + x) - mv);
    vst(s + x, p);
    acc += p;
  }
  sum = hsum<T>(acc);
  for (i64 x = nv; x < n; ++x) {
    s[x] = sexp2(s[x] - safe);
    sum += s[x];
  }
  return m;
}

// One row of the online softmax: s [BN] holds scores in base 2 (masked ones -inf); replaces
// them by probabilities exp2(s - m_new), updates the running max m and sum l, and rescales the
// output accumulator row acc [Dp].
template <class T>
inline void softmax_update(T* s, i64 BN, T& m, T& l, T* acc, i64 Dp) {
  constexpr int W = VT<T>::W;
  T sum;
  const T m_new = softmax_row<T>(s, BN, m, sum);
  if (m_new == neg_inf<T>()) return;
  const T alpha = sexp2(m - m_new);  // 0 on the first visible block (m = -inf)
  l = l * alpha + sum;
  m = m_new;
  if (alpha != T(1)) {
    for (i64 d = 0; d < Dp; d += W) vst(acc + d, vld(acc + d) * alpha);
  }
}

// The online softmax over a transposed tile St [BN][BM] (keys x queries, base 2): per query
// column, running max m and sum l [BM]. Key row jj reaches only the query columns of its hull
// [lo[jj], hi[jj]] (hidden entries inside it are -inf): its vectors outside the hull are never
// read and become zeros, and the hull's end vectors hide their lanes outside it, so a hull that
// is the exact mask needs no other masking. St becomes the probabilities and the accumulator
// rows acc [BM][Dp] are rescaled. tmp: 3 * BM scratch.
template <class T>
void softmax_update_t(T* St, i64 BN, i64 BM, const int32_t* lo, const int32_t* hi, T* m, T* l,
                      T* acc, i64 Dp, T* tmp) {
  constexpr int W = VT<T>::W;
  typedef typename VT<T>::I I;
  typedef decltype(I{}[0]) Lane;
  I iota;
  for (int x = 0; x < W; ++x) iota[x] = static_cast<Lane>(x);
  T* m_safe = tmp;
  T* alpha = tmp + BM;
  T* sum = tmp + 2 * BM;
  const Vec<T> ninf = vset<T>(neg_inf<T>());
  for (i64 c = 0; c < BM; c += W) vst(m_safe + c, vld(m + c));
  for (i64 jj = 0; jj < BN; ++jj) {
    T* s = St + jj * BM;
    const I vlo = I{} + static_cast<Lane>(lo[jj]), vhi = I{} + static_cast<Lane>(hi[jj]);
    for (i64 c = lo[jj] / W * W; c <= hi[jj]; c += W) {
      Vec<T> x = vld(s + c);
      if (c < lo[jj] || c + W - 1 > hi[jj]) {
        const I il = iota + static_cast<Lane>(c);
        x = vsel<T>((I)((il >= vlo) & (il <= vhi)), x, ninf);
        vst(s + c, x);
      }
      vst(m_safe + c, vmax<T>(vld(m_safe + c), x));
    }
  }
  for (i64 c = 0; c < BM; c += W) {
    const Vec<T> m_new = vld(m_safe + c);
    // Columns still without a visible key keep m = -inf; exponents use 0 there (all give 0).
    const Vec<T> safe = vsel<T>(m_new == ninf, Vec<T>{}, m_new);
    vst(alpha + c, vexp2(vld(m + c) - safe));
    vst(m + c, m_new);
    vst(m_safe + c, safe);
    vst(sum + c, Vec<T>{});
  }
  for (i64 jj = 0; jj < BN; ++jj) {
    T* s = St + jj * BM;
    const i64 c0 = lo[jj] <= hi[jj] ? lo[jj] / W * W : BM, c1 = lo[jj] <= hi[jj] ? hi[jj] : -1;
    i64 c = 0;
    for (; c < c0; c += W) vst(s + c, Vec<T>{});
    for (; c <= c1; c += W) {
      const Vec<T> p = vexp2(vld(s + c) - vld(m_safe + c));
      vst(s + c, p);
      vst(sum + c, vld(sum + c) + p);
    }
    for (; c < BM; c += W) vst(s + c, Vec<T>{});
  }
  for (i64 c = 0; c < BM; c += W) vst(l + c, vld(l + c) * vld(alpha + c) + vld(sum + c));
  for (i64 r = 0; r < BM; ++r) {
    if (alpha[r] == T(1)) continue;
    const Vec<T> al = vset<T>(alpha[r]);
    for (i64 d = 0; d < Dp; d += W) vst(acc + r * Dp + d, vld(acc + r * Dp + d) * al);
  }
}

// out[r] = acc[r] / l[r], lse[r] = (m[r] + log2(l[r])) ln 2; zero and -inf for empty rows.
// Rows of out are `so` elements apart, entries of lse `sl`. With `join`, out and lse hold the
// finished result over a disjoint set of keys, which is combined in: each row is read just
// before it is written, since rows far apart evict each other from the caches in between.
template <class T>
void finalize_rows(i64 rows, i64 D, i64 Dp, const T* acc, const T* m, const T* l, T* out,
                   i64 so, T* lse, i64 sl, bool join = false) {
  for (i64 r = 0; r < rows; ++r) {
    T mr = m[r], lr = l[r], w_acc = T(1), w_out = T(0);
    const T prev = join ? lse[r * sl] * T(kLog2e) : neg_inf<T>();
    if (prev > neg_inf<T>()) {
      const T top = mr > prev ? mr : prev;
      w_acc = sexp2(mr - top);  // 0 when these keys left the row empty (mr = -inf)
      w_out = sexp2(prev - top);
      lr = lr * w_acc + w_out;
      mr = top;
    }
    const bool any = lr > T(0);
    const T inv = any ? T(1) / lr : T(0), s_acc = w_acc * inv, s_out = w_out * inv;
    T* o = out + r * so;
    const T* ar = acc + r * Dp;
    if (w_out > T(0)) {
      for (i64 d = 0; d < D; ++d) o[d] = ar[d] * s_acc + o[d] * s_out;
    } else {
      for (i64 d = 0; d < D; ++d) o[d] = ar[d] * s_acc;
    }
    lse[r * sl] = any ? (mr + slog2(lr)) * T(kLn2) : neg_inf<T>();
  }
}

// ------------------------------------------------------------------------------- sparse
// Tiles are transposed: St = K_blk . Qt_blk is [BN keys][BM queries], so K and V are read in
// place (their rows are the GEMM's scalar operand), a query block is packed once per task, the
// softmax runs down columns as vector operations, and a pattern's mask is an interval per key.
struct LayoutRow {
  i64 num_full, num;
  const int32_t* full;
  const int32_t* part;
  const int32_t* tile;  // null unless the layout stores tiles
  i64 block(i64 t) const { return t < num_full ? full[t] : part[t - num_full]; }
  i64 tile_of(i64 t) const { return tile ? tile[t - num_full] : 0; }
};

inline LayoutRow kv_row(const SparseArgs& a, i64 c, i64 qb) {
  const i64 at = c * a.nqb + qb;
  const i64 nf = a.kv_full_num[at];
  return {nf,
          nf + a.kv_part_num[at],
          a.kv_full_idx + at * a.kv_full_w,
          a.kv_part_idx + at * a.kv_part_w,
          a.kv_part_tile ? a.kv_part_tile + at * a.kv_part_w : nullptr};
}

inline LayoutRow q_row(const SparseArgs& a, i64 c, i64 kb) {
  const i64 at = c * a.nkb + kb;
  const i64 nf = a.q_full_num[at];
  return {nf,
          nf + a.q_part_num[at],
          a.q_full_idx + at * a.q_full_w,
          a.q_part_idx + at * a.q_part_w,
          a.q_part_tile ? a.q_part_tile + at * a.q_part_w : nullptr};
}

// The terms of head class c.
inline const int32_t* class_terms(const SparseArgs& a, i64 c) {
  return a.terms + c * a.num_terms * term::kNumFields;
}

// Hides the scores St_row [BM] of key row jj of a partial block that the pattern forbids.
template <class T>
void mask_partial_row(const SparseArgs& a, i64 c, i64 tile, i64 qb, i64 kb, i64 jj, T* s,
                      typename VT<T>::I* keep) {
  if (a.tiles != nullptr) {
    const uint8_t* t = a.tiles + tile * a.BM * a.BN + jj;
    for (i64 il = 0; il < a.BM; ++il)
      if (!t[il * a.BN]) s[il] = neg_inf<T>();
  } else {
    apply_terms<T, term_rows>(class_terms(a, c), a.num_terms, kb * a.BN + jj,
                              a.q_offset + qb * a.BM, a.BM, s, keep);
  }
}

// Whether key j0 + jj is hidden for head (b, h): past n_k or masked.
inline bool key_hidden(const SparseArgs& a, const uint8_t* km, i64 j) {
  return j >= a.n_k || (km != nullptr && km[j * a.skm[2]] != 0);
}

inline const uint8_t* key_mask_of(const SparseArgs& a, i64 b, i64 h) {
  return a.key_mask ? a.key_mask + b * a.skm[0] + h * a.skm[1] : nullptr;
}

// Hides the entries of a partial tile St [BN][BM] that the pattern forbids within the key rows'
// hulls [lo, hi] (softmax_update_t hides the rest). keep: BM elements of scratch.
template <class T>
void mask_tile(const SparseArgs& a, const LayoutRow& lr, i64 t, i64 c, i64 qb, i64 kb,
               const int32_t* lo, const int32_t* hi, T* St, T* keep) {
  for (i64 jj = 0; jj < a.BN; ++jj)
    if (lo[jj] <= hi[jj])
      mask_partial_row<T>(a, c, lr.tile_of(t), qb, kb, jj, St + jj * a.BM,
                          reinterpret_cast<typename VT<T>::I*>(keep));
}

// Whether the hulls of class c's partial tiles are their masks: one term whose query rows per
// key form an interval (no modulus, no excluded group).
inline bool hulls_exact(const SparseArgs& a, i64 c) {
  if (a.tiles != nullptr || a.num_terms != 1) return false;
  const int32_t* f = class_terms(a, c);
  return f[term::mod] == 0 &&
         (f[term::gq] == 0 || f[term::grel] == kGroupEq || f[term::grel] == kGroupLt);
}

// Per key row jj of a tile, the hull [lo, hi] of the query rows it may be seen by: empty for
// hidden keys, everything in full blocks, from the terms or the stored tile in partial ones.
inline void tile_hulls(const SparseArgs& a, const uint8_t* km, const LayoutRow& lr, i64 t,
                       i64 c, i64 qb, i64 kb, int32_t* lo, int32_t* hi) {
  const bool partial = t >= lr.num_full;
  const int32_t BM = static_cast<int32_t>(a.BM);
  for (i64 jj = 0; jj < a.BN; ++jj) {
    lo[jj] = 0;
    hi[jj] = BM - 1;
    if (key_hidden(a, km, kb * a.BN + jj)) {
      lo[jj] = BM;
      hi[jj] = -1;
    } else if (partial && a.tiles != nullptr) {
      const uint8_t* col = a.tiles + lr.tile_of(t) * a.BM * a.BN + jj;
      while (lo[jj] < BM && !col[lo[jj] * a.BN]) ++lo[jj];
      while (hi[jj] >= lo[jj] && !col[hi[jj] * a.BN]) --hi[jj];
    } else if (partial) {
      term_hull<term_rows>(class_terms(a, c), a.num_terms, kb * a.BN + jj,
                           a.q_offset + qb * a.BM, a.BM, lo[jj], hi[jj]);
    }
  }
}

template <class T>
void sparse_forward_impl(const SparseArgs& a) {
  const i64 BM = a.BM, BN = a.BN, D = a.D, Dp = round_up(D, kPad), group = a.H / a.Hkv;
  const T c2 = static_cast<T>(a.scale * kLog2e);
  // Per thread: Q block (transposed), scores, accumulator, K and V copies, m, l, softmax
  // scratch, mask lanes.
  const i64 per_thread = D * BM + BN * BM + BM * Dp + 2 * BN * Dp + 6 * BM;
  Buf<T> scratch(per_thread * a.threads);
  // Per thread: hulls of the key rows, key ranges of the query tiles.
  const i64 per_thread_i = 2 * BN + 2 * BM;
  Buf<int32_t> iscratch(per_thread_i * a.threads);
  auto body = [&](i64 task, int thread) {
    // Late query blocks first: under causal patterns they carry the most work.
    const i64 qb = a.nqb - 1 - task % a.nqb, bh = task / a.nqb, b = bh / a.H, h = bh % a.H;
    const i64 c = h % a.P, hk = h / group;
    const i64 i0 = qb * BM, rows = imin(BM, a.n_q - i0);
    T* qt = scratch.get() + thread * per_thread;
    T* St = qt + D * BM;
    T* acc = St + BN * BM;
    T* kbuf = acc + BM * Dp;
    T* vbuf = kbuf + BN * Dp;
    T* m = vbuf + BN * Dp;
    T* l = m + BM;
    T* tmp = l + BM;
    T* keep = tmp + 3 * BM;
    int32_t* lo = iscratch.get() + thread * per_thread_i;
    int32_t* hi = lo + BN;
    int32_t* klo = hi + BN;
    int32_t* khi = klo + BM;
    const T* q = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1] + i0 * a.sq[2];
    const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
    const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
    const uint8_t* km = key_mask_of(a, b, h);
    const LayoutRow lr = kv_row(a, c, qb);
    const bool exact = hulls_exact(a, c);

    T* out = static_cast<T*>(a.out) + b * a.so[0] + h * a.so[1] + i0 * a.so[2];
    T* lse = static_cast<T*>(a.lse) + b * a.sl[0] + h * a.sl[1] + i0 * a.sl[2];

    pack_t(q, a.sq[2], a.sq[3], rows, D, BM, c2, qt);
    for (i64 x = 0; x < BM * Dp; ++x) acc[x] = T(0);
    for (i64 r = 0; r < BM; ++r) {
      m[r] = neg_inf<T>();
      l[r] = T(0);
    }
    for (i64 t = 0; t < lr.num; ++t) {
      const i64 kb = lr.block(t), j0 = kb * BN;
      i64 ldk, ldv;
      const T* kr = rows_block(k, a.sk[2], a.sk[3], a.n_k, D, Dp, j0, BN, false, kbuf, ldk);
      tile_hulls(a, km, lr, t, c, qb, kb, lo, hi);
      gemm_abt_hull<T>(BN, BM, D, kr, ldk, qt, BM, St, BM, lo, hi, neg_inf<T>());
      if (t >= lr.num_full && !exact) mask_tile<T>(a, lr, t, c, qb, kb, lo, hi, St, keep);
      softmax_update_t<T>(St, BN, BM, lo, hi, m, l, acc, Dp, tmp);
      const T* vr = rows_block(v, a.sv[2], a.sv[3], a.n_k, D, Dp, j0, BN, true, vbuf, ldv);
      ranges_by_cols(BM, BN, lo, hi, klo, khi);
      gemm_ab_ranged<T>(BM, Dp, St, 1, BM, vr, ldv, acc, Dp, klo, khi);
    }
    finalize_rows<T>(rows, D, Dp, acc, m, l, out, a.so[2], lse, a.sl[2], a.join);
  };
  run_parallel(a.B * a.H * a.nqb, a.threads, body);
}

// The backward works in row orientation (S = Q . Kt, [BM queries][BN keys]): its tasks own key
// blocks, so K and V are transposed once per key block and Q and dO are read in place. Its
// masks are the terms seen from a query: the keys each allows.

// The span of key columns jj (key j0 + jj, jj < BN) that term f allows query position p.
inline bool term_cols(const int32_t* f, i64 p, i64 j0, i64 BN, TermSpan& out) {
  const i64 lo = f[term::lo], hi = f[term::hi], mod = f[term::mod];
  const i64 gq = f[term::gq], gk = f[term::gk], grel = f[term::grel];
  const i64 smod = f[term::smod], smin = f[term::smin], smax = f[term::smax];
  i64 a = imax(0, p - hi - j0), z = imin(BN - 1, p - lo - j0);  // lo <= p - j <= hi
  i64 ex_a = BN, ex_z = -1;
  if (gq > 0) {
    const i64 g0 = floordiv(p, gq) * gk - j0, g1 = g0 + gk - 1;  // keys of p's group
    if (grel == kGroupEq) {
      a = imax(a, g0);
      z = imin(z, g1);
    } else if (grel == kGroupLt) {
      z = imin(z, g0 - 1);
    } else {
      ex_a = imax(g0, -1);
      ex_z = imin(g1, BN);
    }
  }
  if (mod > 0) {
    a += posmod(p - j0 - a, mod);  // (p - j) % mod == 0
    if (a <= z) z = a + (z - a) / mod * mod;
  } else if (smod > 0 && a <= z) {
    // Tighten to the first and last allowed columns (hull only: the periods between remain).
    const i64 ra = posmod(j0 + a, smod), rz = posmod(j0 + z, smod);
    if (ra < smin) a += smin - ra;
    if (ra > smax) a += smod - ra + smin;
    if (rz > smax) z -= rz - smax;
    if (rz < smin) z -= rz + 1 + (smod - 1 - smax);
  }
  out = {a, z, ex_a, ex_z, mod > 0 ? mod : 1, smod, smin, smax};
  return a <= z;
}



// Row-oriented tile (query block qb, key block kb): per query row il the hull [lo, hi] of its
// possible keys (empty past n_q), and the pattern applied to the scores S [BM][BN].
inline void row_hulls(const SparseArgs& a, const LayoutRow& lr, i64 t, i64 c, i64 qb, i64 kb,
                      int32_t* lo, int32_t* hi) {
  const bool partial = t >= lr.num_full;
  const int32_t BN = static_cast<int32_t>(a.BN);
  for (i64 il = 0; il < a.BM; ++il) {
    lo[il] = 0;
    hi[il] = BN - 1;
    if (qb * a.BM + il >= a.n_q) {
      lo[il] = BN;
      hi[il] = -1;
    } else if (partial && a.tiles != nullptr) {
      const uint8_t* row = a.tiles + (lr.tile_of(t) * a.BM + il) * a.BN;
      while (lo[il] < BN && !row[lo[il]]) ++lo[il];
      while (hi[il] >= lo[il] && !row[hi[il]]) --hi[il];
    } else if (partial) {
      term_hull<term_cols>(class_terms(a, c), a.num_terms, a.q_offset + qb * a.BM + il,
                           kb * a.BN, a.BN, lo[il], hi[il]);
    }
  }
}

template <class T>
void mask_rows(const SparseArgs& a, const LayoutRow& lr, i64 t, i64 c, i64 qb, i64 kb,
               const T* colb, T* S, T* keep) {
  constexpr int W = VT<T>::W;
  const bool partial = t >= lr.num_full;
  for (i64 il = 0; il < a.BM && qb * a.BM + il < a.n_q; ++il) {
    T* s = S + il * a.BN;
    if (partial && a.tiles != nullptr) {
      const uint8_t* row = a.tiles + (lr.tile_of(t) * a.BM + il) * a.BN;
      for (i64 jj = 0; jj < a.BN; ++jj)
        if (!row[jj]) s[jj] = neg_inf<T>();
    } else if (partial) {
      apply_terms<T, term_cols>(class_terms(a, c), a.num_terms, a.q_offset + qb * a.BM + il,
                                kb * a.BN, a.BN, s, reinterpret_cast<typename VT<T>::I*>(keep));
    }
    if (colb)
      for (i64 jj = 0; jj < a.BN; jj += W) vst(s + jj, vld(s + jj) + vld(colb + jj));
  }
}

template <class T>
void sparse_backward_impl(const SparseArgs& a) {
  const i64 BM = a.BM, BN = a.BN, D = a.D, Dp = round_up(D, kPad);
  const i64 NQP = a.nqb * BM, pairs = a.B * a.Hkv, group = a.H / a.Hkv, BH = a.B * a.H;
  const T c2 = static_cast<T>(a.scale * kLog2e), scale = static_cast<T>(a.scale);

  // lse in base 2 (+inf for rows without gradient, whose probabilities are then 0) and delta.
  Buf<T> lse2(BH * NQP), dlt(BH * NQP);
  auto pack_q = [&](i64 bh, int) {
    const T* lse = static_cast<const T*>(a.lse_in) + bh * a.n_q;
    const T* delta = static_cast<const T*>(a.delta) + bh * a.n_q;
    for (i64 i = 0; i < NQP; ++i) {
      const bool ok = i < a.n_q && lse[i] > neg_inf<T>() && lse[i] < pos_inf<T>();
      lse2.get()[bh * NQP + i] = ok ? lse[i] * T(kLog2e) : pos_inf<T>();
      dlt.get()[bh * NQP + i] = ok ? delta[i] : T(0);
    }
  };
  run_parallel(BH, a.threads, pack_q);

  const int S = num_segments(pairs, a.nkb);
  i64 bounds[5];
  {
    Buf<i64> work(a.nkb);
    for (i64 kb = 0; kb < a.nkb; ++kb)
      for (i64 h = 0; h < a.H; ++h) work.get()[kb] += q_row(a, h % a.P, kb).num;
    split_segments(work.get(), a.nkb, S, bounds);
  }
  Buf<T> dqbuf(S * BH * NQP * Dp);

  // Per thread: P and dP / dS tiles [BM][BN], dK and dV accumulators, K rows, Kt (times
  // scale * log2 e) and Vt blocks [D][BN], Q and dO row copies, column bias, mask lanes.
  const i64 per_thread = 2 * BM * BN + 3 * BN * Dp + 2 * D * BN + 2 * BM * Dp + 2 * BN;
  Buf<T> scratch(per_thread * a.threads);
  // Per thread: key hulls of the query rows, their ranges per tile of keys and of queries.
  const i64 per_thread_i = 2 * BM + 2 * BN + 2 * BM;
  Buf<int32_t> iscratch(per_thread_i * a.threads);
  auto body = [&](i64 task, int thread) {
    const int seg = static_cast<int>(task % S);
    const i64 bk = task / S, b = bk / a.Hkv, hk = bk % a.Hkv;
    T* P = scratch.get() + thread * per_thread;
    T* dS = P + BM * BN;
    T* dk_acc = dS + BM * BN;
    T* dv_acc = dk_acc + BN * Dp;
    T* kbuf = dv_acc + BN * Dp;
    T* kt = kbuf + BN * Dp;
    T* vt = kt + D * BN;
    T* qbuf = vt + D * BN;
    T* dobuf = qbuf + BM * Dp;
    T* colb = dobuf + BM * Dp;
    T* keep = colb + BN;
    int32_t* lo = iscratch.get() + thread * per_thread_i;
    int32_t* hi = lo + BM;
    int32_t* qlo = hi + BM;
    int32_t* qhi = qlo + BN;
    int32_t* klo = qhi + BN;
    int32_t* khi = klo + BM;
    const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
    const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
    for (i64 kb = bounds[seg]; kb < bounds[seg + 1]; ++kb) {
      const i64 j0 = kb * BN, cnt = imin(BN, a.n_k - j0);
      i64 ldk;
      const T* kr = rows_block(k, a.sk[2], a.sk[3], a.n_k, D, Dp, j0, BN, true, kbuf, ldk);
      pack_t(k + j0 * a.sk[2], a.sk[2], a.sk[3], cnt, D, BN, c2, kt);
      pack_t(v + j0 * a.sv[2], a.sv[2], a.sv[3], cnt, D, BN, T(1), vt);
      for (i64 x = 0; x < 2 * BN * Dp; ++x) dk_acc[x] = T(0);
      for (i64 g = 0; g < group; ++g) {
        const i64 h = hk * group + g, bh = b * a.H + h, c = h % a.P;
        const uint8_t* km = key_mask_of(a, b, h);
        bool any_hidden = false;
        for (i64 jj = 0; jj < BN; ++jj) {
          const bool hidden = key_hidden(a, km, j0 + jj);
          colb[jj] = hidden ? neg_inf<T>() : T(0);
          any_hidden |= hidden;
        }
        const LayoutRow lr = q_row(a, c, kb);
        T* dq_bh = dqbuf.get() + (seg * BH + bh) * NQP * Dp;
        const T* q_bh = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1];
        const T* do_bh = static_cast<const T*>(a.dout) + b * a.sdo[0] + h * a.sdo[1];
        for (i64 t = 0; t < lr.num; ++t) {
          const i64 qb = lr.block(t), i0 = qb * BM;
          i64 ldq, ldo;
          const T* qr = rows_block(q_bh, a.sq[2], a.sq[3], a.n_q, D, Dp, i0, BM, true, qbuf, ldq);
          const T* dor =
              rows_block(do_bh, a.sdo[2], a.sdo[3], a.n_q, D, Dp, i0, BM, true, dobuf, ldo);
          row_hulls(a, lr, t, c, qb, kb, lo, hi);
          gemm_abt_hull<T>(BM, BN, D, qr, ldq, kt, BN, P, BN, lo, hi, neg_inf<T>());
          gemm_abt_hull<T>(BM, BN, D, dor, ldo, vt, BN, dS, BN, lo, hi, T(0));
          mask_rows<T>(a, lr, t, c, qb, kb, any_hidden ? colb : nullptr, P, keep);
          // dS carries the score scale, so dK and dQ need no final scaling.
          const T* l2 = lse2.get() + bh * NQP + i0;
          const T* dl = dlt.get() + bh * NQP + i0;
          for (i64 il = 0; il < BM; ++il) {
            const Vec<T> lv = vset<T>(l2[il]), dv = vset<T>(dl[il]);
            for (i64 jj = 0; jj < BN; jj += VT<T>::W) {
              const Vec<T> p = vexp2(vld(P + il * BN + jj) - lv);
              vst(P + il * BN + jj, p);
              vst(dS + il * BN + jj, p * (vld(dS + il * BN + jj) - dv) * scale);
            }
          }
          ranges_by_cols(BN, BM, lo, hi, qlo, qhi);
          gemm_ab_ranged<T>(BN, Dp, P, 1, BN, dor, ldo, dv_acc, Dp, qlo, qhi);
          gemm_ab_ranged<T>(BN, Dp, dS, 1, BN, qr, ldq, dk_acc, Dp, qlo, qhi);
          ranges_by_rows(BM, lo, hi, klo, khi);
          gemm_ab_ranged<T>(BM, Dp, dS, BN, 1, kr, ldk, dq_bh + i0 * Dp, Dp, klo, khi);
        }
      }
      T* dk = static_cast<T*>(a.dk) + (bk * a.n_k + j0) * D;
      T* dvo = static_cast<T*>(a.dv) + (bk * a.n_k + j0) * D;
      for (i64 jj = 0; jj < cnt; ++jj)
        for (i64 d = 0; d < D; ++d) {
          dk[jj * D + d] = dk_acc[jj * Dp + d];
          dvo[jj * D + d] = dv_acc[jj * Dp + d];
        }
    }
  };
  run_parallel(pairs * S, a.threads, body);

  auto reduce = [&](i64 task, int) {
    const i64 qb = task % a.nqb, bh = task / a.nqb;
    const i64 i0 = qb * BM, rows = imin(BM, a.n_q - i0);
    T* dq = static_cast<T*>(a.dq) + (bh * a.n_q + i0) * D;
    for (i64 r = 0; r < rows; ++r)
      for (i64 d = 0; d < D; ++d) {
        T sum = T(0);
        for (int s = 0; s < S; ++s) sum += dqbuf.get()[((s * BH + bh) * NQP + i0 + r) * Dp + d];
        dq[r * D + d] = sum;
      }
  };
  run_parallel(BH * a.nqb, a.threads, reduce);
}

// ------------------------------------------------------------------------------- XL
// Relative scores without the [L, N] matrix: for a tile of query rows [i0, i0 + BM) and keys
// [j0, j0 + BN), the distances d = M + i - j form a band of BM + BN - 1 consecutive values.
// The band of (q + vb) . r[min(d, R - 1)] is one GEMM against a table of r ordered by
// *decreasing* distance (column y holds distance Y0 - y), so that the score of (il, jl) sits at
// band column jl - il + BM - 1: contiguous in jl, a vector add per row. Tiles entirely beyond
// R - 1 see one clamped r row: a per-row constant.
struct XlGeom {
  i64 M, BM, BN, BW, Y0, Ylen, nqb, nkb, NKP, NQP, Dp;

  XlGeom(const XlArgs& a)
      : M(a.N - a.L),
        BM(a.BM),
        BN(a.BN),
        BW(a.BM + a.BN),
        Y0(a.N + a.BM - 2),
        Ylen(0),
        nqb((a.L + a.BM - 1) / a.BM),
        nkb((a.N + a.BN - 1) / a.BN),
        NKP(nkb * a.BN),
        NQP(nqb * a.BM),
        Dp(round_up(a.D, kPad)) {
    // Distances span [-(BM + BN), Y0]; an extra vector of slack, and a row stride that is not a
    // multiple of 4 KiB (cache-set aliasing between the D rows of a band load).
    Ylen = round_up(Y0 + BW + kPad + 1, kPad);
    if (Ylen % 256 == 0) Ylen += kPad;
  }
  i64 dist_top(i64 i0, i64 j0) const { return M + i0 - j0 + BM - 1; }  // distance at column 0
  i64 band_start(i64 i0, i64 j0) const { return Y0 - dist_top(i0, j0); }
  // Whether the tile holds any visible (query row < L, key < N) pair at distance in range.
  bool visible(const XlArgs& a, i64 i0, i64 j0) const {
    const i64 dmax = M + imin(i0 + BM, a.L) - 1 - j0, dmin = M + i0 - imin(j0 + BN, a.N) + 1;
    return dmax >= 0 && (a.window == 0 || dmin < a.window);
  }
};

// Tables of r by decreasing distance: rt [H][D][Ylen] (transposed, for the score band) and
// optionally rp [H][Ylen][Dp] (rows, for dQ); zero for negative distances.
template <class T>
void pack_r(const XlArgs& a, const XlGeom& g, T* rt, T* rp) {
  auto body = [&](i64 h, int) {
    const T* r = static_cast<const T*>(a.r) + h * a.sr[0];
    for (i64 y = 0; y < g.Ylen; ++y) {
      const i64 dist = g.Y0 - y;
      if (dist < 0) continue;
      const T* row = r + imin(dist, a.R - 1) * a.sr[1];
      for (i64 d = 0; d < a.D; ++d) {
        rt[(h * a.D + d) * g.Ylen + y] = row[d * a.sr[2]];
        if (rp) rp[(h * g.Ylen + y) * g.Dp + d] = row[d * a.sr[2]];
      }
    }
  };
  run_parallel(a.H, a.threads, body);
}

// Scores of one XL tile in base 2 into S [BM][BN], masked: qu = q + u, qv = q + vb blocks
// [BM][ld]; band [BM][BW] scratch; bdc [BM] the clamped per-row constant.
template <class T>
void xl_scores(const XlArgs& a, const XlGeom& g, i64 h, i64 i0, i64 j0, const T* qu,
               const T* qv, i64 ld, const T* kt_blk, const T* rt, const T* bdc, T c2, T* band,
               T* S) {
  constexpr int W = VT<T>::W;
  const i64 BM = g.BM, BN = g.BN, D = a.D;
  gemm_abt<T>(BM, BN, D, qu, ld, kt_blk, BN, S, BN);
  const i64 top = g.dist_top(i0, j0), dmin = top - (g.BW - 2);
  if (dmin >= a.R - 1) {
    for (i64 r = 0; r < BM; ++r) {
      const Vec<T> cv = vset<T>(bdc[r]);
      for (i64 j = 0; j < BN; j += W) vst(S + r * BN + j, vld(S + r * BN + j) + cv);
    }
  } else {
    gemm_abt<T>(BM, g.BW, D, qv, ld, rt + h * D * g.Ylen + g.band_start(i0, j0), g.Ylen, band,
                g.BW);
    for (i64 r = 0; r < BM; ++r) {
      const T* br = band + r * g.BW + (BM - 1 - r);
      for (i64 j = 0; j < BN; j += W) vst(S + r * BN + j, vld(S + r * BN + j) + vld(br + j));
    }
  }
  // Visible keys of row il: distance M + i0 + il - j0 - jl in [0, window), key < N.
  const bool full = dmin >= 0 && (a.window == 0 || top < a.window) && j0 + BN <= a.N;
  for (i64 r = 0; r < BM; ++r) {
    T* s = S + r * BN;
    for (i64 j = 0; j < BN; j += W) vst(s + j, vld(s + j) * c2);
    if (full) continue;
    const i64 d0 = g.M + i0 + r - j0;  // distance at jl = 0
    const i64 hi = imin(imin(BN - 1, d0), a.N - 1 - j0);
    const i64 lo = a.window ? imax(0, d0 - a.window + 1) : 0;
    for (i64 jl = 0; jl < BN; ++jl)
      if (jl < lo || jl > hi) s[jl] = neg_inf<T>();
  }
}

// (q + u) and (q + vb) rows of query block qb into [BM][ld] (zero past L and D).
template <class T>
void xl_pack_q(const XlArgs& a, i64 b, i64 h, i64 i0, i64 BM, i64 ld, T* qu, T* qv) {
  const T* q = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1];
  const T* u = static_cast<const T*>(a.u) + h * a.su[0];
  const T* vb = static_cast<const T*>(a.vb) + h * a.svb[0];
  for (i64 r = 0; r < BM; ++r) {
    const bool in = i0 + r < a.L;
    for (i64 d = 0; d < ld; ++d) {
      const T x = in && d < a.D ? q[(i0 + r) * a.sq[2] + d * a.sq[3]] : T(0);
      qu[r * ld + d] = in && d < a.D ? x + u[d * a.su[1]] : T(0);
      qv[r * ld + d] = in && d < a.D ? x + vb[d * a.svb[1]] : T(0);
    }
  }
}

// bdc[r] = qv[r] . r[R - 1], the score term of every clamped distance.
template <class T>
void xl_clamped(const XlArgs& a, i64 h, const T* qv, i64 ld, i64 BM, T* bdc) {
  const T* rl = static_cast<const T*>(a.r) + h * a.sr[0] + (a.R - 1) * a.sr[1];
  for (i64 r = 0; r < BM; ++r) {
    T s = T(0);
    for (i64 d = 0; d < a.D; ++d) s += qv[r * ld + d] * rl[d * a.sr[2]];
    bdc[r] = s;
  }
}

// ------------------------------------------------------------------------------- XL rows
// Few query rows per head: decoding (L = 1) and short segments, where a 64 x 64 tile would
// compute 64 rows for one. A task takes one kv head, a split of the keys and a block of the
// batch. It first computes, per query row, the position terms E[y] = (q + vb) . r[dist] of every
// distance the split spans (r rows are shared by the batch: each is read once per task, not
// once per batch entry), then per row the scores (q + u) . k_j + E[y(j)], their softmax and
// sum_j p_j v_j, reading K and V in place: one pass over each, the cost of a decoding step.
// Per (row, split) the partial softmax (max, sum, unnormalized output) is merged in split order
// afterwards. Splits and batch blocks depend only on the problem, so results are bitwise
// identical for any thread count.
constexpr i64 kXlRowsMax = 8;        // query rows per head up to which rows beat tiles
constexpr i64 kXlSplitMin = 256;     // keys per split: at least (merge and E-table overhead) ..
constexpr i64 kXlSplitMax = 1024;    // .. at most (scores buffer and E table stay in cache)
constexpr i64 kXlTasks = 32;         // splits are added (down to kXlSplitMin) up to this many tasks
constexpr i64 kXlTaskRows = 128;     // query rows per task (batch block x group x L), at most
constexpr i64 kXlPrefetch = 16;      // K rows prefetched ahead of the scores
constexpr i64 kXlEChunk = 8;         // key blocks per position-term GEMM of the tiled forward

// Whether xl_forward_impl runs the row kernel: few rows, and K, V, r rows contiguous in D (the
// dot products load them in place).
inline bool xl_rows_path(const XlArgs& a) {
  return a.L <= kXlRowsMax && a.sk[3] == 1 && a.sv[3] == 1 && a.sr[2] == 1;
}

// Dot products of one vector with many rows end in horizontal sums. Folding W accumulators
// (W rows) pairwise, each step adding the lower and upper halves of every group of lanes,
// leaves one vector of the W sums in row order: W - 1 shuffle-and-add steps for W rows
// instead of log2(W) per row. Lanes are picked by index lists, which compilers turn into lane
// permutes (a memcpy of half vectors would go through the stack).
template <int W, int C>
struct FoldLanes {
  // Output lane o: group o / (C / 2), the first W / C groups from x, the others from y, and
  // lane o % (C / 2) in it; its inputs are lanes lane(o) and lane(o) + C / 2 of that vector.
  static constexpr bool from_x(int o) { return o / (C / 2) < W / C; }
  static constexpr int lane(int o) { return (o / (C / 2)) % (W / C) * C + o % (C / 2); }
};
template <class T, int C, std::size_t... O>
EFFATTN_VINLINE Vec<T> fold_pair(Vec<T> x, Vec<T> y, std::index_sequence<O...>) {
  typedef FoldLanes<VT<T>::W, C> F;
  const Vec<T> lo = {(F::from_x(O) ? x[F::lane(O)] : y[F::lane(O)])...};
  const Vec<T> hi = {(F::from_x(O) ? x[F::lane(O) + C / 2] : y[F::lane(O) + C / 2])...};
  return lo + hi;
}
// v[0 .. N) with C lanes per row -> v[0] holds the N * C / W ... sums; call with C = N = W.
template <class T, int C, int N>
EFFATTN_VINLINE void fold_rows(Vec<T>* v) {
  if constexpr (C > 1) {
#pragma GCC unroll 32
    for (int k = 0; k < N / 2; ++k)
      v[k] = fold_pair<T, C>(v[2 * k], v[2 * k + 1], std::make_index_sequence<VT<T>::W>{});
    fold_rows<T, C / 2, N / 2>(v);
  }
}

// out[j] = x . y_j for W rows y_j = y0 + j * ystep, NV vectors of D from d0 (x padded to whole
// vectors). Row by row, so that memory is read in address order (the hardware prefetchers
// follow it; interleaving the rows' loads measured 2x slower from DRAM); the W rows' sums are
// independent, which hides the FMA latency.
template <class T, int NV>
EFFATTN_VINLINE void dots_w_part(const T* x, const T* y0, i64 ystep, Vec<T>* acc) {
  constexpr int W = VT<T>::W;
  Vec<T> xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) xv[v] = vld(x + v * W);
#pragma GCC unroll 32
  for (int c = 0; c < W; ++c) {
    const T* y = y0 + c * ystep;
    Vec<T> s = acc[c] + xv[0] * vld(y);
#pragma GCC unroll 8
    for (int v = 1; v < NV; ++v) s += xv[v] * vld(y + v * W);
    acc[c] = s;
  }
}

template <class T>
EFFATTN_VINLINE void dots_w(const T* x, const T* y0, i64 ystep, i64 Dv, i64 D, T* out) {
  constexpr int W = VT<T>::W;
  Vec<T> acc[W];
#pragma GCC unroll 32
  for (int c = 0; c < W; ++c) acc[c] = Vec<T>{};
  for (i64 d0 = 0; d0 < Dv; d0 += 4 * W) {
    switch ((Dv - d0) / W) {
      case 1:
        dots_w_part<T, 1>(x + d0, y0 + d0, ystep, acc);
        break;
      case 2:
        dots_w_part<T, 2>(x + d0, y0 + d0, ystep, acc);
        break;
      case 3:
        dots_w_part<T, 3>(x + d0, y0 + d0, ystep, acc);
        break;
      default:
        dots_w_part<T, 4>(x + d0, y0 + d0, ystep, acc);
    }
  }
  fold_rows<T, W, W>(acc);
  vst(out, acc[0]);
  if (Dv < D)
    for (int c = 0; c < W; ++c)
      for (i64 d = Dv; d < D; ++d) out[c] += x[d] * y0[c * ystep + d];
}

// out[j] = x . y_j for n rows y_j = y0 + j * ystep.
template <class T>
void dots_range(const T* x, const T* y0, i64 ystep, i64 n, i64 Dv, i64 D, T* out) {
  constexpr int W = VT<T>::W;
  i64 j = 0;
  for (; j + W <= n; j += W) {
    // The rows kXlPrefetch ahead: the hardware prefetchers alone left the K pass at about half
    // the bandwidth of a plain read of the same rows (16 rows, 4 KiB for D = 64 in fp32,
    // measured best among 8, 16 and 24; prefetching V in its pass did not help).
    for (int c = 0; c < W; ++c)
      for (i64 d = 0; d < D; d += 64 / sizeof(T))
        __builtin_prefetch(y0 + (j + kXlPrefetch + c) * ystep + d);
    dots_w<T>(x, y0 + j * ystep, ystep, Dv, D, out + j);
  }
  for (; j < n; ++j) {
    const T* y = y0 + j * ystep;
    Vec<T> acc = Vec<T>{};
    for (i64 d = 0; d < Dv; d += W) acc += vld(x + d) * vld(y + d);
    T s = hsum<T>(acc);
    for (i64 d = Dv; d < D; ++d) s += x[d] * y[d];
    out[j] = s;
  }
}

// acc [NV vectors] = sum_j p_j v_j over n rows of V (vstep apart), two keys at a time into
// separate accumulators (FMA latency).
template <class T, int NV>
void pv_vecs(const T* p, const T* v0, i64 vstep, i64 n, T* acc) {
  constexpr int W = VT<T>::W;
  Vec<T> a0[NV], a1[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) a0[c] = a1[c] = Vec<T>{};
  i64 j = 0;
  for (; j + 2 <= n; j += 2) {
    const T* x = v0 + j * vstep;
    const Vec<T> p0 = vset<T>(p[j]), p1 = vset<T>(p[j + 1]);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      a0[c] += p0 * vld(x + c * W);
      a1[c] += p1 * vld(x + vstep + c * W);
    }
  }
  if (j < n) {
    const Vec<T> p0 = vset<T>(p[j]);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) a0[c] += p0 * vld(v0 + j * vstep + c * W);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) vst(acc + c * W, a0[c] + a1[c]);
}

// acc [D] = sum_j p_j v_j: four vectors of D per pass over V (they stay in registers), the
// last D % W elements by scalars.
template <class T>
void pv_rows(const T* p, const T* v0, i64 vstep, i64 n, i64 Dv, i64 D, T* acc) {
  constexpr int W = VT<T>::W;
  for (i64 d0 = 0; d0 < Dv; d0 += 4 * W) {
    switch ((Dv - d0) / W) {
      case 1:
        pv_vecs<T, 1>(p, v0 + d0, vstep, n, acc + d0);
        break;
      case 2:
        pv_vecs<T, 2>(p, v0 + d0, vstep, n, acc + d0);
        break;
      case 3:
        pv_vecs<T, 3>(p, v0 + d0, vstep, n, acc + d0);
        break;
      default:
        pv_vecs<T, 4>(p, v0 + d0, vstep, n, acc + d0);
    }
  }
  for (i64 d = Dv; d < D; ++d) {
    T s = T(0);
    for (i64 j = 0; j < n; ++j) s += p[j] * v0[j * vstep + d];
    acc[d] = s;
  }
}

template <class T>
void xl_rows_forward(const XlArgs& a) {
  constexpr int W = VT<T>::W;
  const i64 D = a.D, Dp = round_up(D, kPad), Dv = D / W * W, L = a.L, M = a.N - L;
  const i64 group = a.H / a.Hkv;
  // Keys some row sees: [j_first, N) (row 0 sees the fewest with a window).
  const i64 j_first = a.window ? imax(0, M - a.window + 1) : 0, span = a.N - j_first;
  const i64 bbw = imax(1, imin(a.B, kXlTaskRows / (group * L))), nbb = (a.B + bbw - 1) / bbw;
  const i64 units = a.Hkv * nbb;
  i64 S = imax((span + kXlSplitMax - 1) / kXlSplitMax,
               imin((span + kXlSplitMin - 1) / kXlSplitMin, (kXlTasks + units - 1) / units));
  const i64 slen = round_up((span + S - 1) / S, kPad);
  S = (span + slen - 1) / slen;
  // A task's query rows, (head of the group, batch entry, i), are handled per head, whose E
  // has a column per row: RW >= bbw * L of them (whole vectors).
  const i64 rows = bbw * group * L, RW = round_up(bbw * L, W);
  const i64 Y = round_up(slen + L - 1, W);  // distances a split spans, at most
  const T c2 = static_cast<T>(a.scale * kLog2e);
  // Per thread: qu and qv [rows][Dp], per head qv^T [D][RW] and E [Y * RW], scores, an
  // output row.
  const i64 per_thread = 2 * rows * Dp + group * (D + Y) * RW + round_up(slen, W) + Dp;
  Buf<T> scratch(per_thread * a.threads);
  const i64 part_w = Dp + 2;  // max, sum, output
  Buf<T> parts(S > 1 ? a.B * a.H * L * S * part_w : 1);

  auto body = [&](i64 task, int thread) {
    const i64 bb = task % nbb, s = task / nbb % S, hk = task / (nbb * S);
    const i64 b0 = bb * bbw, nb = imin(bbw, a.B - b0);
    const i64 ja = j_first + s * slen, jb = imin(a.N, ja + slen);
    // E[y, c] = (q + vb)_c . r[min(dist, R - 1)] for the distances dist = dtop - y of the
    // split (dtop: row L - 1 and key ja); query row i meets key j at y = L - 1 - i + j - ja.
    const i64 dtop = M + L - 1 - ja, ny = jb - ja + L - 1;
    T* qu = scratch.get() + thread * per_thread;
    T* qv = qu + rows * Dp;
    T* qvt = qv + rows * Dp;      // [group][D][RW]
    T* E = qvt + group * D * RW;  // [group][Y * RW]
    T* sc = E + group * Y * RW;
    T* o = sc + round_up(slen, W);
    for (i64 x = 0; x < group * D * RW; ++x) qvt[x] = T(0);
    for (i64 gi = 0; gi < group; ++gi) {
      const i64 h = hk * group + gi;
      const T* u = static_cast<const T*>(a.u) + h * a.su[0];
      const T* vb = static_cast<const T*>(a.vb) + h * a.svb[0];
      for (i64 bl = 0; bl < nb; ++bl) {
        const T* q = static_cast<const T*>(a.q) + (b0 + bl) * a.sq[0] + h * a.sq[1];
        for (i64 i = 0; i < L; ++i) {
          T* qur = qu + ((gi * nb + bl) * L + i) * Dp;
          T* qvr = qv + ((gi * nb + bl) * L + i) * Dp;
          T* qvc = qvt + gi * D * RW + bl * L + i;
          for (i64 d = 0; d < Dp; ++d) {
            const T x = d < D ? q[i * a.sq[2] + d * a.sq[3]] : T(0);
            qur[d] = d < D ? x + u[d * a.su[1]] : T(0);
            qvr[d] = d < D ? x + vb[d * a.svb[1]] : T(0);
            if (d < D) qvc[d * RW] = qvr[d];
          }
        }
      }
    }
    // Per head: r rows of distances >= R - 1 are all r[R - 1] (y <= y_clamp); the others are
    // read in place backwards from distance dtop - y0. Negative distances (y > dtop) are never
    // read. With many rows, E^T [y][RW] is an [y, D] x [D, RW] product (r rows as scalars, the
    // rows' qv as vectors); with few (under half a vector) that would mostly compute padding,
    // and each row's E [Y] is its dot products with the r rows.
    const i64 y_clamp = imin(dtop - (a.R - 1), ny - 1), y0 = imax(0, y_clamp + 1);
    const i64 y_end = imin(ny, dtop + 1), ncols = nb * L;
    const bool by_rows = 2 * ncols < W;
    const i64 sy = by_rows ? 1 : RW, scol = by_rows ? Y : 1;  // strides of E
    for (i64 gi = 0; gi < group; ++gi) {
      const T* rh = static_cast<const T*>(a.r) + (hk * group + gi) * a.sr[0];
      const T* rl = rh + (a.R - 1) * a.sr[1];  // the clamped row
      const T* r0 = rh + (dtop - y0) * a.sr[1];
      T* eg = E + gi * Y * RW;
      if (by_rows) {
        for (i64 c = 0; c < ncols; ++c) {
          const T* x = qv + (gi * nb * L + c) * Dp;
          T* e = eg + c * Y;
          if (y_clamp >= 0) {
            dots_range<T>(x, rl, 0, 1, Dv, D, e);
            for (i64 y = 1; y <= y_clamp; ++y) e[y] = e[0];
          }
          dots_range<T>(x, r0, -a.sr[1], imax(0, y_end - y0), Dv, D, e + y0);
        }
        continue;
      }
      const T* qg = qvt + gi * D * RW;
      for (i64 cv = 0; cv < ncols; cv += W) {
        if (y_clamp >= 0) {
          tile_abt<T, 1, 1>(rl, 0, qg + cv, RW, D, eg + cv, RW);
          for (i64 y = 1; y <= y_clamp; ++y) vst(eg + y * RW + cv, vld(eg + cv));
        }
        i64 y = y0;
        for (; y + kRowsAbt <= y_end; y += kRowsAbt)
          tile_abt<T, kRowsAbt, 1>(r0 - (y - y0) * a.sr[1], -a.sr[1], qg + cv, RW, D,
                                   eg + y * RW + cv, RW);
        for (; y < y_end; ++y)
          tile_abt<T, 1, 1>(r0 - (y - y0) * a.sr[1], 0, qg + cv, RW, D, eg + y * RW + cv, RW);
      }
    }
    for (i64 bl = 0; bl < nb; ++bl) {
      const i64 b = b0 + bl;
      const T* kb = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
      const T* vb = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
      for (i64 gi = 0; gi < group; ++gi)
        for (i64 i = 0; i < L; ++i) {
          const i64 row = (gi * nb + bl) * L + i, bhi = (b * a.H + hk * group + gi) * L + i;
          // Visible keys of the row within the split: distance M + i - j in [0, window).
          const i64 lo = imax(ja, a.window ? M + i - a.window + 1 : 0), hi = imin(jb, M + i + 1);
          T m = neg_inf<T>(), l = T(0);
          for (i64 d = 0; d < D; ++d) o[d] = T(0);
          if (lo < hi) {
            const i64 n = hi - lo;
            dots_range<T>(qu + row * Dp, kb + lo * a.sk[2], a.sk[2], n, Dv, D, sc);
            const T* e = E + gi * Y * RW + (L - 1 - i + lo - ja) * sy + (bl * L + i) * scol;
            for (i64 x = 0; x < n; ++x) sc[x] = (sc[x] + e[x * sy]) * c2;
            m = softmax_row<T>(sc, n, neg_inf<T>(), l);
            pv_rows<T>(sc, vb + lo * a.sv[2], a.sv[2], n, Dv, D, o);
          }
          if (S == 1) {
            finalize_rows<T>(1, D, Dp, o, &m, &l, static_cast<T*>(a.out) + bhi * D, D,
                             static_cast<T*>(a.lse) + bhi, 1);
          } else {
            T* p = parts.get() + (bhi * S + s) * part_w;
            p[0] = m;
            p[1] = l;
            for (i64 d = 0; d < D; ++d) p[2 + d] = o[d];
          }
        }
    }
  };
  run_parallel(a.Hkv * S * nbb, a.threads, body);
  if (S == 1) return;

  // Per (batch, head): merge each query row's splits in split order.
  auto merge = [&](i64 bh, int thread) {
    T* o = scratch.get() + thread * per_thread;
    for (i64 i = 0; i < L; ++i) {
      const i64 bhi = bh * L + i;
      const T* p0 = parts.get() + bhi * S * part_w;
      T m = neg_inf<T>(), l = T(0);
      for (i64 s = 0; s < S; ++s) m = p0[s * part_w] > m ? p0[s * part_w] : m;
      for (i64 d = 0; d < D; ++d) o[d] = T(0);
      for (i64 s = 0; s < S; ++s) {
        const T* p = p0 + s * part_w;
        if (p[1] == T(0)) continue;  // no visible key of this row in the split
        const T w = sexp2(p[0] - m);
        l += p[1] * w;
        for (i64 d = 0; d < D; ++d) o[d] += p[2 + d] * w;
      }
      finalize_rows<T>(1, D, Dp, o, &m, &l, static_cast<T*>(a.out) + bhi * D, D,
                       static_cast<T*>(a.lse) + bhi, 1);
    }
  };
  run_parallel(a.B * a.H, a.threads, merge);
}

template <class T>
void xl_forward_impl(const XlArgs& a) {
  if (xl_rows_path(a)) {
    xl_rows_forward<T>(a);
    return;
  }
  const XlGeom g(a);
  const i64 BM = g.BM, BN = g.BN, D = a.D, Dp = g.Dp, group = a.H / a.Hkv;
  const T c2 = static_cast<T>(a.scale * kLog2e);
  Buf<T> rt(a.H * D * g.Ylen);
  pack_r<T>(a, g, rt.get(), nullptr);

  // Position terms per query block: E [BM][EW] = qv . r over the distances of up to kXlEChunk
  // consecutive key blocks, one GEMM whose columns serve every tile of the chunk (a tile reads
  // row il at an offset, like the band of xl_scores), so each distance is computed once per
  // row and not twice as in a per-tile band; the BM columns two chunks share are the overhead.
  const i64 EW = kXlEChunk * BN + BM;
  const i64 per_thread = 3 * BM * Dp + BM * BN + BM * EW + 3 * BM + D * BN + BN * Dp;
  Buf<T> scratch(per_thread * a.threads);
  auto body = [&](i64 task, int thread) {
    constexpr int W = VT<T>::W;
    const i64 qb = g.nqb - 1 - task % g.nqb, bh = task / g.nqb, b = bh / a.H, h = bh % a.H;
    const i64 i0 = qb * BM, rows = imin(BM, a.L - i0);
    T* qu = scratch.get() + thread * per_thread;
    T* qv = qu + BM * Dp;
    T* S = qv + BM * Dp;
    T* E = S + BM * BN;
    T* acc = E + BM * EW;
    T* m = acc + BM * Dp;
    T* l = m + BM;
    T* bdc = l + BM;
    T* kt = bdc + BM;
    T* vs = kt + D * BN;
    const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + (h / group) * a.sk[1];
    const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + (h / group) * a.sv[1];
    xl_pack_q<T>(a, b, h, i0, BM, Dp, qu, qv);
    xl_clamped<T>(a, h, qv, Dp, BM, bdc);
    for (i64 x = 0; x < BM * Dp; ++x) acc[x] = T(0);
    for (i64 r = 0; r < BM; ++r) {
      m[r] = neg_inf<T>();
      l[r] = T(0);
    }
    const i64 j_hi = imin(a.N - 1, g.M + i0 + rows - 1);
    const i64 j_lo = a.window ? imax(0, g.M + i0 - a.window + 1) : 0;
    const i64 kb_hi = j_hi / BN;
    i64 e_kb = -1;  // first key block of the chunk E holds
    for (i64 kb = j_lo / BN; kb <= kb_hi; ++kb) {
      const i64 j0 = kb * BN;
      pack_t(k + j0 * a.sk[2], a.sk[2], a.sk[3], imin(BN, a.N - j0), D, BN, T(1), kt);
      gemm_abt<T>(BM, BN, D, qu, Dp, kt, BN, S, BN);
      // (qu . k + position term) * c2 as in xl_scores, bit for bit: the backward recomputes
      // these scores against this lse (scaling q instead moves dq past the fp32 tolerance).
      const i64 top = g.dist_top(i0, j0), dmin = top - (g.BW - 2);
      if (dmin >= a.R - 1) {
        for (i64 r = 0; r < BM; ++r) {
          const Vec<T> cv = vset<T>(bdc[r]);
          for (i64 j = 0; j < BN; j += W) vst(S + r * BN + j, (vld(S + r * BN + j) + cv) * c2);
        }
      } else {
        if (e_kb < 0 || kb >= e_kb + kXlEChunk) {
          e_kb = kb;
          const i64 cols = imin(kXlEChunk, kb_hi - kb + 1) * BN + BM;
          gemm_abt<T>(BM, cols, D, qv, Dp, rt.get() + h * D * g.Ylen + g.band_start(i0, j0),
                      g.Ylen, E, EW);
        }
        const T* e0 = E + (kb - e_kb) * BN + BM - 1;
        for (i64 r = 0; r < BM; ++r)
          for (i64 j = 0; j < BN; j += W)
            vst(S + r * BN + j, (vld(S + r * BN + j) + vld(e0 + r * (EW - 1) + j)) * c2);
      }
      // Visible keys of row il: distance M + i0 + il - j0 - jl in [0, window), key < N.
      if (!(dmin >= 0 && (a.window == 0 || top < a.window) && j0 + BN <= a.N)) {
        for (i64 r = 0; r < BM; ++r) {
          const i64 d0 = g.M + i0 + r - j0;  // distance at jl = 0
          const i64 hi = imin(imin(BN - 1, d0), a.N - 1 - j0);
          const i64 lo = a.window ? imax(0, d0 - a.window + 1) : 0;
          for (i64 jl = 0; jl < BN; ++jl)
            if (jl < lo || jl > hi) S[r * BN + jl] = neg_inf<T>();
        }
      }
      for (i64 r = 0; r < rows; ++r)
        softmax_update<T>(S + r * BN, BN, m[r], l[r], acc + r * Dp, Dp);
      for (i64 x = rows * BN; x < BM * BN; ++x) S[x] = T(0);
      i64 ldv;
      const T* vblk = rows_block(v, a.sv[2], a.sv[3], a.N, D, Dp, j0, BN, true, vs, ldv);
      gemm_ab<T>(BM, Dp, BN, S, BN, 1, vblk, ldv, acc, Dp);
    }
    finalize_rows<T>(rows, D, Dp, acc, m, l, static_cast<T*>(a.out) + (bh * a.L + i0) * D, D,
                     static_cast<T*>(a.lse) + bh * a.L + i0, 1);
  };
  run_parallel(a.B * a.H * g.nqb, a.threads, body);
}

template <class T>
void xl_backward_impl(const XlArgs& a) {
  const XlGeom g(a);
  const i64 BM = g.BM, BN = g.BN, BW = g.BW, D = a.D, Dp = g.Dp, NQP = g.NQP, NKP = g.NKP;
  const i64 pairs = a.B * a.Hkv, group = a.H / a.Hkv, BH = a.B * a.H;
  const i64 Rn = imin(a.R, a.N);  // rows of r that any distance reaches
  const T c2 = static_cast<T>(a.scale * kLog2e), scale = static_cast<T>(a.scale);

  Buf<T> kt(pairs * NKP * D), vt(pairs * NKP * D), kp(pairs * NKP * Dp);
  Buf<T> rt(a.H * D * g.Ylen), rp(a.H * g.Ylen * Dp);
  Buf<T> qu(BH * NQP * Dp), qv(BH * NQP * Dp), dop(BH * NQP * Dp), lse2(BH * NQP),
      dlt(BH * NQP), bdc(BH * NQP);
  auto pack_k = [&](i64 task, int) {
    const i64 kb = task % g.nkb, bk = task / g.nkb, b = bk / a.Hkv, hk = bk % a.Hkv;
    const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
    const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
    pack_block(k, a.sk[2], a.sk[3], a.N, D, Dp, BN, kb, true, kt.get() + bk * NKP * D);
    pack_block(v, a.sv[2], a.sv[3], a.N, D, Dp, BN, kb, true, vt.get() + bk * NKP * D);
    pack_block(k, a.sk[2], a.sk[3], a.N, D, Dp, BN, kb, false, kp.get() + bk * NKP * Dp);
  };
  run_parallel(pairs * g.nkb, a.threads, pack_k);
  pack_r<T>(a, g, rt.get(), rp.get());
  auto pack_q = [&](i64 task, int) {
    const i64 qb = task % g.nqb, bh = task / g.nqb, b = bh / a.H, h = bh % a.H;
    const i64 i0 = qb * BM, at = bh * NQP + i0;
    xl_pack_q<T>(a, b, h, i0, BM, Dp, qu.get() + at * Dp, qv.get() + at * Dp);
    xl_clamped<T>(a, h, qv.get() + at * Dp, Dp, BM, bdc.get() + at);
    const T* dout = static_cast<const T*>(a.dout) + b * a.sdo[0] + h * a.sdo[1];
    pack_block(dout, a.sdo[2], a.sdo[3], a.L, D, Dp, BM, qb, false, dop.get() + bh * NQP * Dp);
    const T* lse = static_cast<const T*>(a.lse_in) + bh * a.L;
    const T* delta = static_cast<const T*>(a.delta) + bh * a.L;
    for (i64 i = i0; i < i0 + BM; ++i) {
      const bool ok = i < a.L && lse[i] > neg_inf<T>() && lse[i] < pos_inf<T>();
      lse2.get()[bh * NQP + i] = ok ? lse[i] * T(kLog2e) : pos_inf<T>();
      dlt.get()[bh * NQP + i] = ok ? delta[i] : T(0);
    }
  };
  run_parallel(BH * g.nqb, a.threads, pack_q);

  // Query blocks that see key block kb: [qb_lo, qb_hi).
  auto q_range = [&](i64 kb, i64& lo, i64& hi) {
    lo = g.nqb;
    hi = 0;
    for (i64 qb = 0; qb < g.nqb; ++qb)
      if (g.visible(a, qb * BM, kb * BN)) {
        lo = imin(lo, qb);
        hi = qb + 1;
      }
  };
  const int S = num_segments(pairs, g.nkb);
  i64 bounds[5];
  {
    Buf<i64> work(g.nkb);
    for (i64 kb = 0; kb < g.nkb; ++kb) {
      i64 lo, hi;
      q_range(kb, lo, hi);
      work.get()[kb] = imax(0, hi - lo);
    }
    split_segments(work.get(), g.nkb, S, bounds);
  }
  // Per segment: dQ through k (content) and through r (position), kept apart for du and dvb;
  // per task: dr of its heads.
  Buf<T> dq_ac(S * BH * NQP * Dp), dq_bd(S * BH * NQP * Dp), dr_buf(pairs * S * group * Rn * Dp);

  const i64 per_thread = 2 * BM * BN + BM * BW + BW * Dp + 2 * BN * Dp;
  Buf<T> scratch(per_thread * a.threads);
  auto body = [&](i64 task, int thread) {
    const int seg = static_cast<int>(task % S);
    const i64 bk = task / S, b = bk / a.Hkv, hk = bk % a.Hkv;
    T* P = scratch.get() + thread * per_thread;
    T* dS = P + BM * BN;
    T* band = dS + BM * BN;
    T* dr_band = band + BM * BW;
    T* dk_acc = dr_band + BW * Dp;
    T* dv_acc = dk_acc + BN * Dp;
    T* dr_task = dr_buf.get() + task * group * Rn * Dp;
    for (i64 kb = bounds[seg]; kb < bounds[seg + 1]; ++kb) {
      const i64 j0 = kb * BN;
      i64 qlo, qhi;
      q_range(kb, qlo, qhi);
      for (i64 x = 0; x < 2 * BN * Dp; ++x) dk_acc[x] = T(0);
      for (i64 gi = 0; gi < group; ++gi) {
        const i64 h = hk * group + gi, bh = b * a.H + h;
        T* dr_h = dr_task + gi * Rn * Dp;
        for (i64 qb = qlo; qb < qhi; ++qb) {
          const i64 i0 = qb * BM, at = bh * NQP + i0;
          if (!g.visible(a, i0, j0)) continue;
          const T* qu_p = qu.get() + at * Dp;
          const T* qv_p = qv.get() + at * Dp;
          const T* do_p = dop.get() + at * Dp;
          xl_scores<T>(a, g, h, i0, j0, qu_p, qv_p, Dp, kt.get() + (bk * g.nkb + kb) * D * BN,
                       rt.get(), bdc.get() + at, c2, band, P);
          gemm_abt<T>(BM, BN, D, do_p, Dp, vt.get() + (bk * g.nkb + kb) * D * BN, BN, dS, BN);
          for (i64 r = 0; r < BM; ++r) {
            const Vec<T> lv = vset<T>(lse2.get()[at + r]), dv = vset<T>(dlt.get()[at + r]);
            for (i64 j = 0; j < BN; j += VT<T>::W) {
              const Vec<T> p = vexp2(vld(P + r * BN + j) - lv);
              vst(P + r * BN + j, p);
              vst(dS + r * BN + j, p * (vld(dS + r * BN + j) - dv));
            }
          }
          gemm_ab<T>(BN, Dp, BM, P, 1, BN, do_p, Dp, dv_acc, Dp);
          gemm_ab<T>(BN, Dp, BM, dS, 1, BN, qu_p, Dp, dk_acc, Dp);
          gemm_ab<T>(BM, Dp, BN, dS, BN, 1, kp.get() + (bk * NKP + j0) * Dp, Dp,
                     dq_ac.get() + ((seg * BH + bh) * NQP + i0) * Dp, Dp);
          T* dqb = dq_bd.get() + ((seg * BH + bh) * NQP + i0) * Dp;
          const i64 top = g.dist_top(i0, j0), dmin = top - (BW - 2);
          if (dmin >= a.R - 1) {
            // One r row for the whole tile: dQ += rowsum(dS) r[R-1], dr[R-1] += dS-weighted qv.
            const T* rl = rp.get() + (h * g.Ylen + g.Y0 - (a.R - 1)) * Dp;
            T* drl = dr_h + (Rn - 1) * Dp;
            for (i64 r = 0; r < BM; ++r) {
              T rs = T(0);
              for (i64 j = 0; j < BN; ++j) rs += dS[r * BN + j];
              if (rs == T(0)) continue;
              for (i64 d = 0; d < Dp; ++d) {
                dqb[r * Dp + d] += rs * rl[d];
                drl[d] += rs * qv_p[r * Dp + d];
              }
            }
            continue;
          }
          // dS back onto the band, then dQ += band . r rows and dr_band = band^T . qv.
          for (i64 x = 0; x < BM * BW; ++x) band[x] = T(0);
          for (i64 r = 0; r < BM; ++r) {
            T* br = band + r * BW + (BM - 1 - r);
            for (i64 j = 0; j < BN; j += VT<T>::W) vst(br + j, vld(dS + r * BN + j));
          }
          const i64 y0 = g.band_start(i0, j0);
          gemm_ab<T>(BM, Dp, BW, band, BW, 1, rp.get() + (h * g.Ylen + y0) * Dp, Dp, dqb, Dp);
          for (i64 x = 0; x < BW * Dp; ++x) dr_band[x] = T(0);
          gemm_ab<T>(BW, Dp, BM, band, 1, BW, qv_p, Dp, dr_band, Dp);
          for (i64 cidx = 0; cidx < BW - 1; ++cidx) {
            const i64 dist = top - cidx;
            if (dist < 0) break;
            const i64 e = imin(dist, a.R - 1);
            if (e >= Rn) continue;  // only padding rows (i >= L) reach distances >= N
            T* dst = dr_h + e * Dp;
            for (i64 d = 0; d < Dp; d += VT<T>::W)
              vst(dst + d, vld(dst + d) + vld(dr_band + cidx * Dp + d));
          }
        }
      }
      const i64 cnt = imin(BN, a.N - j0);
      T* dk = static_cast<T*>(a.dk) + (bk * a.N + j0) * D;
      T* dvo = static_cast<T*>(a.dv) + (bk * a.N + j0) * D;
      for (i64 jj = 0; jj < cnt; ++jj)
        for (i64 d = 0; d < D; ++d) {
          dk[jj * D + d] = dk_acc[jj * Dp + d] * scale;
          dvo[jj * D + d] = dv_acc[jj * Dp + d];
        }
    }
  };
  run_parallel(pairs * S, a.threads, body);

  auto reduce_q = [&](i64 task, int) {
    const i64 qb = task % g.nqb, bh = task / g.nqb, i0 = qb * BM, rows = imin(BM, a.L - i0);
    T* dq = static_cast<T*>(a.dq) + (bh * a.L + i0) * D;
    for (i64 r = 0; r < rows; ++r)
      for (i64 d = 0; d < D; ++d) {
        T sum = T(0);
        for (int s = 0; s < S; ++s) {
          const i64 at = ((s * BH + bh) * NQP + i0 + r) * Dp + d;
          sum += dq_ac.get()[at] + dq_bd.get()[at];
        }
        dq[r * D + d] = sum * scale;
      }
  };
  run_parallel(BH * g.nqb, a.threads, reduce_q);
  // du, dvb: sums over batch and queries; dr: over batch and segments; per head, fixed order.
  auto reduce_h = [&](i64 h, int) {
    T* du = static_cast<T*>(a.du) + h * D;
    T* dvb = static_cast<T*>(a.dvb) + h * D;
    T* dr = static_cast<T*>(a.dr) + h * a.R * D;
    for (i64 d = 0; d < D; ++d) du[d] = dvb[d] = T(0);
    for (i64 x = 0; x < a.R * D; ++x) dr[x] = T(0);
    const i64 hk = h / group, gi = h % group;
    for (i64 b = 0; b < a.B; ++b) {
      const i64 bh = b * a.H + h;
      for (int s = 0; s < S; ++s) {
        for (i64 i = 0; i < a.L; ++i) {
          const i64 at = ((s * BH + bh) * NQP + i) * Dp;
          for (i64 d = 0; d < D; ++d) {
            du[d] += dq_ac.get()[at + d];
            dvb[d] += dq_bd.get()[at + d];
          }
        }
        const T* drt = dr_buf.get() + (((b * a.Hkv + hk) * S + s) * group + gi) * Rn * Dp;
        for (i64 e = 0; e < Rn; ++e)
          for (i64 d = 0; d < D; ++d) dr[e * D + d] += drt[e * Dp + d];
      }
    }
    for (i64 d = 0; d < D; ++d) {
      du[d] *= scale;
      dvb[d] *= scale;
    }
    for (i64 x = 0; x < a.R * D; ++x) dr[x] *= scale;
  };
  run_parallel(a.H, a.threads, reduce_h);
}

template <void (*F32)(const SparseArgs&), void (*F64)(const SparseArgs&)>
void by_dtype(const SparseArgs& a) {
  a.dtype == kFloat64 ? F64(a) : F32(a);
}
template <void (*F32)(const XlArgs&), void (*F64)(const XlArgs&)>
void by_dtype_xl(const XlArgs& a) {
  a.dtype == kFloat64 ? F64(a) : F32(a);
}

}  // namespace

namespace EFFATTN_ISA {
Kernels table() {
  return {EFFATTN_ISA_NAME,
          by_dtype<sparse_forward_impl<float>, sparse_forward_impl<double>>,
          by_dtype<sparse_backward_impl<float>, sparse_backward_impl<double>>,
          by_dtype_xl<xl_forward_impl<float>, xl_forward_impl<double>>,
          by_dtype_xl<xl_backward_impl<float>, xl_backward_impl<double>>};
}
}  // namespace EFFATTN_ISA

}  // namespace cpu
}  // namespace effattn
