"""Tests for data/: caption normalisation, datasets, COCO ground truth, transforms, toy set.

Everything runs offline on tiny files under pytest's tmp_path; nothing is written into the repo.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import toy
from data.captions import image_id_from_path, pre_caption
from data.datasets import (
    AnnotationError,
    CaptionEvalDataset,
    CaptionTrainDataset,
    ImageLoadError,
    build_coco_gt,
    caption_collate,
    eval_collate,
    load_annotations,
)
from data.transforms import (
    BLIP_RANDAUGMENT_OPS,
    CLIP_MEAN,
    CLIP_STD,
    BlipRandAugment,
    build_train_transform,
)
from imaging import eval_transform

# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Dog.", "a dog"),
        ('"A (big) dog*#: on; a~ mat!"', "a big dog on a mat"),
        # BLIP's class is exactly .!"()*#:;~ -- commas, apostrophes, hyphens, ?, / survive.
        ("A man's red-ish hat, yes? no/maybe", "a man's red-ish hat, yes? no/maybe"),
        ("  two   spaces\n\n", "two spaces"),
        ("trailing newline\n", "trailing newline"),
        ("...!!", ""),
    ],
)
def test_pre_caption_matches_blip(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_keeps_single_tab_like_blip():
    # BLIP only collapses runs of 2+ whitespace characters.
    assert pre_caption("a\tdog") == "a\tdog"
    assert pre_caption("a \tdog") == "a dog"


def test_pre_caption_truncates_to_max_words():
    caption = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(caption, max_words=30) == " ".join(f"w{i}" for i in range(30))
    assert len(pre_caption(caption).split(" ")) == 50  # BLIP's default
    assert pre_caption(caption, max_words=None) == caption


def test_pre_caption_rejects_non_text():
    with pytest.raises(TypeError, match="123"):
        pre_caption(123)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("val2014/COCO_val2014_000000184613.jpg", 184613),
        ("flickr30k-images/1000092795.jpg", 1000092795),
        ("images/toy_000012.png", 12),
        (Path("a/b/img7.jpeg"), 7),
    ],
)
def test_image_id_from_path(path, expected):
    assert image_id_from_path(path) == expected


def test_image_id_from_path_names_the_path():
    with pytest.raises(ValueError, match="images/cat.jpg"):
        image_id_from_path("images/cat.jpg")


# ---------------------------------------------------------------- datasets

IMAGE_COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images_root"
    (root / "val2014").mkdir(parents=True)
    for image_id, colour in IMAGE_COLOURS.items():
        Image.new("RGB", (40, 30), colour).save(root / f"val2014/COCO_val2014_{image_id:012d}.jpg")
    # A grey-scale file: the datasets must hand RGB to the transform.
    Image.new("L", (40, 30), 128).save(root / "val2014/COCO_val2014_000000000004.png")
    return root


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def coco_path(image_id: int) -> str:
    return f"val2014/COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    return write_json(
        tmp_path / "train.json",
        [
            {"image": coco_path(1), "caption": "A Red  picture.", "image_id": "coco_1"},
            {"image": coco_path(2), "caption": ["Green!", "a green (square) image", "one two three four five"]},
        ],
    )


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    return write_json(
        tmp_path / "val.json",
        [
            {"image": coco_path(1), "caption": ["A red one.", "Red!"]},
            {"image": coco_path(3), "caption": ["The Blue one", "blue;", "BLUE image"]},
            {"image": "val2014/COCO_val2014_000000000004.png", "caption": ["grey"]},
        ],
    )


def test_train_dataset_expands_lists_and_normalises(train_file, image_root):
    dataset = CaptionTrainDataset(str(train_file), image_root, eval_transform(16), max_words=4)
    assert [caption for _, caption, _ in dataset.samples] == [
        "a red picture",
        "green",
        "a green square image",
        "one two three four",  # truncated to max_words
    ]
    assert len(dataset) == 4
    image, caption, image_id = dataset[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert caption == "a green square image"
    assert image_id == 2 and isinstance(image_id, int)


def test_train_dataset_concatenates_files(train_file, image_root, tmp_path):
    second = write_json(tmp_path / "train2.json", [{"image": coco_path(3), "caption": "blue"}])
    dataset = CaptionTrainDataset([train_file, second], image_root, eval_transform(8))
    assert len(dataset) == 5
    assert dataset.samples[-1] == (coco_path(3), "blue", 3)


def test_caption_collate_shapes(train_file, image_root):
    dataset = CaptionTrainDataset(train_file, image_root, eval_transform(16))
    images, captions, image_ids, num_skipped = caption_collate([dataset[0], dataset[1], dataset[3]])
    assert num_skipped == 0
    assert images.shape == (3, 3, 16, 16)
    assert captions == ["a red picture", "green", "one two three four five"]
    assert image_ids.dtype == torch.long and image_ids.tolist() == [1, 2, 2]


def test_eval_dataset_ids_references_and_rgb(eval_file, image_root):
    dataset = CaptionEvalDataset(eval_file, image_root, eval_transform(16))
    assert dataset.image_ids == [1, 3, 4]
    assert dataset.references == {
        1: ["a red one", "red"],
        3: ["the blue one", "blue", "blue image"],
        4: ["grey"],
    }
    image, image_id = dataset[2]
    assert image_id == 4
    assert image.shape == (3, 16, 16)  # grey-scale file converted to RGB
    images, image_ids = eval_collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 16, 16)
    assert image_ids.dtype == torch.long and image_ids.tolist() == [1, 3]


def test_build_coco_gt_round_trips_through_pycocotools(eval_file, tmp_path):
    from pycocotools.coco import COCO

    gt = build_coco_gt(eval_file)
    assert gt["type"] == "captions"
    assert gt["images"][1] == {"id": 3, "file_name": coco_path(3)}
    gt_file = write_json(tmp_path / "gt.json", gt)
    coco = COCO(str(gt_file))
    assert sorted(coco.getImgIds()) == [1, 3, 4]
    assert len(coco.getAnnIds()) == 6
    assert len(set(coco.getAnnIds())) == 6
    # Raw text, because pycocoevalcap tokenises it itself.
    assert sorted(a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[3]))) == [
        "BLUE image",
        "The Blue one",
        "blue;",
    ]


# ---------------------------------------------------------------- errors


def test_missing_annotation_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_annotations(missing)


def test_invalid_json_names_file_and_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"image": "a1.jpg",\n', encoding="utf-8")
    with pytest.raises(AnnotationError, match=re.escape(str(broken)) + r".*line \d+"):
        load_annotations(broken)


def test_non_list_json_is_rejected(tmp_path):
    wrong = write_json(tmp_path / "dict.json", {"images": []})
    with pytest.raises(AnnotationError, match=re.escape(str(wrong)) + ".*JSON list.*dict"):
        load_annotations(wrong)


@pytest.mark.parametrize("missing_key", ["caption", "image"])
def test_missing_key_names_file_index_and_key(tmp_path, missing_key):
    entry = {"image": coco_path(2), "caption": "fine"}
    del entry[missing_key]
    path = write_json(tmp_path / "bad.json", [{"image": coco_path(1), "caption": "ok"}, entry])
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + f".*entry 1 .*'{missing_key}'"):
        load_annotations(path)


def test_ill_typed_caption_is_rejected(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"image": coco_path(1), "caption": []}])
    with pytest.raises(AnnotationError, match="entry 0 key 'caption'"):
        load_annotations(path)


def test_empty_caption_names_file_and_index(tmp_path, image_root):
    path = write_json(
        tmp_path / "train.json",
        [{"image": coco_path(1), "caption": "ok"}, {"image": coco_path(2), "caption": ["fine", " ... "]}],
    )
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*entry 1 .*empty"):
        CaptionTrainDataset(path, image_root, eval_transform(8))
    with pytest.raises(AnnotationError, match="entry 1 .*empty"):
        CaptionEvalDataset(path, image_root, eval_transform(8))


def test_image_path_without_id_names_file_and_index(tmp_path, image_root):
    path = write_json(tmp_path / "train.json", [{"image": "val2014/cat.jpg", "caption": "a cat"}])
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*entry 0.*val2014/cat.jpg"):
        CaptionTrainDataset(path, image_root, eval_transform(8))


def test_duplicate_eval_image_is_rejected(tmp_path):
    path = write_json(
        tmp_path / "val.json",
        [{"image": coco_path(1), "caption": ["a"]}, {"image": coco_path(1), "caption": ["b"]}],
    )
    with pytest.raises(AnnotationError, match="entries 0 .* and 1 .*image id 1"):
        build_coco_gt(path)


def test_missing_image_names_full_path(tmp_path, image_root):
    path = write_json(tmp_path / "train.json", [{"image": coco_path(99), "caption": "ghost"}])
    dataset = CaptionTrainDataset(path, image_root, eval_transform(8))  # lazy: no error yet
    with pytest.raises(ImageLoadError, match=re.escape(str(image_root / coco_path(99)))) as raised:
        dataset[0]
    assert raised.value.path == str(image_root / coco_path(99))


def test_corrupt_image_names_full_path(tmp_path, image_root):
    (image_root / coco_path(5)).write_bytes(b"not a jpeg at all")
    path = write_json(tmp_path / "val.json", [{"image": coco_path(5), "caption": ["junk"]}])
    dataset = CaptionEvalDataset(path, image_root, eval_transform(8))
    with pytest.raises(ImageLoadError, match=re.escape(str(image_root / coco_path(5))) + ".*cannot decode"):
        dataset[0]


def test_missing_image_root_is_named(train_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        CaptionTrainDataset(train_file, tmp_path / "no_such_root", eval_transform(8))


# ---------------------------------------------------------------- transforms


def striped_image(width: int = 48, height: int = 40) -> Image.Image:
    """An asymmetric RGB test image (so a flip or crop changes the result)."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    pixels = np.stack(
        [
            np.tile(ramp, (height, 1)),
            np.tile(ramp[::-1], (height, 1)),
            np.tile(np.linspace(0, 255, height, dtype=np.float32)[:, None], (1, width)),
        ],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def test_eval_transform_shape_and_clip_normalisation():
    colour = (255, 0, 51)
    output = eval_transform(24)(Image.new("RGB", (50, 30), colour))
    assert output.shape == (3, 24, 24) and output.dtype == torch.float32
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(output, expected[:, None, None].expand(3, 24, 24), atol=1e-5, rtol=0)


