"""`distillqa experiment run`: every stage of the grid, once, resumably, then the report.

    EXP/
      experiment.yaml            the resolved config (a rerun with another config is refused)
      .lock                      held while a runner works here (a second runner is refused)
      sft/teacher-NAME/, sft/student/      SFT runs, shared by every cell that needs them
      cells/CELL/                distillation runs
      rows/ROW/                  predictions.jsonl, scores.jsonl, summary.json of each row
      results/, report.md, report.html, plots/     written by `experiment report`

Each stage is skipped when its output is complete and resumed when it is not (training from
its newest checkpoint, generation from its last finished batch, evaluation from its last
metric), so a runner killed at any moment and started again ends with the same results.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import yaml
from pydantic import BaseModel

from distillqa.config import (DistillConfig, ExperimentConfig, GenerateConfig, ModelConfig, SFTConfig, dump_config)
from distillqa.errors import RunDirError
from distillqa.experiment.grid import STUDENT_SFT_DIR, Row, plan_hypotheses, plan_rows, teacher_sft_dir
from distillqa.io import write_json, write_text
from distillqa.train.run_dir import RunDir, diff_keys


@contextmanager
def experiment_lock(exp: Path) -> Iterator[None]:
    """Hold EXP/.lock for the whole run; the OS releases it when the process dies (kill -9 too)."""
    exp.mkdir(parents=True, exist_ok=True)
    fd = os.open(exp / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(f"{exp} is in use by another experiment runner (pid {holder}); wait for it to finish "
                              "or stop it, then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def check_config(exp: Path, cfg: BaseModel, mutable: tuple[str, ...] = ("stats.",)) -> None:
    """Write experiment.yaml, or refuse if the directory holds an experiment with another config.
    Only keys starting with a `mutable` prefix may change between runs: they affect the
    statistics, which are recomputed, and nothing else."""
    path, text = exp / "experiment.yaml", dump_config(cfg)
    if path.is_file():
        diff = [k for k in diff_keys(yaml.safe_load(path.read_text()), yaml.safe_load(text)) if not k.startswith(mutable)]
        if diff:
            raise RunDirError(f"{exp} holds an experiment with a different config ({', '.join(diff)}); "
                              "choose another output_dir or delete it")
    write_text(path, text)


def vocabularies(cfg: ExperimentConfig) -> dict[str, bool]:
    """teacher name -> shares the student's tokenizer."""
    from distillqa.models.registry import load_tokenizer
    from distillqa.train.distill import same_tokenizer

    student = load_tokenizer(cfg.grid.student.name, cfg.grid.student.trust_remote_code)
    return {t.name: same_tokenizer(load_tokenizer(t.name), student) for t in cfg.grid.teachers}


class Stage:
    def __init__(self, label: str, done: Callable[[], bool], run: Callable[[], object]):
        self.label, self.done, self.run = label, done, run


def teacher_model(exp: Path, teacher: str, state: str) -> str:
    """The teacher as a row or a cell uses it: its SFT run, or the model itself."""
    return str(exp / teacher_sft_dir(teacher)) if state == "sft" else teacher


def student_model(cfg: ExperimentConfig, exp: Path, state: str) -> str:
    return str(exp / STUDENT_SFT_DIR) if state == "sft" else cfg.grid.student.name


def row_model(cfg: ExperimentConfig, exp: Path, row: Row) -> str:
    f = row.factors
    if row.kind == "teacher":
        return teacher_model(exp, f["teacher"], f["teacher_state"])
    if row.kind == "student":
        return student_model(cfg, exp, f["student_state"])
    return str(exp / "cells" / row.name)


