"""Descriptiveness statistics computed from caption text alone: length and lexical diversity.

Every statistic here counts *words of BLIP-normalised captions* (`normalize_caption`), so that a
caption's length does not depend on trailing periods or on capitalisation, and so that the numbers
are comparable with the SMILE paper, whose captions come out of BLIP's normalisation.

Lexical diversity: the SMILE paper reports one "Lex. Div." number without a definition in our
material, so `lexical_diversity` returns the four standard candidates side by side:

==============  =====================================================================  ==========
key             definition                                                             range
==============  =====================================================================  ==========
``vocab_size``  number of distinct words used across all captions                      count
``distinct_1``  100 x distinct unigrams / all unigrams, pooled over the caption set    percent
``distinct_2``  100 x distinct bigrams / all bigrams, pooled over the caption set      percent
``ttr``         mean over captions of that caption's type-token ratio                  0-1
==============  =====================================================================  ==========

Bigrams never cross a caption boundary. The paper's values (4.5 for SMILE at 22.3 words per
caption, 3.6 for MLE+SMILE at 19.8, on 5,000 images, so ~100k words) are of the size distinct_1
gives there (a vocabulary of a few thousand words); that is a guess, not a confirmed definition,
and it is why the markdown table's "Lex. Div." column defaults to ``distinct_1`` and names it.

Repetition (the "repetition" group, beside diversity): ``repeated_3gram_share`` and ``repeated_4gram_share`` are the
percent of captions in which some word n-gram (n = 3, 4; the same words as above, within one caption) occurs more
than once. Degenerate loops ("a man on a surfboard on a surfboard on a surfboard") are a known failure of long
generated captions, and pooled diversity hides them: one looping caption among thousands barely moves distinct-n.
Both sizes are reported because they answer different questions: a repeated 4-gram is almost always a loop, while
a repeated 3-gram also catches shorter stutters but has natural hits in long descriptions ("on the left" twice).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .suite import ScoringContext

LEX_DIV_KEYS = ("vocab_size", "distinct_1", "distinct_2", "ttr")  # `lexical_diversity`'s keys, in its order
REPETITION_NGRAMS = (3, 4)
REPETITION_KEYS = tuple(f"repeated_{n}gram_share" for n in REPETITION_NGRAMS)  # `repetition`'s keys

# BLIP's pre_caption replaces exactly these characters with a space.
_BLIP_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """BLIP's `pre_caption` without the word budget: the form in which captions are counted.

    Lower-case; replace each of ``. ! " ( ) * # : ; ~`` by a space; collapse whitespace runs to one
    space; strip. BLIP collapses only runs of 2+ whitespace characters and strips only spaces and a
    trailing newline, so a lone tab can survive in its output; here every whitespace run becomes
    one space. The words (`str.split()`) are the same either way, and words are all we count.
    This module must not import data/ (metrics score results files with no data pipeline), hence
    the separate implementation.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
    return _WHITESPACE.sub(" ", _BLIP_PUNCTUATION.sub(" ", text.lower())).strip()


def caption_words(text: str) -> list[str]:
    """The words of one normalised caption (whitespace-separated); [] for an empty caption."""
    return normalize_caption(text).split()


def caption_lengths(captions: Sequence[str]) -> list[int]:
    """Number of words in each normalised caption, in input order."""
    return [len(caption_words(c)) for c in captions]


def caption_length(captions: Sequence[str]) -> float:
    """Mean number of words per caption (the paper's "Cap. Len.").

    Empty captions count as length 0 rather than being skipped: a model that emits nothing should
    score a shorter, not an unchanged, mean.
    """
    _require_captions(captions)
    lengths = caption_lengths(captions)
    return sum(lengths) / len(lengths)


def lexical_diversity(captions: Sequence[str]) -> dict[str, float]:
    """The four lexical-diversity candidates over a caption set (see the module docstring).

    Returns:
        ``{"vocab_size": int, "distinct_1": %, "distinct_2": %, "ttr": 0-1}``. distinct-n is 0 when
        the set holds no n-gram at all (every caption shorter than n words). An empty caption has
        no type-token ratio; it contributes 0 to the ``ttr`` mean (and still counts in the
        denominator) so that empty outputs lower the score instead of vanishing from it.
    """
    _require_captions(captions)
    tokenised = [caption_words(c) for c in captions]
    unigrams = [w for words in tokenised for w in words]
    bigrams = [pair for words in tokenised for pair in zip(words, words[1:])]
    vocabulary = set(unigrams)
    ttr = [len(set(words)) / len(words) if words else 0.0 for words in tokenised]
    return {
        "vocab_size": len(vocabulary),
        "distinct_1": 100.0 * len(vocabulary) / len(unigrams) if unigrams else 0.0,
        "distinct_2": 100.0 * len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "ttr": sum(ttr) / len(ttr),
    }


def has_repeated_ngram(words: Sequence[str], n: int) -> bool:
    """Whether some n-gram of ``words`` occurs more than once (False for fewer than n + 1 words)."""
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got {n}")
    ngrams = list(zip(*(words[k:] for k in range(n))))
    return len(set(ngrams)) < len(ngrams)


def repeated_ngram_share(captions: Sequence[str], n: int) -> float:
    """Percent of captions with a repeated word n-gram (module docstring); an empty caption has none."""
    _require_captions(captions)
    return 100.0 * sum(has_repeated_ngram(caption_words(c), n) for c in captions) / len(captions)


def repetition(captions: Sequence[str]) -> dict[str, float]:
    """``{"repeated_3gram_share": %, "repeated_4gram_share": %}`` (`REPETITION_KEYS`) over a caption set."""
    _require_captions(captions)
    tokenised = [caption_words(c) for c in captions]
    return {key: 100.0 * sum(has_repeated_ngram(words, n) for words in tokenised) / len(tokenised)
            for key, n in zip(REPETITION_KEYS, REPETITION_NGRAMS)}


def score_length_group(ctx: ScoringContext) -> dict[str, float]:
    """The "length" metric group (metrics/registry.py)."""
    return {"cap_len": caption_length(ctx.captions)}


def score_diversity_group(ctx: ScoringContext) -> dict[str, float]:
    """The "diversity" metric group (metrics/registry.py)."""
    return lexical_diversity(ctx.captions)


def score_repetition_group(ctx: ScoringContext) -> dict[str, float]:
    """The "repetition" metric group (metrics/registry.py)."""
    return repetition(ctx.captions)


def _require_captions(captions: Sequence[str]) -> None:
    if isinstance(captions, str):
        raise TypeError("expected a sequence of captions, got a single str")
    if len(captions) == 0:
        raise ValueError("no captions to score: the caption list is empty")
