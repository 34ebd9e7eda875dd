#!/usr/bin/env bash
# Create .venv in the repository root and install fastpref with the trainer's, the demo's and the tests' extras.
# torch is pinned to 2.13.0 unless the environment already has a torch (a CUDA machine keeps
# its own torch and the triton it pins). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=64" wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q --no-build-isolation -e ".[train,demo,test]"
.venv/bin/python -c "import fastpref, torch; print('fastpref', fastpref.__version__, '| torch', torch.__version__)"
