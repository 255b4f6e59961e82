"""BLIP, prefix-LM (ClipCap) and transformers image-text-to-text (VLM) captioners, checkpoints, SDPA attention,
caption objectives and the inference API.

Imports nothing from data/ or metrics/.
"""
from .attention import ATTENTION_IMPLEMENTATIONS, attention_of, set_attention
from .captioner import ARCHITECTURES, BlipArchitecture, BlipCaptioner, build_tokenizer, resolve_architecture
from .checkpoint import CheckpointError, convert_original_state_dict, load_pretrained
from .families import CAPTIONER_FAMILIES, CaptionModel, captioner_family
from .inference import Captioner
from .objectives import IGNORE_INDEX, OBJECTIVES, CaptionObjective, HeadFeatures, caption_loss
from .prefix_captioner import PrefixCaptioner, PrefixConfig, load_clipcap_checkpoint
from .vlm_captioner import VlmCaptioner

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_IMPLEMENTATIONS",
    "BlipArchitecture",
    "BlipCaptioner",
    "CAPTIONER_FAMILIES",
    "CaptionModel",
    "Captioner",
    "CaptionObjective",
    "CheckpointError",
    "HeadFeatures",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "PrefixCaptioner",
    "PrefixConfig",
    "VlmCaptioner",
    "attention_of",
    "build_tokenizer",
    "caption_loss",
    "captioner_family",
    "convert_original_state_dict",
    "load_clipcap_checkpoint",
    "load_pretrained",
    "resolve_architecture",
    "set_attention",
]
