"""Parity of every backend with ``fastpref.reference`` run on the same input values upcast to
float64 (docs/spec.md §2-§6, §8): the loss, the gradient of ``model_pred`` (under a random upstream
gradient, a strided one for ``reduction="none"``) and every stats entry.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    BACKENDS,
    STAT_KEYS,
    TILED_BACKENDS,
    apply_tiling,
    assert_close64,
    call_loss,
    check_result_types,
    flash_check,
    make_case,
    outputs,
)

import fastpref
from fastpref.loss.options import LOSS_TYPES, MARGINS, PRESETS, REDUCTIONS, WEIGHTINGS

REF = fastpref.reference.adaptive_dpo_loss
BETA = 5.0  # with noise 1 and D = 189, l ~ 0.2, so z = beta * l ~ 1: no head saturates


_CASES = {}


def case_for(**kwargs):
    """``make_case`` memoized on its arguments (a Case is never mutated)."""
    key = repr(sorted(kwargs.items()))
    if key not in _CASES:
        _CASES[key] = make_case(**kwargs)
    return _CASES[key]


def upstream_for(loss_shape_none: bool, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    if loss_shape_none:
        return torch.randn(batch, generator=gen, dtype=torch.float64)
    return 0.5 + torch.rand((), generator=gen, dtype=torch.float64)


def run_backend_and_oracle(case, config, backend, *, seed=0, fn=None, ref_fn=None, pass_ema=True):
    """``(backend outputs, oracle outputs, raw backend results)`` for one case and config."""
    fn = fastpref.adaptive_dpo_loss if fn is None else fn
    ref_fn = REF if ref_fn is None else ref_fn
    upstream = upstream_for(config.get("reduction", "mean") == "none", case.batch, seed)
    loss, grad, stats, _ = call_loss(fn, case, config, backend=backend, upstream=upstream, pass_ema=pass_ema)
    loss64, grad64, stats64, _ = call_loss(ref_fn, case, config, upcast=True, upstream=upstream, pass_ema=pass_ema)
    return outputs(loss, grad, stats), outputs(loss64, grad64, stats64), (loss, grad, stats)


def check_float64(case, config, backend, *, seed=0, **kw):
    got, want, (loss, grad, stats) = run_backend_and_oracle(case, config, backend, seed=seed, **kw)
    check_result_types(case, loss, grad, stats, config.get("reduction", "mean"))
    assert_close64(got, want, context=f"[{backend} {config}]")


# ---------------------------------------------------------------------------------------------
# float64: the full option grid
# ---------------------------------------------------------------------------------------------
# Tight tolerances over preset x weighting x margin x loss_type x reduction; below, EMA counts
# K = 0..5 and 10 (K > 4 takes two or more launches of the Triton error kernel), shared and
# per-sample targets, stacked and list EMA inputs, non-contiguous layouts, odd D and batch sizes.

GRID = list(itertools.product(PRESETS, WEIGHTINGS, MARGINS, LOSS_TYPES, REDUCTIONS))
# The other dimensions cycle along the grid (every option of each meets many grid points):
K_CYCLE = (2, 3, 1, 0, 5)
BATCH_CYCLE = (2, 3)


def _grid_params():
    params = []
    for index, (preset, weighting, margin, loss_type, reduction) in enumerate(GRID):
        k = K_CYCLE[index % len(K_CYCLE)]
        batch = BATCH_CYCLE[(index // 3) % len(BATCH_CYCLE)]
        shared = index % 2 == 1
        form = "list" if (index // 2) % 2 else "stacked"
        variant = dict(k=k, batch=batch, shared_target=shared, ema_form=form, seed=index % 7)
        target = "shared" if shared else "full"
        ident = f"{preset}-{weighting}-{margin}-{loss_type}-{reduction}-K{k}-B{batch}-{target}-{form}"
        params.append(pytest.param(preset, weighting, margin, loss_type, reduction, variant, id=ident))
    return params


@pytest.mark.parametrize("preset,weighting,margin,loss_type,reduction,variant", _grid_params())
def test_float64_grid(backend, preset, weighting, margin, loss_type, reduction, variant):
    case = case_for(labels=loss_type == "dedpo", **variant)
    config = dict(
        beta=BETA, preset=preset, weighting=weighting, margin=margin, loss_type=loss_type, reduction=reduction
    )
    check_float64(case, config, backend, seed=variant["seed"])


def test_grid_is_exercised():
    """The grid above is not vacuous: with these inputs the adaptive parts of the loss move.
    (u varies across pairs, W != 1, Gamma != 0, and z sits in the unsaturated range.)"""
    case = case_for(k=2, batch=3, shared_target=False, ema_form="stacked", seed=0)
    _, _, stats, _ = call_loss(REF, case, dict(beta=BETA), upcast=True)
    assert stats["u"].std() > 1e-3 and (stats["weight"] < 0.99).all() and stats["margin"].abs().min() > 1e-4
    assert stats["logits"].abs().max() < 10 and stats["logits"].abs().min() > 1e-3
    assert 0.0 < stats["stability"].min() < 1.0  # the std cap of the official preset is not hit everywhere


# ---------------------------------------------------------------------------------------------
# float64: EMA count and form, target sharing, tiling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_target", [False, True], ids=["full_target", "shared_target"])
@pytest.mark.parametrize("ema_form", ["stacked", "list"])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 10])
def test_float64_ema_count(backend, tiling, shared_target, ema_form, k):
    case = case_for(k=k, batch=3, shared_target=shared_target, ema_form=ema_form, seed=k)
    preset = PRESETS[(k + shared_target) % 2]
    config = dict(beta=BETA, preset=preset, reduction="none" if k % 2 else "mean")
    check_float64(case, config, backend, seed=k)


def test_k_changes_the_loss():
    """Sanity of the K tests: the EMA predictions do reach u (K = 0 vs K = 3 differ)."""
    results = []
    for k in (0, 3):
        case = case_for(k=k, batch=3, shared_target=False, ema_form="stacked", seed=3)
        _, _, stats, _ = call_loss(REF, case, dict(beta=BETA), upcast=True)
        results.append(stats["u"])
    assert (results[0] - results[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# float64: non-contiguous inputs, odd shapes
# ---------------------------------------------------------------------------------------------

LAYOUT_CONFIGS = [
    dict(beta=BETA, preset="official", loss_type="sigmoid", reduction="none"),
    dict(beta=BETA, preset="paper", weighting="sqrt", margin="linear", loss_type="cdpo", reduction="mean"),
]


@pytest.mark.parametrize("config", LAYOUT_CONFIGS, ids=["official-sigmoid-none", "paper-cdpo-mean"])
@pytest.mark.parametrize("ema_form", ["stacked", "list"])
@pytest.mark.parametrize("shared_target", [False, True], ids=["full_target", "shared_target"])
@pytest.mark.parametrize("layout", ["batch_strided", "col_strided", "channels_last", "permuted", "expanded_target"])
def test_float64_layouts(backend, tiling, layout, shared_target, ema_form, config):
    case = case_for(k=3, batch=2, shared_target=shared_target, ema_form=ema_form, layout=layout, seed=11)
    model, ref, target, ema = case.build()
    if layout != "expanded_target":
        assert not model.is_contiguous() and not ref.is_contiguous() and not target.is_contiguous()
    else:
        assert target.stride(0) == 0
    check_float64(case, config, backend, seed=3)


@pytest.mark.parametrize(
    "batch,shape",
    [(1, (5,)), (1, (1,)), (3, (1, 1)), (2, (2, 3, 5, 7)), (5, (3, 7, 9)), (3, (4, 16, 16)), (4, (17,)), (8, (33,))],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_float64_shapes(backend, tiling, batch, shape):
    case = case_for(k=2, batch=batch, shape=shape, seed=batch)
    # D = 1 makes l tiny (no averaging), so a smaller beta keeps z unsaturated either way.
    config = dict(beta=BETA, loss_type="robust", reduction="sum")
    check_float64(case, config, backend, seed=batch)


# ---------------------------------------------------------------------------------------------
# float64: scalar keywords, defaults, DeDPO label forms, the other entry points
# ---------------------------------------------------------------------------------------------

SCALAR_CONFIGS = {
    "defaults": dict(),  # beta = 1000 etc.; the case uses small noise so z stays moderate
    "k1_k2_c2_rho": dict(beta=2.0, rho=3.0, k1=1.0, k2=0.5, c2=0.1),
    "k1_zero": dict(beta=BETA, k1=0.0, weighting="sigmoid"),
    "paper_c2": dict(beta=BETA, preset="paper", weighting="square", margin="linear", c2=-0.2, k2=2.0),
    "robust_eps0": dict(beta=BETA, loss_type="robust", eps=0.0),
    "robust_eps03": dict(beta=BETA, loss_type="robust", eps=0.3, reduction="none"),
    "cdpo_eps025": dict(beta=BETA, loss_type="cdpo", eps=0.25, reduction="sum"),
    "ipo_tau": dict(beta=BETA, loss_type="ipo", ipo_tau=0.5),
    "ipo_tau_linear": dict(beta=BETA, loss_type="ipo", ipo_tau=2.0, margin="linear", reduction="none"),
    "hinge_big_k1": dict(beta=BETA, loss_type="hinge", k1=100.0, weighting="sqrt"),
    "dedpo_floats": dict(
        beta=BETA, loss_type="dedpo", synthetic_label=0.7, human_label=1.0, human_mask=True, propensity=0.5
    ),
    "dedpo_unlabelled": dict(
        beta=BETA,
        loss_type="dedpo",
        synthetic_label=0.3,
        human_label=float("nan"),
        human_mask=False,
        propensity=0.2,
        reduction="none",
    ),
}


@pytest.mark.parametrize("name", sorted(SCALAR_CONFIGS))
def test_float64_scalar_keywords(backend, name):
    noise = 0.05 if name == "defaults" else 1.0  # beta = 1000: l ~ 0.2 noise^2 -> z ~ 0.5
    case = case_for(k=2, batch=3, seed=5, noise=noise, ema_noise=0.5 * noise)
    check_float64(case, SCALAR_CONFIGS[name], backend, seed=5)


def test_defaults_case_is_moderate():
    case = case_for(k=2, batch=3, seed=5, noise=0.05, ema_noise=0.025)
    _, _, stats, _ = call_loss(REF, case, {}, upcast=True)
    assert 0.01 < stats["logits"].abs().max() < 20


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "dedpo"])
def test_float64_diffusion_dpo(backend, loss_type, reduction):
    case = case_for(k=0, batch=3, seed=9)
    config = dict(beta=BETA, loss_type=loss_type, reduction=reduction)
    check_float64(
        case,
        config,
        backend,
        seed=9,
        fn=fastpref.diffusion_dpo_loss,
        ref_fn=fastpref.reference.diffusion_dpo_loss,
        pass_ema=False,
    )


def test_float64_module(backend):
    case = case_for(k=3, batch=2, seed=4, ema_form="list")
    keywords = dict(
        beta=BETA, preset="paper", weighting="sigmoid", loss_type="ipo", reduction="none", return_stats=True
    )
    module = fastpref.AdaptiveDPOLoss(backend=backend, **keywords)
    oracle = fastpref.reference.AdaptiveDPOLoss(**keywords)
    model, ref, target, ema = case.build()
    model64, ref64, target64, ema64 = case.build(upcast=True)
    upstream = upstream_for(True, case.batch, 4)
    loss, stats = module(model, ref, target, ema)
    loss64, stats64 = oracle(model64, ref64, target64, ema64)
    (grad,) = torch.autograd.grad(loss, model, upstream)
    (grad64,) = torch.autograd.grad(loss64, model64, upstream)
    check_result_types(case, loss, grad, stats, "none")
    assert_close64(outputs(loss, grad, stats), outputs(loss64, grad64, stats64))


def test_reference_matches_spec_formula():
    """Anchor the oracle itself on docs/spec.md §2/§5/§6 for the plain DPO case (K = 0, W = 1,
    Gamma = 0): e, l, z, loss and the closed-form gradient, written out here."""
    case = case_for(k=0, batch=3, seed=2)
    model, ref, target, _ = case.build(upcast=True)
    loss, stats = fastpref.reference.diffusion_dpo_loss(model, ref, target, beta=BETA, return_stats=True)
    (grad,) = torch.autograd.grad(loss, model)
    B, D = case.batch, case.features
    e_pol = ((model.detach() - target) ** 2).flatten(1).mean(1)
    e_ref = ((ref - target) ** 2).flatten(1).mean(1)
    l_theta = (e_ref[:B] - e_pol[:B]) - (e_ref[B:] - e_pol[B:])
    z = BETA * l_theta
    torch.testing.assert_close(stats["logits"], z)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(z)).mean())
    a = -(1.0 / B) * BETA * torch.sigmoid(-z)
    diff = (model.detach() - target).flatten(1)
    want = torch.cat([-a[:, None] * (2 / D) * diff[:B], a[:, None] * (2 / D) * diff[B:]]).view_as(grad)
    torch.testing.assert_close(grad, want)
    assert stats["implicit_acc"] == ((z > 0).double().mean() + 0.5 * (z == 0).double().mean()).item()


# ---------------------------------------------------------------------------------------------
# Low precision and mixed dtypes: the flash-attention rule
# ---------------------------------------------------------------------------------------------
# float32/bfloat16/float16 and mixes: max|backend - ref64| <= 2 * max|eager_same_dtype - ref64|
# + atol, where eager_same_dtype is the reference on the low-precision inputs, plus an absolute
# backstop (conftest.flash_check).

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_CASES = {
    "f32": f32,
    "bf16": bf16,
    "f16": f16,
    "bf16_policy_f32_rest": dict(model=bf16, ref=f32, target=f32, ema=f32),
    "f16_policy_bf16_ref_f32_target_mixed_ema": dict(model=f16, ref=bf16, target=f32, ema="mixed"),
    "f32_policy_f64_target": dict(model=f32, ref=f32, target=f64, ema=f32),  # accumulates in float64
    "bf16_with_one_f64_ema": dict(model=bf16, ref=bf16, target=bf16, ema="with_f64"),  # float64 too
}
LOWP_CONFIGS = [
    dict(preset="official", loss_type="sigmoid", reduction="mean"),
    dict(preset="official", loss_type="ipo", reduction="none"),
    dict(preset="official", weighting="square", margin="linear", loss_type="hinge", reduction="sum"),
    dict(preset="paper", weighting="sqrt", loss_type="robust", reduction="mean"),
    dict(preset="paper", weighting="sigmoid", margin="none", loss_type="cdpo", reduction="none"),
    dict(preset="official", weighting="none", margin="none", loss_type="dedpo", reduction="mean"),
    dict(preset="official", loss_type="dedpo", reduction="none"),
]
LOWP_LAYOUTS = ("contiguous", "batch_strided", "channels_last", "col_strided", "expanded_target")


def _dtype_spec(name, k):
    spec = DTYPE_CASES[name]
    if isinstance(spec, dict) and spec["ema"] in ("mixed", "with_f64"):
        spec = dict(spec)
        if spec["ema"] == "mixed":
            spec["ema"] = [f32 if i % 2 == 0 else bf16 for i in range(k)]
        else:
            spec["ema"] = [bf16] * (k - 1) + [f64]
    return spec


def _lowp_params():
    params = []
    for index, (dname, config) in enumerate(itertools.product(DTYPE_CASES, LOWP_CONFIGS)):
        k = (2, 5, 3)[index % 3]
        layout = LOWP_LAYOUTS[index % len(LOWP_LAYOUTS)]
        shared = index % 2 == 0
        variant = dict(k=k, layout=layout, shared_target=shared, batch=(2, 3)[(index // 2) % 2], seed=index % 5)
        multi = index % 4 == 1  # a quarter of the cases also run the multi-chunk Triton tiling
        cid = "-".join(str(v) for v in config.values())
        ident = f"{dname}-{cid}-K{k}-{layout}-{'shared' if shared else 'full'}"
        for backend in BACKENDS:
            params.append(pytest.param(backend, dname, config, variant, "default", id=f"{backend}-{ident}"))
            if multi and backend in TILED_BACKENDS:
                params.append(pytest.param(backend, dname, config, variant, "multi", id=f"{backend}-multi-{ident}"))
    return params


def _tolerances(key, case, got_dtype):
    """``(atol, backstop)`` of one output, in units of its oracle's magnitude."""
    acc_eps = torch.finfo(case.acc_dtype).eps
    if key == "grad":
        out_eps = torch.finfo(got_dtype).eps
        # Output rounding dominates for half types; float32 arithmetic (a_j) for float32.
        return 2.0**-4 * out_eps + 8 * acc_eps, out_eps + 64 * acc_eps
    return 64 * acc_eps, 1024 * acc_eps


