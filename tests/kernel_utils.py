"""Test helpers shared by the test modules (poisoned outputs, the autotune switch, saved bytes)."""

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


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn()`` runs.

    Storages, not tensors: views of one buffer count once, as they cost memory once.
    """
    skip = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
