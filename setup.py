"""Build script. Metadata lives in pyproject.toml; this file adds what it cannot say.

1. The C++/CUDA sources of ``csrc/`` go into the package as ``igpt_kernels/csrc/`` (every wheel
   and every install from an sdist), so that ``igpt_kernels`` can compile the palette
   quantizer at first use for whatever torch runs it (igpt_kernels/_build.py).
2. Where torch is importable at build time (``pip install --no-build-isolation``, which is what
   ``make install`` runs), the prebuilt extension ``igpt_kernels._C``: the C++/OpenMP kernels
   always, the CUDA kernels where a CUDA toolkit and a CUDA build of torch exist. It is an
   optimisation: at run time it is used only when it was built for the torch that runs.
   Under pip's default build isolation torch is absent, the wheel is pure Python, and the
   first ``quantize`` compiles the extension once into ``~/.cache/igpt/ext``.

Environment switches:

    IGPT_NO_EXT=1       build no extension now (it is then compiled at first use)
    IGPT_BUILD_CUDA=1   require the CUDA kernels (fail if they cannot be built)
    IGPT_BUILD_CUDA=0   never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST  GPU architectures, as for any torch extension

A compiler error never fails the install: it warns and leaves the extension out, unless
IGPT_BUILD_CUDA=1 asked for it.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

CPU_SOURCES = ["csrc/binding.cpp", "csrc/palette_cpu.cpp", "csrc/nearest_check.cpp"]
CUDA_SOURCES = ["csrc/palette_cuda.cu"]


def _build_flags():
    """(CXX_FLAGS + the sources' digest flag, NVCC_FLAGS, LD_FLAGS) of igpt_kernels/_build.py,
    the run-time build's, so that the prebuilt and the run-time-compiled modules are compiled
    alike. The file is loaded alone (standard library only): importing the package would
    need torch."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "igpt_kernels", "_build.py")
    spec = importlib.util.spec_from_file_location("_igpt_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cxx = list(module.CXX_FLAGS) + [module.digest_flag(Path(here, "csrc"))]
    return cxx, list(module.NVCC_FLAGS), list(module.LD_FLAGS)


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
        _warn(
            "torch is not importable at build time (pip's build isolation): igpt_kernels._C is "
            "not prebuilt; the palette quantizer compiles at its first use instead"
        )
        return {}
    if not shutil.which(os.environ.get("CXX", "c++")):
        _warn("no C++ compiler found: igpt_kernels._C is not prebuilt")
        return {}
    force = os.environ.get("IGPT_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force == "1" and not can_cuda:
        raise RuntimeError(
            "IGPT_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    with_cuda = can_cuda if force is None else force == "1"
    cxx, nvcc, ld = _build_flags()
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "igpt_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DIGPT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=ld,
        )
    else:
        ext = cpp_extension.CppExtension(
            "igpt_kernels._C",
            CPU_SOURCES,
            extra_compile_args={"cxx": cxx},
            extra_link_args=ld,
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


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the built package as igpt_kernels/csrc/.

    Editable installs skip the copy: there igpt_kernels finds the checkout's csrc/ itself.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "igpt_kernels", "csrc")
        self.mkpath(target)
        for name in sorted(os.listdir("csrc")):
            if name.endswith((".cpp", ".h", ".cu")):
                self.copy_file(os.path.join("csrc", name), os.path.join(target, name))


def _license() -> dict:
    """MIT, as an SPDX expression where setuptools >= 77 knows them (PEP 639), else as text."""
    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "MIT"}
    return {"license": "MIT"}


kwargs = _extension_kwargs()
kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**kwargs, **_license())
