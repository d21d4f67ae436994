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
weights copy over unchanged (:meth:`XLMultiheadAttention.from_transformer_xl`,
:meth:`XLMultiheadAttention.load_transformer_xl_state_dict`); the layer norm and the residual
stay in the caller's block, as with ``nn.MultiheadAttention`` (post-LN:
``ln(x + attn(x, mems)[0])``; pre-LN: ``x + attn(ln(x), ln(mems))[0]``, keeping the raw ``x``
as the next memory).

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
``_update_mems`` with ``ext_len = 0``). ``decode(x, cache)`` gives the same outputs as
``forward(x, mems)`` for the positions the cache stands for, but keeps their *projected* keys
and values (at most ``mem_len``) and the projected relative embeddings, so a token costs one
projection of itself and O(mem_len) attention; nothing is recomputed. Keys carry no absolute
position in Transformer-XL, so cached keys stay valid as the window slides.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from effattn.functional import BACKENDS as _BACKENDS
from effattn.functional import MAX_HEAD_DIM, MIN_HEAD_DIM, xl_attention

__all__ = ["XLCache", "XLMultiheadAttention", "sinusoid_embedding"]

_ORIGINAL = ("qkv_net", "r_net", "o_net", "r_w_bias", "r_r_bias")
"""The original layer's parameters this module takes over (by the same names)."""


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
        r_version: version counter of ``r_net.weight`` when ``r`` was computed; an in-place
            weight update (an optimizer step) makes ``decode`` recompute ``r``.
    """

    store: _Store
    start: int
    length: int
    r: torch.Tensor
    owner: weakref.ref
    r_version: int

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
        clamp_len: distances above clamp_len use the embedding of clamp_len (None: no clamp).
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
        if isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 0:
            raise ValueError(f"mem_len must be an int >= 0, got {mem_len!r}")
        if clamp_len is not None and (not isinstance(clamp_len, int) or clamp_len < 0):
            raise ValueError(f"clamp_len must be None or an int >= 0, got {clamp_len!r}")
        if same_length and mem_len < 1:
            raise ValueError("same_length=True needs mem_len >= 1 (the window is mem_len)")
        for name, p in (("dropout", dropout), ("dropatt", dropatt)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.d_head = d_model, num_heads, d_head
        self.mem_len, self.clamp_len, self.same_length = mem_len, clamp_len, same_length
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

    # ----------------------------------------------------------------------- conversion
    @classmethod
    def from_transformer_xl(
        cls,
        layer: nn.Module,
        *,
        mem_len: int,
        clamp_len: int | None = None,
        same_length: bool = False,
        r_w_bias: nn.Parameter | None = None,
        r_r_bias: nn.Parameter | None = None,
        batch_first: bool = False,
        backend: str = "auto",
    ) -> XLMultiheadAttention:
        """A module with the weights of an original ``RelPartialLearnableMultiHeadAttn``.

        Args:
            layer: the original layer (attributes n_head, d_head, d_model, qkv_net, r_net,
                o_net; r_w_bias / r_r_bias if the layer owns them, as with untie_r).
            mem_len, clamp_len, same_length: the original model's settings
                (clamp_len <= 0 in the original means no clamp: pass None).
            r_w_bias, r_r_bias: the model's shared biases [n_head, d_head] (MemTransformerLM's
                r_w_bias, r_r_bias), shared by reference, not copied.
            batch_first: False keeps the original's [len, batch, d_model] layout.

        The layer norm and residual of the original layer are not part of this module
        (module docstring). Weights are copied; the biases given are shared.
        """
        w_bias = r_w_bias if r_w_bias is not None else getattr(layer, "r_w_bias", None)
        r_bias = r_r_bias if r_r_bias is not None else getattr(layer, "r_r_bias", None)
        if w_bias is None or r_bias is None:
            raise ValueError(
                "r_w_bias and r_r_bias are needed: pass the model's shared biases "
                "(MemTransformerLM.r_w_bias / r_r_bias)"
            )
        weight = layer.qkv_net.weight
        module = cls(
            layer.d_model,
            layer.n_head,
            layer.d_head,
            mem_len=mem_len,
            clamp_len=clamp_len,
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
        module.load_transformer_xl_state_dict(
            {k: v for k, v in layer.state_dict().items() if k.split(".")[0] in _ORIGINAL}
        )
        return module

    def load_transformer_xl_state_dict(self, state_dict, prefix: str = "") -> None:
        """Copy original-layout weights: ``qkv_net.weight``, ``r_net.weight``,
        ``o_net.weight`` and, when present, ``r_w_bias``, ``r_r_bias`` (under ``prefix``).

        The names and layouts are the original's (module docstring), so this is a checked
        copy; other keys (layer_norm.*) are ignored.
        """
        own = {"qkv_net.weight": self.qkv_net.weight, "r_net.weight": self.r_net.weight}
        own["o_net.weight"] = self.o_net.weight
        optional = {"r_w_bias": self.r_w_bias, "r_r_bias": self.r_r_bias}
        with torch.no_grad():
            for name, param in {**own, **optional}.items():
                src = state_dict.get(prefix + name)
                if src is None:
                    if name in own:
                        raise KeyError(f"missing {prefix + name!r} in the original state dict")
                    continue
                if tuple(src.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{prefix + name}: shape {tuple(src.shape)} does not match "
                        f"{tuple(param.shape)} (n_head={self.num_heads}, d_head={self.d_head})"
                    )
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
        return self.drop(self.o_net(out.transpose(1, 2).reshape(b, n, -1)))

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, mems: torch.Tensor | None = None):
        """Attend from the segment x to cat(mems, x).

        Args:
            x: [B, L, d_model] ([L, B, d_model] with batch_first=False), the segment.
            mems: None or [B, M, d_model] ([M, B, d_model]) earlier hidden states (any M).

        Returns:
            (out, new_mems): out shaped like x; new_mems the last mem_len positions of
            cat(mems, x), detached, in x's layout (None when mem_len == 0).
        """
        self._check_training()
        self._check_x(x)
        if mems is not None:
            self._check_x(mems, "mems")
            batch_dim = 0 if self.batch_first else 1
            if mems.shape[batch_dim] != x.shape[batch_dim]:
                raise ValueError(
                    f"mems has batch {mems.shape[batch_dim]}, x has {x.shape[batch_dim]}"
                )
        if not self.batch_first:
            x = x.transpose(0, 1)
            mems = None if mems is None else mems.transpose(0, 1)
        q, k, v = self._project(x, mems)
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

    def decode(self, x: torch.Tensor, cache: XLCache | None = None):
        """Incremental evaluation: ``forward(x, mems)`` from cached projections.

        Args:
            x: [B, T, d_model] ([T, B, d_model] with batch_first=False) new positions,
                typically T = 1.
            cache: None (no history) or the XLCache returned by the previous call.

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
        self._check_x(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if cache is not None:
            self._check_cache(cache, x)
        q, k_new, v_new = self._project(x, None)
        store, start, k, v = self._append(cache, k_new, v_new)
        n_r = self._num_r(k.shape[2])
        version = self.r_net.weight._version
        if cache is not None and cache.r.shape[1] >= n_r and cache.r_version == version:
            r_all = cache.r
        else:
            # Enough rows for every later call with T = 1 too: a full cache plus the token.
            r_all = self.relative_embeddings(max(n_r, self._num_r(self.mem_len + 1)))
        out = self._attend(q, k, v, r_all[:, :n_r])
        keep = min(k.shape[2], self.mem_len)
        cache = XLCache(store, start + k.shape[2] - keep, keep, r_all, weakref.ref(self), version)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, cache
