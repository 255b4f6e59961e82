"""Data loaders for training and evaluation, the resumable sampler, and the training feature cache.

Training data comes from the source ``data.source`` names (data/sources.py): the loader asks it for its dataset,
and orders a map-style one with `ResumableSampler` or lets a streaming one order itself; SCST's references and the
feature cache's images come from the source as well.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

import utils
from data import SOURCES, CaptionEvalDataset, build_coco_gt, build_train_transform, caption_collate, eval_collate
from data.sources import CaptionSource, EpochPosition

from . import steps

logger = logging.getLogger("smile_blip")


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way through, for a run resumed mid-epoch.

    Used even in one process, so a run's data order depends only on the seed, the epoch and the global batch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Leave out this rank's first ``batches`` batches of the current epoch (call after ``set_epoch``)."""
        self.start = batches * batch_size

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


def _loader(dataset, batch_size: int, shuffle: bool, collate, config: dict, seed: int = 0):
    """(loader, its `EpochPosition`): a map-style ``dataset`` is ordered by a `ResumableSampler` (shuffled, and
    incomplete batches dropped, when ``shuffle``); a streaming one orders, shards and resumes itself."""
    workers = config["data"]["num_workers"]
    options = dict(batch_size=batch_size, collate_fn=collate, num_workers=workers,
                   pin_memory=torch.cuda.is_available(), drop_last=shuffle)
    if isinstance(dataset, IterableDataset):
        if not isinstance(dataset, EpochPosition):
            raise TypeError(f"{type(dataset).__name__} is an IterableDataset without set_epoch and skip_batches: a "
                            "streaming training dataset must be its own EpochPosition (data/sources.py)")
        # Workers start afresh each epoch, so that each gets the dataset as set_epoch and skip_batches left it.
        return DataLoader(dataset, persistent_workers=False, **options), dataset
    sampler = ResumableSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
                               shuffle=shuffle, seed=seed, drop_last=shuffle)
    loader = DataLoader(dataset, sampler=sampler, persistent_workers=workers > 0, **options)
    return loader, sampler


class TrainLoader(NamedTuple):
    """The training loader, where it stands in the epoch (``set_epoch``, ``skip_batches``), and the source of its
    samples (SCST's references)."""

    loader: DataLoader
    position: EpochPosition
    source: CaptionSource


def build_train_loader(config: dict, captioner) -> TrainLoader:
    """The training loader over ``data.source``'s samples: BLIP's augmentation at the captioner's image size, or its
    eval transform (no augmentation); the normalisation (CLIP mean/std) is the same for every model family.

    With ``data.augment_on: device`` the workers only read the files and draw the augmentation's random choices;
    each batch's images arrive encoded (data/gpu_augment.py) and are decoded and augmented on the training
    device where the loop moves them there (``images.to(device)``), with the same draws from the same seed.
    """
    data_config = config["data"]
    collate = caption_collate
    augment = dict(min_scale=data_config["min_scale"], randaugment=data_config["randaugment"],
                   horizontal_flip=data_config["horizontal_flip"])
    if data_config["augment"] and data_config["augment_on"] == "device":
        from data.gpu_augment import build_device_pipeline

        pipeline = build_device_pipeline(captioner.image_size, **augment)
        transform, collate = pipeline.worker_transform, pipeline.collate
    elif data_config["augment"]:
        transform = build_train_transform(captioner.image_size, **augment)
    else:
        transform = captioner.eval_transform()
    source = SOURCES[data_config["source"]].from_config(data_config, transform, config["seed"])
    dataset = cached_feature_dataset(config, captioner, source)
    batch_size = config["train"]["batch_size"]
    loader, position = _loader(dataset, batch_size, True, collate, config, seed=config["seed"])
    if len(loader) == 0:  # incomplete batches are dropped: an epoch would run 0 steps and "finish" untrained
        world = utils.get_world_size()
        raise utils.ConfigError(
            f"{source.describe()} hold {len(source)} training caption(s), fewer than one global batch (train.batch_size {batch_size} x "
            f"{world} process(es) = {batch_size * world}); incomplete batches are dropped, so there is nothing to "
            "train on. Add captions or lower train.batch_size."
        )
    return TrainLoader(loader, position, source)


