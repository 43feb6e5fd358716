"""`distillqa experiment run`: every stage of the grid, once, resumably, then the report.

    EXP/
      experiment.yaml            the resolved config (a rerun with another config is refused)
      .lock                      held while a runner works here (a second runner is refused)
      sft/teacher-NAME/, sft/student/      SFT runs, shared by every cell that needs them
      teacher_cache/teacher-NAME-STATE/    with grid.teacher_cache: each teacher state's cache, read by
                                 every vanilla cell of that state
      cells/CELL/                distillation runs
      rows/ROW/                  predictions.jsonl, scores.jsonl, summary.json of each row
      held_out/SET/ROW/          the same for each extra test set (`held_out`)
      results/, report.md, report.html, plots/     written by `experiment report`

Each stage is skipped when its output is complete and resumed when it is not (training from
its newest checkpoint, generation from its last finished batch, evaluation from its last
metric), so a runner killed at any moment and started again ends with the same results.

With `generation.endpoint` each row's answers come from an OpenAI-compatible endpoint that serves
the row's model under the name the row gives it (a registry name, or the path of its run
directory, as the stage's label shows); with `distill.kd.teacher_endpoint` sequence-level KD cells
ask it for their teacher the same way.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

from distillqa.config import DistillConfig, GenerateConfig, ModelConfig, SFTConfig, TeacherCacheConfig
from distillqa.exp_dir import check_config, directory_lock, experiment_lock
from distillqa.experiment.config import ExperimentConfig
from distillqa.experiment.grid import (STUDENT_SFT_DIR, Row, base_algorithm, held_out_dir, is_on_policy, plan_hypotheses,
                                       plan_rows, slug, teacher_cache_dir, teacher_sft_dir)
from distillqa.io import write_json
from distillqa.train.run_dir import RunDir


def held_out_added(old: list[dict], new: list[dict]) -> bool:
    """Held-out sets may be added to an experiment that has run (they only add stages), but a set's
    definition may not change under its name: its finished predictions would no longer match it."""
    by_name = {h["name"]: h for h in new}
    return all(by_name.get(h["name"]) == h for h in old)


MAY_GROW = {"held_out": held_out_added}  # for `check_config`: what may change in a rerun besides `may_change`


def may_change(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Keys a rerun may change: the statistics (recomputed), the dispatch, and the cache settings of a grid
    that builds no teacher cache."""
    return ("stats.", "dispatch.", *(() if cfg.grid.teacher_cache else ("distill.cache.",)))


def vocabularies(cfg: ExperimentConfig) -> dict[str, bool]:
    """teacher name -> shares the student's tokenizer."""
    from distillqa.models.registry import load_tokenizer
    from distillqa.models.traits import same_tokenizer

    student = load_tokenizer(cfg.grid.student.name, cfg.grid.student.trust_remote_code)
    return {t.name: same_tokenizer(load_tokenizer(t.name), student) for t in cfg.grid.teachers}


class Stage:
    """One unit of work: `run` it unless `done`; it may start once every stage of `needs` is done."""

    def __init__(self, label: str, done: Callable[[], bool], run: Callable[[], object], needs: tuple[Stage, ...] = ()):
        self.label, self.done, self.run, self.needs = label, done, run, needs


def teacher_model(exp: Path, teacher: str, state: str) -> str:
    """The teacher as a row or a cell uses it: its SFT run, or the model itself."""
    return str(exp / teacher_sft_dir(teacher)) if state == "sft" else teacher


def student_model(student_base: str, exp: Path, state: str) -> str:
    return str(exp / STUDENT_SFT_DIR) if state == "sft" else student_base


def row_model(student_base: str, exp: Path, row: Row) -> str:
    f = row.factors
    if row.kind == "teacher":
        return teacher_model(exp, f["teacher"], f["teacher_state"])
    if row.kind == "student":
        return student_model(student_base, exp, f["student_state"])
    if row.kind == "sft-only":
        return str(exp / "sft" / row.name)
    return str(exp / "cells" / row.name)


