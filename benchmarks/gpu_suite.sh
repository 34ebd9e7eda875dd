#!/usr/bin/env bash
# The GPU suite of fastpref, one command on a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [WHEELS_DIR]
#
# 1. install: the wheels in WHEELS_DIR (benchmarks/gpu_wheels.sh downloads them elsewhere: the GPU
#    machine may have no network), then fastpref with its CUDA extension, editable, into the
#    machine's own Python and torch (never a second torch: --no-deps --no-build-isolation);
# 2. tests: the CUDA tests (tests/loss/test_cuda.py and the NaN and determinism tests of
#    tests/loss/test_numerics.py on the GPU);
# 3. bench_loss: benchmarks/bench_loss.py on the GPU;
# 4. bench_step: benchmarks/bench_step.py --model sd15-random (bf16, 8 pairs);
# 5. bench_step_sd3, bench_step_flux: bench_step.py --model sd35m-random / flux-random (SD3.5
#    Medium at 1024 px, 2 pairs; FLUX.1 dev at 512 px, 1 pair; bf16, LoRA r8), shrunk to fit: 5
#    timed rounds, no breakdown, cached DPO vs Adaptive K=2 (and the authors' recipe on SD3.5 Medium).
#
# Each stage runs under its time budget (seconds, below; override with the variables named there):
# stages 1-4 about 8 minutes in all on one H100, stage 5 under 2 more; a failed or timed-out stage
# is recorded and the next one runs. Writes suite.log, suite.json (stages, times, status),
# pytest.xml, bench_loss.json, bench_step.json, bench_step_sd3.json and bench_step_flux.json to one
# folder named after the device: $OUT/gpu-<device> when OUT is set, else
# benchmarks/results/gpu-<device>. Exit status 0 when every stage passed.
#
# --dry-run prints the folder, each stage's budget and exact command, and runs nothing
# (tests/benchmarks/test_gpu_suite.py checks them on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
INSTALL_S=${INSTALL_S:-120}
TESTS_S=${TESTS_S:-140}
BENCH_LOSS_S=${BENCH_LOSS_S:-130}
BENCH_STEP_S=${BENCH_STEP_S:-80}
BENCH_STEP_SD3_S=${BENCH_STEP_SD3_S:-55}
BENCH_STEP_FLUX_S=${BENCH_STEP_FLUX_S:-55}

DRY_RUN=0
WHEELS=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        -*) echo "gpu_suite.sh: unknown option $arg" >&2; exit 2 ;;
        *) WHEELS=$arg ;;
    esac
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    echo "gpu_suite.sh: WHEELS_DIR $WHEELS is not a folder" >&2
    exit 2
fi

# The device's name (for the folder) and compute capability (the one arch the extension is built for).
PROBE=$("$PYTHON" - <<'PY'
import torch
if torch.cuda.is_available():
    name, cc = torch.cuda.get_device_name(0), "%d.%d" % torch.cuda.get_device_capability(0)
else:
    name, cc = "no GPU", "none"
print("".join(c if c.isalnum() else "-" for c in name).strip("-").lower()[:60], cc)
PY
) || { echo "gpu_suite.sh: $PYTHON cannot import torch (set PYTHON to the Python that holds it)" >&2; exit 2; }
read -r SLUG ARCH <<<"$PROBE"
DIR="${OUT:-benchmarks/results}/gpu-$SLUG"

