"""Fetch BLIP's Karpathy-split annotation files for MSCOCO or Flickr30K and check them against the images.

    python scripts/prepare_data.py coco --root datasets/coco                   # download into ROOT/annotations
    python scripts/prepare_data.py coco --root datasets/coco --annotations-from ~/blip_annotations
    python scripts/prepare_data.py flickr30k --root datasets/flickr30k --image-root /data/flickr30k
    python scripts/prepare_data.py coco --root datasets/coco --check-only      # write nothing, only check
    python scripts/prepare_data.py finecapeval --root datasets/finecapeval     # FineCapEval: see prepare_finecapeval
    python scripts/prepare_data.py custom --input my_photos --out datasets/my_photos [--val N --test N --seed S]

``custom`` turns your own captioned images (a folder with sidecar .txt captions, a CSV or JSONL, or a Hugging Face
imagefolder metadata.jsonl) into train/val/test annotation files with a deterministic split, the val/test
ground truth, keys.json (image id -> your key) and the manifest custom.json; train on it with
``--opt data.custom_root=DIR``. The readers, the split and the writing are data/custom.py's; docs/data.md, "Your
own captioned images", has the whole path.

Steps:
1. Annotations: copy them from ``--annotations-from DIR``, or download the ones ROOT/annotations lacks from
   BLIP's bucket (``--base-url``), each to a temporary file that is renamed only after it parsed and passed the
   structure check, so an interrupted download never leaves a half file behind.
2. Ground truth with image file names, which retrieval and CLIPScore read the images from: Flickr30K has no
   COCO-format GT, so ``flickr30k_{val,test}_gt.json`` are built from the split files (`data.build_coco_gt`).
   BLIP's COCO GT files list image ids only, so ``coco_karpathy_{val,test}_gt_with_files.json`` are BLIP's
   files with each image's ``file_name`` added from the split file; the captions are BLIP's, unchanged.
3. Checks, before any GPU time is spent: every image that any annotation file names exists under the image root
   (missing ones are listed, count and first paths, and the exit status is 1); the GT files hold exactly the
   images of their split; the number of images per split matches the Karpathy split (a warning otherwise,
   ``--no-expect-counts`` silences it for miniature or custom splits).
4. Prints the config overrides that point a run at these files.
5. COCO: says where CHAIR's instance annotations go (ROOT/annotations/instances_val2014.json, from COCO's
   annotations_trainval2014.zip; not downloaded) and whether they are there.

Exit status: 0 when everything is in place, 1 for missing images or inconsistent files (custom: bad data, named
by file, line and key), 2 for usage errors.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from data import AnnotationError, build_coco_gt, entry_image_id, image_id_from_path, load_annotations  # noqa: E402
import utils  # noqa: E402

BASE_URL = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"

# sha256 of the published annotation files, checked after download or copy when listed here. Empty on purpose:
# the files could not be fetched where this script was written, and a hash that nobody computed from the real
# file is worse than none. Until it is filled in, each file is checked by its JSON structure and the split sizes
# instead. To pin them: `sha256sum datasets/*/annotations/*.json` on a trusted copy, then add "name": "hex".
SHA256: dict[str, str] = {}


@dataclass(frozen=True)
class Split:
    name: str            # train | val | test
    file: str            # BLIP's annotation file
    images: int          # images in the Karpathy split
    blip_gt: str | None  # BLIP's COCO-format GT (downloaded), if BLIP publishes one
    gt: str | None       # the GT file with image file names this script writes (val/test)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    splits: tuple[Split, ...]

    def downloads(self) -> list[str]:
        return [s.file for s in self.splits] + [s.blip_gt for s in self.splits if s.blip_gt]


DATASETS = {
    "coco": DatasetSpec("coco", (
        Split("train", "coco_karpathy_train.json", 113_287, None, None),
        Split("val", "coco_karpathy_val.json", 5_000, "coco_karpathy_val_gt.json", "coco_karpathy_val_gt_with_files.json"),
        Split("test", "coco_karpathy_test.json", 5_000, "coco_karpathy_test_gt.json",
              "coco_karpathy_test_gt_with_files.json"),
    )),
    "flickr30k": DatasetSpec("flickr30k", (
        Split("train", "flickr30k_train.json", 29_000, None, None),
        Split("val", "flickr30k_val.json", 1_014, None, "flickr30k_val_gt.json"),
        Split("test", "flickr30k_test.json", 1_000, None, "flickr30k_test_gt.json"),
    )),
}


class PrepareError(Exception):
    """A problem the user has to fix; the message names the file (and entry or key) involved."""


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------------------------


def read_split(path: Path, split: Split) -> list[dict]:
    """The annotation entries of ``path``, validated by `data.load_annotations` plus the split's own shape.

    train files hold one entry per caption (a string); val/test files one entry per image with a list of
    references. Every entry needs an integer image id: its ``id``, else the integer its image path ends in (BLIP's
    evaluation id; `data.entry_image_id`).
    """
    try:
        entries = load_annotations(path)
    except AnnotationError as error:
        raise PrepareError(str(error)) from None
    if not entries:
        raise PrepareError(f"{path}: holds no annotation entries")
    for index, entry in enumerate(entries):
        caption = entry["caption"]
        if split.name != "train" and not isinstance(caption, list):
            raise PrepareError(f"{path}: entry {index} key 'caption' must be a list of reference captions in a "
                               f"{split.name} file (one entry per image), got {caption!r}")
        try:
            entry_image_id(entry)
        except ValueError as error:
            raise PrepareError(f"{path}: entry {index} {error}") from None
    return entries


def read_gt(path: Path) -> dict:
    """A COCO-format caption GT: ``images`` with int ``id``, ``annotations`` with int ``image_id`` and str ``caption``."""
    try:
        with path.open(encoding="utf-8") as handle:
            gt = json.load(handle)
    except FileNotFoundError:
        raise PrepareError(f"ground-truth file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrepareError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(gt, dict):
        raise PrepareError(f"{path}: a COCO caption GT must be a JSON object, got a {type(gt).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(gt.get(key), list):
            raise PrepareError(f"{path}: key {key!r} must be a list (it has keys {sorted(gt)})")
    for index, image in enumerate(gt["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise PrepareError(f"{path}: images[{index}] must be an object with an integer 'id', got {image!r}")
    for index, ann in enumerate(gt["annotations"]):
        if (not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int)
                or not isinstance(ann.get("caption"), str)):
            raise PrepareError(f"{path}: annotations[{index}] must be an object with an integer 'image_id' and a "
                               f"string 'caption', got {ann!r}")
    return gt


def check_sha256(path: Path, name: str) -> None:
    expected = SHA256.get(name)
    if expected is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise PrepareError(f"{name}: sha256 {digest.hexdigest()} differs from the expected {expected}")


def validate_file(path: Path, name: str, spec: DatasetSpec) -> None:
    check_sha256(path, name)
    split = next((s for s in spec.splits if s.file == name), None)
    if split is not None:
        read_split(path, split)
    else:
        read_gt(path)


# ----------------------------------------------------------------------------------------------------------------
# Fetching (atomic: a temporary file in the target folder, renamed once it passed validation)
# ----------------------------------------------------------------------------------------------------------------


def _install(source_fill, target: Path, name: str, spec: DatasetSpec) -> None:
    """Fill a temporary file next to ``target`` with ``source_fill(handle)``, validate it, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", dir=target.parent, prefix=f".{name}.", suffix=".part", delete=False)
    temporary = Path(handle.name)
    try:
        with handle:
            source_fill(handle)
        if temporary.stat().st_size == 0:
            raise PrepareError(f"{name}: the fetched file is empty")
        validate_file(temporary, name, spec)
        utils.publish_file(temporary, target)  # the umask's permissions, not the temp file's 0600
    finally:
        temporary.unlink(missing_ok=True)


