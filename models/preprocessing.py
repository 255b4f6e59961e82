"""The image preprocessing BLIP's ViT expects at inference: the one home of its constants.

BLIP's ViT was pre-trained on CLIP-normalised pixels, and BLIP evaluates on a bicubic resize to a square
(aspect ratio not kept). ``data/transforms.py`` builds the training and evaluation pipelines on these, and
``models.inference.Captioner`` uses ``eval_transform`` so that its captions equal ``eval_caption.py``'s.
"""
from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def eval_transform(image_size: int) -> transforms.Compose:
    """RGB PIL image -> (3, image_size, image_size) float32: bicubic resize, ToTensor, CLIP mean/std."""
    check_image_size(image_size)
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
