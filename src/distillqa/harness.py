"""lm-evaluation-harness (`lm_eval`, the optional `harness` extra) for any distillqa model, and
distillqa's multiple-choice files as lm-eval tasks.

- `run_harness`: the model is loaded the distillqa way (registry name, run directory with its
  adapter merged, pruned student, local directory) and handed to lm-eval's Hugging Face model
  class as a ready model, so every lm-eval task runs on it; results.json holds lm-eval's results.
- `export_task`: a data file's multiple-choice questions become a local task directory
  (NAME.jsonl + NAME.yaml, `output_type: multiple_choice`) whose prompt is distillqa's plain
  template and whose choices are what distillqa's log-likelihood scoring scores, so lm-eval's acc
  and acc_norm on it are distillqa's `acc` and `acc_norm` with `prompt.template=plain`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from distillqa.config import DataConfig
from distillqa.errors import ConfigError, DataError

INSTALL_HINT = "this command needs lm-evaluation-harness: pip install -e '.[harness]' (or pip install lm-eval)"


def require_lm_eval() -> None:
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        raise ConfigError(INSTALL_HINT)


def run_harness(model_name: str, tasks: list[str], out: Path, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, precision: str = "auto",
                trust_remote_code: bool = False) -> dict:
    """Evaluate `model_name` on lm-eval `tasks` (names, or tasks found under `include_path`); writes
    out/results.json (lm-eval's results, per-task configs and versions) and out/samples_TASK.jsonl."""
    require_lm_eval()
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or under {include_path}" if include_path else ""
        raise ConfigError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}; none such among lm-eval's tasks{where} "
                          "(`distillqa harness export` writes a task directory from a data file)")
    from distillqa.models.registry import load_model, load_tokenizer

    tok = load_tokenizer(model_name, trust_remote_code)
    model = load_model(model_name, precision, trust_remote_code)
    if torch.cuda.is_available():
        model.to("cuda")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    results = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                        log_samples=True, bootstrap_iters=1000)
    samples = results.pop("samples", {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": model_name, **results}, indent=2, default=str), encoding="utf-8")
    for task, rows in samples.items():
        (out / f"samples_{task}.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")
    return results


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index. Indexing its ~15,000 built-in task files takes a minute on a CPU, so
    tasks that are all found under `include_path` are looked up there alone."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def export_task(data: DataConfig, split: str, name: str, out: Path, final: Path, instruction: str = "",
                options: str = "hidden") -> int:
    """Write the multiple-choice questions of `data` (`split`) as the lm-eval task `name` into `out`,
    a directory that will be moved to `final` (the task file names its questions file by absolute
    path there); returns the number of questions. Each line holds the prompt (`query`), the texts
    scored after it (`choices`) and the index of the correct one (`gold`)."""
    from distillqa.data import load_splits
    from distillqa.data.prompts import PLAIN_ANSWER, scored_choices, user_text

    examples = load_splits(data)[0][split]
    rows = []
    for ex in examples:
        where = f"id '{ex.id}'"
        if len(ex.choices) < 2:
            raise DataError(data.source, where, "choices", "an lm-eval multiple-choice task needs at least two choices per question")
        gold = [i for i, c in enumerate(ex.choices) if c in ex.answers]
        if len(gold) != 1:
            raise DataError(data.source, where, "answers", f"exactly one choice must be a reference answer ({len(gold)} are)")
        rows.append({"id": ex.id, "query": user_text(ex, ex.context, instruction, options) + PLAIN_ANSWER,
                     "choices": scored_choices(ex, options), "gold": gold[0]})
    if not rows:
        raise DataError(data.source, None, None, f"the {split} split is empty")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = {
        "task": name,
        # lm-eval reads the questions through the `datasets` JSON loader: no hub access.
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str((final / f"{name}.jsonl").resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "source": data.source, "split": split, "options": options, "exported_by": "distillqa"},
    }
    (out / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return len(rows)
