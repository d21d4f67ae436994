"""effattn.nn.XLMultiheadAttention: memory over segments, cached decoding, original weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effattn.nn import XLMultiheadAttention
from effattn.nn.xl import XLCache, sinusoid_embedding

D_MODEL, HEADS, D_HEAD = 32, 2, 16


def module(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    kw.setdefault("backend", "torch")
    m = XLMultiheadAttention(D_MODEL, HEADS, D_HEAD, **kw).double()
    with torch.no_grad():  # visible biases (their default init is tiny)
        m.r_w_bias.normal_()
        m.r_r_bias.normal_()
    return m


def seq(b, n, seed=1):
    return torch.randn(
        b, n, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


# --------------------------------------------------------------------------- the original
class OriginalPositionalEmbedding(nn.Module):
    """kimiyoung/transformer-xl's PositionalEmbedding, as in pytorch/mem_transformer.py."""

    def __init__(self, demb):
        super().__init__()
        self.register_buffer("inv_freq", 1 / (10000 ** (torch.arange(0.0, demb, 2.0) / demb)))

    def forward(self, pos_seq):
        sinusoid_inp = torch.outer(pos_seq, self.inv_freq.to(pos_seq.dtype))
        return torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)[:, None, :]


class OriginalRelPartialLearnableMultiHeadAttn(nn.Module):
    """A faithful re-implementation of the original layer (sequence-first, post-LN)."""

    def __init__(self, n_head, d_model, d_head, pre_lnorm=False):
        super().__init__()
        self.n_head, self.d_model, self.d_head = n_head, d_model, d_head
        self.pre_lnorm = pre_lnorm
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.layer_norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(0.0)
        self.dropatt = nn.Dropout(0.0)
        self.scale = 1 / (d_head**0.5)

    @staticmethod
    def _rel_shift(x):
        zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), dtype=x.dtype)
        x_padded = torch.cat([zero_pad, x], dim=1)
        x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])
        return x_padded[1:].view_as(x)

    def forward(self, w, r, r_w_bias, r_r_bias, attn_mask=None, mems=None):
        qlen, rlen, bsz = w.size(0), r.size(0), w.size(1)
        cat = w if mems is None else torch.cat([mems, w], 0)
        w_heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)
        r_head_k = self.r_net(r)
        w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)
        w_head_q = w_head_q[-qlen:]
        klen = w_head_k.size(0)
        w_head_q = w_head_q.view(qlen, bsz, self.n_head, self.d_head)
        w_head_k = w_head_k.view(klen, bsz, self.n_head, self.d_head)
        w_head_v = w_head_v.view(klen, bsz, self.n_head, self.d_head)
        r_head_k = r_head_k.view(rlen, self.n_head, self.d_head)
        ac = torch.einsum("ibnd,jbnd->ijbn", w_head_q + r_w_bias, w_head_k)
        bd = self._rel_shift(torch.einsum("ibnd,jnd->ijbn", w_head_q + r_r_bias, r_head_k))
        attn_score = (ac + bd) * self.scale
        if attn_mask is not None and attn_mask.any().item():
            attn_score = attn_score.masked_fill(attn_mask[:, :, :, None], -float("inf"))
        attn_prob = self.dropatt(F.softmax(attn_score, dim=1))
        attn_vec = torch.einsum("ijbn,jbnd->ibnd", attn_prob, w_head_v)
        attn_vec = attn_vec.contiguous().view(qlen, bsz, self.n_head * self.d_head)
        out = w + self.drop(self.o_net(attn_vec))
        return out if self.pre_lnorm else self.layer_norm(out)


def original_step(layer, pos_emb, w, mems, mem_len, clamp_len, same_length, biases):
    """MemTransformerLM._forward for one layer: mask, pos_seq, clamp_len, as the original."""
    qlen = w.size(0)
    mlen = 0 if mems is None else mems.size(0)
    klen = mlen + qlen
    all_ones = torch.ones(qlen, klen, dtype=torch.bool)
    if same_length:
        mask_len = klen - mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        mask = torch.triu(all_ones, 1 + mlen) | torch.tril(all_ones, -mask_shift_len)
    else:
        mask = torch.triu(all_ones, diagonal=1 + mlen)
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=w.dtype)
    if clamp_len > 0:
        pos_seq.clamp_(max=clamp_len)
    r = pos_emb(pos_seq)
    return layer(w, r, *biases, attn_mask=mask[:, :, None], mems=mems)


