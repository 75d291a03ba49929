"""Find or build the compiled palette module (the C++/CUDA sources of ``csrc/``) for the torch
that runs.

Order of preference:

1. ``igpt_kernels._C``, built by ``pip install --no-build-isolation`` (``make install``), where
   it imports and was built for this torch version and C++ ABI, from the sources at hand (its
   ``build_info()`` says). A ``_C`` left behind by a torch upgrade or a change of ``csrc/``
   is skipped, not trusted.
2. A module compiled from the sources shipped inside the package (``igpt_kernels/csrc/`` in a
   wheel, ``csrc/`` in a checkout) with ``torch.utils.cpp_extension.load``, into
   ``$IGPT_CACHE/ext/`` (default ``~/.cache/igpt/ext/``), one directory per key: torch
   version, C++ ABI, Python, machine, CUDA version (CUDA builds), sources and flags. The first
   use compiles (about a minute on 2 cores); later calls and later processes import the
   cached module directly, with no compiler, no ninja and no rebuild check.

The CUDA kernels are compiled in (with nvcc) when torch is a CUDA build, a GPU is visible and
a CUDA toolkit is found; if that build fails the C++ kernels are still built alone. Where
nothing can be built, ``load`` returns None and a sentence saying why and what to do, and
``igpt_kernels.quantize`` warns once and uses the PyTorch reference.

Environment: ``IGPT_NO_JIT=1`` never compiles at run time; ``IGPT_BUILD_CUDA=0`` never builds
the CUDA kernels, ``IGPT_BUILD_CUDA=1`` builds them even with no GPU visible; ``IGPT_CACHE``
moves the cache; ``CXX`` names the C++ compiler (default ``c++``). ``IGPT_CPU_ISA`` (read by
the compiled module at each call, not by the build) picks the C++ kernel's version:
``avx512``, ``avx2`` or ``default``; unset, the best one the CPU runs.

Both builds compile with ``CXX_FLAGS`` (setup.py reads them from this file): no ``-march``,
since the kernel carries its AVX-512, AVX2 and baseline versions itself and picks one at run
time, so one build runs on every x86-64 CPU.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
CPU_SOURCES = ("binding.cpp", "palette_cpu.cpp", "nearest_check.cpp")
CUDA_SOURCES = ("palette_cuda.cu",)
CXX_FLAGS = ("-O3", "-std=c++17", "-fopenmp")
NVCC_FLAGS = ("-O3", "-std=c++17")
LD_FLAGS = ("-fopenmp",)
STAMP = "igpt-build.json"
COMPILER_FIX = (
    "install a C++ compiler (Debian/Ubuntu: `sudo apt-get install g++`; conda: "
    "`conda install -c conda-forge gxx`) and the quantizer compiles at its first use"
)


def source_dir(package: Path = PACKAGE) -> Path | None:
    """The directory holding binding.cpp: in the installed package, else the checkout's csrc/."""
    for d in (package / "csrc", package.parent / "csrc"):
        if (d / "binding.cpp").is_file():
            return d
    return None


