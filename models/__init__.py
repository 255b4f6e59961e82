"""BLIP captioner, checkpoint loading/conversion, SDPA attention, caption objectives and the inference API.

Imports nothing from data/ or metrics/.
"""
from .attention import ATTENTION_IMPLEMENTATIONS, attention_of, set_attention
from .captioner import ARCHITECTURES, BlipArchitecture, BlipCaptioner, build_tokenizer, resolve_architecture
from .checkpoint import CheckpointError, convert_original_state_dict, load_pretrained
from .inference import Captioner
from .objectives import IGNORE_INDEX, OBJECTIVES, CaptionObjective

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_IMPLEMENTATIONS",
    "BlipArchitecture",
    "BlipCaptioner",
    "Captioner",
    "CaptionObjective",
    "CheckpointError",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "attention_of",
    "build_tokenizer",
    "convert_original_state_dict",
    "load_pretrained",
    "resolve_architecture",
    "set_attention",
]
