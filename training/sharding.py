"""How the captioner is spread over the processes of a run: DDP (``train.sharding: ddp``, the default) or
PyTorch's FSDP2 (``train.sharding: fsdp``, ``torch.distributed.fsdp.fully_shard``).

DDP keeps a whole copy of the model, its gradients and AdamW's two moments on every process: about 16 bytes per
fp32 parameter. FSDP2 keeps 1/world_size of each on a process and all-gathers one block's parameters just before
that block runs (and again in backward), so a model that does not fit one device trains over several.

Wrapping (``shard_captioner``): every repeated block is its own FSDP unit (the children of each ``nn.ModuleList``
whose children all share one class: BERT's ``encoder.layer``, ViT's ``encoder.layers``, GPT-2's ``h``; a family may
name its own with a ``fsdp_blocks()`` method), then the captioner itself is the root unit. The root is the
captioner rather than its ``.model`` because the captioner's ``forward`` (the entry the training step calls)
reaches parameters outside any block directly, e.g. the output head's weight in the SMILE-aware head; the root's
forward hook gathers exactly those. A family may also name modules to keep whole on every process with a
``fsdp_replicated()`` method (the prefix family's frozen CLIP tower, which the feature cache runs on one rank
outside ``forward``): FSDP ignores their parameters (plain tensors, never all-gathered), so they must be frozen.

Generation runs with every parameter gathered (``full_parameters``): each rank generates its own images, for its
own number of decoding steps and batches, so per-block all-gathers would be issued a different number of times on
different ranks and hang. Gathering once before and freeing after issues the same collectives on every rank. So
``full_parameters`` must enclose a whole loop whose number of calls differs across ranks (the trainer wraps
validation and the test split in it); the generation methods (``generate``, SCST's ``sample_ids``) also gather
on their own when called outside it, which suits a call every rank makes equally often (SCST: one per step).
The cost: generation holds the whole model (parameters only, not gradients or optimizer moments) per device.

Checkpoints (``gather_full_state`` / ``load_full_model_state``, ``load_full_optimizer_state``): gathered on rank 0 with
``torch.distributed.checkpoint.state_dict`` (full state dict, offloaded to CPU) and written in this repository's
one-file format (training/checkpoints.py), so a checkpoint saved under FSDP loads into one process
(``Captioner.from_pretrained``, eval_caption.py) and resumes under FSDP (broadcast from rank 0) or DDP, and a DDP or
one-process checkpoint resumes under FSDP; tests/training/test_sharding_families.py checks each direction against an
uninterrupted one-process run for the prefix and vlm families.

DDP (``wrap_for_training``): a family whose loss leaves some trained parameters without a gradient (the vlm family:
LLaVA's unused CLIP ``post_layernorm``) sets ``ddp_find_unused_parameters = True``; FSDP2 needs no such flag.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import utils
from models import lora

logger = logging.getLogger("smile_blip")

# Captioner methods that decode a rank-dependent number of steps outside ``forward`` (see the module docstring).
GENERATION_METHODS = ("generate", "generate_ids", "sample_ids")


def wrap_for_training(captioner: nn.Module, config: dict, device: torch.device) -> nn.Module:
    """The module the training step runs forward and backward on, per ``train.sharding``.

    One process: ``captioner`` itself (nothing to shard; ``fsdp`` says so in the log). ``ddp``: a
    ``DistributedDataParallel`` around it. ``fsdp``: ``captioner`` sharded in place (``shard_captioner``) and
    returned; build the optimizer after this call, over the sharded parameters.
    """
    mode = config["train"]["sharding"]
    if not utils.is_distributed():
        if mode == "fsdp":
            logger.info("train.sharding: fsdp with one process: nothing to shard, the model is trained whole")
        return captioner
    if mode == "ddp":
        # A family whose loss leaves some trained parameters without a gradient says so (the vlm family): DDP then
        # finds them each step (a pass over the autograd graph) instead of waiting for their gradients.
        return DistributedDataParallel(captioner, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=getattr(captioner, "ddp_find_unused_parameters", False))
    check_fsdp_config(config)
    shard_captioner(captioner, device)
    return captioner


def check_fsdp_config(config: dict) -> None:
    """Refuse combinations FSDP does not support here, naming the keys (utils.ConfigError)."""
    if lora.freezes_base(config["model"]) or lora.uses_adapters(config["model"]):
        # The frozen-base checkpoint (models/lora.py) selects its tensors from the live module; gathering a
        # sharded peft model's adapters into that layout is not implemented.
        raise utils.ConfigError("train.sharding: fsdp does not support model.lora: LoRA already keeps the trained "
                                "part small; use train.sharding: ddp with model.lora, or drop model.lora")
    if config["model"]["compile"]:
        raise utils.ConfigError(f"train.sharding: fsdp does not support model.compile: {config['model']['compile']} "
                                "(compiled parts are wrapped before sharding); set model.compile: null")


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The children of every outermost ``nn.ModuleList`` whose children all have one class (the transformer layers
    of each tower), in module order."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for submodule in module.modules():
        if id(submodule) in inside:
            continue
        children = list(submodule.children()) if isinstance(submodule, nn.ModuleList) else []
        if children and len({type(child) for child in children}) == 1:
            blocks.extend(children)
            inside.update(id(m) for child in children for m in child.modules())
    return blocks


def _check_no_shared_parameters(module: nn.Module, blocks: list[nn.Module]) -> None:
    """A parameter both in a block and outside every block (a tied weight) cannot live in two FSDP units."""
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    block_modules = {id(m) for block in blocks for m in block.modules()}
    shared = [f"{name}.{param_name}".lstrip(".") for name, submodule in module.named_modules(remove_duplicate=False)
              if id(submodule) not in block_modules
              for param_name, param in submodule.named_parameters(recurse=False) if id(param) in in_blocks]
    if shared:
        raise ValueError(f"train.sharding: fsdp: parameters {shared[:5]} are shared between a repeated block and "
                         "the rest of the model; give the family a fsdp_blocks() method that keeps them in one unit")


def shard_captioner(captioner: nn.Module, device: torch.device) -> None:
    """Apply FSDP2 in place over all processes: each repeated block of ``captioner.model``, then ``captioner``.

    Afterwards the parameters are DTensors holding this rank's shard (dim 0), the captioner's ``forward`` gathers
    and frees them block by block, and its generation methods run with all of them gathered (module docstring).
    """
    mesh = init_device_mesh(device.type, (utils.get_world_size(),))
    replicated = replicated_parameters(captioner)
    # A family may name its blocks (a captioner method); else the generic search over its transformers model.
    blocks = list(captioner.fsdp_blocks()) if hasattr(captioner, "fsdp_blocks") else repeated_blocks(captioner.model)
    blocks = _outside(blocks, replicated)
    _check_no_shared_parameters(captioner, blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(captioner, mesh=mesh, ignored_params=replicated or None)
    # FSDP initialises its units on the root's first forward; a block that runs first (SCST samples, or validation
    # generates, before any training forward) would make itself a root. Initialise from the real root now.
    captioner._get_fsdp_state()._lazy_init()
    for name in GENERATION_METHODS:
        method = getattr(captioner, name, None)
        if method is not None:
            setattr(captioner, name, _with_full_parameters(captioner, method))
    count = sum(p.numel() for p in captioner.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in captioner.parameters())
    logger.info("train.sharding: fsdp over %d processes: %d blocks + the root, %d parameters (%d kept whole), %d "
                "per process", utils.get_world_size(), len(blocks), count, sum(p.numel() for p in replicated), local)


def replicated_parameters(captioner: nn.Module) -> set[nn.Parameter]:
    """The parameters of the modules the family keeps whole on every process (its ``fsdp_replicated()``, if any).

    FSDP ignores them: no sharding and no gradient reduction, so they must be frozen (a trained one would drift
    apart on the ranks); a ValueError names any that is not.
    """
    modules = list(captioner.fsdp_replicated()) if hasattr(captioner, "fsdp_replicated") else []
    parameters = {p for module in modules for p in module.parameters()}
    ids = {id(p) for p in parameters}
    trained = [name for name, p in captioner.named_parameters() if id(p) in ids and p.requires_grad]
    if trained:
        raise ValueError(f"train.sharding: fsdp: {type(captioner).__name__}.fsdp_replicated() names trained "
                         f"parameters {trained[:5]}; only frozen modules can be kept whole on every process")
    return parameters


def _outside(blocks: list[nn.Module], replicated: set[nn.Parameter]) -> list[nn.Module]:
    """``blocks`` less those inside a replicated module; a block with only some of its parameters replicated would
    be half in two units, a ValueError."""
    ids = {id(p) for p in replicated}
    kept = []
    for block in blocks:
        inside = [id(p) in ids for p in block.parameters()]
        if inside and all(inside):
            continue
        if any(inside):
            raise ValueError(f"train.sharding: fsdp: {type(block).__name__} is partly in a module kept whole "
                             "(fsdp_replicated()); keep all of a block whole or none")
        kept.append(block)
    return kept


def _with_full_parameters(captioner: nn.Module, method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        with full_parameters(captioner):
            return method(*args, **kwargs)
    return run


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a module inside it) is FSDP-sharded."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextmanager
def full_parameters(model: nn.Module):
    """Every FSDP unit in ``model`` gathered for the block (collective: every rank enters it), freed after.

    Inside, forward passes issue no collectives, so ranks may run different numbers of them (generation). A
    no-op for a model that is not sharded, and when already inside (generate calling sample_ids).
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or getattr(model, "_full_parameters_active", False):
        yield
        return
    root = model if isinstance(model, FSDPModule) else None
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    # fully_shard marks every module it manages, and transformers' generate then decodes in lockstep over the
    # ranks (synced_gpus: an all-reduce per token), which hangs when the ranks make different numbers of generate
    # calls. With everything gathered no lockstep is needed; only torch.compile reads the mark otherwise.
    marked = [m for m in model.modules() if getattr(m, "_is_fsdp_managed_module", False)]
    for module in marked:
        module._is_fsdp_managed_module = False
    object.__setattr__(model, "_full_parameters_active", True)
    try:
        yield
    finally:
        object.__setattr__(model, "_full_parameters_active", False)
        for module in marked:
            module._is_fsdp_managed_module = True
        for unit in units:
            unit.reshard()
            if unit is not root:  # FSDP keeps the root gathered after forward anyway (backward needs it first)
                unit.set_reshard_after_forward(True, recurse=False)


