"""Data at scale: ``python benchmarks/bench_data_scale.py [--pairs 2000,20000] [--label after]``.

Builds (once, in ``--data_root``, outside the repository) a folder in the Hugging Face Hub's layout
(``data/train-*.parquet`` beside a small ``data/validation-*.parquet``) of N distinct 512 px JPEG
pairs (seeded noise on gradients: 50-110 KB per JPEG, about 2.2 GB at 20k pairs), then runs a
2-step ``fastpref train`` (the tiny SD 1.5 model of ``fastpref.testing``, 64 px, uncached, 2
dataloader workers) on it as a subprocess, twice per size: ``cold`` with an empty Hugging Face
datasets cache (it includes the one-time conversion of the parquet files to Arrow) and ``warm``
(the cache filled by the cold run). Reports the wall time and the peak RSS of the process tree
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a fresh runner: the largest single process,
the trainer or one of its workers) and writes them to ``benchmarks/results/data-scale-<label>-<machine>.json``.

``--streaming`` measures ``fastpref train --streaming`` instead (label ``streaming``): the same
2-step run, in the main process (no workers), once over the Hub-layout folder (``datasets``'
parquet builder) and once over the same pairs as webdataset tar shards (one per parquet file,
written once beside it); nothing is cached, so there is no cold / warm.

``--code DIR`` runs another checkout (``PYTHONPATH=DIR``, ``FASTPREF_BACKEND=torch``): how the
"before" figures were taken, with ``git worktree add /tmp/before c0f490c``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIDE = 512
PAIRS_PER_FILE = 1000
ROW_GROUP = 100  # as the Hub's parquet conversion writes image datasets
VALIDATION_PAIRS = 200


HALF = SIDE // 2
_Y, _X = (np.mgrid[0:HALF, 0:HALF].astype(np.float32) / HALF)[:, None]  # [1, HALF, HALF] each


def jpeg(rng: np.random.Generator, index: int) -> bytes:
    """A distinct 512 px JPEG of 45-75 KB: a seeded colour gradient under seeded noise, drawn at
    256 px and scaled up (2x2 blocks keep the JPEG at that size, and the drawing fast)."""
    from PIL import Image

    colour = rng.uniform(0, 255, size=(3, 3, 1, 1)).astype(np.float32)
    base = colour[0] * _X + colour[1] * _Y + colour[2] * (1 - _X) * _Y
    noise = rng.integers(-12, 13, size=(3, HALF, HALF), dtype=np.int16)
    pixels = np.clip(base + noise + (index % 7), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    image = Image.fromarray(np.ascontiguousarray(pixels)).resize((SIDE, SIDE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_split(folder: Path, split: str, pairs: int, seed: int) -> int:
    """``pairs`` rows in ``folder/data/<split>-0000k-of-0000n.parquet``; returns the bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = max(1, -(-pairs // PAIRS_PER_FILE))
    total = 0
    for k in range(files):
        rng = np.random.default_rng([seed, k])
        start, stop = k * PAIRS_PER_FILE, min(pairs, (k + 1) * PAIRS_PER_FILE)
        rows = range(start, stop)
        table = pa.table(
            {
                "caption": pa.array([f"pair {i} of a {split} set" for i in rows], pa.string()),
                "jpg_0": pa.array([jpeg(rng, 2 * i) for i in rows], pa.binary()),
                "jpg_1": pa.array([jpeg(rng, 2 * i + 1) for i in rows], pa.binary()),
                "label_0": pa.array([float(i % 2) for i in rows], pa.float64()),
            }
        )
        file = folder / "data" / f"{split}-{k:05d}-of-{files:05d}.parquet"
        file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, file, row_group_size=ROW_GROUP)
        total += file.stat().st_size
        print(f"  {file.name}: {stop - start} pairs, {file.stat().st_size / 1e6:.0f} MB", flush=True)
    return total


def hub_folder(data_root: Path, pairs: int) -> Path:
    """The Hub-layout folder of ``pairs`` train pairs, written once and reused."""
    folder = data_root / f"hub-{pairs}"
    done = folder / "DONE"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"writing {pairs} pairs to {folder} (once)", flush=True)
    size = write_split(folder, "train", pairs, seed=pairs)
    write_split(folder, "validation", VALIDATION_PAIRS, seed=-1 % 2**32)
    done.write_text(json.dumps({"pairs": pairs, "train_bytes": size}))
    return folder


