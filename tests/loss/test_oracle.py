"""``fastpref.reference`` against the independent float64 oracle of ``tests/loss/oracle.py`` (docs/spec.md §2-§6).

Every case runs in float64 on CPU; the reference's gradient comes from ``torch.autograd.grad`` and
the oracle's from the closed form of docs/spec.md §6, so a match also checks that u, W, Gamma and c2 are
stop-gradient in the reference.
"""

from __future__ import annotations

import itertools
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import head, head_grad, oracle  # noqa: E402

import fastpref  # noqa: E402
from fastpref import reference  # noqa: E402

PRESETS = ("official", "paper")
WEIGHTINGS = ("linear", "square", "sqrt", "sigmoid", "none")
MARGINS = ("quadratic", "linear", "none")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo", "dedpo")
REDUCTIONS = ("mean", "sum", "none")
STAT_TENSORS = ("logits", "l_theta", "u", "confidence", "stability", "weight", "margin", "err_policy", "err_ref")

RTOL = 1e-9
ATOL_REL = 1e-11  # absolute tolerance, relative to the largest |value| of the compared array

B, S = 3, (2, 3, 5)
EMA_SPREADS = (3e-4, 1e-3, 3e-3)  # gives official stabilities both below and at the cap of 1


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)


def as_np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, what):
    actual, expected = as_np(actual), as_np(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL_REL * scale + 1e-300, err_msg=what)


