"""Drop-in sparse attention: :class:`SparseMultiheadAttention` and :func:`replace_attention`.

``SparseMultiheadAttention`` has ``nn.MultiheadAttention``'s constructor arguments, parameter
names, initialization, forward signature and state_dict, plus a ``pattern``; attention runs on
:func:`effattn.sparse_attention`, so memory and work follow the pattern instead of L x S.
``replace_attention(model, pattern)`` swaps every ``nn.MultiheadAttention`` of a model in place,
keeping its parameters (the same ``Parameter`` objects, so an existing optimizer keeps working).

What costs O(L * S) (all documented on :meth:`SparseMultiheadAttention.forward`):

* ``need_weights=True`` (nn.MultiheadAttention's default): the weights are an [L, S] matrix, so
  this call runs a dense masked attention. Pass ``need_weights=False`` for the sparse kernels
  (``nn.TransformerEncoderLayer`` / ``DecoderLayer`` already do).
* ``attn_mask``: a per-call mask is turned into a custom pattern (``patterns.from_mask``), whose
  build and storage are O(L * S). A mask that only repeats the causal constraint is recognised
  and costs nothing more than the comparison; fixed structure belongs in ``pattern``.

Attention dropout is not implemented by the kernels: in training mode with ``dropout > 0`` the
sparse path raises ``NotImplementedError`` rather than silently dropping the dropout or
densifying; ``need_weights=True`` is the explicit dense path that applies it exactly as
``nn.MultiheadAttention`` does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from effattn import patterns
from effattn.functional import BACKENDS as _BACKENDS
from effattn.functional import MAX_HEAD_DIM, MIN_HEAD_DIM, sparse_attention
from effattn.nn.decoding import (
    SparseCache,
    append,
    new_group,
    position_period,
    prefill_groups,
    right_aligned,
)
from effattn.patterns import Pattern, Term

__all__ = ["SparseMultiheadAttention", "replace_attention"]


# --------------------------------------------------------------------------- patterns
def _is_full(pattern: Pattern) -> bool:
    """True when every head allows every key, whatever the positions (``full()``)."""
    return not pattern.is_custom and all(Term() in terms for terms in pattern.classes())


def _causal_version(pattern: Pattern) -> Pattern | None:
    """``pattern`` AND ``j <= p``, analytically (None for custom patterns, whose causal version
    the module builds as a mask). Strided and fixed keep their decompositions."""
    if pattern.is_custom:
        return None
    return pattern & patterns.causal()


def _causal_blocked(n_q: int, n_k: int, device) -> torch.Tensor:
    """bool [n_q, n_k], True above the end-aligned diagonal (key after the query)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu(n_k - n_q + 1)


