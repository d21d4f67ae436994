"""effattn.xl_attention on the Triton (interpreter here) and blockwise torch backends.

Every case checks the output, the LSE and all six gradients against reference.xl_attention.
Tolerances: in fp64 a tiny absolute floor; in lower precision at most twice the error that the
reference itself makes in that dtype (against the fp64 reference), plus a floor.
"""

import os

import pytest
import torch

import effattn
from effattn import reference
from effattn.ops import dispatch

BACKENDS = ["torch", "triton"]
INPUTS = ("q", "k", "v", "r", "u", "vb")


@pytest.fixture(autouse=True)
def small_torch_blocks(monkeypatch):
    """Blocks of 8 queries, so that tiny shapes cross many blocks of the torch backend too."""
    from effattn.ops import torch_xl

    monkeypatch.setattr(torch_xl, "BLOCK", 8)


def make(b, h, h_kv, n_q, mem, d, n_r, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_k = mem + n_q
    shapes = [(b, h, n_q, d), (b, h_kv, n_k, d), (b, h_kv, n_k, d), (h, n_r, d), (h, d), (h, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def run(fn, inputs, dout, dlse):
    """(out, lse, grads of the six inputs) for the loss <out, dout> + <lse, dlse>."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    loss = (out.double() * dout).sum() + (lse.double() * dlse).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [out, lse, *grads]


def check_against_reference(backend, inputs, window=None, dtype=torch.float64, floor=1e-10):
    """Compare backend (in dtype) with the fp64 reference, relative to the dtype's own error."""
    exact_inputs = [t.double() for t in inputs]
    low_inputs = [t.to(dtype) for t in inputs]
    b, h, n_q, d = inputs[0].shape
    g = torch.Generator().manual_seed(1)
    dev = inputs[0].device
    dout = torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64).to(dev)
    dlse = torch.randn(b, h, n_q, generator=g, dtype=torch.float64).to(dev)

    def ref(*t):
        return reference.xl_attention(*t, window=window, return_lse=True)

    def ours(*t):
        return effattn.xl_attention(*t, window=window, backend=backend, return_lse=True)

    want = run(ref, exact_inputs, dout, dlse)
    got = run(ours, low_inputs, dout, dlse)
    own = want if dtype == torch.float64 else run(ref, low_inputs, dout, dlse)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, a, w, o in zip(("out", "lse", *INPUTS), got, want, own, strict=True):
        assert a.shape == w.shape, name
        err = (a.double() - w).abs().max().item()
        budget = 2 * (o.double() - w).abs().max().item() + floor
        assert err <= budget, f"{backend} {name}: error {err:.3g} > {budget:.3g}"


CASES = {
    # name: (b, h, h_kv, L, M, D, R, window)
    "gqa_ragged_d41": (2, 2, 1, 21, 13, 41, 34, None),
    "clamped_r": (1, 2, 2, 21, 13, 41, 5, None),
    "window_gqa": (1, 4, 2, 21, 13, 16, 34, 7),
    "no_memory_one_query": (1, 2, 1, 1, 0, 16, 1, None),
    "no_memory_window_clamp": (1, 1, 1, 19, 0, 16, 4, 3),
    "decode_step": (2, 2, 2, 1, 30, 16, 31, None),
    "d80_long_memory": (1, 1, 1, 18, 35, 80, 53, None),
    "window_wider_than_keys": (1, 2, 2, 9, 6, 16, 15, 100),
    "r_longer_than_needed": (1, 1, 1, 7, 3, 16, 40, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp64(backend, case):
    b, h, h_kv, n_q, mem, d, n_r, window = CASES[case]
    check_against_reference(backend, make(b, h, h_kv, n_q, mem, d, n_r), window=window)


@pytest.mark.parametrize(
    "backend, dtype",
    [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32)],
)
def test_matches_reference_low_precision(backend, dtype):
    inputs = make(1, 2, 1, 21, 13, 41, 9, seed=3)
    check_against_reference(backend, inputs, window=17, dtype=dtype, floor=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, n_r", [(None, 6), (3, 9)])
def test_gradcheck_fp64(backend, window, n_r):
    inputs = [t.requires_grad_(True) for t in make(1, 2, 1, 5, 4, 16, n_r, seed=4)]

    def fn(*t):
        out, lse = effattn.xl_attention(*t, window=window, backend=backend, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-8)


def test_backward_is_deterministic():
    inputs = make(1, 2, 1, 19, 11, 16, 9, seed=5)
    dout = torch.randn(1, 2, 19, 16, dtype=torch.float64)
    dlse = torch.randn(1, 2, 19, dtype=torch.float64)

    def fn(*t):
        return effattn.xl_attention(*t, backend="triton", return_lse=True)

    first, second = run(fn, inputs, dout, dlse), run(fn, inputs, dout, dlse)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backends_agree_and_auto_on_cpu():
    inputs = make(1, 2, 2, 12, 8, 16, 20, dtype=torch.float32, seed=6)
    auto = effattn.xl_attention(*inputs)
    torch_out = effattn.xl_attention(*inputs, backend="torch")
    q, k = inputs[0], inputs[1]
    assert dispatch.select("auto", "xl", q, k, key_mask=False).name in ("cpu", "torch")
    assert torch.allclose(auto, torch_out, atol=1e-5)


def test_default_scale_and_plain_output():
    inputs = make(1, 2, 2, 6, 3, 25, 9, seed=7)
    out = effattn.xl_attention(*inputs, backend="torch")
    assert torch.allclose(out, reference.xl_attention(*inputs, scale=25**-0.5), atol=1e-12)
    out = effattn.xl_attention(*inputs, backend="torch", scale=0.3)
    assert torch.allclose(out, reference.xl_attention(*inputs, scale=0.3), atol=1e-12)


def test_empty_segment():
    q, k, v, r, u, vb = make(1, 2, 2, 0, 5, 16, 3)
    for backend in BACKENDS:
        out, lse = effattn.xl_attention(q, k, v, r, u, vb, backend=backend, return_lse=True)
        assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_torch_compile_traces_the_custom_ops():
    inputs = [t.requires_grad_(True) for t in make(1, 2, 1, 9, 5, 16, 7, seed=8)]

    def fn(*t):
        return effattn.xl_attention(*t, window=6, backend="torch").sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(fn(*inputs), inputs)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


# --------------------------------------------------------------------------- bad input
def _bad(**changes):
    q, k, v, r, u, vb = make(1, 2, 2, 4, 3, 16, 5)
    args = {"q": q, "k": k, "v": v, "r": r, "u": u, "vb": vb}
    kwargs = {"backend": "torch"}
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    return [args[n] for n in INPUTS], kwargs


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"r": torch.zeros(2, 0, 16, dtype=torch.float64)}, ValueError, "at least one row"),
        ({"r": torch.zeros(3, 5, 16, dtype=torch.float64)}, ValueError, r"r must be \[H, R, D\]"),
        ({"r": torch.zeros(2, 5, dtype=torch.float64)}, ValueError, r"r must be \[H, R, D\]"),
        ({"u": torch.zeros(2, 15, dtype=torch.float64)}, ValueError, r"u must be \[H, D\]"),
        ({"vb": torch.zeros(16, dtype=torch.float64)}, ValueError, r"vb must be \[H, D\]"),
        ({"k": torch.zeros(1, 2, 3, 16, dtype=torch.float64)}, ValueError, "same shape"),
        (
            {
                "k": torch.zeros(1, 2, 3, 16, dtype=torch.float64),
                "v": torch.zeros(1, 2, 3, 16, dtype=torch.float64),
            },
            ValueError,
            "more rows",
        ),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"window": -3}, ValueError, "window must be >= 1"),
        ({"window": 2.5}, TypeError, "window must be an int"),
        ({"window": True}, TypeError, "window must be an int"),
        ({"r": torch.zeros(2, 5, 16)}, TypeError, "r must have q's dtype"),
        ({"u": torch.zeros(2, 16, dtype=torch.float64, device="meta")}, ValueError, "u is on"),
        ({"vb": [0.0] * 16}, TypeError, "vb must be a torch.Tensor"),
        ({"backend": "bogus"}, ValueError, "backend must be one of"),
        ({"backend": 3}, TypeError, "backend must be a str"),
        ({"scale": "x"}, TypeError, "scale must be a float"),
    ],
)
def test_bad_input(changes, error, match):
    args, kwargs = _bad(**changes)
    with pytest.raises(error, match=match):
        effattn.xl_attention(*args, **kwargs)


