"""Pixels in: decoding an image file to 8-bit RGB, and the preprocessing BLIP's ViT expects. One home for both.

data/ (training and evaluation pipelines), models/ (the ``Captioner`` API, the transformers export), metrics/
(CLIP) and the demo all read images and share BLIP's constants from here, so neither data/ nor models/ reaches
into the other. Imports nothing of the project.

* ``to_rgb``: PIL's own ``convert("RGB")`` clips 16-bit and 32-bit greyscale ("I;16", "I", "F") at 255 instead
  of rescaling, so a 16-bit PNG comes out almost white. Those modes are scaled to 8 bits first, by their format's
  full range: 16-bit (and "I" holding 0..65535, as older Pillow opens 16-bit PNGs) / 257, the exact
  65535 -> 255 map; "F" in 0..1 x 255; anything else by the image's own maximum.
* EXIF orientation: ``to_rgb(image, exif_transpose=True)`` turns a phone photo upright. The datasets do NOT do
  this, for parity with the original BLIP code, which trained and evaluated on the stored pixels (COCO and
  Flickr30K images rarely carry a rotation tag); the ``Captioner`` API and the demo do, because a user's upload
  should be captioned the way it is shown.
* BLIP's ViT was pre-trained on CLIP-normalised pixels, and BLIP evaluates on a bicubic resize to a square
  (aspect ratio not kept): ``eval_transform``.
* Every PIL image plugin is imported here, once, when the first module reads images (``Image.init()``, ~50 ms).
  PIL otherwise imports a format's plugin on the first image of that format, in whichever thread opens it; a
  DataLoader worker forked while another thread is inside that import inherits the import lock held and waits
  for it forever (the evaluation hang of metrics/clip_metrics.py's ``_pixel_batches``, there from the other side).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

Image.init()  # every image plugin now, in the importing thread (module docstring)


def to_rgb(image: Image.Image, exif_transpose: bool = False) -> Image.Image:
    """``image`` as 8-bit RGB, high-bit-depth greyscale rescaled rather than clipped; decodes every pixel.

    With ``exif_transpose``, the EXIF orientation tag is applied first (the image is shown upright).
    """
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and low >= 0 and high <= 65535):
            scaled = values / 257.0  # 0..65535 -> 0..255 exactly
        elif image.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        else:  # no known range: the image's own maximum is white
            scaled = values * (255.0 / high) if high > 0 else np.zeros_like(values)
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def open_rgb(path, exif_transpose: bool = False) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB (``to_rgb``); PIL's errors pass through for the caller to name."""
    with Image.open(path) as image:
        # Converting inside the ``with`` forces the lazy decode while the file is still open.
        return to_rgb(image, exif_transpose=exif_transpose)


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
