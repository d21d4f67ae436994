"""The CUDA C++ backend (effattn.ops.cuda, csrc/cuda).

Three layers, so that most of it is checked on machines without a GPU:

* host logic (argument checks, layout packing, launch geometry, the shared-memory declarations
  that bench/compile_report.py reads): plain CPU tests;
* the kernels themselves, run on the CPU by the emulator of csrc/cuda/emu (the same kernel
  source compiled with the host compiler; ldmatrix / mma.sync / cp.async emulated with their PTX
  semantics, random thread interleavings, bounds-checked memory), against the dense reference:
  marked ``slow`` (the emulator is built once per source change, ~30 s);
* the real kernels on a GPU against the reference, with the test matrix of the Triton path:
  marked ``gpu``, skipped without one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import effattn
from effattn import patterns as P
from effattn import reference
from effattn.decompose import plan
from effattn.ops import cuda as ops
from effattn.ops import dispatch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


# --------------------------------------------------------------------------- host logic
def test_padded_head_dim():
    assert [ops.padded_head_dim(d) for d in (16, 41, 64, 65, 80, 96, 128)] == [
        64,
        64,
        64,
        128,
        128,
        128,
        128,
    ]
    with pytest.raises(ValueError, match="up to 128"):
        ops.padded_head_dim(129)
    with pytest.raises(ValueError, match="positive int"):
        ops.padded_head_dim(0)


def test_launch_geometry():
    g = ops.launch_geometry(
        "sparse_fwd", head_dim=64, batch=2, heads=6, kv_heads=3, n_q=130, n_k=300
    )
    assert (g.grid_x, g.grid_y, g.threads) == (3, 12, 128)
    g = ops.launch_geometry(
        "sparse_bwd_dkdv", head_dim=128, batch=2, heads=6, kv_heads=3, n_q=130, n_k=300
    )
    assert (g.grid_x, g.grid_y) == (5, 6)
    assert g.smem_bytes == ops.smem_bytes("sparse_bwd_dkdv", 128)
    with pytest.raises(ValueError, match="65535"):
        ops.launch_geometry(
            "sparse_fwd", head_dim=64, batch=65536, heads=1, kv_heads=1, n_q=1, n_k=1
        )
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ops.launch_geometry("sparse_fwd", head_dim=64, batch=1, heads=3, kv_heads=2, n_q=1, n_k=1)
    with pytest.raises(ValueError, match="unknown kernel"):
        ops.launch_geometry("nope", head_dim=64, batch=1, heads=1, kv_heads=1, n_q=1, n_k=1)


def _smem_declarations() -> list[tuple[re.Pattern, int]]:
    """The `// effattn:dynamic-smem REGEX BYTES` lines, parsed as bench/compile_report.py does."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import compile_report
    finally:
        sys.path.pop(0)
    return compile_report._dynamic_smem_rules(CUDA_DIR)


@pytest.mark.parametrize("kernel", sorted(ops.KERNELS))
@pytest.mark.parametrize("head_dim", ops.HEAD_DIMS)
@pytest.mark.parametrize("elem", ["F16", "BF16"])
def test_smem_declarations_match_launch_geometry(kernel, head_dim, elem):
    # What compile_report gates on is what the launcher requests (and the kernel checks).
    name = f"void effattn_{kernel}<effattn::cuda::{elem}, {head_dim}>(effattn::cuda::SparseParams)"
    declared = [v for r, v in _smem_declarations() if r.search(name)]
    assert declared == [ops.smem_bytes(kernel, head_dim)]
    assert ops.smem_bytes(kernel, head_dim) <= 163 * 1024  # sm_80's opt-in maximum


def test_pack_layout_terms_and_tiles():
    lay = P.strided(48).layout(200, 200, 64, 64)
    packed = ops.pack_layout(lay)
    assert packed is ops.pack_layout(lay)  # cached
    assert packed.terms.dtype == torch.int32 and packed.terms.is_contiguous()
    assert packed.terms.shape == (1, 2, 9) and packed.tiles is None
    assert (packed.num_q_blocks, packed.num_k_blocks, packed.num_classes) == (4, 4, 1)
    mask = torch.rand(1, 100, 130, generator=torch.Generator().manual_seed(0)) < 0.3
    custom = P.from_mask(mask).layout(100, 130, 64, 64)
    packed = ops.pack_layout(custom)
    assert packed.tiles.dtype == torch.uint8 and packed.tiles.shape[1:] == (64, 64)
    assert packed.terms is None and packed.kv_part_tile.dtype == torch.int32
    with pytest.raises(ValueError, match="64 x 64"):
        ops.pack_layout(P.causal().layout(100, 100, 32, 64))
    with pytest.raises(TypeError, match="BlockLayout"):
        ops.pack_layout("causal")


