"""The global torch settings that change what our kernels compute, read without tripping
over torch's two APIs for them.

TF32 for float32 matmuls can be set three ways: the legacy
``torch.backends.cuda.matmul.allow_tf32``, the per-backend
``torch.backends.cuda.matmul.fp32_precision`` and the global ``torch.backends.fp32_precision``
("ieee", "tf32" or "none": defer to the next level). Once a user sets one of the new ones,
reading the legacy flag raises RuntimeError on torch 2.9 and later ("mix of the legacy and
new APIs"), so nothing here reads it before the new ones.
"""

from __future__ import annotations

import torch


# torch.compile cannot trace the fp32_precision getters (C++ bindings): it runs this at trace
# time and takes the answer as a constant of the graph (the launch reads it again at run time).
@torch.compiler.assume_constant_result
def matmul_allows_tf32() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32: the matmul backend's
    ``fp32_precision`` if not "none", else the global ``torch.backends.fp32_precision`` if
    not "none", else the legacy ``allow_tf32`` (torch builds without the new API: only it)."""
    matmul = torch.backends.cuda.matmul
    for owner in (matmul, torch.backends):
        precision = getattr(owner, "fp32_precision", "none")
        if precision not in (None, "none"):
            return precision == "tf32"
    return bool(matmul.allow_tf32)
