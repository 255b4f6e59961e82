"""Training from webdataset tar shards: ``data.source: webdataset`` (the img2dataset layout, read by data/shards.py's
rules), a streaming `CaptionSource` that keeps the contract of data/sources.py.

Configuration (``data`` section; docs/data.md, "Training from webdataset shards")::

    source: webdataset
    train_shards: shards/{00000..00099}.tar     # a brace pattern, or a list of them
    shard_image_extensions: [jpg, jpeg, png, webp]   # the first of these a sample has is its image
    shard_captions: txt                         # txt: one caption per non-blank line | json: "captions" or "caption"
    shard_shuffle_buffer: 1000                  # samples shuffled together within a process's stream (0: off)
    shard_index_dir: cache/shards               # where the per-shard sample counts are cached (null: not cached)

How an epoch is laid out, and why:

* **Sample counts: an index pass, cached.** The learning-rate schedule needs the steps per epoch and DDP needs the
  same number of steps on every rank, before the first batch. A declared ``train_samples`` would be trusted blindly
  (a wrong one silently ends epochs early or lets ranks run out at different steps) and could not say how many
  samples each rank's whole shards hold. So at start every shard's tar headers are read once (image bytes are
  skipped by seeking; only the small caption members are read, for a digest of the references), and the counts
  are written to ``shard_index_dir/<hash of the shards' paths, sizes and mtimes>.json``: later runs, and a
  resumed run, read it instead. Rank 0 builds or reads it and broadcasts it, so the ranks cannot disagree.
* **Image ids** are global sample indices: sample ``i`` (file order) of the ``s``-th shard of ``data.train_shards``
  has id ``offset[s] + i``, ``offset[s]`` the samples of the shards before it. They are stable while the shard
  list is, dense (no hash collisions), and `locate` turns one back into its shard and position for messages.
* **Order from the seed and the epoch alone.** Each epoch the shard order is a permutation drawn from (seed, epoch);
  rank ``r`` of ``W`` takes shards ``r, r + W, ...`` of it and reads them in turn. Its stream is then shuffled
  within consecutive windows of ``shard_shuffle_buffer`` samples (a permutation drawn from (seed, epoch, rank)).
  A window shuffle rather than webdataset's reservoir buffer because its permutation is known before any byte is
  read, so a resumed epoch skips to sample ``n`` exactly without replaying a buffer, and a worker holds at most one
  window of its own samples' bytes.
* **Equal steps on every rank: the minimum, never padding.** Whole shards per rank give the ranks unequal sample
  counts. Each rank yields ``L = the sum of the S // W smallest shards`` samples per epoch (S shards, W ranks), a
  bound every rank's shards reach whatever the epoch's shard order, so ``__len__`` and the schedule are the same
  every epoch. Padding by repeating would show some samples twice in an epoch; what is left out instead is the
  tail of a rank's stream, a different part every epoch (the shard order changes). With equal shards and S a
  multiple of W nothing is left out; the loader logs how much is otherwise. Fewer shards than ranks is an error
  (a split by samples would make every rank read every shard).
* **Resume by sample count.** ``skip_batches(b, batch_size)`` starts the epoch after ``b * batch_size`` samples of
  this rank's stream; the skipped samples are neither decoded nor read (a plain tar's members are skipped by seek).
* **Loader workers.** Worker ``w`` of ``W`` yields batches ``w, w + W, ...`` of what remains, and reads only the
  bytes of its own samples, so the batches come in the same order for any ``data.num_workers``.
* **Several captions per sample.** A sample is trained once per epoch (as ``data.train_per_image: true`` does for
  annotation files), with one of its captions chosen by (seed, epoch, image id): no global RNG, so a resumed run
  and any worker count choose the same. `references` holds all of them (SCST's CIDEr-D).
* **Bad samples** (no image member, no caption, an image that does not decode, a shard unreadable past some point)
  follow ``data.train_bad_images``: ``skip`` yields the sample with no image, so the collate drops and counts it and
  the stream keeps its length (resume stays exact); ``fail`` raises `ShardSampleError` naming the shard and key.

Evaluation still reads annotation files (``data.val_file``, ``data.test_file``): a shards-trained run validates on
them. A validation set given as shards is not supported.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

import utils
from data.captions import pre_caption
from data.datasets import ImageLoadError, reading_image
from data.shards import ShardError, shard_paths, split_key
from data.sources import CaptionSource
from imaging import to_rgb

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("txt", "json")
INDEX_VERSION = 1
_INDEX_THREADS = 8  # shards indexed at once: the pass waits on the file system far more than on Python
# Tar errors a damaged or truncated shard raises while it is read.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError)


class ShardSampleError(ImageLoadError):
    """A training sample of a shard cannot be used (no image, no caption, an undecodable image); the message names
    the shard and the sample's key. An `ImageLoadError`, so the entry points print it as one line."""

    def __init__(self, shard: str | Path, key: str, reason: str):
        OSError.__init__(self, f"shard {shard}, sample {key!r}: {reason}")
        self.path, self.reason = f"{shard}:{key}", reason
        self.shard, self.key = str(shard), key


