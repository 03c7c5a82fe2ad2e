"""The README's lesson table and lesson 00's course map list exactly the notebooks that exist."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_are_numbered_without_gaps():
    numbers = [int(name[:2]) for name in NOTEBOOKS]
    assert numbers == list(range(len(numbers))), f"lesson numbers must run 00, 01, ... without gaps: {numbers}"


def test_readme_links_every_notebook_once_and_nothing_else():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d\d) \| \[[^\]]+\]\(notebooks/([^)]+\.ipynb)\)", readme, re.MULTILINE)
    assert [name for _, name in rows] == NOTEBOOKS
    assert all(name.startswith(number) for number, name in rows)
    for name in NOTEBOOKS:  # the Colab and Binder badges of each row point at that notebook
        assert f"blob/main/notebooks/{name})" in readme and f"labpath=notebooks%2F{name})" in readme


def test_lesson_00_course_map_has_a_row_per_lesson():
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOKS[0], as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    numbers = re.findall(r"^\| (\d\d) \|", text, re.MULTILINE)
    assert numbers == [name[:2] for name in NOTEBOOKS]
