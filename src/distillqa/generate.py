"""Batched, KV-cached generation that writes predictions.jsonl (id, prompt, prediction, references;
`choices` for multiple choice), or, for multiple choice without generation, each choice's
log-likelihood after the prompt (`mcq.method: loglikelihood`).

Prompts are sorted by length and left-padded; with `generation.endpoint` they are sent instead, as
the text their tokens spell (the chat-templated prompt), to an OpenAI-compatible completions
endpoint, a batch at a time and concurrently within it. Finished batches are appended to
`predictions.partial.jsonl`, so a killed run continues where it stopped and never generates
an answer twice; the complete file is renamed to `predictions.jsonl` at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distillqa.clients import CompletionsClient, completions_client
from distillqa.config import GenerateConfig, GenerationConfig, dump_config
from distillqa.config_changes import changed_keys, previous_config
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder, collate_left
from distillqa.data.readers import iter_json_lines
from distillqa.data.records import QAExample
from distillqa.errors import ConfigError, DataError, RunDirError
from distillqa.io import (append_jsonl, file_lock, finish_partial, is_empty, partial_path, read_jsonl, read_partial_jsonl,
                          resume_partial, write_json, write_jsonl, write_text)
from distillqa.loglik import sequence_logprobs
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.models.traits import is_encoder_decoder

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_ids(model, tok, prompts: list[list[int]], cfg: GenerationConfig, seed: int = 0) -> torch.Tensor:
    """The new tokens after each token-id prompt [B, N]: prompts left-padded into one batch, KV-cached; a row that
    ends early is padded after its end-of-sequence token. Sampling (`cfg.do_sample`) is seeded by `seed` and leaves
    the caller's random state as it was; the model is back in its train or eval mode afterwards."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_left(prompts, tok.pad_token_id).items()}
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, use_cache=True)
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(**batch, **kwargs)
    model.train(training)
    if not is_encoder_decoder(model):  # a causal LM returns the prompt too; a decoder only its own tokens
        out = out[:, batch["input_ids"].shape[1] :]
    return out


def generate_batch(model, tok, prompts: list[list[int]], cfg: GenerationConfig, seed: int = 0, details: bool = False) -> list:
    """Continuations of token-id prompts (`generate_ids`) as stripped text.

    With `details`, each item is (text, finish_reason, completion_tokens): finish_reason is "stop"
    when the model ended its answer and "length" when `max_new_tokens` cut it."""
    out = generate_ids(model, tok, prompts, cfg, seed)
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


def generate_texts(model, tok, prompts: list[list[int]], cfg: GenerationConfig, seed: int) -> list[str]:
    """Answers to token-id prompts from a model here, or from an endpoint's client, which is sent the
    text those ids spell."""
    if isinstance(model, CompletionsClient):
        return model.complete_many([tok.decode(ids, clean_up_tokenization_spaces=False) for ids in prompts])
    return generate_batch(model, tok, prompts, cfg, seed=seed)


def generate_predictions(
    model, tok, builder: PromptBuilder, examples: list[QAExample], cfg: GenerationConfig, out_path: str | Path, desc: str = "generate"
) -> Path:
    """Answers of `model` (loaded here, or an endpoint's `CompletionsClient`), `cfg.batch_size` prompts a
    batch (resumable; see `answer_in_batches`)."""
    prompts = {ex.id: builder.encode_prompt(ex, cfg.max_new_tokens) for ex in examples}

    def answer(chunk, index):
        texts = generate_texts(model, tok, [prompts[ex.id] for ex in chunk], cfg, seed=cfg.seed + index * cfg.batch_size)
        return [{"prediction": text} for text in texts]

    return answer_in_batches(examples, prompts, cfg.batch_size, answer, tok, builder.max_length, out_path, desc)


def loglikelihood_predictions(model, tok, builder: PromptBuilder, examples: list[QAExample], batch_size: int,
                              out_path: str | Path) -> Path:
    """Multiple choice without generation: each row gets every choice's log-likelihood after the
    prompt (`choice_logprobs`, summed over the choice's tokens), the length in characters of the
    text scored (`choice_lengths`) and, as its prediction, the most likely choice."""
    continuations = {ex.id: [builder.continuation_ids(c) for c in builder.scored_choices(ex)] for ex in examples}
    # The prompt leaves room for the longest choice, as generation leaves room for its new tokens.
    prompts = {ex.id: builder.fit_prompt(ex, builder.max_length - max(map(len, continuations[ex.id])), anchor=None)
               for ex in examples}

    def answer(chunk, index):
        pairs = [(prompts[ex.id], c) for ex in chunk for c in continuations[ex.id]]
        logprobs = iter(sequence_logprobs(model, pairs, tok.pad_token_id))
        rows = []
        for ex in chunk:
            scores = [next(logprobs) for _ in ex.choices]
            best = max(range(len(scores)), key=scores.__getitem__)
            rows.append({"prediction": ex.choices[best], "choice_logprobs": scores,
                         "choice_lengths": [len(c) for c in builder.scored_choices(ex)]})
        return rows

    return answer_in_batches(examples, prompts, batch_size, answer, tok, builder.max_length, out_path, "log-likelihoods")


