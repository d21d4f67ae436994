"""effattn.nn.SparseMultiheadAttention and replace_attention against nn.MultiheadAttention.

Most comparisons run in fp64 with the same parameters on both sides: the two compute the same
sums in a different order, so differences are ~1e-15 and the 1e-10 tolerances leave room only
for rounding. Sparse patterns are checked against nn.MultiheadAttention given the equivalent
attn_mask (~pattern.mask), which is the element-level definition of the pattern.

The attention itself runs on the blockwise PyTorch backend ("torch"), the kernel contract that
every backend implements; one test runs backend="auto".
"""

import copy
import gc
import sys
import warnings
from pathlib import Path

import pytest
import torch
from distributed_workers import run_workers
from torch import nn

from effattn import patterns as P
from effattn.nn import SparseMultiheadAttention, replace_attention

BACKEND = "torch"
F64 = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}
ROOT = Path(__file__).resolve().parents[1]


def pair(embed_dim=32, num_heads=2, pattern=None, seed=0, dtype=F64, **kw):
    """An nn.MultiheadAttention and a SparseMultiheadAttention with identical parameters."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kw)
    torch.manual_seed(seed)
    sparse = SparseMultiheadAttention(
        embed_dim, num_heads, P.full() if pattern is None else pattern, dtype=dtype,
        backend=BACKEND, **kw,
    )  # fmt: skip
    return mha, sparse


def inputs(b, n_q, n_k, e=32, kdim=None, vdim=None, batch_first=False, self_attn=True, seed=1):
    g = torch.Generator().manual_seed(seed)

    def make(n, width):
        shape = (b, n, width) if batch_first else (n, b, width)
        return torch.randn(shape, generator=g, dtype=F64, requires_grad=True)

    q = make(n_q, e)
    if self_attn:
        return q, q, q
    return q, make(n_k, kdim or e), make(n_k, vdim or e)


def check_same(mha, sparse, args, kwargs, grads=True):
    """Outputs, weights and gradients (inputs and parameters) of both modules agree."""
    want = mha(*args, **kwargs)
    got = sparse(*args, **kwargs)
    assert torch.allclose(got[0], want[0], **TOL)
    if want[1] is None:
        assert got[1] is None
    else:
        assert got[1].shape == want[1].shape
        assert torch.allclose(got[1], want[1], **TOL)
    if not grads:
        return
    dout = torch.randn_like(want[0])
    leaves = [a for a in dict.fromkeys(args) if a.requires_grad]
    g_want = torch.autograd.grad((want[0] * dout).sum(), leaves + list(mha.parameters()))
    g_got = torch.autograd.grad((got[0] * dout).sum(), leaves + list(sparse.parameters()))
    for a, w in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, w, **TOL)


def causal_mask(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


# ----------------------------------------------------------------------------- parameters
CONFIGS = [
    {},
    {"kdim": 24, "vdim": 20},
    {"bias": False},
    {"add_bias_kv": True, "add_zero_attn": True},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_parameters_and_initialization_match(kw):
    mha, sparse = pair(**kw)
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in mha.named_parameters()]
    assert list(sparse.state_dict()) == list(mha.state_dict())
    for (name, a), b in zip(sparse.state_dict().items(), mha.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # same seed, same initialization
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "batch_first"):
        assert getattr(sparse, attr) == getattr(mha, attr)
    assert sparse._qkv_same_embed_dim == mha._qkv_same_embed_dim


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_state_dict_loads_both_ways(kw):
    mha, sparse = pair(**kw)
    fresh_sparse = SparseMultiheadAttention(32, 2, P.full(), dtype=F64, backend=BACKEND, **kw)
    fresh_sparse.load_state_dict(mha.state_dict())
    fresh_mha = nn.MultiheadAttention(32, 2, dtype=F64, **kw)
    fresh_mha.load_state_dict(sparse.state_dict())
    cross = "kdim" in kw
    q, k, v = inputs(3, 9, 11, kdim=kw.get("kdim"), vdim=kw.get("vdim"), self_attn=not cross)
    check_same(mha, fresh_sparse, (q, k, v), {"need_weights": False}, grads=False)
    check_same(fresh_mha, sparse, (q, k, v), {"need_weights": False}, grads=False)


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "kw, n_q, n_k, self_attn",
    [
        ({}, 37, 37, True),
        ({"add_bias_kv": True}, 37, 37, True),
        ({"add_zero_attn": True, "bias": False}, 20, 20, True),
        ({"kdim": 24, "vdim": 20}, 13, 29, False),  # cross-attention, L < S
        ({"add_bias_kv": True, "add_zero_attn": True}, 29, 7, False),  # L > S: full() only
    ],
    ids=["self", "bias_kv", "zero_attn", "kdim_vdim", "long_queries"],
)
def test_full_pattern_equals_mha(kw, n_q, n_k, self_attn, batch_first, need_weights):
    mha, sparse = pair(batch_first=batch_first, **kw)
    args = inputs(
        2, n_q, n_k, kdim=kw.get("kdim"), vdim=kw.get("vdim"), batch_first=batch_first,
        self_attn=self_attn,
    )  # fmt: skip
    kpm = torch.zeros(2, n_k, dtype=torch.bool)
    kpm[1, -3:] = True
    for kpm_arg in (None, kpm, torch.zeros(2, n_k, dtype=F64).masked_fill(kpm, float("-inf"))):
        check_same(mha, sparse, args, {"need_weights": need_weights, "key_padding_mask": kpm_arg})


@pytest.mark.parametrize("batch_first", [False, True])
def test_default_constructor_is_the_same_function_as_mha(batch_first):
    """SparseMultiheadAttention(E, H) with nn.MultiheadAttention(E, H)'s seed: the same outputs
    and gradients, with and without weights, L < S and L > S included (pattern full())."""
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, dtype=F64)
    torch.manual_seed(7)
    sparse = SparseMultiheadAttention(32, 4, batch_first=batch_first, dtype=F64)
    assert sparse.pattern.name == P.full().name
    for n_q, n_k, self_attn in ((23, 23, True), (9, 17, False), (17, 9, False)):
        args = inputs(2, n_q, n_k, batch_first=batch_first, self_attn=self_attn)
        for kwargs in ({}, {"need_weights": False}):
            check_same(mha, sparse, args, kwargs)
    # causal users say so: with a pattern, or per call
    q, k, v = inputs(2, 19, 19, batch_first=batch_first)
    want = mha(q, k, v, attn_mask=causal_mask(19), need_weights=False)[0]
    assert torch.allclose(sparse(q, k, v, need_weights=False, is_causal=True)[0], want, **TOL)
    torch.manual_seed(7)
    causal = SparseMultiheadAttention(32, 4, P.causal(), batch_first=batch_first, dtype=F64)
    assert torch.allclose(causal(q, k, v, need_weights=False)[0], want, **TOL)


@pytest.mark.parametrize("average", [True, False])
def test_weights_per_head_and_averaged(average):
    mha, sparse = pair(add_bias_kv=True)
    args = inputs(2, 11, 11)
    check_same(mha, sparse, args, {"average_attn_weights": average})


def test_causal_pattern_equals_mha_with_causal_mask():
    mha, sparse = pair(pattern=P.causal(), add_bias_kv=True)
    q, k, v = inputs(3, 70, 70)
    want = mha(q, k, v, attn_mask=causal_mask(70), need_weights=False)[0]
    for kwargs in (
        {},
        {"is_causal": True},
        {"attn_mask": causal_mask(70)},
        {"attn_mask": nn.Transformer.generate_square_subsequent_mask(70, dtype=F64)},
        {"attn_mask": causal_mask(70), "is_causal": True},
    ):
        got = sparse(q, k, v, need_weights=False, **kwargs)[0]
        assert torch.allclose(got, want, **TOL), kwargs
    full = SparseMultiheadAttention(32, 2, P.full(), add_bias_kv=True, dtype=F64, backend=BACKEND)
    full.load_state_dict(mha.state_dict())
    check_same(mha, full, (q, k, v), {"attn_mask": causal_mask(70), "is_causal": True})


@pytest.mark.parametrize(
    "pattern",
    [
        P.strided(4),
        P.strided(5, causal=False),
        P.fixed(8, 2),
        P.fixed(6, 2, num_patterns=2, causal=False),
        P.local(3),
        P.per_head(P.strided(4), P.local(6, causal=False)),
    ],
    ids=lambda p: p.name,
)
def test_sparse_pattern_equals_mha_with_its_mask(pattern):
    mha, sparse = pair(pattern=pattern, add_zero_attn=True)
    q, k, v = inputs(2, 45, 45)
    kpm = torch.zeros(2, 45, dtype=torch.bool)
    kpm[0, 10:13] = True
    blocked = ~pattern.mask(45, 45, 2)  # [1 or H, L, S]
    want_mask = blocked.repeat(2, 1, 1) if blocked.shape[0] == 2 else blocked[0]
    want = mha(q, k, v, attn_mask=want_mask, key_padding_mask=kpm)
    got = sparse(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    assert torch.allclose(got, want[0], **TOL)
    # need_weights runs the dense path: same output, and the weights.
    got_w = sparse(q, k, v, key_padding_mask=kpm)
    assert torch.allclose(got_w[0], want[0], **TOL)
    assert torch.allclose(got_w[1], want[1], **TOL)


def test_attn_mask_is_intersected_with_the_pattern():
    pattern = P.strided(4)
    mha, sparse = pair(pattern=pattern)
    q, k, v = inputs(2, 33, 33)
    g = torch.Generator().manual_seed(3)
    user = torch.rand(33, 33, generator=g) < 0.3
    user.fill_diagonal_(False)  # every query keeps a key: nn.MultiheadAttention gives NaN else
    blocked = user | ~pattern.mask(33, 33)[0]
    want = mha(q, k, v, attn_mask=blocked)
    for mask in (user, torch.zeros(33, 33, dtype=F64).masked_fill(user, float("-inf"))):
        got = sparse(q, k, v, attn_mask=mask, need_weights=False)[0]
        assert torch.allclose(got, want[0], **TOL)
        got_w = sparse(q, k, v, attn_mask=mask)
        assert torch.allclose(got_w[1], want[1], **TOL)
    # 3-D masks: one per (batch, head), different across the batch.
    per = torch.rand(4, 33, 33, generator=g) < 0.3
    per[:, torch.arange(33), torch.arange(33)] = False
    blocked3 = per | ~pattern.mask(33, 33)
    check_same(mha, sparse, (q, k, v), {"attn_mask": blocked3, "need_weights": False})
    got = sparse(q, k, v, attn_mask=per, need_weights=False)[0]
    assert torch.allclose(got, mha(q, k, v, attn_mask=blocked3)[0], **TOL)


def test_is_causal_intersects_a_non_causal_pattern():
    pattern = P.local(4, causal=False)
    mha, sparse = pair(pattern=pattern)
    q, k, v = inputs(2, 30, 30)
    blocked = ~pattern.mask(30, 30)[0] | causal_mask(30)
    want = mha(q, k, v, attn_mask=blocked)
    assert torch.allclose(sparse(q, k, v, is_causal=True, need_weights=False)[0], want[0], **TOL)
    got = sparse(q, k, v, is_causal=True)
    assert torch.allclose(got[1], want[1], **TOL)


def test_custom_pattern_and_per_call_mask_survive_until_backward():
    base = torch.rand(20, 20, generator=torch.Generator().manual_seed(0)) < 0.5
    base.fill_diagonal_(True)
    pattern = P.from_mask(base)
    mha, sparse = pair(pattern=pattern)
    q, k, v = inputs(2, 20, 20)
    extra = causal_mask(20)
    out = sparse(q, k, v, attn_mask=extra, need_weights=False)[0]
    gc.collect()  # the per-call pattern must outlive this call until backward
    g_got = torch.autograd.grad(out.sum(), q)
    want = mha(q, k, v, attn_mask=~base | extra)[0]
    assert torch.allclose(out, want, **TOL)
    assert torch.allclose(g_got[0], torch.autograd.grad(want.sum(), q)[0], **TOL)
    # A custom pattern with is_causal goes through a mask too.
    got = sparse(q, k, v, is_causal=True, need_weights=False)[0]
    assert torch.allclose(got, want, **TOL)


def test_unbatched_inputs():
    mha, sparse = pair(pattern=P.strided(3), add_bias_kv=True)
    q = torch.randn(17, 32, dtype=F64)
    mask = ~P.strided(3).mask(17, 17, 2)[0]
    kpm = torch.zeros(17, dtype=torch.bool)
    kpm[5] = True
    want = mha(q, q, q, attn_mask=mask, key_padding_mask=kpm)
    got = sparse(q, q, q, key_padding_mask=kpm, need_weights=False)
    assert got[0].shape == (17, 32)
    assert torch.allclose(got[0], want[0], **TOL)
    got = sparse(q, q, q, key_padding_mask=kpm, attn_mask=mask.expand(2, 17, 17))
    assert got[1].shape == (17, 18)
    assert torch.allclose(got[1], want[1], **TOL)


def test_small_head_dim_is_padded_exactly():
    mha, sparse = pair(embed_dim=16, num_heads=4, pattern=P.full())  # head dim 4 < 16
    check_same(mha, sparse, inputs(2, 21, 21, e=16), {"need_weights": False})


def test_query_without_visible_keys_returns_zero():
    """nn.MultiheadAttention gives NaN here; the kernels' convention is a zero attention row."""
    _, sparse = pair(pattern=P.local(2))
    with torch.no_grad():
        sparse.out_proj.bias.normal_()
    q = torch.randn(5, 1, 32, dtype=F64)
    kpm = torch.ones(1, 5, dtype=torch.bool)
    bias = sparse.out_proj.bias.detach().expand(5, 1, 32)
    got = sparse(q, q, q, key_padding_mask=kpm, need_weights=False)[0]
    assert torch.equal(got, bias)  # zero attention output, then out_proj's bias
    got, weights = sparse(q, q, q, key_padding_mask=kpm)
    assert torch.equal(got, bias) and torch.equal(weights, torch.zeros(1, 5, 5, dtype=F64))