def download(url: str, target: Path, spec: DatasetSpec, timeout: float) -> None:
    name = target.name

    def fill(handle):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, handle, length=1 << 20)
        except (urllib.error.URLError, OSError) as error:
            raise PrepareError(f"cannot download {url}: {error}. Without network access, fetch the file elsewhere "
                               f"and pass its folder with --annotations-from DIR") from None

    print(f"downloading {url}", flush=True)
    _install(fill, target, name, spec)


def copy_from(source_dir: Path, target: Path, spec: DatasetSpec) -> None:
    source = source_dir / target.name
    if not source.is_file():
        raise PrepareError(f"--annotations-from {source_dir}: {target.name} is not there (needed: "
                           f"{', '.join(spec.downloads())})")

    def fill(handle):
        with source.open("rb") as src:
            shutil.copyfileobj(src, handle, length=1 << 20)

    print(f"copying {source} -> {target}", flush=True)
    _install(fill, target, target.name, spec)


def fetch_annotations(spec: DatasetSpec, ann_dir: Path, source_dir: Path | None, base_url: str, force: bool,
                      timeout: float) -> None:
    for name in spec.downloads():
        target = ann_dir / name
        if source_dir is not None:
            if source_dir.resolve() == ann_dir.resolve():
                validate_file(target, name, spec)  # already in place: nothing to copy
            else:
                copy_from(source_dir, target, spec)
        elif target.is_file() and not force:
            validate_file(target, name, spec)
            print(f"{target} present and valid (--force downloads it again)")
        else:
            download(base_url.rstrip("/") + "/" + name, target, spec, timeout)


