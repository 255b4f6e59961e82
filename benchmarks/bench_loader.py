"""Training-data throughput on the CPU: images/s per core of BLIP's train transform, stage by stage, and of
the DataLoader as the trainer builds it, against the rate a GPU consumes.

    python benchmarks/bench_loader.py                                  # COCO-sized JPEGs, 384 px
    python benchmarks/bench_loader.py --workers 1,2 --gpu-rate 473     # images/s one H100 trains at (docs/performance.md)
    python benchmarks/bench_loader.py --sections e2e --e2e-images 512 --workers 4,8 --batch-size 64  # on a GPU

Images: ``--images`` synthetic JPEGs of ``--source-size`` (default 640x480, COCO's most common size, quality
90), smooth colour fields with noise so that JPEG decoding does real work.

Printed, with the machine:

* per stage, one process and one thread (= one core): JPEG decode to RGB (PIL), RandomResizedCrop to
  ``--image-size`` (bicubic, scale 0.5-1), horizontal flip, BLIP's RandAugment(2, 5) (timm's ops), ToTensor
  and Normalize; the train transform as a whole, and the eval transform for comparison. Each stage's
  milliseconds per image and images/s per core; the stage order and arguments are BLIP's caption fine-tuning
  pipeline (data/transforms.py), which is what the original code ran per image, so the per-core figure is
  also that of BLIP's loader (BLIP's own cv2 RandAugment is not a dependency here and is not run);
* the DataLoader of ``training._loader`` (``CaptionTrainDataset``, batch 32, pinned memory when CUDA is present,
  persistent workers, prefetch) for each ``--workers`` count: images/s, per worker, and the cores needed to
  keep up with ``--gpu-rate``;
* reduced-size JPEG decoding (``Image.draft``): the largest DCT scale that still leaves enough pixels for an
  exact crop at the smallest scale and most extreme aspect ratio, and the decode time it would save;
* end to end (``e2e``), through the same DataLoader over ``--e2e-images`` JPEG files on disk (generated, or the
  ``*.jpg`` of ``--image-dir``), one epoch after a warm-up batch: the PIL path (workers decode and augment, the
  batch is copied to ``--device``) against the device path of data/gpu_augment.py (workers read the bytes and
  draw the parameters; decoding and augmentation run batched on ``--device``, default cuda when present), per
  ``--workers`` count, images/s of each and their ratio; and the device's decode + augment alone on collated
  batches (no loader), the most images/s the device path can give. On a CPU "device" that work runs in the main
  process with all torch threads, next to the workers: CPU numbers say little about a GPU.

``--sections`` picks any of stages, loader, draft, e2e (default: all).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402

import training  # noqa: E402
from data import CaptionTrainDataset, build_train_transform, caption_collate  # noqa: E402
from data.gpu_augment import build_device_pipeline  # noqa: E402
from data.transforms import BlipRandAugment  # noqa: E402
from imaging import CLIP_MEAN, CLIP_STD, eval_transform  # noqa: E402


def make_jpegs(directory: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """``count`` JPEGs of ``size`` (width, height): low-frequency colour fields plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    width, height = size
    names = []
    for index in range(count):
        coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        name = f"img_{index:04d}.jpg"
        Image.fromarray(pixels).save(directory / name, quality=90)
        names.append(name)
    return names


def time_per_image(function, inputs, repeats: int) -> float:
    """Median over ``repeats`` passes of the mean seconds per input."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in inputs:
            function(item)
        passes.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(passes)


def decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def stage_table(paths: list[Path], image_size: int, min_scale: float, repeats: int) -> list[tuple[str, float]]:
    """Seconds per image of each train-transform stage, each fed the previous stage's outputs."""
    torch.manual_seed(0)
    crop = transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC)
    flip = transforms.RandomHorizontalFlip()
    augment = BlipRandAugment()
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    train = transforms.Compose([crop, flip, augment, to_tensor])
    decoded = [decode(p) for p in paths]
    cropped = [crop(image) for image in decoded]
    rows = [("decode JPEG -> RGB", time_per_image(decode, paths, repeats)),
            ("RandomResizedCrop (bicubic)", time_per_image(crop, decoded, repeats)),
            ("horizontal flip", time_per_image(flip, cropped, repeats)),
            ("RandAugment(2, 5)", time_per_image(augment, cropped, repeats)),
            ("ToTensor + Normalize", time_per_image(to_tensor, cropped, repeats))]
    rows.append(("train transform (decode + all)", time_per_image(lambda p: train(decode(p)), paths, repeats)))
    evaluation = eval_transform(image_size)
    rows.append(("eval transform (decode + resize)", time_per_image(lambda p: evaluation(decode(p)), paths, repeats)))
    return rows


