"""scripts/write_section.py: one results file holds the tables of several studies, each a section."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from write_section import replace_section  # noqa: E402

TEXT = "# Toy\n\nintro\n\n## A\n\nold a\n\n### A detail\n\nx\n\n## B\n\nb\n"


def test_a_section_replaces_its_namesake_subsections_included_and_keeps_the_rest():
    assert replace_section(TEXT, "## A\n\nnew a\n") == "# Toy\n\nintro\n\n## A\n\nnew a\n\n## B\n\nb\n"
    assert replace_section(TEXT, "## B\n\nnew b") == "# Toy\n\nintro\n\n## A\n\nold a\n\n### A detail\n\nx\n\n## B\n\nnew b\n"


def test_a_new_section_is_appended_and_an_empty_file_gets_just_the_section():
    assert replace_section(TEXT, "## C\n\nc\n") == TEXT + "\n## C\n\nc\n"
    assert replace_section("", "## C\n\nc\n") == "## C\n\nc\n"


def test_a_heading_inside_another_section_is_only_replaced_on_an_exact_line_match():
    text = "## A (old title)\n\nkeep\n"
    assert replace_section(text, "## A\n\nnew\n") == text + "\n## A\n\nnew\n"


def test_the_command_refuses_a_section_without_a_heading(tmp_path):
    results, section = tmp_path / "results.md", tmp_path / "section.md"
    results.write_text(TEXT)
    section.write_text("no heading\n")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "write_section.py"), str(results), str(section)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "markdown heading" in done.stderr and results.read_text() == TEXT
    section.write_text("## B\n\nnew b\n")
    subprocess.run([sys.executable, str(REPO / "scripts" / "write_section.py"), str(results), str(section)],
                   check=True)
    assert results.read_text().endswith("## B\n\nnew b\n")


@pytest.mark.parametrize("heading", ["#", "##Title", ""])
def test_malformed_headings_are_errors(heading):
    with pytest.raises(ValueError, match="markdown heading"):
        replace_section(TEXT, heading + "\n\nbody\n")
