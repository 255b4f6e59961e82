"""The captioning job behind caption_images.py: inputs in, one caption per image out, resumable, on any number of
ranks.

``run(JobOptions(...)) -> summary``:

1. check the inputs and the output (`data.image_inputs.resolve_inputs`, `outputs.OutputLayout`) before anything
   heavy, so a typo is one error line in seconds;
2. join torchrun's process group if there is one (``utils.init_distributed``: nccl on CUDA, gloo on CPU), load the
   captioner (``Captioner.from_pretrained``: any checkpoint it reads) and resolve the decoding settings;
3. read what earlier runs wrote (every rank's part files) and skip it;
4. stream this rank's share through a DataLoader whose workers decode (`ImageRecords`), generate a batch at a time
   with ``Captioner.caption_pixels`` (so captions equal ``Captioner.caption``'s: same decode, same transform, same
   generate, bf16 autocast and the KV cache on CUDA), append the lines to this rank's part, flushed;
5. after a barrier, rank 0 merges the parts (file output), writes failed.jsonl and summary.json.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader

import utils
from data.image_inputs import (ImageRecord, ImageRecords, InputError, RecordBatch, collate_records,
                               decode_device_jpegs, failure_reason, open_upright_rgb, resolve_inputs)
from imaging import eval_transform

from .outputs import (OutputError, OutputLayout, PartWriter, check_settings, done_ids, finish_outputs,
                      write_sidecar)

logger = logging.getLogger("smile_blip")

# Generation options of the command line -> Captioner's names; None means "the checkpoint's own eval section,
# else models.inference.DEFAULT_GENERATION" (the defaults of configs/default.yaml's eval section).
GENERATION_OPTIONS = ("num_beams", "max_length", "min_length", "sample", "top_p", "repetition_penalty",
                      "no_repeat_ngram_size")
RERANKERS = ("clip",)


@dataclass
class JobOptions:
    """Everything caption_images.py passes in; the flags of the same names (``inputs`` is ``--input``)."""

    checkpoint: str
    inputs: list[str]
    out: str
    input_format: str | None = None
    image_column: str = "image"
    key_column: str | None = None
    out_format: str | None = None
    write_sidecar: bool = False
    batch_size: int = 32
    num_workers: int = 4
    device: str = "auto"
    device_decode: str = "auto"
    prompt: str | None = None
    generation: dict = field(default_factory=dict)
    candidates: int = 1
    rerank: str | None = None
    clip_model: str | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class Counts:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0


def check_options(options: JobOptions) -> None:
    """The options that need no file or model, checked first (``utils.ConfigError`` names the flag)."""
    for flag, value in (("--batch-size", options.batch_size), ("--candidates", options.candidates)):
        if value < 1:
            raise utils.ConfigError(f"{flag} must be >= 1, got {value}")
    if options.num_workers < 0:
        raise utils.ConfigError(f"--num-workers must be >= 0, got {options.num_workers}")
    if options.rerank is not None and options.rerank not in RERANKERS:
        raise utils.ConfigError(f"--rerank {options.rerank!r}: expected one of {', '.join(RERANKERS)}")
    if options.candidates > 1 and options.rerank is None:
        raise utils.ConfigError("--candidates N > 1 needs --rerank clip (which candidate to keep)")
    if options.rerank == "clip" and not options.clip_model:
        raise utils.ConfigError("--rerank clip needs --clip-model (a CLIP hub id or folder, e.g. cache/toy_clip)")
    if options.device_decode not in ("auto", "on", "off"):
        raise utils.ConfigError(f"--device-decode {options.device_decode!r}: expected auto, on or off")
    unknown = set(options.generation) - set(GENERATION_OPTIONS)
    if unknown:
        raise utils.ConfigError(f"unknown generation option(s) {sorted(unknown)}; valid: {list(GENERATION_OPTIONS)}")


def run(options: JobOptions) -> dict:
    """Caption every image of ``options.inputs`` not yet in ``options.out``; returns the summary (rank 0's has the
    whole job's counts; see `summarise`)."""
    start = time.perf_counter()
    check_options(options)
    layout = OutputLayout.from_args(options.out, options.out_format)
    layout.check_journal()
    sources = resolve_inputs(options.inputs, options.input_format, options.image_column, options.key_column)
    device = utils.init_distributed(options.device)
    rank, world_size = utils.get_rank(), utils.get_world_size()
    utils.configure_cpu_threads({"device": options.device, "data": {"num_workers": options.num_workers}})

    from models import Captioner

    captioner = Captioner.from_pretrained(options.checkpoint, device=device, prompt=options.prompt)
    given = {name: value for name, value in options.generation.items() if value is not None}
    try:
        generation = captioner.generation_settings(**given)
    except (TypeError, ValueError) as error:
        raise utils.ConfigError(f"generation options: {error}") from None
    clip = _load_clip(options, device)
    settings = {"checkpoint": str(options.checkpoint), "prompt": options.prompt, "generation": generation,
                "candidates": options.candidates, "rerank": options.rerank, "clip_model": options.clip_model}
    if utils.is_main():
        check_settings(layout, settings)
    utils.barrier()
    done = done_ids(layout)
    torch.manual_seed(options.seed + rank)  # sampling: repeatable for one world size

    device_jpeg = _use_device_jpeg(options, captioner, device)
    if options.write_sidecar and any(source.kind in ("shards", "parquet") for source in sources):
        logger.warning("--write-sidecar writes image.txt beside image files: the images of tar shards and parquet "
                       "inputs get none (their captions are in the output)")
    dataset = ImageRecords(sources, captioner.transform, done, rank, world_size, keep_rgb=options.rerank is not None,
                           device_jpeg=device_jpeg, image_column=options.image_column,
                           key_column=options.key_column)
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.num_workers,
                        collate_fn=collate_records, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if options.num_workers else None)
    logger.info("captioning %s -> %s on %s (rank %d of %d, %d worker(s), batch %d%s); decoding %s", ", ".join(
        f"{source.kind} {source.spec}" for source in sources), layout.out, device, rank, world_size,
        options.num_workers, options.batch_size, ", JPEGs decoded on the device" if device_jpeg else "", generation)

    counts = Counts()
    captions_part, failed_part = PartWriter(layout.part(rank)), PartWriter(layout.failed_part(rank))
    progress = _progress_bar(dataset, options)
    loop_start = time.perf_counter()
    try:
        for batch in loader:
            counts.skipped += batch.skipped
            failed = list(batch.failed)
            images, pixels, decode_failures = batch_pixels(batch, device, captioner)
            failed += decode_failures
            if images:
                lines = caption_batch(captioner, images, pixels, generation, options, clip, device)
                if options.write_sidecar:
                    for line in lines:
                        if "path" in line:
                            write_sidecar(line["path"], line["caption"])
                captions_part.write(lines)
            failed_part.write({**record.meta(), "reason": record.error} for record in failed)
            counts.captioned += len(images)
            counts.failed += len(failed)
            progress.update(len(images) + len(failed) + batch.skipped)
            progress.set_postfix(captioned=counts.captioned, failed=counts.failed, skipped=counts.skipped,
                                 refresh=False)
    finally:
        progress.close()
        captions_part.close()
        failed_part.close()
    loop_seconds = time.perf_counter() - loop_start
    everyone = utils.all_gather_object(asdict(counts))
    utils.barrier()
    summary = None
    if utils.is_main():
        totals = finish_outputs(layout)
        summary = summarise(everyone, totals, time.perf_counter() - start, loop_seconds, settings, options, layout,
                            world_size)
        utils.write_json(layout.beside("summary.json"), summary)
        logger.info("captioned %d, skipped %d (already done), failed %d (%s) in %.1f s: %.2f images/s; wrote %s",
                    summary["captioned"], summary["skipped"], summary["failed"], layout.beside("failed.jsonl"),
                    summary["wall_seconds"], summary["images_per_second"], layout.out)
    utils.barrier()
    return summary if summary is not None else {"rank": rank, **asdict(counts)}


