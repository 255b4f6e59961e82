"""Datasets, training-data sources (data/sources.py: what ``data.source`` selects), transforms, collate functions,
the synthetic toy set, and a user's own captioned images turned into annotation files (data/custom.py) for BLIP
caption fine-tuning.

data/ uses only imaging.py and utils.py of this project (no model code); captions leave it as strings and the
caller tokenises them.
"""

from data.captions import entry_image_id, image_id_from_path, pre_caption
from data.custom import CustomDataError, custom_data_paths, read_source, write_custom_set
from data.datasets import (
    AnnotationError,
    CaptionEvalDataset,
    CaptionTrainDataset,
    ImageLoadError,
    build_coco_gt,
    caption_collate,
    eval_collate,
    load_annotations,
)
from data.sources import SOURCES, AnnotationSource, CaptionSource, EpochPosition
from data.webdataset_source import WebDatasetSource
from data.transforms import (
    BLIP_RANDAUGMENT_OPS,
    CLIP_MEAN,
    CLIP_STD,
    BlipRandAugment,
    build_train_transform,
)


def __getattr__(name: str):
    # data.toy is imported on first use rather than here: `python -m data.toy` would otherwise
    # find the module already imported by this package and runpy warns about executing it twice.
    if name == "ensure_toy_dataset":
        from data.toy import ensure_toy_dataset

        return ensure_toy_dataset
    raise AttributeError(f"module 'data' has no attribute {name!r}")


__all__ = [
    "AnnotationError",
    "AnnotationSource",
    "BLIP_RANDAUGMENT_OPS",
    "BlipRandAugment",
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionEvalDataset",
    "CaptionSource",
    "CaptionTrainDataset",
    "CustomDataError",
    "EpochPosition",
    "ImageLoadError",
    "SOURCES",
    "WebDatasetSource",
    "build_coco_gt",
    "build_train_transform",
    "caption_collate",
    "custom_data_paths",
    "entry_image_id",
    "ensure_toy_dataset",
    "eval_collate",
    "image_id_from_path",
    "load_annotations",
    "pre_caption",
    "read_source",
    "write_custom_set",
]
