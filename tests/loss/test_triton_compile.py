"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90: the interpreter
that runs them on CPU in the other tests accepts code the compiler rejects and never shows
register pressure. ``benchmarks/triton_compile.py`` compiles, with Triton's bundled ptxas and no
GPU, the specializations of ``fastpref.loss.triton.ops.launchable_specializations``: in CI the
covering subset (every dtype, block size, slot count, K, B and option code at least once, and
each kernel's heaviest variant), with ``FASTPREF_TRITON_COMPILE_FULL=1`` the full set (about an
hour on two cores). It runs in a subprocess: this process runs the kernels interpreted
(``TRITON_INTERPRET=1``, set by tests/conftest.py), which cannot be compiled."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import DEVICE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("FASTPREF_TRITON_COMPILE_FULL") == "1"
SKIP_STATUS = 3  # benchmarks/triton_compile.py: no CUDA compile toolchain here


def axis_values(specs):
    """``{(kernel, axis): set of values}`` over ``specs``: each constexpr and each pointer's dtype."""
    values = defaultdict(set)
    for spec in specs:
        for name, value in spec.constexprs + spec.pointers:
            values[(spec.kernel, name)].add(value)
    return values


def test_covering_subset_takes_every_value_of_every_axis():
    from fastpref.loss.options import MODE_OPTIONS, ModeSlot
    from fastpref.loss.triton import kernels, ops

    full = ops.launchable_specializations()
    covering = ops.launchable_specializations(covering=True)
    assert set(covering) <= set(full) and len(covering) < len(full) / 20
    assert axis_values(covering) == axis_values(full)
    values = axis_values(full)
    assert values[("pair_errors_kernel", "NUM_SLOTS")] == set(range(1, kernels.MAX_SLOTS + 1))
    assert values[("pair_errors_kernel", "BLOCK")] == set(ops.gpu_block_sizes()) == {1 << i for i in range(11)}
    assert values[("pair_head_kernel", "NUM_MODELS")] == set(range(2, ops.CHECKED_MAX_EMA + 3))
    for slot in ModeSlot:
        assert values[("pair_head_kernel", slot.name)] == {member.value for member in MODE_OPTIONS[slot]}, slot.name


class _Recorder:
    """A kernel whose launches record their keyword arguments in ``seen[name]``, then run."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.seen[self.name] = kwargs
            return launch(*args, **kwargs)

        return call


def test_launches_take_their_keywords_from_the_specialization_functions(monkeypatch):
    """The launchers get every constexpr from the functions that launchable_specializations
    enumerates: a constexpr passed any other way would escape the compile check."""
    import torch

    import fastpref
    from fastpref.loss.options import Preset
    from fastpref.loss.triton import kernels, ops

    reason = fastpref.availability(DEVICE)["triton"]
    if reason is not None:
        pytest.skip(f"the Triton backend cannot run here: {reason}")
    seen = {}
    for name in ("pair_errors_kernel", "pair_head_kernel", "pair_grad_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder(getattr(kernels, name), name, seen))
    f32, batch, features = torch.float32, 3, 10
    model = torch.randn(2 * batch, features, device=DEVICE, requires_grad=True)
    ref, target, ema = (torch.randn(2 * batch, features, device=DEVICE) for _ in range(3))
    loss = fastpref.adaptive_dpo_loss(model, ref, target, ema_preds=[ema], backend="triton", preset="paper")
    torch.autograd.grad(loss, model)
    block = ops.launch_config(features, batch, DEVICE).block
    modes = (Preset.PAPER, 0, 0, 0, 0)
    assert seen == {
        "pair_errors_kernel": ops.errors_specialization((f32,) * 3, f32, False, block, f32).launch_keywords,
        "pair_head_kernel": ops.head_specialization(3, batch, modes, False, f32).launch_keywords,
        "pair_grad_kernel": ops.grad_specialization(
            f32, f32, False, block, f32, ops.interpreter_enabled()
        ).launch_keywords,
    }
    # Each constexpr value of these launches is one the compile check enumerates (but the
    # interpreter's block sizes and bfloat16 rounding, which no GPU launch takes).
    enumerated = axis_values(ops.launchable_specializations())
    interpreter_only = ("BLOCK", "EXACT_BF16") if ops.interpreter_enabled() else ()
    for kernel, keywords in seen.items():
        for name, value in keywords.items():
            if name not in interpreter_only:
                assert value in {ops._tl_value(v) for v in enumerated[(kernel, name)]}, (kernel, name, value)


@pytest.mark.timeout(7200 if FULL else 600)
def test_every_specialization_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, never from a cache
    output = tmp_path / "compile.json"
    command = [sys.executable, "benchmarks/triton_compile.py", "--arch", "80,90", "--output", str(output)]
    run = subprocess.run(command + (["--full"] if FULL else []), cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode == SKIP_STATUS:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    report = json.loads(output.read_text())
    rows = report["rows"]
    assert rows and all(row["ok"] for row in rows)
    assert {row["arch"] for row in rows} == {80, 90}
    # ptxas's report was read for every kernel (the figures are printed by the script, not judged here).
    assert all(isinstance(row.get("n_regs"), int) and row["n_regs"] > 0 for row in rows), rows[:3]
    print(run.stdout.splitlines()[-1])
