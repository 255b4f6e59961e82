"""Loading weights into a BlipCaptioner from any source one config key (``pretrained:``) can name.

Sources, tried in this order:

* an ``http(s)://`` URL of an original BLIP/SMILE ``.pth`` (downloaded once into ``cache_dir``);
* a file: an original BLIP/SMILE ``.pth`` (``{"model": state_dict}`` with ``visual_encoder.*`` /
  ``text_decoder.*`` keys), this repository's own checkpoint (transformers names under ``"model"``), or a
  ``.safetensors`` file with transformers names;
* a transformers directory (``config.json`` + weights), e.g. one written by ``scripts/convert_checkpoint.py``;
* otherwise a transformers hub id such as ``Salesforce/blip-image-captioning-base``.

Every ``torch.load`` uses ``weights_only=True``: a checkpoint from the internet cannot run code on load.
"""
from __future__ import annotations

import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "smile_blip"

_POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"
# Tied to the word embeddings / prediction bias; transformers' own checkpoints may omit them.
_TIED_KEYS = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}

# Original timm-ViT names (after "visual_encoder.") -> BlipVisionModel names (after "vision_model.").
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model as asked; the message lists the offending keys."""


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original salesforce/BLIP caption state dict to ``BlipForConditionalGeneration`` names.

    ``visual_encoder.*`` becomes ``vision_model.*``; ``text_decoder.*`` (BLIP's med.py BertLMHeadModel) already
    uses transformers' BERT names and is kept. The ``position_ids`` buffer is dropped (transformers does not
    store it). Keys a captioner does not use (``text_encoder.*``, ``vision_proj.*``, momentum encoders, ...) are
    passed through unchanged so the loader can report them. Needs no model instance.

    Raises:
        CheckpointError: a ``visual_encoder.*`` key that no rule maps (a different ViT layout).
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("visual_encoder."):
            name = key[len("visual_encoder.") :]
            for pattern, replacement in _VISION_RENAMES:
                new_name, count = re.subn(pattern, replacement, name)
                if count:
                    converted["vision_model." + new_name] = value
                    break
            else:
                raise CheckpointError(f"unrecognised vision key {key!r}: not a BLIP ViT checkpoint layout")
        elif key == "text_decoder.bert.embeddings.position_ids":
            continue
        else:
            converted[key] = value
    return converted


def is_original_layout(state_dict: dict) -> bool:
    return any(key.startswith("visual_encoder.") for key in state_dict)


def interpolate_position_embedding(position_embedding: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize ViT position embeddings (1, 1 + n_old, D) to (1, 1 + num_patches, D), bicubic over the 2-D grid.

    The class-token embedding is kept; the patch grid is square, as in BLIP's ``interpolate_pos_embed``.
    """
    class_embedding, grid = position_embedding[:, :1], position_embedding[:, 1:]
    old_side, new_side = int(round(grid.shape[1] ** 0.5)), int(round(num_patches**0.5))
    if old_side**2 != grid.shape[1] or new_side**2 != num_patches:
        raise CheckpointError(f"position embeddings of {grid.shape[1]} patches cannot be resized to {num_patches}")
    grid = grid.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, -1).to(position_embedding.dtype)
    return torch.cat([class_embedding, grid], dim=1)


@dataclass
class LoadReport:
    """What happened when a state dict went into a model."""

    source: str
    resized: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (shape) vs model (shape)"
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.source}"]
        if self.resized:
            parts.append(f"interpolated {', '.join(self.resized)}")
        if self.mismatched:
            parts.append(f"dropped {len(self.mismatched)} key(s) with other shapes: {'; '.join(self.mismatched)}")
        if self.unused:
            prefixes = sorted({key.split(".")[0] for key in self.unused})
            parts.append(f"ignored {len(self.unused)} key(s) a captioner does not use (under {', '.join(prefixes)})")
        return "; ".join(parts)


