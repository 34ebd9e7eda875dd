"""Numerical behaviour of every backend (docs/spec.md §6, §7): gradcheck in float64, extreme logits,
degenerate inputs, propagation of non-finite inputs, bitwise reproducibility."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    BACKENDS,
    DEVICE,
    TILED_BACKENDS,
    assert_close64,
    call_loss,
    make_case,
    outputs,
)

import fastpref
from fastpref.loss.options import LOSS_TYPES, PRESETS

REF = fastpref.reference.adaptive_dpo_loss


@functools.lru_cache(maxsize=None)
def serves(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` takes ``dtype`` inputs: a backend may refuse a dtype, but only with
    the RuntimeError of docs/spec.md §8 ("... cannot serve ..."); anything else is a failure."""
    case = make_case(batch=1, shape=(2,), k=0, dtype=dtype)
    model, ref, target, _ = case.build(requires_grad=False)
    try:
        fastpref.adaptive_dpo_loss(model, ref, target, backend=backend)
    except RuntimeError as err:
        if "cannot serve" in str(err):
            return False
        raise
    return True


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------

# gradcheck differentiates through everything, while W, Gamma and c2 are stop-gradient (docs/spec.md §6),
# so these configs hold W and Gamma constant but non-trivial: k1 = 0 with the sigmoid weighting
# gives W = 1/2, and a linear margin with k2 = 0 and a given c2 gives Gamma = c2.
CONSTANT_WG = dict(weighting="sigmoid", k1=0.0, margin="linear", k2=0.0, c2=0.05)
GRADCHECK_CONFIGS = {
    "sigmoid": dict(loss_type="sigmoid", **CONSTANT_WG),
    "sigmoid_plain": dict(loss_type="sigmoid", weighting="none", margin="none"),
    "ipo": dict(loss_type="ipo", ipo_tau=0.7, **CONSTANT_WG),
    "hinge": dict(loss_type="hinge", **CONSTANT_WG),
    "robust": dict(loss_type="robust", eps=0.2, **CONSTANT_WG),
    "cdpo": dict(loss_type="cdpo", eps=0.15, **CONSTANT_WG),
    "dedpo": dict(loss_type="dedpo", **CONSTANT_WG),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", sorted(GRADCHECK_CONFIGS))
def test_gradcheck(backend, name, reduction):
    if not serves(backend, torch.float64):
        pytest.skip(f"{backend} does not take float64 inputs")
    case = make_case(batch=2, shape=(3,), k=2, shared_target=reduction == "none", labels=name == "dedpo", seed=21)
    _, ref, target, ema = case.build(upcast=True, requires_grad=False)
    model = case.build(upcast=True)[0]
    config = dict(beta=3.0, reduction=reduction, backend=backend, **GRADCHECK_CONFIGS[name])
    if name == "dedpo":
        config.update(case.label_kwargs(upcast=True))
    # W and Gamma really are constant here, and hinge is away from its kink.
    _, stats = REF(
        model, ref, target, ema_preds=ema, return_stats=True, **{k: v for k, v in config.items() if k != "backend"}
    )
    if name != "sigmoid_plain":
        assert torch.equal(stats["weight"], torch.full_like(stats["weight"], 0.5))
        assert torch.equal(stats["margin"], torch.full_like(stats["margin"], 0.05))
    if name == "hinge":
        gap = 1 - (stats["logits"] - stats["margin"])
        assert gap.abs().min() > 1e-2 and (gap > 0).any(), gap  # off the kink, and not all pairs flat

    def fn(pred):
        return fastpref.adaptive_dpo_loss(pred, ref, target, ema_preds=ema, **config)

    assert torch.autograd.gradcheck(fn, (model,), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------


def test_double_backward(backend):
    """``create_graph=True`` (a gradient penalty): ``"torch"`` differentiates its gradient; the fused
    backends' gradient comes back with the bits of a plain backward, and differentiating it raises
    a RuntimeError saying it is not differentiable (never a silently dropped penalty)."""
    case = make_case(batch=2, shape=(3, 4), k=2, dtype=torch.float32, seed=5)
    model, ref, target, ema = case.build()

    def loss_of(pred):
        return fastpref.adaptive_dpo_loss(pred, ref, target, ema_preds=ema, beta=5.0, backend=backend)

    (want,) = torch.autograd.grad(loss_of(model), model)
    (grad,) = torch.autograd.grad(loss_of(model), model, create_graph=True)
    assert grad.requires_grad and torch.equal(grad.detach(), want)
    penalty = grad.square().sum()
    if backend == "torch":
        (second,) = torch.autograd.grad(penalty, model)
        assert torch.isfinite(second).all() and second.abs().max() > 0
    else:
        with pytest.raises(RuntimeError, match="differentiate twice: the gradient of the fused loss is not"):
            torch.autograd.grad(penalty, model)


# ---------------------------------------------------------------------------------------------
# Extreme logits
# ---------------------------------------------------------------------------------------------

# Pair 0's winner and pair 1's loser sit far from the target, so l ~ -offset^2 and +offset^2.
EXTREMES = {
    "z~1e4": dict(beta=1000.0, offsets=(3.0, 0.0, 0.0, 3.0)),  # |z| ~ 9e3
    "z~1e5": dict(beta=1e4, offsets=(3.0, 0.0, 0.0, 3.0)),  # |z| ~ 9e4
    "z~1e31": dict(beta=1e30, offsets=(3.0, 0.0, 0.0, 3.0)),  # still a float32
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("extreme", sorted(EXTREMES))
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits(backend, loss_type, preset, extreme, dtype):
    if not serves(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype} inputs")
    spec = EXTREMES[extreme]
    case = make_case(
        batch=2, shape=(3, 7, 9), k=2, dtype=dtype, offsets=spec["offsets"], labels=loss_type == "dedpo", seed=8
    )
    config = dict(beta=spec["beta"], preset=preset, loss_type=loss_type, reduction="none")
    upstream = torch.tensor([0.7, -1.3], dtype=torch.float64)
    loss, grad, stats, _ = call_loss(fastpref.adaptive_dpo_loss, case, config, backend=backend, upstream=upstream)
    loss64, grad64, stats64, _ = call_loss(REF, case, config, upcast=True, upstream=upstream)
    z = stats64["logits"]
    assert z.abs().min() > 0.5 * spec["beta"], z  # the case is as extreme as it says
    assert z[0] < 0 < z[1]
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad).all()
    for key in ("logits", "u", "weight", "margin"):
        assert torch.isfinite(stats[key]).all(), (key, stats[key])
    # And still the right values: the float64 oracle is stable at these logits.
    got, want = outputs(loss, grad, stats), outputs(loss64, grad64, stats64)
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for key in ("loss", "logits", "weight"):
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=rtol * (1e-6 + want[key].abs().max().item()))
    # grad: its dtype rounds it (bf16: 2^-8 relative), on top of the accumulation error.
    grad_tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    gmax = want["grad"].abs().max().item()
    assert (got["grad"] - want["grad"]).abs().max().item() <= grad_tol * gmax + 1e-300


# ---------------------------------------------------------------------------------------------
# Degenerate inputs: ties (z = 0), EMA equal to the policy (zero spread), zero norms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("degenerate", ["tie", "ema_equals_policy", "all_equal", "ema_equals_ref"])
def test_degenerate_inputs(backend, degenerate, preset):
    case = make_case(batch=3, shape=(3, 7, 9), k=3, seed=13)
    values = case.values
    if degenerate in ("tie", "all_equal"):  # policy == reference: l = 0, z = 0 on every pair
        values["model"] = values["ref"].clone()
    if degenerate in ("ema_equals_policy", "all_equal"):
        values["ema"] = [values["model"].clone() for _ in values["ema"]]
    if degenerate == "ema_equals_ref":  # l_ema = 0 on every pair: a zero L2 norm (official preset)
        values["ema"][1] = values["ref"].clone()
    # (not weighting="sqrt": sqrt(u) near u = 0 turns a harmless 1e-17 spread into 1e-8 in W)
    config = dict(beta=5.0, preset=preset, loss_type="sigmoid", reduction="none")
    loss, grad, stats, _ = call_loss(fastpref.adaptive_dpo_loss, case, config, backend=backend)
    loss64, grad64, stats64, _ = call_loss(REF, case, config, upcast=True)
    got, want = outputs(loss, grad, stats), outputs(loss64, grad64, stats64)
    for key, value in got.items():
        assert torch.isfinite(value).all(), key
    assert_close64(got, want, context=f"[{backend} {degenerate}]")
    if degenerate == "ema_equals_ref":
        assert torch.isfinite(stats["u"]).all()
    elif degenerate != "ema_equals_policy":
        assert stats["implicit_acc"] == 0.5
        assert torch.equal(stats["logits"], torch.zeros_like(stats["logits"]))
    else:
        assert stats["stability"].abs().max() < 1e-12, stats["stability"]


# ---------------------------------------------------------------------------------------------
# Non-finite inputs reach the loss
# ---------------------------------------------------------------------------------------------

NAN_SITES = ("model_pred", "ref_pred", "target", "ema_preds[1]")


def _poison(tensors, site: str, value: float):
    model, ref, target, ema = tensors
    with torch.no_grad():
        if site == "model_pred":
            model[1, 2, 3, 4] = value
        elif site == "ref_pred":
            ref[2, 0, 6, 1] = value
        elif site == "target":
            target[0, 1, 1, 8] = value
        else:
            ema[1][3, 2, 0, 0] = value
    return model, ref, target, ema


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("site", NAN_SITES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_input_gives_nan_loss(backend, loss_type, site, preset):
    case = make_case(batch=2, k=2, ema_form="list", dtype=torch.float32, labels=loss_type == "dedpo", seed=17)
    tensors = _poison(case.build(), site, float("nan"))
    config = dict(beta=5.0, preset=preset, loss_type=loss_type, backend=backend)
    if loss_type == "dedpo":
        config.update(case.label_kwargs())
    model, ref, target, ema = tensors
    loss = fastpref.adaptive_dpo_loss(model, ref, target, ema_preds=ema, **config)
    assert torch.isnan(loss), (site, loss)
    clean = fastpref.adaptive_dpo_loss(*case.build()[:3], ema_preds=case.build()[3], **config)
    assert torch.isfinite(clean)  # the NaN, not the case, made the loss NaN


@pytest.mark.parametrize("site", ["model_pred", "ref_pred", "target"])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "dedpo"])
def test_nan_reaches_its_pair_without_weight_or_margin(backend, loss_type, site):
    """With W = 1 and Gamma = 0 (diffusion_dpo_loss) nothing else carries the NaN: the head
    itself must propagate it, into pair 1 (rows 1 and 3 hold the poisoned elements) and not
    into pair 0."""
    case = make_case(batch=2, k=0, dtype=torch.float32, seed=17)
    model, ref, target, _ = case.build()
    with torch.no_grad():
        {"model_pred": model, "ref_pred": ref, "target": target}[site][3 if site != "target" else 1, 0, 2, 2] = float(
            "nan"
        )
    loss = fastpref.diffusion_dpo_loss(
        model, ref, target, beta=5.0, loss_type=loss_type, reduction="none", backend=backend
    )
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]), loss


