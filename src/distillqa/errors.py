"""Errors that distillqa reports to users as one clear message (the CLI prints them without a traceback)."""


class DistillQAError(Exception):
    """Base class for user-facing errors."""


class ConfigError(DistillQAError):
    """An invalid configuration value; the message names the key."""


class DataError(DistillQAError):
    """Bad input data; the message names the file, the record and the field."""

    def __init__(self, file: str, record: str | None, field: str | None, problem: str):
        self.file, self.record, self.field, self.problem = file, record, field, problem
        where = [str(file)]
        if record:
            where.append(record)
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {problem}")


class ModelError(DistillQAError):
    """A model name that cannot be resolved or loaded."""


class RunDirError(DistillQAError):
    """A run directory that cannot be used as asked (exists, unfinished, config mismatch)."""