# ----------------------------------------------------------------------------------------------------------------
# Ground truth with file names
# ----------------------------------------------------------------------------------------------------------------


def _ids_and_files(entries: list[dict]) -> dict[int, str]:
    return {entry_image_id(entry): entry["image"] for entry in entries}


def gt_with_files(blip_gt: dict, entries: list[dict], gt_path: Path, split_path: Path) -> dict:
    """BLIP's COCO GT with ``file_name`` added to each image from the split file (captions untouched)."""
    files = _ids_and_files(entries)
    missing = [image["id"] for image in blip_gt["images"] if image["id"] not in files]
    if missing:
        raise PrepareError(f"{gt_path}: {len(missing)} image ids are not in {split_path} (first: {missing[:5]})")
    images = [{**image, "file_name": files[image["id"]]} for image in blip_gt["images"]]
    return {**blip_gt, "images": images}


def write_gt_files(spec: DatasetSpec, ann_dir: Path) -> None:
    for split in spec.splits:
        if split.gt is None:
            continue
        split_path = ann_dir / split.file
        if split.blip_gt:
            gt = gt_with_files(read_gt(ann_dir / split.blip_gt), read_split(split_path, split),
                               ann_dir / split.blip_gt, split_path)
        else:
            try:
                gt = build_coco_gt(split_path)
            except AnnotationError as error:
                raise PrepareError(str(error)) from None
        utils.write_json(ann_dir / split.gt, gt, indent=None)
        print(f"wrote {ann_dir / split.gt} ({len(gt['images'])} images, {len(gt['annotations'])} captions)")


# ----------------------------------------------------------------------------------------------------------------
# FineCapEval (user-supplied: nothing is downloaded)
# ----------------------------------------------------------------------------------------------------------------
FINECAPEVAL = "finecapeval"


