"""`distillqa judge-calibrate`: is a judge usable, before paying for every judge metric?

On a predictions file, each judge metric is scored `repeats` times: repeat 0 as `evaluate` asks
(greedy first, sampled re-asks of unparseable replies), later repeats as the same requests asked
again past the reply cache. Per judge metric:
- parse failures: the share of first replies that could not be parsed, and of questions left
  missing after every re-ask;
- agreement with itself: the repeat rate (the share of questions, scored in both, whose score
  is the same in a later repeat as in repeat 0), the mean absolute difference and Spearman's rho
  between repeats;
- agreement with the n-gram and embedding metrics: Spearman's rho (with n and p) between the
  judge metric (repeat 0) and each of them, over questions scored by both.
Questions `generate` could not ask (prompt too long) are left out.
"""

from __future__ import annotations

from pathlib import Path

from distillqa.clients import make_client
from distillqa.config import EvaluateConfig
from distillqa.errors import ConfigError
from distillqa.io import write_json, write_jsonl
from distillqa.metrics.evaluate import check_needs, is_skipped, read_predictions
from distillqa.metrics.registry import resolve_metrics
from distillqa.metrics.settings import EvalSettings

SAME = 1e-9  # two scores closer than this are the same score


def spearman(xs: list[float | None], ys: list[float | None]) -> dict:
    """Spearman's rho over the pairs where both are present (None when fewer than 3 or one side is constant)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return {"rho": None, "p": None, "n": len(pairs)}
    rho, p = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
    return {"rho": float(rho), "p": float(p), "n": len(pairs)}


def calibrate_judge(predictions: str | Path, cfg: EvaluateConfig, judge_metrics: str, against: str, repeats: int = 2,
                    limit: int | None = None, judge=None) -> tuple[dict, list[dict]]:
    """(report, per-question scores) of the judge `cfg.judge` (or `judge`) on `predictions`."""
    path = Path(predictions)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: no such predictions file")
    if repeats < 2:
        raise ConfigError("--repeats: at least 2 (the judge's agreement with itself needs a second answer)")
    judged = resolve_metrics(judge_metrics)
    if not judged or any(m.family != "judge" for m in judged):
        raise ConfigError(f"--metrics: judge metrics only (faithfulness, answer_correctness, answer_relevance), got '{judge_metrics}'")
    references = resolve_metrics(against)
    if any(m.family == "judge" for m in references):
        raise ConfigError(f"--against: n-gram, lexical or embedding metrics only, got '{against}'")
    rows = [r for r in read_predictions(path) if not is_skipped(r)][:limit]
    check_needs(path, rows, references)
    judge = judge or make_client(cfg.judge)
    if judge is None:
        raise ConfigError("judge calibration needs a judge: pass --judge-url and --judge-model, or --judge-local MODEL")
    settings = EvalSettings(cfg.embedding_model, cfg.bertscore_layers, cfg.batch_size, judge=judge)

    table = [{"id": r["id"]} for r in rows]
    for metric in references:
        for t, score in zip(table, metric.score(rows, settings)):
            t[metric.name] = score
    report = {"predictions": str(path), "judge": judge.model, "questions": len(rows), "repeats": repeats, "metrics": {}}
    for metric in judged:
        runs, parse = [], []
        for repeat in range(repeats):
            judge.repeat = repeat
            judge.asked = judge.first_unparsed = judge.never_parsed = 0
            runs.append(metric.score(rows, settings))
            # Empty answers are scored without asking the judge, so `asked` can be below the row count.
            parse.append((judge.first_unparsed / max(1, judge.asked), judge.never_parsed / max(1, judge.asked)))
        judge.repeat = 0
        for t, *scores in zip(table, *runs):
            t.update({f"{metric.name}@{k}": s for k, s in enumerate(scores)})
        report["metrics"][metric.name] = {
            "first_reply_unparsed": sum(p[0] for p in parse) / repeats,
            "missing": sum(p[1] for p in parse) / repeats,
            "self": [_self_agreement(runs[0], later) for later in runs[1:]],
            "against": {m.name: spearman(runs[0], [t[m.name] for t in table]) for m in references},
        }
    return report, table


def _self_agreement(first: list[float | None], later: list[float | None]) -> dict:
    both = [(a, b) for a, b in zip(first, later) if a is not None and b is not None]
    same = sum(abs(a - b) < SAME for a, b in both)
    return {"repeat_rate": same / len(both) if both else None,
            "mean_abs_difference": sum(abs(a - b) for a, b in both) / len(both) if both else None,
            "n": len(both), **{k: v for k, v in spearman(first, later).items() if k != "n"}}


def write_calibration(out: Path, report: dict, table: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "calibration.json", report)
    write_jsonl(out / "scores.jsonl", table)
