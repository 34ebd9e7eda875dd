"""Malformed calls (docs/spec.md §7, §5b) and backend selection errors (docs/spec.md §8).

Every malformed call must raise ``ValueError`` or ``TypeError`` whose message names the argument,
before any backend is chosen or kernel launched; a backend that cannot serve a call raises
``RuntimeError`` saying why.
"""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
import torch

import fastpref
from fastpref import reference

B, S = 2, (3, 4)
BAD = (ValueError, TypeError)
DEDPO_NAMES = ("synthetic_label", "human_label", "human_mask", "propensity")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No backend override unless a test sets one."""
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def good(K=2):
    """A well-formed call's positional inputs and ema_preds."""
    torch.manual_seed(0)
    return (t(2 * B, *S), t(2 * B, *S), t(B, *S)), [t(2 * B, *S) for _ in range(K)]


def module_call(module_cls):
    """The module form: keywords at construction, per-batch DeDPO labels as forward() overrides."""

    def call(model_pred, ref_pred, target, ema_preds=(), **keywords):
        labels = {k: keywords.pop(k) for k in DEDPO_NAMES if k in keywords}
        return module_cls(**keywords)(model_pred, ref_pred, target, ema_preds, **labels)

    return call


ENTRY_POINTS = [
    pytest.param(fastpref.adaptive_dpo_loss, id="fastpref"),
    pytest.param(reference.adaptive_dpo_loss, id="reference"),
    pytest.param(module_call(fastpref.AdaptiveDPOLoss), id="module"),
    pytest.param(module_call(reference.AdaptiveDPOLoss), id="reference_module"),
]


def dedpo_labels():
    return dict(
        synthetic_label=torch.tensor([0.2, 0.9]),
        human_label=torch.tensor([1.0, math.nan]),
        human_mask=torch.tensor([True, False]),
        propensity=torch.tensor([0.5, 0.25]),
    )


# --- tensor inputs (docs/spec.md §1, §7) ---------------------------------------------------------------

M = lambda: t(2 * B, *S)  # noqa: E731  a model-shaped tensor


