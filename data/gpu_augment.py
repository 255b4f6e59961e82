"""BLIP's training augmentation with the decoding and the pixel work moved onto a device (CUDA; CPU in tests).

The PIL path (data/transforms.py) decodes and augments every image inside a DataLoader worker, about 66 images/s
per core at 384 px, too slow to feed a GPU. This path splits the same work in three:

* worker side, `EncodedImageTransform` (the dataset's per-item callable): reads the file, takes its size from the
  header, and draws every random choice the PIL pipeline draws, from the same generators, in the same order and
  with the same calls: ``RandomResizedCrop.get_params``, the flip's ``torch.rand(1) < 0.5``, then
  `BlipRandAugment`'s ``torch.randint(0, 2**32)`` seed and timm's NumPy/Python draws replayed from it on private
  generators. So one torch seed picks the same crop box, flip and RandAugment ops (op, applied or not, sign) on
  both paths, and DataLoader workers, which seed torch per worker, make the same choices as before.
  JPEGs in RGB or greyscale that end with their end marker travel as their file bytes; anything else (PNG, CMYK
  JPEG, 16-bit, palette, a truncated JPEG, ...) is decoded here with ``imaging.to_rgb``, so its pixels, and its
  failures (skipped or fatal by ``data.train_bad_images``), are exactly the PIL path's.
* `encoded_collate`: ``(EncodedImageBatch, captions, image_ids, num_skipped)``, the tuple `caption_collate` gives,
  with the images still encoded. The batch pins (``pin_memory``) and pickles across worker processes.
* `decode_and_augment` on the device: one batched ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA), then per image
  the crop and PIL's two-pass bicubic resize, then the flip and each RandAugment slot batched over the images
  that drew the same op, then ToTensor/Normalize with CLIP's statistics.

Pixels follow PIL's arithmetic where that is cheap, because the PIL path is the reference the model was tuned
with: the resize rounds between its horizontal and vertical pass as PIL does; autocontrast and equalize build
PIL's per-channel lookup tables exactly; the warps sample at PIL's pixel centres with its inside test, edge clamp
and truncating cast, in float64. Measured against the PIL path (tests/data/test_gpu_augment.py): CPU JPEG decode is
bit-exact (both libjpeg-turbo); the resize differs by at most 1 level in about 1e-4 of the values; every
RandAugment op at magnitude 5 is exact on the same input; the whole pipeline with RandAugment is within 4 levels
(Equalize can spread a one-level resize difference), more than 1 level off in under 1e-3 of the values. The
decode on CUDA (nvJPEG's own IDCT and chroma upsampling) is expected to differ by a level or two; not measured yet.
A JPEG that reads but fails to decode on the device raises `ImageLoadError` naming it, also when bad images are
skipped (the batch has been formed by then).

At BLIP's magnitude 5 of 10, Brightness and Sharpness have factor 1.8 * 5 / 10 + 0.1 = 1.0 and change nothing, in
timm and in BLIP's own cv2 code alike; they are implemented with PIL's formulas for other magnitudes anyway.
"""
from __future__ import annotations

import dataclasses
import io
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.functional import pil_to_tensor

from data.datasets import ImageLoadError, reading_image
from data.transforms import (
    _BLIP_TIMM_HPARAMS,
    BLIP_RANDAUGMENT_MAGNITUDE,
    BLIP_RANDAUGMENT_NUM_OPS,
    BLIP_RANDAUGMENT_OPS,
    BLIP_RANDAUGMENT_OP_PROB,
)
from imaging import CLIP_MEAN, CLIP_STD, check_image_size, to_rgb

