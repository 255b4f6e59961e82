"""Reproducing the paper, offline: prepare_data.py on miniature COCO and Flickr30K trees in the real layouts and
annotation formats, its missing-image report, and scripts/reproduce.sh training a row on the miniature COCO and
writing the results table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import prepare_data  # noqa: E402

WORDS = ("a picture of red blue green yellow small large dog cat car bus on in the grass street table "
         "sitting standing next to with two").split()
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
ANIMALS = ("dog", "cat", "car", "bus")
PLACES = ("grass", "street", "table")


def _caption(i: int, k: int) -> str:
    colour = list(COLOURS)[i % 4]
    long = f" {'sitting' if k % 2 else 'standing'} on the {PLACES[(i + k) % 3]}" if k % 3 else ""
    # Raw annotator style: capitals and a full stop, which pre_caption / the PTB tokenizer remove.
    return f"A {colour} {ANIMALS[i % 4]}{long}."


def _image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), COLOURS[list(COLOURS)[i % 4]]).save(path)


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def build_coco(tmp: Path, num=(8, 3, 3)) -> tuple[Path, Path]:
    """(images root, annotation source folder) with BLIP's COCO file names and formats."""
    images, source = tmp / "coco_images", tmp / "coco_src"
    source.mkdir()
    ids = iter(range(1, 100))
    splits = {}
    for split, count in zip(("train", "val", "test"), num):
        entries = []
        for _ in range(count):
            i = next(ids)
            # Karpathy's train split takes images from both train2014 and val2014 ("restval").
            folder = "train2014" if split == "train" and i % 2 else "val2014"
            rel = f"{folder}/COCO_{folder}_{i:012d}.jpg"
            _image(images / rel, i)
            entries.append((i, rel))
        splits[split] = entries
    train = [{"caption": _caption(i, k), "image": rel, "image_id": f"coco_{i}"}
             for i, rel in splits["train"] for k in range(3)]
    (source / "coco_karpathy_train.json").write_text(json.dumps(train))
    for split in ("val", "test"):
        entries = [{"image": rel, "caption": [_caption(i, k) for k in range(5)]} for i, rel in splits[split]]
        (source / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
        # BLIP's GT: image ids only (no file_name) and COCO annotation ids.
        gt = {"images": [{"id": i} for i, _ in splits[split]],
              "annotations": [{"image_id": i, "caption": _caption(i, k), "id": 1000 * i + k}
                              for i, _ in splits[split] for k in range(5)]}
        (source / f"coco_karpathy_{split}_gt.json").write_text(json.dumps(gt))
    return images, source


def build_flickr(tmp: Path, num=(8, 3, 3)) -> tuple[Path, Path]:
    images, source = tmp / "flickr_images", tmp / "flickr_src"
    source.mkdir()
    image_id = 1000092795
    for split, count in zip(("train", "val", "test"), num):
        entries = []
        for n in range(count):
            rel = f"flickr30k-images/{image_id + n}.jpg"
            _image(images / rel, n)
            if split == "train":
                entries += [{"image": rel, "caption": _caption(n, k), "image_id": str(image_id + n)} for k in range(2)]
            else:
                entries.append({"image": rel, "caption": [_caption(n, k) for k in range(5)]})
        (source / f"flickr30k_{split}.json").write_text(json.dumps(entries))
        image_id += 100
    return images, source


def _prepare(capsys, *argv):
    code = prepare_data.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_coco_prepare_copies_adds_file_names_and_warns_about_counts(tmp_path, capsys):
    images, source = build_coco(tmp_path)
    root = tmp_path / "coco"
    code, out, err = _prepare(capsys, "coco", "--root", root, "--annotations-from", source, "--image-root", images)
    assert code == 0, err
    annotations = root / "annotations"
    for name in prepare_data.DATASETS["coco"].downloads():
        assert (annotations / name).read_bytes() == (source / name).read_bytes(), name
    gt = json.loads((annotations / "coco_karpathy_test_gt_with_files.json").read_text())
    blip_gt = json.loads((source / "coco_karpathy_test_gt.json").read_text())
    assert gt["annotations"] == blip_gt["annotations"]  # BLIP's captions and ids, untouched
    assert [im["file_name"] for im in gt["images"]] == [e["image"] for e in
                                                       json.loads((source / "coco_karpathy_test.json").read_text())]
    # A miniature split is not the Karpathy split: a warning, not an error.
    assert "coco_karpathy_train.json has 8 images; the Karpathy train split of coco has 113,287" in err
    assert f"data.image_root={images}" in out and "coco_karpathy_test_gt_with_files.json" in out
    assert not list(annotations.glob("*.part"))

    code, out, err = _prepare(capsys, "coco", "--root", root, "--image-root", images, "--check-only",
                              "--no-expect-counts")
    assert code == 0 and "WARNING" not in err


def test_missing_image_is_named_with_a_nonzero_exit(tmp_path, capsys):
    images, source = build_coco(tmp_path)
    root = tmp_path / "coco"
    assert _prepare(capsys, "coco", "--root", root, "--annotations-from", source, "--image-root", images,
                    "--no-expect-counts")[0] == 0
    gone = images / "val2014" / "COCO_val2014_000000000012.jpg"  # the first test image (ids: train 1-8, val 9-11)
    gone.unlink()
    code, out, err = _prepare(capsys, "coco", "--root", root, "--image-root", images, "--check-only",
                              "--no-expect-counts")
    assert code == 1
    assert "coco_karpathy_test.json: 1 of 3 images are missing" in err and str(gone) in err
    assert "test  coco_karpathy_test.json: 3 entries, 3 images, 1 missing" in out


def test_malformed_or_incomplete_annotations_name_the_file(tmp_path, capsys):
    images, source = build_coco(tmp_path)
    root = tmp_path / "coco"
    val = json.loads((source / "coco_karpathy_val.json").read_text())
    del val[1]["caption"]
    (source / "coco_karpathy_val.json").write_text(json.dumps(val))
    code, _, err = _prepare(capsys, "coco", "--root", root, "--annotations-from", source, "--image-root", images)
    assert code == 1 and "coco_karpathy_val.json" in err and "entry 1 has no 'caption' key" in err
    assert not (root / "annotations" / "coco_karpathy_val.json").exists()  # nothing half-installed
    assert not list((root / "annotations").glob("*.part"))

    (source / "coco_karpathy_val_gt.json").unlink()
    val[1]["caption"] = ["a dog"]
    (source / "coco_karpathy_val.json").write_text(json.dumps(val))
    code, _, err = _prepare(capsys, "coco", "--root", root, "--annotations-from", source, "--image-root", images)
    assert code == 1 and "coco_karpathy_val_gt.json is not there" in err


def test_download_is_validated_before_it_replaces_anything(tmp_path, capsys):
    images, source = build_flickr(tmp_path)
    root = tmp_path / "flickr30k"
    code, out, err = _prepare(capsys, "flickr30k", "--root", root, "--image-root", images, "--no-expect-counts",
                              "--base-url", source.as_uri())
    assert code == 0, err
    assert out.count("downloading file://") == 3
    # Present files are validated and kept; a corrupt download never lands.
    code, out, _ = _prepare(capsys, "flickr30k", "--root", root, "--image-root", images, "--no-expect-counts",
                            "--base-url", source.as_uri())
    assert code == 0 and "downloading" not in out
    (source / "flickr30k_val.json").write_text('[{"image": "flickr30k-images/1.jpg", "caption": ')
    code, _, err = _prepare(capsys, "flickr30k", "--root", root, "--image-root", images, "--no-expect-counts",
                            "--base-url", source.as_uri(), "--force")
    assert code == 1 and "flickr30k_val.json" in err and "invalid JSON" in err
    json.loads((root / "annotations" / "flickr30k_val.json").read_text())  # the good copy is still there
    assert not list((root / "annotations").glob("*.part"))


def test_flickr_gt_is_built_from_the_split_files(tmp_path, capsys):
    images, source = build_flickr(tmp_path)
    root = tmp_path / "flickr30k"
    code, out, err = _prepare(capsys, "flickr30k", "--root", root, "--annotations-from", source, "--image-root",
                              images)
    assert code == 0, err
    assert "flickr30k_val.json has 3 images; the Karpathy val split of flickr30k has 1,014" in err
    gt = json.loads((root / "annotations" / "flickr30k_test_gt.json").read_text())
    assert [im["id"] for im in gt["images"]] == [1000092995, 1000092996, 1000092997]
    assert gt["images"][0]["file_name"] == "flickr30k-images/1000092995.jpg" and len(gt["annotations"]) == 15


def test_reproduce_sh_rejects_unknown_datasets_and_rows():
    run = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "imagenet"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown dataset 'imagenet'" in run.stderr
    run = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "flickr30k"], capture_output=True,
                         text=True, env={**os.environ, "ROWS": "smile nope"})
    assert run.returncode == 2 and "no row 'nope' for flickr30k" in run.stderr


