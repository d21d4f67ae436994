"""The constants of csrc/constants.h agree with every other view of them.

csrc/constants.h defines the packed term layout (field order and count), the group relation
codes and the dtype codes once for the C++ and CUDA kernels; the extension and the CUDA emulator
export them (effattn._C.TERM_FIELDS, ...). Python code that must run without the extension keeps
its own definitions (effattn.patterns.Term and GROUP_*, which the Triton and torch kernels read),
checked here twice: against the exported values, and by evaluating the same terms in every
backend's predicate (torch, Triton, the C++ CPU kernels forward and backward, the CUDA kernels
in the emulator and, with a GPU, on it) against ``Term.allowed``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools

import pytest
import torch

from effattn import _extension, patterns
from effattn.ops import cuda as cuda_ops
from effattn.ops import torch_sparse
from effattn.patterns import GROUP_EQ, GROUP_LT, GROUP_NE, Term, TermPattern

N = 64  # queries and keys of the probes: one 64 x 64 block of the CUDA kernels

# Terms in which every field matters (test_probes_tell_every_field_apart), one head class each,
# the last an OR of two terms (the others are padded with never-allowing terms).
PROBES = (
    (Term(lo=-5, hi=20),),
    (Term(lo=0, mod=3),),
    (Term(lo=-30, hi=40, mod=5),),
    (Term(gq=8, gk=4, grel=GROUP_EQ),),
    (Term(lo=-60, gq=12, gk=5, grel=GROUP_LT),),
    (Term(gq=6, gk=10, grel=GROUP_NE),),
    (Term(smod=7, smin=2, smax=4),),
    (Term(lo=-3, hi=30, mod=2, gq=16, gk=8, grel=GROUP_NE, smod=5, smin=1, smax=3),),
    (Term(lo=0, hi=3), Term(lo=-9, smod=9, smin=0, smax=1)),
)
PROBE = TermPattern("probes", PROBES)
H = len(PROBES)


@pytest.fixture(scope="module")
def ext():
    mod = _extension.load()
    assert mod is not None, _extension.load_error
    return mod


def _term_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Term))


def _expected() -> torch.Tensor:
    """[H, N, N]: what each probe class allows, by Term.allowed."""
    return PROBE.mask(N, N, num_heads=H)


# --------------------------------------------------------------------------- exported values
def test_term_layout_matches_the_extension(ext, emu):
    names = _term_fields()
    assert ext.TERM_FIELDS == names
    assert emu.TERM_FIELDS == names
    assert Term.NUM_FIELDS == len(names)
    # as_tuple packs in field order (what Term(*row) unpacks).
    assert Term(*range(len(names))).as_tuple() == tuple(range(len(names)))
    layout = PROBE.layout(N, N)
    assert layout.terms.shape[-1] == len(names)


def test_group_codes_match_the_extension(ext, emu):
    ours = {"GROUP_EQ": GROUP_EQ, "GROUP_LT": GROUP_LT, "GROUP_NE": GROUP_NE}
    assert len(set(ours.values())) == 3
    for name, code in ours.items():
        assert getattr(ext, name) == code == getattr(patterns, name)
        assert getattr(emu, name) == code


def test_dtype_codes(ext, emu):
    codes = ext.DTYPE_CODES
    assert emu.DTYPE_CODES == codes
    assert len(set(codes.values())) == len(codes)
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in codes)
    if _extension.has_cpu():
        from effattn.ops import cpu

        assert cpu._dtype_codes() == {
            torch.float32: codes["float32"],
            torch.float64: codes["float64"],
        }
    assert cuda_ops._dtype_code(torch.float16) == codes["float16"]
    assert cuda_ops._dtype_code(torch.bfloat16) == codes["bfloat16"]


def test_cuda_block_and_head_dims(ext, emu):
    for mod in (emu, ext) if ext.with_cuda else (emu,):
        assert mod.CUDA_BLOCK == cuda_ops.BLOCK
        assert mod.CUDA_HEAD_DIMS == cuda_ops.HEAD_DIMS


# --------------------------------------------------------------------------- predicates
def test_probes_tell_every_field_apart():
    """Reading any two fields at each other's offsets changes what some probe allows, so the
    predicate tests below catch a view whose field order differs."""
    p, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    want = _expected()
    for a, b in itertools.combinations(range(Term.NUM_FIELDS), 2):
        swapped = []
        for terms in PROBES:
            m = torch.zeros(N, N, dtype=torch.bool)
            for t in terms:
                row = list(t.as_tuple())
                row[a], row[b] = row[b], row[a]
                try:
                    m |= Term(*row).allowed(p, j)
                except RuntimeError:  # e.g. a zero group width: surely no longer the same
                    m = None
                    break
            swapped.append(m)
        assert any(m is None or not torch.equal(m, w) for m, w in zip(swapped, want)), (a, b)


def test_torch_predicate():
    layout = PROBE.layout(N, N)
    p, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    got = torch.stack([torch_sparse.terms_allowed(layout.terms[c], p, j) for c in range(H)])
    assert torch.equal(got, _expected())


HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    from effattn.ops.triton_sparse import _pattern_allowed

    @triton.jit
    def _triton_probe(Terms, Out, NUM_TERMS: tl.constexpr, N: tl.constexpr):
        c = tl.program_id(0)
        p = tl.arange(0, N)[:, None]
        j = tl.arange(0, N)[None, :]
        ok = _pattern_allowed(Out, p * N + j, Terms, c, p, j, NUM_TERMS, True, True, True, False)
        tl.store(Out + c * N * N + p * N + j, ok.to(tl.int8))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_predicate():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    terms = PROBE.layout(N, N).terms.to(device=device, dtype=torch.int32).contiguous()
    out = torch.zeros(H, N, N, dtype=torch.int8, device=device)
    _triton_probe[(H,)](terms, out, terms.shape[1], N)
    assert torch.equal(out.cpu().bool(), _expected())


def _probe_inputs(dtype):
    """q = k = 0 and v = dout = I: every allowed score is 0, so out [h, i, :] holds
    allowed / count along the keys, and dv [h, j, :] the same along the queries."""
    zeros = torch.zeros(1, H, N, N, dtype=dtype)
    eye = torch.eye(N, dtype=dtype).expand(1, H, N, N).contiguous()
    count = _expected().sum(-1).to(torch.float64)
    lse = torch.log(count).unsqueeze(0)  # -inf where a query sees nothing
    return zeros, eye, lse


def _check_probe_results(out, dv):
    want = _expected()
    assert torch.equal(out[0] > 0, want), "forward"
    assert torch.equal(dv[0].mT > 0, want), "backward"
    count = want.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(out[0].double(), want / count.double(), rtol=1e-3, atol=0)


@pytest.mark.skipif(not _extension.has_cpu(), reason="C++ CPU kernels not built")
@pytest.mark.parametrize("block", [16, 64])
def test_cpu_predicate(block, monkeypatch):
    from effattn.ops import cpu

    monkeypatch.setattr(cpu, "BLOCK_M", block)
    monkeypatch.setattr(cpu, "BLOCK_N", block)
    zeros, eye, lse = _probe_inputs(torch.float64)
    layout_fn = lambda bm, bn: PROBE.layout(N, N, bm, bn)
    out, got_lse = cpu.sparse_forward(zeros, zeros, eye, layout_fn, scale=1.0)
    torch.testing.assert_close(got_lse, lse)
    delta = torch.zeros(1, H, N, dtype=torch.float64)
    _, _, dv = cpu.sparse_backward(zeros, zeros, eye, eye, lse, delta, layout_fn, scale=1.0)
    _check_probe_results(out, dv)


def _cuda_probe(lib, stream, device):
    zeros, eye, lse = (t.to(device) for t in _probe_inputs(torch.float16))
    layout = PROBE.layout(N, N, cuda_ops.BLOCK, cuda_ops.BLOCK, device=device)
    out, got_lse = cuda_ops.run_sparse_forward(lib, stream, zeros, zeros, eye, layout, scale=1.0)
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(got_lse), finite)
    assert (got_lse[finite].double() - lse[finite]).abs().max() < 1e-5
    delta = torch.zeros(1, H, N, device=device)
    _, _, dv = cuda_ops.run_sparse_backward(
        lib, stream, zeros, zeros, eye, eye, lse.float(), delta, layout, scale=1.0
    )
    _check_probe_results(out.cpu(), dv.cpu())


def test_cuda_predicate_emulated(emu):
    _cuda_probe(emu, 0, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_predicate_on_gpu(ext):
    assert ext.with_cuda, "a CUDA device is present but effattn._C has no CUDA kernels"
    with torch.cuda.device(0):
        _cuda_probe(ext, torch.cuda.current_stream().cuda_stream, "cuda")
        torch.cuda.synchronize()
