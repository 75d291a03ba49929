"""The norm-prologue linear, y = norm(x) @ W^T + b: the attention block's qkv projection with
its pre-norm fused into the GEMM's A-tile loads, so the normalised x is never written.

Math as ``ln_mlp``'s first half (rows t of x reshaped to (T, d); n = W.shape[0]):

    rstd_t = 1 / sqrt(mean_j (x_tj - mu_t)^2 + eps)   (mu = 0 for norm="rms")
    y      = ((x - mu) * rstd * w_n + b_n) @ W^T + b   (T, n)

Backward: dW = dy^T @ norm(x) (split-K over tokens, the norm recomputed on load), db = sum_t
dy, dn = dy @ W in fp32, then the norm backward. Saved: x and the fp32 row statistics only.

The kernels and launchers are ``ln_mlp``'s (``ln_mlp_kernels``, ``ln_gemm``). Backends:
"triton" and "torch" (the reference); "auto" as in ``ln_mlp``. Measured: nothing on a GPU yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from igpt_kernels import reference
from igpt_kernels._dispatch import needs_grad
from igpt_kernels.ln_gemm import (
    autocast_dtype,
    check_saved,
    choose_norm_backend,
    empty,
    for_gemm,
    grad_or_empty,
    ln_fc_fwd,
    matmul,
    norm_bwd,
    norm_stats,
    triton_reason,
    unit_stride,
    wgrad,
)


def forward(x2, nw, nb, w, b, norm, eps, needs_grad):
    """(y, mean, rstd) on x2 (T, d): y (T, n) in w's dtype and, with ``needs_grad``, the fp32
    mean (T,) (empty for "rms") and rstd (T,); both empty without."""
    mean, rstd = norm_stats(x2, norm, eps)
    y, _ = ln_fc_fwd(x2, mean, rstd, nw, nb, w, b, None, store_z=True)
    if not needs_grad:
        return y, empty(x2, torch.float32), empty(x2, torch.float32)
    return y, empty(x2, torch.float32) if mean is None else mean, rstd


def backward(dy, x2, mean, rstd, nw, nb, w, has_b, need):
    """Gradients of (x2, nw, nb, w, b), None where ``need`` is False (mean None for "rms")."""
    dy = dy.contiguous()
    dw, db = None, None
    if need[3] or need[4]:
        dw, db = wgrad(dy, x2, norm_args=(mean, rstd, nw, nb), bias_grad=has_b)
    dn, _ = matmul(dy, w, out_dtype=torch.float32)
    dx, dnw, dnb = norm_bwd(x2, dn, dy, mean, rstd, nw, residual=False)
    return tuple(g if n else None for g, n in zip((dx, dnw, dnb, dw, db), need, strict=True))


# --------------------------------------------------------------------------------------
# the custom ops (see ``ln_mlp``: empty tensors stand for outputs a call has no use for)
# --------------------------------------------------------------------------------------


@torch.library.custom_op("igpt::ln_linear", mutates_args=())
def ln_linear_op(
    x2: Tensor,
    nw: Tensor | None,
    nb: Tensor | None,
    w: Tensor,
    b: Tensor | None,
    norm: str,
    eps: float,
    needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """linear(norm(x2)) on x2 (T, d): see ``forward``."""
    return forward(x2, nw, nb, w, b, norm, eps, needs_grad)


@ln_linear_op.register_fake
def _(x2, nw, nb, w, b, norm, eps, needs_grad):
    T = x2.shape[0]
    y = x2.new_empty((T, w.shape[0]), dtype=w.dtype)
    if not needs_grad:
        return y, empty(x2, torch.float32), empty(x2, torch.float32)
    mean = empty(x2, torch.float32) if norm == "rms" else x2.new_empty((T,), dtype=torch.float32)
    return y, mean, x2.new_empty((T,), dtype=torch.float32)


@torch.library.custom_op("igpt::ln_linear_backward", mutates_args=())
def ln_linear_backward_op(
    dy: Tensor,
    x2: Tensor,
    mean: Tensor,
    rstd: Tensor,
    nw: Tensor | None,
    nb: Tensor | None,
    w: Tensor,
    norm: str,
    has_b: bool,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x2, nw, nb, w, b): each one whose ``need`` flag is set, the others empty."""
    check_saved("ln_linear", x2, norm, mean, rstd)
    mean = None if norm == "rms" else mean
    grads = backward(dy, x2, mean, rstd, nw, nb, w, has_b, need)
    return grad_or_empty(grads, need, (x2, x2, x2, w, w))


