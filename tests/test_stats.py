"""utils.stats: intervals and paired tests, checked against closed forms and scikit-learn / scipy-free references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from utils.stats import (
    accuracy_ci,
    bootstrap_ci,
    cohen_kappa,
    items_needed,
    kappa_ci,
    mcnemar_p,
    rate_with_ci,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # 0 out of n: the upper bound is z^2 / (n + z^2) exactly
    low, high = wilson_interval(0, 10)
    assert low == 0 and math.isclose(high, 1.96 ** 2 / (10 + 1.96 ** 2), rel_tol=1e-12)
    assert wilson_interval(10, 10)[1] == 1 and math.isclose(wilson_interval(10, 10)[0], 1 - high, rel_tol=1e-12)
    low, high = wilson_interval(5, 10)
    assert round(low, 4) == 0.2366 and round(high, 4) == 0.7634  # symmetric around 0.5
    # each bound p solves (k/n - p)^2 = z^2 p (1 - p) / n
    k, n, z = 37, 80, 1.96
    for p in wilson_interval(k, n):
        assert math.isclose((k / n - p) ** 2, z * z * p * (1 - p) / n, rel_tol=1e-9)
    assert wilson_interval(37, 80, z=2.58)[0] < wilson_interval(37, 80)[0]  # 99% is wider
    assert rate_with_ci([True, False, True, True]) == "75% [30%, 95%] (3/4)"


@pytest.mark.parametrize("k, n, error", [(3, 0, ValueError), (-1, 5, ValueError), (6, 5, ValueError),
                                         (1.0, 5, TypeError), (True, 5, TypeError), (3, 10.0, TypeError),
                                         ("3", 10, TypeError)])
def test_wilson_interval_rejects_bad_counts(k, n, error):
    with pytest.raises(error):
        wilson_interval(k, n)


def test_accuracy_ci_and_mcnemar():
    acc = accuracy_ci([True] * 30 + [False] * 10)
    assert (acc.k, acc.n, acc.value) == (30, 40, 0.75)
    assert (acc.low, acc.high) == wilson_interval(30, 40)
    assert str(acc).startswith("0.75 [")
    assert mcnemar_p([True, False] * 5, [True, False] * 5) == 1.0
    assert math.isclose(mcnemar_p([True] * 10, [False] * 10), 2 / 2 ** 10)
    a = [True] * 8 + [False] * 2 + [True] * 20
    b = [False] * 8 + [True] * 2 + [True] * 20  # 8 vs 2 discordant pairs
    assert math.isclose(mcnemar_p(a, b), 2 * sum(math.comb(10, i) for i in range(3)) / 2 ** 10)
    assert mcnemar_p(a, b) == mcnemar_p(b, a)  # two-sided


@pytest.mark.parametrize("bad", [[], ["yes", "no"], [0.5, 1.0], "TTF", [2, 0]])
def test_flags_must_be_booleans(bad):
    with pytest.raises((TypeError, ValueError)):
        accuracy_ci(bad)


def test_mcnemar_bad_input():
    with pytest.raises(ValueError, match="same length"):
        mcnemar_p([True], [True, False])
    with pytest.raises(TypeError):
        mcnemar_p(["right"], ["wrong"])


@pytest.mark.parametrize("seed", range(5))
def test_cohen_kappa_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    a = rng.choice(["A", "B", "tie"], size=60).tolist()
    b = [x if rng.random() < 0.6 else rng.choice(["A", "B", "tie"]) for x in a]
    assert math.isclose(cohen_kappa(a, b), cohen_kappa_score(a, b), rel_tol=1e-12, abs_tol=1e-12)


def test_cohen_kappa_known_values_and_bad_input():
    assert cohen_kappa(list("ABAA"), list("ABBA")) == pytest.approx(0.5)
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert cohen_kappa(["A"] * 5, ["A"] * 5) == 1.0  # one shared label: defined as perfect agreement
    with pytest.raises(ValueError, match="same length"):
        cohen_kappa(["A", "B"], ["A"])
    with pytest.raises(ValueError):
        cohen_kappa([], [])
    with pytest.raises(TypeError):
        cohen_kappa("AB", "AB")
    with pytest.raises(TypeError):
        cohen_kappa([0.5, 1.5], [0.5, 1.5])


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(0).normal(10, 2, size=200)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high and high - low < 1.0
    assert (low, high) == bootstrap_ci(values)  # same seed, same interval
    assert bootstrap_ci(values, stat=np.median, seed=1) != (low, high)
    # the normal-theory interval of a mean is close to the bootstrap one at n = 200
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert abs((high - low) / 2 - half) < 0.1 * half
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)


@pytest.mark.parametrize("bad, error", [([], ValueError), ([1.0, float("nan")], ValueError), ("123", TypeError),
                                        ([[1, 2], [3, 4]], ValueError), (["a", "b"], TypeError)])
def test_bootstrap_ci_bad_input(bad, error):
    with pytest.raises(error):
        bootstrap_ci(bad)


def test_bootstrap_ci_bad_settings():
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(TypeError):
        bootstrap_ci([1.0, 2.0], stat="mean")


def test_kappa_ci_brackets_kappa():
    rng = np.random.default_rng(3)
    a = rng.choice(["A", "B"], size=80).tolist()
    b = [x if rng.random() < 0.8 else ("A" if x == "B" else "B") for x in a]
    low, high = kappa_ci(a, b, n_resamples=500)
    assert low < cohen_kappa(a, b) < high and 0 < low and high < 1


def test_items_needed_matches_the_textbook_formula():
    assert items_needed(0.60, 0.70) == 356  # two-proportion z-test, alpha 0.05, power 0.8
    assert items_needed(0.5, 0.9) < items_needed(0.5, 0.6)  # big differences need few items
    with pytest.raises(ValueError, match="differ"):
        items_needed(0.5, 0.5)
    with pytest.raises(ValueError):
        items_needed(0.5, 1.5)
