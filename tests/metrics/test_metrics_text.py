"""metrics/text_stats.py against BLIP's pre_caption and naive re-implementations of each statistic."""
import re

import pytest

from metrics.text_stats import caption_length, caption_lengths, caption_words, lexical_diversity, normalize_caption


def blip_pre_caption(caption: str) -> str:
    """BLIP's data/utils.py pre_caption, transcribed step by step (no word budget)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    return caption.rstrip("\n").strip(" ")


CASES = [
    "A man riding a wave on top of a surfboard.",
    "  Two DOGS!!  playing (in) the *snow*; #winter: ~fun~  ",
    'He said "hi"... then left.',
    "a\ttab and\nnewline",
    "",
    "...",
    "don't stop-believing, it's 3.5 km",
]


@pytest.mark.parametrize("text", CASES)
def test_words_match_blip_pre_caption(text):
    assert caption_words(text) == blip_pre_caption(text).split()


def test_normalize_caption_examples():
    assert normalize_caption("  Two DOGS!!  playing (in) the *snow*; ") == "two dogs playing in the snow"
    assert normalize_caption("a\ttab\n") == "a tab"
    assert normalize_caption("don't stop-believing, 3.5") == "don't stop-believing, 3 5"
    with pytest.raises(TypeError, match="str"):
        normalize_caption(None)


def test_caption_length_is_mean_word_count():
    captions = ["A dog.", "two cats on a bed", "", "hello (world)"]
    assert caption_lengths(captions) == [2, 5, 0, 2]
    assert caption_length(captions) == pytest.approx(9 / 4)
    with pytest.raises(ValueError, match="empty"):
        caption_length([])
    with pytest.raises(TypeError, match="single str"):
        caption_length("a dog")


def naive_diversity(captions):
    words = [normalize_caption(c).split() for c in captions]
    unigrams, bigrams, vocab, distinct_bigrams, ttrs = 0, 0, set(), set(), []
    for ws in words:
        for i, w in enumerate(ws):
            unigrams += 1
            vocab.add(w)
            if i + 1 < len(ws):
                bigrams += 1
                distinct_bigrams.add((w, ws[i + 1]))
        ttrs.append(len(set(ws)) / len(ws) if ws else 0.0)
    return {"vocab_size": len(vocab), "distinct_1": 100 * len(vocab) / unigrams,
            "distinct_2": 100 * len(distinct_bigrams) / bigrams, "ttr": sum(ttrs) / len(ttrs)}


def test_lexical_diversity_hand_case():
    captions = ["A dog on a dog.", "a cat on a mat", "dog"]
    # words: [a dog on a dog] [a cat on a mat] [dog]: 11 unigrams, 5 types {a dog on cat mat}
    # bigrams: (a,dog)(dog,on)(on,a)(a,dog) | (a,cat)(cat,on)(on,a)(a,mat) -> 8, distinct 6
    # per-caption type/token: 3/5, 4/5, 1/1
    got = lexical_diversity(captions)
    assert got["vocab_size"] == 5
    assert got["distinct_1"] == pytest.approx(100 * 5 / 11)
    assert got["distinct_2"] == pytest.approx(100 * 6 / 8)
    assert got["ttr"] == pytest.approx((3 / 5 + 4 / 5 + 1) / 3)
    assert got == pytest.approx(naive_diversity(captions))


def test_lexical_diversity_matches_naive_on_synthetic_set():
    import random

    from metrics_fixtures import synthetic_caption

    rng = random.Random(3)
    captions = [synthetic_caption(rng) for _ in range(200)]
    assert lexical_diversity(captions) == pytest.approx(naive_diversity(captions))


def test_lexical_diversity_degenerate_sets():
    got = lexical_diversity(["dog", ""])
    assert got == {"vocab_size": 1, "distinct_1": 100.0, "distinct_2": 0.0, "ttr": 0.5}
    assert lexical_diversity([""]) == {"vocab_size": 0, "distinct_1": 0.0, "distinct_2": 0.0, "ttr": 0.0}


def test_repetition_hand_cases():
    from metrics.text_stats import REPETITION_KEYS, has_repeated_ngram, repeated_ngram_share, repetition

    captions = [
        "a man on a surfboard on a surfboard on a surfboard.",  # loop: "on a surfboard" x3 -> 3- and 4-grams repeat
        "A dog on the left and a cat on the left.",  # "on the left" twice: a 3-gram, no 4-gram
        "a red bus parked in the street",  # no repeat
        "",  # empty: no n-grams
    ]
    assert has_repeated_ngram("on a surfboard on a surfboard".split(), 3)
    assert not has_repeated_ngram("a b c a b".split(), 3) and has_repeated_ngram("a b c a b".split(), 2)
    assert repeated_ngram_share(captions, 3) == 50.0
    assert repeated_ngram_share(captions, 4) == 25.0
    assert repetition(captions) == {"repeated_3gram_share": 50.0, "repeated_4gram_share": 25.0}
    assert tuple(repetition(captions)) == REPETITION_KEYS
    # words are the BLIP-normalised ones the diversity statistics count: case and punctuation do not hide a loop
    assert repetition(["The dog. the dog; THE DOG"]) == {"repeated_3gram_share": 100.0, "repeated_4gram_share": 100.0}
    assert repetition(["the dog and the cat"]) == {"repeated_3gram_share": 0.0, "repeated_4gram_share": 0.0}
    with pytest.raises(ValueError, match="empty"):
        repetition([])
    with pytest.raises(ValueError, match="at least 1"):
        has_repeated_ngram(["a"], 0)
