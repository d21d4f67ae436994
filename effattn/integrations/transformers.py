"""effattn as an attention implementation of Hugging Face transformers models.

::

    import effattn.integrations.transformers
    effattn.integrations.transformers.register("effattn-strided", effattn.patterns.strided(128))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="effattn-strided")

:func:`register` adds two functions under one name: an attention function
(``AttentionInterface``) that runs :func:`effattn.sparse_attention`, and a mask function
(``AttentionMaskInterface``) without which transformers would drop the attention mask silently.
Any model whose attention goes through the interface (Llama, Mistral, Qwen2, GPT-2 and most
decoders of transformers 5) then attends with the pattern, in training, evaluation and
``generate()`` with transformers' own caches. What the mask function hands to the attention is
not a dense mask but a :class:`PaddingMask`: the tokenizer's 2-D ``attention_mask`` becomes
effattn's ``key_padding_mask`` [B, Nk], so no [B, 1, Nq, Nk] tensor is ever made.

What transformers asks for, and what effattn computes:

- **Causal layers** (decoders) attend with ``pattern & causal()``: a non-causal pattern is made
  causal, a causal one is unchanged (and keeps its decomposition). A bidirectional layer
  (``config.is_causal = False``, cross-attention) attends with the pattern itself, which must
  then not be causal.
- **Sliding-window layers** (Mistral, Qwen2's ``layer_types``) attend with the pattern
  intersected with the window: ``local(w)`` for transformers' "key > query - w".
- **Positions** are counted from each sequence's first token, as in a single-sequence run. For
  patterns that depend only on the distance p - j (``causal``, ``local``, ``strided``) the key
  padding mask alone makes left padding exact. Patterns that place windows at absolute positions
  (``fixed``; a ``per_head`` or ``union`` holding it) see a left-padded row shifted by its pad
  length; for those the rows are grouped by where their first token is, and each group runs with
  its keys and values sliced from that token on. Cost: one kernel call per distinct pad length
  in the batch, plus a copy of the grouped rows of q, k and v; right padding costs nothing.
- **Caches**: the keys of a dynamic cache end at the last query, as effattn's end-aligned
  queries expect; a static cache's unfilled slots (after the last query) are sliced off, never
  attended. ``generate()`` decodes through :func:`effattn.sparse_attention` with one query row,
  so dedicated decode kernels serve it as soon as the dispatcher has them.
- ``scaling`` is the score scale (GPT-2's ``scale_attn_by_inverse_layer_idx`` included);
  grouped-query attention runs natively on the model's key/value heads (no repeat).

Refused, with an error that names it (instead of being ignored): attention dropout in training
(the kernels have none yet: set the config's attention dropout to 0), an explicit 4-D mask or
float bias, ``output_attentions=True``, soft-capping, attention sinks, position biases, packed
sequences (position_ids restarting without an attention_mask, or flash-attention's
``cu_seq_lens``), chunked attention (Llama 4), extra mask functions (e.g. image tokens), and
sliding-window caches that dropped keys before the first token for absolute-position patterns.
"""

from __future__ import annotations

import dataclasses
import re

import torch

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers import masking_utils as _masking
except ImportError as e:  # the core never needs transformers; this module does
    raise ImportError(
        "effattn.integrations.transformers needs transformers >= 5 "
        "(pip install 'effattn[transformers]')"
    ) from e

from effattn import patterns as P
from effattn.functional import BACKENDS, sparse_attention
from effattn.patterns import Pattern

__all__ = ["PaddingMask", "register"]

# Keyword arguments some models pass to the attention function for features effattn does not
# compute; a non-None value is refused rather than dropped.
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping (softcap)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (position_bias)",
    "cu_seq_lens_q": "packed sequences (cu_seq_lens_q / cu_seq_lens_k)",
    "cu_seq_lens_k": "packed sequences (cu_seq_lens_q / cu_seq_lens_k)",
    "indices": "indexed sparse attention (indices)",
    "block_indices": "indexed sparse attention (block_indices)",
}

# transformers gives names containing these a meaning of their own (sdpa fallbacks, flash or
# flex checks, paged attention); register's name pattern already excludes "org/repo:kernel"
# (kernels from the Hub) and "paged|..." spellings.
_RESERVED = ("sdpa", "flash", "flex", "paged", "eager")


