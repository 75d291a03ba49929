"""TF32 read through whichever of torch's APIs the user set (issue 31, item 5): reading the
legacy ``allow_tf32`` after the new ``fp32_precision`` API was used raises in torch, which
crashed ``ln_gemm`` (fp32 Triton GEMMs) and the transformers patch's processor margin."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import needs_triton

from igpt import hf_patch
from igpt_kernels import ln_mlp
from igpt_kernels._settings import matmul_allows_tf32

ln_gemm_module = importlib.import_module("igpt_kernels.ln_gemm")
MATMUL = torch.backends.cuda.matmul


@pytest.fixture(autouse=True)
def _restore_tf32():
    """Each test starts from torch's defaults and leaves them so (the new API's "none" at
    both levels and the legacy flag off): the order below is the one torch accepts."""
    yield
    torch.backends.fp32_precision = "none"
    MATMUL.fp32_precision = "none"
    MATMUL.allow_tf32 = False
    MATMUL.fp32_precision = "none"


def _legacy(on):
    MATMUL.allow_tf32 = on


def _matmul(mode):
    MATMUL.fp32_precision = mode


def _global(mode):
    torch.backends.fp32_precision = mode


def _global_then_matmul(mode_global, mode_matmul):
    _global(mode_global)
    _matmul(mode_matmul)


WAYS = [
    ("default", lambda: None, False),
    ("legacy on", lambda: _legacy(True), True),
    ("legacy off", lambda: _legacy(False), False),
    ("matmul tf32", lambda: _matmul("tf32"), True),
    ("matmul ieee", lambda: _matmul("ieee"), False),
    ("global tf32", lambda: _global("tf32"), True),
    ("global ieee", lambda: _global("ieee"), False),
    ("global tf32, matmul ieee", lambda: _global_then_matmul("tf32", "ieee"), False),
    ("global ieee, matmul tf32", lambda: _global_then_matmul("ieee", "tf32"), True),
]


@pytest.mark.parametrize("name,setting,tf32", WAYS, ids=[w[0] for w in WAYS])
def test_each_way_of_setting_tf32_is_read_without_raising(name, setting, tf32):
    setting()
    assert matmul_allows_tf32() is tf32
    assert ln_gemm_module._precision(torch.float32) == ("tf32" if tf32 else "ieee")
    assert ln_gemm_module._precision(torch.float16) is None
    # the processor's rounding margin on a CUDA GEMM: TF32's unit where torch allows it
    c = torch.ones(4, 3)
    wide, narrow = hf_patch._error_margin(c, 1.0, True), hf_patch._error_margin(c, 1.0, False)
    assert (wide > 1000 * narrow) is tf32


def test_the_legacy_flag_really_raises_after_the_new_api():
    """The bug this guards against is torch's: without it these tests would prove nothing."""
    _global("tf32")
    with pytest.raises(RuntimeError, match="legacy and new APIs"):
        _ = MATMUL.allow_tf32


@needs_triton
def test_fp32_triton_ln_mlp_runs_under_the_new_api():
    """``backend="triton"`` in float32 once a user set ``torch.backends.fp32_precision``:
    it crashed reading ``allow_tf32``."""
    _global("ieee")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g)
    w = [torch.ones(32), None, torch.randn(64, 32, generator=g) / 6, None]
    w += [torch.randn(32, 64, generator=g) / 8, None]
    torch.testing.assert_close(
        ln_mlp(x, *w, backend="triton"), ln_mlp(x, *w, backend="torch"), atol=1e-4, rtol=1e-4
    )