# ----------------------------------------------------------------------------- dropout
def test_dropout_in_training_needs_the_dense_path():
    mha, sparse = pair(dropout=0.5)
    q, k, v = inputs(2, 12, 12)
    with pytest.raises(NotImplementedError, match="dropout"):
        sparse(q, k, v, need_weights=False)
    # Dense path: nn.MultiheadAttention's dropout on the same [B * H, L, S] probabilities.
    torch.manual_seed(5)
    want = mha(q, k, v)
    torch.manual_seed(5)
    got = sparse(q, k, v)
    assert torch.allclose(got[0], want[0], **TOL)
    assert torch.allclose(got[1], want[1], **TOL)
    mha.eval()
    sparse.eval()
    check_same(mha, sparse, (q, k, v), {"need_weights": False}, grads=False)


# ----------------------------------------------------------------------------- bad input
def test_bad_construction():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SparseMultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="over 256"):
        SparseMultiheadAttention(1024, 2)
    with pytest.raises(TypeError, match="pattern must be"):
        SparseMultiheadAttention(32, 2, "strided")
    with pytest.raises(ValueError, match="num_heads=2 is not divisible by 3"):
        SparseMultiheadAttention(32, 2, P.per_head(P.causal(), P.local(2), P.strided(2)))
    with pytest.raises(ValueError, match="dropout"):
        SparseMultiheadAttention(32, 2, dropout=1.5)
    with pytest.raises(ValueError, match="backend"):
        SparseMultiheadAttention(32, 2, backend="fast")
    with pytest.raises(ValueError, match="embed_dim"):
        SparseMultiheadAttention(0, 2)
    sparse = SparseMultiheadAttention(32, 2)
    with pytest.raises(ValueError, match="num_heads=2"):
        sparse.pattern = P.per_head(P.causal(), P.local(2), P.strided(2))


