"""The backend contract (effattn.ops.backend) and how backend= picks a backend (ops.dispatch)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import effattn
from effattn import patterns as P
from effattn import reference
from effattn.ops import dispatch
from effattn.ops.backend import Backend, UnsupportedDtypeError, UnsupportedError


def _qkv(n=24, d=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g, dtype=dtype).to(device) for _ in range(3)]


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu", "torch"])
def test_every_backend_declares_its_capabilities(name):
    backend = dispatch.get(name)
    assert isinstance(backend, Backend) and backend.name == name
    assert backend.ops <= {"sparse", "xl"} and backend.devices <= {"cpu", "cuda"}
    lo, hi = backend.head_dims
    assert 16 <= lo <= hi <= 256
    assert dispatch.get(name) is backend, "one instance per process"
    why = backend.unavailable()
    assert why is None or (isinstance(why, str) and why)
    assert (name in dispatch.available()) == (why is None)


def test_a_named_backend_that_cannot_serve_names_its_reasons():
    q, k, v = _qkv()
    with pytest.raises(UnsupportedError, match=r"backend 'cuda' cannot serve[\s\S]*cuda:"):
        effattn.sparse_attention(q, k, v, P.causal(), backend="cuda")


def test_reasons_cover_device_dtype_and_head_dim():
    cpu = dispatch.get("cpu")
    meta = torch.empty(1, 1, 4, 16, device="meta")
    assert any("meta" in r.text for r in cpu.not_supported_reasons("sparse", meta, meta))
    cuda = dispatch.CudaBackend()
    x = torch.zeros(1, 1, 4, 200, dtype=torch.float32)
    texts = [r.text for r in Backend.not_supported_reasons(cuda, "sparse", x, x)]
    if cuda.unavailable() is None:
        assert any("float32" in t for t in texts) and any("D=200" in t for t in texts)


def test_only_dtype_reasons_raise_a_type_error_too(monkeypatch):
    monkeypatch.setattr(dispatch.CudaBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(dispatch.CudaBackend, "devices", frozenset({"cpu", "cuda"}))
    q, k, v = _qkv()
    with pytest.raises(UnsupportedDtypeError, match="float32") as info:
        effattn.sparse_attention(q, k, v, P.causal(), backend="cuda")
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_auto_with_no_backend_for_the_device_lists_why():
    meta = torch.empty(1, 1, 4, 16, device="meta")
    with pytest.raises(UnsupportedError, match="no backend takes tensors on meta"):
        dispatch.select("auto", "sparse", meta, meta, key_mask=False)


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch.CpuBackend, "unavailable", lambda self: "not built (test)")
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match=r"blockwise 'torch' backend[\s\S]*not built \(test\)"):
        out = effattn.sparse_attention(q, k, v, P.strided(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        effattn.sparse_attention(q, k, v, P.strided(4))  # once per process
        effattn.sparse_attention(q, k, v, P.strided(4), backend="torch")  # asked for: silent
    assert effattn.functional.backend_for("sparse", q, k) == "torch"
    torch.testing.assert_close(out, reference.attention(q, k, v, P.strided(4)))


def test_backend_for_says_what_serves():
    q, k, _ = _qkv()
    want = "cpu" if "cpu" in effattn.backends() else "torch"
    assert effattn.functional.backend_for("sparse", q, k) == want
    assert effattn.functional.backend_for("xl", q, k, backend="torch") == "torch"
    with pytest.raises(ValueError, match="op must be"):
        effattn.functional.backend_for("dense", q, k)


def test_a_cpu_call_never_imports_triton():
    code = (
        "import sys, torch, effattn\n"
        "from effattn import patterns as P\n"
        "q = torch.randn(1, 2, 64, 32)\n"
        "effattn.sparse_attention(q, q, q, P.strided(8)).sum()\n"
        "r, u = torch.randn(2, 8, 32), torch.randn(2, 32)\n"
        "effattn.xl_attention(q, q, q, r, u, u)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", [n for n in ("cpu", "torch", "triton") if n in effattn.backends()])
def test_gradients_come_back_in_the_accumulation_dtype(name):
    """One gradient rule: a part's gradients stay fp32 for 16-bit inputs (summed, then rounded
    once by the executor)."""
    backend = dispatch.get(name)
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(n=32))
    lse = torch.zeros(1, 2, 32)
    grads = backend.sparse_backward(
        q, k, v, q, lse, lse, lambda bm, bn: P.causal().layout(32, 32, bm, bn), scale=0.25
    )
    if name != "cpu":  # the C++ bridge's change lands separately
        assert all(g.dtype == torch.float32 for g in grads)
