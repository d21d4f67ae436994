// Constants that Python and the C++ / CUDA kernels must agree on, defined once, here.
//
// The kernels use these names; the extension and the CUDA emulator export the values to Python
// (csrc/bind.h: effattn._C.TERM_FIELDS, GROUP_EQ, DTYPE_CODES, ...), where effattn.ops.cpu and
// effattn.ops.cuda read the dtype codes, and tests/test_constants.py checks the Python side of
// the rest (effattn.patterns.Term, the Triton and torch kernels) against them.
//
// Declarations only (enums and constexpr values): kernels.h includes this file, and isa_*.cpp
// include kernels.h ahead of their target pragmas (see kernels.h).
#pragma once

namespace effattn {

// The fields of a packed pattern term (effattn.patterns.Term), in their order in a row of a
// terms table [P, T, term::kNumFields] (int32): row[term::mod] is the term's mod.
#define EFFATTN_TERM_FIELDS(X) X(lo) X(hi) X(mod) X(gq) X(gk) X(grel) X(smod) X(smin) X(smax)

namespace term {
#define EFFATTN_X(name) name,
enum Field : int { EFFATTN_TERM_FIELDS(EFFATTN_X) kNumFields };
#undef EFFATTN_X
}  // namespace term

// Term.grel: the relation between the key's and the query's group, j // gk REL p // gq.
enum GroupRel : int { kGroupEq = 0, kGroupLt = 1, kGroupNe = 2 };

// Element types, by torch name, in one code space for every backend; each takes a subset (the
// CPU kernels fp32 and fp64, the CUDA kernels fp16 and bf16).
#define EFFATTN_DTYPES(X) X(kFloat16, float16) X(kBFloat16, bfloat16) X(kFloat32, float32) \
  X(kFloat64, float64)

#define EFFATTN_X(code, name) code,
enum Dtype : int { EFFATTN_DTYPES(EFFATTN_X) };
#undef EFFATTN_X

}  // namespace effattn
