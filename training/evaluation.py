"""Evaluation: generate captions on every rank, score them on rank 0 (metrics/suite.py), and the
``eval_caption.py --config`` flow."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import utils
from models import CaptionModel

from .builders import build_captioner
from .config import prepare_output_dir
from .inputs import build_toy_assets, check_inputs, fill_data_paths
from .loaders import build_eval_loader
from .loop import autocast_context

logger = logging.getLogger("smile_blip")


def generation_options(config: dict) -> dict:
    eval_config = config["eval"]
    keys = ("sample", "num_beams", "max_length", "min_length", "top_p", "repetition_penalty", "no_repeat_ngram_size")
    return {key: eval_config[key] for key in keys}


@torch.no_grad()
def generate_captions(captioner: CaptionModel, loader, config: dict, device: torch.device) -> list[dict]:
    """Captions for every image of ``loader``'s dataset, gathered from all ranks, one per image id, sorted.

    The DistributedSampler pads the last shard by repeating images, so results are de-duplicated by image id.
    """
    captioner.eval()
    options = generation_options(config)
    local: list[dict] = []
    for images, image_ids in tqdm(loader, desc="generate", disable=not utils.is_main(), dynamic_ncols=True):
        with autocast_context(config, device):
            captions = captioner.generate(images.to(device, non_blocking=True), **options)
        local.extend({"image_id": int(i), "caption": c} for i, c in zip(image_ids.tolist(), captions))
    by_id = {}
    for shard in utils.all_gather_object(local):
        for row in shard:
            by_id.setdefault(row["image_id"], row)
    return [by_id[i] for i in sorted(by_id)]


def metric_options(config: dict, images_root=None):
    """The `metrics.suite.MetricOptions` of a config's ``eval`` section: its CLIP and LM, the FineCapEval CSV and the
    COCO instances (a configured instances file that was never fetched is a warning, not a failed run)."""
    from metrics.suite import MetricOptions

    eval_config = config["eval"]
    return MetricOptions(images_root=images_root, clip_model=eval_config["clip_model"],
                         ppl_model=eval_config["ppl_model"], finecapeval=eval_config["finecapeval"],
                         instances=eval_config.get("instances"), skip_missing_instances=True,
                         clip_long_text=eval_config.get("clip_long_text", "truncate"))


@contextmanager
def scoring_session(gt: dict, config: dict, groups=("coco",), images_root=None):
    """Rank 0: a metrics session (metrics/suite.py) whose caption-independent work starts now, in the background,
    while the captions are generated: METEOR's JVMs, tokenising the references, CLIP's embeddings of the images
    and references; its inputs (FineCapEval CSV, COCO instances) are checked now, before any caption is generated.
    None on the other ranks. Enter it after the captioner is built: transformers' ``from_pretrained`` changes
    process-wide state, so the session loads CLIP and GPT-2 in this thread."""
    session = None
    if utils.is_main():
        from metrics.suite import prepare_metrics

        session = prepare_metrics(gt, list(groups), metric_options(config, images_root))
    try:
        yield session
    finally:
        if session is not None:
            session.close()


def score(results: list[dict], session) -> dict:
    """Metrics on rank 0 from its ``scoring_session``, broadcast to every rank (so all ranks take the same
    best-checkpoint decision)."""
    return utils.broadcast_object(session.score(results) if session is not None else None)


def evaluate(captioner: CaptionModel, loader, gt: dict, config: dict, device: torch.device,
             groups=("coco",), results_path: str | Path | None = None) -> tuple[list[dict], dict]:
    """Generate for every image in ``loader`` and score against ``gt``: (results, metrics).

    ``results_path``: rank 0 writes the captions there before any metric runs, so a scoring failure (or a run
    stopped while it scores) loses none of them."""
    with scoring_session(gt, config, groups, images_root=config["data"]["image_root"]) as session:
        results = generate_captions(captioner, loader, config, device)
        if results_path is not None and utils.is_main():
            utils.write_json(results_path, results)
        return results, score(results, session)


# BLIP's model selection (train_caption.py keeps the epoch with the best val CIDEr + BLEU-4): eval.select_by: null.
BLIP_SELECTION = {"CIDEr": 1.0, "Bleu_4": 1.0}
VALIDATION_GROUPS = ("coco",)  # what validation scores besides the groups of eval.select_by's keys
SELECT_BY_KEY = "eval.select_by"


def select_by(config: dict) -> dict[str, float]:
    """``eval.select_by`` -> ``{metric key: weight}``: what picks ``checkpoint_best`` (the largest weighted sum).

    The YAML forms are those of the objectives and rewards (``utils.parse_weighted_spec``)::

        select_by: null                        # BLIP's CIDEr + BLEU-4 (the default, for parity)
        select_by: CIDEr                       # one validation metric
        select_by: {CLIPScore: 0.02, CIDEr: 1.0}   # a weighted sum of metric keys

    A name is a metric key as the metrics files write it (``metrics/registry.py``: ``CIDEr``, ``Bleu_4``,
    ``CLIPScore``, ``PPL``, ...). Its group must be one validation scores: ``coco`` always, any other only when
    ``eval.metrics`` lists it (so that the model it needs, e.g. ``eval.clip_model``, is checked before training).
    A key where lower is better needs a negative weight; a statistic with no better direction (``cap_len``) is
    refused. Raises ``utils.ConfigError`` naming ``eval.select_by`` and the offending key.
    """
    from metrics.registry import HIGHER, KEY_DIRECTIONS, METRIC_GROUPS, reported_groups

    spec = config["eval"].get("select_by")
    if spec is None:
        return dict(BLIP_SELECTION)
    listed = config["eval"]["metrics"]
    listed = [listed] if isinstance(listed, str) else list(listed or ())
    scored = reported_groups([*VALIDATION_GROUPS, *(name for name in listed if name in METRIC_GROUPS)])
    group_of = {key: name for name, group in METRIC_GROUPS.items() for key in group.key_names}
    valid = sorted(key for key in group_of if group_of[key] in scored and KEY_DIRECTIONS[key] is not None)
    for name in [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Mapping) else []:
        if name not in group_of:
            close = [key for key in group_of if str(name).lower().replace("-", "_") == key.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise utils.ConfigError(f"{SELECT_BY_KEY}: unknown metric key {name!r}{hint}; validation here scores "
                                    f"{valid}")
    try:
        parsed = utils.parse_weighted_spec(spec, "metric key", {key: [] for key in group_of}, key=SELECT_BY_KEY)
    except ValueError as error:
        raise utils.ConfigError(str(error)) from None
    weights = {}
    for key, weight, _ in parsed:
        if group_of[key] not in scored:
            raise utils.ConfigError(
                f"{SELECT_BY_KEY}: {key!r} comes from the metric group {group_of[key]!r}, which validation does not "
                f"score: add it to eval.metrics (now {listed}) or select by one of {valid}")
        direction = KEY_DIRECTIONS[key]
        if direction is None:
            raise utils.ConfigError(f"{SELECT_BY_KEY}: {key!r} is a statistic with no better direction; select by "
                                    f"one of {valid}")
        if weight == 0 or (direction == HIGHER) != (weight > 0):
            better = "higher" if direction == HIGHER else "lower"
            raise utils.ConfigError(
                f"{SELECT_BY_KEY}.{key}: weight {weight:g} would prefer the wrong direction ({better} is better, and "
                f"the largest weighted sum wins): give it a {'positive' if direction == HIGHER else 'negative'} "
                "weight")
        weights[key] = weight
    return weights


def validation_groups(selection: dict[str, float]) -> tuple[str, ...]:
    """The metric groups validation scores: ``coco`` plus the groups of the ``select_by`` keys."""
    from metrics.registry import METRIC_GROUPS

    groups = list(VALIDATION_GROUPS)
    for name, group in METRIC_GROUPS.items():
        if name not in groups and any(key in group.key_names for key in selection):
            groups.append(name)
    return tuple(groups)


def selection_score(metrics: dict, selection: dict[str, float] | None = None) -> float:
    """The validation score that picks ``checkpoint_best``: ``sum_k weight_k * metrics[k]`` over ``selection``
    (``select_by(config)``; default BLIP's CIDEr + BLEU-4). Larger is better."""
    selection = BLIP_SELECTION if selection is None else selection
    missing = [key for key in selection if metrics.get(key) is None]
    if missing:
        raise ValueError(f"{SELECT_BY_KEY}: validation produced no value for {missing} (metrics: {sorted(metrics)})")
    return float(sum(weight * metrics[key] for key, weight in selection.items()))


def run_evaluation(config: dict, checkpoint: str | None = None, split: str | None = None) -> dict:
    """Generate and score ``split`` (default ``eval.split``) with ``checkpoint`` (default ``model.pretrained``).

    Writes ``eval_<split>_results.json``, ``eval_<split>_metrics.json`` and ``eval_<split>_caption_lengths.png``
    into ``output_dir``.
    """
    split = split or config["eval"]["split"]
    check_inputs(config, "eval", split=split, checkpoint=checkpoint)  # before anything is built or downloaded
    device = utils.init_distributed(config["device"], config["dist_timeout_minutes"])
    fill_data_paths(config)
    # Evaluating into a training run's folder must not replace the config that trained it.
    output_dir = prepare_output_dir(config, config_name=f"eval_{split}_config.yaml")
    build_toy_assets(config)
    captioner = build_captioner(config, device, pretrained=checkpoint)
    return evaluate_split(captioner, config, split, device, output_dir, f"eval_{split}")


def evaluate_split(captioner: CaptionModel, config: dict, split: str, device: torch.device, output_dir: Path,
                   name: str) -> dict:
    """Generate on ``split``, score ``eval.metrics``; writes ``<name>_results.json``, ``<name>_metrics.json`` and
    a histogram of the caption lengths, ``<name>_caption_lengths.png`` (a plot that fails is only a warning)."""
    loader, gt = build_eval_loader(config, split, captioner.eval_transform())
    with scoring_session(gt, config, config["eval"]["metrics"], images_root=config["data"]["image_root"]) as session:
        results = generate_captions(captioner, loader, config, device)
        if utils.is_main():
            utils.write_json(output_dir / f"{name}_results.json", results)  # kept even if scoring fails
        metrics = score(results, session)
    if utils.is_main():
        utils.write_json(output_dir / f"{name}_metrics.json", metrics)
        from metrics.plots import plot_caption_lengths_or_warn

        plot_caption_lengths_or_warn(results, output_dir / f"{name}_caption_lengths.png", run=output_dir.name,
                                     title=f"Caption length, {split} split")
    logger.info("%s: %s", name, _format_metrics(metrics))
    return metrics


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