def test_bad_masks_and_inputs():
    _, sparse = pair(pattern=P.strided(4))
    q, k, v = inputs(2, 10, 10)
    cases = [
        ({"attn_mask": torch.zeros(10, 9, dtype=torch.bool)}, ValueError, r"attn_mask must have shape \[L, S\]"),
        ({"attn_mask": torch.zeros(3, 10, 10, dtype=torch.bool)}, ValueError, r"\[B \* H, L, S\]"),
        ({"attn_mask": torch.zeros(10, 10, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
        ({"attn_mask": torch.full((10, 10), 0.5, dtype=F64)}, ValueError, "only masks made of 0 and -inf"),
        ({"key_padding_mask": torch.zeros(10, 2, dtype=torch.bool)}, ValueError, r"key_padding_mask must have shape \[2, 10\]"),
        ({"key_padding_mask": torch.zeros(2, 10, dtype=torch.int32)}, TypeError, "key_padding_mask must be bool"),
        ({"key_padding_mask": torch.ones(2, 10, dtype=F64)}, ValueError, "only masks made of 0 and -inf"),
        ({"attn_mask": [[True]]}, TypeError, "attn_mask must be a torch.Tensor"),
    ]  # fmt: skip
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            sparse(q, k, v, need_weights=False, **kwargs)
    with pytest.raises(ValueError, match="query must have width 32"):
        sparse(q[..., :16], k, v)
    with pytest.raises(ValueError, match="must be 3-D like query"):
        sparse(q, k[0], v)
    with pytest.raises(ValueError, match="same batch size"):
        sparse(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="query must be 3-D"):
        sparse(q[0, 0], k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor API's prototype warning
        nested = torch.nested.nested_tensor([torch.randn(3, 32), torch.randn(4, 32)])
    with pytest.raises(TypeError, match="nested tensor"):
        sparse(nested, nested, nested)


def test_pattern_that_cannot_serve_the_sequence():
    fixed_size = P.from_mask(torch.ones(8, 8, dtype=torch.bool).tril())
    _, sparse = pair(pattern=fixed_size)
    q, k, v = inputs(2, 10, 10)
    with pytest.raises(ValueError, match="cannot serve n_q=10, n_k=10"):
        sparse(q, k, v, need_weights=False)
    _, causal = pair(pattern=P.causal())
    q, k, v = inputs(2, 12, 5, self_attn=False)
    with pytest.raises(ValueError, match="cannot serve L=12 queries against S=5 keys"):
        causal(q, k, v, need_weights=False)
    with pytest.raises(ValueError, match="cannot serve L=12 queries against S=5 keys"):
        causal(q, k, v)


# ----------------------------------------------------------------------------- from_dense
def test_from_dense_shares_parameters_and_mode():
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, add_bias_kv=True, dtype=F64).eval()
    rng = torch.get_rng_state()
    sparse = SparseMultiheadAttention.from_dense(mha, P.full(), backend=BACKEND)
    assert torch.equal(rng, torch.get_rng_state())  # built without drawing random numbers
    assert not sparse.training
    assert {id(p) for p in sparse.parameters()} == {id(p) for p in mha.parameters()}
    args = inputs(2, 9, 14, kdim=16, vdim=16, self_attn=False)
    check_same(mha, sparse, args, {"need_weights": False})
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SparseMultiheadAttention.from_dense(nn.Linear(3, 3), P.causal())


# ----------------------------------------------------------------------------- replace_attention
def encoder(dtype=torch.float32, heads=4):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, heads, 64, dropout=0.0, batch_first=True, dtype=dtype)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


def test_replace_attention_in_encoder_eval_fast_path():
    """The fused eval path (no_grad, batch_first, even heads) must not bypass the swap.

    Float32: the original model runs PyTorch's fused fp32 kernels, hence 1e-5.
    """
    model = encoder().eval()
    original = copy.deepcopy(model)
    x = torch.randn(3, 40, 32)
    kpm = torch.zeros(3, 40, dtype=torch.bool)
    kpm[1, 37:] = True  # every query keeps a visible key (else the fused path gives NaN)
    pattern = P.local(5, causal=False)
    assert replace_attention(model, pattern, backend=BACKEND) is model
    assert all(isinstance(layer.self_attn, SparseMultiheadAttention) for layer in model.layers)
    assert not model.use_nested_tensor
    with torch.no_grad():
        got = model(x, src_key_padding_mask=kpm)
        want = original(x, mask=~pattern.mask(40, 40)[0], src_key_padding_mask=kpm)
        assert torch.allclose(got, want, atol=1e-5)
        # Eval full() replacement equals the original's fused path (which pads with zeros).
        dense = replace_attention(copy.deepcopy(original), P.full(), backend=BACKEND)
        got = dense(x, src_key_padding_mask=kpm)
        want = original(x, src_key_padding_mask=kpm)
        keep = ~kpm
        assert torch.allclose(got[keep], want[keep], atol=1e-5)
        # The guard hook is what keeps the fused path off: without it PyTorch takes that path,
        # and the module refuses loudly.
        layer = model.layers[0]
        layer.self_attn._forward_pre_hooks.clear()
        with pytest.raises(RuntimeError, match="fused eval path"):
            layer(x)


def test_replace_attention_in_decoder_keeps_weights_and_trains():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 2, 64, dropout=0.0, dtype=F64)
    model = nn.Sequential(nn.Linear(32, 32, dtype=F64), nn.ModuleList([layer]))
    original = copy.deepcopy(model)
    before = {id(p) for p in model.parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_attention(model, P.causal(), backend=BACKEND)
    dec = model[1][0]
    assert dec.self_attn.pattern.name == "causal()"
    assert dec.multihead_attn.pattern.name == "full()"  # cross-attention: encoder memory
    assert {id(p) for p in model.parameters()} == before
    tgt = torch.randn(12, 2, 32, dtype=F64)
    memory = torch.randn(7, 2, 32, dtype=F64)  # L = 12 > S = 7 in the cross-attention

    def run(m):
        return m[1][0](m[0](tgt), memory, tgt_mask=causal_mask(12), tgt_is_causal=True)

    got, want = run(model), run(original)
    assert torch.allclose(got, want, **TOL)
    got.square().mean().backward()
    want.square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), original.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, **TOL), name
    opt.step()  # the optimizer built before the swap updates the swapped modules
    assert not torch.equal(dec.self_attn.in_proj_weight, original[1][0].self_attn.in_proj_weight)


