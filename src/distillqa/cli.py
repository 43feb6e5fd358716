"""The `distillqa` command. Subcommands map 1:1 to the pipeline stages."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

import typer

from distillqa.errors import DistillQAError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil domain-adapted LLMs into small ones for QA.")

ConfigArg = typer.Argument(None, help="YAML config file (optional; defaults apply).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")


@app.callback()
def main(cache_dir: Optional[str] = typer.Option(None, help="Model cache (default $DISTILLQA_CACHE or ~/.cache/distillqa)."),
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    if cache_dir:
        os.environ["DISTILLQA_CACHE"] = cache_dir
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if int(os.environ.get("RANK", "0")) > 0:  # a torchrun/accelerate worker: the main process alone reports
        logging.disable(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _guard(fn):
    """Report user-facing errors as one line instead of a traceback."""
    try:
        return fn()
    except DistillQAError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # the file system said no (permissions, a file where a directory should be, a full disk)
        where = f"{e.filename}: " if e.filename else ""
        typer.secho(f"error: {where}{e.strerror or e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _into(out: str, command: str, overwrite: bool, write, recognise=None) -> str:
    """Run `write(tmp)` and move its output to `out`, which must be new or empty, or with --overwrite
    a previous output of the same command: nothing else at `out` is ever replaced (see io.claim_output)."""
    from distillqa.io import claim_output

    with claim_output(out, command, overwrite, recognise) as tmp:
        write(tmp)
    return out


@app.command()
def sft(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt,
        resume: bool = typer.Option(False, help="Continue an unfinished run from its newest checkpoint.")) -> None:
    """Supervised fine-tuning (LoRA or full) on answer tokens."""
    from distillqa.config import SFTConfig, load_config
    from distillqa.train.sft import run_sft

    path = _guard(lambda: run_sft(load_config(SFTConfig, config, set_), resume=resume))
    typer.echo(f"finished: {path}")


@app.command()
def distill(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt,
            resume: bool = typer.Option(False, help="Continue an unfinished run from its newest checkpoint.")) -> None:
    """Distil a student from a frozen teacher (vanilla KD, DSKD, DSKD-CMA, ULD)."""
    from distillqa.config import DistillConfig, load_config
    from distillqa.train.distill import run_distill

    path = _guard(lambda: run_distill(load_config(DistillConfig, config, set_), resume=resume))
    typer.echo(f"finished: {path}")


@app.command()
def generate(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Answer one split's questions and write predictions.jsonl."""
    from distillqa.config import GenerateConfig, load_config
    from distillqa.generate import run_generate

    typer.echo(f"wrote {_guard(lambda: run_generate(load_config(GenerateConfig, config, set_)))}")


@app.command()
def evaluate(predictions: str = typer.Argument(..., help="predictions.jsonl, or a directory holding one."),
             config: Optional[str] = typer.Option(None, "--config", help="YAML config (see `distillqa config evaluate`)."),
             metrics: Optional[str] = typer.Option(None, help="'default' (14), 'offline' (11, no judge), families or names."),
             judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
             judge_model: Optional[str] = typer.Option(None, help="Judge model name at that endpoint."),
             judge_local: Optional[str] = typer.Option(None, help="A local model as judge (slow)."),
             set_: Optional[list[str]] = SetOpt) -> None:
    """Score predictions per example and summarise (mean, 95% bootstrap CI, missing)."""
    from distillqa.config import EvaluateConfig, load_config
    from distillqa.metrics.evaluate import evaluate_predictions

    shortcuts = {"metrics": metrics, "judge.url": judge_url, "judge.model": judge_model, "judge.local_model": judge_local}
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(set_ or [])
    summary = _guard(lambda: evaluate_predictions(predictions, load_config(EvaluateConfig, config, overrides)))
    for name, m in summary["metrics"].items():
        typer.echo(f"{name:18s} {m['mean']:.4f}  95% CI [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]  n={m['n']}  missing={m['missing']}")