OPS = BLIP_RANDAUGMENT_OPS
NOT_APPLIED = -1  # an op slot whose op was drawn but skipped (probability 1 - op prob)
_SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
_AFFINE_OPS = _SIGNED_OPS
# JPEG modes nvJPEG / libjpeg-turbo turn into the RGB that PIL's convert("RGB") gives; CMYK/YCCK JPEGs (PIL's
# conversion of inverted Adobe CMYK is its own) are decoded in the worker instead.
_DEVICE_JPEG_MODES = ("RGB", "L")
_JPEG_END = b"\xff\xd9"  # the EOI marker
_LEVEL_DENOM = 10.0  # timm's and BLIP's maximum magnitude


def op_arguments(magnitude: float = BLIP_RANDAUGMENT_MAGNITUDE, hparams: dict = _BLIP_TIMM_HPARAMS) -> dict:
    """timm's level -> argument map (auto_augment.LEVEL_TO_ARG) for BLIP's ops, before the random sign.

    Degrees for Rotate, shear factor, translation in pixels (``translate_const`` x level, not relative), enhance
    factor; written in timm's own expression order so the floats are the same.
    """
    level = max(0.0, min(float(magnitude), _LEVEL_DENOM))
    return {
        "Rotate": (level / _LEVEL_DENOM) * 30.0,
        "ShearX": (level / _LEVEL_DENOM) * 0.3,
        "ShearY": (level / _LEVEL_DENOM) * 0.3,
        "TranslateX": (level / _LEVEL_DENOM) * float(hparams["translate_const"]),
        "TranslateY": (level / _LEVEL_DENOM) * float(hparams["translate_const"]),
        "Brightness": (level / _LEVEL_DENOM) * 1.8 + 0.1,
        "Sharpness": (level / _LEVEL_DENOM) * 1.8 + 0.1,
    }


# ------------------------------------------------------------------------------------------ worker side


class ImageDraw(NamedTuple):
    """The random choices for one image: crop box in the stored image, flip, and per RandAugment slot the op's
    index in `OPS` (`NOT_APPLIED` when skipped) and its sign (+1 or -1; +1 for unsigned ops)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    ops: tuple[int, ...]
    signs: tuple[int, ...]


class EncodedImage(NamedTuple):
    """What a worker returns per image: ``data`` is the JPEG file (uint8, 1-D) when ``is_jpeg``, else the decoded
    RGB pixels (uint8, (3, H, W)); ``size`` is (height, width) from the header."""

    data: torch.Tensor
    is_jpeg: bool
    path: str
    size: tuple[int, int]
    draw: ImageDraw


def draw_randaugment(seed: int, num_ops: int = BLIP_RANDAUGMENT_NUM_OPS, op_prob: float = BLIP_RANDAUGMENT_OP_PROB,
                     op_names: Sequence[str] = OPS) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ops `BlipRandAugment` applies after seeding NumPy's and Python's generators with ``seed``.

    The draws are timm's, in timm's order, on private generators seeded the same way (so the caller's global
    generators are untouched): ``np.random.choice(ops, num_ops, replace=True)``; then per chosen op
    ``random.random() > op_prob`` skips it (BLIP's Identity op draws nothing and always "applies"), and a
    shear/translate/rotate that applies draws its sign, negative when ``random.random() > 0.5``.

    Returns (op indices, signs), one entry per slot; a skipped slot is `NOT_APPLIED` with sign +1.
    """
    chosen = np.random.RandomState(seed).choice(len(op_names), num_ops, replace=True)
    python_random = random.Random(seed)
    ops, signs = [], []
    for index in chosen.tolist():
        name = op_names[index]
        if name != "Identity" and op_prob < 1.0 and python_random.random() > op_prob:
            ops.append(NOT_APPLIED)
            signs.append(1)
            continue
        sign = -1 if name in _SIGNED_OPS and python_random.random() > 0.5 else 1
        ops.append(index)
        signs.append(sign)
    return tuple(ops), tuple(signs)