TENSOR_CASES = {
    # name: (model_pred, ref_pred, target, ema_preds) builder, argument named in the message
    "odd_batch": (lambda: (t(3, *S), t(3, *S), t(3, *S), ()), "model_pred"),
    "odd_batch_shared_target": (lambda: (t(5, *S), t(5, *S), t(2, *S), ()), "model_pred"),
    "zero_batch": (lambda: (t(0, *S), t(0, *S), t(0, *S), ()), "model_pred"),
    "one_dim": (lambda: (t(4), t(4), t(4), ()), "model_pred"),
    "zero_dim": (lambda: (t(), t(), t(), ()), "model_pred"),
    "ref_pred_feature_shape": (lambda: (M(), t(2 * B, 3, 5), t(B, *S), ()), "ref_pred"),
    "ref_pred_batch": (lambda: (M(), t(B, *S), t(B, *S), ()), "ref_pred"),
    "ref_pred_extra_dim": (lambda: (M(), t(2 * B, *S, 1), t(B, *S), ()), "ref_pred"),
    "target_feature_shape": (lambda: (M(), M(), t(B, 4, 3), ()), "target"),
    "target_batch_3": (lambda: (M(), M(), t(3, *S), ()), "target"),
    "target_batch_4B": (lambda: (M(), M(), t(4 * B, *S), ()), "target"),
    "target_flattened": (lambda: (M(), M(), t(2 * B, 12), ()), "target"),
    "ema_list_shape": (lambda: (M(), M(), t(B, *S), [t(2 * B, 3, 5)]), "ema_preds"),
    "ema_list_second_shape": (lambda: (M(), M(), t(B, *S), [M(), t(B, *S)]), "ema_preds"),
    "ema_stacked_shape": (lambda: (M(), M(), t(B, *S), t(2, 2 * B, 3, 5)), "ema_preds"),
    "ema_stacked_batch": (lambda: (M(), M(), t(B, *S), t(2, B, *S)), "ema_preds"),
    "ema_unstacked_single": (lambda: (M(), M(), t(B, *S), M()), "ema_preds"),
    "device_ref_pred": (lambda: (M(), t(2 * B, *S, device="meta"), t(B, *S), ()), "ref_pred"),
    "device_target": (lambda: (M(), M(), t(B, *S, device="meta"), ()), "target"),
    "device_model_pred": (lambda: (t(2 * B, *S, device="meta"), M(), t(B, *S), ()), "model_pred|ref_pred|target"),
    "device_ema_list": (lambda: (M(), M(), t(B, *S), [M(), t(2 * B, *S, device="meta")]), "ema_preds"),
    "device_ema_stacked": (lambda: (M(), M(), t(B, *S), t(2, 2 * B, *S, device="meta")), "ema_preds"),
    "numpy_model_pred": (lambda: (np.zeros((2 * B, *S), np.float32), M(), t(B, *S), ()), "model_pred"),
    "list_ref_pred": (lambda: (M(), M().tolist(), t(B, *S), ()), "ref_pred"),
    "float_target": (lambda: (M(), M(), 0.5, ()), "target"),
    "numpy_ema": (lambda: (M(), M(), t(B, *S), [np.zeros((2 * B, *S), np.float32)]), "ema_preds"),
    "int_ema_preds": (lambda: (M(), M(), t(B, *S), 3), "ema_preds"),
    "int64_model_pred": (lambda: (M().long(), M(), t(B, *S), ()), "model_pred"),
    "int32_ref_pred": (lambda: (M(), M().int(), t(B, *S), ()), "ref_pred"),
    "int64_target": (lambda: (M(), M(), t(B, *S).long(), ()), "target"),
    "int_ema_list": (lambda: (M(), M(), t(B, *S), [M().to(torch.int16)]), "ema_preds"),
    "int_ema_stacked": (lambda: (M(), M(), t(B, *S), t(2, 2 * B, *S).long()), "ema_preds"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_malformed_tensors(fn, case):
    build, name = TENSOR_CASES[case]
    model_pred, ref_pred, target, ema_preds = build()
    with pytest.raises(BAD, match=name):
        fn(model_pred, ref_pred, target, ema_preds=ema_preds)


@pytest.mark.parametrize(
    "fn", [fastpref.diffusion_dpo_loss, reference.diffusion_dpo_loss], ids=["fastpref", "reference"]
)
@pytest.mark.parametrize(
    "case",
    ["odd_batch", "zero_batch", "one_dim", "ref_pred_batch", "target_batch_3", "device_target", "int64_model_pred"],
)
def test_malformed_tensors_diffusion_dpo(fn, case):
    build, name = TENSOR_CASES[case]
    model_pred, ref_pred, target, _ = build()
    with pytest.raises(BAD, match=name):
        fn(model_pred, ref_pred, target)


def test_well_formed_calls_pass():
    """The builders above differ from a valid call only in the one malformed part."""
    (model_pred, ref_pred, target), emas = good()
    for ema_preds in (emas, torch.stack(emas), (), torch.empty(0, 2 * B, *S)):
        for tgt in (target, t(2 * B, *S)):
            loss = fastpref.adaptive_dpo_loss(model_pred, ref_pred, tgt, ema_preds=ema_preds)
            assert loss.shape == () and torch.isfinite(loss)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.isfinite(reference.adaptive_dpo_loss(model_pred.to(dtype), ref_pred, target, ema_preds=emas))


# --- scalar keywords (docs/spec.md §4, §5, §7) ---------------------------------------------------------

SCALAR_CASES = {
    "beta_zero": (dict(beta=0.0), "beta"),
    "beta_negative": (dict(beta=-1000.0), "beta"),
    "beta_nan": (dict(beta=math.nan), "beta"),
    "rho_zero": (dict(rho=0.0), "rho"),
    "rho_negative": (dict(rho=-15.0), "rho"),
    "k1_negative": (dict(k1=-1.0), "k1"),
    "k1_tiny_negative": (dict(k1=-1e-12), "k1"),
    "eps_half": (dict(eps=0.5), "eps"),
    "eps_negative": (dict(eps=-0.1), "eps"),
    "eps_half_robust": (dict(eps=0.5, loss_type="robust"), "eps"),
    "eps_negative_cdpo": (dict(eps=-0.1, loss_type="cdpo"), "eps"),
    "eps_above_one_robust": (dict(eps=1.5, loss_type="robust"), "eps"),
    "ipo_tau_zero": (dict(ipo_tau=0.0, loss_type="ipo"), "ipo_tau"),
    "ipo_tau_negative": (dict(ipo_tau=-2.0, loss_type="ipo"), "ipo_tau"),
    "ipo_tau_negative_default_head": (dict(ipo_tau=-2.0), "ipo_tau"),
    "preset": (dict(preset="paper2"), "preset"),
    "preset_case": (dict(preset="Official"), "preset"),
    "preset_type": (dict(preset=1), "preset"),
    "weighting": (dict(weighting="cubic"), "weighting"),
    "margin": (dict(margin="cubic"), "margin"),
    "loss_type": (dict(loss_type="kto"), "loss_type"),
    "loss_type_none": (dict(loss_type=None), "loss_type"),
    "reduction": (dict(reduction="avg"), "reduction"),
    "reduction_none_object": (dict(reduction=None), "reduction"),
}


@pytest.mark.parametrize("case", list(SCALAR_CASES))
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_malformed_keywords(fn, case):
    keywords, name = SCALAR_CASES[case]
    (model_pred, ref_pred, target), emas = good()
    with pytest.raises(BAD, match=name):
        fn(model_pred, ref_pred, target, ema_preds=emas, **keywords)


@pytest.mark.parametrize("case", list(SCALAR_CASES))
@pytest.mark.parametrize(
    "module_cls", [fastpref.AdaptiveDPOLoss, reference.AdaptiveDPOLoss], ids=["fastpref", "reference"]
)
def test_module_construction_checks_keywords(module_cls, case):
    keywords, name = SCALAR_CASES[case]
    with pytest.raises(BAD, match=name):
        module_cls(**keywords)


# Scalars finite as Python floats but not in float32, the accumulation dtype of float32 / 16-bit
# inputs (docs/spec.md §1, §7): the kernels and the reference would make them inf. k2 and c2 count
# where the margin uses them (the default k2 = -1/beta included).
FLOAT32_CASES = {
    "beta": (dict(beta=1e300), "beta"),
    "beta_negative_overflow": (dict(beta=-1e300), "beta"),  # the sign check comes first
    "rho": (dict(rho=1e39), "rho"),
    "k1": (dict(k1=1e39), "k1"),
    "k2": (dict(k2=-1e39), "k2"),
    "k2_default_of_tiny_beta": (dict(beta=1e-39), "k2"),
    "c2": (dict(c2=1e39), "c2"),
    "c2_linear_margin": (dict(c2=-1e39, margin="linear"), "c2"),
    "ipo_tau": (dict(ipo_tau=1e39, loss_type="ipo"), "ipo_tau"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(FLOAT32_CASES))
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_scalars_finite_in_accumulation_dtype(fn, case, dtype):
    keywords, name = FLOAT32_CASES[case]
    (model_pred, ref_pred, target), emas = good()
    model_pred = model_pred.to(dtype)
    message = "must be a finite number > 0" if case == "beta_negative_overflow" else "must be finite in the"
    with pytest.raises(ValueError, match=f"^{name} {message}"):
        fn(model_pred, ref_pred, target, ema_preds=emas, **keywords)


def test_scalar_overflow_message():
    (model_pred, ref_pred, target), _ = good()
    message = "beta must be finite in the accumulation dtype float32 (|beta| <= 3.4028e+38); got 1e+300"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, beta=1e300)
    with pytest.raises(ValueError, match=re.escape("got -1.0000000000000001e+39 (k2 = -1/beta by default)")):
        fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, beta=1e-39)


@pytest.mark.parametrize("case", [case for case in FLOAT32_CASES if case != "beta_negative_overflow"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_scalars_beyond_float32_pass_in_float64(fn, case):
    """The same scalars are finite in float64: a float64 input makes it the accumulation dtype."""
    keywords, _ = FLOAT32_CASES[case]
    (model_pred, ref_pred, target), emas = good()
    loss = fn(model_pred.double(), ref_pred, target, ema_preds=emas, **keywords)
    assert loss.dtype == torch.float64


@pytest.mark.parametrize(
    "keywords",
    [dict(beta=1e-39), dict(k2=1e39), dict(c2=-1e39)],
    ids=["k2_default_of_tiny_beta", "k2", "c2"],
)
def test_unused_margin_scalars_may_overflow_float32(keywords):
    """margin="none" reads neither k2 nor c2 (Diffusion-DPO's default k2 of a tiny beta)."""
    (model_pred, ref_pred, target), emas = good()
    for backend in ("auto", "torch"):
        loss = fastpref.adaptive_dpo_loss(
            model_pred, ref_pred, target, ema_preds=emas, margin="none", backend=backend, **keywords
        )
        assert torch.isfinite(loss)
    beta = keywords.get("beta", 1000.0)
    assert torch.isfinite(fastpref.diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta))


@pytest.mark.parametrize(
    "keywords,name",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=math.nan), "beta"),
        (dict(beta=1e300), "beta"),
        (dict(ipo_tau=1e39, loss_type="ipo"), "ipo_tau"),
        (dict(eps=0.5, loss_type="robust"), "eps"),
        (dict(ipo_tau=0.0, loss_type="ipo"), "ipo_tau"),
        (dict(loss_type="kto"), "loss_type"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="cuda"), "backend"),
    ],
)
@pytest.mark.parametrize(
    "fn", [fastpref.diffusion_dpo_loss, reference.diffusion_dpo_loss], ids=["fastpref", "reference"]
)
def test_malformed_keywords_diffusion_dpo(fn, keywords, name):
    (model_pred, ref_pred, target), _ = good()
    with pytest.raises(BAD, match=name):
        fn(model_pred, ref_pred, target, **keywords)


