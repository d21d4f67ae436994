"""The Triton block-sparse backend against the dense reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before Triton is imported), on CPU tensors and interpreter-sized problems; most tests shrink the
kernel blocks (``BLOCKS_OVERRIDE``) so that small sequences still have full blocks, partial
blocks, ragged ends and decomposed plans. The ``gpu`` tests repeat the comparison at realistic
sizes in fp16 / bf16 when CUDA is present.

Tolerances: a kernel result may differ from the fp64 reference by at most twice what the same
reference computed in the input dtype differs by (plus one unit in the last place at 1.0): the
kernel has to be as accurate as ordinary attention in that dtype, whatever its blocking. fp64
is compared with the fp64 reference up to a summation-order allowance of n_k units.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import effattn  # noqa: E402
from effattn import patterns as P  # noqa: E402
from effattn import reference  # noqa: E402
from effattn.decompose import plan  # noqa: E402
from effattn.ops import triton_sparse as ts  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not HAS_CUDA and not ts._interpreting(),
    reason="no CUDA device and Triton is not in interpreter mode (TRITON_INTERPRET=1)",
)
needs_interpreter = pytest.mark.skipif(
    not ts._interpreting(), reason="fp64 runs only in Triton's interpreter"
)


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    # Triton reads TRITON_INTERPRET at every launch, and importing bench/compile_report.py in
    # the same session (tests/test_cuda.py does) removes it: keep it for kernels that were
    # created in interpreter mode.
    if ts._interpreting():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def blocks(monkeypatch):
    """Set the kernels' (block_m, block_n) for the test; None keeps the shipped configs."""

    def set_blocks(bm_bn):
        monkeypatch.setattr(ts, "BLOCKS_OVERRIDE", bm_bn)

    return set_blocks


def make(b, h, h_kv, n_q, n_k, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(b, hh, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        for hh, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k))
    )
    return q, k, v


def run(q, k, v, pattern, kpm, backend, dout, dlse):
    """(out, lse, dq, dk, dv) through effattn.sparse_attention, or the masked reference."""
    if backend == "reference":
        mask = pattern.mask(q.shape[2], k.shape[2], q.shape[1], device=q.device).unsqueeze(0)
        if kpm is not None:
            mask = mask & ~kpm[:, None, None]
        out, lse = reference.attention(q, k, v, mask, return_lse=True)
    else:
        out, lse = effattn.sparse_attention(
            q, k, v, pattern, key_padding_mask=kpm, backend=backend, return_lse=True
        )
    loss = (out * dout.to(out.dtype)).sum() + (
        torch.where(torch.isfinite(lse), lse, 0) * dlse
    ).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out, lse, *grads)


