"""`distillqa study analyze STUDY`: the study's statistics and report, in the experiment report's format.

Writes into the study directory
    results/ratings.csv       the ratings analysed (rater ids as keyed hashes, conditions unblinded)
    results/analysis.json     every number of the report
    plots/scales.png, plots/quality.png
    report.md, report.html    (the HTML embeds the plots)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from distillqa.errors import RunDirError
from distillqa.io import write_json, write_text
from distillqa.report_doc import save_figure, to_html, to_markdown
from distillqa.study.analysis import ALPHA, OUTCOME, analyze_ratings
from distillqa.study.design import Study
from distillqa.study.store import Store

METHOD = (
    "Only ratings of raters who were not excluded are analysed (exclusion rule: failing {rule} or more of the "
    "{checks} instructed-response attention checks each rater gets). Quality is the mean of the five scales. Per "
    "outcome, a Kruskal-Wallis test compares the conditions, each rating one observation; its p-values are adjusted "
    "across the six outcomes with Holm's method. Pairs of conditions are compared with Dunn's test, Bonferroni-"
    "adjusted within the outcome, and counted as different only where the outcome's Kruskal-Wallis test rejected "
    "(alpha = {alpha}). The Vargha-Delaney A of a pair is the probability that a rating of the first condition is "
    "higher than one of the second (ties count half): 0.5 is no difference; |A - 0.5| >= 0.06 / 0.14 / 0.21 is a "
    "small / medium / large effect. Krippendorff's alpha measures agreement between raters on the same items "
    "(ordinal for the scales, interval for quality). OLS regresses quality on the condition (treatment-coded against "
    "{reference}) and the explanation's length in words; the mixed model adds a random intercept per rater, so a "
    "condition effect carried by lenient or strict raters shows there as a smaller or non-significant coefficient."
)


def load_ratings(study: Study):
    """(ratings of included raters as a DataFrame, a summary of raters and exclusions)."""
    import pandas as pd

    db_path = study.path / "study.sqlite"
    if not db_path.is_file():
        raise RunDirError(f"{study.path}: no ratings yet (no study.sqlite); collect them with `distillqa study serve`")
    try:
        store = Store(study)
        responses, raters = store.responses(), store.raters()
    except sqlite3.DatabaseError as e:
        raise RunDirError(f"{db_path}: the ratings database is damaged ({e})") from None
    scales = list(study.design["scales"])
    rows = []
    for r in responses:
        if r["kind"] != "item" or r["excluded"] or r["item_id"] not in study.items:
            continue
        item = study.items[r["item_id"]]
        rows.append({"rater": study.keys.rater_hash(r["external_id"]), "item": r["item_id"],
                     "condition": study.conditions[item["condition"]]["name"], **{s: r[s] for s in scales},
                     OUTCOME: float(np.mean([r[s] for s in scales])), "length_words": len(item["explanation"].split())})
    df = pd.DataFrame(rows)
    summary = {"raters": len(raters), "finished": sum(bool(r["finished"]) for r in raters),
               "excluded": sum(r["excluded"] for r in raters),
               "excluded_ratings": sum(r["kind"] == "item" and bool(r["excluded"]) for r in responses)}
    if df.empty or df["condition"].nunique() < 2 or df.groupby("condition").size().min() < 2:
        raise RunDirError(f"{study.path}: too few ratings to compare conditions ({len(df)} from included raters; "
                          "at least two in each of two conditions are needed)")
    return df, summary


# --- plots ----------------------------------------------------------------------------------
def plot_scales(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests, conditions = res["rank_tests"], res["conditions"]
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(1.6 * len(tests) + 3, 4.5))
    for j, cond in enumerate(conditions):
        x = np.arange(len(tests)) + (j - (len(conditions) - 1) / 2) * width
        stats = [t["by_condition"][cond] for t in tests]
        means = [s["mean"] for s in stats]
        err = [[m - s["ci95"][0] for m, s in zip(means, stats)], [s["ci95"][1] - m for m, s in zip(means, stats)]]
        ax.bar(x, means, width * 0.9, yerr=err, capsize=2, color=f"C{j}", label=cond, alpha=0.85)
    ax.set_xticks(range(len(tests)))
    ax.set_xticklabels([t["outcome"] + (" *" if t["significant"] else "") for t in tests], rotation=20, ha="right")
    ax.set_ylim(1, 5)
    ax.set_ylabel("mean rating (1-5) with 95% CI")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="condition", fontsize=8)
    ax.set_title("Ratings per scale and condition (* = Kruskal-Wallis rejects after Holm)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_quality(df, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = res["conditions"]
    data = [df.loc[df["condition"] == c, OUTCOME].to_numpy() for c in conditions]
    fig, ax = plt.subplots(figsize=(1.6 * len(conditions) + 3, 4.5))
    ax.boxplot(data, showmeans=True)
    jitter = np.random.default_rng(0)
    for k, values in enumerate(data, 1):
        ax.scatter(k + jitter.uniform(-0.15, 0.15, len(values)), values, s=6, color="#333333", alpha=0.35)
    ax.set_xticks(range(1, len(conditions) + 1))
    ax.set_xticklabels(conditions, rotation=20, ha="right")
    ax.set_ylabel("quality (mean of the five scales)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Quality per condition (box: quartiles, triangle: mean, dots: ratings)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# --- the document -----------------------------------------------------------------------------
def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def blocks(res: dict, study: Study) -> list[tuple]:
    tests, conditions, design = res["rank_tests"], res["conditions"], study.design
    summary = res["summary"]
    quality = next(t for t in tests if t["outcome"] == OUTCOME)
    verdict = (f"Quality differs between conditions (Kruskal-Wallis H = {quality['h']:.2f}, p (Holm) = {fmt_p(quality['p_holm'])})."
               if quality["significant"] else
               f"No difference in quality between conditions was found (Kruskal-Wallis p (Holm) = {fmt_p(quality['p_holm'])}).")
    means = [[c] + [f"{t['by_condition'][c]['mean']:.2f} ± {t['by_condition'][c]['sd']:.2f}" for t in tests] +
             [tests[0]["by_condition"][c]["n"]] for c in conditions]
    kw = [[t["outcome"], f"{t['h']:.2f}", t["df"], fmt_p(t["p"]), fmt_p(t["p_holm"]), f"{t['epsilon_squared']:.3f}",
           "yes" if t["significant"] else "no"] for t in tests]
    pairs = [[t["outcome"], f"{p['a']} vs {p['b']}", f"{p['mean_a']:.2f}", f"{p['mean_b']:.2f}", fmt_p(p["p_bonferroni"]),
              f"{p['vargha_delaney_a']:.3f}", p["magnitude"], "yes" if p["significant"] else "no"]
             for t in tests for p in t["pairs"]]
    alpha = [[a["outcome"], "-" if a["alpha"] is None else f"{a['alpha']:.3f}", a["level"], a["items_rated_twice_or_more"]]
             for a in res["agreement"]]
    m = res["models"]

    def coefficients(fit: dict) -> list[list]:
        return [[c["term"], f"{c['estimate']:+.3f}", f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]", fmt_p(c["p"])]
                for c in fit["coefficients"]]

    mixed = m["mixed"]
    mixed_blocks = ([("p", f"The mixed model could not be fitted: {mixed['error']}.")] if "error" in mixed else [
        ("p", f"{mixed['groups']} raters as groups; rater variance {mixed['rater_variance']:.3f}, residual variance "
              f"{mixed['residual_variance']:.3f}; converged: {'yes' if mixed['converged'] else 'no'}"
              + (f"; warnings: {'; '.join(mixed['warnings'])}" if mixed["warnings"] else "") + "."),
        ("table", ["term", "estimate", "95% CI", "p"], coefficients(mixed))])
    return [
        ("h1", f"{design['title']}: analysis"),
        ("p", f"{res['ratings']} ratings of {res['items']} explanations in {len(conditions)} conditions by {res['raters']} "
              f"included raters. {summary['raters']} raters arrived, {summary['finished']} finished, {summary['excluded']} "
              f"were excluded by the attention checks ({summary['excluded_ratings']} of their ratings left out)."),
        ("p", verdict),
        ("h2", "Ratings per condition: mean ± SD"),
        ("table", ["condition"] + [t["outcome"] for t in tests] + ["ratings"], means),
        ("img", "plots/scales.png", "mean rating per scale and condition"),
        ("img", "plots/quality.png", "quality per condition"),
        ("h2", "Kruskal-Wallis per outcome"),
        ("table", ["outcome", "H", "df", "p", "p (Holm)", "epsilon²", "differs"], kw),
        ("h2", "Pairs: Dunn (Bonferroni) and Vargha-Delaney A"),
        ("table", ["outcome", "pair (A vs B)", "mean A", "mean B", "p (Bonferroni)", "A", "magnitude", "differs"], pairs),
        ("h2", "Agreement between raters: Krippendorff's alpha"),
        ("table", ["outcome", "alpha", "level", "items with 2+ ratings"], alpha),
        ("h2", "Quality ~ condition + explanation length (OLS)"),
        ("p", f"{m['formula']}, reference condition {m['reference']}; n = {m['ols']['n']}, R² = {m['ols']['r_squared']:.3f}; "
              f"condition F = {m['ols']['condition_f']:.2f}, p = {fmt_p(m['ols']['condition_p'])}; "
              + (f"length p = {fmt_p(m['ols']['length_p'])}." if m["ols"]["length_p"] is not None
                 else "every explanation has the same length, so length is left out.")),
        ("table", ["term", "estimate", "95% CI", "p"], coefficients(m["ols"])),
        ("h2", "Robustness: mixed model with rater as group"),
        *mixed_blocks,
        ("h2", "Method"),
        ("p", METHOD.format(rule=design["exclude_if_failed_checks"], checks=design["attention_checks_per_rater"], alpha=ALPHA,
                            reference=m["reference"])),
    ]


def write_study_report(study_dir: str | Path) -> Path:
    """Compute the statistics and write results/, plots/, report.md and report.html; returns report.md."""
    study = Study.load(study_dir)
    df, summary = load_ratings(study)
    res = {**analyze_ratings(df, list(study.design["scales"])), "summary": summary}
    out = study.path
    write_text(out / "results" / "ratings.csv", df.to_csv(index=False))
    write_json(out / "results" / "analysis.json", res)
    plot_scales(res, out / "plots" / "scales.png")
    plot_quality(df, res, out / "plots" / "quality.png")
    doc = blocks(res, study)
    write_text(out / "report.md", to_markdown(doc))
    write_text(out / "report.html", to_html(doc, out, title=f"{study.design['title']}: analysis"))
    return out / "report.md"
