"""The Triton kernels of ``igpt_kernels.attention`` (FlashAttention-2 forward, flash-decoding
combine, and the three backward kernels). The math, the algorithm and the limits are in
``attention``'s docstring; the launchers there pick the block sizes and the grid.

Each kernel takes its tensors as pointers with explicit strides, the block sizes and flags as
constexprs, and accumulates in fp32; softmax statistics are stored in fp32, base 2.
"""

from __future__ import annotations

from igpt_kernels._triton import tl, triton

# --------------------------------------------------------------------------------------
# tile helpers shared by the kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _batch_head(H):
    """(bh, b, h) of this program, as int64 so that base offsets may pass 2^31.

    (batch, head) is grid axis 0, the one without CUDA's 65535 limit.
    """
    off_bh = tl.program_id(0).to(tl.int64)
    return off_bh, off_bh // H, off_bh % H


@triton.jit
def _query_block(CAUSAL: tl.constexpr):
    """Index of this program's query block (grid axis 1), the heaviest first when causal.

    A causal query block sees more keys the later it is, so running the last blocks first
    (longest-processing-time order, as FlashAttention-2/3 do) keeps the longest programs
    out of the grid's tail. Blocks of equal work (non-causal) keep the natural order.
    """
    if CAUSAL:
        return tl.num_programs(1) - 1 - tl.program_id(1)
    return tl.program_id(1)