def test_key_mask_strides():
    km = torch.zeros(2, 1, 50, dtype=torch.bool)
    view, strides = ops.key_mask_strides(km, 2, 4, 50)
    assert strides == (50, 0, 1) and view.dtype == torch.uint8
    view, strides = ops.key_mask_strides(torch.zeros(50, dtype=torch.bool), 2, 4, 50)
    assert strides == (0, 0, 1)
    assert ops.key_mask_strides(None, 2, 4, 50) == (None, (0, 0, 0))
    with pytest.raises(TypeError, match="bool"):
        ops.key_mask_strides(torch.zeros(2, 1, 50), 2, 4, 50)
    with pytest.raises(ValueError, match="broadcast"):
        ops.key_mask_strides(torch.zeros(3, 1, 50, dtype=torch.bool), 2, 4, 50)


def test_prepare_rows_pads_and_aligns():
    x = torch.randn(2, 3, 10, 41, dtype=torch.float16)
    y = ops.prepare_rows(x, 64)
    assert y.shape == (2, 3, 10, 64) and torch.equal(y[..., :41], x) and not y[..., 41:].any()
    x = torch.randn(2, 3, 10, 64, dtype=torch.float16)
    assert ops.prepare_rows(x, 64) is x
    t = x.transpose(1, 2)  # strides still multiples of 8: read in place
    assert ops.prepare_rows(t, 64) is t
    odd = torch.randn(1, 1, 10 * 64 + 1, dtype=torch.float16)[..., 1:].view(1, 1, 10, 64)
    fixed = ops.prepare_rows(odd, 64)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, odd)


def test_sparse_params_fields():
    q = torch.randn(2, 4, 70, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 90, 64, dtype=torch.bfloat16)
    lay = P.causal().layout(70, 90, 64, 64)
    packed = ops.pack_layout(lay)
    km = torch.zeros(2, 1, 90, dtype=torch.bool)
    f = ops.sparse_params(q=q, k=k, v=k, layout=packed, scale=0.5, key_mask=km)
    assert (f["batch"], f["heads"], f["kv_heads"], f["n_q"], f["n_k"]) == (2, 4, 2, 70, 90)
    assert f["q_offset"] == 20 and f["dtype"] == 1 and f["head_dim"] == 64
    assert (f["q_sb"], f["q_sh"], f["q_sn"]) == q.stride()[:3]
    assert (f["km_sb"], f["km_sh"], f["km_sn"]) == (90, 0, 1)
    assert f["num_terms"] == 1 and "tiles" not in f and "use_tiles" not in f
    assert f["max_kv_full"] == lay.kv_full_idx.shape[-1]
    assert abs(f["scale_log2"] - 0.5 * 1.4426950408889634) < 1e-12


def test_runners_refuse_mismatched_inputs_before_launching():
    q = torch.randn(1, 2, 70, 64, dtype=torch.float16)
    lay = P.causal().layout(70, 70, 64, 64)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        ops.run_sparse_forward(None, 0, q, q.bfloat16(), q, lay, scale=0.1)
    with pytest.raises(ValueError, match="layout is for n_q=70"):
        ops.run_sparse_forward(None, 0, q[:, :, :50], q, q, lay, scale=0.1)
    r, u = torch.randn(2, 10, 64, dtype=torch.float16), torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="vb must have q's dtype"):
        ops.run_xl_forward(None, 0, q, q, q, r, u, u.float(), scale=0.1, window=None)


def test_check_refuses_clearly():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises((TypeError, ValueError), match="(?i)cuda"):
        ops.check(q, q, q)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' is not available|CUDA"):
            effattn.sparse_attention(q.half(), q.half(), q.half(), P.causal(), backend="cuda")


