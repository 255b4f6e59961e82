"""Builders: the captioner ``model.family`` names, its optimizer, and the learning-rate schedule."""
from __future__ import annotations

import functools

import torch

import utils
from models import CAPTIONER_FAMILIES, CaptionModel, lora
from models.checkpoint import load_checkpoint_file


def build_captioner(config: dict, device: torch.device, pretrained: str | None = None,
                    load_weights: bool = True) -> CaptionModel:
    """The ``model.family`` captioner with ``pretrained`` (default: ``model.pretrained``) loaded, on ``device``.

    ``load_weights=False`` skips the pretrained weights (a resumed run overwrites them anyway).

    With ``model.lora`` freezing the base (models/lora.py), the base always comes from ``model.pretrained`` (a
    resumed run's checkpoint holds only what trains) and the adapters are injected; ``pretrained`` then is either
    a checkpoint of that same LoRA setup (evaluation, export: its trained part is loaded on top) or other starting
    weights for the base. A LoRA run's checkpoint as the ``pretrained`` of a run without LoRA gives its base with
    its adapters merged.
    """
    model_config = config["model"]
    lora.check_config(model_config)
    captioner = CAPTIONER_FAMILIES[model_config["family"]].from_config(model_config)  # the one place it is chosen
    saved = lora.partial_checkpoint_config(pretrained)
    if saved is not None and _same_adapter_setup(saved, model_config):
        lora.attach(captioner, model_config)
        state_dict, _, metadata = load_checkpoint_file(lora.resolve_source(pretrained))
        lora.load_checkpoint_state(captioner.model, state_dict, metadata, str(pretrained))
    elif lora.freezes_base(model_config):
        lora.attach(captioner, model_config, base=pretrained)
    elif (source := pretrained or model_config["pretrained"]) and load_weights:
        lora.load_base(captioner, source, model_config)
    captioner.to(device)
    if device.type != "cuda":
        # Reduced-precision weights (model.vlm.dtype: bfloat16) are a CUDA setting: a CPU run, also one on a CUDA
        # host (device: cpu), trains float32 weights, as every family does without CUDA.
        captioner.float()
    if model_config["compile"]:
        captioner.compile_parts(model_config["compile"], mode=model_config["compile_mode"])
    return captioner


def build_optimizer(captioner: CaptionModel, config: dict) -> torch.optim.Optimizer:
    """AdamW over the captioner's ``parameter_groups`` (trainable parameters only); fused on CUDA.

    ``train.decay_all_parameters`` (default true) puts ``train.weight_decay`` on every trainable parameter, as
    BLIP's train_caption.py does; false leaves norms, biases and embeddings undecayed (models/parameter_groups.py).
    The optimizer also reads a state saved by a single-group AdamW over every parameter, frozen ones included
    (``_regroup_single_group_state``), so such checkpoints still resume.
    """
    train_config = config["train"]
    groups = captioner.parameter_groups(train_config["weight_decay"],
                                        decay_all=train_config.get("decay_all_parameters", True))
    # A family's groups hold trainable parameters only; filtered here too, so that a frozen base (model.lora) or a
    # family that forgets never reaches the optimiser (AdamW would keep moments for them; weight decay would move them).
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    groups = [group for group in groups if group["params"]]
    fused = captioner.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=train_config["lr"], weight_decay=train_config["weight_decay"],
                                  fused=fused)
    optimizer.register_load_state_dict_pre_hook(functools.partial(_regroup_single_group_state,
                                                                  list(captioner.parameters())))
    return optimizer


def _regroup_single_group_state(every_parameter: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                                state_dict: dict) -> dict | None:
    """``load_state_dict`` pre-hook: a state saved by ``AdamW(captioner.parameters())`` -> this optimizer's groups.

    Such a state has one group indexing every parameter in ``parameters()`` order, frozen ones included; when this
    optimizer's groups differ (frozen parameters left out, or norms and biases in a group without decay), each
    parameter's moments move to its index here, and each group keeps the saved hyperparameters with its own
    weight decay. Any other mismatch is left to torch's own error.
    """
    saved, current = state_dict["param_groups"], optimizer.param_groups
    if [len(group["params"]) for group in saved] == [len(group["params"]) for group in current]:
        return None
    if len(saved) != 1 or len(saved[0]["params"]) != len(every_parameter):
        return None
    saved_index = {id(p): index for p, index in zip(every_parameter, saved[0]["params"])}
    state, groups, index = {}, [], 0
    for group in current:
        indices = []
        for param in group["params"]:
            old = saved_index[id(param)]
            if old in state_dict["state"]:
                state[index] = state_dict["state"][old]
            indices.append(index)
            index += 1
        groups.append({**saved[0], "weight_decay": group["weight_decay"], "params": indices})
    return {"state": state, "param_groups": groups}


def _same_adapter_setup(saved: dict, model_config: dict) -> bool:
    """Whether a frozen-base checkpoint's ``model`` section has this section's base and adapters, so that its
    trained part loads on top of this captioner's."""
    return (lora.lora_settings(saved) == lora.lora_settings(model_config)
            and str(saved.get("pretrained")) == str(model_config.get("pretrained")))


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
