"""The training flow: check, set up, build, resume, loop over epochs with validation and model selection, then
score the best checkpoint on test. ``run_training`` wires the other modules of this package together."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import utils
from models import CaptionModel

from . import checkpoints, sharding, steps
from .builders import build_captioner, build_optimizer
from .config import config_changes, load_config, prepare_output_dir
from .evaluation import _format_metrics, evaluate, evaluate_split, select_by, selection_score, validation_groups
from .inputs import build_toy_assets, check_inputs, fill_data_paths
from .loaders import build_eval_loader, build_train_loader
from .loop import train_one_epoch

logger = logging.getLogger("smile_blip")


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


def run_training(config: dict) -> tuple[dict, CaptionModel]:
    """Train per ``config``; returns (summary with the best validation and the test metrics, trained captioner).

    Joins the process group torchrun describes, if any. Resumes from ``output_dir/checkpoint_latest.safetensors``
    when ``resume`` says so (see checkpoints.py). With ``train.tensorboard``, rank 0 also writes every log
    record's numbers to ``output_dir/tensorboard``.

    Everything that needs no model is checked first (`check_inputs`, then the resume state), so a wrong path, an
    unreachable hub id or a ``--resume`` without a checkpoint fails in seconds; only then are the toy set and toy
    models built on first use (`resolve_data_paths`), the pre-training recipe run and the captioner built.
    """
    if config["train"]["tensorboard"]:
        utils.require_tensorboard()  # before any work, rather than after the model is built
    selection = select_by(config)  # a bad eval.select_by is a config error before anything is built
    output_dir = Path(config["output_dir"])
    # Before check_output_dir: an overwrite deletes the old run only once the new one can start.
    check_inputs(config, "train", resuming=bool(config["resume"]) and (output_dir / checkpoints.LATEST).exists())
    device = utils.init_distributed(config["device"], config["dist_timeout_minutes"])
    resume_from = checkpoints.check_output_dir(output_dir, config["resume"], config["overwrite"])
    fill_data_paths(config)
    prepare_output_dir(config, "config.yaml" if resume_from is None else "config_resumed.yaml")
    build_toy_assets(config)
    if resume_from is None:
        ensure_pretrained(config)
    # Same initial weights on every rank even without a checkpoint: seed the model build identically.
    torch.manual_seed(config["seed"])
    captioner = build_captioner(config, device, load_weights=resume_from is None)
    utils.seed_everything(config["seed"] + utils.get_rank())
    # train.sharding: DDP around the captioner, or FSDP2 in place; the optimizer comes after, over what it made.
    model = sharding.wrap_for_training(captioner, config, device)
    optimizer = build_optimizer(captioner, config)
    progress = checkpoints.TrainProgress(world_size=utils.get_world_size())
    if resume_from is not None:
        progress, saved_config = checkpoints.load_training_checkpoint(resume_from, captioner.model, optimizer)
        logger.info("resuming %s at epoch %d, batch %d (step %d)", resume_from, progress.epoch,
                    progress.batches_done, progress.global_step)
        changed = config_changes(saved_config, config)
        if changed and utils.is_main():  # e.g. another objective: the run goes on, but not as the run it began as
            logger.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))
    # After the weights are in place: a feature cache is keyed on the image tower this run trains with.
    train_loader, position, source = build_train_loader(config, captioner)
    step = steps.build_step(config, captioner, source, device)
    validate = config["train"]["validate"]
    val_loader, val_gt = build_eval_loader(config, "val", captioner.eval_transform()) if validate else (None, None)
    if resume_from is not None and progress.best_metrics is not None:
        # The best-so-far in this run's units, should eval.select_by have changed (config_changes warns then).
        progress.best_score = selection_score(progress.best_metrics, selection)
    if resume_from is not None and progress.batches_done == 0:
        checkpoints.restore_rng_from(progress)  # at an epoch boundary the next epoch's loader has not drawn yet
    log = utils.JsonlLogger(output_dir / "log.jsonl", _open_tensorboard(config, output_dir, resume_from, progress))
    logger.info("objective %s; %d training samples, %d steps per epoch, %d process(es)", step,
                len(source), len(train_loader), utils.get_world_size())

    def save_latest():
        checkpoints.save_training_checkpoint(output_dir / checkpoints.LATEST, captioner.model, optimizer,
                                               config, progress)

    def consider(epoch: int, metrics: dict | None) -> None:
        """Save ``checkpoint_best`` when ``epoch``'s validation beats the best-so-far (always without validation,
        where the last epoch is the one to keep)."""
        if metrics is not None:
            score = selection_score(metrics, selection)
            if score <= progress.best_score:
                return
            progress.best_score, progress.best_metrics = score, metrics
        progress.best_epoch = epoch
        checkpoints.save_training_checkpoint(output_dir / checkpoints.BEST, captioner.model, None, config, progress,
                                             metrics=metrics)

    max_steps = config["train"]["max_steps"]
    groups = validation_groups(selection)
    with log:  # closes the TensorBoard writer, flushing its last events, also when training fails
        if val_loader is not None and config["eval"]["keep_start"] and resume_from is None:
            # The starting weights are a candidate (epoch -1): fine-tuning never ends worse on val than it began.
            with sharding.full_parameters(captioner):  # FSDP: gathered once for the ranks' uneven generation loops
                # The captions are on disk before any metric runs (evaluate's results_path).
                _, metrics = evaluate(captioner, val_loader, val_gt, config, device, groups,
                                      results_path=output_dir / "val_epoch-1_results.json")
            log.log(kind="val", epoch=-1, step=0, **metrics)
            logger.info("start (epoch -1) val: %s", _format_metrics(metrics))
            consider(-1, metrics)
            save_latest()  # an interrupted run resumes with the start's score as its best-so-far
        while progress.epoch < config["train"]["epochs"] and not (max_steps and progress.global_step >= max_steps):
            epoch = progress.epoch
            position.set_epoch(epoch)
            position.skip_batches(progress.batches_done, config["train"]["batch_size"])
            stats = train_one_epoch(model, captioner, train_loader, step, optimizer, config, progress, log,
                                    device, save_latest)
            log.log(kind="epoch", epoch=epoch, step=progress.global_step, **stats)
            logger.info("epoch %d: loss %.4f, %.1f images/s", epoch, stats["loss"], stats["images_per_second"])
            metrics = None
            if val_loader is not None:
                with sharding.full_parameters(captioner):
                    _, metrics = evaluate(captioner, val_loader, val_gt, config, device, groups,
                                          results_path=output_dir / f"val_epoch{epoch}_results.json")
                log.log(kind="val", epoch=epoch, step=progress.global_step, **metrics)
                logger.info("epoch %d val: %s", epoch, _format_metrics(metrics))
            progress.epoch, progress.batches_done = epoch + 1, 0
            consider(epoch, metrics)
            save_latest()
        utils.barrier()

        if progress.best_epoch is not None:
            logger.info("checkpoint_best: epoch %d (%s %.4f)", progress.best_epoch, _selection_name(selection),
                        progress.best_score)
        summary = {"best_val": progress.best_metrics, "best_epoch": progress.best_epoch,
                   "select_by": selection, "steps": progress.global_step,
                   "skipped_images": progress.skipped_images, "skipped_steps": progress.skipped_steps}
        if config["train"]["test_after_training"] and config["data"]["test_file"]:
            checkpoints.load_weights(output_dir / checkpoints.BEST, captioner.model)
            try:
                with sharding.full_parameters(captioner):
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


def _selection_name(selection: dict[str, float]) -> str:
    """``{"CIDEr": 1.0, "Bleu_4": 1.0}`` -> ``"CIDEr + Bleu_4"`` (weights other than 1 shown)."""
    return " + ".join(key if weight == 1 else f"{weight:g} x {key}" for key, weight in selection.items())


def _open_tensorboard(config: dict, output_dir: Path, resume_from: Path | None,
                      progress: checkpoints.TrainProgress):
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
