"""Diagrams of the course, drawn by code with matplotlib: boxes, arrows and a few labels.

Each diagram is a function with no required arguments that returns a matplotlib Figure; a notebook
cell ends with it, so Jupyter stores the picture as a PNG output (GitHub, JupyterLab and Colab all
render that). The figures are made directly, not with `plt.figure()`: pyplot's global state is left
alone and nothing is shown twice; `Diagram._repr_png_` lets Jupyter draw one even in a notebook
that has not imported pyplot.

    from utils.diagrams import transformer_blocks
    transformer_blocks()          # the last expression of a cell: Jupyter displays it

The first section holds the drawing helpers (coordinates are in data units of an axis with no ticks:
(0, 0) bottom left, (width, height) top right); then one section per lesson.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from utils.checks import check_int, check_number, check_positive_int

# ---------------------------------------------------------------------------------------------------
# Helpers: a canvas, boxes, arrows, a "+" node for residual additions
# ---------------------------------------------------------------------------------------------------

# one colour per kind of component, the same in every diagram
COLORS = {
    "data": "#eeeeee",        # inputs, outputs, tensors
    "norm": "#fff2b3",        # LayerNorm, RMSNorm
    "attention": "#ffd1a8",   # attention of every kind
    "mlp": "#c9dcf5",         # MLP, SwiGLU
    "embedding": "#d9ead3",   # token and position embeddings
    "stage": "#e4d7f5",       # a training stage or a pipeline step
    "model": "#d9ead3",       # a trained model
    "note": "#ffffff",
}


class Diagram(Figure):
    """A Figure that Jupyter can display as a PNG without pyplot's inline backend."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def canvas(width: float, height: float, inches_per_unit: float = 1.0, title: str | None = None):
    """A Figure with one axis spanning [0, width] x [0, height], no ticks, equal scale.

    Example: fig, ax = canvas(8, 4)  -> an 8x4-inch figure whose axis runs 0..8 by 0..4.
    """
    width = check_number("width", width, low=0, low_open=True)
    height = check_number("height", height, low=0, low_open=True)
    scale = check_number("inches_per_unit", inches_per_unit, low=0, low_open=True)
    fig = Diagram(figsize=(width * scale, height * scale), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.text(width / 2, height - 0.15, title, ha="center", va="top", fontsize=13, weight="bold")
    return fig, ax


def box(ax, center: tuple[float, float], text: str, width: float = 2.0, height: float = 0.6,
        kind: str = "note", fontsize: float = 10):
    """A rounded box with centred text, coloured by `kind` (a key of COLORS); returns its edges.

    Example: box(ax, (2, 1), "LayerNorm", kind="norm") -> {"top": (2, 1.3), "bottom": (2, 0.7), ...}
    """
    if kind not in COLORS:
        raise ValueError(f"kind must be one of {sorted(COLORS)}, got {kind!r}")
    x, y = center
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=COLORS[kind], edgecolor="#444444", linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return {"top": (x, y + height / 2), "bottom": (x, y - height / 2),
            "left": (x - width / 2, y), "right": (x + width / 2, y)}


def plus(ax, center: tuple[float, float], radius: float = 0.17):
    """A circled "+": where a residual connection adds its input back; returns its edges like box."""
    x, y = center
    ax.add_patch(Circle(center, radius, facecolor="white", edgecolor="#444444", linewidth=1.2))
    ax.text(x, y, "+", ha="center", va="center", fontsize=12)
    return {"top": (x, y + radius), "bottom": (x, y - radius),
            "left": (x - radius, y), "right": (x + radius, y)}


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str | None = None,
          curve: float = 0.0, color: str = "#444444", fontsize: float = 9):
    """An arrow from start to end, optionally bent (curve: 0 straight, +-0.3 a gentle arc) and labelled
    at its middle. Example: arrow(ax, (0, 0), (1, 0), label="tokens")."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=color,
                                 linewidth=1.3, connectionstyle=f"arc3,rad={curve}",
                                 shrinkA=0, shrinkB=0))
    if label:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        ax.text(mid[0] + 0.08, mid[1], label, ha="left", va="center", fontsize=fontsize,
                color="#333333", style="italic")


def path(ax, points: list[tuple[float, float]], color: str = "#444444"):
    """A polyline through `points` with an arrow head on its last segment: a skip connection or a loop
    around boxes. Example: path(ax, [(1, 0), (2, 0), (2, 2), (1.2, 2)])."""
    if len(points) < 2:
        raise ValueError(f"path needs at least 2 points, got {len(points)}")
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=color, linewidth=1.3, solid_capstyle="round")
    arrow(ax, points[-2], points[-1], color=color)


# ---------------------------------------------------------------------------------------------------
# Lesson 04: three transformer blocks
# ---------------------------------------------------------------------------------------------------

def _block_column(ax, x: float, layers: list[tuple[str, tuple[str, str]]], norm_first: bool) -> float:
    """One block drawn bottom (input) to top (output) at horizontal position x; returns the top y.

    layers: one (norm text, (sublayer text, sublayer kind)) per sublayer; norm_first: pre-norm
    (norm, sublayer, +) or post-norm (sublayer, +, norm).
    """
    skip_x = x + 1.45  # the residual path runs right of the boxes
    ax.text(x, 0.3, "x  (B, T, C)", ha="center", va="center", fontsize=10)
    below = (x, 0.45)  # the top of whatever was drawn last
    y = 1.3            # the centre of the next box
    for norm_text, (sub_text, sub_kind) in layers:
        first_height = 0.6 if norm_first else 0.75
        branch_y = (below[1] + y - first_height / 2) / 2  # the residual stream leaves here...
        ax.plot([x, skip_x], [branch_y, branch_y], color="#888888", linewidth=1.3)
        if norm_first:
            norm = box(ax, (x, y), norm_text, kind="norm")
            arrow(ax, below, norm["bottom"])
            sub = box(ax, (x, y + 1.0), sub_text, kind=sub_kind, height=0.75)
            arrow(ax, norm["top"], sub["bottom"])
            add = plus(ax, (x, y + 1.85))
            arrow(ax, sub["top"], add["bottom"])
            below, y = add["top"], y + 2.55
        else:
            sub = box(ax, (x, y), sub_text, kind=sub_kind, height=0.75)
            arrow(ax, below, sub["bottom"])
            add = plus(ax, (x, y + 0.85))
            arrow(ax, sub["top"], add["bottom"])
            norm = box(ax, (x, y + 1.6), norm_text, kind="norm")
            arrow(ax, add["top"], norm["bottom"])
            below, y = norm["top"], y + 2.6
        # ...and is added back: the skip connection
        path(ax, [(skip_x, branch_y), (skip_x, add["right"][1]), add["right"]], color="#888888")
    arrow(ax, below, (x, below[1] + 0.45))
    ax.text(x, below[1] + 0.55, "to the next block", ha="center", va="bottom", fontsize=10)
    return below[1] + 0.8


def transformer_blocks() -> Figure:
    """Post-LN (the original transformer's block, as most diagrams draw it), pre-LN (GPT-2, the GPT of
    lessons 04-05) and the Llama block (SmolLM2), side by side, input at the bottom. Shown in lesson 04."""
    fig, ax = canvas(12.5, 8.8, inches_per_unit=0.8)
    ax.set_ylim(-1.1, 7.7)
    mlp = ("MLP: 4x wider,\nGELU, back", "mlp")
    columns = [  # x, title, subtitle, layers, norm_first, note
        (1.6, "post-LN", "original transformer (2017), BERT;\nBlock(pre_ln=False)",
         [("LayerNorm", ("multi-head attention\n(causal in a GPT)", "attention")), ("LayerNorm", mlp)],
         False, "x = LN(x + f(x)): every LayerNorm\nsits on the residual path"),
        (5.8, "pre-LN", "GPT-2, GPT-3; Block(pre_ln=True),\nthe GPT you pretrain in lesson 05",
         [("LayerNorm", ("causal multi-head\nattention", "attention")), ("LayerNorm", mlp)],
         True, "x = x + f(LN(x)): the residual path is\nuntouched; a final LayerNorm (ln_f)\n"
               "follows the last block"),
        (10.0, "Llama", "Llama, SmolLM2;\nLlamaBlock",
         [("RMSNorm", ("grouped-query attn.,\nRoPE on q and k", "attention")), ("RMSNorm", ("SwiGLU MLP", "mlp"))],
         True, "pre-norm like GPT-2; no biases, no\nposition table (RoPE), a final RMSNorm"),
    ]
    for x, title, subtitle, layers, norm_first, note in columns:
        _block_column(ax, x, layers, norm_first)
        ax.text(x + 0.2, 7.45, title, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x + 0.2, 7.0, subtitle, ha="center", va="center", fontsize=9, style="italic")
        ax.text(x + 0.2, -0.05, note, ha="center", va="top", fontsize=8.5, color="#333333")
    return fig


# ---------------------------------------------------------------------------------------------------
# Lesson 05: from a pretrained model to a chat model
# ---------------------------------------------------------------------------------------------------

def training_pipeline() -> Figure:
    """Pretraining -> supervised fine-tuning -> preference tuning (reward model + PPO, or DPO) or RL
    with a verifiable reward (GRPO), with the data each stage learns from and the lesson that builds
    it. Shown in lesson 05."""
    fig, ax = canvas(14.2, 7.0, inches_per_unit=0.8)
    pre = box(ax, (1.6, 3.2), "Pretraining\nnext-token prediction\n(lesson 05)", width=2.6, height=1.2,
              kind="stage")
    ax.text(1.6, 4.2, "raw text: books, web, code\n(trillions of tokens)", ha="center", va="bottom",
            fontsize=9)
    base = box(ax, (4.3, 3.2), "base model", width=1.5, height=0.6, kind="model")
    arrow(ax, pre["right"], base["left"])
    sft = box(ax, (6.8, 3.2), "SFT\nsupervised fine-tuning\n(lesson 13)", width=2.6, height=1.2,
              kind="stage")
    arrow(ax, base["right"], sft["left"])
    ax.text(6.8, 4.2, "demonstrations:\n(prompt, good answer) pairs", ha="center", va="bottom", fontsize=9)

    rm = box(ax, (9.5, 5.2), "reward model\n(lesson 13)", width=1.9, height=0.9, kind="stage")
    ppo = box(ax, (11.9, 5.2), "PPO: RL against\nthe reward model\n(lesson 13)", width=2.1, height=1.1,
              kind="stage")
    arrow(ax, rm["right"], ppo["left"])
    dpo = box(ax, (10.7, 3.2), "DPO: learns from the same pairs\ndirectly, no reward model\n(lesson 13)",
              width=3.3, height=1.1, kind="stage")
    grpo = box(ax, (10.7, 1.0), "GRPO: RL with a checkable\nreward, advantages within\n"
               "a group of answers (lesson 14)", width=3.3, height=1.1, kind="stage")
    for target, label in ((rm["left"], None), (dpo["left"], None), (grpo["left"], None)):
        arrow(ax, sft["right"], target, label=label)
    ax.text(10.7, 5.95, "preference pairs: (prompt, chosen, rejected)", ha="center", va="bottom",
            fontsize=9)
    ax.text(10.7, 0.3, "prompts + a checker (e.g. the right number)", ha="center", va="top", fontsize=9)
    chat = box(ax, (13.3, 3.2), "chat\nmodel", width=1.2, height=0.8, kind="model")
    for source in (ppo["bottom"], dpo["right"], grpo["right"]):
        arrow(ax, source, chat["left"] if source is not ppo["bottom"] else chat["top"])
    ax.text(7.1, 6.7, "how a chat model is made: one pretraining run, then post-training", ha="center",
            va="center", fontsize=12, weight="bold")
    return fig


# ---------------------------------------------------------------------------------------------------
# Lessons 08 and 09: LoRA's low-rank update, the RAG pipeline
# ---------------------------------------------------------------------------------------------------


def lora_update(d_in: int = 576, d_out: int = 576, r: int = 8) -> Figure:
    """A LoRA layer, y = W x + (alpha / r) B (A x): the frozen weight beside the trainable low-rank path,
    with the shapes and parameter counts of one SmolLM2 q_proj (576 -> 576) at rank r. Shown in lesson 08.

    Example: lora_update(576, 1536, 8) draws gate_proj's adapter (8 x 576 and 1536 x 8).
    """
    d_in = check_positive_int("d_in", d_in, " (input features)")
    d_out = check_positive_int("d_out", d_out, " (output features)")
    r = check_int("r", r, low=1, high=min(d_in, d_out), what=" (the rank, at most min(d_in, d_out))")
    fig, ax = canvas(12.4, 6.4, inches_per_unit=0.8)
    ax.text(6.2, 6.15, "LoRA: a frozen weight plus a trainable low-rank update", ha="center", va="center",
            fontsize=13, weight="bold")
    x_in = box(ax, (5.5, 0.45), f"x   (tokens, {d_in})", width=2.6, kind="data")
    # left: the pretrained path, frozen
    w = box(ax, (2.6, 2.9), f"W   ({d_out} x {d_in})\nfrozen: no gradient,\nno optimizer state\n"
            f"{d_in * d_out:,} numbers", width=3.0, height=1.7, kind="data")
    # right: the adapter, trainable
    a = box(ax, (8.2, 2.0), f"A   ({r} x {d_in})\nrandom at the start", width=2.7, height=0.8, kind="stage")
    b = box(ax, (8.2, 3.6), f"B   ({d_out} x {r})\nzeros at the start", width=2.7, height=0.8, kind="stage")
    arrow(ax, a["top"], b["bottom"], label=f"A x: {r} numbers\nper token")
    ax.text(9.75, 2.0, f"trainable:\nr (in + out)\n= {r * (d_in + d_out):,}\nnumbers", ha="left", va="center",
            fontsize=9, style="italic")
    path(ax, [x_in["top"], (5.5, 1.2), (2.6, 1.2), w["bottom"]])
    path(ax, [(5.5, 1.2), (8.2, 1.2), a["bottom"]])
    add = plus(ax, (5.5, 4.7))
    path(ax, [w["top"], (2.6, 4.7), add["left"]])
    path(ax, [b["top"], (8.2, 4.7), add["right"]])
    ax.text(7.2, 4.9, "x (alpha / r)", ha="center", va="bottom", fontsize=10)
    arrow(ax, add["top"], (5.5, 5.35))
    ax.text(5.5, 5.45, f"y = W x + (alpha / r) B A x   (tokens, {d_out})", ha="center", va="bottom", fontsize=10)
    ax.text(5.5, 3.0, "B = 0: the model starts\nexactly as pretrained.\nAfter training, merge:\n"
            "W <- W + (alpha / r) B A", ha="center", va="center", fontsize=9, color="#333333")
    return fig


def rag_pipeline() -> Figure:
    """Retrieval-augmented generation: the documents are chunked, embedded and indexed once; each
    question is embedded, searched (dense + BM25, fused), checked against a score threshold, and
    answered from a grounded prompt with numbered passages. Shown in lesson 09."""
    fig, ax = canvas(14.4, 6.4, inches_per_unit=0.8)
    ax.text(7.2, 6.15, "RAG: retrieve, then generate from what was retrieved", ha="center", va="center",
            fontsize=13, weight="bold")
    # once, before any question: indexing
    ax.text(0.2, 5.45, "once (indexing)", ha="left", va="center", fontsize=10, style="italic")
    docs = box(ax, (1.4, 4.6), "documents\n(handbook, Python\nreference)", width=2.2, height=1.0, kind="data")
    chunk = box(ax, (4.2, 4.6), "chunk\n(sections + headings,\nfixed windows...)", width=2.5, height=1.0,
                kind="stage")
    emb = box(ax, (7.0, 4.6), "embed each chunk\n(MiniLM, 384-d,\nunit length)", width=2.4, height=1.0,
              kind="embedding")
    index = box(ax, (10.0, 4.6), "index: FAISS IndexFlatIP\n(cosine) + BM25\n(keywords)", width=2.8,
                height=1.0, kind="data")
    for left, right in ((docs, chunk), (chunk, emb), (emb, index)):
        arrow(ax, left["right"], right["left"])
    # for every question
    ax.text(0.2, 2.95, "per question", ha="left", va="center", fontsize=10, style="italic")
    q = box(ax, (1.4, 2.0), "question", width=2.2, height=0.7, kind="data")
    qe = box(ax, (4.2, 2.0), "embed the question\n(same model)", width=2.5, height=0.8, kind="embedding")
    search = box(ax, (7.0, 2.0), "top-k search,\nrank fusion", width=2.4, height=0.8, kind="attention")
    gate = box(ax, (10.0, 2.0), "best cosine >=\nmin_score?", width=2.4, height=0.8, kind="norm")
    arrow(ax, q["right"], qe["left"])
    arrow(ax, qe["right"], search["left"])
    arrow(ax, index["bottom"], (7.9, search["top"][1]), label="chunks + vectors")
    arrow(ax, search["right"], gate["left"])
    idk = box(ax, (10.0, 0.5), "\"I don't know.\"\n(the model is not asked)", width=2.8, height=0.7, kind="note")
    arrow(ax, gate["bottom"], idk["top"], label="no")
    prompt = box(ax, (12.9, 3.3), "grounded prompt:\nnumbered passages\n[1] [2] [3] + question",
                 width=2.6, height=1.0, kind="stage")
    arrow(ax, gate["right"], (prompt["bottom"][0], prompt["bottom"][1]), label="yes")
    llm = box(ax, (12.9, 1.3), "chat model\n(SmolLM2) ->\nanswer citing [n]", width=2.4, height=1.0, kind="model")
    arrow(ax, (13.6, prompt["bottom"][1]), (13.6, llm["top"][1]))
    ax.text(12.9, 4.2, "passages are untrusted:\nfilter injections, fence them", ha="center", va="bottom",
            fontsize=8.5, color="#333333")
    return fig
