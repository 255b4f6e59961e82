"""Does best-of-N by CLIP-S (captioning/rerank.py, LAION-COCO's recipe) trim a captioner's wrong details? The toy
set answers exactly: each toy image's scene attributes are known (metrics/toy_grounding.py).

    python train_caption.py --config configs/toy/smile.yaml              # runs/toy/smile/checkpoint_best.safetensors
    python benchmarks/bench_rerank.py --checkpoint runs/toy/smile/checkpoint_best.safetensors

For every image of the toy split (``--split``, default test) the captioner (``models.Captioner``, the checkpoint's
own decoding settings otherwise) makes:

* the plain caption, beam search with ``--num-beams`` (3, the evaluation default);
* ``--candidates`` N (5) beams of one beam search of width max(``--num-beams``, N): its top beam, and the beam with
  the highest CLIP-S;
* N nucleus samples (``top_p`` of the checkpoint, seeded with ``--seed``): the first sample, and the best by CLIP-S.

Each row is scored with the toy grounding metric (colour+shape right, any attribute wrong: % of captions) and
CLIPScore (x100) with ``--clip-model`` (default the checkpoint's ``eval.clip_model``, the toy CLIP). CLIPScore is
what the re-ranking maximises, so its rise is by construction; the grounding columns are the independent test.
"Oracle" lines give the headroom: the share of images where at least one of the N candidates has colour and shape
right, and where every candidate has some attribute wrong. A CLIP probe says which attributes the CLIP can tell
apart at all: for each attribute, how often CLIP-S ranks the scene's own value first among template captions that
differ only there. Printed: the machine, the settings, the table, each
attribute's mentions and precision (which details the re-ranking adds or drops), the wall time of each stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from captioning.rerank import rerank_by_clip  # noqa: E402
from machine import describe_machine  # noqa: E402
from metrics.clip_metrics import clip_score, encode_images, load_clip  # noqa: E402
from metrics.toy_grounding import TOY_ATTRIBUTES, scenes_from_gt, toy_grounding  # noqa: E402
from models import Captioner  # noqa: E402
from models.checkpoint import load_checkpoint_file  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/toy/smile/checkpoint_best.safetensors")
    parser.add_argument("--toy-root", default=None, help="default: the checkpoint's data.toy_root (cache/toy)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--clip-model", default=None, help="default: the checkpoint's eval.clip_model")
    parser.add_argument("--candidates", type=int, default=5, help="N: beams and samples per image")
    parser.add_argument("--num-beams", type=int, default=3, help="the plain caption's beam width")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the table does not depend on them)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = load_checkpoint_file(args.checkpoint)[2].get("config") or {}
    toy_root = Path(args.toy_root or config.get("data", {}).get("toy_root") or "cache/toy")
    clip_source = args.clip_model or config.get("eval", {}).get("clip_model") or "cache/toy_clip"
    gt_file = toy_root / f"toy_{args.split}_gt.json"
    gt = json.loads(gt_file.read_text())
    ids = [image["id"] for image in gt["images"]]
    scenes, grammar = scenes_from_gt(gt, ids, str(gt_file))
    api = Captioner.from_pretrained(args.checkpoint, device=args.device)
    images = [api.load_image(toy_root / image["file_name"]) for image in gt["images"]]
    clip = load_clip(clip_source, args.device)
    n = args.candidates
    print(f"machine: {describe_machine(api.device)}")
    print(f"settings: checkpoint {args.checkpoint}; {args.split} split, {len(images)} images ({toy_root}); CLIP "
          f"{clip_source}; N = {n} candidates; plain beam {args.num_beams}; candidate beam width "
          f"{max(args.num_beams, n)}; samples top_p {api.generation['top_p']}, seed {args.seed}; decoding "
          f"{api.generation}")

    timings: dict[str, float] = {}
    plain, beams, samples = [], [], []
    torch.manual_seed(args.seed)
    for start in range(0, len(images), args.batch_size):
        pixels = api.preprocess(images[start : start + args.batch_size])
        clock = time.perf_counter()
        plain += api.caption_pixels(pixels, num_beams=args.num_beams)
        timings["plain beam"] = timings.get("plain beam", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()
        beams += api.caption_candidates(pixels, n, num_beams=args.num_beams)
        timings[f"{n} beams"] = timings.get(f"{n} beams", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()
        samples += api.caption_candidates(pixels, n, sample=True)
        timings[f"{n} samples"] = timings.get(f"{n} samples", 0.0) + time.perf_counter() - clock

    clock = time.perf_counter()
    best_beams, _ = rerank_by_clip(images, beams, clip, batch_size=args.batch_size)
    best_samples, _ = rerank_by_clip(images, samples, clip, batch_size=args.batch_size)
    timings["CLIP re-ranking (both)"] = time.perf_counter() - clock

    image_features = encode_images(images, clip, num_workers=0, progress=False)  # (I, D), once for every row
    rows = {
        f"beam {args.num_beams} (plain)": (plain, None),
        f"beam {max(args.num_beams, n)}, top beam": ([c[0] for c in beams], None),
        f"best of {n} beams by CLIP-S": (best_beams, [c[0] for c in beams]),
        f"sample, first of {n}": ([c[0] for c in samples], None),
        f"best of {n} samples by CLIP-S": (best_samples, [c[0] for c in samples]),
    }
    results = []
    for name, (captions, unranked) in rows.items():
        grounding = toy_grounding(captions, scenes, grammar, source=str(gt_file))
        score = clip_score(captions, image_features, clip, progress=False)["CLIPScore"]
        changed = None if unranked is None else 100.0 * sum(a != b for a, b in zip(captions, unranked)) / len(ids)
        results.append({"row": name, "colour_shape_right": grounding["ground_colour_shape"],
                        "any_attribute_wrong": grounding["ground_any_wrong"], "CLIPScore": score,
                        "words": sum(len(c.split()) for c in captions) / len(captions), "changed": changed,
                        "attributes": {a: (grounding[f"ground_{a}_mentioned"], grounding[f"ground_{a}_precision"])
                                       for a in TOY_ATTRIBUTES}})
    oracle = {kind: _headroom(candidates, scenes, grammar) for kind, candidates in (("beams", beams),
                                                                                    ("samples", samples))}
    probe = {attribute: _clip_probe(images, scenes, grammar, clip, attribute) for attribute in TOY_ATTRIBUTES}

    print()
    print("| decoding | colour+shape right % | any attribute wrong % | CLIPScore | words | changed by re-ranking % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        changed = "" if row["changed"] is None else f"{row['changed']:.0f}"
        print(f"| {row['row']} | {row['colour_shape_right']:.1f} | {row['any_attribute_wrong']:.1f} | "
              f"{row['CLIPScore']:.2f} | {row['words']:.1f} | {changed} |")
    print()
    print("| decoding | " + " | ".join(f"{a} mentioned / right %" for a in TOY_ATTRIBUTES) + " |")
    print("| --- |" + " ---: |" * len(TOY_ATTRIBUTES))
    for row in results:
        cells = [f"{m:.0f} / {'-' if p is None else f'{p:.0f}'}" for m, p in row["attributes"].values()]
        print(f"| {row['row']} | " + " | ".join(cells) + " |")
    print()
    for kind, (any_right, all_wrong) in oracle.items():
        print(f"oracle over the {n} {kind}: an image has a candidate with colour+shape right {any_right:.1f}%, "
              f"every candidate with an attribute wrong {all_wrong:.1f}%")
    print("CLIP probe, % of images where CLIP-S ranks the scene's own value first among full captions that differ "
          "only in that attribute (chance in brackets): " + ", ".join(
              f"{attribute} {right:.0f} ({100 / len(grammar[attribute]):.0f})" for attribute, right in probe.items()))
    print("time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items()))
    summary = {"rows": results, "oracle": oracle, "clip_probe": probe, "timings_s": timings, "images": len(ids), "split": args.split,
               "candidates": n, "checkpoint": str(args.checkpoint), "clip_model": str(clip_source)}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


def _headroom(candidates: list[list[str]], scenes: list[dict], grammar: dict) -> tuple[float, float]:
    """(% of images with at least one candidate whose colour and shape are right, % of images whose every candidate
    has a wrong attribute), each candidate judged alone by the toy grounding metric itself."""
    any_right = all_wrong = 0
    for texts, scene in zip(candidates, scenes):
        verdicts = [toy_grounding([text], [scene], grammar) for text in texts]
        any_right += any(v["ground_colour_shape"] > 0 for v in verdicts)
        all_wrong += all(v["ground_any_wrong"] > 0 for v in verdicts)
    return 100.0 * any_right / len(candidates), 100.0 * all_wrong / len(candidates)


def _clip_probe(images: list, scenes: list[dict], grammar: dict, clip, attribute: str) -> float:
    """% of images for which ``rerank_by_clip`` picks the scene's own ``attribute`` value among the toy template's
    full captions ("a large orange star at the top on a black background", each value's first phrase) that differ
    only in that attribute: what the CLIP can tell apart, so what re-ranking by it can fix."""
    values = list(grammar[attribute])
    candidates = [[_template({**scene, attribute: value}, grammar) for value in values] for scene in scenes]
    chosen, _ = rerank_by_clip(images, candidates, clip)
    right = sum(text == row[values.index(scene[attribute])] for text, row, scene in zip(chosen, candidates, scenes))
    return 100.0 * right / len(scenes)


def _template(scene: dict, grammar: dict) -> str:
    """The toy set's long reference form, from each attribute value's first phrase."""
    phrase = {attribute: grammar[attribute][scene[attribute]][0] for attribute in TOY_ATTRIBUTES}
    return (f"a {phrase['size']} {phrase['colour']} {phrase['shape']} {phrase['position']} "
            f"{phrase['background']}")


if __name__ == "__main__":
    main()
