"""Summaries of per-example scores: mean and a 95% percentile-bootstrap confidence interval."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: list[float], resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarize(scores: list[float | None]) -> dict:
    present = [s for s in scores if s is not None]
    lo, hi = bootstrap_ci(present)
    return {"mean": float(np.mean(present)) if present else float("nan"), "ci95": [lo, hi], "n": len(present),
            "missing": len(scores) - len(present)}
