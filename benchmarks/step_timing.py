"""How the step benchmark times: interleaved rounds of one step per variant, per-phase timers
wrapped around the trainer's pieces, and the batched-forward probe."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch
from step_authors import AuthorsEMAFootprints
from step_models import Components, encode


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Phases:
    """Per-phase wall time of the steps run while ``active`` is set (breakdown rounds only)."""

    def __init__(self, sync):
        self.sync = sync
        self.active = False
        self.current: Dict[str, float] = defaultdict(float)

    def wrap(self, owner, attribute: str, phase: str) -> None:
        function = getattr(owner, attribute)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if not self.active:
                return function(*args, **kwargs)
            self.sync()
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.sync()
                self.current[phase] += (time.perf_counter() - begin) * 1e3

        setattr(owner, attribute, timed)

    def take(self) -> Dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


TOP_PHASES = (
    "encode (VAE+text)",
    "reference fwd",
    "footprint fwds",
    "backward",
    "grad clip",
    "optimizer",
    "footprint update",
)
SUB_PHASES = ("EMA store", "EMA copy_to", "EMA restore")
REST = "policy fwd + loss + rest"


@dataclasses.dataclass
class Variant:
    key: str
    method: str
    cached: bool
    trainer: object
    run: Callable[[], dict]
    times_ms: List[float] = dataclasses.field(default_factory=list)
    cpu_ms: List[float] = dataclasses.field(default_factory=list)  # the process's CPU time per step
    positions: List[int] = dataclasses.field(default_factory=list)
    metric_on: int = 0
    skipped: int = 0
    breakdown: List[Dict[str, float]] = dataclasses.field(default_factory=list)


class Encoding:
    """:func:`encode` of one raw batch, timed as a phase while ``phases`` is set and active."""

    def __init__(self, components: Components, raw: dict):
        self.components, self.raw = components, raw
        self.phases: Optional["Phases"] = None

    def __call__(self) -> dict:
        phases = self.phases
        if phases is None or not phases.active:
            return encode(self.components, self.raw)
        phases.sync()
        begin = time.perf_counter()
        try:
            return encode(self.components, self.raw)
        finally:
            phases.sync()
            phases.current["encode (VAE+text)"] += (time.perf_counter() - begin) * 1e3


def run_rounds(
    variants: List[Variant],
    rounds: int,
    sync,
    record: bool,
    phases: Optional[Phases] = None,
    deadline: Optional[float] = None,
) -> None:
    """``rounds`` rounds; in each, every variant runs one step, the order rotated by one per round.
    Past ``deadline`` (a ``perf_counter`` time) no new round starts, after the first. Each step's
    wall time and the process's CPU time (``time.process_time``: on a CPU shared with other jobs,
    what their load inflates least) are recorded."""
    n = len(variants)
    for r in range(rounds):
        if deadline is not None and r > 0 and time.perf_counter() > deadline:
            print(f"--time_budget reached: {r} of {rounds} round(s) run", flush=True)
            break
        for position in range(n):
            variant = variants[(r + position) % n]
            sync()
            cpu, begin = time.process_time(), time.perf_counter()
            out = variant.run()
            sync()
            elapsed = (time.perf_counter() - begin) * 1e3
            cpu_elapsed = (time.process_time() - cpu) * 1e3
            if phases is not None:
                parts = phases.take()
                top = sum(parts.get(p, 0.0) for p in TOP_PHASES)
                parts[REST] = elapsed - top
                parts["step"] = elapsed
                variant.breakdown.append(parts)
            if record:
                variant.times_ms.append(elapsed)
                variant.cpu_ms.append(cpu_elapsed)
                variant.positions.append(position)
                variant.metric_on += bool(out.get("metric_on"))
                variant.skipped += bool(out.get("skipped"))


def install_phases(variants: List[Variant], encoding: Encoding, accelerator, sync) -> Phases:
    phases = Phases(sync)
    encoding.phases = phases
    phases.wrap(accelerator, "backward", "backward")
    phases.wrap(accelerator, "clip_grad_norm_", "grad clip")
    seen = set()
    for variant in variants:
        trainer = variant.trainer
        if id(trainer) in seen:
            continue
        seen.add(id(trainer))
        phases.wrap(trainer, "_reference_pred", "reference fwd")
        phases.wrap(trainer, "_footprint_preds", "footprint fwds")
        phases.wrap(trainer.optimizer, "step", "optimizer")
        if trainer.footprints is not None:
            phases.wrap(trainer.footprints, "update", "footprint update")
            if isinstance(trainer.footprints, AuthorsEMAFootprints):
                for ema in trainer.footprints.emas:
                    for name in ("store", "copy_to", "restore"):
                        phases.wrap(ema, name, f"EMA {name}")
    return phases


def batched_probe(trainer, batches, sync, reps: int) -> Dict[str, float]:
    """Median ms of three no-grad forwards of 2B samples (reference + K = 2 footprints today)
    against one no-grad forward of 6B samples, with the policy's weights: the most a single
    batched forward could save."""
    _, cached = batches
    acc, family = trainer.accelerator, trainer.family
    device = acc.device
    tripled = {k: torch.cat([v] * 3) for k, v in cached.items()}  # 3x the pairs (and their images)
    small = (cached["latents"], family.denoiser_inputs(cached, device, trainer.weight_dtype))
    large = (tripled["latents"], family.denoiser_inputs(tripled, device, trainer.weight_dtype))
    generator = torch.Generator().manual_seed(0)
    timesteps = family.draw_timesteps(trainer.noise_scheduler, generator, cached["latents"].shape[0], False)
    unet = trainer.base_unet
    three, one = [], []

    def forward(latents, inputs, t):
        with torch.no_grad(), acc.autocast():
            x = latents.to(device, trainer.weight_dtype)
            return family.denoise(unet, x, t.to(device), inputs)

    big = (*large, torch.cat([timesteps] * 3))
    forward(*small, timesteps)
    forward(*big)
    for _ in range(reps):
        sync()
        begin = time.perf_counter()
        for _ in range(3):
            forward(*small, timesteps)
        sync()
        three.append((time.perf_counter() - begin) * 1e3)
        begin = time.perf_counter()
        forward(*big)
        sync()
        one.append((time.perf_counter() - begin) * 1e3)
    a, b = statistics.median(three), statistics.median(one)
    return {"three_fwd_2B_ms": a, "one_fwd_6B_ms": b, "saving_ms": a - b, "reps": reps}
