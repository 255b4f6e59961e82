"""Where caption_images.py writes: per-rank part files (the journal resume reads), the merged output, failed.jsonl,
summary.json, sidecar .txt files and parquet.

Layout, for ``--out OUT``:

* ``OUT`` a file (``.jsonl`` or ``.parquet``): rank r appends to ``OUT.parts/part-0000r.jsonl`` (captions) and
  ``OUT.parts/failed-0000r.jsonl``; at the end rank 0 merges every part into ``OUT`` (atomically) and the failures
  into ``OUT``'s stem + ``.failed.jsonl``; the summary goes to stem + ``.summary.json``, so two outputs can share
  a folder. ``OUT.parts/`` stays: it is the journal a later run resumes from.
* ``OUT`` a folder: the part files are the output (``OUT/part-0000r.jsonl``, and ``part-0000r.parquet`` beside
  them with ``--out-format parquet``); ``OUT/failed.jsonl`` and ``OUT/summary.json``.

The journal is always JSONL, also for parquet output: a line appended per image survives a SIGKILL, and a parquet
file cannot be appended to; parquet is written from the journal when the job ends.

Resume: every rank reads every part (a run may resume with another world size) and skips the `record_id` of each
complete line; failures count as done too (a broken file stays broken; delete the failed-*.jsonl parts to retry
them). A batch's lines go out in one ``write`` followed by ``flush``: a SIGKILL loses at most the batch in flight,
and the OS has every flushed line even if the process dies. No ``os.fsync``: a machine that loses power may lose
the last seconds, which the next run redoes, and an fsync per batch would cost more than it saves on network
filesystems. A torn last line (the process died mid-write) is ignored when reading and cut off before the owner
appends again. Lines are ASCII JSON (non-ASCII escaped): a file name that is not UTF-8 (a lone surrogate in
Python) survives the round trip.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import utils
from data.image_inputs import record_id

logger = logging.getLogger("smile_blip")

OUTPUT_FORMATS = ("jsonl", "parquet")
# Output columns in this order; parquet gets all of them (null where a line lacks one) for one schema.
COLUMNS = ("key", "path", "shard", "row", "caption", "clip_score")


class OutputError(ValueError):
    """An --out that cannot be used (wrong suffix for the format, a journal written with other settings)."""


@dataclass(frozen=True)
class OutputLayout:
    """The files of one ``--out``; see the module docstring."""

    out: Path
    is_file: bool
    out_format: str

    @classmethod
    def from_args(cls, out: str | Path, out_format: str | None) -> "OutputLayout":
        out = Path(out).expanduser()
        suffix = out.suffix.lower()
        is_file = suffix in (".jsonl", ".parquet")
        if out_format is None:
            out_format = "parquet" if suffix == ".parquet" else "jsonl"
        if out_format not in OUTPUT_FORMATS:
            raise OutputError(f"--out-format {out_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
        if is_file and suffix != f".{out_format}":
            raise OutputError(f"--out {out}: a {out_format} output file should end with .{out_format}")
        if out.exists() and is_file == out.is_dir():
            raise OutputError(f"--out {out}: exists as a {'folder' if out.is_dir() else 'file'}; a name ending with "
                              ".jsonl or .parquet is an output file, anything else a folder")
        return cls(out, is_file, out_format)

    @property
    def parts_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".parts") if self.is_file else self.out

    def part(self, rank: int) -> Path:
        return self.parts_dir / f"part-{rank:05d}.jsonl"

    def failed_part(self, rank: int) -> Path:
        return self.parts_dir / f"failed-{rank:05d}.jsonl"

    def beside(self, name: str) -> Path:
        """``failed.jsonl`` / ``summary.json``: in the folder, or beside the file with its stem."""
        return self.out.with_name(f"{self.out.stem}.{name}") if self.is_file else self.out / name

    @property
    def settings_file(self) -> Path:
        return self.parts_dir / "settings.json"

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.jsonl"))

    def failed_parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("failed-*.jsonl"))

    def check_journal(self) -> None:
        """A merged file without its journal cannot be resumed: the merge would rebuild it from nothing."""
        if self.is_file and self.out.exists() and not self.parts_dir.exists():
            raise OutputError(f"--out {self.out} exists but its journal {self.parts_dir} does not; remove {self.out} "
                              "or choose another --out")


def read_lines(path: Path) -> Iterator[dict]:
    """The complete JSON lines of a part file; a torn or unparsable line is skipped (it will be redone)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return  # torn last line
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def done_ids(layout: OutputLayout) -> frozenset[str]:
    """`record_id` of every image any earlier run wrote (captioned or failed), from every rank's parts."""
    return frozenset(record_id(record) for path in layout.parts() + layout.failed_parts() for record in read_lines(path))


