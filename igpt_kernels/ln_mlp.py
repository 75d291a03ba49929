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
fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch does. Every
bias may be None; norm_bias must be None for "rms". Under CUDA autocast with float32 inputs
(the training loop's bf16 autocast over fp32 weights) the fc/proj weights are cast to the
autocast dtype, the norm reads float32 x and rounds its output to that dtype on the A-tile
load, and the residual is added to the fp32 accumulator: eager autocast's semantics.

Backends: "triton" runs every GEMM in Triton with the fusions above. "cublas" runs all six
GEMMs (two forward, four backward) with torch (cuBLAS) and keeps only the norm and
elementwise parts in Triton (it must write n and a to memory as temporaries); it saves the
same tensors for backward. "torch" is the eager reference. "auto" on a GPU times the three
on the first call per (dtype, autocast, d, h, token bucket, grad, ...) and keeps the fastest
(``igpt_kernels._dispatch``); ``IGPT_DISPATCH=fixed`` gives "triton" where it can run.

Measured: nothing on a GPU yet; correctness was checked under the interpreter (fp32/fp16)
only. ``benchmarks/bench_ln_mlp.py`` times every backend against eager and torch.compile.
The GEMM block sizes are autotuned on the GPU from a short list (``_triton.AUTOTUNE``;
``IGPT_AUTOTUNE=0`` runs the first of each list, as the GPU tests do).

``ln_linear`` is the same norm-prologue GEMM without the activation and the second GEMM:
``y = norm(x) @ W^T + b``, for the attention block's qkv projection.
"""

from __future__ import annotations

import torch

from igpt_kernels import _dispatch, _ops, _triton, reference
from igpt_kernels._dispatch import bucket, resolve, triton_interpreting, triton_unavailable
from igpt_kernels._triton import tl, triton

MAX_D = 8192  # the norm backward holds one row of x in registers
_ACT_ID = {None: 0, "quick_gelu": 1, "gelu": 2}
_MIN_TOKENS_PER_SPLIT = 1024  # the weight-gradient GEMMs split T no finer than this,
_SPLIT_ALIGN = 256  # into chunks of a multiple of this (of every BLOCK_K)
_NORM_BWD_TILE = 4096  # elements per (rows x d) tile of the norm backward


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """act(z) in fp32: 1 = quick_gelu, 2 = gelu (erf), 0 = identity."""
    if ACT == 1:
        return z * tl.sigmoid(1.702 * z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z


@triton.jit
def _act_bwd(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in fp32, sharing the sigmoid / erf between the two."""
    if ACT == 1:
        s = tl.sigmoid(1.702 * z)
        return z * s, s + 1.702 * z * s * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row blocks share the column blocks they read (L2 reuse)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right (BLOCK_M, BLOCK_N / 2) column halves of an accumulator tile.

    The epilogues run once per half ("epilogue subtiling", as in Triton's persistent-matmul
    tutorial): their loads (bias, residual, z) and the activation math then hold half a
    tile of registers next to the accumulator instead of a whole one. On sm_90a that took
    the dgrad GEMM's act' epilogue from 255 registers with 48 B of spills to none, and made
    the 128x256 and 4-stage configs spill-free (see benchmarks/RESULTS.md; not ln_fc's
    128x256 on sm_80 under autocast, see _FC_SWEEP).
    """
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _fc_epilogue(
    acc, rows, cols, row_ok, N, Bias, Z, A, stride_zt,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
):  # fmt: skip
    """z = acc + bias and a = act(z), stored for the columns ``cols`` of the tile."""
    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc.to(Z.dtype.element_ty)
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * stride_zt + cols[None, :]
    if STORE_Z:
        tl.store(Z + offs, z, mask=ok)
    if ACT != 0:
        tl.store(A + offs, _act_fwd(z.to(tl.float32), ACT).to(A.dtype.element_ty), mask=ok)


@triton.jit
def _mm_epilogue(
    acc, rows, cols, row_ok, N, C, Bias, R, Z, Aout, stride_cm, stride_rm, stride_zm,
    HAS_BIAS: tl.constexpr, HAS_RESID: tl.constexpr, DACT: tl.constexpr,
):  # fmt: skip
    """c = acc (+ bias) (+ r), or with DACT c = acc * act'(z) and aout = act(z), for ``cols``."""
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESID:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=ok, other=0.0)
        acc += r.to(tl.float32)
    if DACT != 0:
        z_offs = rows[:, None] * stride_zm + cols[None, :]
        z = tl.load(Z + z_offs, mask=ok, other=0.0).to(tl.float32)
        act, dact = _act_bwd(z, DACT)
        acc = acc * dact
        tl.store(Aout + z_offs, act.to(Aout.dtype.element_ty), mask=ok)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty), mask=ok)


