"""Ahead-of-time compile of every Triton kernel specialization fastpref can launch, for GPUs
that need not be here: ``python benchmarks/triton_compile.py [--full] [--arch 80,90]``.

The specializations come from ``fastpref.loss.triton.ops.launchable_specializations`` (the
functions the launchers call), compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` down to a cubin by Triton's own ptxas, with no GPU and no
CUDA driver. Prints one row per specialization and arch with its registers per thread and spill
bytes (ptxas's ``-v`` report), and writes them as JSON with ``--output``. Exit status: 0 when all
compiled, 1 when any failed (each failure printed), 3 when this machine cannot compile for
CUDA (the reason printed; ``tests/loss/test_triton_compile.py`` skips then).

Default: the covering subset (every dtype, block size, group size, K, B and option code at
least once, and each kernel's heaviest variant); ``--full``: every variant (~3,600 per arch;
about an hour on two cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SKIP_STATUS = 3
ARCHS = (80, 90)  # Ampere (A100), Hopper (H100/H200)
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def toolchain_missing():
    """Why Triton cannot compile CUDA kernels here (no triton, the interpreter forced, no ptxas),
    or ``None``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 makes @triton.jit build interpreted kernels; unset it"
    try:
        from triton import knobs
    except ImportError as exc:
        return f"triton (3.x, with triton.knobs) is not importable: {exc}"
    try:
        ptxas = knobs.nvidia.ptxas
    except Exception as exc:  # the knob raises when the binary is neither bundled nor on the PATH
        return f"ptxas is unavailable: {type(exc).__name__}: {exc}"
    if ptxas is None or not os.path.exists(ptxas.path):
        return "ptxas is unavailable (neither bundled with triton nor set by TRITON_PTXAS_PATH)"
    return None


def _signature(fn, spec) -> dict:
    """Triton's signature of ``fn`` for ``spec``: pointers typed by their dtype, constexprs
    marked, every other argument a 32-bit integer."""
    pointers = dict(spec.pointers)
    constexprs = dict(spec.constexprs)
    unknown = (set(pointers) | set(constexprs)) - set(fn.arg_names)
    declared = {p.name for p in fn.params if p.is_constexpr}
    if unknown or declared != set(constexprs):
        raise ValueError(
            f"{spec.kernel}: the specialization names {sorted(unknown)} that the kernel lacks, or its "
            f"constexprs {sorted(constexprs)} differ from the kernel's {sorted(declared)}"
        )
    dtype_names = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in pointers:
            signature[param.name] = "*" + dtype_names[str(pointers[param.name]).replace("torch.", "")]
        else:
            signature[param.name] = "i32"
    return signature


def compile_one(spec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>``: ``{"ok", "seconds", "n_regs", "spill_bytes", "error"}``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpref.loss.triton import kernels

    fn = getattr(kernels, spec.kernel)
    row = {"kernel": spec.kernel, "label": spec.label, "arch": arch, "ok": False}
    begin = time.perf_counter()
    log = io.StringIO()
    try:
        constexprs = {name: value for name, value in spec.launch_keywords.items() if name in fn.arg_names}
        options = {name: value for name, value in spec.launch_keywords.items() if name not in fn.arg_names}
        source = ASTSource(fn, _signature(fn, spec), constexprs)
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        row["ok"] = True
    except Exception as exc:  # a compile error: reported per specialization
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    row["seconds"] = time.perf_counter() - begin
    registers, spills = PTXAS_REGISTERS.search(log.getvalue()), PTXAS_SPILLS.search(log.getvalue())
    if registers and spills:
        row["n_regs"] = int(registers.group(1))
        row["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
    return row


def _compile_chunk(args):
    specs, arch = args
    return [compile_one(spec, arch) for spec in specs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/triton_compile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every specialization, not the covering subset")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--output", default=None, help="JSON path for the rows")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch: a comma list of integers such as 80,90; got {args.arch!r}")
    if not archs or args.jobs < 1:
        parser.error("--arch needs at least one capability and --jobs >= 1")

    # Fusion on, as Triton 3.x launches compile today (set explicitly: Triton 3.9 warns when unset).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    reason = toolchain_missing()
    if reason is not None:
        print(f"SKIPPED: {reason}")
        return SKIP_STATUS
    import triton

    from fastpref.loss.triton.ops import launchable_specializations

    specs = launchable_specializations(covering=not args.full)
    print(
        f"# Triton {triton.__version__}: {len(specs)} specializations "
        f"({'full set' if args.full else 'covering subset'}) x sm_{', sm_'.join(map(str, archs))}\n"
    )
    began = time.perf_counter()
    # Interleaved chunks, so that each process gets a share of every kernel.
    work = [(specs[i :: args.jobs], arch) for arch in archs for i in range(args.jobs)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = [row for chunk in pool.map(_compile_chunk, work) for row in chunk]
    print("| arch | kernel specialization | regs | spill bytes | s | status |\n|---|---|---|---|---|---|")
    for row in rows:
        status = "ok" if row["ok"] else "FAILED"
        print(
            f"| sm_{row['arch']} | {row['label']} | {row.get('n_regs', '-')} | {row.get('spill_bytes', '-')} "
            f"| {row['seconds']:.2f} | {status} |"
        )
    failed = [row for row in rows if not row["ok"]]
    for row in failed:
        print(f"\nFAILED sm_{row['arch']} {row['label']}:\n{row['error']}")
    spilled = [row for row in rows if row.get("spill_bytes")]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} compiled in {time.perf_counter() - began:.1f} s; "
        f"{len(spilled)} spill registers; max {max((r.get('n_regs', 0) for r in rows), default=0)} registers"
    )
    if args.output:
        Path(args.output).write_text(json.dumps({"triton": triton.__version__, "full": args.full, "rows": rows}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
