"""Training throughput of a prefix captioner (CLIP tower -> mapper -> GPT-2) with and without cached image features.

    python benchmarks/bench_prefix_cache.py                              # CPU: a small ViT-B/32-shaped tower, 224 px
    python benchmarks/bench_prefix_cache.py --tower b32 --gpt2 small --batch 64 --device cuda     # one GPU
    python benchmarks/bench_prefix_cache.py --clip openai/clip-vit-base-patch32 --device cuda      # real weights

Both paths are the trainer's own: ``training.build_train_loader`` (``data.feature_cache: off`` / ``on``) over the toy
images (``data.ensure_toy_dataset`` in a temporary folder, resized to the tower's 224 px by CLIP's preprocessing),
``steps.TeacherForcedStep`` with MLE, the trainer's AdamW and autocast; a timed step is loader + host-to-device copy
+ forward + backward + optimiser step. ``uncached`` runs the frozen tower every step; ``cached`` reads its output
from the safetensors cache (data/feature_cache.py), whose one-off build time is printed too. The two paths are timed
in alternating rounds in one process (so load from other processes hits both alike) and each path's fastest round
counts; untimed steps before every round first drain the batches the idle path's loader workers prefetched.
Printed: images/s per path, the ratio cached / uncached, the cache build, and the machine.

Tower presets (random weights, CLIPVisionConfig fields; ``--clip`` loads a real one instead): ``small``: ViT-B/32's
layout (224 px, patch 32, 50 tokens) at width 256, 4 layers; ``b32``: ViT-B/32's sizes (width 768, 12 layers).
GPT-2 presets: ``tiny`` (width 64, 2 layers) or ``small`` (GPT-2 small's sizes: width 768, 12 layers), both with
the 453-token BPE of tests/fixtures/clipcap_original (so the output layer is far smaller than GPT-2's 50257).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import training  # noqa: E402
from training import steps  # noqa: E402
from data import ensure_toy_dataset  # noqa: E402
from machine import describe_machine  # noqa: E402
from models import CaptionObjective  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "clipcap_original"
TOWERS = {
    "small": dict(image_size=224, patch_size=32, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, projection_dim=256),
    "b32": dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=512),
}
GPT2 = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=2, n_positions=128),
    "small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
}


def build_config(args, work: Path, toy: dict, cache: str) -> dict:
    tokenizer = work / "tokenizer"
    if not tokenizer.is_dir():
        tokenizer.mkdir()
        shutil.copy(FIXTURE / "gpt2_vocab.json", tokenizer / "vocab.json")
        shutil.copy(FIXTURE / "gpt2_merges.txt", tokenizer / "merges.txt")
    entries = json.loads(Path(toy["train_file"]).read_text())
    images = list(dict.fromkeys(entry["image"] for entry in entries))[: args.images]
    keep = set(images)
    train_file = work / f"train_{args.images}.json"
    train_file.write_text(json.dumps([entry for entry in entries if entry["image"] in keep]))
    clip = args.clip or TOWERS[args.tower]
    content = {
        "device": args.device, "seed": 0,
        "model": {"family": "prefix", "max_text_length": 24, "prefix": {
            "gpt2": {"vocab_size": 453, **GPT2[args.gpt2]}, "clip": clip, "tokenizer": str(tokenizer),
            "mapping_type": "mlp", "prefix_length": 10}},
        "data": {"image_root": str(toy["image_root"]), "train_files": [str(train_file)], "augment": False,
                 "num_workers": args.workers, "feature_cache": cache, "feature_cache_dir": str(work / "features"),
                 "feature_cache_batch_size": args.batch},
        "amp": True,
        "train": {"batch_size": args.batch, "lr": 1.0e-5},
    }
    path = work / f"bench_{cache}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(content))
    return training.load_config(path)


def forever(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def timed_steps(loader_state, captioner, step, optimizer, config, device, count: int) -> float:
    """Seconds for ``count`` full training steps (next batch, copy, forward, backward, optimiser step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        images, captions, image_ids, _ = next(loader_state)
        images = images.to(device, non_blocking=True)
        with training.autocast_context(config, device):
            loss, _, _ = step(captioner, captioner, images, captions, image_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # waits for the device
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="small", help="random CLIP tower preset")
    parser.add_argument("--clip", default=None, help="a CLIP hub id or directory instead of a random tower")
    parser.add_argument("--gpt2", choices=sorted(GPT2), default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=320, help="toy training images (5 captions each)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before each round (default 2 x workers + 1: drains the prefetch queue)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data.num_workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-dir", default=None, help="toy data and cache folder (default: a temporary one)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prefix_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    toy = ensure_toy_dataset(work / "toy")
    device = torch.device(args.device)
    configs = {name: build_config(args, work, toy, mode) for name, mode in (("uncached", "off"), ("cached", "on"))}
    torch.manual_seed(0)
    captioner = training.build_captioner(configs["uncached"], device)
    captioner.train()
    optimizer = training.build_optimizer(captioner, configs["uncached"])
    step = steps.TeacherForcedStep(CaptionObjective("mle"))

    loaders, build_seconds = {}, None
    for name, config in configs.items():
        start = time.perf_counter()
        loader = training.build_train_loader(config, captioner).loader
        if name == "cached":
            build_seconds = time.perf_counter() - start
            cache_file = loader.dataset.cache_file
        loaders[name] = (config, forever(loader))
    # While one path is timed, the other's workers fill their prefetch queue (2 batches each); untimed steps
    # before every round drain it, so a round starts from an empty pipeline and times steady-state loading.
    warmup = 2 * args.workers + 1 if args.warmup is None else args.warmup
    best = {name: float("inf") for name in loaders}
    for _ in range(args.rounds):
        for name, (config, batches) in loaders.items():
            timed_steps(batches, captioner, step, optimizer, config, device, warmup)
            best[name] = min(best[name], timed_steps(batches, captioner, step, optimizer, config, device, args.steps))

    per_second = {name: args.steps * args.batch / seconds for name, seconds in best.items()}
    tower = args.clip or f"random {args.tower} ({TOWERS[args.tower]['num_hidden_layers']} layers, width "\
                         f"{TOWERS[args.tower]['hidden_size']}, {TOWERS[args.tower]['image_size']} px)"
    print(f"prefix captioner: tower {tower}; GPT-2 {args.gpt2}; batch {args.batch}; {args.images} toy images; "
          f"{args.workers} loader workers; device {device}; bf16 autocast {device.type == 'cuda' and configs['cached']['amp']}")
    for name, value in per_second.items():
        print(f"  {name:9s} {value:9.1f} images/s   (best of {args.rounds} rounds of {args.steps} steps)")
    print(f"  ratio cached / uncached: {per_second['cached'] / per_second['uncached']:.2f}x")
    print(f"  cache ready (built, or found in --work-dir) in {build_seconds:.1f} s for {args.images} images "
          f"({cache_file.stat().st_size / 2**20:.1f} MiB, {cache_file.name[:12]}...)")
    print(f"machine: {describe_machine(device)}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