def test_replace_attention_options():
    model = nn.ModuleDict(
        {
            "a": nn.MultiheadAttention(32, 2, dropout=0.1),
            "b": nn.Sequential(nn.MultiheadAttention(32, 4)),
        }
    )
    shared = nn.MultiheadAttention(32, 2)
    model["c"] = shared
    model["d"] = shared
    replace_attention(model, lambda name, m: None if name == "a" else P.strided(8), dropout=0.0)
    assert type(model["a"]) is nn.MultiheadAttention
    assert isinstance(model["b"][0], SparseMultiheadAttention)
    assert model["b"][0].pattern.name == "strided(8)"
    assert model["c"] is model["d"]  # sharing survives
    single = replace_attention(nn.MultiheadAttention(32, 2, dropout=0.2), P.causal(), dropout=0.0)
    assert isinstance(single, SparseMultiheadAttention) and single.dropout == 0.0
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        replace_attention("model", P.causal())
    with pytest.raises(TypeError, match="pattern must be a Pattern or a callable"):
        replace_attention(model, 3)
    with pytest.raises(TypeError, match="expected a Pattern or None"):
        replace_attention(nn.Sequential(nn.MultiheadAttention(32, 2)), lambda n, m: "causal")


# ----------------------------------------------------------------------------- tooling
def test_autocast_bf16_cpu():
    """bf16 keeps 8 bits of mantissa (eps 2**-8 = 3.9e-3): inputs, weights and both projections
    round at that level, so 3e-2 absolute on O(1) outputs; nn.MultiheadAttention under the same
    autocast is held to the same bound."""
    mha64, sparse = pair(pattern=P.strided(4), dtype=torch.float32, batch_first=True)
    mha64 = mha64.double()
    x = torch.randn(2, 50, 32)
    blocked = ~P.strided(4).mask(50, 50)[0]
    want = mha64(x.double(), x.double(), x.double(), attn_mask=blocked)[0]
    mha32 = copy.deepcopy(mha64).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sparse(x, x, x, need_weights=False)[0]
        theirs = mha32(x, x, x, attn_mask=blocked, need_weights=False)[0]
    assert got.dtype == torch.bfloat16
    assert (theirs.double() - want).abs().max() < 3e-2
    assert (got.double() - want).abs().max() < 3e-2


