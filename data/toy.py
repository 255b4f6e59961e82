"""A tiny synthetic captioning set, generated on demand, so the SMILE pipeline runs on a CPU.

Each 64x64 PNG shows ONE shape (circle, square, triangle, star) with a colour, a size (small,
large) and a position (left, right, top, bottom, middle) on a plain background whose colour is
never the shape's. Each image has 5 references, always in the word order
``a [size] colour shape [position] [on a BG background]``, e.g. "a red circle" ...
"a large red circle to the left on a grey background".

Why the references look like this (the property the SMILE experiments need): every kind of
detail (size, position, background) is mentioned in only 1 or 2 of an image's 5 references,
chosen at random per image, just as COCO annotators each mention different details. Exactly one
reference is terse (colour + shape), one names all three details, and each of the other three
adds each detail with probability 1/2 (so each detail appears 1 or 2 times in 5). Under
maximum likelihood the next-token distribution after "a red circle" is split between stopping
and several different continuations, each individually a minority, so an MLE captioner learns
to stop early ("a red circle"). SMILE computes each reference's likelihood over only that
reference's own tokens, so a terse reference no longer pulls probability away from detail words
it does not contain while rich references still pull towards them: it should keep describing.

Ground truth of what each image shows: the val/test annotation entries and the val/test COCO-format GT
files' ``images`` entries carry ``"toy_scene"`` (`Scene.attributes`: colour, shape, size, position,
background), and the GT files carry ``"toy_grammar"`` (`toy_grammar`: the phrases naming each value), so
metrics.toy_grounding scores whether a caption's attributes are right from the GT file alone.

Ids: image i is ``images/toy_{i:06d}.png`` with integer id i; train images come first, then
val, then test, so ids are unique across splits. Everything is a pure function of the
arguments (per-image generators are seeded from (seed, i)), so two builds are byte-identical.

Caching: the files are built in a temporary folder beside `root` and renamed into place, and
`manifest.json` records the arguments and FORMAT_VERSION; a folder whose manifest does not match
is rebuilt. A lock file beside `root` (fcntl.flock, so POSIX only) makes concurrent callers,
e.g. several torchrun ranks, wait for one builder and then reuse its output.

Cost: building the default 2,000 images (1,800/100/100; 9 MB on disk) took 0.5-0.7 s, in one
process, on the 2-core AMD EPYC development machine; a cache hit takes about 1 ms.

Command line: ``python -m data.toy --root cache/toy`` prints the paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from data.datasets import build_coco_gt
import utils

logger = logging.getLogger(__name__)

# 2: val/test entries and GT images carry "toy_scene"; the GT files carry "toy_grammar" (metrics.toy_grounding).
FORMAT_VERSION = 2
GENERATOR_NAME = "smile-toy"
IMAGE_SIZE = 64
NUM_REFERENCES = 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BLIP prompts the decoder with "a picture of "; the toy vocab must cover it too.
PROMPT_WORDS = ("a", "picture", "of")

# Saturated colours far apart in RGB, so they stay distinct after resizing to 48 px.
SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 50),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUND_COLOURS = {
    "grey": (150, 150, 150),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (120, 80, 45),
}
# Half-extent in pixels: 7 vs 13 stays separable even after a 0.5-area random crop.
SIZE_RADII = {"small": 7, "large": 13}
# Centre in pixels and the phrase used in captions.
POSITIONS = {
    "left": ((16, 32), "to the left"),
    "right": ((48, 32), "to the right"),
    "top": ((32, 16), "at the top"),
    "bottom": ((32, 48), "at the bottom"),
    "middle": ((32, 32), "in the middle"),
}
POSITION_JITTER = 2  # pixels; keeps a large shape (radius 13) inside the 64 px canvas


def _star_outline(points: int = 5, inner_ratio: float = 0.45) -> list[tuple[float, float]]:
    corners = []
    for corner in range(2 * points):
        radius = 1.0 if corner % 2 == 0 else inner_ratio
        angle = -math.pi / 2 + corner * math.pi / points  # first point straight up
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return corners


# Polygons on the unit square [-1, 1]^2, scaled by the size radius; circles use ellipse().
UNIT_POLYGONS = {
    "square": [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star_outline(),
}
SHAPES = ("circle", "square", "triangle", "star")

DETAIL_KINDS = ("size", "position", "background")
# The attributes a scene is scored on by metrics.toy_grounding, in its key order.
ATTRIBUTES = ("colour", "shape", "size", "position", "background")
SPLITS = ("train", "val", "test")


def toy_grammar() -> dict[str, dict[str, list[str]]]:
    """``{attribute: {value: [phrase, ...]}}``: the words that name each attribute value in a caption.

    The first phrase is the one the references use; the others are the phrase's head ("left", "grey
    background"), so that a caption that names a value in a form the references never use ("to the middle",
    which SMILE-trained toy models produce) still counts as naming it. Stored in the val/test GT files as
    ``"toy_grammar"`` so that metrics.toy_grounding needs only the GT file. Every phrase is lower case and
    maps to one (attribute, value); "white" and "black" are both shape and background colours, but a
    background is only ever named inside "... background", which a parser matching longest phrases first
    reads before the colour word inside it.
    """
    return {
        "colour": {name: [name] for name in sorted(SHAPE_COLOURS)},
        "shape": {name: [name] for name in SHAPES},
        "size": {name: [name] for name in sorted(SIZE_RADII)},
        "position": {name: [phrase, name] for name, (_, phrase) in sorted(POSITIONS.items())},
        "background": {name: [f"on a {name} background", f"{name} background"] for name in sorted(BACKGROUND_COLOURS)},
    }


@dataclass(frozen=True)
class Scene:
    """What one toy image shows; `centre` is in pixels on the 64x64 canvas."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    centre: tuple[int, int]

    def attributes(self) -> dict[str, str]:
        """``{attribute: value}`` for ATTRIBUTES: what the GT files store as ``"toy_scene"``."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def caption(self, details: frozenset[str]) -> str:
        """The reference naming colour, shape and the given subset of DETAIL_KINDS."""
        words = ["a"]
        if "size" in details:
            words.append(self.size)
        words += [self.colour, self.shape]
        if "position" in details:
            words.append(POSITIONS[self.position][1])
        if "background" in details:
            words.append(f"on a {self.background} background")
        return " ".join(words)


def sample_scene(rng: random.Random) -> Scene:
    colour = rng.choice(sorted(SHAPE_COLOURS))
    position = rng.choice(sorted(POSITIONS))
    (centre_x, centre_y), _ = POSITIONS[position]
    return Scene(
        shape=rng.choice(SHAPES),
        colour=colour,
        size=rng.choice(sorted(SIZE_RADII)),
        position=position,
        background=rng.choice(sorted(name for name in BACKGROUND_COLOURS if name != colour)),
        centre=(
            centre_x + rng.randint(-POSITION_JITTER, POSITION_JITTER),
            centre_y + rng.randint(-POSITION_JITTER, POSITION_JITTER),
        ),
    )


def sample_reference_details(rng: random.Random) -> list[frozenset[str]]:
    """Which details each of the 5 references mentions (see the module docstring for why).

    One reference is terse, one mentions every detail, and each detail is added, with
    probability 1/2, to one of the other three, so every detail kind is named by exactly 1 or 2
    references. The 5 are returned in random order.
    """
    details: list[set[str]] = [set(), set(DETAIL_KINDS)] + [set() for _ in range(NUM_REFERENCES - 2)]
    for kind in DETAIL_KINDS:
        if rng.random() < 0.5:
            details[rng.randrange(2, NUM_REFERENCES)].add(kind)
    rng.shuffle(details)
    return [frozenset(chosen) for chosen in details]


def render_scene(scene: Scene) -> Image.Image:
    """Draw `scene` as a (64, 64) RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND_COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    radius = SIZE_RADII[scene.size]
    centre_x, centre_y = scene.centre
    fill = SHAPE_COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=fill)
    else:
        outline = [(centre_x + radius * x, centre_y + radius * y) for x, y in UNIT_POLYGONS[scene.shape]]
        draw.polygon(outline, fill=fill)
    return image


