"""The interactive widgets of lessons 01, 03, 06, 07 and 09 render and respond in JupyterLab, in a real
headless Chromium (Debian's `chromium`, driven by Playwright).

Running those notebooks whole takes minutes (they load SmolLM2, embed corpora). Each test instead
builds a small notebook from the lesson's OWN cells (found by their content, so the test follows
the notebook): the cell that defines the function the widget calls and the cell that builds the
widget, after a first cell that makes cheap stand-ins for the state they read (a byte-level
tokenizer from tests/standin.py instead of SmolLM2's, random attention weights and logits, a tiny
retriever). JupyterLab runs it in a live kernel; the test checks that the widget's controls are
visible, changes one value as a person would (types into the box, moves the slider with the
keyboard), and waits for the widget's output area to change.

One JupyterLab (a throwaway config, loopback, a token) and one browser serve all five tests; both
are stopped at the end. Skipped, with the install command, where playwright or chromium is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from tests.lab_browser import CHROMIUM, browser_missing, notebook_from_cells, running_lab

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

PRELUDE = f"""import sys
sys.path.insert(0, {str(REPO)!r})
from utils.env import setup_notebook

setup_notebook(seed=0)
import matplotlib.pyplot as plt
import torch
from IPython.display import HTML, display

from tests.standin import tiny_tokenizer
"""
STAND_INS = {  # what each lesson's widget reads, made cheaply
    "01": """from utils.token_display import readable, token_pieces
from utils.tokenization import BPETokenizer

smol = tiny_tokenizer()
tok = BPETokenizer().train("hello world, the cat sat on the mat. " * 20, vocab_size=270)
""",
    "03": """tokens = "The cat sat on the mat because it was tired .".split()
attn = torch.softmax(torch.randn(30, 9, len(tokens), len(tokens), generator=torch.Generator().manual_seed(0)), -1)
""",
    "06": """from utils.sampling import next_token_probs

tokenizer = tiny_tokenizer()
poem_logits = torch.randn(1, len(tokenizer), generator=torch.Generator().manual_seed(0)) * 3


def entropy_bits(p):
    return float(-(p * p.clamp_min(1e-30).log2()).sum())
""",
    "07": """from utils.prompting import chat_prompt, show_tokens

tok = tiny_tokenizer()
""",
    "09": """from utils.rag import Hit


class EchoRetriever:
    def retrieve(self, query, k=5):
        return [Hit(text=f"passage {i} about {query}", source="stand-in", score=1.0 - i / 10) for i in range(k)]


handbook_kb = python_kb = EchoRetriever()
""",
}
# lesson -> (notebook, marker of the function's cell or None, marker of the widget's cell)
LESSONS = {
    "01": ("01_tokenisation.ipynb", "TOKENIZERS = {", "show_interactive("),
    "03": ("03_attention.ipynb", "def show_attention(", "show_interactive(show_attention"),
    "06": ("06_sampling_and_decoding.ipynb", "def show_distribution(", "show_interactive("),
    "07": ("07_prompt_engineering.ipynb", None, "show_interactive(show_prompt"),
    "09": ("09_rag.ipynb", "def show_hits(", "show_interactive("),
}
# lesson -> (kind of control to change, its label); a text box gets new text, a slider one key press
CHANGE = {"01": ("text", "text"), "03": ("slider", "layer"), "06": ("slider", "temperature"),
          "07": ("text", "user"), "09": ("text", "query")}


def lesson_cell(notebook: str, marker: str) -> str:
    """The source of the first code cell of notebooks/<notebook> that contains marker."""
    cells = json.loads((REPO / "notebooks" / notebook).read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and marker in source:
            return source
    raise AssertionError(f"{notebook} has no code cell containing {marker!r}: did the widget move?")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if browser_missing():
        pytest.skip(browser_missing())
    root = tmp_path_factory.mktemp("lab")
    for lesson, (notebook, function_marker, widget_marker) in LESSONS.items():
        cells = [PRELUDE + STAND_INS[lesson]]
        if function_marker:
            cells.append(lesson_cell(notebook, function_marker))
        cells.append(lesson_cell(notebook, widget_marker))
        notebook_from_cells(root / f"widget_{lesson}.ipynb", cells)
    _saved_notebook(root / "saved.ipynb")
    with running_lab(root) as running:
        yield running


def _saved_notebook(path: Path) -> None:
    """Execute a notebook with a progress bar and interactive controls (as nbval and budget.py do), save it."""
    from nbclient import NotebookClient

    notebook_from_cells(path, [
        PRELUDE + "import ipywidgets as widgets\nfrom utils.notebook_outputs import ProgressBar, show_interactive",
        "for step in ProgressBar(range(30), desc='training'):\n    pass",
        "show_interactive(lambda layer: print(layer), layer=widgets.IntSlider(16, min=0, max=29, description='layer'))",
    ])
    nb = nbformat.read(path, 4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


OUTPUT = ".widget-interact .jp-OutputArea"  # where interactive() shows the function's output


@pytest.mark.parametrize("lesson", list(LESSONS))
def test_widget_renders_and_responds(lab, browser, lesson, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(lab.url(f"lab/tree/widget_{lesson}.ipynb"), timeout=60_000)
        page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=60_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        # run every cell once the kernel is up (the notebook's toolbar shows its status)
        page.wait_for_function("""() => {
            const w = window.jupyterapp.shell.currentWidget;
            return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
                   && w.sessionContext.session.kernel.connectionStatus === 'connected'; }""", timeout=90_000)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        kind, label = CHANGE[lesson]
        control = page.locator(".widget-interact .widget-inline-hbox", has_text=label).first
        control.wait_for(state="visible", timeout=90_000)  # the widget rendered (not its text fallback)
        output = page.locator(OUTPUT).first
        page.wait_for_function(f"() => document.querySelector('{OUTPUT}')?.innerText.trim().length > 0"
                               f" || document.querySelector('{OUTPUT} img')", timeout=60_000)
        before = output.inner_html()
        if kind == "text":
            box = control.locator("input, textarea").first
            box.fill("Hello widgets 42")
            box.press("Enter")
        else:
            handle = control.locator(".noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")
        page.wait_for_function("([sel, old]) => document.querySelector(sel).innerHTML !== old", arg=[OUTPUT, before],
                               timeout=60_000)
        after = output.inner_html()
        page.locator(".widget-interact").first.screenshot(path=str(tmp_path / f"widget_{lesson}.png"))
        assert after != before
        if kind == "text":
            assert "42" in output.inner_text() or lesson == "01"  # 01 shows tokens as coloured pieces
    finally:
        page.close()
        lab.shutdown_kernels()


def test_a_saved_notebook_reads_without_running_it(lab, browser):
    """Opened as a learner first opens it (not run, untrusted): the bar and the controls read as words."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(lab.url("lab/tree/saved.ipynb"), timeout=60_000)
        page.wait_for_function("() => document.querySelectorAll('.jp-Notebook .jp-OutputArea-output').length >= 2",
                               timeout=60_000)
        shown = page.locator(".jp-Notebook").first.inner_text()
        assert "training: 30/30 in" in shown, shown
        assert "Interactive controls (run the cell to use them): layer = 16 (slider 0 to 29)" in shown, shown
        assert "0%" not in shown and "interactive(children" not in shown, shown  # not the bar's first frame
    finally:
        page.close()
        lab.shutdown_kernels()
