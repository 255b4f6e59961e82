"""Captioning throughput (beam search) with SDPA attention against transformers' eager BLIP attention.

    python benchmarks/bench_generate.py                                   # CPU: tiny preset, 48 px
    python benchmarks/bench_generate.py --preset base --image-size 384    # one GPU

One captioner (random weights, seeded) generates for one synthetic batch of ``--batch`` images (64) with beam
search (``--num-beams`` 3, ``--max-length`` 75) through ``BlipCaptioner.generate_ids``, switching its attention
between "eager" and "sdpa" (``models/attention.py``: the same weights), repeats interleaved so that load from
other processes hits both alike. The tiny preset's 64 text positions are raised to ``--max-length``.
``--min-length`` defaults to ``--max-length``: random weights would otherwise end captions at arbitrary lengths;
so every caption costs the full 75 decoding steps with the KV cache. On CUDA both run under bf16 autocast, as
``training.generate_captions`` does (``--no-amp`` for fp32).

``--total-images N`` then captions N synthetic images (``ceil(N / batch)`` batches, the last one partial, with
the fastest implementation of ``--implementations``) and prints the wall-clock time, the Karpathy-test figure
(N = 5000): model time only, no JPEG decoding (which the evaluation loader overlaps with generation).

Printed: captions/s and ms per batch from the fastest repeat (load from other processes only adds time),
generated tokens/s, the ratio to eager, the peak memory the call adds on CUDA, whether both produced the same
token ids, and the machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import machine_description, synthetic_vocab  # noqa: E402

from models import BlipCaptioner, resolve_architecture  # noqa: E402

IMPLEMENTATIONS = ("eager", "sdpa")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="architecture preset: tiny | base | large")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=75)
    parser.add_argument("--min-length", type=int, default=None, help="default: --max-length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated attention implementations to compare (ratios are to the first)")
    parser.add_argument("--total-images", type=int, default=0, help="then time captioning this many images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    min_length = args.max_length if args.min_length is None else args.min_length
    amp = device.type == "cuda" and not args.no_amp
    implementations = [name.strip() for name in args.implementations.split(",") if name.strip()]
    for name in implementations:
        if name not in IMPLEMENTATIONS:
            parser.error(f"--implementations: unknown {name!r}; valid: {list(IMPLEMENTATIONS)}")

    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        # The tiny preset has 64 positions; a 75-token beam needs more (base/large have 512).
        arch = resolve_architecture(args.preset)
        arch = {"preset": args.preset, "max_positions": max(arch.max_positions, args.max_length)}
        captioner = BlipCaptioner.build(arch, image_size=args.image_size,
                                        tokenizer=synthetic_vocab(Path(workdir)), max_text_length=args.max_length)
    captioner = captioner.to(device).eval()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    options = dict(num_beams=args.num_beams, max_length=args.max_length, min_length=min_length)

    def generate(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            return captioner.generate_ids(pixel_values, **options)

    times = {name: [] for name in implementations}
    extra_memory = dict.fromkeys(implementations, 0)
    outputs = {}
    for repeat in range(args.warmup + args.repeats):
        for name in implementations:
            captioner.set_attention(name)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            generated = generate(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
                extra_memory[name] = max(extra_memory[name], torch.cuda.max_memory_allocated() - before)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
            outputs[name] = generated.cpu()

    print(f"machine: {machine_description(device)}")
    print(f"model: {args.preset} preset, {args.image_size} px, batch {args.batch}, beams {args.num_beams}, "
          f"max_length {args.max_length}, min_length {min_length}, {'bf16 autocast' if amp else 'fp32'}; "
          f"fastest of {args.repeats} after {args.warmup} warm-up")
    first = implementations[0]
    generated_tokens = int((outputs[first][:, captioner.prompt_length:] != captioner.tokenizer.pad_token_id).sum())
    first_seconds = min(times[first])
    print(f"{'attention':<10} {'captions/s':>11} {'x ' + first:>8} {'ms/batch':>10} {'tokens/s':>10} {'extra MiB':>10}")
    for name in implementations:
        seconds = min(times[name])
        memory = f"{extra_memory[name] / 2**20:10.1f}" if device.type == "cuda" else f"{'n/a':>10}"
        print(f"{name:<10} {args.batch / seconds:11.2f} {first_seconds / seconds:8.2f} {seconds * 1e3:10.1f} "
              f"{generated_tokens / seconds:10.1f} {memory}")
    if len(implementations) > 1:
        same = all(torch.equal(outputs[first], outputs[name]) for name in implementations[1:])
        print(f"identical token ids ({' vs '.join(implementations)}): {same}")
    print(f"generated tokens per batch: {generated_tokens}")
    if args.total_images:
        fastest = min(implementations, key=lambda name: min(times[name]))
        captioner.set_attention(fastest)
        batches = [min(args.batch, args.total_images - start) for start in range(0, args.total_images, args.batch)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for size in batches:
            generate(images[:size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"{args.total_images} images in {len(batches)} batches ({fastest}): {seconds:.1f} s wall-clock, "
              f"{args.total_images / seconds:.1f} captions/s")


if __name__ == "__main__":
    main()
