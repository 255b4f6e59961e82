"""What a run reads, checked before anything is built, and the toy inputs built on first use.

``check_inputs`` runs every check that needs no model: config values, every local path, then one probe of the hub
for the hub ids (hub.py). ``fill_data_paths``/``build_toy_assets`` point a ``data.toy`` config at the toy set and
build it (and the toy CLIP and GPT-2) on first use; ``apply_custom_root`` (part of ``fill_data_paths``) points any
config at a user's own set that ``scripts/prepare_data.py custom`` made (``data.custom_root``).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import hub
import utils
from data import SOURCES
from models import CheckpointError
from models import lora
from models.families import captioner_family

from . import steps
from .config import load_config

logger = logging.getLogger("smile_blip")

# What a metric group can need (metrics/registry.py NEEDS) that a user's own set never has, and why: the groups
# needing one of these are dropped from eval.metrics when data.custom_root is set.
CUSTOM_DATA_LACKS = {
    "toy_scenes": "the toy scenes' attributes",
    "instances": "COCO's object annotations",
    "finecapeval": "FineCapEval's phrase annotations",
}
CUSTOM_DATA_KEYS = ("image_root", "train_files", "val_file", "val_gt", "test_file", "test_gt")


def apply_custom_root(config: dict, announce: bool = True) -> dict:
    """With ``data.custom_root`` set, take the data from the set prepared there (data/custom.py's manifest): every
    one of `CUSTOM_DATA_KEYS` is replaced, whatever the config set (a COCO config's paths, the toy set's), and the
    ``eval.metrics`` groups that need what such a set lacks (`CUSTOM_DATA_LACKS`: toy_grounding, chair,
    finecapeval, ...) are dropped, with one log line saying which and why when ``announce``. Idempotent; a
    ``data.toy`` config keeps its toy models and tokenizer (`fill_data_paths`).

    Raises:
        utils.ConfigError: naming ``data.custom_root`` when the folder, its manifest or a file it names is missing.
    """
    data_config = config["data"]
    root = data_config["custom_root"]
    if not root:
        return config
    from data.custom import CustomDataError, custom_data_paths

    try:
        values = custom_data_paths(root)
    except (FileNotFoundError, CustomDataError) as error:
        raise utils.ConfigError(f"data.custom_root: {error}") from None
    data_config.update(values)
    groups = config["eval"]["metrics"]
    if groups:
        from metrics.registry import groups_needing

        why = {}
        for need, lacked in CUSTOM_DATA_LACKS.items():
            for name in groups_needing(need) & set(groups):
                why.setdefault(name, lacked)
        if why:
            config["eval"]["metrics"] = [name for name in groups if name not in why]
            if announce:
                logger.warning("data.custom_root %s: eval.metrics without %s: %s, which a custom set does not have",
                               root, ", ".join(sorted(why)),
                               "; ".join(f"{name} needs {why[name]}" for name in sorted(why)))
    return config


def fill_data_paths(config: dict) -> dict:
    """Take the data from ``data.custom_root`` when it is set (`apply_custom_root`), then, when ``data.toy``, fill in
    the toy dataset's vocab as tokenizer if none is set and, unless the data is a custom set's (which wins), the toy
    dataset's paths that are not set; no file is touched (`build_toy_assets` builds them)."""
    apply_custom_root(config)
    data_config = config["data"]
    if not data_config["toy"]:
        return config
    from data.toy import toy_paths

    paths = toy_paths(Path(data_config["toy_root"]).absolute())
    if config["model"]["tokenizer"] is None:
        config["model"]["tokenizer"] = str(paths["vocab_file"])
    if data_config["custom_root"]:  # the toy models and vocab stay, the data is the user's
        return config
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
    ensure_for_config(config, reward_clip=steps.reward_clip_model(config["objective"]))


def resolve_data_paths(config: dict) -> dict:
    """`fill_data_paths` and `build_toy_assets`: a config whose every data path exists (for library use;
    run_training and run_evaluation do both themselves, after `check_inputs`)."""
    fill_data_paths(config)
    build_toy_assets(config)
    return config


def metric_model_sources(groups, clip_model, ppl_model, keys=("eval.clip_model", "eval.ppl_model"),
                         groups_key: str = "eval.metrics") -> list[tuple[str, str]]:
    """``(key, source)`` of the CLIP and GPT-2 that scoring ``groups`` (None: the default groups) will load, from
    the groups' needs in metrics/registry.py. The group names are checked first (an unknown one is an error naming
    ``groups_key`` and the valid names)."""
    from metrics.registry import DEFAULT_METRICS, check_groups, needs_of

    groups = DEFAULT_METRICS if groups is None else list(groups)
    needs = needs_of(check_groups(groups, what=groups_key)) if groups else frozenset()
    sources = []
    if "clip" in needs:
        sources.append((keys[0], clip_model))
    if "lm" in needs:
        sources.append((keys[1], ppl_model))
    return sources


def check_scoring_inputs(files: dict, images_root, groups, clip_model, ppl_model) -> None:
    """eval_caption.py --results, before any scoring starts: the files it names (``{flag: path or None}``) and
    ``--images-root`` exist, the ``--metrics`` groups are registered, then the CLIP and GPT-2 the groups need exist
    locally or can come from the hub (hub.check_sources): every local path before any network."""
    from metrics._common import MetricInputNotFound

    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise MetricInputNotFound(f"{flag}: file not found: {path}")
    if images_root is not None and not Path(images_root).is_dir():
        raise MetricInputNotFound(f"--images-root: folder not found: {images_root}")
    hub.check_sources(metric_model_sources(groups, clip_model, ppl_model, ("--clip-model", "--ppl-model"),
                                           groups_key="--metrics"))


def reward_model_sources(objective) -> list[tuple[str, str]]:
    """``(key, source)`` of the CLIP the objective's SCST rewards load (``objective.scst.clip_model``); the grammar
    reward's folder, which scripts/train_grammar_clip.py writes, must exist (a ConfigError naming it otherwise)."""
    scst, _ = steps.split_objective(objective)
    if scst is None:
        return []
    rewards = steps.reward_names(objective)
    if "grammar" in rewards:
        if scst["grammar_model"] is None:
            raise utils.ConfigError("objective.scst.reward has grammar but objective.scst.grammar_model is not set: "
                                    "give the folder scripts/train_grammar_clip.py wrote")
        utils.require_path("objective.scst.grammar_model", scst["grammar_model"], folder=True)
    clip_model = steps.reward_clip_model(objective)
    if clip_model is None:  # no reward needs a CLIP
        return []
    if not isinstance(clip_model, str) or not clip_model:
        raise utils.ConfigError(f"objective.scst.clip_model must name the CLIP of the reward(s) {rewards} (a hub "
                                f"id or a local directory), got {clip_model!r}")
    return [("objective.scst.clip_model", clip_model)]


def _weights_source(config: dict, key: str, source: str) -> list[tuple[str, str]]:
    """Check the weights ``source`` (``model.pretrained`` or ``--checkpoint``) as far as it is local; returns it as a
    ``(key, hub id)`` pair when it must come from the hub (checked after every local path)."""
    from toy_pretrained import TOY_BUILDERS, built_on_first_use

    model_config = config["model"]
    if hub.is_url(source):
        return [(key, source)]
    # A toy stand-in the family's weights come from (the toy VLM) is built later, by build_toy_assets.
    toy_kinds = {kind for _, named, kind in captioner_family(model_config).config_sources(model_config)
                 if named == source and kind in TOY_BUILDERS}
    if Path(source).expanduser().exists() or (toy_kinds and built_on_first_use(config, source)):
        return []
    recipe = model_config["pretrained_recipe"] if key == "model.pretrained" else None
    if recipe:
        if not Path(recipe).is_file():
            raise utils.ConfigError(f"model.pretrained {source} does not exist, and model.pretrained_recipe, which "
                                    f"would create it, names no file: {recipe}")
        load_config(recipe, ["resume=auto"])  # a typo in the recipe fails now, not after the first build
        return []
    if captioner_family(model_config).accepts_hub_weights(source):
        return [(key, source)]
    raise CheckpointError(f"{key}: checkpoint {source!r} not found: no such file or directory "
                          f"({Path(source).expanduser().absolute()})")


def _check_data(config: dict, mode: str, split: str | None) -> None:
    """`check_inputs`' data part: what the user set (the toy set's own files do not exist before its first build;
    a custom set's always do, and its empty splits are not the toy set's to fill)."""
    data_config = config["data"]
    toy_data = data_config["toy"] and not data_config["custom_root"]
    if mode == "train":
        splits = (["val"] if config["train"]["validate"] else []) + (
            ["test"] if config["train"]["test_after_training"] and data_config["test_file"] else [])
        SOURCES[data_config["source"]].check_config(data_config)
    else:
        splits = [split or config["eval"]["split"]]
    for name in splits:
        if not data_config[f"{name}_file"] and not toy_data:
            raise utils.ConfigError(f"data.{name}_file is not set: cannot evaluate on {name}")
        for key in (f"data.{name}_file", f"data.{name}_gt"):
            if utils.get_by_path(config, key):
                utils.require_path(key, utils.get_by_path(config, key))
    if data_config["image_root"]:
        utils.require_path("data.image_root", data_config["image_root"], folder=True)


def check_inputs(config: dict, mode: str = "train", split: str | None = None, checkpoint: str | None = None,
                 resuming: bool = False) -> None:
    """Every check that needs no model, run before anything is built or trained: config values, then every local
    path the config (or ``checkpoint``, eval_caption.py --checkpoint) names, then every hub id it names (one short
    probe of the hub; hub.py) and checkpoint URLs not yet downloaded.

    ``mode`` "train" checks what run_training reads (the training files, val when ``train.validate``, test and
    ``eval.metrics``' models when ``train.test_after_training``); "eval" what run_evaluation reads for ``split``.
    ``resuming``: the weights come from the run's own checkpoint, so ``model.pretrained`` is not needed. Paths
    the toy flow builds on first use (``data.toy``) are left to it. With ``data.custom_root`` the checks run on the
    data it names (`apply_custom_root` on a copy: ``config`` is not changed here).
    """
    if config["data"]["custom_root"]:
        config = apply_custom_root(copy.deepcopy(config), announce=False)
    model_config, data_config, eval_config = config["model"], config["data"], config["eval"]
    toy, family = data_config["toy"], captioner_family(model_config)
    # Config values a builder would otherwise trip over deep inside.
    try:
        family.check_config(model_config, toy)
        lora.check_config(model_config)  # model.lora: its values, peft installed, a base to rebuild
    except ValueError as error:
        raise utils.ConfigError(str(error)) from None
    # The weights first (the file a user most often lacks), then the data, then the other models: every local
    # path before any network.
    remote: list[tuple[str, str]] = []
    if checkpoint:
        remote += _weights_source(config, "--checkpoint", str(checkpoint))
    elif model_config["pretrained"] and not resuming:
        remote += _weights_source(config, "model.pretrained", str(model_config["pretrained"]))
    try:
        _check_data(config, mode, split)
    except utils.ConfigError as error:
        if toy or data_config["custom_root"] or any(data_config[key] for key in CUSTOM_DATA_KEYS):
            raise
        # A config that names no data at all (configs/custom/*.yaml without its override): say how to give it.
        raise utils.ConfigError(f"{error}. For your own captioned images, set data.custom_root=DIR (python "
                                f"scripts/prepare_data.py custom --input SRC --out DIR)") from None
    sources = [(key, source) for key, source, _ in family.config_sources(model_config)]
    scores_metrics = mode == "eval" or (config["train"]["test_after_training"] and (data_config["test_file"] or toy))
    sources += metric_model_sources(eval_config["metrics"] if scores_metrics else (), eval_config["clip_model"],
                                    eval_config["ppl_model"])
    if mode == "train":
        sources += reward_model_sources(config["objective"])
    from toy_pretrained import built_on_first_use

    sources = [(key, source) for key, source in sources
               if source is not None and not built_on_first_use(config, source)]
    hub.check_sources(sources + [(key, source) for key, source in remote if not hub.is_url(source)])
    for key, source in remote:
        if hub.is_url(source):
            from models.checkpoint import download_path

            cache = Path(model_config["cache_dir"]).expanduser()
            hub.require_url(source, key, cached=download_path(source, cache).exists())
