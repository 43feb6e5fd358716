"""Models: the offline registry, loading, layer-pruned students and LoRA."""

from distillqa.models.registry import REGISTRY, load_model, load_tokenizer, resolve_model_path

__all__ = ["REGISTRY", "load_model", "load_tokenizer", "resolve_model_path"]
