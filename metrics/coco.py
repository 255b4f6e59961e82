"""Accuracy metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and opt-in SPICE.

The numbers equal what pycocoevalcap's `COCOEvalCap` reports for the same results and ground
truth (tests/test_metrics_coco.py checks this), with three practical differences in *how* they are
obtained:

* Tokenisation runs Stanford's PTBTokenizer (the jar pycocoevalcap ships) once over candidates and
  references together, with its stderr captured and its temporary file in the system temp dir.
  pycocoevalcap's wrapper starts Java twice, prints, and writes into its own (possibly read-only)
  package directory. The command line and the punctuation filter are pycocoevalcap's.
* Output is quiet unless ``verbose``: the scorers' prints are redirected.
* Without Java (`java_available()` is False) METEOR and SPICE cannot run. Then one warning says
  so, captions are tokenised by `fallback_tokenize`, a pure-Python imitation of PTBTokenizer +
  pycocoevalcap's punctuation filter, and only BLEU, ROUGE-L and CIDEr are returned. On ordinary
  caption text the fallback produces exactly the Java tokens (tested against the jar), so these
  three scores are unchanged.

All scores are in pycocoevalcap's 0-1 scale. CIDEr's document frequencies come from the
references of the scored images, so CIDEr depends on which images are scored.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from ._common import MetricInputError, read_json_file

logger = logging.getLogger(__name__)

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
COCO_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr")
JAVA_FREE_KEYS = (*BLEU_KEYS, "ROUGE_L", "CIDEr")

# The tokens pycocoevalcap removes after PTB tokenisation (its own list, so both paths agree).
PTB_PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)
_PTB_JAR = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
# PTBTokenizer runs with -preserveLines: one caption per line, so no caption may contain a break.
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x85\u2028\u2029]")


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a `java` executable is on PATH and ``java -version`` runs successfully.

    Cached: the answer does not change within a process, and the probe starts a JVM.
    """
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------
def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise with Stanford PTBTokenizer exactly as pycocoevalcap does, then drop its punctuation.

    Same command (``-preserveLines -lowerCase``) and same filter as
    `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`; line breaks inside a caption become spaces.

    Returns:
        One space-joined token string per input caption, in input order.
    """
    lines = [_LINE_BREAKS.sub(" ", c) for c in captions]
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(lines))
    try:
        proc = subprocess.run(
            ["java", "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", "-encoding", "utf-8", handle.name],
            capture_output=True,
        )
    finally:
        os.remove(handle.name)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Stanford PTBTokenizer ({_PTB_JAR}) failed with exit code {proc.returncode}: "
            f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return [_drop_punctuation(line.rstrip().split(" ")) for line in out[: len(lines)]]


_CONTRACTIONS = re.compile(r"\b(cannot|gonna|gotta|wanna|gimme|lemme)\b")
_CONTRACTION_SPLIT = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta",
                      "wanna": "wan na", "gimme": "gim me", "lemme": "lem me"}
_NEGATION = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_FALLBACK_TOKEN = re.compile(
    r"""
      n't\b | '(?:s|re|ve|ll|d|m)\b                                  # clitics split off above
    | (?<!\w)(?:[^\W\d_]\.){2,}(?!\w)                                # acronyms: u.s.a. e.g. a.m.
    | (?<!\w)(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|mt|no)\.(?!\w)      # abbreviations keep the period
    | (?<![\w.])[^\W\d_]\.(?!\w)                                     # an initial: "c."
    | \#[^\W\d_]\w*                                                  # hashtags stay whole
    | \w+(?:(?:[-.'/@]|(?<=\d)[,:](?=\d))\w+)*                       # words: man-made 3.5 1,000 10:30
    | \.{2,} | -+ | [!?]+ | `+ | '+ | "                              # punctuation runs
    | \S                                                             # any other symbol on its own
    """,
    re.VERBOSE,
)
# PTB escapes brackets; pycocoevalcap's filter lists them upper-case, so after -lowerCase they stay.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def fallback_tokenize(caption: str) -> str:
    """Pure-Python stand-in for PTBTokenizer + pycocoevalcap's punctuation filter (no Java needed).

    Reproduces what PTB does to caption text: lower-case; split clitics (``man's`` -> ``man 's``,
    ``isn't`` -> ``is n't``, ``cannot`` -> ``can not``); split punctuation off words but keep it
    inside numbers (``3.5``, ``1,000``, ``10:30``), hyphenated words, acronyms (``u.s.``), common
    abbreviations (``mr.``, ``etc.``) and initials; brackets become ``-lrb-`` etc. (which survive
    pycocoevalcap's upper-case filter, as they do with Java); then drop pycocoevalcap's punctuation
    tokens. Known differences from the jar, all rare in captions: PTB's longer abbreviation list,
    ``y'all``/``'tis``/``'90s``, HTML entities other than ``&amp;``, digit-letter splits such as
    ``1.5x``, and SGML tags.
    """
    text = _LINE_BREAKS.sub(" ", caption).lower().replace("&amp;", "&")
    text = _CONTRACTIONS.sub(lambda m: _CONTRACTION_SPLIT[m.group(1)], text)
    text = _CLITIC.sub(r" '\1", _NEGATION.sub(" n't", text))
    tokens = _FALLBACK_TOKEN.findall(text)
    return _drop_punctuation(_fallback_canonical(t) for t in tokens)


def _fallback_canonical(token: str) -> str:
    """The form PTB gives a token: escaped brackets, quotes as '', dot runs as an ellipsis."""
    if token in _BRACKETS:
        return _BRACKETS[token]
    if set(token) <= {"'", "`", '"'}:
        return "''"
    return "..." if token.startswith("..") else token


def _drop_punctuation(tokens) -> str:
    return " ".join(t for t in tokens if t and t not in PTB_PUNCTUATIONS)


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------
def read_coco_gt(gt: dict | str | Path) -> tuple[dict, str]:
    """Load COCO-caption-format ground truth and check its shape.

    Args:
        gt: a dict ``{"images": [{"id", ...}], "annotations": [{"image_id", "caption"}, ...]}`` or
            the path of a JSON file holding one.

    Returns:
        ``(gt_dict, name)``; `name` is the file path (or ``"<ground-truth dict>"``) for messages.
    """
    if isinstance(gt, (str, Path)):
        name = str(gt)
        gt = read_json_file(gt, "ground-truth annotation file")
    else:
        name = "<ground-truth dict>"
    if not isinstance(gt, dict):
        raise MetricInputError(f"{name}: expected a COCO caption dict with 'images' and 'annotations', "
                         f"got a {type(gt).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(gt.get(key), list):
            raise MetricInputError(f"{name}: COCO caption ground truth needs a list under '{key}' "
                             f"(found keys: {sorted(gt)})")
    for i, image in enumerate(gt["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise MetricInputError(f"{name}: images[{i}] has no 'id': {image!r}")
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise MetricInputError(f"{name}: annotations[{i}] needs 'image_id' and a str 'caption': {ann!r}")
    return gt, name


def references_by_image(gt: dict) -> dict[Hashable, list[str]]:
    """``{image_id: [reference captions]}`` for every image in ``gt["images"]`` (possibly [])."""
    refs: dict[Hashable, list[str]] = {image["id"]: [] for image in gt["images"]}
    for ann in gt["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return refs


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def coco_caption_metrics(
    results: Sequence[dict],
    gt: dict | str | Path,
    spice: bool = False,
    verbose: bool = False,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE if asked) of `results` against `gt`.

    Args:
        results: ``[{"image_id": id, "caption": str}, ...]``, one entry per image.
        gt: COCO caption ground truth, a dict or a JSON path (see `read_coco_gt`).
        spice: also compute SPICE. pycocoevalcap downloads Stanford CoreNLP models for it on first
            use, and it needs Java and several GB of memory.
        verbose: let pycocoevalcap print its progress.

    Scored images are those in results ∩ GT, as with COCOEvalCap; result ids absent from the GT
    are named in a warning and skipped (`metrics.suite` turns that into an error before getting
    here). A scored image without any reference caption is an error.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}`` as floats in 0-1; without
        Java only ``Bleu_1..4, ROUGE_L, CIDEr``.
    """
    gt, gt_name = read_coco_gt(gt)
    refs = references_by_image(gt)
    candidates: dict[Hashable, str] = {}
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise MetricInputError(f"results[{i}] needs 'image_id' and a str 'caption': {entry!r}")
        if entry["image_id"] in candidates:
            raise MetricInputError(f"results hold image_id {entry['image_id']!r} more than once; "
                             "COCO caption metrics need one caption per image")
        candidates[entry["image_id"]] = entry["caption"]
    ids = [i for i in candidates if i in refs]
    unknown = [i for i in candidates if i not in refs]
    if unknown:
        logger.warning("coco_caption_metrics: %d result image ids are not in %s and are not scored "
                       "(first: %s)", len(unknown), gt_name, unknown[:5])
    if not ids:
        raise MetricInputError(f"no result image_id is in {gt_name}; nothing to score")
    without_refs = [i for i in ids if not refs[i]]
    if without_refs:
        raise MetricInputError(f"{gt_name}: {len(without_refs)} scored images have no reference caption "
                         f"(first: {without_refs[:5]})")

    java = java_available()
    if not java:
        skipped = "METEOR and SPICE" if spice else "METEOR"
        logger.warning(
            "Java was not found (needed by pycocoevalcap's PTBTokenizer, METEOR and SPICE): %s skipped; "
            "tokenising with the pure-Python PTB fallback and reporting BLEU, ROUGE_L and CIDEr only. "
            "Install a Java runtime (>= 8) for the full set.", skipped,
        )
    texts = [candidates[i] for i in ids] + [r for i in ids for r in refs[i]]
    tokens = ptb_tokenize(texts) if java else [fallback_tokenize(t) for t in texts]
    res_tok = {i: [tokens[k]] for k, i in enumerate(ids)}
    gts_tok, start = {}, len(ids)
    for i in ids:
        gts_tok[i] = tokens[start: start + len(refs[i])]
        start += len(refs[i])

    scores: dict[str, float] = {}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=int(verbose))
        scores.update(zip(BLEU_KEYS, map(float, bleu)))
        if java:
            meteor = Meteor()
            try:
                scores["METEOR"] = float(meteor.compute_score(gts_tok, res_tok)[0])
            finally:
                del meteor  # its __del__ stops the METEOR JVM now rather than at interpreter exit
        scores["ROUGE_L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])
        if spice and java:
            scores["SPICE"] = _spice(gts_tok, res_tok)
    return scores


def _spice(gts_tok: dict, res_tok: dict) -> float:
    from pycocoevalcap.spice import spice as spice_module

    try:
        return float(spice_module.Spice().compute_score(gts_tok, res_tok)[0])
    except Exception as err:  # download, Java version or memory problems all surface here
        raise RuntimeError(
            "SPICE failed. It needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use "
            f"into {Path(spice_module.__file__).parent / 'lib'}, plus Java and ~8 GB of memory "
            f"(the jar runs with -Xmx8G). Cause: {type(err).__name__}: {err}"
        ) from err