@dataclasses.dataclass(frozen=True, eq=False)
class PaddingMask:
    """What the mask function of a registered name gives the attention layers of one forward.

    Attributes:
        pattern: the pattern the layers attend with (the registered one, made causal and
            windowed as the model asks).
        causal: whether the model asked for a causal mask.
        window: the model's sliding window, or None.
        kv_length: the number of keys transformers will pass (a static cache's full size).
        n_keys: how many of them hold tokens up to the last query; the rest are never attended.
        key_padding_mask: bool [B, n_keys], True = ignore that key; None without padding.
        groups: for patterns that count absolute positions, ``(first, rows)`` per distinct
            first-token index: rows ``rows`` run with keys ``first:``. None when every row starts
            at key 0, or the pattern depends on distances only.
    """

    pattern: Pattern
    causal: bool
    window: int | None
    kv_length: int
    n_keys: int
    key_padding_mask: torch.Tensor | None
    groups: tuple[tuple[int, torch.Tensor], ...] | None

    # With a static cache, generate() makes the masks ahead of the forward, whose own mask
    # creation then sees this object where a 2-D padding mask may stand and reads its ndim:
    # anything but 2 passes it on to the mask function below, which returns it as it is.
    ndim = 4


def register(name: str, pattern: Pattern, *, backend: str = "auto") -> str:
    """Register ``pattern`` with transformers as the attention implementation ``name``.

    Then ``from_pretrained(..., attn_implementation=name)``, ``from_config(config,
    attn_implementation=name)`` or ``model.set_attn_implementation(name)`` make every attention
    layer of the model run :func:`effattn.sparse_attention` with ``pattern`` on ``backend``
    ("auto", or a name from :func:`effattn.backends`). Registering a name again replaces it,
    also for models already built. Returns ``name``.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"name must be letters, digits, '_', '-' or '.', got {name!r}")
    taken = {**AttentionMaskInterface._global_mapping, **AttentionInterface._global_mapping}
    theirs = name in taken and not isinstance(
        getattr(taken[name], "__self__", None), _Implementation
    )
    reserved = [r for r in _RESERVED if r in name.lower()]
    if theirs or reserved:
        why = f"contains {reserved[0]!r}, which" if reserved else "is one that"
        raise ValueError(
            f"name {name!r} {why} transformers reserves for its own implementations; "
            "pick another, e.g. 'effattn'"
        )
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be an effattn.patterns.Pattern, got {type(pattern).__name__}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = _Implementation(name, pattern, backend)
    AttentionInterface.register(name, impl.attention)
    AttentionMaskInterface.register(name, impl.mask)
    return name


# ----------------------------------------------------------------------- patterns
def _terms(pattern: Pattern):
    return (t for ts in pattern.classes() for t in ts)


def _is_causal(pattern: Pattern) -> bool:
    """Every term needs j <= p. Custom patterns are the user's explicit mask: taken as given."""
    return not pattern.is_custom and all(t.lo >= 0 for t in _terms(pattern))


def _distance_only(pattern: Pattern) -> bool:
    """The pattern depends on p - j alone (bands and moduli), so shifting a row's positions by
    its padding changes nothing."""
    return not pattern.is_custom and all(t.gq == 0 and t.smod == 0 for t in _terms(pattern))


def _window_pattern(causal: bool, window: int) -> Pattern:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"the model's sliding window must be a positive int, got {window!r}")
    # transformers: causal windows keep kv > q - w (w keys, the query's own included);
    # bidirectional ones keep |q - kv| <= w.
    return P.local(window) if causal else P.local(window + 1, causal=False)


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


# Code objects of the closures that transformers' sliding-window masks are made of: a mask
# function is recognised only when it is exactly one of the masks below, so anything else
# transformers adds to a mask (packed sequences, image tokens, chunks) is refused, not dropped.
_AND_CODE = _masking.and_masks(_masking.causal_mask_function).__code__
_SLIDING_CODE = _masking.sliding_window_overlay(1).__code__
# (bidirectional sliding windows came with transformers 5.1)
_SLIDING_BIDIRECTIONAL = getattr(_masking, "sliding_window_bidirectional_overlay", None)
_SLIDING_BIDIRECTIONAL_CODE = _SLIDING_BIDIRECTIONAL and _SLIDING_BIDIRECTIONAL(1).__code__


