"""effattn.sparse_attention end to end on the blockwise PyTorch backend: plans, merge, autograd.

The backend kernels themselves are tested per backend (test_triton_sparse.py, test_cpu.py);
here the shared machinery (validation, dispatch, plan gathering, LSE merge and its backward,
custom ops under torch.compile) runs on the simplest backend, in fp64 so that every error is
a bug rather than rounding.
"""

import pytest
import torch

import effattn
from effattn import functional, reference
from effattn import patterns as P
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
    assert {"torch", "reference"} <= set(effattn.backends())
    assert set(effattn.backends()) <= {"triton", "cuda", "cpu", "torch", "reference"}


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


# --------------------------------------------------------------------------- defects found from outside
SERVING = [n for n in ("cpu", "torch", "triton") if n in effattn.backends()]


@pytest.mark.parametrize("backend", [*SERVING, "reference"])
@pytest.mark.parametrize("b, n_q, n_k", [(2, 0, 30), (0, 5, 30), (2, 0, 0)], ids=str)
def test_empty_inputs_give_empty_outputs_and_zero_gradients(backend, b, n_q, n_k):
    q, k, v = make(b, 2, 1, n_q, n_k, 16)
    out, lse = effattn.sparse_attention(q, k, v, P.strided(4), backend=backend, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert bool((lse == float("-inf")).all())
    grads = torch.autograd.grad(
        out.sum() + 0 * lse.nan_to_num().sum(), (q, k, v), allow_unused=True
    )
    for g, t in zip(grads, (q, k, v), strict=True):
        g = torch.zeros_like(t) if g is None else g
        assert g.shape == t.shape and bool((g == 0).all())


@pytest.mark.parametrize("backend", [*SERVING, "torch"])
def test_xl_empty_batch_and_segment(backend):
    for b, n_q, mem in ((0, 4, 3), (2, 0, 5)):
        q = torch.randn(b, 2, n_q, 16, dtype=torch.float64, requires_grad=True)
        k = torch.randn(b, 2, n_q + mem, 16, dtype=torch.float64, requires_grad=True)
        r = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
        u = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
        out = effattn.xl_attention(q, k, k, r, u, u, backend=backend)
        assert out.shape == q.shape
        grads = torch.autograd.grad(out.sum(), (q, k, r, u), allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)


def test_reference_with_no_keys():
    q = torch.randn(1, 2, 0, 16, requires_grad=True)
    out, lse = reference.attention(q, q, q, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("backend", SERVING)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_keys_hidden_by_the_padding_mask_never_reach_an_output(backend, poison):
    q, k, v = make(2, 2, 1, 40, 40, 16)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[:, 30:] = True  # an unwritten cache tail
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[:, :, 30:], vp[:, :, 30:] = poison, poison
    kp.requires_grad_(), vp.requires_grad_()
    got = effattn.sparse_attention(q, kp, vp, P.causal(), key_padding_mask=kpm, backend=backend)
    want = effattn.sparse_attention(q, k, v, P.causal(), key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gq, gk, gv = torch.autograd.grad(got.sum(), (q, kp, vp))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert bool((gk[:, :, 30:] == 0).all()) and bool((gv[:, :, 30:] == 0).all())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_scale_is_refused(bad):
    q, k, v = make(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="scale must be finite"):
        effattn.sparse_attention(q, k, v, P.causal(), scale=bad)


def test_numpy_and_tensor_scales_are_floats():
    import numpy as np

    q, k, v = make(1, 2, 2, 8, 8, 16)
    want = effattn.sparse_attention(q, k, v, P.causal(), scale=0.3)
    for scale in (np.float32(0.3), np.float64(0.3), torch.tensor(0.3, dtype=torch.float64)):
        got = effattn.sparse_attention(q, k, v, P.causal(), scale=scale)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)  # np.float32 rounds 0.3
    with pytest.raises(TypeError, match="0-d"):
        effattn.sparse_attention(q, k, v, P.causal(), scale=torch.ones(2))


def test_double_backward_fails_where_it_starts():
    q, k, v = make(1, 2, 2, 16, 16, 16)
    out = effattn.sparse_attention(q, k, v, P.strided(4), backend="torch")
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_function_transforms_fail_clearly():
    q, k, v = make(1, 2, 2, 16, 16, 16)
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.grad(lambda q: effattn.sparse_attention(q, k, v, P.causal()).sum())(q)


def test_custom_patterns_are_built_once_per_pattern(monkeypatch):
    mask = torch.rand(1, 64, 64) < 0.3
    pattern = P.from_mask(mask)
    q, k, v = make(1, 2, 2, 64, 64, 16)
    calls = {"mask": 0, "layout": 0}
    orig_mask, orig_layout = type(pattern).mask, type(pattern)._layout

    def counting_mask(self, *a, **kw):
        calls["mask"] += 1
        return orig_mask(self, *a, **kw)

    def counting_layout(self, *a, **kw):
        calls["layout"] += 1
        return orig_layout(self, *a, **kw)

    monkeypatch.setattr(type(pattern), "mask", counting_mask)
    monkeypatch.setattr(type(pattern), "_layout", counting_layout)
    first = effattn.sparse_attention(q, k, v, pattern, backend="torch")
    built = dict(calls)
    for _ in range(3):
        again = effattn.sparse_attention(q, k, v, pattern, backend="torch")
        again.sum().backward()
    assert calls["mask"] == built["mask"] == 1, "the op mask is made once per pattern"
    assert torch.equal(first, again)
    assert functional._MASK_CACHE == {}, "no content cache when the pattern is known"


def test_parameters_larger_than_the_sequence_cost_what_the_sequence_does():
    q, k, v = make(1, 2, 2, 200, 200, 16)
    for pattern in (P.strided(10**5), P.strided(10**7), P.fixed(10**6, 3), P.local(10**7)):
        assert len(plan(pattern, 200, 200)) == 1
        out = effattn.sparse_attention(q, k, v, pattern, backend="torch")
        torch.testing.assert_close(out, reference.attention(q, k, v, pattern))
    with pytest.raises(ValueError, match="exceeds 2\\*\\*30"):
        P.strided(2**31)
    with pytest.raises(ValueError, match="exceeds 2\\*\\*30"):
        P.local(2**40)


# --------------------------------------------------------------------------- op registration
def _sparse_args(pattern, kpm=False, dtype=torch.float64):
    q, k, v = make(1, 4, 2, 24, 30, 16, dtype=dtype)
    mask = torch.rand(1, 30, generator=torch.Generator().manual_seed(1)) < 0.2 if kpm else None
    if pattern.is_custom:
        return (q, k, v, mask, "", functional._op_mask(pattern, 24, 30, q.device), 0.25, "torch")
    return (q, k, v, mask, pattern.key, None, 0.25, "torch")


@pytest.mark.parametrize(
    "pattern, kpm",
    [
        (P.strided(4), True),
        (P.fixed(8, 2), False),
        (P.from_mask(torch.rand(1, 24, 30) < 0.4), True),
    ],
    ids=["strided", "fixed", "custom"],
)
def test_opcheck_sparse_ops(pattern, kpm):
    args = _sparse_args(pattern, kpm)
    torch.library.opcheck(functional._sparse_op, args)
    out, lse = functional._sparse_op(*args)
    q, k, v, mask, key, custom, scale, backend = args
    dout = torch.randn_like(out)
    bwd = (dout, torch.randn_like(lse), q, k, v, out, lse, mask, key, custom, scale, backend)
    torch.library.opcheck(
        functional._sparse_backward_op,
        tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in bwd),
    )


def test_opcheck_xl_ops():
    q, k, v = make(1, 2, 2, 10, 16, 16)
    r = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    for window in (None, 5):
        args = (q, k, v, r, u, u, 0.25, window, "torch")
        torch.library.opcheck(functional._xl_op, args)
        out, lse = functional._xl_op(*args)
        bwd = (torch.randn_like(out), None, q, k, v, r, u, u, out, lse, 0.25, window, "torch")
        torch.library.opcheck(
            functional._xl_backward_op,
            tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in bwd),
        )