def test_auto_never_picks_cuda():
    # Until a GPU run of this file is recorded, "auto" must not choose the CUDA backend.
    from effattn.ops import dispatch

    assert not dispatch.get("cuda").auto
    x = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    assert dispatch.select("auto", "sparse", x, x, key_mask=False).name != "cuda"
    if torch.cuda.is_available():
        x = x.cuda()
        assert dispatch.select("auto", "sparse", x, x, key_mask=False).name != "cuda"


# --------------------------------------------------------------------------- emulator


def _inputs(b, h, h_kv, n_q, n_k, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g).to(device, dtype)
    k = torch.randn(b, h_kv, n_k, d, generator=g).to(device, dtype)
    v = torch.randn(b, h_kv, n_k, d, generator=g).to(device, dtype)
    return q, k, v


@pytest.fixture
def emulated(emu, monkeypatch):
    """backend="cuda" on CPU tensors, served by the emulated kernels: effattn's public functions
    (validation, plans, merges, custom ops, autograd) run unchanged around them."""

    def check(q, k=None, v=None):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"the cuda backend takes fp16 or bf16 tensors, got {q.dtype}")
        ops.padded_head_dim(q.shape[-1])

    def sparse_forward(q, k, v, layout_fn, *, scale, key_mask=None):
        lay = layout_fn(ops.BLOCK, ops.BLOCK)
        return ops.run_sparse_forward(emu, 0, q, k, v, lay, scale=scale, key_mask=key_mask)

    def sparse_backward(q, k, v, dout, lse, delta, layout_fn, *, scale, key_mask=None):
        lay = layout_fn(ops.BLOCK, ops.BLOCK)
        return ops.run_sparse_backward(
            emu, 0, q, k, v, dout, lse, delta, lay, scale=scale, key_mask=key_mask
        )

    def xl_forward(*args, scale, window):
        return ops.run_xl_forward(emu, 0, *args, scale=scale, window=window)

    def xl_backward(*args, scale, window):
        return ops.run_xl_backward(emu, 0, *args, scale=scale, window=window)

    monkeypatch.setattr(ops, "check", check)
    monkeypatch.setattr(ops, "xl_check", check)
    monkeypatch.setattr(ops, "sparse_forward", sparse_forward)
    monkeypatch.setattr(ops, "sparse_backward", sparse_backward)
    monkeypatch.setattr(ops, "xl_forward", xl_forward)
    monkeypatch.setattr(ops, "xl_backward", xl_backward)
    # The backend then serves CPU tensors, with no GPU and no CUDA part in effattn._C.
    monkeypatch.setattr(dispatch.CudaBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(dispatch.CudaBackend, "devices", frozenset({"cpu", "cuda"}))
    return emu


def _assert_close(name, got, want, dtype):
    # Inputs rounded to 16 bits, fp32 accumulation: errors of a few units of the last place.
    tol = 5e-3 if dtype == torch.float16 else 2e-2
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 1.0)
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"


def check_sparse(
    pattern, b, h, h_kv, n_q, n_k, d, dtype, kpm=None, backend="cuda", seed=0, device="cpu"
):
    """sparse_attention through `backend` against the fp64 reference: out, lse and the gradients
    of a loss on both (the merge's backward uses both)."""
    q, k, v = _inputs(b, h, h_kv, n_q, n_k, d, dtype, seed, device)
    if kpm is not None:
        kpm = kpm.to(device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = effattn.sparse_attention(
        q, k, v, pattern, key_padding_mask=kpm, backend=backend, return_lse=True
    )
    mask = pattern.mask(n_q, n_k, h, device=q.device).unsqueeze(0)
    if kpm is not None:
        mask = mask & ~kpm[:, None, None]
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(*ref_in, mask, return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    _assert_close("out", out, ref_out, dtype)
    _assert_close("lse", lse[finite], ref_lse[finite], dtype)
    g = torch.Generator(device=q.device).manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g, device=q.device).to(dtype)
    dlse = torch.randn(lse.shape, generator=g, device=q.device).masked_fill(~finite, 0)

    def loss(o, s):
        return (o.double() * dout.double()).sum() + (torch.where(finite, s, 0) * dlse).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), ref_in)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype, name
        _assert_close(name, got, want, dtype)


