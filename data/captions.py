"""Caption text normalisation and image-id parsing, exactly as BLIP does them.

BLIP normalises every training caption with `pre_caption` before tokenising, and names each
evaluation image by the integer at the end of its file name (the COCO / Flickr30K image id).
Both live here so that datasets, the toy generator and the metrics agree on them.
"""

from __future__ import annotations

import re
from pathlib import Path

# BLIP's character class: these become spaces. Commas, apostrophes, hyphens, slashes and
# question marks are kept, because BLIP's regex keeps them and the released checkpoints were
# fine-tuned on text that still contains them.
_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
# BLIP collapses runs of two or more whitespace characters only; a single tab or newline between
# two words survives. We keep that quirk so our captions match BLIP's byte for byte.
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def pre_caption(caption: str, max_words: int | None = 50) -> str:
    """Normalise a caption the way BLIP's `pre_caption` does.

    Steps, in BLIP's order: lower-case; replace each of ``. ! " ( ) * # : ; ~`` with a space;
    replace every run of 2+ whitespace characters with one space; strip a trailing newline, then
    leading/trailing spaces; keep at most `max_words` space-separated words.

    Args:
        caption: raw annotator text.
        max_words: word budget (BLIP trains with 30 and evaluates references untruncated);
            None keeps every word.

    Returns:
        The normalised caption; may be "" when the input held only punctuation/whitespace, which
        callers treat as an annotation error.
    """
    if not isinstance(caption, str):
        raise TypeError(f"pre_caption expects a str caption, got {type(caption).__name__}: {caption!r}")
    if max_words is not None and max_words < 1:
        raise ValueError(f"max_words must be a positive integer or None, got {max_words!r}")
    caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    if max_words is not None:
        words = caption.split(" ")
        if len(words) > max_words:
            caption = " ".join(words[:max_words])
    return caption


def image_id_from_path(path: str | Path) -> int:
    """The integer at the end of an image file's stem, BLIP's evaluation image id.

    ``val2014/COCO_val2014_000000184613.jpg`` -> 184613, ``flickr30k-images/1000092795.jpg`` ->
    1000092795, ``images/toy_000012.png`` -> 12. Ids come from file names rather than from the
    annotation's ``image_id`` field because BLIP's val/test files carry no id at all and its train
    files use strings such as ``"coco_391895"``.

    Raises:
        ValueError: naming `path` when its stem does not end in digits.
    """
    match = _TRAILING_DIGITS.search(Path(path).stem)
    if match is None:
        raise ValueError(
            f"cannot derive an integer image id from {str(path)!r}: the file name must end in "
            f"digits before the extension (e.g. COCO_val2014_000000184613.jpg)"
        )
    return int(match.group(1))
