"""The "cublas" backend of ``ln_mlp``: all six GEMMs (two forward, four backward) by torch
(cuBLAS), only the norm and the elementwise parts in Triton. Unlike the fused kernels it
writes the normalised x (n) and the activation (a) to memory as temporaries; it saves the
same tensors for backward (x, the fp32 row statistics, z), so the custom op ``igpt::ln_mlp``
runs either variant behind one schema.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igpt_kernels._triton import tl, triton
from igpt_kernels.ln_gemm import ACT_ID
from igpt_kernels.ln_mlp_kernels import act_bwd, act_fwd


@triton.jit
def _norm_apply_kernel(
    X,
    Mean,
    Rstd,
    NW,
    NB,
    Out,
    T,
    D,
    stride_xt,
    IS_RMS: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    n = tl.load(X + rows[:, None] * stride_xt + cols[None, :], mask=ok, other=0.0)
    n = n.to(tl.float32)
    if not IS_RMS:
        n -= tl.load(Mean + rows, mask=row_ok, other=0.0)[:, None]
    n *= tl.load(Rstd + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_NW:
        n *= tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NB:
        n += tl.load(NB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + rows[:, None] * D + cols[None, :], n.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _act_kernel(
    Z, G, Out, Out2, numel, ACT: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr
):
    """Forward: out = act(z). Backward: out = g * act'(z), out2 = act(z)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    z = tl.load(Z + offs, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        act, dact = act_bwd(z, ACT)
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + offs, (g * dact).to(Out.dtype.element_ty), mask=ok)
        tl.store(Out2 + offs, act.to(Out2.dtype.element_ty), mask=ok)
    else:
        tl.store(Out + offs, act_fwd(z, ACT).to(Out.dtype.element_ty), mask=ok)


def _norm_apply(x2, mean, rstd, nw, nb, dtype):
    T, D = x2.shape
    out = torch.empty(T, D, device=x2.device, dtype=dtype)
    block_t, block_d = 16, min(triton.next_power_of_2(D), 256)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _norm_apply_kernel[grid](
        x2,
        mean if mean is not None else rstd,
        rstd,
        nw if nw is not None else rstd,
        nb if nb is not None else rstd,
        out,
        T,
        D,
        x2.stride(0),
        IS_RMS=mean is None,
        HAS_NW=nw is not None,
        HAS_NB=nb is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


def _act_elementwise(z, act, g=None):
    """act(z), or (g * act'(z), act(z)) when g is given; z, g contiguous."""
    out = torch.empty_like(z)
    out2 = torch.empty_like(z) if g is not None else out
    block = 1024
    _act_kernel[(triton.cdiv(z.numel(), block),)](
        z,
        g if g is not None else z,
        out,
        out2,
        z.numel(),
        ACT=ACT_ID[act],
        BACKWARD=g is not None,
        BLOCK=block,
    )
    return out if g is None else (out, out2)


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


def forward(x2, mean, rstd, nw, nb, w1, b1, w2, b2, act, residual):
    """(y, z): y = act(norm(x2) @ w1^T + b1) @ w2^T + b2 (+ x2), z the pre-activation.

    The operands already have the GEMM dtype (w1's); autocast must not recast them."""
    with torch.autocast(x2.device.type, enabled=False):
        n = _norm_apply(x2, mean, rstd, nw, nb, w1.dtype)
        z = F.linear(n, w1, b1)
        del n
        a = _act_elementwise(z, act)
        y = F.linear(a, w2, b2)
        if residual:
            y = y.add_(x2) if y.dtype == x2.dtype else x2 + y
    return y, z


def backward(dyc, x2, mean, rstd, z, nw, nb, w1, w2, act, has_b1, has_b2):
    """(dw1, db1, dw2, db2, dn) from dyc (dy in the GEMM dtype); dn in fp32 for the norm
    backward. A bias gradient is None where the bias is."""
    with torch.autocast(x2.device.type, enabled=False):
        dz, a = _act_elementwise(z, act, dyc @ w2)
        dw2, db2 = dyc.t() @ a, dyc.sum(0) if has_b2 else None
        del a
        n = _norm_apply(x2, mean, rstd, nw, nb, w1.dtype)
        dw1, db1 = dz.t() @ n, dz.sum(0) if has_b1 else None
        del n
        dn = (dz @ w1).float()
    return dw1, db1, dw2, db2, dn
