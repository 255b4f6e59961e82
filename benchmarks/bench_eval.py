"""End-to-end evaluation time: caption N images, then score them with every metric of the paper.

    python benchmarks/bench_eval.py                                       # CPU: tiny models, 300 images
    python benchmarks/bench_eval.py --preset base --image-size 384 --beams 3 --max-length 75 --images 5000 \\
        --batch 256 --device cuda --clip-size b32 --gpt2-size small      # the Karpathy-test target, one GPU

What is timed, per mode, from the first image read to the last score:

* generation: a BLIP captioner (``--preset``, random weights, seeded) runs beam search over the N JPEGs, which
  a DataLoader decodes and resizes with ``--gen-workers`` workers as training.generate_captions' loader does
  (bf16 autocast on CUDA). ``--min-length`` defaults to ``--max-length``, so every caption costs the full
  decoding steps, as in bench_generate.py. Random weights caption gibberish, so the captions scored are
  synthetic COCO-like sentences (tests/metrics_fixtures.synthetic_caption), one per image, with 5 references
  per image: scoring then costs what it costs on COCO-like text.
* scoring: every metric of the paper: COCO (PTB tokeniser, BLEU, METEOR, ROUGE-L, CIDEr; Java), caption length,
  lexical diversity, CLIP self-retrieval R@1/5/10, CLIPScore/RefCLIPScore, GPT-2 perplexity, including loading
  CLIP and GPT-2 from disk.

Modes (``--modes``, ratios are to the first):

* ``legacy``: the code before metrics.suite.MetricSession: generate, then each group in turn, pycocoevalcap's
  own METEOR (one round trip per image, its JVM started when METEOR's turn comes), candidates and references
  PTB-tokenised together, 4 image-decoding workers, GPT-2 batches of 16 (rebuilt here from the public
  functions; CLIP text encoding already skips repeated texts).
* ``sequential``: generate, then ``compute_metrics(..., overlap=False)``: each group in turn in this thread.
* ``overlapped``: ``prepare_metrics`` before generating (loads CLIP and GPT-2, starts METEOR's JVMs, tokenises
  the references and CLIP-encodes the images and prefixed references in background threads while the captioner
  runs), then ``session.score``: the COCO group in a thread while GPT-2 and CLIP score.

CLIP and GPT-2 (``--clip-size``/``--gpt2-size``): ``tiny`` (the tests' 2-layer models) or the real sizes with
random weights, ``b32`` (ViT-B/32: vision width 768 x 12 layers at 224 px, patch 32; text width 512 x 12,
vocabulary 49408) and ``small`` (GPT-2 small: width 768 x 12 layers, vocabulary 50257), both with the tests'
small BPE tokenizers; random weights cost the same time as trained ones. Or ``--clip-model``/``--ppl-model``: a
local directory (the hub is not needed).

Printed: the machine, the phases of each mode (seconds; phases of one mode overlap in ``overlapped``), the total,
the scoring time left after generation ends (the part the overlap attacks), and whether the modes' scores agree
(COCO, counts and R@K exactly, CLIPScore/RefCLIPScore to 1e-4 on their 0-250 scale, PPL to 1e-6 relative).
The JPEGs are written just before, so they are in the page cache; a cold disk adds reading time to generation
and to CLIP's image decoding alike.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from bench_train import synthetic_vocab  # noqa: E402
from imaging import eval_transform, open_rgb  # noqa: E402
from machine import describe_machine  # noqa: E402
from metrics import (  # noqa: E402
    MetricOptions, caption_length, compute_metrics, encode_images, gpt2_perplexity, java_available, lexical_diversity,
    load_clip, load_language_model, prepare_metrics, ref_clip_score, self_retrieval,
)
from metrics.coco import BLEU_KEYS, default_meteor_processes, fallback_tokenize, ptb_tokenize, \
    references_by_image  # noqa: E402
from metrics_fixtures import build_tiny_clip, build_tiny_gpt2, synthetic_caption  # noqa: E402
from models import BlipCaptioner, resolve_architecture  # noqa: E402

PAPER_METRICS = ("coco", "length", "diversity", "retrieval", "clipscore", "ppl")
MODES = ("legacy", "sequential", "overlapped")
# Batch shapes differ between modes, so these differ by float rounding: CLIPScore terms are clipped at 0 and
# scaled to 0-250 (absolute tolerance, as tests/metrics/test_metrics_suite.py), PPL is a mean of exponentials (relative).
TOLERANCE = {"CLIPScore": (0.0, 1e-4), "RefCLIPScore": (0.0, 1e-4), "PPL": (1e-6, 0.0)}
PHASES = ("generation", "coco", "coco_tokenize", "bleu", "meteor", "rouge", "cider", "length", "diversity",
          "clip_load", "clip_images", "clip_texts", "retrieval", "clipscore", "ppl_load", "ppl")


# ---- inputs ---------------------------------------------------------------------------------------------------
def write_jpegs(folder: Path, count: int, distinct: int = 200, seed: int = 0) -> list[str]:
    """`count` 640x480 JPEG files (COCO's usual size; quality 90): smooth colour fields plus noise, so decoding
    costs what a photo costs. `distinct` of them are drawn, the others are copies of those (every file is read
    and decoded on its own; only drawing and encoding 5,000 would take a minute). Returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{i:012d}.jpg" for i in range(count)]
    for i, name in enumerate(names):
        if i >= distinct:
            shutil.copyfile(folder / names[i % distinct], folder / name)
            continue
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480),
                                                                                         Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name, quality=90)
    return names


