"""Attention for iGPT: causal (AR), bidirectional (BERT) and key-padded, as Triton kernels.

    o = softmax(q k^T * sm_scale + mask) v

q: (B, H, Nq, D); k, v: (B, H, Nk, D), Nq <= Nk, D in {32, 64, 96, 128}; any strides (the
model passes transposed views of one (B, n, 3d) tensor). Causal masking is bottom-right
aligned (query i sees key j iff j <= i + Nk - Nq), which makes a block of new queries over
a KV cache correct. ``key_padding_mask`` (B, Nk) bool marks the keys to attend (True). A
query that sees no key gets a zero output and zero gradients, as in ``reference.attention``.

Algorithm (FlashAttention-2). One program owns BLOCK_M queries of one (batch, head) and
streams the keys in blocks of BLOCK_N, keeping a running row maximum m, a running sum l
and an fp32 accumulator, so no Nq x Nk matrix is ever stored. Scores are kept in base 2:

    s = q k^T * sm_scale * log2(e)
    m' = max(m, rowmax(s));  p = 2^(s - m');  l' = l 2^(m - m') + rowsum(p)
    acc' = acc 2^(m - m') + p v;   o = acc / l;   lse = m + log2(l)   (fp32, base 2)

For a causal run the key loop has two phases: blocks every query of the program sees in
full (no mask arithmetic at all), then the few blocks on the diagonal (and the ragged last
block of any run) with the mask applied; blocks above the diagonal are never visited.
The key padding mask is one (BLOCK_N,) load per key block.

Backward, deterministic and without atomics, in three kernels:
    Delta = rowsum(dO * O)                                      (fp32, one pass)
    dK, dV: one program per key block, looping over query blocks: with
        p = 2^(s - lse),  dV += p^T dO,  dP = dO v^T,  dS = p (dP - Delta),  dK += dS^T q
    dQ: one program per query block, looping over key blocks: dQ += dS k
both with the same skip-and-mask-the-diagonal structure as the forward, and dS, dK, dQ
scaled by sm_scale at the end. Empty rows store lse = +inf, so their p is exactly 0.

Decode (flash-decoding). For a few queries (Nq <= 16) over many keys with few (batch, head)
pairs, one program per head would leave most of the GPU idle, so the keys are split into
chunks, one program per (head, chunk) writes a partial output and partial lse in fp32, and
a second kernel merges the chunks by their lse. This path is forward-only: inputs that
require grad take the main kernel.

Head dim 96 (iGPT-L) runs as 128 in registers with the extra columns masked on every load
and store: one code path, 25% wasted MMA work on that shape. The forward can instead run
it as 64 + 32 (two dots and two accumulators per product, ``HD96_SPLIT``); which is faster
is unmeasured (no GPU yet), so the padded path stays the default.

dtypes: float16 and bfloat16 (fp32 accumulation, p and dS rounded to the input dtype for
the second matmul, as FlashAttention does) and float32 (tf32x3 dots: three TF32
tensor-core passes, about fp32 accuracy, with small tiles of their own; IEEE fp32 dots
would run on CUDA cores and spilled heavily in every config that fits an A100). Under
``TRITON_INTERPRET=1`` (CPU tests) one small config runs, float32/float16 only: the
interpreter computes bfloat16 wrongly. Limits: B * H <= 2^31 - 1 (the grid's first axis)
and at most 65535 blocks of queries or keys (the second): ``check_grid``.

Backends: "triton" (these kernels), "sdpa" (PyTorch's SDPA kernels where they can express
the mask exactly: the table in ``attention``'s docstring) and "torch" (``reference.attention``,
"auto" on the CPU). "auto" on a GPU times triton and each eligible SDPA kernel on the first
call per key and keeps the fastest (``igpt_kernels._dispatch``).
"""

from __future__ import annotations

import math
import os

import torch

from igpt_kernels import _dispatch, _ops, _triton, reference
from igpt_kernels._dispatch import bucket, resolve, triton_interpreting, triton_unavailable
from igpt_kernels._triton import HAS_TRITON, tl, triton

