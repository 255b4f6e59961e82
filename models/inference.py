"""Caption images from Python in two lines, with any checkpoint this repository can load::

    from models import Captioner
    captions = Captioner.from_pretrained("runs/coco/smile/checkpoint_best.safetensors").caption(paths, num_beams=3)

``Captioner`` wraps a captioner of any family (``models.families.CaptionModel``) with that family's evaluation
preprocessing (its ``eval_transform``; BLIP's is ``imaging.eval_transform``), batching, the device (CUDA when there
is one) and bf16 autocast on CUDA, so that for the same checkpoint and settings its captions equal what
``eval_caption.py`` writes. Generation settings default to the checkpoint's own ``eval`` section when it carries one
(this repository's training checkpoints do), else to ``DEFAULT_GENERATION``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from imaging import open_rgb, to_rgb

from .checkpoint import DEFAULT_CACHE_DIR, CheckpointError, apply_state_dict, is_own_checkpoint, load_checkpoint_file
from . import lora
from .families import CAPTIONER_FAMILIES, CaptionModel, captioner_family

logger = logging.getLogger(__name__)

# configs/default.yaml's eval section (the SMILE paper's decoding): beam 3, up to 75 tokens with the prompt; no
# n-gram ban (no_repeat_ngram_size 0), as the paper.
DEFAULT_GENERATION = {"sample": False, "num_beams": 3, "max_length": 75, "min_length": 1, "top_p": 0.9,
                      "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
ImageInput = Image.Image | str | Path


class Captioner:
    """A captioner ready for inference: ``caption(images) -> captions``.

    Args:
        model: the captioner, of any family (weights loaded).
        device: where to run; default CUDA if available, else CPU.
        generation: default decoding options (keys of ``DEFAULT_GENERATION``); ``caption`` can override each.
        amp: bf16 autocast on CUDA (never on CPU); default on, or the run's ``amp`` for a training
            checkpoint, as ``eval_caption.py`` does.
    """

    def __init__(self, model: CaptionModel, device: str | torch.device | None = None,
                 generation: dict | None = None, amp: bool | None = None):
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        # The library default (75) can exceed a small model's text positions (the tiny preset has 64).
        self.generation["max_length"] = min(self.generation["max_length"], self.max_positions)
        self.amp = self.device.type == "cuda" and (amp is None or bool(amp))
        self.transform = model.eval_transform()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def max_positions(self) -> int:
        """The largest ``max_length`` the model can generate (BLIP: decoder positions, prompt included; a prefix
        LM: caption tokens after the prefix)."""
        return self.model.max_positions

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        device: str | torch.device | None = None,
        *,
        arch: str = "base",
        image_size: int = 384,
        tokenizer: str | Path | None = None,
        prompt: str | None = None,
        attention: str = "sdpa",
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        sha256: str | None = None,
        amp: bool | None = None,
    ) -> "Captioner":
        """Load ``source``, which may be:

        * a training checkpoint of this repository (``checkpoint_*.safetensors``), of any family: it carries its
          config, so the family, architecture, image size, tokenizer, prompt and the eval section's decoding come
          from there;
        * another form a family reads (``from_exported``): what ``scripts/export_hf.py`` wrote (BLIP: a
          transformers directory, also a hub id, with ``smile_blip.json``'s prompt; prefix LM: its folder with
          ``prefix_captioner.json``), or an original BLIP/SMILE ``.pth`` (path or URL): give ``arch`` and
          ``image_size`` (default base, 384).

        ``tokenizer`` and ``prompt`` override what the source says (e.g. a checkpoint trained on another machine
        whose vocab path does not exist here). ``attention``: "sdpa" or "eager" (BLIP).
        """
        source_text = str(source)
        path = Path(source_text).expanduser()
        generation = None
        if path.is_file() and is_own_checkpoint(path):
            model, generation, trained_amp = _from_training_checkpoint(path, tokenizer, prompt, attention)
            amp = trained_amp if amp is None else amp
        else:
            options = dict(tokenizer=tokenizer, prompt=prompt, attention=attention, arch=arch,
                           image_size=image_size, cache_dir=cache_dir, sha256=sha256)
            model = next((found for family in CAPTIONER_FAMILIES.values()
                          if (found := family.from_exported(source_text, **options)) is not None), None)
            if model is None and not path.exists():
                raise CheckpointError(f"{source_text}: no such file or directory, and not a hub id (owner/name) or "
                                      "URL")
            if model is None:
                raise CheckpointError(f"{source_text}: neither a checkpoint of this repository nor an export that a "
                                      f"model family ({', '.join(CAPTIONER_FAMILIES)}) reads (a transformers "
                                      "directory has a config.json)")
        return cls(model, device=device, generation=generation, amp=amp)

    @staticmethod
    def load_image(path: str | Path) -> Image.Image:
        """The RGB image at ``path``, turned upright by its EXIF orientation (a phone photo is captioned as it is
        shown, unlike the training data, see ``imaging``); a missing or undecodable file raises ``ValueError``
        naming it."""
        try:
            return open_rgb(path, exif_transpose=True)
        except FileNotFoundError:
            raise ValueError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"not a readable image: {path} ({error})") from None

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) pixel values on the device for PIL images and/or paths."""
        tensors = []
        for image in images:
            if isinstance(image, (str, Path)):
                image = self.load_image(image)  # already upright 8-bit RGB
            elif isinstance(image, Image.Image):
                image = to_rgb(image, exif_transpose=True)
            else:
                raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
            tensors.append(self.transform(image))
        return torch.stack(tensors).to(self.device, non_blocking=True)

    @torch.no_grad()
    def caption(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 16, **options) -> str | list[str]:
        """Captions for one image (-> str) or several (-> list[str], in order), ``batch_size`` at a time.

        ``options`` override the decoding defaults (``self.generation``): ``num_beams``, ``max_length`` and
        ``min_length`` (tokens, prompt included, as BLIP), ``sample`` (nucleus sampling with ``top_p``; seed
        with ``torch.manual_seed`` for repeatable samples), ``repetition_penalty``, ``no_repeat_ngram_size``
        (> 0: no n-gram of that size twice in a caption, against repetition loops; BLIP counts its prompt too).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = isinstance(images, (str, Path, Image.Image))
        items = [images] if single else list(images)
        settings = self.generation_settings(**options)
        captions: list[str] = []
        for start in range(0, len(items), batch_size):
            captions += self.caption_pixels(self.preprocess(items[start : start + batch_size]), **settings)
        return captions[0] if single else captions

    @torch.no_grad()
    def caption_candidates(self, pixel_values_or_images: torch.Tensor | ImageInput | Iterable[ImageInput],
                           num_candidates: int, batch_size: int = 16, **options) -> list[list[str]]:
        """``num_candidates`` captions per image, for re-ranking (``captioning.rerank.rerank_by_clip``): one list
        per image, in input order (a single image too gives a list of one list).

        Without ``sample``: the best ``num_candidates`` beams of one beam search, best first; the beam width is
        ``max(num_beams, num_candidates)``, since a beam search keeps no more hypotheses than its width (so with
        more candidates than ``num_beams`` the first candidate can differ from ``caption``'s). With ``sample``:
        ``num_candidates`` independent nucleus samples per image (duplicates are possible and kept). Other
        ``options`` as in ``caption``.

        Args:
            pixel_values_or_images: (B, 3, S, S) pixels already preprocessed with ``self.transform`` (any
                device), or what ``caption`` takes (one image or path, or several).
            num_candidates: N >= 1 captions per image.
            batch_size: images per generation call (each expands to N rows); ignored for a tensor, which is one
                batch.
        """
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an integer >= 1, got {num_candidates!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        settings = self.generation_settings(**options)
        if not settings["sample"]:
            settings["num_beams"] = max(settings["num_beams"], num_candidates)
        if isinstance(pixel_values_or_images, torch.Tensor):
            batches = [pixel_values_or_images]
        else:
            items = pixel_values_or_images
            items = [items] if isinstance(items, (str, Path, Image.Image)) else list(items)
            batches = (self.preprocess(items[start : start + batch_size]) for start in range(0, len(items), batch_size))
        candidates: list[list[str]] = []
        for pixel_values in batches:
            flat = self._generate(pixel_values, settings, num_return_sequences=num_candidates)  # image-major
            candidates += [flat[start : start + num_candidates] for start in range(0, len(flat), num_candidates)]
        return candidates

    def generation_settings(self, **options) -> dict:
        """``self.generation`` with ``options`` applied, checked: unknown names raise ``TypeError``, a
        ``max_length`` beyond the model's text positions or a negative ``no_repeat_ngram_size`` ``ValueError``."""
        unknown = set(options) - set(DEFAULT_GENERATION)
        if unknown:
            raise TypeError(f"unknown caption option(s) {sorted(unknown)}; valid: {sorted(DEFAULT_GENERATION)}")
        settings = {**self.generation, **options}
        ngram = settings["no_repeat_ngram_size"]
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got {ngram!r}")
        if settings["max_length"] > self.max_positions:
            raise ValueError(f"max_length {settings['max_length']} exceeds this model's {self.max_positions} text "
                             "positions (prompt included)")
        return settings

    @torch.no_grad()
    def caption_pixels(self, pixel_values: torch.Tensor, **options) -> list[str]:
        """Captions for one batch already preprocessed with ``self.transform``: ``pixel_values`` (B, 3, S, S) on
        any device (moved to the captioner's). For callers that decode images in DataLoader workers
        (caption_images.py); ``caption`` goes through here too, so both give the same captions."""
        return self._generate(pixel_values, self.generation_settings(**options))

    def _generate(self, pixel_values: torch.Tensor, settings: dict, **extra) -> list[str]:
        """The family's ``generate`` on ``pixel_values`` moved to the device, under bf16 autocast on CUDA when
        ``amp``; ``settings`` already checked by ``generation_settings``, ``extra`` family options beyond them
        (``num_return_sequences``)."""
        pixel_values = pixel_values.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with autocast:
            return self.model.generate(pixel_values, **settings, **extra)

    def __repr__(self) -> str:
        return f"Captioner(image_size={self.image_size}, device={self.device}, generation={self.generation})"


def _from_training_checkpoint(path: Path, tokenizer, prompt, attention) -> tuple[CaptionModel, dict, bool | None]:
    """(captioner, the eval section's decoding options, amp) from a checkpoint that carries its config."""
    state_dict, _, metadata = load_checkpoint_file(path)
    config = metadata.get("config") or {}
    model_config = config.get("model")
    if not model_config:
        raise CheckpointError(f"{path} carries no config (model section); load it with BlipCaptioner.build and "
                              "models.load_pretrained, giving the architecture yourself")
    try:
        family = captioner_family(model_config)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    built = family.inference_config(model_config, path, tokenizer=tokenizer, prompt=prompt, attention=attention)
    captioner = family.from_config(built)
    if lora.freezes_base(built):  # the checkpoint holds what trained: base from model.pretrained, then adapters
        lora.attach(captioner, built)
        lora.load_trainable_state_dict(captioner.model, state_dict, str(path))
    else:
        logger.info(apply_state_dict(captioner.model, state_dict, source=str(path), strict=True).summary())
    eval_config = config.get("eval") or {}
    generation = {key: eval_config[key] for key in DEFAULT_GENERATION if key in eval_config}
    # eval_caption.py generates under bf16 autocast on CUDA exactly when the run's amp is on (train.amp in the
    # configs of checkpoints saved before amp became a top-level key).
    return captioner, generation, config.get("amp", (config.get("train") or {}).get("amp"))
