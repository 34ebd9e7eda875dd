"""Step benchmark of the preference trainer: ``python benchmarks/bench_step.py [--quick] [--model tiny|sd15-random]``.

Times one optimizer step of :class:`fastpref.train.PreferenceTrainer` for DPO and Adaptive-DPO
(K = 2) with fastpref's on-device footprints and with the authors' footprint handling
re-implemented on the same trainer, each with latents cached or encoded every step (see
:data:`VARIANTS`, :func:`run_mode` for the method, :func:`build_components` for the models), and
writes a markdown report and a JSON file of every raw timing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

if not torch.cuda.is_available():  # as benchmarks/bench_loss.py: must precede any import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from report import markdown, result_path, slug, write_json  # noqa: E402

from fastpref.machine import device_name, library_versions  # noqa: E402
from fastpref.train import PreferenceTrainer, TrainConfig  # noqa: E402
from fastpref.train.families import FAMILIES  # noqa: E402
from fastpref.train.models import ModelSource  # noqa: E402

SD15 = FAMILIES["sd15"]

DECAYS = (0.9999, 0.5)  # the authors' (and fastpref train's default) EMA decays, K = 2
# The targets, stated for SD1.5 on an H100; the script says whether the run it made meets them.
GOAL_ADAPTIVE = 1.5  # Adaptive (K=2) step <= 1.5x the latent-cached DPO step
GOAL_DPO = 1.3  # DPO samples/s >= 1.3x diffusers' script (the uncached DPO row)
AUTHORS_H100 = "6-11x"  # the authors' Adaptive step costs about 6-11x a DPO step on H100, SD1.5

MODELS = {
    "tiny": dict(resolution=64, batch=4, dtype="fp32"),
    "sd15-random": dict(resolution=512, batch=8, dtype="bf16"),
}
QUICK = dict(steps=3, warmup=1, breakdown_rounds=1, batch=2)
DEFAULTS = dict(steps=20, warmup=3, breakdown_rounds=3)
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SD15_LOSS = dict(beta=1000.0, k1=10.0)  # the paper's SD1.5 settings (fastpref train's defaults)

METHODS = ("dpo", "fastpref", "authors")
# What runs each step, per variant (one micro-batch of B pairs = 2B images, no accumulation):
# - dpo/cached: Diffusion-DPO on cached latents and text embeddings (``--cache_latents``):
#   reference forward + policy forward/backward.
# - dpo/uncached: the same, but the VAE encodes the 2B images and the text encoder the B captions
#   every step (the SD 1.5 family's ``encode_images`` / ``encode_prompts``), as diffusers'
#   ``train_diffusion_dpo.py`` does: "diffusers' script".
# - fastpref/cached, fastpref/uncached: Adaptive-DPO, K = 2 EMA footprints kept on the device by
#   fastpref (LoRA: peft adapters switched for the no-grad forwards and updated by a foreach
#   lerp; full fine-tune: on-device copies).
# - authors/uncached, authors/cached: Adaptive-DPO, K = 2, the authors' footprint handling
#   (:class:`AuthorsEMAFootprints`), VAE + text every step as their script, or on cached latents
#   to isolate the cost of the footprints from that of the encoding.
VARIANTS = ("dpo/cached", "dpo/uncached", "fastpref/cached", "fastpref/uncached", "authors/uncached", "authors/cached")
LABELS = {
    "dpo/cached": "DPO, latents cached",
    "dpo/uncached": "DPO, VAE+text each step (diffusers' script)",
    "fastpref/cached": "Adaptive K=2, fastpref on-device footprints, latents cached",
    "fastpref/uncached": "Adaptive K=2, fastpref on-device footprints, VAE+text each step",
    "authors/uncached": (
        "Adaptive K=2, authors' method, re-implemented (EMAModel store/copy_to/restore, VAE+text each step)"
    ),
    "authors/cached": "Adaptive K=2, authors' EMAModel store/copy_to/restore, latents cached",
}

# Stable Diffusion 1.5's published component configs (runwayml/stable-diffusion-v1-5: unet/, vae/,
# text_encoder/ config.json), written out so that nothing is downloaded; weights are random.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
CAPTIONS = (
    "a red circle on a blue background",
    "a photo of a small green triangle with a yellow stripe",
    "a painting of a large purple diamond in the dark",
    "a drawing of a white cross on an orange background",
    "a bright cyan ring next to a pink dot",
)


# --------------------------------------------------------------------------------------------
# the authors' footprints, re-implemented
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# models and batches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    """What the benchmark trains and encodes with: ``new_unet()`` makes a fresh policy UNet."""

    new_unet: Callable[[], object]
    noise_scheduler: object
    vae: object
    tokenizers: list
    text_encoders: list
    description: str


def build_components(
    model: str, device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int
) -> Components:
    """The models of ``model``: ``tiny`` (default) is ``fastpref.testing.tiny_model``'s SD1.5
    pipeline written to ``workdir`` (64 px, 4 pairs, fp32 by default); ``sd15-random`` is a UNet,
    VAE and CLIP text encoder of Stable Diffusion 1.5's published sizes with random weights
    (512 px, 8 pairs, bf16), meant for a GPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if model == "tiny":
        from fastpref.testing.tiny_model import make_tiny_model

        path = make_tiny_model(workdir / "tiny-sd15", arch="sd15", seed=seed)
        vae, tokenizers, text_encoders = SD15.load_encoders(ModelSource(str(path)), dtype=weight_dtype, device=device)
        scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")  # as fastpref train

        def new_unet():
            return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")

        return Components(
            new_unet,
            scheduler,
            vae,
            tokenizers,
            text_encoders,
            "fastpref.testing.tiny_model SD1.5 (random weights, tiny widths)",
        )

    if model == "sd15-random":
        from transformers import CLIPTextConfig, CLIPTextModel

        from fastpref.testing.tiny_model import load_tokenizer, write_tokenizer

        write_tokenizer(workdir / "tokenizer")
        tokenizer = load_tokenizer(workdir / "tokenizer")  # byte-level BPE, 77 tokens as CLIP's; ids fit CLIP's vocab
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):  # initialise on the device: an 860M-parameter init is slow on a CPU
                template = UNet2DConditionModel(**SD15_UNET)
                vae = AutoencoderKL(**SD15_VAE)
                text_config = CLIPTextConfig(
                    **SD15_TEXT,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
                text_encoder = CLIPTextModel(text_config)
        vae = vae.to(device, weight_dtype).eval().requires_grad_(False)
        text_encoder = text_encoder.to(device, weight_dtype).eval().requires_grad_(False)
        template = template.requires_grad_(False).to("cpu")  # each trainer moves its copy to the device
        import copy

        def new_unet():
            return copy.deepcopy(template)

        scheduler = DDPMScheduler(**SD15_SCHEDULER)
        return Components(
            new_unet,
            scheduler,
            vae,
            [tokenizer],
            [text_encoder],
            "SD1.5-sized UNet/VAE/CLIP-L text encoder, random weights",
        )
    raise ValueError(f"model must be one of {tuple(MODELS)}, got {model!r}")


def make_batches(components: Components, pairs: int, resolution: int, seed: int):
    """``raw``: pixels and captions (host memory, as a DataLoader gives them); ``cached``: the
    latents and text embeddings of the same batch, encoded once (host memory, as the latent
    cache serves them)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2 * pairs, 3, resolution, resolution, generator=generator) * 2 - 1  # winners, losers
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(pairs)]
    raw = {"pixel_values": pixels, "captions": captions}
    encoded = encode(components, raw)
    cached = {k: v.detach().float().cpu() for k, v in encoded.items()}
    return raw, cached


def encode(components: Components, raw: dict) -> dict:
    """The trainer's batch from pixels and captions: VAE latents of the 2B images and the text
    embeddings of the B captions, as ``fastpref train`` does without ``--cache_latents``."""
    pixels = raw["pixel_values"]
    device = next(components.vae.parameters()).device
    latents = SD15.encode_images(components.vae, pixels.to(device))
    text = SD15.encode_prompts(raw["captions"], components.tokenizers, components.text_encoders)
    return {"latents": latents.float(), "encoder_hidden_states": text["prompt_embeds"]}


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


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


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
    positions: List[int] = dataclasses.field(default_factory=list)
    metric_on: int = 0
    skipped: int = 0
    breakdown: List[Dict[str, float]] = dataclasses.field(default_factory=list)


def train_config(method: str, lora_rank: int, mixed_precision: str, seed: int) -> TrainConfig:
    return TrainConfig(
        loss_type="dpo" if method == "dpo" else "adaptive",
        ema_decays=DECAYS,
        metric_warmup_steps=0,  # every timed step evaluates the footprints
        lora_rank=lora_rank,
        mixed_precision=mixed_precision,
        learning_rate=1e-5,
        max_train_steps=1_000_000,
        seed=seed,
        **SD15_LOSS,
    )


def build_variants(keys, components, batches, encoding, lora_rank, mixed_precision, accelerator, seed) -> List[Variant]:
    _, cached = batches
    trainers = {}
    for method in METHODS:
        if not any(k.split("/")[0] == method for k in keys):
            continue
        config = train_config(method, lora_rank, mixed_precision, seed)
        kind = AuthorsTrainer if method == "authors" else PreferenceTrainer
        trainers[method] = kind(components.new_unet(), components.noise_scheduler, config, accelerator)
    variants = []
    for key in keys:
        method, caching = key.split("/")
        trainer = trainers[method]
        if caching == "cached":
            run = functools.partial(trainer.train_step, cached)
        else:
            run = uncached_step(trainer, encoding)
        variants.append(Variant(key, method, caching == "cached", trainer, run))
    return variants


def uncached_step(trainer, encoding: Encoding) -> Callable[[], dict]:
    def run():
        return trainer.train_step(encoding())

    return run


def run_rounds(
    variants: List[Variant],
    rounds: int,
    sync,
    record: bool,
    phases: Optional[Phases] = None,
    deadline: Optional[float] = None,
) -> None:
    """``rounds`` rounds; in each, every variant runs one step, the order rotated by one per round.
    Past ``deadline`` (a ``perf_counter`` time) no new round starts, after the first."""
    n = len(variants)
    for r in range(rounds):
        if deadline is not None and r > 0 and time.perf_counter() > deadline:
            print(f"--time_budget reached: {r} of {rounds} round(s) run", flush=True)
            break
        for position in range(n):
            variant = variants[(r + position) % n]
            sync()
            begin = time.perf_counter()
            out = variant.run()
            sync()
            elapsed = (time.perf_counter() - begin) * 1e3
            if phases is not None:
                parts = phases.take()
                top = sum(parts.get(p, 0.0) for p in TOP_PHASES)
                parts[REST] = elapsed - top
                parts["step"] = elapsed
                variant.breakdown.append(parts)
            if record:
                variant.times_ms.append(elapsed)
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
    acc = trainer.accelerator
    device = acc.device
    latents = cached["latents"].to(device, trainer.weight_dtype)
    cond = cached["encoder_hidden_states"].to(device, trainer.weight_dtype)
    cond = torch.cat([cond, cond])
    timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
    unet = trainer.base_unet
    three, one = [], []

    def forward(x, t, c):
        with torch.no_grad(), acc.autocast():
            return unet(x, t, c).sample

    big = (torch.cat([latents] * 3), torch.cat([timesteps] * 3), torch.cat([cond] * 3))
    forward(latents, timesteps, cond)
    forward(*big)
    for _ in range(reps):
        sync()
        begin = time.perf_counter()
        for _ in range(3):
            forward(latents, timesteps, cond)
        sync()
        three.append((time.perf_counter() - begin) * 1e3)
        begin = time.perf_counter()
        forward(*big)
        sync()
        one.append((time.perf_counter() - begin) * 1e3)
    a, b = statistics.median(three), statistics.median(one)
    return {"three_fwd_2B_ms": a, "one_fwd_6B_ms": b, "saving_ms": a - b, "reps": reps}


# --------------------------------------------------------------------------------------------
# one mode (LoRA rank r or full fine-tune)
# --------------------------------------------------------------------------------------------


def run_mode(args, lora_rank: int, keys, components, batches, accelerator, sync) -> dict:
    """Time the variants ``keys`` in one mode (LoRA rank ``lora_rank``, or a full fine-tune at 0).

    All variants are built first (one trainer per method, shared by its cached and uncached
    variants; one VAE and text encoder shared by all) and run ``--warmup`` untimed rounds; then
    ``--steps`` timed rounds in which every variant runs one step, in an order rotated from round
    to round so that machine noise hits every variant alike. A step's time is ``perf_counter``
    around it, with a device synchronize on both sides on CUDA; batches are tensors in host
    memory, as a DataLoader hands them over, so image decoding and loading are never timed.
    Then ``--breakdown_rounds`` more rounds with per-phase timers (they add device syncs, so
    they are reported apart from the step times) and :func:`batched_probe`."""
    mode = f"lora-r{lora_rank}" if lora_rank > 0 else "full"
    print(f"\n## {mode}: building {len(keys)} variants", flush=True)
    encoding = Encoding(components, batches[0])
    variants = build_variants(
        keys, components, batches, encoding, lora_rank, MIXED_PRECISION[args.dtype], accelerator, args.seed
    )
    print(f"warm-up: {args.warmup} round(s); timing: {args.steps} interleaved round(s)", flush=True)
    run_rounds(variants, args.warmup, sync, record=False)
    gc.collect()
    run_rounds(variants, args.steps, sync, record=True, deadline=args.deadline)

    probe = None
    if args.breakdown_rounds > 0 and (args.deadline is None or time.perf_counter() < args.deadline):
        phases = install_phases(variants, encoding, accelerator, sync)
        phases.active = True
        run_rounds(variants, args.breakdown_rounds, sync, record=False, phases=phases)
        phases.active = False
        prober = next((v.trainer for v in variants if v.method == "fastpref"), variants[0].trainer)
        probe = batched_probe(prober, batches, sync, reps=max(1, args.breakdown_rounds))

    median = {v.key: statistics.median(v.times_ms) for v in variants}
    pairs = batches[1]["encoder_hidden_states"].shape[0]
    return {
        "mode": mode,
        "lora_rank": lora_rank,
        "interleaved": True,
        "rows": mode_rows(mode, lora_rank, variants, median, samples=2 * pairs),
        "goals": goals(median),
        "breakdown": mode_breakdown(variants),
        "batched_probe": probe,
    }


def mode_rows(mode: str, lora_rank: int, variants: List[Variant], median: Dict[str, float], samples: int) -> List[dict]:
    """One row per variant: median step time, samples/s, ratios to the cached DPO step and to the
    authors' row with the same caching, and the raw timings."""
    rows = []
    for v in variants:
        ms = median[v.key]
        base = median.get("dpo/cached")
        authors = median.get(f"authors/{'cached' if v.cached else 'uncached'}")
        rows.append(
            {
                "mode": mode,
                "variant": v.key,
                "label": LABELS[v.key],
                "method": v.method,
                "footprints": {
                    "dpo": "-",
                    "fastpref": "on-device" + (" adapters" if lora_rank else " copies"),
                    "authors": "EMAModel via CPU",
                }[v.method],
                "latents": "cached" if v.cached else "VAE+text each step",
                "ms": ms,
                "samples_per_s": samples / (ms / 1e3),
                "vs_dpo_cached": ms / base if base else None,
                "fastpref_over_authors": ms / authors if (v.method == "fastpref" and authors) else None,
                "ms_min": min(v.times_ms),
                "ms_max": max(v.times_ms),
                "ms_mean": statistics.fmean(v.times_ms),
                "timings_ms": v.times_ms,
                "round_positions": v.positions,
                "steps_with_metric_on": v.metric_on,
                "skipped_steps": v.skipped,
            }
        )
    return rows


def mode_breakdown(variants: List[Variant]) -> Dict[str, dict]:
    """Per variant, the median ms of each phase over the breakdown rounds."""
    breakdown = {}
    for v in variants:
        if v.breakdown:
            names = [p for p in ("step", *TOP_PHASES, REST, *SUB_PHASES) if any(p in b for b in v.breakdown)]
            breakdown[v.key] = {p: statistics.median(b.get(p, 0.0) for b in v.breakdown) for p in names}
            breakdown[v.key]["rounds"] = len(v.breakdown)
    return breakdown


def goals(median: Dict[str, float]) -> dict:
    """The targets (:data:`GOAL_ADAPTIVE`, :data:`GOAL_DPO`) checked on one mode's median step
    times, and fastpref's speed-up over the authors' footprint handling."""
    out = {}
    if "dpo/cached" in median and "fastpref/cached" in median:
        ratio = median["fastpref/cached"] / median["dpo/cached"]
        out["adaptive_vs_dpo_cached"] = {
            "goal": f"Adaptive (K=2) step <= {GOAL_ADAPTIVE}x the latent-cached DPO step",
            "value": ratio,
            "met": ratio <= GOAL_ADAPTIVE,
            "authors_uncached_vs_dpo_cached": median["authors/uncached"] / median["dpo/cached"]
            if "authors/uncached" in median
            else None,
            "authors_cached_vs_dpo_cached": median["authors/cached"] / median["dpo/cached"]
            if "authors/cached" in median
            else None,
            "authors_reference": f"the authors' Adaptive step costs about {AUTHORS_H100} a DPO step on H100, SD1.5",
        }
    if "dpo/cached" in median and "dpo/uncached" in median:
        ratio = median["dpo/uncached"] / median["dpo/cached"]  # = samples/s cached / samples/s uncached
        out["dpo_samples_per_s_vs_diffusers_script"] = {
            "goal": f"DPO samples/s >= {GOAL_DPO}x diffusers' script (the uncached DPO row)",
            "value": ratio,
            "met": ratio >= GOAL_DPO,
        }
    if "fastpref/uncached" in median and "authors/uncached" in median:
        out["fastpref_speedup_over_authors"] = {
            "same_caching_uncached": median["authors/uncached"] / median["fastpref/uncached"],
            "fastpref_cached_vs_authors_way": median["authors/uncached"] / median["fastpref/cached"]
            if "fastpref/cached" in median
            else None,
            "same_caching_cached": median["authors/cached"] / median["fastpref/cached"]
            if {"authors/cached", "fastpref/cached"} <= set(median)
            else None,
        }
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=tuple(MODELS), default="tiny", help="tiny (CPU, default) or sd15-random (GPU)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed interleaved rounds, one step per variant each "
        f"(default {DEFAULTS['steps']}; quick {QUICK['steps']})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed rounds first (default {DEFAULTS['warmup']}; quick {QUICK['warmup']})",
    )
    parser.add_argument(
        "--breakdown_rounds",
        type=int,
        default=None,
        help="extra rounds with per-phase timers; 0 = none "
        f"(default {DEFAULTS['breakdown_rounds']}; quick {QUICK['breakdown_rounds']})",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=tuple(MIXED_PRECISION),
        default=None,
        help="mixed precision of the step (default: the model's: tiny fp32, sd15-random bf16)",
    )
    parser.add_argument(
        "--lora_rank", default="8", help="LoRA rank; 0 = full fine-tune; a comma list runs each mode (e.g. 8,0)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels (default: the model's: tiny 64, sd15-random 512)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="pairs per step (default: the model's: tiny 4, sd15-random 8; quick 2)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); "
        "1 avoids the OpenMP oversubscription stalls of a CPU shared with other jobs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few rounds of 2 pairs: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step-<machine>.json)")
    parser.add_argument(
        "--time_budget",
        type=float,
        default=None,
        help="seconds from the start: no new timed round (after the first) nor breakdown begins past it",
    )
    args = parser.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error("--time_budget must be > 0 seconds")
    args.deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget
    model = MODELS[args.model]
    preset = QUICK if args.quick else DEFAULTS
    for name in ("steps", "warmup", "breakdown_rounds"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.resolution = args.resolution or model["resolution"]
    args.batch = args.batch or (QUICK["batch"] if args.quick else model["batch"])
    args.dtype = args.dtype or model["dtype"]
    try:
        args.lora_ranks = [int(r) for r in args.lora_rank.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--lora_rank: a comma list of ints, got {args.lora_rank!r}")
    args.variant_keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in args.variant_keys if k not in VARIANTS]
    if unknown or not args.variant_keys:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if (
        args.steps < 1
        or args.warmup < 0
        or args.breakdown_rounds < 0
        or args.batch < 1
        or any(r < 0 for r in args.lora_ranks)
        or not args.lora_ranks
    ):
        parser.error("--steps >= 1, --warmup >= 0, --breakdown_rounds >= 0, --batch >= 1, --lora_rank >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8 (the VAE's factor)")
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    machine = device_name(device)
    load_start = os.getloadavg()
    print_header(args, machine, device, load_start)
    with tempfile.TemporaryDirectory(prefix="fastpref-bench-step-") as tmp:
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
        components = build_components(args.model, device, weight_dtype, Path(tmp), args.seed)
        batches = make_batches(components, args.batch, args.resolution, args.seed)
        modes = [run_mode_on_fresh_accelerator(args, rank, components, batches, device) for rank in args.lora_ranks]
    load = {"start": list(load_start), "end": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    load["under_load"] = device.type == "cpu" and max(load["start"][0], load["end"][0]) > 1.5
    wall = time.perf_counter() - started

    print_report(args, modes, f"{args.model} at {args.resolution} px on {machine}")
    if load["under_load"]:
        print(
            f"\nNOTE: load average {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end "
            f"(> 1.5 on {os.cpu_count()} cores): figures taken under load from other processes."
        )
    print(f"\nwall time {wall:.1f} s")

    report = {
        "benchmark": "step",
        "device": machine,
        "command": " ".join(
            ["python", "benchmarks/bench_step.py", *argv] if argv is not None else ["python", *sys.argv]
        ),
        "versions": versions(),
        "config": run_config(args, components, batches, device),
        "load_average": load,
        "wall_s": wall,
        "modes": modes,
    }
    output = output_path(args, machine)
    write_json(output, report)
    print(f"wrote {output}")
    return 0


def run_mode_on_fresh_accelerator(args, rank: int, components: Components, batches, device: torch.device) -> dict:
    """:func:`run_mode` with an accelerator of its own, released afterwards (its references to
    the mode's models go with it); out of device memory is recorded and the next mode goes on."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[args.dtype], cpu=device.type == "cpu")
    if accelerator.device.type != device.type or (accelerator.device.index or 0) != (device.index or 0):
        raise RuntimeError(f"accelerate chose {accelerator.device}, the benchmark asked for {device}")
    try:
        return run_mode(args, rank, args.variant_keys, components, batches, accelerator, synchronizer(device))
    except torch.cuda.OutOfMemoryError as error:
        mode = f"lora-r{rank}" if rank > 0 else "full"
        print(
            f"{mode}: out of device memory with the variants {args.variant_keys} alive ({error}); "
            "run fewer with --variants",
            flush=True,
        )
        return {"mode": mode, "lora_rank": rank, "error": f"CUDA out of memory: {error}"}
    finally:
        accelerator.free_memory()
        del accelerator
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def versions() -> Dict[str, str]:
    """The versions of the libraries a step runs through."""
    names = ("torch", "diffusers", "transformers", "peft", "accelerate", "fastpref")
    return {**library_versions(names), "python": sys.version.split()[0]}


def run_config(args, components: Components, batches, device: torch.device) -> dict:
    """The run's settings, for the JSON report."""
    return {
        "model": args.model,
        "model_description": components.description,
        "resolution": args.resolution,
        "latent_shape": list(batches[1]["latents"].shape[1:]),
        "pairs_per_step": args.batch,
        "samples_per_step": 2 * args.batch,
        "dtype": args.dtype,
        "device": str(device),
        "lora_ranks": args.lora_ranks,
        "variants": args.variant_keys,
        "steps": args.steps,
        "time_budget_s": args.time_budget,
        "warmup": args.warmup,
        "breakdown_rounds": args.breakdown_rounds,
        "ema_decays": list(DECAYS),
        "metric_warmup_steps": 0,
        "loss_backend": "auto",
        "beta": SD15_LOSS["beta"],
        "k1": SD15_LOSS["k1"],
        "seed": args.seed,
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
    }


def output_path(args, machine: str) -> Path:
    """``--out``, else ``benchmarks/results/[quick-]step[-<model>]-<machine>.json``."""
    if args.out:
        return Path(args.out)
    stem = "step" if args.model == "tiny" else f"step-{args.model}"
    return result_path(f"{stem}-{slug(machine)}", args.quick)


# --------------------------------------------------------------------------------------------
# the printed report
# --------------------------------------------------------------------------------------------


def print_header(args, machine: str, device: torch.device, load_start) -> None:
    """What is measured, on what, with which versions; a warning when other jobs load the CPU."""
    import accelerate
    import diffusers
    import peft

    threads = torch.get_num_threads()
    print(
        f"# fastpref step benchmark on {machine}: model {args.model}, {args.batch} pairs "
        f"({2 * args.batch} samples) at {args.resolution} px, {args.dtype}, LoRA rank(s) {args.lora_ranks} "
        f"(0 = full fine-tune), {threads} CPU thread(s)\n"
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"accelerate {accelerate.__version__}; load average {load_start[0]:.2f}",
        flush=True,
    )
    if device.type == "cpu" and load_start[0] > 1.5 and threads > 1:
        print(
            f"(load average {load_start[0]:.2f}: other jobs share the CPU; with {threads} threads "
            "OpenMP stalls may dominate -- consider --threads 1)",
            flush=True,
        )


def print_report(args, modes: List[dict], context: str) -> None:
    """The step-time table, the targets checked on this run, and where the time goes."""
    print_step_table(args, modes)
    print_goals(modes, context)
    print_breakdowns(args, modes)


def print_step_table(args, modes: List[dict]) -> None:
    rows = [row for m in modes for row in m.get("rows", [])]
    print(f"\n## Step time, median of {args.steps} interleaved rounds ({2 * args.batch} samples per step)\n")
    columns = ["mode", "label", "ms", "samples_per_s", "vs_dpo_cached", "fastpref_over_authors"]
    formats = {
        "ms": "{:.1f}",
        "samples_per_s": "{:.1f}",
        "vs_dpo_cached": "{:.2f}x",
        "fastpref_over_authors": "{:.2f}x",
    }
    print(markdown(rows, columns, formats))
    print(
        "\n(vs_dpo_cached: step time over the latent-cached DPO step of the same mode; fastpref_over_authors: "
        "the fastpref row's step time over the authors' row with the same caching)"
    )


def _met(goal: dict) -> str:
    return "MET" if goal["met"] else "NOT MET"


def print_goals(modes: List[dict], context: str) -> None:
    """Each mode's ratios against the targets (stated for SD1.5 on an H100) on this run."""
    print("\n## Targets (stated for SD1.5 on an H100), on this run\n")
    for m in modes:
        g = m.get("goals", {})
        if "error" in m:
            print(f"- {m['mode']}: not measured ({m['error']})")
            continue
        if "adaptive_vs_dpo_cached" in g:
            a = g["adaptive_vs_dpo_cached"]
            authors = (
                ""
                if a["authors_uncached_vs_dpo_cached"] is None
                else f"; the authors' method here: {a['authors_uncached_vs_dpo_cached']:.2f}x "
                f"(their reference: {AUTHORS_H100} on H100)"
            )
            print(
                f"- {m['mode']}: Adaptive K=2 / DPO cached = {a['value']:.2f}x, goal <= {GOAL_ADAPTIVE}x: "
                f"{_met(a)} ({context}){authors}"
            )
        if "dpo_samples_per_s_vs_diffusers_script" in g:
            d = g["dpo_samples_per_s_vs_diffusers_script"]
            print(
                f"- {m['mode']}: DPO samples/s cached / diffusers' script = {d['value']:.2f}x, "
                f"goal >= {GOAL_DPO}x: {_met(d)} ({context})"
            )
        if "fastpref_speedup_over_authors" in g:
            s = g["fastpref_speedup_over_authors"]
            extra = (
                ""
                if s["fastpref_cached_vs_authors_way"] is None
                else "; fastpref cached vs the authors' way (uncached): "
                f"{s['fastpref_cached_vs_authors_way']:.2f}x faster"
            )
            print(
                f"- {m['mode']}: fastpref Adaptive vs the authors', both uncached: "
                f"{s['same_caching_uncached']:.2f}x faster{extra}"
            )


def print_breakdowns(args, modes: List[dict]) -> None:
    """Per mode, the median ms of each phase per variant, and the batched-forward probe."""
    for m in modes:
        if not m.get("breakdown"):
            continue
        names = ["step", *TOP_PHASES, REST, *SUB_PHASES]
        present = [n for n in names if any(n in b for b in m["breakdown"].values())]
        print(
            f"\n## {m['mode']}: where the time goes (ms, median of {args.breakdown_rounds} rounds "
            "with a device sync around each phase)\n"
        )
        table = [{"variant": k, **{n: b.get(n) for n in present}} for k, b in m["breakdown"].items()]
        print(markdown(table, ["variant", *present], {n: "{:.1f}" for n in present}))
        p = m.get("batched_probe")
        if p:
            print(
                f"\nno-grad forwards: 3 x {2 * args.batch} samples {p['three_fwd_2B_ms']:.1f} ms vs "
                f"1 x {6 * args.batch} samples {p['one_fwd_6B_ms']:.1f} ms "
                f"(saving {p['saving_ms']:.1f} ms per step at most)"
            )


if __name__ == "__main__":
    sys.exit(main())