def _provenance(model_name: str, builder: PromptBuilder, max_new_tokens: int, endpoint: str | None) -> dict:
    held = {"model": model_name, "chat_template": builder.chat, "instruction": builder.instruction,
            "max_length": builder.max_length, "max_new_tokens": max_new_tokens}
    return (held | {"endpoint": endpoint}) if endpoint else held


def read_answers_store(model_name: str, builder: PromptBuilder, max_new_tokens: int, store: Path,
                       endpoint: str | None = None) -> list[dict]:
    """The rows of an answers store (none if it does not exist yet), refused if it was made with other
    settings than these (named) or is not an answers store (file, line and field named). `endpoint`:
    the URL of the endpoint that answers as `model_name` (None: the model answers in-process)."""
    store = Path(store)
    provenance = _provenance(model_name, builder, max_new_tokens, endpoint)
    meta = store.with_suffix(".json")
    if meta.is_file():
        try:
            held = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataError(str(meta), None, None, "not the JSON that distillqa writes beside an answers store") from None
        if held != provenance:
            key = next(k for k in sorted(set(held) | set(provenance)) if held.get(k) != provenance.get(k))
            raise ConfigError(f"{store}: its answers were made with {key}={held.get(key)!r}, this run uses "
                              f"{provenance.get(key)!r}; name another file (or delete this one)")
    rows = []
    for line, row in iter_json_lines(store) if store.is_file() else ():
        for field in ("id", "prediction"):
            if not isinstance(row.get(field), str):
                raise DataError(str(store), f"line {line}", field, "missing or not a string (not an answers store?)")
        rows.append(row)
    return rows


def stored_answers(model_name: str, load_model_once, tok, builder: PromptBuilder, examples: list[QAExample],
                   max_new_tokens: int, store: Path, desc: str, endpoint: str | None = None) -> dict[str, str]:
    """Greedy answers of the model `load_model_once()` returns (or of the endpoint client it returns,
    whose URL is `endpoint`) to `examples`, by id, kept in the JSONL `store` and shared by every run
    that names it (sequence-level KD cells of one teacher, a healing run's parent answers).

    Only questions the store lacks are answered (resumably, through `store.new.jsonl`), then merged
    into it. The model, endpoint and prompt settings are kept beside it in `store.json`
    (`read_answers_store` refuses a store made with other settings). Runs that share the store answer
    one at a time (`STORE.lock`; cells of an experiment may run at once)."""
    store = Path(store)
    with file_lock(store.with_suffix(".lock")):
        rows = read_answers_store(model_name, builder, max_new_tokens, store, endpoint)
        have = {r["id"] for r in rows}
        missing = [ex for ex in examples if ex.id not in have]
        if missing:
            new = store.with_name(store.stem + ".new.jsonl")
            generate_predictions(load_model_once(), tok, builder, missing,
                                 GenerationConfig(max_new_tokens=max_new_tokens, batch_size=16), new, desc=desc)
            write_json(store.with_suffix(".json"), _provenance(model_name, builder, max_new_tokens, endpoint))
            rows += read_jsonl(new)
            write_jsonl(store, rows)
            new.unlink()
    answers = {r["id"]: r["prediction"] for r in rows}
    return {ex.id: answers[ex.id] for ex in examples}


