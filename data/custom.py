"""Your own captioned images as this repository's annotation files: read them, split them, write them.

``python scripts/prepare_data.py custom --input SRC --out DIR`` is the command; the reading, the split and the
writing live here so that they can be tested and reused without it. Three layouts of SRC are read
(`detect_layout`, or named with ``layout``):

* ``folder``: images with sidecar captions, ``photo.jpg`` + ``photo.txt`` (one caption per non-blank line),
  nested subfolders allowed; the kohya / EveryDream convention;
* ``csv`` / ``jsonl``: a table with an image column and a caption column (`IMAGE_COLUMNS`, `CAPTION_COLUMNS` are
  the names looked for), several rows per image or (JSONL) a list of captions; image paths relative to the table's
  folder, absolute, or relative to ``image_root``. A ``.json`` file holding one list of such objects is read too;
* ``imagefolder``: Hugging Face's ``imagefolder`` ``metadata.jsonl`` (or ``metadata.csv``): ``file_name`` and a
  text column, one row per image, paths relative to the metadata file's folder.

Every image has a key, any string: ``--key-column``'s value, else its path without the extension (relative to
the folder, the table's folder or ``image_root``), as webdataset / img2dataset name their samples. Nothing needs
a number in its file name: the images get integer ids 1..N in the order of their sorted keys, written as each
entry's ``id`` (which `data.captions.entry_image_id` reads before the file-name rule) beside its ``key``.

`write_custom_set` writes into DIR: ``train.json``, ``val.json``, ``test.json`` (one entry per image, ``{"image",
"caption": [raw captions], "id", "key"}``), ``val_gt.json`` and ``test_gt.json`` (COCO-format ground truth with
file names, `data.build_coco_gt`), ``keys.json`` (id -> key) and the manifest ``custom.json`` (counts, seed,
source, and ``image_root``: the common folder of the images, which are not copied). `custom_data_paths` reads the
manifest back into the ``data.*`` keys (training's ``data.custom_root``).

Errors: bad data raise `CustomDataError` (an `AnnotationError`, the annotation loader's), naming the file, the line
or entry, and the key; options that do not fit the data (a split larger than the set, an unknown layout) raise
`CustomOptionError`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import utils
from data.captions import pre_caption
from data.datasets import AnnotationError, build_coco_gt

LAYOUTS = ("folder", "csv", "jsonl", "imagefolder")
# Image files the folder layout pairs with sidecar captions (lower-case suffixes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_SUFFIX = ".txt"
# Column names looked for, in this order, when --image-column / --caption-column are not given.
IMAGE_COLUMNS = ("image", "file_name", "filename", "image_path", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "captions", "description")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder
MANIFEST = "custom.json"
KEYS_FILE = "keys.json"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTION = 0.05  # --val / --test default: 5 % of the images each, at least one


class CustomDataError(AnnotationError):
    """The user's data is bad (a missing image, an empty caption, a duplicate key, an unreadable table); the
    message names the file, the line or entry, and the key."""


class CustomOptionError(ValueError):
    """The options do not fit the data (a split larger than the set, a layout that does not match SRC)."""


@dataclass
class CustomImage:
    """One of the user's images: ``key`` (any string), ``path`` (absolute), its raw captions (stripped, in the
    order read) and ``origin``, where it was first named (``"captions.csv: line 3"``), for messages."""

    key: str
    path: Path
    captions: list[str] = field(default_factory=list)
    origin: str = ""


@dataclass
class CustomSource:
    """What a reader found: the images, the folder their paths are relative to when written (``image_root``),
    images skipped for having no caption (the folder layout's images without a ``.txt``), and the layout read."""

    images: list[CustomImage]
    image_root: Path
    uncaptioned: list[Path] = field(default_factory=list)
    layout: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def detect_layout(source: str | Path) -> str:
    """The layout of ``source``: a folder holding ``metadata.jsonl``/``metadata.csv`` (itself or in a direct
    subfolder, as Hugging Face's split folders) is ``imagefolder``, any other folder ``folder``; a file named
    ``metadata.jsonl``/``.csv`` is ``imagefolder``, ``*.csv``/``*.tsv`` is ``csv``, ``*.jsonl``/``*.json`` is
    ``jsonl``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        CustomOptionError: a file of another kind (name the layout instead).
    """
    source = Path(source)
    if source.is_dir():
        return "imagefolder" if _metadata_files(source) else "folder"
    if not source.exists():
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    if source.name in METADATA_NAMES:
        return "imagefolder"
    suffix = source.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise CustomOptionError(f"--input {source}: cannot tell its layout from the name (a folder, *.csv, *.tsv, "
                            f"*.jsonl, *.json or metadata.jsonl); name it with --layout {{{','.join(LAYOUTS)}}}")


def _metadata_files(folder: Path) -> list[Path]:
    """Hugging Face imagefolder metadata files in ``folder`` or a direct subfolder (its split folders)."""
    found = [folder / name for name in METADATA_NAMES if (folder / name).is_file()]
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += [child / name for name in METADATA_NAMES if (child / name).is_file()]
    return found


def read_source(source: str | Path, layout: str | None = None, image_column: str | None = None,
                caption_column: str | None = None, key_column: str | None = None,
                image_root: str | Path | None = None) -> CustomSource:
    """Read ``source`` in ``layout`` (default: `detect_layout`); the column options apply to tables.

    Raises:
        CustomDataError: bad data (see the module docstring); CustomOptionError: options that do not fit.
    """
    source = Path(source)
    layout = layout or detect_layout(source)
    if layout not in LAYOUTS:
        raise CustomOptionError(f"unknown layout {layout!r}; one of {list(LAYOUTS)}")
    if not source.exists():
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    found = _read_layout(source, layout, image_column, caption_column, key_column, image_root)
    found.layout = layout
    return found


def _read_layout(source: Path, layout: str, image_column: str | None, caption_column: str | None,
                 key_column: str | None, image_root: str | Path | None) -> CustomSource:
    if layout == "folder":
        if not source.is_dir():
            raise CustomOptionError(f"--input {source}: the folder layout needs a folder of images and .txt files")
        if image_root is not None or image_column or caption_column or key_column:
            raise CustomOptionError("the folder layout takes no --image-root or column options (its keys are the "
                                    "images' paths; captions come from the .txt beside each image)")
        return read_folder(source)
    if layout == "imagefolder":
        if image_root is not None:
            raise CustomOptionError("the imagefolder layout takes no --image-root: its file_name paths are relative "
                                    "to each metadata file's folder")
        tables = _metadata_files(source) if source.is_dir() else [source]
        if not tables:
            raise CustomOptionError(f"--input {source}: no {' or '.join(METADATA_NAMES)} in it")
        return read_tables(tables, image_column or "file_name", caption_column, key_column, None,
                           one_row_per_image=True, key_base=source if source.is_dir() else source.parent)
    if source.is_dir():
        raise CustomOptionError(f"--input {source}: the {layout} layout needs a file, not a folder")
    return read_tables([source], image_column, caption_column, key_column, image_root, one_row_per_image=False,
                       kind=layout)


def _caption_lines(text_file: Path, key: str) -> list[str]:
    try:
        text = text_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise CustomDataError(f"{text_file}: key {key!r}: not UTF-8 text ({error})") from None
    captions = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            captions.append(_checked_caption(line.strip(), f"{text_file}: line {number}", key))
    if not captions:
        raise CustomDataError(f"{text_file}: key {key!r}: the caption file is empty (one caption per line)")
    return captions


def _checked_caption(raw: str, where: str, key: str) -> str:
    """``raw`` stripped; an error when BLIP's normalisation leaves nothing of it (as the annotation loader's)."""
    if not pre_caption(raw, max_words=None):
        raise CustomDataError(f"{where}: key {key!r}: caption is empty after normalisation: {raw!r}")
    return raw.strip()


def read_folder(root: str | Path) -> CustomSource:
    """Images with sidecar captions under ``root`` (recursive; names starting with "." are skipped): each
    ``name.txt`` captions the image ``name.<image suffix>`` beside it. The key is the image's path relative to
    ``root`` without the extension (``a/b/IMG_1``). Images without a ``.txt`` are returned as ``uncaptioned``.

    Raises:
        CustomDataError: a ``.txt`` with no image beside it (missing image), two images sharing one stem (a
            duplicate key: which one does the ``.txt`` caption?), a caption file that is empty, or a line that is
            empty after normalisation.
    """
    root = Path(root).absolute()
    images: dict[str, list[Path]] = {}
    texts: dict[str, Path] = {}
    for path in _walk(root):
        suffix = path.suffix.lower()
        key = path.relative_to(root).with_suffix("").as_posix()
        if suffix in IMAGE_SUFFIXES:
            images.setdefault(key, []).append(path)
        elif suffix == CAPTION_SUFFIX:
            texts[key] = path
    found = []
    for key, text_file in sorted(texts.items()):
        paths = sorted(images.get(key, []))
        if not paths:
            raise CustomDataError(f"{text_file}: key {key!r}: image file not found: no {Path(key).name}.* image "
                                  f"({', '.join(sorted(IMAGE_SUFFIXES))}) beside it")
        if len(paths) > 1:
            raise CustomDataError(f"{text_file}: key {key!r}: duplicate key: {len(paths)} images share it "
                                  f"({', '.join(p.name for p in paths)}); rename all but one")
        found.append(CustomImage(key, paths[0], _caption_lines(text_file, key), str(text_file)))
    uncaptioned = sorted(path for key, paths in images.items() if key not in texts for path in paths)
    return CustomSource(found, root, uncaptioned)


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` in sorted order, skipping hidden files and folders (.git, .ipynb_checkpoints, ...)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _table_kind(table: Path) -> str:
    return "csv" if table.suffix.lower() in (".csv", ".tsv") else "jsonl"


def _rows(table: Path, kind: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each row of ``table`` read as ``kind``: "csv" (tab-separated for a ``.tsv``; ``line N``
    is the physical line) or "jsonl" (JSON Lines, ``line N``, or one JSON list when the text starts with "[",
    ``entry N``)."""
    if kind == "csv":
        try:
            with table.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if table.suffix.lower() == ".tsv" else ",")
                for row in reader:
                    yield f"{table}: line {reader.line_num}", row
        except UnicodeDecodeError as error:
            raise CustomDataError(f"{table}: not UTF-8 text ({error})") from None
        except csv.Error as error:
            raise CustomDataError(f"{table}: not valid CSV: {error}") from None
        return
    try:
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise CustomDataError(f"{table}: not UTF-8 text ({error})") from None
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise CustomDataError(f"{table}: invalid JSON at line {error.lineno} column {error.colno}: "
                                  f"{error.msg}") from None
        if not isinstance(entries, list):
            raise CustomDataError(f"{table}: expected a JSON list of objects, got a JSON {type(entries).__name__}")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise CustomDataError(f"{table}: entry {index} must be a JSON object, got {entry!r}")
            yield f"{table}: entry {index}", entry
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CustomDataError(f"{table}: line {number}: invalid JSON at column {error.colno}: {error.msg}") from None
        if not isinstance(row, dict):
            raise CustomDataError(f"{table}: line {number} must be a JSON object, got {row!r}")
        yield f"{table}: line {number}", row


def _column(table: Path, row: dict, given: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
    if given is not None:
        if given not in row:
            raise CustomDataError(f"{table}: has no {what} column {given!r} (its columns: {sorted(row)})")
        return given
    for name in candidates:
        if name in row:
            return name
    raise CustomDataError(f"{table}: no {what} column: none of {list(candidates)} is among its columns "
                          f"{sorted(row)}; name it with {flag}")


def _row_captions(value, where: str, key: str, column: str) -> list[str]:
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        values = value
    else:
        raise CustomDataError(f"{where}: key {key!r}: column {column!r} must be a caption string or a list of "
                              f"them, got {value!r}")
    if not values:
        raise CustomDataError(f"{where}: key {key!r}: column {column!r} holds no caption (an empty list)")
    return [_checked_caption(raw, where, key) for raw in values]


def _key_of(image: Path, base: Path) -> str:
    """An image's default key: its path relative to ``base`` without the extension, else the absolute path's."""
    try:
        relative = PurePosixPath(image.relative_to(base).as_posix())
    except ValueError:
        relative = PurePosixPath(image.as_posix())
    return str(relative.with_suffix(""))


def read_tables(tables: Sequence[Path], image_column: str | None, caption_column: str | None,
                key_column: str | None, image_root: str | Path | None, one_row_per_image: bool,
                key_base: str | Path | None = None, kind: str | None = None) -> CustomSource:
    """The images the rows of ``tables`` name, their captions merged over rows (in row order). ``kind`` ("csv" or
    "jsonl") says how to parse them; None: from each file's suffix (``.csv``/``.tsv``: csv, else jsonl).

    A relative image path is taken relative to ``image_root`` when given, else to its table's folder. Without
    ``key_column``, an image's key is its path relative to ``key_base`` (default: that same folder) without the
    extension. With ``one_row_per_image`` (Hugging Face's metadata files) a second row for an image is a duplicate
    key.

    Raises:
        CustomDataError: a missing column, an image cell that is not a non-empty string, a missing image file, an
            empty caption, a key that two different images share, or an image given two keys.
    """
    by_path: dict[Path, CustomImage] = {}
    path_of_key: dict[str, Path] = {}
    bases = []
    for table in tables:
        table = Path(table).absolute()
        base = Path(image_root).expanduser().absolute() if image_root is not None else table.parent
        bases.append(base)
        columns = None
        for where, row in _rows(table, kind or _table_kind(table)):
            if columns is None:
                columns = (_column(table, row, image_column, IMAGE_COLUMNS, "image", "--image-column"),
                           _column(table, row, caption_column, CAPTION_COLUMNS, "caption", "--caption-column"),
                           key_column and _column(table, row, key_column, (), "key", "--key-column"))
            image_name, caption_name, key_name = columns
            value = row.get(image_name)
            if not isinstance(value, str) or not value.strip():
                raise CustomDataError(f"{where}: column {image_name!r} must be a non-empty image path, got {value!r}")
            image = Path(os.path.normpath(base / Path(value.strip()).expanduser()))
            if key_name:
                raw_key = row.get(key_name)
                if raw_key is None or isinstance(raw_key, (dict, list, bool)) or not str(raw_key).strip():
                    raise CustomDataError(f"{where}: column {key_name!r} must be a non-empty key, got {raw_key!r}")
                key = str(raw_key).strip()
            else:
                key = _key_of(image, Path(key_base).absolute() if key_base is not None else base)
            captions = _row_captions(row.get(caption_name), where, key, caption_name)
            first = by_path.get(image)
            if first is not None:
                if one_row_per_image:
                    raise CustomDataError(f"{where}: key {key!r}: duplicate key: {first.origin} already names the "
                                          f"image {value!r} (a metadata file has one row per image; give a list of "
                                          f"captions instead)")
                if first.key != key:
                    raise CustomDataError(f"{where}: key {key!r}: the image {value!r} has the key {first.key!r} at "
                                          f"{first.origin}; one image, one key")
                first.captions += captions
                continue
            if key in path_of_key:
                other = by_path[path_of_key[key]]
                raise CustomDataError(f"{where}: key {key!r}: duplicate key: {other.origin} gives it to another "
                                      f"image ({other.path}); keys name one image each")
            if not image.is_file():
                raise CustomDataError(f"{where}: key {key!r}: image file not found: {image}")
            by_path[image] = CustomImage(key, image, captions, where)
            path_of_key[key] = image
        if columns is None:
            raise CustomDataError(f"{table}: holds no rows")
    images = sorted(by_path.values(), key=lambda item: item.key)
    # The deepest folder holding every image: the image root the annotation's paths are relative to.
    folders = [str(item.path.parent) for item in images] or [str(base) for base in bases]
    return CustomSource(images, Path(os.path.commonpath(folders)))


# ----------------------------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int | float:
    """A --val / --test value: a count (``"50"``) or a fraction in (0, 1) (``"0.1"``); ValueError otherwise."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither a count nor a fraction") from None
        if not 0.0 < value < 1.0:
            raise ValueError(f"a fraction must lie between 0 and 1, got {text}") from None
        return value
    if value < 0:
        raise ValueError(f"a count cannot be negative, got {value}")
    return value


def split_sizes(total: int, val: int | float, test: int | float) -> tuple[int, int]:
    """(val images, test images) of a set of ``total`` images: counts as given; a fraction rounded, and at least
    one image (a fraction asks for a split, and an empty val split cannot select a checkpoint).

    Raises:
        CustomOptionError: the splits leave no training image.
    """
    def count(size):
        return size if isinstance(size, int) else max(1, round(size * total))

    n_val, n_test = count(val), count(test)
    if n_val + n_test >= total:
        raise CustomOptionError(f"--val {val} (= {n_val} images) and --test {test} (= {n_test}) leave no training "
                                f"image of the {total} found; give smaller sizes")
    return n_val, n_test


def assign_splits(keys: Sequence[str], n_val: int, n_test: int, seed: int) -> dict[str, str]:
    """key -> "train" | "val" | "test": the ``n_test`` keys of lowest sha256(seed, key) go to test, the next
    ``n_val`` to val, the rest to train.

    A hash rather than a shuffle: the split depends on the seed and each key alone, not on the order or the
    platform, and adding images to the set moves few of the old ones between splits (only those at the
    boundaries), so a test set stays nearly the same test set as the collection grows.
    """
    order = sorted(keys, key=lambda key: hashlib.sha256(f"{seed}\0{key}".encode()).digest())
    splits = dict.fromkeys(order, "train")
    for key in order[:n_test]:
        splits[key] = "test"
    for key in order[n_test:n_test + n_val]:
        splits[key] = "val"
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading back
# ----------------------------------------------------------------------------------------------------------------


def split_file_names() -> dict[str, str]:
    """The files of DIR by role: ``train``, ``val``, ``val_gt``, ``test``, ``test_gt``, ``keys``."""
    return {"train": "train.json", "val": "val.json", "val_gt": "val_gt.json", "test": "test.json",
            "test_gt": "test_gt.json", "keys": KEYS_FILE}


def write_custom_set(source: CustomSource, out: str | Path, val: int | float = DEFAULT_FRACTION,
                     test: int | float = DEFAULT_FRACTION, seed: int = 0, origin: dict | None = None) -> dict:
    """Write ``source``'s images as DIR's split files, ground truth, keys and manifest; returns the manifest.

    Ids are 1..N over the sorted keys, so the same images get the same ids whatever order they were read in.
    Entries are written one per image with the list of their raw captions (the loader expands a training entry to
    one sample per caption, and normalises them as BLIP does). A split left empty (``--test 0``) writes no file,
    removes the one an earlier run left, and is null in the manifest. ``origin`` (source, layout, command) is
    recorded in the manifest as given.

    Raises:
        CustomDataError: no captioned image; CustomOptionError: the split sizes leave no training image.
    """
    out = Path(out)
    images = sorted(source.images, key=lambda item: item.key)
    if not images:
        raise CustomDataError(f"{(origin or {}).get('source', 'the input')}: no captioned image found")
    n_val, n_test = split_sizes(len(images), val, test)
    splits = assign_splits([item.key for item in images], n_val, n_test, seed)
    root = source.image_root.absolute()
    names = split_file_names()
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for image_id, item in enumerate(images, 1):
        relative = Path(os.path.relpath(item.path, root)).as_posix()
        entries[splits[item.key]].append({"image": relative, "caption": list(item.captions), "id": image_id,
                                          "key": item.key})
    files: dict[str, str | None] = {}
    counts: dict[str, dict] = {}
    for split in SPLITS:
        gt = f"{split}_gt"
        if not entries[split]:
            for name in (split, gt):
                if name in names:
                    (out / names[name]).unlink(missing_ok=True)
            files[split], counts[split] = None, {"images": 0, "captions": 0}
            if split != "train":
                files[gt] = None
            continue
        utils.write_json(out / names[split], entries[split], indent=None)
        files[split] = names[split]
        counts[split] = {"images": len(entries[split]),
                         "captions": sum(len(entry["caption"]) for entry in entries[split])}
        if split != "train":
            utils.write_json(out / names[gt], build_coco_gt(out / names[split]), indent=None)
            files[gt] = names[gt]
    utils.write_json(out / KEYS_FILE, {str(image_id): item.key for image_id, item in enumerate(images, 1)})
    manifest = {
        "what": "captioned images prepared by scripts/prepare_data.py custom; train with "
                f"--opt data.custom_root={out.absolute()}",
        **(origin or {}),
        "seed": seed, "val": val, "test": test,
        "image_root": str(root),
        "files": {**files, "keys": KEYS_FILE},
        "counts": {"images": len(images), "captions": sum(len(item.captions) for item in images), **counts,
                   "uncaptioned_images_skipped": len(source.uncaptioned)},
    }
    utils.write_json(out / MANIFEST, manifest)  # last: a manifest always describes files that are there
    return manifest


def custom_data_paths(root: str | Path) -> dict:
    """The ``data.*`` values of the set prepared in ``root`` (read from its manifest): ``image_root``,
    ``train_files`` (a list), ``val_file``, ``val_gt``, ``test_file``, ``test_gt`` (None for an empty split), as
    absolute paths. The file names in the manifest are relative to ``root``; ``image_root`` is absolute as
    written (a relative one, from a hand edit, is taken relative to ``root``).

    Raises:
        FileNotFoundError: ``root`` or its manifest is missing (the message says how to make it).
        CustomDataError: the manifest is not valid JSON or lacks its keys, or a file it names is missing.
    """
    root = Path(root).expanduser()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        what = "does not exist" if not root.exists() else f"holds no {MANIFEST}"
        raise FileNotFoundError(f"{root} {what}: make it with python scripts/prepare_data.py custom --input SRC "
                                f"--out {root}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CustomDataError(f"{manifest_path}: not valid JSON ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("image_root"), str) or not files.get("train"):
        raise CustomDataError(f"{manifest_path}: not a manifest of prepare_data.py custom (needs 'image_root' and "
                              f"'files' with 'train'); prepare the set again")

    def resolve(role: str) -> str | None:
        name = files.get(role)
        if name is None:
            return None
        path = (root / name).absolute()
        if not path.is_file():
            raise CustomDataError(f"{manifest_path}: files.{role} names {path}, which does not exist")
        return str(path)

    image_root = Path(manifest["image_root"]).expanduser()
    image_root = image_root if image_root.is_absolute() else (root / image_root).absolute()
    if not image_root.is_dir():
        raise CustomDataError(f"{manifest_path}: image_root {image_root} is not a folder (moved images: edit "
                              f"image_root there)")
    return {"image_root": str(image_root), "train_files": [resolve("train")], "val_file": resolve("val"),
            "val_gt": resolve("val_gt"), "test_file": resolve("test"), "test_gt": resolve("test_gt")}


__all__ = ["CAPTION_COLUMNS", "CustomDataError", "CustomImage", "CustomOptionError", "CustomSource",
           "DEFAULT_FRACTION", "IMAGE_COLUMNS", "KEYS_FILE", "LAYOUTS", "MANIFEST", "assign_splits",
           "custom_data_paths", "detect_layout", "parse_size", "read_folder", "read_source", "read_tables",
           "split_file_names", "split_sizes", "write_custom_set"]
