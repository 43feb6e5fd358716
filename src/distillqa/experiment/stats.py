"""Paired hypothesis tests between two systems scored on the same examples, per metric, with
multiple-comparison correction across the metrics of one hypothesis.

For each metric: differences d_i = score_A(i) - score_B(i) over the examples both have scored
(missing scores drop that example for that metric only), then
- a paired test: Wilcoxon signed-rank (default; zero differences dropped, Pratt's rule is not
  used; exact p for small samples without ties, normal approximation with tie correction
  otherwise, as scipy.stats.wilcoxon decides), paired t-test, or a paired sign-flip
  permutation test of the mean difference;
- the effect size: matched-pairs rank-biserial correlation r = (R+ - R-) / (n(n+1)/2), with R+
  and R- the rank sums of positive and negative differences, ranking |d| over all n pairs with
  zero differences ranked lowest (Pratt's ranking), in [-1, 1], positive when A scores higher.
  Zeros count in the denominator, so one non-zero difference among many ties is a small
  effect, not r = +-1;
- the direction: "A" or "B" (which scored higher on average), or "tie".
All differences zero: p = 1, r = 0, direction "tie" (no test statistic exists); a t or
permutation test of a single difference: p = 1.
Then Holm (default) or Benjamini-Hochberg adjusts the p-values across the hypothesis' metrics
and each metric is rejected at level alpha if its adjusted p < alpha.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats as sps

Test = Literal["wilcoxon", "ttest", "permutation"]
Correction = Literal["holm", "bh", "none"]


@dataclass(frozen=True)
class PairedResult:
    metric: str
    n: int
    mean_a: float
    mean_b: float
    p_value: float
    p_adjusted: float
    rejected: bool
    effect_size: float
    direction: str

    def to_dict(self) -> dict:
        return asdict(self)


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (zeros ranked lowest, kept in n)."""
    if diff.size == 0 or not np.any(diff):
        return 0.0
    ranks = sps.rankdata(np.abs(diff))
    return float((ranks[diff > 0].sum() - ranks[diff < 0].sum()) / ranks.sum())


def paired_p_value(diff: np.ndarray, test: Test = "wilcoxon", permutations: int = 10_000, seed: int = 0) -> float:
    if diff.size == 0 or np.all(diff == 0):
        return 1.0
    if test == "wilcoxon":
        return float(sps.wilcoxon(diff, zero_method="wilcox").pvalue)
    if diff.size < 2 and test != "wilcoxon":
        return 1.0  # one difference: no test is possible
    if test == "ttest":
        if np.all(diff == diff[0]):  # constant non-zero differences: zero variance, the effect is certain
            return 0.0
        return float(sps.ttest_1samp(diff, 0.0).pvalue)
    if test == "permutation":
        res = sps.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=permutations,
                                   alternative="two-sided", random_state=seed)
        return float(res.pvalue)
    raise ValueError(f"unknown test '{test}'; use wilcoxon, ttest or permutation")


def adjust(p_values: list[float], correction: Correction = "holm") -> list[float]:
    """Holm step-down or Benjamini-Hochberg adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0 or correction == "none":
        return p.tolist()
    order = np.argsort(p)
    ranked = p[order]
    if correction == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    elif correction == "bh":
        adj = np.minimum.accumulate((m / np.arange(m, 0, -1) * ranked[::-1]))[::-1]
    else:
        raise ValueError(f"unknown correction '{correction}'; use holm, bh or none")
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out.tolist()


def compare(
    scores_a: dict[str, dict[str, float | None]],
    scores_b: dict[str, dict[str, float | None]],
    metrics: list[str],
    test: Test = "wilcoxon",
    correction: Correction = "holm",
    alpha: float = 0.05,
) -> list[PairedResult]:
    """Compare system A with system B; `scores_x[example_id][metric]` are per-example scores."""
    common = sorted(set(scores_a) & set(scores_b))
    raw = []
    for metric in metrics:
        pairs = [(scores_a[i].get(metric), scores_b[i].get(metric)) for i in common]
        pairs = np.array([(a, b) for a, b in pairs if a is not None and b is not None], dtype=float).reshape(-1, 2)
        diff = pairs[:, 0] - pairs[:, 1]
        mean_a, mean_b = (pairs.mean(axis=0).tolist() if len(pairs) else [float("nan")] * 2)
        mean_diff = float(diff.mean()) if diff.size else 0.0
        direction = "tie" if mean_diff == 0 else ("A" if mean_diff > 0 else "B")
        raw.append((metric, len(pairs), mean_a, mean_b, paired_p_value(diff, test), rank_biserial(diff), direction))
    adjusted = adjust([r[4] for r in raw], correction)
    return [PairedResult(metric, n, ma, mb, p, pa, pa < alpha, r, d)
            for (metric, n, ma, mb, p, r, d), pa in zip(raw, adjusted)]


def summarize_hypothesis(results: list[PairedResult], families: dict[str, str]) -> str:
    """The study's phrasing: 'null hypothesis rejected in k of n metrics (ngram a/b, ...)'."""
    by_family: dict[str, list[PairedResult]] = {}
    for r in results:
        by_family.setdefault(families.get(r.metric, "other"), []).append(r)
    k = sum(r.rejected for r in results)
    parts = ", ".join(f"{fam} {sum(r.rejected for r in rs)}/{len(rs)}" for fam, rs in by_family.items())
    return f"null hypothesis rejected in {k} of {len(results)} metrics ({parts})"