LOG2E = 1.4426950408889634
# (batch, head) pairs index the grid's first axis (CUDA allows 2^31 - 1 programs there),
# query or key blocks its second (at most 65535: 1M queries at the smallest block of 16).
MAX_BATCH_HEADS = 2**31 - 1
MAX_GRID_Y = 65535
DECODE_MAX_Q = 16  # the flash-decoding path takes Nq up to this (one BLOCK_M of 16)
MAX_SPLITS = 64
# Head dim 96 (iGPT-L) in the forward: "pad" runs it as 128 with masked columns (one code
# path, +33% MMA work); "split" as 64 + 32 (two dots per product, two accumulators, no
# wasted MMA work). Neither has been timed on a GPU: "pad" stays the default until
# benchmarks/bench_attention.py (L@48x48) shows "split" faster. IGPT_ATTENTION_HD96=split
# or setting this to True selects the split. The backward always pads.
HD96_SPLIT = os.environ.get("IGPT_ATTENTION_HD96", "pad") == "split"


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
def _attn_fwd_kernel(
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
    ``_attn_combine_kernel``. N_KEY only feeds the autotuner's key.
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
def _attn_combine_kernel(
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
def _attn_bwd_preprocess_kernel(
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
def _attn_bwd_dkdv_kernel(
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
def _attn_bwd_dq_kernel(
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


# --------------------------------------------------------------------------------------
# autotuning: one config under the interpreter, a small Ampere/Hopper sweep on the GPU
# --------------------------------------------------------------------------------------

_TUNE_KEY = ["N_KEY", "HEAD_DIM", "CAUSAL", "HAS_PAD"]
_BLOCKS = ("BLOCK_M", "BLOCK_N")

if HAS_TRITON and triton_interpreting():
    # BLOCK_M != BLOCK_N on purpose: the tests then cover diagonals spanning several blocks.
    _SWEEPS = {
        (kernel, kind): [sweep]
        for kernel, sweep in [
            (_attn_fwd_kernel, (32, 16, 4, 1)),
            (_attn_bwd_dkdv_kernel, (16, 32, 4, 1)),
            (_attn_bwd_dq_kernel, (32, 16, 4, 1)),
        ]
        for kind in ("narrow", "wide", "fp32")
    }
    _DECODE_BLOCK_N = _DECODE_BLOCK_N_FP32 = 16
    _SMALL_BLOCK = 16
else:
    # Keyed by (kernel, kind): "narrow" 16-bit head dim <= 64, "wide" 16-bit 96/128,
    # "fp32" any head dim; (BLOCK_M, BLOCK_N, num_warps, num_stages), the first of each list
    # the default when autotuning is off. Every config compiles without spills and within
    # the shared memory of both sm_90a (227 KiB) and sm_80 (163 KiB): tests/test_compile.py
    # checks that, benchmarks/RESULTS.md ("Compiled code") has the numbers. Chosen from
    # those compiles, not from timings: the autotuner decides among them on the GPU.
    # fp32 runs tf32x3 dots (see _constexprs), whose split operands (hi and lo parts) need
    # far more registers than a 16-bit tile: only tiles this small compile without spills
    # (sm_90a gets one wgmma config; tiles under 64 rows use mma.sync). A dict gives the
    # lists per architecture ({90: sm_90a and later, 80: sm_80/sm_86/sm_89}).
    _SWEEPS = {
        (_attn_fwd_kernel, "narrow"): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        # sm_80: 128x64 spills (48-52 B) at D=128 with padding, 64x64 does not
        (_attn_fwd_kernel, "wide"): {90: [(128, 64, 8, 3), (64, 64, 4, 3)], 80: [(64, 64, 4, 3)]},
        (_attn_fwd_kernel, "fp32"): {90: [(64, 16, 4, 1), (32, 16, 4, 2)], 80: [(32, 16, 4, 2)]},
        # sm_80 (mma.sync keeps more operands in registers): the sm_90 defaults spill there
        (_attn_bwd_dkdv_kernel, "narrow"): {
            90: [(64, 128, 8, 3), (32, 64, 4, 3)],
            80: [(32, 64, 4, 3)],
        },
        (_attn_bwd_dkdv_kernel, "wide"): {
            90: [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)],
            80: [(64, 64, 8, 3)],
        },
        (_attn_bwd_dkdv_kernel, "fp32"): [(16, 16, 4, 2)],
        (_attn_bwd_dq_kernel, "narrow"): [(128, 64, 8, 3), (64, 64, 4, 3)],
        (_attn_bwd_dq_kernel, "wide"): {
            90: [(128, 32, 8, 3), (64, 64, 4, 3)],
            80: [(64, 32, 4, 3)],
        },
        (_attn_bwd_dq_kernel, "fp32"): [(16, 16, 4, 1)],
    }
    _DECODE_BLOCK_N = 64
    # fp32's tf32x3 dots hold hi and lo parts of both operands: at 16x64 the decode kernel
    # spilled 4-12 B at head dim 96/128 on both architectures (and at 64 on sm_90a); 16x32
    # compiles to at most 248 registers without spills, in half the shared memory.
    _DECODE_BLOCK_N_FP32 = 32
    _SMALL_BLOCK = 64
_DECODE_WARPS = 4


def _arch_configs(rows):
    """triton.Configs of a sweep: one list, or one per architecture ({90: rows, 80: rows})."""
    if isinstance(rows, dict):
        return {arch: _triton.configs(_BLOCKS, r) for arch, r in rows.items()}
    return _triton.configs(_BLOCKS, rows)


_TUNED = {key: _triton.Tuned(key[0], _arch_configs(r), _TUNE_KEY) for key, r in _SWEEPS.items()}


def _config_kind(dtype, block_d) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "wide" if block_d > 64 else "narrow"


def _launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` with the configs of its kind (see ``_SWEEPS``), autotuned or not."""
    kind = _config_kind(args[0].dtype, kwargs["BLOCK_D"] + kwargs.get("TAIL_D", 0))
    _TUNED[(kernel, kind)].launch(grid, *args, **kwargs)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(D):
    return triton.next_power_of_2(D)  # 96 runs as 128 with masked columns


def _head_split(D):
    """(BLOCK_D, TAIL_D) of the forward kernel: 96 as 64 + 32 when ``HD96_SPLIT``."""
    if D == 96 and HD96_SPLIT:
        return 64, 32
    return _block_d(D), 0


def _constexprs(q, causal, pad):
    """The compile-time arguments shared by the forward and backward kernels."""
    return dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_D=_block_d(q.shape[-1]),
        CAUSAL=causal,
        HAS_PAD=pad is not None,
        # fp32 inputs get tf32x3 dots: three TF32 tensor-core passes (hi*hi + hi*lo +
        # lo*hi), about fp32 accuracy. IEEE fp32 dots lower to CUDA-core FMA, which made
        # ptxas spill tens of KB at any tile that fits and left fp32 at D > 64 over the
        # A100's shared memory (see the "Compiled code" section of benchmarks/RESULTS.md).
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
    )


def _n_key(Nq, Nk):
    return triton.next_power_of_2(max(Nq, Nk))


def _pad_args(pad, q):
    """(pointer tensor, stride_b, stride_n) for the int8 padding mask, or a dummy."""
    if pad is None:
        return q, 0, 0
    return pad, pad.stride(0), pad.stride(1)


_sm_count = _triton.sm_count


def check_grid(batch_heads: int, blocks: int) -> None:
    """Raise ValueError if (batch * heads, query or key blocks) exceeds CUDA's grid."""
    if batch_heads > MAX_BATCH_HEADS:
        raise ValueError(
            f"q has B * H = {batch_heads} (batch, head) pairs; the Triton attention grid takes "
            f"at most {MAX_BATCH_HEADS}: split the batch, or use backend='torch'"
        )
    if blocks > MAX_GRID_Y:
        raise ValueError(
            f"the sequence needs {blocks} blocks on the grid's second axis, which takes at "
            f"most {MAX_GRID_Y}: shorten it, or use backend='torch'"
        )


def decode_splits(B, H, Nq, Nk, device) -> int:
    """How many key chunks the flash-decoding forward uses (1: no split).

    Split only when one program per (batch, head) would leave SMs idle: aim at two
    programs per SM, each chunk at least two key blocks long, at most MAX_SPLITS chunks.
    """
    if Nq > DECODE_MAX_Q:
        return 1
    programs = B * H
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    blocks = triton.cdiv(Nk, _DECODE_BLOCK_N)
    return max(1, min(triton.cdiv(2 * sms, programs), blocks // 2, MAX_SPLITS))


def _attn_fwd(q, k, v, pad, causal, sm_scale, *, num_splits=None):
    """Forward launcher. Returns (o, lse) with lse (B, H, Nq) fp32 in base 2.

    num_splits=None: the main, autotuned kernel (lse usable by the backward). An integer
    takes the flash-decoding path with that many key chunks (lse not returned: None).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    check_grid(B * H, triton.cdiv(max(Nq, Nk), 16))
    o = _empty((B, H, Nq, D), q.dtype, q.device)
    pad_t, stride_pb, stride_pn = _pad_args(pad, q)
    qk_scale = sm_scale * LOG2E
    common = _constexprs(q, causal, pad)
    common["BLOCK_D"], common["TAIL_D"] = _head_split(D)
    strides_in = (*q.stride(), *k.stride(), *v.stride(), stride_pb, stride_pn)
    if num_splits is None:
        lse = _empty((B, H, Nq), torch.float32, q.device)
        grid = lambda meta: (B * H, triton.cdiv(Nq, meta["BLOCK_M"]), 1)
        _launch(
            _attn_fwd_kernel, grid, q, k, v, pad_t, o, lse, *strides_in,
            o.stride(0), o.stride(1), 0, o.stride(2), o.stride(3),
            H, Nq, Nk, triton.cdiv(Nk, 16) * 16, qk_scale, _n_key(Nq, Nk),
            SPLIT=False, **common,
        )  # fmt: skip
        return o, lse

    block_m = 16
    block_n = _DECODE_BLOCK_N_FP32 if q.dtype == torch.float32 else _DECODE_BLOCK_N
    if Nq > block_m:
        raise ValueError(f"the decode path takes at most {block_m} queries, got Nq={Nq}")
    chunk = triton.cdiv(triton.cdiv(Nk, max(1, num_splits)), block_n) * block_n
    splits = triton.cdiv(Nk, chunk)
    warps = _DECODE_WARPS
    if splits == 1:
        lse = _empty((B, H, Nq), torch.float32, q.device)
        _attn_fwd_kernel[(B * H, 1, 1)](
            q, k, v, pad_t, o, lse, *strides_in,
            o.stride(0), o.stride(1), 0, o.stride(2), o.stride(3),
            H, Nq, Nk, chunk, qk_scale, 0, SPLIT=False, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, **common,
        )  # fmt: skip
        return o, None
    part = _empty((B, H, splits, Nq, D), torch.float32, q.device)
    lse_part = _empty((B, H, splits, Nq), torch.float32, q.device)
    _attn_fwd_kernel[(B * H, 1, splits)](
        q, k, v, pad_t, part, lse_part, *strides_in,
        *part.stride()[:4], part.stride(4),
        H, Nq, Nk, chunk, qk_scale, 0, SPLIT=True, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, **common,
    )  # fmt: skip
    _attn_combine_kernel[(B * H, 1)](
        part, lse_part, o, *part.stride()[:4], *o.stride(), H, Nq, splits,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, num_warps=warps,
    )  # fmt: skip
    return o, None


def _attn_bwd(do, q, k, v, o, lse, pad, causal, sm_scale):
    """Backward launcher: (dq, dk, dv), contiguous, in q's dtype."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = _empty((B, H, Nq), torch.float32, q.device)
    _attn_bwd_preprocess_kernel[(B * H, triton.cdiv(Nq, _SMALL_BLOCK))](
        o, do, delta, *o.stride(), *do.stride(), H, Nq,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_SMALL_BLOCK,
    )  # fmt: skip
    dq = _empty((B, H, Nq, D), q.dtype, q.device)
    dk = _empty((B, H, Nk, D), q.dtype, q.device)
    dv = _empty((B, H, Nk, D), q.dtype, q.device)
    pad_t, stride_pb, stride_pn = _pad_args(pad, q)
    args = (q, k, v, pad_t, do, lse, delta)
    strides_in = (*q.stride(), *k.stride(), *v.stride(), stride_pb, stride_pn, *do.stride())
    scalars = (H, Nq, Nk, sm_scale, sm_scale * LOG2E, _n_key(Nq, Nk))
    common = _constexprs(q, causal, pad)
    grid = lambda meta: (B * H, triton.cdiv(Nk, meta["BLOCK_N"]))
    _launch(
        _attn_bwd_dkdv_kernel, grid, *args, dk, dv, *strides_in, *dk.stride(), *scalars, **common
    )
    grid = lambda meta: (B * H, triton.cdiv(Nq, meta["BLOCK_M"]))
    _launch(_attn_bwd_dq_kernel, grid, *args, dq, *strides_in, *dq.stride(), *scalars, **common)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------


SDPA_KERNELS = ("flash", "efficient", "cudnn")  # auto times each as "sdpa-<kernel>"
AUTO_ORDER = ("triton", "sdpa")  # the static "auto" on a GPU


def _mask_kind(causal, key_padding_mask) -> str:
    kind = ("causal" if causal else "full") + ("+pad" if key_padding_mask is not None else "")
    return kind.removeprefix("full+")


def _triton_reason(q) -> str | None:
    """None if the Triton kernels can run on q, else why not (for ``resolve``)."""
    why = triton_unavailable(q, "q")
    if why is not None:
        return why
    B, H, _, D = q.shape
    if D not in reference.HEAD_DIMS:
        return (
            f"head_dim {D} is not supported by the Triton kernel (it takes "
            f"{', '.join(map(str, reference.HEAD_DIMS))}); backend='sdpa' or 'torch' takes any"
        )
    if B * H > MAX_BATCH_HEADS:
        return (
            f"B * H = {B * H} (batch, head) pairs; the Triton grid takes at most {MAX_BATCH_HEADS}"
        )
    return None


def sdpa_kernel_reason(kernel, q, k, causal, key_padding_mask) -> str | None:
    """None if SDPA's ``kernel`` ("flash", "efficient", "cudnn") computes igpt's attention
    exactly on these inputs (as ``_sdpa`` calls it), else why not.

    This checks the mask semantics and the documented dtype and head-dim limits; what else
    a kernel refuses (GPU generation, alignment) makes it raise, and ``"auto"`` drops it.
    """
    D, Nk = q.shape[-1], k.shape[2]
    half = q.dtype in (torch.float16, torch.bfloat16)
    if kernel != "flash" and not q.is_cuda:
        return f"SDPA's {kernel} kernel needs CUDA tensors, got q on {q.device}"
    if kernel == "flash":
        if key_padding_mask is not None:
            return "SDPA's flash kernel takes no mask, so it cannot express key padding"
        if q.is_cuda and not half:
            return f"SDPA's flash kernel runs float16 and bfloat16 only, got {str(q.dtype)[6:]}"
        if q.is_cuda and (D > 256 or D % 8):
            return f"SDPA's flash kernel takes head dims <= 256 that are multiples of 8, got {D}"
    if kernel == "efficient":
        align = 8 if half else 4
        if q.dtype == torch.float64 or D % align:
            return (
                "SDPA's efficient kernel takes float16, bfloat16 and float32 with head dims "
                f"a multiple of {align}, got {str(q.dtype)[6:]} and {D}"
            )
    if kernel == "cudnn":
        if not half or D % 8 or D > 128:
            return (
                "SDPA's cuDNN kernel takes float16 and bfloat16 with head dims <= 128 that "
                f"are multiples of 8, got {str(q.dtype)[6:]} and {D}"
            )
        if Nk == 1:
            return "SDPA's cuDNN kernel does not take a single key (Nk=1)"
    return None


def _sdpa_backends(kernels):
    from torch.nn.attention import SDPBackend

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return [names[k] for k in kernels]


def _sdpa(q, k, v, causal, key_padding_mask, scale, kernels):
    """igpt's attention through ``F.scaled_dot_product_attention``, restricted to ``kernels``.

    SDPA's ``is_causal`` is top-left aligned, so it is used only when Nq == Nk (where it
    equals bottom-right). Nq < Nk causal takes ``causal_lower_right`` on CUDA when flash or
    efficient may run (flash's own causal flag is bottom-right; efficient has the mask type),
    else an explicit boolean mask. Key padding is an explicit boolean mask; a query with no
    visible key is given every key with q zeroed (so nothing of it reaches dk, dv) and its
    output set to 0, as the SDPA kernels differ there (NaN or zeros). ``0 * sum(q)`` is added
    to every row that sees a key: the fused CPU kernel drops a NaN in q, PyTorch's math keeps it.
    """
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    Nq, Nk = q.shape[2], k.shape[2]
    causal = causal and Nq > 1  # one query, bottom-right: it sees every key (decoding)
    with sdpa_kernel(_sdpa_backends(kernels)):
        if key_padding_mask is None:
            mask = None
            if causal and Nq < Nk:
                if q.is_cuda and {"flash", "efficient"} & set(kernels):
                    from torch.nn.attention.bias import causal_lower_right

                    mask = causal_lower_right(Nq, Nk)
                else:
                    mask = reference.attention_mask(Nq, Nk, True, None, q.device)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and Nq == Nk, scale=scale
            )
            return reference.propagate_nan(o, q)
        mask = reference.attention_mask(Nq, Nk, causal, key_padding_mask, q.device)
        seen = mask.any(-1, keepdim=True)  # (B, 1, Nq or 1, 1): the row sees some key
        o = F.scaled_dot_product_attention(
            torch.where(seen, q, 0.0), k, v, attn_mask=mask | ~seen, scale=scale
        )
        return torch.where(seen, reference.propagate_nan(o, q), 0.0)


def _triton(q, k, v, causal, key_padding_mask, scale):
    # through the custom ops of igpt_kernels._ops (single nodes under compile and export)
    B, H, Nq, _ = q.shape
    if not _needs_grad(q, k, v) and Nq <= DECODE_MAX_Q:
        splits = decode_splits(B, H, Nq, k.shape[2], q.device)
        return _ops.attention_decode(q, k, v, key_padding_mask, causal, scale, splits)
    return _ops.attention(q, k, v, key_padding_mask, causal, scale)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_backend(name, q, k, v, causal, key_padding_mask, scale):
    """Attention on one concrete backend: "triton", "sdpa" (SDPA restricted to the kernels
    that can express the mask, and its math kernel), "sdpa-<kernel>" or "torch"."""
    if name == "triton":
        return _triton(q, k, v, causal, key_padding_mask, scale)
    if name == "torch":
        return reference.attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, sm_scale=scale
        )
    if name == "sdpa":
        kernels = [
            kern
            for kern in SDPA_KERNELS
            if sdpa_kernel_reason(kern, q, k, causal, key_padding_mask) is None
        ]
        return _sdpa(q, k, v, causal, key_padding_mask, scale, [*kernels, "math"])
    return _sdpa(q, k, v, causal, key_padding_mask, scale, [name.removeprefix("sdpa-")])


def choose_backend(q, k, v, *, causal=True, key_padding_mask=None, sm_scale=None, backend="auto"):
    """The backend ``attention`` runs for these arguments (on a GPU, ``"auto"`` times the
    candidates here on the first call per key; see ``igpt_kernels._dispatch``)."""
    reference.check_attention(q, k, v, causal, key_padding_mask, sm_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _choose(q, k, v, causal, key_padding_mask, scale, backend)


def _choose(q, k, v, causal, key_padding_mask, scale, backend):
    dispatcher = _dispatch.DISPATCH
    on_gpu = dispatcher.gpu(q.device) is not None
    reasons = {"triton": _triton_reason(q), "sdpa": None}
    static = resolve("attention", backend, reasons, AUTO_ORDER if on_gpu else ())
    if backend != "auto" or not on_gpu:
        return static
    names = [] if reasons["triton"] else ["triton"]
    names += [
        f"sdpa-{kern}"
        for kern in SDPA_KERNELS
        if sdpa_kernel_reason(kern, q, k, causal, key_padding_mask) is None
    ]
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    grad = _needs_grad(q, k, v)
    fields = {
        "dtype": str(q.dtype)[6:],
        "mask": _mask_kind(causal, key_padding_mask),
        "D": D,
        "Nq": bucket(Nq),
        "Nk": bucket(Nk),
        "square": Nq == Nk,
        "BH": bucket(B * H),
        "grad": grad,
    }

    def run(name):
        if not grad:
            return run_backend(name, q, k, v, causal, key_padding_mask, scale)
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        o = run_backend(name, *leaves, causal, key_padding_mask, scale)
        want = [t for t in leaves if t.requires_grad]
        torch.autograd.grad(o, want, torch.ones_like(o))
        return o.detach()

    return dispatcher.choose("attention", fields, names, static, q.device, run)


def attention(q, k, v, *, causal=True, key_padding_mask=None, sm_scale=None, backend="auto"):
    """Scaled dot-product attention with iGPT's masks, differentiable in q, k and v.

    Args:
        q: (B, H, Nq, D) float16, bfloat16 or float32 (float64 on "sdpa" and "torch"). Any
            head dim D >= 1 on "sdpa" and "torch"; D in {32, 64, 96, 128} on "triton".
        k, v: (B, H, Nk, D), same dtype and device as q, Nq <= Nk. Any strides.
        causal: True for the AR model (bottom-right aligned), False for BERT.
        key_padding_mask: optional (B, Nk) bool, True where a key may be attended.
        sm_scale: softmax scale, a finite number > 0; default 1/sqrt(D).
        backend: "auto", "triton", "sdpa" or "torch" (the reference). "auto" on the CPU is
            the reference; on a GPU the fastest correct candidate measured on that GPU
            (``igpt_kernels._dispatch``; ``IGPT_DISPATCH=fixed``: Triton where it can run,
            else "sdpa").

    Returns:
        o: (B, H, Nq, D) in q's dtype (contiguous from "triton"; SDPA's layout from "sdpa").
        A query that sees no key gets zeros; a NaN in a query, or in a key or value it
        attends, gives NaN, as PyTorch's attention does.

    Which SDPA kernel can take which case exactly (``sdpa_kernel_reason``; "sdpa" lets
    PyTorch pick among the eligible ones and its math kernel; "auto" times each):

        =============================  =====  =========  =====  =============================
        case                           flash  efficient  cuDNN  how SDPA is called
        =============================  =====  =========  =====  =============================
        full, or causal with Nq == Nk  yes    yes        yes    ``is_causal`` (top-left, equal
                                                                to bottom-right when square)
        causal, Nq < Nk                yes    yes        yes    ``causal_lower_right`` (flash,
                                                                efficient), else a bool mask
        key padding                    no     yes        yes    bool mask; rows with no key: 0
        causal + key padding           no     yes        yes    bool mask; rows with no key: 0
        =============================  =====  =========  =====  =============================

    Unmeasured: no GPU has run these paths yet (tests/test_reference.py has the CUDA check).
    dtypes and head dims: flash float16/bfloat16, D <= 256, D % 8 == 0; efficient float16/
    bfloat16 (D % 8 == 0) and float32 (D % 4 == 0); cuDNN float16/bfloat16, D <= 128,
    D % 8 == 0, Nk > 1. On the Triton backend, calls that need no gradient with Nq <= 16
    take the flash-decoding kernel; the others the autotuned FlashAttention-2 kernels
    (see ``igpt_kernels._triton.AUTOTUNE``).
    """
    reference.check_attention(q, k, v, causal, key_padding_mask, sm_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    name = _choose(q, k, v, causal, key_padding_mask, scale, backend)
    if q.numel() == 0 or k.shape[2] == 0:
        name = "torch"
    return run_backend(name, q, k, v, causal, key_padding_mask, scale)
