"""PNG plots of evaluation results: caption-length histograms and a per-metric comparison of runs.

    caption_length_histogram({"MLE": captions_a, "SMILE": captions_b}, "lengths.png")
    metric_comparison_chart({"MLE": metrics_a, "SMILE": metrics_b}, "metrics.png")

matplotlib is imported inside the plotting functions, so the rest of metrics/ imports without it. Figures are
built with matplotlib's object API (``Figure``, rendered by Agg on save), not pyplot: no display is needed, and
the global backend of a caller that uses pyplot itself (a notebook, say) is left alone. The numbers behind each
plot come from pure helpers (`length_counts`, `length_histogram`, `chart_panels`) that tests check directly:

* a caption's length is the one of the "Cap. Len." metric (`text_stats.caption_lengths`: words after BLIP's
  normalisation), binned one bin per integer length;
* the comparison chart has the columns of `table.markdown_table`, in its order and at its scale (BLEU-4 and CIDEr
  x100), and labels each bar in the table's number format, so chart and table show the same figures.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from ._common import read_json_file
from .table import table_columns
from .text_stats import caption_length, caption_lengths

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def length_counts(captions: Sequence[str]) -> dict[int, int]:
    """``{length in words: number of captions}``, ascending, over the lengths that occur."""
    return dict(sorted(Counter(caption_lengths(captions)).items()))


def length_histogram(captions_by_run: Mapping[str, Sequence[str]]) -> tuple[list[float], dict[str, list[int]]]:
    """Shared integer-width bins for several runs: ``(edges, {run: counts})``.

    The edges are ``k - 0.5`` for every k from the shortest to one past the longest caption of any run, so bin i
    counts the captions of length ``shortest + i`` and every run is binned alike (len(edges) = len(counts) + 1).
    """
    if not captions_by_run:
        raise ValueError("no runs to plot: captions_by_run is empty")
    counts = {}
    for run, captions in captions_by_run.items():
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError(f"run {run!r}: expected a non-empty list of captions")
        counts[run] = length_counts(captions)
    lowest = min(min(c) for c in counts.values())
    highest = max(max(c) for c in counts.values())
    edges = [k - 0.5 for k in range(lowest, highest + 2)]
    return edges, {run: [c.get(k, 0) for k in range(lowest, highest + 1)] for run, c in counts.items()}


def chart_panels(runs: Mapping[str, Mapping[str, float | None]], metrics: Sequence[str] | None = None,
                 lex_div: str = "distinct_1") -> list[dict]:
    """The comparison chart's panels: ``[{"title", "key", "format", "values": {run: scaled value or None}}]``.

    Default: the columns of `table.markdown_table` (same order, scale and format). ``metrics`` picks metric keys
    instead (e.g. ``["CIDEr", "cap_len", "Bleu_1"]``): a table column keeps the table's title, scale and format,
    any other key is shown as it is. A metric that is missing or None for every run has no panel.
    """
    columns = {key: (title, scale, fmt) for title, key, scale, fmt in table_columns(lex_div)}
    if metrics is None:
        metrics = list(columns)
    panels = []
    for key in metrics:
        title, scale, fmt = columns.get(key, (key, 1.0, "{:.3g}"))
        if scale != 1.0:
            title = f"{title} (x{scale:g})"
        values = {}
        for run, run_metrics in runs.items():
            value = run_metrics.get(key)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            values[run] = scale * value if numeric else None
        if any(v is not None for v in values.values()):
            panels.append({"title": title, "key": key, "format": fmt, "values": values})
    return panels


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _colours() -> list[str]:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed, so a reader never sees half a PNG.
    temporary = out_path.with_name(f".{out_path.name}.tmp.png")
    try:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
        temporary.replace(out_path)
    finally:
        temporary.unlink(missing_ok=True)
    return out_path


def caption_length_histogram(captions_by_run: Mapping[str, Sequence[str]], out_path: str | Path,
                             title: str = "Caption length") -> Path:
    """One PNG: each run's caption lengths (words) in integer-width bins, runs side by side within a bin.

    Side by side rather than overlaid, because runs often share whole bins (e.g. every caption 11 words) and one
    would hide the other. The legend gives each run's mean length (the "Cap. Len." metric) and caption count.
    Returns ``out_path``.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    edges, counts = length_histogram(captions_by_run)
    centres = [(left + right) / 2 for left, right in pairwise(edges)]
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    colours = _colours()
    width = 0.8 / len(counts)
    # Counts on the bars only while they stay legible (a real split's 5-30 words x runs would crowd them).
    label_bars = sum(h > 0 for heights in counts.values() for h in heights) <= 24
    for index, (run, heights) in enumerate(counts.items()):
        captions = captions_by_run[run]
        offset = (index - (len(counts) - 1) / 2) * width
        bars = axes.bar([c + offset for c in centres], heights, width=width, color=colours[index % len(colours)],
                        label=f"{run}: mean {caption_length(captions):.1f} words, {len(captions)} captions")
        if label_bars:
            # Upright when several runs share a bin: their bars are too narrow for the numbers side by side.
            axes.bar_label(bars, labels=[str(h) if h else "" for h in heights], padding=2, fontsize=7,
                           rotation=90 if len(counts) > 1 else 0)
    axes.set_ylim(0, 1.15 * max(max(heights) for heights in counts.values()))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(edges[0] - 0.5, edges[-1] + 0.5)
    axes.set_xlabel("caption length (words, after BLIP's caption normalisation)")
    axes.set_ylabel("captions")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=9, frameon=False)
    return _save(figure, out_path)


