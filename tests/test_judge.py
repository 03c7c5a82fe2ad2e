"""utils.judge: pairwise and rubric verdicts read from log-likelihoods, position swap, agreement."""

import pytest
import torch

from tests.standin import ScriptedModel, tiny_chat_model
from utils.judge import (
    PADDING,
    VERDICTS,
    agreement,
    check_pairs,
    judge_by_rubric,
    judge_pairwise,
    pad_answer,
    pairwise_margins,
    pairwise_prompt,
    rubric_prompt,
    rubric_scores,
    swapped,
    verdict_of,
)

PAIRS = [
    {"question": "What is 2 + 2?", "answer_a": "4", "answer_b": "5", "reference": "4"},
    {"question": "Capital of France?", "answer_a": "Lyon", "answer_b": "Paris", "reference": "Paris"},
    {"question": "Colour of the sky?", "answer_a": "Blue.", "answer_b": "It is green, of course.", "reference": "blue"},
]


@pytest.fixture(scope="module")
def standin():
    return tiny_chat_model()


def test_prompts_put_the_instruction_first_and_end_where_the_verdict_starts(standin):
    _, tok = standin
    prompt = pairwise_prompt(tok, "Q?", "first", "second", reference="ref")
    assert prompt.endswith("<|im_start|>assistant\nThe better answer is Answer")
    assert prompt.index("Reply with A or B") < prompt.index("Question: Q?") < prompt.index("Reference answer (correct): ref")
    assert prompt.index("Answer A: first") < prompt.index("Answer B: second")
    assert "Reference" not in pairwise_prompt(tok, "Q?", "first", "second")
    graded = rubric_prompt(tok, "Q?", "an answer")
    assert graded.endswith("Grade:") and "5 = correct and complete" in graded and "Answer: an answer" in graded


def test_margin_is_the_log_prob_difference_of_the_two_verdict_tokens(standin):
    model, tok = standin
    margins = pairwise_margins(model, tok, PAIRS)
    for pair, margin in zip(PAIRS, margins):  # recomputed with one plain forward pass per verdict
        prompt = pairwise_prompt(tok, pair["question"], pair["answer_a"], pair["answer_b"])
        totals = []
        for verdict in VERDICTS:
            p_ids = tok.encode(prompt, add_special_tokens=False)
            v_ids = tok.encode(verdict, add_special_tokens=False)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([p_ids + v_ids])).logits[0].log_softmax(-1)
            totals.append(sum(logp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(v_ids)))
        assert margin == pytest.approx(totals[0] - totals[1], abs=1e-4)


def test_a_judge_that_always_says_A_is_caught_by_the_position_swap(standin):
    _, tok = standin
    always_a = ScriptedModel(tok, " A")  # whatever the answers, the next tokens are " A"
    one_order = judge_pairwise(always_a, tok, PAIRS)
    assert [r["verdict"] for r in one_order] == ["A", "A", "A"] and all(r["consistent"] is None for r in one_order)
    both = judge_pairwise(always_a, tok, PAIRS, both_orders=True)
    assert all(r["consistent"] is False and r["verdict"] == "tie" and r["margin"] == 0 for r in both)


def test_both_orders_average_the_preference_for_answer_a(standin):
    model, tok = standin
    ab = pairwise_margins(model, tok, PAIRS)
    ba = pairwise_margins(model, tok, swapped(PAIRS))
    both = judge_pairwise(model, tok, PAIRS, both_orders=True)
    for m_ab, m_ba, result in zip(ab, ba, both):
        assert result["margin"] == pytest.approx((m_ab - m_ba) / 2, abs=1e-6)
        assert result["consistent"] == ((m_ab > 0) == (m_ba < 0))
        assert result["slot_margins"] == pytest.approx((m_ab, m_ba))
        assert result["verdict"] == verdict_of(result["margin"])


def test_reference_changes_the_prompt_and_is_required_when_asked(standin):
    model, tok = standin
    with_ref = pairwise_margins(model, tok, PAIRS, use_reference=True)
    assert with_ref != pytest.approx(pairwise_margins(model, tok, PAIRS), abs=1e-6)
    with pytest.raises(ValueError, match="missing \\['reference'\\]"):
        judge_pairwise(model, tok, [{"question": "q", "answer_a": "a", "answer_b": "b"}], use_reference=True)


@pytest.mark.parametrize("grade", [1, 4, 5])
def test_rubric_score_is_the_expected_grade(standin, grade):
    _, tok = standin
    grader = ScriptedModel(tok, f" {grade}")  # puts (almost) all probability on one grade
    assert rubric_scores(grader, tok, ["Q?", "R?"], ["a", "b"]) == pytest.approx([grade, grade], abs=1e-3)