@pytest.mark.parametrize("site", NAN_SITES)
def test_inf_input_gives_nonfinite_loss(backend, site):
    case = make_case(batch=2, k=2, ema_form="list", dtype=torch.float32, seed=17)
    model, ref, target, ema = _poison(case.build(), site, float("inf"))
    loss = fastpref.adaptive_dpo_loss(model, ref, target, ema_preds=ema, beta=5.0, backend=backend)
    assert not torch.isfinite(loss), (site, loss)


def test_nan_label_gives_nan_loss(backend):
    """A NaN synthetic label (or a NaN human label on a labelled pair) reaches the loss; NaN
    human labels on unlabelled pairs are allowed and do not (the parity cases carry them)."""
    case = make_case(batch=2, k=1, labels=True, seed=19)
    labels = case.label_kwargs()
    model, ref, target, ema = case.build()
    for name, pair in (("synthetic_label", 1), ("human_label", 0)):
        poisoned = dict(labels)
        poisoned[name] = poisoned[name].clone()
        poisoned[name][pair] = float("nan")
        assert bool(labels["human_mask"][0]) and not bool(labels["human_mask"][1])
        if name == "human_label":  # a NaN where human_mask is True is malformed
            with pytest.raises(ValueError, match="human_label"):
                fastpref.adaptive_dpo_loss(
                    model, ref, target, ema_preds=ema, loss_type="dedpo", backend=backend, **poisoned
                )
            continue
        loss = fastpref.adaptive_dpo_loss(
            model, ref, target, ema_preds=ema, loss_type="dedpo", beta=5.0, backend=backend, **poisoned
        )
        assert torch.isnan(loss)
    assert torch.isfinite(
        fastpref.adaptive_dpo_loss(
            model, ref, target, ema_preds=ema, loss_type="dedpo", beta=5.0, backend=backend, **labels
        )
    )


