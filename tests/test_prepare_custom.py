"""``python scripts/prepare_data.py custom`` and ``data.custom_root``: your own captioned images, in each of the three
layouts, prepared, then fine-tuned on and evaluated with a toy config (tiny BLIP, CPU) and every metric a custom set
can feed; the groups it cannot (toy_grounding, chair) dropped with one log line; the exit statuses; and the
configs/custom/ files asking for their data."""
from __future__ import annotations

import copy
import csv
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import eval_caption
import train_caption
import training
import utils
from training.inputs import fill_data_paths

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import prepare_data  # noqa: E402

# Keys any string: spaces, nested folders, no digits at the end.
KEYS = ("cat photo", "a/b/IMG_1", "a/b/IMG_2x", "beach at dusk", "dog", "sub/red ball", "tree", "zebra crossing")
COLOURS = ((220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 20), (120, 60, 10), (10, 200, 200),
           (200, 0, 200), (90, 90, 90))


def _captions(index: int) -> list[str]:
    return [f"A {('red', 'blue', 'green', 'yellow')[index % 4]} square on the grass.", f"a picture number {index}"]


def _images(root: Path, suffix: str = ".jpg") -> dict[str, Path]:
    paths = {}
    for index, key in enumerate(KEYS):
        path = root / f"{key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), COLOURS[index]).save(path)
        paths[key] = path
    return paths


def make_layout(layout: str, root: Path) -> Path:
    """The same eight captioned images in ``layout``; returns the --input to give."""
    if layout == "folder":
        for index, path in enumerate(_images(root).values()):
            path.with_suffix(".txt").write_text("\n".join(_captions(index)) + "\n")
        return root
    if layout == "csv":
        _images(root / "pics", ".png")
        table = root / "captions.csv"
        with table.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "caption"])
            for index, key in enumerate(KEYS):  # one row per caption
                writer.writerows([[f"{key}.png", caption] for caption in _captions(index)])
        return table  # its image paths are relative to --image-root (pics), so the keys are the same as above
    if layout == "imagefolder":
        _images(root)
        lines = [json.dumps({"file_name": f"{key}.jpg", "text": _captions(index)}) for index, key in enumerate(KEYS)]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        return root
    raise ValueError(layout)


def prepare(source: Path, out: Path, *extra: str) -> int:
    return prepare_data.main(["custom", "--input", str(source), "--out", str(out), "--val", "2", "--test", "2",
                              "--seed", "5", *extra])


@pytest.mark.parametrize("layout", ["folder", "csv", "imagefolder"])
def test_each_layout_prepares_the_same_set_with_its_string_keys(layout, tmp_path, capsys):
    source = make_layout(layout, tmp_path / "src")
    extra = ["--image-root", str(tmp_path / "src" / "pics")] if layout == "csv" else []
    assert prepare(source, tmp_path / "out", *extra) == 0
    out = tmp_path / "out"
    assert "bash scripts/train.sh configs/custom/smile.yaml data.custom_root=" in capsys.readouterr().out
    manifest = json.loads((out / "custom.json").read_text())
    assert manifest["layout"] == layout and manifest["seed"] == 5
    assert {split: manifest["counts"][split] for split in ("train", "val", "test")} == {
        "train": {"images": 4, "captions": 8}, "val": {"images": 2, "captions": 4},
        "test": {"images": 2, "captions": 4}}
    keys = json.loads((out / "keys.json").read_text())
    assert keys == {str(index): key for index, key in enumerate(sorted(KEYS), 1)}
    # The split depends on the seed and the keys alone (sha256): every layout and platform gives this one.
    split_of = {entry["key"]: split for split in ("train", "val", "test")
                for entry in json.loads((out / f"{split}.json").read_text())}
    assert split_of == {"a/b/IMG_1": "val", "a/b/IMG_2x": "val", "beach at dusk": "train", "cat photo": "train",
                        "dog": "test", "sub/red ball": "train", "tree": "train", "zebra crossing": "test"}
    for split in ("val", "test"):
        gt = json.loads((out / f"{split}_gt.json").read_text())
        assert all((Path(manifest["image_root"]) / image["file_name"]).is_file() for image in gt["images"])


