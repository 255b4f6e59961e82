"""What every family's ``generate_ids`` checks of the options that choose how many sequences come back and which
n-grams may repeat, so that a bad value fails with the same message whatever the family (transformers' own
messages name its internals, and a negative ``no_repeat_ngram_size`` it silently ignores)."""
from __future__ import annotations


def check_generation_counts(sample: bool, num_beams: int, no_repeat_ngram_size: int,
                            num_return_sequences: int) -> None:
    """Raise ValueError naming the option for: ``num_beams`` < 1, ``no_repeat_ngram_size`` < 0 (0 is off),
    ``num_return_sequences`` < 1, or, under beam search, more sequences than beams (a beam search keeps only
    ``num_beams`` hypotheses, so it has no more to return)."""
    for name, value, least in (("num_beams", num_beams, 1), ("no_repeat_ngram_size", no_repeat_ngram_size, 0),
                               ("num_return_sequences", num_return_sequences, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not sample and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences {num_return_sequences} exceeds num_beams {num_beams}: beam search "
                         "returns at most its beams (raise num_beams, or sample)")
