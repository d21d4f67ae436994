"""Plans: their parts cover the pattern exactly once, at block speed."""

import dataclasses
import random
import time

import pytest
import torch

import effattn
from effattn import patterns as P
from effattn.decompose import (
    _column_parts,
    _column_split,
    _fixed_parts,
    _natural,
    plan,
    planned_work_efficiency,
)

CPU = torch.device("cpu")


def covered(pattern, parts, n_q, n_k, heads):
    """How many parts allow each (head, query, key) of the original problem."""
    cover = torch.zeros(heads, n_q, n_k, dtype=torch.int32)
    for part in parts:
        i = torch.arange(part.n_q).view(-1, 1)
        j = torch.arange(part.n_k).view(1, -1)
        q_index = torch.arange(n_q) if part.q_index is None else part.q_index
        for h in range(heads):
            if part.heads is not None and h % part.heads[1] != part.heads[0]:
                continue  # the part serves another head class
            c = 0 if part.heads is not None else h % part.pattern.period
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


def decomposed(pattern, n_q, n_k, bm, bn):
    """The decomposition of ``pattern``, whether or not the planner would pick it: fixed's
    parts, column splits per class (natural order where a class has none), tagged per class."""
    kind = pattern.kind
    if isinstance(kind, P.Fixed):
        args = (kind.stride, kind.summary, kind.num_patterns, kind.causal)
        return _fixed_parts(*args, n_q, n_k, bm, bn, CPU, kind.moved)
    classes = pattern.classes()
    parts = []
    for c, terms in enumerate(classes):
        split = _column_split(terms, n_k)
        if split is None:
            single = P.TermPattern("natural", (terms,))
            own = (_natural(single, n_q, n_k, bm, bn, CPU),)
        else:
            own = _column_parts(*split, n_q, n_k, bm, bn, CPU)
        heads = None if len(classes) == 1 else (c, len(classes))
        parts += [dataclasses.replace(p, heads=heads) for p in own]
    return tuple(parts)


