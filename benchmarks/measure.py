"""Measurements the benchmarks take: wall time per call, device time under CUDA-graph replay,
the bandwidth of a plain copy to compare against, and the peak memory of a step."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, Optional


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