def check_against_reference(pattern, b, h, h_kv, n_q, n_k, d, dtype, kpm_rate=0.0, seed=0):
    q, k, v = make(b, h, h_kv, n_q, n_k, d, dtype, seed)
    kpm = None
    if kpm_rate:
        g = torch.Generator().manual_seed(seed + 1)
        kpm = (torch.rand(b, n_k, generator=g) < kpm_rate).to(q.device)
    g = torch.Generator().manual_seed(seed + 2)
    dout = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64).to(q.device)
    dlse = torch.randn(b, h, n_q, generator=g, dtype=torch.float64).to(q.device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = run(q, k, v, pattern, kpm, "triton", dout, dlse.to(acc))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = run(q64, k64, v64, pattern, kpm, "reference", dout, dlse)
    same = run(q, k, v, pattern, kpm, "reference", dout, dlse.to(acc))

    # Rows without a visible key: lse -inf, output exactly 0, in kernel and reference alike.
    empty = torch.isinf(want[1])
    assert torch.equal(torch.isinf(got[1]), empty), "rows with no visible key differ"
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
    floor = torch.finfo(dtype).eps
    if dtype == torch.float64:
        # The fp64 reference is itself the same-dtype computation: allow what another summation
        # order over n_k keys can change.
        floor *= n_k
    for name, a, w, s in zip(("out", "lse", "dq", "dk", "dv"), got, want, same, strict=True):
        a, s = a.double(), s.double()
        if name == "lse":
            a, w, s = a[~empty], w[~empty], s[~empty]
        assert torch.isfinite(a).all(), f"{name} is not finite"
        err = (a - w).abs().max().item() if a.numel() else 0.0
        ref_err = (s - w).abs().max().item() if a.numel() else 0.0
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs reference's {ref_err:.3g}"
    return got


# Patterns x ragged sizes x GQA x key padding x queries fewer than keys, in fp32.
CASES = [
    # pattern, b, h, h_kv, n_q, n_k, d, key padding rate
    (P.causal(), 2, 2, 1, 50, 50, 41, 0.2),
    (P.full(), 1, 2, 1, 27, 45, 16, 0.3),
    (P.local(9), 1, 2, 2, 33, 60, 80, 0.0),
    (P.local(5, causal=False), 1, 2, 1, 40, 40, 24, 0.2),
    (P.strided(8), 1, 2, 1, 50, 50, 41, 0.1),
    (P.strided(6, causal=False), 1, 2, 2, 35, 45, 32, 0.2),
    (P.fixed(16, 3, num_patterns=2), 1, 4, 2, 50, 50, 41, 0.2),
    (P.fixed(12, 4, num_patterns=3, causal=False), 1, 3, 1, 30, 47, 16, 0.0),
    (P.union(P.local(3), P.fixed(10, 2)), 1, 2, 1, 45, 45, 24, 0.1),
    (P.per_head(P.strided(5), P.causal(), P.local(7, causal=False)), 1, 3, 1, 40, 40, 16, 0.2),
    (P.causal(), 2, 2, 1, 1, 45, 64, 0.2),
]


@pytest.mark.parametrize(
    "pattern, b, h, h_kv, n_q, n_k, d, kpm_rate", CASES, ids=[c[0].name for c in CASES]
)
def test_matches_reference_fp32(blocks, pattern, b, h, h_kv, n_q, n_k, d, kpm_rate):
    # block_m != block_n, so that a swapped index or a transposed tile cannot pass unnoticed.
    blocks((16, 32))
    check_against_reference(pattern, b, h, h_kv, n_q, n_k, d, torch.float32, kpm_rate)


def test_custom_pattern_with_empty_rows_and_tiles(blocks):
    blocks((16, 32))
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 40, 60, generator=g) < 0.25
    mask[0, :, 32:64] = True  # full blocks next to partial ones
    mask[:, 7] = False  # a query with no key at all
    mask[1, 16:32] = False  # a whole query block empty in one head
    pattern = P.from_mask(mask)
    assert pattern.layout(40, 60, 16, 32).tiles is not None
    got = check_against_reference(pattern, 1, 2, 1, 40, 60, 41, torch.float32, kpm_rate=0.1)
    assert torch.isinf(got[1][:, :, 7]).all() and torch.isinf(got[1][:, 1, 16:32]).all()
    assert (got[2][:, :, 7] == 0).all()


def test_custom_union_and_per_head_with_masks(blocks):
    blocks((16, 16))
    g = torch.Generator().manual_seed(5)
    custom = P.from_mask(torch.rand(1, 40, 40, generator=g) < 0.2)
    pattern = P.per_head(P.union(custom, P.local(4)), P.strided(8))
    check_against_reference(pattern, 1, 2, 1, 40, 40, 16, torch.float32, kpm_rate=0.1)


def test_shipped_configs(blocks):
    # The tuned configs themselves (64-row forward blocks, other backward blocks), in fp16: in
    # the interpreter, numpy sums a tile product in an order that depends on the tile's shape,
    # so when the forward's and the backward's tiles differ the recomputed fp32 scores move by
    # an ulp against the saved LSE, which the fp32 gradient comparison would register (on the
    # GPU the reduction over D runs in the same order in every tile). fp32 tiles of other
    # shapes are covered above and in test_fp32_tall_tiles.
    blocks(None)
    check_against_reference(P.strided(16), 1, 2, 1, 100, 100, 41, torch.float16, 0.1)
    check_against_reference(P.fixed(32, 8), 1, 2, 2, 70, 90, 200, torch.float16, 0.0)