def test_choices_are_the_accepted_values():
    """``fastpref.CHOICES`` names keywords of the API, and every listed value is accepted."""
    import inspect

    keywords = inspect.signature(fastpref.adaptive_dpo_loss).parameters
    assert set(fastpref.CHOICES) <= set(keywords)
    (model_pred, ref_pred, target), emas = good()
    for name, values in fastpref.CHOICES.items():
        assert keywords[name].default in values
        for value in values:
            if name == "backend" and fastpref.availability(model_pred.device).get(value, None) is not None:
                continue  # a backend this machine lacks raises RuntimeError (its own test)
            extra = dedpo_labels() if value == "dedpo" else {}
            fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas, **{name: value, **extra})
    with pytest.raises(TypeError):
        fastpref.CHOICES["weighting"] = ("linear",)


def test_reordered_op_slots_fail_against_the_documented_order():
    """The fused ops' positional contract: ``settings`` = (beta, rho, k1, k2, c2, eps, tau) and
    ``modes`` = the codes of (preset, weighting, margin, loss_type, reduction). ``SettingSlot``
    and ``ModeSlot`` number their members 0, 1, ... in that order, ``MODE_OPTIONS`` follows
    ``ModeSlot``, and ``encode`` writes each value at its slot."""
    from fastpref.loss.autograd import encode
    from fastpref.loss.options import (
        MODE_OPTIONS,
        LossType,
        Margin,
        ModeSlot,
        Preset,
        Reduction,
        SettingSlot,
        Weighting,
        make_config,
    )

    assert [(m.name, m.value) for m in SettingSlot] == [
        (name, slot) for slot, name in enumerate(("BETA", "RHO", "K1", "K2", "C2", "EPS", "TAU"))
    ]
    assert [(m.name, m.value) for m in ModeSlot] == [
        (name, slot) for slot, name in enumerate(("PRESET", "WEIGHTING", "MARGIN", "LOSS_TYPE", "REDUCTION"))
    ]
    assert MODE_OPTIONS == (Preset, Weighting, Margin, LossType, Reduction)
    keywords = dict(preset="paper", weighting="sqrt", margin="linear", loss_type="hinge", reduction="none")
    config = make_config(beta=2.0, rho=3.0, k1=4.0, k2=5.0, c2=6.0, eps=0.25, ipo_tau=8.0, **keywords)
    settings, modes = encode(config)
    assert settings == [2.0, 3.0, 4.0, 5.0, 6.0, 0.25, 8.0]
    assert modes == [MODE_OPTIONS[slot][keywords[slot.name.lower()].upper()] for slot in ModeSlot]
    assert modes == [Preset.PAPER, Weighting.SQRT, Margin.LINEAR, LossType.HINGE, Reduction.NONE]


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("backend", ["bogus", "cuda", "triton_backend", ""])
def test_unknown_backend(fn, backend):
    (model_pred, ref_pred, target), emas = good()
    with pytest.raises(BAD, match="backend"):
        fn(model_pred, ref_pred, target, ema_preds=emas, backend=backend)


