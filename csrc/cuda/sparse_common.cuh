// The block-sparse pattern on partial blocks: packed terms (effattn.patterns.Term) evaluated with
// integer ops, or deduplicated stored tiles for custom patterns.
#pragma once

#include "cuda/attention_common.cuh"
#include "cuda/params.h"

namespace effattn {
namespace cuda {

// Query and key blocks of the layouts the sparse kernels read (BlockLayout.block_m / block_n).
constexpr int kSparseBlock = kBlock;

// One row of the term table: lo <= p - j <= hi; (p - j) % mod == 0 if mod > 0;
// j / gk REL p / gq if gq > 0 (REL: kGroupEq ==, kGroupLt <, kGroupNe !=);
// smin <= j % smod <= smax if smod > 0.
struct Term {
  int lo, hi, mod, gq, gk, grel, smod, smin, smax;
};

EFFATTN_DEVICE Term load_term(const int32_t* t) {
  Term r;
  r.lo = dev::gload(t + term::lo);
  r.hi = dev::gload(t + term::hi);
  r.mod = dev::gload(t + term::mod);
  r.gq = dev::gload(t + term::gq);
  r.gk = dev::gload(t + term::gk);
  r.grel = dev::gload(t + term::grel);
  r.smod = dev::gload(t + term::smod);
  r.smin = dev::gload(t + term::smin);
  r.smax = dev::gload(t + term::smax);
  return r;
}

// p (absolute query position) and j are >= 0, so C's truncating / and % agree with the floor
// semantics of effattn.patterns.Term.allowed; for p - j, only divisibility is tested, which
// both conventions agree on.
EFFATTN_DEVICE bool term_allows(const Term& t, int p, int j) {
  const int d = p - j;
  bool ok = d >= t.lo && d <= t.hi;
  if (t.mod > 0) ok = ok && d % t.mod == 0;
  if (t.gq > 0) {
    const int qg = p / t.gq, kg = j / dev::imax(t.gk, 1);
    ok = ok && (t.grel == kGroupEq ? kg == qg : t.grel == kGroupLt ? kg < qg : kg != qg);
  }
  if (t.smod > 0) {
    const int r = j % t.smod;
    ok = ok && r >= t.smin && r <= t.smax;
  }
  return ok;
}

// The pattern's bits over a warp's [16 x 8*NT] score fragment inside one partial block.
// Fragment rows are queries row0 + r and columns keys col0 + c, or the other way round with
// KEY_ROWS (the dk / dv kernel works on S^T). `cls` is the head class, `tile` the block's stored
// tile (custom patterns).
template <int NT, bool KEY_ROWS>
EFFATTN_DEVICE uint32_t pattern_bits(const SparseParams& p, int cls, int tile, int row0,
                                     int col0) {
  auto query = [&](int r, int c) { return KEY_ROWS ? col0 + c : row0 + r; };
  auto key = [&](int r, int c) { return KEY_ROWS ? row0 + r : col0 + c; };
  if (p.use_tiles) {
    // Tiles are [block_m x block_n] = [queries x keys] of one block; blocks are 64-aligned.
    const uint8_t* tl = reinterpret_cast<const uint8_t*>(p.tiles) +
                        static_cast<int64_t>(tile) * kSparseBlock * kSparseBlock;
    return fragment_bits<NT>([&](int r, int c) {
      return dev::gload(tl + (query(r, c) & (kSparseBlock - 1)) * kSparseBlock +
                        (key(r, c) & (kSparseBlock - 1))) != 0;
    });
  }
  const int32_t* terms = reinterpret_cast<const int32_t*>(p.terms) +
                         static_cast<int64_t>(cls) * p.num_terms * term::kNumFields;
  uint32_t bits = 0;
  for (int i = 0; i < p.num_terms; ++i) {
    const Term t = load_term(terms + term::kNumFields * i);
    bits |= fragment_bits<NT>(
        [&](int r, int c) { return term_allows(t, p.q_offset + query(r, c), key(r, c)); });
  }
  return bits;
}

}  // namespace cuda
}  // namespace effattn
