"""Data: the QAExample record, readers, splits and prompts."""

from distillqa.data.readers import LoadReport, load_examples
from distillqa.data.records import QAExample
from distillqa.data.splits import split_examples

__all__ = ["LoadReport", "QAExample", "load_examples", "split_examples", "load_splits"]


def load_splits(cfg) -> tuple[dict[str, list[QAExample]], LoadReport]:
    """Load and split the data a `DataConfig` describes, applying its example limits."""
    examples, report = load_examples(
        cfg.source, cfg.format, cfg.include_unanswerable, cfg.on_bad_answer, cfg.explanations
    )
    if not examples:
        from distillqa.errors import DataError

        left_out = f" ({report.summary()})" if report.skipped else ""
        raise DataError(cfg.source, None, None, f"no usable examples in the file{left_out}")
    splits = split_examples(examples, tuple(cfg.split_fractions), cfg.split_seed)
    if cfg.max_train_examples:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    if cfg.max_eval_examples:
        for name in ("validation", "test"):
            splits[name] = splits[name][: cfg.max_eval_examples]
    return splits, report
