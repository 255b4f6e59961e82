"""Training-step throughput of the BLIP captioner: the original-semantics path against the optimised one.

    python benchmarks/bench_train.py                                    # CPU: tiny preset, 48 px, batch 32
    python benchmarks/bench_train.py --preset base --image-size 384 --batch 32      # one GPU

Paths (same initial weights, same synthetic batch, same objective; timed in one process with their steps
interleaved round-robin, so load from other processes on the machine hits every path alike):

* ``baseline``: the reference point, the original BLIP code's choices: fp32, transformers' eager attention, plain (for-each)
  AdamW, full (B, L - 1, V) logits fed to the objective outside the model;
* ``optimised``: SDPA attention, bf16 autocast and fused AdamW on CUDA (fp32 and plain AdamW on CPU, as the
  trainer does), and the loss computed as the trainer does (``models.objectives.caption_loss``), which for pure
  SMILE never forms the full logits (models/objectives.py ``smile_from_features``);
* ``sdpa`` and ``smile_head`` (``--paths``): each optimisation alone, on top of the baseline;
* ``compiled`` / ``compiled_vision``: ``optimised`` under ``torch.compile`` (``model.compile: full | vision``);
  the compile time falls in the warm-up steps; ``compiled_graphs``: ``compiled`` with ``mode="reduce-overhead"``
  (CUDA graphs; this fixed-shape batch is their best case, since a new text length records a new graph);
* ``checkpointed``: ``compiled`` with activation checkpointing (``model.gradient_checkpointing``): less memory
  for larger micro-batches, at the price of a second forward;
* ``bf16_weights`` / ``compiled_bf16_weights``: ``optimised`` / ``compiled`` with the weights and activations in
  bf16 (no autocast, so no per-use casts of fp32 weights) and fp32 master weights and AdamW state, copied back
  to the bf16 weights after each step (CUDA only; on CPU they run as ``optimised``). Not an engine option yet:
  it is here to be measured first;
* ``NAME:mle`` runs a path with MLE instead of the ``--objective``, e.g. ``optimised:mle``.

``--micro-batch M`` runs every path that computes its loss in the model as the the trainer does with
``train.micro_batch_size: M``: the ``--batch`` as micro-batches through ``steps.accumulate_gradients`` (one
optimiser step per batch); then the "fwd" column holds forward and backward together. The paper's recipe on one
GPU is ``--batch 256 --micro-batch 64`` (8 GPUs x 32 in the paper).

Printed per path: images/s from the fastest step (load from other processes only adds time; the median step is
printed too), that step split into data (tokenise, targets, host-to-device copy of the prepared images; no image
decoding), forward (loss included), backward and optimiser; the peak memory; the MFU; ratios to the first path;
then the machine. The first-step loss of each path is printed as a check that all paths compute the same
objective (paths whose dropout kernels draw alike show the same value).

Memory, measured for each path alone in a fresh subprocess (two steps): on CUDA ``torch.cuda.max_memory_allocated``
(weights, optimiser state and activations); on CPU the growth of the process's peak resident set during the steps
(activations, gradients and optimiser state).

FLOPs per image (``train_flops_per_image``): multiply-adds of every matmul counted as 2 FLOPs; element-wise
ops, softmax and LayerNorm ignored; a training step counts 3x the forward (backward = 2x forward). With image
tokens T = 1 + (S / p)^2, text positions N (the batch's padded length), widths d_v / d_t, MLP widths m_v / m_t,
layers L_v / L_t, vocabulary V:

    vision  = 2 (S/p)^2 (3 p^2) d_v  +  L_v [ 2 T (4 d_v^2 + 2 d_v m_v) + 4 T^2 d_v ]
    text    = L_t [ 2 N (4 d_t^2 + 2 d_t m_t)            # self-attention q, k, v, out + FFN
                    + 4 N^2 d_t                          # self-attention scores and weighted sum (full square)
                    + 2 N (2 d_t^2) + 4 T d_v d_t        # cross-attention q, out; k, v from the image tokens
                    + 4 N T d_t ]                        # cross-attention scores and weighted sum
    head    = 2 N d_t^2 + 2 N d_t V                      # transform dense + vocabulary projection
    head    = 2 N d_t^2 + 2 N K d_t + 2 d_t V            # SMILE-aware head: K = N set slots (padded), plus the
                                                         # full projection at the first target position

MFU = images/s x 3 (vision + text + head) / peak FLOP/s, with each path's own head count (so a path that skips
work is not credited for it; compare paths by images/s). Peak: ``--peak-tflops``, else the datasheet dense bf16
peak for known GPUs, else (CPU) the fp32 matmul throughput measured in this run.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from machine import describe_machine  # noqa: E402
from models import BlipCaptioner, CaptionObjective  # noqa: E402
from models.captioner import resolve_architecture  # noqa: E402
from models.objectives import caption_loss  # noqa: E402
from training import steps  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts), FLOP/s.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

PATHS = {
    "baseline": dict(attention="eager", fast=False, fused_loss=False),
    "sdpa": dict(attention="sdpa", fast=False, fused_loss=False),
    "smile_head": dict(attention="eager", fast=False, fused_loss=True),
    "optimised": dict(attention="sdpa", fast=True, fused_loss=True),
    "compiled_vision": dict(attention="sdpa", fast=True, fused_loss=True, compile="vision"),
    "compiled": dict(attention="sdpa", fast=True, fused_loss=True, compile="full"),
    "compiled_graphs": dict(attention="sdpa", fast=True, fused_loss=True, compile="full", mode="reduce-overhead"),
    "checkpointed": dict(attention="sdpa", fast=True, fused_loss=True, compile="full", gradient_checkpointing=True),
    "bf16_weights": dict(attention="sdpa", fast=True, fused_loss=True, bf16_weights=True),
    "compiled_bf16_weights": dict(attention="sdpa", fast=True, fused_loss=True, compile="full", bf16_weights=True),
}
BERT_VOCAB = 30522  # + [DEC] and [ENC] = 30524 ids, as BLIP's decoder


def synthetic_vocab(directory: Path, size: int = BERT_VOCAB) -> Path:
    """A WordPiece vocab.txt of BERT-base's size: specials, the prompt words, then whole-word fillers w1, w2, ..."""
    path = directory / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of"]
    words += [f"w{i}" for i in range(1, size - len(words) + 1)]
    path.write_text("\n".join(words) + "\n")
    return path


