"""The run's configuration: defaults <- YAML file <- ``--opt`` overrides, validated, and written into the run.

``load_config`` checks every key's name and type against configs/default.yaml and every enumerated value, so a typo
fails before anything is built. ``prepare_output_dir`` records the resolved config beside the run's outputs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hub
import utils
from data.datasets import AnnotationError, ImageLoadError
from metrics._common import MetricInputError
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
               "model.text_padding": TEXT_PADDINGS, "model.family": tuple(CAPTIONER_FAMILIES),
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
