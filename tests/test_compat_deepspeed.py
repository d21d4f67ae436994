"""effattn.compat.deepspeed against DeepSpeed's own layout code (vendored in deepspeed_oracle,
Apache-2.0) over its whole argument grid, and its patterns and module against dense
references."""

import itertools
import math
import random

import pytest
import torch
from deepspeed_oracle import sparsity_config as oracle
from test_decompose import covered
from test_patterns import check_layout, check_tiles, expand_grid

import effattn
from effattn import patterns as P
from effattn.compat import deepspeed as ds
from effattn.decompose import _fixed_parts, plan
from effattn.patterns.core import BlockPattern

UNI, BI = "unidirectional", "bidirectional"


# --------------------------------------------------------------------------- the grid
def _fixed_grid():
    for L, heads, dlph, attention, horizontal in itertools.product(
        (1, 2, 4, 6), (1, 4), (False, True), (UNI, BI), (False, True)
    ):
        for G in (g for g in range(1, L + 1) if L % g == 0):
            for ndgp in range(1, L // G + 1):
                if (horizontal and attention == UNI) or (ndgp > 1 and not dlph):
                    continue
                yield (
                    "FixedSparsityConfig",
                    {
                        "num_heads": heads,
                        "block": 16,
                        "different_layout_per_head": dlph,
                        "num_local_blocks": L,
                        "num_global_blocks": G,
                        "attention": attention,
                        "horizontal_global_attention": horizontal,
                        "num_different_global_patterns": ndgp,
                    },
                )


def _variable_grid():
    globals_ = [([0], None), ([1, 5], None), ([-1], None), ([0, 6], [2, 9]), ([3], [20])]
    for r, windows, (starts, ends), attention, horizontal, dlph in itertools.product(
        (0, 1, 2), ([4], [1, 2, 3], [2, 5], [3]), globals_, (UNI, BI), (False, True), (False, True)
    ):
        if horizontal and attention == UNI:
            continue
        yield (
            "VariableSparsityConfig",
            {
                "num_heads": 3,
                "block": 16,
                "different_layout_per_head": dlph,
                "num_random_blocks": r,
                "local_window_blocks": windows,
                "global_block_indices": starts,
                "global_block_end_indices": ends,
                "attention": attention,
                "horizontal_global_attention": horizontal,
            },
        )


def _bigbird_grid():
    for r, w, g, attention, dlph in itertools.product(
        (0, 1, 2), (1, 3, 4, 5), (1, 2), (UNI, BI), (False, True)
    ):
        yield (
            "BigBirdSparsityConfig",
            {
                "num_heads": 3,
                "block": 16,
                "different_layout_per_head": dlph,
                "num_random_blocks": r,
                "num_sliding_window_blocks": w,
                "num_global_blocks": g,
                "attention": attention,
            },
        )


def _longformer_grid():
    globals_ = [([0], None), ([2], None), ([1, 4], None), ([0, 5], [2, 7]), ([-1], None)]
    for w, (starts, ends), attention, dlph in itertools.product(
        (1, 3, 4, 5), globals_, (UNI, BI), (False, True)
    ):
        yield (
            "BSLongformerSparsityConfig",
            {
                "num_heads": 2,
                "block": 16,
                "different_layout_per_head": dlph,
                "num_sliding_window_blocks": w,
                "global_block_indices": starts,
                "global_block_end_indices": ends,
                "attention": attention,
            },
        )


def _local_grid():
    for w, attention, block in itertools.product((1, 2, 3, 5), (UNI, BI), (16, 32)):
        yield (
            "LocalSlidingWindowSparsityConfig",
            {
                "num_heads": 2,
                "block": block,
                "num_sliding_window_blocks": w,
                "attention": attention,
            },
        )


def _dense_grid():
    for heads, block, dlph in itertools.product((1, 3), (16, 32), (False, True)):
        yield (
            "DenseSparsityConfig",
            {
                "num_heads": heads,
                "block": block,
                "different_layout_per_head": dlph,
            },
        )


GRID = [
    *_dense_grid(),
    *_fixed_grid(),
    *_variable_grid(),
    *_bigbird_grid(),
    *_longformer_grid(),
    *_local_grid(),
]
BLOCK_COUNTS = (1, 2, 3, 5, 8, 11, 13)  # whole and short last windows, shorter than a window


def _both(name, kwargs):
    return getattr(oracle, name)(**kwargs), getattr(ds, name)(**kwargs)


def _layouts(theirs, ours, seq_len, seed):
    """(DeepSpeed's layout or its exception type, ours or ours), from the same random state;
    the random states after both must agree too."""
    results = []
    for config in (theirs, ours):
        random.seed(seed)
        try:
            layout = config.make_layout(seq_len)
        except (ValueError, NotImplementedError) as e:
            layout = type(e)
        results.append((layout, random.random()))
    return results


def test_grid_covers_deepspeed_arguments():
    """DeepSpeed's tests build each config with its defaults and run blocks of 16 and 32 at
    sequence lengths 256 and 576; the grid here spans every argument's values beyond that."""
    names = {name for name, _ in GRID}
    assert names == set(ds._CONFIGS)
    assert len(GRID) > 400


@pytest.mark.parametrize("name", sorted(ds._CONFIGS))
def test_make_layout_is_deepspeeds_over_the_grid(name):
    cases = [kwargs for n, kwargs in GRID if n == name]
    for k, kwargs in enumerate(cases):
        theirs, ours = _both(name, kwargs)
        for nb in BLOCK_COUNTS:
            (want, after_want), (got, after_got) = _layouts(theirs, ours, nb * ours.block, k)
            if isinstance(want, type):
                assert got is want, (kwargs, nb, "DeepSpeed raises")
                continue
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, (kwargs, nb)
            assert torch.equal(got, want), (kwargs, nb)
            assert after_got == after_want, (kwargs, nb, "random draws differ")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("DenseSparsityConfig", {"num_heads": 4}),
        ("FixedSparsityConfig", {"num_heads": 4}),
        ("VariableSparsityConfig", {"num_heads": 4}),
        ("BigBirdSparsityConfig", {"num_heads": 4}),
        ("BSLongformerSparsityConfig", {"num_heads": 4}),
        ("LocalSlidingWindowSparsityConfig", {"num_heads": 4}),
        ("BigBirdSparsityConfig", {"num_heads": 4, "block": 32, "different_layout_per_head": True}),
    ],
)
@pytest.mark.parametrize("seq_len", [256, 576])
def test_defaults_at_deepspeeds_test_lengths(name, kwargs, seq_len):
    theirs, ours = _both(name, kwargs)
    (want, _), (got, _) = _layouts(theirs, ours, seq_len, 5)
    assert torch.equal(got, want)


