"""The metric suite: score generated captions on accuracy and descriptiveness in one call.

`compute_metrics` is what validation during training calls; `score_results_file` is what
eval_caption.py calls to score a results file with no captioning model. Both return one flat dict
with stable keys (`METRIC_KEYS`, in that order), plus ``num_images`` (images scored) and
``num_missing`` (GT images without a generated caption). A key of a requested group that cannot be
computed here (METEOR/SPICE without Java) is present with value None, and a warning says why.

What is scored comes from the registry (metrics/registry.py): each group's keys, needs and compute function. The
settings of a run (images, models, batch sizes, overlap, ...) are one `MetricOptions`; the functions here also take
its fields as keyword arguments (``compute_metrics(results, gt, images_root=...)``).

Results vs ground truth (decided here, before any metric runs; nothing is dropped silently):

* a result entry without an ``image_id`` or a str ``caption`` -> error naming the entry;
* an image id given twice with *different* captions -> error naming the ids;
  the same caption twice (e.g. gathered from several ranks) -> warning, counted once;
* a result id absent from the GT images -> error naming the ids (hinting at str/int mix-ups);
* GT images without a result -> warning naming the count and the first ids; the metrics are
  computed on the images that have one, and ``num_missing`` reports the count;
* a scored image without reference captions, for a group that needs references -> error.

Each need of the requested groups (`registry.NEEDS`) is checked before any group runs: reference captions,
image files (``images_root / file_name`` from the GT ``images`` entries), the toy scenes, and, before the captions
exist (`prepare_metrics`), the COCO instances and the FineCapEval CSV. The retrieval pool is the scored images
(optionally plus distractors), its size reported as ``retrieval_pool``.

Time (`MetricSession`, which `compute_metrics` runs): every image and every distinct text is encoded by CLIP once
and shared by the groups that need CLIP; a group marked ``background`` (COCO: the PTB tokeniser, METEOR's JVMs, the
Python BLEU/ROUGE/CIDEr) runs in a thread of its own while the others score; and what does not depend on the
captions (loading CLIP and GPT-2, the groups' ``prepare`` hooks: encoding the GT images and the prefixed
references, tokenising the references, starting METEOR's JVMs) can start before the captions exist, e.g. while
they are generated (`prepare_metrics`). The numbers are those of the sequential computation (``overlap=False``),
up to the float rounding of different batch shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import utils

from ._common import MetricInputError, MetricInputNotFound, read_json_file, resolve_device
from .chair import read_coco_instances
from .clip_metrics import CLIPSCORE_PREFIX, DEFAULT_CLIP, ClipBundle, check_image_files, check_long_text, \
    encode_images, encode_texts, load_clip
from .coco import read_coco_gt, references_by_image
from .finecapeval import FineCapEvalData, finecapeval_gt, read_finecapeval_csv
from .perplexity import DEFAULT_LM, LMBundle, load_language_model
from .registry import ALL_METRICS, COUNT_KEYS, DEFAULT_METRICS, IMAGE_METRICS, METRIC_GROUPS, METRIC_KEYS, \
    MetricGroup, check_groups, groups_needing, needs_of, reported_groups
from .table import LEX_DIV_KEYS, markdown_header, markdown_row, markdown_table, summarize_seeds
from .toy_grounding import scenes_from_gt

logger = logging.getLogger(__name__)

__all__ = [  # the registry's and the table's names are re-exported here, where callers have long found them
    "ALL_METRICS", "COUNT_KEYS", "DEFAULT_METRICS", "IMAGE_METRICS", "LEX_DIV_KEYS", "METRIC_KEYS", "MetricOptions",
    "MetricSession", "PreparationContext", "ScoringContext", "align_results", "compute_metrics", "markdown_header",
    "markdown_row", "markdown_table", "prepare_metrics", "score_results_file", "summarize_seeds",
]
_SHOW = 10  # how many offending ids a message lists


@dataclass(frozen=True)
class MetricOptions:
    """How to score: where the inputs are, which models, where they run, in what batches, with what overlap.

    Attributes:
        images_root: folder holding the GT's ``file_name`` entries; needed by the groups that need "images".
        clip_model / ppl_model: hub id or local directory of CLIP / the perplexity LM (or a loaded bundle).
        extra_pool_images: retrieval distractors (a directory or a list of image paths).
        device: where CLIP and the LM run; None: CUDA when available.
        batch_size / text_batch_size / ppl_batch_size: CLIP image, CLIP text and LM batch sizes.
        num_workers: image-decoding workers (see `encode_images`).
        progress: tqdm bars for the work done in the calling thread.
        verbose: let pycocoevalcap print.
        finecapeval: FineCapEval.csv (or its `read_finecapeval_csv` data), needed by "finecapeval"; each scored
            image is matched to its CSV rows by the GT's ``file_name`` (else its id) up to the first dot.
        instances: COCO instances JSON (``instances_val2014.json``) or its `read_coco_instances` mapping
            ``{image_id: category names}``, needed by "chair" and "chair_corrected" (an error without it).
        skip_missing_instances: if `instances` is a path that does not exist, warn and report the groups needing
            it as None instead of failing (config mode: the COCO configs name the file whether or not it was
            fetched).
        overlap: run background groups (COCO) in a thread of their own while the others score, and the groups'
            caption-independent preparation in background threads; False runs every group in turn in the calling
            thread. Same numbers.
        meteor_processes: METEOR JVMs (`MeteorScorer`; default one per 4 usable cores, 1 to 4).
        clip_long_text: how the CLIP groups read a text longer than CLIP's text window (`clip_metrics.CLIP_LONG_TEXT`):
            "truncate" (default; the paper's numbers) cuts it to the window, "chunks" embeds it as the normalised
            mean of its pieces' embeddings (`clip_metrics.split_long_texts`). Either way the groups report the share
            of captions longer than the window.
    """

    images_root: str | Path | None = None
    clip_model: str | Path | ClipBundle = DEFAULT_CLIP
    ppl_model: str | Path | LMBundle = DEFAULT_LM
    extra_pool_images: str | Path | Sequence[str | Path] | None = None
    device: str | torch.device | None = None
    batch_size: int = 64
    text_batch_size: int = 256
    ppl_batch_size: int = 64
    num_workers: int | None = None
    progress: bool = True
    verbose: bool = False
    finecapeval: str | Path | FineCapEvalData | None = None
    instances: str | Path | Mapping[Hashable, Iterable[str]] | None = None
    skip_missing_instances: bool = False
    overlap: bool = True
    meteor_processes: int | None = None
    clip_long_text: str = "truncate"

    def __post_init__(self):
        check_long_text(self.clip_long_text, "clip_long_text (MetricOptions, eval.clip_long_text)")


def metric_options(options: MetricOptions | None = None, **changes) -> MetricOptions:
    """``options`` (default: `MetricOptions()`) with the fields in ``changes`` replaced; an unknown field is a
    TypeError naming the valid ones."""
    options = MetricOptions() if options is None else options
    if not isinstance(options, MetricOptions):
        raise TypeError(f"options must be a MetricOptions, got a {type(options).__name__}")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(MetricOptions)})
    if unknown:
        raise TypeError(f"unknown metric options {unknown}; MetricOptions has "
                        f"{[f.name for f in dataclasses.fields(MetricOptions)]}")
    return dataclasses.replace(options, **changes) if changes else options


def compute_metrics(
    results: Sequence[dict],
    gt: dict | str | Path,
    metrics: Sequence[str] | None = DEFAULT_METRICS,
    options: MetricOptions | None = None,
    *,
    results_name: str = "<results>",
    timings: dict[str, float] | None = None,
    **option_fields,
) -> dict[str, float | int | None]:
    """Score generated captions against COCO-format ground truth.

    Args:
        results: ``[{"image_id": id, "caption": str}, ...]``.
        gt: COCO caption ground truth (dict or JSON path): ``images`` with ``id`` and
            ``file_name``, ``annotations`` with ``image_id`` and ``caption``.
        metrics: groups from `ALL_METRICS`; None means `DEFAULT_METRICS` (the paper's set).
        options: `MetricOptions`; ``option_fields`` (e.g. ``images_root=...``) replace single fields of it.
        results_name: how messages name the results (a file path when scoring a file).
        timings: if given, filled with wall seconds per phase (`MetricSession.timings`).

    Returns:
        ``{"num_images", "num_missing", <keys of the requested groups in METRIC_KEYS order>}``.
    """
    with MetricSession(gt, metrics, options, **option_fields) as session:
        return session.score(results, results_name=results_name, timings=timings)


def prepare_metrics(gt: dict | str | Path, metrics: Sequence[str] | None = DEFAULT_METRICS,
                    options: MetricOptions | None = None, **option_fields) -> MetricSession:
    """A `MetricSession` whose caption-independent work has started in background threads.

    Call it before generating the captions, then ``session.score(results)`` and ``session.close()`` (or use it
    in a ``with``). Arguments as for `MetricSession`.
    """
    return MetricSession(gt, metrics, options, **option_fields).prepare()


def score_results_file(
    results_path: str | Path,
    annotations_path: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    options: MetricOptions | None = None,
    *,
    out: str | Path | None = None,
    timings: dict[str, float] | None = None,
    **option_fields,
) -> dict[str, float | int | None]:
    """Score a results file ``[{"image_id", "caption"}]`` against a COCO-format GT file.

    Args:
        results_path: the generated captions (JSON).
        annotations_path: COCO caption ground truth (JSON); optional with ``options.finecapeval``, whose
            ``caption`` column is then the GT (`finecapeval_gt`: image ids are the CSV's file names). Results for
            CSV images whose rows the FineCapEval scorer drops are left out (logged).
        metrics / options / option_fields / timings: as in `compute_metrics`.
        out: if given, the metrics JSON is written there atomically (utils.write_json).

    Returns:
        The metrics dict of `compute_metrics`.
    """
    options = metric_options(options, **option_fields)
    results_path = Path(results_path)
    results = read_json_file(results_path, "results file")
    if options.finecapeval is not None and not isinstance(options.finecapeval, FineCapEvalData):
        options = dataclasses.replace(options, finecapeval=read_finecapeval_csv(options.finecapeval))
    if annotations_path is None:
        if options.finecapeval is None:
            raise MetricInputError("score_results_file needs annotations_path, or finecapeval for FineCapEval")
        annotations_path = finecapeval_gt(options.finecapeval)
        results = _without_dropped_images(results, options.finecapeval, str(results_path))
    scores = compute_metrics(results, annotations_path, metrics, options, results_name=str(results_path),
                             timings=timings)
    if out is not None:
        utils.write_json(out, scores)
    return scores


class PreparationContext:
    """What a group's ``prepare`` hook gets (registry.py): the images to prepare for and the session's shared parts.

    It runs in a background thread before the captions exist, so it shows no progress bar. Attributes: ``ids``
    (GT image ids to prepare for), ``gt``, ``gt_name``, ``references`` (``{image_id: [captions]}`` of every GT
    image), ``groups`` (the reported group names), ``options`` (`MetricOptions`), ``device``; ``clip`` and ``lm``,
    the loaded models. What belongs to a need (a model, an input) is there only when a requested group declares
    that need; asking for it otherwise is an error naming the need, so a group's missing declaration shows at once.
    """

    _scoring = False  # True in `ScoringContext`: the calling thread, which waits for the CLIP preparation

    def __init__(self, session: MetricSession, ids: Sequence[Hashable]):
        self._session = session
        self.ids = list(ids)
        self.gt, self.gt_name, self.references = session.gt, session.gt_name, session.refs
        self.groups, self.options, self.device = session.reported, session.options, session.device

    def _require(self, need: str) -> None:
        if need not in self._session.needs:
            raise RuntimeError(f"no requested metric group declares the need {need!r}: add it to the needs of the "
                               "group that uses it (metrics/registry.py)")

    @property
    def clip(self) -> ClipBundle:
        self._require("clip")
        return self._session.clip

    @property
    def lm(self) -> LMBundle:
        self._require("lm")
        return self._session.lm

    def image_files(self) -> list[Path]:
        """The image files of ``ids`` that exist now (best effort: a file missing now is reported by `score` if a
        scored image needs it)."""
        root = self.options.images_root
        if root is None or not Path(root).is_dir():
            return []
        names = {image["id"]: image.get("file_name") for image in self.gt["images"]}
        return [Path(root) / names[i] for i in self.ids if names.get(i) and os.path.isfile(Path(root) / names[i])]

    def image_features(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Unit-norm CLIP embeddings ``(len(paths), D)``; each image is encoded once per session (by resolved
        path), whichever group asks first."""
        self._require("clip")
        return self._session._image_features(paths, self._scoring)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP embeddings ``(len(texts), D)`` of the texts as given (no prefix added); each distinct
        text is encoded once per session."""
        self._require("clip")
        return self._session._text_features(texts, self._scoring)

    def timed(self, name: str) -> _Timer:
        """A context manager adding its wall seconds to the session's ``timings[name]``."""
        return self._session._timed(name)


class ScoringContext(PreparationContext):
    """What a group's ``compute`` gets: the scored captions and the checked inputs of the requested groups' needs.

    Beyond `PreparationContext`'s attributes (``ids`` are now the scored images, in GT order): ``scored``
    (``[(image_id, caption)]``), ``captions``, ``scored_references``; per need, ``image_paths`` ("images"),
    ``instances`` and ``instances_source`` ("instances"), ``finecapeval`` (`FineCapEvalData`, "finecapeval") and
    ``toy_scenes`` (``(scenes, grammar)``, "toy_scenes"). CLIP embeddings asked for here wait for the background
    CLIP preparation first and show progress bars when ``options.progress``.
    """

    _scoring = True

    def __init__(self, session: MetricSession, scored: list[tuple[Hashable, str]], inputs: Mapping[str, Any]):
        super().__init__(session, [image_id for image_id, _ in scored])
        self.scored = scored
        self.captions = [caption for _, caption in scored]
        self._inputs = dict(inputs)
        self._shared: dict[str, Any] = {}

    def _input(self, need: str) -> Any:
        self._require(need)
        return self._inputs[need]

    @property
    def image_paths(self) -> list[Path]:
        return self._input("images")

    @property
    def toy_scenes(self) -> tuple[list, Mapping]:
        return self._input("toy_scenes")

    @property
    def finecapeval(self) -> FineCapEvalData:
        return self._input("finecapeval")

    @property
    def instances(self) -> Mapping[Hashable, Iterable[str]]:
        return self._input("instances")[0]

    @property
    def instances_source(self) -> str:
        return self._input("instances")[1]

    @property
    def scored_references(self) -> list[list[str]]:
        """The reference captions of each scored image, in ``ids`` order."""
        return [self.references[i] for i in self.ids]

    def shared(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per `score` call under ``name``: a value several functions of a group use
        (e.g. retrieval's pool, listed once for the CLIP pass and once more for its compute otherwise)."""
        if name not in self._shared:
            self._shared[name] = build()
        return self._shared[name]

    def prepared(self, group: str) -> Any:
        """What group ``group``'s ``prepare`` hook returned (waiting for it), or None if it was not prepared."""
        return self._session._prepared(group)

    def add_timings(self, timings: Mapping[str, float]) -> None:
        """Add a group's own phase timings (seconds by name) to the session's."""
        self._session._add_timings(timings)


class MetricSession:
    """Scores captions against one ground truth, starting what does not depend on them as early as asked.

    `prepare` (or `prepare_metrics`) loads CLIP and the perplexity LM when a requested group needs them and starts
    the groups' ``prepare`` hooks in background threads (COCO: METEOR's JVMs, ~10 s of one core each to load the
    paraphrase table, and tokenising the references; retrieval and CLIPScore: encoding every GT image, the
    distractors and the prefixed references with CLIP). `score` then validates the results (the policy of the
    module docstring, with the same messages, before anything is computed), checks the groups' needs, runs the
    background groups in threads of their own and the others in the calling thread (those needing CLIP last, as
    they wait for its preparation). If `score` is called without an earlier `prepare`, the preparation covers only
    the scored images. CLIP work in a background thread runs on its own CUDA stream, so it interleaves with the
    caller's kernels (e.g. captioning) rather than queueing behind them.

    Embeddings are kept by resolved image path and by exact text, so each is computed once whatever the groups
    and whichever images end up scored; an image or text not encoded beforehand is encoded in `score`.

    ``overlap=False`` starts no thread: `prepare` only loads the models and checks the inputs, and `score` computes
    each group in turn in registry order, the reference for the overlapped path.

    `timings` holds wall seconds per phase, accumulated across threads (phases overlap): one per group computed,
    under its name (``coco``, ``length``, ``retrieval``, ...), with ``coco_tokenize``, ``bleu``, ``meteor``,
    ``rouge``, ``cider`` inside COCO; ``clip_load``, ``clip_images``, ``clip_texts``; ``ppl_load``.
    """

    def __init__(self, gt: dict | str | Path, metrics: Sequence[str] | None = DEFAULT_METRICS,
                 options: MetricOptions | None = None, **option_fields):
        self.options = metric_options(options, **option_fields)
        self.groups = check_groups(metrics)
        self.reported = reported_groups(self.groups)
        self.needs = needs_of(self.groups)
        self.gt, self.gt_name = read_coco_gt(gt)
        self.refs = references_by_image(self.gt)
        self.device = resolve_device(self.options.device)
        self.timings: dict[str, float] = {}
        self.clip: ClipBundle | None = None
        self.lm: LMBundle | None = None
        self._images, self._texts = _Embeddings(), _Embeddings()
        self._inputs: dict[str, Any] = {}
        self._origin_stream = None
        self._pool = ThreadPoolExecutor(3, thread_name_prefix="metrics-prepare") if self.options.overlap else None
        self._lanes: dict[str, Future] = {}
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    # ---- preparation ------------------------------------------------------------------------------
    def prepare(self) -> MetricSession:
        """Check the caption-independent inputs (COCO instances, FineCapEval CSV), load CLIP and the perplexity LM
        (in the calling thread) and start the groups' ``prepare`` hooks for every GT image in background threads
        (idempotent). With ``overlap=False`` nothing is started.

        The models load here rather than in a thread because transformers' ``from_pretrained`` swaps process-wide
        state while it runs (``PreTrainedModel.tie_weights``, ``torch.set_default_dtype``, ``torch.linspace``):
        two loads in two threads can leave a model with untied, never-loaded weights.
        """
        return self._start(None)

    def _start(self, ids: Sequence[Hashable] | None) -> MetricSession:
        """`prepare` for the images `ids` (None: all GT images)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this MetricSession is closed")
            if self._started:
                return self
            self._load_inputs()  # a missing file fails here, before any model loads
            self._started = True
            ids = [image["id"] for image in self.gt["images"]] if ids is None else list(ids)
            # The models are copied to the device on this thread's stream; background CUDA work waits for it.
            self._origin_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            lanes: dict[str, list[MetricGroup]] = {}
            if self._pool is not None:
                for name in ALL_METRICS:
                    group = METRIC_GROUPS[name]
                    if name in self.reported and group.prepare is not None:
                        lanes.setdefault(_lane(group), []).append(group)
            for lane in [lane for lane in lanes if lane not in ("clip", "lm")]:  # first: METEOR's JVMs start now
                self._lanes[lane] = self._pool.submit(self._run_lane, lanes[lane], ids)
            if "clip" in self.needs:
                with self._timed("clip_load"):
                    self.clip = load_clip(self.options.clip_model, self.device)
            if "lm" in self.needs:
                with self._timed("ppl_load"):
                    self.lm = load_language_model(self.options.ppl_model, self.device)
            for lane in ("clip", "lm"):
                if lane in lanes:
                    self._lanes[lane] = self._pool.submit(self._run_lane, lanes[lane], ids)
        return self

    def _load_inputs(self) -> None:
        """The inputs of the needs that do not depend on the captions, loaded once per session."""
        if "instances" in self.needs:
            self._inputs["instances"] = _instances(self.options.instances,
                                                   sorted(self.reported & groups_needing("instances")),
                                                   self.options.skip_missing_instances)
        if "finecapeval" in self.needs:
            data = self.options.finecapeval
            if data is None:
                raise MetricInputError("metric group 'finecapeval' needs the FineCapEval CSV (finecapeval=..., "
                                       "eval_caption.py --finecapeval, or eval.finecapeval in a config)")
            self._inputs["finecapeval"] = data if isinstance(data, FineCapEvalData) else read_finecapeval_csv(data)

    def _run_lane(self, groups: list[MetricGroup], ids: list) -> dict[str, Any]:
        """Run the ``prepare`` hooks of ``groups`` one after another (one background thread); their states by
        group name. A failure closes the states made so far and is raised again where a group waits for it."""
        context = PreparationContext(self, ids)
        states: dict[str, Any] = {}
        try:
            with _side_stream(self.device, after=self._origin_stream):
                for group in groups:
                    states[group.name] = group.prepare(context)
        except BaseException:
            _close_states(states)
            raise
        return states

    def _lane_states(self, lane: str) -> dict[str, Any]:
        future = self._lanes.get(lane)
        return future.result() if future is not None else {}

    def _prepared(self, group: str) -> Any:
        return self._lane_states(_lane(METRIC_GROUPS[group])).get(group)

    def _image_features(self, paths: Sequence[str | Path], scoring: bool) -> torch.Tensor:
        """Embeddings from the shared cache, encoding the missing ones. ``scoring``: called from `score`'s thread,
        which waits for the background CLIP preparation (it fills the same caches) and may show progress bars."""
        progress = scoring and self.options.progress
        if scoring:
            self._lane_states("clip")
        def encode(todo):  # timed (and logged) only when some image is not cached yet
            with self._timed("clip_images"):
                return encode_images(todo, self.clip, self.options.batch_size, self.options.num_workers, progress)

        self._images.add_missing(paths, encode, key=_path_key)
        return self._images.get(paths, key=_path_key)

    def _text_features(self, texts: Sequence[str], scoring: bool) -> torch.Tensor:
        progress = scoring and self.options.progress
        if scoring:
            self._lane_states("clip")
        def encode(todo):  # timed (and logged) only when some text is not cached yet
            with self._timed("clip_texts"):
                # CLIPScore's prefixed texts keep their prefix on every piece under clip_long_text: chunks
                return encode_texts(todo, self.clip, prefix="", batch_size=self.options.text_batch_size,
                                    progress=progress, long_text=self.options.clip_long_text,
                                    keep_prefixes=(CLIPSCORE_PREFIX,))

        self._texts.add_missing(texts, encode)
        return self._texts.get(texts)

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, results: Sequence[dict], results_name: str = "<results>",
              timings: dict[str, float] | None = None) -> dict[str, float | int | None]:
        """`compute_metrics` of `results` against this session's GT and groups (see there for the dict).

        May be called again (e.g. captions of another checkpoint on the same images); models, embeddings, tokens
        and JVMs are kept until `close`.
        """
        if self._closed:
            raise RuntimeError("this MetricSession is closed")
        scored, num_missing = align_results(results, self.gt, results_name, self.gt_name)
        ids = [image_id for image_id, _ in scored]
        checked = self._check_scored(ids)  # before any model loads or metric runs
        self._start(ids)  # no-op after `prepare`
        context = ScoringContext(self, scored, {**checked, **self._inputs})
        # A need whose input is absent by choice (skip_missing_instances) skips its groups: their keys are None.
        skipped = {need for need, value in self._inputs.items() if value is None}
        runnable = [METRIC_GROUPS[name] for name in ALL_METRICS if name in self.reported
                    and METRIC_GROUPS[name].compute is not None and not METRIC_GROUPS[name].needs & skipped]
        background = [group for group in runnable if group.background and self.options.overlap]
        # Groups needing CLIP last: their embeddings may still be in preparation in the background meanwhile.
        foreground = sorted((group for group in runnable if group not in background), key=lambda g: "clip" in g.needs)

        computed: dict[str, Any] = {}
        pool = ThreadPoolExecutor(len(background), thread_name_prefix="metrics-group") if background else None
        try:
            futures = [pool.submit(self._compute, group, context) for group in background]
            embedded = False
            for group in foreground:
                if "clip" in group.needs and not embedded:
                    self._embed_clip_inputs([g for g in foreground if g.clip_inputs is not None], context)
                    embedded = True
                computed.update(self._compute(group, context))
            for future in futures:
                computed.update(future.result())
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # never leave a group's thread running past this call
        if timings is not None:
            timings.update(self.timings)

        ordered: dict[str, Any] = {"num_images": len(ids), "num_missing": num_missing}
        for name in ALL_METRICS:
            if name in self.reported:
                ordered.update({key: computed.get(key) for key in METRIC_KEYS[name]})  # None: not computable here
        ordered.update({key: value for key, value in computed.items() if key not in ordered})
        return ordered

    def _check_scored(self, ids: list) -> dict[str, Any]:
        """The needs that depend on which images are scored: checked, with the inputs they give `ScoringContext`."""
        checked: dict[str, Any] = {}
        if "references" in self.needs:
            without = [i for i in ids if not self.refs[i]]
            if without:
                raise MetricInputError(f"{self.gt_name}: {len(without)} scored images have no reference caption "
                                       f"(first: {without[:_SHOW]})")
        if "images" in self.needs:
            checked["images"] = _image_paths(self.gt, self.gt_name, ids, self.options.images_root,
                                             sorted(self.reported & IMAGE_METRICS))
        if "toy_scenes" in self.needs:
            checked["toy_scenes"] = scenes_from_gt(self.gt, ids, self.gt_name)
        return checked

    def _embed_clip_inputs(self, groups: list[MetricGroup], context: ScoringContext) -> None:
        """One CLIP pass over what ``groups`` will embed (their ``clip_inputs``, in registry order): the images,
        then the texts, in the same batches whichever of them are asked."""
        paths: list = []
        texts: list[str] = []
        for group in sorted(groups, key=lambda g: ALL_METRICS.index(g.name)):
            group_paths, group_texts = group.clip_inputs(context)
            paths += group_paths
            texts += group_texts
        context.image_features(paths)
        context.text_features(texts)

    def _compute(self, group: MetricGroup, context: ScoringContext) -> dict[str, Any]:
        with self._timed(group.name):
            return dict(group.compute(context))

    def _timed(self, name: str) -> _Timer:
        return _Timer(self.timings, name)

    def _add_timings(self, timings: Mapping[str, float]) -> None:
        for name, seconds in timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + seconds

    # ---- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for background work still running, close what the groups prepared (METEOR's JVMs) and drop the
        models (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for future in self._lanes.values():
            if future.exception() is None:
                _close_states(future.result())
        self._lanes.clear()
        self.clip = self.lm = None
        self._images, self._texts = _Embeddings(), _Embeddings()

    def __enter__(self) -> MetricSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lane(group: MetricGroup) -> str:
    """The background thread a group's ``prepare`` hook runs in: one for the groups sharing CLIP (they share its
    embedding caches), one for those sharing the LM, else one of its own."""
    for model in ("clip", "lm"):
        if model in group.needs:
            return model
    return group.name


def _close_states(states: Mapping[str, Any]) -> None:
    for state in states.values():
        if callable(getattr(state, "close", None)):
            state.close()


def _instances(instances, groups: list[str], skip_missing: bool) -> tuple[Mapping, str] | None:
    """``(mapping, name)`` of the COCO instances, or None (with a warning) when the file is absent and
    `skip_missing`: the groups needing it are then reported as None."""
    if instances is None:
        raise MetricInputError(f"metrics {groups} need COCO instance annotations: pass instances "
                               "(--instances INSTANCES.json, e.g. datasets/coco/annotations/instances_val2014.json; "
                               "see `python scripts/prepare_data.py coco`)")
    if isinstance(instances, Mapping):
        return instances, "<instances mapping>"
    if skip_missing and not Path(instances).is_file():
        logger.warning("COCO instances file %s not found: %s reported as None (scripts/prepare_data.py coco says "
                       "where to get it)", instances, groups)
        return None
    return read_coco_instances(instances), str(instances)


class _Embeddings:
    """Unit-norm CLIP embeddings by key (an image's resolved path, or the exact text), each computed once."""

    def __init__(self):
        self._row: dict = {}
        self._chunks: list[torch.Tensor] = []
        self._table: torch.Tensor | None = None

    def add_missing(self, items: Sequence, encode: Callable[[list], torch.Tensor], key=lambda item: item) -> None:
        todo = {}
        for item in items:
            k = key(item)
            if k not in self._row and k not in todo:
                todo[k] = item
        if not todo:
            return
        features = encode(list(todo.values()))  # (len(todo), D)
        start = sum(len(c) for c in self._chunks)
        self._row.update((k, start + n) for n, k in enumerate(todo))
        self._chunks.append(features)
        self._table = None

    def get(self, items: Sequence, key=lambda item: item) -> torch.Tensor:
        """``(len(items), D)`` embeddings of items added before, in order (``(0, 0)`` when nothing was added)."""
        if not self._chunks:
            if items:
                raise KeyError(f"no embedding of {key(items[0])!r}")
            return torch.empty(0, 0)
        if self._table is None:
            self._table = torch.cat(self._chunks)
        return self._table[torch.tensor([self._row[key(item)] for item in items], dtype=torch.long)]


def _path_key(path) -> str:
    return os.path.realpath(path)


@contextlib.contextmanager
def _side_stream(device: torch.device, after=None):
    """Run the block's CUDA work on a stream of its own, after the work queued so far on stream `after` (where the
    models' weights were copied), and wait for it at the end; a no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(after if after is not None else torch.cuda.default_stream(device))
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


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


def _image_paths(gt: dict, gt_name: str, ids: list, images_root, needing: list[str]) -> list[Path]:
    """The scored images' files, checked: ``images_root`` given and a folder, every ``file_name`` set and
    present. ``needing``: the groups that need them, for messages."""
    if images_root is None:
        raise MetricInputError(f"metrics {needing} need the images: pass images_root (the folder holding the "
                         f"'file_name' entries of {gt_name})")
    root = Path(images_root)
    if not root.is_dir():
        raise MetricInputNotFound(f"images_root {root} is not a directory (needed by {needing})")
    file_names = {image["id"]: image.get("file_name") for image in gt["images"]}
    unnamed = [i for i in ids if not file_names[i]]
    if unnamed:
        raise MetricInputError(f"{gt_name}: {len(unnamed)} images have no 'file_name', needed by {needing} "
                         f"(first ids: {unnamed[:_SHOW]})")
    paths = [root / file_names[i] for i in ids]
    check_image_files(paths, f"image files under images_root {root} (file_name from {gt_name})")
    return paths


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
