"""The dense references against PyTorch SDPA and Transformer-XL's original rel_shift form."""

import pytest
import torch
import torch.nn.functional as F

from effattn import patterns as P
from effattn import reference


def rand(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("h, h_kv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("n_q, n_k", [(37, 37), (5, 37), (1, 12)])
def test_attention_matches_sdpa(h, h_kv, n_q, n_k):
    torch.manual_seed(0)
    q, k, v = rand(2, h, n_q, 24), rand(2, h_kv, n_k, 24), rand(2, h_kv, n_k, 24)
    kpm = torch.zeros(2, n_k, dtype=torch.bool)
    kpm[1, : n_k // 3] = True
    mask = P.local(9).mask(n_q, n_k, h).unsqueeze(0) & ~kpm[:, None, None]
    mask[..., -1] = True  # every row keeps a key: SDPA returns NaN for empty rows
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(reference.attention(q, k, v, mask, scale=0.3), want, atol=1e-12)
    # no mask, default scale
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(reference.attention(q, k, v), want, atol=1e-12)


def test_attention_pattern_lse_and_end_alignment():
    torch.manual_seed(1)
    q, k, v = rand(1, 2, 10, 16), rand(1, 2, 30, 16), rand(1, 2, 30, 16)
    out, lse = reference.attention(q, k, v, P.causal(), return_lse=True)
    s = (q @ k.transpose(-1, -2)) * 16**-0.5
    allowed = torch.arange(30).view(1, -1) <= torch.arange(10).view(-1, 1) + 20
    s = s.masked_fill(~allowed, float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-12)
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-12)


def test_empty_rows_give_zero_and_finite_gradients():
    torch.manual_seed(2)
    q, k, v = (
        rand(1, 2, 6, 16, grad=True),
        rand(1, 2, 6, 16, grad=True),
        rand(1, 2, 6, 16, grad=True),
    )
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = reference.attention(q, k, v, mask, return_lse=True)
    assert torch.all(out[:, :, 2] == 0) and torch.all(lse[:, :, 2] == float("-inf"))
    (out.sum() + lse[:, :, [0, 1, 3]].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 2] == 0)


def test_attention_gradcheck_fp64():
    torch.manual_seed(3)
    q, k, v = (
        rand(1, 2, 5, 16, grad=True),
        rand(1, 1, 7, 16, grad=True),
        rand(1, 1, 7, 16, grad=True),
    )
    mask = P.strided(3).mask(5, 7).unsqueeze(0)
    assert torch.autograd.gradcheck(lambda *t: reference.attention(*t, mask), (q, k, v))


def test_attention_low_precision_follows_the_dtype():
    torch.manual_seed(4)
    q, k, v = rand(1, 2, 33, 40), rand(1, 2, 33, 40), rand(1, 2, 33, 40)
    exact = reference.attention(q, k, v, P.causal())
    for dtype in (torch.float32, torch.bfloat16):
        got = reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), P.causal())
        assert got.dtype == dtype
        assert torch.allclose(got.double(), exact, atol=5 * torch.finfo(dtype).eps)


def original_xl_scores(q, k, r_by_distance, u, vb, mem):
    """Transformer-XL's own recipe: r from the largest distance down to 0, then _rel_shift."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    big_r = r_by_distance.shape[1]
    distances = torch.arange(n_k - 1, -1, -1).clamp(max=big_r - 1)
    r_desc = r_by_distance[:, distances]  # [H, Nk, D]
    ac = (q + u[:, None]) @ k.transpose(-1, -2)
    bd = (q + vb[:, None]) @ r_desc.transpose(-1, -2)  # [B, H, L, Nk]
    padded = F.pad(bd, (1, 0))  # zero column in front
    shifted = padded.view(b, h, n_k + 1, n_q)[:, :, 1:].view(b, h, n_q, n_k)
    return ac + shifted


@pytest.mark.parametrize("mem, n_q, big_r", [(7, 5, 12), (0, 6, 6), (9, 4, 5), (3, 1, 2)])
def test_xl_matches_rel_shift_formulation(mem, n_q, big_r):
    torch.manual_seed(5)
    h, d = 3, 16
    q, k, v = rand(2, h, n_q, d), rand(2, h, mem + n_q, d), rand(2, h, mem + n_q, d)
    r, u, vb = rand(h, big_r, d), rand(h, d), rand(h, d)
    got, lse = reference.xl_attention(q, k, v, r, u, vb, scale=0.25, return_lse=True)
    scores = original_xl_scores(q, k, r, u, vb, mem) * 0.25
    causal = torch.arange(mem + n_q).view(1, -1) <= torch.arange(n_q).view(-1, 1) + mem
    scores = scores.masked_fill(~causal, float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-12)
    assert torch.allclose(got, torch.softmax(scores, -1) @ v, atol=1e-12)


def test_xl_window_and_gqa():
    torch.manual_seed(6)
    h, h_kv, d, mem, n_q = 4, 2, 16, 6, 5
    q, k, v = rand(1, h, n_q, d), rand(1, h_kv, mem + n_q, d), rand(1, h_kv, mem + n_q, d)
    r, u, vb = rand(h, 20, d), rand(h, d), rand(h, d)
    got = reference.xl_attention(q, k, v, r, u, vb, window=4)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = original_xl_scores(q, kk, r, u, vb, mem) * d**-0.5
    dist = torch.arange(n_q).view(-1, 1) + mem - torch.arange(mem + n_q).view(1, -1)
    scores = scores.masked_fill(~((dist >= 0) & (dist < 4)), float("-inf"))
    assert torch.allclose(got, torch.softmax(scores, -1) @ vv, atol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v: reference.attention(q[0], k, v), "4-D"),
        (lambda q, k, v: reference.attention(q, k, v[:, :, :3]), "same shape"),
        (
            lambda q, k, v: reference.attention(
                q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16)
            ),
            "multiple",
        ),
        (lambda q, k, v: reference.attention(q, k, v, torch.ones(8, 8)), "bool"),
        (
            lambda q, k, v: reference.attention(q, k, v, torch.ones(3, 8, 8, dtype=torch.bool)),
            "broadcast",
        ),
        (lambda q, k, v: reference.attention(q, k.float(), v), "dtype"),
        (lambda q, k, v: reference.attention(k, q[:, :, :4], v[:, :, :4]), "aligned"),
    ],
)
def test_bad_input(call, match):
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
