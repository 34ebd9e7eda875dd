"""Build script of fastpref's optional native extension ``fastpref._C`` (``csrc/``); all metadata
lives in ``pyproject.toml``. Install with ``pip install --no-build-isolation -e .`` so the build
uses the torch already in the environment rather than downloading another one.

The CUDA kernels (``csrc/cuda/``) are built when the installed torch has CUDA and nvcc is found;
``FASTPREF_NO_CUDA=1`` skips them, ``TORCH_CUDA_ARCH_LIST`` replaces the default architectures.
``tests/loss/test_cuda_sources.py`` compiles the same sources with the flags defined here.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
# --fmad=false: no multiply-add contraction, as csrc/common/pair_head.h requires of every unit
# that includes it (the CPU unit: fp-contract=off).
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"]
# sm_80 (A100) and sm_90 (H100) machine code, and compute_90 PTX that newer GPUs compile at load.
CUDA_ARCHS = ("80", "90")


def cuda_arch_flags():
    """``-gencode`` flags of ``CUDA_ARCHS``; none when ``TORCH_CUDA_ARCH_LIST`` is set, as torch's
    ``BuildExtension`` then derives them from it."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in CUDA_ARCHS]
    return flags + [f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]


def cuda_skip_reason(torch, cpp_extension, cuda_sources):
    """Why the CUDA kernels are not built, or None when they are."""
    if os.environ.get("FASTPREF_NO_CUDA") == "1":
        return "FASTPREF_NO_CUDA=1"
    if not cuda_sources:
        return "no sources in csrc/cuda"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def native_extensions():
    """The extension (layout in ``csrc/README.md``): the device-agnostic units ``csrc/*.cpp`` and
    the CPU kernels ``csrc/cpu/*.cpp`` always, the CUDA kernels ``csrc/cuda/*`` when
    ``cuda_skip_reason`` gives none, every unit with ``csrc`` on its include path (for the shared
    headers of ``csrc/common``). With no sources (or ``FASTPREF_NO_EXT=1``) fastpref installs as
    pure Python and every call runs on the Triton or eager PyTorch backends; ``fastpref info``
    says which."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if os.environ.get("FASTPREF_NO_EXT") == "1" or not cpp_sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(HERE, "csrc")]  # "common/options.h", "cpu/kernels.h"
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    skip = cuda_skip_reason(torch, cpp_extension, cuda_sources)
    if skip is None:
        extension = cpp_extension.CUDAExtension(
            "fastpref._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + cuda_arch_flags()},
            extra_link_args=["-fopenmp"],
        )
    else:
        if cuda_sources and torch.version.cuda is not None:
            print(f"fastpref: building without the CUDA kernels: {skip}")
        extension = cpp_extension.CppExtension(
            "fastpref._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; the tests read the flags above
    ext_modules, cmdclass = native_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