def webdataset_folder(data_root: Path, pairs: int) -> Path:
    """The pairs of :func:`hub_folder` as webdataset tar shards (``<key>.jpg_0.jpg``,
    ``<key>.jpg_1.jpg``, ``<key>.caption.txt``, ``<key>.label_0.txt``), written once."""
    import tarfile

    import pyarrow.parquet as pq

    folder = data_root / f"wds-{pairs}"
    done = folder / "DONE"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total = 0
    for file in sorted((hub_folder(data_root, pairs) / "data").glob("train-*.parquet")):
        shard = folder / (file.stem.replace("train-", "") + ".tar")
        rows = pq.read_table(file).to_pylist()
        with tarfile.open(shard, "w") as tar:
            for row in rows:
                key = row["caption"].split()[1].zfill(8)  # "pair <i> of ...": the row's index
                members = {"jpg_0.jpg": row["jpg_0"], "jpg_1.jpg": row["jpg_1"]}
                members.update({"caption.txt": row["caption"].encode(), "label_0.txt": str(row["label_0"]).encode()})
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        total += shard.stat().st_size
        print(f"  {shard.name}: {len(rows)} pairs, {shard.stat().st_size / 1e6:.0f} MB", flush=True)
    done.write_text(json.dumps({"pairs": pairs, "train_bytes": total}))
    return folder


def tiny_model(data_root: Path, code: Path) -> Path:
    path = data_root / "tiny-sd15"
    if not (path / "model_index.json").exists():
        env = {**os.environ, "PYTHONPATH": str(code)}
        subprocess.run(
            [sys.executable, "-m", "fastpref.cli", "make-tiny-model", str(path), "--arch", "sd15"],
            env=env,
            cwd=code,
            check=True,
        )
    return path


RUNNER = """
import resource, subprocess, sys, time, json
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[0] + ".err", "w")).returncode
wall = time.perf_counter() - start
module = subprocess.run([sys.argv[1], "-c", "import fastpref; print(fastpref.__file__)"], capture_output=True,
                        text=True).stdout.strip()
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the train run's: the probe above is smaller
print(json.dumps({"rc": code, "wall_s": wall, "peak_rss_kb": rss, "module": module}))
"""


def run_train(
    model: Path, data: Path, code: Path, hf_cache: Path, out: Path, workers: int, new_flags: bool, extra=()
) -> dict:
    """One 2-step ``fastpref train`` in a fresh runner process (so RUSAGE_CHILDREN is this run's);
    ``extra``: more flags."""
    args = ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out)]
    args += ["--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2", "--lora_rank", "4"]
    args += ["--report_to", "none", "--no_progress", "--dataloader_num_workers", str(workers), *extra]
    if new_flags:
        args += ["--cache_dir", str(hf_cache)]
    env = {**os.environ, "PYTHONPATH": str(code), "FASTPREF_BACKEND": "torch", "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_CACHE"] = str(hf_cache)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Path(tmp) / "runner.py"
        runner.write_text(RUNNER)
        command = [sys.executable, str(runner), sys.executable, "-m", "fastpref.cli", "train", *args]
        # cwd: ``python -m`` puts the working folder before PYTHONPATH
        result = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True, check=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        if measured["rc"] != 0:
            raise RuntimeError(f"train failed:\n{Path(str(runner) + '.err').read_text()[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    summary["data"]["fastpref"] = str(Path(measured["module"]).parent)
    return {
        "wall_s": round(measured["wall_s"], 2),
        "peak_rss_mb": round(measured["peak_rss_kb"] / 1024, 1),
        "data": summary.get("data"),
    }


def measure_streaming(model: Path, data_root: Path, pairs: int, code: Path, hf_cache: Path, label: str) -> list:
    """The ``--streaming`` rows of one size: the Hub-layout parquet folder, then its webdataset
    copy (phases ``stream-parquet``, ``stream-webdataset``)."""
    rows = []
    for phase, folder in (("stream-parquet", hub_folder(data_root, pairs)), ("stream-webdataset", None)):
        folder = folder or webdataset_folder(data_root, pairs)
        info = json.loads((folder / "DONE").read_text())
        out = data_root / f"out-{label}-{pairs}-{phase}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        result = run_train(model, folder, code, hf_cache, out, 0, True, extra=["--streaming"])
        row = {"pairs": pairs, "train_gb": round(info["train_bytes"] / 1e9, 3), "phase": phase, **result}
        row["load_1min"] = round(load, 2)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "data"}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(hf_cache, ignore_errors=True)
    return rows


