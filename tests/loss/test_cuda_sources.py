"""The CUDA kernels (``csrc/cuda/``) build without a GPU: nvcc compiles every ``.cu`` file for sm_80
and sm_90 in one invocation with setup.py's flags and torch's, ptxas reports no register spills in
the float32-accumulation kernels (the register counts are printed: ``pytest -s``), the host
units of ``csrc/cuda/`` compile against torch's headers, and the kernels' device code gives the
right errors, head and gradient when run on the CPU over emulated CUDA builtins. setup.py builds CUDAExtension exactly
when torch has CUDA and nvcc is found. The compile checks report "skipped" with the reason where
nvcc or the headers are missing.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="fastpref_setup")  # its flags; builds nothing
ARCHS = ("80", "90")


def cuda_sources(suffix: str):
    return sorted(CUDA_DIR.glob(f"*{suffix}"))


@pytest.fixture(scope="module")
def nvcc():
    """nvcc's path, once it has preprocessed a file that includes the CUDA runtime headers."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    path = shutil.which("nvcc") or (home and shutil.which(os.path.join(home, "bin", "nvcc")))
    if not path:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")
    probe = subprocess.run(
        [path, "-x", "cu", "-E", "-o", os.devnull, "-"],
        input="#include <cuda_runtime_api.h>\n#include <cuda_bf16.h>\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip(f"nvcc cannot find the CUDA headers: {probe.stderr.strip()[-300:]}")
    return path


def common_flags() -> list:
    """Flags of every unit, as torch's BuildExtension passes them: the include paths (csrc/ and
    torch's), the C++ ABI of the installed torch."""
    includes = [str(ROOT / "csrc")] + cpp_extension.include_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-I{path}" for path in includes] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C"]


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=900)


# ptxas -v: "Compiling entry function '<name>' for 'sm_90'", then its properties.
ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def kernel_name(mangled: str) -> str:
    """``error_kernel<float>`` from its mangled name (``...12error_kernelIfEE...``)."""
    match = re.search(r"([a-z_]+_kernel)I([a-z])E", mangled)
    scalar = {"f": "float", "d": "double"}
    return f"{match.group(1)}<{scalar.get(match.group(2), match.group(2))}>" if match else mangled


def ptxas_report(log: str) -> list:
    """(kernel, arch, registers, stack bytes, spill store bytes, spill load bytes) per entry."""
    rows, entry, spills = [], None, (0, 0, 0)
    for line in log.splitlines():
        if match := ENTRY.search(line):
            entry, spills = match.groups(), (0, 0, 0)
        elif (match := SPILLS.search(line)) and entry:
            spills = tuple(int(v) for v in match.groups())
        elif (match := REGISTERS.search(line)) and entry:
            rows.append((kernel_name(entry[0]), entry[1], int(match.group(1)), *spills))
            entry = None
    return rows


