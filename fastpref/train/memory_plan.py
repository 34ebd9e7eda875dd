"""The memory plan of a run: the bytes per GPU of each part of a ``fastpref train`` run under DDP
and under ``--fsdp``, from the model's parameter counts and the flags, before any weight is read
(``fastpref train ... --print_memory_plan``).

The parts: the policy's weights, their gradients, the optimizer state, the frozen reference, the
EMA footprints, the frozen encoders of an uncached run, the transient buffers of the optimizer
step and of FSDP's all-gathers, and the activations of one micro-batch as a range. The static
parts are parameter counts times the bytes per parameter below (each written once, with where it
comes from); the counts come from the pipeline's configs, the denoiser and encoders built on the
meta device. The activations are traced: the denoiser is built under a ``FakeTensorMode`` (shapes
only, no memory) and runs one forward and backward of the run's micro-batch (``2 x
--train_batch_size`` images at ``--resolution``, the run's mixed precision and gradient
checkpointing) under torch's ``MemTracker``, which counts every tensor's storage:

- ``low``: what the forward leaves for the backward (activations, autocast's weight casts);
- ``high``: the most memory the step holds beyond parameters, gradients and optimizer state
  (the forward's activations, then the backward's temporaries).

The peak of a process then lies between ``total_low = max(static - gradients + low, static)``
(after the forward everything but the gradients and the activations is held; after the
backward everything static is) and ``total_high = static + high``. The no-grad reference and
footprint forwards run before the policy's and hold less than ``high`` (one block at a time).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# -- bytes per parameter (each number once) -----------------------------------------------------

#: the dtype of the frozen weights (a LoRA run's base denoiser, the full fine-tune's reference,
#: the encoders) per --mixed_precision: PreferenceTrainer stores them in the autocast dtype
WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
#: trainable weights are float32 whatever the mixed precision (trainer._prepare_policy: full
#: fine-tunes train float32 weights, LoRA adapters are cast to float32)
TRAINABLE_BYTES = 4
#: a gradient has its parameter's dtype: float32
GRADIENT_BYTES = 4
#: torch.optim.AdamW keeps exp_avg and exp_avg_sq, float32 each
ADAMW_STATE_BYTES = 8
#: bitsandbytes' AdamW8bit (--use_8bit_adam): two uint8 states, each with one float32 absmax per
#: block of 256 values (blockwise quantization); tensors under 4096 values stay 32-bit (ignored here)
ADAMW_8BIT_STATE_BYTES = 2 + 2 * 4 / 256
#: torch's foreach AdamW (the default on GPUs) allocates one float32 temporary per parameter for
#: sqrt(exp_avg_sq) during the step; the single-tensor loop (CPUs) one parameter's at a time
ADAMW_STEP_TEMP_BYTES = 4
#: the EMA footprints are float32 copies of the trainable tensors (footprints.py)
FOOTPRINT_BYTES = 4
#: DDP with more than one process keeps float32 gradient buckets beside .grad (accelerate's
#: default gradient_as_bucket_view=False)
DDP_BUCKET_BYTES = 4
#: FSDP2 keeps the full parameters of this many blocks at a time: the one computing and the next,
#: prefetched (its default forward and backward prefetch of one)
FSDP_GATHERED_BLOCKS = 2

PARTS = (
    ("policy", "policy weights"),
    ("gradients", "gradients (+ DDP buckets)"),
    ("optimizer", "optimizer state"),
    ("reference", "frozen reference"),
    ("footprints", "EMA footprints"),
    ("buffers", "buffers (every copy)"),
    ("encoders", "VAE + text encoders"),
    ("step_temp", "optimizer step temporaries"),
    ("gathered", "FSDP all-gathered blocks"),
)


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a run's model: the ``denoiser`` (all of it), its ``trainable`` tensors
    (the LoRA adapter, or the whole denoiser), the largest trainable tensor, the ``blocks`` FSDP
    shards separately (each one's count; the rest, ``denoiser - sum(blocks)``, is sharded with the
    root module), the frozen ``encoders`` (VAE and text encoders, 0 when latents are cached) and
    the denoiser's floating-point ``buffers`` (elements; e.g. SD3's positional embedding table),
    which every copy of the denoiser holds and FSDP does not shard."""

    denoiser: int
    trainable: int
    largest_tensor: int
    blocks: Tuple[int, ...]
    encoders: int = 0
    buffers: int = 0


