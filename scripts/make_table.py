"""Turn metrics JSON files (one per run) into a SMILE-paper-style markdown table.

    python scripts/make_table.py runs/smile/metrics.json runs/mle/metrics.json \
        --names SMILE MLE --out table.md

Columns, in the paper's order: Cap. Len., Lex. Div., R@1, R@5, CLIPScore, PPL, then BLEU-4 and
CIDEr (x100). Each file holds the flat dict written by `metrics.score_results_file` (or a dict with
that under "metrics"). Missing metrics show as "-".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from metrics.suite import LEX_DIV_KEYS, markdown_table  # noqa: E402


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


def default_names(paths: list[Path]) -> list[str]:
    """File stems, or parent/stem where stems repeat (e.g. several runs/*/metrics.json)."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics JSON files, one per run")
    parser.add_argument("--names", nargs="+", help="row names, one per file (default: file names)")
    parser.add_argument("--lex-div", default="distinct_1", choices=LEX_DIV_KEYS,
                        help="which lexical-diversity statistic fills the Lex. Div. column")
    parser.add_argument("--out", type=Path, help="write the table here instead of printing it")
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.metrics):
        parser.error(f"--names got {len(args.names)} names for {len(args.metrics)} metrics files")
    names = args.names or default_names(args.metrics)
    table = markdown_table([(n, load_run(p)) for n, p in zip(names, args.metrics)], lex_div=args.lex_div)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