def healing(cfg: ExperimentConfig):
    """(DeriveConfig, corpus, cached run directory) of the grid's healed student, or None when the
    student is used as it is (not a `@layers=` student, or `grid.heal.steps` is 0)."""
    from distillqa.config import DeriveConfig
    from distillqa.cache import cache_root
    from distillqa.models.registry import load_tokenizer
    from distillqa.train.heal import heal_key, healing_corpus

    name, heal = cfg.grid.student.name, cfg.grid.heal
    if "@layers=" not in name or heal.steps == 0:
        return None
    parent, layers = name.split("@layers=", 1)
    corpus = healing_corpus(heal, cfg.data, cfg.prompt, load_tokenizer(parent, cfg.grid.student.trust_remote_code))
    out = cache_root() / "healed" / f"{slug(parent)}-{slug(layers)}-{heal_key(parent, layers, heal, corpus)}"
    derive = DeriveConfig(parent=cfg.grid.student.model_copy(update={"name": parent}), layers=layers, data=cfg.data,
                          prompt=cfg.prompt, heal=heal, output_dir=str(out))
    return derive, corpus, out


def plan_stages(cfg: ExperimentConfig, exp: Path, rows: list[Row]) -> list[tuple[str, list[Stage]]]:
    """(row name, its stages) in run order; healing and SFT stages come first, under the pseudo-row 'sft'."""
    from distillqa.generate import run_generate
    from distillqa.metrics.evaluate import evaluate_predictions, is_scored
    from distillqa.metrics.registry import resolve_metrics
    from distillqa.metrics.settings import EvalSettings
    from distillqa.train.distill import run_distill
    from distillqa.train.sft import run_sft

    from distillqa.train.heal import run_heal
    from distillqa.train.teacher_cache import cache_finished, run_teacher_cache

    shared = dict(data=cfg.data, prompt=cfg.prompt)
    student = cfg.grid.student
    sft_stages = []
    student_base = student.name
    student_needs: tuple[Stage, ...] = ()  # what the student base needs (its healing)
    if (healed := healing(cfg)) is not None:
        derive, corpus, path = healed
        student_base = str(path)

        def heal() -> None:
            with directory_lock(path.with_name(path.name + ".lock"), "healing this student"):
                run_heal(derive, resume=(path / "run.json").is_file(), corpus=corpus)

        sft_stages.append(Stage(f"heal {student.name} ({cfg.grid.heal.steps} steps, cached in {path})",
                                lambda: RunDir(path).finished, heal))
        student_needs = (sft_stages[-1],)

    def training(kind: str, run_cfg, runner, needs: tuple[Stage, ...]) -> Stage:
        path = Path(run_cfg.output_dir)
        return Stage(f"{kind} {path.relative_to(exp)}", lambda: RunDir(path).finished,
                     lambda: runner(run_cfg, resume=(path / "run.json").is_file()), needs)

    def sft(model: ModelConfig, stage_cfg, output_dir: str, needs: tuple[Stage, ...]) -> Stage:
        sft_stages.append(training("sft", SFTConfig(model=model, lora=stage_cfg.lora, train=stage_cfg.train,
                                                    output_dir=output_dir, **shared), run_sft, needs))
        return sft_stages[-1]

    def student_cfg(state: str) -> ModelConfig:
        return student.model_copy(update={"name": student_model(student_base, exp, state)})

    teacher_sft: dict[str, Stage] = {}
    if "sft" in cfg.grid.teacher_states:
        for t in cfg.grid.teachers:
            teacher_sft[t.name] = sft(ModelConfig(name=t.name), cfg.sft, str(exp / teacher_sft_dir(t.name)), ())
    student_ready = {"base": student_needs}  # student state -> the stages its model needs
    if "sft" in cfg.grid.student_states:
        student_ready["sft"] = (sft(student_cfg("base"), cfg.sft, str(exp / STUDENT_SFT_DIR), student_needs),)

    def teacher_ready(teacher: str, state: str) -> tuple[Stage, ...]:
        return (teacher_sft[teacher],) if state == "sft" else ()

    # The SFT-only baselines train with the distillation stage's budget: what KD is compared with.
    made_by: dict[str, tuple[Stage, ...]] = {}  # row name -> the stages its model needs
    for row in rows:
        f = row.factors
        if row.kind == "sft-only":
            made_by[row.name] = (sft(student_cfg(f["student_state"]), cfg.distill, row_model(student_base, exp, row),
                                     student_ready[f["student_state"]]),)
        elif row.kind == "teacher":
            made_by[row.name] = teacher_ready(f["teacher"], f["teacher_state"])
        elif row.kind == "student":
            made_by[row.name] = student_ready[f["student_state"]]

    # grid.teacher_cache: each teacher state of a vanilla cell is run once, into a cache every such cell reads.
    caches: dict[tuple[str, str], tuple[Path, Stage]] = {}
    for row in rows:
        f = row.factors
        if cfg.grid.teacher_cache and row.kind == "cell" and f["algorithm"] == "vanilla":
            key = (f["teacher"], f["teacher_state"])
            if key not in caches:
                path = exp / teacher_cache_dir(*key)
                cache_cfg = TeacherCacheConfig(teacher=ModelConfig(name=teacher_model(exp, *key)), cache=cfg.distill.cache,
                                               output_dir=str(path), **shared)
                caches[key] = path, Stage(f"teacher cache {path.relative_to(exp)}", partial(cache_finished, path, cfg.distill.cache),
                                          partial(run_teacher_cache, cache_cfg), teacher_ready(*key))
                sft_stages.append(caches[key][1])

    settings = EvalSettings(cfg.evaluate.embedding_model, cfg.evaluate.bertscore_layers, cfg.evaluate.batch_size)
    plan = [("sft", sft_stages)]

    def answer_and_score(label: str, gen: GenerateConfig, evaluate, needs: tuple[Stage, ...]) -> list[Stage]:
        out, metrics = Path(gen.output_dir), resolve_metrics(evaluate.metrics)
        endpoint = f" through {gen.generation.endpoint.url} as {gen.model.name}" if gen.generation.endpoint else ""
        generate = Stage(f"generate {label}{endpoint}", (out / "predictions.jsonl").is_file, lambda: run_generate(gen), needs)
        return [generate, Stage(f"evaluate {label}", lambda: is_scored(out, metrics, evaluate),
                                lambda: evaluate_predictions(out, evaluate, settings=settings), (generate,))]

    for row in rows:
        stages = []
        if row.kind == "cell":
            f = row.factors
            cached = caches.get((f["teacher"], f["teacher_state"])) if f["algorithm"] == "vanilla" else None
            cache, cache_needs = (cached[0], (cached[1],)) if cached else (None, ())
            needs = teacher_ready(f["teacher"], f["teacher_state"]) + student_ready[f["student_state"]] + cache_needs
            stages.append(training("distill", DistillConfig(
                teacher=ModelConfig(name=teacher_model(exp, f["teacher"], f["teacher_state"])),
                student=student_cfg(f["student_state"]), lora=cfg.distill.lora,
                train=cfg.distill.train, kd=cfg.distill.kd.model_copy(update=cell_kd(exp, f, cache, cfg.distill.kd.lmbda)),
                output_dir=str(exp / "cells" / row.name), **shared), run_distill, needs))
            made_by[row.name] = (stages[-1],)
        model = (student.model_copy(update={"name": row_model(student_base, exp, row)}) if row.kind != "teacher"
                 else ModelConfig(name=row_model(student_base, exp, row)))
        stages += answer_and_score(row.name, GenerateConfig(model=model, generation=cfg.generation, split="test",
                                                            output_dir=str(exp / "rows" / row.name), **shared), cfg.evaluate,
                                   made_by[row.name])
        for h in cfg.held_out:
            scored_here = h.mcq.method == "loglikelihood"  # nothing is generated: no endpoint
            generation = cfg.generation.model_copy(update={"endpoint": None}) if scored_here else cfg.generation
            gen = GenerateConfig(model=model, data=h.data, prompt=cfg.prompt, generation=generation, split=h.split,
                                 mcq=h.mcq, output_dir=str(exp / held_out_dir(h.name) / row.name))
            stages += answer_and_score(f"{row.name} on {h.name}", gen,
                                       cfg.evaluate.model_copy(update={"metrics": h.metrics or cfg.evaluate.metrics}),
                                       made_by[row.name])
        plan.append((row.name, stages))
    return plan