@pytest.mark.parametrize("value", ["bogus", "cuda", "torch,triton"])
def test_bad_backend_env(monkeypatch, value):
    monkeypatch.setenv("FASTPREF_BACKEND", value)
    (model_pred, ref_pred, target), emas = good()
    with pytest.raises(BAD, match="FASTPREF_BACKEND"):
        fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas)
    with pytest.raises(BAD, match="FASTPREF_BACKEND"):
        fastpref.AdaptiveDPOLoss()(model_pred, ref_pred, target, emas)


# --- DeDPO inputs (docs/spec.md §5b) -------------------------------------------------------------------

DEDPO_CASES = {
    "synthetic_above_one": (dict(synthetic_label=1.5), "synthetic_label"),
    "synthetic_negative": (dict(synthetic_label=-0.1), "synthetic_label"),
    "synthetic_tensor_one_bad": (dict(synthetic_label=torch.tensor([0.5, 1.01])), "synthetic_label"),
    "propensity_zero": (dict(propensity=0.0), "propensity"),
    "propensity_above_one": (dict(propensity=1.5), "propensity"),
    "propensity_negative": (dict(propensity=-0.5), "propensity"),
    "propensity_tensor_one_zero": (dict(propensity=torch.tensor([0.5, 0.0])), "propensity"),
    "masked_human_label_half": (dict(human_label=torch.tensor([0.5, math.nan])), "human_label"),
    "masked_human_label_nan": (dict(human_label=torch.tensor([math.nan, 1.0])), "human_label"),
    "masked_human_label_two": (
        dict(human_label=torch.tensor([1.0, 2.0]), human_mask=torch.tensor([True, True])),
        "human_label",
    ),
}


