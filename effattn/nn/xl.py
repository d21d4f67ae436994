"""Transformer-XL attention as a module: :class:`XLMultiheadAttention`.

Relative-position multi-head attention with a segment-level memory (Dai et al. 2019), on the
fused :func:`effattn.xl_attention`: the [L, M + L] relative-score matrix is never formed.

Layout of the original code and how to convert
----------------------------------------------
kimiyoung/transformer-xl's ``RelPartialLearnableMultiHeadAttn`` holds

* ``qkv_net`` Linear(d_model, 3 * n_head * d_head, bias=False): q, k, v chunks, head-major;
* ``r_net`` Linear(d_model, n_head * d_head, bias=False);
* ``o_net`` Linear(n_head * d_head, d_model, bias=False);
* ``r_w_bias``, ``r_r_bias`` [n_head, d_head], usually one pair shared by every layer
  (``MemTransformerLM.r_w_bias``) — the ``u`` and ``v`` of the paper;
* ``layer_norm`` and the residual: ``out = layer_norm(w + o_net(attn))`` (``pre_lnorm=False``)
  or ``w + o_net(attn)`` with the qkv taken from ``layer_norm(cat(mems, w))``.

This module keeps exactly the four projections and the two biases under the same names, so the
weights copy over unchanged; the layer norm and the residual stay in the caller's block, as with
``nn.MultiheadAttention``:

* post-LN (``pre_lnorm=False``): ``out, mems = attn(x, mems); y = ln(x + out)``;
* pre-LN (``pre_lnorm=True``): ``out, mems = attn(x, mems, norm=ln); y = x + out``. The
  original normalizes ``cat(mems, w)`` inside the layer and keeps the *raw* hidden states as
  memory; with ``norm`` this module does the same, so the ``mems`` it returns are the raw ones,
  like the original's (and its ``init_mems`` / ``_update_mems`` lists interchange with them).
  Normalizing outside instead (``attn(ln(x), mems)``) returns normalized memory: pass it back
  as it is, never through ``ln`` again.

Converting a model
------------------
:func:`convert_transformer_xl` is the one way to convert a whole ``MemTransformerLM``: one
module per layer, with the model's ``mem_len``, ``clamp_len`` and ``same_length`` and its shared
``r_w_bias`` / ``r_r_bias`` (by reference). The modules remember the model: when its settings
change afterwards (``reset_length``, ``clamp_len``, ``same_length``, as the original's eval.py
does) or its biases are replaced, the next call raises instead of running with the old ones.
:meth:`XLMultiheadAttention.from_transformer_xl` converts one layer, with the model-level
settings passed explicitly; :meth:`XLMultiheadAttention.load_transformer_xl_state_dict` copies
a checkpoint's weights, finding the biases in the layer or at model level.

The original's ``clamp_len <= 0`` means "no clamp"; here that is ``clamp_len=None`` and the
converters map it. This module rejects ``clamp_len=0`` (it would clamp every distance to 0).

The original tensors are sequence-first ([len, batch, d_model]: ``batch_first=False``) and
its relative embeddings are ordered from the largest distance down to 0: ``pos_seq =
arange(klen - 1, -1, -1)``, clamped to ``clamp_len``, fed to a sinusoid with the sin half then
the cos half and inverse frequencies ``1 / 10000 ** (arange(0, d_model, 2) / d_model)``;
``_rel_shift`` then aligns row i's scores. :func:`effattn.xl_attention` takes ``r`` indexed
by distance instead (``r[:, d]``, clamped at ``R - 1``): the original's ``r_head_k`` is
``r.flip(1)`` of this module's ``r``. ``same_length=True`` is the window ``mem_len``: every
query sees exactly its last ``mem_len`` positions, itself included. Two differences in
training only: ``dropatt`` (dropout on the attention probabilities) is not implemented by the
kernels (training with ``dropatt > 0`` raises), and the original's dropout on the positional
embedding belongs to the model, not to the layer.

Memory and decoding
-------------------
``forward(x, mems)`` attends from the segment ``x`` to ``cat(mems, x)`` and returns
``new_mems``, the last ``mem_len`` of those hidden states, detached (the original's
``_update_mems`` with ``ext_len = 0``); ``mems`` may be None or empty (the original's
``init_mems`` gives ``torch.empty(0)``), and an empty segment gives an empty output.
``decode(x, cache)`` gives the same outputs as
``forward(x, mems)`` for the positions the cache stands for, but keeps their *projected* keys
and values (at most ``mem_len``) and the projected relative embeddings, so a token costs one
projection of itself and O(mem_len) attention; nothing is recomputed. Keys carry no absolute
position in Transformer-XL, so cached keys stay valid as the window slides. The relative
embeddings are served from the cache only while ``r_net.weight`` holds the values they were
computed from (compared element by element on every call: an optimizer step, ``.data.copy_``,
``.data = w`` or ``load_state_dict(assign=True)`` all make it recompute); the projected keys and
values in a cache stand for the weights at the time they were computed, as in any KV cache.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effattn.functional import BACKENDS as _BACKENDS
from effattn.functional import MAX_HEAD_DIM, MIN_HEAD_DIM, xl_attention

__all__ = ["XLCache", "XLMultiheadAttention", "convert_transformer_xl", "sinusoid_embedding"]

_WEIGHTS = ("qkv_net.weight", "r_net.weight", "o_net.weight")
_BIASES = ("r_w_bias", "r_r_bias")
"""The original layer's parameters this module takes over (by the same names)."""


