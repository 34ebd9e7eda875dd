"""The CPU side of ``benchmarks/gpu_suite.sh``, without a GPU: its dry run prints the
install commands, the test selection and the benchmarks' arguments; the selection collects, the
arguments parse, the first four stages' budgets add up to at most 8 minutes and the flow-matching
stages to at most 2 more."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE_BUDGET_S = 8 * 60  # install, tests, bench_loss, bench_step
FLOW_BUDGET_S = 2 * 60  # bench_step on SD3.5 Medium and FLUX.1 at their published sizes
FLOW_STAGES = {"bench_step_sd3": "sd35m-random", "bench_step_flux": "flux-random"}


def dry_run(tmp_path, *args) -> dict:
    """``{stage: (budget seconds, argv)}`` and the folder from the suite's dry run, with the
    Python running these tests as the machine's Python and ``OUT`` set."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    run = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    plan = {}
    for line in run.stdout.splitlines():
        key, _, value = line.partition(": ")
        if key == "folder":
            plan["folder"] = value
        elif key == "total budget":
            plan["total_s"] = int(value.split()[0])
        else:
            stage, budget = key.split()
            plan[stage] = (int(budget), shlex.split(value))
    return plan


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("suite")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").touch()
    return dry_run(tmp_path, str(wheels)) | {"tmp": tmp_path, "wheels": wheels}


def test_writes_to_one_folder_named_after_the_device(plan):
    folder = Path(plan["folder"])
    assert folder.parent == plan["tmp"] / "out" and folder.name.startswith("gpu-")
    for stage in ("tests", "bench_loss", "bench_step", *FLOW_STAGES):
        assert any(arg.startswith(str(folder)) for arg in plan[stage][1]), stage


def test_stage_budgets_fit_eight_minutes_and_two_for_the_flow_models(plan):
    budgets = {stage: plan[stage][0] for stage in ("install", "tests", "bench_loss", "bench_step")}
    flow = {stage: plan[stage][0] for stage in FLOW_STAGES}
    assert sum(budgets.values()) <= SUITE_BUDGET_S and sum(flow.values()) <= FLOW_BUDGET_S, (budgets, flow)
    assert sum(budgets.values()) + sum(flow.values()) == plan["total_s"]


def test_installs_into_the_machines_torch(plan):
    _, wheels = plan["install-wheels"]
    assert wheels[:4] == [sys.executable, "-m", "pip", "install"]
    assert {"--no-deps", "--no-index", "--no-build-isolation"} <= set(wheels)
    assert wheels[wheels.index("--find-links") + 1] == str(plan["wheels"])
    assert wheels[-1] == str(plan["wheels"] / "diffusers-0.42.1-py3-none-any.whl")
    _, install = plan["install"]
    assert install[0] == "env" and any(arg.startswith("TORCH_CUDA_ARCH_LIST=") for arg in install)
    assert {"--no-deps", "--no-index", "--no-build-isolation"} <= set(install) and install[-2:] == ["-e", "."]


def test_without_wheels_the_suite_installs_only_fastpref(tmp_path):
    plan = dry_run(tmp_path)
    assert "install-wheels" not in plan and "install" in plan


def test_test_selection_collects(plan):
    _, command = plan["tests"]
    selection = [arg for arg in command if arg.startswith("tests/")]
    assert "tests/loss/test_cuda.py" in selection
    assert command[command.index("-m") + 1] == "pytest"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *selection],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for item in selection:  # every file and every test function of the selection was found
        path, _, name = item.partition("::")
        assert any(line.startswith(path + "::" + name) for line in run.stdout.splitlines()), item


def test_bench_loss_arguments_parse(plan):
    from bench_loss import parse_args

    budget, command = plan["bench_loss"]
    assert command[1] == "benchmarks/bench_loss.py"
    args = parse_args(command[2:])
    assert args.device == "cuda" and not args.quick and not args.no_timing
    assert 0 < args.time_budget < budget


def bench_step_module():
    for module in ("diffusers", "transformers", "peft", "accelerate"):
        pytest.importorskip(module)
    spec = importlib.util.spec_from_file_location("fastpref_bench_step_args", ROOT / "benchmarks" / "bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_bench_step_arguments_parse(plan):
    bench = bench_step_module()
    budget, command = plan["bench_step"]
    args = bench.parse_args(command[2:])
    assert args.model == "sd15-random" and args.dtype == "bf16" and args.batch == 8
    assert set(args.variant_keys) == {"dpo/cached", "fastpref/cached", "authors/uncached"}
    assert 0 < args.time_budget < budget


@pytest.mark.parametrize("stage", FLOW_STAGES)
def test_flow_bench_step_arguments_parse(plan, stage):
    """The flow stages come after SD 1.5's, shrunk (few rounds, no breakdown), bf16 LoRA at the
    models' own sizes."""
    bench = bench_step_module()
    budget, command = plan[stage]
    args = bench.parse_args(command[2:])
    assert args.model == FLOW_STAGES[stage] and args.dtype == "bf16" and args.lora_ranks == [8]
    assert {"dpo/cached", "fastpref/cached"} <= set(args.variant_keys)
    assert args.steps <= 5 and args.breakdown_rounds == 0 and 0 < args.time_budget < budget
    assert args.out == str(Path(plan["folder"]) / f"{stage}.json")
    stages = list(plan)
    assert stages.index(stage) > stages.index("bench_step")


def test_wheel_list_pins_what_the_gpu_image_lacks():
    run = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", "--print"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pins = dict(line.split("==") for line in run.stdout.split())
    assert {"diffusers", "importlib_metadata", "datasets"} <= set(pins)
    assert all(version[0].isdigit() for version in pins.values())
