"""Shared fixtures: the original-BLIP parity fixture and a tiny captioner built offline."""
from pathlib import Path

import pytest
import torch

# The tiny CLIP, GPT-2 and image folder of the metric tests, shared by every test module that names them.
pytest_plugins = ["metrics_fixtures"]

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_architecture():
    """The sizes the original-BLIP fixture was made with (vision width 48 differs from text width 32)."""
    from models import BlipArchitecture

    return BlipArchitecture(
        vision_width=48, vision_layers=2, vision_heads=4, vision_mlp=192, patch_size=16,
        text_width=32, text_layers=2, text_heads=4, text_intermediate=64, max_positions=64,
    )


@pytest.fixture(scope="session")
def blip_fixture():
    return torch.load(FIXTURES / "blip_original_fixture.pt", weights_only=True)


@pytest.fixture()
def fixture_captioner(blip_fixture):
    """A captioner holding the fixture's original weights, converted; in eval mode."""
    from models import BlipCaptioner
    from models.checkpoint import apply_state_dict, convert_original_state_dict

    captioner = BlipCaptioner.build(fixture_architecture(), image_size=32, tokenizer=FIXTURES / "vocab.txt")
    apply_state_dict(captioner.model, convert_original_state_dict(blip_fixture["checkpoint"]["model"]))
    return captioner.eval()
