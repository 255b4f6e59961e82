"""data/webdataset_source.py: training from webdataset tar shards (``data.source: webdataset``).

Tiny PNGs with their captions are written into tar shards in a temporary folder. The stream keeps the streaming
contract of data/sources.py (an order from the seed and the epoch alone, the same batches for any number of loader
workers, an exact skip that decodes nothing skipped); it trains through the real training loop and resumes
mid-epoch to the parameters of a run that was never stopped (tests/data/test_sources.py is the model); processes
split it by whole shards with as many samples each and none seen twice; references come from ``.txt`` and
``.json``; missing shards, bad samples and damaged shards get the clear errors or skips ``data.train_bad_images``
asks for.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

import data.webdataset_source as webdataset_source
import training
import utils
from data import SOURCES, EpochPosition, caption_collate
from data.webdataset_source import ShardSampleError, WebDatasetSource, WebDatasetStream
from imaging import eval_transform
from models.checkpoint import load_checkpoint_file
from training.checkpoints import LATEST

VOCAB = Path(__file__).parents[1] / "fixtures" / "vocab.txt"
# Words of the fixture vocabulary, so that every caption tokenises without [UNK].
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250),
           "black": (5, 5, 5)}
THINGS = ("ball", "car", "dog", "cat")


def sample_files(index: int, caption_field: str = "txt") -> dict[str, bytes]:
    """Sample ``index``: a 24 px PNG of a coloured square (its size says which thing) and its captions (two for
    every third sample), as a ``.txt`` or a ``.json`` member."""
    colour = list(COLOURS)[index % len(COLOURS)]
    thing = THINGS[(index // len(COLOURS)) % len(THINGS)]
    image = Image.new("RGB", (24, 24), (128, 128, 128))
    side = 6 + 4 * THINGS.index(thing)
    image.paste(COLOURS[colour], (1 + index % 5, 1 + index % 3, 1 + index % 5 + side, 1 + index % 3 + side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    captions = [f"A {colour} {thing}."] + ([f"a small {thing}"] if index % 3 == 0 else [])
    if caption_field == "txt":
        text = "\n".join(captions) + "\n"
    else:
        text = json.dumps({"caption": captions[0]} if len(captions) == 1 else {"captions": captions, "caption": "x"})
    return {"png": buffer.getvalue(), caption_field: text.encode()}


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path, sizes=(8, 8, 8), caption_field: str = "txt", edit=None) -> str:
    """Shards ``folder/shard-000.tar, ...`` holding ``sizes`` samples with consecutive indices; ``edit(index,
    files)`` may change a sample's members. Returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            files = sample_files(index, caption_field)
            samples.append((f"{index:06d}", edit(index, files) if edit else files))
            index += 1
        write_shard(folder / f"shard-{shard:03d}.tar", samples)
    return str(folder / f"shard-{{000..{len(sizes) - 1:03d}}}.tar")


def _write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def data_config(tmp_path: Path, pattern: str, **data) -> dict:
    section = {"source": "webdataset", "train_shards": pattern, "shard_index_dir": str(tmp_path / "index"),
               "num_workers": 0, "augment": False, **data}
    return training.load_config(_write(tmp_path, {"data": section}))["data"]


def source_of(tmp_path: Path, pattern: str, seed: int = 3, transform=None, **data) -> WebDatasetSource:
    return SOURCES["webdataset"].from_config(data_config(tmp_path, pattern, **data), transform or eval_transform(16),
                                             seed)


def _image_ids(stream, workers: int = 0, batch_size: int = 4) -> list[list[int]]:
    loader = DataLoader(stream, batch_size=batch_size, collate_fn=caption_collate, drop_last=True,
                        num_workers=workers)
    return [batch[2].tolist() for batch in loader]


