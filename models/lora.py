"""LoRA through peft for a captioner of any family (``model.lora``): adapters on the family's ``.model``, only
the trained parameters in checkpoints, and a merged model at export.

What a LoRA run is made of::

    base     = family.from_config(model) + model.pretrained          frozen, rebuilt from its source every time
    adapters = peft LoRA layers injected into captioner.model         W x + (alpha / r) * B A x,  B = 0 at start
    trained  = adapters (+ the projector with train: adapter+projector) -> the only tensors a checkpoint holds

``apply_lora`` injects the adapters with peft's ``inject_adapter_in_model``, in place: ``captioner.model`` keeps its
class, so the family's own ``forward``, ``generate`` and SMILE's ``HeadFeatures`` (which read the LM head's weight,
never adapted) run unchanged, and state-dict names stay the model's own with ``.base_layer`` / ``.lora_A.default``
inserted at adapted layers (``...attention.self.query.lora_A.default.weight``).

``model.lora.train`` chooses what trains (``TRAIN_MODES``): the adapters alone, the adapters and the projector
between image and text (``PROJECTOR_NAMES``), the projector alone (no adapters), or everything the family trains
(``full``: no adapters, the family's own rules). The first three "freeze the base": checkpoints then hold only the
trainable parameters and the buffers (``trainable_state_dict``), and every consumer (resume, evaluation,
``Captioner.from_pretrained``, export, another run's ``model.pretrained``) rebuilds the base from the saved config's
``model.pretrained`` first (``attach``, ``load_base``). This is why a frozen base needs a ``model.pretrained``: a
random base could not be rebuilt.

Export merges (``merged_copy``): each LoRA layer's ``W + (alpha / r) B A`` is folded into a copy of its base
layer and the layer is replaced by it, which is what peft's ``merge_and_unload`` does for a ``PeftModel``; the
result is the family's stock model, so ``export_directory`` writes what stock transformers loads, without peft.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import types
from pathlib import Path

import torch
from torch import nn

import utils

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "pip install -r requirements.txt"
# What trains besides (or instead of) the adapters. null in the config: "adapter" when r is set, else "full".
TRAIN_MODES = ("adapter", "adapter+projector", "projector", "full")
ADAPTER_MODES = ("adapter", "adapter+projector")
FROZEN_BASE_MODES = ("adapter", "adapter+projector", "projector")
# Leaf names of the module that maps image features into the language model's input space: the prefix LM's
# mapper, LLaVA / PaliGemma / Florence-2's multi_modal_projector, Idefics3 / SmolVLM's connector, Qwen2-VL's
# visual.merger. (Not "visual_projection": CLIP's tower has one, part of the frozen tower.)
PROJECTOR_NAMES = ("clip_project", "multi_modal_projector", "connector", "mm_projector", "merger")
# Path components that mark an image tower: default targets stay in the language model.
VISION_PARTS = {"vision", "vision_model", "vision_tower", "visual", "vision_encoder", "image_encoder"}
_MARK = "_smile_lora"  # attribute on captioner.model: {"train": mode, "targets": [...]} once attach() ran


# ----------------------------------------------------------------------------------------------------- config


def lora_settings(model_config: dict) -> dict:
    """``model.lora`` with defaults filled in: ``r`` (0 = off), ``alpha`` (default 2 r), ``dropout``,
    ``target_modules`` (None = the model's default) and ``train`` (resolved, one of ``TRAIN_MODES``).
    A checkpoint saved before LoRA existed has no section: LoRA off."""
    section = dict(model_config.get("lora") or {})
    rank = section.get("r") or 0
    train = section.get("train") or ("adapter" if rank else "full")
    alpha = section.get("alpha")
    return {"r": rank, "alpha": 2 * rank if alpha is None else alpha, "dropout": section.get("dropout") or 0.0,
            "target_modules": section.get("target_modules"), "train": train}


def freezes_base(model_config: dict) -> bool:
    """Whether this ``model`` section trains only part of the model, so that its checkpoints hold only that part."""
    return lora_settings(model_config)["train"] in FROZEN_BASE_MODES


def uses_adapters(model_config: dict) -> bool:
    return lora_settings(model_config)["train"] in ADAPTER_MODES


def check_config(model_config: dict) -> None:
    """Reject a bad ``model.lora`` before anything is built (utils.ConfigError naming the key and value): types,
    a ``train`` that contradicts ``r``, peft missing, or a frozen base without ``model.pretrained``."""
    section = model_config.get("lora") or {}
    rank, alpha, dropout = section.get("r"), section.get("alpha"), section.get("dropout")
    targets, train = section.get("target_modules"), section.get("train")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise utils.ConfigError(f"model.lora.r must be a positive integer (the adapter rank), or null/0 for no "
                                f"LoRA, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise utils.ConfigError(f"model.lora.alpha must be a positive number (the adapter's scale is alpha / r), "
                                f"or null for 2 * r, got {alpha!r}")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise utils.ConfigError(f"model.lora.dropout must be a number in [0, 1), got {dropout!r}")
    if targets is not None and not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise utils.ConfigError(f"model.lora.target_modules must be null (the model's default), a list of module "
                                f"names (each matches a module whose name ends with it) or one regular expression "
                                f"(matched against whole module names), got {targets!r}")
    if train is not None and train not in TRAIN_MODES:
        raise utils.ConfigError(f"model.lora.train must be one of {list(TRAIN_MODES)} or null, got {train!r}")
    if rank and train in ("projector", "full"):
        raise utils.ConfigError(f"model.lora.train: {train} trains no adapter, but model.lora.r is {rank}: set "
                                f"model.lora.r to null, or train to adapter or adapter+projector")
    if not rank and train in ADAPTER_MODES:
        raise utils.ConfigError(f"model.lora.train: {train} needs adapters: set model.lora.r (e.g. 8)")
    if rank:
        require_peft()
    if freezes_base(model_config) and not model_config.get("pretrained"):
        raise utils.ConfigError(
            f"model.lora.train: {lora_settings(model_config)['train']} freezes the base model and saves only what "
            "trains, so the base is rebuilt from model.pretrained at every resume and load: set model.pretrained "
            "(a random base could not be rebuilt)")


def require_peft():
    """The peft package, or one ConfigError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise utils.ConfigError(f"model.lora.r is set, which needs the peft package: {INSTALL_HINT}") from None
    return peft


# --------------------------------------------------------------------------------------------------- targets


def _linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every layer LoRA can adapt as a low-rank update of a weight matrix: ``nn.Linear`` and transformers'
    ``Conv1D`` (GPT-2's transposed linear), by full module name; adapter parts themselves are left out."""
    from transformers.pytorch_utils import Conv1D

    return {name: layer for name, layer in module.named_modules()
            if isinstance(layer, (nn.Linear, Conv1D)) and ".lora_" not in f".{name}"}


def _output_heads(module: nn.Module) -> set[int]:
    """ids of the LM heads (``get_output_embeddings`` of every transformers model inside ``module``) and of every
    layer whose weight is an embedding table (a tied head). SMILE's ``HeadFeatures`` reads a head's ``weight``
    directly, which an adapter on the head would bypass, so heads are never adapted."""
    heads, tables = set(), {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for sub in module.modules():
        getter = getattr(sub, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    heads |= {id(m) for m in module.modules() if id(getattr(m, "weight", None)) in tables
              and not isinstance(m, nn.Embedding)}
    return heads


def _in_vision(name: str) -> bool:
    return any(part in VISION_PARTS for part in name.split("."))


# Default targets, tried in order on the actual model's module names; the first rule that matches any linear layer
# wins. (description, predicate over the full module name.)
DEFAULT_TARGET_RULES = (
    # BLIP: every linear layer of the text decoder's blocks: self- and cross-attention query/key/value and their
    # output dense, and the feed-forward dense layers.
    ("BLIP text decoder query/key/value/dense",
     lambda name: re.search(r"(^|\.)text_decoder\.bert\.encoder\.layer\.\d+\.", name) is not None),
    # GPT-2 (the prefix LM, vision-encoder-decoder's decoder): attention c_attn/c_proj and the MLP's c_proj.
    ("GPT-2 c_attn/c_proj", lambda name: name.rsplit(".", 1)[-1] in ("c_attn", "c_proj")),
    # Llama-, Qwen-, Gemma-, Mistral-shaped language models of transformers VLMs (LLaVA, SmolVLM, Qwen2-VL,
    # PaliGemma): the attention projections, outside the image tower.
    ("language-model q_proj/k_proj/v_proj/o_proj",
     lambda name: name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") and not _in_vision(name)),
    # BERT-shaped text models (GIT): query/key/value outside the image tower.
    ("text query/key/value",
     lambda name: name.rsplit(".", 1)[-1] in ("query", "key", "value") and not _in_vision(name)),
)


def _short_name(name: str) -> str:
    """A module's leaf name, with its parent's when the leaf is an index (``mlp.0``), as a target suffix."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def available_layer_names(module: nn.Module) -> list[str]:
    """The linear layers of ``module`` LoRA may adapt (LM heads left out), shortened to their unique leaf names
    (``['c_attn', 'fc1', 'mlp.0', 'query']``): each is a valid ``model.lora.target_modules`` entry."""
    heads = _output_heads(module)
    return sorted({_short_name(name) for name, layer in _linear_layers(module).items() if id(layer) not in heads})


def default_target_modules(module: nn.Module) -> tuple[list[str], str]:
    """(full module names, rule description) of the default LoRA targets of ``module`` (``DEFAULT_TARGET_RULES``).

    Raises utils.ConfigError listing the available linear layers when no rule matches (an architecture this file
    does not know: give ``model.lora.target_modules``)."""
    heads = _output_heads(module)
    layers = {name: layer for name, layer in _linear_layers(module).items() if id(layer) not in heads}
    for description, matches in DEFAULT_TARGET_RULES:
        names = [name for name in layers if matches(name)]
        if names:
            return names, description
    raise utils.ConfigError(
        f"model.lora.target_modules is null, but this model ({type(module).__name__}) matches no default (BLIP's "
        f"text decoder, GPT-2's c_attn/c_proj, a language model's q/k/v/o_proj, query/key/value): set "
        f"model.lora.target_modules to some of its linear layers: {available_layer_names(module)}")


# ------------------------------------------------------------------------------------------------ applying


def _projector_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters under a module whose leaf name is one of ``PROJECTOR_NAMES`` (the outermost such module)."""
    prefixes = [name for name, _ in module.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    prefixes = [p for p in prefixes if not any(p.startswith(other + ".") for other in prefixes)]
    return {name: param for name, param in module.named_parameters()
            if any(name.startswith(prefix + ".") for prefix in prefixes)}


def apply_lora(captioner: nn.Module, model_config: dict) -> list[str]:
    """Inject ``model.lora``'s adapters into ``captioner.model`` (in place) and set what trains; returns the
    adapted layers' names (empty for ``projector`` / ``full``).

    Call it after the base weights are loaded (``attach`` does both). Parameters that do not train get
    ``requires_grad = False``, so ``parameter_groups`` (which keeps trainable parameters only) hands the optimiser
    exactly the adapters (+ projector). The frozen base stays in the family's train/eval mode, as in peft.
    """
    settings = lora_settings(model_config)
    module, mode = captioner.model, settings["train"]
    if mode == "full":
        return []
    targets: list[str] = []
    if mode in ADAPTER_MODES:
        targets = _inject(module, settings)
    projector = _projector_parameters(module) if mode in ("adapter+projector", "projector") else {}
    if mode in ("adapter+projector", "projector") and not projector:
        raise utils.ConfigError(f"model.lora.train: {mode}, but this model ({type(module).__name__}) has no "
                                f"projector between image and text (a module named one of {list(PROJECTOR_NAMES)})")
    keep = set(projector) | {name for name, _ in module.named_parameters() if ".lora_" in name}
    for name, param in module.named_parameters():
        param.requires_grad_(name in keep)
    setattr(module, _MARK, {"train": mode, "targets": targets})
    if targets:
        # Export writes the merged model whatever the family: the family's own export_directory runs on a merged
        # copy (an instance attribute, so that copy.deepcopy rebinds it to the copy and merged_copy can drop it).
        captioner.export_directory = types.MethodType(_export_merged, captioner)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    logger.info("model.lora: train %s, %d adapted layer(s), %d of %d parameters trainable (%.2f%%)", mode,
                len(targets), trainable, total, 100 * trainable / max(total, 1))
    return targets


def _inject(module: nn.Module, settings: dict) -> list[str]:
    """peft's ``inject_adapter_in_model`` with the configured or default targets; returns the adapted names."""
    peft = require_peft()
    from transformers.pytorch_utils import Conv1D

    requested = settings["target_modules"]
    if requested is None:
        requested, description = default_target_modules(module)
        logger.info("model.lora.target_modules: %s (%d layers)", description, len(requested))
    layers = _linear_layers(module)
    first = next((layers[name] for name in requested if name in layers), None) if isinstance(requested, list) \
        else None
    config = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                             target_modules=requested, bias="none", fan_in_fan_out=isinstance(first, Conv1D))
    heads = _output_heads(module)
    try:
        peft.inject_adapter_in_model(config, module)
    except ValueError as error:
        if "not found" not in str(error) and "Target module" not in str(error):
            raise
        raise utils.ConfigError(f"model.lora.target_modules {settings['target_modules']!r} matches no layer LoRA "
                                f"can adapt in {type(module).__name__}; its linear layers: "
                                f"{available_layer_names(module)}") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [name for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]
    on_heads = [name for name, layer in module.named_modules()
                if isinstance(layer, BaseTunerLayer) and id(layer.get_base_layer()) in heads]
    if on_heads:
        raise utils.ConfigError(f"model.lora.target_modules {settings['target_modules']!r} includes the LM head "
                                f"{on_heads}: SMILE reads the head's weight directly, so the head cannot carry an "
                                f"adapter; leave it out")
    return adapted


def attach(captioner: nn.Module, model_config: dict, base: str | None = None) -> None:
    """Load the frozen base (``base``, default ``model.pretrained``; ``load_base``), then ``apply_lora``. A no-op
    for a ``model`` section that freezes nothing."""
    if not freezes_base(model_config):
        return
    load_base(captioner, base or model_config["pretrained"], model_config)
    apply_lora(captioner, model_config)


def is_partial(module: nn.Module) -> bool:
    """Whether ``module`` (a captioner's ``.model``) saves and loads only its trainable part."""
    return getattr(module, _MARK, None) is not None


# ------------------------------------------------------------------------------------------ state dicts


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``module.state_dict()`` a frozen-base checkpoint holds: trainable parameters (adapters, a
    trained projector) and persistent buffers (small, and a buffer that changes in training would otherwise be
    lost), by their state-dict names. The frozen weights are left out."""
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    buffers = {name for name, _ in module.named_buffers()}
    return {name: value for name, value in module.state_dict().items() if name in trainable or name in buffers}


def checkpoint_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint holds of ``module``: ``trainable_state_dict`` for a frozen base, else all."""
    return trainable_state_dict(module) if is_partial(module) else module.state_dict()


def load_trainable_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a frozen-base checkpoint's tensors into ``module`` (base already loaded, adapters already injected).

    The keys must be exactly ``trainable_state_dict``'s, with its shapes: anything else means another
    ``model.lora`` (rank, targets, train) or another model, and is a CheckpointError naming the keys."""
    from .checkpoint import CheckpointError

    expected = trainable_state_dict(module)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
                  for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source} does not match this model's trainable part (model.lora "
                              f"{getattr(module, _MARK)}): missing {missing[:10]}, unexpected {unexpected[:10]}, "
                              f"shape mismatches {mismatched[:10]}. Is it from a run with other model.lora settings?")
    module.load_state_dict(state_dict, strict=False)


def load_checkpoint_state(module: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict,
                          source: str):
    """Load a training checkpoint's model tensors into ``module``: the trainable part for a frozen base, else
    every weight strictly (``models.checkpoint.apply_state_dict``; returns its report). A frozen-base checkpoint
    loaded into a whole model is a CheckpointError saying how to build the model it fits."""
    from .checkpoint import CheckpointError, apply_state_dict

    if is_partial(module):
        load_trainable_state_dict(module, state_dict, source)
        return None
    if freezes_base((metadata.get("config") or {}).get("model") or {}):
        raise CheckpointError(f"{source} holds only what its run trained (model.lora), not the base model: build "
                              "the captioner from its config (training.build_captioner(config, device, "
                              "pretrained=CHECKPOINT), models.Captioner.from_pretrained) or export it merged "
                              "(scripts/export_hf.py)")
    return apply_state_dict(module, state_dict, source=source, strict=True)


# ------------------------------------------------------------------------------------------ sources


def partial_checkpoint_config(source: str | Path | None) -> dict | None:
    """The ``model`` section saved in ``source`` when it is this repository's checkpoint of a frozen-base run,
    else None (reads the file's header only)."""
    if not source:
        return None
    path = Path(str(source)).expanduser()
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    from safetensors import safe_open

    from .checkpoint import CHECKPOINT_FORMAT

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception:
        return None
    if header.get("format") != CHECKPOINT_FORMAT:
        return None
    model_config = (json.loads(header.get("metadata", "{}")).get("config") or {}).get("model") or {}
    return model_config if freezes_base(model_config) else None


def resolve_source(source: str) -> str:
    """A saved ``model.pretrained``: as given when it exists (or is a hub id / URL), else relative to the
    repository root when it exists there (a run's config names ``cache/toy_pretrain/...`` relative to it)."""
    path = Path(str(source)).expanduser()
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return str(source)


def load_base(captioner: nn.Module, source: str, model_config: dict) -> None:
    """Load ``source`` into ``captioner`` as whole weights: the family's ``load_pretrained``, or, for a
    frozen-base checkpoint (another LoRA run), that run's base and adapters rebuilt and merged (recursively, so a
    chain of LoRA runs works); ``captioner`` then starts where that run ended."""
    source = resolve_source(source)
    saved = partial_checkpoint_config(source)
    if saved is None:
        captioner.load_pretrained(source, model_config)
        return
    from .checkpoint import load_checkpoint_file
    from .families import captioner_family

    family = captioner_family(saved)
    built = family.inference_config(saved, Path(source))
    inner = family.from_config(built)
    attach(inner, built)
    state_dict, _, metadata = load_checkpoint_file(source)
    load_checkpoint_state(inner.model, state_dict, metadata, source)
    merged = merged_copy(inner, copy_first=False)
    try:
        captioner.model.load_state_dict(merged.model.state_dict())
    except RuntimeError as error:
        from .checkpoint import CheckpointError

        raise CheckpointError(f"{source}: the model it holds (base {saved.get('pretrained')} + its adapters) does "
                              f"not fit this model section: {error}") from None
    logger.info("loaded %s: its base %s with its adapters merged", source, saved.get("pretrained"))


# ------------------------------------------------------------------------------------------ merging


def merged_copy(captioner: nn.Module, copy_first: bool = True) -> nn.Module:
    """``captioner`` with every LoRA layer folded into its base layer (``W + (alpha / r) B A``) and replaced by
    it: the family's stock model again, with no peft module or attribute left. A deep copy unless
    ``copy_first`` is False (then in place); the original keeps its adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(captioner) if copy_first else captioner
    module = merged.model
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, BaseTunerLayer) or not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if getattr(parent, leaf, None) is not layer:
            continue  # inside an already replaced layer
        layer.merge(safe_merge=True)
        setattr(parent, leaf, layer.get_base_layer())
    for attribute in (_MARK, "peft_config"):
        if hasattr(module, attribute):
            delattr(module, attribute)
    merged.__dict__.pop("export_directory", None)
    return merged


def _export_merged(captioner: nn.Module, output_dir: str | Path) -> Path:
    """``export_directory`` of a captioner with adapters: the family's own export of ``merged_copy``."""
    return merged_copy(captioner).export_directory(output_dir)
