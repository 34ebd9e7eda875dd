"""Parity check and timing table of the fastpref loss against eager PyTorch and torch.compile.

Run as ``python benchmarks/bench_loss.py [--quick]``: prints two markdown tables (what they hold:
``main``) and writes JSON to ``benchmarks/results/<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from fastpref.machine import device_name

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
# The module of each fast backend; its OPS are the (forward, backward) ops timed bare.
BACKEND_MODULES = {"triton": "fastpref.loss.triton.ops", "native": "fastpref.loss.native"}


def _prepare_environment():
    """Let the Triton kernels run (interpreted) on a machine without CUDA; must precede the
    first import of triton."""
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``B`` pairs of ``[*S]`` latents, K EMA models, one dtype."""

    name: str
    batch: int
    shape: tuple
    ema: int
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.name} B={self.batch} K={self.ema} {DTYPE_NAMES[self.dtype]}"


def full_cases() -> List[Case]:
    """SD1.5 B = 8/64 and SDXL B = 8/32 latents, fp32 and bf16, K = 0 and 2; Adaptive K = 2 in
    bf16 first, then fp32, then K = 0, so that a run cut short by ``--time-budget`` keeps the
    Adaptive-DPO cases (K = 2) ahead of the Diffusion-DPO ones (K = 0)."""
    cases = []
    for ema in (2, 0):
        for dtype in ("bfloat16", "float32"):
            for name, shape, batches in (("SD1.5", (4, 64, 64), (8, 64)), ("SDXL", (4, 128, 128), (8, 32))):
                for batch in batches:
                    cases.append(Case(name, batch, shape, ema, dtype))
    return cases


def quick_cases() -> List[Case]:
    return [Case("SD1.5", 8, (4, 64, 64), 2, "float32"), Case("SD1.5", 8, (4, 64, 64), 2, "bfloat16")]


def make_inputs(case: Case, device, seed: int = 0):
    """Inputs of a case: policy/ref/EMA predictions near a shared target, as in training."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    rows = (2 * case.batch, *case.shape)
    target = torch.randn((case.batch, *case.shape), generator=gen)
    base = torch.cat([target, target]) + 0.9 * torch.randn(rows, generator=gen)

    def near(scale):
        return (base + scale * torch.randn(rows, generator=gen)).to(device=device, dtype=dtype)

    model_pred = near(0.05).requires_grad_(True)
    ref_pred = near(0.05)
    emas = [near(0.05) for _ in range(case.ema)]
    return model_pred, ref_pred, target.to(device=device, dtype=dtype), emas


def traffic_bytes(case: Case) -> Dict[str, int]:
    """Minimal bytes moved: forward reads every prediction and the shared target once; backward
    reads model_pred and the target and writes the gradient; fwd+bwd reads all inputs once and
    writes the gradient once."""
    import torch

    item = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    sample = math.prod(case.shape) * item
    preds = (2 + case.ema) * 2 * case.batch * sample
    target = case.batch * sample
    grad = 2 * case.batch * sample
    return {"fwd": preds + target, "bwd": grad + target + grad, "fwd+bwd": preds + target + grad}


class Timer:
    """Wall time per call: ``perf_counter`` on CPU, CUDA events on GPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], None], setup: Optional[Callable[[], object]], reps: int) -> float:
        import torch

        total = 0.0
        for _ in range(reps):
            state = setup() if setup else None
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(state)
                end.record()
                torch.cuda.synchronize()
                total += start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                fn(state)
                total += time.perf_counter() - begin
        return total / reps


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2: the CPU profiler's native logger writes a line to it at every
    start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(step: Callable[[], None], device) -> int:
    """Peak memory allocated by ``step`` above what was allocated before it: the CUDA caching
    allocator's statistics on GPU, the running sum of the profiler's allocation events on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak


def copy_bandwidth(num_bytes: int, device, timer: Timer, reps: int, graph: bool = False) -> Optional[float]:
    """GB/s of ``dst.copy_(src)`` moving ``num_bytes`` in all (half read, half written): per call
    (``timer``), or with ``graph`` per replay of a CUDA graph of it (:func:`graph_seconds`)."""
    import torch

    half = max(1, num_bytes // 2 // 4)
    src = torch.randn(half, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if graph:
        seconds = graph_seconds(lambda: dst.copy_(src), reps)
        return None if seconds is None else 2 * half * 4 / seconds / 1e9
    seconds = statistics.median(timer(lambda _: dst.copy_(src), None, reps) for _ in range(5))
    return 2 * half * 4 / seconds / 1e9


GRAPH_ERRORS: Dict[str, str] = {}  # what failed to capture in a CUDA graph, and why


def graph_seconds(fn: Callable[[], object], reps: int, name: str = "copy") -> Optional[float]:
    """Device time per call of ``fn`` captured in a CUDA graph and replayed ``reps`` times back
    to back (median of 3 such runs): the kernels' own time, with no launch overhead between them.
    ``None`` when capture fails (the reason goes to ``GRAPH_ERRORS[name]``)."""
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as error:  # e.g. a host sync inside fn
        GRAPH_ERRORS[name] = f"{type(error).__name__}: {error}"[:300]
        torch.cuda.synchronize()
        return None
    runs = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(runs)


def loss_callables(case: Case, device, backends: List[str]):
    """name -> loss function of (model_pred, ref_pred, target, emas), for every implementation
    timed: eager reference, torch.compile of the reference, each fast backend, and each fast
    backend's bare ops ("<backend> ops": the forward and backward ops called directly, without
    argument checks and the autograd engine, i.e. the kernels' own time)."""
    import importlib

    import torch

    import fastpref
    from fastpref.loss import autograd
    from fastpref.loss.api import scalar_keywords
    from fastpref.loss.options import make_config

    def eager(mp, rp, t, e):
        return fastpref.reference.adaptive_dpo_loss(mp, rp, t, ema_preds=e)

    torch._dynamo.reset()  # a fresh compile per case: one code object serves every shape/dtype
    impls = {"eager": eager, "compile": torch.compile(eager, fullgraph=True)}
    for backend in backends:
        impls[f"fastpref-{backend}"] = lambda mp, rp, t, e, b=backend: fastpref.adaptive_dpo_loss(
            mp, rp, t, ema_preds=e, backend=b
        )
    settings, modes = autograd.encode(make_config(**scalar_keywords(fastpref.adaptive_dpo_loss)))
    for backend in backends:
        forward_op, backward_op = importlib.import_module(BACKEND_MODULES[backend]).OPS
        impls[f"{backend} ops"] = _BareOps(forward_op, backward_op, settings, modes)
    return impls


