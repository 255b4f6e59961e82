"""A SIGKILLed toy run, resumed, ends with exactly the parameters of a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoints import LATEST
from data import ensure_toy_dataset
from models.checkpoint import load_checkpoint_file

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path, output_dir, train_file, *extra, kill_at=None):
    overrides = [
        f"data.toy_root={tmp_path / 'toy'}", f"output_dir={output_dir}", f"data.train_files=[{train_file}]",
        "data.num_workers=0", "train.batch_size=8", "train.epochs=3", "train.log_every=1",
        "train.checkpoint_every=2", "train.validate=false", "train.test_after_training=false",
        "data.augment=true", "resume=false", *extra,
    ]
    command = [sys.executable, str(REPO / "tests" / "resume_worker.py"),
               "--config", str(REPO / "configs" / "toy" / "pretrain.yaml")]
    for override in overrides:
        command += ["--opt", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": str(kill_at or 0)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    paths = ensure_toy_dataset(tmp_path / "toy")
    # 64 captions -> 8 steps per epoch, 24 in all: small enough to run three times.
    entries = json.loads(Path(paths["train_file"]).read_text())[:64]
    train_file = tmp_path / "train_subset.json"
    train_file.write_text(json.dumps(entries))

    reference = _run(tmp_path, tmp_path / "reference", train_file)
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted_dir = tmp_path / "interrupted"
    killed = _run(tmp_path, interrupted_dir, train_file, kill_at=11)  # epoch 1, batch 3; last checkpoint: step 10
    assert killed.returncode == -signal.SIGKILL
    assert not (interrupted_dir / "summary.json").exists()
    _, _, metadata = load_checkpoint_file(interrupted_dir / LATEST)
    assert metadata["progress"]["global_step"] == 10 and metadata["progress"]["epoch"] == 1

    refused = _run(tmp_path, interrupted_dir, train_file)  # neither --resume nor --overwrite
    assert refused.returncode != 0 and "already holds a run" in refused.stderr

    resumed = _run(tmp_path, interrupted_dir, train_file, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr

    expected, _, expected_meta = load_checkpoint_file(tmp_path / "reference" / LATEST)
    got, _, got_meta = load_checkpoint_file(interrupted_dir / LATEST)
    assert got_meta["progress"]["global_step"] == expected_meta["progress"]["global_step"] == 24
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert different == []
    # The log of the resumed run repeats step 11 exactly as the reference logged it.
    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if r["kind"] == "train"}
    assert losses(interrupted_dir)[11] == losses(tmp_path / "reference")[11]
