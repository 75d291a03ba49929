"""Fused pre-norm MLP, y = x + proj(act(fc(norm(x)))), and the norm-prologue linear.

Math (rows t of x reshaped to (T, d); h = fc_weight.shape[0]):

    mu_t   = mean_j x_tj               (0 for norm="rms")
    rstd_t = 1 / sqrt(mean_j (x_tj - mu_t)^2 + eps)
    n      = (x - mu) * rstd * w + b                     (T, d)   never written to memory
    z      = n @ W1^T + b1                               (T, h)   saved for backward
    a      = act(z)                                      (T, h)   quick_gelu: z sigmoid(1.702 z)
    y      = a @ W2^T + b2 (+ x)                         (T, d)            gelu: z Phi(z) (erf)

Backward, given dy:

    dz  = (dy @ W2) * act'(z)           dgrad GEMM, act' and a re-derived from z in its epilogue
    dW2 = dy^T @ a,  db2 = sum_t dy     split-K over tokens, fp32 partials, then a sum
    dW1 = dz^T @ n,  db1 = sum_t dz     same; n recomputed from x and the stats on load
    dn  = dz @ W1                       fp32
    dx  = rstd (dn w - mean(dn w) - xhat mean(dn w xhat)) (+ dy)    (no mean(dn w) for rms)
    dw  = sum_t dn xhat,  db = sum_t dn  per-program fp32 partials, then a sum

Algorithm. Forward is three launches: a row-statistics pass (fp32 mean and rstd, two-pass
so LayerNorm has no cancellation), the fc GEMM whose A tiles are normalised as they are
loaded (in fp32, then rounded to the GEMM dtype as eager's norm output would be) with bias
and activation in its epilogue (writes z for backward and a for the proj GEMM), and the
proj GEMM with bias and residual in its epilogue. Backward is five launches: the dgrad GEMM
dy @ W2 with the activation derivative in its epilogue (writes dz and the recomputed a), the
two weight-gradient GEMMs (reduction over tokens split across programs into fp32 partials
that are summed afterwards: deterministic, no atomics or locks; the bias gradient is the
row sum of the same tiles), the dn GEMM, and one row kernel for the norm backward, the
residual and the norm-weight partials. Activation values a are computed once per element
in a GEMM epilogue, never in a GEMM's inner loop, where the exp/erf would compete with the
tensor cores for issue slots.

Saved for backward: x, the fp32 row stats (T floats each) and z: (d + h) T elements. Eager
with 16-bit x saves the fp32 copy of x its norm computes on, n, z and a: (2d + d + h + h) T
in x's bytes, so 0.45x at h = 4d (0.5x plus the stats for float32 x, where eager saves x
itself). The weights are saved by reference, as eager does.

Shapes and dtypes: x (..., d) with any leading dims, any T, any d <= 8192 and any h;
float32, float16, bfloat16 on CUDA (float32/float16 under ``TRITON_INTERPRET=1``, where
Triton cannot compute in bfloat16). GEMMs accumulate in fp32; float32 inputs use exact
fp32 dots unless torch allows TF32 for float32 matmuls (``allow_tf32`` or either
``fp32_precision``: ``_settings.matmul_allows_tf32``), as torch does. Every
bias may be None; norm_bias must be None for "rms". Under CUDA autocast with float32 inputs
(the training loop's bf16 autocast over fp32 weights) the fc/proj weights are cast to the
autocast dtype, the norm reads float32 x and rounds its output to that dtype on the A-tile
load, and the residual is added to the fp32 accumulator: eager autocast's semantics.

Backends: "triton" runs every GEMM in Triton with the fusions above. "cublas" runs all six
GEMMs (two forward, four backward) with torch (cuBLAS) and keeps only the norm and
elementwise parts in Triton (it must write n and a to memory as temporaries); it saves the
same tensors for backward. "torch" is the eager reference. "auto" on a GPU times the three
on the first call per (dtype, autocast, d, h, token bucket, grad, ...) and keeps the fastest
(``igpt_kernels._dispatch``), among those that PyTorch verified for that kind of call on that
GPU (``igpt_kernels.trust``); ``IGPT_DISPATCH=fixed`` gives "triton" where it can run and is
verified, else "torch".

Measured: nothing on a GPU yet; correctness was checked under the interpreter (fp32/fp16)
only. ``benchmarks/bench_ln_mlp.py`` times every backend against eager and torch.compile.
The GEMM block sizes are autotuned on the GPU from a short list (``_triton.AUTOTUNE``;
``IGPT_AUTOTUNE=0`` runs the first of each list, as the GPU tests do).

Files: the ``@triton.jit`` kernels are in ``ln_mlp_kernels``, their launchers (shared with
``ln_linear``, the same norm-prologue GEMM without the activation and the second GEMM) in
``ln_gemm``, the "cublas" variant in ``ln_mlp_cublas``; this module holds the op's forward
and backward, the ``torch.ops.igpt.ln_mlp*`` custom ops that run them, and ``ln_mlp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from igpt_kernels import ln_mlp_cublas, reference
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

# --------------------------------------------------------------------------------------
# forward and backward (the bodies of the custom ops)
# --------------------------------------------------------------------------------------


def forward(x2, nw, nb, w1, b1, w2, b2, norm, eps, act, residual, variant, needs_grad):
    """(y, mean, rstd, z) on x2 (T, d); with ``needs_grad`` the saved fp32 mean (T,) (empty
    for "rms"), rstd (T,) and z (T, h) in w1's dtype, all three empty without."""
    mean, rstd = norm_stats(x2, norm, eps)
    if variant == "fused":
        z, a = ln_fc_fwd(x2, mean, rstd, nw, nb, w1, b1, act, store_z=needs_grad)
        out_dtype = x2.dtype if residual else w2.dtype
        y, _ = matmul(a, w2.t(), bias=b2, resid=x2 if residual else None, out_dtype=out_dtype)
        del a
    else:
        y, z = ln_mlp_cublas.forward(x2, mean, rstd, nw, nb, w1, b1, w2, b2, act, residual)
    if not needs_grad:
        return y, empty(x2, torch.float32), empty(x2, torch.float32), empty(x2, w1.dtype)
    return y, empty(x2, torch.float32) if mean is None else mean, rstd, z


