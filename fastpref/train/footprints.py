"""EMA "footprints" of the policy, kept on the device (Adaptive-DPO's metric u needs K of them):
:class:`AdapterFootprints` for LoRA runs, :class:`ModelFootprints` for full fine-tunes, one
interface (``update()``, ``use(k)``, ``state_dict()``/``load_state_dict()``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Dict, Iterator, List, Sequence

import torch

POLICY_ADAPTER = "default"


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay of update number ``num_updates`` (0-based), as diffusers' ``EMAModel``."""
    if not warmup:
        return decay
    if num_updates <= 0:
        return 0.0  # EMAModel's first update copies the weights
    return min(decay, (1 + num_updates) / (10 + num_updates))


def lora_layers(module) -> list:
    """The peft tuner layers of ``module``, found once: switching adapters over this list costs a
    fraction of diffusers' ``set_adapter``/``disable_adapters``, which walk every submodule."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if layers:
        _check_switch_state(layers[0])
    return layers


# peft's public switches (``set_adapter``, ``enable_adapters``) also set the requires_grad flag of
# every adapter tensor, walking each layer's parameters: a measurable share of a small model's
# forward (benchmarks/bench_adapter_switch.py). Flags never change what a forward computes, the
# footprints stay frozen and the policy trainable, so the no-grad forwards flip only the state
# peft's forward reads (``BaseTunerLayer.active_adapter`` / ``disable_adapters``); the output is
# bitwise the same.


def _check_switch_state(layer) -> None:
    """``RuntimeError`` unless peft's forward reads the state the switches below flip (so that a
    peft release that renames it fails here, not silently in the metric)."""
    disabled, active = layer._disable_adapters, layer._active_adapter
    try:
        layer._disable_adapters, layer._active_adapter = not disabled, ["fastpref-probe"]
        works = layer.disable_adapters is (not disabled) and layer.active_adapters == ["fastpref-probe"]
    finally:
        layer._disable_adapters, layer._active_adapter = disabled, active
    if not works:
        raise RuntimeError(
            "this peft version's tuner layers do not read _disable_adapters / _active_adapter: "
            "fastpref.train.footprints' adapter switches need updating for it"
        )


@contextlib.contextmanager
def adapters_disabled(layers: Sequence) -> Iterator:
    """Within the block the base model computes alone (the LoRA reference); afterwards the
    adapters are enabled again. The adapters' requires_grad flags are left as they are."""
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


@contextlib.contextmanager
def adapter_active(layers: Sequence, name: str) -> Iterator:
    """Within the block the adapter ``name`` is the active one of ``layers`` (each layer's
    previous active adapters are restored afterwards). The adapters' requires_grad flags are left
    as they are: meant for no-grad forwards through frozen adapters."""
    previous = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, active in zip(layers, previous):
            layer._active_adapter = active


def check_decays(decays: Sequence[float]) -> List[float]:
    """``decays`` as floats; ``ValueError`` unless each is in [0, 1) (the footprints' rule, also
    checked up front by ``fastpref train``)."""
    decays = [float(d) for d in decays]
    for d in decays:
        if not 0.0 <= d < 1.0:
            raise ValueError(f"ema_decays must each be in [0, 1), got {d}")
    return decays


class _Footprints:
    """Shared bookkeeping: decays, the update counter, the foreach lerp. Hand-written instead of
    diffusers' ``EMAModel``, which keeps its copies apart from the model and is applied by
    copying all weights in and out: here each footprint is evaluated in place on the device.

    The update follows ``EMAModel`` (what the Adaptive-DPO authors use, with decays 0.9999 and
    0.5). ``dtype`` is the footprints' storage dtype: float32 (fastpref's recipe), or the
    mixed-precision dtype (the authors' recipe: their ``EMAModel`` is moved to it, so each update
    is computed against the float32 policy and rounded to it). After the n-th optimizer step
    (n = 0, 1, ...) the footprint moves by ``1 - d_n`` towards the policy, ``d_0 = 0`` (a copy)
    and ``d_n = min(decay, (1 + n) / (10 + n))`` when ``warmup`` is on (``EMAModel``'s default
    schedule), else ``d_n = decay``. The footprints start equal to the policy.
    """

    def __init__(self, decays: Sequence[float], warmup: bool, dtype: torch.dtype = torch.float32):
        self.decays = check_decays(decays)
        self.warmup = bool(warmup)
        self.dtype = dtype
        self.num_updates = 0
        self._policy: List[torch.Tensor] = []  # the policy's tracked tensors (subclasses fill both)
        self._ema: List[List[torch.Tensor]] = []  # per footprint, the same tensors' EMA copies

    def __len__(self) -> int:
        return len(self.decays)

    def _tensors(self, k: int) -> List[torch.Tensor]:
        """Footprint ``k``'s tracked tensors, in the order of :meth:`_policy_tensors`."""
        return self._ema[k]

    def _policy_tensors(self) -> List[torch.Tensor]:
        return self._policy

    @torch.no_grad()
    def update(self) -> None:
        """Move every footprint towards the current policy weights (call after each optimizer step)."""
        policy = self._policy_tensors()
        for k, decay in enumerate(self.decays):
            weight = 1.0 - ema_decay(decay, self.num_updates, self.warmup)
            if all(t.dtype == p.dtype for t, p in zip(self._tensors(k), policy)):
                torch._foreach_lerp_(self._tensors(k), policy, weight)
            else:  # footprints in a lower dtype: EMAModel.step's update, rounded to it
                for t, p in zip(self._tensors(k), policy):
                    t.sub_(weight * (t - p))
        self.num_updates += 1

    def state_dict(self) -> Dict:
        return {
            "decays": list(self.decays),
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "tensors": [[t.detach().cpu().clone() for t in self._tensors(k)] for k in range(len(self))],
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"checkpoint footprints have decays {state['decays']}, this run {self.decays}")
        self.num_updates = int(state["num_updates"])
        for k, saved in enumerate(state["tensors"]):
            torch._foreach_copy_(self._tensors(k), [t.to(self._tensors(k)[0].device) for t in saved])


