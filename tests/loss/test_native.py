"""The native CPU backend ``"native"`` (``csrc/``, ``fastpref._C``) where the generic parity tests do
not reach: bitwise reproducibility, multi-chunk inputs, rounding of 16-bit gradients, the ops'
contracts, the C++ autograd op against the Python one, the dispatch. Skipped as a whole when the
extension is not built (``fastpref.availability`` says why).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import subprocess
import sys

import pytest
import torch
from conftest import assert_close64, call_loss, make_case, outputs

import fastpref
from fastpref.loss import autograd, dispatch
from fastpref.loss.options import CONFIG_KEYS, MODE_OPTIONS, LossType, ModeSlot, SettingSlot, acc_dtype, make_config

NATIVE_REASON = fastpref.availability("cpu")["native"]
pytestmark = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native backend unavailable: {NATIVE_REASON}")

if NATIVE_REASON is None:
    from fastpref import _C
    from fastpref.loss import native

REF = fastpref.reference.adaptive_dpo_loss
CHUNK = 4096  # columns per parallel task in csrc/cpu/kernels.h (kChunk)
# D = 3 * 61 * 53 = 9699: three chunks, the last one with a partial block.
MULTI_CHUNK_SHAPE = (3, 61, 53)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def cpu_isa(name: str):
    old = _C.cpu_isa()
    _C._set_cpu_isa(name)
    try:
        yield
    finally:
        _C._set_cpu_isa(old)


@contextlib.contextmanager
def python_autograd(enabled: bool):
    """``enabled``: the native backend's calls run its two ops through ``autograd.FusedAdaptiveDPO``
    (Python autograd: ``autograd.run(native.OPS, ...)``); otherwise through ``fastpref::native_loss``
    (the C++ autograd kernel, every call's path)."""
    if not enabled:
        yield
        return

    def python_run(inputs, config, return_stats):
        return autograd.run(native.OPS, inputs, config, return_stats)

    real_run = native.run
    native.run = python_run
    try:
        yield
    finally:
        native.run = real_run


AUTOGRAD_PATHS = {"native_loss": False, "python": True}  # path name -> python_autograd(enabled)


def run_native(case, config, *, tensors=None, upstream=None):
    """Loss, gradient and stats of the native backend as a dict of tensors (original dtypes)."""
    if upstream is None and config.get("reduction") == "none":
        upstream = torch.linspace(-1.0, 1.5, case.batch, dtype=torch.float64)
    loss, grad, stats, _ = call_loss(
        fastpref.adaptive_dpo_loss, case, config, backend="native", tensors=tensors, upstream=upstream
    )
    out = {"loss": loss, "grad": grad}
    for key, value in stats.items():
        out[key] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise(first, second, context=""):
    """Same dtype, shape and bit pattern (NaN included) for every entry."""
    assert first.keys() == second.keys()
    for key in first:
        a, b = first[key], second[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (key, context)
        assert torch.equal(_bits(a), _bits(b)), (
            f"{key} differs bitwise {context}: max diff {(a.double() - b.double()).abs().max().item():.3e}"
        )


DTYPE_MIXES = {
    "f32": "f32",
    "bf16": "bf16",
    "f16": "f16",
    "f64": "f64",
    "bf16-model-f32-rest": {"model": "bf16", "ref": "f32", "target": "f32", "ema": ["f16", "bf16"]},
    "f16-model-f64-target": {"model": "f16", "ref": "bf16", "target": "f64", "ema": ["f32", "f16"]},
}
CONFIGS = {
    "adaptive-official": dict(beta=5.0),
    "paper-sqrt-ipo-none": dict(
        beta=5.0, preset="paper", weighting="sqrt", margin="linear", loss_type="ipo", reduction="none"
    ),
    "dedpo-sum": dict(beta=5.0, loss_type="dedpo", reduction="sum"),
}


def _case(
    dtype, *, shape=MULTI_CHUNK_SHAPE, layout="contiguous", shared_target=False, k=2, batch=3, labels=True, seed=5
):
    return make_case(
        batch=batch,
        shape=shape,
        k=k,
        dtype=dtype,
        layout=layout,
        shared_target=shared_target,
        ema_form="list",
        labels=labels,
        seed=seed,
    )


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype_name", sorted(DTYPE_MIXES))
def test_bitwise_across_thread_counts_and_calls(dtype_name, config_name):
    case = _case(DTYPE_MIXES[dtype_name], shared_target=dtype_name == "bf16")
    config = CONFIGS[config_name]
    tensors = case.build()
    with num_threads(1):
        single = run_native(case, config, tensors=tensors)
    with num_threads(2):
        double = run_native(case, config, tensors=tensors)
        again = run_native(case, config, tensors=tensors)
    assert_bitwise(single, double, "between 1 and 2 threads")
    assert_bitwise(double, again, "between two identical calls")


@pytest.mark.parametrize("layout", ["contiguous", "col_strided", "channels_last", "permuted", "batch_strided"])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16", "f16", "f16-model-f64-target"])
def test_bitwise_across_instruction_sets(dtype_name, layout):
    """Every variant compiled into fastpref._C that this CPU runs gives the baseline's bits."""
    isas = _C.cpu_isas()
    assert "base" in isas and _C.cpu_isa() in isas
    case = _case(DTYPE_MIXES[dtype_name], shape=(3, 17, 203), layout=layout)  # D = 10353: 3 chunks
    tensors = case.build()
    results = {}
    for isa in isas:
        with cpu_isa(isa), num_threads(2):
            results[isa] = run_native(case, CONFIGS["adaptive-official"], tensors=tensors)
    for isa in isas:
        assert_bitwise(results["base"], results[isa], f"between base and {isa}")


def test_option_codes_match_the_python_enums():
    """The C++ enums of csrc/common/options.h hold the codes of fastpref.loss.options,
    options in the order of the ops' ``modes``."""
    expected = {option.__name__: {member.name: member.value for member in option} for option in MODE_OPTIONS}
    codes = _C.option_codes()
    assert codes == expected
    assert list(codes) == list(expected)


def test_reordered_op_slots_in_python_or_cpp_fail_this_check():
    """The kernels read ``settings`` and ``modes`` at the positions of csrc/common/options.h:
    each slot there is the one of ``SettingSlot`` and ``ModeSlot`` (fastpref.loss.options) of
    the same name, in the same order, so reordering either side breaks this test."""
    expected = {slots.__name__: {member.name: member.value for member in slots} for slots in (SettingSlot, ModeSlot)}
    mirrored = _C.op_slots()
    assert mirrored == expected
    assert {name: list(slots) for name, slots in mirrored.items()} == {
        name: list(slots) for name, slots in expected.items()
    }


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="not built or not supported"):
        _C._set_cpu_isa("sse1")


@pytest.mark.parametrize("layout", ["col_strided", "channels_last", "permuted", "batch_strided", "expanded_target"])
def test_strided_layouts_match_contiguous_bitwise(layout):
    """Strided inputs (column stride != 1, channels-last, reversed dims, stride-0 target) are read
    in place and give exactly the bits of the same values stored contiguously."""
    case = _case("f32", shape=(4, 33, 35), layout=layout)  # D = 4620: two chunks
    model, ref, target, ema = case.build()
    if layout == "col_strided":
        assert model.stride(-1) == 2
    contiguous = (
        model.detach().contiguous().requires_grad_(True),
        ref.contiguous(),
        target.contiguous(),
        [e.contiguous() for e in ema],
    )
    for config in CONFIGS.values():
        strided_result = run_native(case, config, tensors=(model, ref, target, ema))
        assert_bitwise(strided_result, run_native(case, config, tensors=contiguous), layout)


def test_many_irreducible_inner_dims():
    """More inner dims than the kernels walk in place (17 that no two merge: reversed storage
    order) take the contiguous-copy path, with the same bits."""
    gen = torch.Generator().manual_seed(3)
    shape = (4,) + (2,) * 17
    perm = [0] + list(range(17, 0, -1))
    values = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    reversed_storage = [v.permute(perm).contiguous().permute(perm) for v in values]
    assert reversed_storage[0].stride()[1:] == tuple(2**i for i in range(17))
    results = []
    for model, ref, target in (reversed_storage, values):
        model = model.detach().requires_grad_(True)
        loss = fastpref.adaptive_dpo_loss(model, ref, target, beta=5.0, backend="native")
        loss.backward()
        results.append({"loss": loss.detach(), "grad": model.grad})
    assert_bitwise(results[0], results[1])


@pytest.mark.parametrize("shared_target", [False, True])
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_multi_chunk_float64_parity(config_name, shared_target):
    """D spanning several parallel chunks (and K = 3, B = 5) against the float64 reference."""
    case = _case("f64", shared_target=shared_target, k=3, batch=5)
    config = CONFIGS[config_name]
    upstream = torch.linspace(-1.0, 1.5, case.batch, dtype=torch.float64) if config.get("reduction") == "none" else None
    loss, grad, stats, _ = call_loss(fastpref.adaptive_dpo_loss, case, config, backend="native", upstream=upstream)
    loss64, grad64, stats64, _ = call_loss(REF, case, config, upcast=True, upstream=upstream)
    with num_threads(2):
        assert_close64(outputs(loss, grad, stats), outputs(loss64, grad64, stats64), context=f"[native {config_name}]")


def _correct_rounding_case(acc_dtype, model_dtype):
    """Backward op inputs whose gradient is exactly v = 1 + 2^-(m+1) + 2^-30 (loser row) and
    -v (winner row), m = the 16-bit format's mantissa bits: rounding v to float32 first lands
    on the tie and then rounds to even (1.0), direct rounding gives 1 + 2^-m."""
    mantissa = 7 if model_dtype == torch.bfloat16 else 10
    v = 1.0 + 2.0 ** -(mantissa + 1) + 2.0**-30
    model = torch.full((2, 1), 2.0, dtype=model_dtype)
    target = torch.full((2, 1), 2.0 - v, dtype=torch.float64)  # exact in float64
    coef = torch.full((1,), 0.5, dtype=acc_dtype)  # scale = 0.5 * 1 * 2 / D(=1) = 1
    return torch.ones((), dtype=acc_dtype), coef, model, target, 1.0 + 2.0**-mantissa


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_gradient_rounding(model_dtype):
    backward = torch.ops.fastpref.native_backward.default
    # From float64 accumulation: correctly rounded (no double rounding through float32).
    grad_loss, coef, model, target, expected = _correct_rounding_case(torch.float64, model_dtype)
    grad = backward(grad_loss, coef, model, target)
    assert grad.dtype == model_dtype
    assert grad[0, 0].item() == -expected and grad[1, 0].item() == expected
    # From float32 accumulation: the float32 result rounded to nearest even, i.e. what torch's
    # float32 -> 16-bit conversion gives.
    gen = torch.Generator().manual_seed(9)
    model = torch.randn(6, 5, 300, generator=gen).to(model_dtype)
    target = torch.randn(3, 5, 300, generator=gen).to(model_dtype)
    coef = torch.randn(3, generator=gen)
    upstream = torch.randn(3, generator=gen)
    low = backward(upstream, coef, model, target)
    high = backward(upstream, coef, model.float(), target.float())
    assert torch.equal(low, high.to(model_dtype))


# gradcheck differentiates through everything, while u, W, Gamma and c2 are stop-gradient
# (docs/spec.md §6): hold W = 1/2 and Gamma = c2 constant (sigmoid weighting with k1 = 0, linear margin
# with k2 = 0 and a given c2), as tests/loss/test_numerics.py does.
CONSTANT_WG = dict(weighting="sigmoid", k1=0.0, margin="linear", k2=0.0, c2=0.05)


@pytest.mark.parametrize(
    "config",
    [
        dict(beta=3.0, **CONSTANT_WG),
        dict(beta=3.0, loss_type="robust", eps=0.2, reduction="none", **CONSTANT_WG),
        dict(beta=3.0, loss_type="ipo", ipo_tau=0.7, reduction="sum", **CONSTANT_WG),
        dict(beta=3.0, weighting="none", margin="none", loss_type="cdpo"),
    ],
    ids=["sigmoid", "robust-none", "ipo-sum", "cdpo-plain"],
)
@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_gradcheck_float64_multi_chunk(config, path):
    """float64 gradcheck (fast mode: random projections) with D over several parallel chunks
    and a model_pred of column stride 2, through either autograd path."""
    case = make_case(batch=2, shape=(3, 61, 53), k=2, dtype=torch.float64, layout="col_strided", seed=11)
    model, ref, target, ema = case.build()
    assert model.stride(-1) == 2

    def loss_of(m):
        return fastpref.adaptive_dpo_loss(m, ref, target, ema_preds=ema, backend="native", **config)

    with python_autograd(AUTOGRAD_PATHS[path]):
        assert torch.autograd.gradcheck(loss_of, (model,), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def op_settings(*, beta=5.0, loss_type="sigmoid", reduction="mean"):
    """``(settings, modes)`` op arguments (as ``fastpref.loss.autograd.encode`` makes them) of the default
    Adaptive-DPO config with the given beta, loss type and reduction."""
    defaults = inspect.signature(fastpref.adaptive_dpo_loss).parameters
    keywords = {name: defaults[name].default for name in CONFIG_KEYS}
    config = make_config(**dict(keywords, beta=beta, loss_type=loss_type, reduction=reduction))
    return autograd.encode(config)


def _op_inputs(dtype=torch.float32, *, k=2, loss_type="sigmoid", reduction="mean", shared=True):
    gen = torch.Generator().manual_seed(2)
    rows, shape = 4, (3, 5, 7)
    model = torch.randn(rows, *shape, generator=gen).to(dtype)
    ref = torch.randn(rows, *shape, generator=gen).to(dtype)
    target = torch.randn(rows // (2 if shared else 1), *shape, generator=gen).to(dtype)
    emas = [torch.randn(rows, *shape, generator=gen).to(torch.bfloat16) for _ in range(k)]
    settings, modes = op_settings(loss_type=loss_type, reduction=reduction)
    acc = acc_dtype(model, ref, target, *emas)
    soft = torch.rand(rows // 2, generator=gen).to(acc) if loss_type == "dedpo" else None
    return model, ref, target, emas, soft, settings, modes


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(dtype=torch.float64, k=0, reduction="none", shared=False),
        dict(dtype=torch.float16, loss_type="dedpo", reduction="sum"),
    ],
    ids=["f32", "f64-none", "f16-dedpo"],
)
def test_opcheck(kwargs):
    args = _op_inputs(**kwargs)
    torch.library.opcheck(torch.ops.fastpref.native_forward.default, args)
    loss, coef, *_ = torch.ops.fastpref.native_forward.default(*args)
    grad_loss = torch.ones_like(loss)
    model, target = args[0], args[2]
    torch.library.opcheck(torch.ops.fastpref.native_backward.default, (grad_loss, coef, model, target))
    expanded = torch.ones((), dtype=loss.dtype).expand(coef.shape)  # a stride-0 [B] upstream
    torch.library.opcheck(torch.ops.fastpref.native_backward.default, (expanded, coef, model, target))
    # native_loss with model_pred requiring grad: also checks its autograd kernel, traced by
    # AOTAutograd on fake tensors with static and dynamic shapes.
    torch.library.opcheck(torch.ops.fastpref.native_loss.default, (model.clone().requires_grad_(True),) + args[1:])


def test_fake_outputs_match_real():
    args = _op_inputs(dtype=torch.bfloat16, reduction="none")
    real = torch.ops.fastpref.native_forward.default(*args)
    fake = autograd.fake_forward(*args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype
    loss_outputs = torch.ops.fastpref.native_loss.default(*args)
    fake_loss_outputs = native._fake_loss(*args)
    assert len(loss_outputs) == len(fake_loss_outputs) == 4
    for r, f in zip(loss_outputs, fake_loss_outputs):
        assert r.shape == f.shape and r.dtype == f.dtype
    grad = torch.ops.fastpref.native_backward.default(torch.ones_like(real[0]), real[1], args[0], args[2])
    fake_grad = autograd.fake_backward(torch.ones_like(real[0]), real[1], args[0], args[2])
    assert grad.shape == fake_grad.shape and grad.dtype == fake_grad.dtype and grad.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compile_fullgraph_matches_eager(dtype):
    """A compiled forward (fullgraph: the ops are traced through their fakes) with the backward
    run outside the compiled region gives the eager native results."""
    torch._dynamo.reset()
    case = make_case(batch=3, shape=(4, 9, 11), k=2, dtype=dtype, shared_target=True, seed=4)

    def forward(model, ref, target, ema):
        loss, stats = fastpref.adaptive_dpo_loss(
            model, ref, target, ema_preds=ema, beta=5.0, backend="native", return_stats=True
        )
        return loss, stats["u"], stats["implicit_acc"]

    compiled = torch.compile(forward, fullgraph=True)
    results = []
    for fn in (compiled, forward, compiled):
        model, ref, target, ema = case.build()
        loss, u, acc = fn(model, ref, target, ema)
        loss.backward()
        results.append((loss.detach(), u, torch.tensor(float(acc)), model.grad))
    for compiled_result in (results[0], results[2]):
        for got, want in zip(compiled_result, results[1]):
            assert torch.equal(got, want)


def test_auto_picks_native_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    assert dispatch.auto_backend(torch.device("cpu")) == "native"
    calls = []
    real_run = native.run
    monkeypatch.setattr(native, "run", lambda *a: calls.append(1) or real_run(*a))
    case = make_case(batch=2, shape=(3, 4), k=1, dtype=torch.float32)
    model, ref, target, ema = case.build()
    fastpref.adaptive_dpo_loss(model, ref, target, ema_preds=ema)
    assert calls == [1]


def test_reason_off_cpu():
    reason = fastpref.availability("meta")["native"]
    assert reason is not None and "CPU and CUDA" in reason
    case = make_case(batch=2, shape=(3, 4), k=0, dtype=torch.float32, device="meta")
    model, ref, target, _ = case.build(requires_grad=False)
    with pytest.raises(RuntimeError, match="native.*CPU"):
        fastpref.adaptive_dpo_loss(model, ref, target, backend="native")


def test_reason_when_not_built(monkeypatch):
    monkeypatch.setattr(dispatch, "_NATIVE_STATUS", {})
    monkeypatch.setattr(dispatch.importlib.util, "find_spec", lambda name, *args: None)
    reason = dispatch.native_unavailable(torch.device("cpu"))
    assert "not built" in reason and "pip install" in reason
    assert dispatch.auto_backend(torch.device("cpu")) == "torch"


def test_reason_when_the_build_fails_to_load(monkeypatch):
    def broken(name, *args):
        raise ImportError("fastpref/_C.so: undefined symbol: _ZN3c105Error (example)")

    monkeypatch.setattr(dispatch, "_NATIVE_STATUS", {})
    monkeypatch.setattr(dispatch.importlib, "import_module", broken)
    reason = dispatch.native_unavailable(torch.device("cpu"))
    assert "fails to load" in reason and "undefined symbol" in reason
    monkeypatch.undo()
    assert dispatch.native_unavailable(torch.device("cpu")) is None


def test_import_loads_the_backend_but_not_dynamo():
    """``import fastpref`` looks up the native backend (so a first call under torch.compile only
    reads the result) without importing torch._dynamo, which would double the import time."""
    code = "import sys, fastpref; print('torch._dynamo' in sys.modules, 'fastpref.loss.native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr


def test_op_rejects_malformed_calls():
    model, ref, target, emas, soft, settings, modes = _op_inputs()
    forward = torch.ops.fastpref.native_forward.default
    with_modes = lambda slot, code: [code if s == slot else modes[s] for s in ModeSlot]  # noqa: E731
    with pytest.raises(RuntimeError, match="settings"):
        forward(model, ref, target, emas, soft, settings[:-1], modes)
    with pytest.raises(RuntimeError, match="modes"):
        forward(model, ref, target, emas, soft, settings, with_modes(ModeSlot.LOSS_TYPE, len(LossType)))
    with pytest.raises(RuntimeError, match="soft_label"):
        forward(model, ref, target, emas, None, settings, with_modes(ModeSlot.LOSS_TYPE, int(LossType.DEDPO)))
    with pytest.raises(RuntimeError, match="target"):
        forward(model, ref, target[:, :2], emas, soft, settings, modes)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        forward(model.to(torch.int32), ref, target, emas, soft, settings, modes)


def test_tasks_cover_every_column():
    """Columns at chunk and block boundaries all count: a single nonzero difference anywhere
    shows up in e (one column at a time, D = 2 chunks + 1)."""
    features = 2 * CHUNK + 1
    model = torch.zeros(2, features, dtype=torch.float64)
    target = torch.zeros(1, features, dtype=torch.float64)
    ref = torch.zeros(2, features, dtype=torch.float64)
    settings, modes = op_settings()
    for column in itertools.chain(range(0, features, 511), [CHUNK - 1, CHUNK, features - 1]):
        model.zero_()
        model[1, column] = 3.0
        _, _, _, sample_err, _ = torch.ops.fastpref.native_forward.default(
            model, ref, target, [], None, settings, modes
        )
        assert sample_err[0].tolist() == [0.0, 9.0 / features], column


# ---------------------------------------------------------------------------------------------
# fastpref::native_loss (C++ autograd kernel) against autograd.FusedAdaptiveDPO (Python autograd)
# ---------------------------------------------------------------------------------------------

PATH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}
PATH_CONFIGS = {
    "mean": dict(beta=5.0),
    "sum": dict(beta=5.0, reduction="sum"),
    "none": dict(beta=5.0, reduction="none"),  # upstream: a strided [B] gradient
    "dedpo-mean": dict(beta=5.0, loss_type="dedpo"),  # soft_label: a tensor input of the op
}


def _path_case(dtype, k=2):
    return _case(dtype, shape=(3, 9, 11), k=k, batch=3, shared_target=k == 0)


@pytest.mark.parametrize("config_name", sorted(PATH_CONFIGS))
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("dtype_name", sorted(PATH_DTYPES))
def test_autograd_paths_bitwise_equal(dtype_name, k, config_name):
    """Loss, every stat and the gradient: the same bits through either autograd path."""
    case = _path_case(PATH_DTYPES[dtype_name], k=k)
    tensors = case.build()
    results = {}
    for path, python in AUTOGRAD_PATHS.items():
        with python_autograd(python):
            results[path] = run_native(case, PATH_CONFIGS[config_name], tensors=tensors)
    assert_bitwise(results["native_loss"], results["python"], f"[{dtype_name} K={k} {config_name}]")


def _loss(tensors, **config):
    model, ref, target, ema = tensors
    return fastpref.adaptive_dpo_loss(
        model, ref, target, ema_preds=ema, beta=5.0, backend="native", return_stats=True, **config
    )


def test_default_path_is_the_native_autograd_node():
    tensors = _path_case(torch.float32).build()
    loss, stats = _loss(tensors)
    assert "LossFunction" in loss.grad_fn.name(), loss.grad_fn.name()
    with python_autograd(True):
        loss, _ = _loss(tensors)
    assert type(loss.grad_fn).__name__ == "FusedAdaptiveDPOBackward"


@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_no_graph_without_grad(path):
    """Inputs not requiring grad, ``torch.no_grad()`` and ``torch.inference_mode()`` (the op's
    CPU kernel, below autograd): no graph, and the bits of a call that records one."""
    case = _path_case(torch.float32)
    model, ref, target, ema = case.build()
    detached = (model.detach(), ref, target, ema)
    with python_autograd(AUTOGRAD_PATHS[path]):
        with_graph, with_graph_stats = _loss((model, ref, target, ema))
        results = [_loss(detached)]
        with torch.no_grad():
            results.append(_loss((model, ref, target, ema)))
        with torch.inference_mode():
            results.append(_loss((model, ref, target, ema)))
    assert with_graph.requires_grad
    for loss, stats in results:
        assert not loss.requires_grad and loss.grad_fn is None
        assert torch.equal(_bits(loss), _bits(with_graph.detach()))
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                assert not value.requires_grad and torch.equal(_bits(value), _bits(with_graph_stats[key])), key
            else:
                assert value == with_graph_stats[key], key


@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_stats_never_get_gradients(path):
    """The stats are detached outputs, and the backward creates no zero gradients for them: it
    runs the backward op and nothing that fills a tensor."""
    case = _path_case(torch.float32)
    model, ref, target, ema = case.build()
    with python_autograd(AUTOGRAD_PATHS[path]):
        loss, stats = _loss((model, ref, target, ema))
    for key, value in stats.items():
        assert not (isinstance(value, torch.Tensor) and (value.requires_grad or value.grad_fn is not None)), key
    seed = torch.ones_like(loss)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward(seed)
    names = {event.name for event in prof.events()}
    assert "fastpref::native_backward" in names
    assert not [name for name in names if any(word in name for word in ("zero", "fill", "ones"))], sorted(names)


@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_retain_graph_and_freed_graph(path):
    """retain_graph: repeated backward passes give the same bits (and those of the other path);
    once the graph is freed, another backward raises autograd's error."""
    tensors = _path_case(torch.float32).build()
    model = tensors[0]
    with python_autograd(AUTOGRAD_PATHS[path]):
        loss, _ = _loss(tensors)
    with python_autograd(not AUTOGRAD_PATHS[path]):
        other, _ = _loss(tensors)
    (want,) = torch.autograd.grad(other, model)
    (first,) = torch.autograd.grad(loss, model, retain_graph=True)
    (second,) = torch.autograd.grad(loss, model)
    assert torch.equal(_bits(first), _bits(want)) and torch.equal(_bits(second), _bits(want))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, model)


@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_saved_input_modified_in_place(path):
    tensors = _path_case(torch.float32).build()
    with python_autograd(AUTOGRAD_PATHS[path]):
        loss, _ = _loss(tensors)
    with torch.no_grad():
        tensors[0].mul_(1.0)  # bumps model_pred's version counter
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# Ways of differentiating the gradient: a gradient penalty on its own, added to the loss (so the
# loss alone reaches model_pred), and backward() over both.
PENALTY_USES = {
    "grad_of_penalty": lambda loss, grad, model: torch.autograd.grad(grad.square().sum(), model),
    "grad_of_loss_plus_penalty": lambda loss, grad, model: torch.autograd.grad(loss + grad.square().sum(), model),
    "backward_of_loss_plus_penalty": lambda loss, grad, model: (loss + grad.square().sum()).backward(),
}


@pytest.mark.parametrize("use", sorted(PENALTY_USES))
@pytest.mark.parametrize("upstream", ["plain", "requires_grad"])
@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_double_backward_raises(path, upstream, use):
    """The gradient is not differentiable: with create_graph=True it comes back (the bits of a
    plain backward) requiring grad, and differentiating it raises "differentiate twice", whether
    or not the upstream gradient requires grad and whichever way a gradient penalty is used: the
    penalty is never silently dropped."""
    tensors = _path_case(torch.float32).build()
    model = tensors[0]
    scale = torch.tensor(2.0, requires_grad=True)
    with python_autograd(AUTOGRAD_PATHS[path]):
        loss, _ = _loss(tensors)
    (want,) = torch.autograd.grad(loss, model, retain_graph=True)
    (grad,) = torch.autograd.grad(loss if upstream == "plain" else loss * scale, model, create_graph=True)
    assert grad.requires_grad
    if upstream == "plain":
        assert torch.equal(_bits(grad), _bits(want))
    with pytest.raises(RuntimeError, match="differentiate twice: the gradient of the fused loss is not differentiable"):
        PENALTY_USES[use](loss, grad, model)


@pytest.mark.parametrize("path", sorted(AUTOGRAD_PATHS))
def test_only_model_pred_gets_a_gradient(path):
    """Other inputs that require grad make the loss require grad but get no gradient (docs/spec.md §6:
    the fused backward differentiates model_pred only), and model_pred not requiring grad is
    fine."""
    case = _path_case(torch.float32)
    model, ref, target, ema = case.build(requires_grad=False)
    ref.requires_grad_(True)
    ema[0].requires_grad_(True)
    with python_autograd(AUTOGRAD_PATHS[path]):
        loss, _ = _loss((model, ref, target, ema))
    assert loss.requires_grad
    assert torch.autograd.grad(loss, (ref, ema[0]), allow_unused=True) == (None, None)