@pytest.mark.parametrize(
    "mem_len, clamp_len, same_length", [(6, 0, False), (6, 3, False), (5, 0, True), (0, 0, False)]
)
def test_original_layout_conversion(mem_len, clamp_len, same_length):
    torch.manual_seed(2)
    orig = OriginalRelPartialLearnableMultiHeadAttn(HEADS, D_MODEL, D_HEAD).double()
    r_w_bias = nn.Parameter(torch.randn(HEADS, D_HEAD, dtype=torch.float64))
    r_r_bias = nn.Parameter(torch.randn(HEADS, D_HEAD, dtype=torch.float64))
    pos_emb = OriginalPositionalEmbedding(D_MODEL).double()
    ours = XLMultiheadAttention.from_transformer_xl(
        orig,
        mem_len=mem_len,
        clamp_len=clamp_len,  # the original's meaning: 0 is no clamp
        same_length=same_length,
        r_w_bias=r_w_bias,
        r_r_bias=r_r_bias,
        backend="torch",
    )
    assert ours.r_w_bias is r_w_bias and not ours.batch_first
    x = torch.randn(3 * 4, 2, D_MODEL, dtype=torch.float64)  # [len, batch, d_model]
    mems, our_mems = None, None
    for seg in x.split(4):
        want = original_step(
            orig, pos_emb, seg, mems, mem_len, clamp_len, same_length, (r_w_bias, r_r_bias)
        )
        out, our_mems = ours(seg, our_mems)
        assert torch.allclose(orig.layer_norm(seg + out), want, atol=1e-12)
        # the original's _update_mems with ext_len = 0
        cat = seg if mems is None else torch.cat([mems, seg], 0)
        mems = cat[max(0, cat.size(0) - mem_len) :] if mem_len else None
        assert (our_mems is None) == (mems is None)
        if mems is not None:
            assert torch.equal(our_mems, mems)


