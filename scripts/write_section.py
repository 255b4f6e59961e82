"""Put a markdown section into a results file: replace the section with the same heading (up to the next heading of
the same or a higher level), or append it when the file has none. Used by scripts/reproduce.sh (SECTION=...) and
scripts/toy_scst_study.sh, so that one results file (results/toy.md) holds the tables of several studies.

    python scripts/write_section.py RESULTS.md SECTION.md

SECTION.md starts with its heading line (``## Title``); RESULTS.md is created when missing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def replace_section(text: str, section: str) -> str:
    """``text`` with ``section`` in place of the section whose heading line equals ``section``'s first line."""
    heading = section.splitlines()[0] if section.strip() else ""
    match = re.match(r"(#+) \S", heading)
    if not match:
        raise ValueError(f"a section starts with a markdown heading ('## Title'), got {heading!r}")
    level = len(match.group(1))
    lines = text.splitlines(keepends=True)
    starts = [index for index, line in enumerate(lines) if line.rstrip("\n") == heading]
    body = section.rstrip("\n") + "\n"
    if not starts:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + body
    start = starts[0]
    end = next((index for index in range(start + 1, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[index])), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + tail if tail else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the markdown file to update")
    parser.add_argument("section", type=Path, help="a file holding the section, heading first")
    args = parser.parse_args(argv)
    try:
        text = args.results.read_text(encoding="utf-8") if args.results.exists() else ""
        updated = replace_section(text, args.section.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"write_section.py: {error}", file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.results.with_name(args.results.name + ".tmp")
    temporary.write_text(updated, encoding="utf-8")
    temporary.replace(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