def test_a_shard_stream_keeps_the_streaming_contract(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    calls = []

    def counting_transform(image):
        calls.append(1)
        return eval_transform(16)(image)

    source = source_of(tmp_path, pattern, transform=counting_transform, shard_shuffle_buffer=5)
    stream = source.dataset
    assert isinstance(stream, WebDatasetStream) and isinstance(stream, EpochPosition)
    assert len(source) == 24 and source.describe() == f"data.train_shards {[pattern]}"
    stream.set_epoch(1)
    stream.skip_batches(0, 4)
    whole = _image_ids(stream)
    assert len(whole) == 6 and sorted(i for batch in whole for i in batch) == list(range(24))
    # The same batches whatever the number of loader workers.
    assert _image_ids(stream, workers=1) == whole
    assert _image_ids(stream, workers=2) == whole
    # From the seed and the epoch alone: a fresh source, after the global RNG moved on, draws the same order.
    torch.manual_seed(12345)
    again = source_of(tmp_path, pattern, shard_shuffle_buffer=5).dataset
    again.set_epoch(1)
    again.skip_batches(0, 4)
    assert _image_ids(again) == whole
    # An exact skip, decoding nothing it skips.
    calls.clear()
    stream.skip_batches(2, 4)
    assert len(stream) == 16 and _image_ids(stream) == whole[2:] and len(calls) == 16
    assert _image_ids(stream, workers=2) == whole[2:]
    stream.set_epoch(2)
    stream.skip_batches(0, 4)
    assert len(stream) == 24 and _image_ids(stream) != whole
    assert _image_ids(source_of(tmp_path, pattern, seed=4, shard_shuffle_buffer=5).dataset) != _image_ids(again)


def test_without_a_shuffle_buffer_each_shard_is_read_whole_and_in_order(tmp_path):
    stream = source_of(tmp_path, write_shards(tmp_path / "shards"), shard_shuffle_buffer=0).dataset
    for epoch in range(3):
        stream.set_epoch(epoch)
        stream.skip_batches(0, 8)
        order = stream.shard_order()
        assert sorted(order) == [0, 1, 2]
        assert _image_ids(stream, batch_size=8) == [list(range(8 * shard, 8 * shard + 8)) for shard in order]
    assert len({tuple(stream.shard_order(epoch)) for epoch in range(6)}) > 1  # the shard order changes per epoch


def test_processes_split_by_whole_shards_with_as_many_samples_each_and_none_twice(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path / "shards", sizes=(8, 8, 5, 3))  # 24 samples, shards of unequal size
    shard_ids = [set(range(0, 8)), set(range(8, 16)), set(range(16, 21)), set(range(21, 24))]
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    streams = []
    for rank in (0, 1):
        monkeypatch.setattr(utils, "get_rank", lambda rank=rank: rank)
        streams.append(source_of(tmp_path, pattern, shard_shuffle_buffer=4))
    # Every rank trains on the 2 smallest shards' count (5 + 3), whatever shards the epoch gives it: equal steps.
    assert [len(source.dataset) for source in streams] == [8, 8] and len(streams[0]) == 16
    for epoch in range(4):
        seen = []
        for source in streams:
            stream = source.dataset
            stream.set_epoch(epoch)
            stream.skip_batches(0, 2)
            ids = [i for batch in _image_ids(stream, batch_size=2) for i in batch]
            assert len(ids) == 8 == len(set(ids))
            mine = set().union(*(shard_ids[shard] for shard in stream.shard_order()))
            assert set(ids) <= mine  # only its own whole shards
            seen.append(set(ids))
        assert not seen[0] & seen[1]  # no sample seen twice in an epoch
        assert set(streams[0].dataset.shard_order()).isdisjoint(streams[1].dataset.shard_order())
    monkeypatch.setattr(utils, "get_world_size", lambda: 5)
    with pytest.raises(utils.ConfigError, match="holds 4 shard.s. for 5 processes"):
        source_of(tmp_path, pattern)


def test_references_come_from_txt_and_from_json_with_the_trained_ids(tmp_path):
    for field in ("txt", "json"):
        source = source_of(tmp_path, write_shards(tmp_path / field, sizes=(4, 3), caption_field=field),
                           shard_captions=field)
        references = source.references()
        assert references[0] == ["a red ball", "a small ball"]  # two lines / a "captions" list
        assert references[1] == ["a blue ball"]                 # one line / a "caption" string
        assert references[6] == ["a blue car", "a small car"]    # id 6: the third sample of the second shard
        assert sorted(references) == list(range(7))
        assert source.dataset.index.locate(6) == (Path(tmp_path / field / "shard-001.tar"), 2)
        stream = source.dataset
        stream.set_epoch(0)
        stream.skip_batches(0, 1)
        for _, caption, image_id in stream:
            assert caption in references[image_id]
        assert source.reference_files() == [source.dataset.index.file] and source.dataset.index.file.is_file()


def _bad_samples(index: int, files: dict[str, bytes]) -> dict[str, bytes]:
    if index == 2:
        return {"txt": files["txt"]}                        # no image
    if index == 5:
        return {"png": files["png"]}                        # no caption
    if index == 9:
        return {**files, "png": files["png"][:40]}          # a truncated image
    return files


def test_bad_samples_are_skipped_and_counted_or_fail_naming_shard_and_key(tmp_path, caplog):
    pattern = write_shards(tmp_path / "shards", sizes=(6, 6), edit=_bad_samples)
    stream = source_of(tmp_path, pattern, shard_shuffle_buffer=0).dataset
    stream.set_epoch(0)
    stream.skip_batches(0, 12)
    with caplog.at_level(logging.WARNING):
        (images, captions, image_ids, skipped), = DataLoader(stream, batch_size=12, collate_fn=caption_collate)
    assert skipped == 3 and sorted(image_ids.tolist()) == [0, 1, 3, 4, 6, 7, 8, 10, 11] and len(captions) == 9
    assert "sample '000002': no image member" in caplog.text and "sample '000005': no .txt" in caplog.text
    assert "sample '000009': .png cannot decode it" in caplog.text
    assert sorted(source_of(tmp_path, pattern).references()) == [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    failing = source_of(tmp_path, pattern, shard_shuffle_buffer=0, train_bad_images="fail").dataset
    failing.skip_batches(0, 12)
    with pytest.raises(ShardSampleError, match=r"^shard .*shard-00[01].tar, sample '0000(02|05|09)': "):
        list(failing)
    assert "'000009': .png cannot decode it (UnidentifiedImageError: cannot identify image file 000009.png)" \
        in caplog.text


def test_a_missing_shard_or_pattern_is_a_clear_config_error(tmp_path):
    write_shards(tmp_path / "shards", sizes=(2, 2))
    config = data_config(tmp_path, str(tmp_path / "shards" / "shard-{000..003}.tar"))
    with pytest.raises(utils.ConfigError, match=r"^data.train_shards: 2 of 4 shard\(s\) not found, first .*shard-002"):
        WebDatasetSource.check_config(config)
    with pytest.raises(utils.ConfigError, match="data.train_shards must be a shard pattern"):
        WebDatasetSource.check_config({**config, "train_shards": None})
    with pytest.raises(utils.ConfigError, match="data.train_shards: unbalanced"):
        WebDatasetSource.check_config({**config, "train_shards": "shards/{000..001.tar"})
    with pytest.raises(utils.ConfigError, match="data.shard_captions must be one of"):
        WebDatasetSource.check_config({**config, "train_shards": str(tmp_path / "shards" / "*"),
                                       "shard_captions": "caption"})


def test_the_index_is_cached_rebuilt_when_a_shard_changes_and_damage_follows_train_bad_images(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    pattern = write_shards(folder, sizes=(3, 3))
    first = source_of(tmp_path, pattern).dataset.index
    built = []
    original = webdataset_source._index_shard
    monkeypatch.setattr(webdataset_source, "_index_shard", lambda *args: built.append(args) or original(*args))
    assert source_of(tmp_path, pattern).dataset.index.file == first.file and built == []  # read from the cache
    write_shard(folder / "shard-001.tar", [(f"{i:06d}", sample_files(i)) for i in range(3, 7)])  # one more sample
    changed = source_of(tmp_path, pattern)
    assert changed.dataset.index.file != first.file and len(built) == 2 and len(changed) == 7
    # A shard cut off in its last image: skip trains on the samples before the damage, fail names it.
    raw = (folder / "shard-001.tar").read_bytes()
    (folder / "shard-001.tar").write_bytes(raw[: len(raw) - 2048 - 300])
    damaged = source_of(tmp_path, pattern)
    assert damaged.dataset.index.damaged and len(damaged) == 3 + 3
    stream = damaged.dataset
    stream.skip_batches(0, 1)
    assert sorted(image_id for _, _, image_id in stream) == list(range(6))
    with pytest.raises(utils.ConfigError, match=r"data.train_shards: .*shard-001.tar: unreadable after its first 3"):
        source_of(tmp_path, pattern, train_bad_images="fail")


class _Preempted(RuntimeError):
    pass


def _training_config(tmp_path: Path, pattern: str, name: str, *overrides: str) -> dict:
    path = tmp_path / "shards.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"arch": "tiny", "image_size": 32, "tokenizer": str(VOCAB), "max_text_length": 12},
        "data": {"source": "webdataset", "train_shards": pattern, "shard_shuffle_buffer": 5,
                 "shard_index_dir": str(tmp_path / "index"), "num_workers": 0,
                 "min_scale": 0.6},  # augmented: the RNG must resume too
        "train": {"epochs": 2, "batch_size": 4, "lr": 1.0e-3, "log_every": 1, "checkpoint_every": 2,
                  "validate": False, "test_after_training": False},
    }))
    return training.load_config(path, [f"output_dir={tmp_path / name}", *overrides])