@triton.jit
def _tile_mask(rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Which elements of a (rows, BLOCK_D) tile exist: columns < HEAD_DIM, rows < n_rows."""
    mask = offs_d[None, :] < HEAD_DIM
    if CHECK_ROWS:
        mask = mask & (rows[:, None] < n_rows)
    return mask


@triton.jit
def _load_tile(
    base, rows, stride_r, stride_d, n_rows, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """base[rows, :] as a (rows, BLOCK_D) tile; missing rows and padding columns read 0."""
    return tl.load(
        base + rows[:, None] * stride_r + offs_d[None, :] * stride_d,
        mask=_tile_mask(rows, n_rows, offs_d, HEAD_DIM, CHECK_ROWS),
        other=0.0,
    )


@triton.jit
def _store_tile(base, rows, stride_r, stride_d, n_rows, offs_d, value, HEAD_DIM: tl.constexpr):
    """Store a (rows, BLOCK_D) tile to base[rows, :HEAD_DIM] for rows < n_rows."""
    tl.store(
        base + rows[:, None] * stride_r + offs_d[None, :] * stride_d,
        value.to(base.dtype.element_ty),
        mask=_tile_mask(rows, n_rows, offs_d, HEAD_DIM, True),
    )


@triton.jit
def _key_range(
    start_m, N_CTX_Q, N_CTX_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """(full, hi) for the queries [start_m, start_m + BLOCK_M).

    Key blocks in [0, full) are in bounds and visible to every one of these queries (no
    mask needed); [full, hi) straddle the causal diagonal or the end of the keys (masked);
    keys from hi on are in the causal future of all of them and are skipped.
    """
    if CAUSAL:
        offset = N_CTX_K - N_CTX_Q
        hi = tl.minimum(N_CTX_K, start_m + BLOCK_M + offset)
        full = tl.minimum((start_m + offset + 1) // BLOCK_N, N_CTX_K // BLOCK_N) * BLOCK_N
    else:
        hi = N_CTX_K
        full = (N_CTX_K // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _scores(
    q,
    k,
    q2,
    k2,
    rows,
    cols,
    pad_base,
    stride_pn,
    qk_scale,
    N_CTX_Q,
    N_CTX_K,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    TAIL_D: tl.constexpr,
):
    """Base-2 logits s = q k^T * sm_scale * log2(e), -inf where query row may not see key col.

    TAIL_D > 0: the head dim is split, and q2 k2^T (the last TAIL_D columns) is added.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if TAIL_D > 0:
        s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
    s = s * qk_scale
    if MASKED:
        keep = cols[None, :] < N_CTX_K
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + (N_CTX_K - N_CTX_Q))
        s = tl.where(keep, s, float("-inf"))
    if HAS_PAD:
        pad = tl.load(pad_base + cols * stride_pn, mask=cols < N_CTX_K, other=0)
        s = tl.where(pad[None, :] != 0, s, float("-inf"))
    return s


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, acc2, l_i, m_i, q, q2, k_base, v_base, pad_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    offs_m, offs_n, offs_d, offs_d2, lo, hi, qk_scale, N_CTX_Q, N_CTX_K,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    TAIL_D: tl.constexpr,
):  # fmt: skip
    """Fold the key blocks [lo, hi) into the running (acc, l_i, m_i) of the online softmax.

    TAIL_D > 0 (head dim 96 as 64 + 32): q2 and acc2 hold the columns offs_d2, with their
    own K and V tiles, dots and accumulator; otherwise q2 and acc2 are unused.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, stride_kd, N_CTX_K, offs_d, HEAD_DIM, MASKED)
        k2 = k
        if TAIL_D > 0:
            k2 = _load_tile(k_base, cols, stride_kn, stride_kd, N_CTX_K, offs_d2, HEAD_DIM, MASKED)
        s = _scores(
            q, k, q2, k2, offs_m, cols, pad_base, stride_pn, qk_scale, N_CTX_Q, N_CTX_K,
            MASKED, CAUSAL, HAS_PAD, PRECISION, TAIL_D,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_PAD:
            # a row with no visible key so far keeps m = -inf; subtract 0 instead of -inf
            # so that 2^(s - m) is 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, cols, stride_vn, stride_vd, N_CTX_K, offs_d, HEAD_DIM, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        if TAIL_D > 0:
            v2 = _load_tile(v_base, cols, stride_vn, stride_vd, N_CTX_K, offs_d2, HEAD_DIM, MASKED)
            acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, acc2, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Pad, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_os, stride_om, stride_od,
    H, N_CTX_Q, N_CTX_K, SPLIT_KEYS, qk_scale, N_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_D: tl.constexpr = 0,
):  # fmt: skip
    """Grid (B * H, cdiv(Nq, BLOCK_M), splits); split s takes keys [s, s + 1) * SPLIT_KEYS.

    TAIL_D > 0: columns [0, BLOCK_D) and [BLOCK_D, BLOCK_D + TAIL_D) are two tiles with
    their own dots and accumulators (head dim 96 = 64 + 32, see ``HD96_SPLIT``).
    SPLIT=False: writes o in Out's dtype and lse (+inf for a row with no key).
    SPLIT=True: writes this chunk's normalised o (fp32) and its lse (-inf if empty), for
    ``attn_combine_kernel``. N_KEY only feeds the autotuner's key.
    """
    start_m = _query_block(CAUSAL) * BLOCK_M
    off_bh, off_b, off_h = _batch_head(H)
    split = tl.program_id(2)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pad_base = Pad + off_b * stride_pb
    q = _load_tile(q_base, offs_m, stride_qm, stride_qd, N_CTX_Q, offs_d, HEAD_DIM, True)
    # unused placeholders unless the head dim is split
    q2, offs_d2, acc2 = q, offs_d, offs_m
    if TAIL_D > 0:
        offs_d2 = BLOCK_D + tl.arange(0, TAIL_D)
        q2 = _load_tile(q_base, offs_m, stride_qm, stride_qd, N_CTX_Q, offs_d2, HEAD_DIM, True)
        acc2 = tl.zeros([BLOCK_M, TAIL_D], dtype=tl.float32)

    full, hi = _key_range(start_m, N_CTX_Q, N_CTX_K, CAUSAL, BLOCK_M, BLOCK_N)
    lo = split * SPLIT_KEYS
    hi = tl.minimum(hi, lo + SPLIT_KEYS)
    full = tl.maximum(tl.minimum(full, hi), lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_base, v_base, pad_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        offs_m, offs_n, offs_d, offs_d2, lo, full, qk_scale, N_CTX_Q, N_CTX_K,
        False, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_N, PRECISION, TAIL_D,
    )  # fmt: skip
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_base, v_base, pad_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        offs_m, offs_n, offs_d, offs_d2, full, hi, qk_scale, N_CTX_Q, N_CTX_K,
        True, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_N, PRECISION, TAIL_D,
    )  # fmt: skip

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = m_i + tl.math.log2(l_safe)
    if SPLIT:
        lse = tl.where(empty, float("-inf"), lse)  # neutral in the combine
    else:
        lse = tl.where(empty, float("inf"), lse)  # makes p = 2^(s - lse) exactly 0
    o_base = Out + off_b * stride_ob + off_h * stride_oh + split * stride_os
    # acc is 0 on an empty row, so its output is 0
    _store_tile(
        o_base, offs_m, stride_om, stride_od, N_CTX_Q, offs_d, acc / l_safe[:, None], HEAD_DIM
    )
    if TAIL_D > 0:
        _store_tile(
            o_base, offs_m, stride_om, stride_od, N_CTX_Q, offs_d2, acc2 / l_safe[:, None],
            HEAD_DIM,
        )  # fmt: skip
    lse_base = Lse + (off_bh * tl.num_programs(2) + split) * N_CTX_Q
    tl.store(lse_base + offs_m, lse, mask=offs_m < N_CTX_Q)


@triton.jit
def attn_combine_kernel(
    OutPart, LsePart, Out,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_CTX_Q, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Merge flash-decoding chunks: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)."""
    start_m = tl.program_id(1) * BLOCK_M
    off_bh, off_b, off_h = _batch_head(H)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    part_base = OutPart + off_b * stride_pb + off_h * stride_ph
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        lse_base = LsePart + (off_bh * NUM_SPLITS + s) * N_CTX_Q
        lse = tl.load(lse_base + offs_m, mask=offs_m < N_CTX_Q, other=float("-inf"))
        o = _load_tile(
            part_base + s * stride_ps, offs_m, stride_pm, 1, N_CTX_Q, offs_d, HEAD_DIM, True
        )
        m_new = tl.maximum(m_i, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        w = tl.math.exp2(lse - m_use)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + o * w[:, None]
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    _store_tile(o_base, offs_m, stride_om, stride_od, N_CTX_Q, offs_d, o, HEAD_DIM)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_CTX_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Delta[bh, i] = sum_d dO[i, d] O[i, d] in fp32. Grid (B * H, cdiv(Nq, BLOCK_M))."""
    start_m = tl.program_id(1) * BLOCK_M
    off_bh, off_b, off_h = _batch_head(H)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    o = _load_tile(o_base, offs_m, stride_om, stride_od, N_CTX_Q, offs_d, HEAD_DIM, True)
    do = _load_tile(do_base, offs_m, stride_dom, stride_dod, N_CTX_Q, offs_d, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh * N_CTX_Q + offs_m, delta, mask=offs_m < N_CTX_Q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, pad, q_base, do_base, lse_base, delta_base,
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_m, cols, offs_d, lo, hi, qk_scale, N_CTX_Q, N_CTX_K,
    MASKED: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over the query blocks [lo, hi).

    Tiles are transposed (keys x queries). Query rows past N_CTX_Q read lse = +inf and
    dO = 0, so they add nothing; MASKED applies the causal mask. Key rows past N_CTX_K
    compute garbage that is never stored.
    """
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        m_ok = rows < N_CTX_Q
        q = _load_tile(q_base, rows, stride_qm, stride_qd, N_CTX_Q, offs_d, HEAD_DIM, True)
        lse = tl.load(lse_base + rows, mask=m_ok, other=float("inf"))
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = cols[:, None] <= rows[None, :] + (N_CTX_K - N_CTX_Q)
            s_t = tl.where(visible, s_t, float("-inf"))
        if HAS_PAD:
            s_t = tl.where(pad[:, None] != 0, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        do = _load_tile(do_base, rows, stride_dom, stride_dod, N_CTX_Q, offs_d, HEAD_DIM, True)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + rows, mask=m_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, Pad, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, N_CTX_Q, N_CTX_K, sm_scale, qk_scale, N_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N keys of one (batch, head). Grid (B * H, cdiv(Nk, BLOCK_N)).

    DK and DV share one layout (strides stride_g*). Under a causal mask the first key
    blocks are the heaviest (every later query sees them), so the natural order already
    runs the heaviest first.
    """
    start_n = tl.program_id(1) * BLOCK_N
    off_bh, off_b, off_h = _batch_head(H)
    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    k = _load_tile(k_base, cols, stride_kn, stride_kd, N_CTX_K, offs_d, HEAD_DIM, True)
    v = _load_tile(v_base, cols, stride_vn, stride_vd, N_CTX_K, offs_d, HEAD_DIM, True)
    if HAS_PAD:
        pad = tl.load(Pad + off_b * stride_pb + cols * stride_pn, mask=cols < N_CTX_K, other=0)
    else:
        pad = cols  # unused
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = Lse + off_bh * N_CTX_Q
    delta_base = Delta + off_bh * N_CTX_Q

    # Query blocks: before lo all see none of these keys (causal past of the keys);
    # [lo, full) straddle the diagonal (masked); [full, end) see every key of the block.
    end = tl.cdiv(N_CTX_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        offset = N_CTX_K - N_CTX_Q
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(full, end)
    else:
        lo = 0
        full = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, pad, q_base, do_base, lse_base, delta_base,
        stride_qm, stride_qd, stride_dom, stride_dod,
        offs_m, cols, offs_d, lo, full, qk_scale, N_CTX_Q, N_CTX_K,
        True, HAS_PAD, HEAD_DIM, BLOCK_M, PRECISION,
    )  # fmt: skip
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, pad, q_base, do_base, lse_base, delta_base,
        stride_qm, stride_qd, stride_dom, stride_dod,
        offs_m, cols, offs_d, tl.maximum(full, lo), end, qk_scale, N_CTX_Q, N_CTX_K,
        False, HAS_PAD, HEAD_DIM, BLOCK_M, PRECISION,
    )  # fmt: skip
    g_base = off_b * stride_gb + off_h * stride_gh
    _store_tile(DK + g_base, cols, stride_gn, stride_gd, N_CTX_K, offs_d, dk * sm_scale, HEAD_DIM)
    _store_tile(DV + g_base, cols, stride_gn, stride_gd, N_CTX_K, offs_d, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, pad_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    offs_m, offs_n, offs_d, lo, hi, qk_scale, N_CTX_Q, N_CTX_K,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over the key blocks [lo, hi), as the forward walks."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, stride_kd, N_CTX_K, offs_d, HEAD_DIM, MASKED)
        v = _load_tile(v_base, cols, stride_vn, stride_vd, N_CTX_K, offs_d, HEAD_DIM, MASKED)
        s = _scores(
            q, k, q, k, offs_m, cols, pad_base, stride_pn, qk_scale, N_CTX_Q, N_CTX_K,
            MASKED, CAUSAL, HAS_PAD, PRECISION, 0,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, Pad, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, N_CTX_Q, N_CTX_K, sm_scale, qk_scale, N_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of BLOCK_M queries of one (batch, head). Grid (B * H, cdiv(Nq, BLOCK_M)),
    causal blocks heaviest first as in the forward."""
    start_m = _query_block(CAUSAL) * BLOCK_M
    off_bh, off_b, off_h = _batch_head(H)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX_Q
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    q = _load_tile(q_base, offs_m, stride_qm, stride_qd, N_CTX_Q, offs_d, HEAD_DIM, True)
    do = _load_tile(do_base, offs_m, stride_dom, stride_dod, N_CTX_Q, offs_d, HEAD_DIM, True)
    lse = tl.load(Lse + off_bh * N_CTX_Q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + off_bh * N_CTX_Q + offs_m, mask=m_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pad_base = Pad + off_b * stride_pb

    full, hi = _key_range(start_m, N_CTX_Q, N_CTX_K, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, pad_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        offs_m, offs_n, offs_d, 0, full, qk_scale, N_CTX_Q, N_CTX_K,
        False, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, pad_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
        offs_m, offs_n, offs_d, full, hi, qk_scale, N_CTX_Q, N_CTX_K,
        True, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq_base = DQ + off_b * stride_gb + off_h * stride_gh
    _store_tile(dq_base, offs_m, stride_gm, stride_gd, N_CTX_Q, offs_d, dq * sm_scale, HEAD_DIM)