@app.command("judge-calibrate")
def judge_calibrate(predictions: str = typer.Argument(..., help="predictions.jsonl, or a directory holding one."),
                    out: str = typer.Option(..., "--out", help="New output directory: calibration.json and scores.jsonl."),
                    judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
                    judge_model: Optional[str] = typer.Option(None, help="Judge model name at that endpoint."),
                    judge_local: Optional[str] = typer.Option(None, help="A local model as judge (slow)."),
                    metrics: str = typer.Option("judge", help="The judge metrics to calibrate."),
                    against: str = typer.Option("rouge_l,token_f1,cosine,bertscore_f1",
                                                help="n-gram, lexical and embedding metrics to compare the judge with."),
                    repeats: int = typer.Option(2, help="Times each judge metric is scored (2 or more)."),
                    limit: Optional[int] = typer.Option(None, min=1, help="The first N questions only."),
                    config: Optional[str] = typer.Option(None, "--config", help="YAML config (see `distillqa config evaluate`)."),
                    set_: Optional[list[str]] = SetOpt,
                    overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous judge-calibrate output.")) -> None:
    """How a judge agrees with the n-gram/embedding metrics and with itself, and how often it cannot be parsed."""
    from pathlib import Path

    from distillqa.config import EvaluateConfig, load_config
    from distillqa.io import check_output
    from distillqa.metrics.calibration import calibrate_judge, write_calibration

    shortcuts = {"judge.url": judge_url, "judge.model": judge_model, "judge.local_model": judge_local}
    cfg = _guard(lambda: load_config(EvaluateConfig, config, [f"{k}={v}" for k, v in shortcuts.items() if v] + list(set_ or [])))
    _guard(lambda: check_output(out, "judge-calibrate", overwrite))
    report, table = _guard(lambda: calibrate_judge(predictions, cfg, metrics, against, repeats, limit))
    _guard(lambda: _into(out, "judge-calibrate", overwrite, lambda tmp: write_calibration(Path(tmp), report, table)))
    typer.echo(f"judge {report['judge']} on {report['questions']} questions, {repeats} repeats:")

    def num(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for name, m in report["metrics"].items():
        again = m["self"][0]
        typer.echo(f"  {name:18s} unparsed first reply {m['first_reply_unparsed']:.1%}, missing {m['missing']:.1%}; "
                   f"same score when asked again {num(again['repeat_rate'])} (rho {num(again['rho'])}); Spearman with "
                   + ", ".join(f"{ref} {num(r['rho'])}" for ref, r in m["against"].items()))
    typer.echo(f"wrote {out}/calibration.json")


teacher_app = typer.Typer(no_args_is_help=True, help="Teacher outputs computed once, for KD without the teacher.")
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("cache")
def teacher_cache(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Run a teacher once over the training answers and store its top-k (or sampled) log-probabilities (resumable)."""
    from distillqa.config import TeacherCacheConfig, load_config
    from distillqa.train.teacher_cache import run_teacher_cache

    path = _guard(lambda: run_teacher_cache(load_config(TeacherCacheConfig, config, set_)))
    typer.echo(f"finished: {path} (use it with --set kd.teacher_cache={path})")


experiment_app = typer.Typer(no_args_is_help=True, help="The teacher x student x algorithm x vocabulary grid, statistics, report.")
app.add_typer(experiment_app, name="experiment")


def _run_experiment(overrides: list[str], config: Optional[str] = None) -> None:
    from distillqa.config import load_config
    from distillqa.experiment.config import ExperimentConfig
    from distillqa.experiment.runner import run_experiment

    from distillqa.io import check_claimed_dir

    cfg = _guard(lambda: load_config(ExperimentConfig, config, overrides))
    _guard(lambda: check_claimed_dir(cfg.output_dir, "experiment.yaml", "experiment"))
    exp = _guard(lambda: run_experiment(cfg))
    hypotheses = json.loads((exp / "results" / "hypotheses.json").read_text())
    for h in hypotheses:
        typer.echo(f"{h['question']:58s} {h['summary']}")
    for held_out in cfg.held_out:
        typer.echo(f"held-out test set {held_out.name}:")
        for h in json.loads((exp / "results" / "held_out" / held_out.name / "hypotheses.json").read_text()):
            typer.echo(f"  {h['question']:56s} {h['summary']}")
    checks = json.loads((exp / "results" / "checks.json").read_text())
    typer.echo("checks of the tool working:")
    for c in checks["checks"]:
        typer.echo(f"  [{'pass' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}")
    if checks["kd_vs_sft"]:
        typer.echo(f"  {checks['kd_vs_sft']}")
    typer.echo(f"report: {exp / 'report.md'} and {exp / 'report.html'}")


@experiment_app.command("run")
def experiment_run(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Run (or resume) every stage of the grid, then the statistics and the report."""
    _run_experiment(list(set_ or []), config)


@experiment_app.command("report")
def experiment_report(exp_dir: str = typer.Argument(..., help="An experiment directory.")) -> None:
    """Recompute the statistics and rewrite report.md, report.html and the plots."""
    from distillqa.experiment.report import write_report

    typer.echo(f"wrote {_guard(lambda: write_report(exp_dir))}")


harness_app = typer.Typer(no_args_is_help=True, help="lm-evaluation-harness tasks on any distillqa model (the 'harness' extra).")
app.add_typer(harness_app, name="harness")


@harness_app.command("run")
def harness_run(model: str = typer.Argument(..., help="Any model name: registry, run directory, local path, pruned student."),
                tasks: str = typer.Option(..., help="lm-eval task names, comma-separated."),
                out: str = typer.Option(..., "--out", help="New output directory: results.json and samples_TASK.jsonl."),
                include_path: Optional[str] = typer.Option(None, help="A directory of extra task YAMLs (e.g. from `harness export`)."),
                limit: Optional[int] = typer.Option(None, min=1, help="At most this many questions per task."),
                num_fewshot: Optional[int] = typer.Option(None, min=0, help="Few-shot examples (default: the task's)."),
                batch_size: int = typer.Option(8, min=1, help="Requests per forward pass."),
                overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous harness run output.")) -> None:
    """Evaluate a model with lm-evaluation-harness tasks (needs `pip install -e '.[harness]'`)."""
    from pathlib import Path

    from distillqa.harness import require_lm_eval, run_harness
    from distillqa.io import check_output

    _guard(require_lm_eval)
    _guard(lambda: check_output(out, "harness run", overwrite))
    found = {}
    _guard(lambda: _into(out, "harness run", overwrite, lambda tmp: found.update(run_harness(
        model, [t.strip() for t in tasks.split(",") if t.strip()], Path(tmp), include_path, limit, num_fewshot, batch_size))))
    for task, metrics in found["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        typer.echo(f"{task}: {shown}")
    typer.echo(f"wrote {out}/results.json")


@harness_app.command("export")
def harness_export(data: str = typer.Argument(..., help="A multiple-choice data file (jsonl with choices, or CommonsenseQA)."),
                   out: str = typer.Argument(..., help="New task directory: NAME.yaml and NAME.jsonl."),
                   name: str = typer.Option(..., help="The task's name (what --tasks names)."),
                   split: str = typer.Option("all", help="all (the whole file), train, validation or test."),
                   options: str = typer.Option("hidden", help="hidden (cloze: the choice texts are scored), inline, or "
                                               "lettered (the letters are scored)."),
                   instruction: str = typer.Option("", help="Instruction placed before the question."),
                   data_format: str = typer.Option("auto", "--format", help="auto, jsonl, squad or cqa."),
                   overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous harness export output.")) -> None:
    """Write a data file's multiple-choice questions as an lm-eval task (distillqa's plain prompt)."""
    import re
    from pathlib import Path

    from distillqa.config import DataConfig, MCQConfig, validate_config
    from distillqa.errors import ConfigError
    from distillqa.harness import export_task
    from distillqa.io import check_output

    def checked() -> DataConfig:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ConfigError(f"--name: '{name}' must be letters, digits, '_' or '-' (it names the task and its files)")
        if split not in ("all", "train", "validation", "test"):
            raise ConfigError(f"--split: '{split}' is not one of all, train, validation, test")
        validate_config(MCQConfig, {"options": options}, source="--options")
        return validate_config(DataConfig, {"source": data, "format": data_format}, source="--format")

    data_cfg = _guard(checked)
    _guard(lambda: check_output(out, "harness export", overwrite))
    count = []
    _guard(lambda: _into(out, "harness export", overwrite, lambda tmp: count.append(
        export_task(data_cfg, split, name, Path(tmp), Path(out), instruction, options))))
    typer.echo(f"wrote task '{name}' ({count[0]} questions) to {out}; run it with: distillqa harness run MODEL "
               f"--tasks {name} --include-path {out} --out RESULTS")


rationales_app = typer.Typer(no_args_is_help=True, help="Rationale distillation on multiple-choice QA (CommonsenseQA).")
app.add_typer(rationales_app, name="rationales")


@rationales_app.command("generate")
def rationales_generate(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """A teacher writes rationales, critique-revised rationales and counterfactual rationales (resumable)."""
    from distillqa.config import load_config
    from distillqa.rationales.config import RationaleGenerateConfig
    from distillqa.rationales.generate import run_rationale_generate

    typer.echo(f"wrote {_guard(lambda: run_rationale_generate(load_config(RationaleGenerateConfig, config, set_)))}")


@rationales_app.command("experiment")
def rationales_experiment(config: Optional[str] = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Train MT / CF / MT+CF students per rationale type and seed; accuracy, ANOVA, Tukey, report."""
    from distillqa.config import load_config
    from distillqa.rationales.config import RationaleExperimentConfig
    from distillqa.rationales.experiment import run_rationale_experiment

    from distillqa.io import check_claimed_dir

    cfg = _guard(lambda: load_config(RationaleExperimentConfig, config, set_))
    _guard(lambda: check_claimed_dir(cfg.output_dir, "experiment.yaml", "rationales experiment"))
    exp = _guard(lambda: run_rationale_experiment(cfg))
    for r in json.loads((exp / "results" / "runs.json").read_text()):
        typer.echo(f"{r['cell']:28s} accuracy {r['accuracy']:.3f}  ({r['correct']}/{r['n']}, unparseable {r['unparseable']})")
    typer.echo(f"report: {exp / 'report.md'} and {exp / 'report.html'}")


@rationales_app.command("report")
def rationales_report(exp_dir: str = typer.Argument(..., help="A rationale experiment directory.")) -> None:
    """Recompute the ANOVA / Tukey tables and rewrite the report."""
    from distillqa.rationales.report import write_rationale_report

    typer.echo(f"wrote {_guard(lambda: write_rationale_report(exp_dir))}")


@rationales_app.command("import")
def rationales_import(source: str = typer.Argument(..., help="Teacher outputs (Llama-2 columns or distillqa's layout)."),
                      out: str = typer.Argument(..., help="Output JSONL in distillqa's rationale layout."),
                      overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous import (distillqa's layout).")) -> None:
    """Validate teacher rationales and write them in distillqa's layout, with provenance."""
    from distillqa.io import check_output
    from distillqa.rationales.data import imported_layout, read_rationales

    _guard(lambda: check_output(out, "rationales import", overwrite, imported_layout))  # before reading a large file
    rows = _guard(lambda: read_rationales(source))
    _guard(lambda: _into(out, "rationales import", overwrite, lambda tmp: tmp.write_text(
        "".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in rows), encoding="utf-8"), imported_layout))
    typer.echo(f"wrote {len(rows)} rows to {out}")


study_app = typer.Typer(no_args_is_help=True, help="A human study of explanation quality: create, serve to raters, analyze.")
app.add_typer(study_app, name="study")


def _study_extra(module: str) -> None:
    """The study's web and statistics packages are an extra, so the core install stays lean."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        typer.secho(f"error: this command needs the 'study' extra ({module} is not installed): pip install -e '.[study]'",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


@study_app.command("create")
def study_create(sources: list[str] = typer.Argument(..., help="Rationale experiment directories, answers/CELL directories, "
                                                   "study.jsonl files, or NAME=PATH to name a condition."),
                 out: str = typer.Option(..., "--out", help="The new study directory."),
                 items_per_condition: int = typer.Option(20, help="Explanations sampled per condition."),
                 target_ratings: int = typer.Option(3, help="Ratings wanted per explanation."),
                 items_per_rater: int = typer.Option(12, help="Explanations each rater rates (besides the attention checks)."),
                 attention_checks: int = typer.Option(2, help="Instructed-response attention checks per rater (2 to 4)."),
                 exclude_if_failed_checks: int = typer.Option(1, help="Exclude a rater who fails this many checks."),
                 timeout_minutes: float = typer.Option(45.0, help="Give a rater's pending items to others after this idle time."),
                 completion_code: Optional[str] = typer.Option(None, help="The code finishers get (default: random)."),
                 tokens: int = typer.Option(0, help="Also write N per-rater token links to links.txt."),
                 seed: int = typer.Option(0, help="Sampling and assignment seed."),
                 admin_password_file: Optional[str] = typer.Option(
                     None, help="File holding the admin password (else $DISTILLQA_STUDY_PASSWORD, else a prompt)."),
                 overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous study create output with no ratings.")) -> None:
    """Build a blinded rating study from the explanations (study.jsonl) of one or more runs."""
    from distillqa.errors import ConfigError
    from distillqa.io import check_output
    from distillqa.study.design import StudyOptions, create_study

    def password() -> str:
        if admin_password_file:
            return open(admin_password_file, encoding="utf-8").read().strip()
        if os.environ.get("DISTILLQA_STUDY_PASSWORD"):
            return os.environ["DISTILLQA_STUDY_PASSWORD"]
        if not sys.stdin.isatty():
            raise ConfigError("admin password: give --admin-password-file or set DISTILLQA_STUDY_PASSWORD")
        return typer.prompt("admin password", hide_input=True, confirmation_prompt=True)

    opts = StudyOptions(items_per_condition, target_ratings, items_per_rater, attention_checks, exclude_if_failed_checks,
                        timeout_minutes, seed, completion_code, tokens)
    _guard(lambda: check_output(out, "study create", overwrite))
    secret = _guard(password)
    summary = {}
    _guard(lambda: _into(out, "study create", overwrite, lambda tmp: summary.update(create_study(sources, tmp, secret, opts))))
    conditions = ", ".join(f"{code} = {name}" for code, name in summary["conditions"].items())
    typer.echo(f"wrote {out}: {summary['items']} items in {len(summary['conditions'])} conditions ({conditions}); "
               f"{summary['raters_needed']} raters needed; completion code {summary['completion_code']}"
               + (f"; {summary['dropped_empty']} rows with an empty explanation left out" if summary["dropped_empty"] else ""))


@study_app.command("serve")
def study_serve(study_dir: str = typer.Argument(..., help="A study directory from `distillqa study create`."),
                host: str = typer.Option("127.0.0.1", help="Address to listen on (behind a TLS proxy for real raters)."),
                port: int = typer.Option(8080, help="Port to listen on."),
                rate: float = typer.Option(5.0, help="Requests a second allowed per rater session (on average)."),
                burst: float = typer.Option(60.0, help="Requests a rater session may make at once.")) -> None:
    """Serve the rater web app and its admin page (/admin)."""
    _study_extra("fastapi")
    from distillqa.study.app import serve_study
    from distillqa.study.design import Study

    study = _guard(lambda: Study.load(study_dir))
    typer.echo(f"serving {study.design['title']} at http://{host}:{port}/ (admin: /admin; Ctrl-C to stop)")
    _guard(lambda: serve_study(study_dir, host, port, rate, burst))


@study_app.command("analyze")
def study_analyze(study_dir: str = typer.Argument(..., help="A study directory with ratings.")) -> None:
    """Kruskal-Wallis, Dunn, Vargha-Delaney A, OLS, Krippendorff's alpha, a mixed model; report.md and report.html."""
    _study_extra("scikit_posthocs")
    from distillqa.study.report import write_study_report

    typer.echo(f"wrote {_guard(lambda: write_study_report(study_dir))}")


@app.command()
def demo(set_: Optional[list[str]] = SetOpt) -> None:
    """The main job on the embedded default: the `quick` experiment grid into runs/demo, with its report."""
    _run_experiment(["preset=quick", "output_dir=runs/demo", *(set_ or [])])


@app.command()
def serve(model: str = typer.Argument(..., help="Any model name: registry, run directory, local path."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          max_tokens: int = typer.Option(1024, min=1, help="Largest max_tokens a request may ask for (larger: HTTP 422)."),
          max_prompt_tokens: int = typer.Option(8192, min=1, help="Longest prompt accepted, in tokens (longer: HTTP 400)."),
          max_body: int = typer.Option(1 << 20, min=1, help="Largest request body in bytes (larger: HTTP 413, never read)."),
          read_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a client may stall while sending.")) -> None:
    """Serve a model behind an OpenAI-compatible endpoint (/v1/chat/completions and /v1/completions)."""
    from distillqa.serve import make_server

    server = _guard(lambda: make_server(model, host, port, max_tokens_limit=max_tokens, max_prompt_tokens=max_prompt_tokens,
                                        max_body_bytes=max_body, read_timeout=read_timeout))
    typer.echo(f"serving {model} at http://{host}:{server.server_address[1]}/v1 (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


@app.command("config")
def show_config(command: str = typer.Argument(..., help="sft, distill, generate, evaluate, experiment, teacher-cache, rationales or rationales-generate.")) -> None:
    """Print every config key of a command with its default and description, as YAML."""
    from distillqa.schemas import SCHEMAS, describe_config

    if command not in SCHEMAS:
        typer.secho(f"error: unknown command '{command}'; choose from {', '.join(SCHEMAS)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(describe_config(SCHEMAS[command]), nl=False)


@app.command()
def models() -> None:
    """List the offline model registry."""
    from distillqa.models.registry import REGISTRY

    for name, entry in REGISTRY.items():
        typer.echo(f"{name:14s} vocab {entry.vocab_size:>7,d}  {entry.description}")
    typer.echo("Also accepted: hub ids, local model directories, finished run directories, '<model>@layers=every-other'.")


@app.command("metrics")
def list_metrics() -> None:
    """List the metric registry (name, family, range, direction, default)."""
    from distillqa.metrics import METRICS

    for m in METRICS.values():
        direction = "higher is better" if m.higher_is_better else "lower is better"
        typer.echo(f"{m.name:12s} {m.family:8s} [{m.low:g}, {m.high:g}] {direction:17s} {'default' if m.default else '':8s} {m.description}")


@app.command("derive-student")
def derive_student(model: str = typer.Argument(..., help="Model to prune (any model name)."),
                   out: str = typer.Argument(..., help="Output model directory."),
                   layers: str = typer.Option("every-other", help="'every-other', indices/ranges such as '0-3,8', or "
                                              "measured: 'angular:K' or 'block-influence:K' (keep K layers)."),
                   heal_steps: int = typer.Option(0, help="Heal the pruned model: this many steps of forward KL from MODEL "
                                                  "over every token of --corpus. OUT is then a resumable run directory."),
                   corpus: str = typer.Option("train", help="Healing text: 'train' (the --data training split's prompts "
                                              "and answers in chat format), 'parent-answers' (those prompts with MODEL's own "
                                              "greedy answers), a .txt file, or a .jsonl file with 'text'."),
                   data: str = typer.Option("bundled:telecom-sample", help="QA data: the 'train' corpus and the zero-shot check."),
                   resume: bool = typer.Option(False, help="Continue an interrupted healing run in OUT."),
                   set_: Optional[list[str]] = SetOpt,
                   overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous derive-student output.")) -> None:
    """Build a smaller same-vocabulary student by keeping a subset of decoder layers, optionally healed."""
    from distillqa.models.registry import derive_student as derive

    if heal_steps == 0:
        typer.echo(f"wrote {_guard(lambda: _into(out, 'derive-student', overwrite, lambda tmp: derive(model, layers, tmp)))}")
        return
    from distillqa.config import DeriveConfig, load_config
    from distillqa.train.heal import run_heal
    from distillqa.train.run_dir import RunDir

    overrides = [f"parent={model}", f"layers={layers}", f"heal.steps={heal_steps}", f"heal.corpus={corpus}",
                 f"data.source={data}", f"output_dir={out}", *(set_ or [])]
    run = RunDir(_guard(lambda: run_heal(load_config(DeriveConfig, None, overrides), resume=resume)))
    info = run.info
    zero_shot = info.get("zero_shot", {})
    score = f", zero-shot ROUGE-L {zero_shot['rouge_l']:.3f} on {zero_shot['questions']} validation questions" if "rouge_l" in zero_shot else ""
    typer.echo(f"healed student in {run.path} (model: {run.path / 'final' / 'model'}): layers {info['layers']}{score}")


@app.command()
def merge(run_dir: str = typer.Argument(..., help="A finished LoRA run directory."),
          out: str = typer.Argument(..., help="Output model directory."),
          overwrite: bool = typer.Option(False, help="Replace OUT if it is a previous merge output.")) -> None:
    """Merge a run's LoRA adapter into its base model and save a standalone model."""
    from distillqa.models.lora import merge_run

    typer.echo(f"wrote {_guard(lambda: _into(out, 'merge', overwrite, lambda tmp: merge_run(run_dir, tmp)))}")


if __name__ == "__main__":
    sys.exit(app())
