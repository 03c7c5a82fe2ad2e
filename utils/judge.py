"""LLM-as-judge: a language model grades answers, and how far to trust it. Shown in lesson 15.

Benchmarks with one right answer can be scored by code (lesson 15's multiple choice). Open answers
("explain X", "write Y") cannot, so people ask a model to grade them. Two formats:

* **pairwise**: question + answer A + answer B -> which is better, "A" or "B";
* **rubric** (pointwise): question + one answer + a scale ("5 = correct and complete ... 1 = wrong")
  -> a score from 1 to 5; two answers are compared by their scores.

The judge writes nothing that must be parsed. As in the multiple-choice benchmark, the verdict is
read from log-likelihoods: the prompt ends where the verdict would start ("...The better answer is
Answer"), and we compare log p(" A") with log p(" B"), or take p(" 1") ... p(" 5") for a rubric
score. Every verdict is valid, and it comes with a margin that says how sure the judge is.

A judge is a model, with a model's habits. Lesson 15 measures three that are well known:

* **position bias**: it prefers the answer in slot A (or B) whatever that answer is. Remedy: judge
  both orders and average (`both_orders=True`); a verdict that flips with the order is a coin toss.
* **verbosity bias**: it prefers a longer answer with no more content (`pad_answer` makes one).
* **self-preference**: it prefers answers it would write itself.

and checks the judge against human labels with Cohen's kappa (`agreement`).
"""

from __future__ import annotations

from utils.checks import check_text
from utils.prompting import chat_prompt, score_choices
from utils.stats import cohen_kappa, kappa_ci

JUDGE_SYSTEM = "You are a careful teacher who grades answers to questions."
# The instruction and rubric come first and the question last, so that every judge prompt starts with
# the same tokens: score_choices runs that shared prefix through the model once for the whole batch.
PAIRWISE_INSTRUCTION = ("Read the question and the two answers below. Decide which answer is better: "
                        "correct first, then helpful and to the point. Reply with A or B.")
RUBRIC_INSTRUCTION = "Read the question and the answer below. Grade the answer from 1 to 5 using this scale."
DEFAULT_RUBRIC = ("5 = correct and complete\n"
                  "4 = correct, with a small gap\n"
                  "3 = partly correct\n"
                  "2 = mostly wrong\n"
                  "1 = wrong or off topic")
VERDICT_START = "The better answer is Answer"  # the judge's reply begins here; the next token is " A" or " B"
SCORE_START = "Grade:"  # the next token is " 1" ... " 5"
VERDICTS = (" A", " B")
SCORES = (" 1", " 2", " 3", " 4", " 5")
# Sentences that add length and confidence but no content (used to measure verbosity bias)
PADDING = (" This is a well-known fact that experts agree on, and it is important to understand it clearly."
           " To summarise: the answer above is accurate, complete and carefully checked.")


def check_pairs(pairs, need_reference: bool = False) -> list[dict]:
    """Validate judge pairs: dicts with "question", "answer_a", "answer_b" (non-empty str) and, when
    need_reference, "reference" (the right answer, written by a person). Returns them as a list.

    Example: check_pairs([{"question": "2+2?", "answer_a": "4", "answer_b": "5"}]) -> the same list.
    """
    if isinstance(pairs, dict) or not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of dicts, got {type(pairs).__name__}")
    if not pairs:
        raise ValueError("pairs must be a non-empty list of dicts with question, answer_a, answer_b")
    keys = ("question", "answer_a", "answer_b") + (("reference",) if need_reference else ())
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise TypeError(f"pairs[{i}] must be a dict with keys {list(keys)}, got {type(pair).__name__}")
        missing = [key for key in keys if key not in pair]
        if missing:
            raise ValueError(f"pairs[{i}] is missing {missing}; each pair needs {list(keys)}")
        for key in keys:
            check_text(f"pairs[{i}][{key!r}]", pair[key])
    return list(pairs)


