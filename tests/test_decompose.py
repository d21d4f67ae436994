"""Plans: the parts of strided and fixed cover their pattern exactly once, at block speed."""

import random

import pytest
import torch

from effattn import patterns as P
from effattn.decompose import _fixed_parts, _strided_parts, plan, planned_work_efficiency

CPU = torch.device("cpu")


def covered(pattern, parts, n_q, n_k, heads):
    """How many parts allow each (head, query, key) of the original problem."""
    cover = torch.zeros(heads, n_q, n_k, dtype=torch.int32)
    for part in parts:
        i = torch.arange(part.n_q).view(-1, 1)
        j = torch.arange(part.n_k).view(1, -1)
        q_index = torch.arange(n_q) if part.q_index is None else part.q_index
        for h in range(heads):
            c = h % part.pattern.period
            m = part.pattern._allowed(i + part.q_offset, j, c, i).expand(part.n_q, part.n_k)
            k_index = torch.arange(n_k)
            if part.k_index is not None:
                k_index = part.k_index[h % part.k_index.shape[0]]
            if part.key_padding is not None:
                m = m & ~part.key_padding[h % part.key_padding.shape[0]].view(1, -1)
            reached = m & (q_index >= 0).view(-1, 1)
            assert not (reached & (k_index < 0).view(1, -1)).any(), "a padding key is reachable"
            ii, jj = reached.nonzero(as_tuple=True)
            cover[h].index_put_(
                (q_index[ii], k_index[jj]),
                torch.ones(ii.numel(), dtype=torch.int32),
                accumulate=True,
            )
    return cover


def test_decompositions_are_exact_disjoint_covers():
    rng = random.Random(3)
    for _ in range(150):
        n_k = rng.randint(1, 200)
        n_q = rng.randint(1, n_k)
        stride = rng.randint(1, 40)
        summary = rng.randint(1, stride)
        npat = rng.randint(1, stride // summary)
        causal = rng.random() < 0.6
        bm, bn = rng.choice([4, 16]), rng.choice([4, 16])
        for pattern, parts in (
            (
                P.strided(stride, causal=causal),
                _strided_parts(stride, causal, n_q, n_k, bm, bn, CPU),
            ),
            (
                P.fixed(stride, summary, npat, causal=causal),
                _fixed_parts(stride, summary, npat, causal, n_q, n_k, bm, bn, CPU),
            ),
        ):
            heads = 2 * pattern.period
            cover = covered(pattern, parts, n_q, n_k, heads)
            mask = pattern.mask(n_q, n_k, heads).expand(heads, n_q, n_k)
            assert cover.max() <= 1, (pattern, n_q, n_k, "parts overlap")
            assert torch.equal(cover.bool(), mask), (pattern, n_q, n_k)


def test_plan_keeps_natural_order_when_cheaper():
    assert len(plan(P.strided(8), 100, 100, 64, 64)) == 1
    assert len(plan(P.causal(), 4096, 4096, 64, 64)) == 1
    # decoding one token: the transposed column part would compute n rows for one query.
    assert len(plan(P.strided(128), 1, 4096, 64, 64)) == 1
    assert len(plan(P.strided(128), 4096, 4096, 64, 64)) == 2
    assert len(plan(P.fixed(128, 16), 4096, 4096, 64, 64)) == 2


@pytest.mark.parametrize(
    "pattern", [P.strided(128), P.fixed(128, 16), P.fixed(128, 32)], ids=lambda p: p.name
)
@pytest.mark.parametrize("n", [4096, 16384])
def test_work_efficiency_at_block_speed(pattern, n):
    natural = pattern.natural_work_efficiency(n, n, 64, 64)
    planned = planned_work_efficiency(pattern, n, n, 64, 64)
    assert planned >= 0.5
    assert planned > natural