def prepare_finecapeval(root: Path, image_root: Path | None, check_only: bool, show: int) -> int:
    """Check ROOT/FineCapEval.csv and its images; write the files a config-mode evaluation reads.

    The CSV is read as the FineCapEval scorer reads it (`metrics.finecapeval.read_finecapeval_csv`: the five
    columns must be there; rows with a missing cell are dropped). Every file its ``image`` column names must exist
    under the image root (default ROOT/images). Unless ``check_only``, writes ROOT/annotations/finecapeval_test.json
    (one ``{"image", "caption": [references]}`` entry per scored image) and finecapeval_test_gt.json (COCO format,
    integer ids from the file names' trailing digits as for COCO and Flickr30K, plus ``file_name``): the trainer's
    eval loader uses integer ids, and the finecapeval metric matches images to CSV rows by ``file_name``.

    Returns:
        The exit status: 0 ready, 1 for a bad CSV or missing images.
    """
    from metrics.finecapeval import FineCapEvalError, read_finecapeval_csv

    csv_path = root / "FineCapEval.csv"
    image_root = image_root if image_root is not None else root / "images"
    try:
        data = read_finecapeval_csv(csv_path)
    except (FileNotFoundError, FineCapEvalError) as error:
        print(f"prepare_data: {error}", file=sys.stderr)
        return 1
    files = sorted(data.all_file_names)
    missing = [name for name in files if not (image_root / name).is_file()]
    print(f"{csv_path}: {len(files)} images, {len(data.file_names)} scored; {len(data.dropped_rows)} rows dropped "
          f"for a missing cell (as the FineCapEval scorer does)")
    if missing:
        print(f"prepare_data: FineCapEval is not ready: {len(missing)} of {len(files)} images are missing under "
              f"{image_root} (first: {missing[:show]})", file=sys.stderr)
        return 1
    if not data.file_names:
        print(f"prepare_data: {csv_path}: every row has a missing cell; nothing to score", file=sys.stderr)
        return 1
    if check_only:
        print("FineCapEval is ready (--check-only: nothing written).")
        return 0
    entries = [{"image": name, "caption": data.captions[stem]} for stem, name in data.file_names.items()]
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    try:
        ids = [image_id_from_path(entry["image"]) for entry in entries]
    except ValueError as error:
        print(f"prepare_data: {csv_path}: {error}; the config-mode evaluation needs integer ids (scoring a results "
              f"file with eval_caption.py --finecapeval does not)", file=sys.stderr)
        return 1
    if len(set(ids)) < len(ids):
        print(f"prepare_data: {csv_path}: two images share an integer id from their file names", file=sys.stderr)
        return 1
    utils.write_json(ann_dir / "finecapeval_test.json", entries, indent=None)
    try:
        gt = build_coco_gt(ann_dir / "finecapeval_test.json")
    except AnnotationError as error:
        print(f"prepare_data: {error}", file=sys.stderr)
        return 1
    utils.write_json(ann_dir / "finecapeval_test_gt.json", gt, indent=None)
    print(f"wrote {ann_dir / 'finecapeval_test.json'} and {ann_dir / 'finecapeval_test_gt.json'} "
          f"({len(gt['images'])} images, {len(gt['annotations'])} captions)\nFineCapEval is ready.")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def check(spec: DatasetSpec, ann_dir: Path, image_root: Path, expect_counts: bool, show: int) -> list[str]:
    """Problems found (empty: ready to train). Prints a per-split summary and count warnings on the way."""
    problems: list[str] = []
    have_images = image_root.is_dir()
    if not have_images:
        problems.append(f"image root {image_root} is not a directory (set it with --image-root DIR)")
    for split in spec.splits:
        split_path = ann_dir / split.file
        try:
            entries = read_split(split_path, split)
        except FileNotFoundError:
            problems.append(f"{split_path} does not exist (run without --check-only to fetch it)")
            continue
        except PrepareError as error:
            problems.append(str(error))
            continue
        files = sorted({entry["image"] for entry in entries})
        ids = _ids_and_files(entries)
        if len(ids) != len(files):
            problems.append(f"{split_path}: {len(files)} image paths map to only {len(ids)} integer image ids "
                            f"(the number at the end of each file name must be unique)")
        missing = [f for f in files if not (image_root / f).is_file()] if have_images else []
        print(f"{split.name:5s} {split_path.name}: {len(entries)} entries, {len(files)} images, "
              + (f"{len(missing)} missing under {image_root}" if have_images else "images not checked"))
        if missing:
            listed = "\n".join(f"    {image_root / f}" for f in missing[:show])
            more = f"\n    ... and {len(missing) - show} more" if len(missing) > show else ""
            problems.append(f"{split_path}: {len(missing)} of {len(files)} images are missing under {image_root}:"
                            f"\n{listed}{more}")
        if expect_counts and len(files) != split.images:
            print(f"WARNING: {split_path.name} has {len(files)} images; the Karpathy {split.name} split of "
                  f"{spec.name} has {split.images:,} (expected for a miniature or custom split; "
                  f"--no-expect-counts silences this)", file=sys.stderr)
        for gt_name in (split.blip_gt, split.gt):
            if gt_name is None:
                continue
            try:
                gt = read_gt(ann_dir / gt_name)
            except PrepareError as error:
                problems.append(str(error))
                continue
            gt_ids = {image["id"] for image in gt["images"]}
            if gt_ids != set(ids):
                only_gt, only_split = sorted(gt_ids - set(ids)), sorted(set(ids) - gt_ids)
                problems.append(f"{ann_dir / gt_name}: its images differ from {split_path.name}'s: "
                                f"{len(only_gt)} only in the GT (first: {only_gt[:show]}), "
                                f"{len(only_split)} only in the split file (first: {only_split[:show]})")
            without = gt_ids - {ann["image_id"] for ann in gt["annotations"]}
            if without:
                problems.append(f"{ann_dir / gt_name}: {len(without)} images have no caption "
                                f"(first: {sorted(without)[:show]})")
    return problems


