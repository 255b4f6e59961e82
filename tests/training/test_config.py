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
        ("amp=1", r"'amp' must be bool"),
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

    configs = Path(__file__).parents[2] / "configs"
    # configs/grammar_clip/ holds scripts/train_grammar_clip.py's own settings (tests/test_train_grammar_clip.py).
    for path in sorted(configs.rglob("*.yaml")):
        if path.parent.name != "grammar_clip":
            training.load_config(path)


def _old_layout(config: dict) -> dict:
    """``config`` (resolved) as a run saved it before the keys moved to the sections that read them."""
    import copy

    old = copy.deepcopy(config)
    old["train"]["dist_timeout_minutes"], old["train"]["amp"] = old.pop("dist_timeout_minutes"), old.pop("amp")
    old["eval"]["batch_size"] = old["data"].pop("feature_cache_batch_size")
    old["eval"]["clip_model"] = old["objective"]["scst"].pop("clip_model")
    del old["data"]["source"]
    return old


def test_a_resolved_config_of_the_older_layout_loads_with_one_line_per_moved_key(tmp_path, caplog):
    from pathlib import Path

    import yaml

    toy = Path(__file__).parents[2] / "configs" / "toy"
    current = training.load_config(toy / "scst_clips.yaml", ["amp=false", "dist_timeout_minutes=5"])
    saved = _write(tmp_path / "config.yaml", yaml.safe_dump(_old_layout(current)))  # as config.yaml / a checkpoint
    caplog.set_level("WARNING", logger="smile_blip")
    assert training.load_config(saved) == current
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("\n" not in line for line in lines), lines
    for old, new in (("train.dist_timeout_minutes", "dist_timeout_minutes"), ("train.amp", "amp"),
                     ("eval.clip_model", "objective.scst.clip_model"),
                     ("eval.batch_size", "data.feature_cache_batch_size")):
        assert any(f"{old} " in line and f"set {new}" in line for line in lines), (old, lines)
    assert training.config_changes(_old_layout(current), current) == []


def test_the_old_keys_keep_their_meaning_for_one_release_only_where_they_stood_in(tmp_path, caplog):
    caplog.set_level("WARNING", logger="smile_blip")
    clip = "objective={scst: {reward: {clip_s: 1.0}}}"
    config = training.load_config(_write(tmp_path / "c.yaml", "eval:\n  clip_model: my/clip\n  batch_size: 8\n"),
                                  [clip, "train.dist_timeout_minutes=2"])
    assert config["objective"]["scst"]["clip_model"] == "my/clip" and config["eval"]["clip_model"] == "my/clip"
    assert config["data"]["feature_cache_batch_size"] == 8 and config["dist_timeout_minutes"] == 2.0
    assert len(caplog.records) == 3
    caplog.clear()
    # The new keys set, or nothing the old key stood in for (no CLIP reward, feature cache off): no fallback.
    config = training.load_config(_write(tmp_path / "d.yaml", "eval:\n  clip_model: my/clip\n  batch_size: 8\n"),
                                  ["objective={scst: {reward: cider_d}}", "data.feature_cache=off"])
    assert config["data"]["feature_cache_batch_size"] == 64 and "clip_model" not in config["objective"]["scst"]
    config = training.load_config(_write(tmp_path / "e.yaml", "eval:\n  clip_model: my/clip\n"),
                                  ["objective={scst: {reward: clip_s, clip_model: their/clip}}"])
    assert config["objective"]["scst"]["clip_model"] == "their/clip" and not caplog.records
    with pytest.raises(ConfigError, match="sets both train.amp and amp"):
        training.load_config(_write(tmp_path / "f.yaml", "amp: false\ntrain:\n  amp: true\n"))


def test_config_changes_name_every_changed_key_but_the_launch_keys():
    from pathlib import Path

    toy = Path(__file__).parents[2] / "configs" / "toy"
    mle = training.load_config(toy / "mle.yaml")
    scst = training.load_config(toy / "scst_cider.yaml", ["resume=true", "overwrite=true"])
    changes = training.config_changes(mle, scst)
    assert any(line.startswith("objective: 'mle' -> {'scst': {'reward': 'cider_d'") for line in changes), changes
    assert "data.train_per_image: False -> True" in changes
    assert not [line for line in changes if line.startswith(("resume", "overwrite"))]
    assert training.config_changes(mle, mle) == []
