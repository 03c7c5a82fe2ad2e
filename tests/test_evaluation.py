"""utils.evaluation: multiple-choice scoring by log-likelihood, and parity with lm-evaluation-harness."""

import json
import math

import pytest
import torch

from tests.standin import tiny_chat_model
from utils.data import load_jsonl
from utils.evaluation import (
    QUESTION_TEMPLATE,
    accuracy,
    argmax,
    check_items,
    encode_pair,
    item_table,
    lettered_prompt,
    parse_choice_text,
    parse_letter,
    run_lm_eval,
    score_multiple_choice,
    write_lm_eval_task,
)

ITEMS = [  # choices of different lengths (and one non-ASCII) so that pred and pred_norm can differ
    {"question": "What is 2 + 2?", "choices": ["4", "five", "twenty-two, said the parrot", "3"], "answer": 0},
    {"question": "What colour is a clear daytime sky? ", "choices": ["blue", "green light"], "answer": 0},
    {"question": "Which drink has milk in it?", "choices": ["tea", "café au lait", "water"], "answer": 1},
]


@pytest.fixture(scope="module")
def standin():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def scored(standin):
    return score_multiple_choice(*standin, ITEMS)


def unbatched_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward pass over this pair alone: no batch, no padding."""
    context_ids, choice_ids = encode_pair(tokenizer, context, continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context_ids + choice_ids])).logits[0]  # (T, vocab)
    logprobs = torch.log_softmax(logits[-len(choice_ids) - 1: -1], dim=-1)  # the rows that predict the choice
    return sum(logprobs[k, token].item() for k, token in enumerate(choice_ids))


def test_logprobs_are_the_summed_token_logprobs_of_each_choice(standin, scored):
    model, tok = standin
    assert len(scored) == len(ITEMS)
    for item, result in zip(ITEMS, scored):
        assert len(result["logprobs"]) == len(item["choices"])
        context = QUESTION_TEMPLATE.format(question=item["question"])
        for choice, logprob in zip(item["choices"], result["logprobs"]):
            assert logprob == pytest.approx(unbatched_logprob(model, tok, context, " " + choice), abs=1e-4)


def test_pred_is_the_argmax_and_pred_norm_divides_by_bytes(scored):
    for item, result in zip(ITEMS, scored):
        lps = result["logprobs"]
        assert result["pred"] == max(range(len(lps)), key=lps.__getitem__)
        per_byte = [lp / len(c.encode("utf-8")) for lp, c in zip(lps, item["choices"])]  # no leading space
        assert result["pred_norm"] == max(range(len(lps)), key=per_byte.__getitem__)
    # the random stand-in prefers short choices in total, long ones per byte: the rules disagree
    assert any(r["pred"] != r["pred_norm"] for r in scored)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(standin):
    _, tok = standin  # byte-level: one token per byte
    context_ids, choice_ids = encode_pair(tok, "Answer: ", "Paris")
    assert tok.decode(context_ids) == "Answer:" and tok.decode(choice_ids) == " Paris"


def test_scores_do_not_depend_on_the_other_choices_in_the_batch(standin):
    model, tok = standin
    alone = score_multiple_choice(model, tok, [{"question": "Q?", "choices": ["a", "bb"], "answer": 0}])
    padded = score_multiple_choice(model, tok, [{"question": "Q?", "choices": ["a", "bb", "a much longer choice"],
                                                 "answer": 0}])
    assert padded[0]["logprobs"][:2] == pytest.approx(alone[0]["logprobs"], abs=1e-5)


def test_scoring_leaves_a_training_model_in_training_mode(standin):
    model, tok = standin
    model.train()
    try:
        score_multiple_choice(model, tok, ITEMS[:1])
        assert model.training
    finally:
        model.eval()


def test_argmax_takes_the_first_of_ties():
    assert argmax([1, 3, 3]) == 1 and argmax([-2.0, -1.0]) == 1


def test_accuracy_counts_pred_and_pred_norm_with_wilson_intervals():
    items = [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 2
    results = [{"logprobs": [0, 0], "pred": 0, "pred_norm": 0}, {"logprobs": [0, 0], "pred": 1, "pred_norm": 0}]
    acc = accuracy(results, items)
    assert (acc["acc"].k, acc["acc"].n, acc["acc_norm"].k) == (1, 2, 2)
    assert acc["acc"].low == pytest.approx(0.0945, abs=1e-3) and acc["acc_norm"].high == 1.0
    with pytest.raises(ValueError, match="one result per item"):
        accuracy(results[:1], items)


@pytest.mark.parametrize("items, error, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 0}, TypeError, "list of dicts"),
    ([], ValueError, "non-empty"),
    (["q"], TypeError, r"items\[0\] must be a dict"),
    ([{"question": "q", "answer": 0}], ValueError, "missing \\['choices'\\]"),
    ([{"question": "q", "choices": [], "answer": 0}], ValueError, "non-empty list"),
    ([{"question": "q", "choices": ["a"], "answer": 0}], ValueError, "at least 2 choices"),
    ([{"question": "q", "choices": ["a", ""], "answer": 0}], ValueError, "non-empty string"),
    ([{"question": "q", "choices": "ab", "answer": 0}], TypeError, "list of strings"),
    ([{"question": "q", "choices": ["a", 2], "answer": 0}], TypeError, "must be a str"),
    ([{"question": "", "choices": ["a", "b"], "answer": 0}], ValueError, "question"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 2}], ValueError, "between 0 and 1"),
    ([{"question": "q", "choices": ["a", "b"], "answer": -1}], ValueError, "between 0 and 1"),
    ([{"question": "q", "choices": ["a", "b"], "answer": "0"}], TypeError, "answer.*must be an int"),
    ([{"question": "q", "choices": ["a", "b"], "answer": True}], TypeError, "must be an int"),
])
def test_bad_items_are_refused_with_a_clear_message(standin, items, error, message):
    with pytest.raises(error, match=message):
        check_items(items)
    with pytest.raises(error, match=message):
        score_multiple_choice(*standin, items)


def test_course_items_are_well_formed_and_balanced():
    items = load_jsonl("15_mc_items.jsonl")
    check_items(items)
    assert len(items) >= 120 and len({item["id"] for item in items}) == len(items)
    assert all(len(item["choices"]) == 4 for item in items)
    assert {item["category"] for item in items} == {"knowledge", "reading", "arithmetic", "common_sense"}
    splits = [item["split"] for item in items]
    assert splits.count("dev") == 20 and splits.count("test") == len(items) - 20
    counts = [sum(item["answer"] == k for item in items) for k in range(4)]
    assert max(counts) - min(counts) <= 0.1 * len(items) / 4, counts  # the right answer is not always "A"


def test_lm_eval_task_yaml_is_a_multiple_choice_task_over_our_items(tmp_path):
    import yaml

    path = write_lm_eval_task(tmp_path, ITEMS)
    config = yaml.safe_load(path.read_text())
    assert config["output_type"] == "multiple_choice" and config["doc_to_target"] == "answer"
    assert config["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    rows = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [row["choices"] for row in rows] == [item["choices"] for item in ITEMS]
    with pytest.raises(ValueError, match="task_name"):
        write_lm_eval_task(tmp_path, ITEMS, task_name="bad: name")


def assert_parity(ours, items, theirs):
    """Per-item, per-choice log-likelihoods within 1e-3, and the same acc / acc_norm."""
    for result, their_logprobs in zip(ours, theirs["logprobs"], strict=True):
        assert result["logprobs"] == pytest.approx(their_logprobs, abs=1e-3)
    acc = accuracy(ours, items)
    assert math.isclose(acc["acc"].value, theirs["acc"]) and math.isclose(acc["acc_norm"].value, theirs["acc_norm"])


def test_parity_with_lm_eval_on_the_standin_model(standin, scored):
    model, tok = standin  # lm-eval's HFLM takes a model object: the whole harness runs in a few seconds
    theirs = run_lm_eval(ITEMS, model, tokenizer=tok, batch_size=4)
    assert_parity(scored, ITEMS, theirs)
    assert theirs["acc"] != theirs["acc_norm"]  # so acc and acc_norm are each checked, not one twice


@pytest.mark.slow
def test_parity_with_lm_eval_on_smollm2_from_the_course_model_folder(monkeypatch):
    from utils.models import load_chat_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_chat_model()
    items = [item for item in load_jsonl("15_mc_items.jsonl") if item["split"] == "test"][:20]
    # lm-eval loads the converted safetensors folder itself (float32, cpu), as a learner would run it
    theirs = run_lm_eval(items, model.name_or_path, batch_size=8)
    assert_parity(score_multiple_choice(model, tok, items), items, theirs)


def test_pred_norm_counts_bytes_not_characters(standin):
    """Non-ASCII choices ("é" is 1 character, 2 UTF-8 bytes): pred_norm follows bytes, as DESIGN.md says."""
    model, tok = standin
    items = [{"question": f"Q{i}?", "choices": ["ééé", "abc", "é", "naïve café", "x" * (i + 1)], "answer": 0}
             for i in range(8)]
    results = score_multiple_choice(model, tok, items)
    differs = 0
    for item, result in zip(items, results):
        lps = result["logprobs"]
        per_byte = [lp / len(c.encode("utf-8")) for lp, c in zip(lps, item["choices"])]
        per_char = [lp / len(c) for lp, c in zip(lps, item["choices"])]
        assert result["pred_norm"] == max(range(len(lps)), key=per_byte.__getitem__)
        differs += max(range(len(lps)), key=per_char.__getitem__) != result["pred_norm"]
    assert differs > 0  # the two rules really disagree on these items, so the test can tell them apart


def test_item_table_marks_the_answer_and_both_picks():
    item = {"question": "Which is a fruit?", "choices": ["apple", "a red brick"], "answer": 0}
    result = {"logprobs": [-5.0, -6.0], "pred": 0, "pred_norm": 1}
    lines = item_table(item, result).splitlines()
    assert lines[0] == "Which is a fruit?"
    assert lines[2].split() == ["A", "-5.00", "-1.00", "*", "acc", "apple"]
    assert lines[3].split() == ["B", "-6.00", "-0.55", "acc_norm", "a", "red", "brick"]
    with pytest.raises(ValueError, match="one logprob per choice"):
        item_table(item, {"logprobs": [-1.0], "pred": 0, "pred_norm": 0})


def test_lettered_prompt_lists_the_choices():
    text = lettered_prompt({"question": "2+2?", "choices": ["4", "5", "6"], "answer": 0})
    assert text == "2+2?\nA. 4\nB. 5\nC. 6\nAnswer with the letter of the right choice."


@pytest.mark.parametrize("reply, strict, expected", [
    ("B", True, 1), (" C. ", True, 2), ("B) Paris", True, None), ("The answer is C.", True, None),
    ("B) Paris", False, 1), ("The answer is C.", False, 2), ("I think D", False, 3), ("E", False, None),
    ("Apple", False, None), ("", False, None),
])
def test_parse_letter_strict_and_lenient(reply, strict, expected):
    assert parse_letter(reply, 4, strict=strict) == expected


def test_parse_choice_text_needs_exactly_one_choice():
    choices = ["Lyon", "Paris", "Nice"]
    assert parse_choice_text("It is PARIS.", choices) == 1
    assert parse_choice_text("Paris or Lyon", choices) is None
    assert parse_choice_text("Marseille", choices) is None
    assert parse_choice_text("Niceville", choices) is None  # whole words only


@pytest.mark.parametrize("call, error, message", [
    (lambda: parse_letter("A", 1), ValueError, "between 2 and 8"),
    (lambda: parse_letter(3, 4), TypeError, "must be a str"),
    (lambda: parse_choice_text("a", "ab"), TypeError, "list of strings"),
    (lambda: lettered_prompt({"question": "q", "choices": [], "answer": 0}), ValueError, "non-empty list"),
    (lambda: lettered_prompt({"question": "q", "choices": ["a", "b"], "answer": 5}), ValueError, "between 0 and 1"),
])
def test_bad_input_to_the_generation_parsers(call, error, message):
    with pytest.raises(error, match=message):
        call()
