"""caption_images.py against transformers' own ``pipeline("image-to-text")``: images/s from JPEG files on disk.

    python benchmarks/bench_caption.py                                              # CPU: tiny BLIP, 64 px
    python benchmarks/bench_caption.py --preset base --image-size 384 --images 8192 --device cuda   # one GPU

One BLIP captioner (random weights, seeded) is exported as a transformers folder (model + BlipProcessor, what
``scripts/export_hf.py`` writes), and ``--images`` random-noise JPEGs are written to a folder. Both sides then
caption that folder end to end, model loading included, with the same model and the same decoding: greedy
(``--num-beams`` 1), ``--max-length`` 30 tokens with BLIP's prompt "a picture of " (counted in the length, as both
BLIP and transformers' BLIP count it), ``--min-length`` equal to it by default, so that random weights write
every caption to full length on both sides (a random model would otherwise stop at arbitrary points).

* ours: ``caption_images.main([...])`` with ``--batch-size`` and ``--num-workers`` (decoding in DataLoader
  workers, bf16 autocast on CUDA, nvJPEG on CUDA);
* the pipeline: ``pipeline("image-to-text", model=FOLDER)`` (transformers 5 replaced that task with
  "image-text-to-text", which is used there) over the list of file paths, with the same prompt and ``generate_kwargs``, at each
  ``--pipeline-batch-sizes`` entry; its best is the reference.

Rounds alternate ours and the pipeline's (``--rounds``), so that load from other processes hits both alike, and
the best round of each counts. Printed: images/s of each, the ratio (target: >= 2x the pipeline's best), whether
the captions are identical (prompt stripped, whitespace normalised), and the machine. The pipeline's bf16: on
CUDA it runs the model in bf16 (``dtype``), its nearest equivalent of our autocast, so the comparison is
not our bf16 against its fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import machine_description, synthetic_vocab  # noqa: E402

import caption_images  # noqa: E402
from models import BlipCaptioner  # noqa: E402

PROMPT = "a picture of "


def write_jpegs(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """``count`` random-noise JPEGs of ``size`` x ``size`` (quality 90), named 000000.jpg, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def export_model(folder: Path, preset: str, image_size: int, seed: int) -> Path:
    torch.manual_seed(seed)
    (folder / "vocab").mkdir()
    vocab = synthetic_vocab(folder / "vocab")
    captioner = BlipCaptioner.build(arch=preset, image_size=image_size, tokenizer=vocab, prompt=PROMPT)
    return captioner.export_directory(folder / "model")


def run_ours(model: Path, images: Path, out: Path, args) -> tuple[float, float, dict[str, str]]:
    """Seconds for the whole command, seconds of its captioning loop alone (summary.json's captioning_seconds: no
    start-up, model load or merge), and key -> caption."""
    argv = ["--checkpoint", str(model), "--input", str(images), "--out", str(out), "--num-beams", "1",
            "--max-length", str(args.max_length), "--min-length", str(args.min_length), "--batch-size",
            str(args.batch_size), "--num-workers", str(args.num_workers), "--device", args.device, "--no-progress"]
    start = time.perf_counter()
    summary = caption_images.main(argv)
    seconds = time.perf_counter() - start
    captions = {}
    with out.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            captions[Path(record["path"]).stem] = record["caption"]
    return seconds, summary["captioning_seconds"], captions


def run_pipeline(model: Path, paths: list[Path], batch_size: int, args) -> tuple[float, float, dict[str, str]]:
    """Seconds for building the pipeline and captioning every path, seconds of the captioning call alone, and
    key -> caption.

    transformers 5 replaced the "image-to-text" task with "image-text-to-text", which takes the prompt as ``text``
    (one per image); 4.x's "image-to-text" takes it as ``prompt``.
    """
    import transformers
    from transformers import pipeline

    device = torch.device(args.device)
    options = {"dtype": torch.bfloat16} if device.type == "cuda" else {}
    generate_kwargs = {"num_beams": 1, "do_sample": False, "max_length": args.max_length,
                       "min_length": args.min_length}
    files = [str(path) for path in paths]
    start = time.perf_counter()
    if int(transformers.__version__.split(".")[0]) >= 5:
        captioner = pipeline("image-text-to-text", model=str(model), device=device, **options)
        called = time.perf_counter()
        outputs = captioner(images=files, text=[PROMPT.strip()] * len(files), batch_size=batch_size,
                            generate_kwargs=generate_kwargs)
    else:
        captioner = pipeline("image-to-text", model=str(model), device=device, **options)
        called = time.perf_counter()
        outputs = captioner(files, prompt=PROMPT.strip(), batch_size=batch_size, generate_kwargs=generate_kwargs)
    end = time.perf_counter()
    captions = {}
    for path, output in zip(paths, outputs, strict=True):
        captions[path.stem] = (output[0] if isinstance(output, list) else output)["generated_text"]
    return end - start, end - called, captions