def table(files) -> str:
    """The README's markdown table of result files (before and after, each size and phase)."""
    lines = [
        "| code | pairs (train parquet) | phase | wall s | peak RSS MB | 1-min load |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for file in files:
        report = json.loads(Path(file).read_text())
        for row in report["rows"]:
            lines.append(
                f"| {report['label']} | {row['pairs']} ({row['train_gb']:.2f} GB) | {row['phase']} "
                f"| {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['load_1min']:.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="2000,20000", help="comma-separated sizes")
    parser.add_argument("--data_root", default=os.path.join(tempfile.gettempdir(), "fastpref-data-scale"))
    parser.add_argument("--code", default=str(ROOT), help="the checkout to run (PYTHONPATH)")
    parser.add_argument("--label", default="after", help="names the result file: before / after")
    parser.add_argument("--workers", type=int, default=2, help="--dataloader_num_workers")
    parser.add_argument("--old_flags", action="store_true", help="the code before --cache_dir meant the HF cache")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of result files, only")
    parser.add_argument("--streaming", action="store_true", help="measure --streaming (parquet and webdataset)")
    args = parser.parse_args(argv)
    if args.streaming and args.label == "after":
        args.label = "streaming"
    if args.table:
        print(table(args.table))
        return 0
    data_root, code = Path(args.data_root), Path(args.code).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    model = tiny_model(data_root, code)
    sys.path.insert(0, str(ROOT))
    from fastpref.machine import device_name

    rows = []
    for pairs in [int(p) for p in args.pairs.split(",")]:
        folder = hub_folder(data_root, pairs)
        info = json.loads((folder / "DONE").read_text())
        hf_cache = data_root / f"hf-cache-{args.label}-{pairs}"
        if args.streaming:
            rows += measure_streaming(model, data_root, pairs, code, hf_cache, args.label)
            continue
        shutil.rmtree(hf_cache, ignore_errors=True)
        for phase in ("cold", "warm"):
            out = data_root / f"out-{args.label}-{pairs}-{phase}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            result = run_train(model, folder, code, hf_cache, out, args.workers, not args.old_flags)
            row = {"pairs": pairs, "train_gb": round(info["train_bytes"] / 1e9, 3), "phase": phase, **result}
            row["load_1min"] = round(load, 2)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "data"}), flush=True)
        shutil.rmtree(hf_cache, ignore_errors=True)
    machine = device_name("cpu")
    report = {
        "benchmark": "data-scale",
        "label": args.label,
        "code": str(code),
        "command": "python benchmarks/bench_data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "python": platform.python_version(),
        "run": "2-step fastpref train, tiny sd15 model, 64 px, batch 2, uncached, "
        + ("--streaming (main process, --shuffle_buffer_size 1000)" if args.streaming else "--dataloader_num_workers ")
        + ("" if args.streaming else f"{args.workers}")
        + "; peak RSS = the largest process of the tree (RUSAGE_CHILDREN)",
        "rows": rows,
    }
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    file = RESULTS / f"data-scale-{args.label}-{slug}.json"
    file.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
