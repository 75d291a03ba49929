"""The launchers of the norm-prologue GEMM kernels (``ln_mlp_kernels``), shared by ``ln_mlp``
and ``ln_linear``: the block-size lists and their autotuners, the row statistics, the fc GEMM
with the norm applied to its A tiles on load, the plain/epilogue GEMM, the split-K weight
gradient and the norm backward; and the small helpers both ops' custom ops and public
functions share (the Triton eligibility, autocast's GEMM dtype, the saved-tensor checks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from igpt_kernels import _triton
from igpt_kernels._dispatch import (
    bucket,
    choose,
    grad_run,
    judge_call,
    needs_grad,
    triton_interpreting,
    triton_unavailable,
)
from igpt_kernels._triton import triton
from igpt_kernels.ln_mlp_kernels import (
    ln_fc_kernel,
    mm_kernel,
    norm_bwd_kernel,
    norm_stats_kernel,
    wgrad_kernel,
)
from igpt_kernels.trust import row_sample

MAX_D = 8192  # the norm backward holds one row of x in registers
ACT_ID = {None: 0, "quick_gelu": 1, "gelu": 2}
_MIN_TOKENS_PER_SPLIT = 1024  # the weight-gradient GEMMs split T no finer than this,
_SPLIT_ALIGN = 256  # into chunks of a multiple of this (of every BLOCK_K)
_NORM_BWD_TILE = 4096  # elements per (rows x d) tile of the norm backward


# --------------------------------------------------------------------------------------
# block sizes: one config under the interpreter, a short sweep on the GPU
# --------------------------------------------------------------------------------------


_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def _configs(gpu_sweep, interpreted):
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) rows; the interpreter
    cannot autotune, so it gets the single ``interpreted`` (BLOCK_M, BLOCK_N, BLOCK_K)."""
    if triton_interpreting():
        return _triton.configs(_BLOCKS, [(*interpreted, 4, 3)], GROUP_M=4)
    if isinstance(gpu_sweep, dict):  # per architecture (see _triton.Tuned)
        return {arch: _triton.configs(_BLOCKS, rows, GROUP_M=8) for arch, rows in gpu_sweep.items()}
    return _triton.configs(_BLOCKS, gpu_sweep, GROUP_M=8)


# Kept short: every config is compiled for every dtype and flag combination on first use.
# The first of each list is the default when autotuning is off. Every config compiles
# without register spills and within the shared memory of sm_90a and sm_80 in 16-bit and
# under autocast (tests/test_compile.py checks; benchmarks/RESULTS.md, "Compiled code",
# has the numbers): the epilogues run in two column halves (_store_halves), which is what
# freed the registers for 128x256 and the 4-stage 128x128.
_GEMM_SWEEP = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]
# The dgrad GEMM's act' epilogue (z loaded, act and act' computed) still spills at 128x256
# with halves (36 B on both architectures), so it keeps the 128-wide tiles.
_DACT_SWEEP = [row for row in _GEMM_SWEEP if row[1] <= 128]
# ln_fc normalises its x tile on load; under autocast x is float32, and on sm_80 (whose
# mma.sync takes operands from registers) the 128x256 tile then spills 52-212 B, so
# sm_80 keeps the 128-wide tiles for ln_fc.
_FC_SWEEP = {90: _GEMM_SWEEP, 80: _DACT_SWEEP}
# The weight-gradient GEMMs reduce over tokens; BLOCK_K must divide _SPLIT_ALIGN.
_WGRAD_SWEEP = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4)]
# Pure float32 (no autocast) runs IEEE fp32 dots on CUDA cores unless torch allows TF32:
# the 16-bit tiles then spill (sm_80: ptxas drops to 32 registers, ~9 KB of spills), so
# float32 has its own small tiles, spill-free on both architectures. The weight gradient
# reduces over BLOCK_K=16 tokens per step: an FMA dot holds each thread's whole K-slice of
# both operands in registers, and dW1's norm recomputed on load adds an fp32 copy of the
# x tile, so at BLOCK_K=32 ptxas hit 255 registers and spilled on sm_90a (4 B at 32x32,
# 12-20 B at 64x64); at 16 the 64x64 tile (8 warps) takes 166 on both architectures. It
# is a correctness path; backend="cublas" (torch's SGEMM) is the fast one for float32.
_FP32_SWEEPS = {
    "fc": [(64, 64, 32, 4, 3)],
    "mm": [(64, 64, 32, 4, 3)],
    "dact": [(64, 64, 32, 4, 3)],
    "wgrad": [(64, 64, 16, 8, 3)],
}

