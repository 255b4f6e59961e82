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

CLIP_GROUPS = frozenset({"retrieval", "clipscore"})
GPT2_GROUPS = frozenset({"ppl"})


def _needs(config: dict) -> dict[str, set]:
    """Which config keys name a toy CLIP / GPT-2 this run will load: evaluation metrics, SCST rewards, and the
    parts the captioner's family loads (its ``config_sources`` of kind "clip" / "gpt2", e.g. a prefix LM's)."""
    groups = set(config["eval"]["metrics"])
    needs = {"clip": set(), "gpt2": set()}
    if groups & CLIP_GROUPS:
        needs["clip"].add(config["eval"]["clip_model"])
    reward_clip = _reward_clip(config.get("objective"))
    if reward_clip is not None:
        needs["clip"].add(reward_clip)
    if groups & GPT2_GROUPS:
        needs["gpt2"].add(config["eval"]["ppl_model"])
    if "model" in config:
        from models.families import captioner_family

        for _, source, kind in captioner_family(config["model"]).config_sources(config["model"]):
            if kind in needs and isinstance(source, str):
                needs[kind].add(source)
    return needs


def _reward_clip(objective) -> str | None:
    """The CLIP the objective's SCST rewards load (``objective.scst.clip_model``; training.steps, the one reader of
    that spec), or None when no reward uses CLIP."""
    if objective is None:
        return None
    from training.steps import CLIP_REWARDS, reward_names, split_objective

    if not any(name in CLIP_REWARDS for name in reward_names(objective) or ()):
        return None
    return split_objective(objective)[0]["clip_model"]


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


def ensure_for_config(config: dict) -> list[Path]:
    """Build the toy CLIP / GPT-2 a toy run needs; returns the folders built or checked.

    A model is built (or its cache checked against the recipe) only when ``data.toy`` is set, the run needs it
    (an ``eval.metrics`` group, an SCST reward, or a prefix captioner's ``model.prefix.clip`` / ``gpt2``), and
    the folder named there sits beside ``data.toy_root`` (the toy cache, e.g. ``cache/toy_clip`` beside
    ``cache/toy``) and is missing or holds a build of ours (a ``manifest.json``). Hub ids and other local models
    are left alone.
    """
    if not config["data"]["toy"]:
        return []
    toy_root = Path(config["data"]["toy_root"]).absolute()
    built = []
    for kind, sources in _needs(config).items():
        ensure = ensure_toy_clip if kind == "clip" else ensure_toy_gpt2
        for source in sorted(sources):
            if built_on_first_use(config, source):
                built.append(ensure(Path(source).absolute(), toy_root))
    return built


__all__ = ["ToyClipRecipe", "ToyGpt2Recipe", "built_on_first_use", "ensure_for_config", "ensure_toy_clip",
           "ensure_toy_gpt2"]
