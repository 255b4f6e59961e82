"""captioning/rerank.py: best-of-N by CLIP-S picks each image's argmax candidate (the first on a tie), and its score
is the CLIPScore metric's per-caption value, on a tiny CLIP built offline (tests/metrics_fixtures.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from captioning.rerank import rerank_by_clip
from metrics.clip_metrics import clip_score, load_clip

CANDIDATES = [
    ["a red dog on the grass", "two cats sitting near a tree", "a man riding a horse"],
    ["a white boat"],
    ["a small bus", "an old clock on the table", "a bird flying", "some pizza on a bed", "the green kite"],
    ["a woman holding a cake", "a train parked next to the street"],
]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in CANDIDATES]


def test_picks_the_argmax_with_the_metrics_own_score(clip, images, tiny_clip_dir):
    captions, scores = rerank_by_clip(images, CANDIDATES, tiny_clip_dir, device="cpu", batch_size=3)
    assert len(captions) == len(scores) == len(images) and all(isinstance(s, float) for s in scores)
    for image, texts, caption, score in zip(images, CANDIDATES, captions, scores):
        each = clip_score(texts, [image] * len(texts), clip, progress=False)["per_caption"]  # one candidate a row
        assert caption == texts[int(each.argmax())]
        chosen = clip_score([caption], [image], clip, progress=False)["per_caption"]
        torch.testing.assert_close(torch.tensor([score]), chosen, atol=1e-5, rtol=1e-5)
    assert len(set(captions)) > 1  # the random CLIP does not prefer one caption everywhere
    # A loaded bundle and another batching give the same answer as a path.
    again, again_scores = rerank_by_clip(images, CANDIDATES, clip, batch_size=64)
    assert again == captions and again_scores == pytest.approx(scores, abs=1e-5)


def test_ties_go_to_the_first_candidate(clip, images):
    # CLIP's tokenizer lower-cases, so each pair embeds identically and scores exactly equal: above 0 for the
    # first pair, and clipped to 0 (a negative cosine) for the second, where a worse caption ties too.
    ties = [["A Man Riding a Horse", "a man riding a horse"], ["a man riding a horse", "A Man Riding a Horse"],
            ["The Green Kite", "a white boat", "the green kite"]]
    captions, scores = rerank_by_clip(images[:3], ties, clip)
    assert captions == ["A Man Riding a Horse", "a man riding a horse", "The Green Kite"]
    alone = clip_score(["a man riding a horse"] * 2 + ["the green kite"], images[:3], clip, progress=False)
    assert scores == pytest.approx(alone["per_caption"].tolist(), abs=1e-5)
    assert scores[0] > 0 and scores[2] == 0


def test_bad_input_is_named(clip, images):
    with pytest.raises(ValueError, match="got 2 images but 1 candidate lists"):
        rerank_by_clip(images[:2], CANDIDATES[:1], clip)
    with pytest.raises(ValueError, match="image 1 needs a non-empty list"):
        rerank_by_clip(images[:2], [["a dog"], []], clip)
    with pytest.raises(ValueError, match="image 0 needs a non-empty list"):
        rerank_by_clip(images[:1], ["a dog"], clip)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        rerank_by_clip(images[:1], [["a dog"]], clip, batch_size=0)
