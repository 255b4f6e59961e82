"""Images to caption, wherever a user keeps them: a folder, a glob, a list file, webdataset shards or parquet.

``resolve_inputs`` turns each ``--input`` of caption_images.py into an `InputSource` (its kind detected from the
path, or forced), checking up front what can fail in seconds: a missing path, an empty input, a parquet file
without the image column. `ImageRecords` is the torch IterableDataset over all of them: one `ImageRecord` per
image, decoded inside DataLoader workers, in a deterministic order, with each rank (and each worker of a rank)
taking a disjoint share.

Kinds and keys (the key names an image in the output; with the location it identifies it for resume):

====================  ======================================  ==========================================
kind                  key                                     location
====================  ======================================  ==========================================
folder (recursive)    path relative to the folder, no suffix  ``path``: the file (folder joined, normalised)
glob, single image    the path as matched                     ``path``
list (one per line)   the path as written                     ``path`` (relative lines: from the list's folder)
shards (tar)          the sample key (webdataset's rule)      ``shard``: the tar file
parquet               ``--key-column``, else ``file.parquet:row``   ``shard``: the file, ``row``: row in file
====================  ======================================  ==========================================

Sharing the work, so that no image is decoded twice and none is missed, at any world size:

* sharded kinds (tar shards, parquet row groups) are "units": rank r takes units r, r + W, ... whole (a rank
  never opens another rank's shards). Its DataLoader workers split those units again when there are at least as
  many as workers; otherwise each worker streams the rank's units and decodes every num_workers-th image, so that
  two big shards still keep eight workers busy.
* streaming kinds (folder, glob, list) are enumerated in a fixed order (directory entries sorted, list order) and
  image i goes to rank i mod W, then to worker (i div W) mod num_workers. The folder is walked lazily with
  ``os.scandir``, one directory at a time, so a million-image folder starts at once.

Bad images never raise: an unreadable, truncated, zero-byte, non-image or decompression-bomb file (PIL's
``Image.MAX_IMAGE_PIXELS`` rule: more than twice the limit is refused) becomes a record with ``error`` set, which
the job writes to failed.jsonl. Images whose `record_id` is in ``done`` (a resumed run) are passed over before any
decoding; the count of them rides on the next record (``skipped``).

Decoding equals ``Captioner.preprocess``: PIL open, ``imaging.to_rgb`` with the EXIF orientation applied (a phone
photo is captioned upright), then the captioner's own ``transform``. With ``device_jpeg``, plain JPEGs (RGB or
greyscale, upright, ending with their end marker) travel as their bytes and are decoded on the device in batches
(`decode_device_jpegs`, the training path's nvJPEG decoder in data/gpu_augment.py) when the transform is BLIP's
``imaging.eval_transform``.
"""
from __future__ import annotations

import glob
import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data.shards import ShardError, expand_braces, iter_samples
from imaging import to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A shard sample's image member, first found in this order (img2dataset writes jpg).
SHARD_IMAGE_EXTENSIONS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
INPUT_FORMATS = ("folder", "glob", "list", "shards", "parquet")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = set("*?[")
_JPEG_END = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


class InputError(ValueError):
    """An --input that cannot be captioned (missing, empty, wrong kind, a missing parquet column); the message
    names it."""


@dataclass(frozen=True)
class InputSource:
    """One --input: ``kind`` (one of `INPUT_FORMATS`), ``spec`` as given, and ``files``: the folder (folder), the
    list file (list), the matched images (glob), the shard or parquet files (shards, parquet)."""

    kind: str
    spec: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Unit:
    """A piece of work: a whole streaming source (``sharded`` False), or one shard / one parquet row group."""

    source: InputSource
    file: str = ""
    row_group: int = -1
    first_row: int = 0  # the row group's first row in its file (parquet keys and locations)
    rows: int | None = None

    @property
    def sharded(self) -> bool:
        return self.source.kind in ("shards", "parquet")


@dataclass
class ImageRecord:
    """What a worker yields per image; ``kind`` says which fields are set.

    * "image": ``pixels`` (3, S, S) float32 from the captioner's transform, or, for the device decode, ``jpeg``
      (the file's bytes, uint8 (N,)) and ``size`` (H, W); ``rgb`` (H, W, 3) uint8 when the job re-ranks with CLIP.
    * "failed": ``error``, the reason.
    * "skips": nothing but ``skipped`` (done images passed over at the end of the worker's share).

    ``skipped`` on any record: how many done images were passed over just before it.
    """

    kind: str
    key: str | None = None
    location: dict = field(default_factory=dict)
    pixels: torch.Tensor | None = None
    jpeg: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    rgb: np.ndarray | None = None
    error: str | None = None
    skipped: int = 0

    def meta(self) -> dict:
        """The output line's fields before the caption: key, then the location."""
        return {"key": self.key, **self.location}


