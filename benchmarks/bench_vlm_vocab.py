"""SMILE against MLE at VLM vocabularies (Qwen2-VL's 152,064 tokens, Gemma 3's 262,144): one training step's time and
peak memory through the ``model.family: vlm`` path.

    python benchmarks/bench_vlm_vocab.py [--vocab 152064 262144 --batch 16 --length 32 --hidden 64 --layers 2
                                          --repeats 5 --threads 1 --device cpu]

The model is a real ``VlmCaptioner`` over a tiny random Qwen2-VL (tests/models/tiny_vlms.py's processor, word-level
tokenizer and chat template; its language model widened to ``--hidden``, ``--layers`` deep, and its vocabulary
raised to ``--vocab``: the tokenizer stays small, so the captions use low ids only, which changes no cost here).
A batch is ``--batch`` random 32 px images with captions of exactly ``--length`` tokens (end token included). Each
variant is one ``zero_grad(set_to_none=True)`` + forward + backward of the whole captioner (processor, vision tower,
language model, head, loss), fp32:

* ``mle``: ``caption_loss`` with ``CaptionObjective("mle")`` (label smoothing 0.1): the LM head forms the
  (B, T, V) logits, then cross-entropy;
* ``smile``: ``caption_loss`` with ``CaptionObjective("smile")``, the family's path: ``forward(head_features=True)``
  returns ``HeadFeatures`` and ``smile_from_features`` computes only each row's token-set logits (B, T, K) and the
  (B, V) logits of the first positions (first-token MLE); the (B, T, V) logits are never formed;
* ``smile_logits``: the naive route, the (B, T, V) logits from ``forward`` and then ``smile`` on them (the subset
  softmax gathered from the full logits).

Time: the variants run interleaved (``--repeats`` rounds of mle, smile, smile_logits after one warm-up round), and
each reports its best round, so a burst of other load on a shared machine hits every variant alike.

Peak memory on CPU: a fresh subprocess per variant builds the same model, runs one warm-up step, resets the peak
resident set (``/proc/self/clear_refs`` = 5, Linux >= 4.0), runs one step and reports ``VmHWM`` minus the resident
set before the step: what the step adds at its peak on top of the model and its inputs. The subprocess runs with
``MALLOC_MMAP_THRESHOLD_=65536``, which (set explicitly) keeps glibc from raising the threshold, so every buffer
above 64 KiB is its own mapping, returned to the system when freed: the resident set then follows the live tensors
instead of the allocator's cached heap. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes
before the step, in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import describe_machine  # noqa: E402

from models import CaptionObjective, VlmCaptioner  # noqa: E402
from models.objectives import caption_loss  # noqa: E402

VARIANTS = ("mle", "smile", "smile_logits")
PROMPT = "describe this image ."  # in the tiny tokenizer's vocabulary
MMAP_THRESHOLD = 65536


def build_captioner(vocab: int, hidden: int, layers: int, length: int) -> VlmCaptioner:
    """A ``VlmCaptioner`` over a random Qwen2-VL: tests/models/tiny_vlms.py's processor and template, a language
    model of ``hidden`` width (4 heads of 16, mrope sections 2 + 3 + 3) and ``layers`` layers, vocabulary ``vocab``,
    the vision merger projecting to ``hidden``. Seeded: every process builds the same weights."""
    from transformers import Qwen2VLForConditionalGeneration

    from tests.models.tiny_vlms import build_qwen2_vl

    torch.manual_seed(0)
    small, processor, end_id = build_qwen2_vl()
    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 16, num_key_value_heads=hidden // 32)
    layout = small.config.to_dict()
    for section in (layout, layout["text_config"]):  # 4.x keeps copies of the text fields at the top level
        section.pop("layer_types", None)  # derived from num_hidden_layers when the config is built
        section.update({name: value for name, value in fields.items() if section is not layout or name in layout})
    layout["vision_config"]["hidden_size"] = hidden  # the merger's output: the language model's width
    model = Qwen2VLForConditionalGeneration(type(small.config).from_dict(layout))
    model.generation_config.eos_token_id = end_id
    assert model.get_output_embeddings().weight.shape == (vocab, hidden)
    return VlmCaptioner(model, processor, prompt=PROMPT, max_text_length=length)


def make_batch(captioner: VlmCaptioner, batch: int, length: int):
    """``batch`` random 32 px images (CLIP-normalised, as the data pipeline makes them) and captions of
    ``length - 1`` random words of the tiny vocabulary plus the end token: ids, mask and targets (B, length)."""
    from tests.models.tiny_vlms import IMAGE_SIZE, WORDS

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    words = [w for w in WORDS if w not in ("user", "assistant", ":")]
    picks = torch.randint(len(words), (batch, length - 1), generator=generator).tolist()
    input_ids, attention_mask = captioner.tokenize([" ".join(words[i] for i in row) for row in picks])
    assert input_ids.shape == (batch, length), input_ids.shape
    return pixels, input_ids, attention_mask, captioner.build_targets(input_ids, attention_mask)


def step(captioner: VlmCaptioner, name: str, batch) -> float:
    """One zero_grad + forward + backward of variant ``name``; returns the loss."""
    pixels, input_ids, attention_mask, targets = batch
    captioner.zero_grad(set_to_none=True)
    if name == "smile_logits":
        loss, _ = CaptionObjective("smile")(captioner(pixels, input_ids, attention_mask), targets)
    else:
        loss, _ = caption_loss(captioner, CaptionObjective(name), pixels, input_ids, attention_mask, targets)
    loss.backward()
    return float(loss.detach())


def _setup(args, vocab: int):
    torch.set_num_threads(args.threads)
    captioner = build_captioner(vocab, args.hidden, args.layers, args.length).to(args.device).train()
    batch = make_batch(captioner, args.batch, args.length)
    return captioner, tuple(t.to(args.device) for t in batch)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes(args, vocab: int, name: str) -> int:
    """Peak bytes one step of ``name`` adds (module docstring); CPU: call it in a fresh process."""
    captioner, batch = _setup(args, vocab)
    step(captioner, name, batch)  # warm-up: lazy initialisation, the processor's first call
    captioner.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(captioner, name, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from the current one
    base = _status_kib("VmRSS")
    step(captioner, name, batch)
    return (_status_kib("VmHWM") - base) * 1024


def measure_memory(args, vocab: int) -> dict[str, int]:
    if args.device.startswith("cuda"):
        return {name: peak_bytes(args, vocab, name) for name in VARIANTS}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    result = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, "--memory-of", name, "--vocab", str(vocab), "--batch", str(args.batch),
                   "--length", str(args.length), "--hidden", str(args.hidden), "--layers", str(args.layers),
                   "--threads", str(args.threads), "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=REPO).stdout
        result[name] = json.loads(output.strip().splitlines()[-1])["peak_bytes"]
    return result


def measure_time(args, vocab: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best seconds per step of each variant over ``repeats`` interleaved rounds, and each variant's loss."""
    captioner, batch = _setup(args, vocab)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    losses = {name: step(captioner, name, batch) for name in VARIANTS}  # warm-up round
    best = {name: float("inf") for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            sync()
            start = time.perf_counter()
            step(captioner, name, batch)
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[152064])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="language model width (a multiple of 32)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # one CPU subprocess
    args = parser.parse_args(argv)
    if args.hidden % 32:
        parser.error("--hidden must be a multiple of 32 (heads of 16, key/value heads of 32)")

    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_bytes(args, args.vocab[0], args.memory_of)}))
        return
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine(args.device)}")
    print(f"shape: B={args.batch} T={args.length} D={args.hidden} layers={args.layers}, fp32, zero_grad + forward "
          f"+ backward of the vlm captioner (tiny Qwen2-VL), best of {args.repeats} interleaved rounds; memory: "
          + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
             "peak resident growth of one step, fresh process per variant"))
    for vocab in args.vocab:
        seconds, losses = measure_time(args, vocab)
        memory = measure_memory(args, vocab)
        logits_mib = args.batch * args.length * vocab * 4 / 2**20
        print(f"\nV={vocab}: the (B, T, V) fp32 logits are {logits_mib:.0f} MiB")
        print(f"{'variant':<13} {'ms':>9} {'x MLE time':>11} {'peak MiB':>9} {'x MLE mem':>10} {'loss':>8}")
        for name in VARIANTS:
            print(f"{name:<13} {seconds[name] * 1e3:9.1f} {seconds[name] / seconds['mle']:11.2f} "
                  f"{memory[name] / 2**20:9.1f} {memory[name] / memory['mle']:10.2f} {losses[name]:8.3f}")


if __name__ == "__main__":
    main()