def _mix(*parts) -> int:
    """A 63-bit seed from ``parts`` (ints and strings): the same on every process and Python run (no ``hash()``,
    whose strings are salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


# ------------------------------------------------------------------------------------------ reading shards


def scan_shard(shard: Path, read: Collection[str], wanted: Collection[int] | None = None,
               last: int | None = None) -> Iterator[tuple[int, str, frozenset[str], dict[str, bytes]]]:
    """The samples of one shard in file order, grouped by data/shards.py's rules (`iter_samples`: members by key,
    directories, links and "."/"__" names skipped, a key that comes back being a new sample):
    ``(position, key, the extensions it has, {extension: bytes})``.

    Only the members whose extension is in ``read`` of the samples in ``wanted`` (every sample when None) are read;
    the others are skipped by seeking, so a plain tar's images cost nothing to pass over. Stops after sample
    ``last``. Raises `ShardError` naming the shard where it cannot be read on (the samples before the damage have
    been yielded; the one being read when it happened has not).
    """
    position, key, present, files, take = -1, None, set(), {}, False
    try:
        with tarfile.open(shard, mode="r:*") as archive:  # random access: unread members are seeked over
            for member in archive:
                if not member.isfile() or member.name.rpartition("/")[2].startswith((".", "__")):
                    continue
                member_key, extension = split_key(member.name)
                if position < 0 or member_key != key:
                    if position >= 0:
                        yield position, key, frozenset(present), files
                        if last is not None and position >= last:
                            return
                    position, key, present, files = position + 1, member_key, set(), {}
                    take = wanted is None or position in wanted
                present.add(extension)
                if take and extension in read:
                    files[extension] = archive.extractfile(member).read()
    except _TAR_ERRORS as error:
        raise ShardError(f"{shard}: unreadable after its first {max(position, 0)} sample(s) "
                         f"({type(error).__name__}: {error})") from error
    if position >= 0:
        yield position, key, frozenset(present), files


def read_captions(data: bytes, field: str, max_words: int | None) -> list[str]:
    """The normalised (`pre_caption`) captions of one sample's ``.txt`` (one per non-blank line) or ``.json``
    member (``"captions"``, else ``"caption"``: a string or a list of strings); empty ones are dropped.

    Raises:
        ValueError: the member is not UTF-8, not a JSON object, or has neither key with strings.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f".{field} is not UTF-8 text ({error})") from None
    if field == "txt":
        raw = text.splitlines()
    else:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f".json is not valid JSON ({error})") from None
        value = content.get("captions", content.get("caption")) if isinstance(content, dict) else None
        raw = [value] if isinstance(value, str) else value
        if not isinstance(raw, list) or not all(isinstance(caption, str) for caption in raw):
            raise ValueError(f'.json has no "captions" or "caption" string (or list of strings): {text[:80]!r}')
    return [caption for caption in (pre_caption(line, max_words) for line in raw if line.strip()) if caption]


# ------------------------------------------------------------------------------------------ the index


