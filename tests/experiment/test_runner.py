"""The experiment grid on tiny in-process models: plan, resumability under kill -9, locking,
config drift, and the report."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distillqa.config import load_config
from distillqa.errors import ConfigError, DistillQAError, RunDirError
from distillqa.exp_dir import check_config, experiment_lock
from distillqa.experiment.config import ExperimentConfig
from distillqa.experiment.grid import plan_hypotheses, plan_rows
from distillqa.experiment.runner import may_change, run_experiment


def tiny_grid(student: str, same: str, other: str, out: Path) -> dict:
    fast = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "lr": 0.01}
    return {
        "preset": "quick",
        "grid": {"student": f"{student}@layers=every-other",
                 "heal": {"steps": 2, "batch_size": 4, "checkpoint_every": 1, "eval_examples": 2},
                 "teachers": [{"name": same, "algorithms": ["vanilla", "dskd"]}, {"name": other, "algorithms": ["dskd-cma", "uld"]}]},
        "data": {"max_train_examples": 16, "max_eval_examples": 12},
        "sft": {"train": fast}, "distill": {"train": fast},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "evaluate": {"metrics": "rouge_l,bleu_1,token_f1"},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """The healed tiny students go to a cache of this module's own, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLQA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def grid_cfg(tiny_model, tiny_other_vocab_model):
    def make(out: Path) -> ExperimentConfig:
        return load_config(ExperimentConfig, None, [f"{k}={json.dumps(v)}" for k, v in
                                                    tiny_grid(tiny_model, tiny_model, tiny_other_vocab_model, out).items()])
    return make


