"""BLIP's image transform for caption fine-tuning (its evaluation transform is ``imaging.eval_transform``, which
the captioners' ``eval_transform()`` and the Python API share).

The pipeline takes an RGB `PIL.Image` (the datasets convert to RGB when they open a file) and
returns a float32 tensor of shape (3, image_size, image_size), normalised with CLIP's statistics
because BLIP's ViT was pre-trained with them.

Randomness: every random choice in the train pipeline is drawn from torch's generator (timm's
RandAugment draws from Python's and NumPy's global generators; we seed those from torch for the
duration of the call and restore them afterwards). One `torch.manual_seed` therefore fixes the
augmentation, and DataLoader workers, which re-seed torch per worker, get distinct streams.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from imaging import CLIP_MEAN, CLIP_STD
from imaging import check_image_size as _check_image_size

# BLIP's `RandomAugment(2, 5, isPIL=True, augs=[...])` op list for captioning, in BLIP's order.
BLIP_RANDAUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
BLIP_RANDAUGMENT_NUM_OPS = 2
BLIP_RANDAUGMENT_MAGNITUDE = 5  # out of timm's and BLIP's shared maximum level of 10
BLIP_RANDAUGMENT_OP_PROB = 0.5

# timm hyper-parameters that reproduce BLIP's op arguments: BLIP translates by
# level/10 * 10 pixels (so 5 px at magnitude 5, on the already-cropped image), fills uncovered
# pixels with grey 128, and warps with cv2's bilinear interpolation.
_BLIP_TIMM_HPARAMS = {
    "translate_const": 10,
    "img_mean": (128, 128, 128),
    "interpolation": Image.Resampling.BILINEAR,
}


class IdentityOp:
    """RandAugment op that returns the image unchanged.

    timm has no "Identity" op, but BLIP's list includes one; drawing it is how BLIP leaves an
    image (or one of its two op slots) un-augmented, so it must stay in the list for the other
    ops to be drawn with BLIP's frequency (1/10 each).
    """

    name = "Identity"

    def __call__(self, image: Image.Image) -> Image.Image:
        return image

    def __repr__(self) -> str:
        return "IdentityOp()"


class BlipRandAugment:
    """BLIP's RandomAugment(N=2, M=5) over BLIP's op list, built from timm's RandAugment.

    Per image: draw `num_ops` ops uniformly with replacement from `BLIP_RANDAUGMENT_OPS`; apply
    each with probability 0.5 at magnitude 5 of 10. Shear/translate/rotate flip their sign with
    probability 0.5. This matches BLIP's sampling; the remaining differences are in pixels, not
    in the distribution:

    - BLIP implements the ops with cv2/NumPy; timm uses PIL. The formulas are the same (BLIP's
      own comments say "same output as PIL"), so results differ at most by rounding and
      interpolation details; shear and translate use opposite sign conventions, which does not
      matter because the sign is random.
    - Randomness comes from torch (see module docstring) instead of NumPy's global generator.

    Input: RGB PIL image. Output: RGB PIL image of the same size.
    """

    def __init__(
        self,
        num_ops: int = BLIP_RANDAUGMENT_NUM_OPS,
        magnitude: float = BLIP_RANDAUGMENT_MAGNITUDE,
        op_prob: float = BLIP_RANDAUGMENT_OP_PROB,
        op_names: tuple[str, ...] = BLIP_RANDAUGMENT_OPS,
    ):
        ops = [
            IdentityOp()
            if name == "Identity"
            else AugmentOp(name, prob=op_prob, magnitude=magnitude, hparams=_BLIP_TIMM_HPARAMS)
            for name in op_names
        ]
        # choice_weights=None makes timm draw ops uniformly *with* replacement, as BLIP does.
        self.rand_augment = RandAugment(ops, num_layers=num_ops, choice_weights=None)

    @property
    def op_names(self) -> list[str]:
        return [op.name for op in self.rand_augment.ops]

    def __call__(self, image: Image.Image) -> Image.Image:
        seed = int(torch.randint(0, 2**32, ()).item())
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.rand_augment(image)
        finally:
            # Leave the caller's global generators exactly as we found them.
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"BlipRandAugment({self.rand_augment!r})"


def build_train_transform(
    image_size: int,
    min_scale: float = 0.5,
    max_scale: float = 1.0,
    randaugment: bool = True,
    horizontal_flip: bool = True,
) -> transforms.Compose:
    """BLIP's caption fine-tuning transform: RGB PIL image -> (3, image_size, image_size) float32.

    RandomResizedCrop(scale=(min_scale, max_scale), bicubic) -> RandomHorizontalFlip (optional)
    -> BlipRandAugment (optional) -> ToTensor -> Normalize(CLIP mean/std). BLIP's caption configs
    use min_scale 0.5; the crop comes before RandAugment so translations are in output pixels.

    Both switches default to BLIP's behaviour. Turn `horizontal_flip` off when captions name
    left and right (the toy set does; a flip would make half of those captions wrong), and
    `randaugment` off for the toy set too, since rotations and shears fill corners with grey
    and so change the "background" the captions describe.
    """
    _check_image_size(image_size)
    if not 0.0 < min_scale <= max_scale <= 1.0:
        raise ValueError(
            f"need 0 < min_scale <= max_scale <= 1, got min_scale={min_scale!r}, max_scale={max_scale!r}"
        )
    steps: list = [
        transforms.RandomResizedCrop(
            image_size, scale=(min_scale, max_scale), interpolation=InterpolationMode.BICUBIC
        )
    ]
    if horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    if randaugment:
        steps.append(BlipRandAugment())
    steps += [transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    return transforms.Compose(steps)
