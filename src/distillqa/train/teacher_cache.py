"""`distillqa teacher cache`: the teacher run once over the training answers, stored sparse, so
that vanilla KD trains without loading it (`kd.teacher_cache`).

    CACHE/
      plan.json                   what is cached (teacher, tokenizer and dataset hashes, prompt, method,
                                  `cache_size`: k, tail_samples and seed, or samples and seed; dtype,
                                  shards): written first, a rerun must match it
      shards/NNNNN.safetensors    examples [start, end) of the encoded training split: `offsets`
                                  int32 [n + 1] (answer-token rows per example), `ids` int32 and `logp`
                                  (log-softmax at temperature 1, in `dtype`) [T, k], and `log_tail` [T] in
                                  `dtype` (log of 1 - the kept mass; topk) or `count` int16 [T, samples] (sampling);
                                  with topk's tail_samples, `ids` and `logp` [T, k + tail_samples]: the kept
                                  tokens, then the draws from the tail in the order drawn
      manifest.json               the plan, the vocabulary size and each shard's sha256: written last,
                                  so its presence means the cache is complete

Shards are written atomically one by one; a killed run, started again, writes only the missing
ones and ends with the same bytes (draws come from a generator seeded per example).
The answer-token rows of an example are its positions that predict answer tokens, in order: the
rows `objectives.answer_states` gives for it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from distillqa.config import CacheSettings, TeacherCacheConfig
from distillqa.data import load_splits
from distillqa.data.prompts import IGNORE, Encoded, PromptBuilder, collate_right
from distillqa.errors import ConfigError, DataError, RunDirError
from distillqa.io import atomic_path, check_claimed_dir, file_lock, write_json
from distillqa.train.objectives import answer_states, project_to_vocab

FORMAT = 1
ROWS_AT_ONCE = 64  # answer-token rows projected to the vocabulary at a time
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SIZE_KEYS = ("method", "k", "tail_samples", "samples", "seed", "dtype")  # every key `cache_size` may write


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_hash(tok) -> str:
    """The token-to-id mapping, the special tokens and the chat template."""
    return sha256_json({"vocab": sorted(tok.get_vocab().items()), "eos": tok.eos_token_id, "bos": tok.bos_token_id,
                        "pad": tok.pad_token_id, "chat_template": getattr(tok, "chat_template", None)})


def dataset_hash(examples: list[Encoded]) -> str:
    """The exact tokenised training examples, in order."""
    return sha256_json([[e.id, e.input_ids, e.labels] for e in examples])


def encode_train_split(cfg_data, cfg_prompt, tok) -> list[Encoded]:
    """The training split as KD encodes it: examples that do not fit prompt.max_length left out."""
    builder = PromptBuilder(tok, cfg_prompt.template, cfg_prompt.instruction, cfg_prompt.max_length)
    return [e for e in map(builder.encode_train, load_splits(cfg_data)[0]["train"]) if e is not None]


def cache_size(settings: CacheSettings) -> dict:
    """What of `settings` decides a cache's contents, as its plan records it."""
    if settings.method == "sampling":
        size = {"samples": settings.samples, "seed": settings.seed}
    else:  # a plain top-k cache's plan names no draws, so caches built before tail_samples existed still match
        size = {"k": settings.k, **({"tail_samples": settings.tail_samples, "seed": settings.seed} if settings.tail_samples else {})}
    return {"method": settings.method, **size, "dtype": settings.dtype}