@pytest.fixture(scope="module")
def finished(grid_cfg, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted tiny grid and how long it took."""
    started = time.monotonic()
    exp = run_experiment(grid_cfg(tmp_path_factory.mktemp("whole") / "exp"), echo=lambda msg: None)
    return exp, time.monotonic() - started


def test_plan_has_the_studys_rows_and_matched_pairs(grid_cfg, tmp_path):
    cfg = grid_cfg(tmp_path / "exp")
    rows = plan_rows(cfg, {cfg.grid.teachers[0].name: True, cfg.grid.teachers[1].name: False})
    assert [r.kind for r in rows].count("cell") == 16 and [r.kind for r in rows].count("sft-only") == 2 and len(rows) == 24
    hyps = {h.name: h for h in plan_hypotheses(cfg, rows)}
    assert {k: len(h.pairs) for k, h in hyps.items()} == {
        "teacher_sft": 8, "student_sft": 8, "both_sft": 4, "dskd_vs_vanilla": 4, "dskd-cma_vs_uld": 4, "vocabulary": 8,
        "teacher_sft_same_vocabulary": 4, "teacher_sft_different_vocabulary": 4, "both_sft_same_vocabulary": 2,
        "both_sft_different_vocabulary": 2, "kd_vs_sft": 16, "teacher_model_sft": 2, "student_model_sft": 1}
    by_name = {r.name: r.factors for r in rows}
    for a, b in hyps["teacher_sft"].pairs:  # only the teacher state differs within a pair
        diff = {k for k in by_name[a] if by_name[a][k] != by_name[b][k]}
        assert diff == {"teacher_state"}
    for a, b in hyps["vocabulary"].pairs:  # logit-level with logit-level, dual-space with dual-space
        assert by_name[a]["family"] == by_name[b]["family"] and by_name[a]["vocabulary"] == "same"


def test_each_stage_needs_the_stages_whose_outputs_it_reads_and_runs_after_them(grid_cfg, tmp_path):
    """The dependencies the concurrent backends start stages by; the sequential order satisfies them."""
    from distillqa.experiment.runner import plan_stages

    cfg = grid_cfg(tmp_path / "exp")
    rows = plan_rows(cfg, {cfg.grid.teachers[0].name: True, cfg.grid.teachers[1].name: False})
    order = [stage for _, stages in plan_stages(cfg, tmp_path / "exp", rows) for stage in stages]
    position = {id(stage): i for i, stage in enumerate(order)}
    assert all(position[id(n)] < position[id(stage)] for stage in order for n in stage.needs)
    needs = {stage.label.split(" (")[0]: sorted(n.label.split(" (")[0] for n in stage.needs) for stage in order}
    heal = next(label for label in needs if label.startswith("heal"))
    assert needs["sft sft/teacher-plain"] == [] and needs["sft sft/student"] == [heal]
    assert needs["sft sft/sft-only_student-base"] == [heal] and needs["sft sft/sft-only_student-sft"] == ["sft sft/student"]
    assert needs["distill cells/kd-vanilla_teacher-plain-sft_student-sft"] == ["sft sft/student", "sft sft/teacher-plain"]
    assert needs["distill cells/kd-uld_teacher-other-base_student-base"] == [heal]
    assert needs["generate kd-uld_teacher-other-base_student-base"] == ["distill cells/kd-uld_teacher-other-base_student-base"]
    assert needs["generate teacher-plain-base"] == [] and needs["generate student-sft"] == ["sft sft/student"]
    assert needs["evaluate teacher-other-sft"] == ["generate teacher-other-sft"]


def test_with_endpoints_each_row_asks_for_its_own_model(tiny_model, tiny_other_vocab_model, tmp_path):
    """generation.endpoint sends every row's prompts under the row's model name; kd.teacher_endpoint
    reaches the seqkd cells only (the other cells' configs would refuse it)."""
    from distillqa.experiment.runner import healing, plan_stages, row_model

    raw = tiny_grid(tiny_model, tiny_model, tiny_other_vocab_model, tmp_path / "exp")
    raw["grid"]["teachers"][1]["algorithms"].append("seqkd")
    url = "http://127.0.0.1:9/v1"
    cfg = load_config(ExperimentConfig, None, [f"{k}={json.dumps(v)}" for k, v in raw.items()]
                      + [f"generation.endpoint.url={url}", f"distill.kd.teacher_endpoint.url={url}"])
    rows = plan_rows(cfg, {tiny_model: True, tiny_other_vocab_model: False})
    plan = dict(plan_stages(cfg, tmp_path / "exp", rows))
    student = str(healing(cfg)[2])  # the healed student's cached run
    for row in rows:
        labels = [s.label for s in plan[row.name] if s.label.startswith("generate")]
        assert labels == [f"generate {row.name} through {url} as {row_model(student, tmp_path / 'exp', row)}"]


def test_same_vocabulary_algorithm_with_other_tokenizer_is_refused(grid_cfg, tmp_path):
    cfg = grid_cfg(tmp_path / "exp")
    with pytest.raises(ConfigError, match="'vanilla' needs a teacher with the student's tokenizer.*dskd-cma"):
        plan_rows(cfg, {cfg.grid.teachers[0].name: False, cfg.grid.teachers[1].name: False})


def test_an_invalid_grid_fails_before_claiming_the_directory(grid_cfg, tmp_path):
    cfg = grid_cfg(tmp_path / "exp")
    teachers = [t.model_copy(update={"algorithms": ["vanilla"]}) for t in cfg.grid.teachers]
    bad = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"teachers": teachers})})
    with pytest.raises(ConfigError, match="'vanilla' needs a teacher with the student's tokenizer"):
        run_experiment(bad, echo=lambda msg: None)
    assert not (tmp_path / "exp" / "experiment.yaml").exists()
    run_experiment(cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"teacher_states": ["base"],
                   "student_states": ["base"]})}), echo=lambda msg: None)  # the fixed config is accepted