def pairwise_prompt(tokenizer, question: str, answer_a: str, answer_b: str, reference: str | None = None) -> str:
    """The chat prompt that asks the judge to compare two answers, ending where the verdict starts.

    Example (user turn): "...Reply with A or B.\\n\\nQuestion: 2+2?\\n[Reference answer: 4]\\n
    Answer A: 4\\nAnswer B: 5" and then the assistant turn "The better answer is Answer".
    """
    lines = [PAIRWISE_INSTRUCTION, "", f"Question: {check_text('question', question)}"]
    if reference is not None:
        lines.append(f"Reference answer (correct): {check_text('reference', reference)}")
    lines += [f"Answer A: {check_text('answer_a', answer_a)}", f"Answer B: {check_text('answer_b', answer_b)}"]
    return chat_prompt(tokenizer, "\n".join(lines), system=JUDGE_SYSTEM) + VERDICT_START


def rubric_prompt(tokenizer, question: str, answer: str, reference: str | None = None,
                  rubric: str = DEFAULT_RUBRIC) -> str:
    """The chat prompt that asks the judge to grade one answer on a 1-5 scale, ending at "Grade:"."""
    lines = [RUBRIC_INSTRUCTION, check_text("rubric", rubric), "", f"Question: {check_text('question', question)}"]
    if reference is not None:
        lines.append(f"Reference answer (correct): {check_text('reference', reference)}")
    lines.append(f"Answer: {check_text('answer', answer)}")
    return chat_prompt(tokenizer, "\n".join(lines), system=JUDGE_SYSTEM) + SCORE_START


def pairwise_margins(model, tokenizer, pairs, use_reference: bool = False, batch_size: int = 16) -> list[float]:
    """log p(" A") - log p(" B") after each pair's prompt: > 0 means the judge prefers slot A.

    One order only: slot A holds pair["answer_a"]. Example: a margin of 2.0 means the judge puts
    e^2 = 7.4 times more probability on "A" than on "B".
    """
    pairs = check_pairs(pairs, need_reference=use_reference)
    prompts = [pairwise_prompt(tokenizer, p["question"], p["answer_a"], p["answer_b"],
                               p["reference"] if use_reference else None) for p in pairs]
    logprobs = score_choices(model, tokenizer, prompts, list(VERDICTS), batch_size=batch_size)  # (n, 2)
    return (logprobs[:, 0] - logprobs[:, 1]).tolist()


def verdict_of(margin: float) -> str:
    """"A" for a positive margin, "B" for a negative one, "tie" for 0. Example: -0.3 -> "B"."""
    return "A" if margin > 0 else ("B" if margin < 0 else "tie")


def swapped(pairs) -> list[dict]:
    """The same pairs with answer_a and answer_b exchanged. Example: {a: "4", b: "5"} -> {a: "5", b: "4"}."""
    return [dict(p, answer_a=p["answer_b"], answer_b=p["answer_a"]) for p in check_pairs(pairs)]


def judge_pairwise(model, tokenizer, pairs, both_orders: bool = False, use_reference: bool = False,
                   batch_size: int = 16) -> list[dict]:
    """Pairwise verdicts: one dict per pair. Shown in lesson 15.

    "margin": the judge's preference for answer_a over answer_b (log-prob difference; > 0 favours a).
    With both_orders the pair is also judged with the answers swapped, and the margin is the average
    of the two orders' preferences for answer_a, which cancels a constant preference for one slot:
        margin = (margin_in_order_ab - margin_in_order_ba) / 2
    "consistent" then says whether both orders picked the same answer (None with one order).
    "slot_margins": each order's own log p(" A") - log p(" B") (slot A, not answer_a): (ab,) or (ab, ba).
    "verdict" is "A" (answer_a is better) when margin > 0, "B" when margin < 0, "tie" when it is exactly 0
    (a judge that always picks slot A, judged in both orders, ties on every pair).
    """
    first = pairwise_margins(model, tokenizer, pairs, use_reference, batch_size)
    second = pairwise_margins(model, tokenizer, swapped(pairs), use_reference, batch_size) if both_orders else None
    results = []
    for i, margin_ab in enumerate(first):
        if second is None:
            margin, consistent = margin_ab, None
        else:
            margin_ba = second[i]  # > 0 means slot A, which now holds answer_b
            margin, consistent = (margin_ab - margin_ba) / 2, (margin_ab > 0) == (margin_ba < 0)
        orders = (margin_ab,) if second is None else (margin_ab, second[i])
        results.append({"verdict": verdict_of(margin), "margin": margin, "consistent": consistent,
                        "slot_margins": orders})
    return results


