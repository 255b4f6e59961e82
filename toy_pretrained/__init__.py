"""Toy stand-ins for the pre-trained CLIP and GPT-2, built from the toy dataset on first use and cached.

The toy "pre-trained" BLIP is a training recipe (configs/toy/pretrain.yaml); these two are not captioners and
not metrics, so they live here, beside both: ``toy_pretrained.clip`` and ``toy_pretrained.gpt2`` each train a
tiny transformers model on the toy train split and save it, with its tokenizer, as an ordinary transformers
directory that metrics/ loads like a hub model. `ensure_for_config` is what the toy flow calls
(training.resolve_data_paths).
"""
from __future__ import annotations

from pathlib import Path

from toy_pretrained.clip import ToyClipRecipe, ensure_toy_clip
from toy_pretrained.gpt2 import ToyGpt2Recipe, ensure_toy_gpt2

def _needs(config: dict, reward_clip: str | None = None) -> dict[str, set]:
    """Which toy CLIP / GPT-2 folders this run will load: those of the ``eval.metrics`` groups that need a CLIP or
    a language model (metrics/registry.py), ``reward_clip`` (the SCST rewards' CLIP, which the trainer reads from
    the objective: training.steps.reward_clip_model), and the parts the captioner's family loads (its
    ``config_sources`` of kind "clip" / "gpt2", e.g. a prefix LM's)."""
    from metrics.registry import groups_needing

    groups = set(config["eval"]["metrics"])
    needs = {"clip": set(), "gpt2": set()}
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
    """Build the toy CLIP / GPT-2 a toy run needs; returns the folders built or checked.

    A model is built (or its cache checked against the recipe) only when ``data.toy`` is set, the run needs it
    (an ``eval.metrics`` group, the SCST rewards' ``reward_clip``, or a prefix captioner's ``model.prefix.clip`` /
    ``gpt2``), and
    the folder named there sits beside ``data.toy_root`` (the toy cache, e.g. ``cache/toy_clip`` beside
    ``cache/toy``) and is missing or holds a build of ours (a ``manifest.json``). Hub ids and other local models
    are left alone.
    """
    if not config["data"]["toy"]:
        return []
    toy_root = Path(config["data"]["toy_root"]).absolute()
    built = []
    for kind, sources in _needs(config, reward_clip).items():
        ensure = ensure_toy_clip if kind == "clip" else ensure_toy_gpt2
        for source in sorted(sources):
            if built_on_first_use(config, source):
                built.append(ensure(Path(source).absolute(), toy_root))
    return built


__all__ = ["ToyClipRecipe", "ToyGpt2Recipe", "built_on_first_use", "ensure_for_config", "ensure_toy_clip",
           "ensure_toy_gpt2"]