def _read_mask_function(fn) -> tuple[bool, int | None] | None:
    """(causal, sliding window or None) of the mask transformers asks for; None when it is not a
    plain causal, bidirectional or sliding-window mask."""
    if fn is _masking.causal_mask_function:
        return True, None
    if fn is _masking.bidirectional_mask_function:
        return False, None
    if getattr(fn, "__code__", None) is _AND_CODE:
        parts = _closure(fn).get("mask_functions", ())
        if len(parts) == 2:
            overlay, base = parts
            code = getattr(overlay, "__code__", None)
            if base is _masking.causal_mask_function and code is _SLIDING_CODE:
                return True, _closure(overlay)["sliding_window"]
            if base is _masking.bidirectional_mask_function and code is _SLIDING_BIDIRECTIONAL_CODE:
                return False, _closure(overlay)["sliding_window"]
    return None


# ------------------------------------------------------------------- the functions
class _Implementation:
    """The mask and attention functions registered under one name."""

    def __init__(self, name: str, pattern: Pattern, backend: str):
        self.name = name
        self.pattern = pattern
        self.backend = backend
        # One effective pattern per (causal, window): custom patterns' tile masks are made once
        # per pattern object, so they must not be rebuilt on every forward.
        self._patterns: dict[tuple[bool, int | None], Pattern] = {}

    def pattern_for(self, causal: bool, window: int | None) -> Pattern:
        key = (causal, window)
        if key not in self._patterns:
            p = self.pattern
            if causal:
                p = p & P.causal()
            elif _is_causal(p):
                raise ValueError(
                    f"attn_implementation {self.name!r}: this layer attends bidirectionally "
                    f"(is_causal=False: an encoder, cross-attention or config.is_causal=False) "
                    f"but {p.name} is causal; register a pattern built with causal=False"
                )
            if window is not None:
                p = p & _window_pattern(causal, window)
            self._patterns[key] = p
        return self._patterns[key]

    # The mask function: called once per forward (and per kind of layer) by the model.
    def mask(
        self,
        batch_size: int,
        kv_length: int,
        kv_offset: int = 0,
        mask_function=_masking.causal_mask_function,
        attention_mask: torch.Tensor | None = None,
        q_length: int | None = None,
        q_offset: int = 0,
        cache_position: torch.Tensor | None = None,
        **_: object,
    ) -> PaddingMask:
        if isinstance(attention_mask, PaddingMask):
            return attention_mask
        if q_length is None:  # the first transformers 5 releases pass the query positions
            q_length, q_offset = cache_position.shape[0], cache_position[0]
        read = _read_mask_function(mask_function)
        if read is None:
            what = getattr(mask_function, "__qualname__", repr(mask_function))
            raise NotImplementedError(
                f"attn_implementation {self.name!r} serves causal, bidirectional and "
                f"sliding-window masks; the model asks for another one ({what}): packed "
                "sequences (position_ids that restart, without an attention_mask), extra "
                "or/and mask functions (e.g. image tokens), block_sequence_ids or chunked "
                "attention are not supported"
            )
        causal, window = read
        pattern = self.pattern_for(causal, window)
        # A static cache passes all its slots; those after the last query hold no token yet.
        # Queries and keys of a bidirectional layer may be different sequences (cross-attention).
        n_keys = int(q_offset) + q_length - kv_offset if causal else kv_length
        if not 0 < n_keys <= kv_length:
            raise ValueError(
                f"attn_implementation {self.name!r}: unexpected cache layout (queries "
                f"{int(q_offset)}..{int(q_offset) + q_length - 1}, keys {kv_offset}.."
                f"{kv_offset + kv_length - 1})"
            )
        keep = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            # As transformers does: keys beyond the 2-D mask are hidden.
            short = kv_offset + n_keys - keep.shape[-1]
            if short > 0:
                keep = torch.nn.functional.pad(keep, (0, short), value=False)
        kpm = None
        if keep is not None:
            local = keep[:, kv_offset : kv_offset + n_keys]
            if not bool(local.all()):
                kpm = ~local
        groups = None
        if not _distance_only(pattern):
            groups = self._groups(pattern, keep, batch_size, kv_offset, n_keys)
        return PaddingMask(pattern, causal, window, kv_length, n_keys, kpm, groups)

    def _groups(self, pattern, keep, batch_size, kv_offset, n_keys):
        """Rows grouped by the key index of their first token, when not all start at key 0."""
        if keep is None:
            first = [0] * batch_size
        else:
            seen = keep[:, : kv_offset + n_keys]
            first = torch.where(seen.any(1), seen.to(torch.uint8).argmax(1), seen.shape[1]).tolist()
        first = [f - kv_offset for f in first]
        if min(first) < 0:
            raise NotImplementedError(
                f"attn_implementation {self.name!r}: {pattern.name} places its windows at "
                "absolute positions, and this layer's cache has dropped keys before the first "
                "token (a sliding-window cache); use a pattern that depends on distances only "
                "(causal, local, strided) for such models"
            )
        if not any(first):
            return None
        if pattern.is_custom:
            raise NotImplementedError(
                f"attn_implementation {self.name!r}: {pattern.name} is bound to one size, so it "
                "cannot serve left-padded rows, whose positions start after their padding"
            )
        device = keep.device
        rows: dict[int, list[int]] = {}
        for b, f in enumerate(first):
            rows.setdefault(f, []).append(b)
        return tuple(
            (f, torch.tensor(r, dtype=torch.long, device=device)) for f, r in sorted(rows.items())
        )

    # The attention function: called by every attention layer.
    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        self._refuse(module, dropout, kwargs)
        window = kwargs.get("sliding_window")
        if attention_mask is None:
            # No mask function ran (a layer called on its own): no padding, and the layer's
            # own causality, as transformers' sdpa does then.
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            mask = PaddingMask(
                self.pattern_for(bool(causal), window), bool(causal), window,
                key.shape[2], key.shape[2], None, None,
            )  # fmt: skip
        elif isinstance(attention_mask, PaddingMask):
            mask = attention_mask
            self._check_mask(mask, key, is_causal, window)
        else:
            got = type(attention_mask).__name__
            shape = getattr(attention_mask, "shape", None)
            raise NotImplementedError(
                f"attn_implementation {self.name!r} takes the 2-D attention_mask (padding) "
                f"and applies its pattern; it got a {got}"
                f"{'' if shape is None else ' of shape ' + str(list(shape))}: an explicit 4-D "
                "mask or float bias is not supported"
            )
        k = key[:, :, : mask.n_keys]
        v = value[:, :, : mask.n_keys]
        kpm = mask.key_padding_mask
        if kpm is not None:
            kpm = kpm.to(query.device)
        if mask.groups is None:
            out = sparse_attention(
                query, k, v, mask.pattern, scale=scaling, key_padding_mask=kpm,
                backend=self.backend,
            )  # fmt: skip
        else:
            out = self._grouped(query, k, v, mask, kpm, scaling)
        return out.transpose(1, 2).contiguous(), None

    def _grouped(self, q, k, v, mask, kpm, scale):
        n_q = q.shape[2]
        out = q.new_zeros(q.shape)
        for first, rows in mask.groups:
            rows = rows.to(q.device)
            # Queries before the row's first token have no position in it: their output stays
            # 0, what a causal pattern gives a query that sees no key.
            n = min(n_q, k.shape[2] - first)
            if n <= 0:
                continue
            out[rows, :, n_q - n :] = sparse_attention(
                q[rows, :, n_q - n :], k[rows, :, first:], v[rows, :, first:], mask.pattern,
                scale=scale, key_padding_mask=None if kpm is None else kpm[rows, first:],
                backend=self.backend,
            )  # fmt: skip
        return out

    def _check_mask(self, mask, key, is_causal, window):
        if key.shape[2] != mask.kv_length:
            raise ValueError(
                f"attn_implementation {self.name!r}: the layer has {key.shape[2]} keys, its mask "
                f"was made for {mask.kv_length} (a cache this integration does not know?)"
            )
        if is_causal is not None and bool(is_causal) != mask.causal:
            raise ValueError(
                f"attn_implementation {self.name!r}: is_causal={is_causal} contradicts the "
                f"model's {'causal' if mask.causal else 'bidirectional'} mask; for bidirectional "
                "attention set config.is_causal = False"
            )
        if window is not None and window != mask.window:
            raise ValueError(
                f"attn_implementation {self.name!r}: the layer asks for sliding_window={window}, "
                f"its mask was made for {mask.window}"
            )

    def _refuse(self, module, dropout, kwargs):
        if dropout:
            raise NotImplementedError(
                f"attn_implementation {self.name!r}: effattn's kernels have no attention dropout "
                f"yet (the layer asks for p={dropout} in training); set the config's attention "
                "dropout to 0.0 (attention_dropout; GPT-2: attn_pdrop) or call model.eval()"
            )
        config = getattr(module, "config", None)
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise NotImplementedError(
                f"attn_implementation {self.name!r} does not return attention weights "
                "(output_attentions=True); use attn_implementation='eager' for them"
            )
        for arg, what in _UNSUPPORTED_KWARGS.items():
            if kwargs.get(arg) is not None:
                raise NotImplementedError(
                    f"attn_implementation {self.name!r} does not support {what}"
                )