def make_case(seed, *, K=2, shared_target=True, stacked=False, scale=1.0):
    """float64 inputs with logits of order 1 at beta=1000 (scale=1) or beta~0.4 (scale=50)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    target = rn(B if shared_target else 2 * B, *S)
    full = torch.cat([target, target]) if shared_target else target
    ref = full + 0.3 * rn(2 * B, *S)
    model = ref + 0.01 * rn(2 * B, *S)
    emas = [model + EMA_SPREADS[k % 3] * (1 + k // 3) * rn(2 * B, *S) for k in range(K)]
    model, ref, target, emas = model * scale, ref * scale, target * scale, [e * scale for e in emas]
    if stacked:
        emas = torch.stack(emas) if K else torch.empty(0, 2 * B, *S, dtype=torch.float64)
    return model, ref, target, emas


def dedpo_labels(seed, *, floats=False):
    """A mix of masked and unmasked pairs, NaN human labels on the unmasked ones."""
    g = torch.Generator().manual_seed(1000 + seed)
    mask = torch.tensor([True, False, True])
    human = torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64)
    if floats:
        return dict(synthetic_label=0.7, human_label=human, human_mask=mask, propensity=0.4)
    synthetic = torch.rand(B, generator=g, dtype=torch.float64)
    propensity = 0.2 + 0.8 * torch.rand(B, generator=g, dtype=torch.float64)
    return dict(synthetic_label=synthetic, human_label=human, human_mask=mask, propensity=propensity)


def run_reference(fn, model, ref, target, grad_output=None, **kw):
    """``(loss, grad of model_pred, stats)`` of a fastpref entry point, gradient via autograd."""
    model = model.clone().requires_grad_(True)
    loss, stats = fn(model, ref, target, return_stats=True, **kw)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, model, grad_outputs=grad_output)
    return loss, grad, stats


def check(fn, model, ref, target, *, seed=0, oracle_extra=None, **kw):
    """Run ``fn`` and the oracle on the same call and compare loss, gradient and stats.
    ``oracle_extra``: keywords for the oracle alone (what ``diffusion_dpo_loss`` implies)."""
    reduction = kw.get("reduction", "mean")
    grad_output = None
    if reduction == "none":
        g = torch.Generator().manual_seed(2000 + seed)
        grad_output = torch.randn(B, generator=g, dtype=torch.float64)
    loss, grad, stats = run_reference(fn, model, ref, target, grad_output=grad_output, **kw)
    okw = {k: v for k, v in kw.items() if k not in ("ema_preds", "backend")}
    okw.update(oracle_extra or {})
    exp_loss, exp_grad, exp_stats = oracle(model, ref, target, kw.get("ema_preds", ()), grad_output=grad_output, **okw)

    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert tuple(loss.shape) == ((B,) if reduction == "none" else ())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, exp_loss, "loss")
    assert_close(grad, exp_grad, "grad model_pred")
    missing = set(STAT_TENSORS + ("implicit_acc",)) - set(stats)
    assert not missing, f"stats lacks {sorted(missing)}"
    for key in STAT_TENSORS:
        value = stats[key]
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
        assert_close(value, exp_stats[key], f"stats[{key!r}]")
    assert isinstance(stats["implicit_acc"], float)
    assert math.isclose(stats["implicit_acc"], exp_stats["implicit_acc"], rel_tol=1e-12)
    return exp_stats


# --- the oracle's own closed-form head derivatives, against central differences ---------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_oracle_head_grad_matches_finite_differences(loss_type):
    rng = np.random.default_rng(0)
    beta, eps, tau = 700.0, 0.2, 300.0
    l_theta = rng.normal(scale=2e-3, size=64)
    W = rng.uniform(0.1, 1.0, size=64)
    gamma = rng.normal(scale=0.5, size=64)
    soft = rng.uniform(-0.5, 1.5, size=64)
    kw = dict(loss_type=loss_type, beta=beta, eps=eps, tau=tau, soft_label=soft)
    y = beta * l_theta - gamma
    keep = np.abs(1 - y) > 1e-3  # hinge kink
    h = 1e-8
    numeric = (head(l_theta + h, W, gamma, **kw) - head(l_theta - h, W, gamma, **kw)) / (2 * h)
    closed = head_grad(l_theta, W, gamma, **kw)
    np.testing.assert_allclose(closed[keep], numeric[keep], rtol=1e-5, atol=1e-6 * np.abs(numeric).max())


# --- the full grid: preset x weighting x margin x loss_type x reduction -------------------------


def _grid():
    for (pi, preset), (wi, w), (mi, m), (li, lt), r in itertools.product(
        enumerate(PRESETS), enumerate(WEIGHTINGS), enumerate(MARGINS), enumerate(LOSS_TYPES), REDUCTIONS
    ):
        K = (wi + mi + li) % 4  # every K for every (preset, loss_type, reduction, weighting)
        shared = (wi + li + pi) % 2 == 0
        stacked = (mi + li) % 2 == 1
        yield pytest.param(
            preset,
            w,
            m,
            lt,
            r,
            K,
            shared,
            stacked,
            id=f"{preset}-{w}-{m}-{lt}-{r}-K{K}-{'shared' if shared else 'full'}{'-stacked' if stacked else ''}",
        )


@pytest.mark.parametrize("preset,weighting,margin,loss_type,reduction,K,shared,stacked", list(_grid()))
def test_grid(preset, weighting, margin, loss_type, reduction, K, shared, stacked):
    seed = zlib.crc32(f"{preset}-{weighting}-{margin}-{loss_type}-{reduction}".encode()) % 10_000
    # The paper preset's u = c * var(l) only matters when l is of order 1: scale the inputs up.
    scale, beta = (1.0, None) if preset == "official" else (50.0, 0.4)
    model, ref, target, emas = make_case(seed, K=K, shared_target=shared, stacked=stacked, scale=scale)
    kw = dict(
        ema_preds=emas, preset=preset, weighting=weighting, margin=margin, loss_type=loss_type, reduction=reduction
    )
    if beta is not None:
        kw["beta"] = beta
    if loss_type == "dedpo":
        kw.update(dedpo_labels(seed))
    check(reference.adaptive_dpo_loss, model, ref, target, seed=seed, **kw)


# --- defaults at the paper's scale, every K, target layout and ema_preds form --------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_target", "full_target"])
@pytest.mark.parametrize("K", [0, 1, 2, 3])
def test_defaults_every_K(K, shared, stacked, preset, loss_type, reduction):
    seed = 100 + K
    model, ref, target, emas = make_case(seed, K=K, shared_target=shared, stacked=stacked)
    kw = dict(ema_preds=emas, preset=preset, loss_type=loss_type, reduction=reduction)
    if loss_type == "dedpo":
        kw.update(dedpo_labels(seed, floats=shared))
    stats = check(reference.adaptive_dpo_loss, model, ref, target, seed=seed, **kw)
    if K == 0:
        assert np.all(stats["stability"] == 1.0)


# --- explicit keyword values ---------------------------------------------------------------------

EXPLICIT = {
    "k2_c2": dict(k2=-3e-3, c2=2e-4),
    "k2_pos_c2_neg": dict(k2=0.5, c2=-1e-3, margin="linear"),
    "c2_zero": dict(c2=0.0),
    "beta_rho_k1": dict(beta=250.0, rho=3.0, k1=1.0),
    "k1_zero": dict(k1=0.0, weighting="sigmoid"),
    "eps_zero": dict(eps=0.0),
    "eps_quarter": dict(eps=0.25, weighting="sqrt"),
    "eps_049": dict(eps=0.49, margin="none"),
    "ipo_tau_small": dict(ipo_tau=0.05),
    "ipo_tau_large": dict(ipo_tau=1e4, weighting="square"),
    "everything": dict(beta=1500.0, rho=20.0, k1=5.0, k2=1e-3, c2=-5e-4, eps=0.3, ipo_tau=123.0),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(EXPLICIT))
def test_explicit_keywords(name, preset, loss_type, reduction):
    seed = 200 + list(EXPLICIT).index(name)
    model, ref, target, emas = make_case(seed, K=3)
    kw = dict(EXPLICIT[name], ema_preds=emas, preset=preset, loss_type=loss_type, reduction=reduction)
    if loss_type == "dedpo":
        kw.update(dedpo_labels(seed))
    check(reference.adaptive_dpo_loss, model, ref, target, seed=seed, **kw)


def test_explicit_keywords_change_the_result():
    """The explicit values above are not silently ignored (else the comparisons prove little)."""
    model, ref, target, emas = make_case(5, K=3)
    base = dict(ema_preds=emas, reduction="none")
    for kw in (dict(k2=1e-2), dict(c2=1e-2), dict(rho=3.0), dict(k1=1.0), dict(beta=300.0)):
        a = reference.adaptive_dpo_loss(model, ref, target, **base)
        b = reference.adaptive_dpo_loss(model, ref, target, **base, **kw)
        assert not torch.equal(a, b), kw
    for lt, kw in (("robust", dict(eps=0.3)), ("cdpo", dict(eps=0.3)), ("ipo", dict(ipo_tau=0.5))):
        a = reference.adaptive_dpo_loss(model, ref, target, **base, loss_type=lt)
        b = reference.adaptive_dpo_loss(model, ref, target, **base, loss_type=lt, **kw)
        assert not torch.equal(a, b), (lt, kw)


# --- particular regimes ----------------------------------------------------------------------


def test_official_stability_cap_is_exercised():
    """The official preset's min(std, 1): the inputs have pairs on both sides of the cap."""
    model, ref, target, emas = make_case(1, K=3)
    stats = check(reference.adaptive_dpo_loss, model, ref, target, ema_preds=emas)
    assert np.any(stats["stability"] == 1.0) and np.any(stats["stability"] < 0.9)


