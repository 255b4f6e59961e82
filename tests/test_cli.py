"""The entry points' error contract: the project's own user-facing errors are one line on stderr with exit status 2
and no traceback; anything unexpected keeps its traceback; SMILE_TRACEBACK=1 shows it for all. And resume
semantics that fit job schedulers (``--resume`` refused with a hint, ``resume: auto`` starting fresh)."""
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import training
import train_caption
import utils
from training.checkpoints import LATEST
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

    assert utils.run_cli(main, training.USER_ERRORS, prog="train_caption.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("train_caption.py: error: config x.yaml: unknown key 'train.epochz'; valid keys")
    assert "SMILE_TRACEBACK=1" in err


def test_run_cli_keeps_the_traceback_for_unexpected_errors_and_on_request(monkeypatch):
    monkeypatch.delenv(utils.TRACEBACK_ENV, raising=False)

    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        utils.run_cli(broken, training.USER_ERRORS)

    def user_error(argv):
        raise utils.ConfigError("bad value")

    monkeypatch.setenv(utils.TRACEBACK_ENV, "1")
    with pytest.raises(utils.ConfigError, match="bad value"):
        utils.run_cli(user_error, training.USER_ERRORS)


def test_run_cli_under_torchrun_only_rank_0_prints_but_every_rank_exits_2(capsys, monkeypatch):
    monkeypatch.delenv(utils.TRACEBACK_ENV, raising=False)

    def user_error(argv):
        raise utils.ConfigError("bad value")

    monkeypatch.setenv("RANK", "1")
    assert utils.run_cli(user_error, training.USER_ERRORS) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert utils.run_cli(user_error, training.USER_ERRORS) == 2
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
    # ... or, killed after logging steps but before any checkpoint, its log too.
    (run / "log.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    config = _tiny_config(toy, tmp_path, run, resume="auto")
    summary = train_caption.main(["--config", str(config)])
    assert summary["steps"] == 2 and (run / LATEST).exists()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) and 9.0 not in [json.loads(line).get("loss") for line in
                                                       (run / "log.jsonl").read_text().splitlines()]
    # Resubmitted with the same command once finished: it continues (re-scores), never refuses or restarts.
    again = train_caption.main(["--config", str(config)])
    assert again["steps"] == 2


def test_a_resume_with_another_config_names_the_keys_that_changed(toy, tmp_path):
    run = tmp_path / "run"

    def warnings():  # setup_logging replaces the logging handlers (caplog's too): the run's train.log has them
        return [line for line in (run / "train.log").read_text().splitlines() if "differs from the checkpoint" in line]

    train_caption.main(["--config", str(_tiny_config(toy, tmp_path, run))])
    switched = _tiny_config(toy, tmp_path, run, name="scst", objective={"scst": {"reward": "cider_d"}},
                            **{"train.lr": 2.0e-5, "model.cache_dir": str(tmp_path / "model_cache")})
    train_caption.main(["--config", str(switched), "--resume"])
    assert len(warnings()) == 1 and "WARNING" in warnings()[0], warnings()
    line = warnings()[0]
    assert "objective: 'mle' -> {'scst': {'reward': 'cider_d'}}" in line
    assert "train.lr: 0.003 -> 2e-05" in line and "model.cache_dir:" in line
    assert "resume:" not in line and "output_dir" not in line  # how the run is launched, not what it trains
    train_caption.main(["--config", str(_tiny_config(toy, tmp_path, run)), "--resume"])  # the same config: no word
    assert len(warnings()) == 1


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


# Early and offline failures: every check that needs no model runs before anything is built, and a hub
# id on a machine that cannot reach the hub fails at once, in one line ------------------------------------------

# The failures themselves take well under a second; the rest is importing torch and transformers, 10-20 s on the
# shared, loaded 2-core CPU. Before, `eval.sh configs/coco/eval_released.yaml` without network took 245 s of hub
# retries, and a fresh `--resume` refusal came after building the toy CLIP and GPT-2 (~10 minutes).
FAST_S = 60


def _unreachable_env(hf_home: Path) -> dict:
    """The network made unreachable: every proxy variable at a closed local port; HF_HUB_OFFLINE unset; an
    empty hub cache."""
    env = {key: value for key, value in os.environ.items()
           if key.upper() not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_PROXY", "HF_HUB_CACHE",
                                  "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", utils.TRACEBACK_ENV}}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    env.update(HTTPS_PROXY=closed, HTTP_PROXY=closed, ALL_PROXY=closed, https_proxy=closed, http_proxy=closed,
               all_proxy=closed, HF_HOME=str(hf_home))
    return env


def _timed(args: list[str], env: dict, umask: int = -1) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    completed = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO,
                               timeout=600, umask=umask)
    return completed, time.monotonic() - started


def _assert_fast_without_retries(completed: subprocess.CompletedProcess, elapsed: float) -> None:
    assert "Retrying" not in completed.stderr, completed.stderr[-3000:]
    assert elapsed < FAST_S, elapsed