def kernel_sources_digest(package: Path = PACKAGE) -> str:
    """A digest of every source that decides what our kernels compute: the package's Python
    modules (the Triton kernels, their launchers and configs) and the C++/CUDA sources
    (``sources_digest``, which the prebuilt module records). The dispatch cache keys its
    verdicts by it, so an edit or a ``git pull`` of an editable install makes old verdicts
    unused. About a millisecond (a few hundred KiB read once); callers cache it."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(package.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    src = source_dir(package)
    h.update(b"csrc\0" + (sources_digest(src) if src is not None else "none").encode())
    return h.hexdigest()


def cache_root() -> Path:
    """``$IGPT_CACHE/ext`` (``~/.cache/igpt/ext`` by default), where compiled modules live."""
    return Path(os.environ.get("IGPT_CACHE", Path.home() / ".cache" / "igpt")) / "ext"


def torch_release(version: str) -> str:
    """``"2.13.0"`` of ``"2.13.0+cpu"`` or ``"2.13.0a0+git1234"``: what the C++ headers record."""
    m = re.match(r"\d+\.\d+\.\d+", version)
    return m.group(0) if m else version


def cuda_plan(
    torch_cuda: str | None, nvcc: str | None, gpu_visible: bool, force: str | None
) -> tuple[bool, str | None]:
    """Whether to compile the CUDA kernels in, and if not, why (a phrase for messages).

    ``torch_cuda`` is ``torch.version.cuda``, ``nvcc`` the compiler's path or None,
    ``force`` the value of ``IGPT_BUILD_CUDA`` ("0", "1" or None).
    """
    if force == "0":
        return False, "IGPT_BUILD_CUDA=0 turned the CUDA kernels off"
    if torch_cuda is None:
        return False, "torch is a CPU-only build"
    if nvcc is None:
        return False, "no CUDA toolkit was found (nvcc; set CUDA_HOME to the toolkit)"
    if not gpu_visible and force != "1":
        return False, "no GPU is visible (IGPT_BUILD_CUDA=1 builds the CUDA kernels anyway)"
    return True, None


def prebuilt_mismatch(
    info: dict | None, torch_version: str, cxx11_abi: bool, sources: str | None = None
) -> str | None:
    """Why a prebuilt module with ``build_info()`` ``info`` must not run here, or None.

    ``sources``: the digest of the sources at hand (``sources_digest``), None to not compare;
    a module that records none (built before it was recorded) is not compared either.
    """
    if info is None:
        return "it has no build_info() (built from older sources)"
    if info.get("torch") != torch_release(torch_version):
        return f"it was built for torch {info.get('torch')}, this is torch {torch_version}"
    abi = info.get("cxx11_abi")
    if abi is not None and bool(abi) != bool(cxx11_abi):
        return f"it was built with _GLIBCXX_USE_CXX11_ABI={int(abi)}, torch uses {int(cxx11_abi)}"
    built = info.get("sources")
    if sources is not None and built is not None and built != sources:
        return (
            f"it was built from other sources than these ({built}, these are {sources}): "
            "rebuild it (`make install`)"
        )
    return None


def sources_digest(src: Path) -> str:
    """A digest of the C++/CUDA sources in ``src`` (file names and contents). Both builds
    compile it in (``-DIGPT_SOURCES_DIGEST``, shown by ``build_info()["sources"]``), so that a
    prebuilt module left behind by a change of the sources is not taken for theirs."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".h", ".cu")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def digest_flag(src: Path) -> str:
    """The compiler flag that records ``sources_digest(src)`` in the module."""
    return f"-DIGPT_SOURCES_DIGEST={sources_digest(src)}"


def build_key(src: Path, with_cuda: bool, torch_version: str, torch_cuda, cxx11_abi) -> str:
    """A digest of everything the compiled module depends on (see the module docstring)."""
    h = hashlib.blake2b(digest_size=8)
    for part in (
        torch_version,
        str(torch_cuda) if with_cuda else "cpu",
        str(bool(cxx11_abi)),
        sys.implementation.cache_tag,
        platform.machine(),
        " ".join(CXX_FLAGS + NVCC_FLAGS + LD_FLAGS),
    ):
        h.update(part.encode() + b"\0")
    h.update(sources_digest(src).encode())
    return h.hexdigest()


def find_ninja() -> str | None:
    """ninja on the PATH, beside this Python, or from the ``ninja`` package (not activated venv)."""
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    return shutil.which("ninja", path=getattr(ninja, "BIN_DIR", ""))


@contextmanager
def _path_with(directory: str):
    """PATH with ``directory`` first, for torch's ``ninja`` subprocesses, restored after."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = directory + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _short(e: Exception, limit: int = 600) -> str:
    """The exception in one line, its tail only: compiler logs are long, the error is last."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text if len(text) <= limit else '...' + text[-limit:]}"


