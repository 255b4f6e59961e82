"""The training and evaluation flow shared by train_caption.py and eval_caption.py.

Builders turn the resolved config into a captioner, loaders and an optimizer; ``train_one_epoch``,
``generate_captions`` and ``evaluate`` are the loop pieces; ``run_training`` and ``run_evaluation`` wire them.
Launch commands are in README.md; both entry points work under torchrun and as a plain ``python`` process.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import checkpointing
import hub
import steps
import utils
from data import (
    CaptionEvalDataset,
    CaptionTrainDataset,
    build_coco_gt,
    build_train_transform,
    caption_collate,
    eval_collate,
)
from data.datasets import AnnotationError, ImageLoadError
from metrics._common import MetricInputError
from models import CAPTIONER_FAMILIES, CaptionModel, CheckpointError
from models.text_padding import TEXT_PADDINGS

logger = logging.getLogger("smile_blip")

CONFIG_DEFAULTS = Path(__file__).resolve().parent / "configs" / "default.yaml"
# The project's own errors about what the user gave it (config, annotations, images, output folder, checkpoints,
# results files): the entry points print them as one line and exit with status 2 (utils.run_cli).
USER_ERRORS = (utils.ConfigError, AnnotationError, ImageLoadError, checkpointing.RunExistsError, CheckpointError,
               MetricInputError, hub.HubError)
FREE_FORM_KEYS = {"objective", "model.arch", "resume", "data.feature_cache"}


def load_config(path: str | Path, overrides=()) -> dict:
    """Resolve defaults <- file <- overrides, validate every key and type, and check the objective spec."""
    config = utils.load_config(path, overrides, defaults_path=CONFIG_DEFAULTS, free_form=FREE_FORM_KEYS)
    try:
        steps.check_objective(config["objective"])
    except ValueError as error:
        raise utils.ConfigError(f"{path}: objective: {error}") from None
    choices = {"eval.split": ("val", "test"), "resume": (False, True, "auto"), "train.on_nonfinite": ("stop", "skip"),
               "data.train_bad_images": ("skip", "fail"), "data.eval_bad_images": ("fail", "skip"),
               "train.schedule": ("cosine_epoch", "cosine_step", "constant", "linear_warmup"),
               "train.grad_clip_mode": ("norm", "value"), "model.compile": (None, "vision", "full"),
               "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
               "model.text_padding": TEXT_PADDINGS, "model.family": ("blip", "prefix"),
               "data.feature_cache": ("auto", "on", "off", True, False), "data.augment_on": ("workers", "device")}  # YAML reads a bare on/off as a bool
    for key, allowed in choices.items():
        value = utils.get_by_path(config, key)
        if not any(value is choice or (isinstance(choice, str) and value == choice) for choice in allowed):
            raise utils.ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    micro = config["train"]["micro_batch_size"]
    if micro is not None and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise utils.ConfigError(f"train.micro_batch_size must be a positive integer or null, got {micro!r}")
    if Path(config["output_dir"]).exists() and not Path(config["output_dir"]).is_dir():
        raise utils.ConfigError(f"output_dir {config['output_dir']} exists and is not a folder")
    return config


# --------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------


def fill_data_paths(config: dict) -> dict:
    """Fill in the toy dataset's paths that are not set (and its vocab as tokenizer, if none is) when ``data.toy``;
    no file is touched (`build_toy_assets` builds them)."""
    data_config = config["data"]
    if not data_config["toy"]:
        return config
    from data.toy import toy_paths

    paths = toy_paths(Path(data_config["toy_root"]).absolute())
    if config["model"]["tokenizer"] is None:
        config["model"]["tokenizer"] = str(paths["vocab_file"])
    toy_values = {
        "image_root": str(paths["image_root"]), "train_files": [str(paths["train_file"])],
        "val_file": str(paths["val_file"]), "val_gt": str(paths["val_gt"]),
        "test_file": str(paths["test_file"]), "test_gt": str(paths["test_gt"]),
    }
    for key, value in toy_values.items():
        if not data_config[key]:  # a value the config sets itself (e.g. a subset of the train file) wins
            data_config[key] = value
    return config


def build_toy_assets(config: dict) -> None:
    """With ``data.toy``, build the toy set on first use; concurrent ranks wait for one builder (a file lock). So
    are the toy CLIP and GPT-2 when the run needs them and ``eval.clip_model`` / ``eval.ppl_model`` (or a prefix
    captioner's parts) name a folder beside ``data.toy_root`` (toy_pretrained.ensure_for_config)."""
    if not config["data"]["toy"]:
        return
    from data import ensure_toy_dataset
    from toy_pretrained import ensure_for_config

    ensure_toy_dataset(config["data"]["toy_root"])
    ensure_for_config(config)


def resolve_data_paths(config: dict) -> dict:
    """`fill_data_paths` and `build_toy_assets`: a config whose every data path exists (for library use;
    run_training and run_evaluation do both themselves, after `check_inputs`)."""
    fill_data_paths(config)
    build_toy_assets(config)
    return config


def metric_model_sources(groups, clip_model, ppl_model, keys=("eval.clip_model", "eval.ppl_model"),
                         clip_rewards: bool = False) -> list[tuple[str, str]]:
    """``(key, source)`` of the CLIP and GPT-2 that scoring ``groups`` (None: the default groups) will load."""
    from metrics.suite import DEFAULT_METRICS, IMAGE_METRICS

    groups = set(DEFAULT_METRICS if groups is None else groups)
    sources = []
    if groups & IMAGE_METRICS or clip_rewards:
        sources.append((keys[0], clip_model))
    if "ppl" in groups:
        sources.append((keys[1], ppl_model))
    return sources


def check_scoring_inputs(files: dict, images_root, groups, clip_model, ppl_model) -> None:
    """eval_caption.py --results, before any scoring starts: the files it names (``{flag: path or None}``) and
    ``--images-root`` exist, then the CLIP and GPT-2 the groups need exist locally or can come from the hub
    (hub.check_sources): every local path before any network."""
    from metrics._common import MetricInputNotFound

    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise MetricInputNotFound(f"{flag}: file not found: {path}")
    if images_root is not None and not Path(images_root).is_dir():
        raise MetricInputNotFound(f"--images-root: folder not found: {images_root}")
    hub.check_sources(metric_model_sources(groups, clip_model, ppl_model, ("--clip-model", "--ppl-model")))


def _require_file(key: str, value, folder: bool = False) -> None:
    path = Path(str(value)).expanduser()
    if not (path.is_dir() if folder else path.exists()):
        what = "folder" if folder else "file"
        raise utils.ConfigError(f"{key}: {what} {value} not found ({path.absolute()})")


def _weights_source(config: dict, key: str, source: str) -> list[tuple[str, str]]:
    """Check the weights ``source`` (``model.pretrained`` or ``--checkpoint``) as far as it is local; returns it as a
    ``(key, hub id)`` pair when it must come from the hub (checked after every local path)."""
    model_config = config["model"]
    if hub.is_url(source):
        return [(key, source)]
    if Path(source).expanduser().exists():
        return []
    recipe = model_config["pretrained_recipe"] if key == "model.pretrained" else None
    if recipe:
        if not Path(recipe).is_file():
            raise utils.ConfigError(f"model.pretrained {source} does not exist, and model.pretrained_recipe, which "
                                    f"would create it, names no file: {recipe}")
        load_config(recipe, ["resume=auto"])  # a typo in the recipe fails now, not after the first build
        return []
    from models.checkpoint import looks_like_hub_id

    if model_config["family"] == "blip" and looks_like_hub_id(source):
        return [(key, source)]
    raise CheckpointError(f"{key}: checkpoint {source!r} not found: no such file or directory "
                          f"({Path(source).expanduser().absolute()})")


def check_inputs(config: dict, mode: str = "train", split: str | None = None, checkpoint: str | None = None,
                 resuming: bool = False) -> None:
    """Every check that needs no model, run before anything is built or trained: config values, then every local
    path the config (or ``checkpoint``, eval_caption.py --checkpoint) names, then every hub id it names (one short
    probe of the hub; hub.py) and checkpoint URLs not yet downloaded.

    ``mode`` "train" checks what run_training reads (the training files, val when ``train.validate``, test and
    ``eval.metrics``' models when ``train.test_after_training``); "eval" what run_evaluation reads for ``split``.
    ``resuming``: the weights come from the run's own checkpoint, so ``model.pretrained`` is not needed. Paths
    the toy flow builds on first use (``data.toy``) are left to it.
    """
    model_config, data_config, eval_config = config["model"], config["data"], config["eval"]
    toy, family = data_config["toy"], model_config["family"]
    # Config values a builder would otherwise trip over deep inside.
    if family == "blip" and model_config["tokenizer"] is None and not toy:
        raise utils.ConfigError(
            "model.tokenizer is null, which means the toy set's vocab.txt, but data.toy is false: set model.tokenizer "
            "to the vocab.txt the model is trained with (the toy set's is <data.toy_root>/vocab.txt, e.g. "
            "cache/toy/vocab.txt), a tokenizer folder, or a hub id such as bert-base-uncased")
    if family == "prefix" and model_config["prefix"]["gpt2"] is None:
        raise utils.ConfigError("model.family is prefix but model.prefix.gpt2 is not set (a GPT-2 hub id or folder, "
                                "or a mapping of GPT2Config fields for a random toy model)")
    # The weights first (the file a user most often lacks), then the data, then the other models: every local
    # path before any network.
    remote: list[tuple[str, str]] = []
    if checkpoint:
        remote += _weights_source(config, "--checkpoint", str(checkpoint))
    elif model_config["pretrained"] and not resuming:
        remote += _weights_source(config, "model.pretrained", str(model_config["pretrained"]))
    # Data: what the user set (the toy set's own files do not exist before its first build).
    if mode == "train":
        splits = (["val"] if config["train"]["validate"] else []) + (
            ["test"] if config["train"]["test_after_training"] and data_config["test_file"] else [])
        if not data_config["train_files"] and not toy:
            raise utils.ConfigError("data.train_files is empty: nothing to train on (or set data.toy: true)")
        for name in data_config["train_files"]:
            _require_file("data.train_files", name)
    else:
        splits = [split or eval_config["split"]]
    for name in splits:
        if not data_config[f"{name}_file"] and not toy:
            raise utils.ConfigError(f"data.{name}_file is not set: cannot evaluate on {name}")
        for key in (f"data.{name}_file", f"data.{name}_gt"):
            if utils.get_by_path(config, key):
                _require_file(key, utils.get_by_path(config, key))
    if data_config["image_root"]:
        _require_file("data.image_root", data_config["image_root"], folder=True)
    sources = []
    if family == "blip" and model_config["tokenizer"] is not None:
        sources.append(("model.tokenizer", model_config["tokenizer"]))
    if family == "prefix":
        sources += [(f"model.prefix.{part}", model_config["prefix"][part]) for part in ("gpt2", "clip", "tokenizer")]
    scores_metrics = mode == "eval" or (config["train"]["test_after_training"] and (data_config["test_file"] or toy))
    clip_rewards = any(name in steps.CLIP_REWARDS for name in steps.reward_names(config["objective"]))
    sources += metric_model_sources(eval_config["metrics"] if scores_metrics else (), eval_config["clip_model"],
                                    eval_config["ppl_model"], clip_rewards=clip_rewards and mode == "train")
    from toy_pretrained import built_on_first_use

    sources = [(key, source) for key, source in sources if not built_on_first_use(config, source)]
    hub.check_sources(sources + [(key, source) for key, source in remote if not hub.is_url(source)])
    for key, source in remote:
        if hub.is_url(source):
            from models.checkpoint import download_path

            cache = Path(model_config["cache_dir"]).expanduser()
            hub.require_url(source, key, cached=download_path(source, cache).exists())


def ensure_pretrained(config: dict) -> None:
    """Run ``model.pretrained_recipe`` when ``model.pretrained`` names a local file that does not exist yet.

    The recipe trains into ``model.pretrained``'s folder with this run's seed, so that runs over several seeds
    (scripts/reproduce.sh SEEDS) each start from their own pre-trained model, e.g. ``seed=1
    model.pretrained=cache/toy_pretrain_seed1/checkpoint_best.safetensors``.
    """
    model_config = config["model"]
    source, recipe = model_config["pretrained"], model_config["pretrained_recipe"]
    if not source or not recipe or str(source).startswith(("http://", "https://")) or Path(source).exists():
        return
    logger.info("%s does not exist: training %s first to create it (seed %d)", source, recipe, config["seed"])
    # resume: auto, so a recipe run that was interrupted continues instead of refusing its own folder.
    run_training(load_config(recipe, ["resume=auto", f"seed={config['seed']}",
                                      f"output_dir={Path(source).parent}"]))
    if not Path(source).exists():
        raise FileNotFoundError(f"model.pretrained_recipe {recipe} ran but did not create {source}")


def build_captioner(config: dict, device: torch.device, pretrained: str | None = None,
                    load_weights: bool = True) -> CaptionModel:
    """The ``model.family`` captioner with ``pretrained`` (default: ``model.pretrained``) loaded, on ``device``.

    ``load_weights=False`` skips the pretrained weights (a resumed run overwrites them anyway)."""
    model_config = config["model"]
    source = pretrained or model_config["pretrained"]
    captioner = CAPTIONER_FAMILIES[model_config["family"]].from_config(model_config)  # the one place it is chosen
    if source and load_weights:
        captioner.load_pretrained(source, model_config)
    captioner.to(device)
    if model_config["compile"]:
        captioner.compile_parts(model_config["compile"], mode=model_config["compile_mode"])
    return captioner


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


def build_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    """AdamW as BLIP (weight decay on every parameter); fused on CUDA."""
    train_config = config["train"]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=train_config["lr"], weight_decay=train_config["weight_decay"],
                             fused=fused)