def summarise(everyone: list[dict], totals: dict, wall: float, loop_seconds: float, settings: dict,
              options: JobOptions, layout: OutputLayout, world_size: int) -> dict:
    """summary.json: this run's counts over all ranks, its time and speed, the totals now in the output, and the
    settings (so a file of captions says how it was made)."""
    captioned = sum(counts["captioned"] for counts in everyone)
    return {
        "captioned": captioned,
        "skipped": sum(counts["skipped"] for counts in everyone),
        "failed": sum(counts["failed"] for counts in everyone),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(captioned / wall, 3) if wall > 0 else 0.0,
        "captioning_seconds": round(loop_seconds, 3),  # the loop alone: no start-up, no model load, no merge
        "captioning_images_per_second": round(captioned / loop_seconds, 3) if loop_seconds > 0 else 0.0,
        "output_captions": totals["captions"],
        "output_failed": totals["failed"],
        "world_size": world_size,
        "out": str(layout.out),
        "inputs": list(options.inputs),
        "batch_size": options.batch_size,
        "num_workers": options.num_workers,
        **settings,
    }


def _load_clip(options: JobOptions, device: torch.device):
    """The re-ranking CLIP, loaded once up front (a wrong --clip-model fails before any captioning)."""
    if options.rerank != "clip":
        return None
    from metrics.clip_metrics import load_clip

    return load_clip(options.clip_model, device)


