"""``--fsdp`` end to end, beyond the test suite's budget: ``python benchmarks/check_fsdp.py
[--families sd15,sdxl,sd3,flux] [--multinode]``.

On the tiny models of ``fastpref.testing`` (``--families``: SD 1.5, SDXL, SD3, FLUX; full
fine-tune, 64 px, toy data), for DPO and Adaptive-DPO (K = 2, ``--global_metric``): ``fastpref
train`` on one process (4 pairs a step) and with ``--fsdp`` on two CPU processes (``accelerate
launch``, gloo; 2 pairs each), 4 steps, and the two loss curves compared within rel 2e-2 per
step: float rounding grows along a run (AdamW moves each weight by about the learning rate
whatever its gradient's size, so a gradient near 0 whose sign the summation order flips moves its
weight the other way; on the same data DDP on 2 processes departs from 1 process as much). For
Adaptive-DPO, a third 2-process run is SIGKILLed (its whole process group) right after
``checkpoint-2`` is in place and resumed with ``--resume_from_checkpoint latest``: its final
denoiser weights and ``train_log.jsonl`` must equal the uninterrupted run's bit for bit. The
consolidated denoiser folder (``unet/``, ``transformer/``) must load with ``from_pretrained``.

``--multinode``: two "machines" on this host (``accelerate launch --num_machines 2 --machine_rank
0|1 --main_process_ip 127.0.0.1``, one process each, started side by side, sharing the disk) train
the tiny SD 1.5 model (Adaptive-DPO, 2 steps) under DDP and under ``--fsdp``; each must end with
the same log and bitwise the same weights as one machine's 2 processes, and its checkpoint must
hold each process's own files once (``random_states_0|1``, under ``--fsdp`` the shards
``__0_0|__1_0.distcp``).

Prints one line per check and writes ``benchmarks/results/check-fsdp-<machine>.json`` (with the
load average at the start and the end: other jobs share the machine).
"""

from __future__ import annotations

import argparse
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
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCH = ACCELERATE + ["--num_machines", "1", "-m", "fastpref.train"]
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "FASTPREF_BACKEND": "torch"}
TOLERANCE = 2e-2  # relative, per step (see the docstring)
LOSSES = {"dpo": ["--loss_type", "dpo"], "adaptive": ["--loss_type", "adaptive", "--global_metric"]}


def args_of(world: Path, model: str, out: Path, loss: str, batch: int, steps: int = 4) -> list:
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
        str(steps),
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
    if json.loads((out / "train_summary.json").read_text())["state"] != "running":  # written from the start
        raise RuntimeError("the run finished before it could be killed")
    train(command + ["--resume_from_checkpoint", "latest"])


def weights_of(out: Path) -> dict:
    """The final denoiser weights of a run (its ``unet/`` or ``transformer/`` folder), by name."""
    from safetensors.torch import load_file

    (folder,) = [out / name for name in ("unet", "transformer") if (out / name).is_dir()]
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    import torch

    x, y = weights_of(a), weights_of(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def check_family(world: Path, model: str) -> list:
    """The 1-process vs 2-process ``--fsdp`` rows of one family (see the module docstring)."""
    import diffusers

    rows = []
    for loss in LOSSES:
        one, two = world / f"{model}-{loss}-1", world / f"{model}-{loss}-2"
        train([sys.executable, "-m", "fastpref.cli", "train", *args_of(world, model, one, loss, 4)])
        train(LAUNCH + args_of(world, model, two, loss, 2) + ["--fsdp"])
        a, b = curve(one), curve(two)
        close = len(a) == len(b) and all(abs(x - y) <= TOLERANCE * abs(x) + 1e-5 for x, y in zip(a, b))
        row = {"model": model, "loss": loss, "one_process": a, "fsdp_two": b, "curves_match": close}
        folder = next(two / name for name in ("unet", "transformer") if (two / name).is_dir())
        config = json.loads((folder / "config.json").read_text())
        getattr(diffusers, config["_class_name"]).from_pretrained(folder)  # the consolidated folder loads
        if loss == "adaptive":
            killed = world / f"{model}-{loss}-killed"
            killed_and_resumed(LAUNCH + args_of(world, model, killed, loss, 2) + ["--fsdp"], killed)
            row["resume_bitwise"] = same_weights(two, killed) and curve(two) == curve(killed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(args: list) -> None:
    """``fastpref train args`` as machines 0 and 1 of 2 on this host, one process each, side by side."""
    launch = ACCELERATE + ["--num_machines", "2", "--main_process_ip", "127.0.0.1"]
    launch += ["--main_process_port", str(free_port())]
    machines = [
        subprocess.Popen(
            [*launch, "--machine_rank", str(rank), "-m", "fastpref.train", *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [m.communicate()[0] for m in machines]
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        if machine.returncode:
            raise RuntimeError(f"machine {rank} failed ({machine.returncode}):\n{output[-3000:]}")


def check_multinode(world: Path) -> list:
    """The two-machine rows: DDP and ``--fsdp`` against one machine's 2 processes (see the docstring)."""
    rows = []
    for mode, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        one, two = world / f"multinode-{mode}-1", world / f"multinode-{mode}-2"
        args = args_of(world, "sd15", one, "adaptive", 2, steps=2) + extra
        train(LAUNCH + args)
        two_machines(args_of(world, "sd15", two, "adaptive", 2, steps=2) + extra)
        expected = {"random_states_0.pkl", "random_states_1.pkl"}
        if mode == "fsdp":
            expected |= {"sharded_state/__0_0.distcp", "sharded_state/__1_0.distcp"}
        checkpoint = two / "checkpoint-2"
        files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
        row = {
            "multinode": mode,
            "one_machine": curve(one),
            "two_machines": curve(two),
            "log_equal": curve(one) == curve(two),
            "weights_bitwise": same_weights(one, two),
            "processes": json.loads((two / "train_summary.json").read_text())["processes"],
            "per_process_files": expected <= files,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def passed(row: dict) -> bool:
    if "multinode" in row:
        return row["log_equal"] and row["weights_bitwise"] and row["processes"] == 2 and row["per_process_files"]
    return row["curves_match"] and row.get("resume_bitwise", True)


def main(argv=None) -> int:
    from fastpref.machine import device_name
    from fastpref.testing.tiny_model import make_tiny_model
    from fastpref.testing.toy_data import make_toy_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--multinode", action="store_true", help="also the two-machine runs (DDP and --fsdp)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        for model in sorted(set(families) | ({"sd15"} if args.multinode else set())):
            make_tiny_model(world / model, arch=model)
        make_toy_data(world / "data", pairs=24)
        for model in families:
            rows += check_family(world, model)
        if args.multinode:
            rows += check_multinode(world)
    ok = all(passed(row) for row in rows)
    machine = device_name("cpu")
    command = " ".join(["python benchmarks/check_fsdp.py", *(argv if argv is not None else sys.argv[1:])])
    load = {"start": list(load_start), "end": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    report = {"benchmark": "check-fsdp", "command": command, "machine": machine, "load_average": load, "rows": rows}
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")
    file = ROOT / "benchmarks" / "results" / f"check-fsdp-{slug}.json"
    file.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'all checks passed' if ok else 'CHECKS FAILED'}; wrote {file}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