def synthetic_captions(batch: int, vocab_size: int, seed: int = 0, words=(8, 20)) -> list[str]:
    """COCO-like lengths: 8-20 words drawn uniformly from the filler vocabulary (the longest sets the padding)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(words[0], words[1] + 1, (batch,), generator=generator).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(1, vocab_size - 8, (n,), generator=generator).tolist())
            for n in lengths]


def build_captioner(args, attention: str, vocab_file: Path, gradient_checkpointing: bool = False) -> BlipCaptioner:
    """The ``--preset`` captioner, seeded so every path starts from the same weights."""
    torch.manual_seed(0)
    return BlipCaptioner.build(args.preset, image_size=args.image_size, tokenizer=vocab_file, attention=attention,
                               gradient_checkpointing=gradient_checkpointing)


def train_flops_per_image(arch, image_size: int, text_positions: int, vocab: int, smile_head: bool = False) -> float:
    """Matmul FLOPs of one training step per image (3x the forward); formula in the module docstring."""
    patches = (image_size // arch.patch_size) ** 2
    tokens, dv, mv = patches + 1, arch.vision_width, arch.vision_mlp
    vision = 2 * patches * 3 * arch.patch_size**2 * dv
    vision += arch.vision_layers * (2 * tokens * (4 * dv * dv + 2 * dv * mv) + 4 * tokens * tokens * dv)
    n, dt, mt = text_positions, arch.text_width, arch.text_intermediate
    layer = 2 * n * (4 * dt * dt + 2 * dt * mt) + 4 * n * n * dt
    layer += 2 * n * 2 * dt * dt + 4 * tokens * dv * dt + 4 * n * tokens * dt
    text = arch.text_layers * layer
    head = 2 * n * dt * dt + (2 * n * n * dt + 2 * dt * vocab if smile_head else 2 * n * dt * vocab)
    return 3.0 * (vision + text + head)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PathRunner:
    """One path: its own captioner (same initial weights as every other path), optimiser and autocast setting."""

    def __init__(self, spec: str, args, vocab_file: Path):
        name, _, objective_name = spec.partition(":")
        self.spec, self.config = spec, PATHS[name]
        self.device = torch.device(args.device)
        self.fast = self.config["fast"] and self.device.type == "cuda"
        self.captioner = build_captioner(args, self.config["attention"], vocab_file,
                                         self.config.get("gradient_checkpointing", False)).to(self.device).train()
        if self.config.get("compile"):
            options = {"mode": self.config["mode"]} if "mode" in self.config else {}
            self.captioner.compile_parts(self.config["compile"], **options)
        self.objective = CaptionObjective(objective_name or args.objective)
        self.bf16_weights = self.fast and self.config.get("bf16_weights", False)
        self.micro_batch = args.micro_batch if self.config["fused_loss"] else None
        self.train_step = steps.TeacherForcedStep(self.objective)
        parameters = list(self.captioner.parameters())
        if self.bf16_weights:
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in parameters]
            self.captioner.to(torch.bfloat16)
            parameters = self.masters
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.05, fused=self.fast)
        self.phases = {"data": [], "forward": [], "backward": [], "optimiser": []}
        self.first_loss = None
        self.text_positions = None

    def _precision(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.fast and not self.bf16_weights else nullcontext()

    def _optimiser_step(self) -> None:
        if self.bf16_weights:  # bf16 gradients -> fp32 masters -> AdamW -> bf16 weights
            weights = list(self.captioner.parameters())
            for master, weight in zip(self.masters, weights):
                master.grad = None if weight.grad is None else weight.grad.float()
            self.optimizer.step()
            torch._foreach_copy_(weights, self.masters)
        else:
            self.optimizer.step()

    def step(self, images: torch.Tensor, captions: list[str], record: bool) -> None:
        device, captioner = self.device, self.captioner
        _sync(device)
        t0 = time.perf_counter()
        pixel_values = images.to(device, non_blocking=True)
        if self.bf16_weights:
            pixel_values = pixel_values.to(torch.bfloat16)
        if self.micro_batch:  # the trainer's unit: tokenising, forward and backward per micro-batch
            _sync(device)
            t1 = time.perf_counter()
            captioner.zero_grad(set_to_none=True)
            loss, _, _, _ = steps.accumulate_gradients(captioner, captioner, self.train_step, pixel_values, captions,
                                                       torch.arange(len(captions)), self.micro_batch, self._precision)
            input_ids = None  # the text length is read once, outside the timed phases (below)
            _sync(device)
            t2 = t3 = time.perf_counter()
        else:
            input_ids, attention_mask = captioner.tokenize(captions)
            targets = captioner.build_targets(input_ids, attention_mask)
            _sync(device)
            t1 = time.perf_counter()
            with self._precision():
                if self.config["fused_loss"]:
                    loss, _ = caption_loss(captioner, self.objective, pixel_values, input_ids, attention_mask,
                                           targets)
                else:
                    logits = captioner(pixel_values, input_ids, attention_mask)
            if not self.config["fused_loss"]:  # as training.train_one_epoch did: the objective outside autocast
                loss, _ = self.objective(logits, targets)
            _sync(device)
            t2 = time.perf_counter()
            captioner.zero_grad(set_to_none=True)
            loss.backward()
            _sync(device)
            t3 = time.perf_counter()
        self._optimiser_step()
        _sync(device)
        t4 = time.perf_counter()
        if self.first_loss is None:
            if input_ids is None:  # micro-batches: the first micro-batch's padded length
                input_ids, _ = captioner.tokenize(captions[: self.micro_batch])
            self.first_loss, self.text_positions = float(loss), int(input_ids.shape[1])
        if record:
            for key, seconds in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                self.phases[key].append(seconds)

    def summary(self) -> dict:
        totals = [sum(parts) for parts in zip(*self.phases.values())]
        fastest = min(range(len(totals)), key=totals.__getitem__)
        return {
            "path": self.spec, "objective": repr(self.objective), "attention": self.captioner.attention,
            "amp": self.fast and not self.bf16_weights, "fused_adamw": self.fast, "bf16_weights": self.bf16_weights,
            "micro_batch": self.micro_batch, "loss_in_model": self.config["fused_loss"],
            "smile_head": self.config["fused_loss"] and self.objective.supports_features,
            "step_seconds": totals[fastest], "median_step_seconds": statistics.median(totals),
            "phases": {key: values[fastest] for key, values in self.phases.items()}, "first_loss": self.first_loss,
            "text_positions": self.text_positions,
        }


def synthetic_batch(args) -> tuple[torch.Tensor, list[str]]:
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    if torch.device(args.device).type == "cuda":
        images = images.pin_memory()
    return images, synthetic_captions(args.batch, BERT_VOCAB)


def time_paths(specs: list[str], args, vocab_file: Path) -> list[dict]:
    """All paths in one process, steps interleaved round-robin: load from other processes hits all alike."""
    runners = [PathRunner(spec, args, vocab_file) for spec in specs]
    images, captions = synthetic_batch(args)
    for step in range(args.warmup + args.steps):
        for runner in runners:
            torch.manual_seed(step)  # the same dropout draws in every path (where their kernels draw alike)
            runner.step(images, captions, record=step >= args.warmup)
    results = [runner.summary() for runner in runners]
    for result in results:
        result["images_per_second"] = args.batch / result["step_seconds"]
    return results


def path_memory(spec: str, args, vocab_file: Path) -> dict:
    """Peak memory of two steps of one path, alone in this (fresh) process."""
    runner = PathRunner(spec, args, vocab_file)
    images, captions = synthetic_batch(args)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        runner.step(images, captions, record=False)
    if runner.device.type == "cuda":
        return {"memory_bytes": torch.cuda.max_memory_allocated(), "memory_kind": "peak allocated"}
    return {"memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
            "memory_kind": "peak RSS growth over the steps"}


def profile_path(spec: str, args, vocab_file: Path, rows: int = 25) -> None:
    """Print the ``rows`` most expensive kernels (device time) of two steps of one path."""
    from torch.profiler import ProfilerActivity, profile

    runner = PathRunner(spec, args, vocab_file)
    images, captions = synthetic_batch(args)
    for _ in range(args.warmup):
        runner.step(images, captions, record=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(2):
            runner.step(images, captions, record=False)
    sort_key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {spec}, two steps:")
    print(profiler.key_averages().table(sort_by=sort_key, row_limit=rows))


def vision_matmul_ceiling(arch, args) -> None:
    """bf16 (CUDA) / fp32 (CPU) throughput of the ViT's four matmul shapes at this batch and image size.

    A model whose every FLOP ran at these rates would reach this MFU; the ViT's widths (768 for base) keep
    these GEMMs well below a large square matmul's rate, which bounds what any path of this model can reach.
    """
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = args.batch * ((args.image_size // arch.patch_size) ** 2 + 1)
    width, mlp = arch.vision_width, arch.vision_mlp
    for name, (k, n) in {"qkv": (width, 3 * width), "attn out": (width, width), "fc1": (width, mlp),
                         "fc2": (mlp, width)}.items():
        rate = matmul_rate(rows, k, n, device, dtype, warmup=3, repeats=20)
        print(f"  {name:<9} ({rows} x {k}) @ ({k} x {n}): {rate / 1e12:7.1f} TFLOP/s {dtype}")


def matmul_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> float:
    """Achieved FLOP/s of an (m x k) @ (k x n) matmul on random data, after ``warmup`` untimed products."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def measured_peak(device: torch.device) -> tuple[float, str]:
    """Achieved matmul FLOP/s (fp32 on CPU, bf16 on CUDA): a practical ceiling for this machine."""
    size = 2048 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return matmul_rate(size, size, size, device, dtype, warmup=2, repeats=5), f"measured {dtype} {size}^3 matmul"