def test_fp32_tall_tiles(blocks):
    blocks((32, 16))
    check_against_reference(P.strided(8), 1, 2, 1, 70, 70, 48, torch.float32, 0.1)


# The decomposed plans: strided column part (transposed chunks, dummy rows, padding keys when
# not causal) and the fixed summary part (compact per-class key lists), merged by LSE.
DECOMPOSED = [
    (P.strided(4), 55, 62, 0.1),
    (P.strided(4, causal=False), 61, 61, 0.1),
    (P.strided(6, causal=False), 41, 48, 0.0),
    (P.fixed(16, 4), 33, 33, 0.1),
    (P.fixed(16, 4, num_patterns=2), 25, 32, 0.0),
    (P.fixed(12, 3, num_patterns=3, causal=False), 45, 52, 0.1),
]


@pytest.mark.parametrize(
    "pattern, n_q, n_k, kpm_rate",
    DECOMPOSED,
    ids=[f"{c[0].name}-{c[1]}x{c[2]}" for c in DECOMPOSED],
)
def test_decomposed_plans(blocks, pattern, n_q, n_k, kpm_rate):
    blocks((16, 16))
    assert len(plan(pattern, n_q, n_k, 16, 16)) > 1, "the plan must decompose for this test"
    h = 2 * pattern.period
    check_against_reference(pattern, 1, h, h // 2, n_q, n_k, 24, torch.float32, kpm_rate)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_strided_chunks_as_heads(blocks, causal):
    """n_q == n_k a multiple of the stride, no key mask, no GQA: the column part runs as extra
    heads on strided views (effattn.execute._fold) of q, k, v, and in the backward of dout
    and the gradients too, m = 20 rows per chunk."""
    blocks((16, 16))
    pattern = P.strided(8, causal=causal)
    assert len(plan(pattern, 160, 160, 16, 16)) > 1, "the plan must decompose for this test"
    check_against_reference(pattern, 2, 2, 2, 160, 160, 24, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "pattern, n_q, n_k",
    [(P.strided(4), 55, 62), (P.fixed(16, 4, num_patterns=2), 40, 40)],
    ids=["strided", "fixed"],
)
def test_half_precision(blocks, dtype, pattern, n_q, n_k):
    blocks((16, 16))
    assert len(plan(pattern, n_q, n_k, 16, 16)) > 1
    check_against_reference(pattern, 1, 4, 2, n_q, n_k, 40, dtype, kpm_rate=0.1)


@needs_interpreter
@pytest.mark.parametrize(
    "pattern, n_q, n_k",
    [(P.causal(), 14, 21), (P.strided(4), 55, 62), (P.fixed(16, 4, num_patterns=2), 23, 30)],
    ids=["causal", "strided-decomposed", "fixed-decomposed"],
)
def test_gradcheck_fp64(blocks, pattern, n_q, n_k):
    blocks((16, 16))
    q, k, v = make(1, 2, 1, n_q, n_k, 16, torch.float64)
    kpm = torch.zeros(1, n_k, dtype=torch.bool)
    kpm[0, 1] = True

    def f(q, k, v):
        out, lse = effattn.sparse_attention(
            q, k, v, pattern, key_padding_mask=kpm, backend="triton", return_lse=True
        )
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


@needs_interpreter
def test_fp64_matches_reference_tightly(blocks):
    blocks((16, 16))
    got = check_against_reference(P.strided(4), 1, 2, 1, 55, 62, 24, torch.float64, 0.1)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64


def test_torch_compile_fullgraph_no_recompile(blocks):
    blocks((16, 16))
    torch._dynamo.reset()
    compiles = 0

    def counting_backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm.forward

    # The pattern is built inside the compiled function: Pattern.key of a pattern captured from
    # outside calls str() on a tuple, which dynamo cannot trace (see effattn.patterns).
    @torch.compile(backend=counting_backend, fullgraph=True, dynamic=True)
    def f(q, k, v):
        return effattn.sparse_attention(q, k, v, P.strided(8), backend="triton") * 2

    for n in (40, 56):
        q, k, v = make(1, 2, 1, n, n, 16, torch.float32)
        out = f(q, k, v)
        (dq,) = torch.autograd.grad(out.sum(), q)
        eager = 2 * effattn.sparse_attention(q, k, v, P.strided(8), backend="triton")
        (dq_eager,) = torch.autograd.grad(eager.sum(), q)
        assert torch.equal(out, eager) and torch.equal(dq, dq_eager)
    assert compiles == 1


def test_torch_compile_aot_eager_traces_the_backward(blocks):
    blocks((16, 16))
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, v, kpm):
        out, lse = effattn.sparse_attention(
            q, k, v, P.fixed(16, 4), key_padding_mask=kpm, backend="triton", return_lse=True
        )
        return out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    q, k, v = make(1, 2, 1, 30, 40, 16, torch.float32)
    kpm = torch.zeros(1, 40, dtype=torch.bool)
    kpm[0, 3] = True
    got = torch.autograd.grad(f(q, k, v, kpm), (q, k, v))
    want = torch.autograd.grad(f.__wrapped__(q, k, v, kpm), (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input, configs
def test_check_rejects_what_triton_cannot_serve(monkeypatch):
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        ts.check(*(torch.zeros(1, 1, 4, 300, device=DEVICE),) * 3)
    with pytest.raises(TypeError, match="fp16, bf16, fp32"):
        ts.check(*(torch.zeros(1, 1, 4, 16, dtype=torch.int32, device=DEVICE),) * 3)
    many_heads = torch.zeros(1, 65536, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="batch x heads"):
        ts.sparse_forward(many_heads, q, q, lambda bm, bn: None, scale=1.0)
    monkeypatch.setattr(ts, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        ts.check(*(torch.zeros(1, 1, 4, 16),) * 3)
    if HAS_CUDA:
        with pytest.raises(TypeError, match="fp64 only in Triton's interpreter"):
            ts.check(*(q.double(),) * 3)
    with pytest.raises(ValueError, match="head dim"):
        effattn.sparse_attention(*(torch.zeros(1, 1, 4, 8),) * 3, P.causal(), backend="triton")


def test_forward_blocks_keep_strided_and_fixed_efficient():
    from effattn.decompose import planned_work_efficiency

    q = torch.zeros(1, 1, 1, 64, dtype=torch.float16)
    bm, bn = ts.plan_blocks(q)
    for pattern in (P.strided(128), P.fixed(128, 16), P.fixed(128, 32)):
        assert planned_work_efficiency(pattern, 4096, 4096, bm, bn) >= 0.5, pattern.name


# ------------------------------------------------------------------ GPU, realistic sizes
GPU_CASES = [
    (P.causal(), 4096, 64),
    (P.strided(128), 8192, 64),
    (P.fixed(128, 32, num_patterns=2), 8192, 128),
    (P.local(256), 16384, 128),
    (P.strided(128), 16384, 128),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "pattern, n, d", GPU_CASES, ids=[f"{c[0].name}-{c[1]}-D{c[2]}" for c in GPU_CASES]
)
def test_gpu_realistic_sizes(blocks, dtype, pattern, n, d):
    blocks(None)
    h = 2 * pattern.period
    check_against_reference(pattern, 1, h, h // 2, n, n, d, dtype, kpm_rate=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d", [41, 80, 96, 256])
def test_gpu_odd_head_dims(blocks, d):
    blocks(None)
    check_against_reference(P.strided(64), 2, 4, 2, 1000, 1100, d, torch.bfloat16, kpm_rate=0.05)
    check_against_reference(P.fixed(64, 16), 1, 2, 1, 777, 777, d, torch.float32, kpm_rate=0.05)
