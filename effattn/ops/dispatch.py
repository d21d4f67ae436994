"""The backends, and how ``backend=`` picks one of them for given inputs.

Each backend below declares its capabilities (:class:`effattn.ops.backend.Backend` fields) and
says why it cannot serve given inputs; its kernels live in the modules it names, imported only
when it is first asked (a CPU call never imports Triton). ``backend="auto"`` takes, for the
inputs' device, the first backend of :data:`AUTO_ORDER` that can serve them; a named backend
that cannot serve them, or an "auto" that finds none, raises one error listing every reason.

======== ======================================= ==========================================
name      kernels                                 serves
======== ======================================= ==========================================
triton    ops/triton_sparse.py, ops/triton_xl.py  CUDA tensors; CPU ones in the interpreter
cuda      ops/cuda.py (csrc/cuda)                 CUDA fp16 / bf16, sm_80+; by name only
cpu       ops/cpu.py (csrc/cpu)                   CPU tensors
torch     ops/torch_sparse.py, ops/torch_xl.py    any device: blockwise PyTorch, the readable
                                                  statement of the contract; slow
======== ======================================= ==========================================

"reference" (the dense oracle, :mod:`effattn.reference`) is not a backend: the public
functions run it directly when asked for by name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

from effattn import _extension
from effattn.ops.backend import Backend, Reason, UnsupportedDtypeError, UnsupportedError

__all__ = ["AUTO_ORDER", "NAMES", "available", "get", "select"]


def _load(module: str):
    return importlib.import_module(module)


def _as_reason(check, *args) -> list[Reason]:
    """The error a kernel module's own check raises, as a reason."""
    try:
        check(*args)
    except TypeError as e:
        return [Reason(str(e), dtype=True)]
    except ValueError as e:
        return [Reason(str(e))]
    return []


class TorchBackend(Backend):
    """Blockwise PyTorch: any device and dtype, memory O(block x visited keys)."""

    name = "torch"

    def plan_blocks(self, q):
        return _load("effattn.ops.torch_sparse").plan_blocks(q)

    def sparse_forward(self, q, k, v, layout_fn, *, scale, key_mask=None, state=None):
        return _load("effattn.ops.torch_sparse").sparse_forward(
            q, k, v, layout_fn, scale=scale, key_mask=key_mask
        )

    def sparse_backward(self, q, k, v, dout, lse, delta, layout_fn, *, scale, key_mask=None):
        return _load("effattn.ops.torch_sparse").sparse_backward(
            q, k, v, dout, lse, delta, layout_fn, scale=scale, key_mask=key_mask
        )

    def xl_forward(self, q, k, v, r, u, vb, *, scale, window):
        return _load("effattn.ops.torch_xl").xl_forward(
            q, k, v, r, u, vb, scale=scale, window=window
        )

    def xl_backward(self, q, k, v, r, u, vb, out, dout, lse, delta, *, scale, window):
        return _load("effattn.ops.torch_xl").xl_backward(
            q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window
        )


class CpuBackend(Backend):
    """The C++ CPU kernels of effattn._C; fp16 / bf16 inputs are computed in fp32."""

    name = "cpu"
    devices = frozenset({"cpu"})
    joins = True

    def unavailable(self):
        if _extension.has_cpu():
            return None
        return _extension.load_error or "effattn._C was built without the CPU kernels"

    def _kernels(self):
        return _load("effattn.ops.cpu")

    def plan_blocks(self, q):
        return self._kernels().plan_blocks(q)

    def sparse_forward(self, q, k, v, layout_fn, *, scale, key_mask=None, state=None):
        return self._kernels().run_sparse_forward(
            q, k, v, layout_fn, scale=scale, key_mask=key_mask, state=state
        )

    def sparse_backward(self, q, k, v, dout, lse, delta, layout_fn, *, scale, key_mask=None):
        return self._kernels().run_sparse_backward(
            q, k, v, dout, lse, delta, layout_fn, scale=scale, key_mask=key_mask
        )

    def xl_forward(self, q, k, v, r, u, vb, *, scale, window):
        return self._kernels().run_xl_forward(q, k, v, r, u, vb, scale=scale, window=window)

    def xl_backward(self, q, k, v, r, u, vb, out, dout, lse, delta, *, scale, window):
        return self._kernels().run_xl_backward(
            q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window
        )


class TritonBackend(Backend):
    """Triton kernels: CUDA tensors, or CPU tensors in Triton's interpreter (fp64 there only)."""

    name = "triton"

    def unavailable(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=1)"
        return None

    def reasons(self, op, q, k):
        if op == "sparse":
            return _as_reason(_load("effattn.ops.triton_sparse").check, q, k, k)
        return _as_reason(_load("effattn.ops.triton_xl").xl_check, q)

    def plan_blocks(self, q):
        return _load("effattn.ops.triton_sparse").plan_blocks(q)

    def sparse_forward(self, q, k, v, layout_fn, *, scale, key_mask=None, state=None):
        return _load("effattn.ops.triton_sparse").sparse_forward(
            q, k, v, layout_fn, scale=scale, key_mask=key_mask
        )

    def sparse_backward(self, q, k, v, dout, lse, delta, layout_fn, *, scale, key_mask=None):
        return _load("effattn.ops.triton_sparse").sparse_backward(
            q, k, v, dout, lse, delta, layout_fn, scale=scale, key_mask=key_mask
        )

    def xl_forward(self, q, k, v, r, u, vb, *, scale, window):
        return _load("effattn.ops.triton_xl").xl_forward(
            q, k, v, r, u, vb, scale=scale, window=window
        )

    def xl_backward(self, q, k, v, r, u, vb, out, dout, lse, delta, *, scale, window):
        return _load("effattn.ops.triton_xl").xl_backward(
            q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window
        )