@triton.jit
def _norm_stats_kernel(
    X,
    Mean,
    Rstd,
    T,
    D,
    stride_xt,
    eps,
    IS_RMS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_D)
    mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if not IS_RMS:
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            ok = row_ok[:, None] & (k + cols < D)[None, :]
            ptr = X + rows[:, None] * stride_xt + (k + cols)[None, :]
            acc += tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / D
        tl.store(Mean + rows, mean, mask=row_ok)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (k + cols < D)[None, :]
        ptr = X + rows[:, None] * stride_xt + (k + cols)[None, :]
        xc = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) - mean[:, None]
        xc = tl.where(ok, xc, 0.0)
        acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _ln_fc_kernel(
    X,
    Mean,
    Rstd,
    NW,
    NB,
    W,
    Bias,
    Z,
    A,
    T,
    N,
    K,
    stride_xt,
    stride_wn,
    stride_wk,
    stride_zt,
    t_bucket,
    IS_RMS: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """z = norm(x) @ W^T + bias, a = act(z): the norm applied to each A tile as it loads."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    col_ok = cols < N
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    if IS_RMS:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_xt + ks[None, :], mask=ok, other=0.0)
        n = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_NW:
            n = n * tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_NB:
            n = n + tl.load(NB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        n = tl.where(ok, n, 0.0).to(W.dtype.element_ty)
        w_ptr = W + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        w = tl.load(w_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(n, w, acc, input_precision=PRECISION)
    left, right = _halves(acc, BLOCK_M, BLOCK_N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    _fc_epilogue(left, rows, cols, row_ok, N, Bias, Z, A, stride_zt, HAS_BIAS, ACT, STORE_Z)
    cols += BLOCK_N // 2
    _fc_epilogue(right, rows, cols, row_ok, N, Bias, Z, A, stride_zt, HAS_BIAS, ACT, STORE_Z)


@triton.jit
def _mm_kernel(
    A,
    B,
    C,
    Bias,
    R,
    Z,
    Aout,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_rm,
    stride_zm,
    t_bucket,
    HAS_BIAS: tl.constexpr,
    HAS_RESID: tl.constexpr,
    DACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c = a @ b (+ bias) (+ r); with DACT, c = (a @ b) * act'(z) and aout = act(z).

    Rows of A, C, R and Z are contiguous (unit column stride); B may be transposed.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_ptr = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptr = B + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    left, right = _halves(acc, BLOCK_M, BLOCK_N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    _mm_epilogue(
        left, rows, cols, row_ok, N, C, Bias, R, Z, Aout, stride_cm, stride_rm, stride_zm,
        HAS_BIAS, HAS_RESID, DACT,
    )  # fmt: skip
    cols += BLOCK_N // 2
    _mm_epilogue(
        right, rows, cols, row_ok, N, C, Bias, R, Z, Aout, stride_cm, stride_rm, stride_zm,
        HAS_BIAS, HAS_RESID, DACT,
    )  # fmt: skip


@triton.jit
def _wgrad_kernel(
    G,
    X,
    Mean,
    Rstd,
    NW,
    NB,
    DW,
    DB,
    T,
    M,
    N,
    tokens_per_split,
    stride_gt,
    stride_xt,
    stride_dws,
    stride_dwm,
    stride_dbs,
    NORM_X: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_DB: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Partial dW[s] = g^T @ v over split s of the tokens, v = norm(x) if NORM_X else x.

    g: (T, M), x: (T, N), DW: (splits, M, N) fp32; DB[s] = sum over the split of g (M,),
    written by the programs of the first column block only.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    t_start = split.to(tl.int64) * tokens_per_split
    t_end = min(t_start + tokens_per_split, T)
    if HAS_NW:
        nw = tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_NB:
        nb = tl.load(NB + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_K):
        ts = t0 + tl.arange(0, BLOCK_K)
        t_ok = ts < t_end
        g_ptr = G + ts[None, :] * stride_gt + rows[:, None]
        g = tl.load(g_ptr, mask=row_ok[:, None] & t_ok[None, :], other=0.0)  # (M, K) = g^T
        ok = t_ok[:, None] & col_ok[None, :]
        v = tl.load(X + ts[:, None] * stride_xt + cols[None, :], mask=ok, other=0.0)
        if NORM_X:
            rstd = tl.load(Rstd + ts, mask=t_ok, other=0.0)
            n = v.to(tl.float32)
            if not IS_RMS:
                n = n - tl.load(Mean + ts, mask=t_ok, other=0.0)[:, None]
            n = n * rstd[:, None]
            if HAS_NW:
                n = n * nw[None, :]
            if HAS_NB:
                n = n + nb[None, :]
            v = tl.where(ok, n, 0.0).to(G.dtype.element_ty)
        acc = tl.dot(g, v, acc, input_precision=PRECISION)
        if HAS_DB:
            # only the first column block stores db: the others skip its shared-memory
            # reload of g and the row reduction (a branch uniform across the program)
            if pid_n == 0:
                db += tl.sum(g.to(tl.float32), axis=1)
    dw_ptr = DW + split * stride_dws + rows[:, None] * stride_dwm + cols[None, :]
    tl.store(dw_ptr, acc, mask=row_ok[:, None] & col_ok[None, :])
    if HAS_DB:
        if pid_n == 0:
            tl.store(DB + split * stride_dbs + rows, db, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    X,
    DN,
    DY,
    Mean,
    Rstd,
    NW,
    DX,
    DNW,
    DNB,
    T,
    D,
    rows_per_program,
    stride_xt,
    stride_dnt,
    stride_dyt,
    stride_dxt,
    IS_RMS: tl.constexpr,
    HAS_NW: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx = norm backward of dn (+ dy); per-program fp32 partials of dw = sum dn xhat, db.

    Each program owns rows_per_program consecutive rows and walks them BLOCK_T at a time,
    whole rows per tile, so the per-row reductions stay in registers.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_NW:
        w = tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = min(first + rows_per_program, T)
    for r0 in range(first, last, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        row_ok = rows < last
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_xt + cols[None, :], mask=ok, other=0.0)
        dn = tl.load(DN + rows[:, None] * stride_dnt + cols[None, :], mask=ok, other=0.0)
        dn = dn.to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)[:, None]
        xhat = x.to(tl.float32)
        if not IS_RMS:
            xhat -= tl.load(Mean + rows, mask=row_ok, other=0.0)[:, None]
        xhat = tl.where(ok, xhat * rstd, 0.0)
        dxhat = dn
        if HAS_NW:
            dxhat = dn * w[None, :]
        dx = dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / D)[:, None]
        if not IS_RMS:
            dx -= (tl.sum(dxhat, axis=1) / D)[:, None]
        dx *= rstd
        if RESIDUAL:
            dy = tl.load(DY + rows[:, None] * stride_dyt + cols[None, :], mask=ok, other=0.0)
            dx += dy.to(tl.float32)
        dx_ptr = DX + rows[:, None] * stride_dxt + cols[None, :]
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=ok)
        dw += tl.sum(dn * xhat, axis=0)
        db += tl.sum(dn, axis=0)
    tl.store(DNW + pid * D + cols, dw, mask=col_ok)
    tl.store(DNB + pid * D + cols, db, mask=col_ok)


# --------------------------------------------------------------------------------------
# launchers
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
_KERNELS = {"fc": _ln_fc_kernel, "mm": _mm_kernel, "dact": _mm_kernel, "wgrad": _wgrad_kernel}
_SWEEPS = {"fc": _FC_SWEEP, "mm": _GEMM_SWEEP, "dact": _DACT_SWEEP, "wgrad": _WGRAD_SWEEP}
# (name, float32?) -> the kernel with its configs and autotuner
_TUNED = {
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
    return _TUNED[(name, dtype == torch.float32)]


def _precision(dtype) -> str | None:
    """Exact fp32 dots unless torch itself allows TF32 for matmuls (None: 16-bit inputs)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _bucket(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 1)), 1 << 16)