def plan_stages(cfg: ExperimentConfig, exp: Path, rows: list[Row]) -> list[tuple[str, list[Stage]]]:
    """(row name, its stages) in run order; SFT stages come first, under the pseudo-row 'sft'."""
    from distillqa.generate import run_generate
    from distillqa.metrics.evaluate import evaluate_predictions
    from distillqa.metrics.registry import resolve_metrics
    from distillqa.metrics.settings import EvalSettings
    from distillqa.train.distill import run_distill
    from distillqa.train.sft import run_sft

    shared = dict(data=cfg.data, prompt=cfg.prompt)
    student = cfg.grid.student

    def training(kind: str, run_cfg, runner) -> Stage:
        path = Path(run_cfg.output_dir)
        return Stage(f"{kind} {path.relative_to(exp)}", lambda: RunDir(path).finished,
                     lambda: runner(run_cfg, resume=(path / "run.json").is_file()))

    sft_stages = []
    if "sft" in cfg.grid.teacher_states:
        for t in cfg.grid.teachers:
            sft_stages.append(training("sft", SFTConfig(model=ModelConfig(name=t.name), lora=cfg.sft.lora, train=cfg.sft.train,
                                                        output_dir=str(exp / teacher_sft_dir(t.name)), **shared), run_sft))
    if "sft" in cfg.grid.student_states:
        sft_stages.append(training("sft", SFTConfig(model=student, lora=cfg.sft.lora, train=cfg.sft.train,
                                                    output_dir=str(exp / STUDENT_SFT_DIR), **shared), run_sft))

    settings = EvalSettings(cfg.evaluate.embedding_model, cfg.evaluate.bertscore_layers, cfg.evaluate.batch_size)
    metric_names = [m.name for m in resolve_metrics(cfg.evaluate.metrics)]
    plan = [("sft", sft_stages)]
    for row in rows:
        stages = []
        if row.kind == "cell":
            f = row.factors
            stages.append(training("distill", DistillConfig(
                teacher=ModelConfig(name=teacher_model(exp, f["teacher"], f["teacher_state"])),
                student=student.model_copy(update={"name": student_model(cfg, exp, f["student_state"])}), lora=cfg.distill.lora,
                train=cfg.distill.train, kd=cfg.distill.kd.model_copy(update={"algorithm": f["algorithm"]}),
                output_dir=str(exp / "cells" / row.name), **shared), run_distill))
        out = exp / "rows" / row.name
        gen = GenerateConfig(model=student.model_copy(update={"name": row_model(cfg, exp, row)}) if row.kind != "teacher"
                             else ModelConfig(name=row_model(cfg, exp, row)),
                             generation=cfg.generation, split="test", output_dir=str(out), **shared)
        stages.append(Stage(f"generate {row.name}", (out / "predictions.jsonl").is_file, lambda gen=gen: run_generate(gen)))
        stages.append(Stage(f"evaluate {row.name}", lambda out=out: _scored(out, metric_names),
                            lambda out=out: evaluate_predictions(out, cfg.evaluate, settings=settings)))
        plan.append((row.name, stages))
    return plan


def _scored(out: Path, metrics: list[str]) -> bool:
    import json

    summary = out / "summary.json"
    return summary.is_file() and set(metrics) <= set(json.loads(summary.read_text())["metrics"])


def run_experiment(cfg: ExperimentConfig, echo: Callable[[str], None] | None = None) -> Path:
    """Run every unfinished stage, then write the report; returns the experiment directory."""
    from distillqa.experiment.report import write_report

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    exp = Path(cfg.output_dir)
    rows = plan_rows(cfg, vocabularies(cfg))  # an invalid grid fails here, before the directory is claimed
    hypotheses = plan_hypotheses(cfg, rows)
    with experiment_lock(exp):
        check_config(exp, cfg)
        write_json(exp / "plan.json", {"rows": [{"name": r.name, "kind": r.kind, "factors": r.factors} for r in rows],
                                       "hypotheses": [asdict(h) for h in hypotheses]})
        plan = plan_stages(cfg, exp, rows)
        total = len(rows)
        done_rows = sum(all(s.done() for s in stages) for name, stages in plan if name != "sft")
        started = time.monotonic()
        for row_name, stages in plan:
            pending = [stage for stage in stages if not stage.done()]
            for stage in pending:
                minutes = (time.monotonic() - started) / 60
                echo(f"[experiment] rows {done_rows}/{total} done, {minutes:.1f} min: {stage.label}")
                stage.run()
            done_rows += bool(pending) and row_name != "sft"
        echo(f"[experiment] rows {total}/{total} done in {(time.monotonic() - started) / 60:.1f} min; writing the report")
        report = write_report(exp)
    echo(f"[experiment] report: {report}")
    return exp
