"""Training checkpoints that survive preemption: everything a run needs to continue exactly where it stopped.

A checkpoint is one safetensors file (``models.checkpoint.save_checkpoint_file``): the model weights, the
optimizer's moment tensors, every rank's RNG states, and JSON metadata (config, epoch, step, batches done in the
epoch, best-so-far, counters). It is written to a temp file and renamed, so a kill never leaves half a file,
and loading it never unpickles anything.

Exactness: resuming restores the model, optimizer, schedule position (derived from epoch and step), sampler
position and each rank's torch/numpy/Python RNG, so a run with ``data.num_workers: 0`` ends with bit-identical
parameters to an uninterrupted one (tests/training/test_resume.py). With loader worker processes the data order is still
exact but the workers' augmentation randomness restarts from a new seed.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import utils
from models import lora
from models.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint_file

from . import sharding

logger = logging.getLogger("smile_blip")

LATEST = "checkpoint_latest.safetensors"
BEST = "checkpoint_best.safetensors"
RUN_FILES = (LATEST, BEST, "log.jsonl", "summary.json")


@dataclass
class TrainProgress:
    """Where a run stands. ``batches_done`` counts this epoch's batches already trained (0 at an epoch start).

    ``best_score``/``best_metrics``/``best_epoch`` describe ``checkpoint_best``: saved in every checkpoint, so a
    resumed run only replaces the best-so-far with a better epoch (the trainer re-scores ``best_metrics`` under
    the resumed run's ``eval.select_by``)."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_metrics: dict | None = None
    best_epoch: int | None = None  # the epoch checkpoint_best holds; -1: the starting weights (eval.keep_start)
    skipped_images: int = 0
    skipped_steps: int = 0
    world_size: int = 1
    extra: dict = field(default_factory=dict)


class RunExistsError(RuntimeError):
    """The output directory already holds a run and neither resume nor overwrite was asked for."""


# --------------------------------------------------------------------------------------------------------------
# Optimizer and RNG state <-> flat tensors + JSON
# --------------------------------------------------------------------------------------------------------------


def optimizer_to_flat(optimizer: torch.optim.Optimizer,
                      state_dict: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors under ``optimizer/<param index>/<name>``; param groups and non-tensor state as JSON.

    ``state_dict``: the whole state of a sharded run's optimizer (training/sharding.py), else the optimizer's own."""
    state_dict = optimizer.state_dict() if state_dict is None else state_dict
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    optimizer.load_state_dict(optimizer_state_from_flat(tensors, meta))


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """``optimizer_to_flat``'s output back to an ``optimizer.state_dict()``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples (AdamW's betas) into lists
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def capture_rng() -> dict:
    """This process's RNG states: torch CPU (and CUDA) as tensors, Python and numpy as JSON-able lists."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _rng_to_flat(states: list[dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = {}, []
    for rank, state in enumerate(states):
        tensors[f"rng/{rank}/torch"] = state["torch"]
        if "cuda" in state:
            tensors[f"rng/{rank}/cuda"] = state["cuda"]
        meta.append({"python": state["python"], "numpy": state["numpy"]})
    return tensors, meta


def _rng_from_flat(tensors: dict[str, torch.Tensor], meta: list[dict], rank: int) -> dict:
    state = {"torch": tensors[f"rng/{rank}/torch"], **meta[rank]}
    if f"rng/{rank}/cuda" in tensors:
        state["cuda"] = tensors[f"rng/{rank}/cuda"]
    return state


# --------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------


def save_training_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                             config: dict, progress: TrainProgress, metrics: dict | None = None) -> None:
    """Collective: every rank contributes its RNG state (and its shards, under FSDP); rank 0 writes the file
    atomically."""
    sharded = sharding.is_sharded(model)
    if sharded:  # gathered whole on rank 0, so the file is the same as a DDP run's (training/sharding.py)
        model_state, optimizer_state = sharding.gather_full_state(model, optimizer)
    rng_states = utils.all_gather_object(capture_rng())
    if not utils.is_main():
        return
    tensors, rng_meta = _rng_to_flat(rng_states)
    optimizer_meta = None
    if optimizer is not None:
        optimizer_tensors, optimizer_meta = optimizer_to_flat(optimizer, optimizer_state if sharded else None)
        tensors.update(optimizer_tensors)
    metadata = {"config": config, "progress": asdict(progress), "rng": rng_meta, "optimizer": optimizer_meta,
                "metrics": metrics}
    # A frozen base (model.lora) is rebuilt from model.pretrained: only the trainable part is saved.
    save_checkpoint_file(path, model_state if sharded else lora.checkpoint_state_dict(model), tensors, metadata)


def load_weights(path: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint's weights into ``model`` (exact match required); returns (other tensors, metadata)."""
    model_state, tensors, metadata = load_checkpoint_file(path)
    if sharding.is_sharded(model):  # collective: rank 0's copy is broadcast, each rank keeps its shard
        sharding.load_full_model_state(model, model_state)
        return tensors, metadata
    report = lora.load_checkpoint_state(model, model_state, metadata, str(path))  # the trainable part, or all
    if report is not None and report.unused:
        raise CheckpointError(f"{path} does not match this model: unexpected keys {report.unused[:10]}")
    return tensors, metadata


def load_training_checkpoint(path: Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> tuple[TrainProgress, dict]:
    """Restore model and optimizer from ``path``; returns the progress and the config the run was saved with (its
    own layout: training.config.config_changes compares it with a resumed run's). RNG is restored by
    ``restore_rng_from``."""
    tensors, metadata = load_weights(path, model)
    if metadata.get("optimizer") is None:
        raise RuntimeError(f"{path} holds no optimizer state: it is a weights-only checkpoint, not resumable")
    if sharding.is_sharded(model):
        sharding.load_full_optimizer_state(model, optimizer, optimizer_state_from_flat(tensors, metadata["optimizer"]))
    else:
        optimizer_from_flat(optimizer, tensors, metadata["optimizer"])
    progress = TrainProgress(**metadata["progress"])
    progress.extra["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    progress.extra["rng_meta"] = metadata["rng"]
    return progress, metadata.get("config") or {}


def restore_rng_from(progress: TrainProgress) -> None:
    """Give this rank back its RNG state from the checkpoint (once; a no-op for a fresh run)."""
    tensors, meta = progress.extra.pop("rng_tensors", None), progress.extra.pop("rng_meta", None)
    if tensors is None:
        return
    rank, world_size = utils.get_rank(), utils.get_world_size()
    if len(meta) != world_size:
        logger.warning("checkpoint was written by %d process(es), this run has %d: RNG streams are re-seeded, so "
                       "augmentation and dropout will not repeat the interrupted run", len(meta), world_size)
        return
    restore_rng(_rng_from_flat(tensors, meta, rank))


def check_output_dir(output_dir: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, or None.

    Never silently reuses a directory that holds a run: that takes ``resume`` (continue) or ``overwrite``
    (remove the old run's checkpoints and log, then start over).
    """
    latest = output_dir / LATEST
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    if resume and latest.exists():
        return latest
    if resume == "auto" and existing == ["log.jsonl"]:
        # A job killed after logging its first steps but before its first checkpoint: those steps are lost either
        # way, so the resubmitted command starts the run again (as resume: auto promises) on a fresh log.
        overwrite = True
    if resume is True:
        raise RunExistsError(
            f"--resume: no {LATEST} in {output_dir} to resume from (the run never reached its first checkpoint, or "
            "output_dir is wrong). For a job script that is resubmitted with the same command, use resume: auto "
            "(--opt resume=auto): it continues when there is a checkpoint and starts fresh when there is none."
        )
    if existing and not overwrite:
        raise RunExistsError(
            f"{output_dir} already holds a run ({', '.join(existing)}). Pass --resume (or resume: auto) to "
            "continue it, or --overwrite (overwrite: true) to start over, or choose another output_dir."
        )
    if existing and utils.is_main():
        logger.warning("overwrite: removing %s from %s", ", ".join(existing), output_dir)
        for name in existing:
            (output_dir / name).unlink()
    utils.barrier()
    return None
