"""effattn.sparse_attention end to end on the blockwise PyTorch backend: plans, merge, autograd.

The backend kernels themselves are tested per backend (test_triton_sparse.py, test_cpu.py);
here the shared machinery (validation, dispatch, plan gathering, LSE merge and its backward,
custom ops under torch.compile) runs on the simplest backend, in fp64 so that every error is
a bug rather than rounding.
"""

import pytest
import torch

import effattn
from effattn import patterns as P
from effattn import reference
from effattn.decompose import plan
from effattn.ops import torch_sparse


def make(b, h, h_kv, n_q, n_k, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, h_kv, n_k, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h_kv, n_k, d, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def compare(pattern, b, h, h_kv, n_q, n_k, d=16, padding=True, seed=0):
    q, k, v = make(b, h, h_kv, n_q, n_k, d, seed=seed)
    kpm = None
    if padding:
        kpm = torch.rand(b, n_k, generator=torch.Generator().manual_seed(seed)) < 0.15
    out, lse = effattn.sparse_attention(
        q, k, v, pattern, key_padding_mask=kpm, backend="torch", return_lse=True
    )
    mask = pattern.mask(n_q, n_k, h).unsqueeze(0)
    if kpm is not None:
        mask = mask & ~kpm[:, None, None]
    ref_out, ref_lse = reference.attention(q, k, v, mask, return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-12)
    # Gradients through the output and the LSE (the merge's backward uses both).
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(~finite, 0)

    def loss(o, s):
        return (o * dout).sum() + (torch.where(finite, s, 0) * dlse).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for name, a, w in zip("qkv", got, want, strict=True):
        assert torch.allclose(a, w, atol=1e-11), f"d{name}"


PATTERNS = [
    P.full(),
    P.causal(),
    P.local(9),
    P.local(5, causal=False),
    P.strided(7),
    P.strided(6, causal=False),
    P.fixed(16, 3, num_patterns=2),
    P.fixed(12, 4, num_patterns=3, causal=False),
    P.union(P.local(3), P.fixed(10, 2)),
    P.per_head(P.strided(5), P.causal()),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("n_q, n_k, h, h_kv", [(70, 70, 4, 2), (33, 70, 2, 1), (1, 45, 2, 2)])
def test_natural_order_matches_reference(pattern, n_q, n_k, h, h_kv):
    compare(pattern, 2, h, h_kv, n_q, n_k)


@pytest.mark.parametrize(
    "pattern",
    [P.strided(8), P.strided(7, causal=False), P.fixed(16, 3, 2), P.fixed(16, 3, 3, causal=False)],
    ids=lambda p: p.name,
)
@pytest.mark.parametrize("n_q, n_k, h, h_kv", [(150, 150, 6, 2), (121, 150, 3, 1)])
def test_decomposed_plans_match_reference(monkeypatch, pattern, n_q, n_k, h, h_kv):
    monkeypatch.setattr(torch_sparse, "BLOCK", 16)
    assert len(plan(pattern, n_q, n_k, 16, 16)) == 2
    compare(pattern, 2, h, h_kv, n_q, n_k)


def test_custom_mask_with_empty_rows():
    m = torch.rand(2, 40, 50) < 0.2
    m[:, 5] = False  # a query with no allowed key
    compare(P.from_mask(m), 1, 2, 1, 40, 50)


def test_gradcheck_decomposed(monkeypatch):
    monkeypatch.setattr(torch_sparse, "BLOCK", 16)
    q, k, v = make(1, 2, 1, 80, 80, 16)
    kpm = torch.zeros(1, 80, dtype=torch.bool)
    kpm[0, 3] = True

    def f(q, k, v):
        return effattn.sparse_attention(
            q, k, v, P.strided(5), key_padding_mask=kpm, backend="torch", return_lse=True
        )

    assert len(plan(P.strided(5), 80, 80, 16, 16)) == 2
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_reference_backend_and_default_backend():
    q, k, v = make(1, 2, 2, 20, 20, 16)
    a = effattn.sparse_attention(q, k, v, P.strided(4), backend="reference")
    b = effattn.sparse_attention(q, k, v, P.strided(4))
    assert torch.allclose(a, b, atol=1e-12)
    assert "reference" in effattn.backends()
    assert set(effattn.backends()) <= {"triton", "cuda", "cpu", "reference"}


@pytest.mark.parametrize("made_inside", [True, False])
def test_compile_traces_without_graph_breaks_or_recompiles(made_inside):
    torch._dynamo.reset()
    outside = P.strided(8)
    compiles = 0

    def counting_backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm.forward

    @torch.compile(backend=counting_backend, fullgraph=True, dynamic=True)
    def f(q, k, v):
        pattern = P.strided(8) if made_inside else outside
        return effattn.sparse_attention(q, k, v, pattern, backend="torch") * 2

    for n in (40, 56, 72):
        q, k, v = make(1, 2, 2, n, n, 16, dtype=torch.float32)
        out = f(q, k, v)
        want = 2 * reference.attention(q, k, v, P.strided(8))
        assert torch.allclose(out, want, atol=1e-5)
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    assert compiles == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"pattern": "causal"}, TypeError, "Pattern"),
        ({"backend": "fast"}, ValueError, "backend"),
        ({"key_padding_mask": torch.zeros(1, 20)}, TypeError, "key_padding_mask"),
        (
            {"key_padding_mask": torch.zeros(1, 19, dtype=torch.bool)},
            ValueError,
            "key_padding_mask",
        ),
        (
            {"pattern": P.from_mask(torch.ones(1, 8, 8, dtype=torch.bool))},
            ValueError,
            "cannot serve",
        ),
        ({"pattern": P.per_head(P.causal(), P.full(), P.local(2))}, ValueError, "divisible"),
        ({"scale": "big"}, TypeError, "scale"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k, v = make(1, 2, 2, 20, 20, 16)
    args = {"pattern": P.causal(), **kwargs}
    pattern = args.pop("pattern")
    with pytest.raises(error, match=match):
        effattn.sparse_attention(q, k, v, pattern, **args)


def test_bad_tensors():
    q, k, v = make(1, 2, 2, 20, 20, 16)
    with pytest.raises(ValueError, match="head dim"):
        effattn.sparse_attention(q[..., :8], k[..., :8], v[..., :8], P.causal(), backend="torch")
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        effattn.sparse_attention(q.to(torch.int32), k.int(), v.int(), P.causal())
    with pytest.raises(ValueError, match="dtype"):
        effattn.sparse_attention(q, k.float(), v, P.causal())
