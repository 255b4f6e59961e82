"""Optimizer parameter groups for a captioner of any family: trainable parameters only, weight decay where it
belongs. Each family's ``parameter_groups`` calls ``weight_decay_groups`` on itself after its own freezing."""
from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

# Layers whose weight multiplies the input: the only weights decayed unless every parameter is (GPT-2's
# projections are transformers' Conv1D, a transposed Linear).
DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


def weight_decay_groups(module: nn.Module, weight_decay: float, decay_all: bool = True) -> list[dict]:
    """AdamW parameter groups over ``module``'s trainable parameters (``requires_grad``), each exactly once, in
    ``module.parameters()`` order; frozen parameters are left out.

    ``decay_all`` (``train.decay_all_parameters``): one group, ``weight_decay`` on every trainable parameter, as
    BLIP's train_caption.py (``AdamW(model.parameters(), weight_decay=0.05)``) and ClipCap do. Otherwise two
    groups: ``weight_decay`` on the weights of ``DECAYED_LAYERS`` only, 0 on everything else: biases, norm scales,
    ``nn.Embedding`` tables (and an LM head tied to one), position and class embeddings and learned prefix
    constants (minGPT's rule; timm's is the same for ViTs, HF's Trainer also decays embedding tables). Decay pulls
    such parameters towards 0, which for a scale or an offset is no regularisation but a bias.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": trainable, "weight_decay": weight_decay}]
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(m.weight) for m in module.modules() if isinstance(m, DECAYED_LAYERS)} - embeddings
    decayed = [p for p in trainable if id(p) in matrices]
    undecayed = [p for p in trainable if id(p) not in matrices]
    return [group for group in ({"params": decayed, "weight_decay": weight_decay},
                                {"params": undecayed, "weight_decay": 0.0}) if group["params"]]