def _padding(b, n_k, seed=5, empty_batch=None):
    kpm = torch.rand(b, n_k, generator=torch.Generator().manual_seed(seed)) < 0.2
    if empty_batch is not None:
        kpm[empty_batch] = True  # every key hidden: zero rows, lse -inf, zero gradients
    return kpm


def _random_mask(h, n_q, n_k, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, n_q, n_k, generator=g) < density


# The matrix of the emulated runs (and, with larger sizes, of the GPU runs): natural and
# decomposed plans (strided / fixed, several head classes), ragged sizes, GQA, key padding,
# rows with no visible key, custom masks (stored tiles), both dtypes, padded head dims.
EMU_CASES = [
    # pattern, b, h, h_kv, n_q, n_k, d, dtype, key padding (None, "random" or "empty")
    (P.causal(), 1, 2, 1, 100, 100, 64, torch.float16, None),
    (P.full(), 1, 1, 1, 70, 130, 128, torch.bfloat16, "random"),
    (P.local(20, causal=False), 2, 1, 1, 90, 90, 80, torch.float16, "empty"),
    (P.strided(24), 1, 2, 2, 150, 150, 64, torch.bfloat16, None),
    (P.strided(32), 1, 1, 1, 512, 512, 64, torch.float16, None),  # decomposed
    (P.strided(16, causal=False), 1, 2, 1, 256, 256, 41, torch.bfloat16, "random"),  # decomposed
    (P.fixed(32, 4, num_patterns=2), 1, 2, 1, 320, 320, 64, torch.float16, "random"),  # decomposed
    (P.fixed(64, 8, 2, causal=False), 1, 2, 2, 400, 400, 64, torch.float16, None),  # decomposed
    (P.per_head(P.strided(5), P.local(7)), 1, 4, 2, 130, 130, 128, torch.float16, None),
    (P.union(P.local(3), P.fixed(10, 2)), 1, 1, 1, 33, 200, 64, torch.bfloat16, "random"),
    (P.from_mask(_random_mask(1, 70, 100, 0.2, 3)), 1, 1, 1, 70, 100, 64, torch.float16, None),
    (P.from_mask(_random_mask(2, 90, 90, 0.1, 4)), 1, 2, 1, 90, 90, 64, torch.bfloat16, "empty"),
    (P.causal(), 1, 1, 1, 1, 77, 64, torch.float16, None),  # decoding: one query
]


def test_emulated_cases_cover_decomposed_plans():
    decomposed = [c for c in EMU_CASES if len(plan(c[0], c[4], c[5], 64, 64)) > 1]
    assert len(decomposed) >= 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", EMU_CASES, ids=lambda c: f"{c[0].name[:28]}-{c[4]}x{c[5]}-d{c[6]}-{str(c[7])[6:]}"
)
def test_emulated_sparse_attention_matches_reference(emulated, case):
    pattern, b, h, h_kv, n_q, n_k, d, dtype, padding = case
    kpm = (
        None if padding is None else _padding(b, n_k, empty_batch=0 if padding == "empty" else None)
    )
    check_sparse(pattern, b, h, h_kv, n_q, n_k, d, dtype, kpm)


@pytest.mark.slow
def test_emulated_kernels_read_strided_inputs_in_place(emulated):
    # [B, N, H, D] projections viewed as [B, H, N, D] (nn.MultiheadAttention's layout): the
    # kernels read them through their strides, without a copy.
    b, n, h, d = 2, 100, 2, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, 3 * h, d, generator=g).to(torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x.split(h, dim=2))
    assert ops.prepare_rows(q, d) is q
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = effattn.sparse_attention(q, k, v, P.local(30), backend="cuda")
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_in, P.local(30))
    _assert_close("out", out, ref, torch.bfloat16)
    dout = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, got, want, torch.bfloat16)


