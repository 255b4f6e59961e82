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

Time (`MetricSession`, which `compute_metrics` runs): every image and every distinct text is encoded by CLIP once
and shared by retrieval and CLIPScore; the COCO group (PTB tokeniser, METEOR's JVMs, the Python BLEU/ROUGE/CIDEr)
runs in a background thread while CLIP and GPT-2 score; and what does not depend on the captions (loading CLIP
and GPT-2, encoding the GT images and the prefixed references, tokenising the references, starting METEOR's
JVMs) can start before the captions exist, e.g. while they are generated (`prepare_metrics`). The numbers are
those of the sequential computation (``overlap=False``), up to the float rounding of different batch shapes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .clip_metrics import CLIPSCORE_PREFIX, DEFAULT_CLIP, check_image_files, encode_images, encode_texts, \
    extra_pool_paths, load_clip, ref_clip_score_summary, retrieval_from_features, with_prefix
from ._common import MetricInputError, read_json_file, resolve_device
from .chair import CHAIR_CORRECTED_KEYS, CHAIR_KEYS, chair_scores, read_coco_instances
from . import coco
from .coco import COCO_KEYS, MeteorScorer, coco_caption_metrics, read_coco_gt, references_by_image, tokenize_texts
from .perplexity import DEFAULT_LM, gpt2_perplexity, load_language_model
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
    ppl_batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    timings: dict[str, float] | None = None,
    results_name: str = "<results>",
    finecapeval: str | Path | FineCapEvalData | None = None,
    instances: str | Path | Mapping[Hashable, Iterable[str]] | None = None,
    skip_missing_instances: bool = False,
    overlap: bool = True,
    meteor_processes: int | None = None,
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
        progress: tqdm bars for the model-based metrics run in the calling thread.
        verbose: let pycocoevalcap print.
        timings: if given, filled with wall seconds per phase (`MetricSession.timings`).
        results_name: how messages name the results (a file path when scoring a file).
        finecapeval: FineCapEval.csv (or its `read_finecapeval_csv` data), needed by "finecapeval"; each
            scored image is matched to its CSV rows by the GT's ``file_name`` (else its id) up to the first dot.
        instances: COCO instances JSON (``instances_val2014.json``) or its `read_coco_instances` mapping
            ``{image_id: category names}``, needed by "chair" and "chair_corrected" (an error without it).
        skip_missing_instances: if `instances` is a path that does not exist, warn and report the CHAIR keys as
            None instead of failing (config mode: the COCO configs name the file whether or not it was fetched).
        overlap: run the COCO group in a background thread while CLIP and GPT-2 score (and METEOR beside BLEU,
            ROUGE-L and CIDEr); False runs every group in turn in the calling thread. Same numbers.
        meteor_processes: METEOR JVMs (`MeteorScorer`; default one per 4 usable cores, 1 to 4).

    Returns:
        ``{"num_images", "num_missing", <keys of the requested groups in METRIC_KEYS order>}``.
    """
    with MetricSession(gt, metrics, images_root=images_root, clip_model=clip_model, ppl_model=ppl_model,
                       extra_pool_images=extra_pool_images, device=device, batch_size=batch_size,
                       text_batch_size=text_batch_size, ppl_batch_size=ppl_batch_size, num_workers=num_workers,
                       progress=progress, verbose=verbose, finecapeval=finecapeval, instances=instances,
                       skip_missing_instances=skip_missing_instances, overlap=overlap,
                       meteor_processes=meteor_processes) as session:
        return session.score(results, results_name=results_name, timings=timings)


def prepare_metrics(gt: dict | str | Path, metrics: Sequence[str] | None = DEFAULT_METRICS, **kwargs) -> MetricSession:
    """A `MetricSession` whose caption-independent work has started in background threads.

    Call it before generating the captions, then ``session.score(results)`` and ``session.close()`` (or use it
    in a ``with``). `kwargs` are `MetricSession`'s (those of `compute_metrics` but `results`, `timings` and
    `results_name`).
    """
    return MetricSession(gt, metrics, **kwargs).prepare()


def start_metrics(results: Sequence[dict], gt: dict | str | Path, **kwargs) -> Future:
    """`compute_metrics` in a background thread; returns its Future (``.result()`` is the metrics dict).

    For scoring one set of captions while the caller does something else, e.g. generates the next split. The
    thread does not show progress bars unless ``progress=True`` is passed.
    """
    kwargs.setdefault("progress", False)
    executor = ThreadPoolExecutor(1, thread_name_prefix="metrics")
    try:
        return executor.submit(compute_metrics, list(results), gt, **kwargs)
    finally:
        executor.shutdown(wait=False)  # the thread ends when the job does


class MetricSession:
    """Scores captions against one ground truth, starting what does not depend on them as early as asked.

    `prepare` (or `prepare_metrics`) loads CLIP and the perplexity LM and starts, in background threads:
    encoding every GT image (and the distractors) and every prefixed reference caption with CLIP; tokenising the
    references and starting METEOR's JVMs (~10 s of one core each to load the paraphrase table). `score` then
    validates the results (the policy of the module docstring, with the same messages, before anything is
    computed), runs the COCO group in a background thread and the model-based groups in the calling thread,
    waiting for the prepared parts when it needs them. If `score` is called without an earlier `prepare`, the
    preparation covers only the scored images. CLIP work in a background thread runs on its own CUDA stream, so
    it interleaves with the caller's kernels (e.g. captioning) rather than queueing behind them.

    Embeddings are kept by resolved image path and by exact text, so each is computed once whatever the groups
    and whichever images end up scored; an image or text not encoded beforehand is encoded in `score`.

    ``overlap=False`` starts no thread: `prepare` only loads the models and `score` computes each group in turn
    (COCO, length, diversity, PPL, CLIP, ...), the reference for the overlapped path.

    `timings` holds wall seconds per phase, accumulated across threads (phases overlap): ``coco`` (the COCO
    group in `score`) with ``coco_tokenize``, ``bleu``, ``meteor``, ``rouge``, ``cider``; ``length``,
    ``diversity``; ``clip_load``, ``clip_images``, ``clip_texts``, ``retrieval``, ``clipscore``; ``ppl_load``,
    ``ppl``; and ``toy_grounding``, ``finecapeval``, ``chair`` when asked.
    """

    def __init__(
        self,
        gt: dict | str | Path,
        metrics: Sequence[str] | None = DEFAULT_METRICS,
        *,
        images_root: str | Path | None = None,
        clip_model: str | Path = DEFAULT_CLIP,
        ppl_model: str | Path = DEFAULT_LM,
        extra_pool_images: str | Path | Sequence[str | Path] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        text_batch_size: int = 256,
        ppl_batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = True,
        verbose: bool = False,
        finecapeval: str | Path | FineCapEvalData | None = None,
        instances: str | Path | Mapping[Hashable, Iterable[str]] | None = None,
        skip_missing_instances: bool = False,
        overlap: bool = True,
        meteor_processes: int | None = None,
    ):
        self.groups = _check_groups(metrics)
        self.gt, self.gt_name = read_coco_gt(gt)
        self.refs = references_by_image(self.gt)
        self.images_root, self.extra_pool_images = images_root, extra_pool_images
        self.clip_model, self.ppl_model, self.device = clip_model, ppl_model, resolve_device(device)
        self.batch_size, self.text_batch_size, self.ppl_batch_size = batch_size, text_batch_size, ppl_batch_size
        self.num_workers, self.progress, self.verbose = num_workers, progress, verbose
        self.finecapeval, self.instances, self.skip_missing_instances = finecapeval, instances, skip_missing_instances
        self.overlap, self.meteor_processes = overlap, meteor_processes
        self.timings: dict[str, float] = {}
        self._meteor: MeteorScorer | None = None
        self._clip = self._lm = self._origin_stream = None
        self._pool = ThreadPoolExecutor(3, thread_name_prefix="metrics-prepare") if overlap else None
        self._tasks: dict[str, _Task] = {}
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    # ---- preparation ------------------------------------------------------------------------------
    def prepare(self) -> MetricSession:
        """Load CLIP and the perplexity LM (in the calling thread) and start the other caption-independent work for
        every GT image in background threads (idempotent). With ``overlap=False`` only the models are loaded.

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
            self._started = True
            ids = [image["id"] for image in self.gt["images"]] if ids is None else list(ids)
            # The models are copied to the device on this thread's stream; background CUDA work waits for it.
            self._origin_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            if self.groups & {"coco", "spice", "finecapeval"}:  # first: METEOR's JVMs start loading at once
                self._tasks["coco"] = _Task(lambda: self._prepare_coco(ids), self._pool)
            if self.groups & IMAGE_METRICS:
                with self._timed("clip_load"):
                    self._clip = load_clip(self.clip_model, self.device)
                self._tasks["clip"] = _Task(lambda: self._prepare_clip(ids), self._pool)
            if "ppl" in self.groups:
                with self._timed("ppl_load"):
                    self._lm = load_language_model(self.ppl_model, self.device)
        return self

    # With overlap these run in the pool's threads: no progress bars there (bars from several threads interleave).
    def _prepare_coco(self, ids: list) -> dict[str, str]:
        java = coco.java_available()  # through the module, as coco_caption_metrics asks it (tests patch it there)
        if java and self.overlap:
            self._meteor = MeteorScorer(self.meteor_processes)  # the JVMs load while the references are tokenised
        if not self.overlap:
            return {}
        with self._timed("coco_tokenize"):
            return tokenize_texts([r for i in ids for r in self.refs.get(i, ())], java)

    def _prepare_clip(self, ids: list) -> tuple[_Embeddings, _Embeddings]:
        images, texts = _Embeddings(), _Embeddings()
        if not self.overlap:
            return images, texts
        with _side_stream(self.device, after=self._origin_stream):
            # Best effort: files missing now are reported by `score` if a scored image needs them.
            paths = self._image_files(ids)
            with contextlib.suppress(MetricInputError, OSError):
                paths += extra_pool_paths(self.extra_pool_images, exclude=paths)
            with self._timed("clip_images"):
                self._encode_images(images, paths, progress=False)
            if "clipscore" in self.groups:
                flat = [r for i in ids for r in self.refs.get(i, ())]
                with self._timed("clip_texts"):
                    self._encode_texts(texts, with_prefix(flat, CLIPSCORE_PREFIX), progress=False)
        return images, texts

    def _image_files(self, ids: list) -> list[Path]:
        if self.images_root is None or not Path(self.images_root).is_dir():
            return []
        root = Path(self.images_root)
        names = {image["id"]: image.get("file_name") for image in self.gt["images"]}
        return [root / names[i] for i in ids if names.get(i) and os.path.isfile(root / names[i])]

    def _encode_images(self, cache: _Embeddings, paths: Sequence[Path], progress: bool) -> None:
        cache.add_missing(paths, lambda todo: encode_images(todo, self._clip, self.batch_size, self.num_workers,
                                                           progress), key=_path_key)

    def _encode_texts(self, cache: _Embeddings, texts: Sequence[str], progress: bool) -> None:
        cache.add_missing(texts, lambda todo: encode_texts(todo, self._clip, prefix="",
                                                          batch_size=self.text_batch_size, progress=progress))

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, results: Sequence[dict], results_name: str = "<results>",
              timings: dict[str, float] | None = None) -> dict[str, float | int | None]:
        """`compute_metrics` of `results` against this session's GT and groups (see there for the dict).

        May be called again (e.g. captions of another checkpoint on the same images); models, embeddings, tokens
        and JVMs are kept until `close`.
        """
        if self._closed:
            raise RuntimeError("this MetricSession is closed")
        groups, gt, gt_name, refs = self.groups, self.gt, self.gt_name, self.refs
        scored, num_missing = align_results(results, gt, results_name, gt_name)
        ids = [image_id for image_id, _ in scored]
        captions = [caption for _, caption in scored]
        if groups & {"coco", "spice", "clipscore", "finecapeval"}:
            without = [i for i in ids if not refs[i]]
            if without:
                raise MetricInputError(f"{gt_name}: {len(without)} scored images have no reference caption "
                                       f"(first: {without[:_SHOW]})")
        image_paths = _image_paths(gt, gt_name, ids, self.images_root, groups) if groups & IMAGE_METRICS else None
        # Checked before any metric runs, so a GT without scene attributes fails fast.
        toy_scenes = scenes_from_gt(gt, ids, gt_name) if "toy_grounding" in groups else None
        finecap = _finecap_inputs(gt, scored, self.finecapeval) if "finecapeval" in groups else None
        chair_groups = sorted(groups & {"chair", "chair_corrected"})
        instance_objects = _chair_instances(self.instances, chair_groups, self.skip_missing_instances) \
            if chair_groups else None
        self._start(ids)  # no-op after `prepare`

        out: dict[str, float | int | None] = {"num_images": len(ids), "num_missing": num_missing}
        timed = self._timed
        coco_future = None
        coco_pool = None
        try:
            if groups & {"coco", "spice", "finecapeval"}:  # finecapeval's "overall" score is the COCO metrics
                if self.overlap:  # BLEU/ROUGE/CIDEr hold the GIL ~4 s per 5,000 captions; the rest releases it
                    coco_pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-coco")
                    coco_future = coco_pool.submit(self._coco, scored)
                else:
                    out.update(self._coco(scored))
            if "length" in groups:
                with timed("length"):
                    out["cap_len"] = caption_length(captions)
            if "diversity" in groups:
                with timed("diversity"):
                    out.update(lexical_diversity(captions))
            if "ppl" in groups:  # first: the CLIP preparation (image decoding in workers) runs meanwhile
                with timed("ppl"):
                    out["PPL"] = gpt2_perplexity(captions, self._lm, self.ppl_batch_size, self.device, self.progress)
            if groups & IMAGE_METRICS:
                out.update(self._clip_metrics(captions, [refs[i] for i in ids], image_paths))
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
                        out.update(chair_scores(dict(scored), refs, objects, variant="original" if group == "chair"
                                                else "corrected", source=source))
            if coco_future is not None:
                out.update(coco_future.result())
        finally:
            if coco_pool is not None:
                coco_pool.shutdown(wait=True)  # never leave the COCO thread running past this call
        if timings is not None:
            timings.update(self.timings)

        ordered = {k: out[k] for k in COUNT_KEYS}
        for group in ALL_METRICS:
            if group in groups or (group == "coco" and groups & {"spice", "finecapeval"}):
                ordered.update({k: out.get(k) for k in METRIC_KEYS[group]})  # None: not computable here
        ordered.update({k: v for k, v in out.items() if k not in ordered})
        return ordered

    def _coco(self, scored: list[tuple[Hashable, str]]) -> dict[str, float]:
        tokens = self._tasks["coco"].result()
        coco_timings: dict[str, float] = {}
        with self._timed("coco"):
            scores = coco_caption_metrics([{"image_id": i, "caption": c} for i, c in scored], self.gt,
                                          spice="spice" in self.groups, verbose=self.verbose, meteor=self._meteor,
                                          tokens=tokens, overlap=self.overlap, timings=coco_timings)
        for name, seconds in coco_timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + seconds
        return scores

    def _clip_metrics(self, captions: list[str], references: list[list[str]], image_paths: list[Path]) -> dict:
        images, texts = self._tasks["clip"].result()
        out = {}
        pool_paths = list(image_paths)
        if "retrieval" in self.groups:
            pool_paths += extra_pool_paths(self.extra_pool_images, exclude=image_paths)
        with self._timed("clip_images"):
            self._encode_images(images, pool_paths, self.progress)
        prefixed = with_prefix(captions, CLIPSCORE_PREFIX)
        flat = with_prefix([r for refs in references for r in refs], CLIPSCORE_PREFIX)
        needed = (captions if "retrieval" in self.groups else []) + \
            (prefixed + flat if "clipscore" in self.groups else [])
        with self._timed("clip_texts"):
            self._encode_texts(texts, needed, self.progress)
        if "retrieval" in self.groups:
            with self._timed("retrieval"):
                out.update(retrieval_from_features(texts.get(captions), images.get(pool_paths, key=_path_key),
                                                   device=self.device))
        if "clipscore" in self.groups:
            with self._timed("clipscore"):
                owner = torch.repeat_interleave(torch.arange(len(references)),
                                                torch.tensor([len(r) for r in references]))
                scores = ref_clip_score_summary(images.get(image_paths, key=_path_key), texts.get(prefixed),
                                                texts.get(flat), owner)
            out["CLIPScore"], out["RefCLIPScore"] = scores["CLIPScore"], scores["RefCLIPScore"]
        return out

    def _timed(self, name: str) -> _Timer:
        return _Timer(self.timings, name)

    # ---- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for background work still running, stop METEOR's JVMs and drop the models (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._meteor is not None:
            self._meteor.close()
        self._tasks.clear()
        self._clip = self._lm = None

    def __enter__(self) -> MetricSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Task:
    """A job run in `pool` at once, or (no pool) in the thread that first asks for its result."""

    def __init__(self, fn: Callable, pool: ThreadPoolExecutor | None):
        self._fn = fn
        self._future = pool.submit(fn) if pool is not None else None
        self._done, self._value = False, None

    def result(self):
        if self._future is not None:
            return self._future.result()
        if not self._done:
            self._value, self._done = self._fn(), True
        return self._value


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
    import utils  # utils.atomic_open: the umask's permissions, not the temp file's 0600

    with utils.atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
        handle.write("\n")


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


