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

Backends: "triton" (these kernels: the ``@triton.jit`` bodies in ``attention_kernels``, their
launchers and the ``torch.ops.igpt.attention*`` custom ops here), "sdpa" (PyTorch's SDPA
kernels where they can express the mask exactly: ``attention_sdpa``) and "torch"
(``reference.attention``, "auto" on the CPU). "auto" on a GPU has PyTorch judge triton and
each eligible SDPA kernel on the first call per kind of call (``igpt_kernels.trust``), times
those that pass and keeps the fastest (``igpt_kernels._dispatch``); Triton is never used by
"auto" before it passed that check on the GPU at hand.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from igpt_kernels import _triton, reference
from igpt_kernels._dispatch import (
    bucket,
    choose,
    grad_run,
    judge_call,
    needs_grad,
    triton_interpreting,
    triton_unavailable,
)
from igpt_kernels._triton import HAS_TRITON, triton
from igpt_kernels.attention_kernels import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_preprocess_kernel,
    attn_combine_kernel,
    attn_fwd_kernel,
)
from igpt_kernels.attention_sdpa import SDPA_KERNELS, run_sdpa, sdpa_kernel_reason
from igpt_kernels.trust import head_sample

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
# autotuning: one config under the interpreter, a small Ampere/Hopper sweep on the GPU
# --------------------------------------------------------------------------------------

_TUNE_KEY = ["N_KEY", "HEAD_DIM", "CAUSAL", "HAS_PAD"]
_BLOCKS = ("BLOCK_M", "BLOCK_N")

if HAS_TRITON and triton_interpreting():
    # BLOCK_M != BLOCK_N on purpose: the tests then cover diagonals spanning several blocks.
    _SWEEPS = {
        (kernel, kind): [sweep]
        for kernel, sweep in [
            (attn_fwd_kernel, (32, 16, 4, 1)),
            (attn_bwd_dkdv_kernel, (16, 32, 4, 1)),
            (attn_bwd_dq_kernel, (32, 16, 4, 1)),
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
        (attn_fwd_kernel, "narrow"): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        # sm_80: 128x64 spills (48-52 B) at D=128 with padding, 64x64 does not
        (attn_fwd_kernel, "wide"): {90: [(128, 64, 8, 3), (64, 64, 4, 3)], 80: [(64, 64, 4, 3)]},
        (attn_fwd_kernel, "fp32"): {90: [(64, 16, 4, 1), (32, 16, 4, 2)], 80: [(32, 16, 4, 2)]},
        # sm_80 (mma.sync keeps more operands in registers): the sm_90 defaults spill there
        (attn_bwd_dkdv_kernel, "narrow"): {
            90: [(64, 128, 8, 3), (32, 64, 4, 3)],
            80: [(32, 64, 4, 3)],
        },
        (attn_bwd_dkdv_kernel, "wide"): {
            90: [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)],
            80: [(64, 64, 8, 3)],
        },
        (attn_bwd_dkdv_kernel, "fp32"): [(16, 16, 4, 2)],
        (attn_bwd_dq_kernel, "narrow"): [(128, 64, 8, 3), (64, 64, 4, 3)],
        (attn_bwd_dq_kernel, "wide"): {
            90: [(128, 32, 8, 3), (64, 64, 4, 3)],
            80: [(64, 32, 4, 3)],
        },
        (attn_bwd_dq_kernel, "fp32"): [(16, 16, 4, 1)],
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
            attn_fwd_kernel, grid, q, k, v, pad_t, o, lse, *strides_in,
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
        attn_fwd_kernel[(B * H, 1, 1)](
            q, k, v, pad_t, o, lse, *strides_in,
            o.stride(0), o.stride(1), 0, o.stride(2), o.stride(3),
            H, Nq, Nk, chunk, qk_scale, 0, SPLIT=False, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, **common,
        )  # fmt: skip
        return o, None
    part = _empty((B, H, splits, Nq, D), torch.float32, q.device)
    lse_part = _empty((B, H, splits, Nq), torch.float32, q.device)
    attn_fwd_kernel[(B * H, 1, splits)](
        q, k, v, pad_t, part, lse_part, *strides_in,
        *part.stride()[:4], part.stride(4),
        H, Nq, Nk, chunk, qk_scale, 0, SPLIT=True, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, **common,
    )  # fmt: skip
    attn_combine_kernel[(B * H, 1)](
        part, lse_part, o, *part.stride()[:4], *o.stride(), H, Nq, splits,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, num_warps=warps,
    )  # fmt: skip
    return o, None


def _attn_bwd(do, q, k, v, o, lse, pad, causal, sm_scale):
    """Backward launcher: (dq, dk, dv), contiguous, in q's dtype."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    delta = _empty((B, H, Nq), torch.float32, q.device)
    attn_bwd_preprocess_kernel[(B * H, triton.cdiv(Nq, _SMALL_BLOCK))](
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
        attn_bwd_dkdv_kernel, grid, *args, dk, dv, *strides_in, *dk.stride(), *scalars, **common
    )
    grid = lambda meta: (B * H, triton.cdiv(Nq, meta["BLOCK_M"]))
    _launch(attn_bwd_dq_kernel, grid, *args, dq, *strides_in, *dq.stride(), *scalars, **common)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# the launchers as custom ops: single nodes for torch.compile and torch.export
# --------------------------------------------------------------------------------------
# Not ``triton_op``/``wrap_triton``: under TRITON_INTERPRET=1 the kernels are interpreted
# functions that torch.compile would run on fake tensors, and every launch inside the
# autotuned launchers would need wrapping. An opaque op is what we want: inductor calls the
# kernels as they are. lse, an output of the forward op, is what the backward needs; it is
# not differentiable. The backward op has no autograd of its own (no double backward).


def _pad(key_padding_mask):
    return None if key_padding_mask is None else key_padding_mask.to(torch.int8)


@torch.library.custom_op("igpt::attention", mutates_args=())
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
) -> tuple[Tensor, Tensor]:
    """The Triton FlashAttention-2 forward: o (B, H, Nq, D) in q's dtype, contiguous, and lse
    (B, H, Nq) float32 (base 2, +inf where a query sees no key) for the backward."""
    return _attn_fwd(q, k, v, _pad(key_padding_mask), causal, sm_scale)


@attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, sm_scale):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("igpt::attention_backward", mutates_args=())
def attention_backward_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton backward: (dq, dk, dv), contiguous, in q's dtype."""
    return _attn_bwd(do, q, k, v, o, lse, _pad(key_padding_mask), causal, sm_scale)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, causal, sm_scale):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, sm_scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(
        do, q, k, v, o, lse, key_padding_mask, ctx.causal, ctx.sm_scale
    )
    return dq, dk, dv, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("igpt::attention_decode", mutates_args=())
