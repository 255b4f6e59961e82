"""Prefix-LM captioner (ClipCap; OPG-style token prefixes): a CLIP image tower, a mapper and GPT-2.

Layout of one training sequence (ClipCap's ``ClipCaptionModel.forward``)::

    GPT-2 inputs   = [ p_0 ... p_{P-1} ; wte(c_0) ... wte(c_{T-1}) ]     P = prefix_length, mapper output
    attention mask = [ 1 ... 1         ; caption mask ]                   the prefix is always attended
    logits[:, P - 1 + t] predicts c_t  ->  forward returns logits[:, P-1:-1]   (B, T, V)
    targets        = input_ids, padding set to -100                        (B, T)

Captions are GPT-2 BPE tokens with no BOS, as in ClipCap. Two deliberate differences from the original
training loss (``cross_entropy(..., ignore_index=0)`` over 0-padded tokens):

* Padding is ignored through the attention mask with IGNORE_INDEX (-100), so a real ``!`` (GPT-2 id 0) IS
  trained on; the original silently dropped every ``!``. ``clipcap_original_loss`` reproduces the original
  formula for parity checks.
* ``append_eos`` (default on) ends every caption with ``<|endoftext|>``, so that a caption without a final
  ``.`` (common in COCO) still teaches the model where to stop and batched generation ends cleanly. Generation
  stops at EOS or at ``stop_token`` (``.``, ClipCap's stop), whichever comes first, so original checkpoints
  (trained without EOS) still stop where they did.

Generation: ``generate_ids`` / ``generate`` run transformers' batched ``generate`` on the prefix embeddings
(beam search or greedy, or nucleus sampling), or, with ``original_generation=True``, ClipCap's own
``generate_beam`` / ``generate2`` loops image by image (``generate_from_prefix(..., original_semantics=True)``).
Original ClipCap checkpoints load with ``load_clipcap_checkpoint``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
)

import hub
from imaging import CLIP_MEAN, CLIP_STD

from .checkpoint import CheckpointError
from .generation import check_generation_counts
from .objectives import IGNORE_INDEX, HeadFeatures
from .parameter_groups import weight_decay_groups
from .prefix_mappers import PrefixMLP, TransformerMapper
from .text_padding import after_first_end, check_text_padding, pad_rows, padded_length

logger = logging.getLogger(__name__)

MAPPING_TYPES = ("mlp", "transformer")
PREFIX_SOURCES = ("pooled", "tokens")
# transformers < 4.3x stored these GPT-2 attention buffers in state dicts (the released ClipCap weights have
# them); current GPT-2 has neither, so they are the only keys a ClipCap loader may drop.
_LEGACY_GPT2_BUFFERS = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_TIED_LM_HEAD = "gpt.lm_head.weight"
PREFIX_DIRECTORY_FILE = "prefix_captioner.json"  # marks a save_directory / scripts/export_hf.py folder


@dataclass(frozen=True)
class PrefixConfig:
    """What a prefix captioner is made of, apart from the GPT-2 and CLIP weights themselves.

    ``prefix_size`` is the mapper's input width: the CLIP projection width for ``pooled`` (512 for ViT-B/32,
    640 for RN50x4), the vision tower's hidden width for ``tokens``; taken from the tower when there is one.
    ``clip_length``: image tokens the pooled transformer mapper makes from the embedding (ClipCap: 10).
    ``num_heads`` is 8 in ClipCap (hard-coded). ``normalize_prefix`` L2-normalises the pooled embedding
    before the mapper (ClipCap's transformer recipe). ``only_prefix`` freezes GPT-2 (``ClipCaptionPrefix``);
    ``train_vision`` trains the image tower too (one-stage), otherwise it is frozen and kept in eval mode.
    """

    mapping_type: str = "mlp"
    prefix_source: str = "pooled"
    prefix_length: int = 10
    clip_length: int | None = None
    num_layers: int = 8
    num_heads: int = 8
    mlp_ratio: float = 2.0
    prefix_size: int = 512
    normalize_prefix: bool = False
    only_prefix: bool = False
    train_vision: bool = False

    def __post_init__(self):
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"mapping_type must be one of {list(MAPPING_TYPES)}, got {self.mapping_type!r}")
        if self.prefix_source not in PREFIX_SOURCES:
            raise ValueError(f"prefix_source must be one of {list(PREFIX_SOURCES)}, got {self.prefix_source!r}")
        for name in ("prefix_length", "num_layers", "num_heads", "prefix_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class PrefixLM(nn.Module):
    """The weights: ``vision`` (optional CLIP tower), ``clip_project`` (mapper) and ``gpt`` (GPT2LMHeadModel).

    ``state_dict`` names are ClipCap's (``clip_project.*``, ``gpt.*``) plus ``vision.*`` for the tower.
    """

    def __init__(self, config: PrefixConfig, gpt: GPT2LMHeadModel, vision: CLIPVisionModelWithProjection | None):
        super().__init__()
        self.config = config
        self.gpt = gpt
        self.vision = vision
        width = gpt.config.n_embd
        prefix_length, tokens = config.prefix_length, config.prefix_source == "tokens"
        if config.mapping_type == "mlp":
            if tokens:  # one prefix embedding per image token; the prefix length is the token count
                self.clip_project = PrefixMLP((config.prefix_size, width, width))
            else:
                self.clip_project = PrefixMLP(
                    (config.prefix_size, width * prefix_length // 2, width * prefix_length)
                )
        else:
            self.clip_project = TransformerMapper(
                config.prefix_size, width, prefix_length, config.clip_length, num_layers=config.num_layers,
                num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, tokens=tokens,
            )
        if config.only_prefix:
            self.gpt.requires_grad_(False)
        if vision is not None and not config.train_vision:
            self.vision.requires_grad_(False)

    def train(self, mode: bool = True) -> "PrefixLM":
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout), as ClipCaptionPrefix keeps GPT-2.
        if self.config.only_prefix:
            self.gpt.eval()
        if self.vision is not None and not self.config.train_vision:
            self.vision.eval()
        return self

    @property
    def width(self) -> int:
        return self.gpt.config.n_embd

    def project(self, prefix: torch.Tensor) -> torch.Tensor:
        """Mapper: (B, prefix_size) pooled embeddings or (B, N, prefix_size) tokens -> (B, P, width)."""
        out = self.clip_project(prefix)
        if self.config.mapping_type == "mlp" and self.config.prefix_source == "pooled":
            out = out.view(-1, self.config.prefix_length, self.width)
        return out

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's raw output for images (B, 3, S, S): the CLIP embedding (B, projection_dim) for ``pooled``,
        the patch tokens (B, N, hidden_size) for ``tokens``; not normalised (what the feature cache stores)."""
        if self.vision is None:
            raise ValueError("this prefix captioner has no image tower (it was loaded without clip=...); use "
                             "prefix_logits / generate_from_prefix on CLIP embeddings instead")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_vision):
            if self.config.prefix_source == "pooled":
                return self.vision(pixel_values=pixel_values).image_embeds  # (B, projection_dim)
            return self.vision.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # patches

    def image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The mapper's input, (B, prefix_size) or (B, N, prefix_size), from pixels or from precomputed features.

        ``images`` is either pixels (B, 3, S, S), always 4-D, which go through the tower, or ``image_features``'
        output computed earlier (the feature cache, data/feature_cache.py): 2-D (B, prefix_size) for ``pooled``,
        3-D (B, N, prefix_size) for ``tokens``, used as given. ``normalize_prefix`` is applied here in both cases,
        so the cache holds the raw embedding and one cache serves a model with or without normalisation.
        """
        if images.dim() == 4:
            prefix = self.image_features(images)
        else:
            expected = 2 if self.config.prefix_source == "pooled" else 3
            if images.dim() != expected or images.shape[-1] != self.config.prefix_size:
                layout = "(B, prefix_size)" if expected == 2 else "(B, N, prefix_size)"
                raise ValueError(f"image input of shape {tuple(images.shape)}: expected pixels (B, 3, S, S) or "
                                 f"{self.config.prefix_source} features {layout} with prefix_size "
                                 f"{self.config.prefix_size}")
            prefix = images
        if self.config.prefix_source == "pooled" and self.config.normalize_prefix:
            prefix = prefix / prefix.norm(2, -1, keepdim=True)
        return prefix


class PrefixCaptioner(nn.Module):
    """A prefix-LM image captioner that owns its tokenizer (``model.family: prefix``; the interface is
    ``models.families.CaptionModel``, as ``BlipCaptioner``).

    ``forward(pixel_values, input_ids, attention_mask) -> logits`` (B, T, V) aligned with
    ``build_targets(input_ids, attention_mask)`` (B, T); with ``head_features=True`` GPT-2's final hidden states
    and its (tied) output embedding instead, for ``models.objectives.caption_loss``'s SMILE path.
    """

    def __init__(self, model: PrefixLM, tokenizer, max_text_length: int = 40, append_eos: bool = True,
                 stop_token: str | None = ".", original_generation: bool = False, text_padding: str = "longest"):
        super().__init__()
        vocab = model.gpt.config.vocab_size
        if len(tokenizer) != vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but GPT-2's vocabulary has {vocab}")
        check_text_padding(text_padding)
        if tokenizer.eos_token_id is None:
            raise ValueError("the GPT-2 tokenizer has no eos token (<|endoftext|>)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.append_eos = append_eos
        self.stop_token = stop_token
        # ClipCap's stop id: the first id of the stop token's encoding (tokenizer.encode('.')[0]).
        self.stop_token_id = tokenizer.encode(stop_token)[0] if stop_token else None
        self.original_generation = original_generation
        self.text_padding = text_padding
        self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        # Where the CLIP tower came from (hub id, directory, or the random config), for the feature cache's
        # metadata; ``build`` sets it.
        self.clip_source: str | None = None
        limit = model.gpt.config.n_positions - self.prefix_length
        if max_text_length > limit:
            raise ValueError(f"max_text_length {max_text_length} + prefix {self.prefix_length} exceeds GPT-2's "
                             f"{model.gpt.config.n_positions} positions")

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, gpt2: str | Path | dict, clip: str | Path | dict | None = None, tokenizer: str | Path | None = None,
              prefix: PrefixConfig | dict | None = None, **options) -> "PrefixCaptioner":
        """A captioner from pre-trained parts or random toy stand-ins.

        Args:
            gpt2: a GPT-2 directory or hub id (pre-trained weights), or a dict of ``GPT2Config`` fields (random).
            clip: a CLIP directory or hub id (its vision tower and projection), a dict of ``CLIPVisionConfig``
                fields (random), or None for no image tower (prefix embeddings only).
            tokenizer: a GPT-2 tokenizer directory; default the ``gpt2`` directory.
            prefix: a ``PrefixConfig`` or a dict of its fields; ``prefix_size`` comes from the tower.
            options: ``max_text_length``, ``append_eos``, ``stop_token``, ``original_generation``, ``text_padding``.
        """
        tokenizer_key = "model.prefix.tokenizer"
        if tokenizer is None:
            if isinstance(gpt2, dict):
                raise ValueError("a random GPT-2 (gpt2 given as a config dict) needs tokenizer= (a directory)")
            tokenizer, tokenizer_key = gpt2, "model.prefix.gpt2"
        tokenizer = load_gpt2_tokenizer(tokenizer, tokenizer_key)
        if isinstance(gpt2, dict):  # GPT2Config's default ids (50256) are the real GPT-2's, not the toy vocabulary's
            gpt2 = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id, **gpt2}
        gpt = _build_gpt2(gpt2)
        vision = _build_vision(clip)
        config = _resolve_prefix_config(prefix, vision)
        captioner = cls(PrefixLM(config, gpt, vision), tokenizer, **options)
        if clip is not None:
            captioner.clip_source = json.dumps(clip, sort_keys=True) if isinstance(clip, dict) else str(clip)
        return captioner

    @classmethod
    def from_config(cls, model_config: dict) -> "PrefixCaptioner":
        """Build from a resolved config's ``model`` section (``model.family: prefix``), randomly initialised
        where ``model.prefix.gpt2`` / ``clip`` are config dicts; load weights with ``load_prefix_pretrained``.

        Reads ``model.prefix`` (``gpt2``, ``clip``, ``tokenizer``, the ``PrefixConfig`` fields, ``append_eos``,
        ``stop_token``, ``original_generation``) and ``model.max_text_length``, ``text_padding`` and
        ``gradient_checkpointing``.
        """
        cls.check_config(model_config, toy=False)
        options = dict(model_config.get("prefix") or {})
        text_keys = ("append_eos", "stop_token", "original_generation")
        text = {key: options.pop(key) for key in text_keys if key in options}
        gpt2, clip, tokenizer = options.pop("gpt2", None), options.pop("clip", None), options.pop("tokenizer", None)
        if options.get("mapping_type") != "transformer" or options.get("prefix_source") == "tokens":
            options.pop("clip_length", None)  # only the pooled transformer mapper uses it
        captioner = cls.build(gpt2, clip, tokenizer=tokenizer, prefix=options,
                              max_text_length=model_config.get("max_text_length", 40),
                              text_padding=model_config.get("text_padding", "longest"), **text)
        if model_config.get("gradient_checkpointing"):
            captioner.model.gpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return captioner

    @classmethod
    def check_config(cls, model_config: dict, toy: bool) -> None:
        """Reject a ``model`` section this family cannot build, before anything is built (ValueError)."""
        if (model_config.get("prefix") or {}).get("gpt2") is None:
            raise ValueError("model.family is prefix but model.prefix.gpt2 is not set (a GPT-2 hub id or folder, or "
                             "a mapping of GPT2Config fields for a random toy model)")

    @classmethod
    def config_sources(cls, model_config: dict) -> list[tuple[str, str | dict | None, str]]:
        """``(config key, source, kind)`` of the parts ``from_config`` loads: ``model.prefix.gpt2`` (kind
        "gpt2"), ``clip`` ("clip") and ``tokenizer`` ("tokenizer"); a source may be None (not used) or a dict
        (a random part built from its config)."""
        prefix = model_config.get("prefix") or {}
        return [(f"model.prefix.{part}", prefix.get(part), part) for part in ("gpt2", "clip", "tokenizer")]

    @classmethod
    def accepts_hub_weights(cls, source: str) -> bool:
        """Never: ``model.pretrained`` is a ClipCap ``.pt``, a ``save_directory`` folder or a checkpoint of this
        repository (GPT-2 and CLIP come from the hub through ``model.prefix`` instead)."""
        return False

    @classmethod
    def inference_config(cls, model_config: dict, checkpoint: Path, tokenizer: str | None = None,
                         prompt: str | None = None, attention: str = "sdpa") -> dict:
        """The ``model`` section that rebuilds a trained captioner from ``checkpoint``'s config for inference:
        ``tokenizer`` replaces ``model.prefix.tokenizer``; there is no prompt, and GPT-2 keeps its attention."""
        prefix = dict(model_config.get("prefix") or {})
        if tokenizer:
            prefix["tokenizer"] = tokenizer
        return {**model_config, "prefix": prefix, "gradient_checkpointing": False}

    @classmethod
    def from_exported(cls, source: str, **options) -> "PrefixCaptioner | None":
        """The captioner in ``source`` when it is a folder ``export_directory`` / ``save_directory`` wrote (it holds
        ``prefix_captioner.json``), else None; ``options`` (the ``Captioner.from_pretrained`` overrides) are BLIP's."""
        path = Path(source).expanduser()
        return cls.from_directory(path) if (path / PREFIX_DIRECTORY_FILE).is_file() else None

    def load_pretrained(self, source: str | Path, model_config: dict) -> None:
        """Load ``source`` (see ``load_prefix_pretrained``) into the weights, strict per ``model.strict_loading``."""
        load_prefix_pretrained(self, source, strict=model_config.get("strict_loading", True))

    def parameter_groups(self, weight_decay: float, decay_all: bool = True) -> list[dict]:
        """AdamW groups (models/parameter_groups.py) over what trains: the mapper always, GPT-2 unless
        ``only_prefix``, the CLIP tower only with ``train_vision`` (``PrefixLM`` freezes the rest)."""
        return weight_decay_groups(self, weight_decay, decay_all)

    def compile_parts(self, scope: str = "full", **options) -> "PrefixCaptioner":
        """``torch.compile`` in place, as ``BlipCaptioner.compile_parts``: "full" (``forward``) or "vision"."""
        if scope == "full":
            self.compile(**options)
        elif scope == "vision":
            if self.model.vision is None:
                raise ValueError("compile scope 'vision': this prefix captioner has no image tower")
            self.model.vision.compile(**options)
        else:
            raise ValueError(f"compile scope {scope!r}: expected 'full' or 'vision'")
        return self

    # ------------------------------------------------------------------------------------------- properties

    @property
    def config(self) -> PrefixConfig:
        return self.model.config

    @property
    def prefix_length(self) -> int:
        return self.model.config.prefix_length

    @property
    def device(self) -> torch.device:
        return self.model.gpt.lm_head.weight.device

    @property
    def image_size(self) -> int:
        if self.model.vision is None:
            raise ValueError("this prefix captioner has no image tower, so no image size")
        return self.model.vision.config.image_size

    @property
    def max_positions(self) -> int:
        """The most caption tokens GPT-2 can hold after the prefix (the largest useful ``max_length``)."""
        return self.model.gpt.config.n_positions - self.prefix_length

    def eval_transform(self):
        """CLIP's preprocessing: bicubic resize of the short side, centre crop, CLIP mean/std.

        ClipCap encodes images with ``clip.load(...)``'s preprocess, which keeps the aspect ratio and crops;
        BLIP's eval transform squashes to a square instead.
        """
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode

        size = self.image_size
        return transforms.Compose([
            transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(self.image_mean, self.image_std),
        ])

    # ---------------------------------------------------------------------------------------------- feature cache

    def cached_feature_key(self, transform_description: str) -> str | None:
        """A sha256 naming the image features ``encode_cache_batch`` makes, or None when they cannot be cached.

        None without a tower or with ``train_vision`` (the features change as the tower trains). Otherwise the
        features depend only on the tower and the preprocessing, so the key hashes: the CLIP source string, the
        tower's config (``transformers_version`` and private keys left out), a sha256 of every tower weight's
        bytes, ``prefix_source``, the image size and ``transform_description`` (e.g. ``repr`` of the transform).
        The weights are hashed rather than trusting the source string, because ``model.pretrained`` (one of this
        repository's checkpoints) or a seed-dependent random tower can change them under the same name; that costs
        ~0.2 s per 350 MB of weights (ViT-B/32), once per run. ``normalize_prefix`` is not part of it: the cache
        holds the raw embedding and ``image_prefix`` normalises.
        """
        vision = self.model.vision
        if vision is None or self.config.train_vision:
            return None
        weights = hashlib.sha256()
        for name, tensor in vision.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            weights.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
            weights.update(flat.view(torch.uint8).numpy())
        tower_config = {key: value for key, value in vision.config.to_dict().items()
                        if not key.startswith("_") and key != "transformers_version"}
        description = {"format": 1, "clip": self.clip_source, "vision_config": tower_config,
                       "weights_sha256": weights.hexdigest(), "prefix_source": self.config.prefix_source,
                       "image_size": self.image_size, "transform": transform_description}
        return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()

    @torch.no_grad()
    def encode_cache_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the feature cache stores for images (B, 3, S, S): ``PrefixLM.image_features`` (before
        ``normalize_prefix`` and the mapper), (B, prefix_size) or (B, N, prefix_size) float32 on the CPU.

        Computed on the captioner's device without autocast (float32, whatever ``train.amp`` says) and with the
        frozen tower in eval mode, as the training forward runs it; ``forward`` then takes these rows in place of
        pixels and gives the same loss.
        """
        if self.model.vision is None or self.config.train_vision:
            raise ValueError("this prefix captioner's image features are not frozen (no tower, or train_vision)")
        vision = self.model.vision
        was_training = vision.training
        vision.eval()
        try:
            with torch.autocast(self.device.type, enabled=False):
                features = self.model.image_features(pixel_values.to(self.device, non_blocking=True))
        finally:
            vision.train(was_training)
        return features.float().cpu()

    def fsdp_replicated(self) -> list[nn.Module]:
        """What ``train.sharding: fsdp`` keeps whole on every process (training/sharding.py): the frozen image tower.

        The feature cache hashes its weights on every rank (``cached_feature_key``) and runs it on one rank outside
        ``forward`` (``encode_cache_batch``), where no other rank takes part in an all-gather; frozen, it has no
        gradients or AdamW moments for FSDP to split, only its weights. A tower that trains (``train_vision``) is
        sharded like the rest (its features are then never cached).
        """
        vision = self.model.vision
        return [] if vision is None or self.config.train_vision else [vision]

    # ---------------------------------------------------------------------------------------------- text

    def tokenize(self, captions: list[str], padding: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), both (B, T) on the model's device.

        GPT-2 BPE with no BOS (``tokenizer.encode(caption)`` as ClipCap), then EOS when ``append_eos``;
        truncated to ``max_text_length`` tokens (EOS kept). Padding positions hold the EOS id, mask 0.
        """
        eos = self.tokenizer.eos_token_id
        budget = self.max_text_length - int(self.append_eos)
        rows = [ids[:budget] + ([eos] if self.append_eos else [])
                for ids in self.tokenizer(list(captions), add_special_tokens=False).input_ids]
        length = padded_length(max(map(len, rows)), self.max_text_length, padding or self.text_padding)
        return pad_rows(rows, length, eos, self.device)

    def build_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Targets (B, T): every caption token (``!`` included), padding IGNORE_INDEX. The one place that masks."""
        return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)

    def decode(self, generated_ids: torch.Tensor | list) -> list[str]:
        """Caption strings; EOS/padding dropped, the stop token (``.``) kept as ClipCap's output does."""
        return [text.strip() for text in self.tokenizer.batch_decode(generated_ids, skip_special_tokens=True)]

    # ---------------------------------------------------------------------------------------------- forward

    def _gpt_inputs(self, prefix_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """[prefix ; wte(tokens)] (B, P + T, W) and its mask (B, P + T) with the prefix always attended."""
        text = self.model.gpt.transformer.wte(input_ids)
        embeds = torch.cat((prefix_embeds.to(text.dtype), text), dim=1)
        prefix_mask = torch.ones(prefix_embeds.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat((prefix_mask, attention_mask), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
        head_features: bool = False,
    ) -> torch.Tensor | HeadFeatures:
        """Logits (B, T, V) with ``logits[:, t]`` scoring ``input_ids[:, t]`` (the prefix's last position predicts
        the first caption token), aligned with ``build_targets``.

        ``image_index`` (B,): the row of each caption's image in ``pixel_values`` (I, 3, S, S), so that several
        captions of one image share one image-tower and mapper pass (SCST's samples); default one per image.

        ``pixel_values`` may also be cached tower features (I, prefix_size) / (I, N, prefix_size) from
        ``encode_cache_batch``, which skip the tower (see ``PrefixLM.image_prefix``: pixels are always 4-D).

        ``head_features=True`` returns ``HeadFeatures(features, weight, None)``: GPT-2's final hidden states (B, T,
        W) (after ``ln_f``) and the output embedding (V, W), tied to the word embeddings, with no bias.
        """
        prefix_embeds = self.model.project(self.model.image_prefix(pixel_values))
        if image_index is not None:
            prefix_embeds = prefix_embeds.index_select(0, image_index)
        embeds, mask = self._gpt_inputs(prefix_embeds, input_ids, attention_mask)
        start = prefix_embeds.shape[1] - 1
        if head_features:
            hidden = self.model.gpt.transformer(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            return HeadFeatures(hidden.last_hidden_state[:, start:-1], self.model.gpt.lm_head.weight, None)
        return self.model.gpt(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, start:-1]

    def prefix_logits(self, prefix: torch.Tensor, tokens: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """ClipCap's ``model(tokens, prefix, mask).logits``: (B, P + T, V), unshifted, prefix positions included.

        Args:
            prefix: (B, prefix_size) CLIP embeddings (or (B, N, prefix_size) tokens), used as given.
            tokens: (B, T) caption ids as ClipCap's dataset pads them.
            mask: (B, P + T) attention mask over prefix and tokens, as ClipCap's dataset builds it.
        """
        prefix_embeds = self.model.project(prefix)
        text = self.model.gpt.transformer.wte(tokens)
        embeds = torch.cat((prefix_embeds, text), dim=1)
        return self.model.gpt(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits

    # ---------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_ids(
        self,
        pixel_values: torch.Tensor,
        sample: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        num_return_sequences: int = 1,
    ) -> torch.Tensor:
        """Caption ids (B * num_return_sequences, <= max_length), EOS-padded after a caption ends (``decode``
        drops the padding), image-major (the rows of image 0 first).

        ``max_length`` / ``min_length`` count caption tokens (there is no prompt), capped at ``max_positions``.
        With ``original_generation`` the best ClipCap ``generate_beam`` beams (``num_beams`` > 1) or ClipCap's
        ``generate2`` greedy caption (``num_beams`` 1) per image; otherwise transformers' batched ``generate``.
        ``num_return_sequences``: the best beams of each image, best first (at most ``num_beams``), or that many
        independent samples. ``no_repeat_ngram_size`` > 0 forbids an n-gram of that size from occurring twice in
        a caption (transformers' ``NoRepeatNGramLogitsProcessor``; the prefix is embeddings, not tokens, so only
        caption tokens count); ClipCap's own loops have no such rule, so ``original_generation`` refuses it.
        ``pixel_values``: pixels (B, 3, S, S) or cached tower features, as in ``forward``.
        """
        check_generation_counts(sample, num_beams, no_repeat_ngram_size, num_return_sequences)
        prefix_embeds = self.model.project(self.model.image_prefix(pixel_values))
        max_length = min(max_length, self.max_positions)
        if self.original_generation:
            if sample:
                raise ValueError("original_generation has no sampling (ClipCap's generate2 is greedy); set "
                                 "sample: false or original_generation: false")
            if no_repeat_ngram_size > 0:
                raise ValueError(f"original_generation (ClipCap's generate_beam / generate2) has no "
                                 f"no_repeat_ngram_size; got {no_repeat_ngram_size}: set it to 0 or "
                                 "original_generation: false")
            if num_beams > 1:
                beams = self._original_beam(prefix_embeds, num_beams, max_length)
                rows = [row for ranked in beams for row in ranked[:num_return_sequences]]
            else:
                rows = self._original_greedy(prefix_embeds, max_length)
            return self._pad_rows(rows)
        return self._hf_generate(prefix_embeds, sample=sample, num_beams=num_beams, max_length=max_length,
                                 min_length=min_length, top_p=top_p, repetition_penalty=repetition_penalty,
                                 no_repeat_ngram_size=no_repeat_ngram_size,
                                 num_return_sequences=num_return_sequences)

    @torch.no_grad()
    def sample_ids(self, pixel_values: torch.Tensor, num_samples: int = 1, max_new_tokens: int = 20,
                   greedy: bool = False) -> torch.Tensor:
        """SCST rollouts: (B * num_samples, L) caption ids in ``tokenize``'s layout, image-major, EOS-padded after
        a caption's end (EOS or the stop token, kept); ``sequence_mask`` gives their mask.

        Multinomial over the whole vocabulary at temperature 1 (no top-k, no nucleus), or the argmax with
        ``greedy`` (the self-critical baseline). Each image goes through the tower and mapper once.
        ``pixel_values``: pixels (B, 3, S, S) or cached tower features (a feature-cached SCST run), as in ``forward``.
        """
        prefix_embeds = self.model.project(self.model.image_prefix(pixel_values))
        eos = self.tokenizer.eos_token_id
        options = dict(max_new_tokens=min(max_new_tokens, self.max_positions), num_return_sequences=num_samples)
        if greedy:
            options.update(do_sample=False, num_beams=1)
        else:
            options.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, num_beams=1)
        generated = self.model.gpt.generate(
            inputs_embeds=prefix_embeds.to(self.model.gpt.lm_head.weight.dtype),
            attention_mask=torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device),
            eos_token_id=[eos] if self.stop_token_id is None else [eos, self.stop_token_id], pad_token_id=eos,
            **options,
        )
        return generated.masked_fill(self._after_end(generated), eos)

    def sequence_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Attention mask (B, T) of generated ids: 1 through a caption's end token (EOS or stop), 0 after it."""
        return (~self._after_end(ids)).long()

    def _after_end(self, ids: torch.Tensor, stop_id: int | None = None) -> torch.Tensor:
        """(B, T) True after a caption's end: EOS, or the stop token (``stop_id``, default ``stop_token``'s)."""
        stop_id = self.stop_token_id if stop_id is None else stop_id
        return after_first_end(ids, [self.tokenizer.eos_token_id] + ([] if stop_id is None else [stop_id]))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, **options) -> list[str]:
        """Captions for a batch of images (B, 3, H, W): B * ``num_return_sequences`` strings, image-major.
        Options as in ``generate_ids``."""
        return self.decode(self.generate_ids(pixel_values, **options))

    @torch.no_grad()
    def generate_from_prefix(self, prefix: torch.Tensor, method: str = "beam", beam_size: int = 3,
                             max_tokens: int = 12, stop_token: str = ".", original_semantics: bool = True) -> list:
        """Token ids for each row of ``prefix`` (B, prefix_size) CLIP embeddings (used as given).

        ``method="beam"``: per row, the ranked list of ``beam_size`` beams, each a list of ids; ``"greedy"``: per
        row, one list. ``original_semantics=True`` runs ClipCap's ``generate_beam`` / ``generate2`` exactly (one
        image at a time, no KV cache, no attention mask, stop after emitting ``stop_token``, up to ``max_tokens``).
        Otherwise transformers' batched beam search / greedy, stopping at EOS or ``stop_token``.
        """
        if method not in ("beam", "greedy"):
            raise ValueError(f"method must be 'beam' or 'greedy', got {method!r}")
        stop_id = self.tokenizer.encode(stop_token)[0]
        prefix_embeds = self.model.project(prefix)
        if original_semantics:
            if method == "beam":
                return self._original_beam(prefix_embeds, beam_size, max_tokens, stop_id)
            return self._original_greedy(prefix_embeds, max_tokens, stop_id)
        beams = beam_size if method == "beam" else 1
        ids = self._hf_generate(prefix_embeds, sample=False, num_beams=beams, max_length=max_tokens, min_length=0,
                                top_p=1.0, repetition_penalty=1.0, num_return_sequences=beams, stop_id=stop_id)
        rows = self._trim_rows(ids, stop_id)
        if method == "greedy":
            return rows
        return [rows[index : index + beams] for index in range(0, len(rows), beams)]

    def _hf_generate(self, prefix_embeds, sample, num_beams, max_length, min_length, top_p, repetition_penalty,
                     num_return_sequences: int = 1, stop_id: int | None = None,
                     no_repeat_ngram_size: int = 0) -> torch.Tensor:
        """transformers' ``generate`` on ``inputs_embeds`` (B, P, W); returns only the new ids (B * R, <= L),
        image-major."""
        eos = self.tokenizer.eos_token_id
        stop_id = self.stop_token_id if stop_id is None else stop_id
        options = dict(max_new_tokens=max_length, min_new_tokens=min(min_length, max_length),
                       repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
                       no_repeat_ngram_size=no_repeat_ngram_size)
        if sample:
            options.update(do_sample=True, top_p=top_p, top_k=50, num_beams=1)
        else:
            options.update(do_sample=False, num_beams=num_beams)
        attention_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)
        with warnings.catch_warnings():
            # transformers warns that the n-gram ban skips the prompt when there are only ``inputs_embeds``: here
            # the prompt is the image prefix, which has no tokens to ban, so that is the intended behaviour.
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            generated = self.model.gpt.generate(
                inputs_embeds=prefix_embeds.to(self.model.gpt.lm_head.weight.dtype),
                attention_mask=attention_mask,
                eos_token_id=[eos] if stop_id is None else [eos, stop_id],
                pad_token_id=eos,
                **options,
            )
        # After the first stop (".") or EOS, everything is padding (EOS), which decode drops.
        return generated.masked_fill(self._after_end(generated, stop_id), eos)

    def _trim_rows(self, ids: torch.Tensor, stop_id: int) -> list[list[int]]:
        """Rows of ids cut after the stop token (kept) or before EOS (dropped)."""
        eos = self.tokenizer.eos_token_id
        rows = []
        for row in ids.tolist():
            out = []
            for token in row:
                if token == eos:
                    break
                out.append(token)
                if token == stop_id:
                    break
            rows.append(out)
        return rows

    def _pad_rows(self, rows: list[list[int]]) -> torch.Tensor:
        eos = self.tokenizer.eos_token_id
        out = torch.full((len(rows), max(1, max(map(len, rows)))), eos, dtype=torch.long)
        for index, ids in enumerate(rows):
            out[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out.to(self.device)

    def _next_logits(self, generated: torch.Tensor) -> torch.Tensor:
        """Last-position logits (R, V) of GPT-2 over the whole sequence, recomputed as ClipCap does."""
        return self.model.gpt(inputs_embeds=generated, use_cache=False).logits[:, -1, :]

    def _original_beam(self, prefix_embeds: torch.Tensor, beam_size: int, entry_length: int,
                       stop_id: int | None = None, temperature: float = 1.0) -> list[list[list[int]]]:
        """ClipCap's ``generate_beam``, one image at a time: per image the beams, best first.

        Scores are summed log-probabilities (``softmax().log()`` as the original); a beam that emitted the stop
        token only extends with token 0 at log-prob 0 and its length stops growing; candidates are ranked by
        score / length, and the final beams by score / length, each cut to its own length.
        """
        stop_id = self.stop_token_id if stop_id is None else stop_id
        wte = self.model.gpt.transformer.wte
        prefix_embeds = prefix_embeds.to(wte.weight.dtype)  # a bf16 mapper output under autocast
        results = []
        for index in range(prefix_embeds.shape[0]):
            generated = prefix_embeds[index : index + 1]
            device = generated.device
            tokens, scores = None, None
            seq_lengths = torch.ones(beam_size, device=device)
            is_stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
            for _ in range(entry_length):
                logits = self._next_logits(generated) / (temperature if temperature > 0 else 1.0)
                logits = logits.softmax(-1).log()
                if scores is None:
                    scores, next_tokens = logits.topk(beam_size, -1)  # (1, K) each
                    generated = generated.expand(beam_size, *generated.shape[1:])
                    next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)  # (K, 1), (K,)
                    tokens = next_tokens
                else:
                    logits[is_stopped] = -float("inf")
                    logits[is_stopped, 0] = 0
                    scores_sum = scores[:, None] + logits  # (K, V)
                    seq_lengths[~is_stopped] += 1
                    scores_sum_average = scores_sum / seq_lengths[:, None]
                    scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
                    next_tokens_source = next_tokens // scores_sum.shape[1]
                    seq_lengths = seq_lengths[next_tokens_source]
                    next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
                    tokens = torch.cat((tokens[next_tokens_source], next_tokens), dim=1)
                    generated = generated[next_tokens_source]
                    scores = scores_sum_average * seq_lengths
                    is_stopped = is_stopped[next_tokens_source]
                next_embed = wte(next_tokens.view(-1)).view(generated.shape[0], 1, -1)
                generated = torch.cat((generated, next_embed), dim=1)
                is_stopped = is_stopped | next_tokens.eq(stop_id).view(-1)
                if is_stopped.all():
                    break
            scores = scores / seq_lengths
            rows = [row[: int(length)] for row, length in zip(tokens.tolist(), seq_lengths.tolist())]
            results.append([rows[i] for i in scores.argsort(descending=True).tolist()])
        return results

    def _original_greedy(self, prefix_embeds: torch.Tensor, entry_length: int, stop_id: int | None = None,
                         top_p: float = 0.8, temperature: float = 1.0) -> list[list[int]]:
        """ClipCap's ``generate2``, one image at a time: nucleus (``top_p``) filtering, then argmax.

        The argmax always survives the filter, so this is greedy decoding; the filter is kept so that ties
        break as in the original. Stops after emitting the stop token or after ``entry_length`` tokens.
        """
        stop_id = self.stop_token_id if stop_id is None else stop_id
        wte = self.model.gpt.transformer.wte
        prefix_embeds = prefix_embeds.to(wte.weight.dtype)  # a bf16 mapper output under autocast
        results = []
        for index in range(prefix_embeds.shape[0]):
            generated = prefix_embeds[index : index + 1]
            tokens: list[int] = []
            for _ in range(entry_length):
                logits = self._next_logits(generated) / (temperature if temperature > 0 else 1.0)  # (1, V)
                sorted_logits, sorted_indices = torch.sort(logits, descending=True)
                cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
                remove = cumulative > top_p
                remove[..., 1:] = remove[..., :-1].clone()
                remove[..., 0] = False
                logits[:, sorted_indices[remove]] = -float("inf")
                next_token = torch.argmax(logits, -1).unsqueeze(0)  # (1, 1)
                tokens.append(int(next_token.item()))
                generated = torch.cat((generated, wte(next_token)), dim=1)
                if tokens[-1] == stop_id:
                    break
            results.append(tokens)
        return results

    # ---------------------------------------------------------------------------------------------- saving

    def save_directory(self, output_dir: str | Path) -> Path:
        """Write ``gpt2/`` (GPT-2 + tokenizer), ``clip/`` (the tower, if any), ``prefix_mapper.safetensors``
        and ``prefix_captioner.json`` (the PrefixConfig and text options); ``from_directory`` reads it back."""
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.gpt.save_pretrained(output_dir / "gpt2")
        self.tokenizer.save_pretrained(output_dir / "gpt2")
        if self.model.vision is not None:
            self.model.vision.save_pretrained(output_dir / "clip")
        mapper = {k: v.detach().cpu().contiguous() for k, v in self.model.clip_project.state_dict().items()}
        save_file(mapper, str(output_dir / "prefix_mapper.safetensors"))
        extras = {"prefix": asdict(self.config), "max_text_length": self.max_text_length,
                  "append_eos": self.append_eos, "stop_token": self.stop_token}
        (output_dir / PREFIX_DIRECTORY_FILE).write_text(json.dumps(extras, indent=2))
        return output_dir

    def export_directory(self, output_dir: str | Path) -> Path:
        """What scripts/export_hf.py writes for this family: ``save_directory``'s transformers GPT-2 and CLIP
        folders plus the mapper, loadable with ``PrefixCaptioner.from_directory`` (or ``Captioner``)."""
        return self.save_directory(output_dir)

    @classmethod
    def from_directory(cls, directory: str | Path, **options) -> "PrefixCaptioner":
        """Load what ``save_directory`` wrote; ``options`` override the saved text options."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_file = directory / PREFIX_DIRECTORY_FILE
        if not meta_file.is_file():
            raise CheckpointError(f"{directory}: no prefix_captioner.json, not a prefix captioner directory")
        meta = json.loads(meta_file.read_text())
        clip = directory / "clip" if (directory / "clip").is_dir() else None
        model = PrefixLM(PrefixConfig(**meta.pop("prefix")), GPT2LMHeadModel.from_pretrained(directory / "gpt2"),
                         CLIPVisionModelWithProjection.from_pretrained(clip) if clip else None)
        _load_strict(model.clip_project, load_file(str(directory / "prefix_mapper.safetensors")),
                     f"{directory / 'prefix_mapper.safetensors'}", prefix="clip_project.")
        return cls(model, load_gpt2_tokenizer(directory / "gpt2"), **{**meta, **options})


# -------------------------------------------------------------------------------------------------- pretrained


def apply_prefix_state_dict(model: PrefixLM, state_dict: dict[str, torch.Tensor], source: str,
                            required: tuple[str, ...] = ("gpt.", "clip_project.", "vision."),
                            strict: bool = True) -> None:
    """Load ``state_dict`` (``PrefixLM`` names) into ``model``; every key must be used and fit.

    The legacy GPT-2 attention buffers of transformers 4.1x files are dropped. Model keys under ``required``
    prefixes that the file lacks are missing (the tied ``gpt.lm_head.weight`` excepted: it is the word
    embedding); unexpected keys, missing keys and shape mismatches are one error naming them, or with
    ``strict=False`` a warning (and the model keeps its own values for those keys).
    """
    own = model.state_dict()
    dropped = [k for k in state_dict if _LEGACY_GPT2_BUFFERS.match(k) and k not in own]
    weights = {k: v for k, v in state_dict.items() if k not in dropped}
    missing = sorted(k for k in own if k.startswith(required) and k not in weights and k != _TIED_LM_HEAD)
    unexpected = sorted(set(weights) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        message = (f"{source} does not match this prefix captioner ({model.config}): missing keys {missing[:20]}, "
                   f"unexpected keys {unexpected[:20]}, shape mismatches {mismatched[:20]}")
        if strict:
            raise CheckpointError(message)
        logger.warning(message)
    head, embeddings = weights.get(_TIED_LM_HEAD), weights.get("gpt.transformer.wte.weight")
    if (model.gpt.lm_head.weight is model.gpt.transformer.wte.weight and head is not None
            and embeddings is not None and not torch.equal(head, embeddings)):
        raise CheckpointError(f"{source}: gpt.lm_head.weight differs from the word embeddings, but this GPT-2 "
                              "ties them (tie_word_embeddings)")
    model.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}, strict=False)
    if dropped:
        logger.info("%s: dropped %d legacy GPT-2 attention buffer(s) (transformers 4.1x layout)", source, len(dropped))


def load_prefix_pretrained(captioner: PrefixCaptioner, source: str | Path, strict: bool = True) -> None:
    """Load weights into ``captioner`` from, by the form of ``source``:

    * this repository's checkpoint (``checkpoint_*.safetensors``): every weight, the tower's included;
    * a directory written by ``save_directory`` / ``scripts/convert_checkpoint.py``: GPT-2, mapper, and the
      tower if the directory holds one (otherwise the captioner's own tower is kept);
    * an original ClipCap ``.pt`` state dict: GPT-2 and mapper (the captioner's CLIP tower is kept).
    """
    from .checkpoint import is_own_checkpoint, load_checkpoint_file

    path = Path(source).expanduser()
    if path.is_dir():
        from safetensors.torch import load_file

        if not (path / "prefix_captioner.json").is_file():
            raise CheckpointError(f"{path}: no prefix_captioner.json, not a prefix captioner directory")
        weights = {f"gpt.{k}": v for k, v in GPT2LMHeadModel.from_pretrained(path / "gpt2").state_dict().items()}
        weights.update({f"clip_project.{k}": v for k, v in load_file(str(path / "prefix_mapper.safetensors")).items()})
        required = ("gpt.", "clip_project.")
        if (path / "clip").is_dir():
            tower = CLIPVisionModelWithProjection.from_pretrained(path / "clip").state_dict()
            weights.update({f"vision.{k}": v for k, v in tower.items()})
            required += ("vision.",)
        apply_prefix_state_dict(captioner.model, weights, str(path), required, strict)
    elif path.is_file() and path.suffix == ".safetensors" and is_own_checkpoint(path):
        apply_prefix_state_dict(captioner.model, load_checkpoint_file(path)[0], str(path), strict=strict)
    elif path.is_file():
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"cannot read {path} as plain tensors (weights_only=True): {error}") from error
        if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
            raise CheckpointError(f"{path}: expected a plain ClipCap state dict of tensors")
        apply_prefix_state_dict(captioner.model, state_dict, str(path), ("gpt.", "clip_project."), strict)
    else:
        raise CheckpointError(f"prefix captioner weights {source}: no such file or directory")
    logger.info("loaded %s into the prefix captioner", source)


# -------------------------------------------------------------------------------------------------- loss


def clipcap_original_loss(logits: torch.Tensor, tokens: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """ClipCap's training loss, for parity checks only: ``cross_entropy(logits[:, P-1:-1], tokens, ignore_index=0)``.

    ``logits`` (B, P + T, V) from ``prefix_logits``; ``tokens`` (B, T) 0-padded. Id 0 is both the padding and
    GPT-2's ``!``, so real ``!`` tokens are ignored too; the mean is over the remaining tokens. Training in this
    repository uses ``build_targets`` (padding -> -100) instead.
    """
    shifted = logits[:, prefix_length - 1 : -1]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), tokens.flatten(), ignore_index=0)


# -------------------------------------------------------------------------------------------------- loading


# Hub ids and folders load through hub.from_pretrained: ``what`` is the config key named when a hub id cannot be
# fetched on this machine (one line at once instead of minutes of retries).


def load_gpt2_tokenizer(source: str | Path, what: str = "model.prefix.tokenizer"):
    """The tokenizer saved with a GPT-2: whatever class its files name (GPT-2's BPE, or e.g. the toy GPT-2's
    word-level ``tokenizer.json``), or GPT-2's BPE from a bare ``vocab.json`` + ``merges.txt`` folder."""
    from transformers import AutoTokenizer

    try:
        return hub.from_pretrained(AutoTokenizer.from_pretrained, source, what)
    except (OSError, ValueError, KeyError):
        return hub.from_pretrained(GPT2TokenizerFast.from_pretrained, source, what)


def _build_gpt2(source: str | Path | dict, what: str = "model.prefix.gpt2") -> GPT2LMHeadModel:
    if isinstance(source, dict):
        return GPT2LMHeadModel(GPT2Config(**source))
    return hub.from_pretrained(GPT2LMHeadModel.from_pretrained, source, what)


def _build_vision(source: str | Path | dict | None,
                  what: str = "model.prefix.clip") -> CLIPVisionModelWithProjection | None:
    if source is None:
        return None
    if isinstance(source, dict):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**source))
    from transformers import AutoConfig, CLIPConfig

    config = hub.from_pretrained(AutoConfig.from_pretrained, source, what)
    if isinstance(config, CLIPConfig):
        # A full CLIPModel directory: the projection width is the model's, which the vision sub-config does not
        # carry (its own default is 512, right for ViT-B/32 only).
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        return hub.from_pretrained(CLIPVisionModelWithProjection.from_pretrained, source, what, config=vision_config)
    return hub.from_pretrained(CLIPVisionModelWithProjection.from_pretrained, source, what)


