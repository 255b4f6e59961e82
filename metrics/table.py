"""The SMILE-paper-style markdown table of runs' metrics (scripts/make_table.py), its columns from the registry.

The columns are the `registry.Column`s of the registered keys, left to right by slot: first the paper's
(`TABLE_COLUMNS`: Cap. Len., Lex. Div., R@1, R@5, CLIPScore, PPL, BLEU-4 x100, CIDEr x100), shown in every table,
then the optional ones (`OPTIONAL_COLUMNS`: CHAIR, toy grounding), shown when some run has their metric. Each row is
``(header, key, scale, format)``; the Lex. Div. column has key None: `lex_div` picks which diversity statistic
fills it (`LEX_DIV_KEYS`).
"""
from __future__ import annotations

from collections.abc import Sequence

from ._common import MetricInputError
from .registry import METRIC_GROUPS, METRIC_KEYS, Column

LEX_DIV_KEYS = METRIC_KEYS["diversity"]


def _layout() -> tuple[tuple, tuple, dict[str, str]]:
    """(TABLE_COLUMNS, OPTIONAL_COLUMNS, {lexical-diversity key: format}) from the keys' columns."""
    by_slot: dict[int, list[tuple[str, Column]]] = {}
    for group in METRIC_GROUPS.values():
        for key in group.keys:
            if key.column is not None:
                by_slot.setdefault(key.column.slot, []).append((key.name, key.column))
    paper, optional, alternatives = [], [], {}
    for slot in sorted(by_slot):
        entries = by_slot[slot]
        column = entries[0][1]
        if any((c.header, c.always) != (column.header, column.always) for _, c in entries):
            raise ValueError(f"table slot {slot} is claimed by keys {[k for k, _ in entries]} with different columns")
        if len(entries) > 1:  # alternatives: one column, the key chosen by lex_div
            if alternatives or {key for key, _ in entries} != set(LEX_DIV_KEYS):
                raise ValueError(f"table slot {slot}: only the diversity keys {LEX_DIV_KEYS} may share a column")
            alternatives = {key: c.fmt for key, c in entries}
            row = (column.header, None, 1.0, None)
        else:
            row = (column.header, entries[0][0], column.scale, column.fmt)
        (paper if column.always else optional).append(row)
    return tuple(paper), tuple(optional), alternatives


TABLE_COLUMNS, OPTIONAL_COLUMNS, _LEX_DIV_FORMAT = _layout()


def table_columns(lex_div: str = "distinct_1", optional: Sequence[str] = ()) -> list[tuple[str, str, float, str]]:
    """The table's ``(header, key, scale, format)`` columns: the paper's, with the Lex. Div. column showing
    ``lex_div``, then the `OPTIONAL_COLUMNS` whose key is in ``optional``."""
    if lex_div not in LEX_DIV_KEYS:
        raise MetricInputError(f"lex_div must be one of {LEX_DIV_KEYS}, got {lex_div!r}")
    return [(f"{h} ({lex_div})", lex_div, s, _LEX_DIV_FORMAT[lex_div]) if k is None else (h, k, s, f)
            for h, k, s, f in TABLE_COLUMNS] + [column for column in OPTIONAL_COLUMNS if column[1] in optional]


def markdown_header(lex_div: str = "distinct_1", optional: Sequence[str] = ()) -> str:
    """The table's header and alignment lines (two lines, no trailing newline); `optional`: keys of
    `OPTIONAL_COLUMNS` to append."""
    columns = table_columns(lex_div, optional)
    return "\n".join([
        "| Run | " + " | ".join(h for h, *_ in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ])


def markdown_row(name: str, metrics: dict, lex_div: str = "distinct_1", optional: Sequence[str] = (),
                 high: dict | None = None) -> str:
    """One table row: Cap. Len., Lex. Div., R@1, R@5, CLIPScore, PPL, BLEU-4 x100, CIDEr x100, then the
    `optional` columns (e.g. CHAIR_s, CHAIR_i).

    A metric that is missing or None shows as "-". With ``high``, each cell is a range, ``metrics[key]-high[key]``
    (the spread of a row over seeds: `metrics` holds the minima, `high` the maxima).
    """
    cells = []
    for _, key, scale, fmt in table_columns(lex_div, optional):
        value = metrics.get(key)
        if value is None or (high is not None and high.get(key) is None):
            cells.append("-")
        elif high is None:
            cells.append(fmt.format(scale * value))
        else:
            cells.append(f"{fmt.format(scale * value)}-{fmt.format(scale * high[key])}")
    return f"| {str(name).replace('|', '/')} | " + " | ".join(cells) + " |"


def summarize_seeds(runs: Sequence[dict]) -> tuple[dict, dict, dict]:
    """(mean, min, max) over ``runs`` (one metrics dict per seed) of every numeric key that all runs have.

    A key some run lacks or holds as None is left out of all three, so it shows as "-" rather than as the
    mean of the seeds that happen to have it.
    """
    keys = [key for key, value in runs[0].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and all(isinstance(run.get(key), (int, float)) for run in runs)]
    mean = {key: sum(run[key] for run in runs) / len(runs) for key in keys}
    return mean, {key: min(run[key] for run in runs) for key in keys}, {key: max(run[key] for run in runs)
                                                                         for key in keys}


def markdown_table(runs: Sequence[tuple[str, dict]], lex_div: str = "distinct_1",
                   spreads: Sequence[tuple[str, dict, dict]] = ()) -> str:
    """Header plus one row per ``(name, metrics)`` run, newline-terminated; an `OPTIONAL_COLUMNS` column appears
    when some run has its metric.

    ``spreads``: ``(name, minima, maxima)`` rows of runs repeated over seeds (`summarize_seeds`); when given, a
    second table with the same columns follows, each cell the min-max range.
    """
    optional = [key for _, key, _, _ in OPTIONAL_COLUMNS if any(m.get(key) is not None for _, m in runs)]
    lines = [markdown_header(lex_div, optional), *(markdown_row(n, m, lex_div, optional) for n, m in runs)]
    if spreads:
        lines += ["", "Spread over seeds (min-max):", "", markdown_header(lex_div, optional),
                  *(markdown_row(n, low, lex_div, optional, high=high) for n, low, high in spreads)]
    return "\n".join(lines) + "\n"
