"""Multiple-choice benchmarks scored by log-likelihood, exactly as lm-evaluation-harness does it.

MMLU, ARC and HellaSwag do not ask the model to *write* an answer. Each choice is scored as a
continuation of the question, and the model "picks" the choice it finds most likely:

    context      = "Question: What is the capital of France?\nAnswer:"
    continuation = " Paris"                        (a space, then the choice: lm-eval's target_delimiter)
    score        = log p(" Paris" | context) = sum over the continuation's tokens of log p(token | all before)

One forward pass over context + continuation gives every token's log-probability at once, so scoring
a 4-choice item costs one batched forward pass of 4 rows. No text is generated and no answer has to be
parsed, which is why these scores are cheap and reproducible.

Why normalisation changes the winner: a sum of log-probabilities only goes down as tokens are added
(each token adds log p <= 0). A long right answer ("the force of gravity between the two bodies") is
penalised against a short wrong one ("heat") for being long, not for being wrong. "pred_norm" divides
each sum by the choice's length in UTF-8 bytes (without the leading space) before taking the argmax: a
per-byte score that compares choices of different lengths more fairly. On items whose choices differ in
length the two rules can pick different winners; on one-word choices they rarely do. (lm-eval 0.4.13's
`acc_norm` divides by characters and its `acc_bytes` by bytes: for ASCII text, as in the course's items,
all three are the same.)

Tokenisation follows lm-eval's HF backend (`TemplateLM._encode_pair`): trailing spaces of the context
move to the continuation, the whole string is encoded once and split after the context's tokens, so a
word is tokenised as it would be in running text. `run_lm_eval` runs lm-eval itself on the same items
(a local task written as YAML) so the two can be compared; lesson 15 and tests/test_evaluation.py do.
Shown in lesson 15.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from utils.answers import mentions_any
from utils.checks import check_int, check_positive_int, check_text, check_text_list
from utils.stats import Accuracy, accuracy_ci

QUESTION_TEMPLATE = "Question: {question}\nAnswer:"  # the context, as lm-eval's MMLU/ARC-style tasks write it
TARGET_DELIMITER = " "  # put between the context and each choice (lm-eval's default target_delimiter)
LM_EVAL_TASK = "course_mc"


def check_items(items) -> list[dict]:
    """Validate multiple-choice items; returns them as a list.

    Each item is a dict with "question" (non-empty str), "choices" (a list of at least 2 non-empty
    strings) and "answer" (the int index of the right choice); other keys (category, split) are kept.
    Example: check_items([{"question": "2+2?", "choices": ["4", "5"], "answer": 0}]) -> the same list.
    """
    if isinstance(items, dict) or not isinstance(items, (list, tuple)):
        raise TypeError(f"items must be a list of dicts, got {type(items).__name__}")
    if not items:
        raise ValueError("items must be a non-empty list of multiple-choice items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"items[{i}] must be a dict with keys question, choices, answer; "
                            f"got {type(item).__name__}")
        missing = [key for key in ("question", "choices", "answer") if key not in item]
        if missing:
            raise ValueError(f"items[{i}] is missing {missing}; each item needs question (str), "
                             "choices (list of str) and answer (int index into choices)")
        check_text(f"items[{i}]['question']", item["question"])
        choices = check_text_list(f"items[{i}]['choices']", item["choices"])
        if len(choices) < 2:
            raise ValueError(f"items[{i}]['choices'] must hold at least 2 choices, got {len(choices)}")
        check_int(f"items[{i}]['answer']", item["answer"], low=0, high=len(choices) - 1,
                  what=" (an index into choices)")
    return list(items)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's HF backend makes them for a causal model.

    Example (SmolLM2): ("Answer:", " Paris") -> ([21350, 42], [7042]).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "Paris" is scored as "Answer:" + " Paris": words keep their leading space
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def argmax(values) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax). Example: [1, 3, 3] -> 1."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.no_grad()
def score_item(model, tokenizer, question: str, choices: list[str]) -> dict:
    """Log-likelihood of each choice as the continuation of the question. Shown in lesson 15.

    The question is the same for every choice, so it runs through the model once; the choices then
    run together (B = len(choices)) on copies of its KV cache (lesson 06), and the output layer is
    applied only where a choice token is predicted. Same numbers as one forward pass per choice, at
    less cost for a long question (the shared question is run once).
    Returns {"logprobs": [float per choice], "n_tokens": [continuation tokens per choice],
    "pred": argmax of logprobs, "pred_norm": argmax of logprobs / bytes of the choice}.
    """
    context = QUESTION_TEMPLATE.format(question=question)
    pairs = [encode_pair(tokenizer, context, TARGET_DELIMITER + choice) for choice in choices]
    context_ids = pairs[0][0]  # the context is tokenised alone, so it is the same for every choice
    choice_ids = [ids for _, ids in pairs]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    for ids in choice_ids:
        if not ids:
            raise ValueError(f"a choice of {question[:60]!r} tokenised to nothing; choices must be non-empty text")
        # lm-eval would silently cut the question from the left; the course refuses instead
        if max_positions is not None and len(context_ids) + len(ids) - 1 > max_positions:
            raise ValueError(f"question + choice is {len(context_ids) + len(ids)} tokens, more than the model's "
                             f"{max_positions}; shorten the item")
    device = next(model.parameters()).device
    decoder, output_layer = model.get_decoder(), model.get_output_embeddings()

    # 1. The context once: its last hidden state predicts every choice's first token
    out = decoder(input_ids=torch.tensor([context_ids], device=device), use_cache=True)
    last_context_state = out.last_hidden_state[0, -1]  # (d,)

    # 2. All choices at once, minus their last token (only ever a target), right-padded, after the context
    n_context, width = len(context_ids), max(len(ids) for ids in choice_ids) - 1
    states = torch.empty(len(choices), 0, last_context_state.shape[-1], device=device)  # (B, 0, d)
    if width > 0:  # single-token choices need no second pass
        input_ids = torch.zeros(len(choices), width, dtype=torch.long)  # (B, W); pad id 0 is never scored
        attention_mask = torch.ones(len(choices), n_context + width, dtype=torch.long)  # (B, C + W)
        for b, ids in enumerate(choice_ids):
            input_ids[b, : len(ids) - 1] = torch.tensor(ids[:-1])
            attention_mask[b, n_context + len(ids) - 1:] = 0  # right pads: later positions only, never read
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(choices))  # one copy of the context's keys/values per choice
        positions = torch.arange(n_context, n_context + width, device=device).expand(len(choices), -1)  # (B, W)
        states = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state

    logprobs = []
    for b, ids in enumerate(choice_ids):
        # token 0 is predicted by the context's last state, token k by the choice's state k - 1
        predicting = torch.cat([last_context_state[None], states[b, : len(ids) - 1]])  # (n_choice_tokens, d)
        token_logprobs = torch.log_softmax(output_layer(predicting).float(), dim=-1)  # (n_choice_tokens, vocab)
        logprobs.append(float(token_logprobs[torch.arange(len(ids)), ids].sum()))
    per_byte = [lp / len(choice.encode("utf-8")) for lp, choice in zip(logprobs, choices)]  # no space counted
    return {"logprobs": logprobs, "n_tokens": [len(ids) for ids in choice_ids],
            "pred": argmax(logprobs), "pred_norm": argmax(per_byte)}


def score_multiple_choice(model, tokenizer, items) -> list[dict]:
    """Score every item by log-likelihood (as lm-eval's multiple_choice tasks do). Shown in lesson 15.

    items: [{"question": str, "choices": [str, ...], "answer": int}, ...] (see check_items).
    Returns one dict per item: "logprobs" (summed log-prob of " " + choice given "Question: ...\\nAnswer:"),
    "n_tokens", "pred" (argmax of logprobs) and "pred_norm" (argmax of logprobs per UTF-8 byte of the choice).
    """
    items = check_items(items)
    was_training = model.training
    model.eval()  # dropout off: the same item always gets the same score
    try:
        return [score_item(model, tokenizer, item["question"], item["choices"]) for item in items]
    finally:
        model.train(was_training)


def accuracy(results, items) -> dict[str, Accuracy]:
    """{"acc": ..., "acc_norm": ...} as utils.stats.Accuracy (value with a Wilson 95% interval).

    Example: preds [0, 1] / [0, 0] against answers [0, 0] -> acc 0.50 [0.09, 0.91], acc_norm 1.00 [0.34, 1.00].
    """
    items = check_items(items)
    if not isinstance(results, (list, tuple)) or len(results) != len(items):
        raise ValueError(f"results must be a list with one result per item ({len(items)}), got "
                         f"{len(results) if isinstance(results, (list, tuple)) else type(results).__name__}")
    for i, result in enumerate(results):
        if not isinstance(result, dict) or "pred" not in result or "pred_norm" not in result:
            raise TypeError(f"results[{i}] must be a dict from score_multiple_choice (with pred, pred_norm)")
    answers = [item["answer"] for item in items]
    return {"acc": accuracy_ci([r["pred"] == a for r, a in zip(results, answers)]),
            "acc_norm": accuracy_ci([r["pred_norm"] == a for r, a in zip(results, answers)])}


def item_table(item: dict, result: dict) -> str:
    """One scored item as a small table: each choice's summed log-prob, log-prob per byte, and marks for
    the right answer (*), the pick by sum (acc) and the pick per byte (acc_norm). Shown in lesson 15.

    Example row: "  C  -4.21   -0.70  *  acc  acc_norm   it reflects light from the Sun".
    """
    check_items([item])
    if not isinstance(result, dict) or len(result.get("logprobs", ())) != len(item["choices"]):
        raise ValueError("result must be score_multiple_choice's dict for this item (one logprob per choice)")
    lines = [item["question"], "     sum lp  lp/byte"]
    for i, (choice, lp) in enumerate(zip(item["choices"], result["logprobs"])):
        marks = ("*" if i == item["answer"] else " ") + ("  acc" if i == result["pred"] else "     ") + (
            "  acc_norm" if i == result["pred_norm"] else "          ")
        lines.append(f"  {'ABCDEFGH'[i] if i < 8 else i}  {lp:6.2f}  {lp / len(choice.encode('utf-8')):6.2f}  "
                     f"{marks}   {choice}")
    return "\n".join(lines)


LETTERS = "ABCDEFGH"


def lettered_prompt(item: dict) -> str:
    """The question with its choices as lettered options, as a generation benchmark shows them.

    Example: {"question": "2+2?", "choices": ["4", "5"]} -> "2+2?\nA. 4\nB. 5\nAnswer with the letter of the right choice."
    """
    check_items([item])
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item["choices"]))
    return f"{item['question']}\n{options}\nAnswer with the letter of the right choice."


def parse_letter(reply: str, n_choices: int, strict: bool = False) -> int | None:
    """The choice index a reply names by letter, or None. Shown in lesson 15.

    strict: the reply must be the letter alone (an optional "." or ")" after it), as an exact-match scorer
    reads it. Otherwise the first standalone capital letter among the first n_choices counts.
    Example: "B) Paris" -> 1 (lenient) and None (strict); "B." -> 1 in both; "A is wrong, C" -> 0 (lenient).
    """
    check_text("reply", reply, allow_empty=True)
    n_choices = check_int("n_choices", n_choices, low=2, high=len(LETTERS))
    allowed = LETTERS[:n_choices]
    if strict:
        match = re.fullmatch(rf"\s*([{allowed}])[.)]?\s*", reply)
    else:
        match = re.search(rf"(?<![A-Za-z])([{allowed}])(?![A-Za-z])", reply)
    return allowed.index(match.group(1)) if match else None


def parse_choice_text(reply: str, choices) -> int | None:
    """The index of the one choice whose text the reply contains (normalised, whole words), else None.

    A reply that names two choices ("Paris or Lyon") is not counted as either. Shown in lesson 15.
    Example: ("It is Paris.", ["Lyon", "Paris"]) -> 1; ("Paris or Lyon", ["Lyon", "Paris"]) -> None.
    """
    choices = check_text_list("choices", choices)
    found = [i for i, choice in enumerate(choices) if mentions_any(reply, [choice])]
    return found[0] if len(found) == 1 else None


def write_lm_eval_task(folder, items, task_name: str = LM_EVAL_TASK) -> Path:
    """Write `items` as a local lm-eval task: folder/items.jsonl + folder/<task_name>.yaml. Returns the YAML path.

    The YAML is plain lm-eval configuration: `lm_eval --include_path FOLDER --tasks NAME ...` runs it too.
    """
    items = check_items(items)
    if not isinstance(task_name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", task_name):
        raise ValueError(f"task_name must be letters, digits and underscores (it names a file), got {task_name!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "items.jsonl"
    data_file.write_text("".join(json.dumps({key: item[key] for key in ("question", "choices", "answer")}) + "\n"
                                 for item in items), encoding="utf-8")
    # YAML written out line by line so that it reads like lm-eval's own task files; json.dumps quotes each
    # string as a YAML double-quoted scalar (so "\n" stays a newline escape and paths may hold spaces)
    lines = [
        f"task: {task_name}",
        "dataset_path: json  # the HF datasets JSON loader, reading our local file",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {json.dumps(QUESTION_TEMPLATE.replace('{question}', '{{question}}'))}  # Jinja",
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: answer",
        f"target_delimiter: {json.dumps(TARGET_DELIMITER)}",
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
    ]
    yaml_path = folder / f"{task_name}.yaml"
    yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return yaml_path


def run_lm_eval(items, pretrained, tokenizer=None, batch_size: int = 8, device: str = "cpu") -> dict:
    """Score `items` with lm-evaluation-harness itself (its HF backend), offline, for comparison.

    pretrained: a model folder (str/Path, e.g. the course's converted SmolLM2 `model.name_or_path`)
    loaded in float32, or a model object (then pass its tokenizer too).
    Returns {"logprobs": [[float per choice] per item], "acc": float, "acc_norm": float}.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    items = check_items(items)
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(pretrained, (str, Path)):
        lm = HFLM(pretrained=str(pretrained), dtype="float32", device=device, batch_size=batch_size)
    else:
        if tokenizer is None:
            raise ValueError("pass tokenizer= with a model object (lm-eval cannot find it from a model)")
        lm = HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="lm_eval_task_") as folder:
        write_lm_eval_task(folder, items)
        task_manager = TaskManager(include_path=folder, include_defaults=False)  # skip lm-eval's 1000s of tasks
        out = simple_evaluate(model=lm, tasks=[LM_EVAL_TASK], task_manager=task_manager, num_fewshot=0,
                              log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][LM_EVAL_TASK], key=lambda sample: sample["doc_id"])
    metrics = out["results"][LM_EVAL_TASK]
    return {"logprobs": [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples],
            "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}