class _BareOps:
    """A backend's forward and backward ops called directly: ``__call__`` runs the forward and
    returns a loss-like handle whose gradient ``gradient`` computes with the backward op."""

    def __init__(self, forward_op, backward_op, settings, modes):
        self.forward_op, self.backward_op, self.settings, self.modes = forward_op, backward_op, settings, modes

    def __call__(self, mp, rp, t, e):
        loss, coef, *_ = self.forward_op(mp.detach(), rp, t, e, None, self.settings, self.modes)
        return _BareLoss(self, loss, coef, mp, t)


class _BareLoss:
    def __init__(self, ops, loss, coef, mp, t):
        self.ops, self.loss, self.coef, self.mp, self.t = ops, loss, coef, mp, t


def gradient(loss, model_pred):
    """d loss / d model_pred: autograd for real losses, the backward op for bare-op handles."""
    import torch

    if isinstance(loss, _BareLoss):
        return loss.ops.backward_op(torch.ones_like(loss.loss), loss.coef, loss.mp.detach(), loss.t)
    return torch.autograd.grad(loss, model_pred)


def time_case(case: Case, device, backends: List[str], rounds: int, reps: int) -> List[dict]:
    """One row per implementation and pass of ``case``: wall time per call (median of
    ``rounds`` interleaved rounds of ``reps`` calls), bandwidth against a copy, peak memory, and
    on CUDA the kernel time under graph replay."""
    import torch

    timer = Timer(device)
    mp, rp, t, e = make_inputs(case, device)
    impls = loss_callables(case, device, backends)
    # Gradients through torch.autograd.grad, as inside a UNet's backward: nothing accumulates
    # into a .grad buffer.
    passes = {
        "fwd": (lambda f: lambda _: f(mp, rp, t, e), None),
        "bwd": (lambda f: lambda loss: gradient(loss, mp), lambda f: lambda: f(mp, rp, t, e)),
        "fwd+bwd": (lambda f: lambda _: gradient(f(mp, rp, t, e), mp), None),
    }
    for fn in impls.values():  # warm up (compile, JIT, caches)
        for _ in range(3):
            gradient(fn(mp, rp, t, e), mp)
    samples = {(name, p): [] for name in impls for p in passes}
    for _ in range(rounds):  # interleaved: every implementation sees the same machine state
        for name, fn in impls.items():
            for p, (make_fn, make_setup) in passes.items():
                setup = make_setup(fn) if make_setup else None
                samples[(name, p)].append(timer(make_fn(fn), setup, reps))
    traffic = traffic_bytes(case)
    bandwidth = {p: copy_bandwidth(traffic[p], device, timer, reps) for p in passes}
    # Kernel time under CUDA-graph replay (forward, forward + backward), against a copy replayed
    # the same way.
    graph, graph_copy = {}, {}
    if torch.device(device).type == "cuda":
        for name, fn in impls.items():
            graph[(name, "fwd")] = graph_seconds(lambda f=fn: f(mp, rp, t, e), reps, f"{case.label} {name} fwd")
            graph[(name, "fwd+bwd")] = graph_seconds(
                lambda f=fn: gradient(f(mp, rp, t, e), mp), reps, f"{case.label} {name} fwd+bwd"
            )
        graph_copy = {p: copy_bandwidth(traffic[p], device, timer, reps, graph=True) for p in ("fwd", "fwd+bwd")}
    # fwd+bwd peak memory above the inputs; the gradient itself (kept until the step ends) counts.
    peak = {name: peak_extra_bytes(lambda f=fn: gradient(f(mp, rp, t, e), mp), device) for name, fn in impls.items()}
    grad_bytes = mp.numel() * mp.element_size()
    rows = []
    for (name, p), values in samples.items():
        seconds = statistics.median(values)
        gbps = traffic[p] / seconds / 1e9
        replay = graph.get((name, p))
        replay_gbps = traffic[p] / replay / 1e9 if replay else None
        rows.append(
            {
                "case": case.label,
                "impl": name,
                "pass": p,
                "ms": seconds * 1e3,
                "vs_eager": statistics.median(samples[("eager", p)]) / seconds,
                "vs_compile": statistics.median(samples[("compile", p)]) / seconds,
                "traffic_MiB": traffic[p] / 2**20,
                "GBps": gbps,
                "copy_GBps": bandwidth[p],
                "pct_of_copy": 100 * gbps / bandwidth[p],
                "peak_extra_MiB": peak[name] / 2**20 if p == "fwd+bwd" else None,
                "peak_x_grad": peak[name] / grad_bytes if p == "fwd+bwd" else None,
                "graph_ms": replay * 1e3 if replay else None,
                "graph_GBps": replay_gbps,
                "graph_copy_GBps": graph_copy.get(p),
                "graph_pct_of_copy": 100 * replay_gbps / graph_copy[p] if replay_gbps and graph_copy.get(p) else None,
            }
        )
    return rows