class AdapterFootprints(_Footprints):
    """K EMA copies of the LoRA adapter ``default`` of a diffusers UNet, as adapters ``ema_k``.

    ``update()`` is one ``torch._foreach_lerp_`` per footprint over the adapter tensors;
    ``use(k)`` switches the active adapter of the cached peft layers for a no-grad forward and
    switches back: no second UNet, no CPU round trip.

    Args:
        unet: a diffusers model with a peft LoRA adapter named ``"default"`` (``unet.add_adapter``);
            not wrapped by DDP (pass ``accelerator.unwrap_model(unet)``).
        decays: one decay per footprint, each in [0, 1).
        warmup: diffusers ``EMAModel``'s decay warm-up (see :class:`_Footprints`).
        dtype: the footprints' storage dtype (see :class:`_Footprints`).

    The footprint adapters hold ``dtype`` tensors (float32 by default, as the policy's LoRA
    tensors), never require grad, and are not seen by the optimizer or DDP as long as the footprints are
    built before ``accelerator.prepare``.
    """

    def __init__(self, unet, decays: Sequence[float], *, warmup: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(decays, warmup, dtype)
        if POLICY_ADAPTER not in getattr(unet, "peft_config", {}):
            raise ValueError(f"unet has no LoRA adapter named {POLICY_ADAPTER!r} (add one with unet.add_adapter first)")
        self.unet = unet
        self.names = [f"ema_{k}" for k in range(len(self.decays))]
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            for name in self.names:
                unet.add_adapter(copy.deepcopy(unet.peft_config[POLICY_ADAPTER]), adapter_name=name)
        unet.set_adapter(POLICY_ADAPTER)
        self.layers = lora_layers(unet)
        params = dict(unet.named_parameters())
        marker = f".{POLICY_ADAPTER}."
        policy_names = [n for n in params if marker in n and "lora_" in n]
        self._policy = [params[n] for n in policy_names]
        with torch.no_grad():
            for name in self.names:
                tensors = [params[n.replace(marker, f".{name}.")] for n in policy_names]
                for t, p in zip(tensors, self._policy):
                    t.data = p.detach().to(dtype).clone()
                    t.requires_grad_(False)
                self._ema.append(tensors)

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator:
        """Within the block, ``self.unet`` computes with footprint ``k`` (its adapter is active);
        the policy adapter is active again afterwards. The policy adapter stays trainable and the
        footprints frozen throughout (:func:`adapter_active`)."""
        with adapter_active(self.layers, self.names[k]):
            yield self.unet


class ModelFootprints(_Footprints):
    """K EMA copies of a fully fine-tuned UNet, each a frozen float32 module on the same device,
    updated by ``torch._foreach_lerp_`` over all parameters; ``use(k)`` yields that copy.

    Args:
        unet: the policy (not wrapped by DDP); its trainable parameters are the ones tracked,
            the others (none, in a full fine-tune) are copied once.
        decays, warmup, dtype: as :class:`AdapterFootprints`.
    """

    def __init__(self, unet, decays: Sequence[float], *, warmup: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(decays, warmup, dtype)
        self.unet = unet
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        params = dict(unet.named_parameters())
        self._policy = [params[n] for n in names]
        self.models = []
        for _ in self.decays:
            model = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype)
            copies = dict(model.named_parameters())
            self.models.append(model)
            self._ema.append([copies[n] for n in names])

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator:
        """Yields footprint ``k`` as a module to call."""
        yield self.models[k]
