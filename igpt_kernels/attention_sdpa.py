"""The "sdpa" backend of ``igpt_kernels.attention``: igpt's attention (bottom-right causal,
key padding, rows with no visible key) through PyTorch's ``scaled_dot_product_attention``,
and which SDPA kernel can take which call.

``sdpa_kernel_reason`` encodes which SDPA kernel can express which case exactly (the table in
``attention``'s docstring) and the kernels' documented dtype and head-dim limits: flash
float16/bfloat16, D <= 256, D % 8 == 0; efficient float16/bfloat16 (D % 8 == 0) and float32
(D % 4 == 0); cuDNN float16/bfloat16, D <= 128, D % 8 == 0, Nk > 1.
"""

from __future__ import annotations

import torch

from igpt_kernels import reference

SDPA_KERNELS = ("flash", "efficient", "cudnn")  # auto times each as "sdpa-<kernel>"


def sdpa_kernel_reason(kernel, q, k, causal, key_padding_mask) -> str | None:
    """None if SDPA's ``kernel`` ("flash", "efficient", "cudnn") computes igpt's attention
    exactly on these inputs (as ``sdpa_attention`` calls it), else why not.

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


def sdpa_attention(q, k, v, causal, key_padding_mask, scale, kernels):
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


def run_sdpa(name, q, k, v, causal, key_padding_mask, scale):
    """``"sdpa"`` (SDPA restricted to the kernels that can express the mask, and its math
    kernel) or ``"sdpa-<kernel>"`` (that kernel alone)."""
    if name == "sdpa":
        kernels = [
            kern
            for kern in SDPA_KERNELS
            if sdpa_kernel_reason(kern, q, k, causal, key_padding_mask) is None
        ]
        return sdpa_attention(q, k, v, causal, key_padding_mask, scale, [*kernels, "math"])
    return sdpa_attention(q, k, v, causal, key_padding_mask, scale, [name.removeprefix("sdpa-")])
