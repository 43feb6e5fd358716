"""Batched, KV-cached generation that writes predictions.jsonl (id, prompt, prediction, references).

Prompts are sorted by length and left-padded. Finished batches are appended to
`predictions.partial.jsonl`, so a killed run continues where it stopped and never generates
an answer twice; the complete file is renamed to `predictions.jsonl` at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distillqa.config import GenerateConfig, GenerationConfig, dump_config
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder, collate_left
from distillqa.data.records import QAExample
from distillqa.errors import DataError, RunDirError
from distillqa.io import append_jsonl, is_empty, read_partial_jsonl, write_jsonl, write_text
from distillqa.models.lora import is_encoder_decoder
from distillqa.models.registry import load_model, load_tokenizer

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_batch(model, tok, prompts: list[list[int]], cfg: GenerationConfig, seed: int = 0, details: bool = False) -> list:
    """Continuations of token-id prompts, left-padded into one batch, KV-cached; stripped text.

    With `details`, each item is (text, finish_reason, completion_tokens): finish_reason is "stop"
    when the model ended its answer and "length" when `max_new_tokens` cut it."""
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_left(prompts, tok.pad_token_id).items()}
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, use_cache=True)
    if cfg.do_sample:
        torch.manual_seed(seed)
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**batch, **kwargs)
    if not is_encoder_decoder(model):  # a causal LM returns the prompt too; a decoder only its own tokens
        out = out[:, batch["input_ids"].shape[1] :]
    texts = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    if not details:
        return texts
    eos = tok.eos_token_id if isinstance(tok.eos_token_id, list) else [tok.eos_token_id]
    ends = torch.isin(out, torch.tensor(eos, device=out.device))
    if is_encoder_decoder(model):
        ends[:, 0] = False  # the decoder start token
    items = []
    for text, row, end in zip(texts, out, ends):
        stop = bool(end.any())
        n = int(end.nonzero()[0, 0]) if stop else len(row)
        if is_encoder_decoder(model):
            n = max(0, n - 1)
        items.append((text, "stop" if stop or n < cfg.max_new_tokens else "length", n))
    return items


def generate_predictions(
    model, tok, builder: PromptBuilder, examples: list[QAExample], cfg: GenerationConfig, out_path: str | Path, desc: str = "generate"
) -> Path:
    out_path = Path(out_path)
    if out_path.is_file():
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.stem + ".partial.jsonl")
    done_rows = read_partial_jsonl(partial)
    write_jsonl(partial, done_rows)  # drops a torn last line before appending again
    done = {r["id"] for r in done_rows}

    todo, skipped = [], []
    for ex in examples:
        ids = builder.encode_prompt(ex, cfg.max_new_tokens)
        if ids is None:
            skipped.append(ex)
        else:
            todo.append((ex, ids))
    # A prompt that cannot fit even without its context still gets a row: an empty prediction,
    # marked skipped, which evaluate counts as missing rather than scoring it.
    if skipped:
        log.warning("%d of %d questions do not fit prompt.max_length (%d tokens) even without their context; they get no "
                    "answer and are counted as missing by evaluate", len(skipped), len(examples), builder.max_length)
    append_jsonl(partial, [_row(ex, "", None, tok, SKIPPED) for ex in skipped if ex.id not in done])
    # Batches are fixed before anything is skipped: a resumed run pads every prompt exactly as an
    # uninterrupted run would, so its answers are the same; finished batches are not generated again.
    todo.sort(key=lambda item: (-len(item[1]), item[0].id))
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    for index, chunk in enumerate(tqdm(batches, desc=desc, unit="batch")):
        if all(ex.id in done for ex, _ in chunk):
            continue
        texts = generate_batch(model, tok, [ids for _, ids in chunk], cfg, seed=cfg.seed + index * cfg.batch_size)
        append_jsonl(partial, [_row(ex, text, ids, tok) for (ex, ids), text in zip(chunk, texts) if ex.id not in done])

    rows = {r["id"]: r for r in read_partial_jsonl(partial)}
    write_jsonl(out_path, [rows[ex.id] for ex in examples])
    partial.unlink()
    return out_path


SKIPPED = "prompt too long for prompt.max_length"


def _row(ex: QAExample, prediction: str, ids: list[int] | None, tok, note: str | None = None) -> dict:
    """One predictions.jsonl row; `prompt` is the text the model saw (context truncated as it was)."""
    prompt = tok.decode(ids) if ids is not None else ""
    row = {"id": ex.id, "question": ex.question, "prompt": prompt, "prediction": prediction, "references": list(ex.answers)}
    if ex.context:
        row["context"] = ex.context
    if note:
        row["note"] = note
    if note == SKIPPED:
        row["skipped"] = True
    return row


def run_generate(cfg: GenerateConfig) -> Path:
    """Answer `cfg.split`; an output directory is reused (resumed) only for the same config.

    The output directory must be new, empty, or one `generate` wrote (it holds generate_config.yaml);
    nothing is written there until the data, the model and the prompt format have loaded, so a
    failed start leaves nothing behind."""
    out_dir = Path(cfg.output_dir)
    config_path = out_dir / "generate_config.yaml"
    predictions = out_dir / "predictions.jsonl"
    partial = predictions.with_name("predictions.partial.jsonl")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"output_dir {out_dir} exists and is not a directory")
    if not config_path.is_file() and not is_empty(out_dir):
        raise RunDirError(f"output_dir {out_dir} exists, is not empty and holds no distillqa generate output "
                          "(generate_config.yaml); choose another output_dir")
    made = (predictions.is_file() or bool(read_partial_jsonl(partial))) if config_path.is_file() else False
    if made and config_path.read_text(encoding="utf-8") != dump_config(cfg):
        raise RunDirError(f"{out_dir} holds predictions made with a different config; choose another output_dir or delete it")
    splits, _ = load_splits(cfg.data)
    examples = splits[cfg.split]
    if not examples:
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
        raise DataError(cfg.data.source, None, None, f"the {cfg.split} split is empty ({sizes} examples); "
                        "use more data or change data.split_fractions")
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    model = load_model(cfg.model.name, cfg.model.precision, cfg.model.trust_remote_code)
    if torch.cuda.is_available():
        model.to("cuda")
    builder = PromptBuilder(tok, cfg.prompt.template, cfg.prompt.instruction, cfg.prompt.max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(config_path, dump_config(cfg))
    return generate_predictions(model, tok, builder, examples, cfg.generation, predictions)
