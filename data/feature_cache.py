"""Frozen image features, computed once and kept on disk, so that training never runs the image tower again.

With a frozen, deterministic image tower (a prefix captioner's CLIP) and no augmentation, every epoch would feed the
tower the same pixels and get the same features; ClipCap trains fast because it computes them once. This module
keeps them in one safetensors file per (features, image folder)::

    <cache_dir>/<sha256(feature_key, image_root)>.safetensors
        features  float32 (num_images, ...)   one row per image: (D,) pooled embeddings or (N, D) tokens
        present   uint8   (num_images,)       0 where the image could not be read (its row is zeros)
        __metadata__["feature_cache"]: JSON {"version", "feature_key", "image_root", "paths", "stamps", ...}

``feature_key`` comes from the captioner (``cached_feature_key``: the tower's weights, config, image size and
preprocessing); ``paths`` are the images' paths relative to ``image_root`` in row order, ``stamps`` each file's
size and modification time when it was encoded. A file that lacks one of the training set's images, or whose
stamp for it no longer matches the file, is rebuilt (for the current training set's images only).

data/ imports no model code: the caller passes ``encode`` (pixels (B, 3, S, S) on the CPU -> features (B, ...)
float32 on the CPU), e.g. ``PrefixCaptioner.encode_cache_batch``. ``ensure_feature_cache`` builds the file under
a lock beside it (fcntl, as data/toy.py), so concurrent ranks wait for one builder; it writes to a temporary file
and renames it. Rows are streamed to disk as they are encoded and read back one at a time from the memory map
(``safe_open``), so a multi-GB token cache is never held in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

import utils
from data.datasets import CaptionTrainDataset, _ImageFileDataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "feature_cache"
MISSING = "missing"


# ------------------------------------------------------------------------------------------------------ paths


@dataclass(frozen=True)
class ImageFiles:
    """The images a cache holds: ``paths`` (each once) relative to ``root``, read with ``transform`` (a path that
    cannot be read is skipped, its row marked absent, when ``skip_bad_images``; else an `ImageLoadError`). A
    training source describes its images this way (data/sources.py ``CaptionSource.image_files``)."""

    root: Path
    paths: list[str]
    transform: Callable
    skip_bad_images: bool = True


def image_stamp(path: Path) -> str:
    """``"<size>:<mtime_ns>"`` of an image file, or ``"missing"``: a changed file gets a new stamp."""
    try:
        status = path.stat()
    except OSError:
        return MISSING
    return f"{status.st_size}:{status.st_mtime_ns}"


def cache_file_path(cache_dir: str | Path, feature_key: str, image_root: str | Path) -> Path:
    """The cache file for ``feature_key``'s features of the images under ``image_root`` (resolved: two folders
    with the same relative paths but different images never share a file)."""
    name = hashlib.sha256(f"{feature_key}\n{Path(image_root).resolve()}".encode()).hexdigest()
    return Path(cache_dir) / f"{name}.safetensors"


def read_cache_metadata(path: str | Path) -> dict | None:
    """The file's metadata dict, or None if it is missing, unreadable or of another format version."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
            keys = set(handle.keys())
    except FileNotFoundError:
        return None
    except Exception as error:  # a truncated or foreign file: rebuilt, not trusted
        logger.warning("feature cache %s is unreadable (%s: %s); it will be rebuilt", path, type(error).__name__, error)
        return None
    if metadata.get("version") != FORMAT_VERSION or keys != {"features", "present"}:
        return None
    return metadata


def is_current(metadata: dict | None, feature_key: str, paths: list[str], stamps: list[str]) -> bool:
    """Whether a cache with ``metadata`` holds every one of ``paths`` with an unchanged stamp."""
    if metadata is None or metadata.get("feature_key") != feature_key:
        return False
    cached = dict(zip(metadata["paths"], metadata["stamps"]))
    return all(cached.get(path) == stamp for path, stamp in zip(paths, stamps))


# ------------------------------------------------------------------------------------------------------ building


class _CacheImages(_ImageFileDataset):
    """``(row, pixels (3, S, S) or None)`` for each image to encode, through the same loader as training."""

    def __init__(self, image_root, paths: list[str], transform, skip_bad_images: bool):
        super().__init__(image_root, transform, skip_bad_images)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return index, self._load_or_skip(self.image_root / self.paths[index])


