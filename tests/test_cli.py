"""The entry points' error contract: the project's own user-facing errors are one line on stderr with exit status 2
and no traceback; anything unexpected keeps its traceback; SMILE_TRACEBACK=1 shows it for all. And resume
semantics that fit job schedulers (``--resume`` refused with a hint, ``resume: auto`` starting fresh)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import engine
import train_caption
import utils
from checkpointing import LATEST
from data import ensure_toy_dataset

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "toy" / "pretrain.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_toy")
    paths = ensure_toy_dataset(root / "toy")
    train_file = root / "train_8.json"  # 8 captions: 2 steps per epoch at batch 4
    train_file.write_text(json.dumps(json.loads(Path(paths["train_file"]).read_text())[:8]))
    return {"root": root / "toy", "paths": paths, "train_file": str(train_file)}


def _tiny_config(toy, tmp_path: Path, output_dir: Path, name: str | None = None, **overrides) -> Path:
    """A toy config that trains a tiny BLIP for 2 steps on 8 images (a few seconds on CPU)."""
    config = {
        "base": str(PRETRAIN), "output_dir": str(output_dir), "resume": False,
        "model": {"arch": "tiny", "image_size": 32},
        "data": {"toy_root": str(toy["root"]), "num_workers": 0, "augment": False, "train_files": [toy["train_file"]]},
        "train": {"epochs": 1, "batch_size": 4, "log_every": 1, "checkpoint_every": 0,
                  "validate": False, "test_after_training": False},
        "eval": {"max_images": 4, "metrics": ["length"]},
    }
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    path = tmp_path / f"{name or output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop(utils.TRACEBACK_ENV, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _assert_clean(completed: subprocess.CompletedProcess, *fragments: str) -> str:
    assert completed.returncode == utils.USER_ERROR_STATUS, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    errors = [line for line in completed.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, completed.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# In-process: the wrapper itself ---------------------------------------------------------------------------------


def test_run_cli_prints_one_line_and_returns_2_for_user_errors(capsys, monkeypatch):
    monkeypatch.delenv(utils.TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def main(argv):
        raise utils.ConfigError("config x.yaml: unknown key 'train.epochz';\n valid keys: ['epochs']")

    assert utils.run_cli(main, engine.USER_ERRORS, prog="train_caption.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("train_caption.py: error: config x.yaml: unknown key 'train.epochz'; valid keys")
    assert "SMILE_TRACEBACK=1" in err


def test_run_cli_keeps_the_traceback_for_unexpected_errors_and_on_request(monkeypatch):
    monkeypatch.delenv(utils.TRACEBACK_ENV, raising=False)

    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        utils.run_cli(broken, engine.USER_ERRORS)

    def user_error(argv):
        raise utils.ConfigError("bad value")

    monkeypatch.setenv(utils.TRACEBACK_ENV, "1")
    with pytest.raises(utils.ConfigError, match="bad value"):
        utils.run_cli(user_error, engine.USER_ERRORS)


def test_run_cli_under_torchrun_only_rank_0_prints_but_every_rank_exits_2(capsys, monkeypatch):
    monkeypatch.delenv(utils.TRACEBACK_ENV, raising=False)

    def user_error(argv):
        raise utils.ConfigError("bad value")

    monkeypatch.setenv("RANK", "1")
    assert utils.run_cli(user_error, engine.USER_ERRORS) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert utils.run_cli(user_error, engine.USER_ERRORS) == 2
    assert "error: bad value" in capsys.readouterr().err


# Real processes: every kind of user-facing error ---------------------------------------------------------------


@pytest.mark.slow
def test_train_caption_user_errors_are_one_clean_line(toy, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"base: {PRETRAIN}\ntrain:\n  epochz: 3\n")
    _assert_clean(_run("train_caption.py", "--config", str(typo)), "unknown config key 'train.epochz'")

    config = _tiny_config(toy, tmp_path, tmp_path / "never_started")
    line = _assert_clean(_run("train_caption.py", "--config", str(config), "--resume"),
                         f"--resume: no {LATEST} in", "resume: auto")
    assert "never_started" in line

    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "images/toy_000000.png", "caption": "a red')
    annotations = _tiny_config(toy, tmp_path, tmp_path / "bad_annotations", **{"data.train_files": [str(broken)]})
    _assert_clean(_run("train_caption.py", "--config", str(annotations)), "broken.json")

    missing = _tiny_config(toy, tmp_path, tmp_path / "missing_ckpt",
                           **{"model.pretrained": "runs/missing_best.safetensors"})
    _assert_clean(_run("train_caption.py", "--config", str(missing)), "'runs/missing_best.safetensors' not found")


@pytest.mark.slow
def test_existing_run_and_eval_checkpoint_errors_are_one_clean_line(toy, tmp_path):
    run = tmp_path / "run"
    config = _tiny_config(toy, tmp_path, run)
    train_caption.main(["--config", str(config)])
    _assert_clean(_run("train_caption.py", "--config", str(config)), "already holds a run", "--resume")

    truncated = tmp_path / "truncated_best.safetensors"
    truncated.write_bytes((run / "checkpoint_best.safetensors").read_bytes()[:100])
    eval_dir = _tiny_config(toy, tmp_path, tmp_path / "eval_out")
    _assert_clean(_run("eval_caption.py", "--config", str(eval_dir), "--checkpoint", str(truncated)),
                  f"cannot read checkpoint {truncated}")
    shown = _run("eval_caption.py", "--config", str(eval_dir), "--checkpoint", str(truncated),
                 env_extra={utils.TRACEBACK_ENV: "1"})
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "CheckpointError" in shown.stderr


@pytest.mark.slow
def test_an_unreadable_evaluation_image_is_one_clean_line(toy, tmp_path):
    val = json.loads(Path(toy["paths"]["val_file"]).read_text())[:3]
    val.append({"image": "images/missing_000999.png", "caption": ["a red circle"]})
    val_file = tmp_path / "val_missing.json"
    val_file.write_text(json.dumps(val))
    config = _tiny_config(toy, tmp_path, tmp_path / "eval_missing",
                          **{"data.val_file": str(val_file), "data.val_gt": None, "eval.max_images": None})
    _assert_clean(_run("eval_caption.py", "--config", str(config), "--split", "val"), "missing_000999.png")


@pytest.mark.slow
def test_results_file_errors_are_one_clean_line(toy, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 123456, "caption": "a red circle"}]))
    gt = toy["paths"]["val_gt"]
    _assert_clean(_run("eval_caption.py", "--results", str(results), "--annotations", str(gt), "--metrics", "length"),
                  "results.json", "123456")
    _assert_clean(_run("eval_caption.py", "--results", str(tmp_path / "absent.json"), "--annotations", str(gt)),
                  "absent.json")


# Resume semantics for job schedulers ---------------------------------------------------------------------------


def test_resume_auto_starts_fresh_when_the_job_died_before_its_first_checkpoint(toy, tmp_path):
    run = tmp_path / "died_early"
    run.mkdir()
    # What a job preempted before its first checkpoint leaves behind.
    (run / "config.yaml").write_text("output_dir: died_early\n")
    (run / "train.log").write_text("2026-12-01 INFO starting\n")
    config = _tiny_config(toy, tmp_path, run, resume="auto")
    summary = train_caption.main(["--config", str(config)])
    assert summary["steps"] == 2 and (run / LATEST).exists()
    # Resubmitted with the same command once finished: it continues (re-scores), never refuses or restarts.
    again = train_caption.main(["--config", str(config)])
    assert again["steps"] == 2


def test_interrupted_recipe_run_continues_on_the_next_launch(toy, tmp_path):
    """model.pretrained_recipe (the toy "pre-trained" BLIP): a recipe run that died, before or after its first
    checkpoint, is continued by the next fine-tuning launch instead of refusing its own folder."""
    recipe_dir = tmp_path / "recipe_run"
    recipe = _tiny_config(toy, tmp_path, recipe_dir, resume=False, **{"train.epochs": 2})
    # The recipe died after epoch 0's checkpoint_latest: latest exists, best (what fine-tuning loads) does not.
    partial = _tiny_config(toy, tmp_path, recipe_dir, name="partial", resume=False, **{"train.epochs": 1})
    train_caption.main(["--config", str(partial)])
    (recipe_dir / "checkpoint_best.safetensors").unlink()
    (recipe_dir / "summary.json").unlink()
    assert (recipe_dir / LATEST).exists()

    finetune = _tiny_config(toy, tmp_path, tmp_path / "finetune", **{
        "model.pretrained": str(recipe_dir / "checkpoint_best.safetensors"), "model.pretrained_recipe": str(recipe)})
    train_caption.main(["--config", str(finetune)])
    records = [json.loads(line) for line in (recipe_dir / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the interrupted run, 3-4 after resuming: nothing redone
    assert (recipe_dir / "checkpoint_best.safetensors").exists()
    assert (tmp_path / "finetune" / LATEST).exists()