def loader_rate(root: Path, annotation: Path, image_size: int, workers: int, batches: int, batch_size: int = 32,
                randaugment: bool = True) -> float:
    """Images/s of the trainer's training DataLoader with ``workers`` processes (after one warm-up batch)."""
    dataset = CaptionTrainDataset(annotation, root, build_train_transform(image_size, randaugment=randaugment))
    config = {"data": {"num_workers": workers}, "train": {"batch_size": batch_size}, "seed": 0}
    loader, _ = training.loaders._loader(dataset, batch_size, True, caption_collate, config, seed=0)
    iterator = iter(loader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images, *_ = next(iterator)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def e2e_rate(root: Path, annotation: Path, image_size: int, workers: int, batch_size: int, randaugment: bool,
             device: torch.device, path: str) -> float:
    """Images/s over one epoch of the training DataLoader (after a warm-up batch), the images ending as the
    model's (B, 3, S, S) input on ``device``: ``path`` "pil" (build_train_transform in the workers) or "device"
    (data/gpu_augment.py)."""
    if path == "pil":
        transform, collate = build_train_transform(image_size, randaugment=randaugment), caption_collate

        def to_device(images):
            return images.to(device, non_blocking=True)
    else:
        pipeline = build_device_pipeline(image_size, randaugment=randaugment)
        transform, collate = pipeline.worker_transform, pipeline.collate

        def to_device(images):
            return images.to(device)
    dataset = CaptionTrainDataset(annotation, root, transform)
    config = {"data": {"num_workers": workers}, "train": {"batch_size": batch_size}, "seed": 0}
    loader, _ = training.loaders._loader(dataset, batch_size, True, collate, config, seed=0)
    iterator = iter(loader)
    to_device(next(iterator)[0])
    _synchronize(device)
    start, seen = time.perf_counter(), 0
    for images, *_ in iterator:
        seen += len(to_device(images))
    _synchronize(device)
    return seen / (time.perf_counter() - start)


def device_step_rate(root: Path, annotation: Path, image_size: int, batch_size: int, randaugment: bool,
                     device: torch.device, batches: int = 4) -> tuple[float, float]:
    """(images/s, ms per batch) of decode_and_augment alone, on batches collated beforehand (median of
    ``batches`` after a warm-up)."""
    pipeline = build_device_pipeline(image_size, randaugment=randaugment)
    dataset = CaptionTrainDataset(annotation, root, pipeline.worker_transform)
    torch.manual_seed(0)
    collated = [pipeline.collate([dataset[(b * batch_size + i) % len(dataset)] for i in range(batch_size)])[0]
                for b in range(batches + 1)]
    if device.type == "cuda":
        collated = [batch.pin_memory() for batch in collated]
    collated[0].to(device)
    _synchronize(device)
    times = []
    for batch in collated[1:]:
        start = time.perf_counter()
        batch.to(device)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return batch_size / seconds, seconds * 1e3


def e2e_report(args, source_size: tuple[int, int]) -> list[str]:
    """The end-to-end section's lines: PIL path vs device path per worker count, and the device step alone."""
    device = torch.device(args.device)
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    with tempfile.TemporaryDirectory() as workdir:
        if args.image_dir:
            root = Path(args.image_dir)
            names = sorted(path.name for path in root.glob("*.jpg"))[: args.e2e_images]
            annotation_dir = Path(workdir)
        else:
            root = annotation_dir = Path(workdir)
            names = make_jpegs(root, args.e2e_images, source_size, seed=1)
        # one caption per image: an epoch reads every file once
        annotation = annotation_dir / "train_e2e.json"
        annotation.write_text(json.dumps([{"image": n, "caption": "a synthetic picture"} for n in names]))
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            pil = e2e_rate(root, annotation, args.image_size, workers, args.batch_size, args.randaugment, device,
                           "pil")
            ours = e2e_rate(root, annotation, args.image_size, workers, args.batch_size, args.randaugment, device,
                            "device")
            rows.append((workers, pil, ours))
        step_rate, step_ms = device_step_rate(root, annotation, args.image_size, args.batch_size, args.randaugment,
                                              device)
    source = f"{len(names)} JPEGs from {args.image_dir}" if args.image_dir else \
        f"{len(names)} synthetic {args.source_size} JPEGs (quality 90) on disk"
    lines = [f"end to end, machine: {describe_machine(device)}",
             f"{source} -> {args.image_size} px, batch {args.batch_size}, RandAugment "
             f"{'on' if args.randaugment else 'off'}, device {device}; one epoch after a warm-up batch",
             f"{'DataLoader workers':<20} {'PIL path img/s':>15} {'device path img/s':>18} {'ratio':>7}"]
    lines += [f"{workers:<20} {pil:15.1f} {ours:18.1f} {ours / pil:7.2f}" for workers, pil, ours in rows]
    lines.append(f"device decode + augment alone ({device}, no loader): {step_rate:.1f} images/s, "
                 f"{step_ms:.1f} ms per batch of {args.batch_size}")
    return lines


def draft_report(path: Path, image_size: int, min_scale: float, repeats: int) -> str:
    """Whether reduced-size decoding could stay exact for this source size, and what it would save."""
    with Image.open(path) as image:
        width, height = image.size
    # RandomResizedCrop's smallest crop: area min_scale * W * H with aspect ratio 3/4 or 4/3; its short side must
    # still cover image_size output pixels for a downscaled decode to lose nothing.
    short_side = math.sqrt(min_scale * width * height * 3 / 4)
    scale = 1
    while short_side / (scale * 2) >= image_size and scale < 8:
        scale *= 2
    full = time_per_image(decode, [path] * 8, repeats)

    def drafted(p):
        with Image.open(p) as image:
            image.draft("RGB", (width // 2, height // 2))
            return image.convert("RGB")

    half = time_per_image(drafted, [path] * 8, repeats)
    verdict = (f"exact draft scale 1/{scale}" if scale > 1 else
               "no exact draft scale: the smallest crop's short side is "
               f"{short_side:.0f} px, under 2 x {image_size}")
    return (f"{width}x{height} source, {image_size} px crops at scale >= {min_scale}: {verdict}; decoding at 1/2 "
            f"would take {half * 1e3:.2f} ms instead of {full * 1e3:.2f} ms ({full / half:.2f}x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--source-size", default="640x480", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--min-scale", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=6,
                        help="timed batches of 32 per worker count (at most 5 x --images / 32 - 1)")
    parser.add_argument("--gpu-rate", type=float, default=473.0,
                        help="images/s the GPU trains at (default: BLIP-base 384 px, compiled, one H100; docs/performance.md)")
    parser.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size (loader and e2e)")
    parser.add_argument("--randaugment", action=argparse.BooleanOptionalAction, default=True,
                        help="BLIP's RandAugment in the loader and e2e sections (the stage table always times it)")
    parser.add_argument("--sections", default="stages,loader,draft,e2e",
                        help="comma-separated: stages, loader, draft, e2e")
    parser.add_argument("--e2e-images", type=int, default=256, help="JPEG files of the end-to-end section")
    parser.add_argument("--image-dir", default=None, help="read the end-to-end JPEGs (*.jpg) from here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the end-to-end device path decodes and augments")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    unknown = sections - {"stages", "loader", "draft", "e2e"}
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from stages, loader, draft, e2e")
    source_size = tuple(int(v) for v in args.source_size.lower().split("x"))
    torch.set_num_threads(1)

    if sections & {"stages", "loader", "draft"}:
        with tempfile.TemporaryDirectory() as workdir:
            root = Path(workdir)
            names = make_jpegs(root, args.images, source_size)
            paths = [root / name for name in names]
            annotation = root / "train.json"  # five captions per image, as COCO: five samples per image per epoch
            annotation.write_text(json.dumps([{"image": n, "caption": [f"a synthetic picture number {k}"
                                                                       for k in range(5)]} for n in names]))
            rows = stage_table(paths, args.image_size, args.min_scale, args.repeats) if "stages" in sections else []
            loader_rows = [(int(w), loader_rate(root, annotation, args.image_size, int(w), args.batches,
                                                args.batch_size, args.randaugment))
                           for w in args.workers.split(",")] if "loader" in sections else []
            draft = draft_report(paths[0], args.image_size, args.min_scale, args.repeats) if "draft" in sections \
                else None

        print(f"machine: {describe_machine(torch.device('cpu'))}")
        print(f"images: {args.images} synthetic {args.source_size} JPEGs (quality 90) -> {args.image_size} px; "
              f"median of {args.repeats} passes; one thread")
        if rows:
            print(f"{'stage':<34} {'ms/image':>9} {'images/s/core':>14}")
            for name, seconds in rows:
                print(f"{name:<34} {seconds * 1e3:9.2f} {1 / seconds:14.1f}")
            per_core = 1 / dict(rows)["train transform (decode + all)"]
            print(f"cores to feed {args.gpu_rate:.0f} images/s at the per-core rate: "
                  f"{math.ceil(args.gpu_rate / per_core)}")
        if loader_rows:
            print(f"{'DataLoader workers':<34} {'images/s':>9} {'per worker':>14}")
            for workers, rate in loader_rows:
                print(f"{workers:<34} {rate:9.1f} {rate / workers:14.1f}")
        if draft:
            print(f"reduced-size decoding: {draft}")
        print(f"(os.cpu_count() = {os.cpu_count()}; DataLoader rates with more workers than free cores are CPU-bound)")
    if "e2e" in sections:
        for line in e2e_report(args, source_size):
            print(line)


if __name__ == "__main__":
    main()