def test_compile_matches_eager():
    _, sparse = pair(pattern=P.strided(4), add_bias_kv=True, batch_first=True)
    x = torch.randn(2, 20, 32, dtype=F64, requires_grad=True)
    kpm = torch.zeros(2, 20, dtype=torch.bool)
    kpm[1, -4:] = True

    def f(x, kpm):
        return sparse(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    want = f(x, kpm)
    g_want = torch.autograd.grad(want.sum(), x)[0]
    compiled = torch.compile(f, backend="aot_eager")
    got = compiled(x, kpm)
    assert torch.allclose(got, want, **TOL)
    assert torch.allclose(torch.autograd.grad(got.sum(), x)[0], g_want, **TOL)
    # Inside nn.TransformerEncoderLayer the key padding mask arrives as a 0/-inf float mask.
    got = compiled(x, torch.zeros(2, 20, dtype=F64).masked_fill(kpm, float("-inf")))
    assert torch.allclose(got, want, **TOL)
    # A per-call attn_mask becomes a custom pattern, built eagerly (a graph break by design).
    blocked = torch.rand(20, 20, generator=torch.Generator().manual_seed(0)) < 0.3
    blocked.fill_diagonal_(False)

    def g(x, blocked):
        return sparse(x, x, x, attn_mask=blocked, need_weights=False)[0]

    want = g(x, blocked)
    got = torch.compile(g, backend="aot_eager")(x, blocked)
    assert torch.allclose(got, want, **TOL)
    assert torch.allclose(
        torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0], **TOL
    )


