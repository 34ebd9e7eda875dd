"""Build script of fastpref's optional native extension ``fastpref._C`` (``csrc/``); all metadata
lives in ``pyproject.toml``. Install with ``pip install --no-build-isolation -e .`` so the build
uses the torch already in the environment rather than downloading another one.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    """The extension (layout in ``csrc/README.md``): the device-agnostic units ``csrc/*.cpp`` and
    the CPU kernels ``csrc/cpu/*.cpp`` always, the CUDA kernels ``csrc/cuda/*`` only when the
    installed torch has CUDA, every unit with ``csrc`` on its include path (for the shared
    headers of ``csrc/common``). With no sources (or ``FASTPREF_NO_EXT=1``) fastpref installs as
    pure Python and every call runs on the Triton or eager PyTorch backends; ``fastpref info``
    says which."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if os.environ.get("FASTPREF_NO_EXT") == "1" or not cpp_sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(HERE, "csrc")]  # "common/options.h", "cpu/kernels.h"
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if torch.version.cuda is not None and cuda_sources:
        extension = cpp_extension.CUDAExtension(
            "fastpref._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "fastpref._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
