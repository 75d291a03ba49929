"""Decoding behind ``IGPT.generate``: the key/value cache, argument checks, the sampling
loop, the next-token sampler and the fixed-shape (CUDA-graph) one-token step.

    caches = model.kv_cache(B)                    # one KVCache per layer, empty
    logits = model.decode(ids, caches)            # ids (B, m) appended; logits (B, n_colors)

Each attention layer hands its new keys and values to its ``KVCache.update``, which stores
them and returns what the queries attend to (gpt-fast's pattern), so the model's blocks have
one code path for training and decoding. ``FixedShapeKVCache`` is the same interface with
shapes that never change from step to step, which CUDA graphs need.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from igpt._checks import check_finite_weights, check_tokens

log = logging.getLogger(__name__)


class KVCache:
    """One layer's keys and values for whole images: ``kv`` (2, B, H, n_px^2, hd).

    ``pos`` is the next position to write. ``update(k, v)`` stores k, v (B, H, n, hd) at
    positions pos..pos+n-1, advances ``pos`` and returns the keys and values to attend to,
    (B, H, pos, hd) views of the cache, with no padding mask.
    """

    def __init__(self, kv: torch.Tensor):
        self.kv, self.pos = kv, 0

    @classmethod
    def for_model(cls, config, batch_size: int, device, dtype) -> list[KVCache]:
        """One cache per layer, views of one zeroed (L, 2, B, H, n_px^2, hd) buffer.

        Zeroed, not empty: the fixed-shape step multiplies the unwritten values by zero
        attention weights, and 0 * NaN from uninitialised memory would be NaN.
        """
        c = config
        shape = (c.n_layer, 2, batch_size, c.n_head, c.n_positions, c.head_dim)
        return [cls(kv) for kv in torch.zeros(shape, device=device, dtype=dtype)]

    def positions(self, n: int) -> torch.Tensor:
        """The positions (n,) the next ``n`` tokens take."""
        return torch.arange(self.pos, self.pos + n, device=self.kv.device)

    def update(self, k, v):
        """Store k, v (B, H, n, hd); returns (keys, values, key_padding_mask) to attend to."""
        n = k.shape[2]
        self.kv[:, :, :, self.pos : self.pos + n] = torch.stack((k, v))
        self.pos += n
        k, v = self.kv[:, :, :, : self.pos]  # 2 x (B, H, pos, hd), views of the cache
        return k, v, None


class FixedShapeKVCache(KVCache):
    """A ``KVCache`` for one token per step with shapes that never change (CUDA graphs).

    ``pos`` is a (1,) tensor the caller sets before each step (it does not advance), and
    the queries attend to the first ``length`` cached positions, the ones not written yet
    masked, so a step's kernels and shapes depend on ``length`` only.
    """

    def __init__(self, kv: torch.Tensor, pos: torch.Tensor, length: int):
        self.kv, self.pos, self.length = kv, pos, length
        self.key_pos = torch.arange(kv.shape[3], device=kv.device)  # (N,)

    def positions(self, n: int) -> torch.Tensor:
        """The position (1,) of the one token of this step."""
        if n != 1:
            raise ValueError(f"a FixedShapeKVCache takes one token per step, got {n}")
        return self.pos

    def update(self, k, v):
        """Store k, v (B, H, 1, hd) at ``pos``; returns the first ``length`` keys and values
        (B, H, length, hd) and the mask of the written ones (B, length)."""
        self.kv.index_copy_(3, self.pos, torch.stack((k, v)))
        visible = (self.key_pos[: self.length] <= self.pos).expand(k.shape[0], -1)
        k, v = self.kv[:, :, :, : self.length]  # 2 x (B, H, length, hd)
        return k, v, visible


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
    prefix = check_tokens(prefix, "prefix", dims=(1, 2), shape_hint="(n, p) or (p,)")
    if prefix.dim() == 1:
        prefix = prefix.expand(n, -1)
    if prefix.shape[0] != n:
        raise ValueError(f"prefix must have n={n} rows, got shape {tuple(prefix.shape)}")
    if prefix.shape[1] > model.config.n_positions:
        raise ValueError(
            f"prefix has {prefix.shape[1]} positions but an image has only "
            f"n_px^2 = {model.config.n_positions}"
        )
    check_tokens(prefix, "prefix", dims=(2,), n_colors=model.config.n_colors)
    return prefix.to(device=device, dtype=torch.long)


def sample(model, n, prefix, temperature, top_k, top_p, seed, device, progress, cuda_graph):
    """``IGPT.generate``'s loop (see its docstring): prefill, then one token per step."""
    N = model.config.n_positions
    device = check_generate_args(model, n, temperature, top_k, top_p, device)
    check_finite_weights(model)
    prefix = check_prefix(model, prefix, n, device)
    p = prefix.shape[1]
    out = torch.empty(n, N, dtype=torch.long, device=device)
    out[:, :p] = prefix
    if p == N:
        return out
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    cache = model.kv_cache(n, device)
    sos = torch.full((n, 1), model.config.sos_id, dtype=torch.long, device=device)
    logits = model.decode(torch.cat([sos, prefix], dim=1), cache)  # prefill, positions 0..p
    step = FixedShapeStep(model, cache) if cuda_graph and p + 1 < N else model.decode
    for t in tqdm(range(p, N), desc="sampling", unit="px", disable=not progress):
        out[:, t] = next_token(logits, temperature, top_k, top_p, generator)
        if t + 1 < N:
            logits = step(out[:, t : t + 1], cache)  # token t is the input at position t + 1
    return out


class FixedShapeStep:
    """``IGPT.decode`` for one token, with shapes that do not change from step to step.

    Drop-in for ``model.decode(ids, cache)`` after the prefill: the token and its position
    live in fixed buffers, and a step attends through ``FixedShapeKVCache`` views of the
    same buffers to a fixed length of the cache (the smallest of ``buckets`` lengths that
    covers the position). On a GPU each length is captured once as a CUDA graph and then
    replayed, so the ~10 kernels per layer launch without Python in between; the buckets
    keep the keys read per step near the sliced cache's instead of always the whole image.
    Off the GPU, or if capture fails (logged), the same steps run eagerly.
    """

    def __init__(self, model, cache: list[KVCache], buckets: int = 8):
        first_pos, kv = cache[0].pos, cache[0].kv
        B, N, device = kv.shape[1], model.config.n_positions, kv.device
        self.model, self.next_pos = model, first_pos
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), N - 1, dtype=torch.long, device=device)
        self.caches = [FixedShapeKVCache(c.kv, self.pos, N) for c in cache]
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
        for c in self.caches:
            c.length = length
        return self.model.decode(self.ids, self.caches)

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

    def __call__(self, ids, cache=None):
        """Logits (B, n_colors) after ``ids`` (B, 1) at the next position. ``cache``, the
        eager caches the prefill filled, is accepted for ``model.decode``'s signature."""
        pos, self.next_pos = self.next_pos, self.next_pos + 1
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
