"""Packaging: what the wheel holds, and how igpt_kernels finds or builds its compiled module.

The slow test builds a wheel and an sdist the way a user's ``pip install`` does (build
isolation), installs them into fresh venvs that see this interpreter's torch, and checks that
the installed package compiles the C++ quantizer at first use, reuses it from the cache in
later processes, and quantizes exactly like the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import igpt
import igpt_kernels
from igpt_kernels import _build
from igpt_kernels import palette as kp

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    """pyproject.toml, read."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _project() -> dict:
    """pyproject.toml's [project] table."""
    return _pyproject()["project"]


# --------------------------------------------------------------------------------------
# decisions, without compiling
# --------------------------------------------------------------------------------------


def test_cuda_plan():
    nvcc = "/usr/local/cuda/bin/nvcc"
    assert _build.cuda_plan("12.8", nvcc, True, None) == (True, None)
    assert _build.cuda_plan("12.8", nvcc, False, "1") == (True, None)
    off = {
        "IGPT_BUILD_CUDA=0": ("12.8", nvcc, True, "0"),
        "CPU-only build": (None, nvcc, True, None),
        "no CUDA toolkit": ("12.8", None, True, None),
        "no GPU is visible": ("12.8", nvcc, False, None),
    }
    for why, args in off.items():
        want, note = _build.cuda_plan(*args)
        assert not want and why in note, (args, note)
    # IGPT_BUILD_CUDA=1 cannot conjure a toolkit or a CUDA torch
    assert not _build.cuda_plan(None, nvcc, True, "1")[0]
    assert not _build.cuda_plan("12.8", None, True, "1")[0]


def test_prebuilt_mismatch():
    info = {"torch": "2.13.0", "cxx11_abi": True, "cuda": False}
    assert _build.prebuilt_mismatch(info, "2.13.0+cpu", True) is None
    assert _build.prebuilt_mismatch(info, "2.13.0a0+git123", True) is None
    assert "built for torch 2.13.0, this is torch 2.14.0" in _build.prebuilt_mismatch(
        info, "2.14.0", True
    )
    assert "CXX11_ABI=1" in _build.prebuilt_mismatch(info, "2.13.0", False)
    assert "no build_info" in _build.prebuilt_mismatch(None, "2.13.0", True)
    assert _build.prebuilt_mismatch({**info, "cxx11_abi": None}, "2.13.0", False) is None


def test_build_key_follows_torch_cuda_and_sources(tmp_path):
    for name in ("binding.cpp", "palette.h"):
        (tmp_path / name).write_text(f"// {name}\n")
    key = _build.build_key(tmp_path, False, "2.13.0", None, True)
    assert key == _build.build_key(tmp_path, False, "2.13.0", "12.8", True)  # CPU: no CUDA
    others = {
        _build.build_key(tmp_path, False, "2.14.0", None, True),
        _build.build_key(tmp_path, False, "2.13.0", None, False),
        _build.build_key(tmp_path, True, "2.13.0", "12.8", True),
    }
    (tmp_path / "palette.h").write_text("// changed\n")
    others.add(_build.build_key(tmp_path, False, "2.13.0", None, True))
    assert key not in others and len(others) == 4


def test_sources_found_in_checkout():
    src = _build.source_dir()
    assert src is not None and (src / "palette_cpu.cpp").is_file()
    assert (src / "palette_cuda.cu").is_file() and (src / "palette.h").is_file()


class _FakeC:
    """Stands in for a prebuilt igpt_kernels._C."""

    __file__ = "/fake/_C.so"

    def __init__(self, info, cuda=False):
        self._info, self._cuda = info, cuda

    def build_info(self):
        return self._info

    def has_cuda(self):
        return self._cuda


def _prebuilt(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "igpt_kernels._C", fake)
    monkeypatch.setattr(igpt_kernels, "_C", fake, raising=False)


def _this_torch():
    return {"torch": _build.torch_release(torch.__version__), "cxx11_abi": None, "cuda": False}


def test_load_takes_a_matching_prebuilt(monkeypatch):
    monkeypatch.setattr(_build, "cuda_plan", lambda *a: (False, "test"))  # no CUDA build tried
    fake = _FakeC(_this_torch())
    _prebuilt(monkeypatch, fake)
    module, status = _build.load()
    assert module is fake and status["source"] == "prebuilt" and status["error"] is None


