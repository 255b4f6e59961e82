"""BLIP captioner, checkpoint loading/conversion and caption objectives. Imports nothing from data/ or metrics/."""
from .captioner import ARCHITECTURES, BlipArchitecture, BlipCaptioner, build_tokenizer, resolve_architecture
from .checkpoint import CheckpointError, convert_original_state_dict, load_pretrained
from .objectives import IGNORE_INDEX, OBJECTIVES, CaptionObjective

__all__ = [
    "ARCHITECTURES",
    "BlipArchitecture",
    "BlipCaptioner",
    "CaptionObjective",
    "CheckpointError",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "build_tokenizer",
    "convert_original_state_dict",
    "load_pretrained",
    "resolve_architecture",
]
