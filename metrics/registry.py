"""The metric registry: every metric group the suite can score, declared once.

A group is a set of numbers computed together (``coco`` is BLEU-1..4, METEOR, ROUGE-L and CIDEr from one
pycocoevalcap pass). Its `MetricGroup` entry in `METRIC_GROUPS` says which keys it writes (with their direction and
their markdown-table column), what it needs (`NEEDS`), whether it is on by default, and which functions compute it;
those functions live in the module of their metric (coco.py, chair.py, ...). Everything else is derived from here:
`ALL_METRICS`, `DEFAULT_METRICS`, `METRIC_KEYS`, `IMAGE_METRICS`, `KEY_DIRECTIONS`, the table's columns
(`metrics.table`), the models eval_caption.py and the trainer check before scoring (training/inputs.py), and what
`metrics.suite.MetricSession` loads, prepares, checks and runs.

A group's functions (see `metrics.suite` for the two contexts):

* ``compute(ctx: ScoringContext) -> {key: value}``: the group's numbers for the scored captions, exactly the
  keys it declares (None for one that cannot be computed here, e.g. METEOR without Java).
* ``prepare(ctx: PreparationContext) -> state`` (optional): work that needs no caption (tokenising references,
  encoding images), started in the background before the captions exist; ``compute`` gets the state back from
  ``ctx.prepared(name)`` (None when the session runs without overlap, which never prepares). A state with a
  ``close()`` is closed with the session. The hooks of the groups that need CLIP run one after another in one
  thread, since they share the model and its embedding caches.
* ``clip_inputs(ctx: ScoringContext) -> (image paths, texts)`` (optional, groups needing CLIP): what ``compute``
  will embed. The session embeds those of every requested group in one pass before the first of them computes
  (images, then texts, in registry order), so the batches, and the float rounding, are the same whichever of
  these groups are asked.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._common import MetricInputError
from .chair import CHAIR_CORRECTED_KEYS, CHAIR_KEYS, score_chair_corrected_group, score_chair_group
from .clip_metrics import CLIPSCORE_KEYS, RETRIEVAL_KEYS, clipscore_clip_inputs, prepare_clipscore_group, prepare_retrieval_group, \
    retrieval_clip_inputs, score_clipscore_group, score_retrieval_group
from .coco import COCO_KEYS, prepare_coco_group, score_coco_group
from .finecapeval import FINECAP_KEYS, score_finecapeval_group
from .perplexity import score_ppl_group
from .text_stats import LEX_DIV_KEYS, REPETITION_KEYS, score_diversity_group, score_length_group, \
    score_repetition_group
from .toy_grounding import TOY_ATTRIBUTES, TOY_GROUNDING_KEYS, score_toy_grounding_group

# What a group can need; `metrics.suite.MetricSession` provides each one and checks it before any group runs, and
# training/inputs.py checks the sources of the models ("clip", "lm") before a run builds anything.
NEEDS = {
    "references": "reference captions for every scored image (the GT's annotations)",
    "images": "the scored images' files: MetricOptions.images_root / the GT's file_name",
    "clip": "a CLIP model (MetricOptions.clip_model), loaded once; its embeddings are shared by the groups needing it",
    "lm": "a causal language model (MetricOptions.ppl_model)",
    "instances": "COCO instance annotations (MetricOptions.instances)",
    "finecapeval": "the FineCapEval CSV (MetricOptions.finecapeval)",
    "toy_scenes": "the toy grammar and each image's scene attributes (the toy set's GT files carry them)",
}
HIGHER, LOWER = "higher", "lower"
COUNT_KEYS = ("num_images", "num_missing")  # written by the session for every request, before the groups' keys


@dataclass(frozen=True)
class Column:
    """Where a key goes in the markdown table (`metrics.table`).

    Attributes:
        header: the column's header.
        slot: left-to-right position; slots 0-7 are the SMILE paper's columns. Keys sharing a slot are alternatives
            shown in one column, chosen by the table's ``lex_div`` (the lexical-diversity statistics).
        scale: the value is multiplied by it (BLEU-4 and CIDEr are shown x100).
        fmt: format of the scaled value.
        always: shown in every table (a "-" when a run lacks it); otherwise only when some run has the key.
    """

    header: str
    slot: int
    scale: float = 1.0
    fmt: str = "{:.1f}"
    always: bool = False


@dataclass(frozen=True)
class MetricKey:
    """One number a group writes: its name in the metrics dict, which direction is better (`HIGHER`, `LOWER`, or
    None for a count or a statistic that is neither, e.g. caption length), and its table column, if any."""

    name: str
    better: str | None = HIGHER
    column: Column | None = None


@dataclass(frozen=True)
class MetricGroup:
    """A metric group (module docstring).

    Attributes:
        name: what ``--metrics`` / ``eval.metrics`` call it.
        keys: the keys it writes, in output order.
        compute: ``ctx -> {key: value}``; None for a group whose keys an included group's compute writes (SPICE
            comes out of the coco group's pycocoevalcap pass).
        needs: names from `NEEDS`.
        default: scored when no groups are named (the SMILE paper's set).
        includes: groups reported with this one (their keys too), e.g. finecapeval's "overall" score is coco.
        prepare: optional caption-independent work started before the captions exist (module docstring).
        clip_inputs: optional, for a group needing CLIP: the images and texts its compute embeds (module docstring).
        background: with overlap, compute in a thread of its own while the other groups compute.
        summary: one line for help texts and docs.
    """

    name: str
    keys: tuple[MetricKey, ...]
    compute: Callable[[Any], Mapping[str, Any]] | None
    needs: frozenset[str] = frozenset()
    default: bool = False
    includes: tuple[str, ...] = ()
    prepare: Callable[[Any], Any] | None = None
    clip_inputs: Callable[[Any], tuple[Sequence, Sequence[str]]] | None = None
    background: bool = False
    summary: str = ""

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)


def _paper(header: str, slot: int, fmt: str = "{:.1f}", scale: float = 1.0) -> Column:
    """A column of the SMILE paper's table (shown in every table)."""
    return Column(header, slot, scale, fmt, always=True)


def _keys(names: Iterable[str], better: Mapping[str, str | None] = (), columns: Mapping[str, Column] = ()) \
        -> tuple[MetricKey, ...]:
    """`MetricKey`s for ``names`` in order: higher is better unless ``better`` says otherwise."""
    better, columns = dict(better), dict(columns)
    return tuple(MetricKey(name, better.get(name, HIGHER), columns.get(name)) for name in names)


_LEX_DIV = "Lex. Div."


def _grounding_columns() -> dict[str, Column]:
    """toy_grounding's optional columns: colour and shape both right, any attribute wrong, each attribute's
    precision and, for the details MLE tends to leave out (all but colour and shape), how often it is mentioned."""
    headers = {"colour": "Colour", "shape": "Shape", "size": "Size", "position": "Pos.", "background": "BG"}
    columns = {"ground_colour_shape": Column("Colour+shape right", 20),
               "ground_any_wrong": Column("Any attr. wrong", 21)}
    for index, attribute in enumerate(TOY_ATTRIBUTES):
        if attribute not in ("colour", "shape"):
            columns[f"ground_{attribute}_mentioned"] = Column(f"{headers[attribute]} M", 22 + 2 * index)
        columns[f"ground_{attribute}_precision"] = Column(f"{headers[attribute]} P", 23 + 2 * index)
    return columns


def _chair_better(suffix: str) -> dict[str, str | None]:
    return {f"CHAIR_s{suffix}": LOWER, f"CHAIR_i{suffix}": LOWER, f"chair_objects_per_caption{suffix}": None}


_GROUPS = (
    MetricGroup(
        "coco", _keys(COCO_KEYS, columns={"Bleu_4": _paper("BLEU-4", 6, scale=100.0),
                                          "CIDEr": _paper("CIDEr", 7, scale=100.0)}),
        score_coco_group, frozenset({"references"}), default=True, prepare=prepare_coco_group, background=True,
        summary="BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, 0-1; METEOR needs Java, else None)"),
    MetricGroup(
        "spice", _keys(["SPICE"]), None, frozenset({"references"}), includes=("coco",),
        summary="SPICE, from the coco group's pass (Java, Stanford CoreNLP and ~8 GB of memory; opt-in)"),
    MetricGroup(
        "length", _keys(["cap_len"], {"cap_len": None}, {"cap_len": _paper("Cap. Len.", 0)}), score_length_group,
        default=True, summary="mean words per caption"),
    MetricGroup(
        "diversity", _keys(LEX_DIV_KEYS, columns={key: _paper(_LEX_DIV, 1, fmt) for key, fmt in
                                                  zip(LEX_DIV_KEYS, ("{:.0f}", "{:.1f}", "{:.1f}", "{:.3f}"))}),
        score_diversity_group, default=True, summary="vocabulary size, distinct-1/2 (%), type-token ratio"),
    MetricGroup(
        "repetition", _keys(REPETITION_KEYS, {key: LOWER for key in REPETITION_KEYS},
                            {"repeated_4gram_share": Column("Rep. 4-gram", 12)}),
        score_repetition_group,
        summary="% of captions repeating a word 3-gram / 4-gram (degenerate loops of long captions)"),
    MetricGroup(
        "retrieval", _keys(RETRIEVAL_KEYS, {"retrieval_pool": None, "retrieval_truncated_share": None},
                           {"R@1": _paper("R@1", 2), "R@5": _paper("R@5", 3)}),
        score_retrieval_group, frozenset({"images", "clip"}), default=True, prepare=prepare_retrieval_group,
        clip_inputs=retrieval_clip_inputs,
        summary="CLIP self-retrieval R@1/5/10 (%) of each caption's image among the scored images, and the % of "
                "captions longer than CLIP's text window"),
    MetricGroup(
        "clipscore", _keys(CLIPSCORE_KEYS, {"clip_truncated_share": None}, {"CLIPScore": _paper("CLIPScore", 4)}),
        score_clipscore_group, frozenset({"references", "images", "clip"}), default=True,
        prepare=prepare_clipscore_group, clip_inputs=clipscore_clip_inputs,
        summary="CLIPScore and RefCLIPScore (x100), and the % of prefixed captions longer than CLIP's text window"),
    MetricGroup(
        "ppl", _keys(["PPL"], {"PPL": LOWER}, {"PPL": _paper("PPL", 5)}), score_ppl_group, frozenset({"lm"}),
        default=True, summary="mean per-caption perplexity under a language model (GPT-2)"),
    MetricGroup(
        "toy_grounding", _keys(TOY_GROUNDING_KEYS, {"ground_any_wrong": LOWER}, _grounding_columns()),
        score_toy_grounding_group, frozenset({"toy_scenes"}),
        summary="toy set only: how often captions name each scene attribute, and rightly (%)"),
    MetricGroup(
        "finecapeval", _keys(FINECAP_KEYS), score_finecapeval_group, frozenset({"finecapeval"}), includes=("coco",),
        summary="FineCapEval phrase recall per criterion (%), with coco against the CSV's captions"),
    MetricGroup(
        "chair", _keys(CHAIR_KEYS, _chair_better(""), {"CHAIR_s": Column("CHAIR_s", 10),
                                                      "CHAIR_i": Column("CHAIR_i", 11)}),
        score_chair_group, frozenset({"instances"}),
        summary="CHAIR object hallucination (%), as the reference code computes it"),
    MetricGroup(
        "chair_corrected", _keys(CHAIR_CORRECTED_KEYS, _chair_better("_corrected")), score_chair_corrected_group,
        frozenset({"instances"}), summary="CHAIR with the reference code's word-matching errors corrected"),
)
METRIC_GROUPS: dict[str, MetricGroup] = {group.name: group for group in _GROUPS}


def _check_registry(groups: Mapping[str, MetricGroup]) -> None:
    """Fail at import on an entry that the session could not run (a typo in a need, a key written twice)."""
    seen: dict[str, str] = {}
    for name, group in groups.items():
        unknown = sorted(group.needs - NEEDS.keys())
        if unknown:
            raise ValueError(f"metric group {name!r}: unknown needs {unknown}; valid: {sorted(NEEDS)}")
        if any(included not in groups for included in group.includes):
            raise ValueError(f"metric group {name!r} includes unregistered groups {list(group.includes)}")
        if group.clip_inputs is not None and "clip" not in group.needs:
            raise ValueError(f"metric group {name!r} has clip_inputs but does not need CLIP")
        if group.background and "clip" in group.needs:
            raise ValueError(f"metric group {name!r}: a background group cannot need CLIP (its embedding caches are "
                             "used from the calling thread)")
        if group.compute is None and not group.includes:
            raise ValueError(f"metric group {name!r} has no compute function and includes no group that writes "
                             "its keys")
        for key in group.keys:
            if key.name in seen or key.name in COUNT_KEYS:
                raise ValueError(f"metric key {key.name!r} is written by {seen.get(key.name, 'the session')!r} "
                                 f"and {name!r}")
            if key.better not in (HIGHER, LOWER, None):
                raise ValueError(f"metric key {key.name!r}: better must be {HIGHER!r}, {LOWER!r} or None")
            seen[key.name] = name


_check_registry(METRIC_GROUPS)

ALL_METRICS = tuple(METRIC_GROUPS)
DEFAULT_METRICS = tuple(name for name, group in METRIC_GROUPS.items() if group.default)
METRIC_KEYS = {name: group.key_names for name, group in METRIC_GROUPS.items()}
KEY_DIRECTIONS = {key.name: key.better for group in METRIC_GROUPS.values() for key in group.keys}


def groups_needing(need: str) -> frozenset[str]:
    """The groups whose `needs` hold ``need``."""
    if need not in NEEDS:
        raise KeyError(f"unknown need {need!r}; valid: {sorted(NEEDS)}")
    return frozenset(name for name, group in METRIC_GROUPS.items() if need in group.needs)


IMAGE_METRICS = groups_needing("images")


def check_groups(metrics: Iterable[str] | str | None, what: str = "") -> frozenset[str]:
    """The requested group names (None: `DEFAULT_METRICS`), checked against the registry.

    Raises:
        MetricInputError: an unknown name, or none at all; prefixed with ``what`` (e.g. "--metrics") when given.
    """
    if metrics is None:
        return frozenset(DEFAULT_METRICS)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    prefix = f"{what}: " if what else ""
    unknown = [m for m in metrics if m not in METRIC_GROUPS]
    if unknown:
        raise MetricInputError(f"{prefix}unknown metric groups {unknown}; valid: {list(ALL_METRICS)}")
    if not metrics:
        raise MetricInputError(f"{prefix}no metric group requested; valid: {list(ALL_METRICS)}")
    return frozenset(metrics)


def reported_groups(groups: Iterable[str]) -> frozenset[str]:
    """``groups`` plus what they include, transitively: the groups whose keys a request reports."""
    reported, todo = set(), list(groups)
    while todo:
        name = todo.pop()
        if name not in reported:
            reported.add(name)
            todo.extend(METRIC_GROUPS[name].includes)
    return frozenset(reported)


def needs_of(groups: Iterable[str]) -> frozenset[str]:
    """Everything the reported groups of a request need."""
    return frozenset(need for name in reported_groups(groups) for need in METRIC_GROUPS[name].needs)
