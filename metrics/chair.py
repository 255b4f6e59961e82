"""CHAIR: object hallucination in captions (Rohrbach et al., EMNLP 2018, "Object Hallucination in Image Captioning").

A caption *mentions* an MSCOCO object when one of its words is in that category's synonym list
(`metrics/data/chair_synonyms.tsv`). A mention *hallucinates* when its category is not among the image's
ground-truth objects: the union of the categories of the image's COCO instance annotations and of the objects its
reference captions mention (the references go through the same word handling as the generated caption).

* ``CHAIR_i`` = hallucinated mentions / all mentions, over the whole corpus, repeats included (a caption saying
  "dog" twice counts two mentions), in %.
* ``CHAIR_s`` = captions with at least one hallucinated mention / all captions, in %.
* ``chair_objects_per_caption`` = mentions (repeats included, the CHAIR_i denominator) / captions. CHAIR alone
  rewards saying nothing: a caption that mentions no object hallucinates nothing, so read it beside this and
* ``chair_recall`` = sum over captions of |distinct mentioned categories in the GT| / sum of |GT categories|, in %
  (pooled over the corpus, as the CHAIR extensions in later work, e.g. OPERA, report "Recall").

What the reference code (LisaAnne/Hallucination, ``utils/chair.py``, latest version) does, reproduced here by
``variant="original"`` (the default, so numbers compare with papers):

1. Tokenise: ``nltk.word_tokenize(caption.lower())`` (Punkt sentence split, then the Treebank word rules).
2. Singularise every token with ``pattern.en.singularize`` (pattern 3.6), whatever its part of speech.
3. Merge two-word phrases, scanning left to right; when a token and the next form a listed phrase both are replaced
   by one word and the scan skips past them (so "hot dog" never also counts "dog"):
   the COCO compounds (motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light,
   fire hydrant, stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, tennis racket,
   wine glass, hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, laptop computer,
   stove top oven, home plate, train track) map to themselves; "baby X" and "adult X" map to X for X in bird, cat,
   dog, horse, sheep, cow, elephant, bear, zebra, giraffe, animal, cub (so "baby" does not fire "person");
   "passenger jet"/"passenger train" map to jet/train; "bow tie" maps to "tie"; "toilet seat" to "toilet";
   "wine glas" (what singularising "glass" gives) to "wine glass". A phrase that maps to itself but is not in the
   synonym list ("home plate", "train track", "motor bike" in the original list) silences both of its words.
4. If the merged caption contains both "toilet" and "seat", every "seat" is dropped (a toilet seat is no chair).
5. Keep the words that are synonym-list entries, map each to its category (the first entry of its line; a word on
   two lines maps to the later line). Every kept word is one mention.
6. GT: each instance annotation's category name is mapped through the same dict; the reference captions' mapped
   categories are added; a set per image. The original reads train2014+val2014 instances; one file covering the
   scored images (the Karpathy val/test images are all in val2014) gives the same sets.

Quirks the original has and ``variant="original"`` keeps (they change counts): pattern turns "bus" into "bu",
"minibus"/"airbus" into "minibu"/"airbu", and "ties" into "ty", so those never count ("buses" -> "bus" does); pattern's
list of -ie nouns returns the *plural* unchanged ("doggies", "collies" stay so and never count); the list's
" motor bike" and " cheesecake" carry a leading space and "iPhone" a capital, so they never match a lower-cased token.
``variant="corrected"`` fixes exactly those (words ending in "bus" stay, "ties" -> "tie", -ie plurals -> their
singular, entries stripped and lower-cased) and reports under ``*_corrected`` keys. Everything else is shared.

Tokenising is NLTK's own ``word_tokenize`` (`metrics/nltk_text.py`, with its English Punkt model available
offline). `pattern` no longer installs on current Python, so its singulariser is re-implemented:

* `pattern_singularize` follows pattern 3.6's ``singularize`` rule for rule: hyphenated compounds with a
  preposition ("mothers-in-law"), trailing-apostrophe genitives, the uninflected and uncountable word lists (a token
  that is the *ending* of a listed word is returned as is, e.g. "is" from "debris"), the -ie list (with its
  plural-returning bug), the irregular plurals (also matched as endings: "women" -> "woman", "flour" -> "flmy"),
  then the first matching suffix rule. All of pattern's English singular rules are implemented, not a subset;
  its word lists are data, re-expressed here with their source named.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .nltk_text import word_tokenizer

from ._common import MetricInputError, read_json_file

if TYPE_CHECKING:
    from .suite import ScoringContext

logger = logging.getLogger(__name__)

SYNONYMS_PATH = Path(__file__).resolve().parent / "data" / "chair_synonyms.tsv"
VARIANTS = ("original", "corrected")
CHAIR_KEYS = ("CHAIR_s", "CHAIR_i", "chair_objects_per_caption", "chair_recall")
CHAIR_CORRECTED_KEYS = tuple(f"{key}_corrected" for key in CHAIR_KEYS)
_SHOW = 10

def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``, NLTK's own (`metrics/nltk_text.py`), as the reference code calls it."""
    return word_tokenizer()(text)