@pytest.mark.slow
def test_without_network_a_missing_checkpoint_is_named_before_any_hub_call(tmp_path):
    """`bash scripts/eval.sh configs/coco/eval_released.yaml` without the checkpoint and without network: the
    missing file is the error, not minutes of retries for bert-base-uncased's tokenizer first."""
    missing = tmp_path / "checkpoints" / "blip_smile_base.pth"
    completed, elapsed = _timed(
        ["eval_caption.py", "--config", "configs/coco/eval_released.yaml", "--opt", f"output_dir={tmp_path / 'out'}",
         "--opt", f"model.pretrained={missing}"], _unreachable_env(tmp_path / "hf"))
    _assert_clean(completed, "model.pretrained", f"'{missing}' not found")
    _assert_fast_without_retries(completed, elapsed)


@pytest.mark.slow
def test_without_network_a_hub_id_fails_at_once_in_one_line(toy, tmp_path):
    env = _unreachable_env(tmp_path / "hf")
    config = _tiny_config(toy, tmp_path, tmp_path / "bert", **{"model.tokenizer": "bert-base-uncased"})
    completed, elapsed = _timed(["train_caption.py", "--config", str(config)], env)
    _assert_clean(completed, "model.tokenizer 'bert-base-uncased'", "cannot be reached", "HF_HUB_OFFLINE=1",
                  "local folder")
    _assert_fast_without_retries(completed, elapsed)
    assert not (tmp_path / "bert" / "config.yaml").exists()  # refused before the run started

    # eval_caption.py --results with hub ids: one line and status 2, not a traceback after 30 s.
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1800, "caption": "a red circle"}]))
    completed, elapsed = _timed(
        ["eval_caption.py", "--results", str(results), "--annotations", str(toy["paths"]["val_gt"]),
         "--images-root", str(toy["paths"]["image_root"]), "--clip-model", "openai/clip-vit-base-patch32",
         "--ppl-model", "gpt2"], env)
    _assert_clean(completed, "--clip-model 'openai/clip-vit-base-patch32'", "cannot be reached", "HF_HUB_OFFLINE=1")
    _assert_fast_without_retries(completed, elapsed)

    # HF_HUB_OFFLINE=1 and no cached copy: the same line, saying so.
    completed, elapsed = _timed(
        ["eval_caption.py", "--results", str(results), "--annotations", str(toy["paths"]["val_gt"]),
         "--metrics", "length,ppl", "--ppl-model", "gpt2"], {**env, "HF_HUB_OFFLINE": "1"})
    _assert_clean(completed, "--ppl-model 'gpt2'", "HF_HUB_OFFLINE is set", "local folder")


