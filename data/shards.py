"""Webdataset tar shards, read with the standard library: the layout img2dataset writes and most recaptioning jobs read.

A shard (``00000.tar``) holds samples as consecutive members that share a key: ``00000001.jpg``,
``00000001.txt``, ``00000001.json``, then ``00000002.jpg``, ... The key is the member's path up to the first dot
of its file name and the extension is the rest, lower-cased (``a/b/x.seg.png`` -> key ``a/b/x``, ext ``seg.png``),
webdataset's own rule. Shard lists are written as brace patterns, ``shards/{00000..00099}.tar``.

Why not the ``webdataset`` package: it reads the same files, but the captioning job and the training source
need to own the order (a rank takes whole shards; a resumed run skips an exact number of samples), which a
plain iterator over ``tarfile`` gives in a few lines without another dependency.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardError(ValueError):
    """A shard pattern or a shard file is malformed; the message names it."""


def expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern stands for, in order: ``{00000..00002}`` (zero-padded as written),
    ``{a,b}``; several groups expand left to right, nested groups inside alternatives too.

    >>> expand_braces("s/{000..002}.tar")
    ['s/000.tar', 's/001.tar', 's/002.tar']
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ShardError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ShardError(f"unbalanced '{{' in shard pattern {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    tails = expand_braces(tail)
    return [head + choice + rest for choice in _brace_choices(body, pattern) for rest in tails]


def _brace_choices(body: str, pattern: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.lstrip("-").startswith("0") else 0
        low, high = int(first), int(last)
        step = 1 if high >= low else -1
        return [str(number).zfill(width) for number in range(low, high + step, step)]
    parts, depth, current = [], 0, ""
    for char in body:  # split on the commas of this level only
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current += char
    parts.append(current)
    if len(parts) == 1:
        raise ShardError(f"brace group {{{body}}} in {pattern!r} is neither a range (a..b) nor a list (a,b)")
    return [expanded for part in parts for expanded in expand_braces(part)]


def shard_paths(patterns: str | list[str], what: str = "shards") -> list[Path]:
    """The shard files of one or more brace patterns, in order, each checked to exist.

    Raises:
        FileNotFoundError: naming ``what`` and the first missing shard (with how many are missing).
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    paths = [Path(path).expanduser() for pattern in patterns for path in expand_braces(str(pattern))]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(paths)} shard(s) not found, first {missing[0]}")
    return paths


def split_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member by webdataset's rule: the extension starts at the first dot of the
    file name (not of the folder names) and is lower-cased."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, extension = name.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, extension.lower() if dot else ""


def iter_samples(shard: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard in file order: ``(key, {extension: bytes})``, members grouped by key.

    Directories, links and members whose file name starts with "." or "__" (tar metadata) are skipped. A key that
    comes back after another key started is a new sample, as webdataset reads it.

    Raises:
        ShardError: naming the shard when it is not a tar file or is truncated mid-member (the samples before
            the damage have been yielded by then).
    """
    shard = Path(shard)
    key, files = None, {}
    try:
        with tarfile.open(shard, mode="r|*") as archive:  # streaming: no seek, no index of the whole shard
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name.rpartition("/")[2]
                if name.startswith((".", "__")):
                    continue
                member_key, extension = split_key(member.name)
                if member_key != key and files:
                    yield key, files
                    files = {}
                key = member_key
                files[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{shard}: not a readable tar shard ({type(error).__name__}: {error})") from error
    if files:
        yield key, files


__all__ = ["ShardError", "expand_braces", "iter_samples", "shard_paths", "split_key"]
