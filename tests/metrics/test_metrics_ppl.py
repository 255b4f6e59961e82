"""metrics/perplexity.py against a naive, unbatched transcription of HF evaluate's perplexity."""
import logging
import math
import random

import pytest
import torch

from metrics.perplexity import caption_perplexities, gpt2_perplexity, load_language_model
from metrics_fixtures import synthetic_caption

LONG = " ".join(["two dogs sitting on the grass next to a red car"] * 8)  # > 63 tokens


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_language_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="module")
def captions():
    rng = random.Random(2)
    return [synthetic_caption(rng) for _ in range(21)] + ["Zebra!", " ", "dog", LONG]


@pytest.fixture(scope="module")
def expected(lm, captions):
    return [naive_perplexity(lm, c, max_tokens=63) for c in captions]


@torch.no_grad()
def naive_perplexity(lm, caption, max_tokens=None):
    """One caption alone: BOS + tokens, exp(mean over caption tokens of -log p(token | prefix))."""
    tokens = lm.tokenizer(caption, add_special_tokens=False)["input_ids"][:max_tokens]
    ids = [lm.tokenizer.bos_token_id] + tokens
    log_probs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0], dim=-1)
    nll = [-log_probs[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize("batch_size", [1, 4, 16, 64])
def test_equals_naive_per_caption(lm, captions, expected, batch_size, caplog):
    assert lm.tokenizer.bos_token == "<|endoftext|>"
    with caplog.at_level(logging.WARNING, logger="metrics.perplexity"):
        got = caption_perplexities(captions, lm, batch_size=batch_size)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    mean = sum(expected) / len(expected)
    assert gpt2_perplexity(captions, lm, batch_size=batch_size) == pytest.approx(mean, rel=1e-5)
    # the long caption is truncated to the context minus BOS, and the log says so
    assert len(lm.tokenizer(LONG, add_special_tokens=False)["input_ids"]) > 63
    assert any("1 captions are longer than 63 tokens" in r.getMessage() for r in caplog.records)


def test_single_token_caption_by_hand(lm):
    token = lm.tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    with torch.no_grad():
        probs = torch.softmax(lm.model(torch.tensor([[lm.tokenizer.bos_token_id]])).logits[0, 0], dim=-1)
    assert caption_perplexities(["dog"], lm)[0].item() == pytest.approx(1 / probs[token[0]].item(), rel=1e-5)


def test_model_from_directory_and_errors(tiny_gpt2_dir, tmp_path):
    value = gpt2_perplexity(["a dog on a bed", "two cats"], tiny_gpt2_dir, device="cpu")
    assert value > 1
    with pytest.raises(ValueError, match=r"2 captions are empty.*positions \[1, 3\]"):
        caption_perplexities(["a dog", "", "a cat", ""], tiny_gpt2_dir, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        gpt2_perplexity([], tiny_gpt2_dir)
    with pytest.raises(OSError, match="could not load the perplexity language model from .*missing_lm"):
        load_language_model(tmp_path / "missing_lm")