# Keys bucket the token count so a growing T (sampling) does not retune every call.
_KEYS = {
    "fc": ["N", "K", "t_bucket"],
    "mm": ["N", "K", "t_bucket", "HAS_RESID"],
    "dact": ["N", "K", "t_bucket", "DACT"],
    "wgrad": ["M", "N", "tokens_per_split"],
}
_KERNELS = {"fc": ln_fc_kernel, "mm": mm_kernel, "dact": mm_kernel, "wgrad": wgrad_kernel}
_SWEEPS = {"fc": _FC_SWEEP, "mm": _GEMM_SWEEP, "dact": _DACT_SWEEP, "wgrad": _WGRAD_SWEEP}
# (name, float32?) -> the kernel with its configs and autotuner
TUNED = {
    (name, fp32): _triton.Tuned(
        _KERNELS[name],
        _configs(
            (_FP32_SWEEPS if fp32 else _SWEEPS)[name], (32, 32 if name == "wgrad" else 64, 32)
        ),
        _KEYS[name],
    )
    for name in _KERNELS
    for fp32 in (False, True)
}


def _tuned(name, dtype):
    return TUNED[(name, dtype == torch.float32)]


def _precision(dtype) -> str | None:
    """Exact fp32 dots unless torch itself allows TF32 for matmuls (None: 16-bit inputs)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _bucket(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 1)), 1 << 16)


def _grid2d(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def norm_stats(x2, norm, eps):
    """fp32 (mean or None, rstd) of each row of x2 (T, d)."""
    T, D = x2.shape
    rstd = torch.empty(T, device=x2.device, dtype=torch.float32)
    mean = None if norm == "rms" else torch.empty_like(rstd)
    block_d = min(triton.next_power_of_2(D), 256 if triton_interpreting() else 1024)
    block_t = max(1, min(16, 4096 // block_d))
    norm_stats_kernel[(triton.cdiv(T, block_t),)](
        x2,
        mean if mean is not None else rstd,
        rstd,
        T,
        D,
        x2.stride(0),
        float(eps),
        IS_RMS=norm == "rms",
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return mean, rstd


def ln_fc_fwd(x2, mean, rstd, nw, nb, w, b, act, store_z):
    """(z or None, act(z) or None) for z = norm(x2) @ w^T + b; w: (N, d)."""
    T, K = x2.shape
    N = w.shape[0]
    z = torch.empty(T, N, device=x2.device, dtype=w.dtype) if store_z else None
    a = torch.empty(T, N, device=x2.device, dtype=w.dtype) if act is not None else None
    _tuned("fc", w.dtype).launch(
        _grid2d(T, N),
        x2,
        mean if mean is not None else rstd,
        rstd,
        nw if nw is not None else rstd,
        nb if nb is not None else rstd,
        w,
        b if b is not None else rstd,
        z if z is not None else a,
        a if a is not None else z,
        T,
        N,
        K,
        x2.stride(0),
        w.stride(0),
        w.stride(1),
        N,
        t_bucket=_bucket(T),
        IS_RMS=mean is None,
        HAS_NW=nw is not None,
        HAS_NB=nb is not None,
        HAS_BIAS=b is not None,
        ACT=ACT_ID[act],
        STORE_Z=store_z,
        PRECISION=_precision(w.dtype),  # the dot multiplies n (cast to w.dtype) by w
    )
    return z, a


def matmul(a, b, *, bias=None, resid=None, z=None, act=None, out_dtype=None):
    """a (M, K) @ b (K, N) (+ bias) (+ resid); with act: (a @ b) * act'(z) and act(z)."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=out_dtype or a.dtype)
    aout = torch.empty_like(z) if act is not None else None
    dummy = c
    _tuned("mm" if act is None else "dact", a.dtype).launch(
        _grid2d(M, N),
        a,
        b,
        c,
        bias if bias is not None else dummy,
        resid if resid is not None else dummy,
        z if z is not None else dummy,
        aout if aout is not None else dummy,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        resid.stride(0) if resid is not None else 0,
        z.stride(0) if z is not None else 0,
        t_bucket=_bucket(M),
        HAS_BIAS=bias is not None,
        HAS_RESID=resid is not None,
        DACT=ACT_ID[act],
        PRECISION=_precision(a.dtype),
    )
    return c, aout


