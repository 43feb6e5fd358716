"""Accuracy across methods, rationale types and seeds: the study's outlier rule, a two-way
ANOVA (method x rationale type, type II sums of squares) and Tukey HSD post-hoc tests, with
statsmodels.

Outliers (Hendriks et al.): within each (method, rationale type) group, a run whose accuracy
lies more than k x IQR below the first or above the third quartile is left out (k = 1.5).
A factor with a single level in the grid is left out of the model; with no residual degrees of
freedom (one seed per group) no test is possible and the result says so.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def iqr_filter(runs: list[dict], k: float) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) runs; groups are (method, rationale_type)."""
    if k <= 0:
        return runs, []
    kept, dropped = [], []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["rationale_type"]), []).append(r)
    for group in groups.values():
        q1, q3 = np.percentile([r["accuracy"] for r in group], [25, 75])
        lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
        for r in group:
            (kept if lo <= r["accuracy"] <= hi else dropped).append(r)
    return kept, dropped


def _clean(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def anova(runs: list[dict], alpha: float = 0.05) -> dict:
    """Two-way ANOVA of accuracy on method and rationale type, plus Tukey HSD on methods and on
    method x rationale-type groups. Returns JSON-ready tables, or {'skipped': reason}."""
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    df = pd.DataFrame(runs)
    factors = [f for f in ("method", "rationale_type") if df[f].nunique() > 1]
    if not factors:
        return {"skipped": "the grid has one method and one rationale type: nothing to compare"}
    formula = "accuracy ~ " + " * ".join(f"C({f})" for f in factors)
    groups = df.groupby(factors).ngroups
    if len(df) - groups <= 0:
        return {"skipped": f"no residual degrees of freedom ({len(df)} runs in {groups} groups): run at least two seeds"}
    if df["accuracy"].nunique() == 1:
        return {"skipped": f"every run has the same accuracy ({df['accuracy'].iloc[0]:.3f}): no variance to analyse"}
    fit = smf.ols(formula, data=df).fit()
    with warnings.catch_warnings():  # a group without variance makes some F undefined: reported as null
        warnings.simplefilter("ignore")
        table = anova_lm(fit, typ=2)
    rows = [{"source": name.replace("C(", "").replace(")", ""), "sum_sq": _clean(r["sum_sq"]), "df": _clean(r["df"]),
             "F": _clean(r["F"]), "p": _clean(r["PR(>F)"])} for name, r in table.iterrows()]
    out = {"formula": formula, "anova": rows, "tukey": {}}
    labels = {"method": df["method"], "group": df["method"] + " / " + df["rationale_type"]}
    for name, lab in labels.items():
        if lab.nunique() < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = pairwise_tukeyhsd(df["accuracy"], lab, alpha=alpha)
        data = res.summary().data
        header = data[0]
        out["tukey"][name] = [dict(zip(header, [c if isinstance(c, str) else _clean(c) if not isinstance(c, (bool, np.bool_))
                                                 else bool(c) for c in row])) for row in data[1:]]
    return out