def coco_like(names: list[str], refs_per_image: int = 5, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    images = [{"id": i + 1, "file_name": name} for i, name in enumerate(names)]
    annotations = [{"image_id": image["id"], "id": k, "caption": synthetic_caption(rng)}
                   for k, image in enumerate(im for im in images for _ in range(refs_per_image))]
    results = [{"image_id": image["id"], "caption": synthetic_caption(rng).lower().rstrip(".")} for image in images]
    return {"images": images, "annotations": annotations}, results


def metric_models(args, work: Path) -> tuple[Path, Path]:
    """CLIP and GPT-2 directories: given, or built with random weights at the requested sizes."""
    clip_dir = Path(args.clip_model) if args.clip_model else build_tiny_clip(work / "clip")
    if not args.clip_model and args.clip_size == "b32":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        tiny = CLIPConfig.from_pretrained(clip_dir).text_config
        text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, bos_token_id=tiny.bos_token_id,
                    eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32)
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(clip_dir)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            clip_dir)
    gpt2_dir = Path(args.ppl_model) if args.ppl_model else build_tiny_gpt2(work / "gpt2", n_positions=1024)
    if not args.ppl_model and args.gpt2_size == "small":
        from transformers import GPT2Config, GPT2LMHeadModel

        eos = GPT2Config.from_pretrained(gpt2_dir).eos_token_id
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                   bos_token_id=eos, eos_token_id=eos)).save_pretrained(gpt2_dir)
    return clip_dir, gpt2_dir