def backward(dy, x2, mean, rstd, z, nw, nb, w1, w2, cfg, need):
    """Gradients of (x2, nw, nb, w1, b1, w2, b2), None where ``need`` is False.

    cfg: (norm, activation, residual, variant, has_b1, has_b2); mean, rstd, z: what
    ``forward`` saved (mean None for "rms"). The weights' gradients are in the GEMM dtype."""
    norm, act, residual, variant, has_b1, has_b2 = cfg
    dy = dy.contiguous()
    dyc = dy.to(w2.dtype)  # the GEMMs' dtype (differs from x's under autocast)
    if variant == "fused":
        dz, a = matmul(dyc, w2, z=z, act=act)
        dw2, db2 = wgrad(dyc, a, bias_grad=has_b2) if need[5] or need[6] else (None, None)
        del a
        if need[3] or need[4]:
            dw1, db1 = wgrad(dz, x2, norm_args=(mean, rstd, nw, nb), bias_grad=has_b1)
        else:
            dw1, db1 = None, None
        dn, _ = matmul(dz, w1, out_dtype=torch.float32)
        del dz
    else:
        args = (dyc, x2, mean, rstd, z, nw, nb, w1, w2, act, has_b1, has_b2)
        dw1, db1, dw2, db2, dn = ln_mlp_cublas.backward(*args)
    dx, dnw, dnb = norm_bwd(x2, dn, dy, mean, rstd, nw, residual)
    grads = (dx, dnw, dnb, dw1, db1, dw2, db2)
    return tuple(g if n else None for g, n in zip(grads, need, strict=True))


