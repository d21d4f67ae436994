"""effattn.integrations.transformers: tiny transformers models built from configs (random
weights, nothing downloaded) against transformers' own "sdpa" and "eager" implementations.

- causal() equals "sdpa" (logits and every parameter's gradient) for Llama and Qwen2 (GQA) and
  GPT-2, with left and right padding, in fp32 and fp64;
- sparse patterns equal "eager" given the equivalent explicit 4-D mask, built from the
  pattern's element mask with each row's positions counted from its first token;
- left padding is exact: a padded batch gives each sequence what it gets alone, in the forward
  and in generate(), for distance patterns (strided) and absolute ones (fixed);
- generate() gives "sdpa"'s tokens with dynamic, static and sliding-window caches;
- sliding-window layers (Mistral, Qwen2's layer_types) equal "sdpa";
- a short training loop learns; what is not supported raises and says what.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'effattn[transformers]')"
)

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import effattn.integrations.transformers as et  # noqa: E402
from effattn import patterns as P  # noqa: E402

F32, F64 = torch.float32, torch.float64
TOL = {F32: {"atol": 2e-5, "rtol": 2e-4}, F64: {"atol": 1e-10, "rtol": 1e-10}}
VOCAB = 64

PATTERNS = {
    "causal": P.causal(),
    "strided": P.strided(4),
    "fixed": P.fixed(4, 1),
    "fixed2": P.fixed(4, 1, num_patterns=2),  # per-head summary columns
    "mixed": P.per_head(P.strided(3), P.fixed(5, 2)),
}
for _key, _pattern in PATTERNS.items():
    et.register(f"effattn-test-{_key}", _pattern)


def config(arch: str, **overrides):
    """A tiny config: 2 layers, hidden 64, 4 heads of dim 16 (2 key/value heads where the
    architecture has grouped-query attention), no dropout."""
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                  resid_pdrop=0.0, embd_pdrop=0.0, scale_attn_by_inverse_layer_idx=True)  # fmt: skip
        return GPT2Config(**common, **{**kw, **overrides})
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(**common, **{**kw, **overrides})


def model(cfg, impl: str, dtype=F64, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(dtype).eval()


def batch(lengths, n, left, seed=1):
    """Token ids [B, n], the 2-D attention mask of sequences of the given lengths, padded on
    the left (left[b]) or on the right, and position ids counted from each first token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, (length, on_left) in enumerate(zip(lengths, left)):
        if on_left:
            mask[b, n - length :] = 1
        else:
            mask[b, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def alone(ids, mask, b):
    """Sequence b without its padding, as a batch of one."""
    return ids[b][mask[b].bool()][None]


def logits_and_grads(m, ids, mask, pos, model_mask=None):
    """Logits at the real tokens, and every parameter's gradient of a random projection of
    them (padded positions hold no token: their outputs are not compared)."""
    m.zero_grad(set_to_none=True)
    model_mask = mask if model_mask is None else model_mask
    logits = m(ids, attention_mask=model_mask, position_ids=pos).logits
    real = logits[mask.bool()]
    w = torch.randn(real.shape, generator=torch.Generator().manual_seed(2), dtype=real.dtype)
    (real * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return real.detach(), grads


def assert_same(want, got, dtype):
    (lw, gw), (lg, gg) = want, got
    torch.testing.assert_close(lg, lw, **TOL[dtype])
    assert gw.keys() == gg.keys() and gw
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], **TOL[dtype], msg=name)