class _Jpegs(torch.utils.data.Dataset):
    """The images as the evaluation loader serves them: decoded, resized to a square, normalised."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.transform = paths, eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_rgb(self.paths[index])), index + 1


# ---- generation -----------------------------------------------------------------------------------------------
class Generator:
    def __init__(self, args, work: Path, device: torch.device):
        torch.manual_seed(0)
        arch = resolve_architecture(args.preset)
        arch = {"preset": args.preset, "max_positions": max(arch.max_positions, args.max_length)}
        self.captioner = BlipCaptioner.build(arch, image_size=args.image_size, tokenizer=synthetic_vocab(work),
                                             max_text_length=args.max_length).to(device).eval()
        self.args, self.device = args, device
        self.options = dict(num_beams=args.beams, max_length=args.max_length,
                            min_length=args.max_length if args.min_length is None else args.min_length)
        self.amp = device.type == "cuda"

    @torch.no_grad()
    def run(self, paths: list[Path]) -> int:
        """Caption every image (the captions themselves are dropped: random weights); returns the count."""
        loader = torch.utils.data.DataLoader(_Jpegs(paths, self.args.image_size), batch_size=self.args.batch,
                                             num_workers=self.args.gen_workers, pin_memory=self.amp)
        done = 0
        for pixels, _ in loader:
            with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext():
                ids = self.captioner.generate_ids(pixels.to(self.device, non_blocking=True), **self.options)
            done += int(ids.shape[0])  # (B, T) on the host: beam search's end-of-sequence checks synchronise
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return done


# ---- the modes ------------------------------------------------------------------------------------------------
def legacy_metrics(results, gt, images_root: Path, clip_dir, gpt2_dir, device, timings) -> dict:
    """The metric suite as it ran before MetricSession, from the public functions and pycocoevalcap's classes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return value

    out = {"num_images": len(results), "num_missing": 0}
    refs = references_by_image(gt)
    ids = [r["image_id"] for r in results]
    captions = [r["caption"] for r in results]
    coco_start = time.perf_counter()
    java = java_available()
    texts = captions + [c for i in ids for c in refs[i]]
    tokens = timed("coco_tokenize", lambda: ptb_tokenize(texts) if java else [fallback_tokenize(t) for t in texts])
    res = {i: [tokens[k]] for k, i in enumerate(ids)}
    gts, start = {}, len(ids)
    for i in ids:
        gts[i], start = tokens[start:start + len(refs[i])], start + len(refs[i])
    out.update(zip(BLEU_KEYS, timed("bleu", lambda: Bleu(4).compute_score(gts, res, verbose=0)[0])))
    if java:
        def meteor():
            scorer = Meteor()
            try:
                return scorer.compute_score(gts, res)[0]
            finally:
                del scorer
        out["METEOR"] = timed("meteor", meteor)
    out["ROUGE_L"] = timed("rouge", lambda: Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = timed("cider", lambda: Cider().compute_score(gts, res)[0])
    timings["coco"] = time.perf_counter() - coco_start
    out["cap_len"] = timed("length", lambda: caption_length(captions))
    out.update(timed("diversity", lambda: lexical_diversity(captions)))
    clip = timed("clip_load", lambda: load_clip(clip_dir, device))
    paths = [images_root / image["file_name"] for image in gt["images"]]
    workers = min(4, os.cpu_count() or 1) if len(paths) > 64 else 0  # the old default
    features = timed("clip_images", lambda: encode_images(paths, clip, 64, workers, progress=False))
    out.update(timed("retrieval", lambda: self_retrieval(captions, features, clip, progress=False)))
    scores = timed("clipscore", lambda: ref_clip_score(captions, [refs[i] for i in ids], features, clip,
                                                       progress=False))
    out["CLIPScore"], out["RefCLIPScore"] = scores["CLIPScore"], scores["RefCLIPScore"]
    lm = timed("ppl_load", lambda: load_language_model(gpt2_dir, device))
    out["PPL"] = timed("ppl", lambda: gpt2_perplexity(captions, lm, 16, device))
    return out


def run_mode(mode: str, generator: Generator, paths, gt, results, images_root, clip_dir, gpt2_dir, device, args):
    timings: dict[str, float] = {}
    options = MetricOptions(images_root=images_root, clip_model=clip_dir, ppl_model=gpt2_dir, device=device,
                            progress=False, meteor_processes=args.meteor_processes)
    start = time.perf_counter()
    session = prepare_metrics(gt, PAPER_METRICS, options) if mode == "overlapped" else None
    try:
        generated_at = time.perf_counter()
        generator.run(paths)
        timings["generation"] = time.perf_counter() - generated_at
        generated_at = time.perf_counter()
        if mode == "legacy":
            scores = legacy_metrics(results, gt, images_root, clip_dir, gpt2_dir, device, timings)
        elif mode == "sequential":
            scores = compute_metrics(results, gt, PAPER_METRICS, options, timings=timings, overlap=False)
        else:
            scores = session.score(results, timings=timings)
    finally:
        if session is not None:
            session.close()
    end = time.perf_counter()
    timings["total"], timings["after_generation"] = end - start, end - generated_at
    return scores, timings


def same_scores(a: dict, b: dict) -> list[str]:
    """Keys whose values differ: exactly, or beyond `TOLERANCE` (relative, absolute) for the model-based means."""
    differ = []
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        if key in TOLERANCE and x is not None and y is not None:
            rel, absolute = TOLERANCE[key]
            if abs(x - y) > max(rel * max(abs(x), abs(y)), absolute):
                differ.append(key)
        elif x != y:
            differ.append(key)
    return sorted(differ)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="captioner preset: tiny | base | large")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=None, help="default: --max-length")
    parser.add_argument("--images", type=int, default=300, help="images captioned and scored")
    parser.add_argument("--gen-images", type=int, default=None, help="caption only the first K of them (a CPU "
                        "convenience: scoring still covers --images); default all")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--gen-workers", type=int, default=None, help="generation loader workers (default min(8, "
                        "usable cores))")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip-size", choices=("tiny", "b32"), default="tiny")
    parser.add_argument("--gpt2-size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--clip-model", help="a local CLIP directory instead of a random one")
    parser.add_argument("--ppl-model", help="a local GPT-2 directory instead of a random one")
    parser.add_argument("--meteor-processes", type=int, default=None, help="METEOR JVMs (default: 1 per 4 cores)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; valid: {list(MODES)}")
    device = torch.device(args.device)
    if args.gen_workers is None:
        from metrics._common import usable_cores

        args.gen_workers = min(8, usable_cores())

    extras = (f"transformers {transformers.__version__}", f"java {'yes' if java_available() else 'no'}")
    print(f"machine: {describe_machine(device, extras=extras)}")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        names = write_jpegs(work / "images", args.images)
        gt, results = coco_like(names)
        clip_dir, gpt2_dir = metric_models(args, work)
        generator = Generator(args, work, device)
        paths = [work / "images" / n for n in names]
        generator.run(paths[: min(len(paths), args.batch)])  # warm-up: CUDA context, kernels, loader start
        print(f"setup (not timed): {args.images} JPEGs 640x480, CLIP {args.clip_model or args.clip_size}, GPT-2 "
              f"{args.ppl_model or args.gpt2_size}, captioner {args.preset} {args.image_size} px, warm-up batch: "
              f"{time.perf_counter() - start:.1f} s")
        gen_paths = paths[: args.gen_images] if args.gen_images else paths
        print(f"generation: {len(gen_paths)} images, batch {args.batch}, beams {args.beams}, max_length "
              f"{args.max_length}, min_length {generator.options['min_length']}, {args.gen_workers} loader workers, "
              f"{'bf16 autocast' if generator.amp else 'fp32'}; scoring: {', '.join(PAPER_METRICS)}; "
              f"{len(results)} captions, {len(gt['annotations'])} references, METEOR JVMs "
              f"{args.meteor_processes or default_meteor_processes()}")
        runs = {mode: run_mode(mode, generator, gen_paths, gt, results, work / "images", clip_dir, gpt2_dir, device,
                               args) for mode in modes}

    first = modes[0]
    print(f"\n{'phase (s)':<17}" + "".join(f"{m:>12}" for m in modes))
    for phase in (*PHASES, "after_generation", "total"):
        if any(phase in t for _, t in runs.values()):
            print(f"{phase:<17}" + "".join(f"{runs[m][1].get(phase, float('nan')):12.2f}" for m in modes))
    print(f"{'x ' + first + ' (total)':<17}" + "".join(
        f"{runs[first][1]['total'] / runs[m][1]['total']:12.2f}" for m in modes))
    scores = runs[first][0]
    print("scores (" + first + "): " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in scores.items()))
    for mode in modes[1:]:
        differ = same_scores(scores, runs[mode][0])
        print(f"{mode} vs {first}: {'same scores' if not differ else 'DIFFERENT: ' + ', '.join(differ)}")


if __name__ == "__main__":
    main()
