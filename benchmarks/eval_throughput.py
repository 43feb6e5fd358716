"""Throughput of the 11 non-judge metrics on N prediction/reference pairs (default 1,000),
model loading included: the n-gram family and the embedding family timed separately.

Pairs come from the bundled telecom sample: each reference answer against a prediction made
from it (word order and words changed for two thirds of them), cycled up to N.

    python benchmarks/eval_throughput.py [--pairs 1000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import random
import time

from distillqa.data import load_examples
from distillqa.metrics.registry import METRICS, OFFLINE_METRICS
from distillqa.metrics.settings import EvalSettings


def make_rows(n: int) -> list[dict]:
    examples, _ = load_examples("bundled:telecom-sample")
    rng = random.Random(0)
    rows = []
    for i in range(n):
        ex = examples[i % len(examples)]
        words = (ex.answers[0] + " in the " + ex.question).split()
        if i % 3 == 1:
            rng.shuffle(words)
        elif i % 3 == 2:
            words = words[: max(1, len(words) // 2)] + ["network"]
        rows.append({"id": str(i), "prediction": " ".join(words), "references": list(ex.answers), "question": ex.question})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    rows = make_rows(a.pairs)
    settings = EvalSettings(batch_size=a.batch_size)
    total, per_family = 0.0, {}
    print(f"{a.pairs} pairs, batch size {a.batch_size}; first use of each model includes loading it")
    for name in OFFLINE_METRICS:
        t0 = time.perf_counter()
        METRICS[name].score(rows, settings)
        dt = time.perf_counter() - t0
        total += dt
        family = METRICS[name].family
        per_family[family] = per_family.get(family, 0.0) + dt
        print(f"  {name:13s} {dt:7.2f} s  {a.pairs / dt:9.0f} pairs/s")
    for family, dt in per_family.items():
        print(f"{family:10s} family: {dt:6.2f} s  ({a.pairs / dt:.0f} pairs/s)")
    print(f"all {len(OFFLINE_METRICS)} non-judge metrics: {total:.2f} s for {a.pairs} pairs (target < 60 s)")


if __name__ == "__main__":
    main()
