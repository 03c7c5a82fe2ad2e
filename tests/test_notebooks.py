"""Checks of the notebooks themselves (their execution is nbval's job).

Every numbered notebook must have: a first cell with title, objectives, prerequisites, time and
the Colab + Binder badges pointing at itself; the shared setup cell second; at least one `assert`
self-check; an exercises section with unfoldable solutions; a recap; stored outputs from one
clean top-to-bottom run (execution counts 1..n, no stored errors); at least one cell whose output
nbval checks, none of which writes to stderr. Code a notebook shows "the same as utils" must be
byte-for-byte the code in utils (no drifting copies). Every "Check your understanding" list is
followed by unfoldable answers, one per question.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import nbformat
import pytest

from utils.env import COURSE_REPO

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))

SETUP_CELL = f'''# Setup: the same cell runs locally, on Binder and on Colab.
import os
import subprocess
import sys

if "google.colab" in sys.modules:  # Colab: fetch the course, install only what Colab lacks (never torch)
    if not os.path.isdir("/content/llm-course"):
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/{COURSE_REPO}",
                        "/content/llm-course"], check=True)
    subprocess.run([sys.executable, "/content/llm-course/utils/colab.py"], check=True)
    os.chdir("/content/llm-course/notebooks")
sys.path.insert(0, os.path.abspath(".."))  # the repo root, so that `import utils` finds the course package
from utils.env import setup_notebook

setup_notebook(seed=0)  # offline by default, quiet libraries, seeded, fixed thread count'''

SAME_AS_UTILS = re.compile(r"^# Same code as (utils(?:\.\w+)+)", re.MULTILINE)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_welcome_and_setup.ipynb"


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_first_cell_has_title_objectives_and_badges(notebook):
    path, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    text = first.source
    assert text.startswith("# "), "the first cell starts with the lesson title"
    colab = f"https://colab.research.google.com/github/{COURSE_REPO}/blob/main/notebooks/{path.name}"
    binder = f"https://mybinder.org/v2/gh/{COURSE_REPO}/main?labpath=notebooks%2F{path.name}"
    assert colab in text, f"Colab badge must link to {colab}"
    assert binder in text, f"Binder badge must link to {binder}"
    for heading in ("What you will learn", "Prerequisites", "Time"):
        assert heading in text, f"first cell needs a '{heading}' line"


def test_second_cell_is_the_shared_setup_cell(notebook):
    _, nb = notebook
    assert nb.cells[1].cell_type == "code"
    assert nb.cells[1].source.strip() == SETUP_CELL.strip()


def test_has_self_checks_exercises_solutions_and_recap(notebook):
    _, nb = notebook
    code = "\n".join(c.source for c in code_cells(nb))
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert re.search(r"^\s*assert ", code, re.MULTILINE), "at least one assert self-check"
    assert re.search(r"^#+ .*Exercises", markdown, re.MULTILINE), "an '## Exercises' section"
    assert "<details>" in markdown, "exercise solutions the learner can unfold (<details>)"
    assert re.search(r"^#+ .*(Recap|Summary)", markdown, re.MULTILINE), "a recap section"


def test_outputs_come_from_one_clean_in_order_run(notebook):
    _, nb = notebook
    cells = code_cells(nb)
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"execution counts must be 1..n, got {counts}"
    for cell in cells:
        for output in cell.outputs:
            assert output.output_type != "error", f"stored error in cell:\n{cell.source[:200]}"
    assert any(c.outputs for c in cells)


def test_checked_cells_exist_and_write_nothing_to_stderr(notebook):
    _, nb = notebook
    checked = [c for c in code_cells(nb) if "NBVAL_CHECK_OUTPUT" in c.source]
    assert checked, "mark at least one deterministic cell with # NBVAL_CHECK_OUTPUT"
    for cell in checked:
        for output in cell.outputs:
            assert not (output.output_type == "stream" and output.name == "stderr"), (
                f"a checked cell writes to stderr (nbval would compare it):\n{cell.source[:200]}")


def test_code_shown_as_utils_is_the_utils_code(notebook):
    """A cell starting '# Same code as utils.x.name' must define `name` exactly as utils does."""
    _, nb = notebook
    for cell in code_cells(nb):
        for dotted in SAME_AS_UTILS.findall(cell.source):
            module_name, name = dotted.rsplit(".", 1)
            obj = getattr(importlib.import_module(module_name), name)
            tree = ast.parse(cell.source)
            defs = [n for n in tree.body if getattr(n, "name", None) == name]
            assert defs, f"the cell claims to show {dotted} but does not define {name}"
            # whole lines, so a trailing comment on the last line is compared too
            decorators = getattr(defs[0], "decorator_list", None)
            first = (decorators[0] if decorators else defs[0]).lineno - 1
            shown = "\n".join(cell.source.splitlines()[first:defs[0].end_lineno])
            assert textwrap.dedent(inspect.getsource(obj)).strip() == shown.strip(), (
                f"the notebook's {name} has drifted from {dotted}")


CYU_HEADING = re.compile(r"^(?:#+\s*)?\**Check your understanding\**\s*$", re.MULTILINE | re.IGNORECASE)
NUMBERED_LINE = re.compile(r"^\s*(?:\*\*)?(\d+)\.(?:\*\*)?\s", re.MULTILINE)
ANSWER_BLOCK = re.compile(r"<details>\s*<summary>\s*(Answers?)\b([^<]*)</summary>(.*?)</details>",
                          re.DOTALL | re.IGNORECASE)


def test_check_your_understanding_questions_have_answers(notebook):
    """Every "Check your understanding" list is followed by unfoldable answers, one per question:
    <details><summary>Answers</summary> with numbered answers 1., 2., ... (or one block per
    question, <summary>Answer 2</summary>)."""
    _, nb = notebook
    markdown = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    headings = list(CYU_HEADING.finditer(markdown))
    assert headings, "every lesson ends with 'Check your understanding' questions (with answers)"
    for heading in headings:
        after = markdown[heading.end():]
        first_block = after.find("<details>")
        assert first_block != -1, "the questions need an answers <details> block after them"
        questions = {int(n) for n in NUMBERED_LINE.findall(after[:first_block])}
        assert questions == set(range(1, len(questions) + 1)) and questions, (
            f"questions should be numbered 1..n right after the heading, got {sorted(questions)}")
        answered = set()
        for kind, summary_rest, body in ANSWER_BLOCK.findall(after[first_block:]):
            if kind.lower() == "answer":  # one block per question: "Answer 3"
                answered.update(int(n) for n in re.findall(r"\d+", summary_rest)[:1])
            else:
                answered.update(int(n) for n in NUMBERED_LINE.findall(body))
        missing = sorted(questions - answered)
        assert not missing, f"no answer for question(s) {missing} of 'Check your understanding'"