@pytest.mark.parametrize("case", list(DEDPO_CASES))
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_dedpo_bad_values(fn, case):
    overrides, name = DEDPO_CASES[case]
    (model_pred, ref_pred, target), emas = good()
    labels = {**dedpo_labels(), **overrides}
    with pytest.raises(ValueError, match=name):
        fn(model_pred, ref_pred, target, ema_preds=emas, loss_type="dedpo", **labels)


@pytest.mark.parametrize("missing", DEDPO_NAMES)
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_dedpo_missing_input(fn, missing):
    (model_pred, ref_pred, target), emas = good()
    labels = {k: v for k, v in dedpo_labels().items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        fn(model_pred, ref_pred, target, ema_preds=emas, loss_type="dedpo", **labels)


@pytest.mark.parametrize(
    "module_cls", [fastpref.AdaptiveDPOLoss, reference.AdaptiveDPOLoss], ids=["fastpref", "reference"]
)
def test_dedpo_module_without_labels(module_cls):
    (model_pred, ref_pred, target), emas = good()
    with pytest.raises(ValueError, match="synthetic_label|human_label|human_mask|propensity"):
        module_cls(loss_type="dedpo")(model_pred, ref_pred, target, emas)


@pytest.mark.parametrize("name", DEDPO_NAMES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "cdpo"])
@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_dedpo_args_with_other_loss_type(fn, loss_type, name):
    (model_pred, ref_pred, target), emas = good()
    with pytest.raises(ValueError, match=name):
        fn(model_pred, ref_pred, target, ema_preds=emas, loss_type=loss_type, **{name: dedpo_labels()[name]})


