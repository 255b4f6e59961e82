"""FineCapEval (Cho et al., NAACL Findings 2022): per-criterion phrase recall ("Acc") of generated captions.

FineCapEval.csv has one row per (image, annotation) with columns ``image`` (a file name), ``caption`` (a
reference caption) and ``background``, ``object``, ``relation``: each a list of ground-truth phrases written in
one cell, separated by the two characters ``\\;``. `finecap_scores` gives, per criterion, the "Acc" of the
authors' scorer; `finecapeval_gt` gives COCO-format ground truth from the ``caption`` column, so the usual COCO
metrics are the "overall" score.

Exact behaviour, as read from the authors' scorer (j-min/CLIP-Caption-Reward, ``tools/eval_finecapeval.py``,
which published FineCapEval numbers come from); every point below is reproduced here:

Reading (that script reads the file with ``pandas.read_csv`` defaults; this module uses the csv module and
imitates those defaults, so pandas is not needed):

* A row is dropped whole (its caption too) when any of caption/background/object/relation is not a string in
  pandas' eyes: an empty cell, or one of pandas' default missing-value words (`PANDAS_NA`: "NA", "N/A", "null",
  "nan", "None", ...; compared exactly, no stripping), or a column that pandas would parse as numbers or
  booleans (every non-missing cell numeric, or every one True/False). Blank lines are skipped, as pandas does.
* Rows are grouped by ``image.split('.')[0]`` (the file name up to its *first* dot): rows of the same image
  add their caption to the references and their phrases to the image's phrase lists. An image whose rows are
  all dropped is not scored.
* The script asserts exactly 5000 rows and 5 columns; here any number of rows works (subsets) and extra columns
  are ignored, but the five named columns must be there.

Phrases (per cell): the cell is lower-cased, split on ``\\;`` (nothing else: no stripping), and a piece is kept
only if it has more than one *character* (so ``" a"`` is kept, ``"a"`` or ``" "`` is not). A kept piece is
NLTK-``word_tokenize``-d (Punkt sentence splitting with NLTK's English ``punkt_tab`` model, then NLTK's
improved Treebank word tokenizer per sentence), each token is stemmed with NLTK's default ``PorterStemmer()``
(mode NLTK_EXTENSIONS, which also lower-cases), then every character outside ``[a-zA-Z0-9]`` is deleted from
each stemmed token. The tokens are joined by spaces and later split on whitespace, so tokens that became empty
(pure punctuation) vanish, but a phrase left with no word still counts as a phrase.

Scoring (per criterion, per image): for each phrase, ``found / n_words`` where ``found`` counts the phrase's
stemmed words ``w`` with ``w in caption``: a plain *substring* test on the raw generated caption string
(case-sensitive, not tokenised, not stemmed; "dog" is found in "hotdogs", "Dog" in a caption is not found by
"dog"). A phrase with no words adds 0. The sum is divided by the number of phrases (an image with no phrases
scores 0 and still counts). Acc = mean over images x 100. The script prints Acc with two decimals; here it is
returned unrounded.

Differences that do not change a number: the script keys results by the stem (``{stem: caption}``); this
repository's results use the CSV's ``image`` value (the file name) as ``image_id``, mapped to the stem the
same way. The script raises KeyError when an image has no prediction; here the metric suite warns and scores
the images that have one (``num_missing``).

Tokenising and stemming are NLTK's own (`metrics/nltk_text.py`, which also explains where the Punkt model comes
from offline).
"""
from __future__ import annotations

import csv
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import MetricInputError, MetricInputNotFound
from .nltk_text import porter_stemmer, word_tokenizer

if TYPE_CHECKING:
    from .suite import ScoringContext

CRITERIA = ("background", "object", "relation")
COLUMNS = ("image", "caption", *CRITERIA)
FINECAP_KEYS = tuple(f"finecap_{criterion}" for criterion in CRITERIA)
PHRASE_SEPARATOR = "\\;"  # the two characters backslash, semicolon
# pandas.read_csv's default missing-value strings (keep_default_na=True): such a cell is NaN, not a str.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
_PANDAS_TRUE = frozenset({"True", "TRUE", "true"})
_PANDAS_FALSE = frozenset({"False", "FALSE", "false"})
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*|\s*[+-]?(inf|Inf|INF|infinity|Infinity)\s*")
_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]")