PARITY_SEEDS = 4
# Accumulation is float32 for every input dtype but float64, so fp32's epsilon sets the atol.
PARITY_ATOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-5, "float16": 1e-5}


def parity_rows(device, backends: List[str]) -> List[dict]:
    """Each backend against the float64 reference on Adaptive-DPO cases (K=2), per dtype: the
    max error of the loss and the gradient over a few seeds, and the test suite's bound
    ``2 * (eager's max error) + atol * scale``. Several seeds matter: for one scalar, which of
    two float32 summation orders lands closer to float64 is a coin flip."""
    import torch

    import fastpref

    rows = []
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        case = Case("parity", 8, (4, 8, 8), 2, dtype)
        worst = {}  # (backend, "loss" | "grad") -> max error over seeds
        scale = {"loss": 0.0, "grad": 0.0}
        for seed in range(PARITY_SEEDS):
            mp, rp, t, e = make_inputs(case, device, seed=seed)

            def run(backend, upcast):
                x = [v.detach().double() if upcast else v.detach() for v in (mp, rp, t)]
                ema = [v.double() if upcast else v for v in e]
                x[0].requires_grad_(True)
                loss = fastpref.adaptive_dpo_loss(x[0], x[1], x[2], ema_preds=ema, backend=backend)
                (grad,) = torch.autograd.grad(loss, x[0])
                return loss.double(), grad.double()

            ref = run("torch", upcast=True)
            scale["loss"] = max(scale["loss"], ref[0].abs().item())
            scale["grad"] = max(scale["grad"], ref[1].abs().max().item())
            for backend in ["eager"] + backends:
                out = run("torch" if backend == "eager" else backend, upcast=False)
                for what, value, expected in zip(("loss", "grad"), out, ref):
                    err = (value - expected).abs().max().item()
                    worst[(backend, what)] = max(worst.get((backend, what), 0.0), err)
        for backend in backends:
            row = {"backend": backend, "dtype": DTYPE_NAMES[dtype]}
            for what in ("loss", "grad"):
                row[f"{what}_err"] = worst[(backend, what)]
                row[f"{what}_bound"] = 2 * worst[("eager", what)] + PARITY_ATOL[dtype] * max(1.0, scale[what])
            row["ok"] = row["loss_err"] <= row["loss_bound"] and row["grad_err"] <= row["grad_bound"]
            rows.append(row)
    return rows