def cell_kd(exp: Path, f: dict, cache: Path | None, lmbda: float) -> dict:
    """A cell's KD settings: its algorithm, on-policy with `lmbda` for an `-onpolicy` cell and on the
    references (lmbda 0) otherwise; the teacher state's cache for a vanilla cell when the grid
    has one; for sequence-level KD the answers store that every cell of the same teacher state shares
    (the teacher answers each training prompt once), and for the others no teacher endpoint."""
    update = {"algorithm": base_algorithm(f["algorithm"]), "lmbda": lmbda if is_on_policy(f["algorithm"]) else 0.0}
    if cache is not None:
        update["teacher_cache"] = str(cache)
    if f["algorithm"] == "seqkd":
        update["teacher_answers"] = str(exp / "teacher_answers" / f"{slug(f['teacher'])}-{f['teacher_state']}.jsonl")
    else:
        update["teacher_endpoint"] = None  # only sequence-level KD asks an endpoint for its teacher
    return update


def run_in_order(plan: list[tuple[str, list[Stage]]], echo: Callable[[str], None]) -> None:
    """Every unfinished stage in this process, in plan order (which satisfies every stage's needs)."""
    total = sum(name != "sft" for name, _ in plan)
    done_rows = sum(all(s.done() for s in stages) for name, stages in plan if name != "sft")
    started = time.monotonic()
    for row_name, stages in plan:
        pending = [stage for stage in stages if not stage.done()]
        for stage in pending:
            minutes = (time.monotonic() - started) / 60
            echo(f"[experiment] rows {done_rows}/{total} done, {minutes:.1f} min: {stage.label}")
            stage.run()
        done_rows += bool(pending) and row_name != "sft"


