"""The captioner interface every model family implements, and the registry ``model.family`` selects from.

The trainer (training/*), the training steps, the ``Captioner`` API, the demo (through ``Captioner``) and export
use only what ``CaptionModel`` lists, so a new family is one module with a class that has these members plus one
line in ``CAPTIONER_FAMILIES``; nothing else asks which family it has. tests/models/test_families.py checks every
registered family against this list on a tiny built instance. ``models.objectives.caption_loss`` applies the
training objective to any family's ``forward``; ``models.parameter_groups.weight_decay_groups`` and
``models.text_padding`` hold what families share.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .captioner import BlipCaptioner
from .objectives import HeadFeatures
from .prefix_captioner import PrefixCaptioner
from .vlm_captioner import VlmCaptioner


@runtime_checkable
class CaptionModel(Protocol):
    """What the trainer, the steps, the ``Captioner`` API and export need of a captioner: an ``nn.Module``.

    Shapes: B caption rows, I images (I = B unless ``image_index`` maps rows to images), L token positions of
    ``tokenize``'s layout, N scored positions (``build_targets``; L - 1 for BLIP, L for a prefix LM or a VLM), V the
    vocabulary, D the LM head's width, S the image size.

    Building and checking (classmethods; everything before a model exists):

    * ``from_config(model_config)``: build from a resolved config's ``model`` section, random or pre-trained
      parts as the section says (training.build_captioner, the one place a family is chosen).
    * ``check_config(model_config, toy)``: raise ValueError (shown as a one-line ConfigError) for a section
      this family cannot build, before anything is built (training.check_inputs).
    * ``config_sources(model_config) -> [(config key, source, kind)]``: the tokenizer / GPT-2 / CLIP sources
      ``from_config`` will load (kind "tokenizer", "gpt2", "clip", "vlm"; a source may be None or a config dict), so
      that local paths and hub ids are checked first and the toy flow builds its toy CLIP / GPT-2 stand-ins.
    * ``accepts_hub_weights(source) -> bool``: whether a hub id is a valid ``model.pretrained``.
    * ``inference_config(model_config, checkpoint, tokenizer=None, prompt=None, attention="sdpa") -> dict``: the
      ``model`` section that rebuilds a trained captioner from its checkpoint's config on this machine.
    * ``from_exported(source, **options) -> CaptionModel | None``: a captioner from a source of this family's
      own forms other than a training checkpoint (what ``export_directory`` wrote; BLIP: also a hub id or an
      original ``.pth``), or None when ``source`` is not one (``Captioner.from_pretrained`` asks each family).

    Weights and training:

    * ``model``: the ``nn.Module`` whose ``state_dict`` the checkpoints hold (names are the checkpoint's).
    * ``load_pretrained(source, model_config)``: load ``model.pretrained``'s kinds of source into ``model``.
    * ``parameter_groups(weight_decay, decay_all=True) -> [{"params": [...], "weight_decay": w}, ...]``: AdamW
      groups over the trainable parameters only, each once (frozen parts are the family's business).
    * ``compile_parts(scope, **options)``: ``torch.compile`` in place, scope "full" (``forward``) or "vision".
    * ``training``, ``train(mode)``, ``eval()``, ``to(device)``, ``parameters()``: as any ``nn.Module``;
      ``device``: where the weights are.

    Text:

    * ``tokenize(captions, padding=None) -> (input_ids, attention_mask)``, (B, L) each on ``device``.
    * ``build_targets(input_ids, attention_mask) -> targets`` (B, N), IGNORE_INDEX (-100) where nothing is
      scored (prompt, padding): the one place that masks.
    * ``decode(ids) -> list[str]``: B captions from ``generate_ids`` / ``sample_ids`` rows.

    Forward (``models.objectives.caption_loss`` applies the objective to it, for every family):

    * ``forward(pixel_values, input_ids, attention_mask, image_index=None, head_features=False)``: logits
      (B, N, V) aligned with the targets, or with ``head_features`` a ``HeadFeatures(features (B, N, D),
      weight (V, D), bias (V,) | None)`` with ``logits = features @ weight.T + bias``. ``pixel_values`` (I, 3, S,
      S); ``image_index`` (B,) the image row of each caption row.

    Generation:

    * ``generate_ids(pixel_values, sample, num_beams, max_length, min_length, top_p, repetition_penalty,
      no_repeat_ngram_size=0, num_return_sequences=1)`` -> (I * num_return_sequences, L') ids, image-major:
      beam search (the best ``num_return_sequences`` <= ``num_beams`` beams, best first) or nucleus sampling
      (that many samples); ``no_repeat_ngram_size`` > 0 bans repeated n-grams of that size, 0 is off (a family
      that cannot honour a value raises ValueError rather than ignoring it); ``models.generation`` checks the
      counts. ``generate(pixel_values, **options) -> list[str]`` does ``decode`` too (evaluation,
      ``Captioner``).
    * ``sample_ids(pixel_values, num_samples=1, max_new_tokens=20, greedy=False)`` -> (I * num_samples, L') SCST
      rollouts in ``tokenize``'s layout, image-major, padded after each caption's end token; ``sequence_mask(ids)
      -> (I * num_samples, L')`` their attention mask (1 through the end token), so that ``build_targets`` and
      ``forward`` score them like references.
    * ``eval_transform()``: PIL image -> (3, S, S) tensor at ``image_size``; ``max_positions``: the largest
      ``max_length`` ``generate_ids`` accepts.

    Image features and export:

    * ``cached_feature_key(transform_description) -> str | None``: a digest naming the image features for that
      preprocessing when they are frozen and deterministic, so that training may read them from disk
      (``data.feature_cache``), else None (BLIP: always). With a key, ``encode_cache_batch(pixel_values) ->
      features`` gives the rows the cache stores, and ``forward``, ``generate_ids`` and ``sample_ids`` accept
      them in place of pixels (pixels are always 4-D). A family may also name its frozen tower's source in a
      ``clip_source`` attribute, which the cache records as metadata (read with ``getattr``: optional).
    * ``export_directory(output_dir) -> Path``: write the family's self-contained export (scripts/export_hf.py),
      which ``from_exported`` reads back.
    """

    model: nn.Module
    training: bool
    image_size: int
    max_positions: int
    device: torch.device

    # -- building and checking (classmethods)
    @classmethod
    def from_config(cls, model_config: dict) -> CaptionModel: ...

    @classmethod
    def check_config(cls, model_config: dict, toy: bool) -> None: ...

    @classmethod
    def config_sources(cls, model_config: dict) -> list[tuple[str, str | dict | None, str]]: ...

    @classmethod
    def accepts_hub_weights(cls, source: str) -> bool: ...

    @classmethod
    def inference_config(cls, model_config: dict, checkpoint: Path, tokenizer: str | None = None,
                         prompt: str | None = None, attention: str = "sdpa") -> dict: ...

    @classmethod
    def from_exported(cls, source: str, **options) -> CaptionModel | None: ...

    # -- weights and training
    def load_pretrained(self, source: str, model_config: dict) -> None: ...

    def parameter_groups(self, weight_decay: float, decay_all: bool = True) -> list[dict]: ...

    def compile_parts(self, scope: str = "full", **options) -> CaptionModel: ...

    def train(self, mode: bool = True) -> CaptionModel: ...

    def eval(self) -> CaptionModel: ...

    def to(self, *args, **kwargs) -> CaptionModel: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    # -- text
    def tokenize(self, captions: list[str], padding: str | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def build_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def decode(self, generated_ids: torch.Tensor) -> list[str]: ...

    # -- forward
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_index: torch.Tensor | None = None,
                head_features: bool = False) -> torch.Tensor | HeadFeatures: ...

    # -- generation
    def generate_ids(self, pixel_values: torch.Tensor, sample: bool = False, num_beams: int = 3,
                     max_length: int = 30, min_length: int = 1, top_p: float = 0.9,
                     repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                     num_return_sequences: int = 1) -> torch.Tensor: ...

    def generate(self, pixel_values: torch.Tensor, **options) -> list[str]: ...

    def sample_ids(self, pixel_values: torch.Tensor, num_samples: int = 1, max_new_tokens: int = 20,
                   greedy: bool = False) -> torch.Tensor: ...

    def sequence_mask(self, ids: torch.Tensor) -> torch.Tensor: ...

    def eval_transform(self): ...

    # -- image features and export
    def cached_feature_key(self, transform_description: str) -> str | None: ...

    def encode_cache_batch(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def export_directory(self, output_dir: str | Path) -> Path: ...


# ``model.family`` -> its class. A new family: one module with a ``CaptionModel`` class, and one line here. The
# order is the order ``Captioner.from_pretrained`` asks ``from_exported``: vlm first, because it takes only
# image-text-to-text folders that are not BLIP's, while blip takes any transformers folder or hub id.
CAPTIONER_FAMILIES: dict[str, type[CaptionModel]] = {"vlm": VlmCaptioner, "blip": BlipCaptioner,
                                                     "prefix": PrefixCaptioner}


def captioner_family(model_config: dict) -> type[CaptionModel]:
    """The class a ``model`` section's ``family`` names; a section without the key is BLIP's. Raises ValueError
    naming the valid families for an unknown one."""
    family = model_config.get("family", "blip")
    if family not in CAPTIONER_FAMILIES:
        raise ValueError(f"model.family {family!r} is none of {sorted(CAPTIONER_FAMILIES)}")
    return CAPTIONER_FAMILIES[family]
