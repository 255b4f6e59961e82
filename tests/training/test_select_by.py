"""eval.select_by and eval.keep_start: what picks checkpoint_best, the starting weights as a candidate (epoch -1),
and the best-so-far across a resume.

The trainer runs for real (tiny BLIP, a 16-image toy set, real checkpoints and resume); only an epoch's training
and validation's captioning are scripted: each scripted epoch writes its number into one weight (so the weights
checkpoint_best holds say which epoch it is) and validation returns that epoch's scripted metrics."""
from pathlib import Path

import pytest
import torch

import training
import utils
from data import ensure_toy_dataset
from models.checkpoint import load_checkpoint_file
from training import trainer
from training.checkpoints import BEST

# Validation per epoch (-1: the starting weights). Each selection below picks a different one:
#   CIDEr + BLEU-4 (BLIP): 0 | CIDEr: 1 | CLIPScore: 2 | 0.02 CLIPScore + CIDEr: 1 (9.3 vs 9.2) | -PPL: -1
SCRIPT = {
    -1: {"CIDEr": 5.00, "Bleu_4": 0.60, "CLIPScore": 200.0, "PPL": 3.0},
    0: {"CIDEr": 4.90, "Bleu_4": 0.90, "CLIPScore": 190.0, "PPL": 3.5},
    1: {"CIDEr": 5.30, "Bleu_4": 0.03, "CLIPScore": 200.0, "PPL": 3.6},
    2: {"CIDEr": 5.10, "Bleu_4": 0.03, "CLIPScore": 205.0, "PPL": 3.7},
}
MARKER = "text_decoder.cls.predictions.bias"  # the weight a scripted epoch fills with its number


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    return ensure_toy_dataset(tmp_path_factory.mktemp("toy"), num_train=16, num_val=4, num_test=4)


