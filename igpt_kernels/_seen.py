"""Facts about a tensor's values, read once and kept while the tensor stays unchanged.

Reading a CUDA tensor's values on the host (``.cpu()``, ``bool(t.all())``) waits for the GPU
and is refused while a CUDA graph is captured. Where a caller passes the same tensor call
after call (a palette, the attention mask transformers hands every layer of one forward),
what was read from it is kept here, keyed by the tensor's identity and checked against its
version counter (bumped by every in-place change) and data pointer, so later calls read
nothing. A tensor that tracks no version (made under ``torch.inference_mode``) is never
remembered: its values are read each time; nor is a fake or meta tensor (no values).
"""

from __future__ import annotations

import weakref

from torch._subclasses.fake_tensor import is_fake

MISSING = object()


def _state(t):
    """(version, data pointer) of ``t``, or None where ``t`` has no version counter or no
    values (a fake or meta tensor: shape propagation)."""
    if t.device.type == "meta" or is_fake(t):
        return None
    try:
        return t._version, t.data_ptr()
    except RuntimeError:  # inference tensors track no version
        return None


class SeenTensors:
    """``put(t, value, *extra)`` keeps ``value`` for tensor ``t`` (and the hashable ``extra``
    that also decide it); ``get(t, *extra)`` returns it while ``t`` is the same object,
    unchanged, else ``MISSING``. At most ``most`` tensors are kept (the oldest dropped)."""

    def __init__(self, most: int = 16):
        self.most = most
        self._kept: dict = {}  # (id, extra) -> (weakref, state, value)

    def get(self, t, *extra):
        """What was kept for ``t`` as it is now, or ``MISSING``."""
        rec = self._kept.get((id(t), extra))
        if rec is None or rec[0]() is not t or rec[1] != _state(t) or rec[1] is None:
            return MISSING
        return rec[2]

    def put(self, t, value, *extra) -> None:
        """Keep ``value`` for ``t`` as it is now (nothing for a tensor without a version)."""
        state = _state(t)
        if state is None:
            return
        while len(self._kept) >= self.most:
            self._kept.pop(next(iter(self._kept)))
        self._kept[(id(t), extra)] = (weakref.ref(t), state, value)