def test_exit_status_1_for_bad_data_naming_file_line_and_key_and_2_for_usage(tmp_path, capsys):
    source = make_layout("folder", tmp_path / "src")
    (source / "a" / "b" / "IMG_1.jpg").unlink()  # its .txt stays: a missing image
    assert prepare(source, tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert error.startswith("prepare_data: ") and "IMG_1.txt: key 'a/b/IMG_1': image file not found" in error
    assert not (tmp_path / "out" / "custom.json").exists()

    table = tmp_path / "rows.jsonl"
    table.write_text(json.dumps({"image": "src/dog.jpg", "caption": "  "}) + "\n")
    assert prepare(table, tmp_path / "out") == 1
    assert "rows.jsonl: line 1: key 'src/dog': caption is empty after normalisation" in capsys.readouterr().err

    assert prepare(tmp_path / "nowhere", tmp_path / "out") == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    good = make_layout("folder", tmp_path / "good")
    assert prepare_data.main(["custom", "--input", str(good), "--out", str(tmp_path / "o"), "--val", "4",
                              "--test", "4"]) == 2
    assert "leave no training image of the 8" in capsys.readouterr().err
    for argv in (["custom", "--input", str(good), "--out", "o", "--val", "1.5"],
                 ["--root", str(tmp_path), "custom"]):
        with pytest.raises(SystemExit) as exit_:
            prepare_data.main(argv)
        assert exit_.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# data.custom_root
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom")
    assert prepare(make_layout("folder", root / "photos"), root / "prepared") == 0
    return root / "prepared"


def test_the_custom_configs_ask_for_their_data_directory():
    for name in ("mle", "smile", "mle_smile"):
        config = training.load_config(REPO / "configs" / "custom" / f"{name}.yaml")
        assert config["data"]["custom_root"] is None and "capfilt_large" in config["model"]["pretrained"]
        for mode in ("train", "eval"):
            with pytest.raises(utils.ConfigError, match=r"set data\.custom_root=DIR \(python scripts/prepare_data\.py "
                                                        r"custom --input SRC --out DIR\)"):
                training.check_inputs(config, mode)


def test_custom_root_replaces_any_configs_data_and_drops_the_groups_it_cannot_feed(prepared, caplog):
    caplog.set_level(logging.WARNING, logger="smile_blip")
    config = training.load_config(REPO / "configs" / "coco" / "smile.yaml", [f"data.custom_root={prepared}"])
    assert "chair" in config["eval"]["metrics"]
    fill_data_paths(config)
    photos = str(prepared.parent / "photos")
    assert config["data"]["image_root"] == photos
    assert config["data"]["train_files"] == [str(prepared / "train.json")]
    assert (config["data"]["val_gt"], config["data"]["test_file"]) == (str(prepared / "val_gt.json"),
                                                                       str(prepared / "test.json"))
    assert config["eval"]["metrics"] == ["coco", "length", "diversity"]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "eval.metrics without chair: chair needs COCO's object annotations" in lines[0]
    fill_data_paths(config)  # idempotent: nothing more to drop, nothing more to say
    assert len(caplog.records) == 1

    # A toy config keeps its toy vocab (and models) but not the toy set's data, not even for an empty split.
    toy = training.load_config(REPO / "configs" / "toy" / "smile.yaml", [f"data.custom_root={prepared}"])
    before = copy.deepcopy(toy)
    training.check_inputs(toy, "train")  # checks the custom set's files, on a copy
    assert toy == before
    fill_data_paths(toy)
    assert toy["model"]["tokenizer"].endswith("vocab.txt") and toy["data"]["image_root"] == photos
    assert toy["data"]["test_file"] == str(prepared / "test.json") and "toy_grounding" not in toy["eval"]["metrics"]
    no_test = prepared.parent / "no_test"
    assert prepare(prepared.parent / "photos", no_test, "--test", "0") == 0  # the later --test wins
    toy = fill_data_paths(training.load_config(REPO / "configs" / "toy" / "smile.yaml",
                                               [f"data.custom_root={no_test}"]))
    assert toy["data"]["test_file"] is None and toy["data"]["test_gt"] is None

    with pytest.raises(utils.ConfigError, match=r"data\.custom_root: .*nowhere does not exist: make it with "
                                                r"python scripts/prepare_data\.py custom"):
        fill_data_paths(training.load_config(REPO / "configs" / "toy" / "smile.yaml",
                                             [f"data.custom_root={prepared.parent / 'nowhere'}"]))


def test_a_toy_fine_tune_on_the_prepared_set_runs_end_to_end_with_every_metric(prepared, tmp_path, tiny_clip_dir,
                                                                             tiny_gpt2_dir):
    run = tmp_path / "run"
    common = [
        "--opt", f"data.custom_root={prepared}", "--opt", f"data.toy_root={tmp_path / 'toy'}",
        "--opt", "model.pretrained=null", "--opt", "model.image_size=32", "--opt", "data.num_workers=0",
        "--opt", f"eval.clip_model={tiny_clip_dir}", "--opt", f"eval.ppl_model={tiny_gpt2_dir}",
        "--opt", "eval.num_beams=1", "--opt", "eval.max_length=10",
    ]
    # Every group but spice (opt-in: Stanford CoreNLP and ~8 GB); the last three need what a custom set lacks.
    every = "eval.metrics=[coco,length,diversity,retrieval,clipscore,ppl,toy_grounding,chair,finecapeval]"
    summary = train_caption.main([
        "--config", str(REPO / "configs" / "toy" / "smile.yaml"), *common, "--opt", f"output_dir={run}",
        "--opt", every, "--opt", "train.epochs=1", "--opt", "train.batch_size=4",
        "--opt", "train.validate=false"])  # validation would only add a METEOR run (Java start-up)
    test = summary["test"]
    assert test["num_images"] == 2 and test["num_missing"] == 0
    for key in ("Bleu_4", "CIDEr", "ROUGE_L", "cap_len", "distinct_1", "R@1", "CLIPScore", "RefCLIPScore", "PPL"):
        assert isinstance(test[key], float), key
    assert not any(key.startswith(("ground_", "CHAIR", "finecap")) for key in test)
    dropped = [line for line in (run / "train.log").read_text().splitlines() if "eval.metrics without" in line]
    assert len(dropped) == 1 and "without chair, finecapeval, toy_grounding: chair needs COCO's object " \
                                  "annotations; finecapeval needs FineCapEval's phrase annotations; toy_grounding " \
                                  "needs the toy scenes' attributes, which a custom set does not have" in dropped[0]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["custom_root"] == str(prepared) and "toy_grounding" not in saved["eval"]["metrics"]
    keys = json.loads((prepared / "keys.json").read_text())
    results = json.loads((run / "test_results.json").read_text())
    assert sorted(keys[str(result["image_id"])] for result in results) == ["dog", "zebra crossing"]

    # eval_caption.py takes the same override.
    metrics = eval_caption.main([
        "--config", str(REPO / "configs" / "toy" / "smile.yaml"), *common, "--split", "val",
        "--opt", f"output_dir={tmp_path / 'eval'}", "--opt", "eval.metrics=[length,clipscore,toy_grounding]",
        "--checkpoint", str(run / "checkpoint_best.safetensors")])
    assert metrics["num_images"] == 2 and isinstance(metrics["CLIPScore"], float) and "cap_len" in metrics