class FineCapEvalError(MetricInputError):
    """A malformed FineCapEval.csv; the message names the file, row and column."""


@dataclass
class FineCapEvalData:
    """FineCapEval ground truth grouped per image, after the scorer's row filter and phrase processing.

    Attributes:
        path: the CSV, for messages.
        file_names: stem -> the first file name (``image`` value) seen for it, in file order.
        captions: stem -> reference captions of its kept rows.
        phrases: criterion -> stem -> processed phrases (stemmed words joined by spaces; may be "").
        dropped_rows: 1-based data-row numbers dropped for a missing / non-text cell.
        dropped_images: file names of the CSV with no kept row (never scored).
    """

    path: str
    file_names: dict[str, str] = field(default_factory=dict)
    captions: dict[str, list[str]] = field(default_factory=dict)
    phrases: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {c: {} for c in CRITERIA})
    dropped_rows: list[int] = field(default_factory=list)
    dropped_images: list[str] = field(default_factory=list)

    @property
    def all_file_names(self) -> set[str]:
        return set(self.file_names.values()) | set(self.dropped_images)


def image_stem(image: Hashable) -> str:
    """The scorer's image key: the file name up to its first dot (``"12.5.jpg"`` -> ``"12"``)."""
    return str(image).split(".")[0]


def process_phrase(phrase: str) -> str:
    """One ground-truth phrase -> its stemmed words joined by spaces (tokenise, stem, strip punctuation)."""
    stem = porter_stemmer()
    return " ".join(_NON_ALNUM.sub("", stem(token)) for token in word_tokenizer()(phrase))


