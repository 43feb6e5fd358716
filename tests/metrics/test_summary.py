"""The bootstrap confidence intervals of summaries have the coverage they claim."""

import numpy as np
import pytest

from distillqa.metrics.summary import bootstrap_ci, summarize


def coverage(interval, draws: int = 600, n: int = 60, mean: float = 0.5) -> tuple[float, float, float]:
    """Fractions of seeded samples whose interval covers the true mean, lies above it, lies below it."""
    rng = np.random.default_rng(12)
    hits = above = below = 0
    for k in range(draws):
        sample = np.clip(rng.normal(mean, 0.2, n), 0.0, 1.0)  # symmetric around 0.5, so clipping keeps the mean
        lo, hi = interval(sample.tolist(), k)
        hits += lo <= mean <= hi
        above += lo > mean
        below += hi < mean
    return hits / draws, above / draws, below / draws


def test_summary_ci95_covers_the_true_mean_95_percent_of_the_time():
    # 1000 draws: the standard error of a 95% coverage is 0.007; the percentile bootstrap at
    # n = 60 under-covers slightly (0.93 here). A 90% interval covers 0.88, an 80% one 0.77.
    cov, above, below = coverage(lambda xs, k: summarize(xs)["ci95"], draws=1000)
    assert 0.91 <= cov <= 0.985, cov
    assert above <= 0.05 and below <= 0.05, (above, below)  # both tails, not a shifted interval


def test_bootstrap_level_is_honoured():
    cov80, _, _ = coverage(lambda xs, k: bootstrap_ci(xs, level=0.8, seed=k))
    cov50, _, _ = coverage(lambda xs, k: bootstrap_ci(xs, level=0.5, seed=k))
    assert 0.72 <= cov80 <= 0.86, cov80
    assert 0.42 <= cov50 <= 0.58, cov50
    lo, hi = bootstrap_ci([0.25, 0.75] * 20, resamples=4000)
    # the sd of the mean of 40 draws of 0.5 +- 0.25 is 0.25 / sqrt(40) = 0.0395; 95% is +-1.96 sd
    assert lo < 0.5 < hi and (hi - lo) / 2 == pytest.approx(1.96 * 0.25 / 40**0.5, rel=0.1)
