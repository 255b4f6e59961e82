"""The toy flow end to end, in-process on CPU: train from scratch, validate, checkpoint, re-evaluate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval_caption
import train_caption
from models.checkpoint import load_checkpoint_file

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "configs" / "toy" / "pretrain.yaml")


def _toy_overrides(tmp_path, output_dir):
    return ["--opt", f"data.toy_root={tmp_path / 'toy'}", "--opt", f"output_dir={output_dir}",
            "--opt", "data.num_workers=0"]


def _log(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_toy_training_learns_and_eval_reproduces_validation(tmp_path):
    run = tmp_path / "run"
    common = _toy_overrides(tmp_path, run)
    # Captions from the randomly initialised model, scored the same way.
    initial = eval_caption.main(["--config", PRETRAIN, *common, "--split", "val", "--opt", "eval.metrics=[coco]",
                                 "--opt", f"output_dir={tmp_path / 'init'}"])

    summary = train_caption.main(["--config", PRETRAIN, *common, "--opt", "train.epochs=2",
                                  "--opt", "train.log_every=10", "--opt", "train.validate=true"])
    records = _log(run / "log.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.7 * losses[0], losses
    best = summary["best_val"]
    assert best["CIDEr"] > initial["CIDEr"] + 0.5, (initial["CIDEr"], best["CIDEr"])
    for name in ("checkpoint_best.safetensors", "checkpoint_latest.safetensors", "config.yaml", "val_epoch1_results.json"):
        assert (run / name).exists(), name
    _, tensors, metadata = load_checkpoint_file(run / "checkpoint_latest.safetensors")
    assert metadata["progress"]["epoch"] == 2 and metadata["progress"]["batches_done"] == 0
    assert metadata["config"]["objective"] == "mle" and any(key.startswith("optimizer/") for key in tensors)

    # eval_caption.py on the best checkpoint gives the validation numbers that selected it.
    reproduced = eval_caption.main(["--config", PRETRAIN, *common, "--split", "val", "--opt", "eval.metrics=[coco]",
                                    "--checkpoint", str(run / "checkpoint_best.safetensors"),
                                    "--opt", f"output_dir={tmp_path / 'reeval'}"])
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert reproduced[key] == pytest.approx(best[key], abs=1e-9), key
    results = json.load(open(tmp_path / "reeval" / "eval_val_results.json"))
    assert len(results) == 100 and len({r["image_id"] for r in results}) == 100


def _torchrun_train(tmp_path, nproc, batch_size, name, extra=()):
    output_dir = tmp_path / name
    report = tmp_path / f"{name}.json"
    overrides = [
        f"data.toy_root={tmp_path / 'toy'}", f"output_dir={output_dir}", "data.num_workers=0",
        f"train.batch_size={batch_size}", "train.max_steps=3", "train.epochs=1", "train.log_every=1",
        "train.test_after_training=false", "train.validate=true", "data.augment=false", "eval.max_images=25",
        "train.lr=1e-3",
        "model.arch={preset: tiny, text_dropout: 0.0}", *extra,
    ]
    env = {**os.environ, "NPROC": str(nproc), "ENTRY": "tests/distributed_worker.py", "REPORT": str(report),
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    completed = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), PRETRAIN, *overrides],
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(report.read_text()), output_dir


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    two, two_dir = _torchrun_train(tmp_path, nproc=2, batch_size=4, name="ddp2")
    one, one_dir = _torchrun_train(tmp_path, nproc=1, batch_size=8, name="ddp1")
    assert two["world_size"] == 2 and one["world_size"] == 1
    # DDP keeps the ranks' parameters identical.
    assert two["checksums"][0] == two["checksums"][1]
    # Every val image exactly once, although 25 images do not split evenly over 2 ranks.
    gt = json.load(open(tmp_path / "toy" / "toy_val_gt.json"))
    wanted = sorted(image["id"] for image in gt["images"])[:25]
    results = json.load(open(two_dir / "val_epoch0_results.json"))
    assert sorted(r["image_id"] for r in results) == wanted
    # Same global batch (8) => same losses: the token-share scaling makes DDP equal one big batch.
    losses_two = [r["loss"] for r in _log(two_dir / "log.jsonl") if r["kind"] == "train"]
    losses_one = [r["loss"] for r in _log(one_dir / "log.jsonl") if r["kind"] == "train"]
    assert len(losses_two) == len(losses_one) == 3
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert two["checksums"][0] == pytest.approx(one["checksums"][0], rel=1e-4)
    # Gradient accumulation under DDP (no_sync, then one all-reduce): 2 ranks x micro-batches of 3 + 1.
    micro, _ = _torchrun_train(tmp_path, nproc=2, batch_size=4, name="ddp2_micro", extra=["train.micro_batch_size=3"])
    assert micro["checksums"][0] == micro["checksums"][1]
    losses_micro = [r["loss"] for r in _log(tmp_path / "ddp2_micro" / "log.jsonl") if r["kind"] == "train"]
    assert losses_micro == pytest.approx(losses_one, rel=1e-4)
    assert micro["checksums"][0] == pytest.approx(one["checksums"][0], rel=1e-4)


@pytest.mark.slow
def test_two_process_scst_mixed_with_smile_keeps_the_ranks_in_sync(tmp_path):
    """SCST under DDP: every rank samples its own images, the gradients are all-reduced (the ranks' parameters
    stay identical) and the logged statistics are global."""
    report, output_dir = _torchrun_train(tmp_path, nproc=2, batch_size=4, name="scst_ddp", extra=(
        "objective={scst: {samples: 2, max_tokens: 6, reward: cider_d}, smile: 0.1}", "data.train_per_image=true",
        f"model.cache_dir={tmp_path / 'model_cache'}", "train.validate=false"))
    assert report["world_size"] == 2 and report["checksums"][0] == report["checksums"][1]
    records = [r for r in _log(output_dir / "log.jsonl") if r["kind"] == "train"]
    assert len(records) == 3
    assert all({"loss_scst", "loss_smile", "reward", "greedy_reward", "advantage", "reward_cider_d"} <= set(r)
               for r in records)


def test_pretraining_recipe_trains_into_the_named_folder_with_the_runs_seed(tmp_path, monkeypatch):
    """scripts/reproduce.sh runs each seed from its own toy pre-trained model: `seed=1
    model.pretrained=<dir>/checkpoint_best.safetensors` trains the recipe with seed 1 into <dir>."""
    import training

    trained = []

    def fake_run_training(config):
        trained.append(config)
        Path(config["output_dir"], "checkpoint_best.safetensors").parent.mkdir(parents=True)
        Path(config["output_dir"], "checkpoint_best.safetensors").write_bytes(b"")

    monkeypatch.setattr(training.trainer, "run_training", fake_run_training)
    target = tmp_path / "toy_pretrain_seed1" / "checkpoint_best.safetensors"
    config = training.load_config(REPO / "configs" / "toy" / "mle.yaml",
                                ["seed=1", f"model.pretrained={target}", f"model.pretrained_recipe={PRETRAIN}"])
    training.ensure_pretrained(config)
    assert len(trained) == 1 and trained[0]["seed"] == 1
    assert Path(trained[0]["output_dir"]) == target.parent and trained[0]["resume"] == "auto"
    training.ensure_pretrained(config)  # the checkpoint exists now: nothing is trained again
    assert len(trained) == 1