def attention_decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
    num_splits: int,
) -> Tensor:
    """The flash-decoding forward over ``num_splits`` key chunks: o (B, H, Nq, D), Nq <= 16.
    Forward only (no autograd): ``attention`` takes it only for calls needing no gradient."""
    pad = _pad(key_padding_mask)
    return _attn_fwd(q, k, v, pad, causal, sm_scale, num_splits=num_splits)[0]


@attention_decode_op.register_fake
def _(q, k, v, key_padding_mask, causal, sm_scale, num_splits):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------


AUTO_ORDER = ("triton", "sdpa")  # the static "auto" on a GPU, once triton is verified
SAFE = "sdpa"  # the PyTorch backend: what runs where nothing of ours is verified
ARG_NAMES = ("q", "k", "v", "key_padding_mask")


def _mask_kind(causal, key_padding_mask) -> str:
    kind = ("causal" if causal else "full") + ("+pad" if key_padding_mask is not None else "")
    return kind.removeprefix("full+")


def triton_reason(q) -> str | None:
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


def _triton(q, k, v, causal, key_padding_mask, scale):
    B, H, Nq, _ = q.shape
    if not needs_grad(q, k, v) and Nq <= DECODE_MAX_Q:
        splits = decode_splits(B, H, Nq, k.shape[2], q.device)
        return attention_decode_op(q, k, v, key_padding_mask, causal, scale, splits)
    return attention_op(q, k, v, key_padding_mask, causal, scale)[0]


