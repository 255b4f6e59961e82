"""Caption datasets over BLIP's Karpathy-split annotation files, COCO ground truth, and collate.

Annotation formats (docs/data.md, "Annotation files and image folders"):

- train: a JSON list with one entry per caption, ``{"image": "val2014/COCO_...391895.jpg",
  "caption": str, "image_id": "coco_391895"}``. We also accept a list of captions in one entry,
  expanded to one sample per caption (the toy and some converted sets use it).
- val/test: one entry per image, ``{"image": relative path, "caption": [5 strings]}``.

Image ids are the integer at the end of the image file name (`image_id_from_path`), the id BLIP
evaluates with, so train, eval and ground truth agree without trusting BLIP's ``image_id``. An entry
may carry its id as a JSON integer ``id`` instead (`entry_image_id`; the files ``scripts/prepare_data.py
custom`` writes for a user's own images, keyed by any string, which they keep in ``key``).
Images are opened lazily in `__getitem__`, so constructing a dataset checks every annotation but
touches no image file.
"""

from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.captions import entry_image_id, pre_caption
from imaging import open_rgb

REQUIRED_KEYS = ("image", "caption")

logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file, entry index and key."""


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded; `.path` is the full path that failed."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot load image {str(path)!r}: {reason}")
        self.path = str(path)
        self.reason = reason


@contextmanager
def reading_image(path: str | Path):
    """Turn the errors of reading and decoding the image file ``path`` into `ImageLoadError` naming it."""
    try:
        yield
    except ImageLoadError:
        raise
    except FileNotFoundError as error:
        raise ImageLoadError(path, "file not found") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports corrupt/truncated files with these (UnidentifiedImageError is an OSError).
        raise ImageLoadError(path, f"cannot decode it ({type(error).__name__}: {error})") from error


def load_annotations(path: str | Path) -> list[dict]:
    """Read and validate a BLIP annotation file: a JSON list of dicts.

    Every entry must have a non-empty string ``image`` and a ``caption`` that is a string or a
    non-empty list of strings, and an ``id``, where it has one, must be an integer (the image id).
    Other keys (BLIP's ``image_id``, a custom set's ``key``, ...) are kept untouched.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        AnnotationError: invalid JSON (with line/column), not a list, an entry that is not an
            object, or a missing/ill-typed ``image``/``caption`` (message names file and index).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as handle:
            entries = json.load(handle)
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error})") from error
    if not isinstance(entries, list):
        raise AnnotationError(
            f"{path}: expected a JSON list of annotation entries, got a JSON {type(entries).__name__}"
        )
    for index, entry in enumerate(entries):
        _check_entry(path, index, entry)
    return entries


def _check_entry(path: Path, index: int, entry: object) -> None:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: entry {index} must be a JSON object, got {entry!r}")
    for key in REQUIRED_KEYS:
        if key not in entry:
            raise AnnotationError(
                f"{path}: entry {index} has no {key!r} key (it has {sorted(entry)})"
            )
    image = entry["image"]
    if not isinstance(image, str) or not image:
        raise AnnotationError(f"{path}: entry {index} key 'image' must be a non-empty string, got {image!r}")
    caption = entry["caption"]
    is_caption_list = isinstance(caption, list) and len(caption) > 0 and all(isinstance(c, str) for c in caption)
    if not isinstance(caption, str) and not is_caption_list:
        raise AnnotationError(
            f"{path}: entry {index} key 'caption' must be a string or a non-empty list of strings, got {caption!r}"
        )
    if "id" in entry and (isinstance(entry["id"], bool) or not isinstance(entry["id"], int)):
        raise AnnotationError(f"{path}: entry {index} key 'id' must be a JSON integer (the image id), "
                              f"got {entry['id']!r}")


def _captions_of(entry: dict) -> list[str]:
    caption = entry["caption"]
    return [caption] if isinstance(caption, str) else list(caption)


def _image_id_of(path: Path, index: int, entry: dict) -> int:
    """The entry's integer ``id``, else the trailing integer of its image's file name (`entry_image_id`)."""
    try:
        return entry_image_id(entry)
    except ValueError as error:
        raise AnnotationError(f"{path}: entry {index} {error}") from error


def _normalised_caption(path: Path, index: int, raw: str, max_words: int | None) -> str:
    caption = pre_caption(raw, max_words)
    if not caption:
        raise AnnotationError(
            f"{path}: entry {index} has a caption that is empty after normalisation: {raw!r}"
        )
    return caption


