"""Score a predictions.jsonl: per-example scores (scores.jsonl) and a summary (summary.json).

Both files are written next to the predictions, atomically, after every metric, so a failure
half-way keeps the metrics already computed. Metrics already present in scores.jsonl are
kept and not recomputed, so metrics can be added to a finished evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from distillqa.config import EvaluateConfig, JudgeConfig
from distillqa.errors import DataError
from distillqa.io import read_jsonl, write_json, write_jsonl
from distillqa.metrics.registry import METRICS, resolve_metrics
from distillqa.metrics.settings import EvalSettings
from distillqa.metrics.summary import summarize


def read_predictions(path: Path) -> list[dict]:
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), f"line {lineno}", None, f"invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(str(path), f"line {lineno}", None, "each line must be a JSON object")
            where = f"line {lineno} (id '{row.get('id')}')"
            if not isinstance(row.get("id"), str) or not row["id"]:
                raise DataError(str(path), f"line {lineno}", "id", "missing or empty")
            if row["id"] in seen:
                raise DataError(str(path), where, "id", f"duplicate of line {seen[row['id']]}")
            seen[row["id"]] = lineno
            if not isinstance(row.get("prediction"), str):
                raise DataError(str(path), where, "prediction", "missing or not a string")
            refs = row.get("references")
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
                raise DataError(str(path), where, "references", "must be a non-empty list of non-empty strings")
            rows.append(row)
    return rows


def make_judge(cfg: JudgeConfig):
    from distillqa.metrics.judge import EndpointJudge, LocalJudge, ReplyCache
    from distillqa.models.registry import cache_root

    if not (cfg.url or cfg.local_model):
        return None
    cache = ReplyCache(cfg.cache or cache_root() / "judge.sqlite")
    common = dict(cache=cache, concurrency=cfg.concurrency, parse_retries=cfg.parse_retries, max_tokens=cfg.max_tokens)
    if cfg.local_model:
        return LocalJudge(cfg.local_model, **common)
    return EndpointJudge(cfg.url, cfg.model, cfg.api_key_env, timeout=cfg.timeout, retries=cfg.retries, **common)


def evaluate_predictions(predictions: str | Path, cfg: EvaluateConfig | None = None, judge=None,
                         settings: EvalSettings | None = None) -> dict:
    """Score `predictions` (a file, or a directory holding predictions.jsonl); returns the summary.

    `settings` shares loaded models across calls (the experiment scores many rows); `judge`
    replaces the one `cfg.judge` describes."""
    cfg = cfg or EvaluateConfig()
    path = Path(predictions)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.is_file():
        raise DataError(str(path), None, None, "no such predictions file")
    rows = read_predictions(path)
    metrics = resolve_metrics(cfg.metrics)
    scores_path, summary_path = path.with_name("scores.jsonl"), path.with_name("summary.json")
    old = {r["id"]: r for r in read_jsonl(scores_path)} if scores_path.is_file() else {}
    if old and set(old) != {r["id"] for r in rows}:
        old = {}  # the predictions changed since these scores were written
    table = [{"id": r["id"], **{k: v for k, v in old.get(r["id"], {}).items() if k in METRICS}} for r in rows]
    needs_judge = any(m.family == "judge" and not all(m.name in t for t in table) for m in metrics)
    settings = settings or EvalSettings(cfg.embedding_model, cfg.bertscore_layers, cfg.batch_size)
    if needs_judge and settings.judge is None:
        settings.judge = judge or make_judge(cfg.judge)
    for metric in tqdm(metrics, desc="evaluate", unit="metric"):
        if all(metric.name in t for t in table):
            continue
        for t, s in zip(table, metric.score(rows, settings)):
            t[metric.name] = s
        _write(scores_path, summary_path, path, rows, table)
    return _write(scores_path, summary_path, path, rows, table)


def _write(scores_path: Path, summary_path: Path, path: Path, rows: list[dict], table: list[dict]) -> dict:
    write_jsonl(scores_path, table)
    names = [m for m in METRICS if all(m in t for t in table)]
    summary = {"predictions": str(path), "n": len(rows), "empty_predictions": sum(not r["prediction"].strip() for r in rows),
               "metrics": {m: {**summarize([t[m] for t in table]), "family": METRICS[m].family,
                               "higher_is_better": METRICS[m].higher_is_better} for m in names}}
    write_json(summary_path, summary)
    return summary
