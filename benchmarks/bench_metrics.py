"""Wall time of the full metric suite on a Karpathy-test-sized set, with tiny models on CPU.

    python benchmarks/bench_metrics.py                  # 5,000 captions, 25,000 references, 5,000 images
    python benchmarks/bench_metrics.py --num 1000 --no-baseline

Builds a tiny random CLIP and GPT-2 (tests/metrics_fixtures.py), 5,000 random 32 px PNGs and
COCO-format GT with 5 references per image, then times `compute_metrics` over every default
group (SPICE excluded: it downloads models). The model-based groups are dominated here by
tokenisation, image decoding and batching overhead rather than by the (tiny) networks, which is
the part this benchmark watches; real CLIP ViT-B/32 and GPT-2 add their GPU/CPU compute on top.

Baseline, measured in the same run on a subset: the one-caption-at-a-time loops that the batched
code replaces (GPT-2 perplexity with batch size 1, CLIP text features one text at a time); the
ratios show what batching buys.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import torch  # noqa: E402
import transformers  # noqa: E402

from metrics import (  # noqa: E402
    MetricOptions, caption_perplexities, compute_metrics, encode_texts, java_available, load_clip,
)
from metrics.perplexity import load_language_model  # noqa: E402
from machine import describe_machine  # noqa: E402
from metrics_fixtures import build_tiny_clip, build_tiny_gpt2, make_images, synthetic_coco  # noqa: E402


def machine() -> str:
    return describe_machine(extras=(f"transformers {transformers.__version__}",
                                    f"java {'yes' if java_available() else 'no'}",
                                    f"CUDA {'yes' if torch.cuda.is_available() else 'no'}"))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def report(name: str, loop_s: float, batched: str, batch_s: float) -> None:
    print(f"  {name:<10} one at a time {loop_s:6.2f} s | {batched} {batch_s:6.2f} s | speed-up x{loop_s / batch_s:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=5000, help="captions / images (default 5000)")
    parser.add_argument("--baseline-num", type=int, default=300, help="subset size for the unbatched baseline")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding workers (default: automatic)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        tmp = Path(tmp)
        (clip_dir, gpt2_dir), setup_s = timed(lambda: (build_tiny_clip(tmp / "clip"), build_tiny_gpt2(tmp / "gpt2")))
        names, images_s = timed(lambda: make_images(tmp / "images", args.num, size=32, seed=0))
        gt, results = synthetic_coco(args.num, file_names=names, refs_per_image=5, seed=0)
        print(f"setup (not timed below): tiny models {setup_s:.1f} s, {args.num} images written {images_s:.1f} s; "
              f"{len(results)} captions, {len(gt['annotations'])} references")

        timings: dict[str, float] = {}
        options = MetricOptions(images_root=tmp / "images", clip_model=clip_dir, ppl_model=gpt2_dir,
                                device=args.device, num_workers=args.workers, progress=False)
        scores, total = timed(lambda: compute_metrics(results, gt, options=options, timings=timings))
        print(f"\nfull suite on {args.num} captions: {total:.1f} s total")
        for group, seconds in timings.items():
            print(f"  {group:<12} {seconds:7.1f} s  ({100 * seconds / total:4.1f}%)")
        print("  scores: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in scores.items()))

        if args.no_baseline:
            return
        n = min(args.baseline_num, args.num)
        captions = [r["caption"] for r in results[:n]]
        print(f"\nbaseline on {n} captions (unbatched loops vs the batched code):")
        lm = load_language_model(gpt2_dir, args.device)
        _, loop_s = timed(lambda: [caption_perplexities([c], lm, batch_size=1) for c in captions])
        _, batch_s = timed(lambda: caption_perplexities(captions, lm, batch_size=16))
        report("PPL", loop_s, "batched (16)", batch_s)
        clip = load_clip(clip_dir, args.device)
        _, loop_s = timed(lambda: [encode_texts([c], clip, progress=False) for c in captions])
        _, batch_s = timed(lambda: encode_texts(captions, clip, batch_size=256, progress=False))
        report("CLIP text", loop_s, "batched (256)", batch_s)


if __name__ == "__main__":
    main()