def test_second_runner_and_changed_config_are_refused(grid_cfg, tmp_path):
    exp = tmp_path / "exp"
    cfg = grid_cfg(exp)
    with experiment_lock(exp):
        with pytest.raises(RunDirError, match=f"in use by another process running an experiment there \\(pid {os.getpid()}\\)"):
            with experiment_lock(exp):
                pass
    check_config(exp, cfg)
    check_config(exp, cfg.model_copy(update={"stats": cfg.stats.model_copy(update={"test": "ttest"})}))  # stats may change
    with pytest.raises(RunDirError, match=r"different config \(data.max_eval_examples\)"):
        check_config(exp, cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_eval_examples": 5})}))
    other_cache = cfg.distill.model_copy(update={"cache": cfg.distill.cache.model_copy(update={"k": 16})})
    check_config(exp, cfg.model_copy(update={"distill": other_cache}), mutable=may_change(cfg))  # no cache built: unused
    caching = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"teacher_cache": True})})
    with pytest.raises(RunDirError, match=r"different config \(distill.cache.k, grid.teacher_cache\)"):
        check_config(exp, caching, mutable=may_change(caching))  # the k = 16 written above differs once caches are built


def outputs(exp: Path) -> dict[str, str]:
    """Every row's predictions and scores, and the hypothesis results, as text."""
    files = sorted(exp.glob("rows/*/predictions.jsonl")) + sorted(exp.glob("rows/*/scores.jsonl"))
    files.append(exp / "results" / "hypotheses.json")
    return {str(p.relative_to(exp)): p.read_text() for p in files}