# --------------------------------------------------------------------------------------
# the custom ops: single nodes for torch.compile and torch.export
# --------------------------------------------------------------------------------------
# An output a call has no use for (mean for norm="rms", the saved tensors of a call without
# gradients, the gradient of an input that needs none) is an empty (0,) tensor, since an op
# cannot return None. The backward op has no autograd of its own (no double backward).


@torch.library.custom_op("igpt::ln_mlp", mutates_args=())
def ln_mlp_op(
    x2: Tensor,
    nw: Tensor | None,
    nb: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    norm: str,
    eps: float,
    activation: str,
    residual: bool,
    variant: str,
    needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The norm-MLP forward (``variant`` "fused" or "cublas") on x2 (T, d): see ``forward``."""
    args = (norm, eps, activation, residual, variant, needs_grad)
    return forward(x2, nw, nb, w1, b1, w2, b2, *args)


@ln_mlp_op.register_fake
def _(x2, nw, nb, w1, b1, w2, b2, norm, eps, activation, residual, variant, needs_grad):
    T = x2.shape[0]
    y = x2.new_empty((T, w2.shape[0]), dtype=x2.dtype if residual else w2.dtype)
    if not needs_grad:
        return y, empty(x2, torch.float32), empty(x2, torch.float32), empty(x2, w1.dtype)
    mean = empty(x2, torch.float32) if norm == "rms" else x2.new_empty((T,), dtype=torch.float32)
    rstd = x2.new_empty((T,), dtype=torch.float32)
    return y, mean, rstd, x2.new_empty((T, w1.shape[0]), dtype=w1.dtype)


@torch.library.custom_op("igpt::ln_mlp_backward", mutates_args=())
def ln_mlp_backward_op(
    dy: Tensor,
    x2: Tensor,
    mean: Tensor,
    rstd: Tensor,
    z: Tensor,
    nw: Tensor | None,
    nb: Tensor | None,
    w1: Tensor,
    w2: Tensor,
    norm: str,
    activation: str,
    residual: bool,
    variant: str,
    has_b1: bool,
    has_b2: bool,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x2, nw, nb, w1, b1, w2, b2): each one whose ``need`` flag is set, the
    others empty. The weights' gradients are in the GEMM dtype (w1's, w2's)."""
    check_saved("ln_mlp", x2, norm, mean, rstd, z=z, h=w1.shape[0])
    cfg = (norm, activation, residual, variant, has_b1, has_b2)
    mean = None if norm == "rms" else mean
    grads = backward(dy, x2, mean, rstd, z, nw, nb, w1, w2, cfg, need)
    return grad_or_empty(grads, need, (x2, x2, x2, w1, w1, w2, w2))


def _ln_mlp_backward_fake(dy, x2, mean, rstd, z, nw, nb, w1, w2, norm, activation, residual,
                          variant, has_b1, has_b2, need):  # fmt: skip
    T, d = x2.shape
    h = w1.shape[0]
    shapes = [(T, d), (d,), (d,), (h, d), (h,), (d, h), (d,)]
    likes = (x2, x2, x2, w1, w1, w2, w2)
    return tuple(
        like.new_empty(shape if n else (0,))
        for shape, n, like in zip(shapes, need, likes, strict=True)
    )


ln_mlp_backward_op.register_fake(_ln_mlp_backward_fake)


def _setup(ctx, inputs, output):
    x2, nw, nb, w1, b1, w2, b2, norm, eps, activation, residual, variant, needs_grad = inputs
    _, mean, rstd, z = output
    ctx.mark_non_differentiable(mean, rstd, z)
    ctx.save_for_backward(x2, mean, rstd, z, nw, nb, w1, w2)
    ctx.cfg = (norm, activation, residual, variant, b1 is not None, b2 is not None)


def _backward(ctx, dy, _dmean, _drstd, _dz):
    need = list(ctx.needs_input_grad[:7])
    grads = ln_mlp_backward_op(dy, *ctx.saved_tensors, *ctx.cfg, need)
    return (*(g if n else None for g, n in zip(grads, need, strict=True)), *[None] * 6)


ln_mlp_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------


# Autocast's GEMM dtype, looked up through this module-level name at call time so that tests
# can simulate CUDA autocast on the CPU (tests/test_ln_mlp.py and test_memory.py patch it).
_autocast_dtype = autocast_dtype

ARG_NAMES = ("x", "norm_weight", "norm_bias", "fc_weight", "fc_bias", "proj_weight", "proj_bias")


def call_fields(x, params, norm, activation, residual):
    """(reasons, key fields) of one call: why "triton"/"cublas" cannot run it (None: they
    can), and what besides dtype, autocast and tokens makes its kind (``ln_gemm.call_kind``)."""
    why = triton_reason(x)
    fields = {
        "d": x.shape[-1],
        "h": params[2].shape[0],
        "norm": norm,
        "act": activation,
        "residual": bool(residual),
        "grad": needs_grad(x, *params),
    }
    return {"triton": why, "cublas": why}, fields


def ln_mlp(
    x,
    norm_weight,
    norm_bias,
    fc_weight,
    fc_bias,
    proj_weight,
    proj_bias,
    *,
    norm="rms",
    eps=1e-5,
    activation="quick_gelu",
    residual=True,
    backend="auto",
):
    """Norm -> fc -> activation -> proj (+ residual), differentiable in x and every weight.

    Args:
        x: (..., d) float16, bfloat16 or float32 (float64 on the "torch" backend).
        norm_weight: (d,) or None; norm_bias: (d,) or None (must be None for norm="rms").
        fc_weight: (h, d); fc_bias: (h,) or None.
        proj_weight: (d, h); proj_bias: (d,) or None.
        norm: "rms" or "layer". eps: the norm's epsilon, a finite number > 0.
        activation: "quick_gelu" or "gelu". residual: add x to the output.
        backend: "auto", "triton" (fused Triton GEMMs), "cublas" (torch's GEMMs around the
            Triton norm) or "torch" (the eager reference). "auto" on the CPU is the
            reference. On a GPU the first call per kind of call has PyTorch judge "triton"
            and "cublas" (output and every gradient against the reference in float64, or
            float32 for 16-bit inputs, within 2x / 3x of PyTorch's own error in the call's
            dtype and autocast, on at most a few thousand tokens: ``igpt_kernels.trust``)
            and runs the fastest of those that pass and "torch". While compiling, capturing
            or under ``IGPT_DISPATCH=fixed``: "triton" only where this GPU's dispatch table
            records it as verified for the kind of call, else "torch". A named backend
            runs as named, unjudged.

    Returns:
        y: (..., d) in x's dtype. Under CUDA autocast with float32 inputs the GEMMs run in
        autocast's dtype while the norm and the residual stay in float32, as in eager
        PyTorch: y is float32 with residual=True and in autocast's dtype without.
    """
    reference.check_ln_mlp(
        x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, norm, eps, activation
    )
    params = (norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias)
    opts = (norm, float(eps), activation, bool(residual))

    def call(name, x, *params):
        return _ln_mlp_on(name, x, params, *opts)

    reasons, fields = call_fields(x, params, norm, activation, residual)
    name = choose_norm_backend("ln_mlp", x, backend, reasons, fields, call, params, ARG_NAMES)
    return _ln_mlp_on(name if x.numel() else "torch", x, params, *opts)


def _ln_mlp_on(name, x, params, norm, eps, activation, residual):
    if name == "torch":
        return reference.ln_mlp(
            x, *params, norm=norm, eps=eps, activation=activation, residual=residual
        )
    norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias = params
    gemm = for_gemm(_autocast_dtype(x), fc_weight, fc_bias, proj_weight, proj_bias)
    weights = unit_stride((norm_weight, norm_bias, *gemm))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, d)
    variant = "fused" if name == "triton" else "cublas"
    opts = (norm, eps, activation, residual, variant, needs_grad(x, *weights))
    return ln_mlp_op(x2, *weights, *opts)[0].view(x.shape)
