"""Score a predictions.jsonl: per-example scores (scores.jsonl) and a summary (summary.json).

Both files are written next to the predictions, atomically, after every metric, so a failure
half-way keeps the metrics already computed. Metrics already present in scores.jsonl are
kept and not recomputed, so metrics can be added to a finished evaluation, as long as they were
scored the same way: summary.json records, per metric, a key of the metrics code (every source
file of `distillqa.metrics`) and the settings the metric reads (embedding model and layer; judge);
a metric whose key differs is scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from distillqa.clients import make_client
from distillqa.config import EvaluateConfig
from distillqa.data.readers import iter_json_lines
from distillqa.errors import DataError
from distillqa.io import read_jsonl, write_json, write_jsonl
from distillqa.metrics.registry import METRICS, resolve_metrics
from distillqa.metrics.settings import EvalSettings
from distillqa.metrics.summary import summarize

log = logging.getLogger(__name__)


def read_predictions(path: Path) -> list[dict]:
    rows, seen = [], {}
    for lineno, row in iter_json_lines(path):
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
        if row.get("skipped") is not None and not isinstance(row["skipped"], bool):
            raise DataError(str(path), where, "skipped", "must be true or false")
        _check_choice_fields(row, path, where)
        rows.append(row)
    if not rows:
        raise DataError(str(path), None, None, "the file is empty: no predictions to score")
    return rows


def _check_choice_fields(row: dict, path: Path, where: str) -> None:
    """Multiple-choice fields, where present: the choices, and one number per choice."""
    if "choices" not in row:
        return
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(str(path), where, "choices", "must be a list of at least two strings")
    for key in ("choice_logprobs", "choice_lengths"):
        values = row.get(key)
        numbers = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if key in row and not (numbers and len(values) == len(choices)):
            raise DataError(str(path), where, key, f"must be a list of {len(choices)} numbers, one per choice")


NEEDS_HINT = {"choices": "generate writes it for questions that have choices",
              "choice_logprobs": "generate with mcq.method=loglikelihood writes it",
              "choice_lengths": "generate with mcq.method=loglikelihood writes it"}


def check_needs(path: Path, rows: list[dict], metrics) -> None:
    """Every answered row has the fields the chosen metrics read, and a choice metric a correct choice."""
    for metric in metrics:
        for row in (r for r in rows if not is_skipped(r)):
            where = f"id '{row['id']}'"
            for key in metric.needs:
                if key not in row:
                    raise DataError(str(path), where, key, f"missing; metric {metric.name} needs it ({NEEDS_HINT[key]})")
            if "choices" in metric.needs and not any(c in row["references"] for c in row["choices"]):
                raise DataError(str(path), where, "references", f"none of the choices is a reference answer, "
                                f"so metric {metric.name} cannot score it")


def is_skipped(row: dict) -> bool:
    """A question generate could not ask (its prompt did not fit): counted as missing, never scored."""
    return bool(row.get("skipped")) or str(row.get("note", "")).startswith("prompt too long")


def _check_own(scores_path: Path, summary_path: Path) -> None:
    """scores.jsonl and summary.json are replaced only if evaluate wrote them (a user's files of
    the same names next to the predictions are left alone, with an error)."""
    for p in (scores_path, summary_path):
        if p.exists() and not p.is_file():
            raise DataError(str(p), None, None, "is in the way of evaluate's output and is not a file; move it")
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            ours = isinstance(summary, dict) and {"predictions", "n", "metrics"} <= set(summary)
        except (ValueError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise DataError(str(summary_path), None, None, "exists and was not written by distillqa evaluate; "
                            "move it (evaluate writes summary.json and scores.jsonl next to the predictions)")
    if scores_path.is_file() and scores_path.stat().st_size and not summary_path.is_file():
        raise DataError(str(scores_path), None, None, "exists without evaluate's summary.json, so it was not written by "
                        "distillqa evaluate; move it (evaluate writes summary.json and scores.jsonl next to the predictions)")


_CODE = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()


def scoring_key(metric, cfg: EvaluateConfig) -> str:
    """What a metric's scores depend on besides the predictions: the metrics code and its settings."""
    settings = {"embedding": [cfg.embedding_model, cfg.bertscore_layers],
                "judge": [cfg.judge.url, cfg.judge.model, cfg.judge.local_model]}.get(metric.family)
    return hashlib.sha256(json.dumps([_CODE, settings]).encode()).hexdigest()[:16]