WHEEL_FILES=()
if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    WHEEL_FILES=("$WHEELS"/*.whl)
    shopt -u nullglob
    [ "${#WHEEL_FILES[@]}" -gt 0 ] || echo "gpu_suite.sh: no .whl files in $WHEELS; installing fastpref only" >&2
fi
INSTALL_WHEELS=("$PYTHON" -m pip install -q --no-deps --no-index --no-build-isolation --find-links "$WHEELS" "${WHEEL_FILES[@]}")
INSTALL_FASTPREF=(env "TORCH_CUDA_ARCH_LIST=$ARCH" "MAX_JOBS=$(nproc)" "$PYTHON" -m pip install -q --no-deps --no-index
    --no-build-isolation -e .)
TEST_SELECTION=(
    tests/loss/test_cuda.py
    tests/loss/test_numerics.py::test_nan_input_gives_nan_loss
    tests/loss/test_numerics.py::test_nan_reaches_its_pair_without_weight_or_margin
    tests/loss/test_numerics.py::test_inf_input_gives_nonfinite_loss
    tests/loss/test_numerics.py::test_bitwise_reproducible
    tests/loss/test_triton_compile.py::test_launches_take_their_keywords_from_the_specialization_functions
)
TESTS=(env FASTPREF_REQUIRE_NATIVE_CUDA=1 "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 120
    --junitxml "$DIR/pytest.xml" "${TEST_SELECTION[@]}")
# The benchmarks stop starting new work some seconds before their stage's budget, so that they
# still write their JSON.
BENCH_LOSS=("$PYTHON" benchmarks/bench_loss.py --device cuda --rounds 5 --time-budget $((BENCH_LOSS_S - 45))
    --output "$DIR/bench_loss.json")
BENCH_STEP=("$PYTHON" benchmarks/bench_step.py --model sd15-random --variants dpo/cached,fastpref/cached,authors/uncached
    --steps 10 --warmup 2 --breakdown_rounds 1 --time_budget $((BENCH_STEP_S - 25)) --out "$DIR/bench_step.json")
# The flow-matching transformers at their published sizes: LoRA only (a full fine-tune of FLUX's 12B
# parameters does not fit one GPU); the authors' EMA copies of every FLUX parameter would not fit either.
BENCH_STEP_SD3=("$PYTHON" benchmarks/bench_step.py --model sd35m-random --lora_rank 8
    --variants dpo/cached,fastpref/cached,authors/uncached --steps 5 --warmup 1 --breakdown_rounds 0
    --time_budget $((BENCH_STEP_SD3_S - 25)) --out "$DIR/bench_step_sd3.json")
BENCH_STEP_FLUX=("$PYTHON" benchmarks/bench_step.py --model flux-random --lora_rank 8
    --variants dpo/cached,fastpref/cached --steps 5 --warmup 1 --breakdown_rounds 0
    --time_budget $((BENCH_STEP_FLUX_S - 25)) --out "$DIR/bench_step_flux.json")

quoted() { printf '%q ' "$@"; }

if [ "$DRY_RUN" = 1 ]; then
    echo "folder: $DIR"
    echo "total budget: $((INSTALL_S + TESTS_S + BENCH_LOSS_S + BENCH_STEP_S + BENCH_STEP_SD3_S + BENCH_STEP_FLUX_S)) s"
    [ "${#WHEEL_FILES[@]}" -gt 0 ] && echo "install-wheels $INSTALL_S: $(quoted "${INSTALL_WHEELS[@]}")"
    echo "install $INSTALL_S: $(quoted "${INSTALL_FASTPREF[@]}")"
    echo "tests $TESTS_S: $(quoted "${TESTS[@]}")"
    echo "bench_loss $BENCH_LOSS_S: $(quoted "${BENCH_LOSS[@]}")"
    echo "bench_step $BENCH_STEP_S: $(quoted "${BENCH_STEP[@]}")"
    echo "bench_step_sd3 $BENCH_STEP_SD3_S: $(quoted "${BENCH_STEP_SD3[@]}")"
    echo "bench_step_flux $BENCH_STEP_FLUX_S: $(quoted "${BENCH_STEP_FLUX[@]}")"
    exit 0
fi

if [ "$ARCH" = none ]; then
    echo "gpu_suite.sh: torch sees no CUDA device here; nothing to run (try --dry-run)" >&2
    exit 2
fi
mkdir -p "$DIR"
LOG="$DIR/suite.log"
: >"$LOG"
STAGES=()
FAILED=0
SUITE_START=$SECONDS

# run_stage NAME BUDGET COMMAND...: the command under `timeout`, its output to the log and the screen.
run_stage() {
    local name=$1 budget=$2 start=$SECONDS status
    shift 2
    printf '\n===== %s (budget %s s): %s\n' "$name" "$budget" "$(quoted "$@")" | tee -a "$LOG"
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    [ "$status" = 124 ] && echo "===== $name: stopped at its budget of $budget s" | tee -a "$LOG"
    echo "===== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
    STAGES+=("$name" "$budget" "$((SECONDS - start))" "$status")
    [ "$status" = 0 ] || FAILED=1
}

INSTALL_START=$SECONDS
if [ "${#WHEEL_FILES[@]}" -gt 0 ]; then
    run_stage install-wheels "$INSTALL_S" "${INSTALL_WHEELS[@]}"
fi
LEFT=$((INSTALL_S - (SECONDS - INSTALL_START)))  # the wheels' time comes out of the install budget
run_stage install $((LEFT > 30 ? LEFT : 30)) "${INSTALL_FASTPREF[@]}"
"$PYTHON" -m fastpref.cli info 2>&1 | tee -a "$LOG"
run_stage tests "$TESTS_S" "${TESTS[@]}"
run_stage bench_loss "$BENCH_LOSS_S" "${BENCH_LOSS[@]}"
run_stage bench_step "$BENCH_STEP_S" "${BENCH_STEP[@]}"
run_stage bench_step_sd3 "$BENCH_STEP_SD3_S" "${BENCH_STEP_SD3[@]}"
run_stage bench_step_flux "$BENCH_STEP_FLUX_S" "${BENCH_STEP_FLUX[@]}"

"$PYTHON" - "$DIR/suite.json" "$SLUG" "$((SECONDS - SUITE_START))" "${STAGES[@]}" <<'PY'
import json, sys

import torch

import fastpref

path, slug, total, *flat = sys.argv[1:]
stages = [
    {"stage": flat[i], "budget_s": int(flat[i + 1]), "seconds": int(flat[i + 2]), "exit_status": int(flat[i + 3])}
    for i in range(0, len(flat), 4)
]
report = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
    "slug": slug,
    "torch": torch.__version__,
    "fastpref": fastpref.__version__,
    "backends_cuda": fastpref.availability("cuda"),
    "total_s": int(total),
    "stages": stages,
    "passed": all(s["exit_status"] == 0 for s in stages),
}
with open(path, "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps(report, indent=1))
PY
echo "wrote $DIR (total $((SECONDS - SUITE_START)) s)" | tee -a "$LOG"
exit "$FAILED"