def image_relative_path(image_id: int) -> str:
    return f"images/toy_{image_id:06d}.png"


def _split_ranges(num_train: int, num_val: int, num_test: int) -> dict[str, range]:
    return {
        "train": range(0, num_train),
        "val": range(num_train, num_train + num_val),
        "test": range(num_train + num_val, num_train + num_val + num_test),
    }


def _manifest(num_train: int, num_val: int, num_test: int, seed: int) -> dict:
    return {
        "generator": GENERATOR_NAME,
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "seed": seed,
        "image_size": IMAGE_SIZE,
    }


def toy_paths(root: str | Path) -> dict[str, Path]:
    """Where `ensure_toy_dataset` puts each file under `root` (no file is touched)."""
    root = Path(root)
    return {
        "image_root": root,
        "train_file": root / "toy_train.json",
        "val_file": root / "toy_val.json",
        "test_file": root / "toy_test.json",
        "val_gt": root / "toy_val_gt.json",
        "test_gt": root / "toy_test_gt.json",
        "vocab_file": root / "vocab.txt",
    }


def _write_dataset(directory: Path, manifest: dict) -> None:
    """Write every toy file into the (empty) `directory`; `manifest.json` goes last."""
    paths = toy_paths(directory)
    (directory / "images").mkdir()
    annotations: dict[str, list[dict]] = {split: [] for split in SPLITS}
    scenes: dict[int, dict[str, str]] = {}  # image id -> attributes, for the val/test GT files
    vocabulary = set(PROMPT_WORDS)
    ranges = _split_ranges(manifest["num_train"], manifest["num_val"], manifest["num_test"])
    for split, image_ids in ranges.items():
        for image_id in image_ids:
            # A generator per image: image i does not depend on how many images precede it.
            rng = random.Random(f"{GENERATOR_NAME}:{manifest['seed']}:{image_id}")
            scene = sample_scene(rng)
            references = [scene.caption(details) for details in sample_reference_details(rng)]
            image_path = image_relative_path(image_id)
            render_scene(scene).save(directory / image_path, format="PNG")
            for reference in references:
                vocabulary.update(reference.split(" "))
            if split == "train":
                annotations[split] += [
                    {"image": image_path, "caption": reference, "image_id": f"toy_{image_id}"}
                    for reference in references
                ]
            else:
                scenes[image_id] = scene.attributes()
                annotations[split].append({"image": image_path, "caption": references, "toy_scene": scenes[image_id]})

    for split in SPLITS:
        utils.write_json(paths[f"{split}_file"], annotations[split], indent=1)
    for split in ("val", "test"):
        gt = build_coco_gt(paths[f"{split}_file"])
        for image in gt["images"]:
            image["toy_scene"] = scenes[image["id"]]
        gt["toy_grammar"] = toy_grammar()
        utils.write_json(paths[f"{split}_gt"], gt, indent=1)
    paths["vocab_file"].write_text("\n".join([*SPECIAL_TOKENS, *sorted(vocabulary)]) + "\n", encoding="utf-8")
    utils.write_json(directory / "manifest.json", manifest, indent=1)