def test_dedpo_valid_call_passes():
    """NaN human labels on unmasked pairs, floats or tensors, propensity 1: all accepted."""
    (model_pred, ref_pred, target), emas = good()
    for labels in (
        dedpo_labels(),
        dict(dedpo_labels(), synthetic_label=0.0, propensity=1.0),
        dict(dedpo_labels(), synthetic_label=1.0),
    ):
        loss = fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas, loss_type="dedpo", **labels)
        assert torch.isfinite(loss)


# --- backends that cannot serve a call (docs/spec.md §8) ------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def reason_given(message: str) -> bool:
    return any(word in message.lower() for word in ("built", "install", "device", "dtype", "support", "cuda"))


@pytest.fixture
def native_not_built(monkeypatch):
    """The dispatch as it is on a machine where the native extension was not built."""
    status = {"load_error": "the native extension fastpref._C is not built", "cuda": False}
    monkeypatch.setattr(fastpref.loss.dispatch, "_NATIVE_STATUS", status)


@pytest.mark.parametrize(
    "fn",
    [fastpref.adaptive_dpo_loss, fastpref.diffusion_dpo_loss, module_call(fastpref.AdaptiveDPOLoss)],
    ids=["adaptive", "diffusion", "module"],
)
def test_native_backend_not_built(native_not_built, fn):
    (model_pred, ref_pred, target), _ = good()
    with pytest.raises(RuntimeError, match="native") as info:
        fn(model_pred, ref_pred, target, backend="native")
    assert reason_given(str(info.value)), str(info.value)


@needs_triton
@pytest.mark.parametrize(
    "fn",
    [fastpref.adaptive_dpo_loss, fastpref.diffusion_dpo_loss, module_call(fastpref.AdaptiveDPOLoss)],
    ids=["adaptive", "diffusion", "module"],
)
def test_triton_on_cpu_without_interpreter(monkeypatch, fn):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (model_pred, ref_pred, target), _ = good()
    with pytest.raises(RuntimeError, match="CUDA") as info:
        fn(model_pred, ref_pred, target, backend="triton")
    assert "TRITON_INTERPRET" in str(info.value)


class Spy:
    def __init__(self, result=None):
        self.calls = 0
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.result is None:
            raise AssertionError("backend launched")
        return self.result(*args, **kwargs)


@needs_triton
def test_triton_interpreter_flag_is_read_at_call_time(monkeypatch):
    """The dispatch reads TRITON_INTERPRET per call: set, the call reaches the Triton backend."""
    from fastpref.loss.triton import ops as triton_ops

    (model_pred, ref_pred, target), _ = good()
    spy = Spy(result=lambda inputs, config, return_stats: (torch.zeros(()), None))
    monkeypatch.setattr(triton_ops, "run", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, backend="triton")
    assert spy.calls == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, backend="triton")
    assert spy.calls == 1


