"""Argument checks of the public functions, made once per call before any backend runs.

Each check raises a TypeError (wrong kind of value) or ValueError (right kind, wrong value) that
names the argument and what was expected. Backends then only answer what they cannot serve
(:meth:`effattn.ops.backend.Backend.not_supported_reasons`); kernels trust their inputs.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "check_backend",
    "check_dtype",
    "check_key_padding_mask",
    "check_qkv",
    "check_scale",
    "check_xl",
]

# Head dims the kernels take (the reference takes any).
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v) -> None:
    """q [B, H, Nq, D], k and v [B, Hkv, Nk, D]: tensors, H % Hkv == 0, Nq <= Nk, one dtype
    and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q has more rows ({q.shape[2]}) than k has keys ({k.shape[2]}): queries are "
            "aligned to the end of the keys"
        )
    if len({q.dtype, k.dtype, v.dtype}) > 1 or len({q.device, k.device, v.device}) > 1:
        raise ValueError(
            f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )


def check_dtype(q: torch.Tensor, backend: str) -> None:
    """A floating dtype the kernels take, and (but for the reference) a head dim they take."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must be fp16, bf16, fp32 or fp64, got {q.dtype}")
    if backend != "reference" and not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D={q.shape[-1]} is not supported: the kernels take "
            f"{MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM} (backend='reference' takes any)"
        )


def check_backend(backend, names: tuple[str, ...]) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    return backend


def check_scale(scale, head_dim: int) -> float:
    """The score scale as a finite Python float: None gives D ** -0.5; ints, floats, numpy
    scalars and 0-d tensors are taken by value."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(
                f"scale must be a float, None or a 0-d real tensor, got a tensor of shape "
                f"{tuple(scale.shape)} and dtype {scale.dtype}"
            )
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_key_padding_mask(kpm, q: torch.Tensor, k: torch.Tensor) -> None:
    """None, or bool [B, Nk] on q's device (True = ignore that key)."""
    if kpm is None:
        return
    if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
        got = getattr(kpm, "dtype", type(kpm).__name__)
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Nk], got {got}")
    if kpm.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must have shape [B, Nk] = {[k.shape[0], k.shape[2]]}, "
            f"got {list(kpm.shape)}"
        )
    if kpm.device != q.device:
        raise ValueError(f"key_padding_mask is on {kpm.device}, q on {q.device}")


def check_xl(q: torch.Tensor, r, u, vb, window) -> None:
    """r [H, R >= 1, D], u and vb [H, D] like q; window None or an int >= 1."""
    h, d = q.shape[1], q.shape[3]
    for name, t, dims in (("r", r, "[H, R, D]"), ("u", u, "[H, D]"), ("vb", vb, "[H, D]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if r.dim() != 3 or r.shape[0] != h or r.shape[2] != d:
        raise ValueError(f"r must be [H, R, D] = [{h}, R, {d}], got shape {tuple(r.shape)}")
    if r.shape[1] < 1:
        raise ValueError("r must have at least one row (distance 0), got R = 0")
    for name, t in (("u", u), ("vb", vb)):
        if t.shape != (h, d):
            raise ValueError(f"{name} must be [H, D] = [{h}, {d}], got shape {tuple(t.shape)}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (distance 0 is the query itself), got {window}")
