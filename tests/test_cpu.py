"""C++ CPU backend (effattn.ops.cpu, csrc/cpu/): every result against the dense references.

fp32 results are held to the error of the reference computed in fp32 itself: for each of out,
lse and the gradients, |cpu - ref64| <= 2 |ref32 - ref64| + a floor of 1e-6 x the largest
|ref64|. The floor is the one error the dense reference does not have: a flash-style backward
recomputes probabilities from the stored fp32 LSE, whose rounding (|lse| 2^-24, about 1e-6 for
|lse| near 8) is a relative error of every probability and so of the gradients (without it dq
measures up to 3.5x the reference's error here). fp64 runs are compared tightly and
through torch.autograd.gradcheck. Decomposed plans are forced at small n by shrinking the
kernels' blocks to 16 (the smallest tile they take).
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import _extension, execute, patterns, reference
from effattn.decompose import plan

pytestmark = pytest.mark.skipif(
    not _extension.has_cpu(), reason=f"C++ CPU kernels not built: {_extension.load_error}"
)

if _extension.has_cpu():
    from effattn.ops import cpu

    ISAS = cpu.isas()
else:  # pragma: no cover - the whole module is skipped
    cpu, ISAS = None, []


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu, "BLOCK_M", 16)
    monkeypatch.setattr(cpu, "BLOCK_N", 16)


# --------------------------------------------------------------------------- helpers
def _run(fn, inputs, seed=1):
    """(out, lse, *grads of inputs) for a random cotangent on out and on the finite lse."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    finite = torch.isfinite(lse)
    loss = (out * dout).sum() + torch.where(finite, lse, 0).mul(dlse).sum()
    loss.backward()
    return [out.detach(), lse.detach()] + [x.grad for x in xs]


def _compare_fp32(fn_cpu, fn_ref, inputs64, names):
    """Compare fp32 cpu results with the fp64 reference within twice the fp32 reference's error."""
    got = _run(fn_cpu, [x.float() for x in inputs64])
    ref32 = _run(fn_ref, [x.float() for x in inputs64])
    ref64 = _run(fn_ref, inputs64)
    for name, a, r32, r64 in zip(("out", "lse", *names), got, ref32, ref64, strict=True):
        if name == "lse":
            # Rows without a visible key: -inf exactly, in both.
            inf = torch.isinf(r64)
            assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], r64[inf].float())
            a, r32, r64 = a[~inf], r32[~inf], r64[~inf]
        err = (a.double() - r64).abs().max().item() if a.numel() else 0.0
        base = (r32.double() - r64).abs().max().item() if a.numel() else 0.0
        floor = 1e-6 * max(1.0, r64.abs().max().item() if a.numel() else 0.0)
        assert err <= 2 * base + floor, f"{name}: error {err:.3g} vs fp32 reference {base:.3g}"


def _qkv(b, h, h_kv, n_q, n_k, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, n_k, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, n_k, d, generator=g, dtype=dtype)
    return q, k, v