def markdown(rows: List[dict], columns: List[str], formats: Dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["-" if row[c] is None else formats.get(c, "{}").format(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of :func:`main` (checked: the GPU suite's dry run parses its arguments here)."""
    parser = argparse.ArgumentParser(prog="benchmarks/bench_loss.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two SD1.5 cases (fp32, bf16, K=2): under a minute")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (median taken)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    parser.add_argument("--no-timing", action="store_true", help="parity check only")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no new timing case after this (the rest are listed as skipped in the JSON)",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error("--time-budget must be > 0 seconds")
    return args


def main(argv=None) -> int:
    """Print and record two tables:

    1. parity: each available backend against the float64 reference, per dtype, with the bound
       ``|backend - ref64| <= 2 * |eager - ref64| + atol`` of the test suite;
    2. timing: forward, backward and forward+backward of the eager reference, ``torch.compile`` of
       the reference and each fast backend, interleaved round-robin in one process (median of
       rounds), with speedups over eager and compile, achieved bandwidth of the minimal traffic
       (read every input once, write the gradient once) against a copy of the same number of
       bytes measured in the same run, and (fwd+bwd rows) the peak memory allocated above the
       inputs, in MiB and as a multiple of the gradient's size. On CUDA also the kernel time
       under CUDA-graph replay (fwd and fwd+bwd) and its bandwidth against a replayed copy.
       ``--time-budget`` stops starting new cases (they are listed as skipped).

    Without CUDA, the Triton kernels run under Triton's CPU interpreter for the parity check only
    (they are far too slow there to time); ``TRITON_INTERPRET=1`` is set for that.
    """
    args = parse_args(argv)
    started = time.perf_counter()

    _prepare_environment()
    import torch

    import fastpref

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = {name: reason for name, reason in fastpref.availability(device).items()}
    parity_backends = [name for name, reason in available.items() if reason is None]
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    timed_backends = [b for b in parity_backends if b != "torch" and not (b == "triton" and interpreted)]
    name = device_name(device)
    print(f"# fastpref {fastpref.__version__} benchmark on {name}, torch {torch.__version__}\n")
    for backend, reason in available.items():
        print(f"- backend {backend}: {'available' if reason is None else 'unavailable: ' + reason}")
    if interpreted:
        print("- triton runs under TRITON_INTERPRET=1 here: parity only, not timed")

    print(f"\n## Parity against the float64 reference (Adaptive-DPO, K=2, [16,4,8,8], max over {PARITY_SEEDS} seeds)\n")
    parity = parity_rows(device, parity_backends)
    fmt = {"loss_err": "{:.2e}", "loss_bound": "{:.2e}", "grad_err": "{:.2e}", "grad_bound": "{:.2e}"}
    print(markdown(parity, ["backend", "dtype", "loss_err", "loss_bound", "grad_err", "grad_bound", "ok"], fmt))

    timing, skipped = [], []
    if not args.no_timing:
        cases = quick_cases() if args.quick else full_cases()
        rounds = args.rounds or (5 if args.quick else 7)
        reps = 5 if device.type == "cpu" else 20
        print(
            "\n## Timing, Adaptive-DPO (preset official, linear W, quadratic margin), "
            f"median of {rounds} interleaved rounds\n"
        )
        for case in cases:
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                skipped.append(case.label)
                continue
            timing += time_case(case, device, timed_backends, rounds, reps)
        columns = [
            "case",
            "impl",
            "pass",
            "ms",
            "vs_eager",
            "vs_compile",
            "GBps",
            "copy_GBps",
            "pct_of_copy",
            "peak_extra_MiB",
            "peak_x_grad",
        ]
        if device.type == "cuda":
            columns += ["graph_ms", "graph_GBps", "graph_pct_of_copy"]
        fmt = {
            "ms": "{:.3f}",
            "vs_eager": "{:.2f}x",
            "vs_compile": "{:.2f}x",
            "GBps": "{:.1f}",
            "copy_GBps": "{:.1f}",
            "pct_of_copy": "{:.0f}%",
            "peak_extra_MiB": "{:.1f}",
            "peak_x_grad": "{:.2f}x",
            "graph_ms": "{:.4f}",
            "graph_GBps": "{:.1f}",
            "graph_pct_of_copy": "{:.0f}%",
        }
        print(markdown(timing, columns, fmt))
        if skipped:
            print(f"\nnot timed (--time-budget {args.time_budget:g} s reached): {', '.join(skipped)}")
        for what, error in GRAPH_ERRORS.items():
            print(f"- no CUDA graph of {what}: {error}")

    output = (
        Path(args.output)
        if args.output
        else Path("benchmarks/results") / f"{'quick-' if args.quick else ''}{_slug(name)}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name,
        "torch": torch.__version__,
        "fastpref": fastpref.__version__,
        "command": " ".join(["python", "benchmarks/bench_loss.py", *(sys.argv[1:] if argv is None else argv)]),
        "backends": available,
        "parity": parity,
        "timing": timing,
        "skipped_cases": skipped,
        "graph_errors": GRAPH_ERRORS,
        "wall_s": time.perf_counter() - started,
    }
    output.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {output}")
    return 0 if all(row["ok"] for row in parity) else 1


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:60]


if __name__ == "__main__":
    sys.exit(main())
