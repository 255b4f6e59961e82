"""Where training samples come from: the `CaptionSource` interface the trainer asks, and `SOURCES`, the kinds of
source ``data.source`` selects.

The training loader, SCST and the feature cache never read a dataset's internals; they ask its source::

    kind = SOURCES[data_config["source"]]
    kind.check_config(data_config)                   at start, before anything is built (training.check_inputs)
    source = kind.from_config(data_config, transform, seed)
    source.dataset               the samples (image (3,H,W) float32 or None, caption str, image id int)
    len(source)                  samples in one epoch, over all processes
    source.references()          image id -> its normalised training captions (SCST's CIDEr-D references)
    source.reference_files()     files whose content identifies those references (names the CIDEr-D cache)
    source.describe()            where the samples come from, in the config's words (for messages)
    source.image_files()         the images as files, for the feature cache; None when they are not files
    source.with_cached_features(cache_file)   the dataset with each image replaced by its cached features

``dataset`` is either map-style (``__len__`` and ``__getitem__``; training.loaders.ResumableSampler orders and
shards it and resumes it mid-epoch) or streaming (a ``torch.utils.data.IterableDataset``), which is then its own
`EpochPosition`: it orders, shards and resumes itself, and the training loop does not change. A streaming
dataset (e.g. webdataset tar shards) keeps this contract:

* ``set_epoch(epoch)``: the coming epoch's order comes from the run's seed and ``epoch`` alone, never from the
  global RNG, so that a resumed run draws the same order;
* ``skip_batches(batches, batch_size)``: this process has already trained on the epoch's first ``batches``
  batches of ``batch_size`` samples (the checkpoint's ``progress.batches_done`` x ``train.batch_size``: the
  samples consumed); the epoch continues after them. The trainer calls it after every ``set_epoch`` (with 0 at
  an epoch's start), so the dataset also learns the batch size here;
* ``__len__``: this process's samples still to come in the epoch, the same on every process (DDP needs as many
  steps on every rank); the loader's step count and the learning-rate schedule come from it;
* split over processes (``utils.get_rank()`` of ``utils.get_world_size()``) and over the loader's workers
  (``torch.utils.data.get_worker_info()``) so that a process's batches come in the same order whatever
  ``data.num_workers`` is: with W workers the DataLoader takes the n-th batch from worker n mod W, so worker w
  yields batches w, w + W, w + 2W, ... of what remains of the process's epoch. The loader starts its workers
  afresh every epoch, so each gets the dataset as ``set_epoch`` and ``skip_batches`` left it.

tests/data/test_sources.py has a small streaming source that keeps this contract.

A new kind of source is one `CaptionSource` subclass and one line in `SOURCES`; docs/extending.md has the recipe.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from torch.utils.data import Dataset

import utils
from data.datasets import CaptionTrainDataset
from data.feature_cache import CachedFeatureDataset, ImageFiles


@runtime_checkable
class EpochPosition(Protocol):
    """Where the training data stands within an epoch: the resumable sampler of a map-style dataset, or a streaming
    dataset itself (see the module docstring)."""

    def set_epoch(self, epoch: int) -> None: ...

    def skip_batches(self, batches: int, batch_size: int) -> None: ...


class CaptionSource(abc.ABC):
    """Training samples and what training needs to know about them (see the module docstring).

    ``dataset`` is the attribute the loader trains on: map-style, or an `EpochPosition` ``IterableDataset``.
    """

    dataset: Dataset

    @classmethod  # noqa: B027 (an optional hook, a no-op unless a source has something to check)
    def check_config(cls, data_config: dict) -> None:
        """Raise ``utils.ConfigError`` naming the key when the ``data`` section cannot work (a file it names is
        missing); runs at start, before anything is built, so it reads no data. Nothing to check by default."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, data_config: dict, transform: Callable, seed: int) -> "CaptionSource":
        """The source the ``data`` section describes; ``transform`` turns an RGB PIL image into the model's
        (3, H, W) input (or, for data.augment_on: device, reads the file: data/gpu_augment.py); ``seed`` is the
        run's, for a streaming dataset's order (a map-style one is ordered by the loader's sampler)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Training samples in one epoch, over all processes."""

    @abc.abstractmethod
    def references(self) -> dict[int, list[str]]:
        """Image id -> its training captions as the dataset gives them (normalised), for SCST's CIDEr-D."""

    def describe(self) -> str:
        """Where the samples come from, in the config's words, for messages ("data.train_files [...]")."""
        return f"the data source {type(self).__name__}"

    def reference_files(self) -> list[Path]:
        """Files whose content identifies `references` (their hash names the cached CIDEr-D document
        frequencies); none by default, and the statistics are then computed afresh each run."""
        return []

    def image_files(self) -> ImageFiles | None:
        """The training images as files under one folder, for the feature cache (data/feature_cache.py); None
        (the default) when the images are not files of their own, and then features are never cached."""
        return None

    def with_cached_features(self, cache_file: Path) -> Dataset:
        """``dataset`` with every image replaced by its row of ``cache_file`` (built from `image_files`), in the
        same order; only asked of a source whose `image_files` is not None."""
        raise NotImplementedError(f"{type(self).__name__} reads no image files, so it has no cached features")


class AnnotationSource(CaptionSource):
    """BLIP's Karpathy-style annotation files (``data.train_files``) over the images under ``data.image_root``: a
    map-style `CaptionTrainDataset`, one sample per caption, or per image with ``data.train_per_image``."""

    def __init__(self, dataset: CaptionTrainDataset):
        self.dataset = dataset

    @classmethod
    def check_config(cls, data_config: dict) -> None:
        files = data_config["train_files"]
        if not files and not data_config["toy"]:  # the toy set fills train_files in when it is built
            raise utils.ConfigError("data.train_files is empty: nothing to train on (or set data.toy: true)")
        for name in files:
            utils.require_path("data.train_files", name)

    @classmethod
    def from_config(cls, data_config: dict, transform: Callable, seed: int) -> "AnnotationSource":
        if not data_config["train_files"]:
            raise utils.ConfigError("data.train_files is empty: nothing to train on (or set data.toy: true)")
        return cls(CaptionTrainDataset(data_config["train_files"], data_config["image_root"], transform,
                                       max_words=data_config["max_words"],
                                       skip_bad_images=data_config["train_bad_images"] == "skip",
                                       per_image=data_config["train_per_image"]))

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return f"data.train_files {[str(name) for name in self.dataset.annotation_files]}"

    def references(self) -> dict[int, list[str]]:
        references: dict[int, list[str]] = {}
        for _, caption, image_id in self.dataset.samples:
            references.setdefault(image_id, []).append(caption)
        return references

    def reference_files(self) -> list[Path]:
        return list(self.dataset.annotation_files)

    def image_files(self) -> ImageFiles:
        dataset = self.dataset
        return ImageFiles(dataset.image_root, dataset.image_paths(), dataset.transform, dataset.skip_bad_images)

    def with_cached_features(self, cache_file: Path) -> CachedFeatureDataset:
        return CachedFeatureDataset(self.dataset, cache_file)


from data.webdataset_source import WebDatasetSource  # noqa: E402 (it subclasses CaptionSource, defined above)

# data.source -> the class that reads it. A new kind of source is one CaptionSource subclass and one line here.
SOURCES: dict[str, type[CaptionSource]] = {
    "annotations": AnnotationSource,
    "webdataset": WebDatasetSource,
}


__all__ = ["AnnotationSource", "CaptionSource", "EpochPosition", "SOURCES"]