@dataclass(frozen=True)
class EvalEntry:
    """One image of a val/test file: `image` relative path, integer id, raw reference captions."""

    image: str
    image_id: int
    captions: list[str]


def read_eval_entries(annotation_file: str | Path) -> list[EvalEntry]:
    """Parse a one-entry-per-image val/test file, rejecting empty captions and repeated images.

    Raises:
        AnnotationError: naming the file and entry index for an empty caption, an entry with
            neither an integer ``id`` nor an image path ending in an integer, or two entries that
            resolve to the same image id.
    """
    path = Path(annotation_file)
    entries: list[EvalEntry] = []
    first_index_of_id: dict[int, int] = {}
    for index, entry in enumerate(load_annotations(path)):
        image_id = _image_id_of(path, index, entry)
        if image_id in first_index_of_id:
            first = first_index_of_id[image_id]
            raise AnnotationError(
                f"{path}: entries {first} ({entries[first].image!r}) and {index} ({entry['image']!r}) "
                f"share image id {image_id}; an eval file needs one entry per image"
            )
        first_index_of_id[image_id] = index
        captions = _captions_of(entry)
        for raw in captions:
            _normalised_caption(path, index, raw, max_words=None)
        entries.append(EvalEntry(image=entry["image"], image_id=image_id, captions=captions))
    return entries


class _ImageFileDataset(Dataset):
    """Shared image handling: a root folder, a transform, and one place that opens files."""

    def __init__(self, image_root: str | Path, transform: Callable[[Image.Image], torch.Tensor],
                 skip_bad_images: bool = False):
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root is not a directory: {self.image_root}")
        if not callable(transform):
            raise TypeError(f"transform must be callable (e.g. imaging.eval_transform(384)), got {transform!r}")
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def _load_or_skip(self, path: Path) -> torch.Tensor | None:
        """The transformed image, or None for a missing/corrupt file when skipping (the collate drops it).

        A transform with ``reads_files = True`` (data/gpu_augment.py's worker side, which ships the encoded file to
        be decoded on the device) is given the path instead, and raises `ImageLoadError` itself (`reading_image`).
        """
        try:
            if getattr(self.transform, "reads_files", False):
                return self.transform(path)
            return self.transform(self._load_image(path))
        except ImageLoadError as error:
            if not self.skip_bad_images:
                raise
            logger.warning("skipping %s", error)
            return None

    def _load_image(self, path: Path) -> Image.Image:
        """Open `path` and return it as RGB, or raise `ImageLoadError` naming the full path.

        This is the single place the PIL path reads images, and `reading_image` the single place read errors
        become `ImageLoadError`, so a skip-and-count policy for broken files only needs to catch that.
        """
        with reading_image(path):
            # Stored pixels, EXIF orientation ignored, as the original BLIP reads COCO and Flickr30K (imaging.py).
            return open_rgb(path)


class CaptionTrainDataset(_ImageFileDataset):
    """Training samples ``(image (3,H,W) float32, caption str, image_id int)``, one per caption.

    With ``per_image``, one sample per image instead, its caption drawn at random (Python's ``random``, so
    seeded and restored with the run) from that image's captions: an epoch of self-critical training visits every
    image once, as the SCST reference does, instead of once per caption. ``samples`` always lists every
    (image, caption, image id); training reads them through the annotation source (data/sources.py), e.g. for the
    CIDEr-D references.

    Captions are normalised with BLIP's `pre_caption(caption, max_words)` at construction, so
    an annotation that normalises to "" fails immediately (naming file and index) rather than
    silently training on an empty target mid-epoch.
    """

    def __init__(
        self,
        annotation_files: str | Path | Sequence[str | Path],
        image_root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        max_words: int = 30,
        skip_bad_images: bool = False,
        per_image: bool = False,
    ):
        super().__init__(image_root, transform, skip_bad_images)
        if isinstance(annotation_files, (str, Path)):
            annotation_files = [annotation_files]
        self.annotation_files = [Path(file) for file in annotation_files]
        if not self.annotation_files:
            raise ValueError("CaptionTrainDataset needs at least one annotation file")
        self.max_words = max_words
        # (relative image path, normalised caption, image id); tuples keep ~0.5M COCO samples small.
        self.samples: list[tuple[str, str, int]] = []
        for path in self.annotation_files:
            for index, entry in enumerate(load_annotations(path)):
                image_id = _image_id_of(path, index, entry)
                for raw in _captions_of(entry):
                    caption = _normalised_caption(path, index, raw, max_words)
                    self.samples.append((entry["image"], caption, image_id))
        self.per_image = per_image
        # per_image: (image path, image id, indices of its samples), in order of first appearance
        self.images: list[tuple[str, int, list[int]]] = []
        if per_image:
            rows: dict[tuple[str, int], list[int]] = {}
            for position, (image_path, _, image_id) in enumerate(self.samples):
                rows.setdefault((image_path, image_id), []).append(position)
            self.images = [(image_path, image_id, members) for (image_path, image_id), members in rows.items()]

    def __len__(self) -> int:
        return len(self.images) if self.per_image else len(self.samples)

    def image_paths(self) -> list[str]:
        """The image paths (relative to ``image_root``), each once, in order of first appearance."""
        return list(dict.fromkeys(image_path for image_path, _, _ in self.samples))

    def entry(self, index: int) -> tuple[str, str, int]:
        """(relative image path, caption, image id) of sample ``index``; in ``per_image`` mode the caption is drawn
        here. The one place that chooses a training sample (the feature cache reads through it too)."""
        if self.per_image:
            image_path, image_id, members = self.images[index]
            return image_path, self.samples[random.choice(members)][1], image_id
        return self.samples[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, int]:
        image_path, caption, image_id = self.entry(index)
        return self._load_or_skip(self.image_root / image_path), caption, image_id


