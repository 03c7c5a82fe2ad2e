"""Lesson 08's and 09's diagrams (utils.diagrams.lora_update, rag_pipeline) draw and name their parts.

(tests/test_diagrams.py also draws every no-argument diagram function, these two included.)
"""

import io

import pytest
from matplotlib.figure import Figure

from utils.diagrams import lora_update, rag_pipeline


def labels(fig):
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


@pytest.mark.parametrize("draw, expected", [
    (lora_update, ["W   (576 x 576)", "A   (8 x 576)", "B   (576 x 8)", "frozen", "zeros at the start",
                   "= 9,216", "331,776 numbers"]),
    (rag_pipeline, ["chunk", "embed each chunk", "top-k search", "min_score", "I don't know", "grounded prompt",
                    "citing [n]"]),
])
def test_diagram_renders_and_names_its_parts(draw, expected):
    fig = draw()
    assert isinstance(fig, Figure)
    fig.savefig(io.BytesIO(), format="png")
    text = labels(fig)
    for label in expected:
        assert label in text, f"{draw.__name__} should show {label!r}"


def test_lora_update_counts_follow_the_shapes():
    text = labels(lora_update(576, 1536, 8))  # gate_proj of SmolLM2
    assert "A   (8 x 576)" in text and "B   (1536 x 8)" in text and f"= {8 * (576 + 1536):,}" in text


def test_lora_update_refuses_bad_shapes():
    with pytest.raises(ValueError, match="r"):
        lora_update(576, 576, 0)
    with pytest.raises(ValueError, match="rank"):
        lora_update(4, 8, 5)  # not low rank
    with pytest.raises(TypeError, match="d_in"):
        lora_update(576.0, 576, 8)
