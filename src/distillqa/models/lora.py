"""LoRA adapters through peft, and merging them into a standalone model."""

from __future__ import annotations

from torch import nn

from distillqa.config import LoraConfig
from distillqa.errors import ConfigError
from distillqa.models.traits import is_encoder_decoder


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters (only they train) or, if disabled, train all weights."""
    if not cfg.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in {type(model).__name__}")
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def merge_run(run_dir: str, out_dir: str) -> None:
    """Write a finished run's model (its adapter merged into the base) as a standalone directory."""
    from distillqa.models.registry import load_model, load_tokenizer, save_model

    save_model(load_model(run_dir, precision="fp32"), load_tokenizer(run_dir), out_dir)