def run_experiment(cfg: ExperimentConfig, echo: Callable[[str], None] | None = None) -> Path:
    """Run every unfinished stage, then write the report; returns the experiment directory."""
    from distillqa.experiment.report import write_report

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    exp = Path(cfg.output_dir)
    rows = plan_rows(cfg, vocabularies(cfg))  # an invalid grid fails here, before the directory is claimed
    hypotheses = plan_hypotheses(cfg, rows)
    with experiment_lock(exp):
        check_config(exp, cfg, mutable=may_change(cfg), may_grow=MAY_GROW)
        write_json(exp / "plan.json", {"rows": [{"name": r.name, "kind": r.kind, "factors": r.factors} for r in rows],
                                       "hypotheses": [asdict(h) for h in hypotheses]})
        plan = plan_stages(cfg, exp, rows)
        started = time.monotonic()
        if cfg.dispatch.backend == "local":
            run_in_order(plan, echo)
        else:
            from distillqa.experiment.dispatch import run_concurrently

            run_concurrently([stage for _, stages in plan for stage in stages], cfg.dispatch, exp, echo)
        echo(f"[experiment] rows {len(rows)}/{len(rows)} done in {(time.monotonic() - started) / 60:.1f} min; writing the report")
        report = write_report(exp)
    echo(f"[experiment] report: {report}")
    return exp
