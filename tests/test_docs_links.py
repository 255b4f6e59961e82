"""Every relative link in README.md, CHANGELOG.md and docs/*.md resolves: the file exists and, for a link to a
heading (`page.md#heading` or `#heading`), the page has that heading (GitHub's anchor for it)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(path: Path):
    """(line number, text) outside fenced code blocks, with inline code spans removed."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE.sub("", line)


def prose_lines_with_code(path: Path):
    """Like prose_lines, but keeping inline code (headings' anchors include its text)."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = INLINE_CODE.sub(lambda match: match.group(0)[1:-1], heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines_with_code(path):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    problems = []
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if target.startswith(EXTERNAL):
                continue
            file_part, _, fragment = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not linked.exists():
                problems.append(f"{where} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                problems.append(f"{where} (no heading with anchor #{fragment} in {linked.name})")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    missing = [page.name for page in PAGES if page.parent.name == "docs" and f"(docs/{page.name})" not in readme]
    assert missing == [], f"README.md does not link {missing}"


def test_the_checker_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nowhere) [gone](missing.md) `[code](missing.md)`\n"
                    "```\n[in a block](missing.md)\n```\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2 and "#nowhere" in problems[0] and "missing.md" in problems[1]


def test_anchor_matches_github():
    assert anchor("Why transformers is not pinned to 4.15.0") == "why-transformers-is-not-pinned-to-4150"
    assert anchor("Families: BLIP and prefix LMs (ClipCap, OPG)") == "families-blip-and-prefix-lms-clipcap-opg"
    assert anchor("What `model.pretrained` accepts") == "what-modelpretrained-accepts"