def test_bad_head_dim():
    q, k, v, r, u, vb = make(1, 2, 2, 4, 3, 8, 5)
    with pytest.raises(ValueError, match="head dim"):
        effattn.xl_attention(q, k, v, r, u, vb, backend="torch")
    # the reference takes any head dim
    effattn.xl_attention(q, k, v, r, u, vb, backend="reference")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_triton_rejects_what_it_cannot_run():
    from effattn.ops import triton_xl

    with pytest.raises(TypeError, match="fp16, bf16, fp32"):
        triton_xl.xl_check(torch.zeros(1, 1, 1, 16, dtype=torch.int32))


# --------------------------------------------------------------------------- GPU
GPU_CASES = [(dt, d) for dt in (torch.float16, torch.bfloat16) for d in (41, 64, 80, 128, 256)]
GPU_CASES += [(torch.float32, d) for d in (41, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, d", GPU_CASES)
def test_triton_gpu_realistic(dtype, d):
    inputs = [t.cuda() for t in make(2, 8, 2, 300, 457, d, 600, seed=9)]
    check_against_reference("triton", inputs, window=None, dtype=dtype, floor=2e-3)
    check_against_reference("triton", inputs, window=500, dtype=dtype, floor=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_gpu_refuses_fp32_beyond_head_dim_64():
    inputs = [t.cuda().float() for t in make(1, 2, 2, 8, 8, 80, 16)]
    with pytest.raises(TypeError, match="fp32 only up to head dim 64"):
        effattn.xl_attention(*inputs, backend="triton")
