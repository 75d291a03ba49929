"""Test helpers shared by the kernel test modules (poisoned outputs, the autotune switch)."""

import torch

from igpt_kernels import _triton


def poison_allocations(monkeypatch) -> None:
    """Make torch.empty/empty_like return NaN-filled floating tensors for the rest of a test.

    The kernels allocate their outputs with these, so any element a kernel fails to write
    reads as NaN and fails the comparison against the reference.
    """
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def set_autotune(monkeypatch, enabled: bool) -> None:
    """Turn autotuning of every Triton op on or off (off: each kernel's first config)."""
    monkeypatch.setattr(_triton, "AUTOTUNE", enabled)
