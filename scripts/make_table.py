"""Turn metrics JSON files (one per run) into a SMILE-paper-style markdown table.

    python scripts/make_table.py runs/smile/metrics.json runs/mle/metrics.json \
        --names SMILE MLE --out table.md

Columns, in the paper's order: Cap. Len., Lex. Div., R@1, R@5, CLIPScore, PPL, then BLEU-4 and
CIDEr (x100), then CHAIR and toy-grounding columns when a run has them (metrics/table.py, from the metric
registry). Each file holds the flat dict written by `metrics.score_results_file` (or a dict with
that under "metrics"). Missing metrics show as "-".

    python scripts/make_table.py runs/*/test_metrics.json --plot metrics.png --length-plot lengths.png

A run repeated over seeds is one argument, its files joined by commas:

    python scripts/make_table.py runs/mle/test_metrics.json,runs/mle_seed1/test_metrics.json --names "MLE"

Its row then shows the mean over the seeds, and a second table gives each such row's min-max range; its
plots use the mean (the chart) and the first seed's captions (the length histogram).

--plot draws the table as a bar chart, one panel per column (metrics.plots.metric_comparison_chart);
--length-plot puts the runs' caption-length histograms side by side, read from their results files: --results,
one per metrics file, or by default X_results.json beside each X_metrics.json (test_results.json
beside a training run's test_metrics.json). The table is written before the plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from metrics.plots import caption_length_histogram, metric_comparison_chart, read_captions  # noqa: E402
from metrics.table import LEX_DIV_KEYS, markdown_table, summarize_seeds  # noqa: E402


def load_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"make_table: metrics file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"make_table: {path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict):
        raise SystemExit(f"make_table: {path} should hold a metrics dict, got a {type(data).__name__}")
    return data


def load_seeds(argument: str) -> tuple[dict, tuple[dict, dict] | None]:
    """(metrics, None) for one file; (mean, (minima, maxima)) for comma-joined files, one per seed."""
    paths = [Path(part) for part in argument.split(",") if part]
    if not paths:
        raise SystemExit(f"make_table: no metrics file in {argument!r}")
    runs = [load_run(path) for path in paths]
    if len(runs) == 1:
        return runs[0], None
    mean, low, high = summarize_seeds(runs)
    return mean, (low, high)


def results_files(metrics_paths: list[Path], given: list[Path] | None) -> list[Path]:
    """The runs' results files: ``given``, or ``X_results.json`` beside each ``X_metrics.json``."""
    if given is not None:
        paths = given
    else:
        paths = [p.with_name(p.name.removesuffix("_metrics.json") + "_results.json")
                 if p.name.endswith("_metrics.json") else None for p in metrics_paths]
    missing = [f"{m}: {p or 'not named X_metrics.json'}" for m, p in zip(metrics_paths, paths)
               if p is None or not p.is_file()]
    if missing:
        raise SystemExit("make_table: --length-plot needs each run's results file (--results, or X_results.json "
                         f"beside X_metrics.json); not found for {'; '.join(missing)}")
    return paths


def default_names(paths: list[Path]) -> list[str]:
    """File stems, or parent/stem where stems repeat (e.g. several runs/*/metrics.json)."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+",
                        help="metrics JSON files, one per run (a run's seeds: its files joined by commas)")
    parser.add_argument("--names", nargs="+", help="row names, one per file (default: file names)")
    parser.add_argument("--lex-div", default="distinct_1", choices=LEX_DIV_KEYS,
                        help="which lexical-diversity statistic fills the Lex. Div. column")
    parser.add_argument("--out", type=Path, help="write the table here instead of printing it")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw the table as a bar chart (PNG)")
    parser.add_argument("--length-plot", type=Path, metavar="OUT.png",
                        help="also plot the runs' caption-length histograms in one chart (PNG)")
    parser.add_argument("--results", nargs="+", type=Path,
                        help="results JSON files for --length-plot, one per metrics file "
                             "(default: X_results.json beside each X_metrics.json)")
    parser.add_argument("--title", help="what the plots' titles name, e.g. the dataset and split")
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.metrics):
        parser.error(f"--names got {len(args.names)} names for {len(args.metrics)} metrics files")
    if args.results is not None and len(args.results) != len(args.metrics):
        parser.error(f"--results got {len(args.results)} files for {len(args.metrics)} metrics files")
    first_files = [Path(argument.split(",")[0]) for argument in args.metrics]
    names = args.names or default_names(first_files)
    if len(set(names)) != len(names) and (args.plot or args.length_plot):
        parser.error(f"the plots need distinct run names (--names), got {names}")
    loaded = [load_seeds(argument) for argument in args.metrics]
    runs = [(n, metrics) for n, (metrics, _) in zip(names, loaded)]
    spreads = [(n, *spread) for n, (_, spread) in zip(names, loaded) if spread is not None]
    table = markdown_table(runs, lex_div=args.lex_div, spreads=spreads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    else:
        sys.stdout.write(table)
    try:
        if args.plot:
            metric_comparison_chart(dict(runs), args.plot, lex_div=args.lex_div,
                                    title=f"Metrics per run: {args.title}" if args.title else None)
            print(f"wrote {args.plot}", file=sys.stderr)
        if args.length_plot:
            paths = results_files(first_files, args.results)
            caption_length_histogram({n: read_captions(p) for n, p in zip(names, paths)}, args.length_plot,
                                     title=f"Caption length: {args.title}" if args.title else "Caption length")
            print(f"wrote {args.length_plot}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as error:  # bad input files: a message, not a traceback
        raise SystemExit(f"make_table: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
