"""Any transformers image-text-to-text model as a captioner (``model.family: vlm``): LLaVA, SmolVLM/Idefics3,
Qwen2-VL, PaliGemma, GIT and the other decoder-only models ``AutoModelForImageTextToText`` maps, with their own
``AutoProcessor``.

Layout of one training row (the processor builds the prompt part, this module the caption part)::

    model input    = [ prompt ids (template + expanded image tokens), P ; caption ids c_0 ... c_{T-1} ]
    attention mask = [ 1 ... 1                                          ; caption mask ]
    hidden[:, P - 1 + t] predicts c_t  ->  forward returns the LM head on hidden[:, P-1:-1]   (B, T, V)
    targets        = caption ids, padding set to -100                                          (B, T)

``tokenize`` returns the caption part only (caption tokens, then the end token), like the prefix family's, so the
prompt, the image tokens and the template's special tokens never reach the scored sequence, and ``build_targets``
(the one place that masks) only has the padding to mask. The first scored position is therefore the first caption
token: SMILE's first-token rule (``first_target_positions``) applies to it, and SMILE's subset is the caption's
own token set. The LM head runs on the T caption positions only, never on the hundreds of image positions.

* **Prompt.** ``model.vlm.prompt`` (default "Describe this image."). Where the processor has a chat template,
  the prompt text is ``processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type":
  "text", "text": prompt}]}], add_generation_prompt=True)`` (transformers' documented convention); otherwise the
  prompt itself, and the processor places the image tokens. The processor turns it into ids as it would for the
  stock model (special tokens, image-token expansion).
* **Caption tokens.** Each caption is tokenised together with the prompt text and the prompt's tokens are cut
  off, so a byte-level BPE gets the same word boundary (``ĠA`` after ``Assistant:``) that the model generates;
  the separator the template puts between its generation prompt and an assistant answer (Idefics3's ``": "``) is
  read from the template once. The caption then ends with the end token: ``model.vlm.end_token``, else the
  template's end-of-turn token (the special token the template writes after an assistant answer), else the first
  id of the model's ``generation_config.eos_token_id``, else the tokenizer's eos. Generation stops on that token
  and on every ``generation_config.eos_token_id`` (what stock ``generate`` stops on).
* **Pixels.** The protocol's images are (I, 3, S, S) tensors with CLIP's mean/std (``eval_transform``: a bicubic
  resize to S x S, as every training transform of this repository makes). The family undoes the normalisation,
  rounds to the 8-bit image the transform made and runs the model's own processor on it, so that the model gets
  its own pixel inputs (LLaVA's CLIP pixels, Idefics3's tiles, Qwen2-VL's patches and ``image_grid_thw``). S is
  ``model.vlm.image_size``, by default the size the image processor works at (its crop, tile or target size), so
  an image that already has that size reaches the processor unchanged and gets the stock model's caption; other
  images are squashed to S x S first.
* **Generation** is the model's own ``generate`` with the prompt; ``max_length`` counts new caption tokens, the
  end token included (transformers' ``max_new_tokens``), and ``min_length`` the tokens before the end token may
  come (``min_new_tokens``: the default 1 never gives an empty caption); ``max_positions`` is the text
  positions left after the prompt. ``repetition_penalty`` and ``no_repeat_ngram_size`` see the prompt's tokens
  too, as in stock ``generate``. The captions come back without the prompt.
* **Export** writes the model, its processor and ``vlm_captioner.json`` (prompt, image size, end token): a folder
  that stock ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` load and that
  ``Captioner.from_pretrained`` reads back (any transformers image-text-to-text folder that is not a BLIP is read
  by this family, with the default prompt when it has no ``vlm_captioner.json``).

Encoder-decoder models (vision-encoder-decoder, Florence-2) take the caption as decoder input and are not
handled here yet.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from torch import nn

import hub
from imaging import CLIP_MEAN, CLIP_STD

from .checkpoint import CheckpointError
from .generation import check_generation_counts
from .objectives import IGNORE_INDEX, HeadFeatures
from .parameter_groups import weight_decay_groups
from .text_padding import after_first_end, check_text_padding, pad_rows, padded_length

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe this image."
VLM_DIRECTORY_FILE = "vlm_captioner.json"  # written by export_directory beside the transformers files
# Model types another family reads from a transformers folder (models/captioner.py: BLIP).
OTHER_FAMILY_MODEL_TYPES = frozenset({"blip"})
# model.vlm keys and their defaults (configs/default.yaml).
VLM_OPTIONS = {"prompt": DEFAULT_PROMPT, "image_size": None, "end_token": None, "dtype": "float32"}
# model.vlm.dtype -> the dtype of the weights on CUDA (on a machine without CUDA they stay float32).
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CAPTION_MARKER = "CAPTIONMARKER"
_MAX_CHECKPOINT_CHAIN = 16
_QWEN_DEFAULT_SIDE = 448  # Qwen2-VL-style processors take any size: a square of this side (32 x 32 patches of 14)


def image_text_to_text_types() -> set[str]:
    """The ``model_type`` values ``AutoModelForImageTextToText`` maps in this transformers version."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def is_vlm_model_type(model_type: str | None) -> bool:
    """Whether a transformers folder of ``model_type`` is this family's: mapped under
    ``AutoModelForImageTextToText`` and not read by another family (BLIP)."""
    return model_type in image_text_to_text_types() and model_type not in OTHER_FAMILY_MODEL_TYPES


