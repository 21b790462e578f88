"""Confidence intervals for the proportions unigap reports (Nonunified score, accuracies).

Where it fits: `pools.nonunified_score`, the evaluation and the audit report rates with a 95%
interval so that "the gap shrank" is never read off noise (SHAPES-NOTES: ±2.5 points needs
≥ 1000 images). Inputs are counts; outputs are plain floats.

Example:
    >>> from pipelines.stats import wilson_ci, diff_ci, paired_bootstrap
    >>> [round(x, 4) for x in wilson_ci(5, 10)]
    [0.2366, 0.7634]
    >>> d, lo, hi = diff_ci(30, 100, 20, 100)
    >>> round(d, 2), lo < d < hi
    (0.1, True)
    >>> d, lo, hi = paired_bootstrap([0.5, 0.25, 1.0], [0.25, 0.25, 0.75])   # per-prompt accuracies
    >>> round(d, 3), lo <= d <= hi
    (0.167, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Rate:
    """A proportion k/n with its Wilson interval. rate is NaN when n == 0."""

    k: int
    n: int
    rate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927).

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage
    at rates near 0 or 1 and at small n, which is where per-category Nonunified scores live.
    n == 0 gives (0.0, 1.0): no data, no information.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_ci needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def rate(k: int, n: int, z: float = Z95) -> Rate:
    """k/n with its Wilson interval, as one value for reports and metrics."""
    low, high = wilson_ci(k, n, z)
    return Rate(k=int(k), n=int(n), rate=(k / n if n else float("nan")), low=low, high=high)


def diff_ci(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """Difference p1 - p2 of two independent proportions with Newcombe's hybrid score interval.

    Newcombe (1998), method 10: combines the two Wilson intervals, so it inherits their good
    behaviour near 0 and 1 (the Wald difference interval does not). Used to compare a round with
    the previous one or an arm with the base model. Returns (difference, low, high); NaN
    difference when either n is 0.
    """
    if n1 == 0 or n2 == 0:
        return float("nan"), -1.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_ci(k1, n1, z)
    l2, u2 = wilson_ci(k2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, max(-1.0, low), min(1.0, high)


def paired_bootstrap(a, b, num_resamples: int = 2000, seed: int = 0, z: float = Z95) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i with a percentile bootstrap 95% interval over units.

    The units are prompts: a and b are two models' per-prompt accuracies on the SAME held-out
    prompts with the SAME sampling seeds, so prompt difficulty cancels and the interval is much
    tighter than two independent Wilson intervals (SHAPES-NOTES measured gains this way). Resampling
    prompts (not images) respects that images of one prompt are correlated. Returns
    (difference, low, high); NaN and (-1, 1) with no units.
    """
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (P,)
    if d.size == 0:
        return float("nan"), -1.0, 1.0
    idx = np.random.default_rng(seed).integers(0, d.size, size=(num_resamples, d.size))  # (R, P)
    means = d[idx].mean(axis=1)  # (R,)
    tail = (1.0 - math.erf(z / math.sqrt(2.0))) / 2.0  # 0.025 for z = 1.96
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
