"""utils.contamination: n-gram overlap between training text and test items."""

import pytest

from utils.contamination import flag_contaminated, overlap_scores, word_ngrams, words

TRAIN = ["Question: What is the chemical symbol for gold?\nAnswer: Au",
         "Lena had twelve apples and gave five of them to her brother after lunch."]


def test_words_and_ngrams():
    assert words("It's 2 + 2, right?") == ["it", "s", "2", "2", "right"]
    assert word_ngrams("The cat sat down", 3) == {("the", "cat", "sat"), ("cat", "sat", "down")}
    assert word_ngrams("too short", 3) == set()


def test_a_copied_item_overlaps_fully_and_an_unrelated_one_not_at_all():
    scores = overlap_scores(["What is the chemical symbol for gold?", "Which planet is closest to the Sun?"],
                            TRAIN, n=4)
    assert scores == [1.0, 0.0]


def test_overlap_is_the_fraction_of_the_items_ngrams_seen_in_training():
    # 7 words -> 4 four-grams; only "lena had twelve apples" is seen in training
    assert overlap_scores(["Lena had twelve apples, pears and plums"], TRAIN, n=4) == [0.25]


def test_case_and_punctuation_do_not_hide_a_copy_but_a_paraphrase_is_missed():
    copy = "WHAT is the Chemical Symbol, for gold"
    paraphrase = "Which element has the symbol Au?"
    assert overlap_scores([copy, paraphrase], TRAIN, n=4) == [1.0, 0.0]


def test_items_shorter_than_n_count_when_all_their_words_are_adjacent_in_training():
    assert overlap_scores(["symbol for gold", "gold for symbol", "gave five"], TRAIN, n=8) == [1.0, 0.0, 1.0]
    assert overlap_scores(["for go"], TRAIN, n=8) == [0.0]  # whole words only: "go" is not "gold"


def test_small_n_raises_false_alarms():
    unrelated = "What is the capital of Peru?"
    assert overlap_scores([unrelated], TRAIN, n=2)[0] > 0  # "what is", "is the" are everywhere
    assert overlap_scores([unrelated], TRAIN, n=5) == [0.0]


def test_flags_follow_the_threshold():
    texts = ["Lena had twelve apples, pears and plums", "What is the chemical symbol for gold?"]
    assert flag_contaminated(texts, TRAIN, n=4, threshold=0.5) == [False, True]
    assert flag_contaminated(texts, TRAIN, n=4, threshold=0.25) == [True, True]


@pytest.mark.parametrize("call, error, message", [
    (lambda: overlap_scores("one text", TRAIN), TypeError, "list of strings"),
    (lambda: overlap_scores(["a"], []), ValueError, "non-empty list"),
    (lambda: overlap_scores(["a"], TRAIN, n=0), ValueError, "positive int"),
    (lambda: overlap_scores(["a"], TRAIN, n=2.0), TypeError, "must be an int"),
    (lambda: flag_contaminated(["a"], TRAIN, threshold=0), ValueError, "threshold"),
    (lambda: flag_contaminated(["a"], TRAIN, threshold=1.5), ValueError, "threshold"),
])
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()