def split_phrases(cell: str) -> list[str]:
    """A criterion cell -> processed phrases: lower-case, split on ``\\;``, keep pieces longer than 1 char."""
    return [process_phrase(piece) for piece in cell.lower().split(PHRASE_SEPARATOR) if len(piece) > 1]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_finecapeval_csv(path: str | Path) -> FineCapEvalData:
    """Read FineCapEval.csv as the authors' scorer does (module docstring): drop rows, group, process phrases.

    Raises:
        MetricInputNotFound: no such file (a FileNotFoundError and a MetricInputError: one line from the CLIs).
        FineCapEvalError: a missing column, a row with more cells than the header, or a row without an
            ``image`` name; the message names the file, row (1-based, after the header) and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricInputNotFound(f"FineCapEval CSV {path} does not exist")
    header, rows = _read_rows(path)
    text_columns = {name: _column_is_text([cells[header[name]] if header[name] < len(cells) else ""
                                           for _, cells in rows]) for name in COLUMNS[1:]}
    data = FineCapEvalData(path=str(path))
    seen_files: dict[str, bool] = {}
    for number, (line, cells) in enumerate(rows, start=1):
        if len(cells) > len(header):
            raise FineCapEvalError(f"{path}: row {number} (line {line}) has {len(cells)} cells, the header "
                                   f"{len(header)}")
        value = {name: cells[index] if index < len(cells) else "" for name, index in header.items()}
        image = value["image"]
        if image in PANDAS_NA:
            raise FineCapEvalError(f"{path}: row {number} (line {line}) column 'image' is empty or missing "
                                   f"({image!r}); every row needs an image file name")
        seen_files.setdefault(image, False)
        if any(not text_columns[name] or value[name] in PANDAS_NA for name in COLUMNS[1:]):
            data.dropped_rows.append(number)
            continue
        seen_files[image] = True
        stem = image_stem(image)
        if stem not in data.captions:
            data.file_names[stem] = image
            data.captions[stem] = []
            for criterion in CRITERIA:
                data.phrases[criterion][stem] = []
        data.captions[stem].append(value["caption"])
        for criterion in CRITERIA:
            data.phrases[criterion][stem].extend(split_phrases(value[criterion]))
    data.dropped_images = [name for name, kept in seen_files.items() if not kept]
    return data


def _read_rows(path: Path) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header_cells = next(reader, None)
            while header_cells == []:
                header_cells = next(reader, None)
            rows = [(reader.line_num, cells) for cells in reader if cells]  # pandas skips blank lines
    except (UnicodeDecodeError, csv.Error) as error:
        raise FineCapEvalError(f"{path}: not a readable UTF-8 CSV file: {error}") from error
    if header_cells is None:
        raise FineCapEvalError(f"{path}: empty file; expected a header with columns {list(COLUMNS)}")
    repeated = sorted({c for c in header_cells if header_cells.count(c) > 1 and c in COLUMNS})
    if repeated:
        raise FineCapEvalError(f"{path}: columns {repeated} appear more than once in the header")
    missing = [c for c in COLUMNS if c not in header_cells]
    if missing:
        raise FineCapEvalError(f"{path}: missing columns {missing} (header: {header_cells}); FineCapEval.csv "
                               f"needs {list(COLUMNS)}")
    return {name: header_cells.index(name) for name in COLUMNS}, rows


def _column_is_text(values: Sequence[str]) -> bool:
    """False when pandas would give this column a numeric or bool dtype (then no cell is a str)."""
    present = [v for v in values if v not in PANDAS_NA]
    if not present:
        return True  # every cell is missing anyway
    if all(_NUMBER.fullmatch(v) for v in present):
        return False
    if all(v in _PANDAS_TRUE or v in _PANDAS_FALSE for v in present):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def phrase_recall(phrases: Sequence[str], caption: str) -> float:
    """One image, one criterion: mean over phrases of the share of its words that are substrings of `caption`.

    Args:
        phrases: processed phrases (`split_phrases`); "" is a phrase with no words and adds 0.
        caption: the generated caption, raw.

    Returns:
        A value in [0, 1]; 0 for no phrases.
    """
    total = 0.0
    for phrase in phrases:
        words = phrase.split()
        if words:
            total += sum(word in caption for word in words) / len(words)
    return total / len(phrases) if phrases else 0.0


def finecap_scores(captions: Sequence[tuple[str, str]], data: FineCapEvalData) -> dict[str, float]:
    """Acc x 100 per criterion over the given images.

    Args:
        captions: ``[(stem, generated caption)]``, one per image to score (stems from `image_stem`).
        data: `read_finecapeval_csv` output.

    Returns:
        ``{"finecap_background", "finecap_object", "finecap_relation"}``, each in [0, 100].

    Raises:
        ValueError: no image, or a stem that is not a scored FineCapEval image.
    """
    if not captions:
        raise ValueError(f"{data.path}: no image to score")
    unknown = [stem for stem, _ in captions if stem not in data.captions]
    if unknown:
        raise ValueError(f"{data.path}: {len(unknown)} images are not (kept) FineCapEval images "
                         f"(first: {unknown[:10]})")
    return {key: 100.0 * sum(phrase_recall(data.phrases[criterion][stem], caption) for stem, caption in captions)
            / len(captions) for key, criterion in zip(FINECAP_KEYS, CRITERIA)}


def score_finecapeval_group(ctx: ScoringContext) -> dict[str, float]:
    """The "finecapeval" metric group (metrics/registry.py): `finecap_scores` of the scored captions, each image
    matched to its CSV rows by the GT's ``file_name`` (else its id) up to the first dot."""
    file_names = {image["id"]: image.get("file_name") or image["id"] for image in ctx.gt["images"]}
    return finecap_scores([(image_stem(file_names[i]), caption) for i, caption in ctx.scored], ctx.finecapeval)


def finecapeval_gt(data: FineCapEvalData) -> dict:
    """COCO-format ground truth from the ``caption`` column: image ``id`` = ``file_name`` = the CSV's file name.

    Annotation ids are 1, 2, ... in file order of the kept rows.
    """
    images = [{"id": name, "file_name": name} for name in data.file_names.values()]
    annotations = []
    for stem, name in data.file_names.items():
        for caption in data.captions[stem]:
            annotations.append({"id": len(annotations) + 1, "image_id": name, "caption": caption})
    return {"images": images, "annotations": annotations}
