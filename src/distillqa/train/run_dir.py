"""Run directories: resolved config, log, checkpoints and the final model.

    RUN/
      config.yaml        the resolved config of the run
      run.json           kind, base model, status (running | finished), steps
      log.jsonl          one line per logged step
      checkpoints/step-00000050/   trainable.safetensors (whole), optimizer.pt (or optimizer/, one shard per
                                   process, under FSDP2 and DeepSpeed), scheduler.pt, rng.pt, state.json
      final/             adapter/ (LoRA) or model/ (full), plus the tokenizer

A new run refuses a directory that already holds a run; `resume=True` continues an
unfinished one from its newest checkpoint (and refuses if its config differs). Checkpoints
and `final/` are written to a temporary directory and renamed, so a kill leaves none half-done.

In a run of several processes the main one writes the directory: it creates or checks it in `open`
while the others wait, and it alone writes run.json, the log, checkpoints and `final/`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from distillqa.config import dump_config
from distillqa.config_changes import changed_keys
from distillqa.errors import RunDirError
from distillqa.io import append_jsonl, atomic_path, read_partial_jsonl, write_json, write_jsonl, write_text
from distillqa.processes import processes, sharded_engine
from distillqa.train.shards import full_tensors

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def info(self) -> dict:
        try:
            info = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict):
            raise RunDirError(f"{self.path / 'run.json'}: not a readable distillqa run.json (a JSON object); "
                              "this is not a usable run directory")
        return info

    @property
    def finished(self) -> bool:
        return (self.path / "run.json").is_file() and self.info.get("status") == "finished"

    @classmethod
    def open(cls, path: str | Path, config: BaseModel, kind: str, base_model: str, resume: bool) -> "RunDir":
        """Create a run directory, or reopen an existing one for `resume` (refused if its config differs).
        With several processes the main one does it while the others wait (an error there ends the
        launch), then all use the directory."""
        run, launch = cls(path), processes()
        if launch.is_main_process:
            run._create_or_check(config, kind, base_model, resume)
        launch.wait_for_everyone()
        return run

    @classmethod
    def start(cls, path: str | Path, config: BaseModel, kind: str, base_model: str, resume: bool, **fields) -> "RunDir":
        """`open` the run; unless it is finished already (nothing to do), record `fields` in its run.json."""
        run = cls.open(path, config, kind, base_model, resume)
        if run.finished:
            log.info("%s is already finished; nothing to do", run.path)
        else:
            run.update(**fields)
        return run

    def _create_or_check(self, config: BaseModel, kind: str, base_model: str, resume: bool) -> None:
        if (self.path / "run.json").is_file():
            status = self.info.get("status")
            if not resume:
                hint = "choose another output directory or delete it" if status == "finished" else "pass --resume to continue it"
                raise RunDirError(f"{self.path} already holds a {status} {self.info.get('kind')} run; {hint}")
            try:
                old = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
            except (OSError, ValueError, yaml.YAMLError):
                raise RunDirError(f"cannot resume {self.path}: its config.yaml is missing or unreadable") from None
            diff = changed_keys(config, old)
            if diff:
                raise RunDirError(f"cannot resume {self.path}: its config differs in {', '.join(diff)}")
            return
        if resume:
            raise RunDirError(f"cannot resume {self.path}: no run was started there (it holds no run.json); run without --resume")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a directory; choose another output directory")
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"{self.path} exists, is not empty and is not a distillqa run directory")
        # Built aside and renamed: a kill here leaves no directory that is neither empty nor a run.
        with atomic_path(self.path) as tmp:
            tmp.mkdir()
            write_text(tmp / "config.yaml", dump_config(config))
            write_json(tmp / "run.json", {"kind": kind, "base_model": base_model, "status": "running", "created": time.time()})

    def log(self, row: dict) -> None:
        append_jsonl(self.path / "log.jsonl", [row])

    def truncate_log(self, step: int) -> None:
        """Keep only log rows of steps up to `step` (and no torn line): a run resumed from the
        checkpoint of `step` trains the later steps again and logs them again."""
        path = self.path / "log.jsonl"
        if path.is_file():
            write_jsonl(path, [r for r in read_partial_jsonl(path) if r.get("step", 0) <= step])

    def update(self, **fields) -> None:
        """Add `fields` to run.json (on the main process; the others' copies are the same)."""
        if processes().is_main_process:
            write_json(self.path / "run.json", {**self.info, **fields})

    # --- checkpoints -------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        root = self.path / "checkpoints"
        return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def checkpoint_path(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:08d}"

    def prune_checkpoints(self, keep: int) -> None:
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def write_final(self, save, keep_checkpoints: bool = False) -> None:
        """Call `save(tmp_dir)` and move the result to final/ atomically, then mark the run finished and
        (unless `keep_checkpoints`) remove its checkpoints, which a finished run never reads; on the main
        process, while the others wait, so every process returns with the run finished."""
        launch = processes()
        if launch.is_main_process:
            with atomic_path(self.path / "final", replace_dir=True) as tmp:  # a kill may have left ours
                tmp.mkdir()
                save(tmp)
            self.update(status="finished", finished=time.time())
            if not keep_checkpoints:
                shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
        launch.wait_for_everyone()


def save_final(run: RunDir, model, tok, lora: bool, extra=None, keep_checkpoints: bool = False) -> None:
    """Write final/: the adapter (LoRA) or the whole model, the tokenizer, and `extra(tmp)` if given;
    the checkpoints are removed unless `keep_checkpoints`. Every process calls it: the weights are
    gathered whole first when a sharded run (FSDP2, ZeRO-3) holds them in pieces; otherwise the model saves its own
    (no copy of a large model's weights in memory)."""
    state = full_tensors(model.state_dict(keep_vars=True)) if sharded_engine() else None  # keep_vars: gatherable params

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp / ("adapter" if lora else "model"), state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not lora:
            tok.save_pretrained(tmp / "model")
        if extra:
            extra(tmp)

    run.write_final(save, keep_checkpoints)
