"""attention: the reference against independent float64 computations, and its errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from igpt_kernels import attention, reference


def _loop_attention(q, k, v, causal, pad, scale):
    """One query at a time in float64: the definition, with no broadcasting tricks."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.zeros(B, H, Nq, D, dtype=torch.float64)
    for b in range(B):
        for i in range(Nq):
            keys = [
                j
                for j in range(Nk)
                if (not causal or j <= i + Nk - Nq) and (pad is None or bool(pad[b, j]))
            ]
            if not keys:
                continue
            s = q[b, :, i, None, :].double() @ k[b][:, keys].double().transpose(-1, -2)
            p = torch.softmax(s * scale, dim=-1)  # (H, 1, len(keys))
            out[b, :, i] = (p @ v[b][:, keys].double())[:, 0]
    return out


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (5, 5), (17, 17), (3, 17), (1, 9)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_reference_matches_definition(Nq, Nk, causal, padded):
    B, H, D = 2, 3, 32
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (Nq, Nk, Nk))
    pad = torch.rand(B, Nk) > 0.3 if padded else None
    if pad is not None:
        pad[1] = False  # a batch row with every key padded: its output must be zero
    o = attention(q, k, v, causal=causal, key_padding_mask=pad, backend="torch")
    expect = _loop_attention(q, k, v, causal, pad, 1 / math.sqrt(D))
    torch.testing.assert_close(o, expect, rtol=1e-12, atol=1e-12)
    if pad is not None:
        assert torch.equal(o[1], torch.zeros_like(o[1]))


def test_reference_matches_sdpa_and_scale():
    q, k, v = (torch.randn(2, 4, 33, 64, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        ours = attention(q, k, v, causal=causal, sm_scale=0.3)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_reference_gradients_finite_with_fully_masked_rows():
    q, k, v = (torch.randn(1, 2, 4, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[False, False, True, True]])
    o = attention(q, k, v, causal=True, key_padding_mask=pad)  # queries 0, 1 see no key
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_keeps_dtype(dtype):
    q = torch.randn(1, 1, 3, 32).to(dtype)
    assert attention(q, q, q).dtype == dtype


def _qkv(shape_q=(1, 2, 4, 32), shape_k=(1, 2, 4, 32), dtype=torch.float32):
    return (
        torch.randn(shape_q, dtype=dtype),
        torch.randn(shape_k, dtype=dtype),
        torch.randn(shape_k, dtype=dtype),
    )


@pytest.mark.parametrize("fn", [attention, reference.attention])
@pytest.mark.parametrize(
    "make,kwargs,exc,words",
    [
        (lambda: _qkv((1, 2, 4, 80), (1, 2, 4, 80)), {}, ValueError, "head_dim 80"),
        (lambda: _qkv((1, 2, 5, 32), (1, 2, 4, 32)), {}, ValueError, "Nq=5 > Nk=4"),
        (lambda: _qkv((1, 2, 4, 32), (1, 3, 4, 32)), {}, ValueError, "k must be"),
        (lambda: (torch.randn(2, 4, 32),) * 3, {}, ValueError, "q must have 4 dimensions"),
        (
            lambda: (
                torch.randn(1, 1, 4, 32),
                torch.randn(1, 1, 4, 32).double(),
                torch.randn(1, 1, 4, 32),
            ),
            {},
            TypeError,
            "k must have dtype",
        ),
        (lambda: (torch.zeros(1, 1, 4, 32, dtype=torch.int32),) * 3, {}, TypeError, "q must"),
        (
            lambda: _qkv(),
            {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)},
            ValueError,
            "key_padding_mask must be (B, Nk) = (1, 4)",
        ),
        (lambda: _qkv(), {"key_padding_mask": torch.ones(1, 4)}, TypeError, "key_padding_mask"),
        (lambda: _qkv(), {"sm_scale": -1.0}, ValueError, "sm_scale"),
        (lambda: _qkv(), {"causal": 1}, TypeError, "causal must be a bool"),
        (lambda: ([[1.0]],) * 3, {}, TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input_raises(fn, make, kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fn(*make(), **kwargs)


def test_unknown_backend_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="magic")
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        attention(q, k, v, backend="cuda")
