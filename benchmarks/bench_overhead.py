"""Where the fixed cost of one loss call goes: ``python benchmarks/bench_overhead.py`` times each
stage of a call of the native CPU backend on a tiny input, where what remains is per-call
overhead (stages and method: ``main``).
"""

import statistics
import time

import torch

import fastpref
from fastpref.loss import autograd, dispatch
from fastpref.loss.api import cached_config, scalar_keywords
from fastpref.loss.options import make_config, make_inputs


def interleaved_us(stages, calls=500, rounds=25, warmup=200):
    """``{name: (median, min) over rounds of the mean us per call}``; each round runs every stage."""
    for _, fn in stages:
        for _ in range(warmup):
            fn()
    samples = {name: [] for name, _ in stages}
    for _ in range(rounds):
        for name, fn in stages:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - begin) / calls * 1e6)
    return {name: (statistics.median(values), min(values)) for name, values in samples.items()}


def main():
    """Time each stage of a call on a tiny input (B=2, S=(1,2,2), K=2, fp32), where the kernels'
    own work is negligible: argument checks, dispatch, the autograd plumbing and the autograd
    engine running the backward. Needs the native CPU backend (``native``); stops with the reason
    when it is not built.

    The public call runs twice: through ``fastpref::native_loss`` (the C++ autograd kernel, the
    eager default) and through ``fastpref.loss.autograd.FusedAdaptiveDPO`` (the Python
    autograd.Function the Triton backend uses; here ``fastpref.loss.native.run`` is swapped for
    ``autograd.run(native.OPS, ...)``). Stages are timed in interleaved rounds (every stage once
    per round), so that load from other processes spreads over all stages alike; the median and
    the fastest round are reported (on a busy machine the fastest is the better estimate of the
    cost itself). Compare ratios within one run.
    """
    reason = fastpref.availability("cpu")["native"]
    if reason is not None:
        raise SystemExit(f"the native backend is unavailable: {reason}")
    batch, shape = 2, (1, 2, 2)
    stages = call_stages(batch, shape)
    print_times(stages, interleaved_us(stages), batch, shape)


def call_stages(batch: int, shape: tuple):
    """``[(name, function)]``: each stage of a loss call on one tiny input of ``batch`` pairs of
    ``shape`` latents and K = 2, as :func:`main` times them."""
    from fastpref.loss import native

    model_pred = torch.randn(2 * batch, *shape, requires_grad=True)
    ref_pred, target = torch.randn(2 * batch, *shape), torch.randn(batch, *shape)
    emas = [torch.randn(2 * batch, *shape) for _ in range(2)]
    keywords = scalar_keywords(fastpref.adaptive_dpo_loss)
    values = tuple(keywords.values())
    config = make_config(**keywords)
    labels = dict(synthetic_label=None, human_label=None, human_mask=None, propensity=None)
    inputs = make_inputs(model_pred, ref_pred, target, emas, config, labels)
    settings, modes = autograd.encode(config)
    forward_op, backward_op = native.OPS
    loss, coef, *_ = forward_op(model_pred.detach(), ref_pred, target, emas, None, settings, modes)
    ones = torch.ones_like(loss)

    def function_loss():
        out = autograd.FusedAdaptiveDPO.apply(native.OPS, model_pred, ref_pred, target, None, settings, modes, *emas)
        return out[0]

    def native_loss():
        return native.LOSS_OP(model_pred, ref_pred, target, emas, None, settings, modes)[0]

    def public_loss():
        return fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas)

    def python_run(inputs, config, return_stats):
        return autograd.run(native.OPS, inputs, config, return_stats)

    def python_path(fn):
        def call():
            real_run = native.run
            native.run = python_run
            try:
                return fn()
            finally:
                native.run = real_run

        return call

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), model_pred)

    stages = [
        ("make_config (uncached)", lambda: make_config(**keywords)),
        ("cached_config", lambda: cached_config(values)),
        ("autograd.encode", lambda: autograd.encode(config)),
        ("make_inputs", lambda: make_inputs(model_pred, ref_pred, target, emas, config, labels)),
        ("dispatch.select", lambda: dispatch.select("auto", inputs)),
        ("forward op alone", lambda: forward_op(model_pred.detach(), ref_pred, target, emas, None, settings, modes)),
        ("backward op alone", lambda: backward_op(ones, coef, model_pred.detach(), target)),
        ("autograd.Function forward", function_loss),
        ("autograd.Function fwd + autograd.grad", fwd_bwd(function_loss)),
        ("native_loss op forward", native_loss),
        ("native_loss op fwd + autograd.grad", fwd_bwd(native_loss)),
        ("public call, forward (Python autograd)", python_path(public_loss)),
        ("public call, forward", public_loss),
        ("public call, fwd + autograd.grad (Python autograd)", python_path(fwd_bwd(public_loss))),
        ("public call, fwd + autograd.grad", fwd_bwd(public_loss)),
    ]
    return stages


def print_times(stages, times, batch: int, shape: tuple) -> None:
    """The table of ``times`` per stage, and the public call's C++ over Python autograd ratios."""
    print(
        f"# per-call cost on a tiny input (B={batch}, S={shape}, K=2, fp32), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("# interleaved rounds; '(Python autograd)' = the two ops through fastpref.loss.autograd.FusedAdaptiveDPO\n")
    print("| stage | us per call, median | fastest round |\n|---|---|---|")
    for name, _ in stages:
        print(f"| {name} | {times[name][0]:.1f} | {times[name][1]:.1f} |")
    print()
    for what in ("forward", "fwd + autograd.grad"):
        old, new = times[f"public call, {what} (Python autograd)"], times[f"public call, {what}"]
        print(
            f"public call, {what}: C++ autograd / Python autograd = {new[0] / old[0]:.2f} median "
            f"({new[0]:.1f} vs {old[0]:.1f} us), {new[1] / old[1]:.2f} fastest ({new[1]:.1f} vs {old[1]:.1f} us)"
        )


if __name__ == "__main__":
    main()
