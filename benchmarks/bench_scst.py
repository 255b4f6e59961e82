"""One self-critical (SCST) training step broken into its phases: sampling, greedy decoding, rewards, forward,
backward, on the toy set's shapes (or any preset and image size), in one run.

    python benchmarks/bench_scst.py                                   # tiny BLIP, 48 px, batch 32, CLIP-S + CIDEr-D
    python benchmarks/bench_scst.py --preset base --image-size 384 --device cuda --clip-model openai/clip-vit-base-patch32

The step is steps.ScstStep itself (its phase clock), so what is timed is what training runs. Images and references
are the toy set's (built in a temporary folder); the CLIP of the CLIP-S reward is --clip-model, by default the
toy CLIP (cache/toy_clip, built on first use). Prints the machine, the median of --repeats steps after --warmup,
and each phase's share of the step.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from training import steps  # noqa: E402
from machine import describe_machine  # noqa: E402
from data import AnnotationSource, CaptionTrainDataset, caption_collate, ensure_toy_dataset  # noqa: E402
from imaging import eval_transform  # noqa: E402
from metrics.rewards import RewardMixture  # noqa: E402
from models import BlipCaptioner  # noqa: E402

PHASES = ("sampling", "greedy", "rewards", "forward", "backward")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32, help="images per step (x --samples captions)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--reward", default='{"clip_s": 2.0, "cider_d": 1.0}', help="reward mapping (JSON)")
    parser.add_argument("--clip-model", default="cache/toy_clip", help="CLIP of the CLIP-S reward")
    parser.add_argument("--toy-root", default=None, help="toy set to use (default: a temporary one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="bench_scst_"))
    toy_root = Path(args.toy_root) if args.toy_root else workdir / "toy"
    paths = ensure_toy_dataset(toy_root)
    if args.clip_model == "cache/toy_clip" and not Path(args.clip_model).exists():
        from toy_pretrained import ensure_toy_clip

        ensure_toy_clip(args.clip_model, toy_root)

    torch.manual_seed(0)
    captioner = BlipCaptioner.build(args.preset, image_size=args.image_size, tokenizer=paths["vocab_file"]).to(device)
    dataset = CaptionTrainDataset(paths["train_file"], paths["image_root"], eval_transform(args.image_size),
                                  per_image=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=caption_collate,
                                         drop_last=True)
    rewards = RewardMixture(json.loads(args.reward), references=AnnotationSource(dataset).references(),
                            clip_model=args.clip_model, device=device, cache_dir=workdir / "cider_d")
    scst, _ = steps.split_objective({"scst": {"samples": args.samples, "max_tokens": args.max_tokens}})
    step = steps.ScstStep(scst, None, rewards)
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=1e-5)
    captioner.train()

    runs = []
    batches = iter(loader)
    for index in range(args.warmup + args.repeats):
        images, captions, image_ids, _ = next(batches)
        images = images.to(device)
        step.timings = {}
        start = time.perf_counter()
        loss, _, _ = step(captioner, captioner, images, captions, image_ids)
        before_backward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        step.timings["backward"] = end - before_backward
        step.timings["total"] = end - start
        if index >= args.warmup:
            runs.append(dict(step.timings))

    median = {name: statistics.median(run[name] for run in runs) for name in (*PHASES, "total")}
    print(f"machine: {describe_machine(device)}")
    print(f"step: {args.preset} BLIP at {args.image_size} px on {device}, {args.batch} images x {args.samples} samples "
          f"+ greedy, <= {args.max_tokens} tokens, reward {args.reward} (CLIP {args.clip_model}); "
          f"median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'phase':<10} {'ms':>9} {'share':>7}")
    for name in PHASES:
        print(f"{name:<10} {1000 * median[name]:9.1f} {100 * median[name] / median['total']:6.1f}%")
    print(f"{'total':<10} {1000 * median['total']:9.1f}")
    return median


if __name__ == "__main__":
    main()
