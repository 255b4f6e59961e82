"""One training epoch: the optimizer steps, gradient clipping, the non-finite guard, logging and the periodic
checkpoint. What a batch contributes to the loss is the step's business (steps.py)."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import utils
from models import CaptionModel

from . import checkpoints, steps
from .builders import learning_rate

logger = logging.getLogger("smile_blip")


def autocast_context(config: dict, device: torch.device):
    """bf16 autocast on CUDA when the config's ``amp`` is on (training and generation alike), else nothing."""
    if device.type == "cuda" and config["amp"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()



class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the batch's image ids."""


def train_one_epoch(model, captioner: CaptionModel, loader, step, optimizer, config: dict,
                    progress: checkpoints.TrainProgress, log: utils.JsonlLogger, device: torch.device,
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
    checkpoints.restore_rng_from(progress)  # ... so a mid-epoch resume restores the RNG after that draw
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


def _handle_nonfinite(config: dict, progress: checkpoints.TrainProgress, image_ids: torch.Tensor,
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
        f"checkpoint is {Path(config['output_dir']) / checkpoints.LATEST} (resume with --resume). Set "
        "train.on_nonfinite: skip to skip such steps instead."
    )
