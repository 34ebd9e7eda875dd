"""The Adaptive-DPO authors' EMA footprints, re-implemented on fastpref's trainer so that the step
benchmark (``benchmarks/bench_step.py``) times their method and fastpref's on the same code."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from fastpref.train import PreferenceTrainer, TrainConfig


class AuthorsEMAFootprints:
    """The Adaptive-DPO authors' EMA footprints (``dpo_train_un.py`` of fanfanffff1/Adaptive-DPO),
    re-implemented for timing.

    One diffusers ``EMAModel`` per decay over *all* parameters of the UNet (the frozen base
    weights and the LoRA tensors; in a full fine-tune, all of them), its shadow weights moved to
    the device in the weight dtype (``ema.to(device, dtype=weight_dtype)``, as their script).
    ``use(k)`` is their evaluation: ``store(unet.parameters())`` -- which diffusers implements as
    ``param.detach().cpu().clone()``, a copy of every parameter into CPU memory --, ``copy_to``
    (shadow -> parameters, on the device), the caller's no-grad forward, ``restore`` (CPU memory
    -> parameters). ``update()`` is ``ema.step(unet.parameters())`` after the optimizer step:
    a lerp of the trainable tensors and a copy of the frozen ones, one parameter at a time
    (``foreach=False``, the default they use).

    Their EMAs start from a separately loaded UNet with a fresh LoRA adapter; these start from
    the policy's own parameters -- the same tensors in the same order and dtypes, so the same
    copies and the same time. Same interface as ``fastpref.train.footprints``: ``len``, ``update()``,
    ``use(k)``.
    """

    def __init__(self, unet, decays, weight_dtype: torch.dtype):
        from diffusers.training_utils import EMAModel

        self.unet = unet
        self.decays = [float(d) for d in decays]
        device = next(unet.parameters()).device
        self.emas = []
        for decay in self.decays:
            ema = EMAModel(unet.parameters(), decay=decay)
            ema.to(device=device, dtype=weight_dtype)
            self.emas.append(ema)

    def __len__(self) -> int:
        return len(self.emas)

    @torch.no_grad()
    def update(self) -> None:
        for ema in self.emas:
            ema.step(self.unet.parameters())

    @contextlib.contextmanager
    def use(self, k: int):
        ema = self.emas[k]
        ema.store(self.unet.parameters())
        ema.copy_to(self.unet.parameters())
        try:
            yield self.unet
        finally:
            ema.restore(self.unet.parameters())


class AuthorsTrainer(PreferenceTrainer):
    """``PreferenceTrainer`` with :class:`AuthorsEMAFootprints` in place of fastpref's.

    Built as a trainer whose loss needs no footprints (so that fastpref's footprints are never
    created: no extra adapters or model copies), then given the full Adaptive-DPO config and the
    authors' footprints. ``train_step`` is the trainer's, unchanged: the noise, reference
    forward, loss (``fastpref.adaptive_dpo_loss``), backward, clipping and optimizer are the
    trainer's own code, so the rows differ only in the footprint handling and the caching.
    """

    def __init__(self, unet, noise_scheduler, config: TrainConfig, accelerator=None):
        super().__init__(
            unet, noise_scheduler, dataclasses.replace(config, weighting="none", margin="none"), accelerator
        )
        self.config = config
        self.footprints = AuthorsEMAFootprints(self.base_unet, config.ema_decays, self.weight_dtype)
