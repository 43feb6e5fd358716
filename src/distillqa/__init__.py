"""distillqa: distil domain-adapted language models into small ones for question answering."""

__version__ = "0.1.0"