def test_state_dict_conversion_errors():
    ours = module(mem_len=4)
    orig = OriginalRelPartialLearnableMultiHeadAttn(HEADS, D_MODEL, D_HEAD).double()
    sd = {f"layers.0.dec_attn.{k}": v for k, v in orig.state_dict().items()}
    sd["r_w_bias"] = sd["r_r_bias"] = torch.zeros(HEADS, D_HEAD, dtype=torch.float64)
    ours.load_transformer_xl_state_dict(sd, prefix="layers.0.dec_attn.")
    assert torch.equal(ours.r_net.weight, orig.r_net.weight)
    with pytest.raises(KeyError, match="missing .r_net.weight"):
        ours.load_transformer_xl_state_dict({"qkv_net.weight": orig.qkv_net.weight})
    bad = dict(orig.state_dict(), **{"r_net.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="r_net.weight"):
        ours.load_transformer_xl_state_dict(bad)
    with pytest.raises(ValueError, match="r_w_bias and r_r_bias"):
        XLMultiheadAttention.from_transformer_xl(orig, mem_len=4, clamp_len=-1, same_length=False)


# --------------------------------------------------------------------------- segments
def one_pass_reference(m, x, seg_len):
    """The whole sequence at once, with the mask the segment recurrence implies."""
    b, n, _ = x.shape
    q, k, v = m.qkv_net(x).view(b, n, 3, HEADS, D_HEAD).permute(2, 0, 3, 1, 4)
    p = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    dist = p - j
    allowed = (dist >= 0) & (j >= (p // seg_len) * seg_len - m.mem_len)
    if m.same_length:
        allowed &= dist < m.mem_len
    n_r = n if m.clamp_len is None else min(n, m.clamp_len + 1)
    r = m.r_net(sinusoid_embedding(torch.arange(n_r), D_MODEL, torch.float64))
    r = r.view(n_r, HEADS, D_HEAD)[dist.clamp(0, n_r - 1)]  # [n, n, H, Dh]
    ac = (q + m.r_w_bias[:, None]) @ k.transpose(-1, -2)
    bd = torch.einsum("bhid,ijhd->bhij", q + m.r_r_bias[:, None], r)
    s = ((ac + bd) / math.sqrt(D_HEAD)).masked_fill(~allowed, float("-inf"))
    out = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, -1)
    return m.o_net(out)


@pytest.mark.parametrize(
    "mem_len, clamp_len, same_length, seg_len",
    [(7, None, False, 5), (3, None, False, 5), (6, 4, False, 4), (6, None, True, 5)],
)
def test_segments_equal_one_pass(mem_len, clamp_len, same_length, seg_len):
    m = module(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
    x = seq(2, 4 * seg_len + 2)  # a ragged last segment
    outs, mems = [], None
    for seg in x.split(seg_len, dim=1):
        out, new_mems = m(seg, mems)
        full = seg if mems is None else torch.cat([mems, seg], 1)
        assert torch.equal(new_mems, full[:, -mem_len:]) and not new_mems.requires_grad
        outs.append(out)
        mems = new_mems
    assert torch.allclose(torch.cat(outs, 1), one_pass_reference(m, x, seg_len), atol=1e-12)


def test_gradients_flow_and_mems_are_detached():
    m = module(mem_len=4)
    x = seq(1, 6).requires_grad_(True)
    out, mems = m(x)
    out2, _ = m(seq(1, 3, seed=3), mems)
    (out.sum() + out2.sum()).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert mems.grad_fn is None and x.grad is not None


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("batch_first", [True, False])
def test_decode_token_by_token_equals_forward(batch_first):
    m = module(mem_len=9, batch_first=batch_first)
    t = (lambda a: a) if batch_first else (lambda a: a.transpose(0, 1))
    past, x = seq(2, 4), seq(2, 6, seed=2)  # 4 + 6 - 1 <= mem_len: every key stays cached
    _, mems = m(t(past))
    want, _ = m(t(x), mems)
    _, cache = m.decode(t(past))
    outs = []
    for i in range(x.shape[1]):
        out, cache = m.decode(t(x[:, i : i + 1]), cache)
        outs.append(t(out))
        assert len(cache) == min(9, 4 + i + 1)
    assert torch.allclose(t(torch.cat(outs, 1)), want, atol=1e-12)


def test_decode_sliding_window_over_a_long_sequence():
    """same_length: each token sees its last mem_len positions, in decode and in forward."""
    m = module(mem_len=5, same_length=True, clamp_len=3)
    x = seq(1, 17)
    outs, mems = [], None
    for seg in x.split(4, dim=1):
        out, mems = m(seg, mems)
        outs.append(out)
    cache, steps = None, []
    for i in range(x.shape[1]):
        out, cache = m.decode(x[:, i : i + 1], cache)
        steps.append(out)
    assert len(cache) == 5
    assert torch.allclose(torch.cat(steps, 1), torch.cat(outs, 1), atol=1e-12)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_decode_in_place_storage_and_branching(mode):
    """Without autograd, keys are appended in place; the store is renewed when full, and
    decoding twice from one cache (branching) leaves the first branch intact."""
    m = module(mem_len=4)
    x = seq(2, 11)
    cache, want = None, []
    for i in range(11):  # autograd records: functional path
        out, cache = m.decode(x[:, i : i + 1], cache)
        want.append(out.detach())
    a, b, c = seq(2, 1, seed=7), seq(2, 1, seed=8), seq(2, 1, seed=9)
    with mode():
        cache, stores = None, set()
        for i in range(11):
            out, cache = m.decode(x[:, i : i + 1], cache)
            stores.add(id(cache.store))
            assert torch.allclose(out, want[i], atol=1e-12) and len(cache) == min(4, i + 1)
        assert 1 < len(stores) < 11  # appended in place, renewed every few tokens
        out_a, cache_a = m.decode(a, cache)
        out_b, _ = m.decode(b, cache)  # branch from the same cache
        again_a, _ = m.decode(c, cache_a)
    _, mems = m(x)
    assert torch.allclose(out_a, m(a, mems)[0], atol=1e-12)
    assert torch.allclose(out_b, m(b, mems)[0], atol=1e-12)
    mems_a = torch.cat([mems, a], 1)[:, -4:]
    assert torch.allclose(again_a, m(c, mems_a)[0], atol=1e-12)


def test_decode_chunks_and_memoryless():
    m = module(mem_len=6)
    a, b = seq(2, 5), seq(2, 3, seed=4)
    _, mems = m(a)
    want, _ = m(b, mems)
    _, cache = m.decode(a)
    got, cache = m.decode(b, cache)
    assert torch.allclose(got, want, atol=1e-12) and len(cache) == 6
    m0 = module(mem_len=0)
    out, mems = m0(a)
    assert mems is None
    step, cache = m0.decode(a[:, :1])
    assert len(cache) == 0 and torch.allclose(step, m0(a[:, :1])[0], atol=1e-12)


def test_decode_recomputes_r_after_a_weight_update():
    m = module(mem_len=4)
    _, cache = m.decode(seq(1, 3))
    with torch.no_grad():
        m.r_net.weight.mul_(2)
    x = seq(1, 1, seed=5)
    got, _ = m.decode(x, cache)
    _, mems = m(seq(1, 3))
    assert torch.allclose(got, m(x, mems)[0], atol=1e-12)


def test_cache_errors():
    m, other = module(mem_len=4), module(mem_len=4)
    _, cache = m.decode(seq(2, 3))
    with pytest.raises(ValueError, match="another XLMultiheadAttention"):
        other.decode(seq(2, 1), cache)
    with pytest.raises(ValueError, match="batch"):
        m.decode(seq(3, 1), cache)
    with pytest.raises(TypeError, match="XLCache"):
        m.decode(seq(2, 1), (cache.k, cache.v))
    m.float()
    with pytest.raises(TypeError, match="cache holds torch.float64"):
        m.decode(seq(2, 1).float(), cache)
    assert isinstance(cache, XLCache)


# --------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedding_is_exact_in_half_precision(dtype):
    m = XLMultiheadAttention(64, 4, mem_len=8).to(dtype)
    n = 3000
    pos = sinusoid_embedding(torch.arange(n), 64)
    assert pos.dtype == torch.float32
    # positions are integers, exact in fp32: the fp32 sinusoid matches fp64 to fp32 accuracy
    exact = torch.arange(n, dtype=torch.float64)[:, None] * (
        1 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    )
    exact = torch.cat([exact.sin(), exact.cos()], -1)
    assert (pos.double() - exact).abs().max() < 1e-3
    # the module's r is the projection of that embedding, rounded once to the model's dtype
    want = m.r_net(pos.to(dtype)).view(n, 4, 16).transpose(0, 1)
    assert torch.equal(m.relative_embeddings(n), want)
    # what computing positions in the model's dtype would lose: 2049 -> 2048 in fp16
    if dtype == torch.float16:
        assert torch.arange(2049, 2050, dtype=dtype).item() != 2049
    assert not torch.equal(pos[2048].to(dtype), pos[2049].to(dtype))


# --------------------------------------------------------------------------- settings
def test_dropatt_raises_in_training_only():
    m = module(mem_len=4, dropatt=0.1)
    with pytest.raises(ValueError, match="dropatt"):
        m(seq(1, 3))
    m.eval()
    m(seq(1, 3))
    m.decode(seq(1, 1))


def test_shared_biases():
    u = nn.Parameter(torch.zeros(HEADS, D_HEAD))
    vb = nn.Parameter(torch.zeros(HEADS, D_HEAD))
    a = XLMultiheadAttention(D_MODEL, HEADS, r_w_bias=u, r_r_bias=vb)
    b = XLMultiheadAttention(D_MODEL, HEADS, r_w_bias=u, r_r_bias=vb)
    assert a.r_w_bias is b.r_w_bias is u
    assert len(list(nn.ModuleList([a, b]).parameters())) == 2 * 3 + 2
    with pytest.raises(ValueError, match="r_w_bias must be an nn.Parameter"):
        XLMultiheadAttention(D_MODEL, HEADS, r_w_bias=nn.Parameter(torch.zeros(3, D_HEAD)))


def test_auto_backend_matches_torch():
    m = module(mem_len=4)
    auto = module(mem_len=4, backend="auto")
    x = seq(2, 6)
    assert torch.allclose(auto(x)[0], m(x)[0], atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 31, "num_heads": 1, "d_head": 16}, "even"),
        ({"d_model": 32, "num_heads": 3}, "divisible"),
        ({"d_model": 32, "num_heads": 4}, "d_head must be in"),
        ({"d_model": 32, "num_heads": 2, "same_length": True}, "same_length"),
        ({"d_model": 32, "num_heads": 2, "mem_len": -1}, "mem_len"),
        ({"d_model": 32, "num_heads": 2, "clamp_len": -1}, "clamp_len"),
        ({"d_model": 32, "num_heads": 2, "dropout": 1.0}, "dropout"),
        ({"d_model": 32, "num_heads": 2, "backend": "nope"}, "backend"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XLMultiheadAttention(**kwargs)


def test_bad_forward_input():
    m = module(mem_len=4)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.zeros(1, 3, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(1, 3, D_MODEL))
    with pytest.raises(ValueError, match="batch"):
        m(seq(2, 3), seq(1, 4))


# --------------------------------------------------------------------------- converting whole models
class OriginalModel(nn.Module):
    """The parts of kimiyoung/transformer-xl's MemTransformerLM that conversion reads: layers
    holding ``dec_attn``, the shared biases and the settings its eval.py changes."""

    def __init__(self, n_layer=2, mem_len=6, clamp_len=-1, same_length=False, pre_lnorm=False):
        super().__init__()

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.dec_attn = OriginalRelPartialLearnableMultiHeadAttn(
                    HEADS, D_MODEL, D_HEAD, pre_lnorm
                )

        self.layers = nn.ModuleList(Layer() for _ in range(n_layer))
        self.r_w_bias = nn.Parameter(torch.randn(HEADS, D_HEAD))
        self.r_r_bias = nn.Parameter(torch.randn(HEADS, D_HEAD))
        self.pos_emb = OriginalPositionalEmbedding(D_MODEL)
        self.attn_type, self.tgt_len, self.ext_len, self.mem_len = 0, 4, 0, mem_len
        self.clamp_len, self.same_length = clamp_len, same_length

    def reset_length(self, tgt_len, ext_len, mem_len):
        self.tgt_len, self.ext_len, self.mem_len = tgt_len, ext_len, mem_len

    def layer_step(self, i, w, mems):
        """One layer of MemTransformerLM._forward with the model's current settings."""
        return original_step(
            self.layers[i].dec_attn, self.pos_emb, w, mems, self.mem_len, self.clamp_len,
            self.same_length, (self.r_w_bias, self.r_r_bias),
        )  # fmt: skip


def run_both(model, ours, x, seg_len=4):
    """Layer 0 of the original and its converted module over x's segments: the largest
    difference of the outputs (post-LN, as the original layer adds and normalizes)."""
    ln = model.layers[0].dec_attn.layer_norm
    mems = our_mems = None
    worst = 0.0
    for seg in x.split(seg_len):
        want = model.layer_step(0, seg, mems)
        out, our_mems = ours[0](seg, our_mems)
        worst = max(worst, (ln(seg + out) - want).abs().max().item())
        cat = seg if mems is None else torch.cat([mems, seg], 0)
        mems = cat[max(0, cat.size(0) - model.mem_len) :]
    return worst


def test_convert_transformer_xl_carries_model_settings_and_biases():
    from effattn.nn.xl import convert_transformer_xl

    torch.manual_seed(3)
    model = OriginalModel(mem_len=6, clamp_len=0).double()
    ours = convert_transformer_xl(model, backend="torch")
    assert isinstance(ours, nn.ModuleList) and len(ours) == 2
    for m in ours:
        assert (m.mem_len, m.clamp_len, m.same_length) == (6, None, False)
        assert m.r_w_bias is model.r_w_bias and m.r_r_bias is model.r_r_bias
        assert not m.batch_first
    x = torch.randn(12, 2, D_MODEL, dtype=torch.float64)
    assert run_both(model, ours, x) < 1e-12

    # eval.py's changes on the model: the converted layers must not silently keep the old ones
    model.reset_length(4, 0, 5)
    model.clamp_len, model.same_length = 3, True
    with pytest.raises(ValueError, match="mem_len=5.*convert_transformer_xl"):
        ours[0](x[:4])
    with pytest.raises(ValueError, match="clamp_len"):
        ours[1].decode(x[:1])
    ours = convert_transformer_xl(model, backend="torch")
    assert (ours[0].mem_len, ours[0].clamp_len, ours[0].same_length) == (5, 3, True)
    assert run_both(model, ours, x) < 1e-12

    # the same settings set on the module by hand also satisfy the check
    model.clamp_len = -1
    ours[0].clamp_len = None
    assert run_both(model, ours, x) < 1e-12
    with pytest.raises(ValueError, match="clamp_len=None"):
        ours[1](x[:4])  # the other layer still has the old setting
    # a module changed on purpose while the model keeps its settings is the caller's choice
    ours[0].clamp_len = 2
    ours[0](x[:4])

    model.r_w_bias = nn.Parameter(torch.zeros(HEADS, D_HEAD, dtype=torch.float64))
    with pytest.raises(ValueError, match="r_w_bias"):
        ours[0](x[:4])


def test_convert_transformer_xl_refuses_what_it_cannot_carry():
    from effattn.nn.xl import convert_transformer_xl

    model = OriginalModel()
    model.ext_len = 2
    with pytest.raises(ValueError, match="ext_len"):
        convert_transformer_xl(model)
    model.ext_len, model.attn_type = 0, 1
    with pytest.raises(ValueError, match="attn_type"):
        convert_transformer_xl(model)
    with pytest.raises(TypeError, match="layers"):
        convert_transformer_xl(nn.Linear(2, 2))


def test_load_state_dict_finds_model_level_biases():
    torch.manual_seed(4)
    model = OriginalModel().double()
    ours = module(mem_len=4)
    for prefix in ("", "module."):  # as saved, and as saved from nn.DataParallel
        sd = {prefix + k: v for k, v in model.state_dict().items()}
        for i in range(2):
            ours.load_transformer_xl_state_dict(sd, prefix=f"{prefix}layers.{i}.dec_attn.")
            assert torch.equal(ours.qkv_net.weight, model.layers[i].dec_attn.qkv_net.weight)
            assert torch.equal(ours.r_w_bias, model.r_w_bias)
            assert torch.equal(ours.r_r_bias, model.r_r_bias)
    no_bias = {k: v for k, v in model.state_dict().items() if "bias" not in k}
    with pytest.raises(KeyError, match="r_w_bias"):
        ours.load_transformer_xl_state_dict(no_bias, prefix="layers.0.dec_attn.")


def test_clamp_len_zero_means_no_clamp_in_the_original_only():
    with pytest.raises(ValueError, match="clamp_len=0.*None"):
        XLMultiheadAttention(D_MODEL, HEADS, clamp_len=0)
    m = module(mem_len=4)
    with pytest.raises(ValueError, match="clamp_len=0.*None"):
        m.clamp_len = 0
    orig = OriginalRelPartialLearnableMultiHeadAttn(HEADS, D_MODEL, D_HEAD)
    bias = nn.Parameter(torch.zeros(HEADS, D_HEAD))
    for original, ours in ((0, None), (-1, None), (None, None), (7, 7)):
        conv = XLMultiheadAttention.from_transformer_xl(
            orig, mem_len=4, clamp_len=original, same_length=False, r_w_bias=bias, r_r_bias=bias
        )
        assert conv.clamp_len == ours


@pytest.mark.parametrize("batch_first", [True, False])
def test_empty_mems_tensor_is_no_memory(batch_first):
    """The original's init_mems gives torch.empty(0) per layer."""
    m = module(mem_len=4, batch_first=batch_first)
    x = seq(2, 5) if batch_first else seq(2, 5).transpose(0, 1)
    want, want_mems = m(x)
    for empty in (torch.empty(0, dtype=torch.float64), x[:0] if not batch_first else x[:, :0]):
        got, got_mems = m(x, empty)
        assert torch.equal(got, want) and torch.equal(got_mems, want_mems)
    with pytest.raises(ValueError, match="mems"):
        m(x, torch.empty(0, 3, dtype=torch.float64))


@pytest.mark.parametrize("batch_first", [True, False])
def test_empty_segment(batch_first):
    m = module(mem_len=4, batch_first=batch_first)
    t = (lambda a: a) if batch_first else (lambda a: a.transpose(0, 1))
    for mems in (None, t(seq(2, 3))):
        x = t(seq(2, 0)).requires_grad_(True)
        m.zero_grad(set_to_none=True)
        out, new_mems = m(x, mems)
        assert out.shape == x.shape
        if mems is None:
            assert new_mems.numel() == 0
        else:
            assert torch.equal(new_mems, mems)
        out.sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and not p.grad.any(), name
        _, cache = m.decode(t(seq(2, 3)))
        step, cache2 = m.decode(x.detach(), cache)
        assert step.shape == x.shape and len(cache2) == 3


def test_pre_lnorm_memory_is_the_raw_hidden_state():
    """pre_lnorm=True: the original normalizes cat(mems, w) and keeps the raw hidden states as
    memory. ``norm=`` does the same: the memory forward returns is the raw one."""
    torch.manual_seed(5)
    orig = OriginalRelPartialLearnableMultiHeadAttn(HEADS, D_MODEL, D_HEAD, pre_lnorm=True)
    orig = orig.double()
    with torch.no_grad():
        orig.layer_norm.weight.uniform_(0.5, 2.0)  # an affine norm: normalizing twice shows
        orig.layer_norm.bias.normal_()
    biases = tuple(nn.Parameter(torch.randn(HEADS, D_HEAD, dtype=torch.float64)) for _ in "uv")
    pos_emb = OriginalPositionalEmbedding(D_MODEL).double()
    ours = XLMultiheadAttention.from_transformer_xl(
        orig, mem_len=6, clamp_len=-1, same_length=False, r_w_bias=biases[0], r_r_bias=biases[1]
    )
    ln = orig.layer_norm
    x = torch.randn(12, 2, D_MODEL, dtype=torch.float64)
    mems = our_mems = normed_mems = wrong_mems = None
    for i, seg in enumerate(x.split(4)):
        want = original_step(orig, pos_emb, seg, mems, 6, -1, False, biases)
        out, our_mems = ours(seg, our_mems, norm=ln)
        assert torch.allclose(seg + out, want, atol=1e-12)
        # normalizing outside gives normalized memory: pass it back as it is...
        out2, normed_mems = ours(ln(seg), normed_mems)
        assert torch.allclose(seg + out2, want, atol=1e-12)
        # ...never through the norm again
        out3, wrong_mems = ours(ln(seg), None if wrong_mems is None else ln(wrong_mems))
        if i > 0:
            assert not torch.allclose(seg + out3, want, atol=1e-3)
        cat = seg if mems is None else torch.cat([mems, seg], 0)
        mems = cat[-6:]  # the original's _update_mems keeps the raw hidden states
        assert torch.equal(our_mems, mems)
    _, cache = ours.decode(x[2:8], norm=ln)  # the last segment's memory, decoded
    last, _ = ours.decode(x[8:], cache, norm=ln)
    assert torch.allclose(x[8:] + last, want, atol=1e-12)


def _rewrite(m, how, w):
    """Replace r_net's weight by w the ways user code does (the cache must notice each)."""
    if how == "data.copy_":
        m.r_net.weight.data.copy_(w)
    elif how == "data =":
        m.r_net.weight.data = w.clone()
    elif how == "assign":
        sd = m.state_dict()
        sd["r_net.weight"] = w.clone()
        m.load_state_dict(sd, assign=True)
    elif how == "new Parameter":
        m.r_net.weight = nn.Parameter(w.clone())
    elif how == "in place":
        with torch.no_grad():
            m.r_net.weight.copy_(w)
    elif how == "one element":  # in the last row: the comparison covers every byte
        # column 0 feeds sin(distance), which varies over the keys: a constant shift (a
        # cos column at a low frequency) would not change the softmax
        m.r_net.weight.data[-1, 0] += 1.0


@pytest.mark.parametrize(
    "how", ["data.copy_", "data =", "assign", "new Parameter", "in place", "one element"]
)
def test_decode_never_serves_relative_embeddings_of_old_weights(how):
    m = module(mem_len=4)
    past, x = seq(1, 3), seq(1, 1, seed=5)
    with torch.no_grad():
        _, cache = m.decode(past)
        _rewrite(m, how, torch.randn_like(m.r_net.weight))
        got, cache = m.decode(x, cache)
        _, mems = m(past)
        assert torch.allclose(got, m(x, mems)[0], atol=1e-12)
        # and the recomputed embeddings are served again while the weights stay
        again, _ = m.decode(x, cache)
        assert again.shape == got.shape
