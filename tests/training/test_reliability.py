"""Bad input and failures: each case gives its documented behaviour, and nothing already computed is lost."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training
import eval_caption
import models
import train_caption
import utils
from training.checkpoints import LATEST, RunExistsError
from data import AnnotationError, CaptionEvalDataset, ImageLoadError, build_coco_gt, ensure_toy_dataset
from imaging import open_rgb, to_rgb
from models.checkpoint import load_checkpoint_file, looks_like_hub_id, read_state_dict, save_checkpoint_file

REPO = Path(__file__).resolve().parents[2]
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
    with pytest.raises(training.NonFiniteLossError, match=r"step 3 .*image ids of the batch: \[\d+(, \d+){7}\]"):
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
                 "train.validate=false", "train.test_after_training=false", "dist_timeout_minutes=1.0"]
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


# Bad inputs a new user gives ---------------------------------------------------------------------------------


def test_empty_training_set_or_less_than_one_batch_is_refused_before_anything_is_written(toy, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    few = tmp_path / "few.json"
    few.write_text(json.dumps(json.loads(Path(toy["train_file"]).read_text())[:5]))
    for train_file, count in ((empty, 0), (few, 5)):
        run = tmp_path / f"run_{count}"
        with pytest.raises(utils.ConfigError, match=rf"{train_file.name}.*hold {count} training caption\(s\), fewer "
                                                    r"than one global batch \(train.batch_size 8 x 1"):
            train_caption.main(["--config", PRETRAIN, *_opts(toy, run, f"data.train_files=[{train_file}]")])
        assert not (run / LATEST).exists() and not (run / "summary.json").exists()


def test_evaluating_into_a_training_run_writes_only_eval_files(toy, tmp_path):
    run = tmp_path / "run"
    train_caption.main(["--config", PRETRAIN, *_opts(toy, run, "train.max_steps=1", "resume=false")])
    train_log = (run / "train.log").read_text()
    before = {path.name for path in run.iterdir()}
    eval_caption.main(["--config", PRETRAIN, *_opts(toy, run, "eval.metrics=[length]"),
                       "--checkpoint", str(run / "checkpoint_best.safetensors"), "--split", "val"])
    assert (run / "train.log").read_text() == train_log
    added = {path.name for path in run.iterdir()} - before
    assert added and all(name.startswith("eval_") for name in added), added
    assert "eval_val.log" in added


def test_truncated_safetensors_checkpoint_names_the_file(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({"text_decoder.bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, str(plain))
    truncated = tmp_path / "run" / "checkpoint_best.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes(plain.read_bytes()[:40])
    with pytest.raises(models.CheckpointError, match=rf"cannot read checkpoint {truncated}"):
        read_state_dict(truncated)
    assert set(read_state_dict(plain)) == {"text_decoder.bert.embeddings.word_embeddings.weight"}


def test_missing_local_checkpoint_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for source in ("runs/missing_best.safetensors", "runs/missing.pth", "./runs/model"):
        with pytest.raises(models.CheckpointError, match=rf"checkpoint '{source}' not found: no such file"):
            read_state_dict(source)
    assert looks_like_hub_id("Salesforce/blip-image-captioning-base")
    assert looks_like_hub_id("someone/blip-v1.5")
    assert not looks_like_hub_id("runs/missing_best.safetensors") and not looks_like_hub_id("runs")


def test_disk_full_while_writing_a_checkpoint_names_file_and_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    path = tmp_path / "run" / LATEST
    save_checkpoint_file(path, {"w": torch.ones(2)}, metadata={"step": 1})
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(models.CheckpointError, match=rf"could not write checkpoint {path} \(in {path.parent}\): .*"
                                                     "No space left on device"):
        save_checkpoint_file(path, {"w": torch.zeros(2)}, metadata={"step": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [LATEST]  # no temp file left behind


def _sixteen_bit_grey(path: Path) -> Path:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    return path


def test_sixteen_bit_greyscale_png_is_rescaled_not_clipped(tmp_path):
    path = _sixteen_bit_grey(tmp_path / "grey16.png")
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        assert np.asarray(image.convert("RGB")).mean() > 250  # what PIL alone gives: almost white
    rgb = np.asarray(open_rgb(path), dtype=np.float64)
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 127.5) < 0.6
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    # Every reader of the project goes through it: datasets, the Python API, CLIP metrics.
    dataset_image = CaptionEvalDataset.__new__(CaptionEvalDataset)._load_image(path)
    assert np.array_equal(np.asarray(dataset_image), rgb.astype(np.uint8))
    assert np.array_equal(np.asarray(models.Captioner.load_image(path)), rgb.astype(np.uint8))
    assert (np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 1.0, np.float32), mode="F"))) == 255).all()


def test_exif_orientation_applies_to_user_images_but_not_to_the_datasets(tmp_path):
    # Stored 40 wide x 20 high, tagged "rotate 90 CW to display" (orientation 6): shown 20 wide x 40 high.
    stored = Image.new("RGB", (40, 20), "red")
    stored.paste(Image.new("RGB", (20, 20), "blue"), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    assert models.Captioner.load_image(path).size == (20, 40)
    assert open_rgb(path, exif_transpose=True).size == (20, 40)
    assert CaptionEvalDataset.__new__(CaptionEvalDataset)._load_image(path).size == (40, 20)  # as BLIP reads it


def test_failed_test_scoring_keeps_the_run_and_the_same_command_only_scores(toy, tmp_path, monkeypatch):
    """The test split's scoring raises after training has finished. The checkpoints stay, and running
    the same command again (resume: auto) scores the test split without a training step."""
    run = tmp_path / "run"
    options = ["--config", PRETRAIN, *_opts(toy, run, "train.test_after_training=true", "eval.metrics=[length]",
                                            "resume=auto")]
    score_test = training.evaluate_split

    def crash(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) exited unexpectedly with exit code 1")

    monkeypatch.setattr(training.trainer, "evaluate_split", crash)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        train_caption.main(options)
    assert "running the same command again (resume: auto, or --resume) scores it" in (run / "train.log").read_text()
    assert (run / LATEST).exists() and (run / "checkpoint_best.safetensors").exists()
    assert not (run / "summary.json").exists() and not (run / "test_metrics.json").exists()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in records if r["kind"] == "train"]
    assert trained and not [r for r in records if r["kind"] == "test"]

    monkeypatch.setattr(training.trainer, "evaluate_split", score_test)
    monkeypatch.setattr(training.trainer, "train_one_epoch", lambda *a, **k: pytest.fail("the finished run trained again"))
    summary = train_caption.main(options)
    assert summary["steps"] == max(trained) and summary["test"]["num_images"] == 6
    assert json.loads((run / "test_metrics.json").read_text()) == summary["test"]
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == trained  # no training step was logged again
    assert [r["kind"] for r in records if r["kind"] == "test"] == ["test"]