def random_pattern(rng):
    causal = rng.random() < 0.6
    l = rng.randint(1, 40)
    summary = rng.randint(1, l)
    window = rng.randint(1, 60)
    return rng.choice(
        [
            P.strided(l, causal=causal),
            P.fixed(l, summary, rng.randint(1, l // summary), causal=causal),
            P.column(l, causal=causal),
            P.axial(l, causal=causal),
            P.union(P.local(window, causal=causal), P.column(l, causal=causal)),
            P.per_head(P.local(window, causal=causal), P.column(l, causal=causal)),
            P.per_head(P.axial(l), P.strided(window), P.causal()),
            P.union(P.column(l), P.column(window, causal=False)),
            _moved_fixed(l, summary, causal, rng),
        ]
    )


def _moved_fixed(stride, summary, causal, rng):
    """fixed with a range of keys from a random start to the end seen from every window, per
    class (DeepSpeed's moved global blocks)."""
    base = P.fixed(stride, summary, causal=causal)
    start = rng.randint(0, 199)
    lo = 0 if causal else -P.BIG
    extra = P.Term(lo=lo, smod=P.BIG, smin=start, smax=P.BIG - 1)
    kind = dataclasses.replace(base.kind, moved=(start,))
    return P.TermPattern("moved", ((*base.classes()[0], extra),), kind=kind)


def test_decompositions_are_exact_disjoint_covers():
    rng = random.Random(3)
    decomposing = 0
    for _ in range(120):
        pattern = random_pattern(rng)
        n_k = rng.randint(1, 200)
        n_q = rng.randint(1, n_k)
        bm, bn = rng.choice([4, 16]), rng.choice([4, 16])
        heads = 2 * pattern.head_divisor * pattern.period
        mask = pattern.mask(n_q, n_k, heads).expand(heads, n_q, n_k)
        for parts in (decomposed(pattern, n_q, n_k, bm, bn), plan(pattern, n_q, n_k, bm, bn)):
            decomposing += len(parts) > 1
            cover = covered(pattern, parts, n_q, n_k, heads)
            assert cover.max() <= 1, (pattern, n_q, n_k, "parts overlap")
            assert torch.equal(cover.bool(), mask), (pattern, n_q, n_k)
    assert decomposing > 80


def test_overlapping_column_terms_are_not_split():
    """A union whose column keys overlap another part's (two moduli, 2 and 3, meet at 6) keeps
    the natural order: merging overlapping parts would count a key twice."""
    pattern = P.union(P.column(2), P.column(3))
    assert _column_split(pattern.classes()[0], 100) is None
    assert len(plan(pattern, 600, 600, 16, 16)) == 1
    # Cut off the band they share, a local window's columns are the strided pattern's.
    local, cols = _column_split(P.union(P.local(20), P.column(8)).classes()[0], 100)
    assert cols == {8: [P.Term(lo=20, mod=8)]} and local == [P.Term(lo=0, hi=19)]


def test_plan_keeps_natural_order_when_cheaper():
    assert len(plan(P.strided(8), 100, 100, 64, 64)) == 1
    assert len(plan(P.causal(), 4096, 4096, 64, 64)) == 1
    # decoding one token: the transposed column part would compute n rows for one query.
    assert len(plan(P.strided(128), 1, 4096, 64, 64)) == 1
    assert len(plan(P.strided(128), 4096, 4096, 64, 64)) == 2
    assert len(plan(P.fixed(128, 16), 4096, 4096, 64, 64)) == 2
    # head classes planned on their own: the local head in natural order, the column head as
    # transposed chunks (no band part); two natural classes stay one natural part.
    parts = plan(P.per_head(P.local(128), P.column(128)), 4096, 4096, 64, 64)
    assert [(p.heads, p.chunk) for p in parts] == [((0, 2), None), ((1, 2), 128)]
    assert len(plan(P.per_head(P.local(128), P.causal()), 4096, 4096, 64, 64)) == 1
    assert [p.chunk for p in plan(P.axial(64), 4096, 4096, 64, 64)] == [None, 64]


BLOCK_SPEED = [
    P.strided(128),
    P.fixed(128, 16),
    P.fixed(128, 32),
    P.per_head(P.local(128), P.column(128)),
    P.union(P.local(128), P.column(128)),
    P.axial(64),
    P.axial(64, causal=False),
]


@pytest.mark.parametrize("pattern", BLOCK_SPEED, ids=lambda p: p.name)
@pytest.mark.parametrize("n", [4096, 16384])
def test_work_efficiency_at_block_speed(pattern, n):
    natural = pattern.natural_work_efficiency(n, n, 64, 64)
    planned = planned_work_efficiency(pattern, n, n, 64, 64)
    assert planned >= 0.5
    assert planned > natural


def test_long_plans_never_lay_out_the_natural_order():
    """The lower bound of natural work settles the choice: planning visits only the parts'
    blocks (the natural order of these would visit n / l blocks per block row)."""
    n = 131072
    start = time.perf_counter()
    for pattern in (P.per_head(P.local(256), P.column(256)), P.axial(256)):
        assert len(plan(pattern, n, n, 64, 64)) == 2
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- runs
RUN_PATTERNS = [
    P.per_head(P.local(8), P.column(8)),
    P.union(P.local(8), P.column(8)),
    P.union(P.local(12, causal=False), P.column(5, causal=False)),
    P.axial(8),
    P.axial(7, causal=False),
    P.column(6),
    P.per_head(P.strided(5), P.fixed(8, 2), P.column(3)),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 kernel blocks, so that plans of short sequences decompose."""
    from effattn.ops import cpu, torch_sparse

    monkeypatch.setattr(cpu, "BLOCK_M", 16)
    monkeypatch.setattr(cpu, "BLOCK_N", 16)
    monkeypatch.setattr(torch_sparse, "BLOCK", 16)


def _grads(pattern, backend, q, k, v, kpm):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = effattn.sparse_attention(
        *xs, pattern, key_padding_mask=kpm, backend=backend, return_lse=True
    )
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    finite = torch.isfinite(lse)
    ((out * dout).sum() + torch.where(finite, lse, 0).mul(dlse).sum()).backward()
    return [out, torch.where(finite, lse, 0), *(x.grad for x in xs)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("pattern", RUN_PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "h, h_kv, n_q, n_k", [(6, 3, 150, 150), (6, 2, 121, 160), (6, 6, 192, 192)]
)
def test_plans_run_exactly(pattern, backend, h, h_kv, n_q, n_k, small_blocks):
    """Decomposed and per-class plans on the C++ CPU and the torch backends against the fp64
    reference: forward, lse and gradients, with GQA (groups of 2 and 3 against 2 and 3 head
    classes: sliced and gathered kv heads), n_q < n_k, key padding and without (the column
    chunks then run folded, also as a class's only part)."""
    if backend == "cpu":
        pytest.importorskip("effattn._C")
    parts = plan(pattern, n_q, n_k, 16, 16)
    assert any(p.chunk for p in parts), "the test should run a decomposed plan"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, h, n_q, 24, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, h_kv, n_k, 24, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = None
    if n_q != n_k:
        kpm = torch.rand(2, n_k, generator=g) < 0.2
        kpm[1, :40] = True
    got = _grads(pattern, backend, q, k, v, kpm)
    want = _grads(pattern, "reference", q, k, v, kpm)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "pattern",
    [
        P.per_head(P.local(8), P.column(8)),
        P.axial(8, causal=False),
        P.union(P.local(8), P.column(6)),
    ],
    ids=lambda p: p.name,
)
def test_plans_run_exactly_on_triton(pattern, monkeypatch):
    """The same on the Triton kernels (its interpreter without a GPU): per-class plans on head
    views, chunk parts folded and gathered."""
    pytest.importorskip("triton")
    from effattn.ops import triton_sparse

    if not (torch.cuda.is_available() or triton_sparse._interpreting()):
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_sparse, "BLOCKS_OVERRIDE", (16, 16))
    assert any(p.chunk for p in plan(pattern, 96, 96, 16, 16))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 96, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for kpm in (None, torch.rand(1, 96, generator=g) < 0.2):
        got = _grads(pattern, "triton", q, k, v, kpm)
        want = _grads(pattern, "reference", q, k, v, kpm)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
