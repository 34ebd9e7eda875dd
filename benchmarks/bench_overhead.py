"""Where the fixed cost of one loss call goes: ``python benchmarks/bench_overhead.py``.

Times each stage of a call on a tiny input (B=2, S=(1,2,2), K=2, fp32), where the kernels' own
work is negligible, so what remains is per-call overhead: argument checks, dispatch, the
autograd.Function and the autograd engine running the Python backward. Uses the native CPU
backend (``cpp``) when it is built, else stops with the reason.
"""

import time

import torch

import fastpref
from fastpref import dispatch, fused
from fastpref.frontend import cached_config, scalar_keywords
from fastpref.validation import make_config, make_inputs


def per_call_us(fn, calls=3000, warmup=300):
    for _ in range(warmup):
        fn()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls * 1e6


def main():
    reason = fastpref.availability("cpu")["cpp"]
    if reason is not None:
        raise SystemExit(f"the cpp backend is unavailable: {reason}")
    from fastpref import cpp_backend

    batch, shape = 2, (1, 2, 2)
    model_pred = torch.randn(2 * batch, *shape, requires_grad=True)
    ref_pred, target = torch.randn(2 * batch, *shape), torch.randn(batch, *shape)
    emas = [torch.randn(2 * batch, *shape) for _ in range(2)]
    keywords = scalar_keywords(fastpref.adaptive_dpo_loss)
    config = make_config(**keywords)
    labels = dict(synthetic_label=None, human_label=None, human_mask=None, propensity=None)
    inputs = make_inputs(model_pred, ref_pred, target, emas, config, labels)
    settings, modes = fused.encode(config)
    forward_op, backward_op = cpp_backend.OPS
    loss, coef, *_ = forward_op(model_pred.detach(), ref_pred, target, emas, None, settings, modes)
    ones = torch.ones_like(loss)

    def function_loss():
        return fused.FusedAdaptiveDPO.apply(cpp_backend.OPS, model_pred, ref_pred, target, None, settings, modes, *emas)[0]

    stages = [
        ("make_config (uncached)", lambda: make_config(**keywords)),
        ("cached_config", lambda: cached_config(**keywords)),
        ("make_inputs", lambda: make_inputs(model_pred, ref_pred, target, emas, config, labels)),
        ("dispatch.select", lambda: dispatch.select("auto", inputs)),
        ("forward op alone", lambda: forward_op(model_pred.detach(), ref_pred, target, emas, None, settings, modes)),
        ("backward op alone", lambda: backward_op(ones, coef, model_pred.detach(), target)),
        ("autograd.Function forward", function_loss),
        ("autograd.Function fwd + autograd.grad", lambda: torch.autograd.grad(function_loss(), model_pred)),
        ("public call, forward", lambda: fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas)),
        ("public call, fwd + autograd.grad", lambda: torch.autograd.grad(fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas), model_pred)),
    ]
    print(f"# per-call cost on a tiny input (B={batch}, S={shape}, K=2, fp32), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| stage | us per call |\n|---|---|")
    for name, fn in stages:
        print(f"| {name} | {per_call_us(fn):.1f} |")


if __name__ == "__main__":
    main()