def test_train_transform_shape_dtype_and_torch_seed_determinism():
    transform = build_train_transform(32)
    image = striped_image()
    python_state, numpy_state = random.getstate(), np.random.get_state()

    outputs = []
    for _ in range(2):
        torch.manual_seed(1234)
        outputs.append(torch.stack([transform(image) for _ in range(8)]))
    assert outputs[0].shape == (8, 3, 32, 32) and outputs[0].dtype == torch.float32
    assert torch.equal(outputs[0], outputs[1])
    # Different draws within one seed give different augmentations.
    assert not torch.equal(outputs[0][0], outputs[0][1])
    # The global Python/NumPy generators are left as they were.
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state) if isinstance(a, np.ndarray))


def test_randaugment_mirrors_blip_configuration():
    augment = BlipRandAugment()
    assert augment.op_names == list(BLIP_RANDAUGMENT_OPS)
    assert BLIP_RANDAUGMENT_OPS[0] == "Identity" and len(BLIP_RANDAUGMENT_OPS) == 10
    assert augment.rand_augment.num_layers == 2
    assert augment.rand_augment.choice_weights is None  # uniform, with replacement
    timm_ops = augment.rand_augment.ops[1:]
    assert all(op.prob == 0.5 and op.magnitude == 5 for op in timm_ops)
    translate = augment.rand_augment.ops[BLIP_RANDAUGMENT_OPS.index("TranslateX")]
    assert translate.hparams["translate_const"] == 10  # 5 px at magnitude 5, as in BLIP

    torch.manual_seed(0)
    image = striped_image(32, 32)
    augmented = [np.asarray(augment(image)) for _ in range(30)]
    assert all(a.shape == (32, 32, 3) for a in augmented)
    changed = sum(not np.array_equal(a, np.asarray(image)) for a in augmented)
    unchanged = len(augmented) - changed
    # P(unchanged) per image is about (0.5 + 0.05)^2 ~= 0.3: both kinds must occur in 30 draws.
    assert changed > 0 and unchanged > 0


