"""ln_linear, the norm-prologue GEMM alone: the reference against its definition, the Triton
kernels against the reference (output and every gradient), and its errors."""

import pytest
import torch
from kernel_utils import poison_allocations, set_autotune
from test_ln_mlp import DEVICE, _assert_matches, _grads

from igpt_kernels import ln_linear, reference


@pytest.fixture(autouse=True)
def _default_configs_on_gpu(monkeypatch):
    """On a GPU each kernel runs its first config (as in test_ln_mlp.py)."""
    if DEVICE == "cuda":
        set_autotune(monkeypatch, False)


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every tensor the kernels allocate with NaN, so an unwritten element fails."""
    return lambda: poison_allocations(monkeypatch)


def _linear_weights(d, n, norm, biases=True, dtype=torch.float64):
    return dict(
        norm_weight=1 + 0.1 * torch.randn(d, dtype=dtype),
        norm_bias=0.1 * torch.randn(d, dtype=dtype) if norm == "layer" and biases else None,
        weight=torch.randn(n, d, dtype=dtype) / d**0.5,
        bias=0.1 * torch.randn(n, dtype=dtype) if biases else None,
    )


def test_ln_linear_reference_matches_definition():
    x = torch.randn(5, 48, dtype=torch.float64)
    w = _linear_weights(48, 144, "layer")
    mu = x.mean(-1, keepdim=True)
    n = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    n = n * w["norm_weight"] + w["norm_bias"]
    want = n @ w["weight"].T + w["bias"]
    torch.testing.assert_close(ln_linear(x, **w, norm="layer"), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "shape,norm,biases,dtype",
    [
        ((7, 48), "rms", True, torch.float32),
        ((2, 65, 32), "layer", False, torch.float16),
        ((1, 96), "layer", True, torch.float16),
    ],
)
def test_ln_linear_triton_matches_reference(shape, norm, biases, dtype, poisoned):
    d = shape[-1]
    x = torch.randn(shape, dtype=torch.float64)
    w = _linear_weights(d, 3 * d, norm, biases)
    dy = torch.randn(*shape[:-1], 3 * d, dtype=torch.float64)
    ref = _grads(ln_linear, x, w, dy, norm=norm, backend="torch")
    cast = {k: None if v is None else v.to(DEVICE, dtype) for k, v in w.items()}
    poisoned()
    out = _grads(ln_linear, x.to(DEVICE, dtype), cast, dy.to(DEVICE), norm=norm, backend="triton")
    _assert_matches({k: v.cpu() for k, v in out.items()}, ref, dtype)


@pytest.mark.parametrize("fn", [ln_linear, reference.ln_linear])
@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"weight": torch.randn(96, 31)}, ValueError, "weight must have shape"),
        ({"bias": torch.randn(95)}, ValueError, "bias must have shape"),
        ({"norm_bias": torch.randn(32)}, ValueError, "norm_bias must be None for norm='rms'"),
        ({"norm": "batch"}, ValueError, "norm must be one of"),
        ({"weight": torch.randn(96, 32).half()}, TypeError, "weight must have dtype"),
    ],
)
def test_ln_linear_bad_input_raises(fn, change, exc, words):
    w = {k: None if v is None else v.float() for k, v in _linear_weights(32, 96, "rms").items()}
    args = {"x": torch.randn(3, 32), **w, **change}
    with pytest.raises(exc, match=words):
        fn(**args)
