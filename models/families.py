"""The captioner interface every model family implements, and the registry ``model.family`` selects from.

The engine, the ``Captioner`` API, evaluation and the demo only use what ``CaptionModel`` lists, so a new family
is one class with these methods plus one line in ``CAPTIONER_FAMILIES``; nothing else asks which family it has.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .captioner import BlipCaptioner
from .objectives import CaptionObjective
from .prefix_captioner import PrefixCaptioner


@runtime_checkable
class CaptionModel(Protocol):
    """What the engine needs of a captioner (an ``nn.Module`` whose ``.model`` holds the saved weights).

    * ``from_config(model_config)``: build from a resolved config's ``model`` section (random or pre-trained
      parts, as the section says); ``load_pretrained(source, model_config)``: load ``model.pretrained``'s kind of
      source into it.
    * ``tokenize(captions) -> (input_ids, attention_mask)`` (B, T) and ``build_targets(input_ids, attention_mask)
      -> targets`` (B, T) with IGNORE_INDEX where nothing is scored: the one place that masks.
    * ``forward(pixel_values, input_ids, attention_mask) -> logits`` (B, T, V) aligned with the targets, or
      ``(loss, parts)`` with ``targets=`` and ``objective=``.
    * ``generate_ids(pixel_values, sample, num_beams, max_length, min_length, top_p, repetition_penalty)`` ->
      (B, L) ids that ``decode`` turns into captions; ``generate`` does both.
    * ``eval_transform()``: PIL image -> (3, S, S) tensor at ``image_size``; ``max_positions``: the largest
      ``max_length``; ``device``; ``compile_parts(scope, **options)``.
    * ``cached_feature_key(transform_description) -> str | None``: a digest naming the image features for that
      preprocessing when they are frozen and deterministic, so that training may read them from disk
      (``data.feature_cache``), else None (BLIP: always). A family that returns a key also provides
      ``encode_cache_batch(pixel_values) -> features`` (the rows the cache stores), and its ``forward``,
      ``generate_ids`` and ``sample_ids`` accept those features in place of pixels (pixels are always 4-D).
    """

    image_size: int
    max_positions: int
    device: torch.device

    @classmethod
    def from_config(cls, model_config: dict) -> CaptionModel: ...

    def load_pretrained(self, source: str, model_config: dict) -> None: ...

    def tokenize(self, captions: list[str], padding: str | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def build_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                targets: torch.Tensor | None = None, objective: CaptionObjective | None = None): ...

    def generate_ids(self, pixel_values: torch.Tensor, **options) -> torch.Tensor: ...

    def decode(self, generated_ids: torch.Tensor) -> list[str]: ...

    def generate(self, pixel_values: torch.Tensor, **options) -> list[str]: ...

    def eval_transform(self): ...

    def cached_feature_key(self, transform_description: str) -> str | None: ...


CAPTIONER_FAMILIES: dict[str, type] = {"blip": BlipCaptioner, "prefix": PrefixCaptioner}