class EncodedImageTransform:
    """Worker-side half of BLIP's train transform: image file -> `EncodedImage` (bytes or pixels + the draws).

    ``reads_files = True`` makes `CaptionTrainDataset` pass the path rather than a decoded image. Errors reading
    the file or its header raise `ImageLoadError` naming it, so ``data.train_bad_images`` skips or fails as for
    the PIL path. Plain attributes only: it pickles into DataLoader workers.
    """

    reads_files = True

    def __init__(self, image_size: int, min_scale: float = 0.5, max_scale: float = 1.0, randaugment: bool = True,
                 horizontal_flip: bool = True):
        check_image_size(image_size)
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ValueError(
                f"need 0 < min_scale <= max_scale <= 1, got min_scale={min_scale!r}, max_scale={max_scale!r}")
        self.image_size = image_size
        self.scale = (min_scale, max_scale)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, which build_train_transform keeps
        self.randaugment = randaugment
        self.horizontal_flip = horizontal_flip

    def draw(self, width: int, height: int) -> ImageDraw:
        """This image's random choices, consuming torch's generator exactly as build_train_transform would."""
        # get_params only reads the size; a (0, H, W) tensor carries it without allocating pixels.
        top, left, crop_height, crop_width = RandomResizedCrop.get_params(
            torch.empty((0, height, width), dtype=torch.uint8), list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < 0.5) if self.horizontal_flip else False
        ops: tuple[int, ...] = ()
        signs: tuple[int, ...] = ()
        if self.randaugment:
            seed = int(torch.randint(0, 2**32, ()).item())  # BlipRandAugment.__call__'s one torch draw
            ops, signs = draw_randaugment(seed)
        return ImageDraw(top, left, crop_height, crop_width, flip, ops, signs)

    def __call__(self, path: str | Path) -> EncodedImage:
        with reading_image(path):
            raw = Path(path).read_bytes()
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                # A JPEG without its end marker is likely truncated: PIL decodes it here, and so fails (and the
                # file is skipped or fails the run) exactly where the PIL path would, not later on the device.
                is_jpeg = (image.format == "JPEG" and image.mode in _DEVICE_JPEG_MODES
                           and raw.rstrip(b"\0").endswith(_JPEG_END))
                if is_jpeg:
                    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                else:
                    # EXIF orientation is ignored here as in the PIL path (imaging.py).
                    data = pil_to_tensor(to_rgb(image))
        return EncodedImage(data, is_jpeg, str(path), (height, width), self.draw(width, height))

    def __repr__(self) -> str:
        return (f"EncodedImageTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"horizontal_flip={self.horizontal_flip}, randaugment={self.randaugment})")


# ------------------------------------------------------------------------------------------ collate


@dataclass
class EncodedImageBatch:
    """A training batch's images before decoding; what `encoded_collate` puts where `caption_collate` puts the
    (B, 3, S, S) tensor.

    ``data[i]`` is image i's JPEG bytes (``is_jpeg[i]``) or its RGB pixels (3, H, W) uint8; ``sizes`` (B, 2) int64
    (height, width) from the headers; ``crops`` (B, 4) int64 (top, left, height, width); ``flips`` (B,) bool;
    ``ops`` and ``signs`` (B, N) int64, N = RandAugment slots (0 when it is off). The control tensors stay on the
    CPU: the device code reads them as Python numbers to slice and to group images by op.

    ``batch.to(device)`` is where it becomes the model's input: `decode_and_augment` on that device, at
    ``image_size``. It stands where the training loop moves the PIL path's tensor with ``images.to(device)``, so
    the loop is the same for both paths (as ``pin_memory``, the DataLoader's own duck-typed hook, is).
    """

    data: list[torch.Tensor]
    is_jpeg: list[bool]
    paths: list[str]
    sizes: torch.Tensor
    crops: torch.Tensor
    flips: torch.Tensor
    ops: torch.Tensor
    signs: torch.Tensor
    image_size: int = 0  # the output side S; `encoded_collate` sets it

    def __len__(self) -> int:
        return len(self.data)

    def pin_memory(self) -> "EncodedImageBatch":
        """The DataLoader's ``pin_memory`` calls this: the payloads are pinned for the copy (and nvJPEG) to the GPU."""
        return dataclasses.replace(self, data=[item.pin_memory() for item in self.data])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """(B, 3, S, S) float32 on ``device``: the batch decoded and augmented there (`decode_and_augment`)."""
        return decode_and_augment(self, device, self.image_size)

    @classmethod
    def from_items(cls, items: Sequence[EncodedImage], image_size: int = 0) -> "EncodedImageBatch":
        slots = len(items[0].draw.ops) if items else 0
        return cls(
            data=[item.data for item in items],
            is_jpeg=[item.is_jpeg for item in items],
            paths=[item.path for item in items],
            sizes=torch.tensor([item.size for item in items], dtype=torch.long).reshape(-1, 2),
            crops=torch.tensor([item.draw[:4] for item in items], dtype=torch.long).reshape(-1, 4),
            flips=torch.tensor([item.draw.flip for item in items], dtype=torch.bool),
            ops=torch.tensor([item.draw.ops for item in items], dtype=torch.long).reshape(len(items), slots),
            signs=torch.tensor([item.draw.signs for item in items], dtype=torch.long).reshape(len(items), slots),
            image_size=image_size,
        )


