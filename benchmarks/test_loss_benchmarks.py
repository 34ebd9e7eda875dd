"""pytest-benchmark suite of the loss: ``.venv/bin/python -m pytest benchmarks/ --benchmark-only``.

Forward, backward and forward+backward of the implementations that ``benchmarks/bench_loss.py``
times (eager reference, ``torch.compile`` of it, each fast backend available on the device and its
bare ops), on its shapes (``--quick`` cases by default; ``FASTPREF_BENCH_FULL=1`` for all). Speed
is reported here, never asserted; ``bench_loss.py`` prints the same comparison as one interleaved
table with bandwidth figures.
"""

import os

import pytest
import torch
from bench_loss import full_cases, gradient, loss_callables, make_inputs, quick_cases

import fastpref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = full_cases() if os.environ.get("FASTPREF_BENCH_FULL") == "1" else quick_cases()
FAST = [name for name, reason in fastpref.availability(DEVICE).items() if reason is None and name != "torch"]
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
    FAST = [name for name in FAST if name != "triton"]  # interpreted kernels: far too slow to time
IMPLS = ["eager", "compile"] + [f"fastpref-{name}" for name in FAST] + [f"{name} ops" for name in FAST]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["fwd", "bwd", "fwd+bwd"])
def test_loss(benchmark, case, impl, which):
    model_pred, ref_pred, target, emas = make_inputs(case, DEVICE)
    fn = loss_callables(case, DEVICE, FAST)[impl]
    gradient(fn(model_pred, ref_pred, target, emas), model_pred)  # warm-up / compile
    benchmark.group = f"{case.label} {which}"

    if which == "fwd":

        def run():
            fn(model_pred, ref_pred, target, emas)
            _sync()

        benchmark(run)
    elif which == "bwd":

        def setup():
            return (fn(model_pred, ref_pred, target, emas),), {}

        def run(loss):
            gradient(loss, model_pred)
            _sync()

        benchmark.pedantic(run, setup=setup, rounds=50, warmup_rounds=3)
    else:

        def run():
            gradient(fn(model_pred, ref_pred, target, emas), model_pred)
            _sync()

        benchmark(run)