def cache_finished(path: Path, settings: CacheSettings) -> bool:
    """Whether `path` holds a finished cache made with `settings` (one made with others is not: building it
    again refuses, naming what differs)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    size = cache_size(settings)
    return all(manifest.get(k) == size.get(k) for k in SIZE_KEYS)


def cache_plan(teacher: str, tok, prompt, data, examples: list[Encoded], settings: CacheSettings) -> dict:
    return {"format": FORMAT, "teacher": teacher, "tokenizer_hash": tokenizer_hash(tok), "dataset_hash": dataset_hash(examples),
            "prompt": prompt.model_dump(mode="json"), "data": data.model_dump(mode="json"), **cache_size(settings),
            "examples": len(examples), "shard_examples": settings.shard_examples}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_teacher_cache(cfg: TeacherCacheConfig) -> Path:
    """Build (or finish) the cache in `cfg.output_dir`; returns it."""
    from distillqa.models.registry import load_model, load_tokenizer

    tok = load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)
    examples = encode_train_split(cfg.data, cfg.prompt, tok)
    if not examples:
        raise DataError(cfg.data.source, None, None, f"no training example fits prompt.max_length ({cfg.prompt.max_length} "
                        "tokens) even without its context; raise prompt.max_length")
    if cfg.cache.method == "topk" and cfg.cache.k > len(tok):
        raise ConfigError(f"cache.k: {cfg.cache.k} is more than the teacher's {len(tok)} tokens")
    out, plan = Path(cfg.output_dir), cache_plan(cfg.teacher.name, tok, cfg.prompt, cfg.data, examples, cfg.cache)
    check_claimed_dir(out, "plan.json", "teacher cache")
    with file_lock(out / ".lock"):  # a second builder waits, then finds the shards written
        if (out / "plan.json").is_file():
            old = json.loads((out / "plan.json").read_text())
            if diff := [k for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]:
                raise RunDirError(f"{out} holds a teacher cache of something else ({', '.join(diff)} differ); "
                                  "choose another output_dir")
        if (out / "manifest.json").is_file():
            return out
        teacher = load_model(cfg.teacher.name, cfg.teacher.precision, cfg.teacher.trust_remote_code).eval()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher.to(device)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        if cfg.cache.method == "topk" and cfg.cache.tail_samples and cfg.cache.k >= vocab:
            raise ConfigError(f"cache.tail_samples: cache.k={cfg.cache.k} keeps every one of the teacher's {vocab} "
                              "output tokens, so there is no tail to draw from; set cache.tail_samples=0")
        write_json(out / "plan.json", plan)
        starts = range(0, len(examples), cfg.cache.shard_examples)
        shards = [(i, a, min(a + cfg.cache.shard_examples, len(examples))) for i, a in enumerate(starts)]
        missing = [s for s in shards if not (out / "shards" / f"{s[0]:05d}.safetensors").is_file()]
        bar = tqdm(total=len(examples), initial=len(examples) - sum(b - a for _, a, b in missing), unit="example",
                   desc=f"teacher cache {out.name}")
        for i, a, b in missing:
            tensors = shard_tensors(teacher, examples[a:b], a, cfg.cache, tok.pad_token_id, device, bar)
            with atomic_path(out / "shards" / f"{i:05d}.safetensors") as tmp:
                save_file(tensors, str(tmp))
        bar.close()
        entries = [{"file": f"shards/{i:05d}.safetensors", "start": a, "end": b,
                    "sha256": sha256_file(out / "shards" / f"{i:05d}.safetensors")} for i, a, b in shards]
        write_json(out / "manifest.json", {**plan, "vocab_size": vocab, "shards": entries})
    return out


@torch.no_grad()
def shard_tensors(teacher, examples: list[Encoded], first: int, settings: CacheSettings, pad_id: int, device, bar) -> dict:
    """The teacher's sparse targets for `examples` (the first being example number `first`)."""
    parts: dict[str, list[torch.Tensor]] = {}
    counts = []
    for start in range(0, len(examples), settings.batch_size):
        chunk = examples[start : start + settings.batch_size]
        batch = {k: v.to(device) for k, v in collate_right(chunk, pad_id).items()}
        hidden, _ = answer_states(teacher, batch)
        per_example = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        for j, rows in enumerate(hidden.split(per_example)):
            generator = torch.Generator(device).manual_seed((settings.seed * 2**32 + first + start + j) % 2**63)
            for part in rows.split(ROWS_AT_ONCE):
                logp = torch.log_softmax(project_to_vocab(teacher, part), dim=-1)
                for k, v in sparse_targets(logp, settings, generator).items():
                    parts.setdefault(k, []).append(v.cpu())
        counts += per_example
        bar.update(len(chunk))
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    for key in ("logp", "log_tail"):  # the tail as precise as the kept log-probabilities (and 2 bytes a token at 16 bits)
        if key in tensors:
            tensors[key] = tensors[key].to(DTYPES[settings.dtype])
    tensors["offsets"] = torch.tensor([0, *counts]).cumsum(0).int()
    return tensors