# --------------------------------------------------------------------------------------------------------------
# State dicts: gathered on rank 0, broadcast from rank 0
# --------------------------------------------------------------------------------------------------------------

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Not strict: torch's loader then also asks for the second name of a tied weight (the BLIP head's decoder weight
# is the word embedding), which it never returns; load_full_model_state checks the keys itself.
_BROADCAST = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (tied weights), first name first, in ``state_dict`` order.
    ``get_model_state_dict`` returns only the first of each; ``model.state_dict()`` (what a DDP or one-process
    checkpoint holds) returns all of them."""
    groups: dict[int, list[str]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified name of each optimizer parameter, in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [index for index, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
               if id(p) not in names]
    if missing:
        raise ValueError(f"optimizer parameters {missing[:5]} are not parameters of the module given")
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
                      ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Collective. ``(model state dict, optimizer state dict)`` of a sharded ``model``, whole and on CPU on rank 0
    (empty elsewhere), in the layouts ``model.state_dict()`` and ``optimizer.state_dict()`` have in one process
    (optimizer state numbered by parameter position, not keyed by name), so that checkpoints.py writes them as
    it writes a DDP run's."""
    model_state = get_model_state_dict(model, options=_GATHER)
    # Each tied tensor under exactly the names model.state_dict() gives it in one process: all of them (BLIP,
    # GPT-2; the file writer drops the known second names), or the first only where a state-dict hook drops the
    # rest (a tied VLM, models/vlm_captioner.py), which safetensors would refuse as aliases. On every rank, so that
    # no FSDP hook runs on one rank only; the names of the local shards, nothing is gathered.
    one_process = set(model.state_dict())
    if utils.is_main():
        for names in _tied_names(model):
            value = next(model_state[name] for name in names if name in model_state)
            model_state.update({name: value for name in names if name in one_process})
            for name in names:
                if name not in one_process:
                    model_state.pop(name, None)
    if optimizer is None:
        return model_state, None
    by_name = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not utils.is_main():
        return model_state, {}
    index = {name: position for position, name in enumerate(_parameter_names(model, optimizer))}
    state = {index[name]: values for name, values in by_name["state"].items()}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return model_state, {"state": state, "param_groups": groups}