def _use_device_jpeg(options: JobOptions, captioner, device: torch.device) -> bool:
    """Whether plain JPEGs are decoded on the device: ``--device-decode`` (auto: on CUDA), only where the family's
    transform is BLIP's ``eval_transform`` (the device path reproduces that one) and not when re-ranking (CLIP
    needs the decoded image in the worker anyway)."""
    wanted = options.device_decode == "on" or (options.device_decode == "auto" and device.type == "cuda")
    if not wanted:
        return False
    if repr(captioner.transform) != repr(eval_transform(captioner.image_size)):
        logger.info("--device-decode: this model family's transform is not BLIP's eval transform; decoding on CPU")
        return False
    if options.rerank is not None:
        logger.info("--device-decode: off with --rerank (CLIP needs the decoded images in the workers)")
        return False
    return True


def batch_pixels(batch: RecordBatch, device: torch.device, captioner) -> tuple[list[ImageRecord], torch.Tensor | None,
                                                                               list[ImageRecord]]:
    """(images, (n, 3, S, S) pixels on ``device`` in their order, images that failed to decode here).

    Worker-decoded pixels are used as they are; JPEG bytes are decoded on the device in one call. If that call
    fails (a JPEG the device decoder rejects), the batch's JPEGs are decoded with PIL here instead, which gives
    CPU-path pixels and names the files that really are broken.
    """
    images = batch.images
    if not images:
        return [], None, []
    jpeg_rows = [row for row, record in enumerate(images) if record.jpeg is not None]
    if not jpeg_rows:
        return images, batch.pixels.to(device, non_blocking=True), []
    size = captioner.image_size
    pixels = torch.empty(len(images), 3, size, size, device=device)
    if batch.pixels is not None:
        pixels[batch.pixel_rows] = batch.pixels.to(device, non_blocking=True)
    from data.datasets import ImageLoadError

    try:
        pixels[jpeg_rows] = decode_device_jpegs([images[row].jpeg for row in jpeg_rows],
                                                [images[row].size for row in jpeg_rows], device, size)
        return images, pixels, []
    except (ImageLoadError, RuntimeError) as error:
        logger.warning("device JPEG decode failed for a batch (%s); decoding its JPEGs with PIL", error)
    keep = list(range(len(images)))
    failed = []
    for row in jpeg_rows:
        try:
            pixels[row] = captioner.transform(open_upright_rgb(images[row].jpeg.numpy().tobytes())).to(device)
        except Exception as error:  # noqa: BLE001 -- a bad file is a failure record, as in the workers
            failed.append(ImageRecord("failed", images[row].key, images[row].location, error=failure_reason(error)))
            keep.remove(row)
    return [images[row] for row in keep], pixels[keep], failed


def caption_batch(captioner, images: list[ImageRecord], pixels: torch.Tensor, generation: dict,
                  options: JobOptions, clip, device: torch.device) -> list[dict]:
    """The output lines of one batch: ``{"key", "path" or "shard" (+ "row"), "caption"}`` (+ "clip_score")."""
    if options.rerank is None:
        captions = captioner.caption_pixels(pixels, **generation)
        return [{**record.meta(), "caption": caption} for record, caption in zip(images, captions)]
    from PIL import Image

    from .rerank import rerank_by_clip

    candidates = captioner.caption_candidates(pixels, options.candidates, **generation)
    pictures = [Image.fromarray(record.rgb) for record in images]
    captions, scores = rerank_by_clip(pictures, candidates, clip, device)
    return [{**record.meta(), "caption": caption, "clip_score": round(float(score), 6)}
            for record, caption, score in zip(images, captions, scores)]


def _progress_bar(dataset: ImageRecords, options: JobOptions):
    """tqdm on rank 0: images/s, and an ETA where the share's size is cheap to know (not for a folder walked
    lazily or tar shards, whose sizes need a full read)."""
    from tqdm import tqdm

    enabled = options.progress and utils.is_main()
    total = dataset.share_size() if enabled else None
    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, mininterval=1.0, smoothing=0.1)


USER_ERRORS_EXTRA = (InputError, OutputError)

__all__ = ["GENERATION_OPTIONS", "JobOptions", "RERANKERS", "USER_ERRORS_EXTRA", "batch_pixels", "caption_batch",
           "check_options", "run", "summarise"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors caption_images.py prints as one line with exit status 2: the other commands' and the inputs'."""
    import training

    return (*training.USER_ERRORS, *USER_ERRORS_EXTRA)

