"""Data loaders for training and evaluation, the resumable sampler, and the training feature cache."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

import utils
from data import CaptionEvalDataset, CaptionTrainDataset, build_coco_gt, build_train_transform, caption_collate, eval_collate

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
    sampler = ResumableSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
                               shuffle=shuffle, seed=seed, drop_last=shuffle)
    workers = config["data"]["num_workers"]
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=torch.cuda.is_available(), drop_last=shuffle, persistent_workers=workers > 0,
    )
    return loader, sampler


def build_train_loader(config: dict, captioner):
    """The training loader: BLIP's augmentation at the captioner's image size, or its eval transform (no
    augmentation); the normalisation (CLIP mean/std) is the same for every model family.

    With ``data.augment_on: device`` the workers only read the files and draw the augmentation's random choices;
    each batch's images arrive encoded (data/gpu_augment.py) and are decoded and augmented on the training
    device where the loop moves them there (``images.to(device)``), with the same draws from the same seed.
    """
    data_config = config["data"]
    if not data_config["train_files"]:
        raise utils.ConfigError("data.train_files is empty: nothing to train on (or set data.toy: true)")
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
    dataset = CaptionTrainDataset(data_config["train_files"], data_config["image_root"], transform,
                                  max_words=data_config["max_words"],
                                  skip_bad_images=data_config["train_bad_images"] == "skip",
                                  per_image=data_config["train_per_image"])
    dataset = cached_feature_dataset(config, captioner, dataset)
    batch_size = config["train"]["batch_size"]
    loader, sampler = _loader(dataset, batch_size, True, collate, config, seed=config["seed"])
    if len(loader) == 0:  # incomplete batches are dropped: an epoch would run 0 steps and "finish" untrained
        world = utils.get_world_size()
        raise utils.ConfigError(
            f"data.train_files {data_config['train_files']} hold {len(dataset)} training caption(s), fewer than one "
            f"global batch (train.batch_size {batch_size} x {world} process(es) = {batch_size * world}); incomplete "
            "batches are dropped, so there is nothing to train on. Add captions or lower train.batch_size."
        )
    return loader, sampler


def cached_feature_dataset(config: dict, captioner, dataset: CaptionTrainDataset):
    """``dataset`` with its images replaced by cached image features (data/feature_cache.py) when
    ``data.feature_cache`` allows it, else ``dataset`` itself.

    Caching needs features that never change: the captioner must give a ``cached_feature_key`` (a frozen tower:
    never BLIP), ``data.augment`` must be off, and no CLIP reward may need the batch's pixels. ``auto`` caches
    when all hold (saying so, or saying that augmentation turned it off); ``on`` makes a failed condition a
    ConfigError. The cache is built on first use (one process builds, the others wait) and reused by later runs.
    """
    data_config = config["data"]
    mode = {True: "on", False: "off"}.get(data_config["feature_cache"], data_config["feature_cache"])
    if mode == "off":
        return dataset
    key = captioner.cached_feature_key(repr(dataset.transform))
    rewards = steps.reward_names(config["objective"])
    if key is None:
        reason = (f"model.family {config['model']['family']} has no frozen image features (BLIP trains its ViT; a "
                  "prefix captioner needs a CLIP tower and model.prefix.train_vision: false)")
    elif data_config["augment"]:
        reason = "data.augment is true (augmented images differ every epoch)"
    elif any(name in steps.CLIP_REWARDS for name in rewards):
        reason = "the objective's CLIP reward needs the batch's pixels"
    else:
        from data.feature_cache import CachedFeatureDataset, ensure_feature_cache

        path = ensure_feature_cache(
            dataset, Path(data_config["feature_cache_dir"]).expanduser(), key, captioner.encode_cache_batch,
            batch_size=config["eval"]["batch_size"], num_workers=data_config["num_workers"],
            description={"model": getattr(captioner, "clip_source", None), "transform": repr(dataset.transform)})
        cached = CachedFeatureDataset(dataset, path)
        logger.info("data.feature_cache: training on cached image features %s %s (the image tower is not run)",
                    path, cached.feature_shape)
        return cached
    if mode == "on":
        raise utils.ConfigError(f"data.feature_cache is on, but {reason}; set data.feature_cache: auto or off")
    if key is not None:  # a captioner that could cache: say why it does not (BLIP never can, so it is not told)
        logger.info("data.feature_cache auto: caching is off because %s", reason)
    return dataset


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
