"""Cached frozen image features (data/feature_cache.py and training.cached_feature_dataset, over the annotation source's
image files, data/sources.py): a cached step is the
uncached step, the cache is built once and rebuilt when the training set or an image changes, and the config
decides when caching is possible."""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import training
import utils
from data import AnnotationSource, CaptionTrainDataset, caption_collate
from data.feature_cache import CachedFeatureDataset, ensure_feature_cache, read_cache_metadata
from models import CaptionObjective, PrefixCaptioner
from models.objectives import caption_loss

CLIPCAP = Path(__file__).parents[1] / "fixtures" / "clipcap_original"
GPT = dict(vocab_size=453, n_positions=64, n_embd=32, n_layer=1, n_head=2)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=16, projection_dim=24)
CAPTIONS = ["a red square.", "two blue circles", "the green triangle is left.", "a dog!", "one star", "grey sky"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_tok")
    shutil.copy(CLIPCAP / "gpt2_vocab.json", directory / "vocab.json")
    shutil.copy(CLIPCAP / "gpt2_merges.txt", directory / "merges.txt")
    return directory


def _write_images(root: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"images/img_{index:04d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


def _annotations(path: Path, names: list[str]) -> Path:
    entries = [{"image": name, "caption": [CAPTIONS[i % len(CAPTIONS)], CAPTIONS[(i + 1) % len(CAPTIONS)]]}
               for i, name in enumerate(names)]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "data"
    names = _write_images(root, 6)
    return root, names, _annotations(tmp_path / "train.json", names)


def _captioner(tokenizer_dir, seed=0, **prefix):
    torch.manual_seed(seed)
    return PrefixCaptioner.build(GPT, CLIP, tokenizer=tokenizer_dir, prefix={"prefix_length": 2, **prefix})


class _CountingEncoder:
    def __init__(self, captioner):
        self.captioner, self.images = captioner, 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return self.captioner.encode_cache_batch(pixels)


def _dataset(captioner, root, annotation_file, per_image=False):
    return CaptionTrainDataset(annotation_file, root, captioner.eval_transform(), per_image=per_image)


def _cached(captioner, dataset, cache_dir, encode=None):
    source = AnnotationSource(dataset)
    key = captioner.cached_feature_key(repr(dataset.transform))
    path = ensure_feature_cache(source.image_files(), cache_dir, key, encode or captioner.encode_cache_batch,
                                batch_size=4)
    return source.with_cached_features(path)


def _loss_and_grads(captioner, batch):
    images, captions, _, _ = caption_collate(batch)
    ids, mask = captioner.tokenize(captions)
    captioner.train()
    captioner.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both passes (the frozen tower draws no random numbers)
    loss, _ = caption_loss(captioner, CaptionObjective({"mle": 0.5, "smile": 0.5}), images, ids, mask,
                           captioner.build_targets(ids, mask))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in captioner.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("prefix", [
    {"normalize_prefix": True},  # pooled + MLP: the cache holds the raw embedding, the model normalises it
    {"prefix_source": "tokens", "mapping_type": "transformer", "prefix_length": 3, "num_layers": 1},
])
def test_a_cached_step_is_the_uncached_step(tokenizer_dir, images, tmp_path, prefix):
    root, _, annotation_file = images
    captioner = _captioner(tokenizer_dir, **prefix)
    dataset = _dataset(captioner, root, annotation_file)
    cached = _cached(captioner, dataset, tmp_path / "cache")
    assert len(cached) == len(dataset) == 12
    rows = [0, 3, 5, 8, 11]
    features = caption_collate([cached[i] for i in rows])[0]
    assert features.dim() == (2 if "prefix_source" not in prefix else 3) and features.dtype == torch.float32
    loss, grads = _loss_and_grads(captioner, [dataset[i] for i in rows])
    cached_loss, cached_grads = _loss_and_grads(captioner, [cached[i] for i in rows])
    assert abs(loss.item() - cached_loss.item()) <= 1e-6
    assert set(grads) == set(cached_grads) and not any(name.startswith("model.vision.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    captioner.eval()  # generation and SCST rollouts take the features too
    pixels = caption_collate([dataset[i] for i in rows])[0]
    torch.testing.assert_close(captioner.sample_ids(features, greedy=True, max_new_tokens=6),
                               captioner.sample_ids(pixels, greedy=True, max_new_tokens=6))
    assert captioner.generate(features, num_beams=2, max_length=5) == captioner.generate(pixels, num_beams=2,
                                                                                          max_length=5)
    with pytest.raises(ValueError, match="expected pixels"):
        captioner(features[..., :-1], *captioner.tokenize(["a dog"] * len(rows)))


def test_per_image_order_and_captions_match(tokenizer_dir, images, tmp_path):
    import random

    root, _, annotation_file = images
    captioner = _captioner(tokenizer_dir)
    dataset = _dataset(captioner, root, annotation_file, per_image=True)
    cached = _cached(captioner, dataset, tmp_path / "cache")
    assert len(cached) == 6 and isinstance(cached, CachedFeatureDataset) and cached.dataset is dataset
    random.seed(3)
    plain = [dataset[i][1:] for i in range(6)]
    random.seed(3)
    assert [cached[i][1:] for i in range(6)] == plain


def test_the_cache_is_built_once_and_rebuilt_for_new_or_changed_images(tokenizer_dir, images, tmp_path):
    root, names, annotation_file = images
    captioner = _captioner(tokenizer_dir)
    first = _CountingEncoder(captioner)
    cached = _cached(captioner, _dataset(captioner, root, annotation_file), tmp_path / "cache", first)
    assert first.images == 6 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = _CountingEncoder(captioner)
    reused = _cached(captioner, _dataset(captioner, root, annotation_file), tmp_path / "cache", again)
    assert again.images == 0 and reused.cache_file == cached.cache_file

    # A training set with an image the file lacks: rebuilt, for the current set's images.
    names.append("images/img_0006.png")
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(root / names[-1])
    bigger = _annotations(tmp_path / "train_7.json", names)
    rebuild = _CountingEncoder(captioner)
    grown = _cached(captioner, _dataset(captioner, root, bigger), tmp_path / "cache", rebuild)
    assert rebuild.images == 7 and read_cache_metadata(grown.cache_file)["paths"] == names
    # A subset of the cached images reuses the file.
    subset = _CountingEncoder(captioner)
    _cached(captioner, _dataset(captioner, root, _annotations(tmp_path / "t3.json", names[:3])), tmp_path / "cache",
            subset)
    assert subset.images == 0

    # An image file that changed (new content, so a new size/mtime stamp): rebuilt, and the new features are used.
    before = grown[0][0].clone()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(root / names[0])
    os.utime(root / names[0], ns=(1, 1))
    changed = _CountingEncoder(captioner)
    after = _cached(captioner, _dataset(captioner, root, bigger), tmp_path / "cache", changed)
    assert changed.images == 7 and not torch.allclose(after[0][0], before)

    # Other tower weights (another seed) are other features: another file, never the stale one.
    other = _captioner(tokenizer_dir, seed=1)
    assert other.cached_feature_key("t") != captioner.cached_feature_key("t")
    assert captioner.cached_feature_key("t") != captioner.cached_feature_key("u")


def test_an_unreadable_image_is_skipped_like_an_uncached_one(tokenizer_dir, images, tmp_path):
    root, names, annotation_file = images
    (root / names[0]).write_bytes(b"not a png")
    captioner = _captioner(tokenizer_dir)
    dataset = _dataset(captioner, root, annotation_file)
    dataset.skip_bad_images = True
    cached = _cached(captioner, dataset, tmp_path / "cache")
    assert cached[0][0] is None and dataset[0][0] is None and cached[2][0] is not None
    assert caption_collate([cached[0], cached[2]])[3] == 1  # the collate counts it as skipped


def _config(tmp_path, tokenizer_dir, root, annotation_file, *overrides, family="prefix"):
    model = {"family": family, "max_text_length": 20,
             "prefix": {"gpt2": GPT, "clip": CLIP, "tokenizer": str(tokenizer_dir), "prefix_length": 2}}
    if family == "blip":
        model = {"family": "blip", "arch": "tiny", "image_size": 32, "tokenizer": str(Path(__file__).parents[1]
                                                                                      / "fixtures" / "vocab.txt")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": model, "train": {"batch_size": 4},
        "data": {"image_root": str(root), "train_files": [str(annotation_file)], "num_workers": 0, "augment": False,
                 "feature_cache_dir": str(tmp_path / "features")}}))
    return training.load_config(path, list(overrides))


def test_the_config_decides_when_features_are_cached(tokenizer_dir, images, tmp_path, caplog):
    root, _, annotation_file = images
    caplog.set_level(logging.INFO, logger="smile_blip")
    config = _config(tmp_path, tokenizer_dir, root, annotation_file)
    torch.manual_seed(0)
    captioner = training.build_captioner(config, torch.device("cpu"))
    loader, _, _ = training.build_train_loader(config, captioner)
    assert isinstance(loader.dataset, CachedFeatureDataset)
    assert next(iter(loader))[0].shape == (4, 24)  # pooled features, not pixels

    for off in ("off", "false"):
        loader, _, _ = training.build_train_loader(_config(tmp_path, tokenizer_dir, root, annotation_file,
                                                      f"data.feature_cache={off}"), captioner)
        assert isinstance(loader.dataset, CaptionTrainDataset)

    caplog.clear()
    augmented = _config(tmp_path, tokenizer_dir, root, annotation_file, "data.augment=true")
    loader, _, _ = training.build_train_loader(augmented, captioner)
    assert isinstance(loader.dataset, CaptionTrainDataset)
    lines = [r.getMessage() for r in caplog.records if "feature_cache" in r.getMessage()]
    assert len(lines) == 1 and "because data.augment is true" in lines[0]
    with pytest.raises(utils.ConfigError, match="data.augment is true"):
        training.build_train_loader(_config(tmp_path, tokenizer_dir, root, annotation_file, "data.augment=true",
                                          "data.feature_cache=on"), captioner)

    clip_reward = ["objective={scst: {reward: {clip_s: 1.0, cider_d: 1.0}}}"]
    loader, _, _ = training.build_train_loader(_config(tmp_path, tokenizer_dir, root, annotation_file, *clip_reward),
                                          captioner)
    assert isinstance(loader.dataset, CaptionTrainDataset)
    with pytest.raises(utils.ConfigError, match="CLIP reward"):
        training.build_train_loader(_config(tmp_path, tokenizer_dir, root, annotation_file, *clip_reward,
                                          "data.feature_cache=on"), captioner)

    trained_tower = _config(tmp_path, tokenizer_dir, root, annotation_file, "model.prefix.train_vision=true",
                            "data.feature_cache=on")
    one_stage = training.build_captioner(trained_tower, torch.device("cpu"))
    assert one_stage.cached_feature_key("x") is None
    with pytest.raises(utils.ConfigError, match="has no frozen image features"):
        training.build_train_loader(trained_tower, one_stage)


def test_blip_is_never_cached(tokenizer_dir, images, tmp_path, caplog):
    root, _, annotation_file = images
    caplog.set_level(logging.INFO, logger="smile_blip")
    config = _config(tmp_path, tokenizer_dir, root, annotation_file, family="blip")
    captioner = training.build_captioner(config, torch.device("cpu"))
    assert captioner.cached_feature_key(repr(captioner.eval_transform())) is None
    loader, _, _ = training.build_train_loader(config, captioner)
    assert isinstance(loader.dataset, CaptionTrainDataset)
    assert not [r for r in caplog.records if "feature_cache" in r.getMessage()]  # BLIP is not told each run
    with pytest.raises(utils.ConfigError, match="model.family blip"):
        training.build_train_loader(_config(tmp_path, tokenizer_dir, root, annotation_file, "data.feature_cache=on",
                                          family="blip"), captioner)
    assert not (tmp_path / "features").exists()


def test_a_prefix_run_trains_on_cached_features_like_an_uncached_one(tokenizer_dir, tmp_path):
    import train_caption
    from data import ensure_toy_dataset

    paths = ensure_toy_dataset(tmp_path / "toy")
    train_file = tmp_path / "train_8.json"
    train_file.write_text(json.dumps(json.loads(Path(paths["train_file"]).read_text())[:8]))
    config = tmp_path / "prefix.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"family": "prefix", "max_text_length": 20,
                  "prefix": {"gpt2": GPT, "clip": CLIP, "tokenizer": str(tokenizer_dir), "prefix_length": 2}},
        "data": {"toy": True, "toy_root": str(tmp_path / "toy"), "train_files": [str(train_file)], "augment": False,
                 "num_workers": 0, "feature_cache_dir": str(tmp_path / "features")},
        "train": {"epochs": 1, "batch_size": 4, "log_every": 1, "checkpoint_every": 0, "validate": False,
                  "test_after_training": False, "lr": 1.0e-3},
    }))
    losses = {}
    for mode in ("auto", "off"):
        output = tmp_path / f"run_{mode}"
        summary = train_caption.main(["--config", str(config), "--opt", f"output_dir={output}",
                                      "--opt", f"data.feature_cache={mode}"])
        assert summary["steps"] == 2
        records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r["kind"] == "train"]
    assert "training on cached image features" in (tmp_path / "run_auto" / "train.log").read_text()
    assert "cached image features" not in (tmp_path / "run_off" / "train.log").read_text()
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 1
    # The same batches, dropout and updates: cached and uncached training give the same losses.
    np.testing.assert_allclose(losses["auto"], losses["off"], atol=1e-5, rtol=0)

    # The family plugs into the rest unchanged: the run's checkpoint exports (scripts/export_hf.py) to GPT-2 and
    # CLIP transformers folders plus the mapper, and the Captioner API gives the same captions from either.
    import subprocess
    import sys

    from models import Captioner

    checkpoint = tmp_path / "run_auto" / "checkpoint_best.safetensors"
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "export_hf.py"),
                    str(checkpoint), str(exported)], check=True, capture_output=True)
    assert (exported / "gpt2" / "config.json").is_file() and (exported / "clip" / "config.json").is_file()
    image = Path(paths["image_root"]) / json.loads(train_file.read_text())[0]["image"]
    from_checkpoint = Captioner.from_pretrained(checkpoint, device="cpu").caption(image, num_beams=2, max_length=8)
    from_export = Captioner.from_pretrained(exported, device="cpu").caption(image, num_beams=2, max_length=8)
    assert from_checkpoint == from_export and isinstance(from_checkpoint, str)
