"""`distillqa rationales generate`: a teacher writes rationales, critique-revised rationales and
counterfactual rationales for multiple-choice questions.

- rationale: the teacher sees the instruction, the few-shot demonstrations and the question
  with its gold answer; the first line of its reply is kept;
- revised: `revisions` instruction pairs are sampled per question (seeded by id); for each, the
  teacher critiques the current rationale, then rewrites it following the paired revision
  instruction (first line kept); the last rewrite is the revised rationale;
- counterfactuals: the rationale prompt once per choice, with that choice as the answer.

The teacher is any model name (run locally) or an OpenAI-compatible endpoint: a chat client
(`clients.py`, as the judge metrics use), with its reply cache, concurrency and retries. Questions are done
`batch_size` at a time, each batch's rows appended to OUTPUT.partial.jsonl, which is renamed to
OUTPUT when all are done: a killed run continues with the questions it has not written, and
the reply cache means no prompt is sent twice. Every row records its provenance.
"""

from __future__ import annotations

import hashlib
import random
from importlib.resources import files
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from distillqa.clients import make_client
from distillqa.config import dump_config
from distillqa.config_changes import changed_keys, previous_config
from distillqa.data import load_examples
from distillqa.data.records import QAExample
from distillqa.errors import ConfigError, RunDirError
from distillqa.io import append_jsonl, finish_partial, is_empty, partial_path, read_partial_jsonl, resume_partial, write_text
from distillqa.rationales.config import RationaleGenerateConfig


def load_templates(version: str) -> dict:
    path = files("distillqa.rationales") / "templates" / f"{version}.yaml"
    if not path.is_file():
        raise ConfigError(f"templates: no template version '{version}' (have: "
                          f"{', '.join(p.name[:-5] for p in (files('distillqa.rationales') / 'templates').iterdir())})")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def first_line(reply: str) -> str:
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


class Prompts:
    def __init__(self, templates: dict):
        self.t = templates

    def _item(self, question: str, choices, answer: str, rationale: str = "") -> str:
        return self.t["rationale_item"].format(question=question, choices="; ".join(choices), answer=answer,
                                               rationale=f" {rationale}" if rationale else "")

    def rationale(self, ex: QAExample, answer: str) -> str:
        demos = [self._item(d["question"], d["choices"], d["answer"], d["rationale"]) for d in self.t["demonstrations"]]
        return "\n\n".join([self.t["rationale_instruction"], *demos, self._item(ex.question, ex.choices, answer)])

    def critique(self, ex: QAExample, rationale: str, pair: dict) -> str:
        return self.t["critique_prompt"].format(question=ex.question, choices="; ".join(ex.choices), answer=ex.answers[0],
                                                rationale=rationale, critique=pair["critique"])

    def revision(self, ex: QAExample, rationale: str, pair: dict, critique_reply: str) -> str:
        return self.t["revision_prompt"].format(question=ex.question, choices="; ".join(ex.choices), answer=ex.answers[0],
                                                rationale=rationale, critique_reply=critique_reply, revision=pair["revision"])

    def pairs_for(self, ex: QAExample, k: int, seed: int) -> list[dict]:
        rng = random.Random(int(hashlib.sha256(f"{seed}:{ex.id}".encode()).hexdigest(), 16))
        return rng.sample(self.t["instruction_pairs"], min(k, len(self.t["instruction_pairs"])))


def generate_batch_rows(teacher, prompts: Prompts, batch: list[QAExample], cfg: RationaleGenerateConfig,
                        provenance: dict) -> list[dict]:
    """All texts of a batch of questions, each stage one batched call to the teacher."""
    gold = [first_line(r) for r in teacher.complete_many([prompts.rationale(ex, ex.answers[0]) for ex in batch])]
    rows = [{"id": ex.id, "question": ex.question, "choices": list(ex.choices), "answer": ex.answers[0], "rationale": g}
            for ex, g in zip(batch, gold)]
    if "revised" in cfg.kinds:
        pairs = [prompts.pairs_for(ex, cfg.revisions, cfg.seed) for ex in batch]
        current = list(gold)
        for step in range(max(len(p) for p in pairs)):
            live = [i for i, p in enumerate(pairs) if step < len(p)]
            critiques = teacher.complete_many([prompts.critique(batch[i], current[i], pairs[i][step]) for i in live])
            revised = teacher.complete_many([prompts.revision(batch[i], current[i], pairs[i][step], c.strip())
                                             for i, c in zip(live, critiques)])
            for i, r in zip(live, revised):
                current[i] = first_line(r) or current[i]  # an empty rewrite keeps the rationale it was asked to improve
        for row, r, p in zip(rows, current, pairs):
            row["revised_rationale"] = r
            row["revision_instructions"] = [pair["revision"] for pair in p]
    if "counterfactual" in cfg.kinds:
        flat = [(i, c) for i, ex in enumerate(batch) for c in ex.choices]
        replies = teacher.complete_many([prompts.rationale(batch[i], c) for i, c in flat])
        for row in rows:
            row["counterfactuals"] = []
        for (i, _), reply in zip(flat, replies):
            rows[i]["counterfactuals"].append(first_line(reply))
    for row in rows:
        row["provenance"] = provenance
    return rows


def run_rationale_generate(cfg: RationaleGenerateConfig) -> Path:
    if not (cfg.teacher.local_model or cfg.teacher.url):
        raise ConfigError("teacher: set teacher.local_model (a model name) or teacher.url and teacher.model (an endpoint)")
    out = Path(cfg.output)
    config_path = out.with_name(out.stem + ".config.yaml")
    partial = partial_path(out)
    if out.is_dir() or out.is_symlink():
        raise RunDirError(f"output {out} is a directory or a link; give a file name such as {out}/rationales.jsonl")
    if not config_path.is_file() and not (is_empty(out) and is_empty(partial)):
        raise RunDirError(f"output {out} already exists and was not written by distillqa rationales generate "
                          f"(no {config_path.name} beside it); choose another output")
    made = out.is_file() or bool(read_partial_jsonl(partial))
    if made and changed_keys(cfg, previous_config(config_path)):
        raise RunDirError(f"{out} was generated with a different config ({config_path}); choose another output")
    if out.is_file():
        return out
    examples, _ = load_examples(cfg.data.source, cfg.data.format, explanations=cfg.data.explanations)
    examples = [ex for ex in examples if ex.choices][: cfg.limit]
    if not examples:
        raise ConfigError(f"data.source: {cfg.data.source} has no multiple-choice questions")
    templates = load_templates(cfg.templates)
    teacher = make_client(cfg.teacher)
    write_text(config_path, dump_config(cfg))  # only once the data and the teacher are ready: a failed start leaves nothing
    provenance = {"teacher": cfg.teacher.local_model or f"{cfg.teacher.model} at {cfg.teacher.url}",
                  "template_version": templates["version"],
                  "decoding": {"max_tokens": cfg.teacher.max_tokens, "greedy": True}, "revisions": cfg.revisions,
                  "seed": cfg.seed}
    done = resume_partial(out)
    todo = [ex for ex in examples if ex.id not in done]
    prompts = Prompts(templates)
    for start in tqdm(range(0, len(todo), cfg.batch_size), desc="rationales", unit="batch"):
        append_jsonl(partial, generate_batch_rows(teacher, prompts, todo[start : start + cfg.batch_size], cfg, provenance))
    finish_partial(out, [ex.id for ex in examples])
    return out
