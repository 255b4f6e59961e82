"""Exact grounding on the toy set: are the attributes a caption names the ones its scene has?

The toy analogue of CHAIR (Rohrbach et al. 2018), with exact ground truth instead of object annotations and
synonym lists. Each toy val/test image stores the attributes of its scene (``"toy_scene"`` in the GT's
``images`` entries: colour, shape, size, position, background), and the GT file stores the toy grammar
(``"toy_grammar"``: for each attribute, each value's phrases, e.g. position ``left`` -> ``["to the left",
"left"]``), so scoring needs only the GT file and no model. Both are written by data/toy.py.

Parsing: the caption is lower-cased, every character other than a-z and 0-9 becomes a space, and the
grammar's phrases are matched left to right, whole words only, without overlaps, the longest phrase first at
each position. "on a white background" is therefore read as the background before its "white" could be read
as a shape colour. A caption *mentions* an attribute when at least one of its phrases matches; the mention is
*right* when every value it names for that attribute is the scene's (a caption naming two colours, one of
them right, is wrong).

Keys (all in %, over the N captions scored unless said otherwise):

* ``ground_colour_shape``: captions whose colour and shape mentions are both present and right (a caption
  naming neither does not count as right);
* ``ground_any_wrong``: captions with at least one wrong attribute mention (CHAIR_s's analogue; a caption
  that mentions nothing is never wrong);
* ``ground_<attr>_mentioned``: captions that mention the attribute;
* ``ground_<attr>_precision``: of the captions that mention it, the share that are right (None when no
  caption mentions it).
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .suite import ScoringContext

# Fixed, so that the metric keys are stable; data/toy.py's ATTRIBUTES (tests check they agree).
TOY_ATTRIBUTES = ("colour", "shape", "size", "position", "background")
TOY_GROUNDING_KEYS = ("ground_colour_shape", "ground_any_wrong") + tuple(
    f"ground_{attribute}_{kind}" for attribute in TOY_ATTRIBUTES for kind in ("mentioned", "precision"))
_WORD_SEPARATORS = re.compile(r"[^a-z0-9]+")
_SHOW = 10


def normalise_caption(caption: str) -> str:
    """Lower case, runs of anything but a-z/0-9 as one space, no leading or trailing space."""
    return _WORD_SEPARATORS.sub(" ", caption.lower()).strip()


class ToyGrammarParser:
    """Finds the (attribute, value) pairs a caption names, using one compiled regex over all phrases.

    Args:
        grammar: ``{attribute: {value: [phrase, ...]}}`` covering every attribute of `TOY_ATTRIBUTES`
            (extra attributes are parsed too, so their words are not misread, but are not scored).

    Raises:
        ValueError: the grammar is not of that shape, lacks an attribute, has an empty phrase, or gives one
            phrase two meanings; the message names the attribute, value or phrase.
    """

    def __init__(self, grammar: Mapping, source: str = "<toy grammar>"):
        if not isinstance(grammar, Mapping):
            raise ValueError(f"{source}: 'toy_grammar' must map attribute -> value -> phrases, got "
                             f"a {type(grammar).__name__}")
        missing = [a for a in TOY_ATTRIBUTES if a not in grammar]
        if missing:
            raise ValueError(f"{source}: 'toy_grammar' lacks attributes {missing} (has {sorted(grammar)})")
        self.meaning: dict[str, tuple[str, str]] = {}
        self.values: dict[str, set[str]] = {}
        for attribute, values in grammar.items():
            if not isinstance(values, Mapping) or not values:
                raise ValueError(f"{source}: toy_grammar[{attribute!r}] must map each value to its phrases")
            self.values[attribute] = set(values)
            for value, phrases in values.items():
                if isinstance(phrases, str) or not isinstance(phrases, Sequence) or not phrases:
                    raise ValueError(f"{source}: toy_grammar[{attribute!r}][{value!r}] must be a non-empty list "
                                     f"of phrases, got {phrases!r}")
                for phrase in phrases:
                    key = normalise_caption(phrase) if isinstance(phrase, str) else ""
                    if not key:
                        raise ValueError(f"{source}: toy_grammar[{attribute!r}][{value!r}] has an empty or "
                                         f"non-text phrase {phrase!r}")
                    if self.meaning.get(key, (attribute, value)) != (attribute, value):
                        raise ValueError(f"{source}: phrase {phrase!r} names both {self.meaning[key]} and "
                                         f"{(attribute, value)}")
                    self.meaning[key] = (attribute, value)
        # Alternation tries alternatives in order, so longest first makes each match the longest phrase there.
        ordered = sorted(self.meaning, key=lambda p: (-len(p.split(" ")), -len(p), p))
        self.pattern = re.compile(r"(?<![a-z0-9])(?:" + "|".join(map(re.escape, ordered)) + r")(?![a-z0-9])")

    def mentions(self, caption: str) -> dict[str, set[str]]:
        """``{attribute: values named}`` for the attributes `caption` names (others absent)."""
        found: dict[str, set[str]] = {}
        for match in self.pattern.finditer(normalise_caption(caption)):
            attribute, value = self.meaning[match.group(0)]
            found.setdefault(attribute, set()).add(value)
        return found


def toy_grounding(captions: Sequence[str], scenes: Sequence[Mapping[str, str]], grammar: Mapping,
                  source: str = "<toy grammar>") -> dict[str, float | None]:
    """The grounding keys (module docstring) of N captions against their N scenes.

    Args:
        captions: N generated captions.
        scenes: N ``{attribute: value}`` dicts, each with every attribute of `TOY_ATTRIBUTES`, each value one
            of the grammar's.
        grammar: the toy grammar (see `ToyGrammarParser`).

    Returns:
        ``{key: value}`` for `TOY_GROUNDING_KEYS`, in that order.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions but {len(scenes)} scenes")
    if not captions:
        raise ValueError("no captions to score: the caption list is empty")
    parser = ToyGrammarParser(grammar, source)
    for index, scene in enumerate(scenes):
        bad = [a for a in TOY_ATTRIBUTES if not isinstance(scene, Mapping) or scene.get(a) not in parser.values[a]]
        if bad:
            raise ValueError(f"{source}: scene {index} ({scene!r}) lacks, or has a value outside the grammar for, "
                             f"attributes {bad}")
    mentioned = dict.fromkeys(TOY_ATTRIBUTES, 0)
    right = dict.fromkeys(TOY_ATTRIBUTES, 0)
    any_wrong = colour_shape = 0
    for caption, scene in zip(captions, scenes):
        found = parser.mentions(caption)
        correct = {a: found[a] == {scene[a]} for a in TOY_ATTRIBUTES if a in found}
        for attribute, is_right in correct.items():
            mentioned[attribute] += 1
            right[attribute] += is_right
        any_wrong += not all(correct.values())
        colour_shape += correct.get("colour", False) and correct.get("shape", False)
    n = len(captions)
    out: dict[str, float | None] = {"ground_colour_shape": 100.0 * colour_shape / n,
                                    "ground_any_wrong": 100.0 * any_wrong / n}
    for attribute in TOY_ATTRIBUTES:
        out[f"ground_{attribute}_mentioned"] = 100.0 * mentioned[attribute] / n
        out[f"ground_{attribute}_precision"] = (100.0 * right[attribute] / mentioned[attribute]
                                                if mentioned[attribute] else None)
    return out