# ---------------------------------------------------------------------------------------------
# Singulariser: pattern 3.6's pattern.en.singularize
# ---------------------------------------------------------------------------------------------
_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below", "for",
    "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto", "around",
    "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart", "betwixt", "beyond",
    "but", "by",
))
_UNINFLECTED = (
    "bison", "bream", "breeches", "britches", "carp", "chassis", "christmas", "clippers", "cod", "contretemps",
    "corps", "debris", "diabetes", "djinn", "eland", "elk", "flounder", "gallows", "georgia", "graffiti",
    "headquarters", "herpes", "high-jinks", "homework", "innings", "jackanapes", "mackerel", "measles", "mews",
    "mumps", "news", "pincers", "pliers", "proceedings", "rabies", "salmon", "scissors", "series", "shears",
    "species", "swine", "swiss", "trout", "tuna", "whiting", "wildebeest",
)
_UNCOUNTABLE = (
    "advice", "bread", "butter", "cheese", "electricity", "equipment", "fruit", "furniture", "garbage", "gravel",
    "happiness", "information", "ketchup", "knowledge", "love", "luggage", "mathematics", "mayonnaise", "meat",
    "mustard", "news", "progress", "research", "rice", "sand", "software", "understanding", "water",
)
# "^pie" and "^tie" are literal strings in pattern (no token ends in "^ties"), which is why "ties" -> "ty".
_IE_WORDS = (
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie", "sortie",
    "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie", "^pie",
    "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie", "quickie",
    "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie",
)
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
# (suffix pattern, replacement), first match wins; pattern's order. Rules without (?i) are case-sensitive in pattern.
_SUFFIX_RULES = [(re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"), (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"), (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"), (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"), (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"), (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"), (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""),
)]


@functools.lru_cache(maxsize=65536)
def pattern_singularize(word: str, corrected: bool = False) -> str:
    """``pattern.en.singularize(word)`` (pattern 3.6); ``corrected=True`` fixes the quirks CHAIR inherits.

    The corrected form keeps words ending in "bus" ("bus" -> "bus", not "bu"), maps "ties" -> "tie" and returns
    the singular of the -ie nouns ("doggies" -> "doggie") instead of the unchanged plural.
    """
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return pattern_singularize(parts[0], corrected) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return pattern_singularize(word[:-1], corrected) + "'s"
    lower = word.lower()
    if corrected and lower.endswith("bus"):
        return word
    if any(listed.endswith(lower) for listed in _UNINFLECTED) or any(listed.endswith(lower) for listed in _UNCOUNTABLE):
        return word
    for ie_word in _IE_WORDS:
        if corrected and ie_word.startswith("^"):
            if lower == ie_word[1:] + "s":
                return ie_word[1:]
        elif lower.endswith(ie_word + "s"):
            return lower[:-1] if corrected else lower  # pattern returns the plural here
    for plural, singular in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for suffix, replacement in _SUFFIX_RULES:
        match = suffix.search(word)
        if match:
            for index, group in enumerate(match.groups(), start=1):
                if group is None:
                    replacement = replacement.replace(f"\\{index}", "")
            return suffix.sub(replacement, word)
    return word