def test_train_transform_without_randomness_equals_eval_transform():
    image = striped_image()
    train = build_train_transform(24, min_scale=1.0, max_scale=1.0, randaugment=False, horizontal_flip=False)
    for _ in range(3):
        torch.testing.assert_close(train(image), eval_transform(24)(image))


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"image_size": 32, "min_scale": 0.9, "max_scale": 0.5}, {"image_size": 32, "min_scale": 0}]
)
def test_train_transform_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_train_transform(**kwargs)


# ---------------------------------------------------------------- toy dataset

TOY_SIZES = {"num_train": 40, "num_val": 10, "num_test": 12}
CAPTION_PATTERN = re.compile(
    r"^a(?: (?P<size>small|large))? (?P<colour>\w+) (?P<shape>circle|square|triangle|star)"
    r"(?: (?P<position>to the left|to the right|at the top|at the bottom|in the middle))?"
    r"(?: on a (?P<background>\w+) background)?$"
)


@pytest.fixture(scope="module")
def toy_paths(tmp_path_factory) -> dict[str, Path]:
    return toy.ensure_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", seed=3, **TOY_SIZES)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def references_by_image(toy_paths) -> dict[str, list[str]]:
    references = defaultdict(list)
    for entry in read_json(toy_paths["train_file"]):
        references[entry["image"]].append(entry["caption"])
    for split in ("val_file", "test_file"):
        for entry in read_json(toy_paths[split]):
            references[entry["image"]] += entry["caption"]
    return references


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_returns_expected_files(toy_paths):
    assert set(toy_paths) == {"image_root", "train_file", "val_file", "test_file", "val_gt", "test_gt", "vocab_file"}
    assert all(path.exists() for path in toy_paths.values())
    assert len(read_json(toy_paths["train_file"])) == 5 * TOY_SIZES["num_train"]
    assert len(read_json(toy_paths["val_file"])) == TOY_SIZES["num_val"]
    assert all(len(entry["caption"]) == 5 for entry in read_json(toy_paths["test_file"]))