@dataclass
class RecordBatch:
    """A collated batch: ``images`` (the "image" records, in order), ``pixels`` (n, 3, S, S) for the ones decoded in
    workers (rows ``pixel_rows`` of ``images``; the others carry ``jpeg``), ``failed`` records, ``skipped`` count."""

    images: list[ImageRecord]
    pixels: torch.Tensor | None
    pixel_rows: list[int]
    failed: list[ImageRecord]
    skipped: int

    def pin_memory(self) -> "RecordBatch":
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate_records(records: Sequence[ImageRecord]) -> RecordBatch:
    """DataLoader collate: images (decoded pixels stacked), failures and the skip count, kept apart."""
    images = [record for record in records if record.kind == "image"]
    pixel_rows = [row for row, record in enumerate(images) if record.pixels is not None]
    pixels = torch.stack([images[row].pixels for row in pixel_rows]) if pixel_rows else None
    for row in pixel_rows:
        images[row].pixels = None  # the stacked copy is the one that travels
    failed = [record for record in records if record.kind == "failed"]
    return RecordBatch(images, pixels, pixel_rows, failed, sum(record.skipped for record in records))


def record_id(record: dict) -> str:
    """The identity of an image across runs, from an output line or a record's `meta`: its location and key (two
    files ``a.jpg`` and ``a.png`` share a key but not a path; two shards can reuse a sample key)."""
    place = record.get("shard") or record.get("path") or ""
    return f"{place}\0{record.get('row', '')}\0{record.get('key')}"


# ------------------------------------------------------------------------------------------ resolving inputs


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _detect_kind(spec: str) -> str:
    lowered = spec.lower()
    if "{" in spec and lowered.endswith(SHARD_SUFFIXES):
        return "shards"
    if lowered.endswith(SHARD_SUFFIXES):
        return "shards"
    if lowered.endswith(".parquet"):
        return "parquet"
    if _GLOB_CHARS & set(spec) and not Path(spec).exists():
        matched = sorted(glob.glob(spec, recursive=True))
        if matched and all(name.lower().endswith(SHARD_SUFFIXES) for name in matched):
            return "shards"
        if matched and all(name.lower().endswith(".parquet") for name in matched):
            return "parquet"
        return "glob"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "glob" if _is_image_name(path.name) else "list"
    raise InputError(f"--input {spec}: no such file or folder")


def _sorted_glob(spec: str) -> list[str]:
    return sorted(glob.glob(os.path.expanduser(spec), recursive=True))


