"""What a loaded model or tokenizer is: an encoder-decoder LM or a causal one, where its decoder
layers are, and whether two tokenizers are the same."""

from __future__ import annotations

from torch import nn

from distillqa.errors import ModelError


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__}: cannot find decoder layers at model.model.layers")
    return layers


def same_tokenizer(a, b) -> bool:
    """Same token-to-id mapping (not only the same size) and the same special tokens."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