def learning_rate(config: dict, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    train_config = config["train"]
    schedule, base, floor = train_config["schedule"], train_config["lr"], train_config["min_lr"]
    if schedule == "constant":
        return base
    if schedule == "cosine_epoch":  # BLIP: one value per epoch, cosine over the epochs
        return utils.cosine_lr(epoch, train_config["epochs"], base, floor)
    total = train_config["epochs"] * steps_per_epoch
    if train_config["max_steps"]:
        total = min(total, train_config["max_steps"])
    step = epoch * steps_per_epoch + step_in_epoch
    if schedule == "linear_warmup":  # ClipCap: linear warm-up, then linear decay to 0 (get_linear_schedule_with_warmup)
        return utils.linear_warmup_lr(step, total, train_config["warmup_steps"], base)
    return utils.cosine_lr(step, total, base, floor)  # cosine_step


def autocast_context(config: dict, device: torch.device):
    if device.type == "cuda" and config["train"]["amp"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Loop pieces
# --------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the batch's image ids."""


def train_one_epoch(model, captioner: CaptionModel, loader, step, optimizer, config: dict,
                    progress: checkpointing.TrainProgress, log: utils.JsonlLogger, device: torch.device,
                    save_latest) -> dict:
    """Train on the rest of epoch ``progress.epoch`` (from batch ``progress.batches_done``); returns statistics.

    ``model`` is the (possibly DDP-wrapped) captioner used for the forward pass; ``captioner`` is the bare module
    (tokenizer, targets). ``progress`` is updated after every step, and ``save_latest()`` is called every
    ``train.checkpoint_every`` steps. Loss values stay on the device and are read only every ``log_every``
    steps; the one per-step host sync is the non-finite check (a single flag, all-reduced across ranks).
    The global gradient norm is computed only on logged steps (or every step when ``train.grad_clip`` needs it)
    and read together with the loss; images/s in a train record covers the steps since the previous one.
    """
    train_config = config["train"]
    model.train()
    epoch, first_batch = progress.epoch, progress.batches_done
    steps_per_epoch = first_batch + len(loader)
    max_steps = train_config["max_steps"]
    running = torch.zeros((), device=device)
    running_count, epoch_sum, epoch_count = 0, torch.zeros((), device=device), 0
    skipped_images = torch.zeros((), device=device)
    batches = iter(loader)  # draws the loader's base seed from the torch RNG ...
    checkpointing.restore_rng_from(progress)  # ... so a mid-epoch resume restores the RNG after that draw
    bar = tqdm(batches, total=steps_per_epoch, initial=first_batch, desc=f"epoch {epoch}",
               disable=not utils.is_main(), dynamic_ncols=True)
    start = time.perf_counter()
    interval_start, interval_first_step = start, progress.global_step
    for batch_index, (images, captions, image_ids, num_skipped) in enumerate(bar, start=first_batch):
        if max_steps and progress.global_step >= max_steps:
            break
        skipped_images += num_skipped
        if not captions:
            raise RuntimeError(f"every image of batch {batch_index} (epoch {epoch}) failed to load; is "
                               f"data.image_root ({config['data']['image_root']}) right?")
        lr = learning_rate(config, epoch, batch_index, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss, parts, stats, finite = steps.accumulate_gradients(
            model, captioner, step, images, captions, image_ids, micro_batch_size=train_config["micro_batch_size"],
            precision=lambda: autocast_context(config, device), all_finite=_all_ranks_finite)
        if not finite:
            _handle_nonfinite(config, progress, image_ids, log)
            optimizer.zero_grad(set_to_none=True)
            progress.global_step += 1
            progress.batches_done = batch_index + 1
            continue
        log_now = (progress.global_step + 1) % train_config["log_every"] == 0
        # After backward, DDP has all-reduced the gradients, so this norm is the global one on every rank.
        grad_norm = None
        if train_config["grad_clip"] and train_config["grad_clip_mode"] == "norm":
            # clip_grad_norm_ returns the norm before clipping, which is the one worth logging.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_config["grad_clip"])
        else:
            if log_now:
                grad_norm = utils.global_grad_norm(model.parameters())
            if train_config["grad_clip"]:  # "value": each gradient entry into [-clip, clip], as self-critical.pytorch
                torch.nn.utils.clip_grad_value_(model.parameters(), train_config["grad_clip"])
        optimizer.step()
        progress.global_step += 1
        progress.batches_done = batch_index + 1
        running += loss.detach()
        running_count += 1
        epoch_sum += loss.detach()
        epoch_count += 1
        if log_now:
            mean_loss = utils.all_reduce_mean(running / running_count).item()
            parts_now = {f"loss_{name}": value.item() for name, value in parts.items()}
            parts_now.update({name: utils.all_reduce_mean(value.detach().float()).item() for name, value in stats.items()})
            norm_now = grad_norm.item()
            now = time.perf_counter()  # after the reads above, which wait for the device to finish the steps
            images = (progress.global_step - interval_first_step) * train_config["batch_size"] * utils.get_world_size()
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            log.log(kind="train", epoch=epoch, step=progress.global_step, loss=mean_loss, lr=lr, **parts_now,
                    grad_norm=norm_now, images_per_second=images / max(now - interval_start, 1e-9))
            running.zero_()
            running_count = 0
            interval_start, interval_first_step = now, progress.global_step
        if train_config["checkpoint_every"] and progress.global_step % train_config["checkpoint_every"] == 0:
            save_latest()
    elapsed = time.perf_counter() - start
    mean = utils.all_reduce_mean(epoch_sum / max(epoch_count, 1)).item()
    skipped = int(utils.all_reduce_mean(skipped_images).item() * utils.get_world_size())
    progress.skipped_images += skipped
    if skipped:
        logger.warning("epoch %d: skipped %d unreadable image(s) (%d in this run)", epoch, skipped,
                       progress.skipped_images)
    return {"loss": mean, "steps": epoch_count, "seconds": elapsed, "skipped_images": skipped,
            "images_per_second": epoch_count * train_config["batch_size"] * utils.get_world_size() / max(elapsed, 1e-9)}


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    flag = (~torch.isfinite(loss.detach())).float()
    if utils.is_distributed():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


def _handle_nonfinite(config: dict, progress: checkpointing.TrainProgress, image_ids: torch.Tensor,
                      log: utils.JsonlLogger) -> None:
    """Stop (default) or skip the step, naming the step and every rank's image ids of the batch."""
    ids = sorted(i for shard in utils.all_gather_object(image_ids.tolist()) for i in shard)
    where = f"step {progress.global_step + 1} (epoch {progress.epoch}, batch {progress.batches_done})"
    if config["train"]["on_nonfinite"] == "skip":
        progress.skipped_steps += 1
        logger.warning("non-finite loss at %s, image ids %s: step skipped (%d so far)", where, ids,
                       progress.skipped_steps)
        log.log(kind="nonfinite", epoch=progress.epoch, step=progress.global_step + 1, image_ids=ids)
        return
    raise NonFiniteLossError(
        f"non-finite loss at {where}; image ids of the batch: {ids}. Stopped without saving; the last good "
        f"checkpoint is {Path(config['output_dir']) / checkpointing.LATEST} (resume with --resume). Set "
        "train.on_nonfinite: skip to skip such steps instead."
    )


def generation_options(config: dict) -> dict:
    eval_config = config["eval"]
    keys = ("sample", "num_beams", "max_length", "min_length", "top_p", "repetition_penalty")
    return {key: eval_config[key] for key in keys}


@torch.no_grad()
def generate_captions(captioner: CaptionModel, loader, config: dict, device: torch.device) -> list[dict]:
    """Captions for every image of ``loader``'s dataset, gathered from all ranks, one per image id, sorted.

    The DistributedSampler pads the last shard by repeating images, so results are de-duplicated by image id.
    """
    captioner.eval()
    options = generation_options(config)
    local: list[dict] = []
    for images, image_ids in tqdm(loader, desc="generate", disable=not utils.is_main(), dynamic_ncols=True):
        with autocast_context(config, device):
            captions = captioner.generate(images.to(device, non_blocking=True), **options)
        local.extend({"image_id": int(i), "caption": c} for i, c in zip(image_ids.tolist(), captions))
    by_id = {}
    for shard in utils.all_gather_object(local):
        for row in shard:
            by_id.setdefault(row["image_id"], row)
    return [by_id[i] for i in sorted(by_id)]


@contextmanager
def scoring_session(gt: dict, config: dict, groups=("coco",), images_root=None):
    """Rank 0: a metrics session (metrics/suite.py) whose caption-independent work starts now, in the background,
    while the captions are generated: METEOR's JVMs, tokenising the references, CLIP's embeddings of the images
    and references. None on the other ranks. Enter it after the captioner is built: transformers'
    ``from_pretrained`` changes process-wide state, so the session loads CLIP and GPT-2 in this thread."""
    session = None
    if utils.is_main():
        from metrics.suite import prepare_metrics

        eval_config = config["eval"]
        # eval.instances (CHAIR): a configured file that was never fetched is a warning, not a failed run.
        session = prepare_metrics(gt, list(groups), images_root=images_root, clip_model=eval_config["clip_model"],
                                  ppl_model=eval_config["ppl_model"], instances=eval_config.get("instances"),
                                  skip_missing_instances=True, finecapeval=eval_config["finecapeval"])
    try:
        yield session
    finally:
        if session is not None:
            session.close()


def score(results: list[dict], session) -> dict:
    """Metrics on rank 0 from its ``scoring_session``, broadcast to every rank (so all ranks take the same
    best-checkpoint decision)."""
    return utils.broadcast_object(session.score(results) if session is not None else None)


def evaluate(captioner: CaptionModel, loader, gt: dict, config: dict, device: torch.device,
             groups=("coco",)) -> tuple[list[dict], dict]:
    """Generate for every image in ``loader`` and score against ``gt``: (results, metrics)."""
    with scoring_session(gt, config, groups, images_root=config["data"]["image_root"]) as session:
        results = generate_captions(captioner, loader, config, device)
        return results, score(results, session)


def selection_score(metrics: dict) -> float:
    """BLIP's model selection: CIDEr + BLEU-4."""
    return metrics["CIDEr"] + metrics["Bleu_4"]


# --------------------------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------------------------


def prepare_output_dir(config: dict, config_name: str = "config.yaml") -> Path:
    """Create ``output_dir`` and write the resolved config there as ``config_name`` (rank 0)."""
    output_dir = Path(config["output_dir"])
    if utils.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        utils.atomic_write_text(output_dir / config_name, _dump_yaml(config))
    utils.barrier()
    return output_dir


def _dump_yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def run_training(config: dict) -> tuple[dict, CaptionModel]:
    """Train per ``config``; returns (summary with the best validation and the test metrics, trained captioner).

    Joins the process group torchrun describes, if any. Resumes from ``output_dir/checkpoint_latest.safetensors``
    when ``resume`` says so (see checkpointing.py). With ``train.tensorboard``, rank 0 also writes every log
    record's numbers to ``output_dir/tensorboard``.

    Everything that needs no model is checked first (`check_inputs`, then the resume state), so a wrong path, an
    unreachable hub id or a ``--resume`` without a checkpoint fails in seconds; only then are the toy set and toy
    models built on first use (`resolve_data_paths`), the pre-training recipe run and the captioner built.
    """
    if config["train"]["tensorboard"]:
        utils.require_tensorboard()  # before any work, rather than after the model is built
    output_dir = Path(config["output_dir"])
    # Before check_output_dir: an overwrite deletes the old run only once the new one can start.
    check_inputs(config, "train", resuming=bool(config["resume"]) and (output_dir / checkpointing.LATEST).exists())
    device = utils.init_distributed(config["device"], config["train"]["dist_timeout_minutes"])
    resume_from = checkpointing.check_output_dir(output_dir, config["resume"], config["overwrite"])
    fill_data_paths(config)
    prepare_output_dir(config, "config.yaml" if resume_from is None else "config_resumed.yaml")
    build_toy_assets(config)
    if resume_from is None:
        ensure_pretrained(config)
    # Same initial weights on every rank even without a checkpoint: seed the model build identically.
    torch.manual_seed(config["seed"])
    captioner = build_captioner(config, device, load_weights=resume_from is None)
    utils.seed_everything(config["seed"] + utils.get_rank())
    model = captioner
    if utils.is_distributed():
        model = DistributedDataParallel(captioner, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(captioner, config)
    progress = checkpointing.TrainProgress(world_size=utils.get_world_size())
    if resume_from is not None:
        progress = checkpointing.load_training_checkpoint(resume_from, captioner.model, optimizer)
        logger.info("resuming %s at epoch %d, batch %d (step %d)", resume_from, progress.epoch,
                    progress.batches_done, progress.global_step)
    # After the weights are in place: a feature cache is keyed on the image tower this run trains with.
    train_loader, sampler = build_train_loader(config, captioner)
    step = steps.build_step(config, captioner, train_loader.dataset, device)
    validate = config["train"]["validate"]
    val_loader, val_gt = build_eval_loader(config, "val", captioner.eval_transform()) if validate else (None, None)
    if resume_from is not None and progress.batches_done == 0:
        checkpointing.restore_rng_from(progress)  # at an epoch boundary the next epoch's loader has not drawn yet
    log = utils.JsonlLogger(output_dir / "log.jsonl", _open_tensorboard(config, output_dir, resume_from, progress))
    logger.info("objective %s; %d training samples, %d steps per epoch, %d process(es)", step,
                len(train_loader.dataset), len(train_loader), utils.get_world_size())

    def save_latest():
        checkpointing.save_training_checkpoint(output_dir / checkpointing.LATEST, captioner.model, optimizer,
                                               config, progress)

    max_steps = config["train"]["max_steps"]
    with log:  # closes the TensorBoard writer, flushing its last events, also when training fails
        while progress.epoch < config["train"]["epochs"] and not (max_steps and progress.global_step >= max_steps):
            epoch = progress.epoch
            sampler.set_epoch(epoch)
            sampler.skip_batches(progress.batches_done, config["train"]["batch_size"])
            stats = train_one_epoch(model, captioner, train_loader, step, optimizer, config, progress, log,
                                    device, save_latest)
            log.log(kind="epoch", epoch=epoch, step=progress.global_step, **stats)
            logger.info("epoch %d: loss %.4f, %.1f images/s", epoch, stats["loss"], stats["images_per_second"])
            metrics = None
            if val_loader is not None:
                results, metrics = evaluate(captioner, val_loader, val_gt, config, device)
                log.log(kind="val", epoch=epoch, step=progress.global_step, **metrics)
                logger.info("epoch %d val: %s", epoch, _format_metrics(metrics))
                if utils.is_main():
                    utils.write_json(output_dir / f"val_epoch{epoch}_results.json", results)
            progress.epoch, progress.batches_done = epoch + 1, 0
            if metrics is None or selection_score(metrics) > progress.best_score:
                # Without validation there is no selection: the last epoch is the one to keep.
                if metrics is not None:
                    progress.best_score, progress.best_metrics = selection_score(metrics), metrics
                checkpointing.save_training_checkpoint(output_dir / checkpointing.BEST, captioner.model, None,
                                                       config, progress, metrics=metrics)
            save_latest()
        utils.barrier()

        summary = {"best_val": progress.best_metrics, "steps": progress.global_step,
                   "skipped_images": progress.skipped_images, "skipped_steps": progress.skipped_steps}
        if config["train"]["test_after_training"] and config["data"]["test_file"]:
            checkpointing.load_weights(output_dir / checkpointing.BEST, captioner.model)
            try:
                summary["test"] = evaluate_split(captioner, config, "test", device, output_dir, "test")
            except Exception:
                # checkpoint_latest already says the training is done: the same command only scores the test split.
                logger.error("training finished and its checkpoints are in %s, but scoring the test split failed; "
                             "running the same command again (resume: auto, or --resume) scores it without "
                             "training", output_dir)
                raise
            log.log(kind="test", step=progress.global_step, **summary["test"])
    if utils.is_main():
        utils.write_json(output_dir / "summary.json", summary)
    return summary, captioner


def _open_tensorboard(config: dict, output_dir: Path, resume_from: Path | None,
                      progress: checkpointing.TrainProgress):
    """The run's TensorBoard writer (rank 0; None elsewhere or when ``train.tensorboard`` is off).

    A fresh start deletes event files an earlier run left in ``output_dir/tensorboard`` (check_output_dir has
    already refused to replace a run without ``overwrite``), so old and new curves never mix; a resumed run
    purges the events logged after the checkpoint it resumes from, which it is about to log again.
    """
    if not config["train"]["tensorboard"]:
        return None
    log_dir = output_dir / "tensorboard"
    if resume_from is None and utils.is_main():
        for stale in log_dir.glob("events.out.tfevents.*"):
            stale.unlink()
    # The checkpoint was saved after the records of its own step were logged: only later steps are done again.
    return utils.open_tensorboard(log_dir, purge_step=None if resume_from is None else progress.global_step + 1)


def run_evaluation(config: dict, checkpoint: str | None = None, split: str | None = None) -> dict:
    """Generate and score ``split`` (default ``eval.split``) with ``checkpoint`` (default ``model.pretrained``).

    Writes ``eval_<split>_results.json``, ``eval_<split>_metrics.json`` and ``eval_<split>_caption_lengths.png``
    into ``output_dir``.
    """
    split = split or config["eval"]["split"]
    check_inputs(config, "eval", split=split, checkpoint=checkpoint)  # before anything is built or downloaded
    device = utils.init_distributed(config["device"], config["train"]["dist_timeout_minutes"])
    fill_data_paths(config)
    # Evaluating into a training run's folder must not replace the config that trained it.
    output_dir = prepare_output_dir(config, config_name=f"eval_{split}_config.yaml")
    build_toy_assets(config)
    captioner = build_captioner(config, device, pretrained=checkpoint)
    return evaluate_split(captioner, config, split, device, output_dir, f"eval_{split}")


def evaluate_split(captioner: CaptionModel, config: dict, split: str, device: torch.device, output_dir: Path,
                   name: str) -> dict:
    """Generate on ``split``, score ``eval.metrics``; writes ``<name>_results.json``, ``<name>_metrics.json`` and
    a histogram of the caption lengths, ``<name>_caption_lengths.png`` (a plot that fails is only a warning)."""
    loader, gt = build_eval_loader(config, split, captioner.eval_transform())
    with scoring_session(gt, config, config["eval"]["metrics"], images_root=config["data"]["image_root"]) as session:
        results = generate_captions(captioner, loader, config, device)
        if utils.is_main():
            utils.write_json(output_dir / f"{name}_results.json", results)  # kept even if scoring fails
        metrics = score(results, session)
    if utils.is_main():
        utils.write_json(output_dir / f"{name}_metrics.json", metrics)
        from metrics.plots import plot_caption_lengths_or_warn

        plot_caption_lengths_or_warn(results, output_dir / f"{name}_caption_lengths.png", run=output_dir.name,
                                     title=f"Caption length, {split} split")
    logger.info("%s: %s", name, _format_metrics(metrics))
    return metrics


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