def apply_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict",
                     strict: bool = True) -> LoadReport:
    """Load transformers-named weights into a ``BlipForConditionalGeneration``.

    Position embeddings are interpolated when the image size differs. Keys whose shape differs from the model's
    are dropped and reported. With ``strict`` (the default), any vision or text weight left unloaded (missing,
    or dropped for its shape) is an error listing the keys: the original BLIP code ignored them silently, which
    turns a wrong checkpoint into a quietly random model. ``strict=False`` logs them instead.
    """
    report = LoadReport(source=source)
    expected = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in expected:
            report.unused.append(key)
            continue
        target_shape = expected[key].shape
        if key == _POSITION_EMBEDDING and value.shape != target_shape and value.shape[-1] == target_shape[-1]:
            value = interpolate_position_embedding(value, target_shape[1] - 1)
            report.resized.append(f"{key} {tuple(state_dict[key].shape)} -> {tuple(target_shape)}")
        if value.shape != target_shape:
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target_shape)}")
            continue
        usable[key] = value
    for tied in _TIED_KEYS:
        usable.pop(tied, None)  # loaded through the tensor they are tied to
    missing = sorted(set(expected) - set(usable) - _TIED_KEYS)
    if missing or report.mismatched:
        message = (
            f"{source}: {len(missing)} model weight(s) not loaded"
            + (f" ({len(report.mismatched)} of them with other shapes: {'; '.join(report.mismatched)})"
               if report.mismatched else "")
            + f". Not loaded: {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
        if strict:
            raise CheckpointError(message + ". Is this checkpoint for another architecture or image size?")
        logger.warning(message)
    model.load_state_dict(usable, strict=False)
    return report


def download(url: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Download ``url`` once into ``cache_dir`` (atomic: a partial download is never mistaken for the file)."""
    name = Path(urllib.parse.urlparse(url).path).name
    destination = Path(cache_dir) / name
    if not destination.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, destination)
        partial = destination.with_suffix(destination.suffix + ".part")
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        partial.replace(destination)
    return destination


def read_state_dict(source: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> dict[str, torch.Tensor]:
    """Weights named as ``BlipForConditionalGeneration`` expects, from any supported source (see module doc)."""
    source = str(source)
    if source.startswith(("http://", "https://")):
        source = str(download(source, cache_dir))
    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an UnpicklingError names the refused global; keep it in the message
            raise CheckpointError(f"cannot read checkpoint {path} as plain tensors (weights_only=True): {error}") from error
        state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(checkpoint)}")
        return convert_original_state_dict(state_dict) if is_original_layout(state_dict) else state_dict
    if path.exists() and not (path / "config.json").exists():
        raise CheckpointError(f"{path} is a directory without config.json: not a transformers model directory")
    if not path.exists() and source.count("/") != 1:
        raise CheckpointError(f"pretrained source {source!r}: no such file or directory, and not a hub id or URL")
    from transformers import BlipForConditionalGeneration

    return BlipForConditionalGeneration.from_pretrained(source).state_dict()


def load_pretrained(captioner, source: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                    strict: bool = True) -> LoadReport:
    """Load ``source`` (see module doc) into ``captioner.model``; logs and returns what happened."""
    report = apply_state_dict(captioner.model, read_state_dict(source, cache_dir), source=str(source), strict=strict)
    logger.info(report.summary())
    return report


def save_transformers_directory(captioner, output_dir: str | Path) -> Path:
    """Write ``captioner`` as a transformers directory with its processor (image transform + tokenizer).

    ``BlipForConditionalGeneration.from_pretrained`` and ``BlipProcessor.from_pretrained`` load it; the image
    processor applies BLIP's eval transform (bicubic resize to the model's size, CLIP mean/std). The prompt is
    not a transformers concept, so it goes to ``smile_blip.json`` beside the weights, with the text length limit.
    """
    import json

    from transformers import BlipImageProcessor, BlipProcessor

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    captioner.model.save_pretrained(output_dir)
    size = captioner.image_size
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic, as BLIP's eval transform
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    BlipProcessor(image_processor=image_processor, tokenizer=captioner.tokenizer).save_pretrained(output_dir)
    extras = {"prompt": captioner.prompt, "max_text_length": captioner.max_text_length}
    (output_dir / "smile_blip.json").write_text(json.dumps(extras, indent=2))
    return output_dir