def test_paper_preset_weight_is_exercised():
    """At scale 50, the paper preset's u = c * var(l) moves W well away from 1."""
    model, ref, target, emas = make_case(1, K=3, scale=50.0)
    stats = check(reference.adaptive_dpo_loss, model, ref, target, ema_preds=emas, preset="paper", beta=0.4)
    assert np.all(stats["stability"] > 0) and np.min(stats["weight"]) < 0.8


@pytest.mark.parametrize("preset", PRESETS)
def test_implicit_acc_counts_ties_as_half(preset):
    model, ref, target, emas = make_case(3, K=2)
    model = model.clone()
    model[1] = ref[1]
    model[1 + B] = ref[1 + B]  # pair 1: l_theta = 0 exactly
    stats = check(reference.adaptive_dpo_loss, model, ref, target, ema_preds=emas, preset=preset)
    assert stats["logits"][1] == 0.0
    assert math.isclose(stats["implicit_acc"], (np.sum(stats["logits"] > 0) + 0.5) / B, rel_tol=1e-12)


@pytest.mark.parametrize("floats", [False, True], ids=["tensor_labels", "float_labels"])
@pytest.mark.parametrize("mask", ["mixed", "none", "all"])
def test_dedpo_masks(mask, floats):
    model, ref, target, emas = make_case(7, K=2)
    labels = dedpo_labels(7, floats=floats)
    if mask == "none":
        labels["human_mask"] = torch.zeros(B, dtype=torch.bool)
        labels["human_label"] = torch.full((B,), math.nan, dtype=torch.float64)
    elif mask == "all":
        labels["human_mask"] = torch.ones(B, dtype=torch.bool)
        labels["human_label"] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    for reduction in REDUCTIONS:
        check(
            reference.adaptive_dpo_loss,
            model,
            ref,
            target,
            ema_preds=emas,
            loss_type="dedpo",
            reduction=reduction,
            **labels,
        )


