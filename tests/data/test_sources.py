"""data/sources.py: training data reaches the loader, SCST and the feature cache only through a `CaptionSource`.

A source other than the annotation files, a stream over generated images that keeps the streaming contract of
data/sources.py, trains through the real training loop and resumes mid-epoch to exactly the parameters of a run
that was never interrupted; the annotation source answers SCST's and the feature cache's questions.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

import training
import utils
from data import SOURCES, AnnotationSource, CaptionSource, CaptionTrainDataset, EpochPosition, caption_collate
from imaging import eval_transform
from models.checkpoint import load_checkpoint_file
from training.checkpoints import LATEST

VOCAB = Path(__file__).parents[1] / "fixtures" / "vocab.txt"
# Words of the fixture vocabulary, so that every caption tokenises without [UNK].
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250),
           "black": (5, 5, 5)}
THINGS = ("ball", "car", "dog", "cat")


def generated_sample(index: int) -> tuple[Image.Image, str, int]:
    """Image ``index``: a coloured thing (a square whose size says which) on grey, and its caption."""
    colour = list(COLOURS)[index % len(COLOURS)]
    thing = THINGS[(index // len(COLOURS)) % len(THINGS)]
    image = Image.new("RGB", (40, 40), (128, 128, 128))
    side = 10 + 6 * THINGS.index(thing)
    image.paste(COLOURS[colour], (4 + index % 7, 4 + index % 5, 4 + index % 7 + side, 4 + index % 5 + side))
    return image, f"a {colour} {thing}", index


class GeneratedStream(IterableDataset):
    """``samples`` generated images in an order drawn from (seed, epoch), streamed the way data/sources.py asks of
    a streaming dataset: split over processes, then by batch over the loader's workers, resumable after any
    number of batches."""

    def __init__(self, samples: int, transform, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.epoch, self.batches_done, self.batch_size = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = epoch, 0

    def skip_batches(self, batches: int, batch_size: int) -> None:
        self.batches_done, self.batch_size = batches, batch_size

    def _epoch_samples(self) -> list[int]:
        """This process's samples of the epoch, in order: as many on every process."""
        world = utils.get_world_size()
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return order.tolist()[utils.get_rank()::world][: self.samples // world]

    def __len__(self) -> int:
        return len(self._epoch_samples()) - self.batches_done * self.batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        remaining = self._epoch_samples()[self.batches_done * self.batch_size:]
        batches = [remaining[start:start + self.batch_size] for start in range(0, len(remaining), self.batch_size)]
        for batch in batches[worker::workers]:
            for index in batch:
                image, caption, image_id = generated_sample(index)
                yield self.transform(image), caption, image_id


class GeneratedSource(CaptionSource):
    """24 generated images, one caption each; the images are no files, so features are never cached."""

    SAMPLES = 24

    def __init__(self, dataset: GeneratedStream):
        self.dataset = dataset

    @classmethod
    def from_config(cls, data_config: dict, transform, seed: int) -> "GeneratedSource":
        return cls(GeneratedStream(cls.SAMPLES, transform, seed))

    def __len__(self) -> int:
        return self.SAMPLES

    def references(self) -> dict[int, list[str]]:
        return {image_id: [caption] for _, caption, image_id in map(generated_sample, range(self.SAMPLES))}


def _image_ids(loader) -> list[list[int]]:
    return [batch[2].tolist() for batch in loader]


def test_a_stream_gives_the_same_batches_with_loader_workers_and_after_a_skip():
    stream = GeneratedStream(24, eval_transform(16), seed=5)
    assert isinstance(stream, EpochPosition)
    stream.set_epoch(1)
    stream.skip_batches(0, 4)
    whole = _image_ids(DataLoader(stream, batch_size=4, collate_fn=caption_collate, drop_last=True))
    assert len(whole) == 6 and sorted(i for batch in whole for i in batch) == list(range(24))
    with_workers = DataLoader(stream, batch_size=4, collate_fn=caption_collate, drop_last=True, num_workers=2)
    assert _image_ids(with_workers) == whole
    stream.skip_batches(2, 4)
    assert len(stream) == 16 and _image_ids(with_workers) == whole[2:]
    stream.set_epoch(2)
    stream.skip_batches(0, 4)
    assert _image_ids(DataLoader(stream, batch_size=4, collate_fn=caption_collate)) != whole


class _Preempted(RuntimeError):
    pass


def _config(tmp_path: Path, name: str, *overrides: str) -> dict:
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"arch": "tiny", "image_size": 32, "tokenizer": str(VOCAB), "max_text_length": 12},
        "data": {"source": "generated", "num_workers": 0, "min_scale": 0.6},  # augmented: the RNG must resume too
        "train": {"epochs": 2, "batch_size": 4, "lr": 1.0e-3, "log_every": 1, "checkpoint_every": 2,
                  "validate": False, "test_after_training": False},
    }))
    return training.load_config(path, [f"output_dir={tmp_path / name}", *overrides])