def _grid2d(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _norm_stats(x2, norm, eps):
    """fp32 (mean or None, rstd) of each row of x2 (T, d)."""
    T, D = x2.shape
    rstd = torch.empty(T, device=x2.device, dtype=torch.float32)
    mean = None if norm == "rms" else torch.empty_like(rstd)
    block_d = min(triton.next_power_of_2(D), 256 if triton_interpreting() else 1024)
    block_t = max(1, min(16, 4096 // block_d))
    _norm_stats_kernel[(triton.cdiv(T, block_t),)](
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


def _ln_fc_fwd(x2, mean, rstd, nw, nb, w, b, act, store_z):
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
        ACT=_ACT_ID[act],
        STORE_Z=store_z,
        PRECISION=_precision(w.dtype),  # the dot multiplies n (cast to w.dtype) by w
    )
    return z, a


def _matmul(a, b, *, bias=None, resid=None, z=None, act=None, out_dtype=None):
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
        DACT=_ACT_ID[act],
        PRECISION=_precision(a.dtype),
    )
    return c, aout


_num_sms = _triton.sm_count


def _wgrad(g, v, *, norm_args=None, bias_grad=True):
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


def _norm_bwd(x2, dn, dy, mean, rstd, nw, residual):
    """(dx, d norm_weight, d norm_bias): the norm backward fused with the residual's dy."""
    T, D = x2.shape
    dx = torch.empty_like(x2)
    block_d = triton.next_power_of_2(D)
    programs = max(1, min(T, 4 * _num_sms(x2.device)))
    rows = triton.cdiv(T, programs)
    programs = triton.cdiv(T, rows)
    dnw = torch.empty(programs, D, device=x2.device, dtype=torch.float32)
    dnb = torch.empty_like(dnw)
    _norm_bwd_kernel[(programs,)](
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
# cuBLAS variant: torch GEMMs, Triton for the norm and elementwise parts only
# --------------------------------------------------------------------------------------


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
        act, dact = _act_bwd(z, ACT)
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + offs, (g * dact).to(Out.dtype.element_ty), mask=ok)
        tl.store(Out2 + offs, act.to(Out2.dtype.element_ty), mask=ok)
    else:
        tl.store(Out + offs, _act_fwd(z, ACT).to(Out.dtype.element_ty), mask=ok)


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
        ACT=_ACT_ID[act],
        BACKWARD=g is not None,
        BLOCK=block,
    )
    return out if g is None else (out, out2)


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


class _LnMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, nw, nb, w1, b1, w2, b2, norm, eps, act, residual, variant, needs_grad):
        mean, rstd = _norm_stats(x2, norm, eps)
        if variant == "fused":
            z, a = _ln_fc_fwd(x2, mean, rstd, nw, nb, w1, b1, act, store_z=needs_grad)
            out_dtype = x2.dtype if residual else w2.dtype
            y, _ = _matmul(a, w2.t(), bias=b2, resid=x2 if residual else None, out_dtype=out_dtype)
        else:  # the operands already have the GEMM dtype; autocast must not recast them
            with torch.autocast(x2.device.type, enabled=False):
                n = _norm_apply(x2, mean, rstd, nw, nb, w1.dtype)
                z = torch.nn.functional.linear(n, w1, b1)
                del n
                a = _act_elementwise(z, act)
                y = torch.nn.functional.linear(a, w2, b2)
                if residual:
                    y = y.add_(x2) if y.dtype == x2.dtype else x2 + y
        del a
        if needs_grad:
            ctx.save_for_backward(x2, mean, rstd, z, nw, nb, w1, w2)
        ctx.cfg = (norm, act, residual, variant, b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, mean, rstd, z, nw, nb, w1, w2 = ctx.saved_tensors
        norm, act, residual, variant, has_b1, has_b2 = ctx.cfg
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dyc = dy.to(w2.dtype)  # the GEMMs' dtype (differs from x's under autocast)
        if variant == "fused":
            dz, a = _matmul(dyc, w2, z=z, act=act)
            dw2, db2 = _wgrad(dyc, a, bias_grad=has_b2) if need[5] or need[6] else (None, None)
            del a
            if need[3] or need[4]:
                dw1, db1 = _wgrad(dz, x2, norm_args=(mean, rstd, nw, nb), bias_grad=has_b1)
            else:
                dw1, db1 = None, None
            dn, _ = _matmul(dz, w1, out_dtype=torch.float32)
        else:
            with torch.autocast(x2.device.type, enabled=False):
                dz, a = _act_elementwise(z, act, dyc @ w2)
                dw2, db2 = dyc.t() @ a, dyc.sum(0) if has_b2 else None
                del a
                n = _norm_apply(x2, mean, rstd, nw, nb, w1.dtype)
                dw1, db1 = dz.t() @ n, dz.sum(0) if has_b1 else None
                del n
                dn = (dz @ w1).float()
        del dz
        dx, dnw, dnb = _norm_bwd(x2, dn, dy, mean, rstd, nw, residual)
        return (
            dx if need[0] else None,
            dnw if need[1] else None,
            dnb if need[2] else None,
            dw1 if need[3] else None,
            db1 if need[4] else None,
            dw2 if need[5] else None,
            db2 if need[6] else None,
            *([None] * 6),
        )


class _LnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, nw, nb, w, b, norm, eps, needs_grad):
        mean, rstd = _norm_stats(x2, norm, eps)
        y, _ = _ln_fc_fwd(x2, mean, rstd, nw, nb, w, b, None, store_z=True)
        if needs_grad:
            ctx.save_for_backward(x2, mean, rstd, nw, nb, w)
        ctx.has_b = b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, mean, rstd, nw, nb, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dw, db = None, None
        if need[3] or need[4]:
            dw, db = _wgrad(dy, x2, norm_args=(mean, rstd, nw, nb), bias_grad=ctx.has_b)
        dn, _ = _matmul(dy, w, out_dtype=torch.float32)
        dx, dnw, dnb = _norm_bwd(x2, dn, dy, mean, rstd, nw, residual=False)
        return (
            dx if need[0] else None,
            dnw if need[1] else None,
            dnb if need[2] else None,
            dw if need[3] else None,
            db if need[4] else None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------


def _triton_reason(x) -> str | None:
    """Why the Triton kernels (of "triton" and of "cublas") cannot run on x, or None."""
    why = triton_unavailable(x, "x")
    if why is None and x.shape[-1] > MAX_D:
        why = f"d={x.shape[-1]} is larger than the Triton kernels' limit of {MAX_D}"
    return why


def _choose(op, x, backend, reasons, fields, run):
    """The backend of one call: ``resolve`` for a named one or the static "auto" (Triton on
    a GPU where it can run), then on a GPU the measured choice among the runnable ones."""
    dispatcher = _dispatch.DISPATCH
    on_gpu = dispatcher.gpu(x.device) is not None
    static = resolve(op, backend, reasons, ("triton",) if on_gpu else ())
    if backend != "auto" or not on_gpu:
        return static
    names = [name for name, why in reasons.items() if why is None] + ["torch"]
    fields = {
        "dtype": str(x.dtype)[6:],
        "autocast": str(_autocast_dtype(x))[6:] if _autocast_dtype(x) is not None else "off",
        "T": bucket(x.numel() // x.shape[-1]),
        **fields,
    }
    return dispatcher.choose(op, fields, names, static, x.device, run)


def _timing_run(fn, x, params):
    """run(name) for the dispatcher: one call of ``fn(name, x, *params)``, with a backward
    through detached copies when the call needs gradients (nothing reaches .grad)."""

    def run(name):
        if not _needs_grad(x, *params):
            return fn(name, x, *params)
        leaves = [
            None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (x, *params)
        ]
        y = fn(name, *leaves)
        want = [t for t in leaves if t is not None and t.requires_grad]
        torch.autograd.grad(y, want, torch.ones_like(y))
        return y.detach()

    return run


def _autocast_dtype(x):
    """The dtype CUDA autocast runs GEMMs in when it would change x's float32, else None."""
    if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    dtype = torch.get_autocast_dtype("cuda")
    return dtype if x.dtype == torch.float32 and dtype != torch.float32 else None


def _for_gemm(dtype, *tensors):
    """Cast the GEMM operands to autocast's dtype (differentiably, as autocast would)."""
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)


def _unit_stride(tensors):
    """The 1-D weights and biases as contiguous tensors (the kernels read them as ``P + i``);
    differentiable, and free when they already are. 2-D weights keep their strides."""
    return tuple(t.contiguous() if t is not None and t.dim() == 1 else t for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
            reference; on a GPU the fastest of the three measured on that GPU
            (``IGPT_DISPATCH=fixed``: "triton" where it can run).

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

    why = _triton_reason(x)
    fields = {
        "d": x.shape[-1],
        "h": fc_weight.shape[0],
        "norm": norm,
        "act": activation,
        "residual": bool(residual),
        "grad": _needs_grad(x, *params),
    }
    name = _choose(
        "ln_mlp", x, backend, {"triton": why, "cublas": why}, fields, _timing_run(call, x, params)
    )
    return _ln_mlp_on(name if x.numel() else "torch", x, params, *opts)


def _ln_mlp_on(name, x, params, norm, eps, activation, residual):
    if name == "torch":
        return reference.ln_mlp(
            x, *params, norm=norm, eps=eps, activation=activation, residual=residual
        )
    norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias = params
    gemm = _for_gemm(_autocast_dtype(x), fc_weight, fc_bias, proj_weight, proj_bias)
    weights = _unit_stride((norm_weight, norm_bias, *gemm))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, d)
    variant = "fused" if name == "triton" else "cublas"
    y = _ops.ln_mlp(
        x2, *weights, norm, eps, activation, residual, variant, _needs_grad(x, *weights)
    )
    return y.view(x.shape)


def ln_linear(x, norm_weight, norm_bias, weight, bias, *, norm="rms", eps=1e-5, backend="auto"):
    """linear(norm(x)): the norm fused into the GEMM's A-tile loads (the qkv projection).

    Args:
        x: (..., d) float16, bfloat16 or float32 (float64 on the "torch" backend).
        norm_weight: (d,) or None; norm_bias: (d,) or None (must be None for norm="rms").
        weight: (n, d) (nn.Linear layout); bias: (n,) or None.
        norm: "rms" or "layer". eps: the norm's epsilon, a finite number > 0.
        backend: "auto", "triton" or "torch". "auto" on the CPU is the reference; on a GPU
            the faster of the two measured there (``IGPT_DISPATCH=fixed``: "triton").

    Returns:
        y: (..., n) in x's dtype, or in autocast's dtype under CUDA autocast (the norm stays
        in float32). Saves only x and the fp32 row stats for backward.
    """
    reference.check_ln_linear(x, norm_weight, norm_bias, weight, bias, norm, eps)
    params = (norm_weight, norm_bias, weight, bias)

    def call(name, x, *params):
        return _ln_linear_on(name, x, params, norm, float(eps))

    fields = {"d": x.shape[-1], "n": weight.shape[0], "norm": norm, "grad": _needs_grad(x, *params)}
    reasons = {"triton": _triton_reason(x)}
    name = _choose("ln_linear", x, backend, reasons, fields, _timing_run(call, x, params))
    return _ln_linear_on(name if x.numel() else "torch", x, params, norm, float(eps))


def _ln_linear_on(name, x, params, norm, eps):
    norm_weight, norm_bias, weight, bias = params
    if name == "torch":
        return reference.ln_linear(x, norm_weight, norm_bias, weight, bias, norm=norm, eps=eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, d)
    weights = _unit_stride((norm_weight, norm_bias, *_for_gemm(_autocast_dtype(x), weight, bias)))
    y = _ops.ln_linear(x2, *weights, norm, eps, _needs_grad(x, *weights))
    return y.view(*x.shape[:-1], weight.shape[0])
