"""Attention for iGPT: causal (AR), bidirectional (BERT) and key-padded.

    o = softmax(q k^T * sm_scale + mask) v

q: (B, H, Nq, D); k, v: (B, H, Nk, D), Nq <= Nk, D in {32, 64, 96, 128}. Causal masking is
bottom-right aligned (query i sees keys j <= i + Nk - Nq), which makes a block of new queries
over a KV cache correct. ``key_padding_mask`` (B, Nk) bool marks the keys to attend (True).

Backends: "torch" (``reference.attention``). The Triton flash-attention kernel is not built
yet; asking for backend="triton" raises a ValueError that says so.
"""

from __future__ import annotations

from igpt_kernels import reference
from igpt_kernels._dispatch import resolve


def _triton_unavailable(q) -> str | None:
    return "the Triton attention kernel is not implemented yet"


def attention(q, k, v, *, causal=True, key_padding_mask=None, sm_scale=None, backend="auto"):
    """Scaled dot-product attention with iGPT's masks, differentiable in q, k and v.

    Args:
        q: (B, H, Nq, D) float16, bfloat16 or float32 (float64 on the "torch" backend).
        k, v: (B, H, Nk, D), same dtype and device as q, Nq <= Nk.
        causal: True for the AR model (bottom-right aligned), False for BERT.
        key_padding_mask: optional (B, Nk) bool, True where a key may be attended.
        sm_scale: softmax scale, default 1/sqrt(D).
        backend: "auto", "triton" or "torch".

    Returns:
        o: (B, H, Nq, D) in q's dtype. A query that sees no key gets zeros.
    """
    reference.check_attention(q, k, v, causal, key_padding_mask, sm_scale)
    name = resolve("attention", backend, {"triton": _triton_unavailable(q)}, ("triton",))
    return reference.attention(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, sm_scale=sm_scale, backend=name
    )
