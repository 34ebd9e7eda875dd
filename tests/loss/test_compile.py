"""``torch.compile`` and ``torch.library`` contracts: a compiled training step (fullgraph=True)
matches eager, and the Triton custom ops pass ``torch.library.opcheck``."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import BACKENDS, DEVICE, loss_config, make_case

import fastpref
import fastpref.loss.autograd

HAS_TRITON = "triton" in BACKENDS
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason=f"triton unavailable: {fastpref.availability(DEVICE)['triton']}"
)
# "triton" and "torch" always (triton skipped, with its reason, where unavailable), and any other
# available backend (e.g. "native") as it appears.
COMPILE_BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"] + [
    b for b in BACKENDS if b not in ("triton", "torch")
]
# Backends made of a forward and a backward torch.library op (the OPS of the backend's module,
# registered by importing it).
FUSED_BACKENDS = [b for b in BACKENDS if b != "torch"]
# The module of each, whose OPS are its (forward, backward) ops.
BACKEND_MODULES = {"triton": "fastpref.loss.triton.ops", "native": "fastpref.loss.native"}


def fused_op(backend: str, which: str):
    """The backend's ``which`` ("forward" or "backward") op, registered by importing its module."""
    return importlib.import_module(BACKEND_MODULES[backend]).OPS[("forward", "backward").index(which)]


BATCH, SHAPE, K = 2, (3, 5, 7), 2