def test_toy_is_deterministic(toy_paths, tmp_path):
    again = toy.ensure_toy_dataset(tmp_path / "again", seed=3, **TOY_SIZES)
    first, second = tree_bytes(toy_paths["image_root"]), tree_bytes(again["image_root"])
    assert first.keys() == second.keys() and first == second
    other_seed = toy.ensure_toy_dataset(tmp_path / "other", seed=4, **TOY_SIZES)
    assert read_json(other_seed["train_file"]) != read_json(toy_paths["train_file"])


def test_toy_cache_is_reused_and_rebuilt_on_new_arguments(tmp_path, monkeypatch):
    builds = []
    original_write = toy._write_dataset
    monkeypatch.setattr(toy, "_write_dataset", lambda *args: (builds.append(args), original_write(*args)))
    root = tmp_path / "cache" / "toy"
    paths = toy.ensure_toy_dataset(root, num_train=5, num_val=2, num_test=2)
    manifest_mtime = (root / "manifest.json").stat().st_mtime_ns
    assert toy.ensure_toy_dataset(root, num_train=5, num_val=2, num_test=2) == paths
    assert len(builds) == 1
    assert (root / "manifest.json").stat().st_mtime_ns == manifest_mtime

    toy.ensure_toy_dataset(root, num_train=5, num_val=3, num_test=2)
    assert len(builds) == 2
    assert len(read_json(paths["val_file"])) == 3
    assert not list(root.parent.glob(".toy.*"))  # no temporary folders left behind

    (root / "images" / "toy_000000.png").unlink()  # a damaged cache is rebuilt, not trusted
    toy.ensure_toy_dataset(root, num_train=5, num_val=3, num_test=2)
    assert len(builds) == 3 and (root / "images" / "toy_000000.png").is_file()