@dataclasses.dataclass(frozen=True)
class Flags:
    """The flags the plan depends on (as ``fastpref train``'s of the same names)."""

    lora_rank: int
    mixed_precision: str = "no"
    num_footprints: int = 0
    use_8bit_adam: bool = False
    device_type: str = "cuda"  # "cpu": the optimizer's single-tensor loop (see ADAMW_STEP_TEMP_BYTES)


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    """Activation bytes of one micro-batch of one process (see the module docstring)."""

    low: int
    high: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process of each part (:data:`PARTS`), the activations, and the peak's bounds."""

    strategy: str  # "DDP" or "FSDP"
    processes: int
    parts: Dict[str, float]
    activations: Optional[ActivationRange]

    @property
    def static(self) -> float:
        return sum(self.parts.values())

    @property
    def total_low(self) -> float:
        low = self.activations.low if self.activations else 0
        without_grads = self.static - self.parts["gradients"] - self.parts["step_temp"]
        return max(without_grads + low, self.static)

    @property
    def total_high(self) -> float:
        return self.static + (self.activations.high if self.activations else 0)


def plan(counts: ParameterCounts, flags: Flags, processes: int, fsdp: bool, activations=None) -> MemoryPlan:
    """The bytes per process of each part for ``processes`` processes, DDP or FSDP (full
    fine-tunes only: every part but the encoders and the gathered blocks divided among the
    processes). ``activations``: an :class:`ActivationRange` (the same under both: each process
    runs its own micro-batch)."""
    if fsdp and flags.lora_rank > 0:
        raise ValueError("fsdp: LoRA runs keep DDP (their trainable and EMA tensors are small)")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    weight = WEIGHT_BYTES[flags.mixed_precision]
    n, t = counts.denoiser, counts.trainable
    lora = flags.lora_rank > 0
    copies = 1 + flags.num_footprints  # float32 copies of a full fine-tune: the policy and its footprints
    state = ADAMW_8BIT_STATE_BYTES if flags.use_8bit_adam else ADAMW_STATE_BYTES
    parts = {
        "policy": (n * weight + t * TRAINABLE_BYTES) if lora else n * TRAINABLE_BYTES,
        "gradients": t * GRADIENT_BYTES,
        "optimizer": t * state,
        "reference": 0 if lora else n * weight,  # LoRA: the base with adapters disabled
        "footprints": flags.num_footprints * t * FOOTPRINT_BYTES,
        # buffers follow their module's dtype: the policy's and footprints' float32, the reference's
        # (a LoRA run's base) in the weight dtype
        "buffers": counts.buffers * (weight if lora else copies * TRAINABLE_BYTES + weight),
        "encoders": counts.encoders * weight,
        "step_temp": 0,
        "gathered": 0,
    }
    foreach = flags.device_type != "cpu" and not flags.use_8bit_adam
    if fsdp:
        for name in ("policy", "gradients", "optimizer", "reference", "footprints"):
            parts[name] /= processes
        root = n - sum(counts.blocks)
        biggest = max(counts.blocks, default=0)
        # the root's parameters stay gathered through the step; blocks are gathered two at a time
        # (in the compute dtype) and a block's full gradient waits for its reduce-scatter
        parts["gathered"] = 0 if processes == 1 else (root + FSDP_GATHERED_BLOCKS * biggest) * weight + biggest * 4
        parts["step_temp"] = (t / processes if foreach else counts.largest_tensor / processes) * ADAMW_STEP_TEMP_BYTES
    else:
        if processes > 1:
            parts["gradients"] += t * DDP_BUCKET_BYTES
        parts["step_temp"] = (t if foreach else counts.largest_tensor) * ADAMW_STEP_TEMP_BYTES
    return MemoryPlan("FSDP" if fsdp else "DDP", processes, parts, activations)


# -- counting parameters from configs ----------------------------------------------------------


