"""The LoRA trainer's no-grad forwards with peft's adapter switches against fastpref's:
``python benchmarks/bench_adapter_switch.py [--models tiny,tiny-sd3,tiny-flux] [--rounds 30]``.

A LoRA step's reference forward runs with the adapters disabled and each footprint forward with
footprint k's adapter active. peft's public switches (``enable_adapters``, ``set_adapter``) also set
the requires_grad flag of every adapter tensor, walking each layer's parameters; fastpref's
(``fastpref.train.footprints.adapters_disabled`` / ``adapter_active``, what the trainer runs) flip
only the state peft's forward reads. For each tiny model (``benchmarks/step_models.py``, LoRA
rank 8, 4 pairs, fp32) this times, in interleaved rounds, the trainer's reference forward and its
K = 2 footprint forwards both ways (thread CPU time and wall time), checks that the outputs are
bitwise equal, and times each switch alone (enter and leave, one footprint's; CPU microseconds);
it prints a table and writes ``benchmarks/results/adapter-switch-<machine>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import markdown, result_path, slug, write_json
from step_mode import train_config
from step_models import MODELS, build_components, make_batches

from fastpref.machine import device_name
from fastpref.train import PreferenceTrainer
from fastpref.train.footprints import POLICY_ADAPTER, adapter_active, adapters_disabled


@contextlib.contextmanager
def peft_disabled(layers):
    """The trainer's reference switch before fastpref's: peft's ``enable_adapters``."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def peft_active(layers, name: str):
    """The footprints' switch before fastpref's: peft's ``set_adapter``."""
    for layer in layers:
        layer.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_adapter(POLICY_ADAPTER)


def forwards(trainer: PreferenceTrainer, cached: dict) -> dict:
    """The four timed calls: reference and footprint forwards, peft's switches and fastpref's."""
    inputs = trainer.family.denoiser_inputs(cached, trainer.accelerator.device, trainer.weight_dtype)
    latents = cached["latents"].float()
    noise, timesteps = trainer._noise(latents)
    noisy = trainer.family.add_noise(trainer.noise_scheduler, latents, noise, timesteps)
    unet, footprints = trainer.base_unet, trainer.footprints

    @torch.no_grad()
    def reference_peft():
        with peft_disabled(trainer._lora_layers):
            return [trainer.family.denoise(unet, noisy, timesteps, inputs)]

    @torch.no_grad()
    def footprints_peft():
        preds = []
        for name in footprints.names:
            with peft_active(footprints.layers, name):
                preds.append(trainer.family.denoise(unet, noisy, timesteps, inputs))
        return preds

    return {
        ("reference", "peft"): reference_peft,
        ("reference", "fastpref"): lambda: [trainer._reference_pred(noisy, timesteps, inputs)],
        ("footprints", "peft"): footprints_peft,
        ("footprints", "fastpref"): lambda: trainer._footprint_preds(noisy, timesteps, inputs),
    }


def switch_us(trainer: PreferenceTrainer, repeats: int = 200) -> dict:
    """Median CPU microseconds of entering and leaving each switch alone (no forward), over 5
    batches of ``repeats``."""
    layers, name = trainer._lora_layers, trainer.footprints.names[0]
    switches = {
        ("reference", "peft"): lambda: peft_disabled(layers),
        ("reference", "fastpref"): lambda: adapters_disabled(layers),
        ("footprints", "peft"): lambda: peft_active(layers, name),
        ("footprints", "fastpref"): lambda: adapter_active(layers, name),
    }
    out = {}
    for key, switch in switches.items():
        batches = []
        for _ in range(5):
            begin = time.thread_time()
            for _ in range(repeats):
                with switch():
                    pass
            batches.append((time.thread_time() - begin) / repeats * 1e6)
        out[key] = statistics.median(batches)
    return out