@pytest.mark.parametrize("backend,dtype_name,config,variant,tiling_mode", _lowp_params())
def test_low_precision(backend, monkeypatch, dtype_name, config, variant, tiling_mode):
    apply_tiling(monkeypatch, backend, tiling_mode)
    k = variant["k"]
    case = case_for(dtype=_dtype_spec(dtype_name, k), labels=config["loss_type"] == "dedpo", **variant)
    check_low_precision(case, dict(beta=BETA, **config), backend, seed=variant["seed"])


def check_low_precision(case, config, backend, *, seed=0):
    """The flash-attention rule for the loss, the gradient and every stats entry of ``backend`` on
    ``case`` (any dtypes, any device): within 2x the eager reference's own error in the same
    dtypes of the float64 oracle, plus an atol (``_tolerances``)."""
    reduction = config.get("reduction", "mean")
    upstream = upstream_for(reduction == "none", case.batch, seed)
    loss, grad, stats, _ = call_loss(fastpref.adaptive_dpo_loss, case, config, backend=backend, upstream=upstream)
    check_result_types(case, loss, grad, stats, reduction)
    eager = call_loss(REF, case, config, upstream=upstream)
    oracle = call_loss(REF, case, config, upcast=True, upstream=upstream)
    got, eager, oracle = outputs(loss, grad, stats), outputs(*eager[:3]), outputs(*oracle[:3])
    for key in ("loss", "grad") + STAT_KEYS:
        atol, backstop = _tolerances(key, case, grad.dtype)
        scale = oracle[key].abs().max().item() if key == "grad" else 1.0 + oracle[key].abs().max().item()
        flash_check(
            key, got[key], eager[key], oracle[key], atol=atol * scale, backstop=backstop * scale, context=f"[{backend}]"
        )


def test_low_precision_inputs_are_rounded():
    """The low-precision cases really hold low-precision values (the oracle sees the rounded
    values, and they differ from the float64 draw)."""
    lo = make_case(dtype=bf16, k=2, seed=0)
    hi = make_case(dtype=f64, k=2, seed=0)
    assert lo.build()[0].dtype == bf16
    assert (lo.values["model"] - hi.values["model"]).abs().max() > 1e-4
    assert torch.equal(lo.values["model"], lo.values["model"].to(bf16).double())
