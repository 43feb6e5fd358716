"""The quick grid on this machine's accelerator: each stage's wall time, the peak GPU memory, and the
precision every trained model was saved in. `precision: auto` gives bf16 on a GPU that supports it,
so this runs the whole grid (healing, SFT, every KD cell, generation, evaluation) in bf16; any dtype
or device error raises and the script exits non-zero. Used by gpu_check.sh.

    python benchmarks/gpu_grid.py OUT [--set key=value ...]     (OUT: a new experiment directory)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="experiment config override")
    a = ap.parse_args()

    from distillqa.config import load_config
    from distillqa.experiment.config import ExperimentConfig
    from distillqa.experiment.runner import run_experiment

    cfg = load_config(ExperimentConfig, None, [f"output_dir={a.out}", *a.overrides])
    marks: list[tuple[float, str]] = []
    started = time.monotonic()
    # Each progress line starts a stage ("... min: LABEL"); the last ones start and end the report.
    run_experiment(cfg, echo=lambda msg: marks.append((time.monotonic(), msg.split(" min: ", 1)[1] if " min: " in msg
                                                       else "report")))
    total = time.monotonic() - started
    print(f"{'stage':<72} {'s':>7}")
    for (t, label), (t_next, _) in zip(marks, marks[1:]):
        print(f"{label[:72]:<72} {t_next - t:7.1f}")
    print(f"{'whole grid':<72} {total:7.1f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
              f"({torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()})")
    dtypes = {}
    for config in sorted(Path(a.out).glob("*/*/final/model/config.json")) + sorted(Path(a.out).glob("*/*/final/config.json")):
        c = json.loads(config.read_text())
        dtypes[str(config.parent.relative_to(a.out))] = c.get("dtype") or c.get("torch_dtype")
    print("saved precision:", json.dumps(dtypes, indent=1))


if __name__ == "__main__":
    main()
