"""Metrics: a registry of per-example scorers, and evaluation of predictions files."""

from distillqa.metrics.registry import METRICS, DEFAULT_METRICS, Metric, resolve_metrics

__all__ = ["METRICS", "DEFAULT_METRICS", "Metric", "resolve_metrics"]
