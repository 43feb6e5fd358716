"""The cache directory, `$DISTILLQA_CACHE` (default `~/.cache/distillqa`): converted registry models
(models/), layer-pruned students (derived/), healed students (healed/), judge and teacher replies
(judge.sqlite) and WordNet (wordnet/)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DISTILLQA_CACHE", Path.home() / ".cache" / "distillqa"))