def _original_clamp_len(clamp_len) -> int | None:
    """The original's clamp_len (<= 0 or None: no clamp) as this module's (None: no clamp)."""
    if clamp_len is None:
        return None
    if isinstance(clamp_len, bool) or not isinstance(clamp_len, int):
        raise TypeError(f"clamp_len must be an int or None, got {type(clamp_len).__name__}")
    return clamp_len if clamp_len > 0 else None


def _model_settings(model: nn.Module) -> dict[str, Any]:
    """The model-level settings of a MemTransformerLM that shape every layer's attention."""
    ext_len = getattr(model, "ext_len", 0) or 0
    if ext_len:
        raise ValueError(
            f"the Transformer-XL model has ext_len={ext_len}: extended context (memory that "
            "ends ext_len tokens before the segment's end) is not implemented; use ext_len=0"
        )
    mem_len = getattr(model, "mem_len", None)
    if isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 0:
        raise ValueError(f"the Transformer-XL model's mem_len must be an int >= 0, got {mem_len!r}")
    return {
        "mem_len": mem_len,
        "clamp_len": _original_clamp_len(getattr(model, "clamp_len", None)),
        "same_length": bool(getattr(model, "same_length", False)),
    }


def sinusoid_embedding(
    positions: torch.Tensor, d_model: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Transformer-XL's sinusoidal embedding, computed in fp32 (or fp64) whatever the model's
    dtype.

    Args:
        positions: [n] positions (distances), any numeric dtype.
        d_model: even embedding size.
        dtype: fp32 (default) or fp64, the precision of the computation and the result.

    Returns:
        [n, d_model]: ``sin(pos * inv_freq)`` then ``cos(pos * inv_freq)``, with
        ``inv_freq = 1 / 10000 ** (arange(0, d_model, 2) / d_model)`` computed in fp32 as the
        original does (its buffer). Positions up to 2**24 are exact in fp32, so casting the
        result to fp16/bf16 rounds the true values once, where computing in fp16 (as the
        original does under half precision) would already merge positions above 2048.
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even for the sinusoidal embedding, got {d_model}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=positions.device) / d_model))
    angles = torch.outer(positions.to(dtype), inv_freq.to(dtype))
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _Store:
    """Key/value storage shared by the successive caches of one decoding stream.

    Appending writes in place after the last position; when the room runs out (every ~mem_len
    tokens) the kept positions move to a fresh store, so a token copies O(1) amortized instead
    of O(mem_len). ``filled`` tells whether a cache is the stream's latest: appending from an
    older one (branching) copies to a fresh store instead of overwriting its successor's keys.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, filled: int):
        self.k, self.v, self.filled = k, v, filled


@dataclass
class XLCache:
    """Decoding state of one :class:`XLMultiheadAttention` (returned by ``decode``).

    Attributes:
        k, v (properties): [B, H, n, d_head] projected keys and values of the last
            n <= mem_len positions (views into the shared storage).
        r: [H, R, d_head] projected relative embeddings by distance (enough for n + 1 keys).
        owner: the module that made it (weak reference).
        r_weight: a copy of ``r_net.weight`` as it was when ``r`` was computed; ``decode``
            recomputes ``r`` whenever the weight's values differ from it.
    """

    store: _Store
    start: int
    length: int
    r: torch.Tensor
    owner: weakref.ref
    r_weight: torch.Tensor

    @property
    def k(self) -> torch.Tensor:
        return self.store.k[:, :, self.start : self.start + self.length]

    @property
    def v(self) -> torch.Tensor:
        return self.store.v[:, :, self.start : self.start + self.length]

    def __len__(self) -> int:
        return self.length


class XLMultiheadAttention(nn.Module):
    """Transformer-XL relative multi-head attention with memory (module docstring).

    Args:
        d_model: model width (even: the sinusoidal embedding has d_model / 2 frequencies).
        num_heads: H.
        d_head: width of a head, default d_model // num_heads; 16 <= d_head <= 256.
        mem_len: M, the number of past hidden states kept as memory (``new_mems``) and as
            cached keys/values in ``decode``; 0 keeps none.
        clamp_len: distances above clamp_len use the embedding of clamp_len; None (the
            default) is no clamp. 0 is rejected: the original's ``clamp_len <= 0`` means no
            clamp, which is None here (the converters map it).
        same_length: every query attends to exactly its last ``mem_len`` positions
            (window = mem_len), as the original's ``same_length``; needs mem_len >= 1.
        dropout: dropout on the output (the original's ``drop`` after ``o_net``).
        dropatt: dropout on the attention probabilities: only 0 is implemented in training
            (a module with dropatt > 0 loads and evaluates, and raises in training mode).
        batch_first: x is [B, L, d_model] (default) rather than the original's [L, B, d_model].
        r_w_bias, r_r_bias: optional shared [H, d_head] Parameters (u and v of the paper, the
            original shares one pair across layers); by default the module owns its own.
        backend: passed to :func:`effattn.xl_attention` ("auto", "triton", "cpu", "torch", ...).
        device, dtype: factory arguments of the parameters.
    """

    r_w_bias: nn.Parameter
    r_r_bias: nn.Parameter

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_head: int | None = None,
        mem_len: int = 0,
        clamp_len: int | None = None,
        same_length: bool = False,
        dropout: float = 0.0,
        dropatt: float = 0.0,
        batch_first: bool = True,
        *,
        r_w_bias: nn.Parameter | None = None,
        r_r_bias: nn.Parameter | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal embedding), got {d_model}")
        if d_head is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model ({d_model}) is not divisible by num_heads ({num_heads}): pass d_head"
                )
            d_head = d_model // num_heads
        if not MIN_HEAD_DIM <= d_head <= MAX_HEAD_DIM:
            raise ValueError(f"d_head must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d_head}")
        for name, p in (("dropout", dropout), ("dropatt", dropatt)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.d_head = d_model, num_heads, d_head
        # Set by convert_transformer_xl: the original model and its settings at conversion.
        self._source: weakref.ref | None = None
        self._source_settings: dict | None = None
        self.mem_len, self.clamp_len, self.same_length = mem_len, clamp_len, same_length
        self._check_settings()
        self.dropatt, self.batch_first, self.backend = dropatt, batch_first, backend
        self.scale = 1.0 / math.sqrt(d_head)
        inner = num_heads * d_head
        self.qkv_net = nn.Linear(d_model, 3 * inner, bias=False, **factory)
        self.r_net = nn.Linear(d_model, inner, bias=False, **factory)
        self.o_net = nn.Linear(inner, d_model, bias=False, **factory)
        self.drop = nn.Dropout(dropout)
        for name, shared in (("r_w_bias", r_w_bias), ("r_r_bias", r_r_bias)):
            if shared is None:
                shared = nn.Parameter(torch.empty(num_heads, d_head, **factory))
                nn.init.normal_(shared, 0.0, 0.02)  # the original's init_std
            elif not isinstance(shared, nn.Parameter) or shared.shape != (num_heads, d_head):
                raise ValueError(
                    f"{name} must be an nn.Parameter of shape [num_heads, d_head] = "
                    f"[{num_heads}, {d_head}], got {getattr(shared, 'shape', type(shared))}"
                )
            setattr(self, name, shared)

    # ----------------------------------------------------------------------- settings
    @property
    def mem_len(self) -> int:
        """M: hidden states kept as memory (``new_mems``) and as cached keys in ``decode``."""
        return self._mem_len

    @mem_len.setter
    def mem_len(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"mem_len must be an int >= 0, got {value!r}")
        self._mem_len = value

    @property
    def clamp_len(self) -> int | None:
        """Distances above clamp_len use clamp_len's embedding; None: no clamp."""
        return self._clamp_len

    @clamp_len.setter
    def clamp_len(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"clamp_len must be None or an int >= 1, got {value!r}")
        if value is not None and value < 1:
            raise ValueError(
                f"clamp_len={value} would clamp every distance to {max(value, 0)}: for no clamp "
                "(what the original's clamp_len <= 0 means) pass clamp_len=None"
            )
        self._clamp_len = value

    @property
    def same_length(self) -> bool:
        """Every query attends to exactly its last mem_len positions (window = mem_len)."""
        return self._same_length

    @same_length.setter
    def same_length(self, value: bool) -> None:
        if not isinstance(value, (bool, int)):
            raise ValueError(f"same_length must be a bool, got {value!r}")
        self._same_length = bool(value)

    def _settings(self) -> dict:
        return {
            "mem_len": self.mem_len,
            "clamp_len": self.clamp_len,
            "same_length": self.same_length,
        }

    def _check_settings(self) -> None:
        """The settings agree with each other and, after convert_transformer_xl, with the
        original model's, unless the model's changed since and this module's did not follow."""
        if self.same_length and self.mem_len < 1:
            raise ValueError("same_length=True needs mem_len >= 1 (the window is mem_len)")
        model = None if self._source is None else self._source()
        if model is None:
            return
        now, mine = _model_settings(model), self._settings()
        if now != self._source_settings:
            if now != mine:
                changed = ", ".join(
                    f"{k}={now[k]!r} (this module: {mine[k]!r})" for k in now if now[k] != mine[k]
                )
                raise ValueError(
                    f"the Transformer-XL model this module was converted from now has {changed}: "
                    "settings changed on the model after conversion (reset_length, clamp_len, "
                    "same_length, as the original's eval.py does) do not reach converted layers; "
                    "convert again with effattn.nn.convert_transformer_xl(model), or set the "
                    "same on every converted module"
                )
            self._source_settings = now
        for name in _BIASES:
            theirs = getattr(model, name, None)
            if isinstance(theirs, nn.Parameter) and theirs is not getattr(self, name):
                raise ValueError(
                    f"the Transformer-XL model's {name} is no longer the Parameter this module "
                    "shares (replaced after conversion, e.g. by load_state_dict(assign=True)): "
                    "convert again with effattn.nn.convert_transformer_xl(model)"
                )

    def __getstate__(self):
        # The link to the original model is a weak reference, which pickle cannot store: a
        # saved module loads unlinked.
        state = self.__dict__.copy()
        state["_source"] = state["_source_settings"] = None
        return state

    # ----------------------------------------------------------------------- conversion
    @classmethod
    def from_transformer_xl(
        cls,
        layer: Any,
        *,
        mem_len: int,
        clamp_len: int | None,
        same_length: bool,
        r_w_bias: nn.Parameter | None = None,
        r_r_bias: nn.Parameter | None = None,
        batch_first: bool = False,
        backend: str = "auto",
    ) -> XLMultiheadAttention:
        """A module with the weights of one original ``RelPartialLearnableMultiHeadAttn``.

        For a whole model use :func:`convert_transformer_xl`, which reads the settings and
        biases from the model and notices when they change.

        Args:
            layer: the original layer (attributes n_head, d_head, d_model, qkv_net, r_net,
                o_net; r_w_bias / r_r_bias if the layer owns them, as with untie_r).
            mem_len, clamp_len, same_length: the original *model's* settings (they live on
                MemTransformerLM, not on the layer, so they must be given). ``clamp_len`` in
                the original's meaning: None or <= 0 is no clamp.
            r_w_bias, r_r_bias: the model's shared biases [n_head, d_head] (MemTransformerLM's
                r_w_bias, r_r_bias), shared by reference, not copied.
            batch_first: False keeps the original's [len, batch, d_model] layout.

        The layer norm and residual of the original layer are not part of this module
        (module docstring). Weights are copied; the biases are shared.
        """
        w_bias = r_w_bias if r_w_bias is not None else getattr(layer, "r_w_bias", None)
        r_bias = r_r_bias if r_r_bias is not None else getattr(layer, "r_r_bias", None)
        if w_bias is None or r_bias is None:
            raise ValueError(
                "r_w_bias and r_r_bias are needed: pass the model's shared biases "
                "(MemTransformerLM.r_w_bias / r_r_bias), or use convert_transformer_xl(model)"
            )
        weight = layer.qkv_net.weight
        module = cls(
            layer.d_model,
            layer.n_head,
            layer.d_head,
            mem_len=mem_len,
            clamp_len=_original_clamp_len(clamp_len),
            same_length=same_length,
            dropout=float(getattr(getattr(layer, "drop", None), "p", 0.0)),
            dropatt=float(getattr(getattr(layer, "dropatt", None), "p", 0.0)),
            batch_first=batch_first,
            r_w_bias=w_bias if isinstance(w_bias, nn.Parameter) else nn.Parameter(w_bias),
            r_r_bias=r_bias if isinstance(r_bias, nn.Parameter) else nn.Parameter(r_bias),
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        module._load_original(layer.state_dict(), "", biases=False)
        return module

    def load_transformer_xl_state_dict(self, state_dict, prefix: str = "") -> None:
        """Copy original-layout weights: ``qkv_net.weight``, ``r_net.weight``, ``o_net.weight``
        under ``prefix``, and ``r_w_bias``, ``r_r_bias``.

        The biases are looked up under ``prefix`` first (a layer that owns them), then at each
        level above it: for ``prefix="layers.3.dec_attn."`` also ``layers.3.r_w_bias``,
        ``layers.r_w_bias`` and ``r_w_bias``, where MemTransformerLM keeps the pair its layers
        share. Missing weights or biases raise ``KeyError``; nothing is copied then. The names
        and layouts are the original's (module docstring); other keys (layer_norm.*) are
        ignored.
        """
        self._load_original(state_dict, prefix, biases=True)

    def _load_original(self, state_dict, prefix: str, biases: bool) -> None:
        pairs = []

        def take(key: str, param: nn.Parameter) -> None:
            src = state_dict[key]
            if tuple(src.shape) != tuple(param.shape):
                raise ValueError(
                    f"{key}: shape {tuple(src.shape)} does not match {tuple(param.shape)} "
                    f"(n_head={self.num_heads}, d_head={self.d_head})"
                )
            pairs.append((src, param))

        for name in _WEIGHTS:
            if prefix + name not in state_dict:
                raise KeyError(f"missing {prefix + name!r} in the original state dict")
            take(prefix + name, self.get_parameter(name))
        for name in _BIASES if biases else ():
            parts = prefix.split(".")[:-1] if prefix else []
            keys = [".".join([*parts[:i], name]) for i in range(len(parts), -1, -1)]
            key = next((k for k in keys if k in state_dict), None)
            if key is None:
                raise KeyError(
                    f"{name} is neither in the layer ({prefix + name!r}) nor at any level above "
                    f"it ({', '.join(repr(k) for k in keys[1:]) or 'none'}): pass the model's "
                    "whole state dict (MemTransformerLM keeps the biases its layers share at "
                    "its top level)"
                )
            take(key, getattr(self, name))
        with torch.no_grad():
            for src, param in pairs:
                param.copy_(src)

    # ----------------------------------------------------------------------- helpers
    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, d_head={self.d_head}, "
            f"mem_len={self.mem_len}, clamp_len={self.clamp_len}, "
            f"same_length={self.same_length}, dropatt={self.dropatt}, "
            f"batch_first={self.batch_first}, backend={self.backend!r}"
        )

    @property
    def window(self) -> int | None:
        """The attention window passed to the kernel (mem_len with same_length)."""
        return self.mem_len if self.same_length else None

    def _num_r(self, n_keys: int) -> int:
        """Rows of r needed for distances 0 .. n_keys - 1 (clamp_len and window applied)."""
        n = n_keys
        if self.clamp_len is not None:
            n = min(n, self.clamp_len + 1)
        if self.window is not None:
            n = min(n, self.window)
        return max(n, 1)

    def relative_embeddings(self, n: int) -> torch.Tensor:
        """Projected relative embeddings r [H, n, d_head] for distances 0 .. n - 1.

        The sinusoid is computed in fp32 (fp64 for an fp64 module) and cast once to the
        weight's dtype.
        """
        w = self.r_net.weight
        exact = torch.float64 if w.dtype == torch.float64 else torch.float32
        pos = sinusoid_embedding(torch.arange(n, device=w.device), self.d_model, exact)
        pos = pos.to(w.dtype)
        return self.r_net(pos).view(n, self.num_heads, self.d_head).transpose(0, 1)

    def _check_training(self) -> None:
        if self.training and self.dropatt > 0 and torch.is_grad_enabled():
            raise ValueError(
                f"dropatt={self.dropatt}: dropout on the attention probabilities is not "
                "implemented by the fused kernels; set dropatt=0 for training (it is ignored "
                "in eval mode, where dropout is the identity)"
            )

    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        layout = "[B, L, d_model]" if self.batch_first else "[L, B, d_model]"
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name} must be {layout} with d_model={self.d_model}, got {tuple(x.shape)}"
            )
        w = self.qkv_net.weight
        if x.dtype != w.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}, the module's weights {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"{name} is on {x.device}, the module on {w.device}")

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, H * d_head] -> [B, H, n, d_head]."""
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.d_head).transpose(1, 2)

    def _project(self, x: torch.Tensor, mems: torch.Tensor | None):
        """q of x, k and v of cat(mems, x), all [B, H, n, d_head] (batch-first input)."""
        inner = self.num_heads * self.d_head
        if mems is None:
            q, k, v = self.qkv_net(x).split(inner, dim=-1)
            return self._heads(q), self._heads(k), self._heads(v)
        # The memory's queries are never used: project it to keys and values only.
        w_q, w_kv = self.qkv_net.weight.split([inner, 2 * inner])
        q = self._heads(nn.functional.linear(x, w_q))
        k, v = nn.functional.linear(torch.cat([mems, x], 1), w_kv).split(inner, dim=-1)
        return q, self._heads(k), self._heads(v)

    def _attend(self, q, k, v, r) -> torch.Tensor:
        out = xl_attention(
            q,
            k,
            v,
            r,
            self.r_w_bias,
            self.r_r_bias,
            scale=self.scale,
            window=self.window,
            backend=self.backend,
        )
        b, _, n, _ = out.shape
        # The width is spelled out: with n = 0 (an empty segment) -1 is ambiguous.
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.d_head)
        return self.drop(self.o_net(out))

    @staticmethod
    def _check_norm(norm) -> None:
        if norm is not None and not callable(norm):
            raise TypeError(
                f"norm must be None or a callable (a LayerNorm), got {type(norm).__name__}"
            )

    def _check_mems(self, mems, x: torch.Tensor) -> torch.Tensor | None:
        """mems as a tensor with positions, or None for no memory (None, the original's
        ``torch.empty(0)``, or zero positions)."""
        if mems is None:
            return None
        if isinstance(mems, torch.Tensor) and mems.dim() == 1 and mems.numel() == 0:
            return None
        self._check_x(mems, "mems")
        batch_dim = 0 if self.batch_first else 1
        if mems.shape[batch_dim] != x.shape[batch_dim]:
            raise ValueError(f"mems has batch {mems.shape[batch_dim]}, x has {x.shape[batch_dim]}")
        return None if mems.shape[1 - batch_dim] == 0 else mems

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, mems: torch.Tensor | None = None, *, norm=None):
        """Attend from the segment x to cat(mems, x).

        Args:
            x: [B, L, d_model] ([L, B, d_model] with batch_first=False), the segment; L may
                be 0.
            mems: None, an empty tensor (the original's ``init_mems``) or [B, M, d_model]
                ([M, B, d_model]) earlier hidden states (any M).
            norm: the pre-LN block's layer norm (the original's ``pre_lnorm=True``): x and
                mems are normalized before the projections, while ``new_mems`` keep the raw
                hidden states, as the original does (module docstring).

        Returns:
            (out, new_mems): out shaped like x; new_mems the last mem_len positions of
            cat(mems, x), detached, in x's layout (None when mem_len == 0).
        """
        self._check_training()
        self._check_settings()
        self._check_x(x)
        self._check_norm(norm)
        mems = self._check_mems(mems, x)
        if not self.batch_first:
            x = x.transpose(0, 1)
            mems = None if mems is None else mems.transpose(0, 1)
        h, h_mems = x, mems
        if norm is not None:
            h, h_mems = norm(x), None if mems is None else norm(mems)
        q, k, v = self._project(h, h_mems)
        out = self._attend(q, k, v, self.relative_embeddings(self._num_r(k.shape[2])))
        new_mems = None
        if self.mem_len > 0:
            full = x if mems is None else torch.cat([mems, x], 1)
            new_mems = full[:, -self.mem_len :].detach()
        if not self.batch_first:
            out = out.transpose(0, 1)
            new_mems = None if new_mems is None else new_mems.transpose(0, 1)
        return out, new_mems

    # ----------------------------------------------------------------------- decoding
    def _check_cache(self, cache, x: torch.Tensor) -> None:
        if not isinstance(cache, XLCache):
            raise TypeError(f"cache must be an XLCache from decode(), got {type(cache).__name__}")
        if cache.owner() is not self:
            raise ValueError(
                "cache was made by another XLMultiheadAttention: caches hold one "
                "module's projected keys and values"
            )
        if cache.k.dtype != x.dtype:
            raise TypeError(
                f"cache holds {cache.k.dtype} keys, x is {x.dtype}: start a new "
                "cache after changing the module's dtype"
            )
        if cache.k.device != x.device:
            raise ValueError(f"cache is on {cache.k.device}, x on {x.device}")
        if cache.k.shape[0] != x.shape[0]:
            raise ValueError(f"cache has batch {cache.k.shape[0]}, x has {x.shape[0]}")

    def _append(self, cache: XLCache | None, k_new: torch.Tensor, v_new: torch.Tensor):
        """(store, start, keys, values): the cache's positions followed by the new ones.

        In place after the cache's last position when it is its store's latest and there is
        room; otherwise (and always when autograd records: in-place writes would invalidate
        saved tensors) a fresh store with room for mem_len more positions.
        """
        n = 0 if cache is None else cache.length
        t = k_new.shape[2]
        recording = torch.is_grad_enabled() and (
            k_new.requires_grad or (cache is not None and cache.store.k.requires_grad)
        )
        if cache is not None and not recording:
            store, end = cache.store, cache.start + n
            if store.filled == end and end + t <= store.k.shape[2]:
                store.k[:, :, end : end + t] = k_new
                store.v[:, :, end : end + t] = v_new
                store.filled = end + t
                return (
                    store,
                    cache.start,
                    store.k[:, :, cache.start : end + t],
                    (store.v[:, :, cache.start : end + t]),
                )
        if recording:
            k = k_new if cache is None else torch.cat([cache.k, k_new], 2)
            v = v_new if cache is None else torch.cat([cache.v, v_new], 2)
            return _Store(k, v, n + t), 0, k, v
        b, h, _, d = k_new.shape
        room = n + t + self.mem_len
        k = k_new.new_empty(b, h, room, d)
        v = v_new.new_empty(b, h, room, d)
        if cache is not None:
            k[:, :, :n], v[:, :, :n] = cache.k, cache.v
        k[:, :, n : n + t], v[:, :, n : n + t] = k_new, v_new
        return _Store(k, v, n + t), 0, k[:, :, : n + t], v[:, :, : n + t]

    def decode(self, x: torch.Tensor, cache: XLCache | None = None, *, norm=None):
        """Incremental evaluation: ``forward(x, mems)`` from cached projections.

        Args:
            x: [B, T, d_model] ([T, B, d_model] with batch_first=False) new positions,
                typically T = 1.
            cache: None (no history) or the XLCache returned by the previous call.
            norm: as in :meth:`forward` (pre-LN): x is normalized before its projections.

        Returns:
            (out, cache): out shaped like x, equal to ``forward(x, mems)[0]`` where mems are
            the (at most mem_len) positions the cache holds; the new cache holds the last
            mem_len positions' projected keys and values. A token costs its own projections
            and attention over at most mem_len + 1 keys; keys and values are appended in
            place (storage for up to 2 mem_len + T positions, O(1) amortized copies per
            token). Decoding twice from the same cache (branching) is safe: the second call
            copies instead of overwriting.
        """
        self._check_training()
        self._check_settings()
        self._check_x(x)
        self._check_norm(norm)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if cache is not None:
            self._check_cache(cache, x)
        q, k_new, v_new = self._project(x if norm is None else norm(x), None)
        store, start, k, v = self._append(cache, k_new, v_new)
        n_r = self._num_r(k.shape[2])
        w = self.r_net.weight
        if cache is not None and cache.r.shape[1] >= n_r and _same_values(cache.r_weight, w):
            r_all, r_weight = cache.r, cache.r_weight
        else:
            # Enough rows for every later call with T = 1 too: a full cache plus the token.
            r_all = self.relative_embeddings(max(n_r, self._num_r(self.mem_len + 1)))
            r_weight = w.detach().clone()
        out = self._attend(q, k, v, r_all[:, :n_r])
        keep = min(k.shape[2], self.mem_len)
        cache = XLCache(store, start + k.shape[2] - keep, keep, r_all, weakref.ref(self), r_weight)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, cache


def _libc_memcmp():
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):  # no C library symbols in this process
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _libc_memcmp()
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b holds exactly a's bits. Nothing cheaper is safe: ``.data.copy_`` changes a
    parameter's values and neither its version counter nor its storage. On CPU memcmp reads
    both at memory speed (6-7x faster than torch.equal); bits rather than values, so that a
    weight holding NaN still matches its copy."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if _MEMCMP is not None and a.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        return _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    bits = _SAME_WIDTH_INT.get(a.element_size())
    if bits is None:
        return torch.equal(a, b)
    return torch.equal(a.view(bits), b.view(bits))


def convert_transformer_xl(
    model: nn.Module, *, batch_first: bool = False, backend: str = "auto"
) -> nn.ModuleList:
    """One :class:`XLMultiheadAttention` per layer of an original ``MemTransformerLM``.

    Each module gets its layer's weights (copied) and the model's ``mem_len``, ``clamp_len``
    (the original's ``<= 0`` becomes None) and ``same_length``, and shares the model's
    ``r_w_bias`` / ``r_r_bias`` Parameters (or the layer's own, for models whose layers hold
    them). The modules remember the model (weakly): once its settings change (its
    ``reset_length``, or ``clamp_len`` / ``same_length`` set on it, as the original's eval.py
    does) or its biases are replaced, a call raises ``ValueError`` until the modules are
    converted again or given the same settings; settings changed on a module while the model
    keeps its own are the caller's choice and stand.

    Args:
        model: the original model: ``model.layers[i].dec_attn`` are the attention layers;
            ``attn_type`` 0 (relative positional attention), ``ext_len`` 0.
        batch_first: False (default) keeps the original's [len, batch, d_model] layout.
        backend: as in :class:`XLMultiheadAttention`.

    Returns:
        nn.ModuleList, ``[i]`` for ``model.layers[i]``. The layer norms, residuals,
        feed-forward parts and embeddings stay the caller's (module docstring).
    """
    layers = getattr(model, "layers", None)
    if not isinstance(model, nn.Module) or not isinstance(layers, (nn.ModuleList, list, tuple)):
        raise TypeError(
            "model must be a Transformer-XL MemTransformerLM (an nn.Module whose .layers hold "
            f".dec_attn), got {type(model).__name__}"
        )
    attn_type = getattr(model, "attn_type", 0)
    if attn_type != 0:
        raise ValueError(
            f"attn_type={attn_type}: only the original's default relative attention "
            "(attn_type=0, RelPartialLearnableMultiHeadAttn) converts to XLMultiheadAttention"
        )
    settings = _model_settings(model)
    shared: dict[str, Any] = {name: getattr(model, name, None) for name in _BIASES}
    modules = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "dec_attn", None)
        if attn is None:
            raise TypeError(f"model.layers[{i}] has no dec_attn (a Transformer-XL decoder layer)")
        m = XLMultiheadAttention.from_transformer_xl(
            attn, **settings, **shared, batch_first=batch_first, backend=backend
        )
        m._source, m._source_settings = weakref.ref(model), dict(settings)
        modules.append(m)
    return nn.ModuleList(modules)