def encoded_collate(batch: Sequence[tuple[EncodedImage | None, str, int]], image_size: int = 0):
    """Train batch -> ``(EncodedImageBatch, captions list[str], image_ids int64 (B,), num_skipped)``.

    As `caption_collate`: skipped images (None) are dropped and counted.
    """
    kept = [sample for sample in batch if sample[0] is not None]
    num_skipped = len(batch) - len(kept)
    images = EncodedImageBatch.from_items([sample[0] for sample in kept], image_size)
    captions = [sample[1] for sample in kept]
    image_ids = torch.tensor([sample[2] for sample in kept], dtype=torch.long)
    return images, captions, image_ids, num_skipped


# ------------------------------------------------------------------------------------------ device side


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    """One JPEG on ``device``, or PIL's decode of it when the device decoder refuses it (a JPEG variant nvJPEG
    lacks); `ImageLoadError` naming the file when neither can."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as device_error:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                return pil_to_tensor(to_rgb(image)).to(device)
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageLoadError(path, f"cannot decode it on {device} ({device_error}) nor with PIL "
                                       f"({type(error).__name__}: {error})") from error


def decode_images(batch: EncodedImageBatch, device: torch.device) -> list[torch.Tensor]:
    """Every image of ``batch`` as RGB uint8 (3, H, W) on ``device``; the JPEGs in one batched decode."""
    images: list[torch.Tensor | None] = [None] * len(batch)
    jpegs = [index for index, is_jpeg in enumerate(batch.is_jpeg) if is_jpeg]
    if jpegs:
        try:
            decoded = decode_jpeg([batch.data[index] for index in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: decode one by one to name it (or recover)
            decoded = [_decode_one(batch.data[index], batch.paths[index], device) for index in jpegs]
        for index, image in zip(jpegs, decoded):
            images[index] = image
    for index, is_jpeg in enumerate(batch.is_jpeg):
        if not is_jpeg:
            images[index] = batch.data[index].to(device, non_blocking=True)
    for image, path, (height, width) in zip(images, batch.paths, batch.sizes.tolist()):
        if tuple(image.shape) != (3, height, width):
            raise ImageLoadError(path, f"decoded to shape {tuple(image.shape)}, its header says {height}x{width}")
    return images


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """PIL's ``image.crop(box).resize((size, size), BICUBIC)`` on a (3, H, W) tensor -> (3, size, size) float32.

    PIL resizes in two passes, horizontal first, rounding to 8 bits in between; doing the same with torch's
    antialiased bicubic (PIL's a = -0.5 kernel, widened when shrinking) brings the difference from ~0.2 of the
    values off by one level down to ~1e-4 (PIL's fixed-point weights account for the rest).
    """
    pixels = image[:, top:top + height, left:left + width].unsqueeze(0).float()  # (1, 3, h, w)
    if width != size:
        pixels = F.interpolate(pixels, size=(height, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels.round_().clamp_(0, 255)
    if height != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels.round_().clamp_(0, 255)
    return pixels[0]


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.autocontrast`` (cutoff 0) per image and channel: (n, 3, H, W) integer-valued float32.

    PIL's lookup table, in PIL's float64 arithmetic: ``int(v * scale + offset)`` clipped to 0..255 with
    ``scale = 255 / (hi - lo)``, ``offset = -lo * scale``; a channel with one value is left alone.
    """
    n, channels = images.shape[:2]
    values = images.reshape(n * channels, -1).to(torch.int64)
    low = values.amin(dim=1, keepdim=True).double()
    high = values.amax(dim=1, keepdim=True).double()
    # a tensor / tensor division: torch computes `255.0 / tensor` as 255 x reciprocal, a last bit off PIL's
    scale = torch.div(torch.full_like(high, 255.0), (high - low).clamp(min=1))
    offset = -low * scale
    levels = torch.arange(256, dtype=torch.float64, device=images.device).unsqueeze(0)
    # mul and add as separate kernels: no fused multiply-add, so the products round as in Python
    table = torch.add(torch.mul(levels, scale), offset).trunc().clamp(0, 255)
    table = torch.where(high > low, table, levels)
    return table.gather(1, values).to(images.dtype).reshape(images.shape)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageOps.equalize`` per image and channel: (n, 3, H, W) integer-valued float32.

    PIL's table in integers: ``step = (pixels - count of the last used level) // 255`` and
    ``table[i] = (step // 2 + pixels below level i) // step``; identity when one level is used or step is 0.
    """
    n, channels = images.shape[:2]
    rows = n * channels
    values = images.reshape(rows, -1).to(torch.int64)
    offsets = torch.arange(rows, device=images.device).unsqueeze(1) * 256
    histogram = torch.bincount((values + offsets).reshape(-1), minlength=rows * 256).reshape(rows, 256)
    used = histogram > 0
    last_used = 255 - used.flip(1).to(torch.int8).argmax(dim=1, keepdim=True)
    step = (values.shape[1] - histogram.gather(1, last_used)) // 255
    below = histogram.cumsum(dim=1) - histogram
    table = (step // 2 + below) // step.clamp(min=1)
    levels = torch.arange(256, device=images.device).unsqueeze(0)
    keep = (used.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    table = torch.where(keep, levels, table).clamp(max=255)
    return table.gather(1, values).to(images.dtype).reshape(images.shape)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` on 8-bit values: float32 arithmetic, truncated, clipped.
    Factor 1.0 (BLIP's magnitude 5) gives the image back exactly; the callers skip the work then."""
    factor = torch.tensor(factor, dtype=torch.float32)
    return (degenerate + factor * (images - degenerate)).trunc().clamp(0, 255)


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ``ImageEnhance.Brightness(image).enhance(factor)``: a blend with black."""
    return images if factor == 1.0 else _blend(torch.zeros_like(images), images, factor)


def sharpness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ``ImageEnhance.Sharpness(image).enhance(factor)``: a blend with PIL's SMOOTH filter of the image
    (3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; the one-pixel border is not filtered)."""
    if factor == 1.0:
        return images
    kernel = torch.ones(3, 3, dtype=images.dtype, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(images.shape[1], 1, 3, 3)
    smooth = F.conv2d(images, kernel, groups=images.shape[1]).round_().clamp_(0, 255)
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, images, factor)


def affine_matrix(name: str, argument: float, size: int) -> tuple[float, ...]:
    """PIL's inverse affine ``(a, b, c, d, e, f)`` for timm's op ``name`` on a size x size image.

    Output pixel centre (x + 0.5, y + 0.5) samples the input at (a x' + b y' + c, d x' + e y' + f); shears are
    about the top-left corner, translations in pixels, rotation about (w / 2, h / 2) counter-clockwise for a
    positive angle, with PIL's ``Image.rotate`` construction (cosines rounded to 15 digits).
    """
    if name == "ShearX":
        return (1.0, argument, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, argument, 1.0, 0.0)
    if name == "TranslateX":
        return (1.0, 0.0, argument, 0.0, 1.0, 0.0)
    if name == "TranslateY":
        return (1.0, 0.0, 0.0, 0.0, 1.0, argument)
    if name == "Rotate":
        angle = -math.radians(argument % 360.0)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
        centre_x, centre_y = size / 2.0, size / 2.0
        c = a * -centre_x + b * -centre_y + 0.0 + centre_x
        f = d * -centre_x + e * -centre_y + 0.0 + centre_y
        return (a, b, c, d, e, f)
    raise ValueError(f"{name!r} is not an affine op")


def pil_affine(images: torch.Tensor, matrices: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill)`` for n images at once.

    images: (n, C, H, W) integer-valued float; matrices: (n, 6) PIL inverse affines (`affine_matrix`).
    PIL's rules, in float64 as PIL computes: the output pixel centre maps into the input; a point outside
    [0, W) x [0, H) takes the fill; inside, bilinear interpolation between the pixel centres around it with the
    neighbours clamped to the image, and the result truncated to an integer. grid_sample cannot express the
    inside test, so this gathers the four neighbours itself.
    """
    n, channels, height, width = images.shape
    device = images.device
    m = matrices.to(device=device, dtype=torch.float64).view(n, 6, 1, 1)
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5).view(1, 1, width)
    ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5).view(1, height, 1)
    x_in = torch.add(torch.mul(m[:, 0], xs) + torch.mul(m[:, 1], ys), m[:, 2])  # (n, H, W), Geometry.c's order
    y_in = torch.add(torch.mul(m[:, 3], xs) + torch.mul(m[:, 4], ys), m[:, 5])
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x_floor, y_floor = x_in.floor(), y_in.floor()
    dx = (x_in - x_floor).view(n, 1, -1)
    dy = (y_in - y_floor).view(n, 1, -1)
    x0, y0 = x_floor.long(), y_floor.long()
    x1, y1 = (x0 + 1).clamp(0, width - 1), (y0 + 1).clamp(0, height - 1)
    x0, y0 = x0.clamp(0, width - 1), y0.clamp(0, height - 1)
    flat = images.reshape(n, channels, height * width).double()

    def neighbour(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        index = (rows * width + columns).view(n, 1, -1).expand(n, channels, height * width)
        return flat.gather(2, index)

    top_left, top_right = neighbour(y0, x0), neighbour(y0, x1)
    bottom_left, bottom_right = neighbour(y1, x0), neighbour(y1, x1)
    top = top_left + (top_right - top_left) * dx
    bottom = bottom_left + (bottom_right - bottom_left) * dx
    value = (top + (bottom - top) * dy).trunc()
    fill_value = torch.tensor(fill, dtype=torch.float64, device=device).view(1, channels, 1)
    value = torch.where(inside.view(n, 1, -1), value, fill_value)
    return value.to(images.dtype).view(n, channels, height, width)


def apply_op(images: torch.Tensor, name: str, signs: Sequence[int] | None = None,
             magnitude: float = BLIP_RANDAUGMENT_MAGNITUDE) -> torch.Tensor:
    """timm's RandAugment op ``name`` at ``magnitude`` on (n, 3, S, S) integer-valued float32 images.

    ``signs`` (n values of +1/-1) sets each image's direction for shear/translate/rotate (timm's random negation).
    """
    arguments = op_arguments(magnitude)
    if name == "Identity":
        return images
    if name == "AutoContrast":
        return autocontrast(images)
    if name == "Equalize":
        return equalize(images)
    if name == "Brightness":
        return brightness(images, arguments[name])
    if name == "Sharpness":
        return sharpness(images, arguments[name])
    if name in _AFFINE_OPS:
        signs = [1] * len(images) if signs is None else list(signs)
        size = images.shape[-1]
        matrices = torch.tensor([affine_matrix(name, sign * arguments[name], size) for sign in signs],
                                dtype=torch.float64)
        return pil_affine(images, matrices, _BLIP_TIMM_HPARAMS["img_mean"])
    raise ValueError(f"unknown RandAugment op {name!r}; known: {OPS}")


def _apply_slot(images: torch.Tensor, ops: list[int], signs: list[int]) -> torch.Tensor:
    """One RandAugment slot over the batch: each op runs once, on the images that drew it; all the warps
    (shear, translate, rotate) share one `pil_affine` call, each image with its own matrix."""
    size = images.shape[-1]
    arguments = op_arguments()
    warped, matrices = [], []
    for op in sorted(set(ops) - {NOT_APPLIED}):
        name = OPS[op]
        members = [index for index, drawn in enumerate(ops) if drawn == op]
        if name == "Identity":
            continue
        if name in _AFFINE_OPS:
            warped += members
            matrices += [affine_matrix(name, signs[index] * arguments[name], size) for index in members]
            continue
        rows = torch.tensor(members, device=images.device)
        images[rows] = apply_op(images[rows], name)
    if warped:
        rows = torch.tensor(warped, device=images.device)
        images[rows] = pil_affine(images[rows], torch.tensor(matrices, dtype=torch.float64),
                                  _BLIP_TIMM_HPARAMS["img_mean"])
    return images


def decode_and_augment(batch: EncodedImageBatch, device: torch.device | str, image_size: int) -> torch.Tensor:
    """``batch`` -> (B, 3, image_size, image_size) float32 on ``device``, normalised with CLIP's mean and std:
    what stacking build_train_transform's outputs for the same draws gives (to the tolerances in the module
    docstring). Raises `ImageLoadError` naming a file that fails to decode."""
    device = torch.device(device)
    if len(batch) == 0:
        return torch.empty(0, 3, image_size, image_size, device=device)
    decoded = decode_images(batch, device)
    images = torch.stack([resized_crop(image, *box, image_size)
                          for image, box in zip(decoded, batch.crops.tolist())])  # (B, 3, S, S) in 0..255
    if batch.flips.any():
        rows = batch.flips.nonzero().flatten().to(device)
        images[rows] = images[rows].flip(-1)
    for ops, signs in zip(batch.ops.t().tolist(), batch.signs.t().tolist()):
        images = _apply_slot(images, ops, signs)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return images.div_(255).sub_(mean).div_(std)  # ToTensor, then Normalize, in their order


# ------------------------------------------------------------------------------------------ wiring


class DevicePipeline(NamedTuple):
    """What the training loader needs: the dataset's transform and the loader's collate. The collated images become
    the model's input on the device where the loop moves them there (``EncodedImageBatch.to(device)``)."""

    worker_transform: EncodedImageTransform
    collate: Callable


def build_device_pipeline(image_size: int, min_scale: float = 0.5, max_scale: float = 1.0,
                          randaugment: bool = True, horizontal_flip: bool = True) -> DevicePipeline:
    """BLIP's train augmentation (the arguments of `build_train_transform`) split between workers and a device.

    Use ``worker_transform`` as `CaptionTrainDataset`'s transform and ``collate`` as the DataLoader's; each batch's
    images then arrive as an `EncodedImageBatch`, and ``images.to(device)`` decodes and augments them there.
    """
    transform = EncodedImageTransform(image_size, min_scale, max_scale, randaugment, horizontal_flip)
    return DevicePipeline(transform, partial(encoded_collate, image_size=image_size))
