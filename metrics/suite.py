"""The metric suite: score generated captions on accuracy and descriptiveness in one call.

`compute_metrics` is what validation during training calls; `score_results_file` is what
eval_caption.py calls to score a results file with no captioning model. Both return one flat dict
with stable keys (`METRIC_KEYS`, in that order), plus ``num_images`` (images scored) and
``num_missing`` (GT images without a generated caption). A key of a requested group that cannot be
computed here (METEOR/SPICE without Java) is present with value None, and a warning says why.

Results vs ground truth (decided here, before any metric runs; nothing is dropped silently):

* a result entry without an ``image_id`` or a str ``caption`` -> error naming the entry;
* an image id given twice with *different* captions -> error naming the ids;
  the same caption twice (e.g. gathered from several ranks) -> warning, counted once;
* a result id absent from the GT images -> error naming the ids (hinting at str/int mix-ups);
* GT images without a result -> warning naming the count and the first ids; the metrics are
  computed on the images that have one, and ``num_missing`` reports the count;
* a scored image without reference captions -> error (BLEU..CIDEr and RefCLIPScore need them).

Images for retrieval and CLIPScore are ``images_root / file_name`` from the GT ``images`` entries;
the retrieval pool is the scored images (optionally plus distractors), its size reported as
``retrieval_pool``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .clip_metrics import DEFAULT_CLIP, check_image_files, encode_images, extra_pool_paths, load_clip, \
    ref_clip_score, self_retrieval
from ._common import MetricInputError, read_json_file
from .chair import CHAIR_CORRECTED_KEYS, CHAIR_KEYS, chair_scores, read_coco_instances
from .coco import COCO_KEYS, coco_caption_metrics, read_coco_gt, references_by_image
from .perplexity import DEFAULT_LM, gpt2_perplexity
from .text_stats import caption_length, lexical_diversity
from .finecapeval import FINECAP_KEYS, FineCapEvalData, finecap_scores, finecapeval_gt, image_stem, \
    read_finecapeval_csv
from .toy_grounding import TOY_GROUNDING_KEYS, scenes_from_gt, toy_grounding

logger = logging.getLogger(__name__)

ALL_METRICS = ("coco", "spice", "length", "diversity", "retrieval", "clipscore", "ppl", "toy_grounding", "finecapeval",
               "chair", "chair_corrected")
# SPICE is opt-in: pycocoevalcap downloads Stanford CoreNLP for it and it needs ~8 GB of memory.
# toy_grounding needs the scene attributes only the toy set's GT files carry; finecapeval needs FineCapEval.csv;
# chair and chair_corrected need COCO instance annotations (`instances`).
DEFAULT_METRICS = tuple(m for m in ALL_METRICS
                        if m not in ("spice", "toy_grounding", "finecapeval", "chair", "chair_corrected"))
METRIC_KEYS = {
    "coco": COCO_KEYS,
    "spice": ("SPICE",),
    "length": ("cap_len",),
    "diversity": ("vocab_size", "distinct_1", "distinct_2", "ttr"),
    "retrieval": ("R@1", "R@5", "R@10", "retrieval_pool"),
    "clipscore": ("CLIPScore", "RefCLIPScore"),
    "ppl": ("PPL",),
    "toy_grounding": TOY_GROUNDING_KEYS,
    "finecapeval": FINECAP_KEYS,
    "chair": CHAIR_KEYS,
    "chair_corrected": CHAIR_CORRECTED_KEYS,
}
COUNT_KEYS = ("num_images", "num_missing")
IMAGE_METRICS = frozenset({"retrieval", "clipscore"})
_SHOW = 10  # how many offending ids a message lists


def compute_metrics(
    results: Sequence[dict],
    gt: dict | str | Path,
    metrics: Sequence[str] | None = DEFAULT_METRICS,
    images_root: str | Path | None = None,
    clip_model: str | Path = DEFAULT_CLIP,
    ppl_model: str | Path = DEFAULT_LM,
    extra_pool_images: str | Path | Sequence[str | Path] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    ppl_batch_size: int = 16,
    num_workers: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    timings: dict[str, float] | None = None,
    results_name: str = "<results>",
    finecapeval: str | Path | FineCapEvalData | None = None,
    instances: str | Path | Mapping[Hashable, Iterable[str]] | None = None,
    skip_missing_instances: bool = False,
) -> dict[str, float | int | None]:
    """Score generated captions against COCO-format ground truth.

    Args:
        results: ``[{"image_id": id, "caption": str}, ...]``.
        gt: COCO caption ground truth (dict or JSON path): ``images`` with ``id`` and
            ``file_name``, ``annotations`` with ``image_id`` and ``caption``.
        metrics: groups from `ALL_METRICS`; None means `DEFAULT_METRICS` (all but SPICE).
        images_root: folder holding ``file_name``; required by "retrieval" and "clipscore".
        clip_model / ppl_model: hub id or local directory of CLIP / the perplexity LM.
        extra_pool_images: retrieval distractors (a directory or a list of image paths).
        device: where CLIP and GPT-2 run; default CUDA when available.
        batch_size / text_batch_size / ppl_batch_size: CLIP image, CLIP text and LM batch sizes.
        num_workers: image-decoding workers (see `encode_images`).
        progress: tqdm bars for the model-based metrics.
        verbose: let pycocoevalcap print.
        timings: if given, filled with wall seconds per group (and ``clip_images``).
        results_name: how messages name the results (a file path when scoring a file).
        finecapeval: FineCapEval.csv (or its `read_finecapeval_csv` data), needed by "finecapeval"; each
            scored image is matched to its CSV rows by the GT's ``file_name`` (else its id) up to the first dot.
        instances: COCO instances JSON (``instances_val2014.json``) or its `read_coco_instances` mapping
            ``{image_id: category names}``, needed by "chair" and "chair_corrected" (an error without it).
        skip_missing_instances: if `instances` is a path that does not exist, warn and report the CHAIR keys as
            None instead of failing (config mode: the COCO configs name the file whether or not it was fetched).

    Returns:
        ``{"num_images", "num_missing", <keys of the requested groups in METRIC_KEYS order>}``.
    """
    groups = _check_groups(metrics)
    gt, gt_name = read_coco_gt(gt)
    scored, num_missing = align_results(results, gt, results_name, gt_name)
    ids = [image_id for image_id, _ in scored]
    captions = [caption for _, caption in scored]
    refs = references_by_image(gt)
    if groups & {"coco", "spice", "clipscore", "finecapeval"}:
        without = [i for i in ids if not refs[i]]
        if without:
            raise MetricInputError(f"{gt_name}: {len(without)} scored images have no reference caption "
                             f"(first: {without[:_SHOW]})")
    image_paths = _image_paths(gt, gt_name, ids, images_root, groups) if groups & IMAGE_METRICS else None
    # Checked before any metric runs, so a GT without scene attributes fails fast.
    toy_scenes = scenes_from_gt(gt, ids, gt_name) if "toy_grounding" in groups else None
    finecap = _finecap_inputs(gt, scored, finecapeval) if "finecapeval" in groups else None
    chair_groups = sorted(groups & {"chair", "chair_corrected"})
    instance_objects = _chair_instances(instances, chair_groups, skip_missing_instances) if chair_groups else None

    out: dict[str, float | int | None] = {"num_images": len(ids), "num_missing": num_missing}
    timings = {} if timings is None else timings

    def timed(name: str):
        return _Timer(timings, name)

    if groups & {"coco", "spice", "finecapeval"}:  # finecapeval's "overall" score is the COCO metrics
        with timed("coco"):
            out.update(coco_caption_metrics(
                [{"image_id": i, "caption": c} for i, c in scored], gt, spice="spice" in groups, verbose=verbose))
    if "length" in groups:
        with timed("length"):
            out["cap_len"] = caption_length(captions)
    if "diversity" in groups:
        with timed("diversity"):
            out.update(lexical_diversity(captions))
    if groups & IMAGE_METRICS:
        clip = load_clip(clip_model, device)
        with timed("clip_images"):
            image_features = encode_images(image_paths, clip, batch_size, num_workers, progress)
        if "retrieval" in groups:
            with timed("retrieval"):
                extra = extra_pool_paths(extra_pool_images, exclude=image_paths)
                out.update(self_retrieval(captions, image_features, clip, extra, batch_size=batch_size,
                                          text_batch_size=text_batch_size, num_workers=num_workers,
                                          progress=progress))
        if "clipscore" in groups:
            with timed("clipscore"):
                scores = ref_clip_score(captions, [refs[i] for i in ids], image_features, clip,
                                        text_batch_size=text_batch_size, progress=progress)
                out["CLIPScore"], out["RefCLIPScore"] = scores["CLIPScore"], scores["RefCLIPScore"]
        del clip
    if "ppl" in groups:
        with timed("ppl"):
            out["PPL"] = gpt2_perplexity(captions, ppl_model, ppl_batch_size, device, progress)
    if "toy_grounding" in groups:
        with timed("toy_grounding"):
            out.update(toy_grounding(captions, *toy_scenes, source=gt_name))
    if "finecapeval" in groups:
        with timed("finecapeval"):
            out.update(finecap_scores(*finecap))
    if chair_groups and instance_objects is not None:
        with timed("chair"):
            objects, source = instance_objects
            for group in chair_groups:
                out.update(chair_scores(dict(scored), refs, objects, variant="original" if group == "chair" else
                                        "corrected", source=source))

    ordered = {k: out[k] for k in COUNT_KEYS}
    for group in ALL_METRICS:
        if group in groups or (group == "coco" and groups & {"spice", "finecapeval"}):
            ordered.update({k: out.get(k) for k in METRIC_KEYS[group]})  # None: not computable here
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    return ordered


def align_results(
    results: Sequence[dict], gt: dict, results_name: str = "<results>", gt_name: str = "<ground truth>"
) -> tuple[list[tuple[Hashable, str]], int]:
    """Apply the results-vs-GT policy of the module docstring.

    Returns:
        ``(scored, num_missing)``: ``[(image_id, caption)]`` in GT image order, and the number of
        GT images without a result.
    """
    if not isinstance(results, (list, tuple)):
        raise MetricInputError(f"{results_name}: expected a list of {{'image_id', 'caption'}} entries, "
                         f"got a {type(results).__name__}")
    captions: dict[Hashable, str] = {}
    conflicting: list = []
    repeated: list = []
    for index, entry in enumerate(results):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise MetricInputError(f"{results_name}: entry {index} needs 'image_id' and a str 'caption', got {entry!r}")
        image_id, caption = entry["image_id"], entry["caption"]
        if not isinstance(image_id, Hashable):
            raise MetricInputError(f"{results_name}: entry {index} has an unhashable image_id {image_id!r}")
        if image_id in captions:
            (repeated if captions[image_id] == caption else conflicting).append(image_id)
        else:
            captions[image_id] = caption
    if conflicting:
        conflicting = list(dict.fromkeys(conflicting))
        raise MetricInputError(f"{results_name}: {len(conflicting)} image ids have more than one, different caption "
                         f"(first: {conflicting[:_SHOW]}); keep one caption per image")
    if repeated:
        repeated = list(dict.fromkeys(repeated))
        logger.warning("%s: %d image ids appear more than once with the same caption; each is scored once "
                       "(first: %s)", results_name, len(repeated), repeated[:_SHOW])

    gt_ids = [image["id"] for image in gt["images"]]
    known = set(gt_ids)
    unknown = [i for i in captions if i not in known]
    if unknown:
        hint = ""
        as_text = {str(i) for i in known}
        if any(str(i) in as_text for i in unknown):
            hint = " (some match a GT id as text: check int vs str ids)"
        raise MetricInputError(f"{results_name}: {len(unknown)} image ids are not images of {gt_name}{hint} "
                         f"(first: {unknown[:_SHOW]})")
    scored = [(i, captions[i]) for i in gt_ids if i in captions]
    missing = [i for i in gt_ids if i not in captions]
    if missing:
        logger.warning("%s: %d of %d images of %s have no caption in %s; scoring the other %d "
                       "(first missing: %s)", results_name, len(missing), len(gt_ids), gt_name, results_name,
                       len(scored), missing[:_SHOW])
    if not scored:
        raise MetricInputError(f"{results_name}: no caption for any image of {gt_name}; nothing to score")
    return scored, len(missing)


def score_results_file(
    results_path: str | Path,
    annotations_path: str | Path | None = None,
    images_root: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    clip_model: str | Path = DEFAULT_CLIP,
    ppl_model: str | Path = DEFAULT_LM,
    out: str | Path | None = None,
    finecapeval: str | Path | None = None,
    **kwargs,
) -> dict[str, float | int | None]:
    """Score a results file ``[{"image_id", "caption"}]`` against a COCO-format GT file.

    Args:
        results_path: the generated captions (JSON).
        annotations_path: COCO caption ground truth (JSON); optional with `finecapeval`, whose ``caption``
            column is then the GT (`finecapeval_gt`: image ids are the CSV's file names). Results for CSV
            images whose rows the FineCapEval scorer drops are left out (logged).
        finecapeval: FineCapEval.csv, for the "finecapeval" group (and the GT when no `annotations_path`).
        images_root / metrics / clip_model / ppl_model / **kwargs: as in `compute_metrics`.
        out: if given, the metrics JSON is written there atomically (temp file + rename).

    Returns:
        The metrics dict of `compute_metrics`.
    """
    results_path = Path(results_path)
    results = read_json_file(results_path, "results file")
    data = read_finecapeval_csv(finecapeval) if finecapeval is not None else None
    if annotations_path is None:
        if data is None:
            raise MetricInputError("score_results_file needs annotations_path, or finecapeval for FineCapEval")
        annotations_path = finecapeval_gt(data)
        results = _without_dropped_images(results, data, str(results_path))
    scores = compute_metrics(results, annotations_path, metrics=metrics, images_root=images_root,
                             clip_model=clip_model, ppl_model=ppl_model, results_name=str(results_path),
                             finecapeval=data, **kwargs)
    if out is not None:
        write_metrics_json(scores, out)
    return scores


def write_metrics_json(metrics: dict, path: str | Path) -> None:
    """Write `metrics` as JSON via a temp file in the same folder and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(metrics, handle, indent=2)
            handle.write("\n")
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
LEX_DIV_KEYS = METRIC_KEYS["diversity"]
_LEX_DIV_FORMAT = {"vocab_size": "{:.0f}", "distinct_1": "{:.1f}", "distinct_2": "{:.1f}", "ttr": "{:.3f}"}
# (header, key, scale, format) in the SMILE paper's column order, then BLEU-4 and CIDEr x100.
TABLE_COLUMNS = (
    ("Cap. Len.", "cap_len", 1.0, "{:.1f}"),
    ("Lex. Div.", None, 1.0, None),  # key and format chosen by `lex_div`
    ("R@1", "R@1", 1.0, "{:.1f}"),
    ("R@5", "R@5", 1.0, "{:.1f}"),
    ("CLIPScore", "CLIPScore", 1.0, "{:.1f}"),
    ("PPL", "PPL", 1.0, "{:.1f}"),
    ("BLEU-4", "Bleu_4", 100.0, "{:.1f}"),
    ("CIDEr", "CIDEr", 100.0, "{:.1f}"),
)
# Appended after TABLE_COLUMNS only when asked for (`optional`); `markdown_table` asks for those some run has.
OPTIONAL_COLUMNS = (
    ("CHAIR_s", "CHAIR_s", 1.0, "{:.1f}"),
    ("CHAIR_i", "CHAIR_i", 1.0, "{:.1f}"),
    # toy_grounding (%): colour and shape both right, any attribute wrong, then each attribute's precision and,
    # for the details MLE tends to leave out, how often it is mentioned.
    ("Colour+shape right", "ground_colour_shape", 1.0, "{:.1f}"),
    ("Any attr. wrong", "ground_any_wrong", 1.0, "{:.1f}"),
    ("Colour P", "ground_colour_precision", 1.0, "{:.1f}"),
    ("Shape P", "ground_shape_precision", 1.0, "{:.1f}"),
    ("Size M", "ground_size_mentioned", 1.0, "{:.1f}"),
    ("Size P", "ground_size_precision", 1.0, "{:.1f}"),
    ("Pos. M", "ground_position_mentioned", 1.0, "{:.1f}"),
    ("Pos. P", "ground_position_precision", 1.0, "{:.1f}"),
    ("BG M", "ground_background_mentioned", 1.0, "{:.1f}"),
    ("BG P", "ground_background_precision", 1.0, "{:.1f}"),
)


def _columns(lex_div: str, optional: Sequence[str] = ()):
    if lex_div not in LEX_DIV_KEYS:
        raise MetricInputError(f"lex_div must be one of {LEX_DIV_KEYS}, got {lex_div!r}")
    return [(f"{h} ({lex_div})", lex_div, s, _LEX_DIV_FORMAT[lex_div]) if k is None else (h, k, s, f)
            for h, k, s, f in TABLE_COLUMNS] + [column for column in OPTIONAL_COLUMNS if column[1] in optional]


def markdown_header(lex_div: str = "distinct_1", optional: Sequence[str] = ()) -> str:
    """The table's header and alignment lines (two lines, no trailing newline); `optional`: keys of
    `OPTIONAL_COLUMNS` to append."""
    columns = _columns(lex_div, optional)
    return "\n".join([
        "| Run | " + " | ".join(h for h, *_ in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ])


def markdown_row(name: str, metrics: dict, lex_div: str = "distinct_1", optional: Sequence[str] = ()) -> str:
    """One table row: Cap. Len., Lex. Div., R@1, R@5, CLIPScore, PPL, BLEU-4 x100, CIDEr x100, then the
    `optional` columns (e.g. CHAIR_s, CHAIR_i).

    A metric that is missing or None shows as "-".
    """
    cells = []
    for _, key, scale, fmt in _columns(lex_div, optional):
        value = metrics.get(key)
        cells.append("-" if value is None else fmt.format(scale * value))
    return f"| {str(name).replace('|', '/')} | " + " | ".join(cells) + " |"


def markdown_table(runs: Sequence[tuple[str, dict]], lex_div: str = "distinct_1") -> str:
    """Header plus one row per ``(name, metrics)`` run, newline-terminated; an `OPTIONAL_COLUMNS` column appears
    when some run has its metric."""
    optional = [key for _, key, _, _ in OPTIONAL_COLUMNS if any(m.get(key) is not None for _, m in runs)]
    return "\n".join([markdown_header(lex_div, optional),
                      *(markdown_row(n, m, lex_div, optional) for n, m in runs)]) + "\n"


# ---------------------------------------------------------------------------------------------
def _check_groups(metrics: Sequence[str] | None) -> frozenset[str]:
    if metrics is None:
        return frozenset(DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise MetricInputError(f"unknown metric groups {unknown}; valid: {list(ALL_METRICS)}")
    if not metrics:
        raise MetricInputError(f"no metric group requested; valid: {list(ALL_METRICS)}")
    return frozenset(metrics)


def _chair_instances(instances, chair_groups: list[str], skip_missing: bool):
    """``(mapping, name)`` for CHAIR, or None (with a warning) when the file is absent and `skip_missing`."""
    if instances is None:
        raise MetricInputError(f"metrics {chair_groups} need COCO instance annotations: pass instances "
                               "(--instances INSTANCES.json, e.g. datasets/coco/annotations/instances_val2014.json; "
                               "see `python scripts/prepare_data.py coco`)")
    if isinstance(instances, Mapping):
        return instances, "<instances mapping>"
    if skip_missing and not Path(instances).is_file():
        logger.warning("COCO instances file %s not found: %s reported as None (scripts/prepare_data.py coco says "
                       "where to get it)", instances, chair_groups)
        return None
    return read_coco_instances(instances), str(instances)


def _image_paths(gt: dict, gt_name: str, ids: list, images_root, groups: frozenset[str]) -> list[Path]:
    needing = sorted(groups & IMAGE_METRICS)
    if images_root is None:
        raise MetricInputError(f"metrics {needing} need the images: pass images_root (the folder holding the "
                         f"'file_name' entries of {gt_name})")
    root = Path(images_root)
    if not root.is_dir():
        raise NotADirectoryError(f"images_root {root} is not a directory (needed by {needing})")
    file_names = {image["id"]: image.get("file_name") for image in gt["images"]}
    unnamed = [i for i in ids if not file_names[i]]
    if unnamed:
        raise MetricInputError(f"{gt_name}: {len(unnamed)} images have no 'file_name', needed by {needing} "
                         f"(first ids: {unnamed[:_SHOW]})")
    paths = [root / file_names[i] for i in ids]
    check_image_files(paths, f"image files under images_root {root} (file_name from {gt_name})")
    return paths


def _finecap_inputs(gt: dict, scored: list, finecapeval) -> tuple[list[tuple[str, str]], FineCapEvalData]:
    """``([(stem, caption)], data)`` for `finecap_scores`, checked before any metric runs."""
    if finecapeval is None:
        raise MetricInputError("metric group 'finecapeval' needs the FineCapEval CSV (finecapeval=..., "
                         "eval_caption.py --finecapeval, or eval.finecapeval in a config)")
    data = finecapeval if isinstance(finecapeval, FineCapEvalData) else read_finecapeval_csv(finecapeval)
    file_names = {image["id"]: image.get("file_name") or image["id"] for image in gt["images"]}
    return [(image_stem(file_names[i]), caption) for i, caption in scored], data


def _without_dropped_images(results, data: FineCapEvalData, results_name: str):
    """Drop result entries for CSV images that have no kept row (the scorer never scores them)."""
    if not isinstance(results, (list, tuple)) or not data.dropped_images:
        return results
    dropped = set(data.dropped_images)
    kept = [r for r in results if not (isinstance(r, dict) and r.get("image_id") in dropped)]
    if len(kept) < len(results):
        logger.info("%s: %d results are for FineCapEval images whose CSV rows all have a missing cell; "
                    "not scored (as in the FineCapEval scorer)", results_name, len(results) - len(kept))
    return kept


class _Timer:
    def __init__(self, store: dict[str, float], name: str):
        self.store, self.name = store, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.store[self.name] = self.store.get(self.name, 0.0) + time.perf_counter() - self.start
        logger.info("metrics: %s took %.1f s", self.name, self.store[self.name])
