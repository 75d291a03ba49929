"""The Triton kernels of ``ln_mlp`` and ``ln_linear``: the row statistics, the GEMM whose A
tiles are normalised on load (``ln_fc_kernel``), the GEMM with bias, residual or activation-
derivative epilogues (``mm_kernel``), the split-K weight-gradient GEMM that can recompute the
norm on load (``wgrad_kernel``) and the norm backward (``norm_bwd_kernel``). The math and the
algorithm are in ``ln_mlp``'s docstring; the launchers are in ``ln_gemm``.
"""

from __future__ import annotations

from igpt_kernels._triton import tl, triton


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """act(z) in fp32: 1 = quick_gelu, 2 = gelu (erf), 0 = identity."""
    if ACT == 1:
        return z * tl.sigmoid(1.702 * z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z


@triton.jit
def act_bwd(z, ACT: tl.constexpr):
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
        tl.store(A + offs, act_fwd(z.to(tl.float32), ACT).to(A.dtype.element_ty), mask=ok)


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
        act, dact = act_bwd(z, DACT)
        acc = acc * dact
        tl.store(Aout + z_offs, act.to(Aout.dtype.element_ty), mask=ok)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty), mask=ok)


@triton.jit
def norm_stats_kernel(
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
def ln_fc_kernel(
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
def mm_kernel(
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
def wgrad_kernel(
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
def norm_bwd_kernel(
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