def generate(m, ids, mask, **kw):
    """Greedy tokens [B, 6] and the logits of each step [B, 6, V] (min_new_tokens: no row stops
    early, so a batch and its rows alone decode the same number of steps)."""
    out = m.generate(
        ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kw,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


# ------------------------------------------------------------------------ causal vs sdpa
@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_causal_matches_sdpa(arch, dtype):
    """Logits and gradients, with a full row, a left-padded and a right-padded one."""
    m = model(config(arch), "sdpa", dtype)
    ids, mask, pos = batch([11, 7, 5], 11, left=[False, True, False])
    want = logits_and_grads(m, ids, mask, pos)
    m.set_attn_implementation("effattn-test-causal")
    assert_same(want, logits_and_grads(m, ids, mask, pos), dtype)


def test_no_dense_mask_and_native_gqa(monkeypatch):
    """sparse_attention gets the model's 2 key/value heads and a [B, Nk] key padding mask."""
    calls = []
    real = et.sparse_attention

    def spy(q, k, v, pattern, **kw):
        calls.append((q.shape, k.shape, kw["key_padding_mask"]))
        return real(q, k, v, pattern, **kw)

    monkeypatch.setattr(et, "sparse_attention", spy)
    m = model(config("llama"), "effattn-test-causal")
    ids, mask, pos = batch([9, 6], 9, left=[False, True])
    m(ids, attention_mask=mask, position_ids=pos)
    assert len(calls) == 2
    for q_shape, k_shape, kpm in calls:
        assert q_shape == (2, 4, 9, 16) and k_shape == (2, 2, 9, 16)
        assert torch.equal(kpm, mask == 0)


# ------------------------------------------------------------------- sparse vs eager
def eager_mask(pattern, mask, heads, dtype):
    """The additive 4-D mask [B, H, N, N] equal to ``pattern`` on each row's own positions:
    a row whose first token is at f has the pattern's element mask from (f, f) on."""
    b, n = mask.shape
    allowed = torch.zeros(b, heads, n, n, dtype=torch.bool)
    for r in range(b):
        f = int(mask[r].argmax())
        allowed[r, :, f:, f:] = pattern.mask(n - f, n - f, heads)
    allowed &= mask.bool()[:, None, None, :]
    # fp32's lowest, not fp64's: eager takes the softmax in fp32, where fp64's would be -inf
    # and a padded query row, which allows no key, NaN.
    hidden = torch.finfo(torch.float32).min
    return torch.where(allowed, torch.zeros((), dtype=dtype), hidden)


@pytest.mark.parametrize("key", ["strided", "fixed", "fixed2", "mixed"])
def test_sparse_pattern_matches_eager(key):
    """Logits and gradients with left and right padding and a ragged length. eager takes its
    softmax in fp32 whatever the model's dtype, so it is compared at fp32's tolerance; sdpa,
    given the same 4-D mask, at fp64's."""
    cfg = config("llama")
    m = model(cfg, "eager")
    ids, mask, pos = batch([13, 10, 6], 13, left=[False, True, False])
    four_d = eager_mask(PATTERNS[key], mask, cfg.num_attention_heads, F64)
    want_eager = logits_and_grads(m, ids, mask, pos, model_mask=four_d)
    m.set_attn_implementation("sdpa")
    want_sdpa = logits_and_grads(m, ids, mask, pos, model_mask=four_d)
    m.set_attn_implementation(f"effattn-test-{key}")
    got = logits_and_grads(m, ids, mask, pos)
    assert_same(want_eager, got, F32)
    assert_same(want_sdpa, got, F64)


# ---------------------------------------------------------------------- left padding
@pytest.mark.parametrize("key", ["causal", "strided", "fixed", "mixed"])
def test_left_padding_is_exact(key):
    """Each sequence of a padded batch gets the logits it gets alone, unpadded."""
    m = model(config("llama"), f"effattn-test-{key}")
    ids, mask, pos = batch([12, 9, 5, 7], 12, left=[True, True, False, True])
    with torch.no_grad():
        got = m(ids, attention_mask=mask, position_ids=pos).logits
        for b in range(len(ids)):
            want = m(alone(ids, mask, b)).logits[0]
            torch.testing.assert_close(got[b][mask[b].bool()], want, **TOL[F64])


@pytest.mark.parametrize("key", ["strided", "fixed", "mixed"])
def test_generate_left_padding_is_exact(key):
    """generate() on a left-padded batch: each row's tokens and logits are those of the row
    alone (for fixed, the rows run grouped by pad length, prefill and every decode step)."""
    m = model(config("llama"), f"effattn-test-{key}")
    ids, mask, _ = batch([10, 6, 3], 10, left=[True, True, True])
    tokens, logits = generate(m, ids, mask)
    for b in range(len(ids)):
        one = alone(ids, mask, b)
        t, lg = generate(m, one, torch.ones_like(one))
        assert torch.equal(tokens[b], t[0])
        torch.testing.assert_close(logits[b], lg[0], **TOL[F64])


def test_mask_groups_rows_only_for_absolute_patterns():
    """fixed() groups rows by pad length; strided() (distances only) needs the key mask alone."""
    ids, mask, pos = batch([8, 5, 5, 8], 8, left=[True] * 4)
    masks = {}
    for key in ("fixed", "strided"):
        impl = transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[f"effattn-test-{key}"]
        masks[key] = impl(
            batch_size=4, q_length=8, kv_length=8, attention_mask=mask.bool(),
            mask_function=transformers.masking_utils.causal_mask_function,
        )  # fmt: skip
    groups = masks["fixed"].groups
    assert [(f, rows.tolist()) for f, rows in groups] == [(0, [0, 3]), (3, [1, 2])]
    assert masks["strided"].groups is None
    assert torch.equal(masks["strided"].key_padding_mask, mask == 0)


# ------------------------------------------------------------------------ generation
@pytest.mark.parametrize(
    "arch,cache",
    [("llama", "dynamic"), ("llama", "static"), ("gpt2", "dynamic"), ("mistral", "dynamic")],
)
def test_generate_matches_sdpa(arch, cache):
    """Greedy tokens (and step logits) equal sdpa's in fp32, left-padded batch; Mistral with a
    4-token sliding window, so the cache drops keys while decoding."""
    cfg = config(arch, sliding_window=4) if arch == "mistral" else config(arch)
    m = model(cfg, "sdpa", F32)
    ids, mask, _ = batch([9, 5], 9, left=[True, True])
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    want = generate(m, ids, mask, **kw)
    m.set_attn_implementation("effattn-test-causal")
    got = generate(m, ids, mask, **kw)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], **TOL[F32])


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_matches_sdpa(arch):
    """Sliding-window layers attend with pattern & local(w): Mistral (every layer) and Qwen2
    (layer_types: one full and one sliding layer)."""
    if arch == "mistral":
        cfg = config("mistral", sliding_window=4)
    else:
        cfg = config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
        assert cfg.layer_types == ["full_attention", "sliding_attention"]
    m = model(cfg, "sdpa")
    ids, mask, pos = batch([11, 7, 5], 11, left=[False, True, False])
    want = logits_and_grads(m, ids, mask, pos)
    m.set_attn_implementation("effattn-test-causal")
    assert_same(want, logits_and_grads(m, ids, mask, pos), F64)


