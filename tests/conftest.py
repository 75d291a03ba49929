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
