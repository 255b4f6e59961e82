"""Builders: the captioner ``model.family`` names, its optimizer, and the learning-rate schedule."""
from __future__ import annotations

import torch

import utils
from models import CAPTIONER_FAMILIES, CaptionModel


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
