"""The README stays a guide a newcomer can read: no line runs on past 120 characters (a table row of
internals once held a 1,500-character sentence), and what it links to exists."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lines_stay_readable():
    long = [(i, len(line)) for i, line in enumerate(README.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"README lines over 120 characters (line, length): {long}"


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)\)", README.read_text()):
        assert (README.parent / target).exists(), target
