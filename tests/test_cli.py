"""The command line, the loss benchmark's parity report (``benchmarks/bench_loss.py``), and the
README/CI contract."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fastpref.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def run_bench_loss(*args):
    return subprocess.run(
        [sys.executable, "benchmarks/bench_loss.py", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_info_lists_every_backend_with_a_reason():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert "auto ->" in out.stdout
    for name in ("native", "triton", "torch"):
        assert re.search(rf"^\s+{name}\s+(available|unavailable: .+)$", out.stdout, re.M), out.stdout


def test_unknown_command_fails_with_usage():
    out = run_cli("frobnicate")
    assert out.returncode != 0
    assert "invalid choice" in out.stderr


def test_bench_parity_only_writes_json(tmp_path):
    output = tmp_path / "bench.json"
    out = run_bench_loss("--no-timing", "--output", str(output))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(output.read_text())
    checked = {(row["backend"], row["dtype"]) for row in report["parity"]}
    # Without CUDA the bench runs the Triton kernels under the interpreter for parity.
    for backend in ("torch", "triton"):
        for dtype in ("fp64", "fp32", "bf16", "fp16"):
            assert (backend, dtype) in checked
    assert all(row["ok"] for row in report["parity"]), report["parity"]
    assert report["timing"] == []


def test_bench_traffic_model():
    from bench_loss import Case, traffic_bytes

    case = Case("x", 8, (4, 64, 64), 2, "float32")
    sample = 4 * 64 * 64 * 4
    traffic = traffic_bytes(case)
    # fwd: policy, ref and 2 EMAs ([2B] each) plus the shared [B] target, read once.
    assert traffic["fwd"] == 4 * 16 * sample + 8 * sample
    assert traffic["fwd+bwd"] == traffic["fwd"] + 16 * sample
    assert traffic["bwd"] == 16 * sample + 8 * sample + 16 * sample


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.+?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    main_command = next(b for b in blocks if "fastpref demo" in b)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()
    assert main_command.startswith("bash scripts/setup.sh")


@pytest.mark.parametrize("name", ["adaptive_dpo_loss", "diffusion_dpo_loss", "AdaptiveDPOLoss"])
def test_public_names_are_documented(name):
    import fastpref

    for namespace in (fastpref, fastpref.reference):
        doc = getattr(namespace, name).__doc__
        assert doc, f"{namespace.__name__}.{name} has no docstring"
        assert "[2B" in doc or "adaptive_dpo_loss" in doc


def test_peak_extra_bytes_counts_allocations_alive_at_the_peak():
    import torch
    from bench_loss import peak_extra_bytes

    size = 1 << 20
    kept = []

    def step():
        scratch = torch.empty(2 * size, dtype=torch.uint8)  # freed before the next allocation
        del scratch
        kept.append(torch.empty(size, dtype=torch.uint8))

    peak = peak_extra_bytes(step, "cpu")
    assert 2 * size <= peak < 2 * size + (1 << 16)