def score_toy_grounding_group(ctx: ScoringContext) -> dict[str, float | None]:
    """The "toy_grounding" metric group (metrics/registry.py): `toy_grounding` of the scored captions against
    their scenes (``ctx.toy_scenes``, from `scenes_from_gt`)."""
    return toy_grounding(ctx.captions, *ctx.toy_scenes, source=ctx.gt_name)


def scenes_from_gt(gt: Mapping, ids: Sequence[Hashable], gt_name: str = "<ground truth>") -> tuple[list, Mapping]:
    """The scenes of images `ids` and the grammar, from a toy GT dict; a clear error when it has none.

    Returns:
        ``(scenes, grammar)``: one ``toy_scene`` dict per id, in order, and ``gt["toy_grammar"]``.
    """
    rebuild = ("only the toy set's val/test GT files (data/toy.py, format version 2 or later) carry them; "
               "rebuild an older toy cache by deleting it")
    if "toy_grammar" not in gt:
        raise ValueError(f"{gt_name}: metric group toy_grounding needs the toy grammar ('toy_grammar') and each "
                         f"image's scene attributes ('toy_scene'), but the file has no 'toy_grammar'; {rebuild}")
    scenes = {image["id"]: image.get("toy_scene") for image in gt["images"]}
    without = [i for i in ids if scenes.get(i) is None]
    if without:
        raise ValueError(f"{gt_name}: metric group toy_grounding needs each image's 'toy_scene'; {len(without)} "
                         f"scored images have none (first ids: {without[:_SHOW]}); {rebuild}")
    return [scenes[i] for i in ids], gt["toy_grammar"]