def cached_feature_dataset(config: dict, captioner, source: CaptionSource) -> Dataset:
    """``source.dataset`` with its images replaced by cached image features (data/feature_cache.py) when
    ``data.feature_cache`` allows it, else ``source.dataset`` itself.

    Caching needs features that never change, of images that are files: the source must give its images as files
    (``image_files``), the captioner must give a ``cached_feature_key`` (a frozen tower: never BLIP),
    ``data.augment`` must be off, and no CLIP reward may need the batch's pixels. ``auto`` caches when all hold
    (saying so, or saying that augmentation turned it off); ``on`` makes a failed condition a ConfigError. The
    cache is built on first use (one process builds, the others wait) and reused by later runs.
    """
    data_config = config["data"]
    mode = {True: "on", False: "off"}.get(data_config["feature_cache"], data_config["feature_cache"])
    if mode == "off":
        return source.dataset
    images = source.image_files()
    key = None if images is None else captioner.cached_feature_key(repr(images.transform))
    if images is None:
        reason = f"data.source {data_config['source']} does not read its images from files"
    elif key is None:
        reason = (f"this model.family {config['model']['family']} captioner has no frozen image features (its "
                  f"{type(captioner).__name__}.cached_feature_key says when it has)")
    elif data_config["augment"]:
        reason = "data.augment is true (augmented images differ every epoch)"
    elif steps.reward_clip_model(config["objective"]) is not None:
        reason = "the objective's CLIP reward needs the batch's pixels"
    else:
        from data.feature_cache import ensure_feature_cache

        path = ensure_feature_cache(
            images, Path(data_config["feature_cache_dir"]).expanduser(), key, captioner.encode_cache_batch,
            batch_size=data_config["feature_cache_batch_size"], num_workers=data_config["num_workers"],
            description={"model": getattr(captioner, "clip_source", None), "transform": repr(images.transform)})
        cached = source.with_cached_features(path)
        logger.info("data.feature_cache: training on cached image features %s %s (the image tower is not run)",
                    path, cached.feature_shape)
        return cached
    if mode == "on":
        raise utils.ConfigError(f"data.feature_cache is on, but {reason}; set data.feature_cache: auto or off")
    if key is not None:  # a captioner that could cache: say why it does not (BLIP never can, so it is not told)
        logger.info("data.feature_cache auto: caching is off because %s", reason)
    return source.dataset


def build_eval_loader(config: dict, split: str, transform):
    """(loader, COCO-format GT dict) for ``split``; the GT is built from the annotation file when not given."""
    data_config = config["data"]
    annotation_file, gt_file = data_config[f"{split}_file"], data_config[f"{split}_gt"]
    if not annotation_file:
        raise utils.ConfigError(f"data.{split}_file is not set: cannot evaluate on {split}")
    dataset = CaptionEvalDataset(annotation_file, data_config["image_root"], transform,
                                 skip_bad_images=data_config["eval_bad_images"] == "skip")
    if gt_file:
        with open(gt_file) as handle:
            gt = json.load(handle)
        # BLIP's COCO GT files list image ids only; image metrics (retrieval, CLIPScore) need file names.
        file_names = dict(zip(dataset.image_ids, dataset.image_paths))
        for image in gt.get("images", []):
            if "file_name" not in image and image.get("id") in file_names:
                image["file_name"] = file_names[image["id"]]
    else:
        gt = build_coco_gt(annotation_file)
    max_images = config["eval"]["max_images"]
    if max_images:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
        kept = {int(i) for i in (dataset.dataset.image_ids[j] for j in dataset.indices)}
        gt = {**gt, "images": [im for im in gt["images"] if im["id"] in kept],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in kept]}
    loader, _ = _loader(dataset, config["eval"]["batch_size"], False, eval_collate, config)
    return loader, gt