def answer_in_batches(examples: list[QAExample], prompts: dict[str, list[int] | None], batch_size: int, answer,
                      tok, max_length: int, out_path: str | Path, desc: str) -> Path:
    """Write predictions.jsonl from `answer(chunk, batch index) -> [row fields]`, batch by batch.

    Finished batches are appended to `predictions.partial.jsonl`, so a killed run continues where
    it stopped and never answers a question twice; a prompt that is None (it did not fit) gets an
    empty prediction marked skipped."""
    out_path = Path(out_path)
    if out_path.is_file():
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_path)
    done = resume_partial(out_path)

    todo = [ex for ex in examples if prompts[ex.id] is not None]
    skipped = [ex for ex in examples if prompts[ex.id] is None]
    # A prompt that cannot fit even without its context still gets a row: an empty prediction,
    # marked skipped, which evaluate counts as missing rather than scoring it.
    if skipped:
        log.warning("%d of %d questions do not fit prompt.max_length (%d tokens) even without their context; they get no "
                    "answer and are counted as missing by evaluate", len(skipped), len(examples), max_length)
    append_jsonl(partial, [_row(ex, {"prediction": ""}, None, tok, SKIPPED) for ex in skipped if ex.id not in done])
    # Batches are fixed before anything is skipped: a resumed run pads every prompt exactly as an
    # uninterrupted run would, so its answers are the same; finished batches are not answered again.
    todo.sort(key=lambda ex: (-len(prompts[ex.id]), ex.id))
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for index, chunk in enumerate(tqdm(batches, desc=desc, unit="batch")):
        if all(ex.id in done for ex in chunk):
            continue
        fields = answer(chunk, index)
        append_jsonl(partial, [_row(ex, f, prompts[ex.id], tok) for ex, f in zip(chunk, fields) if ex.id not in done])

    finish_partial(out_path, [ex.id for ex in examples])
    return out_path


SKIPPED = "prompt too long for prompt.max_length"


def _row(ex: QAExample, answer: dict, ids: list[int] | None, tok, note: str | None = None) -> dict:
    """One predictions.jsonl row; `prompt` is the text the model saw (context truncated as it was)."""
    prompt = tok.decode(ids) if ids is not None else ""
    row = {"id": ex.id, "question": ex.question, "prompt": prompt, "prediction": answer["prediction"],
           "references": list(ex.answers)}
    if ex.context:
        row["context"] = ex.context
    if ex.choices:
        row["choices"] = list(ex.choices)
    row.update((k, v) for k, v in answer.items() if k != "prediction")
    if note:
        row["note"] = note
    if note == SKIPPED:
        row["skipped"] = True
    return row


def run_generate(cfg: GenerateConfig) -> Path:
    """Answer `cfg.split`; an output directory is reused (resumed) only for the same config.

    The output directory must be new, empty, or one `generate` wrote (it holds generate_config.yaml);
    nothing is written there until the data, the model (or the endpoint's list of models) and the
    prompt format have loaded, so a failed start leaves nothing behind."""
    out_dir = Path(cfg.output_dir)
    config_path = out_dir / "generate_config.yaml"
    predictions = out_dir / "predictions.jsonl"
    partial = partial_path(predictions)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"output_dir {out_dir} exists and is not a directory")
    if not config_path.is_file() and not is_empty(out_dir):
        raise RunDirError(f"output_dir {out_dir} exists, is not empty and holds no distillqa generate output "
                          "(generate_config.yaml); choose another output_dir")
    made = (predictions.is_file() or bool(read_partial_jsonl(partial))) if config_path.is_file() else False
    if made and changed_keys(cfg, previous_config(config_path)):
        raise RunDirError(f"{out_dir} holds predictions made with a different config; choose another output_dir or delete it")
    splits, _ = load_splits(cfg.data)
    examples = splits[cfg.split]
    if not examples:
        sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items() if name != "all")
        raise DataError(cfg.data.source, None, None, f"the {cfg.split} split is empty ({sizes} examples); "
                        "use more data, change data.split_fractions or answer the whole file with split=all")
    loglikelihood = cfg.mcq.method == "loglikelihood"
    if loglikelihood and (few := [ex.id for ex in examples if len(ex.choices) < 2]):
        raise DataError(cfg.data.source, f"id '{few[0]}'", "choices", "mcq.method=loglikelihood needs at least two "
                        f"choices per question ({len(few)} of {len(examples)} questions have fewer)")
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    if cfg.generation.endpoint:
        model = completions_client(cfg.generation.endpoint, cfg.model.name, cfg.generation, "generation.endpoint")
    else:
        model = load_model(cfg.model.name, cfg.model.precision, cfg.model.trust_remote_code)
        if loglikelihood and is_encoder_decoder(model):
            raise ConfigError("mcq.method=loglikelihood needs a causal LM; this model is an encoder-decoder")
        if torch.cuda.is_available():
            model.to("cuda")
    builder = PromptBuilder(tok, cfg.prompt.template, cfg.prompt.instruction, cfg.prompt.max_length, options=cfg.mcq.options)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(config_path, dump_config(cfg))
    if loglikelihood:
        return loglikelihood_predictions(model, tok, builder, examples, cfg.generation.batch_size, predictions)
    return generate_predictions(model, tok, builder, examples, cfg.generation, predictions)
