"""The typed bridge to the kernels (csrc/bind.h): argument classes with named fields.

effattn._C's CpuSparseArgs / CpuXlArgs and the CUDA parameter classes (in the extension when
built with CUDA, and in the emulator) are built from keyword arguments only: a required field
left out, an unknown keyword or a value of the wrong kind is a TypeError naming the field, and
each kernel refuses arguments that lack its direction's buffers, so no mistake on the Python
side reaches a kernel as a null pointer.
"""

from __future__ import annotations

import pytest
import torch

from effattn import _extension
from effattn import patterns as P
from effattn.ops import cuda as cuda_ops

pytestmark = pytest.mark.skipif(
    not _extension.has_cpu(), reason=f"C++ CPU kernels not built: {_extension.load_error}"
)


@pytest.fixture(scope="module")
def ext():
    return _extension.require()


def _cpu_sparse_kwargs():
    """Keyword arguments of a CpuSparseArgs for a causal forward, and the tensors they point
    into."""
    from effattn.ops import cpu

    q = torch.randn(1, 2, 20, 16)
    kw = cpu._common(q, q, q)
    layout, keep = cpu._layout_args(P.causal().layout(20, 20, 16, 16), 16, 16)
    out, lse = torch.empty(1, 2, 20, 16), torch.empty(1, 2, 20)
    kw.update(layout, n_q=20, n_k=20, scale=0.25)
    kw.update(out=out.data_ptr(), so=out.stride()[:3], lse=lse.data_ptr(), sl=lse.stride())
    return kw, [q, out, lse, *keep]


def test_cpu_args_read_back(ext):
    kw, keep = _cpu_sparse_kwargs()
    a = ext.CpuSparseArgs(**kw)
    assert (a.n_q, a.n_k, a.sq, a.scale) == (20, 20, keep[0].stride(), 0.25)
    assert a.q == keep[0].data_ptr() and a.key_mask == 0 and a.tiles == 0 and not a.join
    ext.cpu_sparse_forward(a)
    del keep


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=None), TypeError, "CpuSparseArgs.. missing required argument 'q'"),
        (dict(scal=1.0), TypeError, "unexpected argument 'scal'"),
        (dict(sq="1234"), TypeError, "sq must be a tuple of ints, got str"),
        (dict(sq=(1, 2, 3)), ValueError, "sq: expected 4 strides, got 3"),
        (dict(n_q=20.0), TypeError, "n_q must be an int, got float"),
        (dict(q=-1), TypeError, r"q must be an int \(address\)"),
        (dict(skm=(0, 0, 1)), TypeError, "skm and key_mask go together, got only skm"),
        (dict(dtype=7), ValueError, "dtype must be the code of float32"),
        (dict(tiles=1, kv_part_tile=1, q_part_tile=1), ValueError, "exactly one of terms"),
        (dict(threads=0), ValueError, "threads must be >= 1"),
    ],
)
def test_cpu_args_refuse_mistakes(ext, change, error, match):
    kw, _ = _cpu_sparse_kwargs()
    kw.update(change)
    with pytest.raises(error, match=match):
        ext.CpuSparseArgs(**kw)


def test_cpu_args_take_keywords_only(ext):
    with pytest.raises(TypeError, match="keyword arguments only"):
        ext.CpuSparseArgs(0)


def test_cpu_kernels_need_their_direction(ext):
    kw, keep = _cpu_sparse_kwargs()
    for name in ("out", "so"):
        del kw[name]
    with pytest.raises(ValueError, match="cpu_sparse_forward: out is required"):
        ext.cpu_sparse_forward(ext.CpuSparseArgs(**kw))
    with pytest.raises(ValueError, match="cpu_sparse_backward: dout is required"):
        ext.cpu_sparse_backward(ext.CpuSparseArgs(**kw))
    del keep


def test_cpu_xl_args(ext):
    from effattn.ops import cpu

    q, r, u = torch.randn(1, 2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 16)
    out, lse = torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8)
    a = cpu._xl_args(q, q, q, r, u, u, 0.25, None, out=out.data_ptr(), lse=lse.data_ptr())
    assert (a.L, a.N, a.R, a.window, a.sr) == (8, 8, 8, 0, r.stride())
    ext.cpu_xl_forward(a)
    with pytest.raises(ValueError, match="cpu_xl_backward: dout is required"):
        ext.cpu_xl_backward(a)
    kw = dict(cpu._common(q, q, q), L=8, N=8, R=8, u=u.data_ptr(), vb=u.data_ptr(), scale=0.25)
    kw.update(sr=r.stride(), su=u.stride(), svb=u.stride(), BM=64, BN=64)
    with pytest.raises(TypeError, match="CpuXlArgs.. missing required argument 'r'"):
        ext.CpuXlArgs(**kw)


def _cuda_sparse_fields():
    q = torch.randn(1, 2, 70, 64, dtype=torch.float16)
    layout = cuda_ops.pack_layout(P.causal().layout(70, 70, 64, 64))
    lse = torch.empty(1, 2, 70)
    return cuda_ops.sparse_params(q=q, k=q, v=q, layout=layout, scale=0.5, out=q, lse=lse)


def test_cuda_params_classes(emu):
    f = _cuda_sparse_fields()
    p = emu.CudaSparseParams(**f)
    assert p.use_tiles == 0 and p.terms == f["terms"] and p.key_mask == 0
    assert (p.o_sb, p.o_sh, p.o_sn) == (f["o_sb"], f["o_sh"], f["o_sn"])
    with pytest.raises(TypeError, match="CudaSparseParams.. missing required argument 'lse'"):
        emu.CudaSparseParams(**{k: v for k, v in f.items() if k != "lse"})
    with pytest.raises(TypeError, match="unexpected argument 'use_tiles'"):
        emu.CudaSparseParams(**f, use_tiles=1)
    with pytest.raises(TypeError, match="o_sh and out go together"):
        emu.CudaSparseParams(**{k: v for k, v in f.items() if k != "o_sh"})
    with pytest.raises(TypeError, match="CudaLaunch.. missing required argument 'stream'"):
        emu.CudaLaunch(grid_x=1, grid_y=1, threads=128, smem_bytes=0)


def test_cuda_launchers_need_their_direction(emu):
    f = _cuda_sparse_fields()
    for name in ("out", "o_sb", "o_sh", "o_sn"):
        del f[name]
    params = emu.CudaSparseParams(**f)
    launch = emu.CudaLaunch(grid_x=2, grid_y=2, threads=128, smem_bytes=0, stream=0)
    with pytest.raises(ValueError, match="cuda_sparse_forward: out is required"):
        emu.cuda_sparse_forward(params, launch)
    with pytest.raises(ValueError, match="cuda_sparse_backward_dq: dout is required"):
        emu.cuda_sparse_backward_dq(params, launch)
