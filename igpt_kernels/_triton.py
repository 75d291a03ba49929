"""Import Triton where it is installed, or a stand-in so kernel modules still import.

Kernel modules write ``from igpt_kernels._triton import HAS_TRITON, tl, triton`` and decorate
their kernels as usual. Without Triton the decorators return the function unchanged and
``HAS_TRITON`` is False, so dispatch never launches them.
"""

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs (macOS, Windows) have no Triton
    HAS_TRITON = False

    def _identity_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = SimpleNamespace(
        jit=_identity_decorator,
        autotune=_identity_decorator,
        heuristics=_identity_decorator,
        Config=lambda *a, **k: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length(),
    )
    tl = SimpleNamespace(constexpr=int)

__all__ = ["HAS_TRITON", "triton", "tl"]