def _padding(b, n_k, seed=0):
    """Random 20% of keys hidden, and in batch 1 the first 40: its first queries see nothing."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(b, n_k, generator=g) < 0.2
    kpm[1, :40] = True
    return kpm


def _sparse(pattern, kpm, backend):
    def fn(q, k, v):
        return effattn.sparse_attention(
            q, k, v, pattern, key_padding_mask=kpm, backend=backend, return_lse=True
        )

    return fn


def _xl(window, backend, scale=None):
    def fn(q, k, v, r, u, vb):
        return effattn.xl_attention(
            q, k, v, r, u, vb, scale=scale, window=window, backend=backend, return_lse=True
        )

    return fn


def _xl_inputs(b, h, h_kv, n_q, mem, d, r_len, seed=0, dtype=torch.float64):
    q, k, v = _qkv(b, h, h_kv, n_q, mem + n_q, d, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    r = torch.randn(h, r_len, d, generator=g, dtype=dtype)
    u = torch.randn(h, d, generator=g, dtype=dtype)
    vb = torch.randn(h, d, generator=g, dtype=dtype)
    return q, k, v, r, u, vb


# --------------------------------------------------------------------------- sparse
SPARSE_PATTERNS = [
    patterns.causal(),
    patterns.full(),
    patterns.local(24),
    patterns.local(20, causal=False),
    patterns.strided(16),
    patterns.strided(24, causal=False),
    patterns.fixed(32, 4),
    patterns.fixed(16, 4, num_patterns=2),
    patterns.fixed(32, 8, causal=False),
    patterns.union(patterns.local(8), patterns.strided(32)),
    patterns.per_head(patterns.strided(16), patterns.local(24)),
]


@pytest.mark.parametrize("pattern", SPARSE_PATTERNS, ids=lambda p: p.name)
def test_sparse_vs_reference(pattern, small_blocks):
    """Ragged sizes, n_q < n_k, GQA, D = 41, key padding with empty rows; plans decomposed."""
    b, h, h_kv, n_q, n_k, d = 2, 4, 2, 170, 200, 41
    if isinstance(getattr(pattern, "kind", None), (patterns.Strided, patterns.Fixed)):
        assert len(plan(pattern, n_q, n_k, 16, 16)) > 1, "the test should run a decomposed plan"
    kpm = _padding(b, n_k)
    _compare_fp32(
        _sparse(pattern, kpm, "cpu"),
        _sparse(pattern, kpm, "reference"),
        list(_qkv(b, h, h_kv, n_q, n_k, d)),
        ("dq", "dk", "dv"),
    )


@pytest.mark.parametrize("causal", [True, False])
def test_strided_chunks_as_heads(causal, small_blocks, monkeypatch):
    """n_q == n_k a multiple of the stride, no key mask, no GQA: the column part runs its
    chunks as extra heads on views of q, k, v (execute._fold), forward (joining its result
    into the band part's on views of its out and lse) and backward (on views of dout, lse, delta and
    the gradients), m = 20 rows per chunk (not a multiple of the block); output, lse and
    gradients against the reference in fp64 and fp32."""
    pattern = patterns.strided(16, causal=causal)
    n = 16 * 20
    assert len(plan(pattern, n, n, 16, 16)) > 1, "the test should run a decomposed plan"
    folds = []

    def counting_fold(part, t, fold=execute._fold):
        folds.append(part.chunk)
        return fold(part, t)

    monkeypatch.setattr(execute, "_fold", counting_fold)
    inputs = list(_qkv(2, 3, 3, n, n, 24))
    got = _run(_sparse(pattern, None, "cpu"), inputs)
    ref = _run(_sparse(pattern, None, "reference"), inputs)
    # Forward: q, k, v, out, lse; backward: q, k, v, dout, lse, delta, dq, dk, dv.
    assert folds == [16] * 14
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)
    _compare_fp32(
        _sparse(pattern, None, "cpu"),
        _sparse(pattern, None, "reference"),
        inputs,
        ("dq", "dk", "dv"),
    )


@pytest.mark.parametrize(
    "pattern,n_q,n_k",
    [
        (patterns.fixed(32, 4), 30, 40),
        (patterns.fixed(24, 6, num_patterns=2), 30, 40),
        (patterns.fixed(32, 8, causal=False), 60, 90),
    ],
    ids=["fixed", "fixed-2-patterns", "fixed-noncausal"],
)
def test_sparse_natural_order_fixed(pattern, n_q, n_k, small_blocks):
    """Plans that keep natural order: partial blocks evaluate the summary-columns terms."""
    assert len(plan(pattern, n_q, n_k, 16, 16)) == 1
    kpm = torch.rand(2, n_k, generator=torch.Generator().manual_seed(9)) < 0.2
    kpm[1, :12] = True
    _compare_fp32(
        _sparse(pattern, kpm, "cpu"),
        _sparse(pattern, kpm, "reference"),
        list(_qkv(2, 4, 2, n_q, n_k, 24, seed=9)),
        ("dq", "dk", "dv"),
    )


def test_sparse_custom_mask(small_blocks):
    """from_mask patterns: partial blocks read the stored tiles."""
    n_q, n_k = 70, 90
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, n_q, n_k, generator=g) < 0.3
    mask[:, 5] = False  # a row without keys
    pattern = patterns.from_mask(mask)
    _compare_fp32(
        _sparse(pattern, None, "cpu"),
        _sparse(pattern, None, "reference"),
        list(_qkv(1, 4, 4, n_q, n_k, 16, seed=3)),
        ("dq", "dk", "dv"),
    )


@pytest.mark.parametrize("pattern", [patterns.strided(64), patterns.fixed(64, 8)], ids=str)
def test_sparse_default_blocks(pattern):
    """The shipped block sizes, D = 80, n not a multiple of the block, no padding."""
    _compare_fp32(
        _sparse(pattern, None, "cpu"),
        _sparse(pattern, None, "reference"),
        list(_qkv(1, 2, 2, 300, 300, 80, seed=4)),
        ("dq", "dk", "dv"),
    )


def test_short_sequences_shrink_tiles(monkeypatch):
    """strided(32) at n = 640 with the shipped blocks: the column part's chunks of 20 rows run
    as heads on 32 x 32 tiles (a 64-row tile would be mostly padding), forward and backward."""
    tiles = []

    def spy(layout, block_m, block_n, layout_args=cpu._layout_args):
        tiles.append((block_m, block_n))
        return layout_args(layout, block_m, block_n)

    monkeypatch.setattr(cpu, "_layout_args", spy)
    _compare_fp32(
        _sparse(patterns.strided(32), None, "cpu"),
        _sparse(patterns.strided(32), None, "reference"),
        list(_qkv(1, 2, 2, 640, 640, 24, seed=5)),
        ("dq", "dk", "dv"),
    )
    assert (64, 64) in tiles and (32, 32) in tiles


def test_sparse_fp64_exact(small_blocks):
    pattern = patterns.fixed(32, 4, num_patterns=2)
    b, n = 2, 150
    kpm = _padding(b, n)
    inputs = list(_qkv(b, 4, 2, n, n, 24, seed=5))
    got = _run(_sparse(pattern, kpm, "cpu"), inputs)
    ref = _run(_sparse(pattern, kpm, "reference"), inputs)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize(
    "pattern",
    [patterns.fixed(16, 4), patterns.strided(16, causal=False), patterns.local(20)],
    ids=str,
)
def test_sparse_gradcheck(pattern, small_blocks):
    q, k, v = _qkv(1, 2, 1, 40, 44, 16, seed=6)
    kpm = torch.zeros(1, 44, dtype=torch.bool)
    kpm[0, 7] = True

    def fn(q, k, v):
        return effattn.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, backend="cpu")

    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_sparse_auto_picks_cpu():
    assert "cpu" in effattn.backends()
    q, k, v = _qkv(1, 2, 2, 100, 100, 32, dtype=torch.float32)
    pattern = patterns.strided(16)
    auto = effattn.sparse_attention(q, k, v, pattern)
    assert torch.equal(auto, effattn.sparse_attention(q, k, v, pattern, backend="cpu"))


def test_sparse_bf16_computed_in_fp32():
    """bf16 inputs: computed in fp32, only the output is rounded to bf16."""
    q, k, v = _qkv(1, 2, 2, 100, 100, 32, dtype=torch.bfloat16)
    pattern = patterns.fixed(32, 4)
    out = effattn.sparse_attention(q, k, v, pattern, backend="cpu")
    assert out.dtype == torch.bfloat16
    ref = reference.attention(q.float(), k.float(), v.float(), pattern)
    eps = torch.finfo(torch.bfloat16).eps
    assert (out.float() - ref).abs().max() <= eps * ref.abs().max()


# --------------------------------------------------------------------------- Transformer-XL
XL_CASES = {
    "gqa": (2, 4, 2, 37, 50, 41, 100, None),
    "clamp": (1, 2, 2, 70, 90, 24, 20, None),
    "clamp-d80": (1, 1, 1, 130, 150, 80, 5, None),
    "window-gqa": (1, 2, 1, 70, 90, 24, 200, 33),
    "window-1": (1, 2, 2, 20, 10, 16, 40, 1),
    "decode-L1": (2, 2, 2, 1, 90, 16, 30, None),
    "no-memory": (1, 2, 2, 45, 0, 32, 64, None),
    # Few query rows (decoding, short segments) with long memory: the row kernel, keys split
    # over several tasks and the splits merged.
    "rows-splits-gqa": (2, 4, 2, 4, 1500, 40, 700, None),
    "rows-splits-window": (1, 2, 1, 8, 1300, 64, 300, 600),
    "rows-decode-clamp": (3, 2, 2, 1, 1100, 80, 50, None),
    # Short segments over a long memory (Transformer-XL evaluation): tiles whose position terms
    # come from several per-query-block chunks, clamped tiles before them; V read in place
    # (D = 64) but for the partial last key block.
    "segment-window-clamp-gqa": (1, 4, 2, 100, 1100, 41, 500, 900),
    "segment-memory-d64": (2, 2, 2, 70, 1000, 64, 1070, None),
}


@pytest.mark.parametrize("case", XL_CASES.values(), ids=XL_CASES.keys())
def test_xl_vs_reference(case):
    b, h, h_kv, n_q, mem, d, r_len, window = case
    _compare_fp32(
        _xl(window, "cpu"),
        _xl(window, "reference"),
        list(_xl_inputs(b, h, h_kv, n_q, mem, d, r_len)),
        ("dq", "dk", "dv", "dr", "du", "dvb"),
    )


def test_xl_segment_fp64():
    """fp64 through the tiled path with a long memory: the reference to rounding."""
    inputs = list(_xl_inputs(1, 4, 2, 100, 1100, 41, 500, seed=3))
    got = _run(_xl(900, "cpu"), inputs)
    ref = _run(_xl(900, "reference"), inputs)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


def test_xl_gradcheck():
    inputs = [x.requires_grad_() for x in _xl_inputs(1, 2, 1, 9, 7, 16, 5, seed=7)]

    def fn(*xs):
        return effattn.xl_attention(*xs, window=12, backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# --------------------------------------------------------------------------- determinism, ISAs
def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_same_result_with_1_and_2_threads(small_blocks):
    """Bitwise: forward tasks own their rows; backward segments and reductions do not depend on
    the thread count (B x Hkv = 2 here, so the backward runs several key segments)."""
    pattern = patterns.fixed(32, 4)
    kpm = _padding(2, 200)
    sparse_in = [x.float() for x in _qkv(2, 2, 1, 200, 200, 24)]
    xl_in = [x.float() for x in _xl_inputs(1, 2, 1, 70, 90, 24, 50)]
    xl_rows_in = [x.float() for x in _xl_inputs(2, 2, 1, 3, 1400, 24, 500)]
    cases = (
        (_sparse(pattern, kpm, "cpu"), sparse_in),
        (_xl(40, "cpu"), xl_in),
        (_xl(None, "cpu"), xl_rows_in),
    )
    for fn, inputs in cases:
        one = _with_threads(1, lambda fn=fn, inputs=inputs: _run(fn, inputs))
        two = _with_threads(2, lambda fn=fn, inputs=inputs: _run(fn, inputs))
        for a, b in zip(one, two, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set(isa, monkeypatch, small_blocks):
    """Each compiled instruction set that runs here (AVX-512, AVX2, baseline), fp32 and fp64."""
    monkeypatch.setattr(cpu, "ISA", isa)
    pattern = patterns.strided(16)
    kpm = _padding(2, 120)
    inputs = list(_qkv(2, 2, 1, 100, 120, 40, seed=8))
    _compare_fp32(
        _sparse(pattern, kpm, "cpu"), _sparse(pattern, kpm, "reference"), inputs, "dq dk dv".split()
    )
    got = _run(_sparse(pattern, kpm, "cpu"), inputs)
    ref = _run(_sparse(pattern, kpm, "reference"), inputs)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)
    xl_grads = "dq dk dv dr du dvb".split()
    xl_inputs = list(_xl_inputs(1, 2, 1, 30, 20, 40, 25, seed=8))
    _compare_fp32(_xl(None, "cpu"), _xl(None, "reference"), xl_inputs, xl_grads)
    xl_rows_inputs = list(_xl_inputs(1, 2, 1, 2, 700, 40, 300, seed=8))  # the row kernel
    _compare_fp32(_xl(None, "cpu"), _xl(None, "reference"), xl_rows_inputs, xl_grads)


def test_strided_chunks_far_apart(small_blocks):
    """Chunks whose rows lie a page or more apart (stride 64 x D = 16 in fp64: 8 KiB) are copied
    row by row into the tiles (csrc/cpu/attention_impl.h, kFarRows), forward and backward."""
    pattern = patterns.strided(64)
    n, d = 64 * 20, 16
    assert 64 * d * 8 >= 4096, "the test should run rows at least a page apart"
    inputs = list(_qkv(1, 2, 2, n, n, d, seed=6))
    got = _run(_sparse(pattern, None, "cpu"), inputs)
    ref = _run(_sparse(pattern, None, "reference"), inputs)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_forward_resumes_state(dtype, small_blocks):
    """A causal pass over the even keys continued by one over the odd keys (and the other way
    round), the state in strided views, equals one causal pass over all keys. Row 0 has no odd
    key, so one order resumes an empty row and the other leaves a finished row untouched."""
    b, h, n, d = 2, 3, 45, 24
    q, k, v = (t.to(dtype) for t in _qkv(b, h, h, n, n, d))
    lay = patterns.causal().layout(n, n, cpu.BLOCK_M, cpu.BLOCK_N)
    odd = (torch.arange(n) % 2 == 1)[None, None]
    want_out, want_lse = cpu.sparse_forward(q, k, v, lambda m, nb: lay, scale=0.3)
    for first, second in ((odd, ~odd), (~odd, odd)):
        o, l = cpu.sparse_forward(q, k, v, lambda m, nb: lay, scale=0.3, key_mask=first)
        out = torch.zeros(b, h, n, d + 5, dtype=dtype)[..., :d]
        lse = torch.zeros(b, h, n, 2, dtype=dtype)[..., 1]
        out.copy_(o)
        lse.copy_(l)
        got = cpu.sparse_forward(
            q, k, v, lambda m, nb: lay, scale=0.3, key_mask=second, state=(out, lse)
        )
        assert got[0] is out and got[1] is lse
        tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {}
        torch.testing.assert_close(out, want_out, **tol)
        torch.testing.assert_close(lse, want_lse, **tol)


def test_fixed_summary_part_joins_in_kernel(monkeypatch, small_blocks):
    """The fixed plan's summary-column part keeps the query rows in order, so it joins its
    result into the window part's (out, lse) in the kernel (state) instead of a merge; with
    key padding and GQA, fp64 against the reference."""
    pattern = patterns.fixed(32, 4)
    n = 150
    assert len(plan(pattern, n, n, 16, 16)) == 2, "the test should run a two-part plan"
    states = []

    def spy(*args, state=None, **kwargs):
        states.append(state is not None)
        return sparse_forward(*args, state=state, **kwargs)

    sparse_forward = cpu.run_sparse_forward
    monkeypatch.setattr(cpu, "run_sparse_forward", spy)
    kpm = _padding(2, n)
    inputs = list(_qkv(2, 4, 2, n, n, 24, seed=3))
    out, lse = _sparse(pattern, kpm, "cpu")(*inputs)
    assert states == [False, True]
    want_out, want_lse = _sparse(pattern, kpm, "reference")(*inputs)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-11)


# --------------------------------------------------------------------------- gradient dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_gradients_in_accumulation_dtype(dtype):
    """The backward kernels return fp32 (fp64 for fp64): functional sums a plan's parts in that
    dtype and rounds once, so the public functions give gradients in the inputs' dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = _qkv(1, 2, 1, 40, 40, 16, dtype=dtype)
    lay = lambda bm, bn: patterns.causal().layout(40, 40, bm, bn)
    out, lse = cpu.sparse_forward(q, k, v, lay, scale=0.25)
    delta = (out.to(acc) * q.to(acc)).sum(-1)
    grads = cpu.sparse_backward(q, k, v, q, lse, delta, lay, scale=0.25)
    assert [g.dtype for g in grads] == [acc] * 3
    xl = list(_xl_inputs(1, 2, 1, 10, 5, 16, 8, dtype=dtype))
    out, lse = cpu.xl_forward(*xl, scale=0.25)
    grads = cpu.xl_backward(*xl, out, xl[0], lse, lse.clone(), scale=0.25)
    assert [g.dtype for g in grads] == [acc] * 6
    xs = [t.requires_grad_() for t in xl]
    effattn.xl_attention(*xs, backend="cpu").float().sum().backward()
    assert [x.grad.dtype for x in xs] == [dtype] * 6
    qkv = [t.requires_grad_() for t in (q, k, v)]
    effattn.sparse_attention(*qkv, patterns.strided(16), backend="cpu").float().sum().backward()
    assert [x.grad.dtype for x in qkv] == [dtype] * 3