def test_rubric_verdicts_compare_the_two_grades(standin):
    model, tok = standin
    results = judge_by_rubric(model, tok, PAIRS)
    grades = rubric_scores(model, tok, [p["question"] for p in PAIRS] * 2,
                           [p["answer_a"] for p in PAIRS] + [p["answer_b"] for p in PAIRS])
    for i, result in enumerate(results):
        assert result["grades"] == pytest.approx((grades[i], grades[3 + i]))
        assert result["verdict"] == verdict_of(grades[i] - grades[3 + i])
        assert 1.0 <= min(result["grades"]) and max(result["grades"]) <= 5.0
    same = judge_by_rubric(ScriptedModel(tok, " 3"), tok, PAIRS)
    assert [r["verdict"] for r in same] == ["tie"] * 3  # equal grades are a tie, not a win for A


def test_pad_answer_adds_length_but_keeps_the_answer():
    assert pad_answer("Paris. ") == "Paris." + PADDING
    assert len(pad_answer("4")) > 100
    with pytest.raises(ValueError, match="non-empty"):
        pad_answer(" ")


def test_swapped_exchanges_the_answers_and_keeps_the_rest():
    (pair,) = swapped(PAIRS[:1])
    assert (pair["answer_a"], pair["answer_b"], pair["reference"]) == ("5", "4", "4")
    assert PAIRS[0]["answer_a"] == "4"  # the input is not changed


def test_agreement_is_cohen_kappa_with_an_interval():
    result = agreement([{"verdict": v} for v in "ABAA"], list("ABBA"))
    assert result["agree"] == 0.75 and result["kappa"] == pytest.approx(0.5) and result["n"] == 4
    assert result["kappa_low"] <= result["kappa"] <= result["kappa_high"]
    perfect = agreement(list("ABAB" * 5), list("ABAB" * 5))
    assert perfect["kappa"] == 1.0 and perfect["kappa_low"] == 1.0
    assert agreement(list("AAAA" * 5), list("ABAB" * 5))["kappa"] == 0.0  # always "A": chance level


@pytest.mark.parametrize("call, error, message", [
    (lambda: check_pairs({"question": "q"}), TypeError, "list of dicts"),
    (lambda: check_pairs([]), ValueError, "non-empty"),
    (lambda: check_pairs(["q"]), TypeError, r"pairs\[0\] must be a dict"),
    (lambda: check_pairs([{"question": "q", "answer_a": "a"}]), ValueError, "missing \\['answer_b'\\]"),
    (lambda: check_pairs([{"question": "q", "answer_a": "", "answer_b": "b"}]), ValueError, "answer_a"),
    (lambda: check_pairs([{"question": "q", "answer_a": 1, "answer_b": "b"}]), TypeError, "must be a str"),
    (lambda: agreement(["A", "B"], ["A"]), ValueError, "same length"),
    (lambda: agreement("AB", ["A", "B"]), TypeError, "must be a list"),
    (lambda: agreement([], []), ValueError, "non-empty"),
    (lambda: agreement([["A"]], ["A"]), TypeError, "strings or ints"),
])
def test_bad_input_is_refused_with_a_clear_message(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_rubric_scores_refuse_mismatched_lists(standin):
    model, tok = standin
    with pytest.raises(ValueError, match="one entry per answer"):
        rubric_scores(model, tok, ["q1", "q2"], ["a"])
    with pytest.raises(TypeError, match="not one string"):
        rubric_scores(model, tok, "q", "a")


def test_course_judge_pairs_are_well_formed_and_balanced():
    from utils.data import load_jsonl

    pairs = load_jsonl("15_judge_pairs.jsonl")
    check_pairs(pairs, need_reference=True)
    assert len(pairs) >= 60 and len({p["id"] for p in pairs}) == len(pairs)
    labels = [p["better"] for p in pairs]
    assert set(labels) == {"A", "B"} and labels.count("A") == labels.count("B")  # always-A scores kappa 0
    assert all(p["answer_a"] != p["answer_b"] and p["why"].strip() for p in pairs)
    # the long answer is the better one on some pairs and the worse one on others: length alone cannot win
    longer_is_better = [(len(p["answer_a"]) > len(p["answer_b"])) == (p["better"] == "A") for p in pairs]
    assert 0.25 < sum(longer_is_better) / len(pairs) < 0.75