def module_from_config(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """A diffusers or transformers model of ``class_name`` built from its ``config`` (as saved in
    its folder's ``config.json``) in the current device / fake mode, weights uninitialised."""
    cls = getattr(importlib.import_module(library), class_name)
    if library == "transformers":
        return cls._from_config(cls.config_class.from_dict(config))
    return cls.from_config(config)


def meta_module(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """:func:`module_from_config` on the meta device (no memory, no initialisation)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return module_from_config(library, class_name, config)


def lora_count(module: torch.nn.Module, rank: int, targets: Sequence[str]) -> Tuple[int, int]:
    """``(parameters, largest tensor)`` of a rank-``rank`` LoRA on the linear layers of ``module``
    named by ``targets`` (peft's rule: the name, or its end after a dot): ``rank x (in + out)``."""
    total = largest = 0
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (layer.in_features + layer.out_features)
            largest = max(largest, rank * layer.in_features, rank * layer.out_features)
    return total, largest


def unit_counts(blocks: Sequence[torch.nn.Module]) -> Tuple[int, ...]:
    """The parameters each of ``blocks`` shards on its own: its parameters but those of the
    blocks nested inside it (a UNet block after its transformer layers)."""
    owner = {}
    for index, block in enumerate(blocks):  # an inner block comes first: the first owner is the innermost
        for param in block.parameters():
            owner.setdefault(id(param), (index, param.numel()))
    counts = [0] * len(blocks)
    for index, numel in owner.values():
        counts[index] += numel
    return tuple(counts)


def count_parameters(
    denoiser: torch.nn.Module, blocks: Sequence[torch.nn.Module], lora_rank: int, lora_targets, encoders: int = 0
) -> ParameterCounts:
    """:class:`ParameterCounts` of a denoiser (on any device, the meta device included)."""
    n = sum(p.numel() for p in denoiser.parameters())
    if lora_rank > 0:
        trainable, largest = lora_count(denoiser, lora_rank, lora_targets)
    else:
        trainable, largest = n, max(p.numel() for p in denoiser.parameters())
    block_counts = unit_counts(blocks)
    buffers = sum(b.numel() for b in denoiser.buffers() if b.is_floating_point())
    return ParameterCounts(n, trainable, largest, block_counts, encoders, buffers)


def pipeline_configs(source, family) -> Dict[str, dict]:
    """The configs of ``source``'s denoiser (:attr:`~fastpref.train.models.ModelSource.configs`)
    and of the family's encoder folders (``config.json`` of each that has one)."""
    configs = dict(source.configs)
    for folder in family.encoder_folders:
        config = source._read(f"{folder}/config.json")
        if config is not None:
            configs[folder] = config
    return configs


def pipeline_counts(source, family, lora_rank: int, cached: bool) -> ParameterCounts:
    """:class:`ParameterCounts` of a pipeline (:class:`~fastpref.train.models.ModelSource`) from
    its configs alone: the denoiser and, unless ``cached``, the VAE and text encoders of the
    family's ``encoder_folders`` that ``model_index.json`` lists, each built on the meta device."""
    configs = pipeline_configs(source, family)
    config = configs[family.denoiser_folder]
    denoiser = meta_module("diffusers", config["_class_name"], config)
    encoders = 0
    if not cached:
        index = configs.get("model_index", {})
        for folder in family.encoder_folders:
            entry = index.get(folder)
            if folder not in configs or not isinstance(entry, list) or entry[0] not in ("diffusers", "transformers"):
                continue
            module = meta_module(entry[0], entry[1], configs[folder])
            if isinstance(module, torch.nn.Module):
                encoders += sum(p.numel() for p in module.parameters())
    return count_parameters(denoiser, family.shard_blocks(denoiser), lora_rank, family.lora_targets, encoders)


# -- activations: a traced micro-batch ---------------------------------------------------------


def _peak_tracker():
    """torch's ``MemTracker``, also recording the most bytes held beyond parameters, buffers,
    gradients and optimizer state at any instant (it reports the categories at the total's peak
    only)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    steady = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT)

    class Tracker(MemTracker):
        transient = 0

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter's gradient, which fails on frozen ones (LoRA)
            held = super()._track_module_params_and_buffers(module, install_grad_hooks=False)

            def grad_hook(param) -> None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)

            for param in module.parameters():
                if install_grad_hooks and param.requires_grad and param not in self._param_to_grad_hook_handles:
                    handle = param.register_post_accumulate_grad_hook(grad_hook)
                    self._param_to_grad_hook_handles[param] = (handle, handle)  # MemTracker removes a pair
            return held

        def _update_snap(self, *args, **kwargs):
            super()._update_snap(*args, **kwargs)
            for snap in self._curr_mem_snap.values():
                held = snap[_TOTAL_KEY] - sum(snap[kind] for kind in steady)
                self.transient = max(self.transient, held)

    return Tracker()


def trace_activations(
    build: Callable[[], torch.nn.Module],
    inputs: Callable[[], dict],
    call: Callable[[torch.nn.Module, dict], torch.Tensor],
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
) -> ActivationRange:
    """The :class:`ActivationRange` of one forward and backward of ``call(build(), inputs())``
    (a loss-less stand-in: the squared mean of the output), all under a ``FakeTensorMode``:
    nothing is allocated or computed, any model size traces on a CPU in seconds to minutes.
    ``build`` returns the model on the meta device (:func:`meta_module`), its trainable tensors
    requiring grad, in their dtypes; autocast runs on the
    CPU in the run's dtype (its op lists differ a little from CUDA's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _MemRefType

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    model = build()  # on the meta device: peft and dtype casts work there, not on fake tensors
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        batch = inputs()
        tracker = _peak_tracker()
        tracker.track_external(model)
        with tracker:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = call(model, batch)
            (held,) = tracker.get_tracker_snapshot().values()
            steady = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT)
            low = held[_TOTAL_KEY] - sum(held[kind] for kind in steady)
            out.float().square().mean().backward()
    return ActivationRange(int(low), int(tracker.transient))


def run_activations(source, family, lora_rank: int, pairs: int, resolution: int, mixed_precision: str, checkpointing):
    """:func:`trace_activations` of a run's denoiser (built from its config, LoRA added as the
    trainer adds it) on the family's :meth:`~fastpref.train.families.base.ModelFamily.example_batch`
    of ``pairs`` pairs at ``resolution``."""
    configs = pipeline_configs(source, family)
    config = configs[family.denoiser_folder]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)

    def build():
        denoiser = meta_module("diffusers", config["_class_name"], config)
        if lora_rank > 0:
            from peft import LoraConfig

            denoiser.requires_grad_(False)
            if dtype != torch.float32:
                denoiser.to(dtype)
            denoiser.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(family.lora_targets))
            )
            for param in denoiser.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            denoiser.requires_grad_(True)
        return denoiser

    def inputs():
        batch = family.example_batch(configs, pairs, resolution)
        noisy = batch["latents"].to(dtype)
        return {
            "noisy": noisy,
            "timesteps": batch.get("timesteps", torch.zeros(noisy.shape[0], dtype=torch.int64)),
            "inputs": family.denoiser_inputs(batch, "cpu", dtype),
        }

    def call(model, x):
        return family.denoise(model, x["noisy"], x["timesteps"], x["inputs"])

    return trace_activations(build, inputs, call, mixed_precision, checkpointing)


