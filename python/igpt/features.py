"""Pooled features of every layer for a whole dataset, and the two feature baselines.

    feats = extract_features(model, tokens)       # (N, L + 1, d) float32, f^0 .. f^L
    feats = extract_features(model, tokens, bert_mask_seed=0)   # a BERT model, masked input
    raw_pixel_features(images), random_init_model(model)

f^l is the mean over positions of n^l, the block's own normalised input (``IGPT.features``),
computed for every layer in one forward pass and optionally cached on disk. BERT models see
masked inputs at evaluation too: the mask is ``igpt.objectives.bert_mask``'s (drawn lazily by
``MaskRows``), so it is the same on every device and batch size. ``igpt.probe`` fits the
probes on these features.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt._checks import long_rows, token_rows
from igpt.checkpoint import atomic_torch_save
from igpt.model import IGPT
from igpt.objectives import MASK_PROB, MaskRows

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: BERT masks from igpt.objectives (seed_of), not SeedSequence blocks


def _fingerprint_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy


def _fingerprint_tokens(h, tokens, rows: int = 4096) -> None:
    """Hash integer tokens as their int64 values, a block of rows at a time: a uint16
    memmap of the token cache hashes as the int64 tensor of the same tokens does (one
    feature cache entry for both), without an int64 copy of the whole split."""
    if isinstance(tokens, torch.Tensor) and tokens.dtype == torch.long:
        return _fingerprint_tensor(h, tokens)
    h.update(f"{torch.int64}{tuple(tokens.shape)}".encode())
    for s in range(0, len(tokens), rows):
        block = long_rows(tokens[s : s + rows]).contiguous()
        if block.numel():
            h.update(block.reshape(-1).view(torch.uint8).numpy())


def _cache_path(model, tokens, layers, bert_mask_seed, mask_prob, cache_dir, cache_key) -> Path:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}|{layers}|{bert_mask_seed}|{mask_prob}|".encode())
    if cache_key is not None:
        h.update(f"key:{cache_key}|".encode())
    else:  # no key: the weights themselves name the model
        for name, t in model.state_dict().items():
            h.update(name.encode())
            _fingerprint_tensor(h, t)
    _fingerprint_tokens(h, tokens)  # a different dataset never hits, whatever the key says
    return Path(cache_dir) / f"features_{h.hexdigest()}.pt"


def resolve_layers(layers, n_layer: int) -> list[int]:
    """Layer ids in [0, n_layer] of ``layers`` (ints, negative counting from the end; None:
    every layer); a TypeError/ValueError names a bad or out-of-range entry."""
    if layers is None:
        return list(range(n_layer + 1))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layers must be ints in [0, {n_layer}], got {layer!r}")
        l_ = int(layer) + (n_layer + 1 if layer < 0 else 0)
        if not 0 <= l_ <= n_layer:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0..{n_layer}")
        out.append(l_)
    if not out:
        raise ValueError("layers is empty; pass None for all layers")
    return out


@torch.no_grad()
def extract_features(
    model: IGPT,
    tokens,
    *,
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
    bert_mask_seed: int | None = None,
    bert_mask_prob: float = MASK_PROB,
    device=None,
    cache_dir=None,
    cache_key: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled features of every layer for a whole dataset, in one pass per batch.

    Args:
        model: an ``IGPT``. It is put in eval mode for the pass (and restored after).
        tokens: integer (N, n) tensor or numpy array of palette tokens (a numpy array, e.g.
            the uint16 memmap of ``igpt.data.cached_tokens``, is read a batch at a time).
        batch_size: images per forward pass.
        layers: which of f^0 .. f^L to keep (ints, negative counts from L); None keeps all.
        bert_mask_seed: None runs the AR input. An int runs the BERT input with the mask
            ``bert_mask((N, n), bert_mask_prob, seed=bert_mask_seed)`` (masks at evaluation).
        device: where to run; None means the model's device. A model elsewhere is moved.
        cache_dir: a folder to cache the result in. The file name hashes ``cache_key``
            (or, without one, the model's weights), the tokens themselves, ``layers`` and the
            mask settings, so a second call with the same inputs reads the file instead of
            running the model.
        cache_key: a string naming the model (e.g. checkpoint path, step and data spec).
        progress: show a tqdm bar.

    Returns:
        float32 CPU tensor (N, len(layers), d): features[:, j] = f^{layers[j]}. On CUDA the
        model runs under bf16 autocast; the pooling is in float32.
    """
    if not isinstance(model, IGPT):
        raise TypeError(
            f"model must be an igpt.IGPT, got {type(model).__name__} (convert a transformers "
            "ImageGPT with igpt.hf.from_hf)"
        )
    tokens = token_rows(tokens, "tokens", shape_hint="(N, n)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    layer_ids = resolve_layers(layers, model.config.n_layer)
    path = None
    if cache_dir is not None:
        path = _cache_path(
            model, tokens, layer_ids, bert_mask_seed, bert_mask_prob, cache_dir, cache_key
        )
        if path.is_file():
            log.info("features from cache %s", path)
            return torch.load(path, map_location="cpu", weights_only=True)["features"]

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if next(model.parameters()).device != device:
        log.info("moving the model to %s for feature extraction", device)
        model.to(device)
    N, n = tokens.shape
    mask = None
    if bert_mask_seed is not None:
        mask = MaskRows((N, n), bert_mask_prob, seed=bert_mask_seed)
    out = _pooled_pass(model, tokens, layer_ids, mask, batch_size, device, progress)
    if path is not None:
        atomic_torch_save({"features": out, "layers": layer_ids, "key": str(cache_key)}, path)
        log.info("cached features in %s", path)
    return out


def _pooled_pass(model, tokens, layer_ids, mask, batch_size, device, progress) -> torch.Tensor:
    """f^l for ``layer_ids`` of every image, batch by batch, in eval mode (restored after)."""
    N = len(tokens)
    out = torch.empty(N, len(layer_ids), model.config.n_embd, dtype=torch.float32)
    select = None if layer_ids == list(range(model.config.n_layer + 1)) else layer_ids
    was_training = model.training
    model.eval()
    try:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        starts = range(0, N, batch_size)
        for s in tqdm(starts, desc="features", unit="batch", disable=not progress):
            x = long_rows(tokens[s : s + batch_size]).to(device, non_blocking=True)
            m = mask(s, s + batch_size).to(device) if mask is not None else None
            with autocast:
                f = model.features(x, bert_mask=m)  # (B, L + 1, d) float32
            out[s : s + batch_size] = (f if select is None else f[:, select]).float().cpu()
    finally:
        model.train(was_training)
    return out


def raw_pixel_features(images_or_tokens, *, palette=None) -> torch.Tensor:
    """The raw-pixel baseline: each image as one flat float32 vector in [0, 1].

    Args:
        images_or_tokens: uint8 images (N, H, W, 3) (numpy or torch), or integer tokens
            (N, n) together with ``palette``, whose colours replace the tokens.
        palette: an ``igpt.palette.Palette`` (only for tokens).

    Returns:
        float32 (N, H * W * 3) or (N, n * 3).
    """
    x = images_or_tokens
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images_or_tokens must be a numpy array or tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == 3:
        return x.reshape(len(x), -1).float() / 255.0
    if x.dim() == 2 and not x.dtype.is_floating_point and x.dtype != torch.bool:
        if palette is None:
            raise ValueError("tokens need palette=... to turn them back into pixels")
        return palette.dequantize(x.cpu().long()).reshape(len(x), -1).float() / 255.0
    raise ValueError(
        "images_or_tokens must be uint8 images (N, H, W, 3) or integer tokens (N, n), got "
        f"{x.dtype} {tuple(x.shape)}"
    )


def random_init_model(model_or_config, *, seed: int = 0) -> IGPT:
    """A freshly initialised IGPT of the same size: the 'what did pretraining buy' baseline."""
    config = getattr(model_or_config, "config", model_or_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IGPT(config)