def test_deepspeeds_errors():
    with pytest.raises(ValueError, match="dividable"):
        ds.FixedSparsityConfig(4).make_layout(100)
    with pytest.raises(ValueError, match="dividable"):
        ds.FixedSparsityConfig(4, num_local_blocks=4, num_global_blocks=3)
    with pytest.raises(NotImplementedError, match="attention"):
        ds.BigBirdSparsityConfig(4, attention="sideways")
    with pytest.raises(ValueError, match="horizontal_global_attention"):
        ds.FixedSparsityConfig(4, attention=UNI, horizontal_global_attention=True)
    with pytest.raises(ValueError, match="different_layout_per_head"):
        ds.FixedSparsityConfig(4, num_different_global_patterns=2)
    with pytest.raises(ValueError, match="num_different_global_patterns"):
        ds.FixedSparsityConfig(4, 16, True, num_different_global_patterns=5)
    with pytest.raises(ValueError, match="pair up"):
        ds.BSLongformerSparsityConfig(4, global_block_indices=[0, 3], global_block_end_indices=[2])
    with pytest.raises(ValueError, match="smaller than its end"):
        ds.VariableSparsityConfig(4, global_block_indices=[3], global_block_end_indices=[3])
    with pytest.raises(ValueError, match="random blocks"):
        ds.BigBirdSparsityConfig(4, num_random_blocks=5).make_layout(64)
    with pytest.raises(TypeError, match="num_heads"):
        ds.DenseSparsityConfig(2.0)
    with pytest.raises(NotImplementedError, match="abstract"):
        ds.SparsityConfig(4).make_layout(64)
    with pytest.raises(ValueError, match="local_window_blocks"):
        ds.VariableSparsityConfig(4, local_window_blocks=[])


