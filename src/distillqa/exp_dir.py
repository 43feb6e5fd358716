"""Experiment directories (the QA experiment's and the rationale experiment's): one runner at a
time, and a config that may not change under the runs it has made.

    EXP/
      experiment.yaml     the resolved config; a rerun with another config is refused
      .lock               held (flock) while a runner works here; the OS releases it when the process dies
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import BaseModel

from distillqa.config import dump_config
from distillqa.config_changes import changed_keys, upgraded
from distillqa.errors import RunDirError
from distillqa.io import write_text


@contextmanager
def directory_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold `lock_file` (flock) while `what` runs; the OS releases it when the process dies (kill -9 too)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(f"{lock_file.parent} is in use by another process {what} (pid {holder}); wait for it "
                              "to finish or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def experiment_lock(exp: Path):
    """EXP/.lock, held for the whole run: a second runner on the same directory is refused."""
    return directory_lock(exp / ".lock", "running an experiment there")


def check_config(exp: Path, cfg: BaseModel, mutable: tuple[str, ...] = ("stats.",),
                 may_grow: dict[str, Callable[[Any, Any], bool]] | None = None) -> None:
    """Write experiment.yaml, or refuse if the directory holds an experiment with another config.
    Only keys starting with a `mutable` prefix may change between runs: they affect the
    statistics, which are recomputed, and nothing else. A top-level key of `may_grow` may also
    change, when it is the only change and its check `(old value, new value)` accepts it (stages
    added, none changed)."""
    path = exp / "experiment.yaml"
    if path.is_file():
        previous = yaml.safe_load(path.read_text())
        diff = [k for k in changed_keys(cfg, previous) if not k.startswith(mutable)]
        if len(diff) == 1 and diff[0] in (may_grow or {}) and may_grow[diff[0]](
                upgraded(type(cfg), previous)[diff[0]], cfg.model_dump(mode="json")[diff[0]]):
            diff = []
        if diff:
            raise RunDirError(f"{exp} holds an experiment with a different config ({', '.join(diff)}); "
                              "choose another output_dir or delete it")
    write_text(path, dump_config(cfg))
