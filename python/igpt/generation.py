"""Decoding helpers behind ``IGPT.generate``: argument checks, the next-token sampler and
the fixed-shape (CUDA-graph) one-token step. Kept out of model.py so the model reads top to
bottom; ``IGPT.generate`` is the public entry point."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def check_generate_args(model, n, temperature, top_k, top_p, device) -> torch.device:
    """Validate ``IGPT.generate``'s arguments; returns the model's device."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    here = model.transformer.wte.weight.device
    device = here if device is None else torch.device(device)
    if device.type != here.type or (device.index is not None and device != here):
        raise ValueError(
            f"device={str(device)!r} but the model is on {here}; move it first with "
            f"model.to({str(device)!r})"
        )
    return here


def check_prefix(model, prefix, n, device) -> torch.Tensor:
    """Validate a prefix (n, p) or (p,) of palette ids; returns it as int64 (n, p)."""
    if prefix is None:
        return torch.empty(n, 0, dtype=torch.long, device=device)
    if (
        not isinstance(prefix, torch.Tensor)
        or prefix.dtype.is_floating_point
        or prefix.dtype.is_complex
        or prefix.dtype == torch.bool
        or prefix.dim() not in (1, 2)
    ):
        got = (
            f"{prefix.dtype} {tuple(prefix.shape)}"
            if isinstance(prefix, torch.Tensor)
            else type(prefix).__name__
        )
        raise TypeError(f"prefix must be an integer tensor (n, p) or (p,), got {got}")
    if prefix.dim() == 1:
        prefix = prefix.expand(n, -1)
    if prefix.shape[0] != n:
        raise ValueError(f"prefix must have n={n} rows, got shape {tuple(prefix.shape)}")
    if prefix.shape[1] > model.config.n_positions:
        raise ValueError(
            f"prefix has {prefix.shape[1]} positions but an image has only "
            f"n_px^2 = {model.config.n_positions}"
        )
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= model.config.n_colors):
        raise ValueError(
            f"prefix must hold palette ids in [0, n_colors={model.config.n_colors}), got "
            f"values in [{int(prefix.min())}, {int(prefix.max())}]"
        )
    return prefix.to(device=device, dtype=torch.long)


class FixedShapeStep:
    """``IGPT._decode`` for one token with shapes that do not change from step to step.

    The token and its position live in fixed buffers, and a step attends to a fixed length
    of the cache (the smallest of ``buckets`` lengths that covers the position) with the
    unwritten keys masked. On a GPU each length is captured once as a CUDA graph and then
    replayed, so the ~10 kernels per layer launch without Python in between; the buckets
    keep the keys read per step near the sliced cache's instead of always the whole image.
    Off the GPU, or if capture fails (logged), the same steps run eagerly.
    """

    def __init__(self, model, cache: torch.Tensor, first_pos: int, buckets: int = 8):
        B, N = cache.shape[2], model.config.n_positions
        device = cache.device
        self.model, self.cache = model, cache
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), N - 1, dtype=torch.long, device=device)
        self.key_pos = torch.arange(N, device=device).expand(B, N)  # (B, N)
        chunk = max(16, -(-N // buckets))
        self.lengths = [min(e, N) for e in range(chunk, N + chunk, chunk) if e > first_pos]
        self.graphs = {}  # cache length -> (graph, its static logits)
        if device.type == "cuda":
            try:
                self._capture()
            except RuntimeError as e:  # a kernel that syncs or allocates outside the pool
                log.warning("CUDA graph capture failed, decoding eagerly: %s", e)
                self.graphs = {}

    def _run(self, length: int):
        visible = self.key_pos[:, :length] <= self.pos  # (B, length), the written positions
        return self.model._decode(self.ids, self.pos, self.cache, visible)

    def _capture(self):
        # Warm up on a side stream first, so Triton compiles and autotunes outside the graph.
        # Warm-ups write keys at position N - 1, which every later step masks or rewrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for length in self.lengths:
                self._run(length)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for length in self.lengths:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._run(length)
            self.graphs[length], pool = (graph, logits), graph.pool()

    def __call__(self, ids, pos: int, cache):
        self.ids.copy_(ids)
        self.pos.fill_(pos)
        length = next(n for n in self.lengths if n > pos)
        if length not in self.graphs:
            return self._run(length)
        graph, logits = self.graphs[length]
        graph.replay()
        return logits


def next_token(logits, temperature, top_k, top_p, generator):
    """Token ids (B,) drawn from logits (B, K): greedy at temperature 0, else softmax of
    logits / temperature restricted to the top_k colours and to the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, K)
        probs = sorted_logits.softmax(dim=-1)
        # drop a colour once the more likely ones already reach top_p (the first never is)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
