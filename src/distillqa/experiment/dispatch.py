"""The experiment's stages run concurrently on Ray or on SLURM (through submitit).

A stage starts once every stage it needs is done (`Stage.needs`: a cell needs its teacher's and
student's SFT, a row's generation its model, ...), so independent SFT runs, cells and rows run at
once. The stage's `run` closure is pickled to a worker (cloudpickle, by Ray and by submitit), which
must see the experiment directory and `$DISTILLQA_CACHE` at this machine's paths: a stage reads the
outputs of the stages it needs from there and writes only its own. Its output is resumable and
written atomically, as in a sequential run, so a stage whose worker is lost is started again
(`dispatch.retries`) and continues from what it finished, and the final numbers equal a sequential
run's. A stage's stdout and stderr go to EXP/logs/<stage>.log.
"""

from __future__ import annotations

import os
import re
import socket
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from distillqa.errors import DistillQAError
from distillqa.experiment.config import DispatchConfig

if TYPE_CHECKING:
    from distillqa.experiment.runner import Stage


def stage_log(exp: Path, label: str) -> Path:
    return exp / "logs" / (re.sub(r"[^A-Za-z0-9._-]+", "_", label.split(" through ")[0])[:150] + ".log")


def run_logged(run: Callable[[], object], log: Path) -> None:
    """On the worker: the stage, with its output appended to its log after a line naming the process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out, redirect_stdout(out), redirect_stderr(out):
        print(f"[distillqa] pid {os.getpid()} on {socket.gethostname()}", flush=True)
        try:
            run()
        except BaseException:
            traceback.print_exc()  # the whole story in the log; the runner shows one line
            raise


def forwarded_environment() -> dict[str, str]:
    """What a worker needs of this process's environment: the model cache, offline hub, tokens."""
    return {k: v for k, v in os.environ.items() if k.startswith(("DISTILLQA_", "HF_"))}


class RayWorkers:
    """Stages as Ray tasks; Ray itself retries a task whose worker died (`max_retries`)."""

    def __init__(self, cfg: DispatchConfig):
        import ray

        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": forwarded_environment()})
        gpus = cfg.gpus_per_stage if cfg.gpus_per_stage is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
        self.where = f"Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPU a stage)"
        self.task = ray.remote(num_cpus=cfg.cpus_per_stage, num_gpus=gpus, max_retries=cfg.retries)(run_logged)

    def submit(self, run: Callable[[], object], log: Path) -> Future:
        return self.task.remote(run, log).future()

    def close(self) -> None:
        import ray

        ray.shutdown()


class SlurmJobs:
    """Stages as submitit jobs, each followed by a thread here that submits it again when its job is
    lost (killed, preempted, out of time) and raises the stage's own error. Jobs still queued or
    running when the run stops (an error, Ctrl-C) are cancelled; what they wrote resumes next time."""

    def __init__(self, cfg: DispatchConfig, exp: Path):
        import submitit

        s = cfg.slurm
        self.executor = submitit.AutoExecutor(folder=exp / "logs" / "submitit", cluster=s.cluster)
        self.executor.update_parameters(timeout_min=s.timeout_min, cpus_per_task=s.cpus_per_task, gpus_per_node=s.gpus_per_node,
                                        mem_gb=s.mem_gb, slurm_partition=s.partition, slurm_additional_parameters=s.additional)
        self.retries, self.where = cfg.retries, f"submitit ({s.cluster})"
        self.threads = ThreadPoolExecutor(max_workers=64)
        self.jobs: list = []
        self.closed = False

    def submit(self, run: Callable[[], object], log: Path) -> Future:
        return self.threads.submit(self._until_done, run, log)

    def _until_done(self, run: Callable[[], object], log: Path) -> None:
        from submitit.core.utils import UncompletedJobError

        for attempt in range(self.retries + 1):
            if self.closed:  # the run stopped: submit nothing more
                return None
            job = self.executor.submit(run_logged, run, log)
            self.jobs.append(job)
            try:
                return job.result()
            except UncompletedJobError:
                if attempt == self.retries:
                    raise

    def close(self) -> None:
        self.closed = True
        for job in self.jobs:
            if not job.done():
                job.cancel(check=False)
        self.threads.shutdown(wait=False, cancel_futures=True)


def run_concurrently(stages: list[Stage], cfg: DispatchConfig, exp: Path, echo: Callable[[str], None]) -> None:
    """Run every stage that is not done, each as soon as the stages it needs are done."""
    pending = [s for s in stages if not s.done()]
    if not pending:
        return
    workers = RayWorkers(cfg) if cfg.backend == "ray" else SlurmJobs(cfg, exp)
    running: dict[Future, Stage] = {}
    started, finished = time.monotonic(), len(stages) - len(pending)
    try:
        while pending or running:
            for stage in [s for s in pending if all(n.done() for n in s.needs)]:
                if cfg.max_concurrent and len(running) >= cfg.max_concurrent:
                    break
                pending.remove(stage)
                running[workers.submit(stage.run, stage_log(exp, stage.label))] = stage
                echo(f"[experiment] {finished}/{len(stages)} stages done, {(time.monotonic() - started) / 60:.1f} min: "
                     f"{stage.label} on {workers.where}")
            if not running:
                raise DistillQAError(f"no stage can start: {pending[0].label} needs a stage that did not finish")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                try:
                    future.result()
                except Exception as e:  # the stage's own error, raised on the worker (Ray wraps it: `cause`)
                    cause = getattr(e, "cause", None) or e
                    raise DistillQAError(f"stage '{stage.label}' failed: {type(cause).__name__}: {cause} "
                                         f"(its log: {stage_log(exp, stage.label)})") from e
                if not stage.done():
                    raise DistillQAError(f"stage '{stage.label}' ended without its output; its log: "
                                         f"{stage_log(exp, stage.label)}")
                finished += 1
    finally:
        workers.close()
