"""BLIP captioner: transformers' ``BlipForConditionalGeneration`` plus the tokenizer and prompt, with BLIP's semantics.

Layout of one training sequence (BLIP's ``BLIP_Decoder``)::

    input_ids  = [DEC] a picture of  <caption tokens>  [SEP] [PAD] ...
                 |--- prompt_length ---|
    logits[:, t] predicts input_ids[:, t + 1]          (B, L - 1, V)
    targets      = input_ids[:, 1:], with the prompt and padding set to -100   (B, L - 1)

``prompt_length`` counts the bos token, as in BLIP (4 for ``'a picture of '``), so the first scored target is the
first caption token. Captions are truncated at ``max_text_length`` (40) tokens, prompt included.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

import hub
from imaging import eval_transform

from .attention import attention_of, set_attention
from .generation import check_generation_counts
from .objectives import IGNORE_INDEX, HeadFeatures
from .parameter_groups import weight_decay_groups
from .text_padding import after_first_end, check_text_padding, pad_to, padded_length

DEFAULT_PROMPT = "a picture of "
DEFAULT_TOKENIZER = "bert-base-uncased"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BlipArchitecture:
    """Sizes of a BLIP captioner. ``text_cross_width`` is taken from ``vision_width`` (the decoder cross-attends
    to the ViT's tokens), so a ViT-L encoder feeds 1024-wide keys/values into a 768-wide BERT decoder."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    patch_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_positions: int = 512
    vision_layer_norm_eps: float = 1e-6  # timm ViT in BLIP; transformers' default (1e-5) would drift
    text_layer_norm_eps: float = 1e-12
    text_dropout: float = 0.1  # BLIP's med_config.json: hidden and attention dropout


ARCHITECTURES: dict[str, BlipArchitecture] = {
    # ViT-B/16 + BERT-base decoder: model_base_caption_capfilt_large.pth and the SMILE checkpoints.
    "base": BlipArchitecture(768, 12, 12, 3072, 16, 768, 12, 12, 3072),
    # ViT-L/16 + BERT-base decoder: model_large_caption.pth.
    "large": BlipArchitecture(1024, 24, 16, 4096, 16, 768, 12, 12, 3072),
    # For tests and the CPU toy study (configs/toy/pretrain.yaml trains it from scratch at 64 px on 2 cores).
    "tiny": BlipArchitecture(64, 2, 4, 256, 8, 64, 2, 4, 256, max_positions=64),
}


def resolve_architecture(arch: str | BlipArchitecture | dict) -> BlipArchitecture:
    """A preset name, a BlipArchitecture, or a dict of its fields (optionally ``{preset: name, **overrides}``)."""
    if isinstance(arch, BlipArchitecture):
        return arch
    if isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; valid presets: {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[arch]
    fields = dict(arch)
    preset = fields.pop("preset", None)
    base = resolve_architecture(preset) if preset else None
    valid = [f.name for f in dataclasses.fields(BlipArchitecture)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown architecture field(s) {unknown}; valid fields: {valid}")
    return dataclasses.replace(base, **fields) if base else BlipArchitecture(**fields)


def build_tokenizer(source: str | Path = DEFAULT_TOKENIZER, what: str = "model.tokenizer") -> BertTokenizer:
    """BERT WordPiece tokenizer with BLIP's extra tokens: ``[DEC]`` as bos and ``[ENC]`` as an additional special.

    Args:
        source: a hub id (``bert-base-uncased``), a tokenizer directory, or a path to a ``vocab.txt`` file
            (its folder is loaded). BERT-base ends with 30524 ids, as BLIP's checkpoints expect.
        what: the config key ``source`` came from, named in the error when it cannot be loaded (hub.py: a hub id
            on a machine without network fails at once, in one line).
    """
    if source is None:  # the configs' null means "the toy set's vocab", which the trainer fills in only for data.toy
        raise ValueError(f"{what} is null: give a hub id (bert-base-uncased), a tokenizer directory or a vocab.txt")
    path = Path(source).expanduser()
    if path.is_file():
        if path.name != "vocab.txt":
            raise ValueError(f"tokenizer file must be named vocab.txt (one WordPiece token per line): {path}")
        path = path.parent
    tokenizer = hub.from_pretrained(BertTokenizer.from_pretrained, path if path.exists() else source, what)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build_blip_config(arch: BlipArchitecture, image_size: int, tokenizer: BertTokenizer) -> BlipConfig:
    """A transformers BlipConfig equal to BLIP's ViT + med_config.json for the given sizes."""
    vision = dict(
        hidden_size=arch.vision_width,
        intermediate_size=arch.vision_mlp,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=image_size,
        patch_size=arch.patch_size,
        layer_norm_eps=arch.vision_layer_norm_eps,
        attention_dropout=0.0,
        hidden_act="gelu",
        # BLIP's vit.py initialises the ViT's linear layers, position and class embeddings from N(0, 0.02) (its
        # patch convolution keeps PyTorch's default, std 1/sqrt(3 fan_in): 0.021 for ViT-B/16; here N(0, 0.02)).
        # transformers' BlipVisionConfig defaults to 1e-10, which starts every vision weight at ~0: harmless when
        # pre-trained weights are loaded, but a ViT trained from scratch (the toy "pre-trained" model) would not
        # start where BLIP's does.
        initializer_range=0.02,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_width,
        encoder_hidden_size=arch.vision_width,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_positions,
        layer_norm_eps=arch.text_layer_norm_eps,
        hidden_dropout_prob=arch.text_dropout,
        attention_probs_dropout_prob=arch.text_dropout,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        label_smoothing=0.0,
    )
    return BlipConfig(vision_config=vision, text_config=text)


class BlipCaptioner(nn.Module):
    """A BLIP image captioner that owns its tokenizer and prompt (``model.family: blip``; the interface is
    ``models.families.CaptionModel``).

    ``forward(pixel_values, input_ids, attention_mask) -> logits`` (B, L - 1, V), aligned with
    ``build_targets(input_ids, attention_mask)`` (B, L - 1); with ``head_features=True`` the LM head's input and
    weights instead, so that ``models.objectives.caption_loss`` can compute SMILE without the full logits.
    """

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        tokenizer: BertTokenizer,
        prompt: str = DEFAULT_PROMPT,
        max_text_length: int = 40,
        text_padding: str = "longest",
    ):
        super().__init__()
        check_text_padding(text_padding)
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) != vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the decoder's vocabulary has {vocab}")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_text_length = max_text_length
        # "bucket" and "max_length" give torch.compile and CUDA graphs few text shapes (models/text_padding.py).
        self.text_padding = text_padding
        # BLIP: len(tokenizer(prompt).input_ids) - 1, i.e. bos + prompt words without [SEP].
        self.prompt_length = len(tokenizer(prompt).input_ids) - 1

    @classmethod
    def build(
        cls,
        arch: str | BlipArchitecture | dict = "base",
        image_size: int = 384,
        tokenizer: str | Path | BertTokenizer = DEFAULT_TOKENIZER,
        prompt: str = DEFAULT_PROMPT,
        max_text_length: int = 40,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        text_padding: str = "longest",
    ) -> "BlipCaptioner":
        """A randomly initialised captioner; load weights with ``models.checkpoint.load_pretrained``.

        ``attention``: "sdpa" (fused ``scaled_dot_product_attention``, models/attention.py) or "eager"
        (transformers' own BLIP attention). Both hold the same weights under the same names.
        """
        if not isinstance(tokenizer, BertTokenizer):
            tokenizer = build_tokenizer(tokenizer)
        config = build_blip_config(resolve_architecture(arch), image_size, tokenizer)
        model = BlipForConditionalGeneration(config)
        if gradient_checkpointing:
            # transformers 5 renamed the switch and its argument; 4.57 only has the old name.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        set_attention(model, attention)
        return cls(model, tokenizer, prompt=prompt, max_text_length=max_text_length, text_padding=text_padding)

    @classmethod
    def from_config(cls, model_config: dict) -> "BlipCaptioner":
        """Build from a resolved config's ``model`` section (``model.family: blip``); random weights."""
        return cls.build(
            arch=model_config["arch"],
            image_size=model_config["image_size"],
            tokenizer=model_config["tokenizer"],
            prompt=model_config["prompt"],
            max_text_length=model_config["max_text_length"],
            gradient_checkpointing=model_config.get("gradient_checkpointing", False),
            attention=model_config.get("attention", "sdpa"),
            text_padding=model_config.get("text_padding", "longest"),
        )

    @classmethod
    def check_config(cls, model_config: dict, toy: bool) -> None:
        """Reject a ``model`` section this family cannot build, before anything is built (ValueError)."""
        if model_config["tokenizer"] is None and not toy:
            raise ValueError(
                "model.tokenizer is null, which means the toy set's vocab.txt, but data.toy is false: set "
                "model.tokenizer to the vocab.txt the model is trained with (the toy set's is "
                "<data.toy_root>/vocab.txt, e.g. cache/toy/vocab.txt), a tokenizer folder, or a hub id such as "
                "bert-base-uncased")

    @classmethod
    def config_sources(cls, model_config: dict) -> list[tuple[str, str, str]]:
        """``(config key, source, kind)`` of what ``from_config`` loads besides ``model.pretrained``: the tokenizer."""
        tokenizer = model_config["tokenizer"]
        return [] if tokenizer is None else [("model.tokenizer", tokenizer, "tokenizer")]

    @classmethod
    def accepts_hub_weights(cls, source: str) -> bool:
        """A hub id (``Salesforce/blip-image-captioning-base``) is a valid ``model.pretrained``."""
        from .checkpoint import looks_like_hub_id

        return looks_like_hub_id(source)

    @classmethod
    def inference_config(cls, model_config: dict, checkpoint: Path, tokenizer: str | None = None,
                         prompt: str | None = None, attention: str = "sdpa") -> dict:
        """The ``model`` section that rebuilds a trained captioner from ``checkpoint``'s config on this machine.

        ``tokenizer`` and ``prompt`` override the config's; a ``model.tokenizer`` path that moved with the
        repository is found relative to its root, and one that exists nowhere here is a CheckpointError asking
        for ``tokenizer=``. Gradient checkpointing is off (inference).
        """
        resolved = tokenizer or _resolve_tokenizer(str(model_config["tokenizer"] or DEFAULT_TOKENIZER), checkpoint)
        return {**model_config, "attention": attention, "gradient_checkpointing": False, "tokenizer": resolved,
                "prompt": model_config.get("prompt", DEFAULT_PROMPT) if prompt is None else prompt}

    @classmethod
    def from_exported(cls, source: str, tokenizer: str | None = None, prompt: str | None = None,
                      attention: str = "sdpa", arch: str = "base", image_size: int = 384,
                      cache_dir: str | Path | None = None, sha256: str | None = None) -> "BlipCaptioner | None":
        """The captioner in ``source`` when it is a BLIP form other than a training checkpoint, else None:

        * a transformers directory (``export_directory`` writes one) or a hub id: its own config and tokenizer,
          and, when present, ``smile_blip.json`` (prompt, max_text_length);
        * an original BLIP/SMILE ``.pth`` (path or URL), built as ``arch`` at ``image_size``.
        """
        from .checkpoint import DEFAULT_CACHE_DIR, load_pretrained, looks_like_hub_id

        path = Path(source).expanduser()
        if path.is_dir():
            return _from_transformers(source, tokenizer, prompt, attention) if (path / "config.json").is_file() \
                else None
        if not path.exists() and looks_like_hub_id(source):
            return _from_transformers(source, tokenizer, prompt, attention)
        if path.is_file() or hub.is_url(source):
            model = cls.build(arch, image_size=image_size, tokenizer=tokenizer or DEFAULT_TOKENIZER,
                              prompt=DEFAULT_PROMPT if prompt is None else prompt, attention=attention)
            load_pretrained(model, source, cache_dir=Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(), sha256=sha256)
            return model
        return None

    def load_pretrained(self, source: str, model_config: dict) -> None:
        """Load ``source`` (any kind ``model.pretrained`` accepts, see models/checkpoint.py) into the weights."""
        from .checkpoint import load_pretrained

        load_pretrained(self, source, cache_dir=Path(model_config["cache_dir"]).expanduser(),
                        strict=model_config["strict_loading"], sha256=model_config["pretrained_sha256"])

    def parameter_groups(self, weight_decay: float, decay_all: bool = True) -> list[dict]:
        """AdamW groups (models/parameter_groups.py): every parameter trains (ViT and decoder, as in BLIP)."""
        return weight_decay_groups(self, weight_decay, decay_all)

    def export_directory(self, output_dir: str | Path) -> Path:
        """What scripts/export_hf.py writes for this family: a stock ``BlipForConditionalGeneration`` +
        ``BlipProcessor`` directory (models.checkpoint.save_transformers_directory)."""
        from .checkpoint import save_transformers_directory

        return save_transformers_directory(self, output_dir)

    def eval_transform(self):
        """BLIP's evaluation preprocessing at this model's image size (bicubic squash, CLIP mean/std)."""
        return eval_transform(self.image_size)

    def cached_feature_key(self, transform_description: str) -> None:
        """Always None: BLIP fine-tunes its ViT, so its image features change every step and are never cached
        (data.feature_cache; see ``PrefixCaptioner.cached_feature_key``)."""
        return None

    def encode_cache_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Never called (``cached_feature_key`` is None): BLIP has no frozen image features to cache."""
        raise ValueError("BLIP fine-tunes its ViT: its image features change every step and are never cached")

    @property
    def max_positions(self) -> int:
        """The decoder's position limit: the largest ``max_length`` (prompt included) it can generate."""
        return self.model.config.text_config.max_position_embeddings

    @property
    def attention(self) -> str:
        """The attention implementation in use, read from the modules: "sdpa", "eager" (or "mixed")."""
        return attention_of(self.model)

    def set_attention(self, implementation: str) -> "BlipCaptioner":
        """Switch between "sdpa" and "eager" attention in place (weights untouched)."""
        set_attention(self.model, implementation)
        return self

    def compile_parts(self, scope: str = "full", **options) -> "BlipCaptioner":
        """``torch.compile`` in place (``options`` go to it); parameter and state-dict names are unchanged.

        ``scope``: "full" compiles this module's ``forward`` (ViT, decoder and the LM head or its features; the
        objective then runs eagerly in ``caption_loss``), which removes most of the per-kernel launch overhead that
        bounds a BLIP-base step on a fast GPU; the decoder's padded length changes between batches, so expect one
        recompile to dynamic shapes.
        "vision" compiles only the ViT (fixed shapes, most of the FLOPs at 384 px). Generation stays eager
        (``generate_ids`` does not go through ``forward``). Call after moving to the device.
        """
        if scope == "full":
            self.compile(**options)
        elif scope == "vision":
            self.model.vision_model.compile(**options)
        else:
            raise ValueError(f"compile scope {scope!r}: expected 'full' or 'vision'")
        return self

    @property
    def device(self) -> torch.device:
        return self.model.text_decoder.cls.predictions.decoder.weight.device

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def tokenize(self, captions: list[str], padding: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt + caption`` for each caption -> (input_ids, attention_mask), both (B, L) on the model's device.

        Position 0 ([CLS]) is replaced by the [DEC] bos token, as BLIP's decoder expects. ``padding``: "longest"
        (L = the longest caption), "bucket" (the next multiple of 8) or "max_length" (L = ``max_text_length``);
        default ``self.text_padding`` (models/text_padding.py).
        """
        encoded = self.tokenizer(
            [self.prompt + caption for caption in captions],
            padding="longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        length = padded_length(encoded.input_ids.shape[1], self.max_text_length, padding or self.text_padding)
        input_ids, attention_mask = pad_to(encoded.input_ids, encoded.attention_mask, length,
                                           self.tokenizer.pad_token_id)
        input_ids = input_ids.to(self.device)
        input_ids[:, 0] = self.tokenizer.bos_token_id
        return input_ids, attention_mask.to(self.device)

    def build_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token targets (B, L - 1): the prompt and padding are IGNORE_INDEX. The one place that masks them."""
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        targets[:, : self.prompt_length - 1] = IGNORE_INDEX
        return targets

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, 1 + num_patches, vision_width)."""
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
        head_features: bool = False,
    ) -> torch.Tensor | HeadFeatures:
        """Decoder logits (B, L - 1, V): ``logits[:, t]`` scores ``input_ids[:, t + 1]``, i.e. ``targets[:, t]``.

        ``image_index`` (B,) gives each caption row the row of its image in ``pixel_values`` (I, 3, S, S), so
        that several captions of one image (SCST's samples) share one ViT pass; default one caption per image.

        ``head_features=True`` returns ``HeadFeatures(features, weight, bias)`` instead: the LM head's transformed
        hidden states (B, L - 1, D) (dense + gelu + LayerNorm, as before its projection) and its output embedding
        (V, D) and bias (V,), so that ``logits = features @ weight.T + bias``; ``models.objectives.caption_loss``
        uses them for objectives that need only a few logits per position (pure SMILE).
        """
        image_tokens = self._image_tokens(pixel_values, image_index)
        if not head_features:
            return self.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                           encoder_hidden_states=image_tokens, use_cache=False).logits[:, :-1]
        hidden = self.model.text_decoder.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            use_cache=False,
            is_decoder=True,
        ).last_hidden_state[:, :-1]  # (B, L - 1, D): the last position predicts nothing
        head = self.model.text_decoder.cls.predictions
        return HeadFeatures(head.transform(hidden), head.decoder.weight, head.decoder.bias)

    def _image_tokens(self, pixel_values: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        image_embeds = self.encode_images(pixel_values)
        return image_embeds if image_index is None else image_embeds.index_select(0, image_index)

    @torch.no_grad()
    def generate_ids(
        self,
        pixel_values: torch.Tensor,
        sample: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        num_return_sequences: int = 1,
    ) -> torch.Tensor:
        """Token ids (B * num_return_sequences, <= max_length) including the bos + prompt prefix, padded after
        [SEP], image-major (the rows of image 0 first).

        As in BLIP, ``max_length`` and ``min_length`` count the prompt tokens, and [SEP] ends a caption. Beam
        search unless ``sample``; sampling is nucleus sampling with ``top_p`` (with transformers' default top-k
        of 50 also applied, as it was under BLIP's transformers 4.15). ``num_return_sequences``: the best
        ``num_return_sequences`` beams of each image, best first (at most ``num_beams``), or that many
        independent samples. ``no_repeat_ngram_size`` > 0 forbids any n-gram of that size from occurring twice
        (transformers' ``NoRepeatNGramLogitsProcessor``); the n-grams are counted over the whole sequence, prompt
        included, as transformers' ``BlipForConditionalGeneration`` counts them, so a caption cannot repeat an
        n-gram of the prompt either. 0 turns it off.
        """
        check_generation_counts(sample, num_beams, no_repeat_ngram_size, num_return_sequences)
        options = dict(max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
                       no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_return_sequences)
        if sample:
            options.update(do_sample=True, top_p=top_p, top_k=50, num_beams=1)
        else:
            options.update(do_sample=False, num_beams=num_beams)
        return self._decoder_generate(pixel_values, **options)

    @torch.no_grad()
    def sample_ids(self, pixel_values: torch.Tensor, num_samples: int = 1, max_new_tokens: int = 20,
                   greedy: bool = False) -> torch.Tensor:
        """SCST rollouts: (B * num_samples, L) ids in ``tokenize``'s layout (bos + prompt + caption + [SEP]),
        image-major (the samples of image 0 first), padded after [SEP]; ``sequence_mask`` gives their mask.

        Sampling is multinomial over the whole vocabulary at temperature 1 (no top-k, no nucleus), as SCST's
        reference; ``greedy`` takes the argmax instead (the self-critical baseline). ``max_new_tokens`` counts
        caption tokens after the prompt, [SEP] included. Each image goes through the ViT once.
        """
        options = dict(max_new_tokens=max_new_tokens, min_length=0, num_beams=1, num_return_sequences=num_samples)
        if greedy:
            options.update(do_sample=False)
        else:
            options.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        return self._decoder_generate(pixel_values, **options)

    def sequence_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Attention mask (B, L) of generated ids: 1 through a caption's first [SEP], 0 on the padding after."""
        return (~self._after_first_sep(ids)).long()

    def _after_first_sep(self, ids: torch.Tensor) -> torch.Tensor:
        return after_first_end(ids, [self.tokenizer.sep_token_id], start=self.prompt_length)

    def _decoder_generate(self, pixel_values: torch.Tensor, **options) -> torch.Tensor:
        """transformers' ``generate`` on the decoder from the prompt, [SEP] ending a caption; [PAD] after it."""
        image_embeds = self.encode_images(pixel_values)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        prompt_ids, _ = self.tokenize([""] * pixel_values.shape[0], padding="longest")
        prompt_ids = prompt_ids[:, :-1]  # drop the [SEP] that closes the (empty) caption
        generated = self.model.text_decoder.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            **options,
        )
        # Some transformers versions fill finished beams with [SEP] rather than [PAD]; normalise to BLIP's layout.
        return generated.masked_fill(self._after_first_sep(generated), self.tokenizer.pad_token_id)

    def decode(self, generated_ids: torch.Tensor) -> list[str]:
        """Strip the prompt tokens and decode; special tokens ([SEP], [PAD], [UNK]) are dropped as in BLIP."""
        return self.tokenizer.batch_decode(
            generated_ids[:, self.prompt_length :], skip_special_tokens=True, clean_up_tokenization_spaces=True
        )

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, **options) -> list[str]:
        """Captions for a batch of images (B, 3, H, W), prompt stripped: B * ``num_return_sequences`` strings,
        image-major. Options as in ``generate_ids``."""
        return self.decode(self.generate_ids(pixel_values, **options))


def _resolve_tokenizer(value: str, checkpoint: Path) -> str:
    """A checkpoint config's tokenizer: an existing path, a path relative to the repository root, or a hub id."""
    from .checkpoint import CheckpointError

    path = Path(value).expanduser()
    if path.exists():
        return value
    if not path.is_absolute() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    if path.is_absolute() or path.suffix or value.startswith((".", "~")) or value.count("/") > 1:
        raise CheckpointError(f"{checkpoint}: its config's model.tokenizer {value!r} does not exist here; pass "
                              "tokenizer= (the vocab.txt or tokenizer directory the model was trained with)")
    return value  # a hub id such as bert-base-uncased


def _from_transformers(source: str, tokenizer: str | None, prompt: str | None, attention: str) -> BlipCaptioner:
    """A transformers ``BlipForConditionalGeneration`` directory or hub id, with ``smile_blip.json``'s extras."""
    import json

    model = hub.from_pretrained(BlipForConditionalGeneration.from_pretrained, source, "checkpoint")
    set_attention(model, attention)
    extras_file = Path(source) / "smile_blip.json"
    extras = json.loads(extras_file.read_text()) if extras_file.is_file() else {}
    return BlipCaptioner(
        model,
        build_tokenizer(tokenizer or source, what="tokenizer" if tokenizer else "checkpoint"),
        prompt=extras.get("prompt", DEFAULT_PROMPT) if prompt is None else prompt,
        max_text_length=extras.get("max_text_length", 40),
    )
