"""``--fsdp`` end to end, beyond the test suite's budget: ``python benchmarks/check_fsdp.py``.

On the tiny SD 1.5 and SDXL models of ``fastpref.testing`` (full fine-tune, 64 px, toy data), for
DPO and Adaptive-DPO (K = 2, ``--global_metric``): ``fastpref train`` on one process (4 pairs a
step) and with ``--fsdp`` on two CPU processes (``accelerate launch``, gloo; 2 pairs each), 4 steps,
and the two loss curves compared within rel 2e-2 per step: float rounding grows along a run (AdamW
moves each weight by about the learning rate whatever its gradient's size, so a gradient near 0
whose sign the summation order flips moves its weight the other way; on the same data DDP on 2
processes departs from 1 process as much). For Adaptive-DPO, a third 2-process
run is SIGKILLed (its whole process group) right after ``checkpoint-2`` is in place and resumed
with ``--resume_from_checkpoint latest``: its final ``unet/`` weights and ``train_log.jsonl`` must
equal the uninterrupted run's bit for bit, and ``unet/`` must load with ``from_pretrained``.
Prints one line per check and writes ``benchmarks/results/check-fsdp-<machine>.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastpref.train"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "FASTPREF_BACKEND": "torch"}
TOLERANCE = 2e-2  # relative, per step (see the docstring)
LOSSES = {"dpo": ["--loss_type", "dpo"], "adaptive": ["--loss_type", "adaptive", "--global_metric"]}


def args_of(world: Path, model: str, out: Path, loss: str, batch: int) -> list:
    return [
        "--pretrained_model_name_or_path",
        str(world / model),
        "--dataset_name",
        str(world / "data"),
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        "--report_to",
        "none",
        "--no_progress",
        "--lora_rank",
        "0",
        "--metric_warmup_steps",
        "1",
        "--learning_rate",
        "1e-4",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--train_batch_size",
        str(batch),
        *LOSSES[loss],
    ]


def train(command: list) -> None:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:6])} failed:\n{result.stderr[-3000:]}")


def curve(out: Path) -> list:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def killed_and_resumed(command: list, out: Path) -> None:
    """Run ``command``, SIGKILL its process group once ``checkpoint-2`` exists, then resume it."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 900
    while not (out / "checkpoint-2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if (out / "train_summary.json").exists():
        raise RuntimeError("the run finished before it could be killed")
    train(command + ["--resume_from_checkpoint", "latest"])


def main() -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from fastpref.machine import device_name
    from fastpref.testing.tiny_model import make_tiny_model
    from fastpref.testing.toy_data import make_toy_data

    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        for model in ("sd15", "sdxl"):
            make_tiny_model(world / model, arch=model)
        make_toy_data(world / "data", pairs=24)
        for model in ("sd15", "sdxl"):
            for loss in LOSSES:
                one, two = world / f"{model}-{loss}-1", world / f"{model}-{loss}-2"
                train([sys.executable, "-m", "fastpref.cli", "train", *args_of(world, model, one, loss, 4)])
                train(LAUNCH + args_of(world, model, two, loss, 2) + ["--fsdp"])
                a, b = curve(one), curve(two)
                close = len(a) == len(b) and all(abs(x - y) <= TOLERANCE * abs(x) + 1e-5 for x, y in zip(a, b))
                row = {"model": model, "loss": loss, "one_process": a, "fsdp_two": b, "curves_match": close}
                UNet2DConditionModel.from_pretrained(two / "unet")  # the consolidated folder loads
                if loss == "adaptive":
                    killed = world / f"{model}-{loss}-killed"
                    killed_and_resumed(LAUNCH + args_of(world, model, killed, loss, 2) + ["--fsdp"], killed)
                    x = load_file(two / "unet" / "diffusion_pytorch_model.safetensors")
                    y = load_file(killed / "unet" / "diffusion_pytorch_model.safetensors")
                    same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    row["resume_bitwise"] = same and curve(two) == curve(killed)
                ok &= close and row.get("resume_bitwise", True)
                rows.append(row)
                print(json.dumps(row), flush=True)
    machine = device_name("cpu")
    report = {"benchmark": "check-fsdp", "command": "python benchmarks/check_fsdp.py", "machine": machine, "rows": rows}
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")
    file = ROOT / "benchmarks" / "results" / f"check-fsdp-{slug}.json"
    file.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'all checks passed' if ok else 'CHECKS FAILED'}; wrote {file}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