@pytest.mark.slow
def test_reproduce_sh_trains_a_row_on_miniature_coco_and_writes_the_table(tmp_path, capsys):
    images, source = build_coco(tmp_path)
    root = tmp_path / "coco"
    assert _prepare(capsys, "coco", "--root", root, "--annotations-from", source, "--image-root", images,
                    "--no-expect-counts")[0] == 0
    vocab = write_vocab(tmp_path / "vocab.txt")
    ann = root / "annotations"
    overrides = [
        "model.arch=tiny", "model.image_size=32", "model.pretrained=null", f"model.tokenizer={vocab}",
        f"data.image_root={images}", f"data.train_files=[{ann / 'coco_karpathy_train.json'}]",
        f"data.val_file={ann / 'coco_karpathy_val.json'}", f"data.val_gt={ann / 'coco_karpathy_val_gt_with_files.json'}",
        f"data.test_file={ann / 'coco_karpathy_test.json'}",
        f"data.test_gt={ann / 'coco_karpathy_test_gt_with_files.json'}",
        "data.num_workers=0", "train.epochs=1", "train.batch_size=4", "train.lr=1e-3", "eval.batch_size=4",
        "eval.max_length=10", "device=cpu",
        "train.validate=false",  # saves a METEOR run (Java start-up); validation has its own tests
    ]
    env = {**os.environ, "ROWS": "smile", "RUNS_DIR": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "coco.md"),
           "METRICS": "coco,length,diversity", "CHECK_DATA": "0", "NPROC": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "coco", *overrides], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    run_dir = tmp_path / "runs" / "smile"
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["num_missing"] == 0
    assert set(metrics) >= {"Bleu_4", "CIDEr", "cap_len", "distinct_1"}
    config = (run_dir / "config.yaml").read_text()
    assert "objective: smile" in config and "coco_karpathy_test_gt_with_files.json" in config
    table = (tmp_path / "coco.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| SMILE |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{metrics['cap_len']:.1f}" and cells[-1] == f"{100 * metrics['CIDEr']:.1f}"
    assert cells[3:7] == ["-"] * 4  # R@1, R@5, CLIPScore and PPL were not requested
    assert "| blip_smile_base.pth (SMILE) | 22.3 | 4.5 | 10.0 | 24.5 | 75.0 | 95.6 |" in table
    assert f"| SMILE | configs/coco/smile.yaml | {run_dir} |" in table
    assert "Test images scored per row: 3." in table


def _fake_python(tmp_path) -> Path:
    """A PYTHON for scripts/reproduce.sh that records each training run's arguments and writes a test_metrics.json
    into its output_dir instead of training; everything else (config resolution, make_table.py) runs for real."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == train_caption.py ]]; then
  echo "$*" >> {calls}
  out=$(printf '%s\\n' "$@" | sed -n 's/^output_dir=//p' | tail -1)
  mkdir -p "$out"
  echo '{{"num_images": 4, "cap_len": 3.0, "CIDEr": 1.0}}' > "$out/test_metrics.json"
  exit 0
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("runs_dir", [True, False])
def test_reproduce_sh_starts_each_seed_where_its_row_says(tmp_path, runs_dir):
    """Seed rows that start from another row (vlm_smile_from_mle from vlm_mle) take that row's run of the same seed
    (under RUNS_DIR when set); the toy VLM rows are never pointed at the toy BLIP; the toy BLIP rows get each seed's
    own; the tables go into the SECTION of RESULTS, the rest of the file kept. Runs in a copy of scripts/ and
    configs/, so that the rows' own output folders (without RUNS_DIR) are not the repository's."""
    import shutil

    tree = tmp_path / "tree"
    for part in ("scripts", "configs"):
        shutil.copytree(REPO / part, tree / part)
    fake = _fake_python(tmp_path)
    results = tmp_path / "toy.md"
    results.write_text("# Toy\n\nkeep me\n\n## VLM\n\nold\n\n## Later\n\nkeep me too\n")
    rows = "mle vlm_mle vlm_smile_from_mle"
    runs = tmp_path / "runs" if runs_dir else Path("runs/toy")
    env = {**os.environ, "PYTHON": str(fake), "ROWS": rows, "SEED_ROWS": rows, "SEEDS": "42 1", "NPROC": "1",
           "RESULTS": str(results), "SECTION": "VLM", "PYTHONPATH": str(REPO),
           **({"RUNS_DIR": str(runs)} if runs_dir else {})}
    run = subprocess.run(["bash", str(tree / "scripts" / "reproduce.sh"), "toy"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    calls = [line.split() for line in (tmp_path / "calls.txt").read_text().splitlines()]

    def start(row, seed):
        [call] = [c for c in calls if f"configs/toy/{row}.yaml" in c and f"seed={seed}" in c]
        return [arg.split("=", 1)[1] for arg in call if arg.startswith("model.pretrained=")]

    assert start("mle", 42) == ["cache/toy_pretrain/checkpoint_best.safetensors"]
    assert start("mle", 1) == ["cache/toy_pretrain_seed1/checkpoint_best.safetensors"]
    assert start("vlm_mle", 42) == [] and start("vlm_mle", 1) == []  # the toy VLM, as the config says
    # Seed 42 runs in the row's own folder: without RUNS_DIR that is where the config already looks.
    assert start("vlm_smile_from_mle", 42) == ([f"{runs}/vlm_mle/checkpoint_best.safetensors"] if runs_dir else [])
    assert start("vlm_smile_from_mle", 1) == [f"{runs}/vlm_mle_seed1/checkpoint_best.safetensors"]
    text = results.read_text()
    assert text.startswith("# Toy\n\nkeep me\n\n## VLM\n") and text.endswith("## Later\n\nkeep me too\n")
    assert "old" not in text and "Toy VLM (LLaVA) MLE, then SMILE, mean of seeds 42,1" in text
    assert "Each seed of mle fine-tuned its own pre-trained toy BLIP." in text
    assert "The seeds of vlm_mle vlm_smile_from_mle share their starting model" in text
