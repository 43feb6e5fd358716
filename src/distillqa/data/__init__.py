"""Data: the QAExample record, readers, splits and prompts."""

from distillqa.data.readers import LoadReport, load_examples
from distillqa.data.records import QAExample
from distillqa.data.splits import split_examples

__all__ = ["LoadReport", "QAExample", "load_examples", "split_examples", "load_splits"]

# An experiment's stages share one process and one data config: the file is read and split once.
# The key holds the file's size and mtime, so an edited file is read again.
_loaded: dict[tuple, tuple[dict[str, list[QAExample]], LoadReport]] = {}


def load_splits(cfg) -> tuple[dict[str, list[QAExample]], LoadReport]:
    """Load and split the data a `DataConfig` describes, applying its example limits.

    Besides `train`, `validation` and `test`, the split `all` is every example in file order (a
    file meant only for testing, such as a benchmark, is answered whole).

    Repeated calls with the same config and an unchanged file return the first call's examples
    (QAExample is frozen; the lists are fresh copies)."""
    key = (cfg.model_dump_json(), _file_identity(cfg.source))
    if key[1] is None:
        return _load_splits(cfg)
    if key not in _loaded:
        _loaded.clear()  # one data set at a time: a long-lived process does not accumulate them
        _loaded[key] = _load_splits(cfg)
    splits, report = _loaded[key]
    return {name: list(rows) for name, rows in splits.items()}, report


def _file_identity(source: str) -> tuple | None:
    """What tells one version of the data from another; None where that is not known cheaply
    (a directory, or a missing file, whose error the reader reports): such data is not kept."""
    import os

    if source.startswith("bundled:"):
        return (source,)
    if not os.path.isfile(source):
        return None
    st = os.stat(source)
    return os.path.realpath(source), st.st_size, st.st_mtime_ns


def _load_splits(cfg) -> tuple[dict[str, list[QAExample]], LoadReport]:
    examples, report = load_examples(
        cfg.source, cfg.format, cfg.include_unanswerable, cfg.on_bad_answer, cfg.explanations
    )
    if not examples:
        from distillqa.errors import DataError

        left_out = f" ({report.summary()})" if report.skipped else ""
        raise DataError(cfg.source, None, None, f"no usable examples in the file{left_out}")
    splits = split_examples(examples, tuple(cfg.split_fractions), cfg.split_seed)
    splits["all"] = examples
    if cfg.max_train_examples:
        splits["train"] = splits["train"][: cfg.max_train_examples]
    if cfg.max_eval_examples:
        for name in ("validation", "test", "all"):
            splits[name] = splits[name][: cfg.max_eval_examples]
    return splits, report
