"""Nearest-colour palette quantization: RGB pixels -> token ids, and back.

tokens[...] = argmin_k |pixels[..., :] - palette[k, :]|^2 (lowest k on exact ties).
pixels: uint8 (..., 3); palette: float32 (K, 3) in 0..255, 1 <= K <= 65536.

Backends: "torch" (``reference.quantize``). The C++ ("cpu") and CUDA ("cuda") kernels are
not built yet; asking for them raises a ValueError that says so.
"""

from __future__ import annotations

from igpt_kernels import reference
from igpt_kernels._dispatch import resolve


def _compiled_unavailable(kind: str, pixels) -> str | None:
    return f"the {kind} palette kernel is not implemented yet"


def quantize(pixels, palette, *, backend="auto"):
    """Map each RGB pixel to the index of its nearest palette colour.

    Args:
        pixels: uint8 tensor (..., 3), RGB in 0..255.
        palette: float32 (K, 3) in 0..255 RGB, 1 <= K <= 65536, on pixels' device.
        backend: "auto", "cuda", "cpu" or "torch".

    Returns:
        int64 tensor (...) of palette indices.
    """
    reference.check_quantize(pixels, palette)
    reasons = {
        "cuda": _compiled_unavailable("CUDA", pixels),
        "cpu": _compiled_unavailable("C++", pixels),
    }
    name = resolve("quantize", backend, reasons, ("cuda", "cpu"))
    return reference.quantize(pixels, palette, backend=name)


def dequantize(tokens, palette):
    """Map palette indices (...) back to uint8 RGB (..., 3)."""
    return reference.dequantize(tokens, palette)
