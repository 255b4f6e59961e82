"""Fused attention (``torch.nn.functional.scaled_dot_product_attention``) for transformers' BLIP captioner.

transformers' BLIP computes attention eagerly (``softmax(q k^T / sqrt(d) + mask) v`` in separate kernels) and its
``attn_implementation`` switch does not reach BLIP's modules. ``set_attention(model, "sdpa")`` swaps the class of
every attention module of a built model for a subclass whose forward calls SDPA:

* vision: ``BlipAttention`` (fused qkv projection, no mask) -> ``SdpaBlipAttention``;
* text decoder: ``BlipTextSelfAttention`` (causal + padding self-attention, cross-attention to the image tokens,
  the generation KV cache) -> ``SdpaBlipTextSelfAttention``.

Only the class changes: parameters, buffers and state-dict names stay the same, so checkpoints, conversion and
``save_pretrained`` are unaffected (a saved model loads back as plain, eager BLIP), and ``set_attention(model,
"eager")`` swaps back. The implementation in use is read from the modules themselves (``attention_of(model)``),
so it cannot drift from what runs.

Semantics kept from the eager code:

* masks: BLIP's text model builds additive float masks (B, 1, Q, K) holding 0 or ``finfo(float32).min`` (the
  causal + padding mask for self-attention; ``None`` for the cross-attention mask when every image token is
  visible). SDPA takes them as ``attn_mask`` unchanged (cast to the query's dtype under autocast, clamped so
  the minimum stays finite), so fully masked rows behave as in eager (uniform weights, never NaN);
* dropout on the attention probabilities: ``dropout_p = p`` in training mode, 0 in eval mode (the random masks
  differ from eager's, the distribution is the same);
* the KV cache of generation (``EncoderDecoderCache`` of two ``DynamicCache``): self-attention appends this
  step's keys/values; cross-attention projects the image tokens once and reuses them (``is_updated``);
* attention weights cannot come out of SDPA: when they are requested (``output_attentions=True``, which
  transformers 5 serves through forward hooks) or a ``head_mask`` is given, the module runs the eager forward.
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

try:  # transformers 5: output_attentions is served by hooks reading this context variable
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions pass output_attentions as an argument
    _active_collector = None

try:
    from transformers.cache_utils import EncoderDecoderCache
except ImportError:  # pragma: no cover
    EncoderDecoderCache = ()

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _attention_weights_requested(kwargs: dict) -> bool:
    """True when the caller wants attention probabilities (or masks heads): only the eager path has them."""
    if kwargs.get("output_attentions") or kwargs.get("head_mask") is not None:
        return True
    if _active_collector is not None:
        collecting = _active_collector.get()
        if collecting and ("attentions" in collecting or "cross_attentions" in collecting):
            return True
    return False


def _sdpa_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive float mask in the query's dtype (SDPA requires it), keeping "masked" finite.

    transformers fills masked entries with ``finfo(float32).min``; cast to fp16 that would become -inf, and a
    fully masked row would then give NaN where eager gives uniform weights.
    """
    if mask is None or mask.dtype == torch.bool or mask.dtype == dtype:
        return mask
    return mask.clamp(min=torch.finfo(dtype).min).to(dtype)


class SdpaBlipAttention(BlipAttention):
    """BLIP's ViT self-attention through SDPA. Same parameters (``qkv``, ``projection``) and output layout.

    Returns ``(output (B, T, C), None)``: SDPA does not expose the attention probabilities.
    """

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        if _attention_weights_requested(kwargs):
            return super().forward(hidden_states, **kwargs)
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        context = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
        )
        context = context.transpose(1, 2).reshape(batch, length, width)
        return self.projection(context), None