# ---------------------------------------------------------------------------------------------
# Vocabulary and caption parsing
# ---------------------------------------------------------------------------------------------
_SELF_PHRASES = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")


def _phrases() -> dict[str, str]:
    phrases = {phrase: phrase for phrase in _SELF_PHRASES}
    for animal in _ANIMAL_WORDS:
        phrases[f"baby {animal}"] = phrases[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        phrases[f"passenger {vehicle}"] = vehicle
    phrases.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return phrases


PHRASES = _phrases()


def read_synonyms(path: str | Path = SYNONYMS_PATH) -> list[list[str]]:
    """The synonym table as the original's lines: ``[[category, word, word, ...], ...]`` (80 lines)."""
    path = Path(path)
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        category, _, words = line.rstrip("\r\n").partition("\t")
        if not category or category != category.strip():
            raise ValueError(f"{path}:{number}: expected CATEGORY<TAB>WORD, WORD, ... got {line!r}")
        lines.append([category] + (words.split(", ") if words else []))
    return lines


@functools.lru_cache(maxsize=None)
def synonym_map(variant: str = "original") -> dict[str, str]:
    """``{word: category}`` for every synonym-list entry; a word on two lines maps to the later one."""
    _check_variant(variant)
    mapping: dict[str, str] = {}
    for line in read_synonyms():
        if variant == "corrected":
            line = [entry.strip().lower() for entry in line]
        for entry in line:
            mapping[entry] = line[0]
    return mapping


def caption_objects(caption: str, variant: str = "original") -> tuple[list[str], list[str]]:
    """The object mentions of one caption: ``(words, categories)``, in caption order, repeats kept.

    ``words`` are the matched (singularised, phrase-merged) words, ``categories`` their COCO categories.
    """
    mapping = synonym_map(variant)
    corrected = variant == "corrected"
    words = [pattern_singularize(token, corrected) for token in word_tokenize(caption.lower())]
    merged, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in PHRASES:
            merged.append(PHRASES[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [word for word in merged if word != "seat"]
    found = [word for word in merged if word in mapping]
    return found, [mapping[word] for word in found]


# ---------------------------------------------------------------------------------------------
# Ground truth and scores
# ---------------------------------------------------------------------------------------------
def read_coco_instances(path: str | Path) -> dict[int, set[str]]:
    """``{image_id: {category name, ...}}`` from a COCO instances file (``instances_val2014.json``).

    Every image listed under ``images`` is a key (an empty set when it has no annotation), so "not in this file"
    and "no objects" can be told apart. Bad JSON or a missing key is an error naming the file.
    """
    data = read_json_file(path, "COCO instances file")
    if not isinstance(data, dict):
        raise MetricInputError(f"COCO instances file {path}: expected a dict, got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise MetricInputError(f"COCO instances file {path}: needs a list under '{key}' (found keys: {sorted(data)}); "
                             "is this instances_*.json, not captions_*.json?")
    names = {}
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or not isinstance(category.get("name"), str):
            raise MetricInputError(f"COCO instances file {path}: categories[{index}] needs 'id' and a str 'name': "
                             f"{category!r}")
        names[category["id"]] = category["name"]
    objects: dict[int, set[str]] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise MetricInputError(f"COCO instances file {path}: images[{index}] has no 'id': {image!r}")
        objects[image["id"]] = set()
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise MetricInputError(f"COCO instances file {path}: annotations[{index}] needs 'image_id' and 'category_id': "
                             f"{ann!r}")
        if ann["category_id"] not in names:
            raise MetricInputError(f"COCO instances file {path}: annotations[{index}] has category_id "
                             f"{ann['category_id']!r}, which is not under 'categories'")
        objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    return objects


def gt_objects(references: Sequence[str], instance_categories: Iterable[str], variant: str = "original",
               source: str = "<instances>") -> set[str]:
    """One image's GT categories: its instance categories (mapped through the synonym list) and the objects its
    reference captions mention."""
    mapping = synonym_map(variant)
    objects = set()
    for name in instance_categories:
        if name not in mapping:
            raise MetricInputError(f"{source}: category {name!r} is not in the CHAIR synonym list {SYNONYMS_PATH} "
                             "(expected the 80 MSCOCO categories)")
        objects.add(mapping[name])
    for reference in references:
        objects.update(caption_objects(reference, variant)[1])
    return objects


def chair_scores(
    results_by_id: Mapping[Hashable, str],
    references_by_id: Mapping[Hashable, Sequence[str]],
    instance_categories_by_id: Mapping[Hashable, Iterable[str]],
    variant: str = "original",
    source: str = "<instances>",
) -> dict[str, float]:
    """CHAIR over one caption per image.

    Args:
        results_by_id: ``{image_id: generated caption}``.
        references_by_id: ``{image_id: [reference captions]}`` (an image may have none).
        instance_categories_by_id: ``{image_id: COCO category names}`` (`read_coco_instances`). A scored image
            missing from it gets its GT from its references only, with a warning; none present is an error.
        variant: "original" (the reference code's numbers) or "corrected" (module docstring).
        source: how messages name the instances (a file path).

    Returns:
        ``CHAIR_s``, ``CHAIR_i``, ``chair_recall`` (%) and ``chair_objects_per_caption``; with
        ``variant="corrected"`` the same keys suffixed ``_corrected``. CHAIR_i is 0 when no caption mentions an
        object (the original divides by zero there), recall 0 when no image has a GT object.
    """
    _check_variant(variant)
    if not results_by_id:
        raise MetricInputError("CHAIR: no captions to score")
    absent = [i for i in results_by_id if i not in instance_categories_by_id]
    if len(absent) == len(results_by_id):
        raise MetricInputError(f"{source}: none of the {len(absent)} scored images is in the instances file "
                         f"(first ids: {absent[:_SHOW]}); use the split's instances_*.json (val2014 for Karpathy "
                         "val/test) and check int vs str image ids")
    if absent:
        logger.warning("%s: %d of %d scored images are not in the instances file; their CHAIR ground truth comes "
                       "from the reference captions only (first ids: %s)", source, len(absent), len(results_by_id),
                       absent[:_SHOW])
    mentions = hallucinated = hallucinating_captions = recalled = gt_total = 0
    for image_id, caption in results_by_id.items():
        truth = gt_objects(references_by_id.get(image_id, ()), instance_categories_by_id.get(image_id, ()),
                           variant, source)
        _, categories = caption_objects(caption, variant)
        wrong = sum(category not in truth for category in categories)
        mentions += len(categories)
        hallucinated += wrong
        hallucinating_captions += wrong > 0
        recalled += len(truth.intersection(categories))
        gt_total += len(truth)
    scores = {
        "CHAIR_s": 100.0 * hallucinating_captions / len(results_by_id),
        "CHAIR_i": 100.0 * hallucinated / mentions if mentions else 0.0,
        "chair_objects_per_caption": mentions / len(results_by_id),
        "chair_recall": 100.0 * recalled / gt_total if gt_total else 0.0,
    }
    if variant == "corrected":
        return {f"{key}_corrected": value for key, value in scores.items()}
    return scores


def score_chair_group(ctx: ScoringContext) -> dict[str, float]:
    """The "chair" metric group (metrics/registry.py): `chair_scores` of the scored captions, original variant."""
    return chair_scores(dict(ctx.scored), ctx.references, ctx.instances, "original", ctx.instances_source)


def score_chair_corrected_group(ctx: ScoringContext) -> dict[str, float]:
    """The "chair_corrected" metric group: `chair_scores` with ``variant="corrected"``."""
    return chair_scores(dict(ctx.scored), ctx.references, ctx.instances, "corrected", ctx.instances_source)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"CHAIR variant must be one of {list(VARIANTS)}, got {variant!r}")