def metric_comparison_chart(runs: Mapping[str, Mapping[str, float | None]], out_path: str | Path,
                            metrics: Sequence[str] | None = None, lex_div: str = "distinct_1",
                            title: str | None = None) -> Path:
    """One PNG of grouped bars: a panel per metric (their scales differ by orders of magnitude), a bar per run.

    Panels are those of `chart_panels` (the markdown table's columns unless ``metrics`` names keys); each bar is
    labelled with its value in the table's format, and a run without the metric gets "-" instead of a bar.
    Raises ValueError when no metric has a value for any run. Returns ``out_path``.
    """
    if not runs:
        raise ValueError("no runs to plot: runs is empty")
    panels = chart_panels(runs, metrics, lex_div)
    if not panels:
        raise ValueError(f"none of the metrics {list(metrics) if metrics else 'of the table'} has a value for "
                         f"any run ({', '.join(runs)})")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.9 * rows))
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    colours = _colours()
    names = list(runs)
    for axes, panel in zip(axes_grid.flat, panels):
        values = [panel["values"][run] for run in names]
        heights = [0.0 if v is None else v for v in values]
        bars = axes.bar(range(len(names)), heights, color=[colours[i % len(colours)] for i in range(len(names))],
                        width=0.7)
        axes.bar_label(bars, labels=["-" if v is None else panel["format"].format(v) for v in values],
                       padding=2, fontsize=8)
        top = max(heights)
        bottom = min(0.0, min(heights))
        axes.set_ylim(bottom * 1.15, top * 1.18 if top > 0 else 1.0)
        axes.set_xticks([])
        axes.set_title(panel["title"], fontsize=10)
        axes.tick_params(axis="y", labelsize=8)
        axes.grid(axis="y", alpha=0.3)
        axes.set_axisbelow(True)
    for axes in list(axes_grid.flat)[len(panels):]:
        axes.set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, color=colours[i % len(colours)]) for i in range(len(names))]
    figure.legend(handles, names, loc="upper center", ncol=min(len(names), 4), frameon=False,
                  bbox_to_anchor=(0.5, 1.0))
    figure.suptitle(title or "Runs compared, per metric", y=1.06 if rows == 1 else 1.03)
    figure.tight_layout()
    return _save(figure, out_path)


def read_captions(results_path: str | Path) -> list[str]:
    """The captions of a results file (``[{"image_id", "caption"}, ...]``), in file order."""
    results = read_json_file(Path(results_path), "results file")
    if not isinstance(results, list) or not all(isinstance(r, dict) and isinstance(r.get("caption"), str)
                                                for r in results):
        raise ValueError(f"{results_path}: expected a list of {{'image_id', 'caption'}} entries")
    return [row["caption"] for row in results]


def length_plot_path(results_path: str | Path, folder: str | Path | None = None) -> Path:
    """Where a results file's caption-length plot goes: ``<name>_caption_lengths.png`` for ``<name>_results.json``.

    In ``folder`` (default: the results file's own), so ``runs/x/test_results.json`` ->
    ``runs/x/test_caption_lengths.png``, the name the training run's test evaluation uses.
    """
    results_path = Path(results_path)
    stem = results_path.stem.removesuffix("_results") or results_path.stem
    return Path(folder if folder is not None else results_path.parent) / f"{stem}_caption_lengths.png"


def plot_caption_lengths_or_warn(results: Sequence[dict] | str | Path, out_path: str | Path, run: str,
                                 title: str = "Caption length") -> Path | None:
    """`caption_length_histogram` of one run's results (a list of ``{"image_id", "caption"}`` or its JSON file).

    Never raises: callers have just written results and metrics, and a plot that cannot be made (no matplotlib,
    no captions, an unwritable folder) must not fail the evaluation, so it is a warning and None is returned.
    """
    try:
        if isinstance(results, (str, Path)):
            captions = read_captions(results)
        else:
            captions = [row["caption"] for row in results]
        return caption_length_histogram({run: captions}, out_path, title=title)
    except Exception as error:  # noqa: BLE001 - any plotting failure is only worth a warning here
        hint = " (matplotlib is in requirements.txt)" if isinstance(error, ImportError) else ""
        logger.warning("could not write the caption-length plot %s: %s: %s%s", out_path, type(error).__name__, error,
                       hint)
        return None