# -- the report ----------------------------------------------------------------------------------


def table(plans: List[MemoryPlan]) -> str:
    """The plans side by side, per process in GiB (MiB when the largest peak is under 1 GiB): one
    row per part, the activations and the peak's range."""
    unit, scale = ("GiB", 2**30) if max(p.total_high for p in plans) >= 2**30 else ("MiB", 2**20)

    def gib(value: float) -> str:
        return f"{value / scale:.2f}"

    head = [f"part ({unit} per process)"] + [f"{p.strategy} x{p.processes}" for p in plans]
    rows = [[label] + [gib(p.parts[name]) for p in plans] for name, label in PARTS]
    rows.append(["static total"] + [gib(p.static) for p in plans])
    if plans[0].activations is not None:
        rows.append(["activations (range)"] + [f"{gib(p.activations.low)}-{gib(p.activations.high)}" for p in plans])
        rows.append(["peak (range)"] + [f"{gib(p.total_low)}-{gib(p.total_high)}" for p in plans])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_plans(counts: ParameterCounts, flags: Flags, processes: int, activations) -> List[MemoryPlan]:
    """DDP at ``processes`` and, for full fine-tunes, FSDP at ``processes`` (if > 1), 2, 4 and 8."""
    plans = [plan(counts, flags, processes, False, activations)]
    if flags.lora_rank == 0:
        for world in sorted({processes, 2, 4, 8} - {1}):
            plans.append(plan(counts, flags, world, True, activations))
    return plans


def report(run_plan) -> str:
    """``--print_memory_plan``'s text for a resolved :class:`~fastpref.train.run.RunPlan`: the
    parameter counts, then the table of :func:`run_plans` (processes: ``$WORLD_SIZE``, as set by
    ``accelerate launch`` / ``torchrun``, else 1)."""
    config, run, data = run_plan.config, run_plan.run, run_plan.data
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    mixed = run_plan.settings["mixed_precision"] or "no"
    family, source = run_plan.family, run_plan.source
    counts = pipeline_counts(source, family, config.lora_rank, data.cache_latents)
    flags = Flags(
        lora_rank=config.lora_rank,
        mixed_precision=mixed,
        num_footprints=len(config.ema_decays) if config.uses_footprints else 0,
        use_8bit_adam=config.use_8bit_adam,
    )
    checkpointing = config.gradient_checkpointing
    activations = run_activations(
        source, family, config.lora_rank, run.train_batch_size, run_plan.resolution, mixed, checkpointing
    )
    trained = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full"
    lines = [
        f"memory plan of {source.path} ({family.title}): denoiser {counts.denoiser / 1e6:.1f}M parameters, "
        f"{counts.trainable / 1e6:.2f}M trainable ({trained}), "
        f"{len(counts.blocks)} FSDP blocks (largest {max(counts.blocks, default=0) / 1e6:.1f}M), "
        f"encoders {counts.encoders / 1e6:.1f}M" + (" (latents cached: not loaded)" if data.cache_latents else ""),
        f"flags: mixed precision {mixed}, {flags.num_footprints} EMA footprints, "
        f"{'AdamW8bit' if flags.use_8bit_adam else 'AdamW'}, micro-batch {run.train_batch_size} pairs at "
        f"{run_plan.resolution} px, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}",
        table(run_plans(counts, flags, processes, activations)),
    ]
    if config.lora_rank > 0:
        lines.append("LoRA runs keep DDP (--fsdp is for full fine-tunes)")
    return "\n".join(lines)
