"""Outputs that stay readable in a saved notebook: progress bars and interactive controls.

A progress bar or a slider in a notebook is a widget, and widgets need a running kernel. Open a saved
notebook without one (on GitHub, an untrusted notebook in JupyterLab, a fresh Colab tab) and a widget
shows only its plain-text stand-in, which by default is unhelpful: a finished training loop reads
"0%|          | 0/2000", as if it never ran, and a slider reads "interactive(children=(IntSlider(...".
These two helpers keep the widgets and give them a stand-in worth reading.

    for step in ProgressBar(range(200), desc="training"): ...   # leaves "training: 200/200 in 00:04 (48.1/s)"
    show_interactive(show_tokens, text=widgets.Text("hello"))   # controls; saved: "text = 'hello' (text box)"
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

__all__ = ["ProgressBar", "show_interactive", "display_widget", "describe_control"]

_notebook_module = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto only inside a notebook kernel
IN_NOTEBOOK = _notebook_module is not None and issubclass(tqdm, _notebook_module.tqdm)


class ProgressBar(tqdm):
    """tqdm's bar while a loop runs; when it ends, one plain line of text in its place.

    for x in ProgressBar(range(3), desc="demo"): ...   # in a notebook the bar becomes "demo: 3/3 in 00:00 (...)"

    In a notebook the bar is displayed with a display id, and `close()` (which tqdm calls when the
    loop ends) replaces it with `summary()`: what ran, how far, how long, and the last postfix (e.g.
    the losses). Both the live page and the saved notebook then show that line. In a terminal it is
    tqdm's usual text bar, which is readable as it is.
    """

    def __init__(self, *args, **kwargs):
        self._display_handle = None
        if IN_NOTEBOOK:
            kwargs["display"] = False  # we display it ourselves, with an id to replace it by later
        super().__init__(*args, **kwargs)
        if IN_NOTEBOOK and not self.disable:
            total = f"/{self.total}" if self.total else ""
            self._display_handle = display_widget(self.container, f"{self.desc or 'progress'}: running, "
                                                  f"{self.n}{total}", display_id=True)

    def summary(self) -> str:
        """One line: "desc: n/total in mm:ss (rate/s), postfix", and "stopped early" if it did."""
        elapsed = time.time() - self.start_t if hasattr(self, "start_t") else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        rate = f" ({self.n / elapsed:.1f}/s)" if elapsed > 0 and self.n else ""
        line = f"{getattr(self, 'desc', '') or 'progress'}: {done} in {self.format_interval(elapsed)}{rate}"
        if self.postfix:
            line += f", {self.postfix}"
        if self.total and self.n < self.total:
            line += " (stopped early)"
        return line

    def close(self):
        handle, self._display_handle = self._display_handle, None
        line = self.summary() if handle is not None else None
        super().close()
        if handle is not None:
            handle.update({"text/plain": line}, raw=True)


def display_widget(widget, text: str, display_id: bool = False):
    """Display a widget with `text` as its plain-text stand-in; with display_id=True, return the handle.

    display_widget(widgets.IntSlider(3), "a slider at 3")   # live: the slider; saved: "a slider at 3"

    The widget's view is passed as a raw mime bundle (what a widget displays itself as), so the same
    code works with ipywidgets 8 and 7 (Colab): ipywidgets 7 widgets display through a hook that
    ignores a display id, and a bar shown that way could not be replaced when its loop ends.
    """
    from IPython.display import display

    view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return display({"application/vnd.jupyter.widget-view+json": view, "text/plain": text}, raw=True,
                   display_id=display_id or None)


def describe_control(name: str, control) -> str:
    """A control's label, value and kind in words: "layer = 16 (slider 0 to 29)"."""
    label = getattr(control, "description", "") or name
    kind = type(control).__name__
    if hasattr(control, "options"):  # Dropdown, RadioButtons, ...
        labels = [option[0] if isinstance(option, tuple) else str(option) for option in control.options]
        kind = "menu: " + ", ".join(labels)
        value = getattr(control, "label", None) or control.value
    else:
        value = control.value
        if hasattr(control, "min") and hasattr(control, "max"):
            kind = f"slider {control.min:g} to {control.max:g}"
        elif kind in ("Text", "Textarea"):
            kind = "text box"
        elif kind == "Checkbox":
            kind = "checkbox"
    return f"{label} = {value!r} ({kind})"


def show_interactive(function, **controls) -> None:
    """Display ipywidgets.interactive(function, **controls), with a readable stand-in for saved notebooks.

    show_interactive(show_attention, layer=widgets.IntSlider(16, 0, 29), head=widgets.IntSlider(0, 0, 8))

    Live, this is exactly `interactive`: the controls, and function's output below them, redrawn when a
    control changes. Saved and opened without a kernel, the cell reads "Interactive controls (run the
    cell to use them): layer = 16 (slider 0 to 29); head = 0 (slider 0 to 8)" instead of the widget's
    repr. Returns None, so that the widget is not displayed twice as the cell's value.
    """
    import ipywidgets as widgets

    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    widget = widgets.interactive(function, **controls)
    # the controls interactive made or took (widgets.fixed values are not controls); _kwarg is the argument name
    described = "; ".join(describe_control(getattr(control, "_kwarg", ""), control)
                          for control in widget.kwargs_widgets if not isinstance(control, widgets.fixed))
    display_widget(widget, f"Interactive controls (run the cell to use them): {described}")