def test_load_refuses_a_prebuilt_for_another_torch(monkeypatch):
    _prebuilt(monkeypatch, _FakeC({"torch": "1.0.0", "cxx11_abi": None, "cuda": False}))
    monkeypatch.setenv("IGPT_NO_JIT", "1")
    module, status = _build.load()
    assert module is None
    assert "built for torch 1.0.0" in status["error"] and "IGPT_NO_JIT=1" in status["error"]


def test_load_without_compiler_names_the_fix(monkeypatch, tmp_path):
    _prebuilt(monkeypatch, _FakeC(None))  # predates build_info: not trusted
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.delenv("IGPT_NO_JIT", raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    module, status = _build.load()
    assert module is None
    assert "no C++ compiler" in status["error"] and "apt-get install g++" in status["error"]
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_load_cuda_failure_keeps_the_cpp_kernels(monkeypatch):
    """Where the CUDA kernels are wanted but do not build, the C++ kernels still run."""
    monkeypatch.setattr(_build, "cuda_plan", lambda *a: (True, None))
    monkeypatch.delenv("IGPT_NO_JIT", raising=False)
    calls = []

    def fake_compile(src, with_cuda):
        calls.append(with_cuda)
        if with_cuda:
            return None, "nvcc broke", None
        return "cpu-module", "compiled", Path("/cache/m.so")

    monkeypatch.setattr(_build, "compile_module", fake_compile)
    # a CPU-only prebuilt: tried with CUDA first, then kept as it is
    fake = _FakeC(_this_torch(), cuda=False)
    _prebuilt(monkeypatch, fake)
    module, status = _build.load()
    assert module is fake and calls == [True]
    assert status["source"] == "prebuilt" and not status["cuda"]
    assert "nvcc broke" in status["cuda_note"]
    # no prebuilt: the CUDA build, then the C++ one
    calls.clear()
    monkeypatch.setitem(sys.modules, "igpt_kernels._C", None)  # import fails
    monkeypatch.delattr(igpt_kernels, "_C", raising=False)
    module, status = _build.load()
    assert module == "cpu-module" and calls == [True, False]
    assert (
        status["source"] == "compiled"
        and "the CUDA build failed: nvcc broke" in (status["cuda_note"])
    )


def test_quantize_warns_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(kp, "_ext", None)
    monkeypatch.setattr(kp, "_ext_error", None)
    monkeypatch.setattr(kp, "_ext_status", None)
    monkeypatch.setattr(kp, "_warned", False)
    status = {"source": None, "path": None, "cuda": False, "cuda_note": None}
    status["error"] = "no C++ compiler ('c++', or $CXX) is on the PATH: " + _build.COMPILER_FIX
    monkeypatch.setattr(_build, "load", lambda: (None, status))
    pixels = torch.zeros(4, 3, dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match="slow reference: no C\\+\\+ compiler.*g\\+\\+"):
        kp.quantize(pixels, torch.rand(2, 3))
    assert "not available" in kp.extension_status()["summary"]


def test_versions_agree(capsys):
    """One version source: igpt_kernels/_version.py, which the build and both packages read."""
    from igpt_kernels._version import VERSION

    meta = _project()
    assert "version" in meta["dynamic"] and "version" not in meta
    dynamic = _pyproject()["tool"]["setuptools"]
    assert dynamic["dynamic"]["version"] == {"attr": "igpt_kernels._version.VERSION"}
    assert igpt.__version__ == igpt_kernels.__version__ == VERSION
    written = [p for p in (ROOT / "python" / "igpt").rglob("*.py") if VERSION in p.read_text()]
    assert written == [] and VERSION not in (ROOT / "setup.py").read_text()
    from igpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"igpt {igpt.__version__}"


def test_triton_and_transformers_are_extras():
    meta = _project()
    base = " ".join(meta["dependencies"])
    assert "triton" not in base and "transformers" not in base
    assert "threadpoolctl" in base and "ninja" in base
    assert any(r.startswith("triton==") for r in meta["optional-dependencies"]["test"])


def test_the_mit_licence_the_metadata_names_is_in_the_checkout_and_the_sdist():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert "LICENSE" in (ROOT / "MANIFEST.in").read_text().split()
    assert '"license_expression": "MIT"' in (ROOT / "setup.py").read_text()


def test_docstrings_point_only_to_files_users_have():
    """The design notes are not in the repository: no module may send a reader to them."""
    sources = [*(ROOT / "python").rglob("*.py"), *(ROOT / "igpt_kernels").rglob("*.py")]
    assert [str(p.relative_to(ROOT)) for p in sources if "DESIGN.md" in p.read_text()] == []


def test_experiment_trackers_are_extras():
    """--report-to's trackers: ``pip install "igpt[tensorboard]"`` / ``"igpt[wandb]"``."""
    meta = _project()
    base = " ".join(meta["dependencies"])
    assert "tensorboard" not in base and "wandb" not in base
    extras = meta["optional-dependencies"]
    assert extras["tensorboard"] == ["tensorboard"] and extras["wandb"] == ["wandb"]


# --------------------------------------------------------------------------------------
# the wheel and the sdist, installed as a user would
# --------------------------------------------------------------------------------------


def _run(cmd, timeout=600, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _venv(path: Path) -> Path:
    """A fresh venv at ``path`` that also sees this interpreter's site-packages (its torch)
    after its own, through a .pth file; returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    import site

    seen = [p for p in site.getsitepackages() if Path(p).is_dir()]
    assert Path(torch.__file__).parents[1] in [Path(p) for p in seen]
    (Path(own.strip()) / "_igpt_test_host.pth").write_text("\n".join(seen) + "\n")
    return python


IGNORE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache", "*.so")
CHECK = """
import json, sys, torch, igpt_kernels
from igpt_kernels import palette, quantize
assert igpt_kernels.__file__.startswith(sys.prefix), igpt_kernels.__file__
g = torch.Generator().manual_seed(0)
pixels = torch.randint(0, 256, (1 << 20, 3), dtype=torch.uint8, generator=g)
pal = torch.rand(512, 3, generator=g) * 255
ref = quantize(pixels, pal, backend="torch")
direct = quantize(pixels, pal, backend="cpu", lut=False)
table = quantize(pixels, pal, backend="cpu", lut=True)
status = palette.extension_status()
print(json.dumps({"equal": bool(torch.equal(direct, ref) and torch.equal(table, ref)),
                  "source": status["source"], "path": status["path"],
                  "package": igpt_kernels.__file__}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build with"
)
def test_wheel_and_sdist_install_give_the_cpp_quantizer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IGPT_NO_JIT")}
    env.update(IGPT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    pip = [sys.executable, "-m", "pip"]

    # a copy of the checkout, so that the builds leave nothing in it (pip builds in the tree)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*IGNORE))
    # a wheel as `pip wheel .` / `pip install .` builds it: build isolation, so no torch
    _run(pip + ["wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)], env=env)
    (wheel,) = (tmp_path / "dist").glob("igpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in (ROOT / "csrc").iterdir():
        assert f"igpt_kernels/csrc/{source.name}" in names
    packages = [ROOT / "igpt_kernels"] + [p.parent for p in (ROOT / "python").rglob("__init__.py")]
    for pkg in packages:  # every package, new subpackages too, found by discovery
        rel = pkg.relative_to(ROOT / "python" if "python" in pkg.parts else ROOT)
        assert f"{rel.as_posix()}/__init__.py" in names, rel
    meta = zipfile.ZipFile(wheel).read(f"igpt-{igpt.__version__}.dist-info/METADATA").decode()
    base = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not [line for line in base if "triton" in line and "extra ==" not in line]

    python = _venv(tmp_path / "venv")
    _run(pip + ["--python", str(python), "install", "--no-deps", str(wheel)], env=env)
    info = _run([str(python.parent / "igpt"), "info"], env=env, cwd=tmp_path)  # compiles
    assert "quantize on CPU: C++ kernel" in info and "compiled at first use, now" in info, info
    first = json.loads(_run([str(python), "-c", CHECK], env=env, cwd=tmp_path).splitlines()[-1])
    assert first["equal"] and first["source"] == "cache", first  # a later process: no compile
    assert first["package"].startswith(str(tmp_path / "venv"))

    # an sdist, built and then installed by pip (isolated again): the same sources, so the
    # same cache entry
    make_sdist = (
        f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    )
    out = _run([sys.executable, "-c", make_sdist], env={**env, "IGPT_NO_EXT": "1"}, cwd=src)
    sdist = tmp_path / out.splitlines()[-1]
    python2 = _venv(tmp_path / "venv2")
    _run(pip + ["--python", str(python2), "install", "--no-deps", str(sdist)], env=env)
    second = json.loads(_run([str(python2), "-c", CHECK], env=env, cwd=tmp_path).splitlines()[-1])
    assert second["equal"] and second["source"] == "cache" and second["path"] == first["path"]
    assert second["package"].startswith(str(tmp_path / "venv2"))
