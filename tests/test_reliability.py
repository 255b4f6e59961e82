"""Bad input and failures: each case gives its documented behaviour, and nothing already computed is lost."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import engine
import eval_caption
import models
import train_caption
from checkpointing import LATEST, RunExistsError
from data import AnnotationError, ImageLoadError, build_coco_gt, ensure_toy_dataset
from models.checkpoint import load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "configs" / "toy" / "pretrain.yaml")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    paths = ensure_toy_dataset(root / "toy")
    # A small training file, plus one JPEG that is cut off half-way and one image that does not exist.
    truncated = Path(paths["image_root"]) / "images" / "truncated_000900.jpg"
    Image.new("RGB", (64, 64), "red").save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    entries = json.loads(Path(paths["train_file"]).read_text())[:30]
    entries += [{"image": "images/truncated_000900.jpg", "caption": "a red square", "image_id": "toy_900"},
                {"image": "images/missing_000901.png", "caption": "a red circle", "image_id": "toy_901"}]
    train_file = root / "train_with_bad_images.json"
    train_file.write_text(json.dumps(entries))
    val = json.loads(Path(paths["val_file"]).read_text())[:6]
    val_bad = root / "val_with_bad_image.json"
    val_bad.write_text(json.dumps(val + [{"image": "images/truncated_000900.jpg", "caption": ["a red square"]}]))
    val_bad_gt = root / "val_with_bad_image_gt.json"
    val_bad_gt.write_text(json.dumps(build_coco_gt(val_bad)))
    return {"root": root, "paths": paths, "train_file": train_file, "val_bad": val_bad, "val_bad_gt": val_bad_gt}


def _opts(toy, output_dir, *extra):
    overrides = [f"data.toy_root={toy['root'] / 'toy'}", f"output_dir={output_dir}", "data.num_workers=0",
                 f"data.train_files=[{toy['train_file']}]", "train.batch_size=8", "train.epochs=1",
                 "train.log_every=1", "train.checkpoint_every=2", "train.validate=false",
                 "train.test_after_training=false", "eval.max_images=6", *extra]
    return [item for override in overrides for item in ("--opt", override)]


def test_bad_training_images_are_skipped_and_counted(toy, tmp_path):
    # 32 samples, 2 unreadable; the sampler's order decides how many of them fall in the 4 batches of 8.
    summary = train_caption.main(["--config", PRETRAIN, *_opts(toy, tmp_path / "run")])
    assert summary["skipped_images"] == 2
    epoch = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"epoch"' in line][-1]
    assert epoch["kind"] == "epoch" and epoch["skipped_images"] == 2


def test_bad_training_images_fail_with_their_path_when_asked(toy, tmp_path):
    with pytest.raises(ImageLoadError, match=r"(truncated_000900\.jpg|missing_000901\.png)"):
        train_caption.main(["--config", PRETRAIN, *_opts(toy, tmp_path / "run", "data.train_bad_images=fail")])


def test_bad_eval_image_fails_naming_it_and_can_be_skipped(toy, tmp_path):
    options = _opts(toy, tmp_path / "eval", f"data.val_file={toy['val_bad']}", f"data.val_gt={toy['val_bad_gt']}",
                    "eval.max_images=null", "eval.metrics=[length]")
    with pytest.raises(ImageLoadError, match=r"truncated_000900\.jpg"):
        eval_caption.main(["--config", PRETRAIN, *options, "--split", "val"])
    metrics = eval_caption.main(["--config", PRETRAIN, *options, "--split", "val",
                                 "--opt", "data.eval_bad_images=skip"])
    assert metrics["num_images"] == 6 and metrics["num_missing"] == 1


def test_bad_annotation_json_names_the_file(toy, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "images/toy_000000.png", "caption": "a red')
    with pytest.raises(AnnotationError, match="broken.json"):
        train_caption.main(["--config", PRETRAIN, *_opts(toy, tmp_path / "run", f"data.train_files=[{broken}]")])
    missing_key = tmp_path / "missing_key.json"
    missing_key.write_text(json.dumps([{"image": "images/toy_000000.png"}]))
    with pytest.raises(AnnotationError, match=r"missing_key.json.*caption"):
        train_caption.main(["--config", PRETRAIN, *_opts(toy, tmp_path / "run", f"data.train_files=[{missing_key}]")])


def _inject_nan_at_call(monkeypatch, call):
    calls = {"n": 0}
    original = models.CaptionObjective.__call__

    def sometimes_nan(self, logits, targets):
        calls["n"] += 1
        total, parts = original(self, logits, targets)
        return (total * float("nan") if calls["n"] == call else total), parts

    monkeypatch.setattr(models.CaptionObjective, "__call__", sometimes_nan)


def test_nonfinite_loss_stops_naming_step_and_images_and_keeps_last_checkpoint(toy, tmp_path, monkeypatch):
    _inject_nan_at_call(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(engine.NonFiniteLossError, match=r"step 3 .*image ids of the batch: \[\d+(, \d+){7}\]"):
        train_caption.main(["--config", PRETRAIN, *_opts(toy, run, "data.train_bad_images=skip")])
    _, _, metadata = load_checkpoint_file(run / LATEST)
    assert metadata["progress"]["global_step"] == 2  # the last good state, from before the bad step
    weights, _, _ = load_checkpoint_file(run / LATEST)
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_nonfinite_loss_can_be_skipped_and_counted(toy, tmp_path, monkeypatch):
    _inject_nan_at_call(monkeypatch, 2)
    summary = train_caption.main(["--config", PRETRAIN, *_opts(toy, tmp_path / "run", "train.on_nonfinite=skip")])
    assert summary["skipped_steps"] == 1
    weights, _, _ = load_checkpoint_file(tmp_path / "run" / LATEST)
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_finished_run_is_not_overwritten_without_a_flag(toy, tmp_path):
    run = tmp_path / "run"
    options = _opts(toy, run, "train.max_steps=1", "resume=false")  # the toy configs default to resume: auto
    train_caption.main(["--config", PRETRAIN, *options])
    before = (run / "summary.json").read_text()
    with pytest.raises(RunExistsError, match=r"already holds a run .*--resume.*--overwrite"):
        train_caption.main(["--config", PRETRAIN, *options])
    assert (run / "summary.json").read_text() == before
    train_caption.main(["--config", PRETRAIN, *options, "--overwrite"])
    with pytest.raises(RunExistsError, match="no checkpoint_latest"):
        train_caption.main(["--config", PRETRAIN, *_opts(toy, tmp_path / "empty", "resume=false"), "--resume"])


@pytest.mark.slow
def test_failure_on_one_rank_ends_all_ranks_promptly(toy, tmp_path):
    overrides = [f"data.toy_root={toy['root'] / 'toy'}", f"output_dir={tmp_path / 'ddp'}", "data.num_workers=0",
                 f"data.train_files=[{toy['train_file']}]", "train.batch_size=4", "train.epochs=1",
                 "train.validate=false", "train.test_after_training=false", "train.dist_timeout_minutes=1.0"]
    env = {**os.environ, "NPROC": "2", "ENTRY": "tests/distributed_worker.py", "REPORT": str(tmp_path / "r.json"),
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "FAIL_RANK": "1", "FAIL_STEP": "2"}
    start = time.monotonic()
    completed = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), PRETRAIN, *overrides], env=env,
                               capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert completed.returncode != 0
    assert "injected failure on rank 1 at step 2" in completed.stdout + completed.stderr
    assert elapsed < 120, elapsed  # torchrun tears the surviving rank down; nobody waits for the 1-minute timeout
    assert not (tmp_path / "r.json").exists()
