"""Two-process (DDP) runs of the flow-matching families, too slow for CI on 2 CPU cores:
``python benchmarks/ddp_flow_check.py [--families sd3,flux] [--modes 4,0] [--objectives dpo,adaptive]``.

For each family (the tiny ``make-tiny-model`` pipelines), objective (``--loss_type``: dpo is
Diffusion-DPO, diffusers' sigmoid; adaptive is Adaptive-DPO) and mode (LoRA rank, 0 = full
fine-tune), ``accelerate launch --num_processes 2 --cpu -m fastpref.train`` trains
from the latent cache for 3 steps with a checkpoint every step and validation images to
TensorBoard at the end; the same command is SIGKILLed by fastpref's test hook
(``FASTPREF_FAULT=save:written:2``, in the middle of saving step 2) and resumed with
``--resume_from_checkpoint latest``. It checks that the killed-and-resumed run ends with the
same log and bitwise the same weights, that the LoRA loads with the family's diffusers pipeline
(``load_lora_weights``) or the full fine-tune with ``from_pretrained``, and that the validation
images reached TensorBoard; it prints a table and writes
``benchmarks/results/ddp-flow-<machine>.json``. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import result_path, slug, write_json

from fastpref.machine import device_name

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
LAUNCH += ["--cpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastpref.train"]


def launch(args, env=None, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*LAUNCH, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def weights(out: Path, rank: int) -> dict:
    from safetensors.torch import load_file

    if rank > 0:
        return load_file(out / "pytorch_lora_weights.safetensors")
    return {k: v for f in sorted((out / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}


def loads(family: str, model: Path, out: Path, rank: int) -> bool:
    """The LoRA loads with the family's pipeline's ``load_lora_weights``, the full fine-tune's
    transformer with ``from_pretrained`` into the pipeline."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipeline, transformer = {
        "sd3": (StableDiffusion3Pipeline, SD3Transformer2DModel),
        "flux": (FluxPipeline, FluxTransformer2DModel),
    }[family]
    if rank > 0:
        pipe = pipeline.from_pretrained(model)
        pipe.load_lora_weights(str(out))
        return bool(pipe.get_list_adapters().get("transformer"))
    return pipeline.from_pretrained(model, transformer=transformer.from_pretrained(out / "transformer")) is not None


def tensorboard_images(logs: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        if "validation" in accumulator.Tags()["images"]:
            steps += [e.step for e in accumulator.Images("validation")]
    return sorted(steps)


def check(family: str, objective: str, rank: int, root: Path, data: Path) -> dict:
    model = root / family
    flags = ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--resolution", 32]
    flags += ["--train_batch_size", 1, "--no_progress", "--max_sequence_length", 8, "--loss_type", objective]
    flags += ["--metric_warmup_steps", 1, "--lora_rank", rank, "--checkpointing_steps", 1, "--max_train_steps", 3]
    flags += ["--cache_latents", "--latent_cache_dir", root / "cache", "--learning_rate", 1e-3]
    run = f"{family}-{objective}-{rank}"
    straight, killed = root / f"{run}-straight", root / f"{run}-killed"
    begin = time.perf_counter()
    first = launch([*flags, "--output_dir", straight, "--run_validation", "--validation_steps", 3,
                    "--validation_prompts", "a red circle", "--validation_inference_steps", 1])  # fmt: skip
    wall = time.perf_counter() - begin
    kill = launch([*flags, "--output_dir", killed, "--report_to", "none"], env={"FASTPREF_FAULT": "save:written:2"})
    resumed = launch([*flags, "--output_dir", killed, "--report_to", "none", "--resume_from_checkpoint", "latest"])
    row = {"family": family, "objective": objective, "mode": f"lora-r{rank}" if rank else "full"}
    row.update(straight_rc=first.returncode, killed_rc=kill.returncode, resumed_rc=resumed.returncode)
    row["straight_wall_s"] = round(wall, 1)
    if first.returncode or not kill.returncode or resumed.returncode:
        row["error"] = (first.stderr or resumed.stderr)[-2000:]
        return row
    logs = [[json.loads(line) for line in (o / "train_log.jsonl").read_text().splitlines()] for o in (straight, killed)]
    a, b = weights(straight, rank), weights(killed, rank)
    row["steps"] = [line["step"] for line in logs[1]]
    row["logs_equal"] = logs[0] == logs[1]
    row["weights_bitwise"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    row["resumed_from"] = "resumed from" in resumed.stderr
    row["loads_in_diffusers"] = loads(family, model, straight, rank)
    row["tensorboard_validation_steps"] = tensorboard_images(straight / "logs")
    row["ok"] = (
        all([row["logs_equal"], row["weights_bitwise"], row["resumed_from"], row["loads_in_diffusers"]])
        and row["tensorboard_validation_steps"] == [3]
        and row["steps"] == [1, 2, 3]
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="sd3,flux")
    parser.add_argument("--modes", default="4,0", help="LoRA ranks; 0 = full fine-tune")
    parser.add_argument("--objectives", default="dpo,adaptive", help="--loss_type values (dpo = diffusers' sigmoid)")
    args = parser.parse_args(argv)
    from fastpref.train.config import DIFFUSERS_LOSS_TYPES, OBJECTIVES

    for objective in args.objectives.split(","):
        if DIFFUSERS_LOSS_TYPES.get(objective, objective) not in OBJECTIVES:
            parser.error(f"--objectives: {objective!r} is not a --loss_type ({', '.join(OBJECTIVES)})")
    from fastpref.testing.tiny_model import make_tiny_model
    from fastpref.testing.toy_data import make_toy_data

    rows = []
    with tempfile.TemporaryDirectory(prefix="fastpref-ddp-flow-") as tmp:
        root = Path(tmp)
        data = make_toy_data(root / "data", pairs=8, resolution=32).parent
        for family in args.families.split(","):
            make_tiny_model(root / family, arch=family)
            for objective in args.objectives.split(","):
                for rank in (int(r) for r in args.modes.split(",")):
                    rows.append(check(family, objective, rank, root, data))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "error"}), flush=True)
    machine = device_name(torch.device("cpu"))
    load = os.getloadavg()
    out = result_path(f"ddp-flow-{slug(machine)}", False)
    write_json(out, {"check": "ddp-flow", "device": machine, "load_average": list(load), "rows": rows})
    for row in rows:
        print(f"{row['family']:5} {row['objective']:9} {row['mode']:8} {'ok' if row.get('ok') else 'FAILED'}")
    print(f"wrote {out}; load average {load[0]:.2f}")
    return 0 if all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