def test_bidirectional_model():
    """config.is_causal = False: a non-causal pattern attends as given (full() equals sdpa's
    bidirectional attention, which padding makes it build as a mask); a causal one is refused."""
    et.register("effattn-test-full", P.full())
    cfg = config("llama", is_causal=False)
    m = model(cfg, "sdpa")
    ids, mask, pos = batch([9, 6], 9, left=[False, True])
    want = logits_and_grads(m, ids, mask, pos)
    causal = logits_and_grads(model(config("llama"), "sdpa"), ids, mask, pos)
    if torch.equal(want[0], causal[0]):
        pytest.skip(f"transformers {transformers.__version__} has no config.is_causal")
    m.set_attn_implementation("effattn-test-full")
    assert_same(want, logits_and_grads(m, ids, mask, pos), F64)
    m.set_attn_implementation("effattn-test-strided")
    with pytest.raises(ValueError, match="bidirectionally.*causal=False"):
        m(ids, attention_mask=mask)


# ------------------------------------------------------------------------- training
def test_training_loop():
    """A few AdamW steps of a Llama-style model with strided attention (right-padded batch,
    gradient checkpointing) fit a repeating sequence."""
    m = model(config("llama"), "effattn-test-strided", F32).train()
    # (the first transformers 5 releases only have gradient_checkpointing_enable)
    getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
    ids, mask, _ = batch([16, 16, 12, 9], 16, left=[False] * 4)
    ids = torch.where(mask.bool(), (torch.arange(16) % 5 + 3).expand(4, -1), 0)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = m(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


# ----------------------------------------------------------------- what is refused
def test_refuses_what_it_cannot_serve():
    ids, mask, pos = batch([8, 6], 8, left=[False, True])
    m = model(config("llama", attention_dropout=0.1), "effattn-test-causal").train()
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        m(ids, attention_mask=mask)
    m.eval()
    m(ids, attention_mask=mask)  # dropout only applies in training
    with pytest.raises(NotImplementedError, match="output_attentions"):
        m(ids, attention_mask=mask, output_attentions=True)
    bias = torch.zeros(2, 1, 8, 8, dtype=F64)
    with pytest.raises(NotImplementedError, match="explicit 4-D mask or float bias"):
        m(ids, attention_mask=bias)
    packed = torch.cat([torch.arange(5), torch.arange(3)])[None].expand(2, -1)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        m(ids, position_ids=packed, use_cache=False)
    attention = AttentionInterface()["effattn-test-causal"]
    q = torch.randn(1, 4, 3, 16, dtype=F64)
    k = torch.randn(1, 2, 3, 16, dtype=F64)
    layer = m.model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match="soft-capping"):
        attention(layer, q, k, k, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match="attention sinks"):
        attention(layer, q, k, k, None, s_aux=torch.zeros(4))


def test_sliding_cache_with_absolute_pattern_is_refused():
    """A sliding-window cache drops the first keys, where fixed() counts positions from."""
    m = model(config("mistral", sliding_window=4), "effattn-test-fixed")
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(NotImplementedError, match="absolute positions"):
        m.generate(ids, max_new_tokens=3, do_sample=False)


def test_register_checks_its_arguments():
    for name in ("sdpa", "eager", "my_sdpa", "flash-x", "org/repo", ""):
        with pytest.raises(ValueError, match="name"):
            et.register(name, P.causal())
    with pytest.raises(TypeError, match="Pattern"):
        et.register("effattn-test-bad", "causal")
    with pytest.raises(ValueError, match="backend"):
        et.register("effattn-test-bad", P.causal(), backend="gpu")
    assert et.register("effattn-test-torch", P.causal(), backend="torch") == "effattn-test-torch"
    et.register("effattn-test-torch", P.strided(2), backend="torch")  # replaces it
    assert AttentionInterface()["effattn-test-torch"].__self__.pattern.name == "strided(2)"


def test_core_never_imports_transformers():
    code = (
        "import sys, effattn, effattn.nn, effattn.integrations; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_llama_example_smoke(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import hf_llama
    finally:
        sys.path.pop(0)
    runs = hf_llama.main(
        ["--steps", "3", "--seq-len", "32", "--batch", "2", "--hidden", "32", "--heads", "2",
         "--kv-heads", "1", "--layers", "1", "--sample", "4", "--no-progress"]
    )  # fmt: skip
    assert [r["name"] for r in runs] == ["strided (effattn-strided)", "dense (sdpa)"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in runs)
    assert "held-out" in capsys.readouterr().out
