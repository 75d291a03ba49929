"""Shared test set-up: Triton's interpreter on CPU-only machines, seeds, markers, fixtures.

Tiers: ``pytest -m "not slow"`` (``make test-fast``) leaves out the tests marked ``slow``
(each over ~10 s on a 2-core CPU); ``cuda`` tests skip themselves without a GPU.
``DEVICE`` and ``needs_triton`` are for the kernel tests (``from conftest import ...``).
"""

import importlib.util
import os
import random

import numpy as np
import pytest
import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so the
# switch must be set before any igpt_kernels module imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton (compiled on a GPU, or TRITON_INTERPRET=1 on the CPU)",
)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread and one BLAS thread for a module of tiny models and small probes.

    They spend their time in thread hand-offs: OpenMP threads that spin-wait for each other
    make a step many times slower on a busy 2-core machine than one thread does.
    """
    import sklearn.linear_model  # noqa: F401  (load BLAS first: limits reach loaded libraries)
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_palette():
    """A 16-colour palette fitted on the bundled digits (what their checkpoints hold)."""
    from igpt.data import load_images
    from igpt.palette import fit_palette

    return fit_palette(load_images("digits", "train").images, k=16)


@pytest.fixture
def tiny_checkpoint(tmp_path, digits_palette):
    """``save(path, *, objective="ar", palette=True, **config)``: a tiny 8x8 model's checkpoint
    with the digits palette (or none), saved at ``path``; returns the path."""
    from igpt import IGPT, IGPTConfig
    from igpt.checkpoint import save_checkpoint

    def save(path, *, objective="ar", palette=True, step=0, **config):
        fields = {**dict(n_px=8, n_layer=2, n_head=1, n_embd=32, n_colors=16), **config}
        pal = digits_palette if palette else None
        model = IGPT(IGPTConfig(**fields))
        return save_checkpoint(path, model, step=step, palette=pal, objective=objective)

    return save