_num_sms = _triton.sm_count


def wgrad(g, v, *, norm_args=None, bias_grad=True):
    """(g^T @ v, sum_t g or None) in fp32 then g's dtype; v = norm(x) with norm_args.

    g: (T, M), v: (T, N). The token reduction is split over programs so that small weight
    matrices still fill the GPU; each split writes its own fp32 partial, summed afterwards.
    """
    T, M = g.shape
    N = v.shape[1]
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    splits = max(1, min(triton.cdiv(2 * _num_sms(g.device), tiles), T // _MIN_TOKENS_PER_SPLIT))
    per_split = triton.cdiv(triton.cdiv(T, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(T, per_split)
    dw = torch.empty(splits, M, N, device=g.device, dtype=torch.float32)
    db = torch.empty(splits, M, device=g.device, dtype=torch.float32) if bias_grad else None
    mean, rstd, nw, nb = norm_args if norm_args is not None else (None, None, None, None)
    dummy = dw
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),
        splits,
    )
    _tuned("wgrad", g.dtype).launch(
        grid,
        g,
        v,
        mean if mean is not None else dummy,
        rstd if rstd is not None else dummy,
        nw if nw is not None else dummy,
        nb if nb is not None else dummy,
        dw,
        db if db is not None else dummy,
        T,
        M,
        N,
        per_split,
        g.stride(0),
        v.stride(0),
        dw.stride(0),
        dw.stride(1),
        db.stride(0) if db is not None else 0,
        NORM_X=norm_args is not None,
        IS_RMS=mean is None,
        HAS_NW=nw is not None,
        HAS_NB=nb is not None,
        HAS_DB=bias_grad,
        PRECISION=_precision(g.dtype),
    )
    dw = dw.sum(0) if splits > 1 else dw[0]
    db = None if db is None else (db.sum(0) if splits > 1 else db[0])
    return dw.to(g.dtype), None if db is None else db.to(g.dtype)


def norm_bwd(x2, dn, dy, mean, rstd, nw, residual):
    """(dx, d norm_weight, d norm_bias): the norm backward fused with the residual's dy."""
    T, D = x2.shape
    dx = torch.empty_like(x2)
    block_d = triton.next_power_of_2(D)
    programs = max(1, min(T, 4 * _num_sms(x2.device)))
    rows = triton.cdiv(T, programs)
    programs = triton.cdiv(T, rows)
    dnw = torch.empty(programs, D, device=x2.device, dtype=torch.float32)
    dnb = torch.empty_like(dnw)
    norm_bwd_kernel[(programs,)](
        x2,
        dn,
        dy,
        mean if mean is not None else rstd,
        rstd,
        nw if nw is not None else rstd,
        dx,
        dnw,
        dnb,
        T,
        D,
        rows,
        x2.stride(0),
        dn.stride(0),
        dy.stride(0),
        dx.stride(0),
        IS_RMS=mean is None,
        HAS_NW=nw is not None,
        RESIDUAL=residual,
        BLOCK_T=max(1, _NORM_BWD_TILE // block_d),
        BLOCK_D=block_d,
        num_warps=8 if block_d >= 2048 else 4,
    )
    return dx, dnw.sum(0).to(x2.dtype), dnb.sum(0).to(x2.dtype)


# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# what ln_mlp and ln_linear share around the launchers
# --------------------------------------------------------------------------------------


def triton_reason(x) -> str | None:
    """Why the Triton kernels (of "triton" and of "cublas") cannot run on x, or None."""
    why = triton_unavailable(x, "x")
    if why is None and x.shape[-1] > MAX_D:
        why = f"d={x.shape[-1]} is larger than the Triton kernels' limit of {MAX_D}"
    return why


def autocast_dtype(x):
    """The dtype CUDA autocast runs GEMMs in when it would change x's float32, else None."""
    if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    dtype = torch.get_autocast_dtype("cuda")
    return dtype if x.dtype == torch.float32 and dtype != torch.float32 else None


def for_gemm(dtype, *tensors):
    """Cast the GEMM operands to autocast's dtype (differentiably, as autocast would)."""
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)


def unit_stride(tensors):
    """The 1-D weights and biases as contiguous tensors (the kernels read them as ``P + i``);
    differentiable, and free when they already are. 2-D weights keep their strides."""
    return tuple(t.contiguous() if t is not None and t.dim() == 1 else t for t in tensors)


def empty(like: Tensor, dtype=None) -> Tensor:
    """A (0,) tensor on like's device: the stand-in for an output a call has no use for."""
    return like.new_empty((0,), dtype=dtype)


def check_saved(op, x2, norm, mean, rstd, z=None, h=None):
    """A ValueError unless the saved tensors are those of a forward with needs_grad=True
    (the kernels read them unchecked: a wrong size would read out of bounds)."""
    T = x2.shape[0]
    want = {"mean": (0 if norm == "rms" else T,), "rstd": (T,)}
    got = {"mean": tuple(mean.shape), "rstd": tuple(rstd.shape)}
    if z is not None:
        want["z"], got["z"] = (T, h), tuple(z.shape)
    if got != want:
        raise ValueError(
            f"igpt::{op}_backward needs what igpt::{op} saves with needs_grad=True: shapes "
            f"{want}, got {got} (was the forward called with needs_grad=False?)"
        )


def grad_or_empty(grads, need, likes):
    """Each gradient that was asked for, else an empty placeholder of its input's dtype."""
    return tuple(
        g if n and g is not None else empty(like, like.dtype)
        for g, n, like in zip(grads, need, likes, strict=True)
    )


def call_kind(x, reasons, fields):
    """(candidate backend names, key fields) of one call of ln_mlp or ln_linear on a GPU:
    the runnable backends and the reference; x's dtype, autocast, token bucket, ``fields``."""
    names = [name for name, why in reasons.items() if why is None] + ["torch"]
    cast = autocast_dtype(x)
    return names, {
        "dtype": str(x.dtype)[6:],
        "autocast": str(cast)[6:] if cast is not None else "off",
        "T": bucket(x.numel() // x.shape[-1]),
        **fields,
    }


def call_judge(x, params, fn, arg_names):
    """judge(names) of ``"auto"`` for one call of ln_mlp or ln_linear
    (``_dispatch.judge_call``): each candidate runs the call itself and is compared with the
    oracle on a sample of rows (``trust.row_sample``; the cotangent is zero elsewhere)."""
    return judge_call(fn, (x, *params), arg_names, needs_grad(x, *params), row_sample)


def choose_norm_backend(op, x, backend, reasons, fields, fn, params, arg_names):
    """The backend of one call of ``op`` ("ln_mlp" or "ln_linear"): ``resolve`` for a named
    one or the static "auto" (Triton on a GPU once verified there), then on a GPU the
    fastest of the runnable ones and the reference that passes PyTorch's check.

    fn(name, x, *params): the op on one backend; arg_names: x's and the params' names."""

    def describe():
        return call_kind(x, reasons, fields)

    run = grad_run(fn, (x, *params))
    judge = call_judge(x, params, fn, arg_names)
    return choose(op, x.device, backend, reasons, ("triton",), describe, run, judge, "torch")