class ShardIndex:
    """The shards of ``data.train_shards`` (in config order), the samples each holds, and where that came from.

    Attributes:
        shards: the shard files.
        counts: (S,) int64, samples per shard (those before the damage for a damaged shard).
        offsets: (S,) int64, the image id of each shard's first sample (`WebDatasetSource` ids).
        damaged: shard index -> why it cannot be read to its end.
        file: the cached index file (None when it could not be written); its content identifies the references.
    """

    def __init__(self, shards: list[Path], entries: list[dict], file: Path | None):
        self.shards, self.entries, self.file = shards, entries, file
        self.counts = torch.tensor([entry["samples"] for entry in entries], dtype=torch.long)
        self.ends = torch.cumsum(self.counts, 0)
        self.offsets = self.ends - self.counts
        self.damaged = {i: entry["damaged"] for i, entry in enumerate(entries) if entry["damaged"]}

    def __len__(self) -> int:
        return int(self.counts.sum())

    def locate(self, image_id: int) -> tuple[Path, int]:
        """(shard, position in it) of sample ``image_id``."""
        return self.shards[self.shard_of(image_id)], image_id - int(self.offsets[self.shard_of(image_id)])

    def shard_of(self, image_ids: int | torch.Tensor) -> int | torch.Tensor:
        """The shard (index into ``shards``) of each image id: the first whose end is past it (an empty shard,
        whose end equals its offset, never holds one)."""
        shards = torch.searchsorted(self.ends, torch.as_tensor(image_ids), right=True)
        return int(shards) if shards.dim() == 0 else shards

    @classmethod
    def load_or_build(cls, shards: list[Path], caption_field: str, index_dir: str | Path | None) -> "ShardIndex":
        """The index of ``shards``: read from ``index_dir`` when a file there matches every shard's path, size and
        mtime, else built (and written there). Rank 0 decides and broadcasts, so every rank has the same counts;
        every rank then makes sure the file exists where it looks (a node without the shared folder writes its
        own copy), since SCST hashes it (`reference_files`)."""
        identities = [_identity(shard) for shard in shards]
        name = hashlib.sha256(json.dumps([INDEX_VERSION, caption_field, identities]).encode()).hexdigest()[:24]
        file = Path(index_dir).expanduser() / f"{name}.json" if index_dir else None
        payload = None
        if utils.is_main() or not utils.is_distributed():  # without a process group each process decides
            payload = _read_index(file, caption_field, identities)
            if payload is None:
                logger.info("indexing %d shard(s) (sample counts; cached in %s)", len(shards), file or "no file")
                with ThreadPoolExecutor(min(_INDEX_THREADS, len(shards))) as pool:
                    entries = list(pool.map(lambda shard: _index_shard(shard, caption_field), shards))
                payload = {"version": INDEX_VERSION, "caption_field": caption_field, "shards": entries}
        payload = utils.broadcast_object(payload)
        if file is not None and (not file.is_file() or _read_index(file, caption_field, identities) != payload):
            try:
                utils.write_json(file, payload, indent=None)
            except OSError as error:
                logger.warning("cannot write the shard index %s (%s): it is rebuilt next run", file, error)
                file = None
        return cls(shards, payload["shards"], file)


def _identity(shard: Path) -> list:
    stat = shard.stat()
    return [str(shard.resolve()), stat.st_size, stat.st_mtime_ns]


def _index_shard(shard: Path, caption_field: str) -> dict:
    """One shard's entry: its identity, sample count, a digest of its keys and caption members (so that the index
    file's content changes with the references), and the damage, if any."""
    path, size, mtime_ns = _identity(shard)
    digest, samples, damaged = hashlib.sha256(), 0, None
    try:
        for position, key, _, files in scan_shard(shard, read={caption_field}):
            caption = files.get(caption_field, b"")
            digest.update(key.encode() + b"\0" + len(caption).to_bytes(8, "little") + caption)
            samples = position + 1
    except ShardError as error:
        damaged = str(error)
    return {"path": path, "size": size, "mtime_ns": mtime_ns, "samples": samples,
            "captions_sha256": digest.hexdigest(), "damaged": damaged}


def _read_index(file: Path | None, caption_field: str, identities: list[list]) -> dict | None:
    """The cached index in ``file`` if it describes exactly these shards, else None (missing, stale, unreadable)."""
    if file is None or not file.is_file():
        return None
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
        entries = payload["shards"]
        same = (payload["version"] == INDEX_VERSION and payload["caption_field"] == caption_field
                and [[entry["path"], entry["size"], entry["mtime_ns"]] for entry in entries] == identities)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return payload if same else None


# ------------------------------------------------------------------------------------------ the stream


