"""The run's configuration: defaults <- YAML file <- ``--opt`` overrides, validated, and written into the run.

``load_config`` checks every key's name and type against configs/default.yaml and every enumerated value, so a typo
fails before anything is built. ``prepare_output_dir`` records the resolved config beside the run's outputs.

Each section is read by the code that owns it. Keys that moved to their own section still work for one release
(`upgrade_layout`, with one warning line naming the old and the new key), so configs written for the older
layout, and the resolved configs that runs and checkpoints saved, still load. `config_changes` names what differs
between a checkpoint's config and the config resuming it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import hub
import utils
from data.datasets import AnnotationError, ImageLoadError
from data.sources import SOURCES
from metrics._common import MetricInputError
from metrics.clip_metrics import CLIP_LONG_TEXT
from models import CAPTIONER_FAMILIES, CheckpointError
from models.text_padding import TEXT_PADDINGS

from . import checkpoints, steps

logger = logging.getLogger("smile_blip")

CONFIG_DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# The project's own errors about what the user gave it (config, annotations, images, output folder, checkpoints,
# results files): the entry points print them as one line and exit with status 2 (utils.run_cli).
USER_ERRORS = (utils.ConfigError, AnnotationError, ImageLoadError, checkpoints.RunExistsError, CheckpointError,
               MetricInputError, hub.HubError)
FREE_FORM_KEYS = {"objective", "model.arch", "resume", "data.feature_cache"}
# Old key -> its new name, in the section that reads it (both are read by training and evaluation alike).
RENAMED_KEYS = {"train.dist_timeout_minutes": "dist_timeout_minutes", "train.amp": "amp"}
# Keys of launching, not of what a run trains: a resume may change them without a word.
LAUNCH_KEYS = ("resume", "overwrite")


def load_config(path: str | Path, overrides=()) -> dict:
    """Resolve defaults <- file <- overrides (keys of the older layout moved, `upgrade_layout`), validate every key
    and type, and check the objective spec."""
    config = utils.load_config(path, overrides, defaults_path=CONFIG_DEFAULTS, free_form=FREE_FORM_KEYS,
                               upgrade=lambda content: upgrade_layout(content, source=str(path)))
    try:
        steps.check_objective(config["objective"])
    except ValueError as error:
        raise utils.ConfigError(f"{path}: objective: {error}") from None
    from .evaluation import select_by  # here, not at the top: training.evaluation imports this module

    select_by(config)  # eval.select_by names metric keys validation scores
    choices = {"eval.split": ("val", "test"), "resume": (False, True, "auto"), "train.on_nonfinite": ("stop", "skip"),
               "data.train_bad_images": ("skip", "fail"), "data.eval_bad_images": ("fail", "skip"),
               "train.schedule": ("cosine_epoch", "cosine_step", "constant", "linear_warmup"),
               "train.grad_clip_mode": ("norm", "value"), "train.sharding": ("ddp", "fsdp"),
               "model.compile": (None, "vision", "full"),
               "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
               "model.text_padding": TEXT_PADDINGS, "model.family": tuple(CAPTIONER_FAMILIES),
               "data.feature_cache": ("auto", "on", "off", True, False),  # YAML reads a bare on/off as a bool
               "data.augment_on": ("workers", "device"), "data.source": tuple(SOURCES),
               "eval.clip_long_text": CLIP_LONG_TEXT}
    for key, allowed in choices.items():
        value = utils.get_by_path(config, key)
        if not any(value is choice or (isinstance(choice, str) and value == choice) for choice in allowed):
            raise utils.ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    custom_root = config["data"]["custom_root"]
    if custom_root is not None and (not isinstance(custom_root, str) or not custom_root.strip()):
        raise utils.ConfigError(f"data.custom_root must be the folder prepare_data.py custom wrote (a path) or null, "
                                f"got {custom_root!r}")
    micro = config["train"]["micro_batch_size"]
    if micro is not None and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise utils.ConfigError(f"train.micro_batch_size must be a positive integer or null, got {micro!r}")
    if Path(config["output_dir"]).exists() and not Path(config["output_dir"]).is_dir():
        raise utils.ConfigError(f"output_dir {config['output_dir']} exists and is not a folder")
    return config


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


_ABSENT = _Absent()  # marks a key a config does not set (shown as such in `config_changes`)


def _has(config: dict, dotted: str) -> bool:
    return utils.get_by_path(config, dotted, _ABSENT) is not _ABSENT


def _default(dotted: str):
    return utils.get_by_path(utils.load_yaml_with_bases(CONFIG_DEFAULTS), dotted)


def _reward_clip_options(objective) -> dict | None:
    """The ``objective.scst`` mapping of an objective whose SCST reward needs a CLIP, else None."""
    try:
        rewards = steps.reward_names(objective) or []
    except ValueError:  # a malformed objective: check_objective names the problem after the upgrade
        return None
    if not any(name in steps.CLIP_REWARDS for name in rewards):
        return None
    return objective[steps.SCST]  # a CLIP reward is only ever named in an objective.scst mapping


def upgrade_layout(content: dict, source: str = "config", warn: bool = True) -> dict:
    """``content`` (the keys a config file and its overrides set, or a resolved config a run saved) with the keys of
    the older layout moved to the section that reads them now; with ``warn``, one warning line per moved key.

    * ``train.dist_timeout_minutes`` -> ``dist_timeout_minutes`` and ``train.amp`` -> ``amp``: top-level, because
      evaluation reads them as much as training (`RENAMED_KEYS`); setting both names is an error.
    * ``eval.clip_model`` -> ``objective.scst.clip_model`` for an SCST reward that needs a CLIP, and
      ``eval.batch_size`` -> ``data.feature_cache_batch_size`` unless the feature cache is off: the old key stays
      evaluation's own; a config that sets it to another value than the new key's default, and does not set the
      new key, keeps the value it trained with.
    """
    content = copy.deepcopy(content)
    notes: list[str] = []
    for old, new in RENAMED_KEYS.items():
        if not _has(content, old):
            continue
        value = content[old.split(".")[0]].pop(old.split(".")[1])
        if _has(content, new):
            raise utils.ConfigError(f"{source} sets both {old} and {new}; {old} is the old name of {new}: keep {new}")
        utils.set_by_path(content, new.split("."), value)
        notes.append(f"{old} is deprecated, set {new} instead (the old name still works in this release)")
    scst = _reward_clip_options(content.get("objective"))
    clip_model = utils.get_by_path(content, "eval.clip_model", steps.SCST_DEFAULTS["clip_model"])
    if scst is not None and "clip_model" not in scst and clip_model != steps.SCST_DEFAULTS["clip_model"]:
        scst["clip_model"] = clip_model
        notes.append(_fallback_note("eval.clip_model", "objective.scst.clip_model", clip_model))
    batch_size = utils.get_by_path(content, "eval.batch_size", None)
    if (batch_size is not None and batch_size != _default("data.feature_cache_batch_size")
            and not _has(content, "data.feature_cache_batch_size")
            and utils.get_by_path(content, "data.feature_cache", "auto") not in ("off", False)):
        utils.set_by_path(content, ["data", "feature_cache_batch_size"], batch_size)
        notes.append(_fallback_note("eval.batch_size", "data.feature_cache_batch_size", batch_size))
    if warn:
        for note in notes:
            logger.warning("%s: %s", source, note)
    return content


def _fallback_note(old: str, new: str, value) -> str:
    return (f"{old} standing in for {new} is deprecated, set {new} (this release still takes {old}'s {value!r}; "
            f"{old} itself stays)")


def _differences(old, new, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
    elif old != new:
        yield prefix[:-1], old, new


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_changes(saved: dict, config: dict) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs between ``saved`` (the resolved config a checkpoint
    holds, of any layout) and ``config`` (a resolved config of the current layout). The launch keys (`LAUNCH_KEYS`)
    are left out; keys ``saved`` lacks count as their defaults."""
    saved = utils.merge(utils.load_yaml_with_bases(CONFIG_DEFAULTS), upgrade_layout(saved, warn=False))
    return [f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in _differences(saved, config)
            if key.split(".")[0] not in LAUNCH_KEYS]


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