@needs_triton
def test_env_torch_makes_auto_use_torch(monkeypatch):
    import fastpref.loss.dispatch as dispatch
    from fastpref.loss.triton import ops as triton_ops

    (model_pred, ref_pred, target), emas = good()
    # Pretend "auto" picks the Triton kernels on this device (as on CUDA); the override must bypass that.
    spy = Spy()
    monkeypatch.setattr(dispatch, "auto_backend", lambda device: "triton")
    monkeypatch.setattr(triton_ops, "run", spy)
    with pytest.raises(AssertionError, match="backend launched"):
        fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas)
    assert spy.calls == 1
    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    loss, stats = fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas, return_stats=True)
    expected, expected_stats = reference.adaptive_dpo_loss(
        model_pred, ref_pred, target, ema_preds=emas, return_stats=True
    )
    assert torch.equal(loss, expected)
    assert all(
        torch.equal(stats[k], expected_stats[k]) for k in expected_stats if isinstance(expected_stats[k], torch.Tensor)
    )
    assert torch.equal(fastpref.AdaptiveDPOLoss()(model_pred, ref_pred, target, emas), expected)
    assert spy.calls == 1


def test_env_overrides_auto_only(monkeypatch, native_not_built):
    (model_pred, ref_pred, target), _ = good()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTPREF_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native"):
        fastpref.adaptive_dpo_loss(model_pred, ref_pred, target)  # "auto" -> native, not built
    with pytest.raises(RuntimeError, match="native"):
        fastpref.diffusion_dpo_loss(model_pred, ref_pred, target)
    # An explicit backend is not overridden.
    expected = reference.adaptive_dpo_loss(model_pred, ref_pred, target)
    assert torch.equal(fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, backend="torch"), expected)
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.setenv("FASTPREF_BACKEND", "torch")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, backend="triton")


# --- the deprecated backend name "cpp" and the choice of "auto" on CUDA ------------------------------


def test_cpp_is_a_deprecated_alias_of_native(monkeypatch):
    """``"cpp"`` (the native backend's former name) still works for one release: it warns with a
    FutureWarning that names the new name, attributed to the caller, and runs ``"native"``."""
    from fastpref.loss import dispatch

    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    (model_pred, ref_pred, target), emas = good()
    chosen, real_select = [], dispatch.select

    def select(backend, inputs):  # record the backend chosen, and stop before any kernel
        chosen.append(real_select(backend, inputs))
        raise AssertionError("backend chosen")

    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, device: None)  # native built or not
    monkeypatch.setattr(dispatch, "select", select)
    with pytest.warns(FutureWarning, match="'cpp' is deprecated.*use 'native'") as caught:
        with pytest.raises(AssertionError, match="backend chosen"):
            fastpref.adaptive_dpo_loss(model_pred, ref_pred, target, ema_preds=emas, backend="cpp")
    assert chosen == ["native"] and caught[0].filename == __file__
    with pytest.warns(FutureWarning, match="use 'native'") as caught:
        module = fastpref.AdaptiveDPOLoss(backend="cpp")
    assert module.keywords["backend"] == "native" and caught[0].filename == __file__
    monkeypatch.setenv("FASTPREF_BACKEND", "cpp")
    with pytest.warns(FutureWarning, match="FASTPREF_BACKEND='cpp' is deprecated"):
        with pytest.raises(AssertionError, match="backend chosen"):
            fastpref.diffusion_dpo_loss(model_pred, ref_pred, target)
    assert chosen == ["native", "native"]
    assert "cpp" not in fastpref.CHOICES["backend"]  # not advertised (fastpref train's flag takes the new name)


