"""The course's diagrams (utils.diagrams) draw without error and say what they should."""

import inspect
import io

import pytest
from matplotlib.figure import Figure

from utils import diagrams


def diagram_functions():
    """Every public function of utils.diagrams that takes no required argument: the diagrams."""
    found = []
    for name, obj in vars(diagrams).items():
        if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != diagrams.__name__:
            continue
        required = [p for p in inspect.signature(obj).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not required:
            found.append(obj)
    return found


def test_the_lesson_diagrams_are_found():
    names = {f.__name__ for f in diagram_functions()}
    assert {"transformer_blocks", "training_pipeline"} <= names


@pytest.mark.parametrize("draw", diagram_functions(), ids=lambda f: f.__name__)
def test_each_diagram_is_a_figure_that_renders(draw):
    fig = draw()
    assert isinstance(fig, Figure)
    fig.savefig(io.BytesIO(), format="png")  # lays out and rasterises every artist
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(texts) >= 5, "a diagram labels its parts"


EXPECTED_LABELS = {
    "transformer_blocks": ["post-LN", "pre-LN", "Llama", "RMSNorm", "SwiGLU MLP", "LayerNorm"],
    "training_pipeline": ["SFT", "reward model", "PPO", "DPO", "GRPO"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_diagrams_name_their_parts(name):
    text = "\n".join(t.get_text() for ax in getattr(diagrams, name)().axes for t in ax.texts)
    for label in EXPECTED_LABELS[name]:
        assert label in text, f"{name} should show {label!r}"


def test_helpers_reject_bad_input():
    fig, ax = diagrams.canvas(4, 2)
    with pytest.raises(ValueError, match="kind"):
        diagrams.box(ax, (1, 1), "x", kind="no such kind")
    with pytest.raises(ValueError, match="at least 2 points"):
        diagrams.path(ax, [(0, 0)])
    with pytest.raises(ValueError, match="width"):
        diagrams.canvas(0, 2)
    with pytest.raises(TypeError):
        diagrams.canvas("4", 2)


def test_a_diagram_displays_as_png_without_pyplot():
    """A notebook cell that only imports utils.diagrams must still store a picture."""
    png = diagrams.training_pipeline()._repr_png_()
    assert png.startswith(b"\x89PNG")
