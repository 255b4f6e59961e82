"""Evaluation: generate captions on every rank, score them on rank 0 (metrics/suite.py), and the
``eval_caption.py --config`` flow."""
from __future__ import annotations

import logging
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
    keys = ("sample", "num_beams", "max_length", "min_length", "top_p", "repetition_penalty")
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
                         instances=eval_config.get("instances"), skip_missing_instances=True)


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
             groups=("coco",)) -> tuple[list[dict], dict]:
    """Generate for every image in ``loader`` and score against ``gt``: (results, metrics)."""
    with scoring_session(gt, config, groups, images_root=config["data"]["image_root"]) as session:
        results = generate_captions(captioner, loader, config, device)
        return results, score(results, session)


def selection_score(metrics: dict) -> float:
    """BLIP's model selection: CIDEr + BLEU-4."""
    return metrics["CIDEr"] + metrics["Bleu_4"]


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
