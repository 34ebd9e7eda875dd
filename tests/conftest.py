"""Shared setup of the fastpref tests: the Triton interpreter, the backends under test (the
``backend`` and ``tiling`` parameters), and a seeded factory of loss inputs (shapes, dtypes,
layouts) with their float64 oracle values.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():
    # Triton decides between compiled and interpreted kernels when @triton.jit runs (when
    # fastpref.loss.triton.kernels is imported): this must precede the first import of triton
    # (fastpref imports it lazily, through dispatch; import torch does not).
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fastpref  # noqa: E402

# The offline tiny models and toy data of the trainer's and the fixtures' tests.
pytest_plugins = ["offline"]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_under_test(device=DEVICE) -> Tuple[str, ...]:
    """Every backend available on ``device`` (per ``fastpref.availability``), and ``"torch"``."""
    found = [name for name, reason in fastpref.availability(device).items() if reason is None]
    if "torch" not in found:
        found.append("torch")
    return tuple(found)


BACKENDS = backends_under_test()
# Backends whose launch geometry the "multi" tiling changes.
TILED_BACKENDS = tuple(name for name in BACKENDS if name == "triton")
TILINGS = ("default", "multi")
# Small blocks, several chunks of several blocks each: D = 189 gives 2 chunks of 2 blocks of 64;
# the second chunk has a partial block and a fully masked one.
MULTI_BLOCK = 64
MULTI_CHUNK = 128


def multi_chunk_config(features: int, batch: int, device) -> "object":
    from fastpref.loss.triton import ops as triton_ops

    n_chunks = -(-features // MULTI_CHUNK)
    return triton_ops.LaunchConfig(block=MULTI_BLOCK, chunk_size=MULTI_CHUNK, n_chunks=n_chunks)


def pytest_report_header(config):
    reasons = fastpref.availability(DEVICE)
    lines = [f"fastpref backends under test on {DEVICE}: {', '.join(BACKENDS)}"]
    lines += [f"  {name} unavailable: {why}" for name, why in reasons.items() if why is not None]
    return lines


def _explicitly_parametrized(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    """A test taking ``backend`` runs once per backend that ``fastpref.availability`` reports
    available on ``DEVICE``, plus ``"torch"`` (so a built ``"native"`` backend is picked up with no
    change here). With ``tiling`` too, the Triton backend also runs with the ``"multi"`` tiling,
    which patches ``fastpref.loss.triton.ops.launch_config`` to small blocks and several chunks so
    that the multi-chunk and multi-iteration paths of the kernels run even for tiny inputs."""
    names = metafunc.fixturenames
    if "backend" not in names or _explicitly_parametrized(metafunc, "backend"):
        return
    if "tiling" in names and not _explicitly_parametrized(metafunc, "tiling"):
        combos = [(b, "default") for b in BACKENDS] + [(b, "multi") for b in TILED_BACKENDS]
        metafunc.parametrize(("backend", "tiling"), combos, ids=[f"{b}-{t}" for b, t in combos], indirect=["tiling"])
    else:
        metafunc.parametrize("backend", BACKENDS)


def apply_tiling(monkeypatch, backend: str, mode: str) -> None:
    """Install tiling ``mode`` for ``backend``: ``"multi"`` patches the Triton launch heuristic."""
    if mode == "multi":
        assert backend in TILED_BACKENDS, backend
        from fastpref.loss.triton import ops as triton_ops

        monkeypatch.setattr(triton_ops, "launch_config", multi_chunk_config)


@pytest.fixture
def tiling(request, monkeypatch):
    """``"default"``: the backend's own launch heuristic; ``"multi"``: small blocks, several
    chunks (Triton only)."""
    mode = getattr(request, "param", "default")
    if mode == "multi":
        apply_tiling(monkeypatch, "triton", mode)
    return mode


# ---------------------------------------------------------------------------------------------
# Input factory
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "batch_strided", "col_strided", "channels_last", "permuted", "expanded_target")

_DTYPE_NAMES = {
    "f64": torch.float64,
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
}


def resolve_dtypes(dtype, k: int) -> Dict[str, object]:
    """``dtype`` (one dtype, a short name, or a dict with keys model/ref/target/ema) as a dict;
    ``ema`` is one dtype or a list of K dtypes."""
    if not isinstance(dtype, dict):
        dtype = {"model": dtype, "ref": dtype, "target": dtype, "ema": dtype}
    out = {}
    for key in ("model", "ref", "target", "ema"):
        value = dtype.get(key, dtype.get("model"))
        if isinstance(value, (list, tuple)):
            value = [_DTYPE_NAMES.get(v, v) for v in value]
            assert len(value) == k, "one EMA dtype per EMA model"
        else:
            value = _DTYPE_NAMES.get(value, value)
        out[key] = value
    return out


@dataclass
class Case:
    """One set of loss inputs.

    ``values`` are float64 tensors (contiguous, CPU-independent of layout) holding exactly the
    values the backend sees, i.e. already rounded to each input's dtype; ``build`` lays them out
    in ``layout`` and casts them to their dtypes; ``build(upcast=True)`` gives the float64 oracle
    inputs (same values, contiguous).
    """

    batch: int
    shape: Tuple[int, ...]
    k: int
    dtypes: Dict[str, object]
    shared_target: bool
    ema_form: str  # "stacked" or "list"
    layout: str
    values: Dict[str, object]  # model, ref, target: tensors; ema: list of tensors
    labels: Dict[str, object] = field(default_factory=dict)  # DeDPO keyword inputs, float64
    device: torch.device = DEVICE

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if any(d == torch.float64 for d in self.all_dtypes()) else torch.float32

    def all_dtypes(self):
        ema = self.dtypes["ema"]
        emas = list(ema) if isinstance(ema, list) else [ema] * self.k
        return [self.dtypes["model"], self.dtypes["ref"], self.dtypes["target"]] + emas

    def ema_dtype(self, i: int):
        ema = self.dtypes["ema"]
        return ema[i] if isinstance(ema, list) else ema

    def _lay_out(self, value: torch.Tensor, dtype, layout: str, batch_dim: int = 0) -> torch.Tensor:
        """``value`` (float64, contiguous) as ``dtype`` on ``self.device`` in ``layout``, always
        holding the same values. ``batch_dim`` is 1 for a stacked ``[K, 2B, *S]`` tensor."""
        value = value.to(self.device, dtype)
        if layout == "batch_strided":  # x[::2] of a tensor twice as long in the batch dim
            shape = list(value.shape)
            shape[batch_dim] *= 2
            big = torch.full(shape, float("nan"), dtype=dtype, device=self.device)
            index = (slice(None),) * batch_dim + (slice(None, None, 2),)
            big[index] = value
            return big[index]
        if layout == "col_strided":  # x[..., ::2] of a tensor twice as wide in the last dim
            big = torch.full(
                tuple(value.shape[:-1]) + (2 * value.shape[-1],), float("nan"), dtype=dtype, device=self.device
            )
            big[..., ::2] = value
            return big[..., ::2]
        inner = list(range(batch_dim + 1, value.dim()))
        if layout == "channels_last" and len(inner) == 3:  # channels-last inner dims (C fastest)
            perm = list(range(batch_dim + 1)) + [inner[1], inner[2], inner[0]]
        elif layout == "permuted" and len(inner) > 1:  # inner dims stored in reverse order
            perm = list(range(batch_dim + 1)) + inner[::-1]
        else:
            return value.contiguous()
        inverse = [perm.index(i) for i in range(value.dim())]
        return value.permute(perm).contiguous().permute(inverse)

    def build(self, *, upcast: bool = False, requires_grad: bool = True):
        """``(model_pred, ref_pred, target, ema_preds)`` ready for a loss call. With ``upcast``,
        every input is float64 and contiguous (the oracle's inputs). ``model_pred`` requires grad
        (a leaf, possibly a strided view of a larger tensor). A stacked EMA input of mixed
        dtypes cannot exist, so such a case passes a list."""
        layout = "contiguous" if upcast else self.layout
        f64 = torch.float64

        def dt(d):
            return f64 if upcast else d

        model = self._lay_out(self.values["model"], dt(self.dtypes["model"]), layout)
        ref = self._lay_out(self.values["ref"], dt(self.dtypes["ref"]), layout)
        if layout == "expanded_target":
            # Every target row equals row 0 (the factory made them so): a stride-0 batch dim.
            target = (
                self.values["target"][:1].to(self.device, dt(self.dtypes["target"])).expand_as(self.values["target"])
            )
        else:
            target = self._lay_out(self.values["target"], dt(self.dtypes["target"]), layout)
        mixed_ema = isinstance(self.dtypes["ema"], list) and len(set(self.dtypes["ema"])) > 1
        if self.ema_form == "stacked" and (upcast or not mixed_ema):
            if self.k:
                stacked = torch.stack(self.values["ema"])
                ema_preds = self._lay_out(stacked, dt(self.ema_dtype(0)), layout, batch_dim=1)
            else:
                ema_preds = torch.empty((0,) + tuple(model.shape), dtype=model.dtype, device=self.device)
        else:
            ema_preds = [self._lay_out(v, dt(self.ema_dtype(i)), layout) for i, v in enumerate(self.values["ema"])]
        if requires_grad:
            model.requires_grad_(True)
        return model, ref, target, ema_preds

    def label_kwargs(self, *, upcast: bool = False):
        """The DeDPO keywords as ``[B]`` tensors on the device (float32, or float64 with
        ``upcast``; the factory makes values that float32 holds exactly); empty unless the case
        was made with labels."""
        out = {}
        for name, value in self.labels.items():
            if value.dtype.is_floating_point:
                value = value.to(torch.float64 if upcast else torch.float32)
            out[name] = value.to(self.device)
        return out


def make_case(
    *,
    batch: int = 2,
    shape: Sequence[int] = (3, 7, 9),
    k: int = 2,
    dtype=torch.float64,
    shared_target: bool = False,
    ema_form: str = "stacked",
    layout: str = "contiguous",
    seed: int = 0,
    noise: float = 1.0,
    ema_noise: float = 0.5,
    offsets: Optional[Sequence[float]] = None,
    labels: bool = False,
    device=DEVICE,
) -> Case:
    """Seeded loss inputs.

    ``target ~ N(0, 1)``; ``ref = target + noise * N``; ``model = target + noise * N`` and
    ``ema_k = model + ema_noise * N``, so that ``e ~ noise^2``, ``l ~ 0.2 * noise^2`` for
    D = 189 and the EMA footprints scatter around the policy (a non-trivial u). ``offsets``
    (one float per row of ``[2B]``) is added to ``model`` row-wise, to push pairs far apart.
    With ``labels`` the DeDPO inputs are made too (some pairs human-labelled, NaN labels
    elsewhere, propensities in (0, 1]).
    """
    assert layout in LAYOUTS, layout
    shape = tuple(shape)
    dtypes = resolve_dtypes(dtype, k)
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * batch
    t_rows = batch if shared_target else rows

    def normal(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    if layout == "expanded_target":
        target = normal(1, *shape).expand(t_rows, *shape).clone()
    else:
        target = normal(t_rows, *shape)
    full_target = torch.cat([target, target]) if shared_target else target
    ref = full_target + noise * normal(rows, *shape)
    model = full_target + noise * normal(rows, *shape)
    if offsets is not None:
        model = model + torch.as_tensor(offsets, dtype=torch.float64).view(rows, *([1] * len(shape)))
    emas = [model + ema_noise * normal(rows, *shape) for _ in range(k)]

    def rounded(x, d):  # the values the backend sees, as float64
        return x.to(d).to(torch.float64)

    values = {
        "model": rounded(model, dtypes["model"]),
        "ref": rounded(ref, dtypes["ref"]),
        "target": rounded(target, dtypes["target"]),
        "ema": [
            rounded(e, dtypes["ema"][i] if isinstance(dtypes["ema"], list) else dtypes["ema"])
            for i, e in enumerate(emas)
        ],
    }
    label_values = {}
    if labels:
        synthetic = torch.rand(batch, generator=gen, dtype=torch.float64)
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[::2] = True  # pair 0, 2, ... carry human labels
        human = torch.where(
            mask,
            (torch.rand(batch, generator=gen) > 0.5).double(),
            torch.full((batch,), float("nan"), dtype=torch.float64),
        )
        propensity = 0.25 + 0.75 * torch.rand(batch, generator=gen, dtype=torch.float64)
        label_values = {
            "synthetic_label": synthetic.to(torch.float32).double(),  # exactly representable in f32
            "human_label": human,
            "human_mask": mask,
            "propensity": propensity.to(torch.float32).double(),
        }
    return Case(
        batch=batch,
        shape=shape,
        k=k,
        dtypes=dtypes,
        shared_target=shared_target,
        ema_form=ema_form,
        layout=layout,
        values=values,
        labels=label_values,
        device=torch.device(device),
    )


@pytest.fixture
def case_factory():
    """The :func:`make_case` factory."""
    return make_case


def call_loss(
    fn,
    case: Case,
    config: dict,
    *,
    backend: Optional[str] = None,
    upcast: bool = False,
    upstream=None,
    tensors=None,
    strided_upstream: bool = True,
    pass_ema: bool = True,
):
    """Run ``fn`` (``fastpref.adaptive_dpo_loss`` or ``fastpref.reference.adaptive_dpo_loss``)
    on ``case`` with ``return_stats=True`` and backpropagate ``upstream`` (a float64 tensor of
    the loss's shape; cast to the loss's dtype; for ``reduction="none"`` passed as a strided view
    unless ``strided_upstream=False``). Returns ``(loss, grad, stats, tensors)``."""
    model, ref, target, ema = tensors if tensors is not None else case.build(upcast=upcast)
    kwargs = dict(config)
    if kwargs.get("loss_type") == "dedpo" and "synthetic_label" not in kwargs:
        kwargs.update(case.label_kwargs(upcast=upcast))
    if backend is not None:
        kwargs["backend"] = backend
    if pass_ema:  # diffusion_dpo_loss takes no ema_preds
        kwargs["ema_preds"] = ema
    loss, stats = fn(model, ref, target, return_stats=True, **kwargs)
    if upstream is None:
        upstream = torch.ones(loss.shape, dtype=torch.float64)
    grad_out = upstream.to(device=loss.device, dtype=loss.dtype)
    if strided_upstream and grad_out.dim() == 1 and grad_out.numel() > 1:
        # A non-contiguous incoming gradient (every other element of a longer tensor).
        big = torch.zeros(2 * grad_out.numel(), dtype=grad_out.dtype, device=grad_out.device)
        big[::2] = grad_out
        grad_out = big[::2]
    (grad,) = torch.autograd.grad(loss, model, grad_outputs=grad_out)
    return loss.detach(), grad, stats, (model, ref, target, ema)


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------

PAIR_STATS = ("logits", "l_theta", "u", "confidence", "stability", "weight", "margin")
SAMPLE_STATS = ("err_policy", "err_ref")
STAT_KEYS = PAIR_STATS + SAMPLE_STATS + ("implicit_acc",)


def outputs(loss, grad, stats) -> Dict[str, torch.Tensor]:
    """Every compared output as a float64 CPU tensor: loss, grad and each stats entry."""
    out = {"loss": loss, "grad": grad}
    for key in STAT_KEYS:
        value = stats[key]
        out[key] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


def check_result_types(case: Case, loss, grad, stats, reduction: str):
    """Spec §7/§8: dtypes, shapes and kinds of the loss, the gradient and the stats."""
    acc = case.acc_dtype
    batch = case.batch
    assert loss.dtype == acc, f"loss dtype {loss.dtype}, expected {acc}"
    assert tuple(loss.shape) == ((batch,) if reduction == "none" else ()), loss.shape
    assert grad.dtype == case.dtypes["model"], f"grad dtype {grad.dtype}, model_pred is {case.dtypes['model']}"
    assert tuple(grad.shape) == (2 * batch,) + case.shape
    assert set(stats) == set(STAT_KEYS), sorted(stats)
    assert type(stats["implicit_acc"]) is float, type(stats["implicit_acc"])
    for key in PAIR_STATS + SAMPLE_STATS:
        value = stats[key]
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
        assert value.dtype == acc, f"stats[{key!r}] dtype {value.dtype}, expected {acc}"
        assert tuple(value.shape) == ((2 * batch,) if key in SAMPLE_STATS else (batch,)), (key, value.shape)


def assert_close64(
    actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], *, rtol=1e-9, atol=1e-11, context=""
):
    """Float64 parity: every output within ``rtol`` of the oracle (``atol`` scaled by the
    output's magnitude, for entries that cancel to ~0)."""
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        assert torch.isfinite(want).all(), f"oracle {key} not finite {context}"
        scale = 1.0 + want.abs().max().item() if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m, k=key: f"{k} {context}: {m}")


def flash_check(
    name: str, got: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, *, atol: float, backstop: float, context=""
):
    """The flash-attention rule: ``max|got - ref64| <= 2 * max|eager - ref64| + atol`` where
    ``eager`` is the reference run in the same (low) precision, and ``max|got - ref64| <=
    backstop`` whatever the eager error."""
    assert got.shape == ref64.shape, (name, got.shape, ref64.shape)
    assert torch.isfinite(got).all(), f"{name} not finite {context}"
    if got.numel() == 0:
        return
    err = (got - ref64).abs().max().item()
    eager_err = (eager - ref64).abs().max().item()
    assert err <= 2 * eager_err + atol, (
        f"{name} {context}: backend error {err:.3e} > 2 * eager error {eager_err:.3e} + atol {atol:.1e}"
    )
    assert err <= backstop, f"{name} {context}: backend error {err:.3e} > backstop {backstop:.3e}"


def loss_config(**keywords):
    """A validated ``LossConfig`` from some of ``adaptive_dpo_loss``'s scalar keywords, the rest
    taken from the public signature's defaults."""
    from fastpref.loss.api import scalar_keywords
    from fastpref.loss.options import make_config

    return make_config(**scalar_keywords(fastpref.adaptive_dpo_loss, **keywords))