def measure(model: str, rank: int, rounds: int, workdir: Path) -> list:
    """Median ms per call of each of :func:`forwards` over ``rounds`` interleaved rounds: this
    thread's CPU time (what other jobs on a shared machine inflate least, with one thread) and
    the wall time."""
    from accelerate import Accelerator

    components = build_components(model, torch.device("cpu"), torch.float32, workdir / model, seed=0)
    _, cached = make_batches(components, MODELS[model]["batch"], MODELS[model]["resolution"], seed=0)
    config = train_config("fastpref", rank, "no", seed=0, family=components.family)
    trainer = PreferenceTrainer(components.new_unet(), components.noise_scheduler, config, Accelerator(cpu=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # policy and footprints apart (LoRA B starts at zero), so that equality means something
        for tensors in (trainer.footprints._policy_tensors(), *trainer.footprints._ema):
            for t in tensors:
                t.add_(0.05 * torch.randn(t.shape, generator=generator))
    calls = forwards(trainer, cached)
    outputs = {key: call() for key, call in calls.items()}  # also the warm-up
    for what in ("reference", "footprints"):
        peft, ours = outputs[(what, "peft")], outputs[(what, "fastpref")]
        if not all(torch.equal(a, b) for a, b in zip(peft, ours)):
            raise AssertionError(f"{model}: the {what} forwards differ between the two switches")
    outputs = outputs[("reference", "peft")] + outputs[("footprints", "peft")]
    if any(torch.equal(outputs[0], other) for other in outputs[1:]):
        raise AssertionError(f"{model}: the reference and footprint outputs should differ")
    times = {key: {"cpu": [], "wall": []} for key in calls}
    for index in range(rounds):
        keys = list(calls)
        keys = keys[index % len(keys) :] + keys[: index % len(keys)]  # rotated: noise hits every call alike
        for key in keys:
            cpu, wall = time.thread_time(), time.perf_counter()
            calls[key]()
            times[key]["cpu"].append((time.thread_time() - cpu) * 1e3)
            times[key]["wall"].append((time.perf_counter() - wall) * 1e3)
    switches = switch_us(trainer)
    rows = []
    for what, count in (("reference", 1), ("footprints", len(trainer.footprints))):
        row = dict(model=model, forwards=f"{what} ({count})", lora_layers=len(trainer._lora_layers))
        row.update({f"{how}_switch_us": switches[(what, how)] for how in ("peft", "fastpref")})
        for clock in ("cpu", "wall"):
            peft, ours = (statistics.median(times[(what, how)][clock]) for how in ("peft", "fastpref"))
            row.update(
                {f"peft_{clock}_ms": peft, f"fastpref_{clock}_ms": ours, f"{clock}_saving": (peft - ours) / peft}
            )
        row.update(bitwise_equal=True, timings_ms={how: times[(what, how)] for how in ("peft", "fastpref")})
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,tiny-sd3,tiny-flux", help="comma list of tiny, tiny-sd3, tiny-flux")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if any(m not in ("tiny", "tiny-sd3", "tiny-flux") for m in models):
        parser.error(f"--models: a comma list of tiny, tiny-sd3, tiny-flux, got {args.models!r}")
    if args.lora_rank < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--lora_rank, --rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastpref-adapter-switch-") as tmp:
        for model in models:
            rows += measure(model, args.lora_rank, args.rounds, Path(tmp))
    machine = device_name(torch.device("cpu"))
    load = {"start": list(load_start), "end": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    columns = ["model", "forwards", *(f"{how}_{clock}_ms" for clock in ("cpu", "wall") for how in ("peft", "fastpref"))]
    columns += ["cpu_saving", "wall_saving", "lora_layers", "peft_switch_us", "fastpref_switch_us"]
    formats = {c: "{:.0f}" for c in columns if c.endswith("_us")} | {c: "{:.2f}" for c in columns if c.endswith("_ms")}
    formats |= {c: "{:.1%}" for c in columns if c.endswith("saving")}
    print(f"\nmedian ms of {args.rounds} interleaved rounds, LoRA rank {args.lora_rank}, {machine},")
    print(f"{args.threads} thread(s), load average {load_start[0]:.2f} at start, {load['end'][0]:.2f} at end\n")
    print(markdown(rows, columns, formats))
    out = result_path(f"adapter-switch-{slug(machine)}", False)
    config = {"lora_rank": args.lora_rank, "rounds": args.rounds, "threads": args.threads}
    command = " ".join(["python", "benchmarks/bench_adapter_switch.py", *(argv if argv is not None else sys.argv[1:])])
    write_json(out, {"benchmark": "adapter-switch", "device": machine, "command": command, "config": config,
                     "load_average": load, "rows": rows})  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