# The names transformers has given the generation cache argument of BlipTextSelfAttention.forward:
# ``past_key_values`` (4.57 to 5.23; 4.57 also accepts the deprecated ``past_key_value``) and ``cache`` (5.24+).
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
    """BLIP's text self- or cross-attention through SDPA, with the eager module's cache handling.

    Every caller in transformers (``BlipTextAttention``) passes everything but ``hidden_states`` by keyword, so the
    forward takes keywords and reads the cache under whichever name the installed version uses. Extra keywords of
    the 4.57 layout (``head_mask``, ``output_attentions``, ``cache_position``) are understood as the eager module
    understands them. Returns ``(context (B, Q, hidden), None)``.

    Cross-attention mask: ``BlipTextLayer`` hands the image mask to cross-attention as ``attention_mask``, while the
    eager module reads ``encoder_attention_mask`` there, so in every supported version (4.57 to 5.24) eager BLIP
    attends to every image token. BLIP never pads image tokens; this module reads the same argument as eager, so
    the two stay identical.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:  # a positional caller: name the arguments by the installed eager signature
            bound = inspect.signature(super().forward).bind(hidden_states, *args, **kwargs)
            bound.apply_defaults()
            kwargs = {**{k: v for k, v in bound.arguments.items() if k not in ("hidden_states", "kwargs")},
                      **bound.arguments.get("kwargs", {})}
        if _attention_weights_requested(kwargs) or getattr(self, "position_embedding_type", "absolute") != "absolute":
            return super().forward(hidden_states, **kwargs)
        attention_mask = kwargs.get("attention_mask")
        encoder_hidden_states = kwargs.get("encoder_hidden_states")
        encoder_attention_mask = kwargs.get("encoder_attention_mask")
        past_key_values = next((kwargs[name] for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
        cache_position = kwargs.get("cache_position")

        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)

        is_cross_attention = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross_attention else attention_mask

        # The cache logic of BlipTextSelfAttention: one EncoderDecoderCache whose self-attention part grows every
        # step and whose cross-attention part is filled once (``is_updated``) and then reused.
        cache, reuse_cross = None, False
        if past_key_values is not None:
            cache = past_key_values
            if isinstance(past_key_values, EncoderDecoderCache):
                reuse_cross = is_cross_attention and bool(past_key_values.is_updated.get(self.layer_idx))
                cache = (
                    past_key_values.cross_attention_cache if is_cross_attention
                    else past_key_values.self_attention_cache
                )
        if reuse_cross:
            key = cache.layers[self.layer_idx].keys
            value = cache.layers[self.layer_idx].values
        else:
            source = encoder_hidden_states if is_cross_attention else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.attention_head_size)
            key = self.key(source).view(kv_shape).transpose(1, 2)
            value = self.value(source).view(kv_shape).transpose(1, 2)
            if cache is not None:
                cache_kwargs = {"cache_position": None if is_cross_attention else cache_position}
                key, value = cache.update(key, value, self.layer_idx, cache_kwargs)
                if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        if mask is not None:
            mask = _sdpa_mask(mask.to(query.device), query.dtype)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0
        )  # (B, heads, Q, head_dim); SDPA's default scale is BLIP's 1 / sqrt(head_dim)
        context = context.transpose(1, 2).reshape(*input_shape, self.all_head_size)
        return context, None


# eager class -> SDPA subclass. The subclass only overrides forward, so swapping __class__ is safe both ways.
_SDPA_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    BlipAttention: SdpaBlipAttention,
    BlipTextSelfAttention: SdpaBlipTextSelfAttention,
}
_EAGER_CLASSES = {sdpa: eager for eager, sdpa in _SDPA_CLASSES.items()}


def _forward_parameters(cls: type) -> list[str]:
    return list(inspect.signature(cls.forward).parameters)


# The argument names of the eager forwards that the SDPA subclasses understand, for every layout of the supported
# transformers range (requirements.txt): 4.57 (head_mask, output_attentions and cache_position as arguments),
# 5.0-5.23 (past_key_values, hook-based output_attentions) and 5.24+ (the cache renamed ``cache``).
_VISION_ARGUMENTS = {"self", "hidden_states", "head_mask", "kwargs"}
_TEXT_REQUIRED = ["self", "hidden_states", "attention_mask"]
_TEXT_ARGUMENTS = {
    "self", "hidden_states", "attention_mask", "head_mask", "encoder_hidden_states", "encoder_attention_mask",
    *_CACHE_ARGUMENTS, "output_attentions", "cache_position", "kwargs",
}


def sdpa_supported() -> bool:
    """Whether the installed transformers' BLIP attention forwards take only arguments the SDPA subclasses know.

    True on every transformers release in requirements.txt's range (tests/models/test_attention.py asserts it, rather
    than skipping, so CI fails if a release in the range changes the layout). A layout with an unknown argument
    could carry meaning the subclasses would drop, so it keeps eager attention instead (with a warning).
    """
    vision = _forward_parameters(BlipAttention)
    text = _forward_parameters(BlipTextSelfAttention)
    vision_ok = vision[:2] == ["self", "hidden_states"] and set(vision) <= _VISION_ARGUMENTS
    text_ok = (
        text[:3] == _TEXT_REQUIRED
        and {"encoder_hidden_states", "encoder_attention_mask"} <= set(text)
        and len(set(text) & set(_CACHE_ARGUMENTS)) >= 1
        and set(text) <= _TEXT_ARGUMENTS
    )
    return vision_ok and text_ok


def set_attention(model: nn.Module, implementation: str) -> str:
    """Switch every BLIP attention module in ``model`` to ``implementation`` ("sdpa" or "eager"), in place.

    Returns the implementation now in use: "sdpa" falls back to "eager", with a warning, when the installed
    transformers' BLIP does not match what the SDPA modules re-implement (``sdpa_supported``).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation == "sdpa" and not sdpa_supported():
        logger.warning("attention='sdpa' is not supported for this transformers version's BLIP; using eager")
        implementation = "eager"
    mapping = _SDPA_CLASSES if implementation == "sdpa" else _EAGER_CLASSES
    for module in model.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
    return implementation


def attention_of(model: nn.Module) -> str:
    """The attention implementation of ``model``'s BLIP attention modules: "sdpa", "eager", or "mixed"."""
    kinds = set()
    for module in model.modules():
        if type(module) in _EAGER_CLASSES:
            kinds.add("sdpa")
        elif type(module) in _SDPA_CLASSES:
            kinds.add("eager")
    if len(kinds) > 1:
        return "mixed"
    return kinds.pop() if kinds else "eager"
