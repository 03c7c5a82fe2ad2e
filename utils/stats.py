"""How much to trust a number measured on a few dozen examples: intervals and paired tests.

Every lesson that measures something reports it with one of these (shown in lesson 07, used from then on):

* `wilson_interval(k, n)`: the 95% interval of a rate. With n = 20, a measured 50% means "somewhere
  between 30% and 70%". `accuracy_ci(flags)` and `rate_with_ci(flags)` wrap it for a list of booleans.
* `mcnemar_p(correct_a, correct_b)`: are two systems, run on the *same* items, really different?
* `bootstrap_ci(values)`: an interval for any statistic (a mean score, a median latency) by resampling.
* `cohen_kappa(labels_a, labels_b)`: agreement of two raters beyond chance (lesson 15's judge vs humans).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from utils.checks import check_int, check_number, check_positive_int


def _flags(name: str, values) -> list[bool]:
    """A list of booleans (bool, or the ints 0/1); anything else is refused rather than guessed."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of booleans, got {type(values).__name__}")
    flags = []
    for value in values:
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
            flags.append(bool(value))
        else:
            raise TypeError(f"{name} must hold booleans (True/False or 1/0), got {value!r}")
    return flags


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% for z=1.96). Example: (5, 10) -> (0.237, 0.763).

    Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is sensible at k=0 or k=n.
    """
    n = check_int("n", n, low=1, what=" (the number of examples)")
    k = check_int("k", k, low=0, high=n, what=" (a count of successes)")
    z = check_number("z", z, low=0, low_open=True)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends, no rounding residue
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Accuracy:
    k: int  # correct
    n: int  # examples
    low: float  # Wilson 95% interval
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}] (n={self.n})"


def accuracy_ci(correct) -> Accuracy:
    """Accuracy of a list of booleans with its Wilson 95% interval. Example: [1, 1, 0] -> 0.67 [0.21, 0.94] (n=3)."""
    flags = _flags("correct", correct)
    if not flags:
        raise ValueError("accuracy of an empty list is undefined: pass at least one result")
    low, high = wilson_interval(sum(flags), len(flags))
    return Accuracy(sum(flags), len(flags), low, high)


def rate_with_ci(flags) -> str:
    """'45% [26%, 66%] (9/20)' for a list of booleans: a rate as a person should read it."""
    acc = accuracy_ci(flags)
    return f"{acc.value:.0%} [{acc.low:.0%}, {acc.high:.0%}] ({acc.k}/{acc.n})"


def mcnemar_p(correct_a, correct_b) -> float:
    """Exact two-sided McNemar test: are two systems, run on the same items, really different?

    Only the items where exactly one of them is right carry information; under "no difference"
    each such item is a coin flip. Example: a right on 8 items b gets wrong, b on 0 -> p = 0.0078.
    """
    a, b = _flags("correct_a", correct_a), _flags("correct_b", correct_b)
    if len(a) != len(b) or not a:
        raise ValueError(f"correct_a and correct_b must be non-empty and of the same length "
                         f"(one result per item), got {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_ci(values, stat=np.mean, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over `values` (resampled with replacement).

    Example: bootstrap_ci([0.2, 0.4, 0.9, 0.5]) -> about (0.3, 0.75). Deterministic for a given seed.
    """
    if isinstance(values, (str, bytes)):
        raise TypeError("values must be a list of numbers, not a string")
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"values must be a list of numbers: {err}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"values must be a non-empty 1-D list of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("values must be finite numbers (no NaN or inf)")
    if not callable(stat):
        raise TypeError(f"stat must be a function of an array (e.g. numpy.mean), got {stat!r}")
    n_resamples = check_positive_int("n_resamples", n_resamples)
    confidence = check_number("confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    rng = np.random.default_rng(check_int("seed", seed, low=0))
    picks = rng.integers(0, array.size, size=(n_resamples, array.size))
    stats = np.array([stat(array[row]) for row in picks], dtype=float)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def cohen_kappa(labels_a, labels_b) -> float:
    """Agreement of two raters on the same items, corrected for the agreement chance alone would give.

    kappa = (p_observed - p_chance) / (1 - p_chance): 1 is perfect, 0 is chance level, below 0 is worse
    than chance. Example: ["A", "B", "A", "A"] vs ["A", "B", "B", "A"] -> 0.5.
    When both raters always give the same single label, kappa is undefined (0/0): we return 1.0 if
    they agree on every item (they do), which is what scikit-learn reports as nan; say so when it happens.
    """
    for name, labels in (("labels_a", labels_a), ("labels_b", labels_b)):
        if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, np.ndarray)):
            raise TypeError(f"{name} must be a list of labels, got {type(labels).__name__}")
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b) or not a:
        raise ValueError(f"labels_a and labels_b must be non-empty and of the same length "
                         f"(one label per item from each rater), got {len(a)} and {len(b)}")
    for label in a + b:
        if not isinstance(label, (str, numbers.Integral, bool, np.integer)):
            raise TypeError(f"labels must be strings or ints (categories), got {label!r}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    categories = set(a) | set(b)
    chance = sum((a.count(c) / n) * (b.count(c) / n) for c in categories)
    if chance == 1.0:
        return 1.0
    return (observed - chance) / (1 - chance)


def kappa_ci(labels_a, labels_b, n_resamples: int = 2000, confidence: float = 0.95,
             seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of Cohen's kappa, resampling items (pairs of labels) with replacement."""
    a, b = list(labels_a), list(labels_b)
    cohen_kappa(a, b)  # validates both lists
    items = np.arange(len(a))
    return bootstrap_ci(items, stat=lambda idx: cohen_kappa([a[i] for i in idx.astype(int)],
                                                            [b[i] for i in idx.astype(int)]),
                        n_resamples=n_resamples, confidence=confidence, seed=seed)


def items_needed(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """How many items a test set needs to tell accuracies p_a and p_b apart (two independent samples,
    normal approximation). Example: items_needed(0.60, 0.70) -> 356. Paired designs need fewer."""
    from statistics import NormalDist

    p_a, p_b = _two_rates(p_a, p_b)
    alpha = check_number("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
    power = check_number("power", power, low=0, high=1, low_open=True, high_open=True)
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    p_bar = (p_a + p_b) / 2
    top = z_a * math.sqrt(2 * p_bar * (1 - p_bar)) + z_b * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
    return math.ceil((top / (p_a - p_b)) ** 2)


def _two_rates(p_a, p_b) -> tuple[float, float]:
    p_a = check_number("p_a", p_a, low=0, high=1)
    p_b = check_number("p_b", p_b, low=0, high=1)
    if p_a == p_b:
        raise ValueError(f"p_a and p_b must differ (no test set tells equal accuracies apart), got {p_a}")
    return p_a, p_b
