"""The fused backends on a CUDA device (run by ``benchmarks/gpu_suite.sh``): parity of
``"native"`` and ``"triton"`` with the float64 reference in float32/bfloat16/float16 for K = 0..4,
every head and every option value, strided and shared-target inputs (the machinery of
``test_parity``, at a size that takes several chunks per row on a GPU);
``torch.compile(fullgraph=True)``; CUDA-graph capture and replay, bitwise equal to uncaptured
calls; bitwise determinism; NaN propagation; the peak extra memory of forward + backward.

Without CUDA every test skips. With ``FASTPREF_REQUIRE_NATIVE_CUDA=1`` (set by the suite) a
native backend that cannot serve CUDA fails the tests instead of skipping them.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import STAT_KEYS, apply_tiling, call_loss, make_case, outputs
from test_numerics import NAN_SITES
from test_parity import BETA, check_low_precision

import fastpref
from fastpref.loss.options import LOSS_TYPES, MODE_OPTIONS, ModeSlot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_suite.sh)")

CUDA = "cuda"
FUSED = ("native", "triton")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# D = 4 * 16 * 24 = 1536: two chunks of a 1024-column block, the second one partial.
SHAPE = (4, 16, 24)
PARITY_SHAPE = (3, 7, 9)  # test_parity's D = 189, for which its low-precision tolerances are set
LAYOUTS = ("contiguous", "batch_strided", "col_strided", "channels_last", "expanded_target")


def head_configs():
    """Configs in which every value of every option (preset, weighting, margin, loss type,
    reduction) appears: option i takes its value ``index % len(option)``."""
    count = max(len(option) for option in MODE_OPTIONS)
    return [
        {slot.name.lower(): option(index % len(option)).name.lower() for slot, option in zip(ModeSlot, MODE_OPTIONS)}
        for index in range(count)
    ]


HEAD_CONFIGS = head_configs()


def require(backend: str) -> None:
    """Skip (or, under the GPU suite, fail) when ``backend`` cannot serve CUDA tensors."""
    reason = fastpref.availability(CUDA)[backend]
    if reason is not None:
        message = f"{backend} cannot serve CUDA here: {reason}"
        if backend == "native" and os.environ.get("FASTPREF_REQUIRE_NATIVE_CUDA") == "1":
            pytest.fail(message)
        pytest.skip(message)


def gpu_case(dtype=torch.float32, **kwargs):
    kwargs.setdefault("shape", SHAPE)
    return make_case(dtype=dtype, device=CUDA, **kwargs)


def test_head_configs_take_every_option_value():
    for slot, option in zip(ModeSlot, MODE_OPTIONS):
        taken = {config[slot.name.lower()] for config in HEAD_CONFIGS}
        assert taken == {member.name.lower() for member in option}
    assert {config["loss_type"] for config in HEAD_CONFIGS} == set(LOSS_TYPES)


@pytest.mark.parametrize("head", range(len(HEAD_CONFIGS)), ids=[c["loss_type"] for c in HEAD_CONFIGS])
@pytest.mark.parametrize("k", range(5))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("backend", FUSED)
def test_parity_with_float64_reference(monkeypatch, backend, dtype, k, head):
    """max|backend - ref64| <= 2 max|eager in the same dtype - ref64| + atol for the loss, the
    gradient and every stats entry (``test_parity.check_low_precision``, whose tolerances are set
    for its D = 189); the layout and target sharing cycle with K and the head, so that each layout
    meets each dtype, and every other Triton case runs the multi-chunk tiling of the parity tests."""
    require(backend)
    index = k + 5 * head
    if backend == "triton" and index % 2:
        apply_tiling(monkeypatch, backend, "multi")
    config = dict(beta=BETA, **HEAD_CONFIGS[head])
    case = gpu_case(
        DTYPES[dtype],
        shape=PARITY_SHAPE,
        k=k,
        batch=3 + index % 2,
        layout=LAYOUTS[index % len(LAYOUTS)],
        shared_target=index % 3 == 0,
        ema_form=("stacked", "list")[index % 2],
        labels=config["loss_type"] == "dedpo",
        seed=index,
    )
    check_low_precision(case, config, backend, seed=index)


def _loss_and_grad(backend, tensors, stats=True, **config):
    """``(loss, grad, u, err_policy)``; ``stats=False``: ``(loss, grad)`` (no stats, whose
    ``implicit_acc`` is a Python float: a host sync, which a CUDA graph cannot capture)."""
    model, ref, target, ema = tensors
    out = fastpref.adaptive_dpo_loss(model, ref, target, ema_preds=ema, backend=backend, return_stats=stats, **config)
    loss, extra = (out[0], (out[1]["u"], out[1]["err_policy"])) if stats else (out, ())
    (grad,) = torch.autograd.grad(loss, model)
    return (loss, grad) + extra


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph_is_bitwise_eager(backend):
    """The fused ops are opaque to the compiler: the compiled step runs the same kernels."""
    require(backend)
    tensors = gpu_case(torch.bfloat16, k=2, batch=4, seed=3).build()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: _loss_and_grad(backend, t, beta=BETA), fullgraph=True)
    got, want = compiled(*tensors), _loss_and_grad(backend, tensors, beta=BETA)
    for name, a, b in zip(("loss", "grad", "u", "err_policy"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_cuda_graph_replay_is_bitwise_uncaptured(backend, dtype):
    """Forward and backward captured in one CUDA graph (current-stream launches, no host sync):
    a replay gives the bits of an uncaptured call, also after new values are copied into the
    inputs."""
    require(backend)
    model, ref, target, ema = gpu_case(DTYPES[dtype], k=2, batch=8, seed=5).build()

    def step():
        return _loss_and_grad(backend, (model, ref, target, ema), stats=False, beta=BETA)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, caches fill) off the capture stream
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for scale in (1.0, 0.75):
        with torch.no_grad():
            model.mul_(scale)
        graph.replay()
        uncaptured = step()
        torch.cuda.synchronize()
        for name, a, b in zip(("loss", "grad"), captured, uncaptured):
            assert torch.equal(a, b), (name, scale)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic_at_training_size(backend, dtype):
    """SDXL latents, B = 8, K = 2: the chunked reductions add in a fixed order (no atomics)."""
    require(backend)
    case = make_case(dtype=DTYPES[dtype], k=2, batch=8, shape=(4, 128, 128), noise=0.05, device=CUDA, seed=7)
    tensors = case.build()
    config = dict(beta=2500.0, k1=1.0)
    first = call_loss(fastpref.adaptive_dpo_loss, case, dict(config, backend=backend), tensors=tensors)
    for _ in range(2):
        again = call_loss(fastpref.adaptive_dpo_loss, case, dict(config, backend=backend), tensors=tensors)
        a, b = outputs(*first[:3]), outputs(*again[:3])
        for key in ("loss", "grad") + STAT_KEYS:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("site", NAN_SITES)
@pytest.mark.parametrize("backend", FUSED)
def test_nan_propagates(backend, site):
    """A NaN in the second chunk of a row of any input reaches the loss."""
    require(backend)
    case = gpu_case(torch.float32, k=2, batch=2, ema_form="list", seed=17)
    model, ref, target, ema = case.build()
    poisoned = {"model_pred": model, "ref_pred": ref, "target": target, "ema_preds[1]": ema[1]}[site]
    with torch.no_grad():
        poisoned.view(poisoned.shape[0], -1)[1, 1400] = float("nan")  # row 1, the second chunk
    loss = fastpref.adaptive_dpo_loss(model, ref, target, ema_preds=ema, beta=BETA, backend=backend)
    assert torch.isnan(loss), site


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_peak_extra_memory_is_the_gradient_plus_per_pair_state(backend, dtype):
    """Forward + backward allocate the gradient and O(B) per-pair state (partial sums of each
    chunk, the stats), never a copy of an input (eager PyTorch allocates 5-10x the gradient)."""
    require(backend)
    batch = 8
    tensors = make_case(dtype=DTYPES[dtype], k=2, batch=batch, shape=(4, 128, 128), device=CUDA, seed=9).build()
    _loss_and_grad(backend, tensors, beta=BETA)  # warm-up: compiles, cached parameters
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, grad, *_ = _loss_and_grad(backend, tensors, beta=BETA)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grad_bytes = grad.numel() * grad.element_size()
    # Per pair: K + 2 models x 2 rows x up to 1024 chunks of partial sums, plus stats; 512-byte blocks.
    per_pair = 4 * 2 * 1024 * 4 + 64 * 4
    assert extra <= grad_bytes + batch * per_pair + 64 * 512, (extra, grad_bytes)