@ln_linear_backward_op.register_fake
def _(dy, x2, mean, rstd, nw, nb, w, norm, has_b, need):
    T, d = x2.shape
    shapes = [(T, d), (d,), (d,), tuple(w.shape), (w.shape[0],)]
    likes = (x2, x2, x2, w, w)
    return tuple(
        like.new_empty(shape if n else (0,))
        for shape, n, like in zip(shapes, need, likes, strict=True)
    )


def _setup(ctx, inputs, output):
    x2, nw, nb, w, b, norm, eps, needs_grad = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x2, mean, rstd, nw, nb, w)
    ctx.cfg = (norm, b is not None)


def _backward(ctx, dy, _dmean, _drstd):
    need = list(ctx.needs_input_grad[:5])
    grads = ln_linear_backward_op(dy, *ctx.saved_tensors, *ctx.cfg, need)
    return (*(g if n else None for g, n in zip(grads, need, strict=True)), None, None, None)


ln_linear_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------


ARG_NAMES = ("x", "norm_weight", "norm_bias", "weight", "bias")


def call_fields(x, params, norm):
    """(reasons, key fields) of one call: why "triton" cannot run it (None: it can), and what
    besides dtype, autocast and tokens makes its kind (``ln_gemm.call_kind``)."""
    grad = needs_grad(x, *params)
    fields = {"d": x.shape[-1], "n": params[2].shape[0], "norm": norm, "grad": grad}
    return {"triton": triton_reason(x)}, fields


def ln_linear(x, norm_weight, norm_bias, weight, bias, *, norm="rms", eps=1e-5, backend="auto"):
    """linear(norm(x)): the norm fused into the GEMM's A-tile loads (the qkv projection).

    Args:
        x: (..., d) float16, bfloat16 or float32 (float64 on the "torch" backend).
        norm_weight: (d,) or None; norm_bias: (d,) or None (must be None for norm="rms").
        weight: (n, d) (nn.Linear layout); bias: (n,) or None.
        norm: "rms" or "layer". eps: the norm's epsilon, a finite number > 0.
        backend: "auto", "triton" or "torch". "auto" on the CPU is the reference; on a GPU
            the faster of the two once PyTorch verified "triton" for the kind of call there
            (as in ``ln_mlp``; ``IGPT_DISPATCH=fixed``: "triton" only where verified, else
            "torch").

    Returns:
        y: (..., n) in x's dtype, or in autocast's dtype under CUDA autocast (the norm stays
        in float32). Saves only x and the fp32 row stats for backward.
    """
    reference.check_ln_linear(x, norm_weight, norm_bias, weight, bias, norm, eps)
    params = (norm_weight, norm_bias, weight, bias)

    def call(name, x, *params):
        return _ln_linear_on(name, x, params, norm, float(eps))

    reasons, fields = call_fields(x, params, norm)
    name = choose_norm_backend("ln_linear", x, backend, reasons, fields, call, params, ARG_NAMES)
    return _ln_linear_on(name if x.numel() else "torch", x, params, norm, float(eps))


def _ln_linear_on(name, x, params, norm, eps):
    norm_weight, norm_bias, weight, bias = params
    if name == "torch":
        return reference.ln_linear(x, norm_weight, norm_bias, weight, bias, norm=norm, eps=eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, d)
    weights = unit_stride((norm_weight, norm_bias, *for_gemm(autocast_dtype(x), weight, bias)))
    y = ln_linear_op(x2, *weights, norm, eps, needs_grad(x, *weights))[0]
    return y.view(*x.shape[:-1], weight.shape[0])
