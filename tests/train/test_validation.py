"""Validation loss in the training loop (`train.eval_every`), and the trackers of `train.report_to`."""

import json

import pytest
from typer.testing import CliRunner

from distillqa.cli import app
from distillqa.config import SFTConfig, load_config
from distillqa.train.run_dir import RunDir
from distillqa.train.sft import run_sft

from conftest import write_jsonl


class Killed(Exception):
    pass


def repeated_data(path):
    """Forty questions on their own contexts with one answer: what training learns holds on validation too."""
    return write_jsonl(path, [{"id": f"q{i}", "context": f"Note {i} on the core network.", "question": f"Which function is {i}?",
                               "answers": ["The AMF"]} for i in range(40)])


def cfg_for(model, data, out, *extra):
    return load_config(SFTConfig, None, [
        f"model.name={model}", f"data.source={data}", f"output_dir={out}", "train.batch_size=4", "train.lr=1e-2",
        "train.max_steps=12", "train.log_every=1", "train.eval_every=3", "train.eval_examples=4",
        "train.checkpoint_every=4", "lora.r=8", "prompt.max_length=128", *extra])


def validation_rows(run):
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def test_validation_loss_is_logged_every_n_steps_and_falls(tiny_model, tmp_path, monkeypatch):
    from accelerate import Accelerator

    tracked = []  # what accelerate hands its trackers
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None: tracked.append({"step": step, **values}))
    run = run_sft(cfg_for(tiny_model, repeated_data(tmp_path / "d.jsonl"), tmp_path / "run"))
    val = validation_rows(run)
    assert [step for step, _ in val] == [3, 6, 9, 12]
    assert val[-1][1] < 0.8 * val[0][1] and all(b < a for (_, a), (_, b) in zip(val, val[1:]))
    assert tracked == [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def test_validation_off_and_resumed_run_logs_the_same_losses(tiny_model, tmp_path, monkeypatch):
    data = repeated_data(tmp_path / "d.jsonl")
    off = run_sft(cfg_for(tiny_model, data, tmp_path / "off", "train.eval_every=0"))
    assert validation_rows(off) == []
    whole = run_sft(cfg_for(tiny_model, data, tmp_path / "whole"))

    real_log = RunDir.log

    def log_then_die(self, row):
        real_log(self, row)
        if row["step"] == 6:  # validated and logged; the newest checkpoint is step 4
            raise Killed

    monkeypatch.setattr(RunDir, "log", log_then_die)
    with pytest.raises(Killed):
        run_sft(cfg_for(tiny_model, data, tmp_path / "killed"))
    monkeypatch.setattr(RunDir, "log", real_log)
    resumed = run_sft(cfg_for(tiny_model, data, tmp_path / "killed"), resume=True)
    got, want = validation_rows(resumed), validation_rows(whole)
    assert [s for s, _ in got] == [s for s, _ in want] == [3, 6, 9, 12]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)


def test_a_tracker_that_is_not_installed_is_one_clear_line(tiny_model, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    result = CliRunner().invoke(app, ["sft", "--set", f"model.name={tiny_model}", "--set", f"output_dir={tmp_path / 'run'}",
                                      "--set", "train.report_to=[tensorboard]"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output and len(errors) == 1, result.output
    assert "train.report_to" in errors[0] and "tensorboard not installed" in errors[0]
    assert not (tmp_path / "run").exists()
