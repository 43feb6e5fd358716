"""`distillqa study create`: a blinded rating study from the explanations of one or more runs.

    STUDY/
      study.json        design: scales, targets, items per rater, attention checks, exclusion rule,
                        completion code, admin password hash (scrypt)
      items.jsonl       the items raters see: opaque id, condition code, question, choices, predicted
                        answer, explanation (nothing says which model wrote it)
      conditions.json   the key to the blinding: condition code -> name and source files
      secret.key        random key for cookies, CSRF tokens, rater links and export hashes (mode 0600)
      links.txt         per-rater token links (only with --tokens N)

Sources are the `answers/CELL/study.jsonl` files of `distillqa rationales experiment`. The
condition of a cell is its name without the seed (`mt_revised_seed1` -> `mt_revised`), so the
seeds of a method pool into one condition; `NAME=PATH` names a condition yourself.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from distillqa.data.readers import check_data_file, iter_json_lines
from distillqa.errors import ConfigError, DataError, RunDirError
from distillqa.study.security import Keys, hash_password

FORMAT = "distillqa-study/1"
SCALES = {  # name -> the statement raters agree or disagree with (1 = strongly disagree, 5 = strongly agree)
    "plausibility": "The explanation is plausible: it could be true.",
    "understandability": "The explanation is easy to understand.",
    "completeness": "The explanation is complete: it gives everything needed to reach the answer.",
    "satisfaction": "I am satisfied with this explanation.",
    "contrastiveness": "The explanation says why this answer was chosen and not one of the others.",
}
SCALE_LABELS = {"1": "strongly disagree", "2": "disagree", "3": "neither", "4": "agree", "5": "strongly agree"}
# Instructed-response checks: each asks for one value on one scale, never the neutral midpoint, so
# a rater who clicks the middle or the same column everywhere fails them.
ATTENTION_CHECKS = [
    {"id": "check-completeness-2", "scale": "completeness", "value": 2, "question": "Which of these is a colour?",
     "choices": ["table", "green", "river"], "predicted": "green",
     "explanation": "This item checks attention. Whatever you think of it, choose 2 (disagree) for the statement "
                    "about completeness, and any answer for the other statements."},
    {"id": "check-plausibility-5", "scale": "plausibility", "value": 5, "question": "Where do fish usually live?",
     "choices": ["in water", "in trees", "in the desert"], "predicted": "in water",
     "explanation": "Please show that you read the explanations: choose 5 (strongly agree) for the statement about "
                    "plausibility, and any answer for the other statements."},
    {"id": "check-understandability-1", "scale": "understandability", "value": 1, "question": "What do people use to open a locked door?",
     "choices": ["a key", "a spoon", "a cloud"], "predicted": "a key",
     "explanation": "To show that you are paying attention, choose 1 (strongly disagree) for the statement about "
                    "being easy to understand, and any answer for the other statements."},
    {"id": "check-satisfaction-4", "scale": "satisfaction", "value": 4, "question": "Which animal says 'moo'?",
     "choices": ["a cat", "a cow", "a bird"], "predicted": "a cow",
     "explanation": "This is an attention check: choose 4 (agree) for the statement about being satisfied, and any "
                    "answer for the other statements."},
]
SEED_SUFFIX = re.compile(r"_seed\d+$")
ITEM_FIELDS = ("id", "question", "choices", "predicted", "explanation")


@dataclass
class StudyOptions:
    items_per_condition: int = 20
    target_ratings: int = 3
    items_per_rater: int = 12
    attention_checks: int = 2
    exclude_if_failed_checks: int = 1
    timeout_minutes: float = 45.0
    seed: int = 0
    completion_code: str | None = None
    tokens: int = 0
    title: str = "Rating explanations"

    def check(self) -> None:
        for key in ("items_per_condition", "target_ratings", "items_per_rater"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')}: must be at least 1")
        if not 2 <= self.attention_checks <= len(ATTENTION_CHECKS):
            raise ConfigError(f"attention-checks: must be between 2 and {len(ATTENTION_CHECKS)}")
        if not 1 <= self.exclude_if_failed_checks <= self.attention_checks:
            raise ConfigError("exclude-if-failed-checks: must be between 1 and the number of attention checks")
        if self.timeout_minutes <= 0:
            raise ConfigError("timeout-minutes: must be positive")
        if self.completion_code is not None and not re.fullmatch(r"[A-Za-z0-9_-]{4,64}", self.completion_code):
            raise ConfigError("completion-code: 4 to 64 letters, digits, '-' or '_'")


def expand_sources(sources: list[str]) -> dict[str, list[Path]]:
    """Condition name -> study.jsonl files, from files, cell directories, experiment directories or NAME=PATH."""
    conditions: dict[str, list[Path]] = {}
    for source in sources:
        name, _, path = source.rpartition("=") if "=" in source else ("", "", source)
        path = Path(path)
        if (path / "answers").is_dir():  # a rationale experiment: every cell
            files = sorted((path / "answers").glob("*/study.jsonl"))
            if not files:
                raise DataError(str(path), None, None, "no answers/CELL/study.jsonl; finish `distillqa rationales experiment` first")
        elif path.is_dir():
            files = [path / "study.jsonl"]
        else:
            files = [path]
        for f in files:
            check_data_file(f)
            cond = name or SEED_SUFFIX.sub("", f.parent.name)
            conditions.setdefault(cond, []).append(f)
    return conditions


def read_study_rows(path: Path) -> list[dict]:
    """The rows of one study.jsonl, each checked to have what a rater needs to see."""
    rows = []
    for lineno, row in iter_json_lines(path):
        where = f"line {lineno}"
        for key in ITEM_FIELDS:
            if key not in row:
                raise DataError(str(path), where, key, "missing")
        for key in ("id", "question", "explanation"):
            if not isinstance(row[key], str):
                raise DataError(str(path), where, key, "must be a string")
        if not isinstance(row["choices"], list) or not all(isinstance(c, str) for c in row["choices"]):
            raise DataError(str(path), where, "choices", "must be a list of strings")
        if row["predicted"] is not None and not isinstance(row["predicted"], str):
            raise DataError(str(path), where, "predicted", "must be a string or null")
        rows.append(row)
    return rows


def sample_items(conditions: dict[str, list[dict]], n: int, rng: random.Random) -> dict[str, list[dict]]:
    """N rows per condition, the same questions in every condition where they share enough of them
    (so question difficulty is balanced across conditions), the rest drawn at random."""
    shared = sorted(set.intersection(*({r["id"] for r in rows} for rows in conditions.values())))
    rng.shuffle(shared)
    picked = {}
    for cond, rows in conditions.items():
        by_id = {}
        for r in rows:  # pooled seeds: one row per question, drawn at random
            by_id.setdefault(r["id"], []).append(r)
        order = shared + sorted(set(by_id) - set(shared), key=lambda _: rng.random())
        if len(order) < n:
            raise ConfigError(f"items-per-condition: condition '{cond}' has {len(order)} question(s) with an "
                              f"explanation; {n} are needed")
        picked[cond] = [rng.choice(by_id[q]) for q in order[:n]]
    return picked


def create_study(sources: list[str], out: Path, password: str, opts: StudyOptions) -> dict:
    """Write the study into the (new, empty) directory `out`; returns a summary to print."""
    opts.check()
    password_hash = hash_password(password)
    files = expand_sources(sources)
    rows, dropped = {}, 0
    for cond, paths in files.items():
        all_rows = [r for p in paths for r in read_study_rows(p)]
        rows[cond] = [r for r in all_rows if r["explanation"].strip()]
        dropped += len(all_rows) - len(rows[cond])
    if len(rows) < 2:
        raise ConfigError(f"a study compares conditions: found {len(rows)} ({', '.join(rows) or 'none'}); give at least two")
    if opts.items_per_rater > len(rows) * opts.items_per_condition:
        raise ConfigError(f"items-per-rater ({opts.items_per_rater}) is more than the study's "
                          f"{len(rows) * opts.items_per_condition} items")
    rng = random.Random(opts.seed)
    picked = sample_items(rows, opts.items_per_condition, rng)
    names = list(picked)
    rng.shuffle(names)  # condition codes in random order: C1 is not the first source
    codes = {name: f"C{k + 1}" for k, name in enumerate(names)}
    items = []
    for cond, chosen in picked.items():
        for r in chosen:
            items.append({"id": "i-" + secrets.token_hex(6), "condition": codes[cond], "question_id": r["id"],
                          "question": r["question"], "choices": r["choices"], "predicted": r["predicted"],
                          "explanation": r["explanation"].strip()})
    rng.shuffle(items)
    secret = secrets.token_bytes(32)
    design = {"format": FORMAT, "title": opts.title, "scales": SCALES, "scale_labels": SCALE_LABELS,
              "target_ratings": opts.target_ratings, "items_per_rater": opts.items_per_rater,
              "attention_checks_per_rater": opts.attention_checks, "attention_checks": ATTENTION_CHECKS,
              "exclude_if_failed_checks": opts.exclude_if_failed_checks, "timeout_minutes": opts.timeout_minutes,
              "seed": opts.seed, "completion_code": opts.completion_code or secrets.token_hex(4).upper(),
              "admin_password": password_hash}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(design, indent=1) + "\n", encoding="utf-8")
    (out / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    (out / "conditions.json").write_text(json.dumps(
        {codes[c]: {"name": c, "sources": [str(p) for p in files[c]]} for c in names}, indent=1) + "\n", encoding="utf-8")
    key_file = out / "secret.key"
    key_file.write_bytes(secret)
    os.chmod(key_file, 0o600)
    if opts.tokens:
        keys = Keys(secret)
        (out / "links.txt").write_text("".join(f"/t/{keys.rater_token(n)}\n" for n in range(1, opts.tokens + 1)))
    slots = len(items) * opts.target_ratings
    return {"conditions": {codes[c]: c for c in names}, "items": len(items), "dropped_empty": dropped,
            "raters_needed": -(-slots // opts.items_per_rater), "completion_code": design["completion_code"]}


@dataclass
class Study:
    """A study directory as the server and the analysis read it."""

    path: Path
    design: dict
    items: dict[str, dict]
    conditions: dict[str, dict]
    keys: Keys

    @property
    def checks(self) -> dict[str, dict]:
        return {c["id"]: c for c in self.design["attention_checks"]}

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        path = Path(path)
        if not (path / "study.json").is_file():
            raise RunDirError(f"{path} is not a study directory (no study.json); make one with `distillqa study create`")
        try:
            design = json.loads((path / "study.json").read_text(encoding="utf-8"))
            conditions = json.loads((path / "conditions.json").read_text(encoding="utf-8"))
            items = {r["id"]: r for _, r in iter_json_lines(path / "items.jsonl")}
            secret = (path / "secret.key").read_bytes()
            if design.get("format") != FORMAT or not items or len(secret) < 16:
                raise ValueError(f"not a {FORMAT} study")
            for item in items.values():
                if item["condition"] not in conditions:
                    raise ValueError(f"item {item['id']} has unknown condition {item['condition']!r}")
        except (OSError, ValueError, KeyError, TypeError, DataError) as e:
            raise RunDirError(f"{path}: the study files are damaged ({str(e).splitlines()[0]})") from None
        return cls(path, design, items, conditions, Keys(secret))