def test_compile_fullgraph_no_graph_breaks():
    _, sparse = pair(pattern=P.strided(4), add_bias_kv=True, batch_first=True)
    x = torch.randn(2, 20, 32, dtype=F64, requires_grad=True)
    kpm = torch.zeros(2, 20, dtype=F64)
    kpm[1, -4:] = float("-inf")  # a float mask, as nn.TransformerEncoderLayer passes it

    def f(x, kpm):
        return sparse(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0]

    want = f(x, kpm)  # eager first: backend modules get imported outside the trace
    explanation = torch._dynamo.explain(f)(x, kpm)
    assert explanation.graph_break_count == 0, [r.reason[:200] for r in explanation.break_reasons]
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, kpm)
    assert torch.allclose(got, want, **TOL)


def test_save_load_and_deepcopy(tmp_path):
    _, sparse = pair(pattern=P.fixed(8, 2), add_bias_kv=True)
    q, k, v = inputs(2, 30, 30)
    want = sparse(q, k, v, need_weights=False)[0]
    torch.save(sparse, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    assert loaded.pattern.name == "fixed(8, 2)"
    assert torch.equal(loaded(q, k, v, need_weights=False)[0], want)
    torch.save(sparse.state_dict(), tmp_path / "state.pt")
    mha = nn.MultiheadAttention(32, 2, add_bias_kv=True, dtype=F64)
    mha.load_state_dict(torch.load(tmp_path / "state.pt"))
    blocked = ~P.fixed(8, 2).mask(30, 30)[0]
    assert torch.allclose(mha(q, k, v, attn_mask=blocked)[0], want, **TOL)
    clone = copy.deepcopy(sparse)
    assert torch.equal(clone(q, k, v, need_weights=False)[0], want)
    assert clone.in_proj_weight is not sparse.in_proj_weight
    # The fused-path guard survives both.
    assert len(loaded._forward_pre_hooks) == len(clone._forward_pre_hooks) == 1


def test_auto_backend_matches_torch_backend():
    mha, sparse = pair(pattern=P.strided(4), dtype=torch.float32)
    sparse.backend = "auto"
    q = torch.randn(70, 2, 32)
    want = mha(q, q, q, attn_mask=~P.strided(4).mask(70, 70)[0], need_weights=False)[0]
    got = sparse(q, q, q, need_weights=False)[0]
    assert torch.allclose(got, want, atol=1e-5)  # fp32 sums of ~70 terms


# ----------------------------------------------------------------------------- DDP
def _ddp_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32, dtype=F64))
    model.append(nn.TransformerEncoderLayer(32, 2, 32, dropout=0.0, batch_first=True, dtype=F64))
    return replace_attention(model, P.strided(3), backend=BACKEND)