# ---------------------------------------------------------------------------------------------
# Bitwise reproducibility
# ---------------------------------------------------------------------------------------------

DETERMINISM_CASES = {
    "f32-K5-sigmoid-mean": (
        dict(dtype=torch.float32, k=5, batch=3, shared_target=True),
        dict(loss_type="sigmoid", reduction="mean"),
    ),
    "bf16-K2-robust-none": (
        dict(dtype=torch.bfloat16, k=2, batch=4, layout="batch_strided"),
        dict(preset="paper", loss_type="robust", reduction="none"),
    ),
    "f64-K3-dedpo-sum": (
        dict(dtype=torch.float64, k=3, batch=2, labels=True, layout="channels_last"),
        dict(loss_type="dedpo", reduction="sum"),
    ),
}


@pytest.mark.parametrize("name", sorted(DETERMINISM_CASES))
def test_bitwise_reproducible(backend, tiling, name):
    case_kw, config = DETERMINISM_CASES[name]
    case = make_case(shape=(4, 16, 16), seed=23, **case_kw)
    config = dict(beta=5.0, **config)
    upstream = torch.linspace(-1, 1, case.batch, dtype=torch.float64) if config["reduction"] == "none" else None
    tensors = case.build()
    first = call_loss(fastpref.adaptive_dpo_loss, case, config, backend=backend, tensors=tensors, upstream=upstream)
    second = call_loss(fastpref.adaptive_dpo_loss, case, config, backend=backend, tensors=tensors, upstream=upstream)
    assert torch.equal(first[0], second[0]), "loss differs between identical calls"
    assert torch.equal(first[1], second[1]), "grad differs between identical calls"
    for key, value in first[2].items():
        other = second[2][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_tiling_changes_the_launch():
    """The "multi" tiling really splits the work (several chunks of several blocks) for the
    shapes the tests use, and differs from the default heuristic."""
    if not TILED_BACKENDS:
        pytest.skip("no tiled backend on this device")
    from conftest import multi_chunk_config

    from fastpref.loss.triton import ops as triton_ops

    for features in (189, 1024):
        cfg = multi_chunk_config(features, 2, DEVICE)
        assert cfg.n_chunks >= 2 and cfg.chunk_size >= 2 * cfg.block and cfg.chunk_size % cfg.block == 0
        assert cfg.n_chunks * cfg.chunk_size >= features > (cfg.n_chunks - 1) * cfg.chunk_size
        assert cfg != triton_ops.launch_config(features, 2, DEVICE)


def test_backends_cover_availability():
    """Every backend that fastpref reports available is under test, and "torch" always is."""
    available = {name for name, why in fastpref.availability(DEVICE).items() if why is None}
    assert available <= set(BACKENDS) and "torch" in BACKENDS