def test_auto_on_cuda_picks_native_when_its_cuda_kernels_are_registered(monkeypatch):
    """Decided from the build alone, so it is tested here without a GPU: with CUDA kernels in
    fastpref._C, "auto" takes the native backend on CUDA; without, Triton (the reason says why)."""
    from fastpref.loss import dispatch

    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "_NATIVE_STATUS", {"load_error": None, "cuda": True})
    assert dispatch.auto_backend(cuda) == "native" and fastpref.availability(cuda)["native"] is None
    monkeypatch.setattr(dispatch, "_NATIVE_STATUS", {"load_error": None, "cuda": False})
    assert dispatch.auto_backend(cuda) == ("triton" if dispatch.TRITON_INSTALLED else "torch")
    reason = fastpref.availability(cuda)["native"]
    assert "built without CUDA kernels" in reason and "nvcc" in reason and "FASTPREF_NO_CUDA" in reason
    assert dispatch.auto_backend(torch.device("cpu")) == "native"
    monkeypatch.setattr(dispatch, "_NATIVE_STATUS", {"load_error": "not built", "cuda": False})
    assert fastpref.availability(cuda)["native"] == "not built"
    assert dispatch.auto_backend(torch.device("cpu")) == "torch"


def test_native_cuda_check_asks_the_dispatcher_for_each_op(monkeypatch):
    from fastpref.loss import dispatch

    # The real answer, the one recorded at import (False with a CPU-only torch, as in CI).
    assert dispatch.native_cuda_kernels_registered() == dispatch._NATIVE_STATUS["cuda"]
    registered = {"fastpref::native_forward", "fastpref::native_backward", "fastpref::native_loss"}
    asked = []

    def has_kernel(op, key):
        asked.append((op, key))
        return key == "CUDA" and op in registered

    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", has_kernel)
    monkeypatch.setattr(torch._C, "_dispatch_has_computed_kernel_for_dispatch_key", has_kernel)
    assert dispatch.native_cuda_kernels_registered()
    assert {op for op, _ in asked} == registered and {key for _, key in asked} == {"CUDA"}
    for missing in sorted(registered):
        registered.discard(missing)
        assert not dispatch.native_cuda_kernels_registered(), missing
        registered.add(missing)


# --- validation comes before backend selection and any kernel launch (docs/spec.md §7) -----------------

EARLY_CASES = {
    "beta": lambda call, m, r, tg, e: call(m, r, tg, ema_preds=e, beta=-1.0),
    "eps": lambda call, m, r, tg, e: call(m, r, tg, ema_preds=e, eps=0.5, loss_type="robust"),
    "ref_pred": lambda call, m, r, tg, e: call(m, r[:B], tg, ema_preds=e),
    "target": lambda call, m, r, tg, e: call(m, r, tg[:1], ema_preds=e),
    "ema_preds": lambda call, m, r, tg, e: call(m, r, tg, ema_preds=[e[0][:, :2]]),
    "model_pred": lambda call, m, r, tg, e: call(m[:3], r[:3], tg[:3], ema_preds=()),
    "propensity": lambda call, m, r, tg, e: call(
        m, r, tg, ema_preds=e, loss_type="dedpo", **dict(dedpo_labels(), propensity=0.0)
    ),
    "synthetic_label": lambda call, m, r, tg, e: call(m, r, tg, ema_preds=e, synthetic_label=0.5),
}


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("case", list(EARLY_CASES))
def test_validation_before_backend_selection(monkeypatch, case, backend):
    """Without the interpreter Triton cannot run on CPU and native may not be built: a malformed call must
    still report the malformed argument (ValueError/TypeError), not the backend (RuntimeError)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (m, r, tg), e = good()
    call = lambda *a, **kw: fastpref.adaptive_dpo_loss(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(BAD, match=case):
        EARLY_CASES[case](call, m, r, tg, e)


@needs_triton
@pytest.mark.parametrize("case", list(EARLY_CASES))
def test_validation_before_kernel_launch(monkeypatch, case):
    """With the Triton backend selectable, a malformed call never reaches it."""
    from fastpref.loss.triton import ops as triton_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spy = Spy()
    monkeypatch.setattr(triton_ops, "run", spy)
    (m, r, tg), e = good()
    call = lambda *a, **kw: fastpref.adaptive_dpo_loss(*a, backend="triton", **kw)  # noqa: E731
    with pytest.raises(BAD, match=case):
        EARLY_CASES[case](call, m, r, tg, e)
    assert spy.calls == 0