def machine_description(device: torch.device) -> str:
    return describe_machine(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="architecture preset: tiny | base | large")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--objective", default="smile", help="objective name from models/objectives.py")
    parser.add_argument("--paths", default="baseline,optimised,optimised:mle",
                        help=f"comma-separated NAME[:OBJECTIVE], NAME in {list(PATHS)}; ratios are to the first")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="run each batch as micro-batches of this size (gradient accumulation, as the trainer)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU, in TFLOP/s")
    parser.add_argument("--profile", metavar="PATH", default=None,
                        help="after timing, profile two steps of this path (e.g. optimised) and print its top kernels, "
                             "and the bf16 throughput of the ViT's own matmul shapes (a ceiling for MFU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # measure one path's memory, print JSON
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(path_memory(args.worker, args, Path(args.workdir) / "vocab.txt")))
        return
    device = torch.device(args.device)
    specs = [spec.strip() for spec in args.paths.split(",") if spec.strip()]
    for spec in specs:
        if spec.partition(":")[0] not in PATHS:
            parser.error(f"unknown path {spec!r}; valid names: {list(PATHS)}")
    with tempfile.TemporaryDirectory() as workdir:
        vocab_file = synthetic_vocab(Path(workdir))
        memory = []
        for spec in specs:  # a fresh process per path: peak counters see that path alone
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                       "--worker", spec, "--workdir", workdir]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"path {spec} failed:\n{done.stderr}")
            memory.append(json.loads(done.stdout.strip().splitlines()[-1]))
        results = time_paths(specs, args, vocab_file)
    for result, peak_memory in zip(results, memory):
        result.update(peak_memory)

    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda" and any(k in torch.cuda.get_device_name(device) for k in GPU_PEAK_BF16):
        key = next(k for k in GPU_PEAK_BF16 if k in torch.cuda.get_device_name(device))
        peak, peak_source = GPU_PEAK_BF16[key], f"{key} datasheet dense bf16"
    else:
        peak, peak_source = measured_peak(device)
    arch = resolve_architecture(args.preset)
    vocab = BERT_VOCAB + 2
    print(f"machine: {machine_description(device)}")
    micro = f" as micro-batches of {args.micro_batch}" if args.micro_batch else ""
    print(f"model: {args.preset} preset, {args.image_size} px, batch {args.batch}{micro}, V={vocab}, "
          f"text positions {results[0]['text_positions']}; {args.steps} steps per path after {args.warmup} warm-up")
    flops = {flag: train_flops_per_image(arch, args.image_size, results[0]["text_positions"], vocab, flag)
             for flag in (False, True)}
    print(f"training FLOPs per image: {flops[False] / 1e9:.3f} GFLOP (full-vocabulary head), {flops[True] / 1e9:.3f} "
          f"GFLOP (SMILE-aware head); MFU peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    base = results[0]
    header = (f"{'path':<16} {'img/s':>8} {'x':>6} {'step ms':>9} {'median':>9} {'data':>7} {'fwd':>8} {'bwd':>8} {'opt':>7} "
              f"{'mem MiB':>9} {'x mem':>6} {'MFU %':>6} {'loss@0':>9}")
    print(header)
    for r in results:
        phases = r["phases"]
        print(f"{r['path']:<16} {r['images_per_second']:8.1f} {r['images_per_second'] / base['images_per_second']:6.2f} "
              f"{r['step_seconds'] * 1e3:9.1f} {r['median_step_seconds'] * 1e3:9.1f} {phases['data'] * 1e3:7.1f} {phases['forward'] * 1e3:8.1f} "
              f"{phases['backward'] * 1e3:8.1f} {phases['optimiser'] * 1e3:7.1f} {r['memory_bytes'] / 2**20:9.1f} "
              f"{r['memory_bytes'] / max(base['memory_bytes'], 1):6.2f} "
              f"{100 * r['images_per_second'] * flops[r['smile_head']] / peak:6.2f} {r['first_loss']:9.4f}")
    print(f"step ms and its phases: the fastest step (load from other processes only adds time); median: the median "
          f"step; memory: {base['memory_kind']}; x: ratio to {base['path']}")
    for r in results:
        print(f"  {r['path']}: {r['objective']}, attention {r['attention']}, bf16 autocast {r['amp']}, "
              f"bf16 weights {r['bf16_weights']}, micro-batches {r['micro_batch']}, "
              f"fused AdamW {r['fused_adamw']}, loss in model {r['loss_in_model']}, SMILE-aware head {r['smile_head']}")

    if args.profile:
        print("matmul throughput at the ViT's shapes:")
        vision_matmul_ceiling(arch, args)
        with tempfile.TemporaryDirectory() as workdir:
            profile_path(args.profile, args, synthetic_vocab(Path(workdir)))


if __name__ == "__main__":
    main()
