"""Report of a rationale experiment: accuracy per method x rationale type (mean, SD and each
seed), the ANOVA and Tukey tables, and an accuracy plot; Markdown and self-contained HTML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from distillqa.errors import RunDirError
from distillqa.io import write_json, write_text
from distillqa.rationales.stats import anova, iqr_filter
from distillqa.report_doc import save_figure, to_html, to_markdown


def plot_accuracy(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in runs))
    types = list(dict.fromkeys(r["rationale_type"] for r in runs))
    width = 0.8 / len(types)
    fig, ax = plt.subplots(figsize=(2.2 * len(methods) + 3, 4.5))
    for j, rtype in enumerate(types):
        for i, method in enumerate(methods):
            accs = [r["accuracy"] for r in runs if r["method"] == method and r["rationale_type"] == rtype]
            x = i + (j - (len(types) - 1) / 2) * width
            ax.bar(x, np.mean(accs), width * 0.9, color=f"C{j}", label=rtype if i == 0 else None, alpha=0.8)
            ax.scatter([x] * len(accs), accs, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.upper() for m in methods])
    ax.set_ylabel("accuracy on the test questions")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="rationale type")
    ax.set_title("Accuracy by method and rationale type (bars: mean over seeds, dots: seeds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_rationale_report(exp: str | Path) -> Path:
    exp = Path(exp)
    if not (exp / "results" / "runs.json").is_file():
        raise RunDirError(f"{exp} has no results/runs.json; run `distillqa rationales experiment` first")
    cfg = yaml.safe_load((exp / "experiment.yaml").read_text())
    runs = json.loads((exp / "results" / "runs.json").read_text())
    kept, dropped = iqr_filter(runs, cfg["iqr_outlier"])
    stats = {**anova(kept), "outliers_dropped": [r["cell"] for r in dropped]}
    write_json(exp / "results" / "anova.json", stats)
    plot_accuracy(runs, exp / "plots" / "accuracy.png")

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["rationale_type"]), []).append(r)
    acc_table = [[m.upper(), t, f"{np.mean([r['accuracy'] for r in rs]):.3f}", f"{np.std([r['accuracy'] for r in rs], ddof=1):.3f}"
                  if len(rs) > 1 else "-", ", ".join(f"{r['accuracy']:.3f}" for r in rs),
                  sum(r["unparseable"] for r in rs), sum(r.get("prompt_too_long", 0) for r in rs), rs[0]["n"]]
                 for (m, t), rs in groups.items()]
    doc = [("h1", "distillqa rationale distillation report"),
           ("p", f"Student {cfg['student']['name']}, trained on {cfg['train_file']} (first {cfg['max_train_examples'] or 'all'} "
                 f"questions), tested on {cfg['eval_file']} (first {cfg['max_eval_examples'] or 'all'}). Accuracy: the choice named "
                 "after the last 'the answer is' in the output, matched to the choice texts; outputs without it count as wrong "
                 "and are counted as unparseable."),
           ("h2", "Accuracy"),
           ("table", ["method", "rationale", "mean", "SD", "per seed", "unparseable (all seeds)", "prompt too long",
                      "questions"], acc_table),
           ("img", "plots/accuracy.png", "accuracy by method and rationale type"),
           ("h2", "Two-way ANOVA and Tukey HSD")]
    if "skipped" in stats:
        doc.append(("p", f"No ANOVA: {stats['skipped']}."))
    else:
        k = cfg["iqr_outlier"]
        rule = (f"after the {k:g} x IQR outlier rule (dropped: {', '.join(stats['outliers_dropped']) or 'none'}; the "
                "accuracy table and plot above still show every run)") if k > 0 else "with every run (no outlier rule)"
        doc.append(("p", f"OLS model {stats['formula']}, type II sums of squares, {rule}."))
        doc.append(("table", ["source", "sum of squares", "df", "F", "p"],
                    [[r["source"], _fmt(r["sum_sq"]), _fmt(r["df"]), _fmt(r["F"]), _fmt(r["p"])] for r in stats["anova"]]))
        for name, rows in stats["tukey"].items():
            doc.append(("p", f"Tukey HSD over {'methods' if name == 'method' else 'method / rationale-type groups'} "
                             "(meandiff = mean of group2 - mean of group1):"))
            doc.append(("table", list(rows[0]), [[_fmt(v) for v in r.values()] for r in rows]))
    doc += [("h2", "Configuration"), ("pre", yaml.safe_dump(cfg, sort_keys=False))]
    write_text(exp / "report.md", to_markdown(doc))
    write_text(exp / "report.html", to_html(doc, exp, title="distillqa experiment report"))
    return exp / "report.md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