def run_backend(name, q, k, v, causal, key_padding_mask, scale):
    """Attention on one concrete backend: "triton", "sdpa" (SDPA restricted to the kernels
    that can express the mask, and its math kernel), "sdpa-<kernel>" or "torch"; and
    "eager" (``reference.attention_eager``), the judge's yardstick."""
    if name == "triton":
        return _triton(q, k, v, causal, key_padding_mask, scale)
    if name in ("torch", "eager"):
        fn = reference.attention if name == "torch" else reference.attention_eager
        return fn(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sm_scale=scale)
    return run_sdpa(name, q, k, v, causal, key_padding_mask, scale)


def choose_backend(q, k, v, *, causal=True, key_padding_mask=None, sm_scale=None, backend="auto"):
    """The backend ``attention`` runs for these arguments (on a GPU, ``"auto"`` times the
    candidates here on the first call per key; see ``igpt_kernels._dispatch``)."""
    reference.check_attention(q, k, v, causal, key_padding_mask, sm_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _choose(q, k, v, causal, key_padding_mask, scale, backend)


def call_kind(q, k, v, causal, key_padding_mask):
    """(candidate backend names, key fields) of one call on a GPU: the kind of call that
    ``"auto"`` measures and judges once (``igpt_kernels._dispatch``)."""
    names = [] if triton_reason(q) else ["triton"]
    names += [
        f"sdpa-{kern}"
        for kern in SDPA_KERNELS
        if sdpa_kernel_reason(kern, q, k, causal, key_padding_mask) is None
    ]
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    fields = {
        "dtype": str(q.dtype)[6:],
        "mask": _mask_kind(causal, key_padding_mask),
        "D": D,
        "Nq": bucket(Nq),
        "Nk": bucket(Nk),
        "square": Nq == Nk,
        "BH": bucket(B * H),
        "grad": needs_grad(q, k, v),
    }
    return names, fields


def call_judge(q, k, v, causal, key_padding_mask, scale):
    """judge(names) of ``"auto"`` for one call (``_dispatch.judge_call``): each candidate
    runs the call itself and is compared with the oracle on a sample of whole (batch,
    head) pairs (``trust.head_sample``); PyTorch's own 16-bit error is the eager attention's
    (``reference.attention_eager``), since the reference computes in float32."""

    def fn(name, q, k, v, pad):
        return run_backend(name, q, k, v, causal, pad, scale)

    inputs = (q, k, v, key_padding_mask)
    return judge_call(fn, inputs, ARG_NAMES, needs_grad(q, k, v), head_sample, "eager")


def _choose(q, k, v, causal, key_padding_mask, scale, backend):
    reasons = {"triton": triton_reason(q), "sdpa": None}

    def describe():
        return call_kind(q, k, v, causal, key_padding_mask)

    def fn(name, q, k, v, pad):
        return run_backend(name, q, k, v, causal, pad, scale)

    run = grad_run(fn, (q, k, v, key_padding_mask))
    judge = call_judge(q, k, v, causal, key_padding_mask, scale)
    return choose("attention", q.device, backend, reasons, AUTO_ORDER, describe, run, judge, SAFE)


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
            the reference. On a GPU it trusts PyTorch, not our kernels: the first call per
            kind of call compares each candidate's output and every gradient the call needs
            with the reference in float64 (float32 for 16-bit inputs), keeps those within
            2x / 3x of PyTorch's own error in the call's dtype (``igpt_kernels.trust``), and
            runs the fastest of them; one that fails is dropped with a warning. While
            compiling, capturing a CUDA graph or under ``IGPT_DISPATCH=fixed`` nothing is
            judged: Triton runs only where this GPU's dispatch table records it as verified
            for the kind of call (``igpt selftest`` records verdicts), else "sdpa". A named
            backend runs as named, unjudged.

    Returns:
        o: (B, H, Nq, D) in q's dtype (contiguous from "triton"; SDPA's layout from "sdpa").
        A query that sees no key gets zeros; a NaN in a query, or in a key or value it
        attends, gives NaN, as PyTorch's attention does.

    Which SDPA kernel can take which case exactly (``attention_sdpa.sdpa_kernel_reason``;
    "sdpa" lets PyTorch pick among the eligible ones and its math kernel; "auto" times each):

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
