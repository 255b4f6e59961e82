"""data/custom.py: a user's own captioned images (three layouts) -> annotation files with a deterministic split, and
the annotation format's integer ``id`` (data.captions.entry_image_id) that lets keys be any string.

Tiny generated images under tmp_path; no model, no network.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from data.captions import entry_image_id
from data.custom import (
    CustomDataError,
    CustomOptionError,
    assign_splits,
    custom_data_paths,
    detect_layout,
    parse_size,
    read_source,
    split_sizes,
    write_custom_set,
)
from data.datasets import AnnotationError, CaptionEvalDataset, CaptionTrainDataset, build_coco_gt, load_annotations
from imaging import eval_transform


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def _sidecar(image: Path, *lines: str) -> Path:
    text = image.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return text


def _folder(root: Path) -> Path:
    """Nested images with sidecars, string keys without digits, one uncaptioned image, one hidden folder."""
    _sidecar(_image(root / "cat photo.jpg"), "A cat on a sofa.", "", "  a grey cat  ")
    _sidecar(_image(root / "a" / "b" / "IMG_1.png"), "a dog in the snow")
    _sidecar(_image(root / "a" / "beach.jpeg"), "waves on a beach")
    _image(root / "a" / "no_caption.jpg")
    _sidecar(_image(root / ".ipynb_checkpoints" / "cat photo.jpg"), "a stale copy")
    return root


def test_folder_layout_reads_nested_sidecars_with_string_keys(tmp_path):
    root = _folder(tmp_path / "photos")
    assert detect_layout(root) == "folder"
    found = read_source(root)
    assert found.layout == "folder" and found.image_root == root.absolute()
    assert {image.key: image.captions for image in found.images} == {
        "cat photo": ["A cat on a sofa.", "a grey cat"],
        "a/b/IMG_1": ["a dog in the snow"],
        "a/beach": ["waves on a beach"],
    }
    assert found.uncaptioned == [root.absolute() / "a" / "no_caption.jpg"]


def test_csv_layout_merges_rows_and_takes_relative_absolute_and_image_root_paths(tmp_path):
    images = tmp_path / "pics"
    cat, dog = _image(images / "cat photo.jpg"), _image(images / "sub" / "dog.png")
    table = tmp_path / "captions.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text", "extra"])
        writer.writerow(["pics/cat photo.jpg", "a cat", "x"])
        writer.writerow([str(dog), "a dog", "y"])                    # absolute
        writer.writerow(["pics/cat photo.jpg", "a cat on a sofa", "z"])  # a second caption for the cat
    assert detect_layout(table) == "csv"
    found = read_source(table)
    assert {image.key: image.captions for image in found.images} == {
        "pics/cat photo": ["a cat", "a cat on a sofa"], "pics/sub/dog": ["a dog"]}
    assert found.image_root == images.absolute() and {image.path for image in found.images} == {cat, dog}

    # Paths relative to --image-root instead, keys from a column of any strings.
    other = tmp_path / "elsewhere" / "list.csv"
    other.parent.mkdir()
    other.write_text("image,caption,id\ncat photo.jpg,a cat,Cat #1\nsub/dog.png,a dog,dog: the best\n")
    found = read_source(other, image_root=images, key_column="id")
    assert sorted(image.key for image in found.images) == ["Cat #1", "dog: the best"]


def test_jsonl_layout_takes_a_string_or_a_list_of_captions(tmp_path):
    _image(tmp_path / "x" / "one.jpg")
    _image(tmp_path / "x" / "two.jpg")
    table = tmp_path / "data.jsonl"
    table.write_text(json.dumps({"image": "x/one.jpg", "caption": ["first", "second"]}) + "\n\n"
                     + json.dumps({"image": "x/two.jpg", "caption": "only one"}) + "\n")
    assert detect_layout(table) == "jsonl"
    found = read_source(table)
    assert [(image.key, image.captions) for image in found.images] == [
        ("x/one", ["first", "second"]), ("x/two", ["only one"])]


def test_imagefolder_metadata_with_hugging_face_split_folders(tmp_path):
    root = tmp_path / "hf"
    _image(root / "train" / "a.jpg")
    _image(root / "test" / "b.jpg")
    (root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "an apple"}) + "\n")
    (root / "test" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.jpg", "caption": ["a banana", "yellow fruit"]}) + "\n")
    assert detect_layout(root) == "imagefolder" and detect_layout(root / "train" / "metadata.jsonl") == "imagefolder"
    found = read_source(root)
    assert [(image.key, image.captions) for image in found.images] == [
        ("test/b", ["a banana", "yellow fruit"]), ("train/a", ["an apple"])]


def test_layout_detection_and_its_override(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CustomOptionError, match="--layout"):
        detect_layout(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        detect_layout(tmp_path / "nope")
    _image(tmp_path / "t" / "p.jpg")
    table = tmp_path / "t" / "list.txt"  # a CSV by content, named otherwise
    table.write_text("image,caption\np.jpg,a picture\n")
    with pytest.raises(CustomOptionError, match="the csv layout needs a file"):
        read_source(tmp_path / "t", layout="csv")
    assert [image.key for image in read_source(table, layout="csv").images] == ["p"]  # parsed as the layout says
    listing = tmp_path / "t" / "list.data"
    listing.write_text(json.dumps([{"image": "p.jpg", "caption": "a picture"}]))  # one JSON list, any name
    assert [image.captions for image in read_source(listing, layout="jsonl").images] == [["a picture"]]
    with pytest.raises(CustomOptionError, match="folder layout takes no"):
        read_source(tmp_path / "t", layout="folder", image_root=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------------------


def test_split_sizes_counts_and_fractions():
    assert parse_size("3") == 3 and parse_size("0.25") == 0.25 and parse_size("0") == 0
    for bad in ("1.5", "-1", "x", "1.0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert split_sizes(100, 0.05, 10) == (5, 10)
    assert split_sizes(8, 0.05, 0.05) == (1, 1)  # a fraction asks for a split: at least one image
    assert split_sizes(8, 0, 0) == (0, 0)
    with pytest.raises(CustomOptionError, match="leave no training image of the 4"):
        split_sizes(4, 2, 2)


def test_the_split_depends_on_the_seed_and_the_keys_only_and_is_stable_as_the_set_grows():
    keys = [f"photo {index}" for index in range(200)]
    first = assign_splits(keys, 20, 20, seed=1)
    assert assign_splits(list(reversed(keys)), 20, 20, seed=1) == first  # the order read does not matter
    assert assign_splits(keys, 20, 20, seed=2) != first
    assert sum(split == "val" for split in first.values()) == 20 and sum(s == "test" for s in first.values()) == 20
    grown = assign_splits(keys + [f"new {index}" for index in range(20)], 20, 20, seed=1)
    moved = sum(grown[key] != first[key] for key in keys)
    assert moved <= 8, moved  # only images at the boundaries change split (a shuffle would move ~1/3 of them)


# ---------------------------------------------------------------------------------------------------------------
# The written set, read back by the repository's own loaders
# ---------------------------------------------------------------------------------------------------------------


def _many(root: Path, count: int) -> Path:
    for index in range(count):
        _sidecar(_image(root / f"shot {chr(97 + index)}.jpg", (index * 20, 50, 90)), f"picture {index}",
                 f"another view {index}")
    return root


def test_written_files_load_with_the_annotation_loaders_and_map_back_to_the_keys(tmp_path):
    root = _folder(_many(tmp_path / "photos", 7))
    out = tmp_path / "prepared"
    manifest = write_custom_set(read_source(root), out, val=2, test=2, seed=3, origin={"source": str(root)})
    assert manifest["counts"]["images"] == 10 and manifest["counts"]["uncaptioned_images_skipped"] == 1
    assert {split: manifest["counts"][split]["images"] for split in ("train", "val", "test")} == {
        "train": 6, "val": 2, "test": 2}
    keys = json.loads((out / "keys.json").read_text())
    assert keys == {str(index): key for index, key in enumerate(sorted(keys.values()), 1)}  # ids 1..N, sorted keys

    paths = custom_data_paths(out)
    assert paths["image_root"] == str(root.absolute())
    transform = eval_transform(16)
    train = CaptionTrainDataset(paths["train_files"], paths["image_root"], transform)
    ids = {image_id for _, _, image_id in train.samples}
    assert len(ids) == 6 and all(keys[str(image_id)] for image_id in ids)
    image, caption, image_id = train[0]
    assert image.shape == (3, 16, 16) and isinstance(caption, str)
    for split in ("val", "test"):
        dataset = CaptionEvalDataset(paths[f"{split}_file"], paths["image_root"], transform)
        gt = json.loads(Path(paths[f"{split}_gt"]).read_text())
        assert sorted(dataset.image_ids) == sorted(image["id"] for image in gt["images"])
        assert gt == build_coco_gt(paths[f"{split}_file"])
        for entry in load_annotations(paths[f"{split}_file"]):
            assert keys[str(entry["id"])] == entry["key"] and (root / entry["image"]).is_file()
            assert entry["image"] in {image["file_name"] for image in gt["images"]}
    all_ids = ids | {entry["id"] for split in ("val", "test") for entry in load_annotations(paths[f"{split}_file"])}
    assert all_ids == set(range(1, 11))
    # Again with the same seed: the same files, byte for byte.
    before = {name: (out / name).read_bytes() for name in ("train.json", "val.json", "test.json", "keys.json")}
    write_custom_set(read_source(root), tmp_path / "again", val=2, test=2, seed=3)
    assert {name: (tmp_path / "again" / name).read_bytes() for name in before} == before


def test_an_empty_split_writes_no_file_and_removes_an_earlier_one(tmp_path):
    root = _many(tmp_path / "photos", 5)
    out = tmp_path / "prepared"
    write_custom_set(read_source(root), out, val=1, test=1)
    manifest = write_custom_set(read_source(root), out, val=1, test=0)
    assert manifest["files"]["test"] is None and manifest["files"]["test_gt"] is None
    assert not (out / "test.json").exists() and not (out / "test_gt.json").exists()
    paths = custom_data_paths(out)
    assert paths["test_file"] is None and paths["val_file"].endswith("val.json")


def test_custom_data_paths_says_how_to_make_the_set_and_names_a_moved_image_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py custom --input SRC"):
        custom_data_paths(tmp_path / "missing")
    root = _many(tmp_path / "photos", 3)
    write_custom_set(read_source(root), tmp_path / "prepared", val=1, test=1)
    manifest = json.loads((tmp_path / "prepared" / "custom.json").read_text())
    manifest["image_root"] = str(tmp_path / "moved")
    (tmp_path / "prepared" / "custom.json").write_text(json.dumps(manifest))
    with pytest.raises(CustomDataError, match="custom.json: image_root .*moved is not a folder"):
        custom_data_paths(tmp_path / "prepared")


# ---------------------------------------------------------------------------------------------------------------
# Bad rows: the annotation loader's errors (an AnnotationError naming the file, the line or entry, and the key)
# ---------------------------------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[list[str]], header=("image", "caption")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_a_missing_image_is_named_by_file_line_and_key(tmp_path):
    _image(tmp_path / "ok.jpg")
    table = _csv(tmp_path / "list.csv", [["ok.jpg", "fine"], ["gone/cat photo.jpg", "a cat"]])
    with pytest.raises(AnnotationError, match=r"list\.csv: line 3: key 'gone/cat photo': image file not found: "):
        read_source(table)
    folder = tmp_path / "folder"
    folder.mkdir()
    _sidecar(folder / "orphan.jpg", "a caption without its image")  # the .txt only
    with pytest.raises(CustomDataError, match=r"orphan\.txt: key 'orphan': image file not found"):
        read_source(folder)


def test_an_empty_caption_is_named_by_file_line_and_key_as_the_annotation_loader_does(tmp_path):
    folder = tmp_path / "folder"
    _sidecar(_image(folder / "a" / "pic.jpg"), "a good caption", "...")
    with pytest.raises(CustomDataError, match=r"pic\.txt: line 2: key 'a/pic': caption is empty after "
                                              r"normalisation: '\.\.\.'"):
        read_source(folder)
    (folder / "a" / "pic.txt").write_text("\n  \n")
    with pytest.raises(CustomDataError, match=r"pic\.txt: key 'a/pic': the caption file is empty"):
        read_source(folder)
    _image(tmp_path / "x.jpg")
    with pytest.raises(CustomDataError, match=r"list\.csv: line 2: key 'x': caption is empty"):
        read_source(_csv(tmp_path / "list.csv", [["x.jpg", ""]]))
    table = tmp_path / "rows.jsonl"
    table.write_text(json.dumps({"image": "x.jpg", "caption": []}) + "\n")
    with pytest.raises(CustomDataError, match=r"rows\.jsonl: line 1: key 'x': column 'caption' holds no caption"):
        read_source(table)
    # The annotation loader says the same of an annotation file.
    annotation = tmp_path / "train.json"
    annotation.write_text(json.dumps([{"image": "x.jpg", "caption": "...", "id": 1}]))
    with pytest.raises(AnnotationError, match="entry 0 has a caption that is empty after normalisation"):
        CaptionTrainDataset(annotation, tmp_path, eval_transform(16))


def test_a_duplicate_key_is_named_in_every_layout(tmp_path):
    folder = tmp_path / "folder"
    _sidecar(_image(folder / "twin.jpg"), "which twin")
    _image(folder / "twin.png")
    with pytest.raises(CustomDataError, match=r"twin\.txt: key 'twin': duplicate key: 2 images share it "
                                              r"\(twin\.jpg, twin\.png\)"):
        read_source(folder)
    _image(tmp_path / "one.jpg")
    _image(tmp_path / "two.jpg")
    table = _csv(tmp_path / "keys.csv", [["one.jpg", "first", "same"], ["two.jpg", "second", "same"]],
                 header=("image", "caption", "key"))
    with pytest.raises(CustomDataError, match=r"keys\.csv: line 3: key 'same': duplicate key: .*keys\.csv: line 2 "
                                              r"gives it to another image"):
        read_source(table, key_column="key")
    hf = tmp_path / "hf"
    _image(hf / "a.jpg")
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "x"}) + "\n"
                                       + json.dumps({"file_name": "a.jpg", "text": "y"}) + "\n")
    with pytest.raises(CustomDataError, match=r"metadata\.jsonl: line 2: key 'a': duplicate key"):
        read_source(hf)


def test_a_table_without_the_columns_names_the_flag(tmp_path):
    table = _csv(tmp_path / "list.csv", [["x.jpg", "a"]], header=("picture", "words"))
    with pytest.raises(CustomDataError, match=r"list\.csv: no image column: .* name it with --image-column"):
        read_source(table)
    with pytest.raises(CustomDataError, match="no caption column"):
        read_source(table, image_column="picture")


# ---------------------------------------------------------------------------------------------------------------
# The annotation format's integer id
# ---------------------------------------------------------------------------------------------------------------


def test_an_entrys_integer_id_is_its_image_id_and_otherwise_the_file_name_rule_applies(tmp_path):
    assert entry_image_id({"image": "val2014/COCO_val2014_000000184613.jpg"}) == 184613
    assert entry_image_id({"image": "val2014/COCO_val2014_000000184613.jpg", "image_id": "coco_9"}) == 184613
    assert entry_image_id({"image": "cat photo.jpg", "id": 7}) == 7
    with pytest.raises(ValueError, match="key 'image': cannot derive .* or give the entry an integer 'id'"):
        entry_image_id({"image": "cat photo.jpg"})
    for bad in ("7", True, 7.0):
        annotation = tmp_path / "bad.json"
        annotation.write_text(json.dumps([{"image": "cat photo.jpg", "caption": "a cat", "id": bad}]))
        with pytest.raises(AnnotationError, match=r"bad\.json: entry 0 key 'id' must be a JSON integer"):
            load_annotations(annotation)