def overrides(spec: DatasetSpec, ann_dir: Path, image_root: Path) -> list[str]:
    by_name = {s.name: s for s in spec.splits}
    return [
        f"data.image_root={image_root}",
        f"data.train_files=[{ann_dir / by_name['train'].file}]",
        f"data.val_file={ann_dir / by_name['val'].file}",
        f"data.val_gt={ann_dir / by_name['val'].gt}",
        f"data.test_file={ann_dir / by_name['test'].file}",
        f"data.test_gt={ann_dir / by_name['test'].gt}",
    ]


# ----------------------------------------------------------------------------------------------------------------


# CHAIR (metrics/chair.py) reads COCO's own instance annotations, which BLIP's bucket does not carry. Not
# downloaded here: the zip is large and optional; this only says where the file goes and whether it is there.
COCO_INSTANCES = "instances_val2014.json"


def report_coco_instances(ann_dir: Path) -> bool:
    """Print where CHAIR's instances file goes and whether it is there (never a failure: CHAIR is optional)."""
    path = ann_dir / COCO_INSTANCES
    present = path.is_file()
    print(f"CHAIR (--metrics chair): COCO instance annotations {path}: {'present' if present else 'MISSING'}"
          + ("" if present else f" (optional: {COCO_INSTANCES} from the COCO 2014 annotations zip, "
             "annotations_trainval2014.zip, into that folder)"))
    return present


# ----------------------------------------------------------------------------------------------------------------
# Your own captioned images (data/custom.py does the work)
# ----------------------------------------------------------------------------------------------------------------
CUSTOM = "custom"