def _resolve_prefix_config(prefix: PrefixConfig | dict | None, vision) -> PrefixConfig:
    fields = asdict(prefix) if isinstance(prefix, PrefixConfig) else dict(prefix or {})
    valid = list(PrefixConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown prefix option(s) {unknown}; valid options: {valid}")
    source = fields.get("prefix_source", "pooled")
    if vision is not None:
        size = vision.config.projection_dim if source == "pooled" else vision.config.hidden_size
        if fields.get("prefix_size", size) != size:
            raise ValueError(f"prefix_size {fields['prefix_size']} does not match the CLIP tower's {size}")
        fields["prefix_size"] = size
        if source == "tokens" and fields.get("mapping_type", "mlp") == "mlp":
            patches = (vision.config.image_size // vision.config.patch_size) ** 2
            if fields.get("prefix_length", patches) != patches:
                raise ValueError(f"a token-wise MLP makes one prefix embedding per patch: prefix_length must be "
                                 f"{patches} for this tower, got {fields['prefix_length']}")
            fields["prefix_length"] = patches
    if fields.get("mapping_type") == "transformer" and source == "pooled" and fields.get("clip_length") is None:
        fields["clip_length"] = 10  # ClipCap's default (--prefix_length_clip 10)
    return PrefixConfig(**fields)


def _load_strict(module: nn.Module, state_dict: dict, source: str, prefix: str = "") -> None:
    """Load with every missing/unexpected key or shape mismatch an error naming the keys."""
    expected = module.state_dict()
    missing = sorted(prefix + k for k in set(expected) - set(state_dict))
    unexpected = sorted(prefix + k for k in set(state_dict) - set(expected))
    mismatched = [f"{prefix}{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source}: missing keys {missing}, unexpected keys {unexpected}, "
                              f"shape mismatches {mismatched}")
    module.load_state_dict(state_dict)


def load_clipcap_checkpoint(
    path: str | Path,
    gpt2: str | Path,
    mapping_type: str = "mlp",
    prefix_length: int = 10,
    clip_length: int | None = None,
    num_layers: int = 8,
    prefix_size: int = 512,
    clip: str | Path | dict | None = None,
    num_heads: int = 8,
    normalize_prefix: bool | None = None,
    **options,
) -> PrefixCaptioner:
    """A ``PrefixCaptioner`` holding an original ClipCap ``state_dict`` (``coco_weights.pt`` and the like).

    Args:
        path: the ``.pt`` file (a plain state dict of ``clip_project.*`` and ``gpt.*``), read with
            ``weights_only=True``.
        gpt2: a GPT-2 directory (config + tokenizer) giving the architecture; its weights, if any, are replaced.
        mapping_type, prefix_length, clip_length, num_layers, prefix_size: as ClipCap's ``ClipCaptionModel``.
            ``clip_length`` None for the transformer mapper is read from ``clip_project.linear``'s shape.
        clip: optionally a CLIP directory/hub id (or config dict) for the image tower, so the captioner can
            caption images; its projection width must equal ``prefix_size``. Without it, use the prefix methods.
        normalize_prefix: L2-normalise CLIP embeddings from the tower before the mapper; default: on for the
            transformer mapper (ClipCap's transformer recipe), off for MLP.
        options: ``PrefixCaptioner`` options (``append_eos`` defaults to False here, as ClipCap had no EOS).

    The legacy ``gpt.transformer.h.N.attn.bias`` / ``attn.masked_bias`` buffers of checkpoints saved under
    transformers 4.1x are dropped; any other missing or unexpected key (or shape mismatch) is an error.
    """
    path = Path(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"ClipCap checkpoint not found: {path}") from None
    except Exception as error:
        raise CheckpointError(f"cannot read {path} as plain tensors (weights_only=True): {error}") from error
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"{path}: expected a plain state dict of tensors (ClipCap's torch.save(state_dict))")
    gpt_config = hub.from_pretrained(GPT2Config.from_pretrained, gpt2, "gpt2")
    if mapping_type == "transformer" and clip_length is None:
        linear = state_dict.get("clip_project.linear.weight")
        if linear is None:
            raise CheckpointError(f"{path}: no clip_project.linear.weight, so not a transformer-mapper checkpoint")
        clip_length = linear.shape[0] // gpt_config.n_embd
    config = PrefixConfig(mapping_type=mapping_type, prefix_source="pooled", prefix_length=prefix_length,
                          clip_length=clip_length, num_layers=num_layers, num_heads=num_heads,
                          prefix_size=prefix_size,
                          normalize_prefix=(mapping_type == "transformer") if normalize_prefix is None
                          else normalize_prefix)
    vision = _build_vision(clip, "clip")
    if vision is not None and vision.config.projection_dim != prefix_size:
        raise ValueError(f"the CLIP tower projects to {vision.config.projection_dim}, the checkpoint's "
                         f"prefix_size is {prefix_size}")
    model = PrefixLM(config, GPT2LMHeadModel(gpt_config), vision)
    source = (f"{path} (ClipCap mapping_type={mapping_type!r}, prefix_length={prefix_length}, clip_length="
              f"{clip_length}, num_layers={num_layers}, prefix_size={prefix_size}, GPT-2 {gpt2})")
    apply_prefix_state_dict(model, state_dict, source, required=("gpt.", "clip_project."))
    options.setdefault("append_eos", False)
    return PrefixCaptioner(model, load_gpt2_tokenizer(gpt2, "gpt2"), **options)