def normalise(caption: str) -> str:
    """Prompt stripped, whitespace collapsed: the pipeline returns the prompt with the caption."""
    text = " ".join(caption.split())
    prompt = PROMPT.strip()
    return text[len(prompt):].strip() if text.startswith(prompt) else text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="architecture preset: tiny | base | large")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--jpeg-size", type=int, default=0, help="side of the JPEGs on disk (default: 2x image size)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--min-length", type=int, default=None, help="default: --max-length")
    parser.add_argument("--batch-size", type=int, default=64, help="ours, per generate call")
    parser.add_argument("--num-workers", type=int, default=2, help="ours: DataLoader workers decoding")
    parser.add_argument("--pipeline-batch-sizes", default="1,8,32,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.min_length = args.max_length if args.min_length is None else args.min_length
    jpeg_size = args.jpeg_size or 2 * args.image_size
    pipeline_batches = [int(size) for size in args.pipeline_batch_sizes.split(",")]

    print(machine_description(torch.device(args.device)))
    print(f"BLIP {args.preset} at {args.image_size} px, {args.images} JPEGs of {jpeg_size} px, greedy, max length "
          f"{args.max_length}, min length {args.min_length}; ours: batch {args.batch_size}, {args.num_workers} "
          f"workers; pipeline batch sizes {pipeline_batches}; best of {args.rounds} alternating rounds")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = export_model(tmp, args.preset, args.image_size, args.seed)
        paths = write_jpegs(tmp / "images", args.images, jpeg_size, args.seed)
        ours_best, pipeline_best = float("inf"), {size: float("inf") for size in pipeline_batches}
        ours_captions = pipeline_captions = None
        for round_index in range(args.rounds):
            seconds, loop, ours_captions = run_ours(model, tmp / "images", tmp / f"ours_{round_index}.jsonl", args)
            ours_best = min(ours_best, seconds)
            print(f"round {round_index}: ours {args.images / seconds:8.1f} images/s ({seconds:.1f} s, of which "
                  f"start-up {seconds - loop:.1f} s; loop alone {args.images / loop:.1f} images/s)", flush=True)
            for size in pipeline_batches:
                seconds, call, pipeline_captions = run_pipeline(model, paths, size, args)
                pipeline_best[size] = min(pipeline_best[size], seconds)
                print(f"round {round_index}: pipeline batch {size:3d} {args.images / seconds:8.1f} images/s "
                      f"({seconds:.1f} s, of which start-up {seconds - call:.1f} s; call alone "
                      f"{args.images / call:.1f} images/s)", flush=True)
        best_size = min(pipeline_best, key=pipeline_best.get)
        ours_rate = args.images / ours_best
        pipeline_rate = args.images / pipeline_best[best_size]
        same = sum(normalise(ours_captions[key]) == normalise(pipeline_captions[key]) for key in ours_captions)
        print(f"\nours: {ours_rate:.1f} images/s; pipeline at its best batch size ({best_size}): {pipeline_rate:.1f} "
              f"images/s; ratio {ours_rate / pipeline_rate:.2f}x (target >= 2x)")
        print(f"identical greedy captions: {same} of {len(ours_captions)}")
        if same < len(ours_captions):
            key = next(key for key in ours_captions if normalise(ours_captions[key]) != normalise(
                pipeline_captions[key]))
            print(f"first difference, {key}: ours {ours_captions[key]!r} / pipeline {pipeline_captions[key]!r}")


if __name__ == "__main__":
    main()