# --------------------------------------------------------------------------- pattern()
def _expected_mask(theirs, n_q, n_k, seed, causal):
    """DeepSpeed's layout for ceil(n_k / block) blocks, expanded block by block and cut to the
    queries at the end of n_k keys (and j <= p when causal)."""
    nb = -(-n_k // theirs.block)
    random.seed(seed)
    layout = theirs.make_layout(nb * theirs.block).bool()
    return expand_grid(layout, theirs.block, n_q, n_k, causal)


def _pattern(ours, causal, seed):
    return ours.pattern(causal, seed=seed) if ours._random else ours.pattern(causal)


def test_patterns_are_deepspeeds_layouts_expanded_for_every_length():
    rng = random.Random(7)
    checked = 0
    for k, (name, kwargs) in enumerate(GRID):
        theirs, ours = _both(name, kwargs)
        for causal in (False, True):
            pattern = _pattern(ours, causal, k)
            for n_k in rng.sample(range(1, 13 * 16), 3):
                n_q = n_k if rng.random() < 0.7 else rng.randint(1, n_k)
                try:
                    want = _expected_mask(theirs, n_q, n_k, k, causal)
                except ValueError:
                    with pytest.raises(ValueError):
                        pattern.mask(n_q, n_k, ours.num_heads)
                    continue
                got = pattern.mask(n_q, n_k, ours.num_heads).expand_as(want)
                assert torch.equal(got, want), (name, kwargs, causal, n_q, n_k)
                checked += 1
    assert checked > 2000


@pytest.mark.parametrize("n", [64, 4096, 4096 + 16, 4096 + 48, 4096 + 64])
def test_fixed_patterns_are_analytic(n):
    """Fixed, bidirectional or causal: term patterns at every length, the built-in fixed where
    no short last window moves its global blocks, decomposed with the moved blocks as a third
    part where one does."""
    for config in (
        ds.FixedSparsityConfig(8),
        ds.FixedSparsityConfig(8, attention=UNI),
        ds.FixedSparsityConfig(8, 16, True, 8, 2, num_different_global_patterns=3),
    ):
        for causal in (False, True):
            if config.attention == UNI and not causal:
                continue
            at = config.pattern(causal).at(n)
            assert isinstance(at, P.TermPattern), (config, causal, n)
            nb, L = -(-n // config.block), config.num_local_blocks
            moved = nb % L and any(
                nb - nb % L + config._first_global(h) + config.num_global_blocks > nb
                for h in range(config.num_different_global_patterns)
            )
            assert isinstance(at.kind, P.Fixed) and (at.kind.moved is not None) == bool(moved)
            parts = plan(config.pattern(causal), n, n, 64, 64)
            assert len(parts) == (1 if n < 4096 else 3 if moved else 2), (config, n)


def test_other_patterns_are_block_grids_without_element_masks(monkeypatch):
    """Block-granular edges: from_blocks patterns, laid out from the grid's cells (the element
    predicate is never evaluated for a layout, a count or a plan)."""

    def refuse(*args):
        raise AssertionError("the element mask was evaluated")

    monkeypatch.setattr(BlockPattern, "_allowed", refuse)
    n = 8192
    for config in (
        ds.BigBirdSparsityConfig(8),
        ds.BSLongformerSparsityConfig(8),
        ds.LocalSlidingWindowSparsityConfig(8),
        ds.VariableSparsityConfig(8, num_random_blocks=2),
        ds.FixedSparsityConfig(8, attention=UNI),
        ds.FixedSparsityConfig(8, horizontal_global_attention=True),
    ):
        pattern = _pattern(config, False, 3)
        assert isinstance(pattern.at(n), BlockPattern)
        assert len(plan(pattern, n, n, 64, 64)) == 1
        assert 0 < pattern.count_allowed(n) < n * n


def test_pattern_layouts_tiles_and_keys():
    for k, (name, kwargs) in enumerate(GRID[::23]):
        theirs, ours = _both(name, kwargs)
        for causal in (False, True):
            pattern = _pattern(ours, causal, k)
            n = 16 * 7 + 5
            try:
                check_layout(pattern, n, n, 32, 16, heads=ours.num_heads)
            except ValueError:  # DeepSpeed has no layout of this length
                continue
            check_layout(pattern, 40, n, 16, 64, heads=ours.num_heads)
            if isinstance(pattern.at(n), BlockPattern):
                check_tiles(pattern, n, n, 32, 16, heads=ours.num_heads)
            again = P.from_key(pattern.key)
            assert again is not pattern
            assert torch.equal(again.mask(n, n, ours.num_heads), pattern.mask(n, n, ours.num_heads))


def test_random_patterns_follow_their_seed():
    config = ds.BigBirdSparsityConfig(4, different_layout_per_head=True, num_random_blocks=2)
    a = config.pattern(seed=11).mask(256, 256, 4)
    assert torch.equal(a, config.pattern(seed=11).mask(256, 256, 4))
    assert not torch.equal(a, config.pattern(seed=12).mask(256, 256, 4))
    assert not torch.equal(a[0], a[1]), "each head draws its own blocks"
    random.seed(3)
    b = config.pattern()
    random.seed(3)
    assert torch.equal(b.mask(100, 100, 4), config.pattern().mask(100, 100, 4))
    with pytest.raises(TypeError, match="seed"):
        config.pattern(seed=1.5)
    # Concrete patterns are kept for the most recent lengths only.
    for n in range(64, 64 + P.LengthPattern.KEEP + 10):
        b.at(n)
    assert len(b._at) == P.LengthPattern.KEEP and 64 not in b._at


# --------------------------------------------------------------------------- runs
@pytest.fixture
def small_blocks(monkeypatch):
    from effattn.ops import cpu, torch_sparse

    monkeypatch.setattr(cpu, "BLOCK_M", 16)
    monkeypatch.setattr(cpu, "BLOCK_N", 16)
    monkeypatch.setattr(torch_sparse, "BLOCK", 16)


RUN_CONFIGS = [
    (ds.FixedSparsityConfig(4, num_local_blocks=2), False),
    (ds.FixedSparsityConfig(4, num_local_blocks=4, num_global_blocks=2), False),  # moved
    (ds.FixedSparsityConfig(4, block=8, num_local_blocks=8, attention=UNI), True),  # 3 parts
    (ds.FixedSparsityConfig(4, 16, True, 4, 1, UNI, num_different_global_patterns=2), True),
    (ds.FixedSparsityConfig(4, attention=UNI), False),
    (ds.BigBirdSparsityConfig(4, different_layout_per_head=True, num_random_blocks=2), False),
    (ds.BSLongformerSparsityConfig(4, global_block_indices=[1, 4]), True),
    (ds.VariableSparsityConfig(4, num_random_blocks=1, local_window_blocks=[1, 3]), False),
    (ds.LocalSlidingWindowSparsityConfig(4, num_sliding_window_blocks=8), False),
]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("config, causal", RUN_CONFIGS, ids=lambda c: repr(c)[:60])
def test_patterns_run_on_cpu_and_torch_against_the_reference(config, causal, backend, small_blocks):
    if backend == "cpu":
        pytest.importorskip("effattn._C")
    pattern = _pattern(config, causal, 4)
    n_q, n_k = 150, 168
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n_q, 24, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n_k, 24, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = torch.rand(2, n_k, generator=g) < 0.1
    results = []
    for b in (backend, "reference"):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = effattn.sparse_attention(
            *xs, pattern, key_padding_mask=kpm, backend=b, return_lse=True
        )
        finite = torch.isfinite(lse)
        (out.square().sum() + torch.where(finite, lse, 0).sum()).backward()
        results.append([out, torch.where(finite, lse, 0), *(x.grad for x in xs)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_moved_global_blocks_are_covered_exactly():
    """The fixed decomposition with the moved blocks as a third part covers the mask once, for
    classes that move and classes that do not, causal or not."""
    for causal in (False, True):
        config = ds.FixedSparsityConfig(4, 16, True, 4, 2, num_different_global_patterns=2)
        pattern = config.pattern(causal)
        for n in (16 * 5, 16 * 7, 16 * 9 + 3, 16 * 10):
            kind = pattern.at(n).kind
            args = (kind.stride, kind.summary, kind.num_patterns, causal)
            parts = _fixed_parts(*args, n, n, 16, 16, torch.device("cpu"), kind.moved)
            want = pattern.mask(n, n, 2)
            assert torch.equal(covered(pattern.at(n), parts, n, n, 2), want.int()), (causal, n)


# --------------------------------------------------------------------------- the module
def dense_deepspeed(q, k, v, layout, block, kp=None, kp_mode="add", attn=None, attn_mode="mul"):
    """DeepSpeed's SparseSelfAttention computed densely: scores scaled, key padding and
    attention masks applied in their modes, softmax over the layout's blocks."""
    L = q.shape[2]
    visible = expand_grid(layout.bool(), block, L, L, causal=False)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, float("-inf"))
    if kp is not None:
        kp = kp.to(s.dtype)[:, None, None, :]
        s = s + kp if kp_mode == "add" else s.masked_fill(kp == 0, float("-inf"))
    if attn is not None:
        attn = attn.to(s.dtype)
        s = s + attn if attn_mode == "add" else s.masked_fill(attn == 0, float("-inf"))
    # A query whose keys are all hidden: NaN in DeepSpeed, zeros in effattn (DESIGN.md).
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _qkv(b, h, n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_module_matches_deepspeeds_computation(backend, small_blocks):
    if backend == "cpu":
        pytest.importorskip("effattn._C")
    config = ds.BigBirdSparsityConfig(4, different_layout_per_head=True)
    module = ds.SparseSelfAttention(config, max_seq_length=256, backend=backend)
    random.seed(0)
    assert module.master_layout.dtype == torch.int64
    assert set(module.state_dict()) == {"master_layout"}
    q, k, v = _qkv(2, 4, 128)
    kp = torch.zeros(2, 128, dtype=torch.float64)
    kp[1, 100:] = -10000.0  # BERT's extended attention mask
    got = module(q, k.transpose(2, 3), v, key_padding_mask=kp[:, None, None, :])
    want = dense_deepspeed(q, k, v, module.get_layout(128), 16, kp)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # A window that sees padding only: DeepSpeed's softmax runs over the -10000 keys.
    local = ds.SparseSelfAttention(ds.LocalSlidingWindowSparsityConfig(4), backend=backend)
    kp2 = torch.zeros(2, 128, dtype=torch.float64)
    kp2[:, 64:] = -10000.0
    got = local(q, k, v, key_padding_mask=kp2)
    want = dense_deepspeed(q, k, v, local.get_layout(128), 16, kp2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_module_masks_in_both_modes(small_blocks):
    config = ds.FixedSparsityConfig(2, num_local_blocks=2)
    q, k, v = _qkv(2, 2, 96, seed=1)
    kp = (torch.rand(2, 96, generator=torch.Generator().manual_seed(2)) > 0.2).double()
    causal = torch.ones(96, 96, dtype=torch.float64).tril()
    other = (torch.rand(96, 96, generator=torch.Generator().manual_seed(3)) > 0.3).double()
    other.fill_diagonal_(1)
    for kp_mode, attn_mode in itertools.product(("add", "mul"), ("add", "mul")):
        module = ds.SparseSelfAttention(config, kp_mode, attn_mode, max_seq_length=128)
        kp_in = torch.where(kp == 1, 0.0, float("-inf")) if kp_mode == "add" else kp
        for attn in (causal, other):
            attn_in = torch.where(attn == 1, 0.0, float("-inf")) if attn_mode == "add" else attn
            got = module(q, k, v, key_padding_mask=kp_in, attn_mask=attn_in)
            want = dense_deepspeed(
                q, k, v, module.get_layout(96), 16, kp_in, kp_mode, attn_in, attn_mode
            )
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # A causal attn_mask keeps the analytic pattern (the built-in fixed, decomposed).
    module = ds.SparseSelfAttention(config, max_seq_length=128)
    module(q, k, v, attn_mask=causal)
    (pattern,) = module._patterns.values()
    assert not pattern.is_custom and isinstance(pattern.kind, P.Fixed) and pattern.kind.causal


def test_module_follows_a_loaded_layout():
    config = ds.LocalSlidingWindowSparsityConfig(2, num_sliding_window_blocks=1)
    module = ds.SparseSelfAttention(config, max_seq_length=64)
    q, k, v = _qkv(1, 2, 64, seed=4)
    first = module(q, k, v)
    other = ds.SparseSelfAttention(ds.DenseSparsityConfig(2), max_seq_length=64)
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module(q, k, v), dense_deepspeed(q, k, v, other.get_layout(64), 16))
    assert not torch.allclose(first, module(q, k, v))


def test_module_refuses_what_it_cannot_compute():
    module = ds.SparseSelfAttention(ds.FixedSparsityConfig(2), max_seq_length=64)
    q, k, v = _qkv(1, 2, 64)
    with pytest.raises(NotImplementedError, match="rpe"):
        module(q, k, v, rpe=torch.zeros(1, 2, 64, 64))
    with pytest.raises(NotImplementedError, match="self-attention"):
        module(q, k[:, :, :32], v[:, :, :32])
    with pytest.raises(ValueError, match="max_seq_length"):
        module(*_qkv(1, 2, 80))
    with pytest.raises(ValueError, match="'add' mode"):
        ds.SparseSelfAttention(ds.FixedSparsityConfig(2), attn_mask_mode="add")(
            q, k, v, attn_mask=torch.full((64, 64), 0.5)
        )
    many = torch.arange(64, dtype=torch.float64).view(1, 64) / 10
    with pytest.raises(ValueError, match="distinct"):
        module(q, k, v, key_padding_mask=many)
    with pytest.raises(ValueError, match="key_padding_mask_mode"):
        ds.SparseSelfAttention(ds.FixedSparsityConfig(2), key_padding_mask_mode="max")
    with pytest.raises(TypeError, match="SparsityConfig"):
        ds.SparseSelfAttention(oracle.FixedSparsityConfig(2))


def test_far_apart_key_biases_skip_their_pass(monkeypatch):
    """A -1e9 padding value cannot change any output next to 0-biased keys: one kernel pass."""
    calls = []
    real = effattn.functional.sparse_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(effattn.functional, "sparse_attention", counting)
    module = ds.SparseSelfAttention(ds.FixedSparsityConfig(2), max_seq_length=64)
    q, k, v = _qkv(1, 2, 64)
    kp = torch.zeros(1, 64, dtype=torch.float64)
    kp[0, 40:] = -1e9
    got = module(q, k, v, key_padding_mask=kp)
    assert len(calls) == 1
    want = dense_deepspeed(q, k, v, module.get_layout(64), 16, kp)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert math.isfinite(float(got.abs().max()))


def test_bench_script_runs_and_reports():
    """bench/compat_patterns.py on a tiny size: every case timed in both passes, each ratio
    against its baseline, the standard header."""
    pytest.importorskip("effattn._C")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import common
    import compat_patterns

    doc = compat_patterns.run(n=256, repeats=1)
    assert common.is_result(doc) and doc["family"] == "compat_patterns"
    assert {(r["pattern"], r["pass"]) for r in doc["rows"]} == {
        (name, p) for name in compat_patterns.cases(256)[0] for p in compat_patterns.PASSES
    }
    assert len(doc["ratios"]) == 2 * len(compat_patterns.cases(256)[1])
    assert "target <= 0.7" in compat_patterns.table(doc)


def test_block_grid_and_moved_fixed_on_triton(monkeypatch):
    """Tiles of a block grid and the moved-blocks part on the Triton kernels (interpreter)."""
    pytest.importorskip("triton")
    from effattn.ops import triton_sparse

    if not (torch.cuda.is_available() or triton_sparse._interpreting()):
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_sparse, "BLOCKS_OVERRIDE", (16, 16))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 208, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for pattern in (
        ds.BigBirdSparsityConfig(2, block=8, num_random_blocks=2).pattern(seed=1),
        ds.FixedSparsityConfig(2, block=8, num_local_blocks=8).pattern(),
    ):
        got = effattn.sparse_attention(q, k, v, pattern, backend="triton")
        want = effattn.sparse_attention(q, k, v, pattern, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert len(plan(pattern, 208, 208, 16, 16)) == 3, "the moved blocks' part ran"
