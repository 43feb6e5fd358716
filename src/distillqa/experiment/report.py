"""`distillqa experiment report DIR`: statistics and the report of an experiment directory.

Reads plan.json, experiment.yaml and every row's scores.jsonl; writes
    results/rows.json         per row and metric: mean, 95% bootstrap CI, n, missing
    results/hypotheses.json   per hypothesis and metric: paired test, adjusted p, effect size
    results/held_out/SET/     rows.json and hypotheses.json of each extra test set (`held_out`)
    plots/means.png, plots/effects.png
    report.md, report.html    (the HTML embeds the plots, so it is one self-contained file)

A hypothesis averages over its matched pairs of rows: per question, the A rows' mean score and
the B rows' mean score, so "teacher SFT vs base" over 8 cell pairs and 16 questions is one
paired test on 16 differences per metric (the pairs share questions, so their differences are
not independent and are not counted as separate observations).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from distillqa.errors import RunDirError
from distillqa.config import DataConfig
from distillqa.data import load_splits
from distillqa.experiment.grid import held_out_dir
from distillqa.experiment.checks import as_dicts, data_vocabulary, experiment_checks, kd_vs_sft_line
from distillqa.experiment.paper import PAPER_FINDINGS, PAPER_NOTE
from distillqa.experiment.stats import compare, summarize_hypothesis
from distillqa.io import read_jsonl, write_json, write_text
from distillqa.metrics.registry import METRICS, resolve_metrics
from distillqa.report_doc import save_figure, to_html, to_markdown

METHOD = (
    "Per metric, paired differences over the same test questions (per question, the mean score of the hypothesis' "
    "A rows minus that of its B rows) are tested with the {test} test{test_note}; p-values are adjusted across the metrics of a "
    "hypothesis with {correction} and compared with alpha = {alpha}. The effect size is the matched-pairs "
    "rank-biserial correlation r in [-1, 1], positive when the first system (A) scores higher, with |d| ranked over all questions and zero differences "
    "ranked lowest, so ties pull it toward 0. A metric whose differences are all zero gets p = 1, r = 0. "
    "Cell means carry 95% percentile-bootstrap confidence intervals over questions."
)
TEST_NOTES = {"wilcoxon": " (signed-rank, zero differences dropped; scipy chooses an exact, permutation or normal-"
                          "approximation p-value by sample size and ties)", "ttest": " (zero differences kept)",
              "permutation": " (10,000 random sign flips of the differences, zeros kept)"}
CORRECTIONS = {"holm": "Holm's step-down method", "bh": "Benjamini-Hochberg", "none": "no correction"}


def label(row: dict) -> str:
    f = row["factors"]
    if row["kind"] == "teacher":
        return f"teacher {f['teacher']} ({f['teacher_state']})"
    if row["kind"] == "student":
        return f"student ({f['student_state']})"
    if row["kind"] == "sft-only":
        return f"SFT only: S={f['student_state']}"
    return f"{f['algorithm']}: T={f['teacher']} ({f['teacher_state']}), S={f['student_state']}"


def load_experiment(exp: Path) -> tuple[dict, dict, dict[str, dict[str, dict]]]:
    """(config, plan, scores[row][example id][metric])."""
    for name in ("experiment.yaml", "plan.json"):
        if not (exp / name).is_file():
            raise RunDirError(f"{exp} is not an experiment directory (no {name}); run `distillqa experiment run` first")
    try:
        cfg = yaml.safe_load((exp / "experiment.yaml").read_text(encoding="utf-8"))
        plan = json.loads((exp / "plan.json").read_text(encoding="utf-8"))
        if not isinstance(cfg, dict) or not isinstance(plan, dict) or not isinstance(plan.get("rows"), list):
            raise ValueError("not the layout distillqa writes")
    except (yaml.YAMLError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunDirError(f"{exp}: experiment.yaml or plan.json is damaged ({str(e).splitlines()[0]})") from None
    return cfg, plan, read_scores(exp, plan, "rows")


def read_scores(exp: Path, plan: dict, test_dir: str) -> dict[str, dict[str, dict]]:
    """scores[row][example id][metric] of one test set (`rows`, or `held_out/SET`)."""
    scores = {}
    for row in plan["rows"]:
        path = exp / test_dir / row["name"] / "scores.jsonl"
        if not path.is_file():
            raise RunDirError(f"{exp}: row {row['name']} has no scores yet ({path}); finish the run with "
                              "`distillqa experiment run`")
        scores[row["name"]] = {r["id"]: r for r in read_jsonl(path)}
    return scores


def pooled(scores: dict[str, dict[str, dict]], pairs: list[list[str]], metrics: list[str]) -> tuple[dict, dict]:
    """Per-question scores of sides A and B, each the mean over the hypothesis' pairs (missing scores left out)."""

    def side(rows: list[str]) -> dict[str, dict[str, float | None]]:
        out = {}
        for ex in set.intersection(*(set(scores[r]) for pair in pairs for r in pair)):
            out[ex] = {}
            for m in metrics:
                vals = [scores[r][ex].get(m) for r in rows]
                vals = [v for v in vals if v is not None]
                out[ex][m] = sum(vals) / len(vals) if vals else None
        return out

    return side([a for a, _ in pairs]), side([b for _, b in pairs])