def sparse_targets(logp: torch.Tensor, settings: CacheSettings, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per row of teacher log-probabilities [n, V]: the kept ids and their log-probabilities, and the
    log tail mass (topk; followed by the draws from the tail with tail_samples) or the draw counts (sampling)."""
    if settings.method == "topk":
        kept, ids = logp.topk(settings.k, dim=-1)
        tail = logp.scatter(-1, ids, float("-inf"))
        log_tail = tail.logsumexp(-1)  # -inf when every token is kept
        if settings.tail_samples:  # softmax renormalises the tail stably, however little mass it has
            draws = torch.multinomial(tail.softmax(-1), settings.tail_samples, replacement=True, generator=generator)
            ids, kept = torch.cat([ids, draws], -1), torch.cat([kept, logp.gather(-1, draws)], -1)
        return {"ids": ids.int(), "logp": kept, "log_tail": log_tail}
    draws = torch.multinomial(logp.exp(), settings.samples, replacement=True, generator=generator)
    counts = torch.zeros_like(logp).scatter_add_(-1, draws, torch.ones_like(draws, dtype=logp.dtype))
    count, ids = counts.topk(settings.samples, dim=-1)
    ids = torch.where(count > 0, ids, ids[:, :1])  # unused slots: the first token again, with count 0
    return {"ids": ids.int(), "logp": logp.gather(-1, ids), "count": count.to(torch.int16)}


class TeacherCache:
    """A finished teacher cache, read by example index. Every shard's checksum is verified on opening."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            hint = " (unfinished: run `distillqa teacher cache` again to finish it)" if (self.path / "plan.json").is_file() else ""
            raise ConfigError(f"kd.teacher_cache: {self.path} holds no manifest.json, so it is not a finished teacher cache{hint}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"kd.teacher_cache: {self.path}/manifest.json cannot be read ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"kd.teacher_cache: {self.path} is a cache of format {self.manifest.get('format')}, this "
                              f"version reads format {FORMAT}; build it again")
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not file.is_file() or sha256_file(file) != shard["sha256"]:
                raise DataError(str(file), None, None, "missing or damaged: its sha256 is not the manifest's; "
                                "delete it and run `distillqa teacher cache` again to rewrite it")
        self.starts = [s["start"] for s in self.manifest["shards"]]
        self.open_shards: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.manifest["examples"]

    def check(self, teacher: str, tok, prompt, examples: list[Encoded]) -> None:
        """Refuse, naming the first field that differs, a cache not made for this teacher, tokenizer, prompt and data."""
        mine = {"teacher": teacher, "tokenizer_hash": tokenizer_hash(tok),
                **{f"prompt.{k}": v for k, v in prompt.model_dump(mode="json").items()}, "dataset_hash": dataset_hash(examples)}
        theirs = {**self.manifest, **{f"prompt.{k}": v for k, v in self.manifest["prompt"].items()}}
        for field, value in mine.items():
            if theirs.get(field) != value:
                raise ConfigError(f"kd.teacher_cache: {self.path} does not match this run: {field} differs (cache: "
                                  f"{short(theirs.get(field))}, run: {short(value)})")

    def shard(self, n: int) -> tuple:
        if n not in self.open_shards:
            handle = safe_open(str(self.path / self.manifest["shards"][n]["file"]), framework="pt")
            self.open_shards[n] = (handle, handle.get_tensor("offsets").tolist())
        return self.open_shards[n]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Example `index`'s targets: ids (long), logp [A, k], and log_tail [A] or weight [A, samples]; with
        tail draws ids and logp [A, k + tail_samples], log_tail, and the weight of each column (`tail_weights`)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        n = bisect.bisect_right(self.starts, index) - 1
        handle, offsets = self.shard(n)
        a, b = offsets[index - self.starts[n]], offsets[index - self.starts[n] + 1]
        row = {k: handle.get_slice(k)[a:b] for k in handle.keys() if k != "offsets"}
        row["ids"] = row["ids"].long()
        if "count" in row:
            row["weight"] = row.pop("count").float() / self.manifest["samples"]
        if self.manifest.get("tail_samples"):
            row["weight"] = tail_weights(row["logp"], row["log_tail"], self.manifest["k"])
        return row


def tail_weights(logp: torch.Tensor, log_tail: torch.Tensor, k: int) -> torch.Tensor:
    """Weights [A, k + S] of a top-k cache with S tail draws: p_v for the k kept tokens, p_tail / S for
    each draw. A tail token's expected weight is S x (p_v / p_tail) x p_tail / S = p_v, and each row's
    weights sum to 1, so `SampledKL` over them is an unbiased forward KL."""
    draws = logp.shape[-1] - k
    return torch.cat([logp[:, :k].float().exp(), (log_tail.float().exp() / draws)[:, None].expand(-1, draws)], -1)


def short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def collate_cached(items: list[tuple[Encoded, int]], pad_id: int, cache: TeacherCache) -> dict[str, torch.Tensor]:
    """A training batch whose `cache_*` tensors hold the cached targets of its answer tokens, in the
    order `answer_states` gives them (example by example)."""
    batch = collate_right([e for e, _ in items], pad_id)
    rows = [cache[i] for _, i in items]
    batch.update({f"cache_{k}": torch.cat([r[k] for r in rows]) for k in rows[0]})
    return batch