def _collate_rows(batch):
    rows = [row for row, pixels in batch if pixels is not None]
    pixels = [pixels for _, pixels in batch if pixels is not None]
    return [row for row, _ in batch], rows, (torch.stack(pixels) if pixels else None)


class _SafetensorsWriter:
    """Writes ``features`` (N, *row) float32 and ``present`` (N,) uint8 as one safetensors file, streaming rows.

    The safetensors layout is an 8-byte little-endian header length, the JSON header (tensor dtypes, shapes and
    byte offsets, ``__metadata__``; padded with spaces to a multiple of 8) and the tensors' bytes in offset order.
    The header is written when the first encoded rows give the row shape; rows of unreadable images are zeros.
    """

    def __init__(self, handle, num_rows: int, metadata: dict[str, str]):
        self.handle, self.num_rows, self.metadata = handle, num_rows, metadata
        self.present = bytearray(num_rows)
        self.row_shape: tuple[int, ...] | None = None
        self.rows_written = 0
        self.pending = 0  # unreadable images before the first encoded batch: zero rows, written after the header

    def write(self, first_row: int, kept_rows: list[int], features: torch.Tensor | None, count: int) -> None:
        """Rows ``first_row .. first_row + count - 1``, of which ``kept_rows`` have ``features`` (in order)."""
        if first_row != self.rows_written:
            raise RuntimeError(f"feature cache rows out of order: got row {first_row}, expected {self.rows_written}")
        if features is not None:
            if features.dtype != torch.float32 or features.shape[0] != len(kept_rows):
                raise ValueError(f"encode returned {features.dtype} {tuple(features.shape)} for {len(kept_rows)} "
                                 "images; expected float32 with one row per image")
            if self.row_shape is None:
                self._start(tuple(features.shape[1:]))
            elif tuple(features.shape[1:]) != self.row_shape:
                raise ValueError(f"encode returned rows of shape {tuple(features.shape[1:])} after {self.row_shape}")
        if self.row_shape is None:  # nothing encoded yet: keep counting the leading unreadable images
            self.pending += count
            self.rows_written += count
            return
        block = torch.zeros((count, *self.row_shape), dtype=torch.float32)
        if features is not None:
            block[torch.tensor(kept_rows, dtype=torch.long) - first_row] = features.contiguous()
            for row in kept_rows:
                self.present[row] = 1
        self.handle.write(block.numpy().tobytes())
        self.rows_written += count

    def _start(self, row_shape: tuple[int, ...]) -> None:
        self.row_shape = row_shape
        row_bytes = 4 * int(torch.Size(row_shape).numel())
        feature_bytes = self.num_rows * row_bytes
        header = {
            "features": {"dtype": "F32", "shape": [self.num_rows, *row_shape], "data_offsets": [0, feature_bytes]},
            "present": {"dtype": "U8", "shape": [self.num_rows],
                        "data_offsets": [feature_bytes, feature_bytes + self.num_rows]},
            "__metadata__": self.metadata,
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.handle.write(len(encoded).to_bytes(8, "little"))
        self.handle.write(encoded)
        if self.pending:
            self.handle.write(bytes(self.pending * row_bytes))

    def finish(self) -> None:
        if self.row_shape is None:
            raise RuntimeError("no image of the training set could be read, so there are no features to cache")
        if self.rows_written != self.num_rows:
            raise RuntimeError(f"feature cache: wrote {self.rows_written} of {self.num_rows} rows")
        self.handle.write(bytes(self.present))


def build_feature_cache(path: str | Path, image_root: str | Path, paths: list[str], stamps: list[str],
                        feature_key: str, transform: Callable, encode: Callable[[torch.Tensor], torch.Tensor],
                        batch_size: int = 64, num_workers: int = 0, skip_bad_images: bool = True,
                        description: dict | None = None) -> Path:
    """Encode every image of ``paths`` (relative to ``image_root``) with ``transform`` then ``encode`` and write
    the cache file at ``path`` (a temporary file renamed into place). Unreadable images are skipped (their
    ``present`` flag is 0) or, with ``skip_bad_images=False``, raise ``ImageLoadError``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"version": FORMAT_VERSION, "feature_key": feature_key, "image_root": str(Path(image_root).resolve()),
                "paths": paths, "stamps": stamps, **(description or {})}
    images = _CacheImages(image_root, paths, transform, skip_bad_images)
    # Its own generator: iterating a DataLoader draws a seed, and the global RNG must not depend on whether this
    # run built the cache or found it (the training order and dropout would differ between the two).
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_rows, pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as handle:
        try:
            writer = _SafetensorsWriter(handle, len(paths), {METADATA_KEY: json.dumps(metadata)})
            for rows, kept, pixels in loader:
                features = encode(pixels) if pixels is not None else None
                writer.write(rows[0], kept, features, len(rows))
            writer.finish()
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    utils.publish_file(handle.name, path)  # the umask's permissions, not the temp file's 0600
    return path


def ensure_feature_cache(images: ImageFiles, cache_dir: str | Path, feature_key: str,
                         encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64,
                         num_workers: int = 0, description: dict | None = None) -> Path:
    """The cache file holding ``feature_key``'s features of every one of ``images`` (encoded through
    ``images.transform``, which ``feature_key`` must describe), built if need be.

    Reuses an existing file that covers the training set's images with unchanged stamps; otherwise builds it
    (``build_feature_cache``) while holding a lock beside it, so that of several processes one builds and the
    others wait and then reuse it. ``description`` (e.g. the model source) is stored in the metadata.
    """
    paths = images.paths
    stamps = [image_stamp(Path(images.root) / image_path) for image_path in paths]
    path = cache_file_path(cache_dir, feature_key, images.root)
    if is_current(read_cache_metadata(path), feature_key, paths, stamps):
        return path
    with utils.exclusive_lock(path.with_suffix(".lock")):
        if is_current(read_cache_metadata(path), feature_key, paths, stamps):  # another process built it
            return path
        logger.info("building the feature cache %s: %d images", path, len(paths))
        build_feature_cache(path, images.root, paths, stamps, feature_key, images.transform, encode,
                            batch_size=batch_size, num_workers=num_workers, skip_bad_images=images.skip_bad_images,
                            description=description)
    return path


# ------------------------------------------------------------------------------------------------------ reading


class CachedFeatureDataset(Dataset):
    """``CaptionTrainDataset`` with each image replaced by its cached features: ``(features, caption, image_id)``.

    Same length, order and captions as the wrapped dataset (``per_image`` too: the same ``random.choice`` per
    item), so ``caption_collate`` stacks features (B, D) or (B, N, D) where it stacked images (B, 3, S, S), and a
    cached run draws the same batches as an uncached one. An image that could not be read when the cache was
    built yields None, which the collate drops and counts, as a skipped image. ``dataset`` is the wrapped one.

    The file is opened lazily in each process (a DataLoader worker gets its own memory map) and rows are read one
    at a time, so the dataset never holds the cache in memory.
    """

    def __init__(self, dataset: CaptionTrainDataset, cache_file: str | Path):
        from safetensors import safe_open

        self.dataset = dataset
        self.cache_file = Path(cache_file)
        metadata = read_cache_metadata(self.cache_file)
        if metadata is None:
            raise ValueError(f"{self.cache_file} is not a feature cache of format version {FORMAT_VERSION}")
        with safe_open(str(self.cache_file), framework="pt") as handle:
            present = handle.get_tensor("present")
            self.feature_shape = tuple(handle.get_slice("features").get_shape()[1:])
        self.rows = {image_path: row for row, image_path in enumerate(metadata["paths"])}
        absent = [image_path for image_path in dataset.image_paths() if image_path not in self.rows]
        if absent:
            raise ValueError(f"{self.cache_file} lacks {len(absent)} image(s) of the training set, e.g. "
                             f"{absent[:3]}; build it with ensure_feature_cache")
        self.present = present.bool().tolist()
        self._handle = self._features = None  # the open file and its "features" slice, per process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = state["_features"] = None  # an open safetensors handle does not pickle; each worker opens its own
        return state

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, int]:
        # CaptionTrainDataset's own choice of sample (and caption draw), reading features instead of the image.
        image_path, caption, image_id = self.dataset.entry(index)
        row = self.rows[image_path]
        if not self.present[row]:
            return None, caption, image_id
        if self._features is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.cache_file), framework="pt")
            self._features = self._handle.get_slice("features")
        return self._features[row], caption, image_id
