"""Shared fixtures: tiny in-process models (random weights, a BPE tokenizer trained here) and
offline settings. Real bundled models are loaded only by tests marked `real_models`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(vocab: int = 512, chat: bool = False):
    """A byte-level BPE tokenizer trained on the bundled sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distillqa.data import load_examples

    examples, _ = load_examples("bundled:telecom-sample")
    texts = [t for ex in examples for t in (ex.context, ex.question, *ex.answers)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(out: Path, chat: bool = False, layers: int = 4, seed: int = 0, vocab: int = 512, hidden: int = 32) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the bundled sample."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab, chat)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_tiny_t5(out: Path, seed: int = 0) -> Path:
    """A tiny random T5 (v1.1 layout: gated-GELU, untied head) with the tiny BPE tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "plain"))


@pytest.fixture(scope="session")
def tiny_other_vocab_model(tmp_path_factory) -> str:
    """A wider tiny model with a different (smaller) tokenizer: a different-vocabulary teacher."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "other", vocab=300, hidden=48, seed=1))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "chat", chat=True))


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_t5_model(tmp_path_factory) -> str:
    return str(build_tiny_t5(tmp_path_factory.mktemp("tiny") / "t5"))


@contextmanager
def serving(model: str):
    """The base URL of `distillqa serve` for `model` on a loopback port, in a thread of this process."""
    from distillqa.serve import make_server

    server = make_server(model, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def served_smollm2():
    """The base URL of `distillqa serve smollm2-135m` (the CLI, a separate process) on a loopback port."""
    proc = subprocess.Popen([sys.executable, "-m", "distillqa.cli", "serve", "smollm2-135m", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the socket bound
        match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