# --------------------------------------------------------------------------- masks
def _blocked_from(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A bool (True = blocked) or 0/-inf float mask as bool True = blocked."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    blocked = torch.isneginf(mask)
    ok = (blocked | (mask == 0)).all()
    msg = (
        f"a float {name} is added to the attention scores; only masks made of 0 and -inf "
        "can be expressed as a sparsity pattern (use a bool mask, True = not allowed)"
    )
    if torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(msg)
    return blocked


def _guard_fused_path(module, args):
    """Forward pre-hook that only has to exist.

    nn.TransformerEncoderLayer's eval fast path (torch._transformer_encoder_layer_fwd) reads
    ``self_attn.in_proj_weight`` and runs dense attention without calling ``self_attn``; it is
    skipped whenever a submodule has hooks, so this hook keeps the sparse module in charge.
    """
    return None


# --------------------------------------------------------------------------- module
class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with block-sparse attention following a ``pattern``.

    The constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``bias_k``, ``bias_v``, ``out_proj``), their initialization and the forward signature are
    those of ``nn.MultiheadAttention``; state_dicts load both ways. The default pattern is
    ``patterns.full()``, so ``SparseMultiheadAttention(E, H)`` computes the same function as
    ``nn.MultiheadAttention(E, H)`` created with the same seed; causal attention is asked for
    with a pattern (``patterns.causal()``, or a causal ``strided`` / ``fixed`` / ``local``) or
    per call with ``is_causal=True``.

    Positions: query row i sits at ``i + S - L`` (queries aligned to the end of the keys, as in
    :func:`effattn.sparse_attention`); L > S is served only by ``full()``. Keys appended by
    ``add_bias_kv`` and ``add_zero_attn`` are not positions: every query always sees them (as in
    nn.MultiheadAttention, which pads masks with "allowed" for them); they are merged with the
    sparse result by log-sum-exp, O(L). A query with no visible key returns 0 where
    nn.MultiheadAttention gives NaN.

    Args:
        embed_dim: E, the query and output width; ``num_heads`` must divide it, and the head
            width E // num_heads must be at most 256 (widths below 16 are zero-padded to 16).
        num_heads: H.
        pattern: an :class:`effattn.patterns.Pattern` (e.g. ``patterns.strided(128)``); H must
            be a multiple of its ``head_divisor``. Default ``patterns.full()`` (dense, not
            causal: nn.MultiheadAttention's function).
        dropout: attention-probability dropout; see :meth:`forward` (the kernels have none).
        bias: biases on the input and output projections.
        add_bias_kv: learn one extra key and value (``bias_k``, ``bias_v`` [1, 1, E]).
        add_zero_attn: one extra all-zero key and value.
        kdim, vdim: key and value input widths (default E).
        batch_first: inputs and outputs are [B, L, E] instead of [L, B, E].
        device, dtype: of the parameters.
        backend: passed to :func:`effattn.sparse_attention` ("auto" picks by device).
    """

    bias_k: nn.Parameter | None
    bias_v: nn.Parameter | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        pattern: Pattern = patterns.full(),
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {dim!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if embed_dim // num_heads > MAX_HEAD_DIM:
            raise ValueError(
                f"head dim embed_dim // num_heads = {embed_dim // num_heads} is over "
                f"{MAX_HEAD_DIM}, the widest the kernels take: use more heads"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {type(dropout).__name__}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend
        self.pattern = pattern

        # Creation and initialization in nn.MultiheadAttention's order, so that the same seed
        # gives the same parameters.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        self.register_forward_pre_hook(_guard_fused_path)

    def merge_masks(self, *args, **kwargs):
        """Raise: only nn.TransformerEncoderLayer's fused eval path calls this, and that path
        would run dense attention on ``in_proj_weight`` instead of this module.

        The forward pre-hook registered in ``__init__`` keeps PyTorch off that path; reaching
        here means it was removed (or a PyTorch version ignores hooks there).
        """
        raise RuntimeError(
            "nn.TransformerEncoderLayer took its fused eval path, which would bypass "
            "SparseMultiheadAttention; keep the module's forward pre-hook in place, or disable "
            "the path with torch.backends.mha.set_fastpath_enabled(False)"
        )

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    @property
    def pattern(self) -> Pattern:
        """The attention pattern; assigning a new one validates it against ``num_heads``."""
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: Pattern) -> None:
        if not isinstance(pattern, Pattern):
            raise TypeError(
                f"pattern must be an effattn.patterns.Pattern, got {type(pattern).__name__}"
            )
        pattern._check_heads(self.num_heads)
        self._pattern = pattern
        self._causal_pattern = _causal_version(pattern)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"pattern={self._pattern.name}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}, backend={self.backend!r}"
        )

    @classmethod
    def from_dense(
        cls,
        mha: nn.MultiheadAttention,
        pattern: Pattern,
        *,
        dropout: float | None = None,
        backend: str = "auto",
    ) -> SparseMultiheadAttention:
        """A sparse module that uses ``mha``'s parameters (the same objects, not copies).

        Args:
            mha: the ``nn.MultiheadAttention`` to convert.
            pattern: the attention pattern.
            dropout: replaces ``mha.dropout`` when given (e.g. 0.0 to train on the kernels).
            backend: as in the constructor.

        Sharing keeps an optimizer built on the model valid; ``copy.deepcopy`` the result (or
        ``mha``) for an independent module. The training/eval mode is carried over.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        # Built on the meta device: nothing allocated, and the global RNG stream untouched.
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            pattern,
            dropout=mha.dropout if dropout is None else dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",
            backend=backend,
        )
        for name in (
            "in_proj_weight",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "in_proj_bias",
            "bias_k",
            "bias_v",
        ):
            setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key`` / ``value`` under the pattern and masks.

        Args:
            query: [L, B, E], or [B, L, E] with ``batch_first``, or [L, E] unbatched.
            key: [S, B, kdim] (likewise [B, S, kdim] or [S, kdim]).
            value: [S, B, vdim] (likewise).
            key_padding_mask: [B, S] (or [S] unbatched); bool, True = ignore that key, or
                float made of 0 and -inf (-inf = ignore).
            need_weights: also return the attention weights. O(L * S) time and memory: this
                runs a dense masked attention (with dropout in training mode). Pass False for
                the sparse kernels.
            attn_mask: [L, S] or [B * H, L, S] (or [H, L, S] unbatched); bool, True = NOT
                allowed (nn.MultiheadAttention's convention), or float made of 0 and -inf.
                It is intersected with the pattern (allowed = pattern AND NOT attn_mask). Other
                float values are additive biases, which no pattern expresses: ValueError. A mask
                that blocks only keys after the query (e.g.
                ``nn.Transformer.generate_square_subsequent_mask``) is applied as the analytic
                causal constraint; any other mask becomes a custom pattern, O(L * S) to build,
                rebuilt on every call, and breaks a ``torch.compile`` graph (which runs this call
                eagerly).
            average_attn_weights: average the returned weights over heads.
            is_causal: also require key position <= query position (intersected with the
                pattern, analytically: no mask needed, unlike nn.MultiheadAttention, which treats
                it as a hint that ``attn_mask`` is causal).

        Returns:
            attn_output: shaped like ``query`` with width E.
            attn_weights: None unless ``need_weights``; then [B, L, S'] averaged over heads or
            [B, H, L, S'] (no B when unbatched), S' = S plus the keys from ``add_bias_kv`` and
            ``add_zero_attn``.

        Raises:
            NotImplementedError: training mode with ``dropout > 0`` and ``need_weights=False``
                (the kernels have no dropout: set dropout to 0, or ask for the dense path with
                ``need_weights=True``).
        """
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0.0 and not need_weights:
            raise NotImplementedError(
                f"attention dropout (dropout={self.dropout}) is not implemented by the sparse "
                "kernels: set dropout=0.0 (replace_attention(..., dropout=0.0)), call .eval(), "
                "or pass need_weights=True for the dense O(L*S) path that applies it"
            )
        self_attention = query is key and key is value
        if not is_batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, n_q, _ = query.shape
        n_k = key.shape[1]
        q, k, v = self._project(query, key, value, self_attention)
        h, d = self.num_heads, self.head_dim
        q = q.view(b, n_q, h, d).transpose(1, 2)
        k = k.view(b, n_k, h, d).transpose(1, 2)
        v = v.view(b, n_k, h, d).transpose(1, 2)

        kpm = (
            None
            if key_padding_mask is None
            else _blocked_from(key_padding_mask, "key_padding_mask")
        )
        blocked = None if attn_mask is None else _blocked_from(attn_mask, "attn_mask")
        if blocked is not None and blocked.dim() == 3:
            blocked = blocked.view(-1, h, n_q, n_k)
        # The attention runs in the precision the kernels choose for q's dtype (fp32
        # accumulation): autocast would re-cast the matmuls inside them.
        with torch.autocast(q.device.type, enabled=False):
            out, weights = self._attend(q, k, v, kpm, blocked, is_causal, need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        out = out.transpose(1, 2).reshape(b, n_q, self.embed_dim)
        out = self.out_proj(out)
        if not is_batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _attend(self, q, k, v, kpm, blocked, is_causal: bool, need_weights: bool):
        """(out [B, H, L, D], weights [B, H, L, S'] or None) from projected heads."""
        extra_k, extra_v = self._extra_keys(q)
        scale = q.shape[-1] ** -0.5
        if need_weights:
            return self._dense(q, k, v, kpm, blocked, is_causal, extra_k, extra_v, scale)
        if blocked is None and not is_causal:
            out = self._sparse(q, k, v, kpm, self._pattern, extra_k, extra_v, scale)
        elif blocked is None and self._causal_pattern is not None:
            out = self._sparse(q, k, v, kpm, self._causal_pattern, extra_k, extra_v, scale)
        else:
            out = self._sparse_masked(q, k, v, kpm, blocked, is_causal, extra_k, extra_v, scale)
        return out, None

    # ----------------------------------------------------------------- decoding
    def decode(
        self,
        x: torch.Tensor,
        cache: SparseCache | None = None,
        *,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SparseCache]:
        """Incremental self-attention: new tokens against cached projected keys and values.

        Equal to ``forward(prefix, prefix, prefix)`` with the pattern's causal version
        (``pattern & causal()``) at the new positions, where the prefix is everything decoded
        so far. Keys and values are appended to preallocated storage (amortized O(1) copies a
        token); only the new tokens are projected. For inference: decode under
        ``torch.no_grad()``.

        Args:
            x: [B, T, E] ([T, B, E] with batch_first=False) the next T tokens of each stream.
            cache: None to start, or the SparseCache of the previous call (for this module,
                this batch: :meth:`SparseCache.select` reorders or drops streams).
            lengths: only to start (cache=None): int [B], stream i's first lengths[i] tokens
                of x are real (right-padded prompts of different lengths); default T each.

        Returns:
            (out, cache): out shaped like x, zero past a stream's length; the cache holds
            every stream's positions so far.
        """
        pattern = self._causal_pattern
        period = None if pattern is None else position_period(pattern)
        if pattern is None or period is None:
            raise ValueError(
                f"decode needs a pattern that serves any length, got {self._pattern.name} "
                "(custom masks are bound to one size)"
            )
        if not self._qkv_same_embed_dim:
            raise ValueError("decode is self-attention: it needs kdim == vdim == embed_dim")
        if self.training and self.dropout > 0.0:
            raise NotImplementedError(
                "decode runs without attention dropout: call .eval() (it is for inference)"
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must be a [B, T, {self.embed_dim}] tensor ([T, B, E] with "
                f"batch_first=False), got {getattr(x, 'shape', type(x).__name__)}"
            )
        if not self.batch_first:
            x = x.transpose(0, 1)
        b, t, _ = x.shape
        lengths = self._decode_lengths(x, cache, lengths)
        h, d = self.num_heads, self.head_dim
        q, k, v = (y.view(b, t, h, d).transpose(1, 2) for y in self._project(x, x, x, True))
        extra_k, extra_v = self._extra_keys(q)
        out = q.new_zeros(b, h, t, d)
        groups = []
        with torch.autocast(q.device.type, enabled=False):
            if cache is None:
                for members, end in prefill_groups(lengths, period):
                    n = lengths[members]
                    qg, kg, vg = (right_aligned(y[members], n, end) for y in (q, k, v))
                    group = new_group(members, kg, vg, end - n)
                    groups.append(group)
                    if end:
                        res = self._decode_step(group, qg, pattern, extra_k, extra_v)
                        out[members] = _left_aligned(res, n, t)
                new_lengths = lengths
            else:
                for g in cache.groups:
                    group = append(g, k[g.members], v[g.members])
                    groups.append(group)
                    out[g.members] = self._decode_step(
                        group, q[g.members], pattern, extra_k, extra_v
                    )
                new_lengths = cache.lengths + t
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        new = SparseCache(tuple(groups), new_lengths, weakref.ref(self), period, x.dtype, x.device)
        return out, new

    def _decode_lengths(self, x, cache, lengths) -> torch.Tensor:
        b, t = x.shape[:2]
        if cache is None:
            if lengths is None:
                return torch.full((b,), t, dtype=torch.int64)
            n = torch.as_tensor(lengths).to("cpu")
            if n.shape != (b,) or n.is_floating_point() or bool((n < 0).any() | (n > t).any()):
                raise ValueError(f"lengths must be [B] = [{b}] ints in [0, T={t}], got {lengths!r}")
            return n.to(torch.int64)
        if lengths is not None:
            raise ValueError("lengths are given once, with the first call (cache=None)")
        if not isinstance(cache, SparseCache):
            raise TypeError(
                f"cache must be a SparseCache from decode(), got {type(cache).__name__}"
            )
        if cache.owner() is not self:
            raise ValueError(
                "cache was made by another SparseMultiheadAttention: a cache holds one "
                "module's projected keys and values"
            )
        if len(cache) != b:
            raise ValueError(f"cache holds {len(cache)} streams, x has batch {b}")
        if cache.dtype != x.dtype:
            raise TypeError(f"cache holds {cache.dtype} keys, x is {x.dtype}")
        if cache.device != x.device:
            raise ValueError(f"cache is on {cache.device}, x on {x.device}")
        if cache.period != position_period(self._causal_pattern):
            raise ValueError("the module's pattern changed since the cache was made: start anew")
        return cache.lengths

    def _decode_step(self, group, q, pattern, extra_k, extra_v) -> torch.Tensor:
        """[Bg, H, T, D] attention of the group's new queries over its whole storage."""
        k = group.storage.k[:, :, : group.end]
        v = group.storage.v[:, :, : group.end]
        kpm = group.key_padding_mask(group.end) if bool(group.pads.any()) else None
        return self._sparse(q, k, v, kpm, pattern, extra_k, extra_v, self.head_dim**-0.5)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise TypeError(
                    f"{name} is a nested tensor, which SparseMultiheadAttention does not take "
                    "(for nn.TransformerEncoder, set use_nested_tensor=False, as "
                    "replace_attention does)"
                )
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}"
            )
        is_batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"{name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}"
                )
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have width {width}, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in sequence "
                "and batch dims"
            )
        if len({query.dtype, key.dtype, value.dtype}) > 1:
            raise TypeError(
                f"query, key, value must share a dtype, got {query.dtype}, {key.dtype}, "
                f"{value.dtype}"
            )
        seq, batch = (1, 0) if self.batch_first else (0, 1)
        if not is_batched:
            seq = 0
        elif query.shape[batch] != key.shape[batch]:
            raise ValueError(
                f"query and key must have the same batch size, got {query.shape[batch]} and "
                f"{key.shape[batch]}"
            )
        n_q, n_k = query.shape[seq], key.shape[seq]
        b = query.shape[batch] if is_batched else None
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(
                    f"{name} must be bool (True = not allowed) or float (0 / -inf), "
                    f"got {mask.dtype}"
                )
            if mask.device != query.device:
                raise ValueError(f"{name} is on {mask.device}, query on {query.device}")
        if key_padding_mask is not None:
            want = (b, n_k) if is_batched else (n_k,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(
                    f"key_padding_mask must have shape {list(want)} ([B, S]"
                    f"{'' if is_batched else ' without B: unbatched'}), "
                    f"got {list(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            heads = self.num_heads * (b if b is not None else 1)
            if tuple(attn_mask.shape) not in ((n_q, n_k), (heads, n_q, n_k)):
                raise ValueError(
                    f"attn_mask must have shape [L, S] = {[n_q, n_k]} or "
                    f"[{'B * H' if is_batched else 'H'}, L, S] = {[heads, n_q, n_k]}, "
                    f"got {list(attn_mask.shape)}"
                )
        return is_batched

    def _project(self, query, key, value, self_attention: bool):
        e = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim:
            if self_attention:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(e, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _extra_keys(self, q: torch.Tensor):
        """Keys and values every query sees: [1, H, X, D] each, or (None, None)."""
        h, d = self.num_heads, self.head_dim
        ks, vs = [], []
        if self.bias_k is not None and self.bias_v is not None:
            ks.append(self.bias_k.to(q.dtype).view(1, h, 1, d))
            vs.append(self.bias_v.to(q.dtype).view(1, h, 1, d))
        if self.add_zero_attn:
            zero = q.new_zeros(1, h, 1, d)
            ks.append(zero)
            vs.append(zero)
        if not ks:
            return None, None
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    # ----------------------------------------------------------------- sparse path
    def _kernel(self, q, k, v, kpm, pattern: Pattern, scale: float):
        """(out, lse) of sparse_attention with the head dim padded up to the kernels' minimum
        (the kernels compute the LSE anyway: returning it costs nothing)."""
        d = q.shape[-1]
        if d < MIN_HEAD_DIM:
            # Zero columns change no score and give zero output columns: exact, O(n) memory.
            pad = (0, MIN_HEAD_DIM - d)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        if torch.is_grad_enabled():
            # The kernels' gradients come back contiguous, and a compiled graph must not
            # expect them strided like a transposed view. (Without autograd, views go as they
            # are: decode's cache storage would otherwise be copied every token.)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = sparse_attention(
            q,
            k,
            v,
            pattern,
            scale=scale,
            key_padding_mask=kpm,
            backend=self.backend,
            return_lse=True,
        )
        return (out[..., :d] if d < MIN_HEAD_DIM else out), lse

    def _sparse(self, q, k, v, kpm, pattern: Pattern, extra_k, extra_v, scale: float):
        b, h, n_q, d = q.shape
        n_k = k.shape[2]
        if n_q > n_k:
            if not _is_full(pattern):
                raise ValueError(
                    f"pattern {pattern.name} cannot serve L={n_q} queries against S={n_k} keys: "
                    "queries are aligned to the end of the keys, so L <= S is needed (only "
                    "full() serves L > S)"
                )
            # full() ignores positions: fold the queries into ceil(L / S) batch rows of S.
            chunks = -(-n_q // n_k)
            qf = F.pad(q, (0, 0, 0, chunks * n_k - n_q))
            qf = qf.view(b, h, chunks, n_k, d).transpose(1, 2).reshape(b * chunks, h, n_k, d)
            kf, vf = (t.repeat_interleave(chunks, dim=0) for t in (k, v))
            kpmf = None if kpm is None else kpm.repeat_interleave(chunks, dim=0)

            def unfold(t):
                t = t.view(b, chunks, h, n_k, *t.shape[3:]).transpose(1, 2)
                return t.flatten(2, 3)[:, :, :n_q]

            out, lse = (unfold(t) for t in self._kernel(qf, kf, vf, kpmf, pattern, scale))
        else:
            out, lse = self._kernel(q, k, v, kpm, pattern, scale)
        if extra_k is None:
            return out
        return _merge_extra(out, lse, q, extra_k, extra_v, scale)

    @torch.compiler.disable
    def _sparse_masked(self, q, k, v, kpm, blocked, is_causal, extra_k, extra_v, scale):
        """Pattern AND NOT ``blocked`` (None, [L, S] or [B | 1, H, L, S]) AND causal if asked.

        Builds custom patterns from data, so ``torch.compile`` runs it eagerly.
        """
        b, h, n_q, _ = q.shape
        n_k = k.shape[2]
        pattern = self._pattern
        if is_causal and self._causal_pattern is not None:
            pattern = self._causal_pattern
            is_causal = False
        if blocked is not None and blocked.dim() == 4 and bool((blocked == blocked[:1, :1]).all()):
            blocked = blocked[0, 0]
        if blocked is not None and blocked.dim() == 2 and not is_causal and n_q <= n_k:
            if not bool(blocked.any()):
                return self._sparse(q, k, v, kpm, pattern, extra_k, extra_v, scale)
            if self._causal_pattern is not None and torch.equal(
                blocked, _causal_blocked(n_q, n_k, blocked.device)
            ):
                return self._sparse(q, k, v, kpm, self._causal_pattern, extra_k, extra_v, scale)
        allowed = self._allowed(pattern, n_q, n_k, blocked, is_causal, q.device)
        pad = max(0, n_q - n_k)
        if pad:
            # A custom pattern needs L <= S: prepend keys that no query may see.
            allowed = F.pad(allowed, (pad, 0))
            k, v = (F.pad(t, (0, 0, pad, 0)) for t in (k, v))
            kpm = None if kpm is None else F.pad(kpm, (pad, 0), value=True)
        if allowed.shape[0] == 1:
            return self._sparse(
                q, k, v, kpm, patterns.from_mask(allowed[0]), extra_k, extra_v, scale
            )
        outs = [
            self._sparse(
                q[i : i + 1],
                k[i : i + 1],
                v[i : i + 1],
                None if kpm is None else kpm[i : i + 1],
                patterns.from_mask(allowed[i]),
                extra_k,
                extra_v,
                scale,
            )
            for i in range(b)
        ]
        return torch.cat(outs)

    def _allowed(self, pattern, n_q, n_k, blocked, is_causal, device) -> torch.Tensor:
        """bool [1 | B, 1 | H, L, S]: pattern AND NOT blocked (AND causal), True = allowed."""
        if n_q > n_k and _is_full(pattern):
            allowed = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=device)
        else:
            if n_q > n_k:
                raise ValueError(
                    f"pattern {pattern.name} cannot serve L={n_q} queries against S={n_k} keys: "
                    "L <= S is needed (only full() serves L > S)"
                )
            allowed = pattern.mask(n_q, n_k, self.num_heads, device=device).unsqueeze(0)
        if is_causal:
            allowed = allowed & ~_causal_blocked(n_q, n_k, allowed.device)
        if blocked is not None:
            allowed = allowed & ~blocked
        return allowed

    # ----------------------------------------------------------------- dense path
    def _dense(self, q, k, v, kpm, blocked, is_causal, extra_k, extra_v, scale):
        """Masked dense attention with weights: (out [B, H, L, D], weights [B, H, L, S'])."""
        n_q, n_k = q.shape[2], k.shape[2]
        pattern = self._pattern
        if is_causal and self._causal_pattern is not None:
            pattern, is_causal = self._causal_pattern, False
        allowed = self._allowed(pattern, n_q, n_k, blocked, is_causal, q.device)
        if kpm is not None:
            allowed = allowed & ~kpm[:, None, None, :]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        if extra_k is not None:
            b, h = q.shape[:2]
            extra = torch.matmul(q.to(acc), extra_k.to(acc).transpose(-1, -2)) * scale
            scores = torch.cat([scores, extra], dim=-1)
            allowed = torch.cat(
                [
                    allowed.expand(b, h, n_q, n_k),
                    allowed.new_ones(b, h, n_q, extra_k.shape[2]),
                ],
                dim=-1,
            )
            v = torch.cat([v, extra_v.expand(b, -1, -1, -1)], dim=2)
        scores = scores.masked_fill(~allowed, float("-inf"))
        top = scores.amax(-1, keepdim=True).detach()
        e = torch.exp(scores - torch.where(torch.isfinite(top), top, 0))
        weights = e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(acc).tiny)
        weights = F.dropout(weights, self.dropout, training=self.training)
        out = torch.matmul(weights, v.to(acc)).to(q.dtype)
        return out, weights.to(q.dtype)


def _left_aligned(res: torch.Tensor, lengths: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`right_aligned`: [Bg, H, end, D] -> [Bg, H, t, D], zero past lengths."""
    bg, h, end, d = res.shape
    rows = torch.arange(t, device=res.device)
    src = rows[None, :] + (end - lengths.to(res.device))[:, None]
    valid = rows[None, :] < lengths.to(res.device)[:, None]
    gathered = res.gather(2, src.clamp(max=max(end - 1, 0))[:, None, :, None].expand(bg, h, t, d))
    return torch.where(valid[:, None, :, None], gathered, 0)


def _merge_extra(out, lse, q, extra_k, extra_v, scale: float) -> torch.Tensor:
    """Add always-visible keys to a sparse result by log-sum-exp.

    out [B, H, L, D] and lse [B, H, L] cover the real keys; extra_k / extra_v [1, H, X, D].
    """
    acc = lse.dtype
    s = torch.matmul(q.to(acc), extra_k.to(acc).transpose(-1, -2)) * scale  # [B, H, L, X]
    total = torch.logsumexp(torch.cat([lse.unsqueeze(-1), s], dim=-1), dim=-1, keepdim=True)
    merged = torch.exp(lse.unsqueeze(-1) - total) * out.to(acc) + torch.matmul(
        torch.exp(s - total), extra_v.to(acc)
    )
    return merged.to(q.dtype)


# --------------------------------------------------------------------------- conversion
def replace_attention(
    model: nn.Module,
    pattern: Pattern | Callable[[str, nn.MultiheadAttention], Pattern | None],
    *,
    cross_pattern: Pattern | None = None,
    dropout: float | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` in ``model`` for a :class:`SparseMultiheadAttention`.

    In place; the new modules use the old ones' parameters (no copy, so an optimizer built on
    the model stays valid) and training mode. Attention inside ``nn.TransformerEncoderLayer`` /
    ``DecoderLayer`` is swapped too, and ``nn.TransformerEncoder``'s nested-tensor conversion is
    turned off (its fused eval path would otherwise bypass the swapped attention).

    Args:
        model: the module to convert (an ``nn.MultiheadAttention`` itself is converted and
            returned).
        pattern: the pattern for self-attention; or a callable ``(qualified_name, mha) ->
            Pattern | None`` deciding per module (None keeps that one dense).
        cross_pattern: for the cross-attention (``multihead_attn``) of
            ``nn.TransformerDecoderLayer`` when ``pattern`` is a Pattern; default ``full()``
            (encoder memory has no causal order). Cross-attention elsewhere cannot be told
            apart: pass a callable ``pattern`` for it.
        dropout: replaces each module's attention dropout when given; the sparse kernels have
            none, so training a model whose attention has dropout > 0 needs ``dropout=0.0``.
        backend: as in :class:`SparseMultiheadAttention`.

    Returns:
        ``model`` (converted in place), or the new module when ``model`` is an
        ``nn.MultiheadAttention``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(pattern, Pattern) and not callable(pattern):
        raise TypeError(
            f"pattern must be a Pattern or a callable (name, module) -> Pattern | None, "
            f"got {type(pattern).__name__}"
        )
    if cross_pattern is not None and not isinstance(cross_pattern, Pattern):
        raise TypeError(
            f"cross_pattern must be a Pattern or None, got {type(cross_pattern).__name__}"
        )
    cross = patterns.full() if cross_pattern is None else cross_pattern

    def choose(name: str, parent: nn.Module | None, attr: str, mha: nn.MultiheadAttention):
        if not isinstance(pattern, Pattern):
            chosen = pattern(name, mha)
            if chosen is not None and not isinstance(chosen, Pattern):
                raise TypeError(
                    f"pattern({name!r}, ...) returned {type(chosen).__name__}, "
                    "expected a Pattern or None"
                )
            return chosen
        if isinstance(parent, nn.TransformerDecoderLayer) and attr == "multihead_attn":
            return cross
        return pattern

    def convert(mha, chosen):
        return SparseMultiheadAttention.from_dense(mha, chosen, dropout=dropout, backend=backend)

    if isinstance(model, nn.MultiheadAttention):
        chosen = choose("", None, "", model)
        return model if chosen is None else convert(model, chosen)

    swaps = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        # _modules, not named_children(): that skips a module's second name.
        for attr, child in parent._modules.items():
            if isinstance(child, nn.MultiheadAttention):
                name = f"{parent_name}.{attr}" if parent_name else attr
                swaps.append((parent, attr, name, child))
    done: dict[int, nn.Module] = {}
    for parent, attr, name, child in swaps:
        if id(child) not in done:
            chosen = choose(name, parent, attr, child)
            done[id(child)] = child if chosen is None else convert(child, chosen)
        setattr(parent, attr, done[id(child)])
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, SparseMultiheadAttention) for m in module.modules()
        ):
            module.use_nested_tensor = False
    return model
