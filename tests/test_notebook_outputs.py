"""utils.notebook_outputs: what a saved notebook shows of a progress bar and of interactive controls.

The notebook tests run a real kernel (nbclient, as nbval and `tests/budget.py --store` do) and read the
outputs that would be saved: the bar must be replaced by a plain line, the controls must carry a
readable stand-in next to their widget view.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.lab_browser import notebook_from_cells
from utils.notebook_outputs import IN_NOTEBOOK, ProgressBar, describe_control

REPO = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_summary_says_what_ran_and_whether_it_finished():
    quiet = io.StringIO()  # the terminal bar writes here
    bar = ProgressBar(range(5), desc="demo", file=quiet)
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.summary().startswith("demo: 5/5 in 00:0")
    assert not IN_NOTEBOOK  # under pytest, tqdm.auto is the terminal bar
    bar = ProgressBar(total=4, desc="steps", file=quiet)
    bar.update(4)
    bar.set_postfix(loss="1.234", refresh=False)
    line = bar.summary()
    assert line.startswith("steps: 4/4 in 00:0") and line.endswith(", loss=1.234"), line
    early = ProgressBar(total=10, desc="train", file=quiet)
    early.update(3)
    assert early.summary().startswith("train: 3/10 in") and early.summary().endswith("(stopped early)")


def test_describe_control_names_value_and_kind():
    widgets = pytest.importorskip("ipywidgets")
    assert describe_control("layer", widgets.IntSlider(16, min=0, max=29, description="layer")) == \
        "layer = 16 (slider 0 to 29)"
    assert describe_control("t", widgets.FloatSlider(0.7, min=0.0, max=2.0)) == "t = 0.7 (slider 0 to 2)"
    assert describe_control("q", widgets.Text("hello", description="query")) == "query = 'hello' (text box)"
    menu = widgets.Dropdown(options=[("ours", 1), ("GPT-2", 2)], value=2, description="tokenizer")
    assert describe_control("tokenizer", menu) == "tokenizer = 'GPT-2' (menu: ours, GPT-2)"


def _run(cells: list[str], tmp_path: Path):
    path = notebook_from_cells(tmp_path / "run.ipynb", [f"import sys; sys.path.insert(0, {str(REPO)!r})", *cells])
    nb = nbformat.read(path, 4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   ).execute(env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    return nb.cells[1:]


@pytest.mark.slow
def test_in_a_saved_notebook_the_bar_becomes_a_line_and_controls_read_as_words(tmp_path):
    pytest.importorskip("ipywidgets")
    bar_cell, stopped_cell, controls_cell = _run([
        "from utils.notebook_outputs import ProgressBar, IN_NOTEBOOK\n"
        "assert IN_NOTEBOOK\n"
        "for step in ProgressBar(range(30), desc='training'):\n"
        "    pass\n"
        "print('after the loop')",
        "bar = ProgressBar(range(30), desc='search')\n"
        "for step in bar:\n"
        "    if step == 9:\n"
        "        break\n"
        "bar.close()",
        "import ipywidgets as widgets\n"
        "from utils.notebook_outputs import show_interactive\n"
        "show_interactive(lambda layer, scale, text: print(layer * scale, text),\n"
        "                 layer=widgets.IntSlider(16, min=0, max=29, description='layer'),\n"
        "                 scale=widgets.fixed(2), text=widgets.Text('hi', description='text'))",
    ], tmp_path)

    # the bar's widget view is gone from the saved outputs; its place holds the summary line
    assert not any(WIDGET_VIEW in output.get("data", {}) for output in bar_cell.outputs)
    texts = [output["data"]["text/plain"] for output in bar_cell.outputs if "data" in output]
    assert len(texts) == 1 and texts[0].startswith("training: 30/30 in "), bar_cell.outputs
    assert bar_cell.outputs[-1]["text"] == "after the loop\n"  # in place: before what the cell printed next
    stopped = [output["data"]["text/plain"] for output in stopped_cell.outputs if "data" in output]
    assert stopped[0].startswith("search: 9/30 in ") and stopped[0].endswith("(stopped early)"), stopped

    (view,) = [output for output in controls_cell.outputs if "data" in output]
    assert WIDGET_VIEW in view["data"]  # live, it is the widget
    assert view["data"]["text/plain"] == ("Interactive controls (run the cell to use them): "
                                          "layer = 16 (slider 0 to 29); text = 'hi' (text box)")
    assert len(controls_cell.outputs) == 1  # shown once, not again as the cell's value


def test_display_widget_passes_the_view_as_a_raw_bundle(monkeypatch):
    """The view goes out as a mime bundle with the stand-in text and a display id, never through the widget's
    own display hook (ipywidgets 7, Colab's, ignores display ids there: the bar could not be replaced)."""
    widgets = pytest.importorskip("ipywidgets")
    import IPython.display

    calls = []
    monkeypatch.setattr(IPython.display, "display", lambda *args, **kwargs: calls.append((args, kwargs)) or "handle")
    from utils.notebook_outputs import display_widget

    slider = widgets.IntSlider(3)
    assert display_widget(slider, "a slider at 3", display_id=True) == "handle"
    (bundle,), kwargs = calls[0]
    assert bundle == {"application/vnd.jupyter.widget-view+json":
                      {"version_major": 2, "version_minor": 0, "model_id": slider.model_id},
                      "text/plain": "a slider at 3"}
    assert kwargs == {"raw": True, "display_id": True}
    display_widget(slider, "again")
    assert calls[1][1] == {"raw": True, "display_id": None}