class WebDatasetStream(IterableDataset):
    """This process's samples ``(image (3, H, W) float32 or None, caption str, image id int)`` of the shards in
    ``index``, in the order the module docstring describes; an `EpochPosition` (data/sources.py).

    ``rank`` and ``world_size`` default to this process's (utils.get_rank / get_world_size) when it is built.
    """

    def __init__(self, index: ShardIndex, transform: Callable, seed: int, *, caption_field: str = "txt",
                 image_extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS, max_words: int | None = 30,
                 shuffle_buffer: int = 0, skip_bad_samples: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        self.index, self.transform, self.seed = index, transform, seed
        self.caption_field, self.image_extensions, self.max_words = caption_field, tuple(image_extensions), max_words
        self.shuffle_buffer, self.skip_bad_samples = shuffle_buffer, skip_bad_samples
        self.rank = utils.get_rank() if rank is None else rank
        self.world_size = utils.get_world_size() if world_size is None else world_size
        shards = len(index.shards)
        if shards < self.world_size:
            raise utils.ConfigError(
                f"data.train_shards holds {shards} shard(s) for {self.world_size} processes: a process takes whole "
                "shards, so each needs at least one (better several); split the data into more shards")
        # Every rank's shards hold at least the S // W smallest shards' samples, whatever the epoch's shard order.
        smallest = torch.sort(index.counts).values[: shards // self.world_size]
        self.samples_per_rank = int(smallest.sum())
        self.epoch, self.start, self.batch_size = 0, 0, 1

    # -- EpochPosition
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def skip_batches(self, batches: int, batch_size: int) -> None:
        self.start, self.batch_size = batches * batch_size, batch_size

    def __len__(self) -> int:
        return max(0, self.samples_per_rank - self.start)

    # -- the epoch's order
    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into ``index.shards`` of this rank's shards in epoch ``epoch`` (default: the current one), in
        the order it reads them."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(_mix("shards", self.seed, epoch))
        return torch.randperm(len(self.index.shards), generator=generator)[self.rank::self.world_size].tolist()

    def epoch_ids(self, epoch: int | None = None) -> torch.Tensor:
        """(samples_per_rank,) int64: the image ids this rank trains on in epoch ``epoch``, in order (the whole
        epoch, before `skip_batches`)."""
        epoch = self.epoch if epoch is None else epoch
        order = torch.tensor(self.shard_order(epoch))
        counts = self.index.counts[order]
        # The shards' samples one after another: ids[j] = offset of j's shard + (j - where that shard starts).
        starts = torch.cumsum(counts, 0) - counts
        ids = torch.repeat_interleave(self.index.offsets[order] - starts, counts) + torch.arange(int(counts.sum()))
        if self.shuffle_buffer > 1 and len(ids) > 1:
            # rand in [0, 1) plus the window number: sorting permutes within each window only.
            generator = torch.Generator().manual_seed(_mix("window", self.seed, epoch, self.rank))
            keys = torch.rand(len(ids), generator=generator, dtype=torch.float64)
            keys += torch.div(torch.arange(len(ids)), self.shuffle_buffer, rounding_mode="floor")
            ids = ids[torch.argsort(keys)]
        return ids[: self.samples_per_rank]

    def _worker_ids(self) -> list[int]:
        """This loader worker's image ids, in the order it yields them: batches w, w + W, ... of the rest of the
        epoch (data/sources.py)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        remaining = self.epoch_ids()[self.start:]
        batch = torch.div(torch.arange(len(remaining)), self.batch_size, rounding_mode="floor")
        return remaining[batch % workers == worker].tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, str, int]]:
        mine = self._worker_ids()
        if not mine:
            return
        index = self.index
        shard_of = index.shard_of(torch.tensor(mine)).tolist()
        wanted: dict[int, set[int]] = {}
        for image_id, shard in zip(mine, shard_of):
            wanted.setdefault(shard, set()).add(image_id - int(index.offsets[shard]))
        # Shards are read in stream order; a sample's bytes wait in `pending` until its turn (at most a window).
        pending: dict[int, tuple[Path, str, dict[str, bytes] | None]] = {}
        head = 0
        for shard in self.shard_order():
            if shard not in wanted:
                continue
            offset = int(index.offsets[shard])
            for position, key, files in self._read(shard, wanted[shard]):
                pending[offset + position] = (index.shards[shard], key, files)
                while head < len(mine) and mine[head] in pending:
                    image_id = mine[head]
                    yield self._sample(*pending.pop(image_id), image_id)
                    head += 1
            if head == len(mine):
                return
        raise RuntimeError(f"the shard index promised {len(mine)} samples to this loader worker but the shards gave "
                           f"{head}; were shards changed during the run? (the index is rebuilt when one changes)")

    def _read(self, shard: int, positions: set[int]) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
        """``(position, key, {extension: bytes})`` of the samples at ``positions`` of shard ``shard``; when the shard
        cannot be read to one of them, the rest come with ``None`` (a bad sample each, with the reason logged)."""
        path, last = self.index.shards[shard], max(positions)
        read = set(self.image_extensions) | {self.caption_field}
        done: set[int] = set()
        try:
            for position, key, _, files in scan_shard(path, read, wanted=positions, last=last):
                if position in positions:
                    done.add(position)
                    yield position, key, files
        except ShardError as error:
            self._bad(path, f"#{min(positions - done)}", f"the shard is unreadable from here ({error})")
            for position in sorted(positions - done):
                yield position, f"#{position}", None

    def _sample(self, shard: Path, key: str, files: dict[str, bytes] | None,
                image_id: int) -> tuple[torch.Tensor | None, str, int]:
        """One training sample, or ``(None, "", image_id)`` for a bad one when skipping (the collate drops it)."""
        if files is None:  # the shard's damage, already reported by _read
            return None, "", image_id
        image_extension = next((ext for ext in self.image_extensions if ext in files), None)
        if image_extension is None:
            return self._bad(shard, key, f"no image member (.{', .'.join(self.image_extensions)})"), "", image_id
        if self.caption_field not in files:
            return self._bad(shard, key, f"no .{self.caption_field} caption member"), "", image_id
        try:
            captions = read_captions(files[self.caption_field], self.caption_field, self.max_words)
        except ValueError as error:
            return self._bad(shard, key, str(error)), "", image_id
        if not captions:
            return self._bad(shard, key, f"its .{self.caption_field} caption is empty"), "", image_id
        caption = captions[_mix("caption", self.seed, self.epoch, image_id) % len(captions)]
        member = io.BytesIO(files[image_extension])
        try:
            with reading_image(f"{shard}:{key}.{image_extension}"):
                with Image.open(member) as image:
                    rgb = to_rgb(image)  # stored pixels, EXIF ignored, as the annotation datasets read them
        except ImageLoadError as error:  # PIL names an in-memory file by its repr: name the member instead
            reason = error.reason.replace(repr(member), f"{key}.{image_extension}")
            return self._bad(shard, key, f".{image_extension} {reason}"), "", image_id
        return self.transform(rgb), caption, image_id

    def _bad(self, shard: Path, key: str, reason: str) -> None:
        if not self.skip_bad_samples:
            raise ShardSampleError(shard, key, reason)
        logger.warning("skipping shard %s, sample %r: %s", shard, key, reason)
        return None


# ------------------------------------------------------------------------------------------ the source


def _patterns(data_config: dict) -> list[str]:
    value = data_config["train_shards"]
    patterns = [value] if isinstance(value, str) else value
    if not patterns or not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise utils.ConfigError(f"data.train_shards must be a shard pattern (shards/{{00000..00099}}.tar) or a "
                                f"non-empty list of them for data.source webdataset, got {value!r}")
    return patterns


def _image_extensions(data_config: dict) -> tuple[str, ...]:
    value = data_config["shard_image_extensions"]
    if not isinstance(value, list) or not value or not all(isinstance(ext, str) and ext.strip(".") for ext in value):
        raise utils.ConfigError(f"data.shard_image_extensions must be a non-empty list of extensions such as "
                                f"[jpg, png], got {value!r}")
    return tuple(ext.strip(".").lower() for ext in value)


class WebDatasetSource(CaptionSource):
    """Webdataset tar shards (``data.train_shards``), streamed by a `WebDatasetStream`; see the module docstring."""

    def __init__(self, dataset: WebDatasetStream, patterns: list[str]):
        self.dataset, self.patterns = dataset, patterns
        self._references: dict[int, list[str]] | None = None

    @classmethod
    def check_config(cls, data_config: dict) -> None:
        patterns = _patterns(data_config)
        _image_extensions(data_config)
        if data_config["shard_captions"] not in CAPTION_FIELDS:
            raise utils.ConfigError(f"data.shard_captions must be one of {list(CAPTION_FIELDS)}, got "
                                    f"{data_config['shard_captions']!r}")
        buffer = data_config["shard_shuffle_buffer"]
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
            raise utils.ConfigError(f"data.shard_shuffle_buffer must be >= 0 (0: no shuffle within a process's "
                                    f"stream), got {data_config['shard_shuffle_buffer']!r}")
        if data_config["augment"] and data_config["augment_on"] == "device":
            raise utils.ConfigError("data.augment_on: device reads image files, and data.source webdataset's images "
                                    "are tar members; use data.augment_on: workers")
        try:
            shard_paths(patterns, what="data.train_shards")
        except (ShardError, FileNotFoundError) as error:
            raise utils.ConfigError(str(error) if str(error).startswith("data.train_shards")
                                    else f"data.train_shards: {error}") from None

    @classmethod
    def from_config(cls, data_config: dict, transform: Callable, seed: int) -> "WebDatasetSource":
        cls.check_config(data_config)
        if getattr(transform, "reads_files", False):
            raise utils.ConfigError("data.source webdataset needs a transform of decoded images, not of files "
                                    "(data.augment_on: workers)")
        patterns = _patterns(data_config)
        shards = shard_paths(patterns, what="data.train_shards")
        caption_field = data_config["shard_captions"]
        index = ShardIndex.load_or_build(shards, caption_field, data_config["shard_index_dir"])
        skip = data_config["train_bad_images"] == "skip"
        for shard, reason in index.damaged.items():
            if not skip:
                raise utils.ConfigError(f"data.train_shards: {reason}; data.train_bad_images: skip trains on the "
                                        "samples before the damage")
            logger.warning("%s (data.train_bad_images skip: training on its first %d samples)", reason,
                           int(index.counts[shard]))
        dataset = WebDatasetStream(index, transform, seed, caption_field=caption_field,
                                   image_extensions=_image_extensions(data_config), max_words=data_config["max_words"],
                                   shuffle_buffer=data_config["shard_shuffle_buffer"], skip_bad_samples=skip)
        left_out = len(index) - dataset.samples_per_rank * dataset.world_size
        if utils.is_main():
            logger.info("data.train_shards: %d shard(s), %d samples; %d process(es) x %d samples per epoch%s",
                        len(shards), len(index), dataset.world_size, dataset.samples_per_rank,
                        f" ({left_out} left out each epoch, a different part each: a process takes whole shards)"
                        if left_out else "")
        return cls(dataset, patterns)

    def __len__(self) -> int:
        return self.dataset.samples_per_rank * self.dataset.world_size

    def describe(self) -> str:
        return f"data.train_shards {self.patterns}"

    def references(self) -> dict[int, list[str]]:
        """Image id -> every caption of that sample (normalised as trained), for each sample with an image member
        and a readable caption: one pass over the shards' caption members, the images skipped."""
        if self._references is None:
            stream, index = self.dataset, self.dataset.index
            references: dict[int, list[str]] = {}
            for shard, path in enumerate(index.shards):
                count, offset = int(index.counts[shard]), int(index.offsets[shard])
                if count == 0:
                    continue
                try:
                    for position, _, present, files in scan_shard(path, {stream.caption_field}, last=count - 1):
                        if stream.caption_field not in files or not present.intersection(stream.image_extensions):
                            continue
                        try:
                            captions = read_captions(files[stream.caption_field], stream.caption_field,
                                                     stream.max_words)
                        except ValueError:
                            continue  # a bad sample: never trained on, reported when the stream reaches it
                        if captions:
                            references[offset + position] = captions
                except ShardError as error:  # damaged since it was indexed: the stream reports it where it trains
                    logger.warning("SCST references: %s", error)
            self._references = references
        return self._references

    def reference_files(self) -> list[Path]:
        """The shard index: its content (each shard's identity and a digest of its keys and captions) changes
        whenever the references do, and it is small to hash, unlike the shards."""
        return [self.dataset.index.file] if self.dataset.index.file is not None else []


__all__ = ["ShardIndex", "ShardSampleError", "WebDatasetSource", "WebDatasetStream", "read_captions", "scan_shard"]
