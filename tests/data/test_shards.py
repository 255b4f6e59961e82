"""data/shards.py: brace patterns, webdataset's key rule, and reading samples from (damaged) tar shards."""
from __future__ import annotations

import io
import tarfile

import pytest

from data.shards import ShardError, expand_braces, iter_samples, shard_paths, split_key


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(("pattern", "expected"), [
    ("shards/{000..002}.tar", ["shards/000.tar", "shards/001.tar", "shards/002.tar"]),
    ("{9..11}", ["9", "10", "11"]),           # no leading zero: no padding
    ("{2..0}", ["2", "1", "0"]),              # descending ranges count down
    ("{a,b}-{0..1}", ["a-0", "a-1", "b-0", "b-1"]),
    ("x{a,b{1..2}}", ["xa", "xb1", "xb2"]),  # nested inside an alternative
    ("plain.tar", ["plain.tar"]),
])
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern", ["{0..2", "a}b", "{single}"])
def test_expand_braces_rejects_malformed_patterns(pattern):
    with pytest.raises(ShardError, match="shard pattern|brace group"):
        expand_braces(pattern)


def test_split_key_takes_the_extension_from_the_first_dot_of_the_file_name():
    assert split_key("a.dir/b/0001.seg.PNG") == ("a.dir/b/0001", "seg.png")
    assert split_key("0001.jpg") == ("0001", "jpg")
    assert split_key("README") == ("README", "")


def test_iter_samples_groups_consecutive_members_by_key(tmp_path):
    shard = tmp_path / "00000.tar"
    write_tar(shard, [("d/01.jpg", b"i1"), ("d/01.txt", b"c1"), ("__index__", b""), ("d/02.jpg", b"i2"),
                      ("d/02.json", b"{}"), ("d/01.jpg", b"again")])
    assert list(iter_samples(shard)) == [
        ("d/01", {"jpg": b"i1", "txt": b"c1"}),
        ("d/02", {"jpg": b"i2", "json": b"{}"}),
        ("d/01", {"jpg": b"again"}),  # a key that comes back later is a new sample, as webdataset reads it
    ]


def test_a_truncated_shard_yields_what_precedes_the_damage_then_names_the_shard(tmp_path):
    shard = tmp_path / "00000.tar"
    write_tar(shard, [("01.jpg", b"a" * 600), ("01.txt", b"c"), ("02.jpg", b"b" * 4000), ("02.txt", b"d")])
    data = shard.read_bytes()
    shard.write_bytes(data[: 512 * 6])  # cut inside 02.jpg's data
    read = []
    with pytest.raises(ShardError, match="00000.tar: not a readable tar shard"):
        for sample in iter_samples(shard):
            read.append(sample)
    assert read == [("01", {"jpg": b"a" * 600, "txt": b"c"})]
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"not a tar file at all")
    with pytest.raises(ShardError, match="x.tar"):
        list(iter_samples(not_tar))


def test_shard_paths_checks_every_shard_exists(tmp_path):
    for name in ("s0.tar", "s1.tar"):
        write_tar(tmp_path / name, [("1.txt", b"x")])
    assert [path.name for path in shard_paths(str(tmp_path / "s{0..1}.tar"))] == ["s0.tar", "s1.tar"]
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: 1 of 3 shard\(s\) not found, first .*s2.tar"):
        shard_paths(str(tmp_path / "s{0..2}.tar"), what="data.train_shards")