def test_dedpo_with_human_labels_one_is_dpo():
    """§5b: with y~ = 1 the DeDPO head is the DPO (sigmoid) head."""
    model, ref, target, emas = make_case(8, K=2)
    labels = dict(
        synthetic_label=1.0,
        human_label=torch.ones(B, dtype=torch.float64),
        human_mask=torch.tensor([True, False, True]),
        propensity=0.5,
    )
    a = run_reference(
        reference.adaptive_dpo_loss, model, ref, target, ema_preds=emas, loss_type="dedpo", reduction="none", **labels
    )
    b = run_reference(
        reference.adaptive_dpo_loss, model, ref, target, ema_preds=emas, loss_type="sigmoid", reduction="none"
    )
    assert_close(a[0], b[0], "loss")
    assert_close(a[1], b[1], "grad")


# --- diffusion_dpo_loss and the module form -------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES[:-1])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_target", "full_target"])
def test_diffusion_dpo_is_adaptive_without_weight_margin_or_ema(shared, loss_type, reduction):
    model, ref, target, _ = make_case(9, K=0, shared_target=shared)
    kw = dict(loss_type=loss_type, reduction=reduction, beta=800.0, eps=0.2, ipo_tau=50.0)
    plain = dict(weighting="none", margin="none")
    stats = check(reference.diffusion_dpo_loss, model, ref, target, seed=9, oracle_extra=plain, **kw)
    check(fastpref.diffusion_dpo_loss, model, ref, target, seed=9, oracle_extra=plain, backend="torch", **kw)
    assert np.all(stats["weight"] == 1.0) and np.all(stats["margin"] == 0.0)
    g = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) if reduction == "none" else None
    d_loss, d_grad, _ = run_reference(reference.diffusion_dpo_loss, model, ref, target, grad_output=g, **kw)
    a_loss, a_grad, _ = run_reference(reference.adaptive_dpo_loss, model, ref, target, grad_output=g, **plain, **kw)
    assert torch.equal(d_loss, a_loss) and torch.equal(d_grad, a_grad)


def test_diffusion_dpo_defaults():
    model, ref, target, _ = make_case(10, K=0)
    check(reference.diffusion_dpo_loss, model, ref, target, oracle_extra=dict(weighting="none", margin="none"))


@pytest.mark.parametrize(
    "module_cls", [fastpref.AdaptiveDPOLoss, reference.AdaptiveDPOLoss], ids=["fastpref", "reference"]
)
def test_module_form(module_cls):
    model, ref, target, emas = make_case(11, K=3)
    kw = dict(
        preset="paper", weighting="sqrt", margin="linear", loss_type="robust", eps=0.2, k1=3.0, rho=9.0, reduction="sum"
    )
    extra = dict(backend="torch") if module_cls is fastpref.AdaptiveDPOLoss else {}
    module = module_cls(**kw, **extra)
    leaf = model.clone().requires_grad_(True)
    loss = module(leaf, ref, target, emas)
    (grad,) = torch.autograd.grad(loss, leaf)
    exp_loss, exp_grad, _ = oracle(model, ref, target, emas, **kw)
    assert_close(loss, exp_loss, "loss")
    assert_close(grad, exp_grad, "grad")