@pytest.mark.parametrize("source", cuda_sources(".cu"), ids=lambda p: p.name)
def test_cu_file_compiles_for_sm80_and_sm90_without_spills(nvcc, source, tmp_path):
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHS]
    command = (
        [nvcc, "-c", str(source), "-o", str(tmp_path / "unit.o"), "-Xptxas", "-v", "-Xcompiler", "-fPIC"]
        + SETUP["NVCC_FLAGS"]
        + cpp_extension.COMMON_NVCC_FLAGS
        + common_flags()
        + gencode
    )
    out = run(command, ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    report = ptxas_report(out.stdout + out.stderr)
    print(f"\nptxas, {source.name}: kernel, arch, registers, stack / spill store / spill load bytes")
    for row in report:
        print("  {:<28} {:<6} {:>4} regs  {:>4} / {:>4} / {:>4}".format(*row))
    assert {arch for _, arch, *_ in report} == {f"sm_{arch}" for arch in ARCHS}
    # No spills where the inputs are float16, bfloat16 or float32 (float32 accumulation). The
    # float64 kernels may spill a few bytes around the calls of double division's slow path.
    assert [row for row in report if row[0].endswith("<float>") and (row[4] or row[5])] == []


@pytest.mark.parametrize("source", cuda_sources(".cpp"), ids=lambda p: p.name)
def test_cuda_host_unit_compiles_against_torch_headers(nvcc, source, tmp_path):
    stream_header = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "CUDAStream.h"
    if not stream_header.exists():
        pytest.skip(f"this torch has no CUDA headers ({stream_header} is missing)")
    defines = []
    if not (stream_header.parent / "impl" / "cuda_cmake_macros.h").exists():
        # A CPU build of torch ships c10/cuda without the header its CMake generates (export
        # macros for Windows DLLs); c10 provides this switch for builds without it.
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    host_flags = [flag for flag in SETUP["CXX_FLAGS"] if not flag.startswith("-std=")]
    std = [flag for flag in SETUP["CXX_FLAGS"] if flag.startswith("-std=")]
    command = (
        [nvcc, "-c", str(source), "-o", str(tmp_path / "unit.o"), "-Xcompiler", ",".join(host_flags + ["-fPIC"])]
        + std
        + common_flags()
        + defines
    )
    out = run(command, ROOT)
    assert out.returncode == 0, out.stderr[-4000:]


def test_kernels_run_on_emulated_cuda_builtins(nvcc, tmp_path):
    """tests/loss/cuda_emulator.cpp runs csrc/cuda/kernels.cuh on the CPU (threads, barriers for
    __syncthreads and shuffles): errors, head and gradient over dtypes, layouts, K, chunk edges."""
    emulator = tmp_path / "cuda_emulator"
    source = Path(__file__).with_name("cuda_emulator.cpp")
    flags = ["-std=c++20", "-O1", "-Xcompiler", "-pthread", "-cudart", "none", f"-I{ROOT / 'csrc'}"]
    built = run([nvcc, str(source), "-o", str(emulator)] + flags, ROOT)
    assert built.returncode == 0, built.stderr[-4000:]
    out = run([str(emulator)], ROOT)
    print("\n" + out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cuda_sources_exist():
    assert cuda_sources(".cu") and cuda_sources(".cpp")


# setup.py's choice of extension, with torch's CUDA build and nvcc faked.


def extension_of(monkeypatch, torch_cuda, cuda_home, env=()):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("FASTPREF_NO_EXT", raising=False)
    monkeypatch.delenv("FASTPREF_NO_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    for name, value in env:
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    [extension], cmdclass = SETUP["native_extensions"]()
    return extension


def fake_cuda_home(tmp_path):
    for sub in ("include", "lib64"):
        (tmp_path / sub).mkdir()
    return str(tmp_path)


def test_setup_builds_cuda_sources_when_torch_has_cuda_and_nvcc(monkeypatch, tmp_path):
    extension = extension_of(monkeypatch, "13.0", fake_cuda_home(tmp_path))
    assert {Path(s).name for s in extension.sources} >= {p.name for p in cuda_sources(".cu") + cuda_sources(".cpp")}
    nvcc_flags = extension.extra_compile_args["nvcc"]
    assert "--fmad=false" in nvcc_flags
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(nvcc_flags)


def test_setup_arch_list_replaces_the_default_archs(monkeypatch, tmp_path):
    extension = extension_of(monkeypatch, "13.0", fake_cuda_home(tmp_path), [("TORCH_CUDA_ARCH_LIST", "9.0")])
    assert not [flag for flag in extension.extra_compile_args["nvcc"] if "gencode" in flag]


@pytest.mark.parametrize(
    "torch_cuda, has_nvcc, env",
    [("13.0", True, [("FASTPREF_NO_CUDA", "1")]), (None, True, []), ("13.0", False, [])],
    ids=["FASTPREF_NO_CUDA", "cpu-torch", "no-nvcc"],
)
def test_setup_builds_cpu_only_otherwise(monkeypatch, tmp_path, torch_cuda, has_nvcc, env):
    extension = extension_of(monkeypatch, torch_cuda, fake_cuda_home(tmp_path) if has_nvcc else None, env)
    assert not [s for s in extension.sources if "cuda" in Path(s).parts]
    assert isinstance(extension.extra_compile_args, list)  # CppExtension's flags, as on a CPU machine
