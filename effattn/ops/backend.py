"""The backend contract: what every attention backend declares, answers and implements.

A backend serves one or both ops (``"sparse"``: block-sparse attention over one part of a plan;
``"xl"``: Transformer-XL relative attention) on some devices, dtypes and head dims. It declares
that in class fields, answers :meth:`Backend.not_supported_reasons` for concrete inputs (empty:
it can serve them), and implements the kernels of the ops it serves. The dispatcher
(:mod:`effattn.ops.dispatch`) picks a backend by those answers; the plan executor
(:mod:`effattn.execute`) and the custom ops (:mod:`effattn.functional`) call the kernels.

Kernel conventions (every backend, checked against :mod:`effattn.reference` in the tests):

- ``q`` [B, H, n_q, D], ``k`` / ``v`` [B, Hkv, n_k, D], H % Hkv == 0 (grouped-query attention);
  query row i at absolute position ``layout.q_offset + i``; head h follows layout class
  ``h % layout.num_classes``. ``key_mask``: None or bool broadcastable to [B, H, n_k], True =
  the key is hidden (whatever it holds, it never changes an output).
- ``sparse_forward`` returns out [B, H, n_q, D] (q's dtype, or the accumulation dtype) and lse
  [B, H, n_q] in the accumulation dtype (:func:`acc_dtype`), natural log; a query with no
  visible key gets a zero row and lse -inf. A backend with ``joins`` also takes
  ``state=(out, lse)``: views in the accumulation dtype holding the result over a disjoint key
  set, which it extends to the union in place (a plan's later parts then need no merge).
- ``sparse_backward`` takes the *merged* lse and delta = rowsum(dout * out) - dlse of the whole
  plan, so that each part's gradients are its share of the full softmax's; rows whose lse is
  +-inf contribute nothing. It returns dq, dk, dv in the accumulation dtype: the executor sums
  a plan's parts there and rounds once (one gradient rule for every backend).
- ``xl_forward`` / ``xl_backward``: semantics of :func:`effattn.reference.xl_attention`;
  ``xl_backward`` returns (dq, dk, dv, dr, du, dvb), rounded by the caller.

Inputs reach the kernels validated (:mod:`effattn._validation`, then the reasons below), once
per call: kernels do not check them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch

if TYPE_CHECKING:
    from effattn.patterns import BlockLayout

__all__ = ["Backend", "Reason", "UnsupportedDtypeError", "UnsupportedError", "acc_dtype"]

LayoutFn = Callable[[int, int], "BlockLayout"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and return LSE and gradients in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Reason(NamedTuple):
    """Why a backend cannot serve some inputs; ``dtype`` marks reasons about dtypes only."""

    text: str
    dtype: bool = False


class UnsupportedError(ValueError):
    """No backend (or not the one asked for) can serve the inputs; the message says why."""


class UnsupportedDtypeError(UnsupportedError, TypeError):
    """As :class:`UnsupportedError`, when every reason is about the inputs' dtype."""


class Backend:
    """Base class of the backends. Subclasses set the class fields and the kernels they serve.

    Fields:
        name: the ``backend=`` string.
        ops: the ops served, among "sparse" and "xl".
        devices: device types served ("cpu", "cuda").
        dtypes: input dtypes served (on every device in ``devices``; a backend narrows that in
            :meth:`reasons`).
        head_dims: (min, max) head dim served, inclusive.
        key_mask: whether sparse_forward / sparse_backward take ``key_mask``.
        joins: whether sparse_forward takes ``state`` (see the module docstring).
        auto: whether ``backend="auto"`` may pick it.
        decode, dropout, distributed: capabilities still to come; False until a backend has them.
    """

    name: ClassVar[str]
    ops: ClassVar[frozenset[str]] = frozenset({"sparse", "xl"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(
        {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    )
    head_dims: ClassVar[tuple[int, int]] = (16, 256)
    key_mask: ClassVar[bool] = True
    joins: ClassVar[bool] = False
    auto: ClassVar[bool] = True
    decode: ClassVar[bool] = False
    dropout: ClassVar[bool] = False
    distributed: ClassVar[bool] = False

    # ----------------------------------------------------------------- capability answers
    def unavailable(self) -> str | None:
        """Why this backend cannot run in this process at all (None when it can)."""
        return None

    def reasons(self, op: str, q: torch.Tensor, k: torch.Tensor) -> list[Reason]:
        """Backend-specific reasons beyond the declared fields (override to narrow them)."""
        return []

    def not_supported_reasons(
        self, op: str, q: torch.Tensor, k: torch.Tensor, *, key_mask: bool = False
    ) -> list[Reason]:
        """Why this backend cannot serve ``op`` on these (validated) inputs; empty if it can.

        Args:
            op: "sparse" or "xl".
            q: [B, H, n_q, D]; k: [B, Hkv, n_k, D] (only metadata is read).
            key_mask: whether the call has a key mask.
        """
        why = self.unavailable()
        if why is not None:
            return [Reason(why)]
        out = []
        if op not in self.ops:
            out.append(Reason(f"it does not implement {op} attention"))
        if q.device.type not in self.devices:
            out.append(Reason(f"it takes tensors on {sorted(self.devices)}, not {q.device.type}"))
        if q.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            out.append(Reason(f"it takes {names}, not {q.dtype}", dtype=True))
        lo, hi = self.head_dims
        if not lo <= q.shape[-1] <= hi:
            out.append(Reason(f"it takes head dims {lo} <= D <= {hi}, not D={q.shape[-1]}"))
        if key_mask and not self.key_mask:
            out.append(Reason("it takes no key mask"))
        if not out:
            out.extend(self.reasons(op, q, k))
        return out

    # ----------------------------------------------------------------- kernels
    def plan_blocks(self, q: torch.Tensor) -> tuple[int, int]:
        """(block_m, block_n) of the forward kernel for q: they choose the plan."""
        raise NotImplementedError

    def sparse_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout_fn: LayoutFn,
        *,
        scale: float,
        key_mask: torch.Tensor | None = None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward of one plan part: (out [B, H, n_q, D], lse [B, H, n_q]); see the module."""
        raise NotImplementedError

    def sparse_backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dout: torch.Tensor,
        lse: torch.Tensor,
        delta: torch.Tensor,
        layout_fn: LayoutFn,
        *,
        scale: float,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients (dq, dk, dv) of one plan part in the accumulation dtype.

        dout [B, H, n_q, D]; lse, delta [B, H, n_q] of the whole plan (see the module).
        """
        raise NotImplementedError

    def xl_forward(self, q, k, v, r, u, vb, *, scale: float, window: int | None):
        """Transformer-XL forward: (out [B, H, L, D], lse [B, H, L]).

        q [B, H, L, D]; k, v [B, Hkv, M + L, D]; r [H, R, D]; u, vb [H, D].
        """
        raise NotImplementedError

    def xl_backward(
        self, q, k, v, r, u, vb, out, dout, lse, delta, *, scale: float, window: int | None
    ):
        """Transformer-XL backward: (dq, dk, dv, dr, du, dvb) shaped like q, k, v, r, u, vb.

        out, dout [B, H, L, D]; lse, delta [B, H, L], delta = rowsum(dout * out) - dlse.
        """
        raise NotImplementedError
