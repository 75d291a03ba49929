"""Build script. Metadata lives in pyproject.toml; this file only adds the compiled extension.

``igpt_kernels._C`` holds the palette quantizer (csrc/): the C++/OpenMP kernels always, the
CUDA kernels where a CUDA toolkit and a CUDA build of torch exist. Built with ninja through
torch's BuildExtension (install with ``pip install --no-build-isolation -e .`` so the
installed torch is the one built against). Environment switches:

    IGPT_NO_EXT=1       build no extension (igpt_kernels then JIT-builds it or uses the
                        reference quantizer at run time)
    IGPT_BUILD_CUDA=1   require the CUDA kernels (fail if they cannot be built)
    IGPT_BUILD_CUDA=0   never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST  GPU architectures, as for any torch extension

A compiler error never fails the install: it warns and leaves the extension out, unless
IGPT_BUILD_CUDA=1 asked for it.
"""

import os
import shutil
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/binding.cpp", "csrc/palette_cpu.cpp"]
CUDA_SOURCES = ["csrc/palette_cuda.cu"]


def _warn(msg: str) -> None:
    sys.stderr.write(f"igpt setup.py: {msg}\n")


def _extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or {} where nothing can be built."""
    if os.environ.get("IGPT_NO_EXT") == "1":
        _warn("IGPT_NO_EXT=1: not building igpt_kernels._C")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn("torch is not importable at build time: not building igpt_kernels._C")
        return {}
    if not shutil.which(os.environ.get("CXX", "c++")):
        _warn("no C++ compiler found: not building igpt_kernels._C")
        return {}
    force = os.environ.get("IGPT_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force == "1" and not can_cuda:
        raise RuntimeError(
            "IGPT_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    with_cuda = can_cuda if force is None else force == "1"
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "igpt_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DIGPT_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "igpt_kernels._C",
            CPU_SOURCES,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    _warn(f"building igpt_kernels._C ({'C++ + CUDA' if with_cuda else 'C++ only'})")

    class BuildExt(cpp_extension.BuildExtension):
        """Warn instead of failing the install when the optional extension does not build."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if force == "1":
                    raise
                _warn(f"building {extension.name} failed, continuing without it: {e}")

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)},
    }


setup(**_extension_kwargs())
