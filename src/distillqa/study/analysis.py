"""The statistics of a rating study, on the ratings of raters the attention checks did not exclude.

Per outcome (each of the five scales, and quality = their mean): Kruskal-Wallis across conditions
(p-values Holm-adjusted across the outcomes), Dunn's post-hoc pairs with Bonferroni (scikit-posthocs)
and the Vargha-Delaney A of each pair; Krippendorff's alpha for agreement between raters; an OLS
model quality ~ condition + explanation length, and the same with a random intercept per rater
(a mixed model) as a check that rater leniency does not carry the effect. Every rating is one
observation in the rank tests and OLS; the mixed model is the one that models raters.
"""

from __future__ import annotations

import warnings

import numpy as np

OUTCOME = "quality"
ALPHA = 0.05
# Vargha & Delaney (2000): |A - 0.5| below 0.06 negligible, 0.14 small, 0.21 medium, else large
A_MAGNITUDES = ((0.06, "negligible"), (0.14, "small"), (0.21, "medium"), (float("inf"), "large"))


def vargha_delaney(x, y) -> float:
    """A = P(X > Y) + P(X = Y) / 2 for a random rating X of the first group and Y of the second."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    ranks = rankdata(np.concatenate([x, y]))
    return float((ranks[: len(x)].sum() / len(x) - (len(x) + 1) / 2) / len(y))


def a_magnitude(a: float) -> str:
    return next(name for bound, name in A_MAGNITUDES if abs(a - 0.5) < bound)


def holm(p_values: list[float]) -> list[float]:
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(p_values, method="holm")[1]]


def describe(values) -> dict:
    from scipy import stats

    values = np.asarray(values, float)
    n = len(values)
    sd = float(values.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else 0.0
    return {"n": n, "mean": float(values.mean()), "sd": sd, "median": float(np.median(values)),
            "ci95": [float(values.mean()) - half, float(values.mean()) + half]}


def rank_tests(df, outcomes: list[str], conditions: list[str]) -> list[dict]:
    import scikit_posthocs as sp
    from scipy import stats

    results = []
    for outcome in outcomes:
        groups = [df.loc[df["condition"] == c, outcome].to_numpy() for c in conditions]
        if len(np.unique(df[outcome])) == 1:  # every rating equal: nothing differs (scipy refuses this case)
            h, p, dunn = 0.0, 1.0, None
        else:
            h, p = (float(v) for v in stats.kruskal(*groups))
            dunn = sp.posthoc_dunn(df, val_col=outcome, group_col="condition", p_adjust="bonferroni")
        pairs = []
        for i, a in enumerate(conditions):
            for b in conditions[i + 1:]:
                x, y = df.loc[df["condition"] == a, outcome], df.loc[df["condition"] == b, outcome]
                va = vargha_delaney(x, y)
                pairs.append({"a": a, "b": b, "mean_a": float(x.mean()), "mean_b": float(y.mean()),
                              "p_bonferroni": float(dunn.loc[a, b]) if dunn is not None else 1.0, "vargha_delaney_a": va,
                              "magnitude": a_magnitude(va)})
        n = len(df)
        results.append({"outcome": outcome, "h": h, "df": len(conditions) - 1, "p": p,
                        "epsilon_squared": h / (n - 1) if n > 1 else 0.0, "pairs": pairs,
                        "by_condition": {c: describe(g) for c, g in zip(conditions, groups)}})
    for r, adjusted in zip(results, holm([r["p"] for r in results])):
        r["p_holm"] = adjusted
        r["significant"] = adjusted < ALPHA
        for pair in r["pairs"]:
            pair["significant"] = r["significant"] and pair["p_bonferroni"] < ALPHA
    return results


def agreement(df, outcomes: list[str]) -> list[dict]:
    """Krippendorff's alpha per outcome over the rater x item matrix (ordinal for the 1-5 scales,
    interval for quality, which is a mean)."""
    import krippendorff

    out = []
    for outcome in outcomes:
        matrix = df.pivot_table(index="rater", columns="item", values=outcome, aggfunc="first")
        pairable = int((matrix.notna().sum(axis=0) >= 2).sum())
        level = "interval" if outcome == OUTCOME else "ordinal"
        alpha = None
        if pairable and len(np.unique(df[outcome])) > 1:
            alpha = float(krippendorff.alpha(reliability_data=matrix.to_numpy(float), level_of_measurement=level))
        out.append({"outcome": outcome, "alpha": alpha, "level": level, "items_rated_twice_or_more": pairable})
    return out


def coefficient_table(fit, names: list[str]) -> list[dict]:
    ci = fit.conf_int()
    return [{"term": name, "estimate": float(fit.params[name]), "ci95": [float(ci.loc[name, 0]), float(ci.loc[name, 1])],
             "p": float(fit.pvalues[name])} for name in names]


def models(df) -> dict:
    """OLS and mixed model of quality on condition (treatment-coded against the first condition) and length."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    varied_length = df["length_words"].nunique() > 1  # explanations of one length: the term would copy the intercept
    formula = f"{OUTCOME} ~ C(condition)" + (" + length_words" if varied_length else "")
    ols = smf.ols(formula, df).fit()
    terms = [t for t in ols.params.index if t != "Intercept"]
    table = anova_lm(ols, typ=2)
    out = {"formula": formula, "reference": sorted(df["condition"].unique())[0],
           "ols": {"n": int(ols.nobs), "r_squared": float(ols.rsquared), "coefficients": coefficient_table(ols, terms),
                   "condition_f": float(table.loc["C(condition)", "F"]), "condition_p": float(table.loc["C(condition)", "PR(>F)"]),
                   "length_p": float(table.loc["length_words", "PR(>F)"]) if varied_length else None}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mixed = smf.mixedlm(formula, df, groups=df["rater"]).fit(reml=True)
            out["mixed"] = {"groups": int(df["rater"].nunique()), "converged": bool(mixed.converged),
                            "rater_variance": float(mixed.cov_re.iloc[0, 0]), "residual_variance": float(mixed.scale),
                            "coefficients": coefficient_table(mixed, terms),
                            "warnings": sorted({str(w.message).splitlines()[0] for w in caught})}
        except (np.linalg.LinAlgError, ValueError) as e:  # e.g. one rater per group level: reported, not fatal
            out["mixed"] = {"error": str(e).splitlines()[0]}
    return out


def analyze_ratings(df, scales: list[str]) -> dict:
    """All the statistics of `df` (one row per rating: rater, item, condition, the scales, quality, length_words)."""
    conditions = sorted(df["condition"].unique())
    outcomes = [*scales, OUTCOME]
    return {"conditions": conditions, "outcomes": outcomes, "ratings": len(df), "raters": int(df["rater"].nunique()),
            "items": int(df["item"].nunique()), "rank_tests": rank_tests(df, outcomes, conditions),
            "agreement": agreement(df, outcomes), "models": models(df)}