def markdown_row(name: str, metrics: dict, lex_div: str = "distinct_1", optional: Sequence[str] = (),
                 high: dict | None = None) -> str:
    """One table row: Cap. Len., Lex. Div., R@1, R@5, CLIPScore, PPL, BLEU-4 x100, CIDEr x100, then the
    `optional` columns (e.g. CHAIR_s, CHAIR_i).

    A metric that is missing or None shows as "-". With ``high``, each cell is a range, ``metrics[key]-high[key]``
    (the spread of a row over seeds: `metrics` holds the minima, `high` the maxima).
    """
    cells = []
    for _, key, scale, fmt in _columns(lex_div, optional):
        value = metrics.get(key)
        if value is None or (high is not None and high.get(key) is None):
            cells.append("-")
        elif high is None:
            cells.append(fmt.format(scale * value))
        else:
            cells.append(f"{fmt.format(scale * value)}-{fmt.format(scale * high[key])}")
    return f"| {str(name).replace('|', '/')} | " + " | ".join(cells) + " |"


def summarize_seeds(runs: Sequence[dict]) -> tuple[dict, dict, dict]:
    """(mean, min, max) over ``runs`` (one metrics dict per seed) of every numeric key that all runs have.

    A key some run lacks or holds as None is left out of all three, so it shows as "-" rather than as the
    mean of the seeds that happen to have it.
    """
    keys = [key for key, value in runs[0].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and all(isinstance(run.get(key), (int, float)) for run in runs)]
    mean = {key: sum(run[key] for run in runs) / len(runs) for key in keys}
    return mean, {key: min(run[key] for run in runs) for key in keys}, {key: max(run[key] for run in runs)
                                                                         for key in keys}


def markdown_table(runs: Sequence[tuple[str, dict]], lex_div: str = "distinct_1",
                   spreads: Sequence[tuple[str, dict, dict]] = ()) -> str:
    """Header plus one row per ``(name, metrics)`` run, newline-terminated; an `OPTIONAL_COLUMNS` column appears
    when some run has its metric.

    ``spreads``: ``(name, minima, maxima)`` rows of runs repeated over seeds (`summarize_seeds`); when given, a
    second table with the same columns follows, each cell the min-max range.
    """
    optional = [key for _, key, _, _ in OPTIONAL_COLUMNS if any(m.get(key) is not None for _, m in runs)]
    lines = [markdown_header(lex_div, optional), *(markdown_row(n, m, lex_div, optional) for n, m in runs)]
    if spreads:
        lines += ["", "Spread over seeds (min-max):", "", markdown_header(lex_div, optional),
                  *(markdown_row(n, low, lex_div, optional, high=high) for n, low, high in spreads)]
    return "\n".join(lines) + "\n"


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
