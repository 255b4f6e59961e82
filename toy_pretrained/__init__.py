"""Toy stand-ins for the pre-trained CLIP, GPT-2 and VLM, built from the toy dataset on first use and cached.

The toy "pre-trained" BLIP is a training recipe (configs/toy/pretrain.yaml); these are transformers models that
metrics/ and the captioner families load like hub models, so they live here, beside both: ``toy_pretrained.clip``,
``toy_pretrained.gpt2`` and ``toy_pretrained.vlm`` (a tiny LLaVA on the toy CLIP's vision tower, for
``model.family: vlm``) each train a tiny transformers model on the toy train split and save it, with its
tokenizer or processor, as an ordinary transformers directory. `ensure_for_config` is what the toy flow calls
(training.resolve_data_paths).
"""
from __future__ import annotations

from pathlib import Path

from toy_pretrained.clip import ToyClipRecipe, ensure_toy_clip
from toy_pretrained.gpt2 import ToyGpt2Recipe, ensure_toy_gpt2
from toy_pretrained.vlm import ToyVlmRecipe, ensure_toy_vlm

# What a captioner family's config_sources kind names -> the builder of its toy stand-in.
TOY_BUILDERS = {"clip": ensure_toy_clip, "gpt2": ensure_toy_gpt2, "vlm": ensure_toy_vlm}

def _needs(config: dict, reward_clip: str | None = None) -> dict[str, set]:
    """Which toy CLIP / GPT-2 / VLM folders this run will load: those of the ``eval.metrics`` groups that need a
    CLIP or a language model (metrics/registry.py), ``reward_clip`` (the SCST rewards' CLIP, which the trainer reads
    from the objective: training.steps.reward_clip_model), and the parts the captioner's family loads (its
    ``config_sources`` of kind "clip" / "gpt2" / "vlm", e.g. a prefix LM's parts or a VLM's model.pretrained)."""
    from metrics.registry import groups_needing

    groups = set(config["eval"]["metrics"])
    needs: dict[str, set] = {kind: set() for kind in TOY_BUILDERS}
    if groups & groups_needing("clip"):
        needs["clip"].add(config["eval"]["clip_model"])
    if reward_clip is not None:
        needs["clip"].add(reward_clip)
    if groups & groups_needing("lm"):
        needs["gpt2"].add(config["eval"]["ppl_model"])
    if "model" in config:
        from models.families import captioner_family

        for _, source, kind in captioner_family(config["model"]).config_sources(config["model"]):
            if kind in needs and isinstance(source, str):
                needs[kind].add(source)
    return needs


def built_on_first_use(config: dict, source: str | Path) -> bool:
    """Whether `ensure_for_config` builds (or checks) the folder ``source`` for this config: ``data.toy`` is set
    and the folder sits beside ``data.toy_root`` and is missing or holds a build of ours (a ``manifest.json``).
    Early checks (training.check_inputs) leave such a folder alone: it need not exist yet, and is no hub id."""
    if not config["data"]["toy"] or isinstance(source, dict):
        return False
    folder = Path(source).absolute()
    if folder.parent != Path(config["data"]["toy_root"]).absolute().parent:
        return False
    return not folder.exists() or (folder / "manifest.json").is_file()


def ensure_for_config(config: dict, reward_clip: str | None = None) -> list[Path]:
    """Build the toy CLIP / GPT-2 / VLM a toy run needs; returns the folders built or checked.

    A model is built (or its cache checked against the recipe) only when ``data.toy`` is set, the run needs it
    (an ``eval.metrics`` group, the SCST rewards' ``reward_clip``, a prefix captioner's ``model.prefix.clip`` /
    ``gpt2``, or a VLM captioner's ``model.pretrained``), and the folder named there sits beside ``data.toy_root`` (the toy cache, e.g. ``cache/toy_clip`` beside
    ``cache/toy``) and is missing or holds a build of ours (a ``manifest.json``). Hub ids and other local models
    are left alone.
    """
    if not config["data"]["toy"]:
        return []
    toy_root = Path(config["data"]["toy_root"]).absolute()
    built = []
    for kind, sources in _needs(config, reward_clip).items():
        for source in sorted(sources):
            if built_on_first_use(config, source):
                built.append(TOY_BUILDERS[kind](Path(source).absolute(), toy_root))
    return built


__all__ = ["TOY_BUILDERS", "ToyClipRecipe", "ToyGpt2Recipe", "ToyVlmRecipe", "built_on_first_use",
           "ensure_for_config", "ensure_toy_clip", "ensure_toy_gpt2", "ensure_toy_vlm"]