def test_grid_killed_at_random_moments_ends_as_an_uninterrupted_run(grid_cfg, finished, tmp_path):
    reference, duration = finished
    expected = outputs(reference)
    assert len(expected) == 2 * 24 + 1
    teacher = [json.loads(x) for x in (reference / "rows/teacher-plain-sft/predictions.jsonl").read_text().splitlines()]
    assert any(r["prediction"] for r in teacher)  # the comparison below is over real text, not empty rows

    exp = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(grid_cfg(exp).model_dump(mode="json")))
    cmd = [sys.executable, "-m", "distillqa.cli", "experiment", "run", str(cfg_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kills = 0
    for _ in range(2):  # kill -9 up to twice at random moments, then let it finish
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(2.0, 2.0 + duration))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 1, f"the runs finished before any kill (seed {seed})"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = outputs(exp)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after {kills} kills (seed {seed})"
    assert (exp / "report.html").is_file()


def test_report_embeds_both_plots_and_names_the_method(finished):
    import matplotlib.image

    exp, _ = finished
    for plot in ("means", "effects"):
        image = matplotlib.image.imread(exp / "plots" / f"{plot}.png")
        assert image.shape[0] > 300 and image.shape[1] > 600
    md, page = (exp / "report.md").read_text(), (exp / "report.html").read_text()
    assert "Holm" in md and "rank-biserial" in md and md.count("null hypothesis rejected in") == 13
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    hyps = json.loads((exp / "results" / "hypotheses.json").read_text())
    assert [len(h["results"]) for h in hyps] == [3] * 13
    assert all(r["n"] == 12 for h in hyps for r in h["results"])  # one paired difference per question, pairs averaged
    for h in hyps:  # the summary counts the rejected metrics per family: rouge_l and bleu_1 n-gram, token_f1 lexical
        rejected = {r["metric"] for r in h["results"] if r["rejected"]}
        assert all(r["rejected"] == (r["p_adjusted"] < 0.05) for r in h["results"])
        assert h["summary"] == (f"null hypothesis rejected in {len(rejected)} of 3 metrics (ngram "
                                f"{len(rejected & {'rouge_l', 'bleu_1'})}/2, lexical {int('token_f1' in rejected)}/1)")
    checks = json.loads((exp / "results" / "checks.json").read_text())
    assert [c["name"] for c in checks["checks"]] == [
        "every row answers in words", "student base works", "best distilled cell reaches half the best SFT'd teacher",
        "teacher SFT shows through distillation"]
    assert checks["kd_vs_sft"].startswith("distilled vs SFT alone (kd_vs_sft): null rejected")
    assert "Sen et al. 2025" in md and "13 of 14 metrics" in md
    # Answers side by side: every row's answer to the first test question, next to the reference.
    from distillqa.config import DataConfig
    from distillqa.data import load_splits

    test = load_splits(DataConfig(**yaml.safe_load((exp / "experiment.yaml").read_text())["data"]))[0]["test"]
    section = md.split("## Answers side by side")[1].split("\n## ")[0]
    assert all(f"Q: {ex.question}  Reference: {ex.answers[0]}" in section for ex in test[:4])
    assert section.count("| SFT only: S=base |") == 4


def kill_when_started(log: Path, killed: list[int]) -> None:
    """SIGKILL the process running a stage as soon as it has written its log's first line (its pid): a lost worker."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if found := re.match(r"\[distillqa\] pid (\d+) on .*\n", log.read_text() if log.is_file() else ""):
            os.kill(int(found[1]), signal.SIGKILL)
            killed.append(int(found[1]))
            return
        time.sleep(0.02)


def run_on_workers_losing_one(cfg: ExperimentConfig, dispatch: dict, cell: str) -> Path:
    """Run `cfg` with `dispatch`, killing the worker of distillation cell `cell` as it starts; returns the directory."""
    import threading

    cfg = cfg.model_copy(update={"dispatch": type(cfg.dispatch).model_validate(dispatch)})
    exp = Path(cfg.output_dir)
    log = exp / "logs" / f"distill_cells_{cell}.log"
    killed: list[int] = []
    killer = threading.Thread(target=kill_when_started, args=(log, killed), daemon=True)
    killer.start()
    messages: list[str] = []
    run_experiment(cfg, echo=messages.append)
    killer.join()
    assert killed, "the cell's worker was not killed"
    assert sum(f"distill cells/{cell}" in m for m in messages) == 1  # submitted once: the retry is the backend's
    assert log.read_text().count("[distillqa] pid ") == 2  # and it ran twice
    return exp


def test_grid_on_ray_with_a_worker_lost_ends_as_the_sequential_run(grid_cfg, finished, tmp_path):
    """A local 2-CPU Ray cluster runs the stages at once, each when what it needs is done; the worker of a
    distillation cell is killed, Ray starts the stage again, and every prediction, score and hypothesis
    equals the sequential run's."""
    reference, _ = finished
    exp = run_on_workers_losing_one(grid_cfg(tmp_path / "exp"), {"backend": "ray"}, "kd-vanilla_teacher-plain-sft_student-base")
    assert outputs(exp) == outputs(reference)


def test_grid_on_submitit_with_a_job_lost_ends_as_the_sequential_run(grid_cfg, tmp_path):
    """The same through submitit, with its local executor standing in for SLURM (each stage a process of its
    own, so a smaller grid): the lost job is submitted again."""
    def small(out: Path) -> ExperimentConfig:
        cfg = grid_cfg(out)
        return cfg.model_copy(update={"grid": cfg.grid.model_copy(update={
            "teachers": cfg.grid.teachers[:1], "teacher_states": ["sft"], "student_states": ["base"]})})

    reference = run_experiment(small(tmp_path / "sequential"), echo=lambda msg: None)
    dispatch = {"backend": "slurm", "max_concurrent": 2, "slurm": {"cluster": "local", "timeout_min": 10}}
    exp = run_on_workers_losing_one(small(tmp_path / "exp"), dispatch, "kd-vanilla_teacher-plain-sft_student-base")
    assert len(outputs(exp)) == 2 * 5 + 1 and outputs(exp) == outputs(reference)


def test_a_failing_stage_on_ray_stops_the_run_naming_it_and_its_log(grid_cfg, tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a model")
    cfg = grid_cfg(tmp_path / "exp")
    cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"teachers": [
        cfg.grid.teachers[0].model_copy(update={"name": str(broken)})], "teacher_states": ["sft"]}),
        "dispatch": type(cfg.dispatch)(backend="ray")})
    with pytest.raises(DistillQAError, match=r"stage 'sft sft/teacher-broken' failed: .* \(its log: .*sft_sft_teacher-broken.log\)"):
        run_experiment(cfg, echo=lambda msg: None)
    assert "Traceback" in (tmp_path / "exp" / "logs" / "sft_sft_teacher-broken.log").read_text()
