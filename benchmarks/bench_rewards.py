"""Speed of the SCST CIDEr-D reward against pycocoevalcap's Cider, on COCO-sized statistics.

    python benchmarks/bench_rewards.py                       # 113,287 images x 5 refs, 100 images x 5 samples
    python benchmarks/bench_rewards.py --images 20000 --repeats 3

Synthesises COCO-sized training references (Zipfian vocabulary of 10,000 words, 8-14 words per
caption, 5 per image), builds `metrics.cider_d.CiderD` from them (timed: cold build, cache write,
cache load), then scores one SCST batch, 500 candidates = 100 images x 5 samples, against those
images' references. The baseline, in the same run, is pycocoevalcap's ``Cider().compute_score`` on the
same 500 (candidate, references) pairs. It is a *speed* comparison: pycocoevalcap takes its document
frequencies from the 500 scored items, so its values differ from CIDEr-D with training statistics.
The best of `--repeats` runs is reported for both.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
import pycocoevalcap  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

from machine import describe_machine  # noqa: E402
from metrics.cider_d import CiderD  # noqa: E402


def machine() -> str:
    return describe_machine(extras=(f"numpy {np.__version__}",
                                    f"pycocoevalcap {getattr(pycocoevalcap, '__version__', 'installed')}"))


def synthetic_references(num_images: int, refs_per_image: int, vocab: int, seed: int) -> dict[int, list[str]]:
    """COCO-like references: Zipf(1.1) word ranks, 8-14 words, drawn with numpy and joined once."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    count = num_images * refs_per_image
    lengths = rng.integers(8, 15, size=count)
    flat = words[rng.choice(vocab, size=int(lengths.sum()), p=p)]
    bounds = np.cumsum(lengths)
    texts = [" ".join(part) for part in np.split(flat, bounds[:-1])]
    return {i: texts[i * refs_per_image:(i + 1) * refs_per_image] for i in range(num_images)}


def synthetic_samples(references: dict[int, list[str]], keys: list[int], samples: int, seed: int) -> tuple[list, list]:
    """k sampled captions per image: a reference with some words replaced, cut or repeated."""
    rng = np.random.default_rng(seed)
    candidates, owners = [], []
    for key in keys:
        for _ in range(samples):
            words = references[key][rng.integers(len(references[key]))].split()
            for position in rng.integers(len(words), size=rng.integers(0, 4)):
                words[position] = f"w{rng.integers(10_000)}"
            words = words[: rng.integers(max(len(words) - 4, 1), len(words) + 1)] + words[: rng.integers(0, 3)]
            candidates.append(" ".join(words))
            owners.append(key)
    return candidates, owners


def best_of(fn, repeats: int):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=113_287, help="training images (Karpathy train+restval)")
    parser.add_argument("--refs", type=int, default=5, help="references per image")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--batch-images", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5, help="sampled captions per image")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    start = time.perf_counter()
    references = synthetic_references(args.images, args.refs, args.vocab, seed=0)
    print(f"synthesised {args.images:,} images x {args.refs} references in {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        scorer = CiderD(references, cache_dir=cache_dir, cache_key="bench")
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = CiderD(references, cache_dir=cache_dir, cache_key="bench")
        load_s = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in Path(cache_dir).glob("*.npz")) / 2 ** 20
    ngrams = sum(len(df) for df in scorer.df.values())
    print(f"CiderD statistics: {len(scorer.vocab):,} words, {ngrams:,} n-grams; cold build + cache write "
          f"{build_s:.1f} s; later runs (normalise + digest + cache load) {load_s:.1f} s; cache {size_mb:.1f} MB")

    keys = list(np.random.default_rng(1).choice(args.images, size=args.batch_images, replace=False).tolist())
    candidates, owners = synthetic_samples(references, keys, args.samples, seed=2)
    ours, ours_s = best_of(lambda: cached.score(candidates, owners), args.repeats)
    assert np.array_equal(ours, scorer.score(candidates, owners))

    # pycocoevalcap: one entry per candidate, each with its image's references
    gts = {i: references[k] for i, k in enumerate(owners)}
    res = {i: [c] for i, c in enumerate(candidates)}
    (_, theirs), theirs_s = best_of(lambda: Cider().compute_score(gts, res), args.repeats)

    n = len(candidates)
    print(f"{n} candidates ({args.batch_images} images x {args.samples} samples, {args.refs} refs each), "
          f"best of {args.repeats}:")
    print(f"  pycocoevalcap Cider (df from the {n} scored items) {theirs_s * 1e3:8.1f} ms")
    print(f"  CiderD (df from {args.images:,} training images)      {ours_s * 1e3:8.1f} ms   "
          f"speed-up x{theirs_s / ours_s:.1f}")
    print(f"  mean reward: CiderD {ours.mean():.3f}, pycocoevalcap {np.mean(theirs):.3f} (different df, see above)")


if __name__ == "__main__":
    main()