def _read_manifest(root: Path) -> dict | None:
    try:
        with (root / "manifest.json").open("r", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(root: Path, manifest: dict) -> bool:
    """The manifest matches and no file was deleted since (a cheap listing, no decoding)."""
    if _read_manifest(root) != manifest:
        return False
    if not all(path.is_file() for key, path in toy_paths(root).items() if key != "image_root"):
        return False
    if not (root / "images").is_dir():
        return False
    num_images = manifest["num_train"] + manifest["num_val"] + manifest["num_test"]
    with os.scandir(root / "images") as entries:
        return sum(1 for _ in entries) == num_images


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a folder that is neither empty nor an earlier toy build."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"toy dataset root {root} exists and is not a directory")
    existing = _read_manifest(root)
    if any(root.iterdir()) and (existing is None or existing.get("generator") != GENERATOR_NAME):
        raise FileExistsError(
            f"toy dataset root {root} is not empty and has no {GENERATOR_NAME} manifest.json; "
            f"refusing to replace it (pick another --root or delete it yourself)"
        )


def _positive_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def ensure_toy_dataset(
    root: str | Path,
    num_train: int = 1800,
    num_val: int = 100,
    num_test: int = 100,
    seed: int = 0,
) -> dict[str, Path]:
    """Build the toy set under `root` unless an identical build is already there; return paths.

    Returns:
        ``{"image_root", "train_file", "val_file", "test_file", "val_gt", "test_gt",
        "vocab_file"}``. Image paths in the annotation files are relative to ``image_root``.

    Raises:
        ValueError: a count < 1 or a negative seed.
        FileExistsError: `root` holds something other than a toy build (never deleted).
    """
    manifest = _manifest(
        _positive_int("num_train", num_train, 1),
        _positive_int("num_val", num_val, 1),
        _positive_int("num_test", num_test, 1),
        _positive_int("seed", seed, 0),
    )
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with utils.exclusive_lock(root.parent / f"{root.name}.lock"):
        if not _is_complete(root, manifest):
            _rebuild(root, manifest)
    return toy_paths(root)


def _rebuild(root: Path, manifest: dict) -> None:
    """Generate into a temporary sibling folder, then swap it in with renames (lock held)."""
    _check_replaceable(root)
    started = time.perf_counter()
    utils.build_folder(root, lambda building: _write_dataset(building, manifest))
    logger.info("built toy dataset %s in %.2f s", root, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m data.toy", description="Build (or reuse) the synthetic toy caption set and print its paths.")
    parser.add_argument("--root", default="cache/toy", help="folder to build into (default: cache/toy)")
    parser.add_argument("--num-train", type=int, default=1800)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = ensure_toy_dataset(args.root, args.num_train, args.num_val, args.num_test, args.seed)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    main()