def compile_module(src: Path, with_cuda: bool):
    """(module, "cache" or "compiled", path) for these sources and this torch, or
    (None, reason, None). Imports the cached build when there is one."""
    import torch
    from torch.utils import cpp_extension

    abi = torch._C._GLIBCXX_USE_CXX11_ABI
    key = build_key(src, with_cuda, torch.__version__, torch.version.cuda, abi)
    name = f"igpt_palette_{'cuda' if with_cuda else 'cpu'}_{key}"
    build_dir = cache_root() / name
    library = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    if (build_dir / STAMP).is_file() and library.is_file():
        try:
            return _import_file(name, library), "cache", library
        except ImportError as e:  # a damaged cache entry: build it again
            log.debug("cached %s does not import (%s); rebuilding", library, e)
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx!r}, or $CXX) is on the PATH: {COMPILER_FIX}", None
    ninja = find_ninja()
    if ninja is None:
        return None, "ninja is missing, which torch needs to compile: `pip install ninja`", None
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return None, f"cannot create {build_dir} ({e}): set IGPT_CACHE to a writable folder", None
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    log.warning(
        "compiling igpt's palette quantizer (%s) for torch %s into %s: once per torch "
        "version, about a minute",
        "C++ and CUDA" if with_cuda else "C++",
        torch.__version__,
        build_dir,
    )
    try:
        with _path_with(str(Path(ninja).parent)):
            module = cpp_extension.load(
                name=name,
                sources=[str(src / n) for n in names],
                extra_cflags=list(CXX_FLAGS)
                + [digest_flag(src)]
                + (["-DIGPT_WITH_CUDA"] if with_cuda else []),
                extra_cuda_cflags=list(NVCC_FLAGS),
                extra_ldflags=list(LD_FLAGS),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
            )
    except Exception as e:  # noqa: BLE001 - any compiler, linker or loader failure
        return None, f"compiling it failed ({_short(e)})", None
    stamp = {"torch": torch.__version__, "cuda": with_cuda, "sources": str(src)}
    tmp = build_dir / f"{STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, build_dir / STAMP)  # atomic: a reader sees no stamp or a whole one
    return module, "compiled", library


def load():
    """(module or None, status dict): the best compiled palette module for this process.

    status: ``source`` ("prebuilt", "cache", "compiled" or None), ``path``, ``cuda`` (the
    module has the CUDA kernels), ``cuda_note`` (why not, or None), ``error`` (why there is no
    module, with the fix, or None).
    """
    import torch
    from torch.utils import cpp_extension

    status = {"source": None, "path": None, "cuda": False, "cuda_note": None, "error": None}
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc", path=str(Path(cuda_home) / "bin")) if cuda_home else None
    want_cuda, status["cuda_note"] = cuda_plan(
        torch.version.cuda, nvcc, torch.cuda.is_available(), os.environ.get("IGPT_BUILD_CUDA")
    )

    prebuilt = None
    try:
        _C = importlib.import_module("igpt_kernels._C")  # the prebuilt extension, if any

        info = _C.build_info() if hasattr(_C, "build_info") else None
        src = source_dir()
        bad = prebuilt_mismatch(
            info,
            torch.__version__,
            torch._C._GLIBCXX_USE_CXX11_ABI,
            sources_digest(src) if src is not None else None,
        )
        if bad is None:
            prebuilt = _C
            why = "igpt_kernels._C has no CUDA kernels"
            if not want_cuda or _C.has_cuda():
                status.update(source="prebuilt", path=_C.__file__, cuda=_C.has_cuda())
                if _C.has_cuda():
                    status["cuda_note"] = None
                return _C, status
        else:
            why = f"igpt_kernels._C is not usable: {bad}"
    except ImportError as e:
        why = f"igpt_kernels._C is not built ({e})"

    if os.environ.get("IGPT_NO_JIT") == "1":
        reasons = ["IGPT_NO_JIT=1 forbids compiling it now (unset it to compile at first use)"]
    elif (src := source_dir()) is None:
        reasons = [f"no C++ sources in {PACKAGE}: reinstall igpt (its wheel ships csrc/)"]
    else:
        reasons = []
        # a usable prebuilt module is the C++ fallback when adding the CUDA kernels fails
        for with_cuda in ((True,) if want_cuda else ()) + (() if prebuilt else (False,)):
            module, how, path = compile_module(src, with_cuda)
            if module is not None:
                if want_cuda and not with_cuda:
                    status["cuda_note"] = f"the CUDA build failed: {reasons[-1]}"
                status.update(source=how, path=str(path), cuda=with_cuda)
                return module, status
            reasons.append(how)
    if prebuilt is not None:  # usable on the CPU; the CUDA kernels could not be added
        status.update(source="prebuilt", path=prebuilt.__file__, cuda=False)
        status["cuda_note"] = f"{why}, and {'; '.join(reasons)}"
        return prebuilt, status
    status["error"] = f"{why}; {'; '.join(reasons)}"
    return None, status
