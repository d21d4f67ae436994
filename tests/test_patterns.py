"""Patterns against brute-force evaluations of the element-level definitions (docs/design.md)."""

import random

import pytest
import torch

from effattn import patterns as P
from effattn.patterns import Term


def definition(kind, args, causal, p, j, h):
    """The definitions' table, written independently of the Term machinery (numpy-style tensors)."""
    d = p - j
    if kind == "full":
        return torch.ones_like(d, dtype=torch.bool)
    if kind == "causal":
        return d >= 0
    if kind == "local":
        (w,) = args
        return (d >= 0) & (d < w) if causal else d.abs() < w
    if kind == "strided":
        (l,) = args
        if causal:
            return ((d >= 0) & (d < l)) | ((d >= 0) & (d % l == 0))
        return (d.abs() < l) | (d % l == 0)
    if kind == "fixed":
        l, c, npat = args
        r = h % npat
        ok = (j // l == p // l) | ((j % l >= l - (r + 1) * c) & (j % l <= l - r * c - 1))
        return ok & (d >= 0) if causal else ok
    if kind == "column":
        (l,) = args
        ok = (d % l == 0) & (d.abs() >= l)
        return ok & (d >= 0) if causal else ok
    if kind == "axial":
        (w,) = args  # a row-major image w pixels wide: same row or same column
        ok = (p // w == j // w) | (p % w == j % w)
        return ok & (d >= 0) if causal else ok
    raise AssertionError(kind)


def brute_mask(kind, args, causal, n_q, n_k, heads):
    p = torch.arange(n_q).view(-1, 1) + (n_k - n_q)
    j = torch.arange(n_k).view(1, -1)
    return torch.stack([definition(kind, args, causal, p, j, h) for h in range(heads)])


def build(kind, args, causal):
    if kind == "full":
        return P.full()
    if kind == "causal":
        return P.causal()
    if kind == "fixed":
        return P.fixed(args[0], args[1], args[2], causal=causal)
    return getattr(P, kind)(*args, causal=causal)


def random_case(rng):
    kind = rng.choice(["full", "causal", "local", "strided", "fixed", "column", "axial"])
    causal = rng.random() < 0.6
    stride = rng.randint(1, 40)
    summary = rng.randint(1, stride)
    args = {
        "full": (),
        "causal": (),
        "local": (rng.randint(1, 50),),
        "strided": (stride,),
        "fixed": (stride, summary, rng.randint(1, stride // summary)),
        "column": (stride,),
        "axial": (stride,),
    }[kind]
    n_k = rng.randint(1, 160)
    n_q = rng.randint(1, n_k)
    return kind, args, causal, n_q, n_k


def test_masks_match_definitions():
    rng = random.Random(0)
    for _ in range(400):
        kind, args, causal, n_q, n_k = random_case(rng)
        heads = 6
        got = build(kind, args, causal).mask(n_q, n_k, heads)
        want = brute_mask(kind, args, causal, n_q, n_k, heads)
        assert torch.equal(got.expand_as(want), want), (kind, args, causal, n_q, n_k)


def test_combinators():
    a, b = P.strided(5), P.fixed(8, 2, num_patterns=2)
    m_a, m_b = a.mask(30, 40, 4), b.mask(30, 40, 4)
    assert torch.equal(P.union(a, b).mask(30, 40, 4), m_a | m_b)
    ph = P.per_head(a, b).mask(30, 40, 4)
    assert torch.equal(ph[0], m_a[0]) and torch.equal(ph[2], m_a[0])
    # per_head hands the global head index to fixed: heads 1 and 3 use r = 1 and r = 1.
    assert torch.equal(ph[1], m_b[1]) and torch.equal(ph[3], m_b[3])
    custom = torch.rand(2, 30, 40) < 0.3
    assert torch.equal(P.from_mask(custom).mask(30, 40, 2), custom)
    assert torch.equal(P.union(P.from_mask(custom), a).mask(30, 40, 2), custom | m_a)


def layout_sets(lay, c):
    full, part = set(), set()
    for qb in range(lay.num_q_blocks):
        full |= {(qb, kb) for kb in lay.kv_full_idx[c, qb, : lay.kv_full_num[c, qb]].tolist()}
        part |= {(qb, kb) for kb in lay.kv_part_idx[c, qb, : lay.kv_part_num[c, qb]].tolist()}
    t_full, t_part = set(), set()
    for kb in range(lay.num_k_blocks):
        t_full |= {(qb, kb) for qb in lay.q_full_idx[c, kb, : lay.q_full_num[c, kb]].tolist()}
        t_part |= {(qb, kb) for qb in lay.q_part_idx[c, kb, : lay.q_part_num[c, kb]].tolist()}
    assert (full, part) == (t_full, t_part), "transposed view disagrees"
    return full, part


def check_layout(pattern, n_q, n_k, bm, bn, heads):
    lay = pattern.layout(n_q, n_k, bm, bn)
    mask = pattern.mask(n_q, n_k, heads)
    for name in ("kv_full_num", "kv_full_idx", "kv_part_idx", "q_full_idx", "q_part_num"):
        assert getattr(lay, name).dtype == torch.int32
    for idx, num in ((lay.kv_full_idx, lay.kv_full_num), (lay.q_part_idx, lay.q_part_num)):
        slots = torch.arange(idx.shape[-1])
        valid = slots < num.unsqueeze(-1).long()
        assert torch.all((idx >= 0) == valid), "padding must be -1 exactly past the count"
        assert _sorted(idx, valid)
    for h in range(heads):
        full, part = layout_sets(lay, h % lay.num_classes)
        m = mask[h % mask.shape[0]]
        for qb in range(lay.num_q_blocks):
            for kb in range(lay.num_k_blocks):
                tile = m[qb * bm : (qb + 1) * bm, kb * bn : (kb + 1) * bn]
                expect = "full" if tile.all() else "part" if tile.any() else "none"
                got = "full" if (qb, kb) in full else "part" if (qb, kb) in part else "none"
                assert got == expect, (pattern, n_q, n_k, bm, bn, h, qb, kb)


def _sorted(idx, valid):
    return bool(torch.all((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]))


def test_layouts_cover_exactly_the_mask():
    rng = random.Random(1)
    for _ in range(120):
        kind, args, causal, n_q, n_k = random_case(rng)
        pattern = build(kind, args, causal)
        bm, bn = rng.choice([1, 4, 16, 32]), rng.choice([1, 8, 16, 64])
        check_layout(pattern, n_q, n_k, bm, bn, heads=4)


@pytest.mark.parametrize(
    "pattern",
    [
        P.union(P.local(5), P.strided(7)),
        P.per_head(P.strided(6), P.fixed(8, 3), P.causal(), P.local(4, causal=False)),
        P.union(P.fixed(8, 2, num_patterns=2), P.per_head(P.local(3), P.full())),
        P.from_mask(torch.rand(2, 45, 77) < 0.1),
        P.per_head(P.from_mask(torch.rand(1, 45, 77) < 0.5), P.strided(9)),
    ],
    ids=lambda p: p.name[:40],
)
def test_combined_layouts(pattern):
    for bm, bn in ((16, 16), (8, 32)):
        check_layout(pattern, 45, 77, bm, bn, heads=4)


def test_custom_layout_tiles_are_deduplicated_and_exact():
    mask = P.strided(8).mask(64, 64)  # periodic: few distinct partial tiles
    pattern = P.from_mask(mask)
    lay = pattern.layout(64, 64, 16, 16)
    assert lay.terms is None and lay.tiles is not None
    assert lay.tiles.shape[0] < int(lay.kv_part_num.sum())
    for qb in range(lay.num_q_blocks):
        for s in range(int(lay.kv_part_num[0, qb])):
            kb, t = int(lay.kv_part_idx[0, qb, s]), int(lay.kv_part_tile[0, qb, s])
            assert torch.equal(
                lay.tiles[t], mask[0, qb * 16 : qb * 16 + 16, kb * 16 : kb * 16 + 16]
            )


def test_builtin_layouts_never_evaluate_the_full_mask(monkeypatch):
    """Layouts of built-in patterns evaluate elements only where two constraints meet."""
    evaluated = 0
    original = Term.allowed

    def counting(self, p, j):
        nonlocal evaluated
        evaluated += torch.broadcast_shapes(p.shape, j.shape).numel()
        return original(self, p, j)

    monkeypatch.setattr(Term, "allowed", counting)
    n, block = 8192, 64
    for pattern in (P.strided(128), P.fixed(128, 16, num_patterns=2), P.local(100)):
        pattern.layout(n, n, block, block)
    assert 0 < evaluated < 40 * n * block  # an n x n mask would be 67M elements


def test_count_and_density():
    rng = random.Random(2)
    for _ in range(60):
        kind, args, causal, n_q, n_k = random_case(rng)
        pattern = build(kind, args, causal)
        heads = 4
        want = int(brute_mask(kind, args, causal, n_q, n_k, heads).sum())
        assert pattern.count_allowed(n_q, n_k, heads) == want
        assert pattern.density(n_q, n_k, heads) == pytest.approx(want / (n_q * n_k * heads))


def test_work_efficiency_natural_order():
    # causal at block 64, n = 256: 10 visited blocks, 4 of them diagonal (half useful + diag).
    eff = P.causal().natural_work_efficiency(256, 256, 64, 64)
    assert eff == pytest.approx((256 * 257 / 2) / (10 * 64 * 64))
    # the strided column part wastes most of a visited block: that is what decompose fixes.
    assert P.strided(128).natural_work_efficiency(4096, 4096, 64, 64) < 0.2


def test_layout_on_device_and_cached():
    pattern = P.strided(16)
    a = pattern.layout(100, 100, 16, 16)
    assert a is P.strided(16).layout(100, 100, 16, 16)
    meta = pattern.layout(100, 100, 16, 16, device="meta")
    assert meta.kv_full_idx.device.type == "meta"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: P.local(0), "window"),
        (lambda: P.strided(0), "stride"),
        (lambda: P.fixed(8, 0), "summary"),
        (lambda: P.fixed(8, 9), "summary"),
        (lambda: P.fixed(8, 3, num_patterns=3), "num_patterns"),
        (lambda: P.from_mask(torch.zeros(4, 4)), "dtype"),
        (lambda: P.from_mask(torch.zeros(1, 1, 4, 4, dtype=torch.bool)), "shape"),
        (lambda: P.from_mask(torch.zeros(1, 5, 4, dtype=torch.bool)), "n_q"),
        (lambda: P.per_head(P.causal(), P.full()).mask(4, 4, 3), "divisible"),
        (lambda: P.from_mask(torch.ones(1, 4, 4, dtype=torch.bool)).mask(4, 5), "cannot serve"),
        (lambda: P.causal().mask(5, 4), "n_q"),
        (lambda: P.column(0), "stride"),
        (lambda: P.axial(0), "width"),
        (lambda: P.from_blocks(torch.ones(2, 3, 4, dtype=torch.bool), 16), "shape"),
        (lambda: P.from_blocks(torch.ones(3, 3, dtype=torch.bool), 0), "block"),
        (lambda: P.from_blocks(torch.ones(3, 3, dtype=torch.bool), 16).mask(49, 49), "cannot"),
        (lambda: P.union(), "at least one"),
        (
            lambda: P.union(
                P.from_mask(torch.ones(1, 3, 3, dtype=torch.bool)),
                P.from_mask(torch.ones(1, 4, 4, dtype=torch.bool)),
            ),
            "different sizes",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types():
    with pytest.raises(TypeError, match="stride"):
        P.strided(2.5)
    with pytest.raises(TypeError, match="causal"):
        P.local(3, causal="yes")
    with pytest.raises(TypeError, match="Pattern"):
        P.union(P.causal(), "local")
    with pytest.raises(TypeError, match="bool or integer"):
        P.from_blocks(torch.ones(3, 3), 16)
    with pytest.raises(TypeError, match="causal"):
        P.axial(8, causal=1)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fixed.png"
    P.fixed(16, 4, num_patterns=2).plot(64, 8, head=1, path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- algebra
def test_intersection_is_the_and_of_the_masks():
    rng = random.Random(4)
    for _ in range(60):
        a = build(*random_case(rng)[:3])
        b = build(*random_case(rng)[:3])
        n_k = rng.randint(1, 90)
        n_q = rng.randint(1, n_k)
        try:
            both = a & b
        except ValueError as e:
            assert "no analytic form" in str(e)
            continue
        assert not both.is_custom
        heads = 6
        want = a.mask(n_q, n_k, heads).expand(heads, n_q, n_k) & b.mask(n_q, n_k, heads)
        assert torch.equal(both.mask(n_q, n_k, heads).expand(heads, n_q, n_k), want), both.name
        check_layout(both, n_q, n_k, 16, 8, heads=heads)


def test_causal_versions_keep_their_decompositions():
    for p in (P.strided(8, causal=False), P.fixed(16, 4, 2, causal=False)):
        c = p & P.causal()
        assert isinstance(c.kind, (P.Strided, P.Fixed)) and c.kind.causal
        assert c.name == p.name.replace(", causal=False", "")
    same = P.local(5)
    assert same & P.causal() is same, "an intersection that changes nothing is the operand"


def test_union_and_intersection_operators_and_custom_operands():
    a, b = P.strided(5), P.local(7, causal=False)
    m_a, m_b = a.mask(30, 40), b.mask(30, 40)
    assert torch.equal((a | b).mask(30, 40), m_a | m_b)
    custom = torch.rand(1, 30, 40) < 0.4
    both = P.from_mask(custom) & a
    assert both.is_custom and both.fixed_size == (30, 40)
    assert torch.equal(both.mask(30, 40), custom & m_a)
    check_layout(both, 30, 40, 8, 8, heads=2)


def test_intersection_without_an_analytic_form_says_so():
    with pytest.raises(ValueError, match="no analytic form"):
        P.fixed(8, 2) & P.fixed(12, 3)


def test_counts_with_closed_forms_equal_the_masks():
    rng = random.Random(5)
    for _ in range(300):
        kind, args, causal, n_q, n_k = random_case(rng)
        if kind not in ("strided", "fixed", "column", "axial"):
            continue
        pattern = build(kind, args, causal)
        heads = 3
        want = int(pattern.mask(n_q, n_k, heads).expand(heads, n_q, n_k).sum())
        assert pattern.count_allowed(n_q, n_k, heads) == want, (pattern.name, n_q, n_k)


# --------------------------------------------------------------------------- column, axial
@pytest.mark.parametrize("causal", [True, False])
def test_local_and_column_make_strided(causal):
    for l in (1, 2, 7, 16):
        merged = P.union(P.local(l, causal=causal), P.column(l, causal=causal))
        assert torch.equal(merged.mask(90, 100), P.strided(l, causal=causal).mask(90, 100))
    both = P.per_head(P.local(8), P.column(8)).mask(40, 40, 2)
    assert torch.equal(both[0] | both[1], P.strided(8).mask(40, 40)[0])
    assert not (both[0] & both[1]).any()


def test_axial_is_rows_and_columns_of_an_image():
    w, h = 6, 5
    m = P.axial(w, causal=False).mask(w * h, w * h)[0]
    for p in range(w * h):
        seen = {(j // w, j % w) for j in m[p].nonzero().flatten().tolist()}
        row, col = divmod(p, w)
        assert seen == {(row, c) for c in range(w)} | {(r, col) for r in range(h)}
    assert torch.equal(P.axial(w).mask(30, 30)[0], m & P.causal().mask(30, 30)[0])


# --------------------------------------------------------------------------- block grids
def expand_grid(grid, block, n_q, n_k, causal):
    """A block layout [C, nb, nb] expanded block by block, cut to the problem's rows and keys."""
    full = grid.repeat_interleave(block, 1).repeat_interleave(block, 2)
    m = full[:, n_k - n_q : n_k, :n_k]
    if causal:
        m = m & P.causal().mask(n_q, n_k)
    return m


def check_tiles(pattern, n_q, n_k, bm, bn, heads):
    """Every partial block's stored tile is the mask there (padded with False past the ends)."""
    lay = pattern.layout(n_q, n_k, bm, bn)
    mask = pattern.mask(n_q, n_k, heads)
    for c in range(lay.num_classes):
        for qb in range(lay.num_q_blocks):
            for s in range(int(lay.kv_part_num[c, qb])):
                kb, t = int(lay.kv_part_idx[c, qb, s]), int(lay.kv_part_tile[c, qb, s])
                want = torch.zeros(bm, bn, dtype=torch.bool)
                sub = mask[c % mask.shape[0], qb * bm : (qb + 1) * bm, kb * bn : (kb + 1) * bn]
                want[: sub.shape[0], : sub.shape[1]] = sub
                assert torch.equal(lay.tiles[t], want), (pattern.name, c, qb, kb)


def test_block_grids_mask_layout_count_and_key():
    rng = random.Random(6)
    for _ in range(80):
        block = rng.choice([1, 3, 8, 16, 32, 64, 128])
        nb = rng.randint(1, 10)
        classes = rng.choice([1, 3])
        g = torch.Generator().manual_seed(rng.randint(0, 2**31))
        grid = torch.rand(classes, nb, nb, generator=g) < rng.random()
        causal = rng.random() < 0.5
        pattern = P.from_blocks(grid.long(), block, causal=causal)
        n_k = rng.randint(1, nb * block)
        n_q = rng.randint(1, n_k)
        heads = 2 * classes
        want = expand_grid(grid, block, n_q, n_k, causal)
        heads_shown = 1 if classes == 1 else heads // classes  # one mask when heads agree
        assert torch.equal(pattern.mask(n_q, n_k, heads), want.repeat(heads_shown, 1, 1))
        bm, bn = rng.choice([16, 32, 64]), rng.choice([16, 64])
        check_layout(pattern, n_q, n_k, bm, bn, heads)
        check_tiles(pattern, n_q, n_k, bm, bn, heads)
        assert pattern.count_allowed(n_q, n_k, heads) == int(want.sum()) * heads // classes
        again = P.from_key(pattern.key)
        assert torch.equal(again.grid, pattern.grid) and again.causal == causal


def test_block_grid_layouts_share_tiles_and_skip_empty_cells():
    """A periodic grid has a handful of distinct tiles however long the sequence, and the
    layout touches only the kernel blocks under set cells."""
    nb, block = 256, 16
    r = torch.arange(nb)
    grid = ((r.view(-1, 1) // 4) == (r.view(1, -1) // 4)) | (r.view(1, -1) % 4 == 3)
    lay = P.from_blocks(grid, block).layout(4096, 4096, 64, 64)
    assert lay.tiles.shape[0] <= 2
    assert int(lay.kv_full_num.sum() + lay.kv_part_num.sum()) == 64 * 64
    sparse = P.from_blocks(torch.eye(nb, dtype=torch.bool), block).layout(4096, 4096, 64, 64)
    assert int(sparse.kv_full_num.sum() + sparse.kv_part_num.sum()) == 64