def parse_custom_args(argv: list[str]) -> argparse.Namespace:
    from data.custom import DEFAULT_FRACTION, LAYOUTS, parse_size

    def size(text: str):
        try:
            return parse_size(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parser = argparse.ArgumentParser(
        prog="prepare_data.py custom", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn your own captioned images into annotation files with a deterministic train/val/test split "
                    "(data/custom.py). Images are not copied: the files name them relative to their common folder, "
                    "recorded in DIR/custom.json.")
    parser.add_argument("--input", type=Path, required=True, metavar="SRC",
                        help="a folder of images with sidecar .txt captions (photo.jpg + photo.txt, one caption a "
                             "line, subfolders allowed), a CSV/TSV/JSONL/JSON table, or a Hugging Face imagefolder "
                             "(a folder with metadata.jsonl, or that file)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="where train.json, val.json, test.json, val_gt.json, test_gt.json, keys.json and "
                             "custom.json go")
    parser.add_argument("--val", type=size, default=DEFAULT_FRACTION, metavar="N",
                        help=f"validation images: a count, or a fraction of the images (default {DEFAULT_FRACTION}; "
                             "a fraction gives at least one)")
    parser.add_argument("--test", type=size, default=DEFAULT_FRACTION, metavar="N",
                        help=f"test images: a count or a fraction (default {DEFAULT_FRACTION}); 0: no test split")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (default 0)")
    parser.add_argument("--layout", choices=LAYOUTS, help="override the layout detected from SRC")
    parser.add_argument("--image-column", help="tables: the image path column (default: the first of image, "
                                               "file_name, filename, image_path, path, file)")
    parser.add_argument("--caption-column", help="tables: the caption column (default: the first of caption, text, "
                                                 "captions, description); a JSONL cell may hold a list")
    parser.add_argument("--key-column", help="tables: a column of keys (any string) naming the images; default: "
                                             "each image's path without its extension")
    parser.add_argument("--image-root", type=Path, help="tables: the folder relative image paths start from "
                                                        "(default: the table's folder)")
    parser.add_argument("--show", type=int, default=5, help="how many skipped images without a caption to list")
    args = parser.parse_args(argv)
    args.dataset = CUSTOM
    return args


def prepare_custom(args: argparse.Namespace, argv: list[str]) -> int:
    """Read ``--input``, split it, write ``--out`` (data/custom.py); print what was written and how to train on it.

    Returns:
        The exit status: 0 written, 1 for bad data (the message names the file, line and key), 2 for a missing
        input or options that do not fit the data.
    """
    from data.custom import CustomOptionError, read_source, write_custom_set

    try:
        source = read_source(args.input, args.layout, args.image_column, args.caption_column, args.key_column,
                             args.image_root)
        origin = {"source": str(args.input.absolute()), "layout": source.layout,
                  "command": "python scripts/prepare_data.py custom " + shlex.join(argv)}
        manifest = write_custom_set(source, args.out, args.val, args.test, args.seed, origin=origin)
    except (FileNotFoundError, CustomOptionError) as error:
        print(f"prepare_data: {error}", file=sys.stderr)
        return 2
    except AnnotationError as error:  # data.custom.CustomDataError: bad rows, as the annotation loader says them
        print(f"prepare_data: {error}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    print(f"read {counts['images']} images ({counts['captions']} captions) from {args.input}")
    if source.uncaptioned:
        listed = ", ".join(str(path) for path in source.uncaptioned[:args.show])
        more = f" and {len(source.uncaptioned) - args.show} more" if len(source.uncaptioned) > args.show else ""
        print(f"WARNING: skipped {len(source.uncaptioned)} images without a .txt caption beside them: {listed}{more}",
              file=sys.stderr)
    for split in ("train", "val", "test"):
        name = manifest["files"][split]
        print(f"  {split:5s} {args.out / name if name else '(none)'}: {counts[split]['images']} images, "
              f"{counts[split]['captions']} captions")
    written = [manifest["files"][role] for role in ("val_gt", "test_gt", "keys") if manifest["files"][role]]
    print(f"  also {', '.join(written)} and the manifest custom.json in {args.out}")
    print(f"  image root {manifest['image_root']} (images are not copied)")
    # scripts/train.sh runs from the repository root: a relative DIR given elsewhere would not be found there.
    out = args.out if Path.cwd().resolve() == REPO else args.out.absolute()
    print(f"\nTrain on it:\n  bash scripts/train.sh configs/custom/smile.yaml data.custom_root={shlex.quote(str(out))}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CUSTOM]:
        return parse_custom_args(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted([*DATASETS, FINECAPEVAL, CUSTOM]),
                        help="custom: your own images (prepare_data.py custom --help)")
    parser.add_argument("--root", type=Path, required=True, help="dataset folder; annotations go to ROOT/annotations")
    parser.add_argument("--image-root", type=Path,
                        help="folder the annotations' image paths are relative to (default ROOT/images)")
    parser.add_argument("--annotations-from", type=Path, metavar="DIR",
                        help="copy the annotation files from DIR instead of downloading them")
    parser.add_argument("--check-only", action="store_true", help="fetch and write nothing; only run the checks")
    parser.add_argument("--expect-counts", action=argparse.BooleanOptionalAction, default=True,
                        help="warn when a split's image count differs from the Karpathy split (default: on)")
    parser.add_argument("--force", action="store_true", help="download files again even if present")
    parser.add_argument("--base-url", default=BASE_URL, help="where BLIP's annotation files are served")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per download connection")
    parser.add_argument("--show", type=int, default=10, help="how many missing image paths to list")
    args = parser.parse_args(argv)
    if args.dataset == CUSTOM:
        parser.error("custom takes flags of its own and comes first: prepare_data.py custom --input SRC --out DIR")
    if args.check_only and args.annotations_from:
        parser.error("--check-only fetches nothing: drop --annotations-from, or drop --check-only")
    if args.annotations_from is not None and not args.annotations_from.is_dir():
        parser.error(f"--annotations-from {args.annotations_from} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dataset == CUSTOM:
        return prepare_custom(args, argv[1:])
    if args.dataset == FINECAPEVAL:
        return prepare_finecapeval(args.root, args.image_root, args.check_only, args.show)
    spec = DATASETS[args.dataset]
    ann_dir = args.root / "annotations"
    image_root = args.image_root if args.image_root is not None else args.root / "images"
    try:
        if not args.check_only:
            fetch_annotations(spec, ann_dir, args.annotations_from, args.base_url, args.force, args.timeout)
            write_gt_files(spec, ann_dir)
        problems = check(spec, ann_dir, image_root, args.expect_counts, args.show)
        if spec.name == "coco":
            report_coco_instances(ann_dir)
    except PrepareError as error:
        print(f"prepare_data: {error}", file=sys.stderr)
        return 1
    if problems:
        print(f"prepare_data: {spec.name} is not ready ({len(problems)} problem(s)):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"\n{spec.name} is ready. Point a run at it with these overrides (not needed when they equal the "
          f"config's data.* keys):")
    print("  " + " ".join(shlex.quote(o) for o in overrides(spec, ann_dir, image_root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