def _ddp_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, 8, generator=g, dtype=F64) for _ in range(2)]


def _train(model, batches, world=1, rank=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in batches:
        part = x.chunk(world)[rank]
        opt.zero_grad()
        model(part).square().mean().backward()
        opt.step()


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_ddp_model())
    _train(model, _ddp_data(), world, rank)
    return model.module.state_dict()


def test_ddp_gloo_two_processes_match_single_process():
    """DDP averages the two half-batch gradients = the full-batch mean gradient (fp64)."""
    results = run_workers(_ddp_worker, 2)
    single = _ddp_model()
    _train(single, _ddp_data())
    want = single.state_dict()
    for rank, got in enumerate(results):
        for name, w in want.items():
            assert torch.allclose(got[name], w, atol=1e-12), (rank, name)


# ----------------------------------------------------------------------------- example
def test_char_lm_example_smoke(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import char_lm
    finally:
        sys.path.pop(0)
    for attn in ("dense", "strided", "fixed"):
        result = char_lm.main(
            ["--attn", attn, "--steps", "3", "--seq-len", "64", "--batch", "2",
             "--layers", "1", "--backend", BACKEND, "--sample", "4", "--no-progress"]
        )  # fmt: skip
        assert result["steps"] == 3 and all(
            map(torch.isfinite, map(torch.tensor, result["losses"]))
        )
    assert "ms/step" in capsys.readouterr().out


# ----------------------------------------------------------------------------- decode
def _prefix_out(m, seq):
    """forward over the whole prefix [T, E] with the causal pattern: [T, E]."""
    s = seq[None] if m.batch_first else seq[:, None]
    out = m(s, s, s, need_weights=False, is_causal=True)[0]
    return out[0] if m.batch_first else out[:, 0]


@pytest.mark.parametrize(
    "pattern",
    [
        P.full(),
        P.causal(),
        P.strided(4),
        P.fixed(8, 2),
        P.fixed(6, 2, num_patterns=2),
        P.local(5, causal=False),
    ],
    ids=lambda p: p.name,
)
@pytest.mark.parametrize(
    "extras", [{}, {"add_bias_kv": True, "add_zero_attn": True}], ids=["plain", "bias_kv"]
)
def test_decode_equals_forward_over_the_prefix(pattern, extras):
    torch.manual_seed(0)
    m = SparseMultiheadAttention(
        32, 4, pattern, batch_first=True, dtype=F64, backend=BACKEND, **extras
    ).eval()
    x = torch.randn(3, 14, 32, dtype=F64)
    lengths = torch.tensor([10, 7, 14])  # right-padded prompts of different lengths
    with torch.no_grad():
        out, cache = m.decode(x, lengths=lengths)
        seqs = [x[i, :n] for i, n in enumerate(lengths.tolist())]
        for i, n in enumerate(lengths.tolist()):
            assert torch.allclose(out[i, :n], _prefix_out(m, seqs[i]), **TOL)
            assert bool((out[i, n:] == 0).all())
        for _ in range(5):
            tok = torch.randn(3, 1, 32, dtype=F64)
            out, cache = m.decode(tok, cache)
            for i in range(3):
                seqs[i] = torch.cat([seqs[i], tok[i]])
                assert torch.allclose(out[i, 0], _prefix_out(m, seqs[i])[-1], **TOL)
        assert cache.lengths.tolist() == [15, 12, 19] and len(cache) == 3
        # Beam search: reorder, repeat and drop streams, then go on.
        picked = cache.select([2, 0, 0])
        tok = torch.randn(3, 2, 32, dtype=F64)
        out, _ = m.decode(tok, picked)
        for new, old in enumerate([2, 0, 0]):
            seq = torch.cat([seqs[old], tok[new]])
            assert torch.allclose(out[new], _prefix_out(m, seq)[-2:], **TOL)


def test_decode_sequence_first_and_branching():
    torch.manual_seed(1)
    m = SparseMultiheadAttention(32, 2, P.strided(3), dtype=F64, backend=BACKEND).eval()
    x = torch.randn(6, 2, 32, dtype=F64)  # [T, B, E]
    with torch.no_grad():
        _, cache = m.decode(x)
        a, b = torch.randn(2, 1, 2, 32, dtype=F64)
        out_a, _ = m.decode(a, cache)
        out_b, _ = m.decode(b, cache)  # from the same cache again: must not see a's keys
        for tok, out in ((a, out_a), (b, out_b)):
            for i in range(2):
                seq = torch.cat([x[:, i], tok[:, i]])
                assert torch.allclose(out[0, i], _prefix_out(m, seq)[-1], **TOL)


def test_decode_storage_grows_by_doubling():
    m = SparseMultiheadAttention(32, 2, P.causal(), batch_first=True, dtype=F64).eval()
    with torch.no_grad():
        _, cache = m.decode(torch.randn(1, 3, 32, dtype=F64))
        storages = set()
        for _ in range(200):
            _, cache = m.decode(torch.randn(1, 1, 32, dtype=F64), cache)
            storages.add(id(cache.groups[0].storage))
    assert len(storages) <= 6, "appending must be amortized O(1): few reallocations"


def test_decode_bad_input():
    m = SparseMultiheadAttention(32, 2, P.causal(), batch_first=True, dtype=F64).eval()
    other = SparseMultiheadAttention(32, 2, P.causal(), batch_first=True, dtype=F64).eval()
    x = torch.randn(2, 3, 32, dtype=F64)
    with torch.no_grad():
        _, cache = m.decode(x)
        with pytest.raises(ValueError, match="another SparseMultiheadAttention"):
            other.decode(x, cache)
        with pytest.raises(ValueError, match="2 streams, x has batch 3"):
            m.decode(torch.randn(3, 1, 32, dtype=F64), cache)
        with pytest.raises(TypeError, match="cache holds torch.float64"):
            m.decode(x.float(), cache)
        with pytest.raises(TypeError, match="SparseCache"):
            m.decode(x, object())
        with pytest.raises(ValueError, match="lengths are given once"):
            m.decode(x, cache, lengths=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="lengths must be"):
            m.decode(x, lengths=torch.tensor([1, 5]))
        with pytest.raises(ValueError, match=r"x must be a \[B, T, 32\]"):
            m.decode(torch.randn(3, 16, dtype=F64))
        with pytest.raises(ValueError, match="indices"):
            cache.select([2])
    custom = SparseMultiheadAttention(32, 2, P.from_mask(torch.ones(1, 4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="serves any length"):
        custom.eval().decode(torch.randn(1, 1, 32))