def compute_results(exp: Path) -> dict:
    cfg, plan, scores = load_experiment(exp)
    st = cfg["stats"]
    method = METHOD.format(test=st["test"], test_note=TEST_NOTES[st["test"]], correction=CORRECTIONS[st["correction"]],
                           alpha=st["alpha"])
    res = {"config": cfg, **test_set_results(plan, scores, cfg["evaluate"]["metrics"], st), "method": method}
    res["held_out"] = [{"name": h["name"], **test_set_results(plan, read_scores(exp, plan, held_out_dir(h["name"])),
                                                              h["metrics"] or cfg["evaluate"]["metrics"], st)}
                       for h in cfg.get("held_out", [])]
    test = load_splits(DataConfig(**cfg["data"]))[0]["test"]
    res["checks"] = as_dicts(experiment_checks(exp, res, data_vocabulary(test)))
    res["kd_vs_sft"] = kd_vs_sft_line(res)
    res["examples"] = answers_side_by_side(exp, plan["rows"], test[:EXAMPLE_QUESTIONS])
    return res


def test_set_results(plan: dict, scores: dict[str, dict[str, dict]], metric_spec: str, st: dict) -> dict:
    """One test set's metrics, rows (mean and CI per metric) and hypotheses (paired tests per metric)."""
    from distillqa.metrics.summary import summarize

    metrics = [m.name for m in resolve_metrics(metric_spec) if all(m.name in s for rs in scores.values() for s in rs.values())]
    rows = [{**row, "label": label(row), "metrics": {m: summarize([s.get(m) for s in scores[row["name"]].values()])
                                                     for m in metrics}} for row in plan["rows"]]
    hyps = []
    for h in plan["hypotheses"]:
        a, b = pooled(scores, h["pairs"], metrics)
        results = compare(a, b, metrics, st["test"], st["correction"], st["alpha"])
        hyps.append({**h, "summary": summarize_hypothesis(results, {m: METRICS[m].family for m in metrics}),
                     "results": [r.to_dict() for r in results]})
    return {"metrics": metrics, "rows": rows, "hypotheses": hyps}


EXAMPLE_QUESTIONS = 4


def answers_side_by_side(exp: Path, rows: list[dict], examples) -> list[dict]:
    """For a few test questions: the reference and every row's answer."""
    answers = {row["name"]: {r["id"]: r["prediction"] for r in read_jsonl(exp / "rows" / row["name"] / "predictions.jsonl")}
               for row in rows}
    return [{"question": ex.question, "reference": ex.answers[0],
             "answers": [[label(row), answers[row["name"]].get(ex.id, "")] for row in rows]} for ex in examples]