# --------------------------------------------------------------------------- errors
def test_errors():
    q, k, v = _qkv(1, 2, 2, 20, 20, 16, dtype=torch.float32)

    def lay(block_m, block_n):
        return patterns.causal().layout(20, 20, block_m, block_n)

    with pytest.raises(TypeError, match="q must be fp16, bf16, fp32 or fp64"):
        cpu.check(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match="k must have q's dtype"):
        cpu.check(q, k.double(), v)
    with pytest.raises(TypeError, match="key_mask must be a bool tensor"):
        cpu.sparse_forward(q, k, v, lay, scale=1.0, key_mask=torch.zeros(1, 2, 20))
    with pytest.raises(ValueError, match="does not broadcast"):
        cpu.sparse_forward(
            q, k, v, lay, scale=1.0, key_mask=torch.zeros(3, 2, 20, dtype=torch.bool)
        )
    state = (torch.zeros(1, 2, 20, 16), torch.zeros(1, 2, 20))
    with pytest.raises(TypeError, match="state out must be a CPU torch.float32 tensor"):
        cpu.sparse_forward(q, k, v, lay, scale=1.0, state=(state[0].double(), state[1]))
    with pytest.raises(ValueError, match=r"state lse must have shape \[1, 2, 20\]"):
        cpu.sparse_forward(q, k, v, lay, scale=1.0, state=(state[0], state[1][..., :5]))
    with pytest.raises(ValueError, match="state out must be contiguous along D"):
        cpu.sparse_forward(q, k, v, lay, scale=1.0, state=(state[0].mT.contiguous().mT, state[1]))
    xq, xk, xv, r, u, vb = _xl_inputs(1, 2, 2, 10, 5, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"r must be \[H, R >= 1, D\]"):
        cpu.xl_forward(xq, xk, xv, r[:1], u, vb, scale=1.0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        cpu.xl_forward(xq, xk, xv, r, u, vb, scale=1.0, window=0)


def test_unknown_instruction_set(monkeypatch):
    monkeypatch.setattr(cpu, "ISA", "sve9")
    q, k, v = _qkv(1, 1, 1, 20, 20, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="sve9"):
        effattn.sparse_attention(q, k, v, patterns.causal(), backend="cpu")


def test_backward_with_no_queries_gives_zero_key_gradients():
    """Nq = 0, Nk > 0: dk and dv are zeros, never uninitialised memory."""
    q = torch.randn(1, 2, 0, 16)
    k = torch.randn(1, 2, 40, 16)
    lse = torch.zeros(1, 2, 0)
    lay = patterns.causal().layout(0, 40, 64, 64)
    dq, dk, dv = cpu.sparse_backward(q, k, k, q, lse, lse, lambda bm, bn: lay, scale=0.25)
    assert dq.shape == q.shape and bool((dk == 0).all()) and bool((dv == 0).all())