@pytest.fixture()
def scripted(monkeypatch):
    """Replace an epoch's training and validation's captioning by the script; returns the epochs validated."""
    state = {"epoch": -1, "validated": []}

    def train_one_epoch(model, captioner, loader, step, optimizer, config, progress, log, device, save_latest):
        state["epoch"] = progress.epoch
        with torch.no_grad():
            captioner.model.get_parameter(MARKER).fill_(float(progress.epoch))
        progress.global_step += 1
        return {"loss": 0.0, "images_per_second": 1.0}

    def evaluate(captioner, loader, gt, config, device, groups=("coco",), results_path=None):
        state["validated"].append(state["epoch"])
        if results_path is not None:  # as training.evaluation.evaluate: the captions first
            Path(results_path).write_text("[]")
        return [], {**SCRIPT[state["epoch"]], "groups": list(groups)}

    def build_captioner(*args, **kwargs):  # the starting weights are marked -1
        captioner = real_build_captioner(*args, **kwargs)
        with torch.no_grad():
            captioner.model.get_parameter(MARKER).fill_(-1.0)
        return captioner

    real_build_captioner = trainer.build_captioner
    monkeypatch.setattr(trainer, "build_captioner", build_captioner)
    monkeypatch.setattr(trainer, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    return state


def _config(toy_files, output_dir, tiny_clip_dir, tiny_gpt2_dir, *extra):
    overrides = [
        "data.toy=false", f"data.image_root={toy_files['image_root']}", f"data.train_files=[{toy_files['train_file']}]",
        f"data.val_file={toy_files['val_file']}", f"data.val_gt={toy_files['val_gt']}",
        f"data.test_file={toy_files['test_file']}", f"data.test_gt={toy_files['test_gt']}",
        f"model.tokenizer={toy_files['vocab_file']}", "data.num_workers=0", "train.batch_size=8", "train.epochs=3",
        "train.validate=true", "train.test_after_training=false", "eval.metrics=[coco, clipscore, ppl]",
        f"eval.clip_model={tiny_clip_dir}", f"eval.ppl_model={tiny_gpt2_dir}", f"output_dir={output_dir}",
        "resume=false", *extra,
    ]
    return training.load_config(training.CONFIG_DEFAULTS.parent / "toy" / "pretrain.yaml", overrides)


def _best_epoch_in(output_dir) -> int:
    """The epoch whose weights checkpoint_best holds (the scripted marker), checked against its metadata."""
    weights, _, metadata = load_checkpoint_file(output_dir / BEST)
    epoch = weights[MARKER][0].item()
    assert metadata["progress"]["best_epoch"] == epoch
    return int(epoch)


@pytest.mark.parametrize("select_by, keep_start, expected", [
    (None, True, 0),                                    # BLIP's CIDEr + BLEU-4: 5.80 at epoch 0
    ("CIDEr", True, 1),
    ("CLIPScore", True, 2),
    ({"CLIPScore": 0.02, "CIDEr": 1.0}, True, 1),
    ({"PPL": -1.0}, True, -1),                          # every epoch is worse than the start: keep the start
    ({"PPL": -1.0}, False, 0),                          # without the start as a candidate: the least bad epoch
])
def test_each_selection_picks_its_epoch(toy_files, scripted, tmp_path, tiny_clip_dir, tiny_gpt2_dir, select_by,
                                        keep_start, expected):
    config = _config(toy_files, tmp_path / "run", tiny_clip_dir, tiny_gpt2_dir,
                     f"eval.keep_start={str(keep_start).lower()}")
    config["eval"]["select_by"] = select_by  # run_training validates it again
    summary, _ = trainer.run_training(config)
    assert scripted["validated"] == ([-1] if keep_start else []) + [0, 1, 2]
    assert summary["best_epoch"] == expected == _best_epoch_in(tmp_path / "run")
    assert summary["best_val"]["CIDEr"] == SCRIPT[expected]["CIDEr"]
    # Validation scores coco plus the groups the selection's keys come from, no more.
    keys = [select_by] if isinstance(select_by, str) else list(select_by or {})
    extra = {"CLIPScore": ["clipscore"], "PPL": ["ppl"]}
    assert summary["best_val"]["groups"] == ["coco", *[group for key in keys for group in extra.get(key, [])]]


def test_resume_keeps_the_best_so_far(toy_files, scripted, tmp_path,
                                                                           tiny_clip_dir, tiny_gpt2_dir):
    run = tmp_path / "run"
    first = _config(toy_files, run, tiny_clip_dir, tiny_gpt2_dir, "train.epochs=2", "eval.select_by=CIDEr",
                    "eval.keep_start=true")
    summary, _ = trainer.run_training(first)
    assert summary["best_epoch"] == 1 == _best_epoch_in(run)

    # Resumed for a third epoch: epoch 2 (CIDEr 5.10) does not beat the saved best (epoch 1, 5.30), and the start
    # is not scored again.
    scripted["validated"].clear()
    resumed = _config(toy_files, run, tiny_clip_dir, tiny_gpt2_dir, "eval.select_by=CIDEr", "eval.keep_start=true",
                      "resume=true")
    summary, _ = trainer.run_training(resumed)
    assert scripted["validated"] == [2]
    assert summary["best_epoch"] == 1 == _best_epoch_in(run) and summary["best_val"]["CIDEr"] == 5.30


def test_resume_rescores_the_best_so_far_under_the_resumed_selection(toy_files, scripted, tmp_path, tiny_clip_dir,
                                                                      tiny_gpt2_dir):
    run = tmp_path / "run"
    summary, _ = trainer.run_training(_config(toy_files, run, tiny_clip_dir, tiny_gpt2_dir, "train.epochs=2",
                                              "eval.select_by=CLIPScore", "eval.keep_start=true"))
    assert summary["best_epoch"] == -1  # epochs 0 and 1 (190, 200) do not beat the start's 200
    # Resumed by CIDEr, the saved best is the start's 5.00, which epoch 2's 5.10 beats; had the saved score (200,
    # a CLIPScore) been kept, nothing would.
    summary, _ = trainer.run_training(_config(toy_files, run, tiny_clip_dir, tiny_gpt2_dir, "eval.select_by=CIDEr",
                                              "resume=true"))
    assert summary["best_epoch"] == 2 == _best_epoch_in(run)


def test_a_bad_selection_is_a_config_error_naming_the_key(toy_files, tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    with pytest.raises(utils.ConfigError, match=r"eval\.select_by: unknown metric key 'cider' \(did you mean 'CIDEr'"):
        _config(toy_files, tmp_path / "run", tiny_clip_dir, tiny_gpt2_dir, "eval.select_by=cider")
    with pytest.raises(utils.ConfigError, match=r"'RefCLIPScore' comes from the metric group 'clipscore', which "
                                                r"validation does not score: add it to eval\.metrics"):
        _config(toy_files, tmp_path / "run", tiny_clip_dir, tiny_gpt2_dir, "eval.metrics=[coco]",
                "eval.select_by=RefCLIPScore")
    with pytest.raises(utils.ConfigError, match=r"eval\.select_by\.PPL: weight 1 would prefer the wrong direction"):
        _config(toy_files, tmp_path / "run", tiny_clip_dir, tiny_gpt2_dir, "eval.select_by={PPL: 1.0}")
    with pytest.raises(utils.ConfigError, match=r"eval\.select_by: 'cap_len' is a statistic"):
        _config(toy_files, tmp_path / "run", tiny_clip_dir, tiny_gpt2_dir, "eval.metrics=[coco, length]",
                "eval.select_by=cap_len")
    assert training.selection_score({"CIDEr": 5.0, "Bleu_4": 0.5}) == 5.5  # the default: BLIP's CIDEr + BLEU-4
    with pytest.raises(ValueError, match="validation produced no value for"):
        training.selection_score({"CIDEr": 5.0, "Bleu_4": None})