class CudaBackend(Backend):
    """CUDA C++ tensor-core kernels (csrc/cuda): fp16 / bf16 on sm_80+, head dims up to 128.

    ``auto`` never picks it until a GPU session has run tests/test_cuda.py green: it was built
    and emulated on CPUs only.
    """

    name = "cuda"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = (16, 128)
    auto = False

    def unavailable(self):
        if not _extension.has_cuda():
            return _extension.load_error or (
                "effattn._C was built without its CUDA part (reinstall with EFFATTN_CUDA=1)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def _kernels(self):
        return _load("effattn.ops.cuda")

    def reasons(self, op, q, k):
        if op == "sparse":
            return _as_reason(self._kernels().check, q, k, k)
        return _as_reason(self._kernels().xl_check, q)

    def plan_blocks(self, q):
        return self._kernels().plan_blocks(q)

    def sparse_forward(self, q, k, v, layout_fn, *, scale, key_mask=None, state=None):
        return self._kernels().sparse_forward(q, k, v, layout_fn, scale=scale, key_mask=key_mask)

    def sparse_backward(self, q, k, v, dout, lse, delta, layout_fn, *, scale, key_mask=None):
        return self._kernels().sparse_backward(
            q, k, v, dout, lse, delta, layout_fn, scale=scale, key_mask=key_mask
        )

    def xl_forward(self, q, k, v, r, u, vb, *, scale, window):
        return self._kernels().xl_forward(q, k, v, r, u, vb, scale=scale, window=window)

    def xl_backward(self, q, k, v, r, u, vb, out, dout, lse, delta, *, scale, window):
        return self._kernels().xl_backward(
            q, k, v, r, u, vb, out, dout, lse, delta, scale=scale, window=window
        )


_BACKENDS: dict[str, type[Backend]] = {
    "triton": TritonBackend,
    "cuda": CudaBackend,
    "cpu": CpuBackend,
    "torch": TorchBackend,
}
NAMES = ("auto", "reference", *_BACKENDS)
"""Every accepted ``backend=`` string."""

AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "torch")}
"""Per device type, the backends ``backend="auto"`` tries, in order (those with auto=True)."""

# The blockwise path, measured against the C++ kernels on CPU: a fallback to it is never silent.
_SLOW_FALLBACK = {"torch": "about 180x slower than the C++ CPU kernels"}
_warned: set[str] = set()


@functools.cache
def get(name: str) -> Backend:
    """The backend called ``name`` (one instance per process)."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    return _BACKENDS[name]()


def available() -> list[str]:
    """Names of the backends that can run in this process, then "reference"."""
    names = [name for name in _BACKENDS if get(name).unavailable() is None]
    return [*names, "reference"]


def _error(what: str, reasons: dict[str, list[Reason]]) -> UnsupportedError:
    lines = [f"  {name}: {'; '.join(r.text for r in rs)}" for name, rs in reasons.items()]
    all_dtype = all(r.dtype for rs in reasons.values() for r in rs)
    cls = UnsupportedDtypeError if all_dtype else UnsupportedError
    return cls(f"{what}:\n" + "\n".join(lines))


def select(name: str, op: str, q: torch.Tensor, k: torch.Tensor, *, key_mask: bool) -> Backend:
    """The backend that serves ``op`` on q [B, H, n_q, D], k [B, Hkv, n_k, D] for ``name``.

    Raises UnsupportedError (a ValueError; also a TypeError when only dtypes are at fault)
    listing each candidate's reasons when none can serve.
    """
    if name != "auto":
        backend = get(name)
        reasons = backend.not_supported_reasons(op, q, k, key_mask=key_mask)
        if reasons:
            raise _error(f"backend {name!r} cannot serve these inputs", {name: reasons})
        return backend
    order = AUTO_ORDER.get(q.device.type, ())
    tried: dict[str, list[Reason]] = {}
    for candidate in order:
        backend = get(candidate)
        if not backend.auto:
            tried[candidate] = [Reason("backend='auto' does not pick it; ask for it by name")]
            continue
        reasons = backend.not_supported_reasons(op, q, k, key_mask=key_mask)
        if not reasons:
            _warn_fallback(candidate, tried)
            return backend
        tried[candidate] = reasons
    if not order:
        tried["auto"] = [Reason(f"no backend takes tensors on {q.device.type}")]
    raise _error(f"no backend can serve these {op} attention inputs", tried)


def _warn_fallback(name: str, tried: dict[str, list[Reason]]) -> None:
    if name not in _SLOW_FALLBACK or name in _warned or not tried:
        return
    _warned.add(name)
    why = "; ".join(f"{n}: {'; '.join(r.text for r in rs)}" for n, rs in tried.items())
    warnings.warn(
        f"effattn: running the blockwise {name!r} backend, {_SLOW_FALLBACK[name]}, because "
        f"the faster ones cannot serve ({why}). Pass backend={name!r} to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
