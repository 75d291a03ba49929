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


@pytest.fixture(autouse=True, scope="session")
def _token_cache_in_tmp(tmp_path_factory):
    """Token cache entries that commands make (probe and finetune read through the cache)
    go to a temporary folder unless a test sets ``IGPT_CACHE``, never to ~/.cache/igpt;
    the compiled extension, also under ``IGPT_CACHE``, stays where it was built."""
    import igpt.data

    folder = tmp_path_factory.mktemp("token_cache")
    real = igpt.data.default_cache_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            igpt.data, "default_cache_dir", lambda: real() if "IGPT_CACHE" in os.environ else folder
        )
        yield


@pytest.fixture
def no_images(monkeypatch):
    """``no_images()``: from then on every way to images raises (the readers, the lazy
    sets, ``tokenize``, building a token cache entry): what a command that starts from a
    prepared token cache must never call."""
    import igpt.data
    import igpt.data.cache
    import igpt.data.digits
    import igpt.data.folder
    import igpt.data.npz
    import igpt.transforms

    def refuse(*args, **kwargs):
        raise AssertionError("images were read or tokenised")

    def forbid():
        for module, names in (
            (igpt.data, ("load_images", "open_images", "tokenize", "build_entry")),
            (igpt.data, ("load_digits", "load_cifar", "load_folder", "load_npz")),
            (igpt.data.digits, ("load_digits",)),
            (igpt.data.folder, ("read_image",)),
            (igpt.data.npz, ("load_npz",)),
            (igpt.data.cache, ("read_chunk", "build_entry")),
            (igpt.transforms, ("tokenize", "read_image")),
        ):
            for name in names:
                monkeypatch.setattr(module, name, refuse)

    return forbid