class TinyDenoiser(torch.nn.Module):
    """A conv and a linear layer: enough parameters for the loss's gradient to flow into."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(SHAPE[0], SHAPE[0], 3, padding=1)
        self.mix = torch.nn.Linear(SHAPE[2], SHAPE[2])

    def forward(self, x):
        return self.mix(torch.tanh(self.conv(x)))


def make_step(backend: str, **keywords):
    def step(net, x, ref, target, ema):
        pred = net(x)
        loss, stats = fastpref.adaptive_dpo_loss(
            pred, ref, target, ema_preds=ema, beta=5.0, backend=backend, return_stats=True, **keywords
        )
        return loss, stats["logits"], stats["weight"], stats["implicit_acc"]

    return step


def _data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * BATCH
    x = torch.randn(rows, *SHAPE, generator=gen).to(DEVICE)
    target = torch.randn(BATCH, *SHAPE, generator=gen).to(DEVICE)  # shared by both halves
    ref = (torch.cat([target, target]) + torch.randn(rows, *SHAPE, generator=gen).to(DEVICE)) * 0.5
    ema = torch.randn(K, rows, *SHAPE, generator=gen).to(DEVICE) * 0.5
    return x, ref, target, ema


def _train(step, steps: int = 2, **keywords):
    """Two SGD steps from a fixed init: the per-step losses, stats and final parameters."""
    torch.manual_seed(0)
    net = TinyDenoiser().to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    history = []
    for i in range(steps):
        x, ref, target, ema = _data(100 + i)
        opt.zero_grad(set_to_none=True)
        loss, logits, weight, acc = step(net, x, ref, target, ema)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
        history.append((loss.detach(), logits, weight, float(acc), grads))
        opt.step()
    return history, {name: p.detach().clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_training_step_matches_eager(backend, reduction):
    torch._dynamo.reset()
    eager_step = make_step(backend, reduction=reduction)
    compiled_step = torch.compile(make_step(backend, reduction=reduction), fullgraph=True)

    def reduce(step):
        def run(*args):
            loss, *rest = step(*args)
            return (loss.sum() if reduction == "none" else loss, *rest)

        return run

    eager_hist, eager_params = _train(reduce(eager_step))
    comp_hist, comp_params = _train(reduce(compiled_step))
    for (l_e, z_e, w_e, a_e, g_e), (l_c, z_c, w_c, a_c, g_c) in zip(eager_hist, comp_hist):
        torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z_c, z_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w_c, w_e, rtol=1e-5, atol=1e-6)
        assert a_c == a_e
        for name in g_e:
            assert g_e[name].abs().max() > 0, name  # the loss does reach every parameter
            torch.testing.assert_close(
                g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}"
            )
    for name in eager_params:
        torch.testing.assert_close(comp_params[name], eager_params[name], rtol=1e-5, atol=1e-6)


@needs_triton
def test_compiled_triton_matches_torch_backend():
    """Compiled with the Triton backend vs eager with the reference: same step, same numbers."""
    torch._dynamo.reset()
    compiled = torch.compile(make_step("triton", preset="paper", loss_type="cdpo"), fullgraph=True)
    eager = make_step("torch", preset="paper", loss_type="cdpo")
    hist_c, params_c = _train(compiled)
    hist_e, params_e = _train(eager)
    for (l_c, z_c, *_rest_c, g_c), (l_e, z_e, *_rest_e, g_e) in zip(hist_c, hist_e):
        torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
        for name in g_e:
            torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck on the custom ops
# ---------------------------------------------------------------------------------------------


def _forward_samples():
    from fastpref.loss.options import make_inputs

    samples = []
    specs = [
        ("f32-K0-mean", dict(dtype=torch.float32, k=0), dict()),
        (
            "f64-K2-paper-none-shared",
            dict(dtype=torch.float64, k=2, ema_form="list", shared_target=True),
            dict(preset="paper", reduction="none", c2=0.1),
        ),
        (
            "bf16-f32target-K3-dedpo-sum",
            dict(
                dtype=dict(model=torch.bfloat16, ref=torch.bfloat16, target=torch.float32, ema=torch.bfloat16),
                k=3,
                labels=True,
            ),
            dict(loss_type="dedpo", reduction="sum"),
        ),
        (
            "f32-K5-strided-hinge",
            dict(dtype=torch.float32, k=5, layout="batch_strided"),
            dict(loss_type="hinge", weighting="square"),
        ),
    ]
    for name, case_kw, config_kw in specs:
        case = make_case(batch=BATCH, shape=SHAPE, seed=31, **case_kw)
        model, ref, target, ema = case.build(requires_grad=False)
        config = loss_config(beta=5.0, **config_kw)
        labels = case.label_kwargs() if config.loss_type == "dedpo" else {}
        inputs = make_inputs(
            model,
            ref,
            target,
            ema,
            config,
            {**dict.fromkeys(("synthetic_label", "human_label", "human_mask", "propensity")), **labels},
        )
        settings, modes = fastpref.loss.autograd.encode(config)
        args = (
            inputs.model_pred,
            inputs.ref_pred,
            inputs.target,
            list(inputs.ema_preds),
            inputs.soft_label,
            settings,
            modes,
        )
        samples.append(pytest.param(args, id=name))
    return samples


@pytest.mark.parametrize("args", _forward_samples())
@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=needs_triton)] + [b for b in FUSED_BACKENDS if b != "triton"]
)
def test_opcheck_forward(backend, args):
    """``torch.ops.fastpref.triton_forward`` (and the forward op of any other fused backend)."""
    torch.library.opcheck(fused_op(backend, "forward"), args)


def _backward_samples():
    samples = []
    for name, dtype, shared, none in [
        ("f32-scalar-grad", torch.float32, False, False),
        ("bf16-per-pair-grad-shared", torch.bfloat16, True, True),
        ("f64-per-pair-grad", torch.float64, False, True),
    ]:
        case = make_case(batch=BATCH, shape=SHAPE, k=0, dtype=dtype, shared_target=shared, seed=37)
        model, _, target, _ = case.build(requires_grad=False)
        acc = case.acc_dtype
        gen = torch.Generator().manual_seed(5)
        coef = torch.randn(BATCH, generator=gen, dtype=acc).to(DEVICE)
        grad_loss = (torch.randn(BATCH, generator=gen, dtype=acc) if none else torch.tensor(0.75, dtype=acc)).to(DEVICE)
        samples.append(pytest.param((grad_loss, coef, model, target), id=name))
    return samples


@pytest.mark.parametrize("args", _backward_samples())
@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=needs_triton)] + [b for b in FUSED_BACKENDS if b != "triton"]
)
def test_opcheck_backward(backend, args):
    """``torch.ops.fastpref.triton_backward`` (and the backward op of any other fused backend)."""
    torch.library.opcheck(fused_op(backend, "backward"), args)


@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=needs_triton)] + [b for b in FUSED_BACKENDS if b != "triton"]
)
def test_backward_op_values(backend):
    """The backward op computes docs/spec.md §6 from a given a_j and incoming gradient."""
    ((grad_loss, coef, model, target),) = _backward_samples()[2].values
    grad = fused_op(backend, "backward")(grad_loss, coef, model, target)
    D = model[0].numel()
    scale = (coef * grad_loss).to(torch.float64)
    diff = (model - target).double().flatten(1)
    want = torch.cat([-scale[:, None] * diff[:BATCH], scale[:, None] * diff[BATCH:]]) * (2.0 / D)
    torch.testing.assert_close(grad.double().flatten(1), want, rtol=1e-12, atol=1e-14)