def is_scored(predictions_dir: Path, metrics: list, cfg: EvaluateConfig) -> bool:
    """Whether summary.json holds every metric, scored the way `cfg` would score it now."""
    summary = Path(predictions_dir) / "summary.json"
    if not summary.is_file():
        return False
    keys = json.loads(summary.read_text(encoding="utf-8")).get("scored_with", {})
    return all(keys.get(m.name) == scoring_key(m, cfg) for m in metrics)


def _old_scores(scores_path: Path, summary_path: Path, digest: str, rows: list[dict]) -> dict:
    """Scores already computed for exactly these predictions (same file contents), by id, and the
    key each metric was scored with."""
    if not scores_path.is_file() or not summary_path.is_file():
        return {}, {}
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("predictions_sha256") != digest:
            return {}, {}  # the predictions changed since these scores were written (or an old summary without a digest)
        old = {r["id"]: r for r in read_jsonl(scores_path)}
        keys = dict(summary.get("scored_with", {}))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}, {}
    return (old, keys) if set(old) == {r["id"] for r in rows} else ({}, {})


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
    check_needs(path, rows, metrics)
    scores_path, summary_path = path.with_name("scores.jsonl"), path.with_name("summary.json")
    _check_own(scores_path, summary_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    keys = {m.name: scoring_key(m, cfg) for m in metrics}
    old, old_keys = _old_scores(scores_path, summary_path, digest, rows)
    # Old scores stay if not asked for now, or asked for and scored the same way as they would be now.
    kept = {k: v for k, v in old_keys.items() if keys.get(k, v) == v}
    table = [{"id": r["id"], **{k: v for k, v in old.get(r["id"], {}).items() if k in kept}} for r in rows]
    keys = {**kept, **keys}
    skipped = [i for i, r in enumerate(rows) if is_skipped(r)]
    if skipped:
        log.warning("%s: %d of %d questions were not answered (prompt too long for prompt.max_length); they are counted "
                    "as missing in every metric", path, len(skipped), len(rows))
    needs_judge = any(m.family == "judge" and not all(m.name in t for t in table) for m in metrics)
    settings = settings or EvalSettings(cfg.embedding_model, cfg.bertscore_layers, cfg.batch_size)
    if needs_judge and settings.judge is None:
        settings.judge = judge or make_client(cfg.judge)
    for metric in tqdm(metrics, desc="evaluate", unit="metric"):
        if all(metric.name in t for t in table):
            continue
        answered = [r for r in rows if not is_skipped(r)]
        scores = iter(metric.score(answered, settings) if answered else [])
        for t, r in zip(table, rows):
            t[metric.name] = None if is_skipped(r) else next(scores)
        _write(scores_path, summary_path, path, rows, table, digest, keys)
    return _write(scores_path, summary_path, path, rows, table, digest, keys)


def _write(scores_path: Path, summary_path: Path, path: Path, rows: list[dict], table: list[dict], digest: str,
           keys: dict[str, str]) -> dict:
    write_jsonl(scores_path, table)
    names = [m for m in METRICS if all(m in t for t in table)]
    summary = {"predictions": str(path), "predictions_sha256": digest, "n": len(rows),
               "skipped_too_long": sum(is_skipped(r) for r in rows),
               "empty_predictions": sum(not r["prediction"].strip() and not is_skipped(r) for r in rows),
               "metrics": {m: {**summarize([t[m] for t in table]), "family": METRICS[m].family,
                               "higher_is_better": METRICS[m].higher_is_better} for m in names},
               "scored_with": {m: keys[m] for m in names}}
    write_json(summary_path, summary)
    return summary
