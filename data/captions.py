"""Caption text normalisation and image-id parsing, exactly as BLIP does them.

BLIP normalises every training caption with `pre_caption` before tokenising, and names each
evaluation image by the integer at the end of its file name (the COCO / Flickr30K image id).
Both live here so that datasets, the toy generator and the metrics agree on them. An annotation
entry may instead carry its id as an integer ``id`` (`entry_image_id`): the files that
``scripts/prepare_data.py custom`` writes for a user's own images, whose names need not end in digits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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


def entry_image_id(entry: Mapping) -> int:
    """The image id of one annotation entry: its JSON integer ``id`` when it has one, else the integer at the end
    of its ``image`` file name (`image_id_from_path`, unchanged).

    ``id`` is this repository's extension of BLIP's format: ``scripts/prepare_data.py custom`` numbers a user's
    images 1..N so that their file names (or keys such as ``"cat photo"``) need not end in digits, the failure of
    LAVIS #598. BLIP's own ``image_id`` stays ignored: its train files hold strings such as ``"coco_391895"``, and
    its val/test files none, so reading it would break parity with the ids BLIP evaluates with.

    Raises:
        ValueError: ``id`` is present but not an integer (a bool is not one), or there is no ``id`` and the file
            name does not end in digits; the message starts with the key at fault.
    """
    if "id" in entry:
        value = entry["id"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"key 'id' must be a JSON integer (the image id), got {value!r}")
        return value
    try:
        return image_id_from_path(entry["image"])
    except ValueError as error:
        raise ValueError(f"key 'image': {error}; or give the entry an integer 'id'") from None
