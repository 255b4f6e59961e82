"""What a run reads, checked before anything is built, and the toy inputs built on first use.

``check_inputs`` runs every check that needs no model: config values, every local path, then one probe of the hub
for the hub ids (hub.py). ``fill_data_paths``/``build_toy_assets`` point a ``data.toy`` config at the toy set and
build it (and the toy CLIP and GPT-2) on first use.
"""
from __future__ import annotations

from pathlib import Path

import hub
import utils
from models import CheckpointError

from . import steps
from .config import load_config


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