def test_toy_refuses_to_replace_foreign_folder(tmp_path):
    root = tmp_path / "precious"
    root.mkdir()
    (root / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="precious"):
        toy.ensure_toy_dataset(root, num_train=2, num_val=1, num_test=1)
    assert (root / "thesis.tex").read_text() == "do not delete"


def test_toy_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        toy.ensure_toy_dataset(tmp_path / "t", num_val=0)
    with pytest.raises(ValueError, match="seed"):
        toy.ensure_toy_dataset(tmp_path / "t", seed=-1)


def _build_in_child(root: Path, start, results) -> None:
    start.wait()
    toy.ensure_toy_dataset(root, num_train=30, num_val=5, num_test=5)
    results.put("done")


def test_toy_concurrent_callers_build_once(tmp_path, monkeypatch):
    build_log = tmp_path / "builds.log"
    original_write = toy._write_dataset

    def logged_slow_write(*args):
        with build_log.open("a") as handle:
            handle.write("build\n")
        time.sleep(0.3)  # widen the race: without the lock the other process would build too
        original_write(*args)

    monkeypatch.setattr(toy, "_write_dataset", logged_slow_write)
    context = multiprocessing.get_context("fork")  # children inherit the patched writer
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_build_in_child, args=(tmp_path / "toy", start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert build_log.read_text().splitlines() == ["build"]
    assert len(read_json(tmp_path / "toy" / "toy_val.json")) == 5


def test_toy_reference_detail_distribution(toy_paths):
    """Each detail kind is in 1 or 2 of 5 references; one is terse, one is complete."""
    for image, references in references_by_image(toy_paths).items():
        assert len(references) == 5, image
        matches = [CAPTION_PATTERN.match(reference) for reference in references]
        assert all(matches), (image, references)  # also checks the fixed word order
        for kind in ("size", "position", "background"):
            mentions = sum(match.group(kind) is not None for match in matches)
            assert 1 <= mentions <= 2, (image, kind, references)
        details = [sum(match.group(k) is not None for k in ("size", "position", "background")) for match in matches]
        assert 0 in details and 3 in details, references
        # All references describe the same object, and the background never matches its colour.
        assert len({(m.group("colour"), m.group("shape")) for m in matches}) == 1
        background = next(m.group("background") for m in matches if m.group("background"))
        assert background != matches[0].group("colour")


def test_toy_images_show_what_captions_say(toy_paths):
    centres = {"to the left": (16, 32), "to the right": (48, 32), "at the top": (32, 16),
               "at the bottom": (32, 48), "in the middle": (32, 32)}  # fmt: skip
    for image, references in references_by_image(toy_paths).items():
        matches = [CAPTION_PATTERN.match(reference) for reference in references]
        full = next(m for m in matches if all(m.group(k) for k in ("size", "position", "background")))
        pixels = np.asarray(Image.open(toy_paths["image_root"] / image).convert("RGB")).astype(int)
        assert pixels.shape == (64, 64, 3)
        background = toy.BACKGROUND_COLOURS[full.group("background")]
        shape_mask = (pixels != background).any(axis=-1)
        assert (pixels[shape_mask] == toy.SHAPE_COLOURS[full.group("colour")]).all(), image
        rows, columns = np.nonzero(shape_mask)
        centre_x, centre_y = (columns.min() + columns.max()) / 2, (rows.min() + rows.max()) / 2
        expected_x, expected_y = centres[full.group("position")]
        assert abs(centre_x - expected_x) <= 3 and abs(centre_y - expected_y) <= 4, (image, full.group(0))
        width = columns.max() - columns.min() + 1
        assert (width > 20) == (full.group("size") == "large"), (image, width)


def test_toy_ids_are_unique_across_splits(toy_paths):
    train = read_json(toy_paths["train_file"])
    split_ids = {
        "train": {image_id_from_path(entry["image"]) for entry in train},
        "val": {image_id_from_path(entry["image"]) for entry in read_json(toy_paths["val_file"])},
        "test": {image_id_from_path(entry["image"]) for entry in read_json(toy_paths["test_file"])},
    }
    assert split_ids["train"] == set(range(40))
    assert split_ids["val"] == set(range(40, 50)) and split_ids["test"] == set(range(50, 62))
    assert all(entry["image_id"] == f"toy_{image_id_from_path(entry['image'])}" for entry in train)


def test_toy_vocab_covers_every_caption_without_unk(toy_paths):
    from transformers import BertTokenizer

    lines = toy_paths["vocab_file"].read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = lines[5:]
    assert words == sorted(set(words))
    captions = [r for references in references_by_image(toy_paths).values() for r in references]
    used = {word for caption in captions for word in caption.split(" ")} | {"a", "picture", "of"}
    assert used == set(words)

    # NB: transformers 5 takes the vocab path positionally (or as vocab=); vocab_file= is ignored.
    tokenizer = BertTokenizer(str(toy_paths["vocab_file"]))
    assert tokenizer.convert_tokens_to_ids("[PAD]") == 0 and tokenizer.convert_tokens_to_ids("[MASK]") == 4
    for caption in captions + ["a picture of"]:
        token_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in token_ids, caption
        assert len(token_ids) == len(caption.split(" ")), caption  # word-level: one id per word


def test_toy_gt_loads_with_pycocotools(toy_paths):
    from pycocotools.coco import COCO

    for split, count in (("val", TOY_SIZES["num_val"]), ("test", TOY_SIZES["num_test"])):
        coco = COCO(str(toy_paths[f"{split}_gt"]))
        assert len(coco.getImgIds()) == count
        assert len(coco.getAnnIds()) == 5 * count
        # build_coco_gt's GT plus what metrics.toy_grounding needs: each image's scene and the toy grammar.
        gt, built = read_json(toy_paths[f"{split}_gt"]), build_coco_gt(toy_paths[f"{split}_file"])
        assert gt.pop("toy_grammar") == toy.toy_grammar()
        scenes = [image.pop("toy_scene") for image in gt["images"]]
        assert gt == built
        assert scenes == [entry["toy_scene"] for entry in read_json(toy_paths[f"{split}_file"])]
        assert all(set(scene) == set(toy.ATTRIBUTES) for scene in scenes)


def test_toy_feeds_the_datasets(toy_paths):
    train = CaptionTrainDataset(toy_paths["train_file"], toy_paths["image_root"], build_train_transform(32))
    images, captions, image_ids, _ = caption_collate([train[0], train[7]])
    assert images.shape == (2, 3, 32, 32) and image_ids.tolist() == [0, 1]
    evaluation = CaptionEvalDataset(toy_paths["test_file"], toy_paths["image_root"], eval_transform(32))
    assert evaluation.image_ids == list(range(50, 62))
    assert evaluation[0][0].shape == (3, 32, 32)


def test_toy_cli_prints_paths(tmp_path, capsys):
    toy.main(["--root", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "1", "--num-test", "1"])
    printed = capsys.readouterr().out
    assert f"train_file: {tmp_path / 'cli' / 'toy_train.json'}" in printed
    assert "vocab_file:" in printed


def test_package_reexports_public_api():
    for name in ("pre_caption", "image_id_from_path", "CaptionTrainDataset", "CaptionEvalDataset", "build_coco_gt",
                 "load_annotations", "caption_collate", "eval_collate", "build_train_transform",
                 "AnnotationSource", "ensure_toy_dataset"):  # fmt: skip
        assert callable(getattr(data, name)), name


def test_bad_images_are_skipped_and_counted_only_when_asked(train_file, image_root, tmp_path):
    dataset = CaptionTrainDataset(train_file, image_root, eval_transform(32))
    broken = image_root / dataset.samples[1][0]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated file
    with pytest.raises(ImageLoadError, match=str(broken)):
        dataset[1]
    skipping = CaptionTrainDataset(train_file, image_root, eval_transform(32), skip_bad_images=True)
    images, captions, image_ids, num_skipped = caption_collate([skipping[0], skipping[1], skipping[0]])
    assert num_skipped == 1 and images.shape[0] == len(captions) == len(image_ids) == 2
    images, captions, image_ids, num_skipped = caption_collate([skipping[1]])
    assert num_skipped == 1 and images.numel() == 0 and captions == []
