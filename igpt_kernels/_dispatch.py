"""Backend names, their resolution, and the shared argument checks of every op.

Every public op takes ``backend="auto"``. ``resolve`` turns that into a concrete name given
which backends the op has and why each one can or cannot run on the inputs at hand.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


def triton_interpreting() -> bool:
    """True when Triton kernels run in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(op: str, backend: str, reasons: dict[str, str | None], auto_order: tuple[str, ...]):
    """Pick the backend for one call of ``op``.

    ``reasons`` maps each backend the op has to ``None`` when it can run these inputs, or to
    a sentence saying why not. ``"torch"`` (the reference) can always run. ``"auto"`` takes
    the first runnable backend of ``auto_order`` and falls back to ``"torch"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        for name in auto_order:
            if reasons.get(name, "unavailable") is None:
                return name
        return "torch"
    if backend not in reasons:
        have = ", ".join(repr(b) for b in ("auto", *reasons, "torch"))
        raise ValueError(f"{op} has no {backend!r} backend; use one of {have}")
    why = reasons[backend]
    if why is not None:
        raise ValueError(f"{op} cannot use backend={backend!r} here: {why}")
    return backend


def check_tensor(name: str, t, *, dims=None, dtypes=None, device=None) -> None:
    """Raise TypeError/ValueError naming ``name`` if ``t`` is not a tensor of the given kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype)[6:]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
