#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu_suite.sh installs on a GPU
# machine that has none: `bash benchmarks/gpu_wheels.sh [DIR]` (default .whl, git-ignored; carry it
# along with the repository). The GPU image (torch 2.11 + CUDA 13, triton 3.6, peft, accelerate,
# transformers, huggingface_hub 1.33, safetensors 0.8, pyarrow) lacks these: diffusers, which the
# trainer and bench_step.py need, and datasets with its dill and multiprocess (the trainer's data
# layer needs it on that machine). Pinned to versions that fit that image
# (diffusers as in CI's venv); pure-Python wheels, about 7 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
GPU_PYTHON=${GPU_PYTHON:-3.12}  # the GPU machine's python3
PYTHON=${PYTHON:-python3}
WHEELS=(
    diffusers==0.42.1
    importlib_metadata==8.7.0  # diffusers' one dependency missing there (10.x would need lazy-importer too)
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
if [ "${1:-}" = "--print" ]; then  # the list, for tests/benchmarks/test_gpu_suite.py
    printf '%s\n' "${WHEELS[@]}"
    exit 0
fi
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${WHEELS[@]}"
ls -l "$DIR"
