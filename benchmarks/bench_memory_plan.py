"""The memory plan, at scale and checked: ``python benchmarks/bench_memory_plan.py [--table] [--measure]``.

``--table`` prints the README's table of ``fastpref.train.memory_plan`` for SD 1.5, SDXL,
SD3.5-Medium, SD3.5-Large and FLUX.1-dev at K = 0 and 2 EMA footprints: each denoiser is built
on the meta device from its published ``config.json``, written below (no download), its
parameters counted, and its activations traced under a fake tensor mode (one pair = 2 images
at the model's native resolution, bf16 autocast, gradient checkpointing on; traced for the full
fine-tune, whose bf16 casts of the float32 weights count among them: a LoRA run, whose frozen
weights are bf16 already, holds less, so its peak range is an upper one). Full fine-tune with
AdamW under DDP and FSDP on 8 GPUs, and LoRA rank 8 under DDP, bytes per GPU. Each model's rows
are written to the result file as soon as they are traced.

``--measure`` checks the plan against what a process really allocates: the tiny SD 1.5 model of
``fastpref.testing`` is trained (a full fine-tune, Adaptive-DPO K = 2, 3 steps of 2 pairs at 256 px,
no mixed precision) by one process and by two (``accelerate launch``, CPU, gloo), under the
PyTorch profiler with ``profile_memory``; the peak of the running sum of the CPU allocator's
allocations and frees from before the model is loaded (every tensor: parameters, copies,
optimizer state, DDP's buckets, activations, temporaries) is each process's measured peak, printed
beside the plan's range. It writes ``benchmarks/results/memory-plan-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from step_models import FLUX_TRANSFORMER as FLUX_DEV  # noqa: E402
from step_models import SD35M_TRANSFORMER as SD35_MEDIUM  # noqa: E402

# -- the published denoiser configs (diffusers' config.json of each Hub repository) -------------
# SD3.5 Medium's and FLUX.1-dev's are the GPU benchmark's (step_models.py), written once there.

SD15_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
# The text lengths of the training scripts: CLIP's 77 (SD3: + T5's 256 tokens), FLUX's T5 512.
SD3_TEXT, FLUX_TEXT = 77 + 256, 512


def sd_inputs(config, resolution, pooled=None):
    def make(pairs=1):
        import torch

        side = resolution // 8
        n = 2 * pairs
        kwargs = dict(
            sample=torch.randn(n, 4, side, side),
            timestep=torch.zeros(n, dtype=torch.int64),
            encoder_hidden_states=torch.randn(n, 77, config["cross_attention_dim"]),
        )
        if pooled:
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(n, pooled), "time_ids": torch.randn(n, 6)}
        return kwargs

    return make


def sd3_inputs(config, resolution):
    def make(pairs=1):
        import torch

        side, n = resolution // 8, 2 * pairs
        return dict(
            hidden_states=torch.randn(n, 16, side, side),
            encoder_hidden_states=torch.randn(n, SD3_TEXT, config["joint_attention_dim"]),
            pooled_projections=torch.randn(n, config["pooled_projection_dim"]),
            timestep=torch.zeros(n),
        )

    return make


def flux_inputs(config, resolution):
    def make(pairs=1):
        import torch

        tokens, n = (resolution // 16) ** 2, 2 * pairs  # 2x2 patches of the 8x-downsampled latents
        return dict(
            hidden_states=torch.randn(n, tokens, config["in_channels"]),
            encoder_hidden_states=torch.randn(n, FLUX_TEXT, config["joint_attention_dim"]),
            pooled_projections=torch.randn(n, config["pooled_projection_dim"]),
            timestep=torch.zeros(n),
            img_ids=torch.zeros(tokens, 3),
            txt_ids=torch.zeros(FLUX_TEXT, 3),
            guidance=torch.ones(n),
        )

    return make


# name, diffusers class, config, native resolution, inputs, LoRA targets, FSDP blocks (attribute names)
MODELS = [
    ("SD 1.5", "UNet2DConditionModel", SD15_UNET, 512, sd_inputs(SD15_UNET, 512), "unet", ()),
    ("SDXL", "UNet2DConditionModel", SDXL_UNET, 1024, sd_inputs(SDXL_UNET, 1024, 1280), "unet", ()),
    (
        "SD3.5-Medium",
        "SD3Transformer2DModel",
        SD35_MEDIUM,
        1024,
        sd3_inputs(SD35_MEDIUM, 1024),
        "attn",
        ("transformer_blocks",),
    ),
    (
        "SD3.5-Large",
        "SD3Transformer2DModel",
        SD35_LARGE,
        1024,
        sd3_inputs(SD35_LARGE, 1024),
        "attn",
        ("transformer_blocks",),
    ),
    (
        "FLUX.1-dev",
        "FluxTransformer2DModel",
        FLUX_DEV,
        1024,
        flux_inputs(FLUX_DEV, 1024),
        "attn",
        ("transformer_blocks", "single_transformer_blocks"),
    ),
]
UNET_LORA = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' DPO scripts' (fastpref's SD families')
TRANSFORMER_LORA = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def blocks_of(model, attributes):
    if not attributes:  # a UNet: its down, mid and up blocks (the SD families' shard_blocks)
        from fastpref.train.families import FAMILIES

        return FAMILIES["sd15"].shard_blocks(model)
    return [block for name in attributes for block in getattr(model, name)]


def big_table(pairs: int = 1, on_row=None, trace: bool = True) -> list:
    """One row per model and K: the plan's numbers, bytes per GPU; ``on_row(rows)`` after each
    model. ``trace=False``: the static parts only (seconds; the activation trace takes minutes per
    model on a CPU)."""
    from fastpref.train import memory_plan as mp

    rows = []
    for name, cls, config, resolution, inputs, kind, block_names in MODELS:
        meta = mp.meta_module("diffusers", cls, config)
        targets = UNET_LORA if kind == "unet" else TRANSFORMER_LORA
        full = mp.count_parameters(meta, blocks_of(meta, block_names), 0, targets)
        lora = mp.count_parameters(meta, [], 8, targets)

        def build():
            return mp.meta_module("diffusers", cls, config).requires_grad_(True)

        def call(model, kwargs):
            return model(**kwargs, return_dict=False)[0]

        print(f"{name}: {full.denoiser / 1e9:.3f}B parameters", flush=True)
        # traced once, for the full fine-tune (its bf16 weight casts included); a LoRA run, whose frozen
        # weights are already bf16, holds less
        traced = mp.trace_activations(build, lambda: inputs(pairs), call, "bf16", True) if trace else None
        for k in (0, 2):
            ddp = mp.plan(full, mp.Flags(0, "bf16", k), 8, False, traced)
            fsdp = mp.plan(full, mp.Flags(0, "bf16", k), 8, True, traced)
            lora_ddp = mp.plan(lora, mp.Flags(8, "bf16", k), 8, False, traced)
            rows.append(
                {
                    "model": name,
                    "params": full.denoiser,
                    "lora_params": lora.trainable,
                    "resolution": resolution,
                    "K": k,
                    "activations": [traced.low, traced.high] if traced else None,
                    "ddp": [ddp.static, ddp.total_low, ddp.total_high],
                    "fsdp8": [fsdp.static, fsdp.total_low, fsdp.total_high],
                    "lora_ddp": [lora_ddp.static, lora_ddp.total_low, lora_ddp.total_high],
                }
            )
        if on_row is not None:
            on_row(rows)
    return rows


def big_markdown(rows) -> str:
    def g(x):
        return f"{x / 2**30:.1f}"

    if not any(r["activations"] for r in rows):  # --no_trace: the static parts only
        lines = [
            "| model | parameters | K | full FT, DDP | full FT, FSDP x8 | LoRA r8, DDP |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['K']} | {g(r['ddp'][0])} | {g(r['fsdp8'][0])} "
                f"| {g(r['lora_ddp'][0])} |"
            )
        return "\n".join(lines)
    lines = [
        "| model | parameters | K | activations, 1 pair | full FT, DDP: static / peak "
        "| full FT, FSDP x8: static / peak | LoRA r8, DDP: peak |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acts = r["activations"]

        def peak(low, high):
            return f"{g(low)}-{g(high)}" if acts else f">= {g(low)}"

        lines.append(
            f"| {r['model']} ({r['resolution']} px) | {r['params'] / 1e9:.2f}B | {r['K']} "
            f"| {f'{g(acts[0])}-{g(acts[1])}' if acts else 'not traced'} "
            f"| {g(r['ddp'][0])} / {peak(*r['ddp'][1:])} "
            f"| {g(r['fsdp8'][0])} / {peak(*r['fsdp8'][1:])} "
            f"| {peak(*r['lora_ddp'][1:])} |"
        )
    return "\n".join(lines)


def measured_markdown(rows) -> str:
    mib = 2**20
    lines = [
        "| run | plan: static | plan: activations | plan: peak | measured peak per process |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        low, high = r["plan_activations"]
        lines.append(
            f"| {r['strategy']} x{r['processes']} | {r['plan_static'] / mib:.2f} MiB "
            f"| {low / mib:.2f}-{high / mib:.2f} MiB "
            f"| {r['plan_peak'][0] / mib:.2f}-{r['plan_peak'][1] / mib:.2f} MiB "
            f"| {', '.join(f'{p / mib:.2f}' for p in r['measured_peaks'])} MiB |"
        )
    return "\n".join(lines)


# -- measured: the tiny model on 1 and 2 processes ------------------------------------------------

PAIRS, RESOLUTION, STEPS, DECAYS = 2, 256, 3, (0.9999, 0.5)


def allocated_peak(prof) -> int:
    """The peak of the running sum of the CPU allocator's allocations (+) and frees (-) that the
    profiler recorded (the memory events of its event tree)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def child(model: str, fsdp: bool) -> None:
    """One process of the measured run; prints its peak as JSON (rank 0 prints all ranks')."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    from fastpref.train.trainer import PreferenceTrainer, TrainConfig

    accelerator = Accelerator()
    config = TrainConfig(
        loss_type="adaptive",
        lora_rank=0,
        ema_decays=DECAYS,
        metric_warmup_steps=0,
        max_train_steps=STEPS,
        learning_rate=1e-4,
        **({"fsdp": True} if fsdp else {}),
    )
    g = torch.Generator().manual_seed(accelerator.process_index)
    side = RESOLUTION // 8
    batch = {"latents": torch.randn(2 * PAIRS, 4, side, side, generator=g)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        batch["encoder_hidden_states"] = torch.randn(PAIRS, 77, unet.config.cross_attention_dim, generator=g)
        trainer = PreferenceTrainer(
            unet, DDPMScheduler.from_pretrained(model, subfolder="scheduler"), config, accelerator
        )
        for _ in range(STEPS):
            trainer.train_step(batch)
    peaks = gather_object([allocated_peak(prof)]) if accelerator.num_processes > 1 else [allocated_peak(prof)]
    if accelerator.is_main_process:
        print("PEAKS " + json.dumps(peaks), flush=True)


def measure(model: Path, processes: int, fsdp: bool) -> list:
    """The per-process peaks of :func:`child` on ``processes`` CPU processes."""
    script = [str(Path(__file__).resolve()), "--child", str(model)] + (["--fsdp"] if fsdp else [])
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "FASTPREF_BACKEND": "torch"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAKS ")]
    if result.returncode or not lines:
        raise RuntimeError(f"measured run failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("PEAKS ") :])


def measured_rows(model: Path, strategies) -> list:
    from fastpref.train import memory_plan as mp
    from fastpref.train.models import ModelSource

    source = ModelSource(str(model))
    family = source.family
    counts = mp.pipeline_counts(source, family, 0, cached=True)
    activations = mp.run_activations(source, family, 0, PAIRS, RESOLUTION, "no", False)
    flags = mp.Flags(0, "no", len(DECAYS), device_type="cpu")
    rows = []
    for processes, fsdp in strategies:
        expected = mp.plan(counts, flags, processes, fsdp, activations)
        peaks = measure(model, processes, fsdp)
        rows.append(
            {
                "strategy": expected.strategy,
                "processes": processes,
                "plan_parts": expected.parts,
                "plan_static": expected.static,
                "plan_activations": [activations.low, activations.high],
                "plan_peak": [expected.total_low, expected.total_high],
                "measured_peaks": peaks,
                "within": all(expected.total_low <= p <= expected.total_high for p in peaks),
            }
        )
        mib = 2**20
        print(
            f"{expected.strategy} x{processes}: plan static {expected.static / mib:.2f} MiB, peak "
            f"{expected.total_low / mib:.2f}-{expected.total_high / mib:.2f} MiB; measured per process "
            + ", ".join(f"{p / mib:.2f}" for p in peaks)
            + " MiB",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="the plan of the published models (README table)")
    parser.add_argument("--measure", action="store_true", help="the tiny model's measured peaks vs the plan")
    parser.add_argument("--fsdp", action="store_true", help="--measure: also 2 processes with --fsdp")
    parser.add_argument("--no_trace", action="store_true", help="--table: the static parts only, no activations")
    parser.add_argument("--markdown", metavar="JSON", help="print the markdown table of a result file, only")
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.fsdp)
        return 0
    if args.markdown:
        results = json.loads(Path(args.markdown).read_text())
        renderers = (("table", big_markdown), ("static_table", big_markdown))
        for key, render in (*renderers, ("measured", lambda m: measured_markdown(m["rows"]))):
            if key in results:
                print(render(results[key]) + "\n")
        return 0
    from fastpref.machine import device_name

    report = {
        "benchmark": "memory-plan",
        "command": "python benchmarks/bench_memory_plan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": device_name("cpu"),
        "python": platform.python_version(),
    }
    slug = "".join(c if c.isalnum() else "-" for c in report["machine"].lower()).strip("-")
    file = RESULTS / f"memory-plan-{slug}.json"

    def write(extra: dict) -> None:  # merged with the file's other mode, written as results come
        RESULTS.mkdir(parents=True, exist_ok=True)
        old = json.loads(file.read_text()) if file.exists() else {}
        file.write_text(json.dumps({**old, **report, **extra}, indent=1) + "\n")

    if args.table or not args.measure:
        key = "static_table" if args.no_trace else "table"
        rows = big_table(on_row=lambda rows: write({key: rows}), trace=not args.no_trace)
        print(big_markdown(rows))
    if args.measure:
        from fastpref.testing.tiny_model import make_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            model = make_tiny_model(Path(tmp) / "sd15", arch="sd15")
            strategies = [(1, False), (2, False)] + ([(2, True)] if args.fsdp else [])
            measured = {
                "run": f"tiny sd15, full fine-tune, adaptive K={len(DECAYS)}, {STEPS} steps of {PAIRS} pairs at "
                f"{RESOLUTION} px, float32; peak = the CPU allocator's running peak under the profiler",
                "rows": measured_rows(model, strategies),
            }
            write({"measured": measured})
    print(f"wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