@pytest.mark.slow
def test_without_network_a_cached_hub_model_loads_from_the_cache(tmp_path):
    """The probe fails at once and BERT's tokenizer comes from the hub cache, with a warning."""
    from test_hub import fake_cache

    fake_cache(tmp_path / "hf" / "hub", "bert-base-uncased",
               {"vocab.txt": (REPO / "tests" / "fixtures" / "vocab.txt").read_text()})
    code = "from models.captioner import build_tokenizer; print(len(build_tokenizer('bert-base-uncased')))"
    completed, elapsed = _timed(["-c", code], _unreachable_env(tmp_path / "hf"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "from the local cache" in completed.stderr and int(completed.stdout.split()[-1]) > 0
    _assert_fast_without_retries(completed, elapsed)


@pytest.mark.slow
def test_a_fresh_resume_is_refused_before_anything_is_built(tmp_path):
    """On a fresh checkout `--resume` used to build the toy set, CLIP and GPT-2 (minutes) before refusing."""
    fresh = tmp_path / "cache"  # what a fresh checkout's cache/ holds: nothing
    completed, elapsed = _timed(
        ["train_caption.py", "--config", "configs/toy/smile.yaml", "--resume", "--opt",
         f"output_dir={tmp_path / 'EMPTY'}", "--opt", f"data.toy_root={fresh / 'toy'}",
         "--opt", f"eval.clip_model={fresh / 'toy_clip'}", "--opt", f"eval.ppl_model={fresh / 'toy_gpt2'}",
         "--opt", f"model.pretrained={fresh / 'toy_pretrain' / 'checkpoint_best.safetensors'}"],
        {**os.environ, "HF_HUB_OFFLINE": "1"})
    _assert_clean(completed, f"--resume: no {LATEST} in")
    assert not fresh.exists()  # no toy set, toy CLIP, toy GPT-2 or pre-trained BLIP was built
    assert elapsed < FAST_S, elapsed


def test_cheap_checks_come_before_any_build(toy, tmp_path, monkeypatch):
    """In-process, with the builders instrumented: each user error is raised before the toy set, the toy CLIP /
    GPT-2, the pre-training recipe or the captioner is built."""
    def forbidden(*args, **kwargs):
        raise AssertionError("built before the checks")

    for module in (training.trainer, training.evaluation):  # where run_training and run_evaluation look them up
        for name in ("build_toy_assets", "ensure_pretrained", "build_captioner"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
    base = _tiny_config(toy, tmp_path, tmp_path / "run")
    cases = [
        (["--resume"], f"--resume: no {LATEST}"),
        (["--opt", "data.train_files=[missing/train.json]"], "data.train_files: file missing/train.json not found"),
        (["--opt", f"data.image_root={tmp_path / 'no_images'}"], "data.image_root: folder"),
        (["--opt", "model.pretrained=runs/missing_best.safetensors"], "'runs/missing_best.safetensors' not found"),
        (["--opt", "model.pretrained=runs/missing_best.safetensors", "--opt",
          "model.pretrained_recipe=configs/toy/missing.yaml"], "model.pretrained_recipe, which would create it"),
        (["--opt", "model.prefix.gpt2=null", "--opt", "model.family=prefix"], "model.prefix.gpt2 is not set"),
        # A folder that is missing is named as missing, never sent to the hub ("Repo id must be in the form ..."):
        # an absolute path, ./ and ../, or any name the hub would refuse as a model id.
        (["--opt", f"objective={{scst: {{reward: {{clip_s: 1.0}}, clip_model: {tmp_path / 'no_such_clip'}}}}}"],
         f"objective.scst.clip_model '{tmp_path / 'no_such_clip'}' not found: no such file or directory"),
        (["--opt", f"eval.clip_model={tmp_path / 'no_such_clip'}", "--opt", "objective={scst: {reward: clip_s}}"],
         f"objective.scst.clip_model '{tmp_path / 'no_such_clip'}' not found"),  # the old key, for one release
        (["--opt", "model.family=prefix", "--opt", "model.prefix.gpt2=../no_such_gpt2"],
         "model.prefix.gpt2 '../no_such_gpt2' not found: no such file or directory"),
        (["--opt", "model.family=prefix", "--opt", "model.prefix.gpt2=my gpt2/weights"],
         "model.prefix.gpt2 'my gpt2/weights' not found: no such file or directory"),
        (["--opt", f"objective={{scst: {{reward: grammar, grammar_model: {tmp_path / 'no_grammar'}}}}}"],
         "objective.scst.grammar_model: folder"),
    ]
    for options, message in cases:
        with pytest.raises(training.USER_ERRORS, match=re.escape(message)):
            train_caption.main(["--config", str(base), *options])


def test_a_toy_config_with_its_data_given_by_hand_names_model_tokenizer(toy, tmp_path, capsys, monkeypatch):
    """configs/toy/*.yaml leave model.tokenizer null (the toy set's vocab); with data.toy false that used to be a
    TypeError inside build_tokenizer."""
    monkeypatch.delenv(utils.TRACEBACK_ENV, raising=False)
    paths = toy["paths"]
    argv = ["--config", str(REPO / "configs" / "toy" / "mle.yaml"), "--opt", f"output_dir={tmp_path / 'run'}",
            "--opt", "data.toy=false", "--opt", f"data.train_files=[{paths['train_file']}]",
            "--opt", f"data.val_file={paths['val_file']}", "--opt", f"data.test_file={paths['test_file']}",
            "--opt", f"data.image_root={paths['image_root']}"]
    assert utils.run_cli(train_caption.main, training.USER_ERRORS, argv, prog="train_caption.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.tokenizer is null" in err and "data.toy is false" in err
    assert "vocab.txt" in err and "bert-base-uncased" in err


@pytest.mark.slow
def test_demo_missing_checkpoint_is_one_line_naming_the_training_command(tmp_path):
    import demo

    # README's demo command names runs/toy/mle, which configs/toy/mle.yaml writes.
    assert demo.training_command(REPO / "runs" / "toy" / "mle" / "checkpoint_best.safetensors") == \
        "bash scripts/train.sh configs/toy/mle.yaml"
    missing = tmp_path / "runs" / "x" / "checkpoint_best.safetensors"
    line = _assert_clean(_run("demo.py", "--checkpoint", str(missing)), f"--checkpoint {missing}: no such file",
                         "bash scripts/train.sh")
    assert "CheckpointError" not in line


@pytest.mark.slow
def test_eval_out_files_get_the_umasks_mode(toy, tmp_path):
    """eval_caption.py --out used to write metrics.json with the temp file's 0600."""
    gt = json.loads(Path(toy["paths"]["val_gt"]).read_text())
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": image["id"], "caption": "a red circle"} for image in gt["images"]]))
    out = tmp_path / "scores" / "metrics.json"
    completed, _ = _timed(["eval_caption.py", "--results", str(results), "--annotations", str(toy["paths"]["val_gt"]),
                           "--metrics", "length", "--out", str(out)], {**os.environ, "HF_HUB_OFFLINE": "1"},
                          umask=0o027)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert "cap_len" in json.loads(out.read_text())
