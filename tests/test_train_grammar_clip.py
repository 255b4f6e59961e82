"""scripts/train_grammar_clip.py: corruptions change the caption; a short run writes a model the reward loads."""
import importlib.util
import json
import random
from pathlib import Path

import torch

from metrics.clip_metrics import load_clip
from metrics.rewards import RewardMixture, load_grammar_model
from metrics_fixtures import build_tiny_clip, make_images, synthetic_caption

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_grammar_clip.py"
spec = importlib.util.spec_from_file_location("train_grammar_clip", SCRIPT)
tgc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tgc)


def test_each_corruption_is_one_edit_of_its_kind():
    rng = random.Random(0)
    vocab = ["zebra", "kite", "blue"]
    words = "a man riding a horse on the beach".split()
    for _ in range(50):
        assert sorted(tgc.shuffle_words(words, rng, vocab)) == sorted(words)
        removed = tgc.remove_ngram(words, rng, vocab)
        assert 1 <= len(words) - len(removed) <= 3
        inserted = tgc.insert_words(words, rng, vocab)
        assert 1 <= len(inserted) - len(words) <= 3 and set(inserted) - set(words) <= set(vocab)
        swapped = tgc.replace_words(words, rng, vocab)
        assert len(swapped) == len(words) and swapped != words
        assert len(tgc.repeat_ngram(words, rng, vocab)) > len(words)
        assert tgc.corrupt(" ".join(words), rng, vocab) != " ".join(words)
    assert tgc.corrupt("dog", rng, vocab) != "dog"


def test_short_run_writes_a_grammar_model(tmp_path):
    clip_dir = build_tiny_clip(tmp_path / "clip")
    names = make_images(tmp_path / "images", 16, seed=3)
    rng = random.Random(1)
    annotations = [{"image": n, "caption": [synthetic_caption(rng) for _ in range(2)]} for n in names]
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    out = tmp_path / "grammar"
    before = load_clip(clip_dir, "cpu").model.state_dict()
    summary = tgc.main(["--clip-model", str(clip_dir), "--annotations", str(tmp_path / "train.json"),
                        "--image-root", str(tmp_path / "images"), "--out", str(out), "--max-steps", "4",
                        "--batch-size", "8", "--device", "cpu"])
    assert len(summary["log"]) == 4 and 0.0 <= summary["held_out_acc"] <= 1.0
    after = load_clip(out, "cpu").model.state_dict()
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in before if k.startswith("text_model.encoder.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen
    assert any(not torch.equal(before[k], after[k]) for k in text)  # fine-tuned
    model = load_grammar_model(out, "cpu")
    probs = model.probability(["a dog on the grass", "grass grass the on"])
    assert probs.shape == (2,) and ((probs > 0) & (probs < 1)).all()
    total, parts = RewardMixture({"grammar": 1.0}, grammar_model=out, device="cpu")(["a dog", "dog a"], [0, 0])
    torch.testing.assert_close(parts["grammar"], model.probability(["a dog", "dog a"]))