def test_training_from_shards_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    # 16 samples in 3 shards, one without a caption: skipped (and counted) in both epochs, the steps unchanged.
    pattern = write_shards(tmp_path / "shards", sizes=(6, 5, 5),
                           edit=lambda i, files: {"png": files["png"]} if i == 13 else files)
    summary, _ = training.run_training(_training_config(tmp_path, pattern, "reference"))
    assert summary["steps"] == 8 and summary["skipped_images"] == 2  # 16 samples, batch 4, 2 epochs

    original_log = utils.JsonlLogger.log

    def log_then_stop(self, **record):  # a preemption after step 7 (epoch 1, batch 3); the last checkpoint: step 6
        original_log(self, **record)
        if record.get("kind") == "train" and record.get("step") == 7:
            raise _Preempted

    monkeypatch.setattr(utils.JsonlLogger, "log", log_then_stop)
    with pytest.raises(_Preempted):
        training.run_training(_training_config(tmp_path, pattern, "interrupted"))
    _, _, metadata = load_checkpoint_file(tmp_path / "interrupted" / LATEST)
    assert metadata["progress"]["global_step"] == 6 and metadata["progress"]["batches_done"] == 2
    monkeypatch.setattr(utils.JsonlLogger, "log", original_log)
    training.run_training(_training_config(tmp_path, pattern, "interrupted", "resume=true"))

    expected, _, expected_meta = load_checkpoint_file(tmp_path / "reference" / LATEST)
    got, _, got_meta = load_checkpoint_file(tmp_path / "interrupted" / LATEST)
    assert got_meta["progress"]["global_step"] == expected_meta["progress"]["global_step"] == 8
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl"))
                if r["kind"] == "train"}
    assert losses("interrupted")[7] == losses("reference")[7]