class CaptionEvalDataset(_ImageFileDataset):
    """Evaluation samples ``(image (3,H,W) float32, image_id int)``, one per image.

    Attributes:
        image_ids: ids in file order (index i of the dataset is image_ids[i]).
        references: image_id -> reference captions normalised with `pre_caption(max_words=None)`,
            for metrics that compare text directly; COCO metrics use `build_coco_gt` instead,
            because pycocoevalcap applies its own tokenisation to the raw text.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        skip_bad_images: bool = False,
    ):
        super().__init__(image_root, transform, skip_bad_images)
        self.annotation_file = Path(annotation_file)
        entries = read_eval_entries(self.annotation_file)
        self.image_paths: list[str] = [entry.image for entry in entries]
        self.image_ids: list[int] = [entry.image_id for entry in entries]
        self.references: dict[int, list[str]] = {
            entry.image_id: [pre_caption(raw, max_words=None) for raw in entry.captions] for entry in entries
        }

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        return self._load_or_skip(self.image_root / self.image_paths[index]), self.image_ids[index]


def build_coco_gt(annotation_file: str | Path) -> dict:
    """COCO caption ground truth (the dict pycocotools' `COCO` loads) from a val/test file.

    BLIP publishes COCO-format GT for COCO only; Flickr30K (and the toy set) need it built from
    the Karpathy-style file. Image ids come from each entry's ``id``, else its file name; annotation
    ids are 1, 2, ... in file order. Captions are raw, not `pre_caption`-ed, because pycocoevalcap
    tokenises them itself.

    Returns:
        ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption", "id"}],
        "type": "captions", "info": {}, "licenses": []}``
    """
    images = []
    annotations = []
    for entry in read_eval_entries(annotation_file):
        images.append({"id": entry.image_id, "file_name": entry.image})
        for caption in entry.captions:
            annotations.append({"image_id": entry.image_id, "caption": caption, "id": len(annotations) + 1})
    return {"images": images, "annotations": annotations, "type": "captions", "info": {}, "licenses": []}


def caption_collate(batch: Sequence[tuple[torch.Tensor | None, str, int]]):
    """Train batch -> ``(images (B,3,H,W), captions list[str] of length B, image_ids int64 (B,), num_skipped)``.

    Samples whose image was skipped (None, see ``skip_bad_images``) are dropped and counted, so the training
    loop can report them. Captions stay strings so that data/ needs no tokenizer.
    """
    kept = [sample for sample in batch if sample[0] is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), [], torch.empty(0, dtype=torch.long), num_skipped
    images, captions, image_ids = zip(*kept)
    return torch.stack(images), list(captions), torch.tensor(image_ids, dtype=torch.long), num_skipped


def eval_collate(batch: Sequence[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval batch -> ``(images (B,3,H,W), image_ids int64 (B,))``; skipped images are left out (and so show
    up as images without a caption when scored)."""
    kept = [sample for sample in batch if sample[0] is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images, image_ids = zip(*kept)
    return torch.stack(images), torch.tensor(image_ids, dtype=torch.long)