def paper_comparison(res: dict) -> list[list[str]]:
    """Each hypothesis the telecom study reports: its finding, this run's, and whether they agree."""
    hyps = {h["name"]: h for h in res["hypotheses"]}
    table = []
    for name, finding in PAPER_FINDINGS.items():
        if name not in hyps:
            continue
        h = hyps[name]
        a_wins = sum(r["rejected"] and r["direction"] == "A" for r in h["results"])
        b_wins = sum(r["rejected"] and r["direction"] == "B" for r in h["results"])
        tested = len(h["results"])
        ours = f"null rejected in {a_wins + b_wins} of {tested} metrics ({a_wins} with A higher, {b_wins} with B higher)"
        table.append([h["question"], finding.text, ours, finding.agreement(a_wins, b_wins, tested)])
    return table


# --- plots ----------------------------------------------------------------------------------
def plot_means(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, rows = res["metrics"], res["rows"]
    cols = min(4, len(metrics))
    grid_rows = -(-len(metrics) // cols)
    height = max(3.0, 0.28 * len(rows) + 1.2)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(4.2 * cols + 3.5, height * grid_rows), squeeze=False, sharey=True)
    colors = {"teacher": "#4c72b0", "student": "#8c8c8c", "sft-only": "#55a868", "cell": "#dd8452"}
    y = list(range(len(rows)))[::-1]
    for ax, metric in zip(axes.flat, metrics):
        means = [r["metrics"][metric]["mean"] for r in rows]
        lo = [m - r["metrics"][metric]["ci95"][0] for m, r in zip(means, rows)]
        hi = [r["metrics"][metric]["ci95"][1] - m for m, r in zip(means, rows)]
        ax.barh(y, means, xerr=[lo, hi], color=[colors[r["kind"]] for r in rows], ecolor="#333333", capsize=2, height=0.7)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_yticks(y)
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    fig.suptitle("Mean score per row with 95% bootstrap CI (blue: teachers, grey: student, green: SFT only, orange: distilled)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    save_figure(fig, path)


def plot_effects(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, hyps = res["metrics"], res["hypotheses"]
    fig, ax = plt.subplots(figsize=(1.0 * len(metrics) + 4, 0.6 * len(hyps) + 2))
    grid = [[r["effect_size"] for r in h["results"]] for h in hyps]
    im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    for i, h in enumerate(hyps):
        for j, r in enumerate(h["results"]):
            mark = "*" if r["rejected"] else ""
            ax.text(j, i, f"{r['effect_size']:+.2f}{mark}", ha="center", va="center", fontsize=8,
                    color="white" if abs(r["effect_size"]) > 0.6 else "black")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(len(hyps)))
    ax.set_yticklabels([h["question"] for h in hyps], fontsize=9)
    fig.colorbar(im, ax=ax, label="rank-biserial effect size (A vs B)")
    ax.set_title("Effect size per hypothesis and metric (* = null rejected after correction)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


# --- documents --------------------------------------------------------------------------------
def blocks(res: dict) -> list[tuple]:
    """The report as ("h1" | "h2" | "p" | "table" | "img" | "pre", ...) blocks, rendered to Markdown and HTML."""
    metrics = res["metrics"]
    pairs = [[h["name"], "; ".join(f"{a} vs {b}" for a, b in h["pairs"])] for h in res["hypotheses"]]
    checks = [[c["name"], "pass" if c["passed"] else "FAIL", c["detail"]] for c in res["checks"]]
    examples = []
    for ex in res["examples"]:
        examples += [("p", f"Q: {ex['question']}  Reference: {ex['reference']}"),
                     ("table", ["row", "answer"], [[name, text or "(empty)"] for name, text in ex["answers"]])]
    return [
        ("h1", "distillqa experiment report"),
        ("p", f"{len(res['rows'])} rows (reference models, SFT-only baselines and distilled cells) scored on "
              f"{len(metrics)} metrics: {', '.join(metrics)}."),
        ("h2", "Checks of the tool working"),
        ("table", ["check", "result", "measured"], checks),
        ("p", res["kd_vs_sft"] or "The grid has no SFT-only baseline, so kd_vs_sft is not tested."),
        ("h2", "Hypotheses"),
        hypotheses_block(res),
        ("img", "plots/effects.png", "effect size heatmap"),
        ("p", res["method"]),
        ("h2", "The telecom study's findings next to this run's"),
        ("p", PAPER_NOTE),
        ("table", ["hypothesis (A vs B)", "Sen et al. 2025", "this run", "agree?"], paper_comparison(res)),
        ("h2", "Answers side by side"),
        ("p", f"The first {len(res['examples'])} test questions, every row's answer next to the reference."),
        *examples,
        ("h2", "Rows: mean [95% CI] per metric"),
        rows_block(res),
        ("img", "plots/means.png", "metric means per row"),
        ("h2", "Paired tests per hypothesis and metric"),
        tests_block(res),
        *held_out_blocks(res),
        ("h2", "Matched pairs of each hypothesis (A vs B)"),
        ("table", ["hypothesis", "pairs"], pairs),
        ("h2", "Configuration"),
        ("pre", yaml.safe_dump(res["config"], sort_keys=False)),
    ]


def rows_block(test_set: dict) -> tuple:
    metrics = test_set["metrics"]
    return ("table", ["row", "n"] + metrics, [
        [r["label"], r["metrics"][metrics[0]]["n"] if metrics else 0] +
        [f"{r['metrics'][m]['mean']:.3f} [{r['metrics'][m]['ci95'][0]:.3f}, {r['metrics'][m]['ci95'][1]:.3f}]" for m in metrics]
        for r in test_set["rows"]])


def hypotheses_block(test_set: dict) -> tuple:
    return ("table", ["hypothesis (A vs B)", "pairs", "result"],
            [[h["question"], len(h["pairs"]), h["summary"]] for h in test_set["hypotheses"]])


def tests_block(test_set: dict) -> tuple:
    detail = []
    for h in test_set["hypotheses"]:
        for r in h["results"]:
            detail.append([h["name"], r["metric"], r["n"], f"{r['mean_a']:.3f}", f"{r['mean_b']:.3f}", f"{r['effect_size']:+.3f}",
                           f"{r['p_value']:.2g}", f"{r['p_adjusted']:.2g}", "yes" if r["rejected"] else "no", r["direction"]])
    return ("table", ["hypothesis", "metric", "questions", "mean A", "mean B", "effect r", "p", "p adjusted", "rejected",
                      "higher"], detail)


def held_out_blocks(res: dict) -> list[tuple]:
    """Each extra test set: its hypotheses, rows and paired tests, as the main test split's."""
    out = []
    for test_set, h in zip(res["held_out"], res["config"].get("held_out", [])):
        out += [("h2", f"Held-out test set {test_set['name']}"),
                ("p", f"{h['data']['source']} (split {h['split']}, multiple choice by {h['mcq']['method']}), answered by "
                      f"every row; metrics: {', '.join(test_set['metrics'])}."),
                hypotheses_block(test_set), rows_block(test_set), tests_block(test_set)]
    return out


def write_report(exp: str | Path) -> Path:
    """Compute the statistics and write results/, plots/, report.md and report.html; returns report.md."""
    exp = Path(exp)
    res = compute_results(exp)
    write_json(exp / "results" / "rows.json", res["rows"])
    write_json(exp / "results" / "hypotheses.json", res["hypotheses"])
    write_json(exp / "results" / "checks.json", {"checks": res["checks"], "kd_vs_sft": res["kd_vs_sft"]})
    for test_set in res["held_out"]:
        write_json(exp / "results" / held_out_dir(test_set["name"]) / "rows.json", test_set["rows"])
        write_json(exp / "results" / held_out_dir(test_set["name"]) / "hypotheses.json", test_set["hypotheses"])
    if res["metrics"]:
        plot_means(res, exp / "plots" / "means.png")
        if res["hypotheses"]:
            plot_effects(res, exp / "plots" / "effects.png")
    doc = [b for b in blocks(res) if not (b[0] == "img" and not (exp / b[1]).is_file())]
    write_text(exp / "report.md", to_markdown(doc))
    write_text(exp / "report.html", to_html(doc, exp, title="distillqa experiment report"))
    return exp / "report.md"
