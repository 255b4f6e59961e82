"""Config files: inheritance, overrides, and failing early on typos and wrong types."""
import pytest

import training
from utils import ConfigError, load_yaml_with_bases, parse_override


def _write(path, text):
    path.write_text(text)
    return path


def test_inheritance_and_dotted_overrides(tmp_path):
    parent = _write(tmp_path / "parent.yaml", "objective: mle\ntrain:\n  epochs: 3\n  lr: 0.001\n")
    child = _write(tmp_path / "child.yaml", "base: parent.yaml\nobjective: smile\ntrain:\n  epochs: 1\n")
    config = training.load_config(child, ["train.batch_size=8", "objective={mle: 0.01, smile: 0.99}"])
    assert config["objective"] == {"mle": 0.01, "smile": 0.99}
    assert config["train"]["epochs"] == 1 and config["train"]["lr"] == 0.001 and config["train"]["batch_size"] == 8
    assert config["eval"]["num_beams"] == 3  # from configs/default.yaml
    assert load_yaml_with_bases(parent) == {"objective": "mle", "train": {"epochs": 3, "lr": 0.001}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bach_size=8", r"unknown config key 'train.bach_size'; valid keys here: \[.*'batch_size'"),
        ("trian.epochs=1", r"unknown config key 'trian'"),
        ("train.epochs=five", r"'train.epochs' must be int, got str 'five'"),
        ("train.amp=1", r"'train.amp' must be bool"),
        ("model=3", r"'model' must be a mapping"),
        ("objective=smiel", r"unknown objective 'smiel'; valid names"),
        ("eval.split=train", r"eval.split must be one of \[.val., .test.\], got .train."),
        ("resume=maybe", r"resume must be one of \[False, True, .auto.\]"),
    ],
)
def test_bad_keys_and_types_fail_listing_valid_choices(tmp_path, override, message):
    config = _write(tmp_path / "c.yaml", "objective: mle\n")
    with pytest.raises(ConfigError, match=message):
        training.load_config(config, [override])


def test_float_keys_accept_ints_and_exponent_strings(tmp_path):
    config = training.load_config(_write(tmp_path / "c.yaml", "train:\n  lr: 1e-4\n"), ["train.min_lr=0"])
    assert config["train"]["lr"] == 1e-4 and isinstance(config["train"]["min_lr"], float)


def test_override_parsing():
    assert parse_override("train.lr=1") == (["train", "lr"], 1)
    assert parse_override("data.train_files=[a.json, b.json]") == (["data", "train_files"], ["a.json", "b.json"])
    assert parse_override("model.pretrained=null") == (["model", "pretrained"], None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_missing_file_and_inheritance_loop_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        training.load_config(tmp_path / "nope.yaml")
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        training.load_config(tmp_path / "a.yaml")


def test_every_shipped_config_validates():
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs"
    # configs/grammar_clip/ holds scripts/train_grammar_clip.py's own settings (tests/test_train_grammar_clip.py).
    for path in sorted(configs.rglob("*.yaml")):
        if path.parent.name != "grammar_clip":
            training.load_config(path)