def resolve_inputs(specs: Sequence[str], input_format: str | None = None, image_column: str = "image",
                   key_column: str | None = None) -> list[InputSource]:
    """Each --input as an `InputSource`, checked: it exists and holds at least one image (a folder is walked
    only until its first image), parquet files have ``image_column`` (and ``key_column``).

    Raises:
        InputError: naming the input.
    """
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise InputError(f"--input-format {input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
    if not specs:
        raise InputError("no --input given")
    sources = []
    for spec in specs:
        kind = input_format or _detect_kind(spec)
        if kind == "folder":
            root = Path(spec).expanduser()
            if not root.is_dir():
                raise InputError(f"--input {spec}: not a folder")
            if next(walk_images(root), None) is None:
                raise InputError(f"--input {spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder "
                                 "or below it")
            files = (spec,)
        elif kind == "list":
            path = Path(spec).expanduser()
            if not path.is_file():
                raise InputError(f"--input {spec}: no such list file")
            with path.open("rb") as handle:
                head = handle.read(1 << 16)
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as error:
                if error.start < len(head) - 4:  # not a multi-byte character cut by the 64 KiB read
                    raise InputError(f"--input {spec}: read as a list of image paths, but it is not a text file "
                                     f"(give --input-format for another kind)") from None
            if next(_list_lines(path), None) is None:
                raise InputError(f"--input {spec}: the list file names no image (one path per line)")
            files = (spec,)
        elif kind == "glob":
            files = tuple(name for name in _sorted_glob(spec) if Path(name).is_file())
            if not files:
                raise InputError(f"--input {spec}: matches no file")
        else:  # shards, parquet: brace ranges and globs name several files
            names = [name for pattern in expand_or_fail(spec) for name in
                     (_sorted_glob(pattern) if _GLOB_CHARS & set(pattern) else [pattern])]
            missing = [name for name in names if not Path(name).expanduser().is_file()]
            if not names or missing:
                raise InputError(f"--input {spec}: {len(missing)} of {len(names)} {kind} file(s) not found"
                                 + (f", first {missing[0]}" if missing else ""))
            files = tuple(names)
            if kind == "parquet":
                rows = sum(_check_parquet(name, image_column, key_column) for name in files)
                if rows == 0:
                    raise InputError(f"--input {spec}: the parquet file(s) hold no rows")
        sources.append(InputSource(kind, spec, files))
    return sources


def expand_or_fail(spec: str) -> list[str]:
    try:
        return expand_braces(spec)
    except ShardError as error:
        raise InputError(f"--input {spec}: {error}") from None


def _check_parquet(path: str, image_column: str, key_column: str | None) -> int:
    """Rows of ``path``, after checking that its schema has the columns (only the footer is read)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError variants for non-parquet files
        raise InputError(f"--input {path}: not a readable parquet file ({type(error).__name__}: {error})") from None
    names = parquet.schema_arrow.names
    for option, column in (("--image-column", image_column), ("--key-column", key_column)):
        if column is not None and column not in names:
            raise InputError(f"--input {path}: no column {column!r} ({option}); its columns: {', '.join(names)}")
    return parquet.metadata.num_rows


def build_units(sources: Sequence[InputSource]) -> list[Unit]:
    """Every unit of work, in input order: one per streaming source, one per shard, one per parquet row group."""
    units = []
    for source in sources:
        if source.kind == "shards":
            units += [Unit(source, file=name) for name in source.files]
        elif source.kind == "parquet":
            import pyarrow.parquet as pq

            for name in source.files:
                metadata = pq.ParquetFile(name).metadata
                first = 0
                for group in range(metadata.num_row_groups):
                    rows = metadata.row_group(group).num_rows
                    units.append(Unit(source, file=name, row_group=group, first_row=first, rows=rows))
                    first += rows
        else:
            units.append(Unit(source))
    return units


# ------------------------------------------------------------------------------------------ enumerating images


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` (by extension, case-insensitive), depth first, each directory's entries in name
    order; hidden entries (".name") are skipped; a directory reached twice through links is walked once."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[Path]:
        try:
            status = folder.stat()
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            return  # an unreadable subfolder: nothing to caption there
        if (status.st_dev, status.st_ino) in seen:
            return
        seen.add((status.st_dev, status.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                yield from walk(Path(entry.path))
            elif _is_image_name(entry.name):
                yield Path(entry.path)

    yield from walk(root)


def _list_lines(path: Path) -> Iterator[str]:
    # surrogateescape: a file name that is not UTF-8 (Linux allows any bytes) still names its file.
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


# An item before decoding: (key, location, payload), payload a path or the bytes, or an ``error`` string.
Item = tuple[str | None, dict, "str | bytes | None", "str | None"]


def _path_items(unit: Unit) -> Iterator[Item]:
    source = unit.source
    if source.kind == "folder":
        root = Path(source.spec).expanduser()
        for path in walk_images(root):
            relative = path.relative_to(root)
            key = relative.with_suffix("").as_posix()
            location = os.path.normpath(os.path.join(source.spec, relative))
            yield key, {"path": location}, location, None
    elif source.kind == "glob":
        for name in source.files:
            yield name, {"path": name}, name, None
    else:  # list
        list_file = Path(source.spec).expanduser()
        for line in _list_lines(list_file):
            path = Path(line).expanduser()
            location = str(path) if path.is_absolute() else os.path.normpath(list_file.parent / path)
            yield line, {"path": location}, location, None


def _shard_items(unit: Unit) -> Iterator[Item]:
    location = {"shard": unit.file}
    try:
        for key, files in iter_samples(unit.file):
            extension = next((ext for ext in SHARD_IMAGE_EXTENSIONS if ext in files), None)
            if extension is None:
                yield key, location, None, f"no image member in the sample (has: {', '.join(sorted(files)) or 'none'})"
            else:
                yield key, location, files[extension], None
    except ShardError as error:  # damage mid-shard: the samples before it came through; name the rest as lost
        yield None, location, None, f"the rest of the shard is unreadable: {error}"


def _parquet_items(unit: Unit, image_column: str, key_column: str | None) -> Iterator[Item]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.file)
    folder = Path(unit.file).parent
    columns = [image_column] + ([key_column] if key_column and key_column != image_column else [])
    row = unit.first_row
    # A row group can hold gigabytes of images: read it a few rows at a time.
    for batch in parquet.iter_batches(batch_size=64, row_groups=[unit.row_group], columns=columns):
        images = batch.column(image_column).to_pylist()
        keys = batch.column(key_column).to_pylist() if key_column else [None] * len(images)
        for value, key in zip(images, keys):
            location = {"shard": unit.file, "row": row}
            key = str(key) if key is not None else f"{Path(unit.file).name}:{row}"
            row += 1
            if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, (bytes, bytearray)):
                yield key, location, bytes(value), None
            elif isinstance(value, str) and value:
                path = Path(value).expanduser()
                yield key, location, str(path if path.is_absolute() else folder / path), None
            else:
                yield key, location, None, f"no image in column {image_column!r} (got {type(value).__name__})"


# ------------------------------------------------------------------------------------------ decoding


def open_upright_rgb(payload: str | bytes) -> Image.Image:
    """The image (a path or the file's bytes) as 8-bit RGB turned upright, exactly as ``Captioner.preprocess``
    gets it from a path (``Captioner.load_image``: ``open_rgb(exif_transpose=True)``)."""
    with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as image:
        return to_rgb(image, exif_transpose=True)


def failure_reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, Image.DecompressionBombError):
        return f"decompression bomb: {error}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _plain_jpeg(payload: bytes) -> tuple[bytes, tuple[int, int]] | None:
    """(bytes, (H, W)) when the file is a JPEG the device decoder turns into exactly PIL's RGB: RGB or greyscale
    (PIL's CMYK conversion is its own), no EXIF rotation (the device path does not rotate), ending with its end
    marker (a truncated file is decoded, and fails, in the worker as on the CPU path); else None. Opening the
    header applies PIL's decompression-bomb rule."""
    raw = payload
    with Image.open(io.BytesIO(raw)) as image:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return None
        width, height = image.size
    if not raw.rstrip(b"\0").endswith(_JPEG_END):
        return None
    return raw, (height, width)


def decode_device_jpegs(jpegs: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], device: torch.device,
                        image_size: int) -> torch.Tensor:
    """JPEG files (uint8 (N,) each) -> (B, 3, S, S) float32 on ``device``: one batched ``decode_jpeg`` (nvJPEG on
    CUDA), PIL's two-pass bicubic resize of the whole image and CLIP's normalisation, i.e. ``eval_transform`` on
    the device. It is the training path's decoder (data/gpu_augment.py) with the crop set to the whole image and
    no flip or RandAugment. Raises ``ImageLoadError`` when a file fails to decode there."""
    from data.gpu_augment import EncodedImageBatch, decode_and_augment

    count = len(jpegs)
    sizes_tensor = torch.tensor(list(sizes), dtype=torch.long).reshape(count, 2)
    batch = EncodedImageBatch(
        data=list(jpegs), is_jpeg=[True] * count, paths=[f"image {index}" for index in range(count)],
        sizes=sizes_tensor, crops=torch.cat([torch.zeros_like(sizes_tensor), sizes_tensor], dim=1),
        flips=torch.zeros(count, dtype=torch.bool), ops=torch.zeros(count, 0, dtype=torch.long),
        signs=torch.zeros(count, 0, dtype=torch.long), image_size=image_size)
    return decode_and_augment(batch, device, image_size)


# ------------------------------------------------------------------------------------------ the dataset


class ImageRecords(IterableDataset):
    """Every image of ``sources`` in this rank's share, as `ImageRecord` (see the module docstring for the order
    and the split between ranks and DataLoader workers).

    Args:
        sources: from `resolve_inputs`.
        transform: RGB PIL image -> (3, S, S) float32 (``Captioner.transform``); pickled into the workers.
        done: `record_id` of images already written (resume): passed over before decoding.
        rank, world_size: this process's share.
        keep_rgb: also send the RGB pixels (CLIP re-ranking needs the image itself).
        device_jpeg: send plain JPEGs as bytes for `decode_device_jpegs`.
        image_column, key_column: parquet columns.
    """

    def __init__(self, sources: Sequence[InputSource], transform: Callable, done: frozenset[str] = frozenset(),
                 rank: int = 0, world_size: int = 1, keep_rgb: bool = False, device_jpeg: bool = False,
                 image_column: str = "image", key_column: str | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.units = build_units(sources)
        self.transform = transform
        self.done = done
        self.rank, self.world_size = rank, world_size
        self.keep_rgb, self.device_jpeg = keep_rgb, device_jpeg
        self.image_column, self.key_column = image_column, key_column

    def rank_units(self) -> tuple[list[Unit], list[Unit]]:
        """(this rank's whole sharded units, every streaming unit)."""
        sharded = [unit for unit in self.units if unit.sharded]
        return sharded[self.rank :: self.world_size], [unit for unit in self.units if not unit.sharded]

    def plan(self, worker: int, num_workers: int) -> list[tuple[Unit, int, int]]:
        """(unit, modulus, remainder) for one worker: it takes the unit's items i with i % modulus == remainder."""
        sharded, streaming = self.rank_units()
        plan: list[tuple[Unit, int, int]] = []
        if len(sharded) >= num_workers:
            plan += [(unit, 1, 0) for unit in sharded[worker::num_workers]]
        else:
            plan += [(unit, num_workers, worker) for unit in sharded]
        # Streaming: item i -> rank i % W, then worker (i // W) % num_workers; both at once:
        plan += [(unit, self.world_size * num_workers, self.rank + self.world_size * worker) for unit in streaming]
        # Keep the input order: units are listed sharded-first above only for the split.
        order = {id(unit): index for index, unit in enumerate(self.units)}
        return sorted(plan, key=lambda entry: order[id(entry[0])])

    def share_size(self) -> int | None:
        """Images in this rank's share when that is cheap to know (glob, list, parquet footers), else None
        (a folder would have to be walked, a tar shard read)."""
        sharded, streaming = self.rank_units()
        total = 0
        for unit in sharded:
            if unit.rows is None:
                return None
            total += unit.rows
        for unit in streaming:
            if unit.source.kind == "folder":
                return None
            count = (len(unit.source.files) if unit.source.kind == "glob"
                     else sum(1 for _ in _list_lines(Path(unit.source.spec).expanduser())))
            total += max(0, math.ceil((count - self.rank) / self.world_size))
        return total

    def items(self, unit: Unit) -> Iterator[Item]:
        if unit.source.kind == "shards":
            return _shard_items(unit)
        if unit.source.kind == "parquet":
            return _parquet_items(unit, self.image_column, self.key_column)
        return _path_items(unit)

    def decode(self, key: str | None, location: dict, payload: str | bytes) -> ImageRecord:
        """One image -> an "image" record, or a "failed" one with the reason (never raises for a bad file)."""
        try:
            if self.device_jpeg and not self.keep_rgb:
                payload = payload if isinstance(payload, bytes) else Path(payload).read_bytes()  # read once
                plain = _plain_jpeg(payload)
                if plain is not None:
                    raw, size = plain
                    return ImageRecord("image", key, location, jpeg=torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                                       size=size)
            rgb = open_upright_rgb(payload)
            pixels = self.transform(rgb)
        # One malformed file must not end a job of days; PIL raises many types (OSError, SyntaxError,
        # DecompressionBombError, struct.error, ...), so every ordinary exception becomes the image's failure.
        except Exception as error:  # noqa: BLE001
            return ImageRecord("failed", key, location, error=failure_reason(error))
        rgb_array = np.asarray(rgb) if self.keep_rgb else None
        return ImageRecord("image", key, location, pixels=pixels, rgb=rgb_array)

    def __iter__(self) -> Iterator[ImageRecord]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped = 0
        for unit, modulus, remainder in self.plan(worker, num_workers):
            for index, (key, location, payload, error) in enumerate(self.items(unit)):
                # A shard's damage is met by every worker streaming it; the first worker reports it.
                if index % modulus != remainder and not (key is None and remainder == 0):
                    continue
                if record_id({"key": key, **location}) in self.done:
                    skipped += 1
                    continue
                record = (ImageRecord("failed", key, location, error=error) if error is not None
                          else self.decode(key, location, payload))
                record.skipped, skipped = skipped, 0
                yield record
        if skipped:
            yield ImageRecord("skips", skipped=skipped)


__all__ = ["IMAGE_EXTENSIONS", "INPUT_FORMATS", "ImageRecord", "ImageRecords", "InputError", "InputSource",
           "RecordBatch", "Unit", "collate_records", "decode_device_jpegs", "open_upright_rgb", "record_id",
           "resolve_inputs", "walk_images"]