def test_emulated_backward_returns_fp32(emu):
    # The parts of a plan add up in fp32 before functional rounds them once.
    q, k, v = _inputs(1, 2, 1, 70, 70, 48, torch.bfloat16)
    lay = P.causal().layout(70, 70, 64, 64)
    out, lse = ops.run_sparse_forward(emu, 0, q, k, v, lay, scale=0.2)
    delta = (out.float() * q.float()).sum(-1)
    grads = ops.run_sparse_backward(emu, 0, q, k, v, q, lse, delta, lay, scale=0.2)
    assert [(g.dtype, g.shape) for g in grads] == [(torch.float32, t.shape) for t in (q, k, v)]
    xl = _xl_inputs(1, 2, 1, 10, 5, 8, 48, torch.float16)
    out, lse = ops.run_xl_forward(emu, 0, *xl, scale=0.2, window=None)
    grads = ops.run_xl_backward(emu, 0, *xl, out, xl[0], lse, lse, scale=0.2, window=None)
    assert [(g.dtype, g.shape) for g in grads] == [(torch.float32, t.shape) for t in xl]


# --------------------------------------------------------------------------- Transformer-XL
def test_xl_diagonals_cover_every_allowed_tile():
    for n_q, n_k, window in [
        (70, 120, None),
        (64, 64, 30),
        (200, 260, 70),
        (1, 300, 5),
        (130, 130, 1),
    ]:
        first, count = ops.xl_diagonals(n_q, n_k, window)
        nqb, nkb = -(-n_q // 64), -(-n_k // 64)
        mem, win = n_k - n_q, n_k if window is None else window
        i = torch.arange(n_q).view(-1, 1)
        j = torch.arange(n_k).view(1, -1)
        d = mem + i - j
        allowed = (d >= 0) & (d < win)
        rows, cols = allowed.nonzero(as_tuple=True)
        needed = set((rows // 64 - cols // 64).tolist())
        assert needed <= set(range(first, first + count)), (n_q, n_k, window)
        for e in range(first, first + count):  # every visited diagonal holds a tile
            assert max(e, 0) < min(nqb, nkb + e)


def test_fold_bands_matches_a_direct_sum():
    g = torch.Generator().manual_seed(0)
    for base, n_diag, n_r in [(-63, 3, 300), (-63, 4, 40), (5, 2, 100), (-10, 5, 1)]:
        parts = torch.randn(2, 3, n_diag, 128, 4, generator=g, dtype=torch.float64)
        want = torch.zeros(3, n_r, 4, dtype=torch.float64)
        for p in range(n_diag):
            for t in range(128):
                dist = base + 64 * p + t
                if dist >= 0:
                    want[:, min(dist, n_r - 1)] += parts[:, :, p, t].sum(0)
        assert torch.allclose(ops.fold_bands(parts, base, n_r), want)


def test_xl_geometry():
    g = ops.launch_geometry(
        "xl_bwd_dr", head_dim=128, batch=2, heads=4, kv_heads=2, n_q=70, n_k=120, window=None
    )
    assert (g.grid_x, g.grid_y, g.threads) == (ops.xl_diagonals(70, 120, None)[1], 8, 256)
    g = ops.launch_geometry(
        "xl_bwd_dkdv", head_dim=64, batch=2, heads=4, kv_heads=2, n_q=70, n_k=120
    )
    assert (g.grid_x, g.grid_y, g.threads) == (2, 4, 256)


XL_CASES = [
    # b, h, h_kv, L, M, R, D, dtype, window
    (1, 2, 1, 70, 50, 40, 64, torch.float16, None),
    (1, 1, 1, 64, 0, 100, 128, torch.bfloat16, 30),
    (2, 2, 2, 130, 100, 20, 41, torch.float16, None),
    (1, 2, 2, 3, 150, 200, 64, torch.bfloat16, 70),
]


def _xl_inputs(b, h, h_kv, n_q, mem, n_r, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)
    q, k, v = rnd(b, h, n_q, d), rnd(b, h_kv, mem + n_q, d), rnd(b, h_kv, mem + n_q, d)
    return q, k, v, rnd(h, n_r, d), rnd(h, d), rnd(h, d)


def check_xl(b, h, h_kv, n_q, mem, n_r, d, dtype, window, backend="cuda", device="cpu"):
    """xl_attention through `backend` against the fp64 reference, gradients of all six inputs."""
    inputs = [
        t.to(device).requires_grad_() for t in _xl_inputs(b, h, h_kv, n_q, mem, n_r, d, dtype)
    ]
    out, lse = effattn.xl_attention(*inputs, window=window, backend=backend, return_lse=True)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_lse = reference.xl_attention(*ref_in, window=window, return_lse=True)
    _assert_close("out", out, ref_out, dtype)
    _assert_close("lse", lse, ref_lse, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    dout = torch.randn(out.shape, generator=g, device=device).to(dtype)
    dlse = torch.randn(lse.shape, generator=g, device=device)

    def loss(o, s):
        return (o.double() * dout.double()).sum() + (s.double() * dlse.double()).sum()

    grads = torch.autograd.grad(loss(out, lse), inputs)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), ref_in)
    for name, got, want in zip(("dq", "dk", "dv", "dr", "du", "dvb"), grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        _assert_close(name, got, want, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", XL_CASES, ids=lambda c: f"L{c[3]}-M{c[4]}-R{c[5]}-d{c[6]}-w{c[8]}")
def test_emulated_xl_attention_matches_reference(emulated, case):
    check_xl(*case)


# --------------------------------------------------------------------------- GPU
# The same matrix on the real kernels, plus sizes where plans decompose at scale. Run on a GPU
# machine after `EFFATTN_CUDA=1 pip install --no-build-isolation -e .`:
#     python -m pytest tests/test_cuda.py -m gpu
GPU_CASES = EMU_CASES + [
    (P.strided(128), 2, 4, 2, 2048, 2048, 64, torch.bfloat16, "random"),
    (P.fixed(128, 16, num_patterns=2), 1, 4, 4, 2048, 2048, 128, torch.float16, None),
    (P.strided(64, causal=False), 1, 2, 1, 1000, 1000, 96, torch.bfloat16, "empty"),
    (P.causal(), 2, 8, 2, 777, 1500, 128, torch.float16, "random"),
]


def _gpu_ready():
    if not HAS_GPU:
        return
    if "cuda" not in effattn.backends():
        pytest.fail(
            "a CUDA device is present but effattn._C has no CUDA kernels: build with "
            "EFFATTN_CUDA=1 pip install --no-build-isolation -e ."
        )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "case", GPU_CASES, ids=lambda c: f"{c[0].name[:28]}-{c[4]}x{c[5]}-d{c[6]}-{str(c[7])[6:]}"
)
def test_gpu_sparse_attention_matches_reference(case):
    _gpu_ready()
    pattern, b, h, h_kv, n_q, n_k, d, dtype, padding = case
    kpm = (
        None if padding is None else _padding(b, n_k, empty_batch=0 if padding == "empty" else None)
    )
    check_sparse(pattern, b, h, h_kv, n_q, n_k, d, dtype, kpm, device="cuda")


GPU_XL_CASES = XL_CASES + [
    (2, 8, 2, 512, 512, 1024, 64, torch.bfloat16, None),
    (1, 4, 4, 300, 1000, 200, 128, torch.float16, 500),
    (4, 2, 1, 1, 700, 800, 64, torch.float16, None),  # decoding one token
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "case", GPU_XL_CASES, ids=lambda c: f"L{c[3]}-M{c[4]}-R{c[5]}-d{c[6]}-w{c[8]}"
)
def test_gpu_xl_attention_matches_reference(case):
    _gpu_ready()
    check_xl(*case, device="cuda")


@pytest.mark.gpu
@needs_gpu
def test_gpu_deterministic_and_stream_ordered():
    # No atomics anywhere: two runs give identical bits; and the kernels run on the current
    # stream, so work queued on a side stream sees their results in order.
    _gpu_ready()
    q, k, v = (
        t.requires_grad_() for t in _inputs(1, 4, 2, 600, 600, 64, torch.bfloat16, device="cuda")
    )
    stream = torch.cuda.Stream()
    results = []
    for _ in range(2):
        with torch.cuda.stream(stream):
            out = effattn.sparse_attention(q, k, v, P.strided(64), backend="cuda")
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        stream.synchronize()
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
def test_gpu_refuses_what_it_cannot_serve():
    _gpu_ready()
    q = torch.randn(1, 2, 64, 64, device="cuda")
    with pytest.raises(TypeError, match="fp16 or bf16"):
        effattn.sparse_attention(q, q, q, P.causal(), backend="cuda")
    q = torch.randn(1, 2, 64, 160, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="up to 128"):
        effattn.sparse_attention(q, q, q, P.causal(), backend="cuda")
