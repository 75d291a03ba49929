"""Shared test set-up: Triton's interpreter on CPU-only machines, seeds, the cuda marker."""

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