class PartWriter:
    """Appends JSON lines to one rank's part file, a batch per ``write`` call, flushed; cuts a torn last line off
    first so that the next line starts on a line of its own."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self.handle = path.open("a", encoding="utf-8")

    def _cut_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            step = 1 << 16
            position = size
            while position > 0:  # find the last newline from the end, a block at a time
                start = max(0, position - step)
                handle.seek(start)
                block = handle.read(position - start)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                position = start
            else:
                keep = 0
            if keep < size:
                logger.warning("%s: cut a torn last line (%d bytes); its image is redone", self.path, size - keep)
                handle.truncate(keep)

    def write(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in records)
        if text:
            self.handle.write(text)
            self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def check_settings(layout: OutputLayout, settings: dict) -> None:
    """Record the run's settings in the journal, or check them against the ones it was started with: a resumed
    run must not mix captions of two decodings in one output."""
    path = layout.settings_file
    earlier = None
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            earlier = None  # a torn settings file: written again below
    if isinstance(earlier, dict) and earlier != settings:
        changed = sorted(key for key in set(earlier) | set(settings) if earlier.get(key) != settings.get(key))
        details = ", ".join(f"{key} {earlier.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise OutputError(f"--out {layout.out} was started with other settings ({details}); resume with the same "
                          "command, or choose another --out")
    if earlier != settings:
        layout.parts_dir.mkdir(parents=True, exist_ok=True)
        utils.write_json(path, settings)


def unique_lines(paths: Iterable[Path]) -> Iterator[dict]:
    """The complete lines of ``paths`` in order, each image once (first wins)."""
    seen: set[str] = set()
    for path in paths:
        for record in read_lines(path):
            identity = record_id(record)
            if identity not in seen:
                seen.add(identity)
                yield record


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    count = 0
    with utils.atomic_open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
            count += 1
    return count


def write_parquet(path: Path, records: Iterable[dict], rows_per_group: int = 65536) -> int:
    """``records`` as a parquet file with the `COLUMNS` schema (clip_score only when some line has one), a row
    group at a time (never the whole output in memory), written to a temp file and renamed."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"key": pa.string(), "path": pa.string(), "shard": pa.string(), "row": pa.int64(),
             "caption": pa.string(), "clip_score": pa.float64()}
    records = iter(records)
    buffer: list[dict] = []
    writer = None
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        for record in _chain_sentinel(records):
            if record is not None:
                buffer.append(record)
            if buffer and (record is None or len(buffer) >= rows_per_group):
                if writer is None:
                    names = [name for name in COLUMNS if name != "clip_score"
                             or any("clip_score" in line for line in buffer)]
                    schema = pa.schema([(name, types[name]) for name in names])
                    writer = pq.ParquetWriter(temporary, schema)
                columns = {name: [line.get(name) for line in buffer] for name in schema.names}
                writer.write_table(pa.table(columns, schema=schema))
                count += len(buffer)
                buffer = []
        if writer is None:  # no rows: an empty file with the base schema
            schema = pa.schema([(name, types[name]) for name in COLUMNS if name != "clip_score"])
            writer = pq.ParquetWriter(temporary, schema)
        writer.close()
        utils.publish_file(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count


def _chain_sentinel(records: Iterator[dict]) -> Iterator[dict | None]:
    yield from records
    yield None


def finish_outputs(layout: OutputLayout) -> dict:
    """Rank 0, after every rank is done: merge (file output) or convert (folder + parquet) the parts, and write
    failed.jsonl. Returns {"captions": lines in the output, "failed": lines in failed.jsonl}."""
    if layout.is_file:
        write = write_parquet if layout.out_format == "parquet" else write_jsonl
        captions = write(layout.out, unique_lines(layout.parts()))
    else:
        captions = 0
        for part in layout.parts():
            count = sum(1 for _ in unique_lines([part]))
            if layout.out_format == "parquet":
                write_parquet(part.with_suffix(".parquet"), unique_lines([part]))
            captions += count
    failed = write_jsonl(layout.beside("failed.jsonl"), unique_lines(layout.failed_parts()))
    return {"captions": captions, "failed": failed}


def write_sidecar(image_path: str, caption: str) -> None:
    """``image.txt`` beside ``image.jpg`` (the kohya / EveryDream convention), replaced atomically."""
    utils.atomic_write_text(Path(image_path).with_suffix(".txt"), caption + "\n")


__all__ = ["COLUMNS", "OUTPUT_FORMATS", "OutputError", "OutputLayout", "PartWriter", "check_settings", "done_ids",
           "finish_outputs", "read_lines", "unique_lines", "write_jsonl", "write_parquet", "write_sidecar"]
