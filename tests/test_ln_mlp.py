"""ln_mlp: the reference against an independent float64 computation, and its errors."""

import pytest
import torch

from igpt_kernels import ln_mlp, reference


def _weights(d, h, dtype=torch.float64, norm="rms", biases=True):
    w = dict(
        norm_weight=1 + 0.1 * torch.randn(d, dtype=dtype),
        norm_bias=0.1 * torch.randn(d, dtype=dtype) if norm == "layer" and biases else None,
        fc_weight=torch.randn(h, d, dtype=dtype) / d**0.5,
        fc_bias=0.1 * torch.randn(h, dtype=dtype) if biases else None,
        proj_weight=torch.randn(d, h, dtype=dtype) / h**0.5,
        proj_bias=0.1 * torch.randn(d, dtype=dtype) if biases else None,
    )
    return w


def _by_hand(x, w, norm, eps, activation, residual):
    if norm == "rms":
        n = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w["norm_weight"]
    else:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        n = (x - mu) / torch.sqrt(var + eps) * w["norm_weight"]
        if w["norm_bias"] is not None:
            n = n + w["norm_bias"]
    a = n @ w["fc_weight"].T + (0 if w["fc_bias"] is None else w["fc_bias"])
    if activation == "quick_gelu":
        a = a / (1 + torch.exp(-1.702 * a))
    else:
        a = 0.5 * a * (1 + torch.erf(a / 2**0.5))
    y = a @ w["proj_weight"].T + (0 if w["proj_bias"] is None else w["proj_bias"])
    return x + y if residual else y


@pytest.mark.parametrize("shape", [(1, 32), (7, 48), (2, 5, 96)])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("biases,residual", [(True, True), (False, False)])
def test_reference_matches_definition(shape, norm, activation, biases, residual):
    d = shape[-1]
    x = torch.randn(shape, dtype=torch.float64)
    w = _weights(d, 4 * d, norm=norm, biases=biases)
    y = ln_mlp(x, **w, norm=norm, eps=1e-5, activation=activation, residual=residual)
    torch.testing.assert_close(
        y, _by_hand(x, w, norm, 1e-5, activation, residual), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_keeps_dtype(dtype):
    w = {k: None if v is None else v.to(dtype) for k, v in _weights(32, 64).items()}
    assert ln_mlp(torch.randn(3, 32).to(dtype), **w).dtype == dtype


@pytest.mark.parametrize("fn", [ln_mlp, reference.ln_mlp])
@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"fc_weight": torch.randn(64, 31)}, ValueError, "fc_weight must have shape"),
        ({"proj_weight": torch.randn(64, 32)}, ValueError, "proj_weight must have shape"),
        ({"fc_bias": torch.randn(63)}, ValueError, "fc_bias must have shape"),
        ({"norm_weight": torch.randn(32).double()}, TypeError, "norm_weight must have dtype"),
        ({"norm_bias": torch.randn(32)}, ValueError, "norm_bias must be None for norm='rms'"),
        ({"norm": "batch"}, ValueError, "norm must be one of"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"eps": 0.0}, ValueError, "eps must be a positive"),
        ({"x": torch.randn(3, 32).long()}, TypeError, "x must have dtype"),
        ({"fc_weight": None}, TypeError, "fc_weight must be a torch.Tensor, got NoneType"),
    ],
)
def test_bad_input_raises(fn, change, exc, words):
    args = {"x": torch.randn(3, 32), **_weights(32, 64, dtype=torch.float32), **change}
    with pytest.raises(exc, match=words):
        fn(**args)