def test_a_streaming_source_trains_through_the_loop_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES, "generated", GeneratedSource)
    summary, _ = training.run_training(_config(tmp_path, "reference"))
    assert summary["steps"] == 12  # 24 samples, batch 4, 2 epochs

    original_log = utils.JsonlLogger.log

    def log_then_stop(self, **record):  # a preemption after step 9 (epoch 1, batch 3); the last checkpoint: step 8
        original_log(self, **record)
        if record.get("kind") == "train" and record.get("step") == 9:
            raise _Preempted

    monkeypatch.setattr(utils.JsonlLogger, "log", log_then_stop)
    with pytest.raises(_Preempted):
        training.run_training(_config(tmp_path, "interrupted"))
    _, _, metadata = load_checkpoint_file(tmp_path / "interrupted" / LATEST)
    assert metadata["progress"]["global_step"] == 8 and metadata["progress"]["batches_done"] == 2
    monkeypatch.setattr(utils.JsonlLogger, "log", original_log)
    training.run_training(_config(tmp_path, "interrupted", "resume=true"))

    expected, _, expected_meta = load_checkpoint_file(tmp_path / "reference" / LATEST)
    got, _, got_meta = load_checkpoint_file(tmp_path / "interrupted" / LATEST)
    assert got_meta["progress"]["global_step"] == expected_meta["progress"]["global_step"] == 12
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl"))
                if r["kind"] == "train"}
    assert losses("interrupted")[9] == losses("reference")[9]


def test_the_annotation_source_answers_for_its_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (20, 20), (image_id * 40, 0, 0)).save(tmp_path / "images" / f"img_{image_id}.png")
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps([{"image": "images/img_1.png", "caption": ["A red ball.", "red!"]},
                                      {"image": "images/img_2.png", "caption": "a dog"},
                                      {"image": "images/img_1.png", "caption": "a ball"}]))
    data_config = training.load_config(_write(tmp_path, {"data": {
        "train_files": [str(train_file)], "image_root": str(tmp_path)}}))["data"]
    source = SOURCES["annotations"].from_config(data_config, eval_transform(16), seed=0)
    assert isinstance(source, AnnotationSource) and isinstance(source.dataset, CaptionTrainDataset)
    assert len(source) == 4
    assert source.references() == {1: ["a red ball", "red", "a ball"], 2: ["a dog"]}
    assert source.reference_files() == [train_file]
    images = source.image_files()
    assert images.root == tmp_path and images.paths == ["images/img_1.png", "images/img_2.png"]

    AnnotationSource.check_config(data_config)
    with pytest.raises(utils.ConfigError, match="data.train_files: file .*missing.json not found"):
        AnnotationSource.check_config({**data_config, "train_files": [str(tmp_path / "missing.json")]})
    with pytest.raises(utils.ConfigError, match="data.train_files is empty"):
        AnnotationSource.check_config({**data_config, "train_files": []})


def test_an_unknown_source_kind_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(utils.ConfigError, match=r"data.source must be one of \['annotations', .*\], got 'imaginary'"):
        training.load_config(_write(tmp_path, {"data": {"source": "imaginary"}}))


def _write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path