def load_full_model_state(model: nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    """Collective. Load a whole state dict (rank 0's; the other ranks' is ignored) into a sharded ``model``: rank 0
    broadcasts, every rank keeps its shard. Keys must be ``model.state_dict()``'s, a tied weight under any one of
    its names (checkpoint files store it once; models/checkpoint.py); checked on every rank (each has read the same
    file), else a ValueError names the difference."""
    tied = _tied_names(model)
    seconds = {name for names in tied for name in names[1:]}
    state = {name: value for name, value in model_state.items() if name not in seconds}
    for names in tied:  # the first name, which torch's loader asks for
        present = [name for name in names if name in model_state]
        if present:
            state[names[0]] = model_state[present[0]]
    expected = set(model.state_dict()) - seconds
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"the checkpoint does not match this model: missing keys {missing[:10]}, unexpected keys "
                         f"{unexpected[:10]}")
    set_model_state_dict(model, state if utils.is_main() else {}, options=_BROADCAST)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Collective. Load rank 0's ``optimizer_state``, in ``optimizer.state_dict()``'s one-process layout (what
    ``gather_full_state`` returns and checkpoints.py reads back), into the optimizer of a sharded ``model``."""
    by_name = {}
    if utils.is_main():
        names = _parameter_names(model, optimizer)
        by_name = {"state": {names[int(i)]: values for i, values in optimizer_state["state"].items()},
                   "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                    for group in optimizer_state["param_groups"]]}
    with_state = set(utils.broadcast_object(sorted(by_name["state"]) if utils.is_main() else None))
    set_optimizer_state_dict(model, optimizer, by_name, options=_BROADCAST)
    # torch's loader first steps the optimizer with zero gradients so that every parameter has a state (AdamW: step
    # 1, zero moments). A parameter the checkpoint has no state for (it never had a gradient, e.g. LLaVA's unused
    # CLIP post_layernorm) keeps none, as optimizer.load_state_dict leaves it in one process; else its first real
    # update would be bias-corrected as a second step, and the next checkpoint would hold moments one process lacks.
    names = {id(p): name for name, p in model.named_parameters()}
    for parameter in [p for p in optimizer.state if names.get(id(p)) not in with_state]:
        del optimizer.state[parameter]
