"""Time and peak memory of one forward+backward of each caption objective at BLIP's COCO shapes.

    python benchmarks/bench_objectives.py [--batch 32 --length 40 --vocab 30524 --repeats 10 --device cpu]

Compares MLE (label smoothing 0.1), the SMILE authors' reference code (a dense (B, N, V) mask filled with -inf)
and this repository's gather-based SMILE, in one run, and prints ratios to MLE. Peak memory is what the step adds
on top of its inputs: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU, the growth of the peak resident set
(``ru_maxrss``) of a fresh subprocess per objective, so no allocation of one objective hides another's. The
last line also compares what each SMILE adds beyond the (B, N, V) gradient of the logits, which any objective
must return.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.objectives import IGNORE_INDEX, mle, smile  # noqa: E402


def reference_smile(logits, targets):
    """The SMILE repo's BLIP code, on our (-100-ignored) targets: padding becomes id 0, as in BLIP's input_ids."""
    label = targets.clamp(min=0)
    bs, n, vs = logits.shape
    logits_mask = torch.zeros(bs, vs, device=logits.device).scatter_(1, label, True)
    logits_mask[:, 0] = 0
    logits_mask = logits_mask.unsqueeze(1).expand(-1, n, -1).clone()
    logits_mask[:, 0, :] = 1  # first-token MLE
    selected = logits.masked_fill(logits_mask == 0, float("-inf"))
    return F.cross_entropy(selected.view(-1, vs), label.view(-1), ignore_index=0)


VARIANTS = {"mle": mle, "smile_reference": reference_smile, "smile_ours": smile}


def make_inputs(batch, length, vocab, device):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=generator).to(device).requires_grad_()
    targets = torch.randint(5, vocab, (batch, length), generator=generator)
    lengths = torch.randint(length // 3, length + 1, (batch,), generator=generator)
    targets[torch.arange(length)[None, :] >= lengths[:, None]] = IGNORE_INDEX  # padding of ragged captions
    return logits, targets.to(device)


def step(fn, logits, targets):
    fn(logits, targets).backward()
    logits.grad = None


def measure(name, args):
    """Median seconds per forward+backward and the peak bytes the step adds to its inputs."""
    device = torch.device(args.device)
    logits, targets = make_inputs(args.batch, args.length, args.vocab, device)
    fn = VARIANTS[name]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, logits, targets)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(fn, logits, targets)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(fn, logits, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"name": name, "seconds": statistics.median(times), "extra_bytes": extra}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=30524)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one CPU subprocess
    args = parser.parse_args()

    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    results = {}
    for name in VARIANTS:
        if args.device == "cpu":  # fresh process: ru_maxrss is a high-water mark that never goes down
            command = [sys.executable, __file__, "--only", name] + [
                f"--{k}={v}" for k, v in vars(args).items() if k != "only"
            ]
            results[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        else:
            results[name] = measure(name, args)

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"shape: B={args.batch} N={args.length} V={args.vocab}, fp32, forward+backward, median of {args.repeats}")
    mle_result = results["mle"]
    print(f"{'objective':<16} {'ms':>9} {'x MLE time':>11} {'extra MiB':>10} {'x MLE mem':>10}")
    for name, result in results.items():
        print(
            f"{name:<16} {result['seconds'] * 1e3:9.1f} {result['seconds'] / mle_result['seconds']:11.2f} "
            f"{result['extra_bytes'] / 2**20:10.1f} {result['extra_bytes'] / mle_result['extra_bytes']:10.2f}"
        )
    ours, ref = results["smile_ours"], results["smile_reference"]
    # Every objective must return d(loss)/d(logits), one (B, N, V) fp32 tensor; what sits above it is overhead.
    gradient = args.batch * args.length * args.vocab * 4
    print(f"smile_ours / smile_reference: time {ours['seconds'] / ref['seconds']:.2f}x, "
          f"extra memory {ours['extra_bytes'] / ref['extra_bytes']:.2f}x, extra memory beyond the "
          f"{gradient / 2**20:.0f} MiB logits gradient {(ours['extra_bytes'] - gradient) / (ref['extra_bytes'] - gradient):.2f}x")


if __name__ == "__main__":
    main()