def rubric_scores(model, tokenizer, questions, answers, references=None, rubric: str = DEFAULT_RUBRIC,
                  batch_size: int = 16) -> list[float]:
    """Expected grade (1 to 5) of each answer: sum of k * p(k), p renormalised over the five grades.

    The expectation, not the most likely grade, so that two answers rarely tie. Shown in lesson 15.
    Example: p(" 4") = 0.5, p(" 5") = 0.5 and the rest 0 -> 4.5.
    """
    if isinstance(questions, str) or isinstance(answers, str):
        raise TypeError("questions and answers must be lists of strings (one per answer), not one string")
    if len(questions) != len(answers) or (references is not None and len(references) != len(answers)):
        raise ValueError(f"questions, answers (and references) must have one entry per answer, got "
                         f"{len(questions)} and {len(answers)}"
                         + (f" and {len(references)}" if references is not None else ""))
    prompts = [rubric_prompt(tokenizer, q, a, None if references is None else references[i], rubric)
               for i, (q, a) in enumerate(zip(questions, answers))]
    logprobs = score_choices(model, tokenizer, prompts, list(SCORES), batch_size=batch_size)  # (n, 5)
    probs = logprobs.softmax(dim=-1)  # renormalised over the five grades
    grades = [1.0, 2.0, 3.0, 4.0, 5.0]
    return [sum(g * float(p) for g, p in zip(grades, row)) for row in probs]


def judge_by_rubric(model, tokenizer, pairs, use_reference: bool = False, rubric: str = DEFAULT_RUBRIC,
                    batch_size: int = 16) -> list[dict]:
    """Pairwise verdicts from rubric grades: each answer is graded alone, so there is no slot to prefer.

    One dict per pair: "verdict" ("A" when answer_a's grade is higher, "B" when lower, else "tie"), "margin" (grade of a
    minus grade of b), "grades" ((grade of a, grade of b)).
    """
    pairs = check_pairs(pairs, need_reference=use_reference)
    questions = [p["question"] for p in pairs] * 2
    answers = [p["answer_a"] for p in pairs] + [p["answer_b"] for p in pairs]
    references = [p["reference"] for p in pairs] * 2 if use_reference else None
    grades = rubric_scores(model, tokenizer, questions, answers, references, rubric, batch_size)
    n = len(pairs)
    return [{"verdict": verdict_of(grades[i] - grades[n + i]), "margin": grades[i] - grades[n + i],
             "grades": (grades[i], grades[n + i])} for i in range(n)]


def pad_answer(answer: str, padding: str = PADDING) -> str:
    """The answer made longer with sentences that add no content (to measure verbosity bias).

    Example: pad_answer("Paris.") -> "Paris. This is a well-known fact that experts agree on, ..."
    """
    return check_text("answer", answer).rstrip() + check_text("padding", padding)


def agreement(verdicts, labels, seed: int = 0) -> dict:
    """How far a judge agrees with human labels: raw agreement and Cohen's kappa with a 95% bootstrap interval.

    verdicts: judge results (dicts with "verdict") or plain labels; labels: the human labels ("A"/"B").
    Example: agreement(["A", "B", "A", "A"], ["A", "B", "B", "A"]) -> {"agree": 0.75, "kappa": 0.5, ...}.
    """
    if isinstance(verdicts, (str, bytes)) or not isinstance(verdicts, (list, tuple)):
        raise TypeError(f"verdicts must be a list, got {type(verdicts).__name__}")
    judged = [v["verdict"] if isinstance(v, dict) else v for v in verdicts]
    kappa = cohen_kappa(judged, labels)  # validates: equal, non-zero lengths; labels are categories
    low, high = kappa_ci(judged, labels, seed=seed)
    return {"agree": sum(j == h for j, h in zip(judged, labels)) / len(judged), "kappa": kappa,
            "kappa_low": low, "kappa_high": high, "n": len(judged)}
