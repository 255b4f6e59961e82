"""Loading weights into a BlipCaptioner from any source one config key (``pretrained:``) can name.

Sources, tried in this order:

* an ``http(s)://`` URL of an original BLIP/SMILE ``.pth`` (downloaded once into ``cache_dir``);
* a file: an original BLIP/SMILE ``.pth`` (``{"model": state_dict}`` with ``visual_encoder.*`` /
  ``text_decoder.*`` keys), this repository's own ``.safetensors`` checkpoint (``save_checkpoint_file``), a
  ``.pth`` state dict with transformers names, or a ``.safetensors`` file with transformers names;
* a transformers directory (``config.json`` + weights), e.g. one written by ``scripts/convert_checkpoint.py``;
* otherwise a transformers hub id such as ``Salesforce/blip-image-captioning-base``.

Every ``torch.load`` uses ``weights_only=True``: a checkpoint from the internet cannot run code on load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import hub
from utils import publish_file

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "smile_blip"

_POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"
# Tied to the word embeddings / prediction bias (BLIP's LM head; GPT-2's lm_head and wte): saved once, loaded
# through the tensor they are tied to; transformers' own checkpoints may omit them.
_TIED_KEYS = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias",
              "gpt.lm_head.weight"}

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


# sha256 of checkpoint files whose digest is published; a download whose digest differs is rejected.
# Neither salesforce/BLIP nor the SMILE authors publish digests, so the table starts empty: add entries as
# you verify files, or pass ``sha256=`` / ``model.pretrained_sha256``.
KNOWN_SHA256: dict[str, str] = {}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_path(url: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where `download` keeps ``url``: its file name in ``cache_dir``."""
    return Path(cache_dir) / Path(urllib.parse.urlparse(url).path).name


def download(url: str, cache_dir: str | Path = DEFAULT_CACHE_DIR, sha256: str | None = None,
             what: str = "model.pretrained") -> Path:
    """Download ``url`` once into ``cache_dir`` and return the cached path.

    Atomic: the file is downloaded under a ``.part`` name and renamed, so an interrupted download is never
    mistaken for the file. When a sha256 is given (or known in ``KNOWN_SHA256`` by file name), the download is
    verified before it is kept, and a cached copy is re-verified. A URL not yet cached, on a machine that cannot
    reach its host (or with HF_HUB_OFFLINE set), is a one-line ``hub.HubUnavailableError`` naming ``what``.
    """
    name = Path(urllib.parse.urlparse(url).path).name
    expected = sha256 or KNOWN_SHA256.get(name)
    destination = download_path(url, cache_dir)
    hub.require_url(url, what, cached=destination.exists())
    if not destination.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, destination)
        partial = destination.with_suffix(destination.suffix + ".part")
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        if expected and file_sha256(partial) != expected:
            actual = file_sha256(partial)
            partial.unlink()
            raise CheckpointError(f"{url}: sha256 {actual} does not match the expected {expected}; not kept")
        publish_file(partial, destination)  # torch.hub's temp file is 0600
    elif expected and file_sha256(destination) != expected:
        raise CheckpointError(f"cached {destination} has sha256 {file_sha256(destination)}, expected {expected}; "
                              "delete it to download again")
    return destination


# --------------------------------------------------------------------------------------------------------------
# This repository's checkpoints: one safetensors file holding the model weights under "model/", any further
# tensors (optimizer moments, RNG states) under their own prefixes, and JSON metadata (config, counters). Loading
# one never unpickles anything.
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "smile-blip-checkpoint-v1"
MODEL_PREFIX = "model/"


def save_checkpoint_file(path: str | Path, model_state: dict[str, torch.Tensor],
                         tensors: dict[str, torch.Tensor] | None = None, metadata: dict | None = None) -> None:
    """Write weights (+ extra tensors, + JSON-serialisable metadata) atomically as one safetensors file.

    Tied weights (the LM head shares the word embeddings) are stored once: safetensors refuses aliases.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    payload = {MODEL_PREFIX + key: value.detach().contiguous() for key, value in model_state.items()
               if key not in _TIED_KEYS}
    for key, value in (tensors or {}).items():
        if key.startswith(MODEL_PREFIX):
            raise ValueError(f"extra tensor {key!r} would shadow a model weight")
        payload[key] = value.detach().contiguous()
    header = {"format": CHECKPOINT_FORMAT, "metadata": json.dumps(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as handle:
        temporary = handle.name
    try:
        save_file({k: v.cpu() for k, v in payload.items()}, temporary, metadata=header)
        publish_file(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, (OSError, SafetensorError)):  # e.g. the disk is full: name the file and the folder
            raise CheckpointError(f"could not write checkpoint {path} (in {path.parent.absolute()}): {error}. "
                                  f"Any earlier file at that path is unchanged.") from error
        raise


def load_checkpoint_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model state dict, other tensors, metadata) of a file written by ``save_checkpoint_file``."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file (format {header.get('format')!r})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except CheckpointError:
        raise
    except Exception as error:  # truncated or not safetensors at all
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    model = {key[len(MODEL_PREFIX):]: value for key, value in tensors.items() if key.startswith(MODEL_PREFIX)}
    others = {key: value for key, value in tensors.items() if not key.startswith(MODEL_PREFIX)}
    return model, others, json.loads(header.get("metadata", "{}"))


def is_own_checkpoint(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == CHECKPOINT_FORMAT
    except Exception:
        return False


def read_state_dict(source: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                    sha256: str | None = None, what: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """Weights named as ``BlipForConditionalGeneration`` expects, from any supported source (see module doc).

    ``what`` (the config key or flag ``source`` came from) is named when a hub id or URL cannot be fetched."""
    source = str(source)
    if source.startswith(("http://", "https://")):
        source = str(download(source, cache_dir, sha256=sha256, what=what))
    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            if is_own_checkpoint(path):
                return load_checkpoint_file(path)[0]
            from safetensors.torch import load_file

            try:  # a plain safetensors state dict (e.g. a transformers model.safetensors) ...
                return load_file(str(path))
            except Exception as error:  # ... or a truncated / foreign file: say which one
                raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
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
    if not path.exists() and not looks_like_hub_id(source):
        raise CheckpointError(f"checkpoint {source!r} not found: no such file or directory "
                              f"({path.absolute()}), and not a hub id (owner/name) or URL")
    from transformers import BlipForConditionalGeneration

    return hub.from_pretrained(BlipForConditionalGeneration.from_pretrained, source, what).state_dict()


# File suffixes of checkpoints: a missing "runs/x_best.safetensors" is a missing local file, not a hub repository.
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a local path: one slash, no checkpoint suffix, not absolute, dotted or ``~``."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~", "http:", "https:"))
            and Path(source).suffix not in CHECKPOINT_SUFFIXES and not Path(source).exists())


def load_pretrained(captioner, source: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                    strict: bool = True, sha256: str | None = None) -> LoadReport:
    """Load ``source`` (see module doc) into ``captioner.model``; logs and returns what happened."""
    state_dict = read_state_dict(source, cache_dir, sha256=sha256)
    report = apply_state_dict(captioner.model, state_dict, source=str(source), strict=strict)
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

    from imaging import CLIP_MEAN, CLIP_STD

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    captioner.model.save_pretrained(output_dir)
    size = captioner.image_size
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic, as BLIP's eval transform
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    BlipProcessor(image_processor=image_processor, tokenizer=captioner.tokenizer).save_pretrained(output_dir)
    extras = {"prompt": captioner.prompt, "max_text_length": captioner.max_text_length}
    (output_dir / "smile_blip.json").write_text(json.dumps(extras, indent=2))
    return output_dir