def native_image_size(image_processor) -> int:
    """The square side S at which ``image_processor`` sees an image unchanged (or tiles it as the stock model does).

    Idefics3 / SmolVLM: the tile size (``max_image_size["longest_edge"]``); a centre-cropping processor (LLaVA's
    CLIP): the crop height; Qwen2-VL-style (``patch_size`` x ``merge_size`` patches within ``min_pixels`` /
    ``max_pixels``): 448 clamped to those bounds and rounded down to a multiple of the patch factor; otherwise the
    target ``size`` (height, shortest or longest edge). Raises ValueError when none applies (set
    ``model.vlm.image_size``).
    """
    tile = _size_field(getattr(image_processor, "max_image_size", None), "longest_edge")
    if tile:
        return int(tile)
    crop = _size_field(getattr(image_processor, "crop_size", None), "height")
    if getattr(image_processor, "do_center_crop", False) and crop:
        return int(crop)
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    size = getattr(image_processor, "size", None)
    # Qwen2-VL keeps its pixel-count bounds in min_pixels / max_pixels (4.x) or in size's edges (5.x: areas).
    low = getattr(image_processor, "min_pixels", None) or _size_field(size, "shortest_edge")
    high = getattr(image_processor, "max_pixels", None) or _size_field(size, "longest_edge")
    if isinstance(patch, int) and isinstance(merge, int) and low and high:
        factor = patch * merge
        side = min(max(_QWEN_DEFAULT_SIDE, int(low**0.5)), int(high**0.5))
        return max(factor, side // factor * factor)
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge", "longest_edge"):
        if _size_field(size, key):
            return int(_size_field(size, key))
    raise ValueError(f"cannot tell the image size {type(image_processor).__name__} works at; set "
                     "model.vlm.image_size")


def _size_field(size, key: str):
    """``size[key]`` of an image processor's size, a dict (slow processors) or a ``SizeDict`` (fast ones)."""
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def weight_dtype(name: str) -> torch.dtype:
    """The dtype ``model.vlm.dtype`` loads the weights in: bfloat16 halves the weights' memory (and the
    activations' under autocast) on CUDA; without CUDA the weights stay float32, since CPU bf16 matmuls are slow
    and the CPU runs (tests, toy rows) are meant to be exact (a CPU run on a CUDA host, ``device: cpu``, is cast
    back to float32 by training.build_captioner). AdamW on bf16 parameters rounds every update to 8
    mantissa bits, LoRA adapters included (peft gives them their base layer's dtype), so bf16 trades update precision
    for memory: a model that only fits that way, or a frozen base."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"model.vlm.dtype must be one of {list(WEIGHT_DTYPES)}, got {name!r}")
    return WEIGHT_DTYPES[name] if torch.cuda.is_available() else torch.float32


def enable_gradient_checkpointing(model, source: str | None = None) -> None:
    """Non-reentrant activation checkpointing of ``model``'s layers (``model.gradient_checkpointing``): each
    decoder (and vision) layer keeps only its input and recomputes its activations in the backward, in training
    mode. transformers 5 renamed the switch to ``activation_checkpointing_enable`` (the old name warns); 4.57 has
    only ``gradient_checkpointing_enable``."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing: {source or type(model).__name__} "
                         f"({type(model).__name__}) does not support gradient checkpointing in transformers")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class VlmCaptioner(nn.Module):
    """A transformers image-text-to-text model and its processor as a captioner (``model.family: vlm``; the
    interface is ``models.families.CaptionModel``).

    Args:
        model: an ``AutoModelForImageTextToText`` model (decoder-only, image tokens or image features before the
            text).
        processor: its ``AutoProcessor`` (tokenizer + image processor, and the chat template if any).
        prompt: the instruction (see the module docstring for how it becomes the prompt text).
        image_size: S of ``eval_transform``; None: ``native_image_size(processor.image_processor)``.
        end_token: the token string that ends a caption; None: the template's end of turn, else the model's
            eos (module docstring).
        max_text_length: caption tokens a training caption keeps, the end token included.
        text_padding: ``longest`` | ``bucket`` | ``max_length`` (models/text_padding.py).
        source: where the model came from (a folder or hub id), for ``load_pretrained`` and messages.
    """

    # A stock VLM trains parameters its captioning loss never reaches (LLaVA's CLIP ``post_layernorm``, and the
    # vision layers after ``vision_feature_layer``), so DDP must look for gradient-less parameters every step
    # (training/sharding.py); otherwise it waits for their gradients and fails at the next step.
    ddp_find_unused_parameters = True

    def __init__(self, model, processor, prompt: str = DEFAULT_PROMPT, image_size: int | None = None,
                 end_token: str | None = None, max_text_length: int = 40, text_padding: str = "longest",
                 source: str | None = None):
        super().__init__()
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{source or type(model).__name__}: encoder-decoder image-text-to-text models "
                             f"({model.config.model_type}) are not supported by model.family vlm yet; it needs a "
                             "decoder-only model (LLaVA, SmolVLM/Idefics3, Qwen2-VL, PaliGemma, GIT, ...)")
        if not isinstance(prompt, str):
            raise ValueError(f"model.vlm.prompt must be a string, got {prompt!r}")
        check_text_padding(text_padding)
        if isinstance(max_text_length, bool) or not isinstance(max_text_length, int) or max_text_length < 2:
            raise ValueError(f"model.max_text_length must be an integer >= 2 (a caption token and the end token), "
                             f"got {max_text_length!r}")
        self.model = model
        if _tied_names(model):
            model.register_state_dict_post_hook(_drop_tied_names)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.max_text_length = max_text_length
        self.text_padding = text_padding
        self.source = source
        self.image_size = int(image_size) if image_size else native_image_size(processor.image_processor)
        self.prompt_text = self._prompt_text(prompt)
        separator, template_end = self._template_answer_layout()
        self.separator = separator
        self.end_token_id = self._end_token_id(end_token, template_end)
        self.end_token = self.tokenizer.convert_ids_to_tokens(self.end_token_id)
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        generation_eos = [] if generation_eos is None else (
            [generation_eos] if isinstance(generation_eos, int) else list(generation_eos))
        self.stop_ids = list(dict.fromkeys([self.end_token_id, *generation_eos]))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.end_token_id if pad is None else pad
        self._prompt_ids = self.tokenizer(self.prompt_text, add_special_tokens=False).input_ids
        self.placeholder_ids = self._placeholder_ids()
        forward_parameters = inspect.signature(model.forward).parameters
        self._takes_token_type_ids = "token_type_ids" in forward_parameters
        self._prompt_length: int | None = None
        text_config = model.config.get_text_config()
        self._softcap = getattr(text_config, "final_logit_softcapping", None)

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def from_source(cls, source: str | Path, what: str = "model.pretrained", **options) -> "VlmCaptioner":
        """Model and processor from a transformers folder or hub id (``AutoModelForImageTextToText``,
        ``AutoProcessor``); ``options`` as the constructor's, plus ``gradient_checkpointing`` and ``dtype``
        (``model.vlm.dtype``: "float32" or "bfloat16", the latter on CUDA only, see ``weight_dtype``)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        gradient_checkpointing = options.pop("gradient_checkpointing", False)
        dtype = weight_dtype(options.pop("dtype", None) or "float32")
        # float32 weights by default, as every family trains them (bf16 comes from autocast): transformers 5 would
        # otherwise keep the dtype the folder was saved in (bf16 for most VLMs).
        model = hub.from_pretrained(AutoModelForImageTextToText.from_pretrained, source, what, dtype=dtype)
        processor = hub.from_pretrained(AutoProcessor.from_pretrained, source, what)
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{what} {source}: its AutoProcessor ({type(processor).__name__}) lacks a tokenizer or "
                             "an image processor; model.family vlm needs both")
        captioner = cls(model, processor, source=str(source), **options)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model, str(source))
        return captioner

    @classmethod
    def from_config(cls, model_config: dict) -> "VlmCaptioner":
        """Build from a resolved config's ``model`` section (``model.family: vlm``): the model and processor of
        ``model.pretrained`` (a transformers folder or hub id; for one of this repository's checkpoints, the
        folder its own config started from, whose weights ``load_pretrained`` then replaces), with
        ``model.vlm`` (prompt, image_size, end_token, dtype), ``max_text_length``, ``text_padding`` and
        ``gradient_checkpointing``."""
        cls.check_config(model_config, toy=False)
        options = {**VLM_OPTIONS, **(model_config.get("vlm") or {})}
        return cls.from_source(base_source(model_config["pretrained"]), prompt=options["prompt"],
                               image_size=options["image_size"], end_token=options["end_token"],
                               dtype=options["dtype"],
                               max_text_length=model_config.get("max_text_length", 40),
                               text_padding=model_config.get("text_padding", "longest"),
                               gradient_checkpointing=bool(model_config.get("gradient_checkpointing")))

    @classmethod
    def check_config(cls, model_config: dict, toy: bool) -> None:
        """Reject a ``model`` section this family cannot build (ValueError): no ``model.pretrained``, an unknown
        or mistyped ``model.vlm`` key (``dtype`` other than float32 / bfloat16)."""
        if not model_config.get("pretrained"):
            raise ValueError("model.pretrained: give a transformers image-text-to-text folder (or hub id) for "
                             "model.family vlm, e.g. --opt model.pretrained=HuggingFaceTB/SmolVLM-256M-Instruct "
                             "(configs/toy/vlm_*.yaml name the toy VLM, cache/toy_vlm, built on first use)")
        options = model_config.get("vlm") or {}
        unknown = sorted(set(options) - set(VLM_OPTIONS))
        if unknown:
            raise ValueError(f"model.vlm: unknown key(s) {unknown}; valid keys: {sorted(VLM_OPTIONS)}")
        if not isinstance(options.get("prompt", DEFAULT_PROMPT), str):
            raise ValueError(f"model.vlm.prompt must be a string, got {options['prompt']!r}")
        size = options.get("image_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"model.vlm.image_size must be a positive integer or null, got {size!r}")
        weight_dtype(options.get("dtype", VLM_OPTIONS["dtype"]))

    @classmethod
    def config_sources(cls, model_config: dict) -> list[tuple[str, str | dict | None, str]]:
        """``model.pretrained``, which ``from_config`` loads the model and processor from, also when a resumed run
        does not load its weights. Kind "vlm": with ``data.toy``, a folder beside the toy set is the toy VLM, built
        on first use (toy_pretrained/vlm.py)."""
        return [("model.pretrained", model_config.get("pretrained"), "vlm")]

    @classmethod
    def accepts_hub_weights(cls, source: str) -> bool:
        """A hub id (``HuggingFaceTB/SmolVLM-256M-Instruct``) is a valid ``model.pretrained``."""
        from .checkpoint import looks_like_hub_id

        return looks_like_hub_id(source)

    @classmethod
    def inference_config(cls, model_config: dict, checkpoint: Path, tokenizer: str | None = None,
                         prompt: str | None = None, attention: str = "sdpa") -> dict:
        """The ``model`` section that rebuilds a trained captioner from ``checkpoint``'s config: the same
        ``model.pretrained`` (its architecture and processor; the checkpoint's weights replace its weights),
        ``prompt`` replacing ``model.vlm.prompt``. ``tokenizer`` and ``attention`` are BLIP's (the processor's
        tokenizer and the model's own attention are used)."""
        vlm = {**VLM_OPTIONS, **(model_config.get("vlm") or {})}
        if prompt is not None:
            vlm["prompt"] = prompt
        return {**model_config, "vlm": vlm, "gradient_checkpointing": False}

    @classmethod
    def from_exported(cls, source: str, **options) -> "VlmCaptioner | None":
        """The captioner in ``source`` when it is a transformers folder (or hub id) of an image-text-to-text model
        that is not a BLIP (the blip family reads those), else None. ``vlm_captioner.json`` (``export_directory``)
        supplies the prompt, image size and end token; ``options["prompt"]`` (``Captioner.from_pretrained``'s)
        overrides the prompt; the other options are BLIP's."""
        from .checkpoint import looks_like_hub_id

        path = Path(source).expanduser()
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                return None
            try:
                model_type = json.loads(config_file.read_text()).get("model_type")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
        elif not path.exists() and looks_like_hub_id(source):
            from transformers import AutoConfig

            try:  # a hub id this machine cannot resolve is left to the other families (and their message)
                model_type = hub.from_pretrained(AutoConfig.from_pretrained, source, "source").model_type
            except (hub.HubError, OSError, ValueError, KeyError):
                return None
        else:
            return None
        if not is_vlm_model_type(model_type):
            return None
        saved = {}
        meta = path / VLM_DIRECTORY_FILE
        if path.is_dir() and meta.is_file():
            saved = json.loads(meta.read_text())
        if options.get("prompt") is not None:
            saved["prompt"] = options["prompt"]
        return cls.from_source(source, what="source", **saved)

    def load_pretrained(self, source: str | Path, model_config: dict) -> None:
        """Load ``source``'s weights: one of this repository's checkpoints (every weight, strict), or a transformers
        folder / hub id of the same architecture; nothing when it is the folder the model was built from."""
        from .checkpoint import apply_state_dict, is_own_checkpoint, load_checkpoint_file

        strict = model_config.get("strict_loading", True)
        path = Path(str(source)).expanduser()
        if path.is_file() and path.suffix == ".safetensors" and is_own_checkpoint(path):
            report = apply_state_dict(self.model, load_checkpoint_file(path)[0], source=str(path), strict=strict)
            if report.unused and strict:
                raise CheckpointError(f"{path} does not match this {self.model.config.model_type} model: unexpected "
                                      f"keys {report.unused[:10]}")
            logger.info(report.summary())
            return
        if str(source) == str(self.source):
            return  # from_config already loaded these weights
        from transformers import AutoModelForImageTextToText

        other = hub.from_pretrained(AutoModelForImageTextToText.from_pretrained, source, "model.pretrained",
                                    dtype=torch.float32)
        logger.info(apply_state_dict(self.model, other.state_dict(), source=str(source), strict=strict).summary())

    def parameter_groups(self, weight_decay: float, decay_all: bool = True) -> list[dict]:
        """AdamW groups (models/parameter_groups.py) over the trainable parameters (every one, unless something
        froze some, e.g. LoRA)."""
        return weight_decay_groups(self, weight_decay, decay_all)

    def compile_parts(self, scope: str = "full", **options) -> "VlmCaptioner":
        """``torch.compile`` in place: "full" (``forward``) or "vision" (the model's vision tower)."""
        if scope == "full":
            self.compile(**options)
        elif scope == "vision":
            tower = self._vision_tower()
            if tower is None:
                raise ValueError(f"compile scope 'vision': no vision tower found in {type(self.model).__name__}")
            tower.compile(**options)
        else:
            raise ValueError(f"compile scope {scope!r}: expected 'full' or 'vision'")
        return self

    def _vision_tower(self) -> nn.Module | None:
        for owner in (self._backbone(), self.model):
            for name in ("vision_tower", "vision_model", "visual", "image_encoder"):
                tower = getattr(owner, name, None)
                if isinstance(tower, nn.Module):
                    return tower
        return None

    # ------------------------------------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def prompt_length(self) -> int:
        """P: the prompt's ids per image (template, special and expanded image tokens), from one S x S image."""
        if self._prompt_length is None:
            blank = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
            self._prompt_length = self._processor_inputs(blank)["input_ids"].shape[1]
        return self._prompt_length

    @property
    def max_positions(self) -> int:
        """The most new tokens ``generate_ids`` accepts: the LM's positions left after the prompt (2048 after it
        when the config names no limit)."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return max(1, (limit - self.prompt_length) if limit else 2048)

    def eval_transform(self):
        """PIL image -> (3, S, S): bicubic resize to S x S, CLIP mean/std (``imaging.eval_transform``, the layout of
        every pixel batch in this repository; ``forward`` turns it into the processor's own input)."""
        from imaging import eval_transform

        return eval_transform(self.image_size)

    # ---------------------------------------------------------------------------------------------- feature cache

    def cached_feature_key(self, transform_description: str) -> str | None:
        """None: the processor's pixels go through the trained model, so there are no frozen features to cache."""
        return None

    def encode_cache_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError("model.family vlm has no frozen image features to cache (cached_feature_key is None)")

    # ---------------------------------------------------------------------------------------------- prompt

    def _prompt_text(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(self._conversation(prompt), add_generation_prompt=True)
        return prompt

    @staticmethod
    def _conversation(prompt: str, answer: str | None = None) -> list[dict]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def _template_answer_layout(self) -> tuple[str, int | None]:
        """(separator, end-of-turn id): what the chat template writes between its generation prompt and an
        assistant answer (whitespace only, else nothing), and the special token it writes right after the answer.

        Read from one rendering of the conversation with a marker as the answer. Without a template (or one that
        renders the answer elsewhere), the separator is a space after a prompt that does not end in whitespace,
        and there is no end-of-turn token.
        """
        default = " " if self.prompt_text and not self.prompt_text[-1].isspace() else ""
        if not getattr(self.processor, "chat_template", None):
            return default, None
        try:
            rendered = self.processor.apply_chat_template(self._conversation(self.prompt, _CAPTION_MARKER))
        except Exception as error:  # a template may refuse an assistant turn; then fall back to the defaults
            logger.warning("model.family vlm: the chat template cannot render an answer (%s); captions follow the "
                           "prompt after %r", error, default)
            return default, None
        if not rendered.startswith(self.prompt_text) or _CAPTION_MARKER not in rendered[len(self.prompt_text):]:
            return default, None
        between, after = rendered[len(self.prompt_text):].split(_CAPTION_MARKER, 1)
        if between.strip():
            logger.warning("model.family vlm: the chat template writes %r between its generation prompt and an "
                           "answer; captions follow the prompt directly", between)
            between = ""
        ids = self.tokenizer(after, add_special_tokens=False).input_ids
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        return between, (ids[0] if ids and ids[0] in special else None)

    def _placeholder_ids(self) -> list[int]:
        """The ids that stand for image (or video) features in the model's input: SCST's rollouts never hold
        them, since a caption holding one would not go back through ``forward`` (the model counts them against
        the image features)."""
        ids = set()
        for config in (self.model.config, self.model.config.get_text_config()):
            for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
                value = getattr(config, name, None)
                if isinstance(value, int) and value >= 0:
                    ids.add(value)
        for name in ("image_token", "video_token"):
            token = getattr(self.processor, name, None)
            if isinstance(token, str):
                token_id = self.tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                    ids.add(token_id)
        return sorted(ids)

    def _end_token_id(self, end_token: str | None, template_end: int | None) -> int:
        if end_token is not None:
            ids = self.tokenizer(end_token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"model.vlm.end_token {end_token!r} is {len(ids)} tokens for this tokenizer; it must "
                                 "be exactly one")
            return ids[0]
        if template_end is not None:
            return template_end
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        eos = self.tokenizer.eos_token_id if eos is None else eos
        if eos is None:
            raise ValueError(f"{self.source}: neither the chat template, the generation config nor the tokenizer "
                             "names an end token; set model.vlm.end_token")
        return int(eos)

    # ---------------------------------------------------------------------------------------------- text

    def tokenize(self, captions: list[str], padding: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), (B, T) each on the device: the caption's tokens as they follow
        the prompt (see the module docstring), truncated to ``max_text_length - 1``, then the end token; padding
        holds the pad id with mask 0."""
        captions = list(captions)
        joint = self.tokenizer([self.prompt_text + self.separator + text for text in captions],
                               add_special_tokens=False).input_ids
        prompt, cut = self._prompt_ids, len(self._prompt_ids)
        budget = self.max_text_length - 1
        rows = []
        for ids, text in zip(joint, captions):
            if ids[:cut] != prompt:  # the caption merged with the prompt's last token: tokenise it alone
                ids = prompt + self.tokenizer(self.separator + text, add_special_tokens=False).input_ids
            rows.append(ids[cut:][:budget] + [self.end_token_id])
        length = padded_length(max(map(len, rows)), self.max_text_length, padding or self.text_padding)
        return pad_rows(rows, length, self.pad_token_id, self.device)

    def build_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Targets (B, T): every caption token and the end token; padding IGNORE_INDEX. The one place that masks
        (the prompt, its image tokens and the template's tokens are not part of ``tokenize``'s layout)."""
        return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)

    def decode(self, generated_ids: torch.Tensor | list) -> list[str]:
        """Caption strings: special tokens (end, padding) dropped, whitespace stripped."""
        return [text.strip() for text in self.tokenizer.batch_decode(generated_ids, skip_special_tokens=True)]

    # ---------------------------------------------------------------------------------------------- pixels

    def _to_uint8(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) CLIP-normalised pixels -> the 8-bit images (I, 3, S, S) on the CPU that the processor reads,
        as it would read the PIL image ``eval_transform`` resized (its values are k / 255 before normalising)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"model.family vlm takes pixels (I, 3, S, S), got shape {tuple(pixel_values.shape)} "
                             "(it has no cached image features)")
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        images = pixel_values.detach().float().cpu() * std + mean
        return (images * 255).round_().clamp_(0, 255).to(torch.uint8)

    def _processor_inputs(self, images: torch.Tensor) -> dict:
        """The processor's output for R 8-bit images (R, 3, S, S) with the prompt text each: ``input_ids`` (R, P),
        ``attention_mask`` and the model's own pixel inputs, on the CPU."""
        batch = self.processor(images=[[image] for image in images], text=[self.prompt_text] * len(images),
                               return_tensors="pt")
        inputs = dict(batch)
        if not self._takes_token_type_ids:
            inputs.pop("token_type_ids", None)
        if not bool(inputs["attention_mask"].all()):
            raise ValueError("the processor gave these images prompts of different lengths (padding inside the "
                             "prompt); model.family vlm needs every S x S image to give the same image tokens")
        return inputs

    def _model_inputs(self, pixel_values: torch.Tensor, image_index: torch.Tensor | None = None) -> dict:
        images = self._to_uint8(pixel_values)
        if image_index is not None:
            images = images.index_select(0, image_index.cpu())
        inputs = self._processor_inputs(images)
        dtype, device = self.dtype, self.device
        return {key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
                if torch.is_tensor(value) else value for key, value in inputs.items()}

    # ---------------------------------------------------------------------------------------------- forward

    def _backbone(self) -> nn.Module:
        """The model without its LM head (``model.model`` of LLaVA, Idefics3, Qwen2-VL, PaliGemma; ``git`` of GIT):
        its ``last_hidden_state`` is what the head reads."""
        inner = getattr(self.model, "model", None)
        if isinstance(inner, nn.Module):
            return inner
        prefix = getattr(self.model, "base_model_prefix", "")
        inner = getattr(self.model, prefix, None) if prefix else None
        if isinstance(inner, nn.Module) and inner is not self.model:
            return inner
        raise ValueError(f"{type(self.model).__name__}: no base model (model.model or .{prefix}) to read the final "
                         "hidden states from")

    def _head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{type(self.model).__name__}'s output embeddings are {type(head).__name__}, not a "
                             "linear LM head")
        return head

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_index: torch.Tensor | None = None, head_features: bool = False) -> torch.Tensor | HeadFeatures:
        """Logits (B, T, V) with ``logits[:, t]`` scoring ``input_ids[:, t]`` (the prompt's last position predicts
        the first caption token), aligned with ``build_targets``.

        ``pixel_values`` (I, 3, S, S); ``image_index`` (B,) the image of each caption row (SCST's samples); each
        row's image goes through the processor and the model (the processor's pixel layouts differ too much
        between architectures to share one pass). The base model runs once on ``[prompt ; caption]``; the LM head
        (``get_output_embeddings``) runs on the T caption positions only. ``head_features=True`` returns
        ``HeadFeatures(hidden (B, T, D), head.weight (V, D), head.bias)`` instead, so that SMILE never forms the
        (B, T, V) logits.
        """
        inputs = self._model_inputs(pixel_values, image_index)
        rows = input_ids.shape[0]
        prompt_ids, prompt_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        if prompt_ids.shape[0] != rows:
            raise ValueError(f"{rows} caption rows for {prompt_ids.shape[0]} images: give image_index")
        for key in [key for key in inputs if key.endswith("token_type_ids")]:
            # Per-token types run over the caption too: PaliGemma's token_type_ids mark it as the suffix (1, causal
            # attention), Qwen2-VL's mm_token_type_ids as text (0).
            fill = torch.ones_like if key == "token_type_ids" else torch.zeros_like
            inputs[key] = torch.cat((inputs[key], fill(input_ids, dtype=inputs[key].dtype)), dim=1)
        ids = torch.cat((prompt_ids, input_ids), dim=1)
        mask = torch.cat((prompt_mask.to(attention_mask.dtype), attention_mask), dim=1)
        hidden = self._backbone()(input_ids=ids, attention_mask=mask, use_cache=False, **inputs).last_hidden_state
        length = input_ids.shape[1]
        features = hidden[:, -length - 1 : -1]  # (B, T, D); GIT puts its image tokens before the text as well
        head = self._head()
        if head_features:
            if self._softcap:
                raise ValueError(f"{self.model.config.model_type} soft-caps its logits (final_logit_softcapping), so "
                                 "they are not features @ weight.T: use an objective with an mle part")
            return HeadFeatures(features, head.weight, head.bias)
        logits = head(features)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    # ---------------------------------------------------------------------------------------------- generation

    def _generate(self, pixel_values: torch.Tensor, suppress_placeholders: bool = False, **options) -> torch.Tensor:
        """New ids (R, <= max_new_tokens) after the prompt, padded with the pad id after a caption's end token.
        ``suppress_placeholders``: never emit an image placeholder token (``placeholder_ids``)."""
        inputs = self._model_inputs(pixel_values)
        prompt_length = inputs["input_ids"].shape[1]
        if suppress_placeholders and self.placeholder_ids:
            options["suppress_tokens"] = self.placeholder_ids
        generated = self.model.generate(**inputs, eos_token_id=self.stop_ids, pad_token_id=self.pad_token_id,
                                        **options)
        new = generated[:, prompt_length:]
        return new.masked_fill(after_first_end(new, self.stop_ids), self.pad_token_id)

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, sample: bool = False, num_beams: int = 3,
                     max_length: int = 30, min_length: int = 1, top_p: float = 0.9, repetition_penalty: float = 1.0,
                     no_repeat_ngram_size: int = 0, num_return_sequences: int = 1) -> torch.Tensor:
        """Caption ids (I * num_return_sequences, <= max_length), image-major, pad-padded after the end token.

        ``max_length`` / ``min_length`` count new caption tokens (``max_new_tokens`` / ``min_new_tokens``), up to
        ``max_positions``. Beam search (the best ``num_return_sequences`` beams, best first) or nucleus sampling
        (``top_p`` over the whole vocabulary at temperature 1, whatever the model's generation config says).
        """
        check_generation_counts(sample, num_beams, no_repeat_ngram_size, num_return_sequences)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1 (new caption tokens), got {max_length!r}")
        max_length = min(max_length, self.max_positions)
        options = dict(max_new_tokens=max_length, min_new_tokens=max(0, min(min_length, max_length)),
                       repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                       num_return_sequences=num_return_sequences)
        if sample:
            options.update(do_sample=True, top_p=top_p, top_k=0, temperature=1.0, num_beams=1)
        else:
            options.update(do_sample=False, num_beams=num_beams)
        return self._generate(pixel_values, **options)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, **options) -> list[str]:
        """Captions (I * num_return_sequences strings, image-major) without the prompt; options as ``generate_ids``."""
        return self.decode(self.generate_ids(pixel_values, **options))

    @torch.no_grad()
    def sample_ids(self, pixel_values: torch.Tensor, num_samples: int = 1, max_new_tokens: int = 20,
                   greedy: bool = False) -> torch.Tensor:
        """SCST rollouts (I * num_samples, L) in ``tokenize``'s layout (caption tokens through the end token, pad
        after it), image-major: multinomial over the whole vocabulary at temperature 1 (no top-k, no nucleus), or
        the argmax with ``greedy``. Image placeholder tokens are never drawn: the rollouts go back through
        ``forward``, where such a token would count as an image position. (``generate`` leaves them to the model,
        as stock ``generate`` does; ``decode`` drops them.)"""
        options = dict(max_new_tokens=max(1, min(max_new_tokens, self.max_positions)),
                       num_return_sequences=num_samples, num_beams=1)
        if greedy:
            options.update(do_sample=False)
        else:
            options.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        return self._generate(pixel_values, suppress_placeholders=True, **options)

    def sequence_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Attention mask (B, L) of generated ids: 1 through a caption's end token, 0 after it."""
        return (~after_first_end(ids, self.stop_ids)).long()

    # ---------------------------------------------------------------------------------------------- export

    def export_directory(self, output_dir: str | Path) -> Path:
        """Write the model (``save_pretrained``, with its generation config), the processor and
        ``vlm_captioner.json`` (prompt, image size, end token, max_text_length): stock
        ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` load the folder, ``from_exported``
        (``Captioner.from_pretrained``) reads it back as this captioner."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)
        meta = {"prompt": self.prompt, "image_size": self.image_size, "end_token": self.end_token,
                "max_text_length": self.max_text_length}
        (output_dir / VLM_DIRECTORY_FILE).write_text(json.dumps(meta, indent=2))
        return output_dir


def _tied_names(module: nn.Module) -> list[str]:
    """Names of parameters that are another name of an earlier parameter (an LM head tied to the word embeddings:
    SmolVLM, Qwen2-VL-2B, PaliGemma), in ``named_parameters`` order."""
    seen, tied = set(), []
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.append(name)
        seen.add(id(parameter))
    return tied


def _drop_tied_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: keep each tied parameter under its first name only.

    safetensors refuses two names for one tensor, so a training checkpoint (``save_checkpoint_file``) could not
    hold a tied model's state dict; with one name the weight is saved once and loads back into both names (they
    are one parameter). transformers' ``save_pretrained`` drops the tied name itself and ``from_pretrained`` ties
    it again, so the export is unchanged.
    """
    for name in _tied_names(module):
        state_dict.pop(prefix + name, None)


def base_source(source: str | Path) -> str:
    """The transformers folder or hub id a ``model.pretrained`` builds from: ``source`` itself, or, for one of this
    repository's checkpoints, the ``model.pretrained`` its config names (followed through a chain of runs)."""
    from safetensors import safe_open

    from .checkpoint import is_own_checkpoint

    current = str(source)
    for _ in range(_MAX_CHECKPOINT_CHAIN):
        path = Path(current).expanduser()
        if not (path.is_file() and path.suffix == ".safetensors" and is_own_checkpoint(path)):
            return current
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("metadata") or "{}")
        model_config = (metadata.get("config") or {}).get("model") or {}
        if model_config.get("family") != "vlm" or not model_config.get("pretrained"):
            raise CheckpointError(f"{path} is not a checkpoint of a model.family vlm run (its config names no "
                                  "model.pretrained folder to build the architecture from)")
        current = str(model_config["pretrained"])
    raise CheckpointError(f"{source}: more than {_MAX_CHECKPOINT_CHAIN} checkpoints name each other as "
                          "model.pretrained")
