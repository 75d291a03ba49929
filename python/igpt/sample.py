"""Samples from an AR iGPT: unconditional images, image completions, PNG grids.

    model, palette, ckpt = load_for_sampling("runs/demo")      # refuses BERT checkpoints
    tokens = unconditional(model, 16, temperature=1.0, seed=0)  # (16, n_px^2)
    done = complete(model, originals, rows=16, n_samples=4)     # (N, 4, n_px^2)
    save_grid("samples.png", originals, done, palette, n_prefix=16 * n_px)

Completion keeps a raster-order prefix of every image (the top ``rows`` rows, or any
``n_prefix`` pixels) and lets the model draw the rest, as in the paper's completion figures
(Chen et al., 2020, fig. 1). Sampling itself is ``IGPT.generate`` (KV cache, temperature,
top-k, top-p); this module batches it, keeps seeds reproducible and draws the pictures: one
row per image, the masked input (the part the model did not see in grey), the completions,
then the original. ``igpt sample`` (``igpt.commands.sample``) runs this on a checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from igpt._checks import check_finite_weights, check_tokens
from igpt._io import atomic_write
from igpt.model import IGPT

log = logging.getLogger(__name__)

GREY = 128  # colour of the pixels a completion was not given
BACKGROUND = 255  # colour of the padding between grid cells


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------


def load_for_sampling(checkpoint, device=None):
    """Load a checkpoint for sampling: ``(model, palette_or_None, ckpt)``, model in eval mode.

    Raises ValueError when the checkpoint was trained with the BERT objective
    (``ckpt["objective"] == "bert"``): a BERT model predicts masked tokens from both sides
    and has no left-to-right distribution to sample images from.
    """
    from igpt.checkpoint import load_model, objective_of, resolve_checkpoint

    model, palette, ckpt = load_model(checkpoint, device=device)
    objective = objective_of(ckpt)
    if objective == "bert":
        raise ValueError(
            f"checkpoint {resolve_checkpoint(checkpoint)} was trained with the BERT objective, "
            "which has no left-to-right sampler; sample from an AR checkpoint (--objective ar)"
        )
    if objective != "ar":
        raise ValueError(f"checkpoint objective must be 'ar' or 'bert', got {objective!r}")
    check_finite_weights(model, f"checkpoint {resolve_checkpoint(checkpoint)}")
    return model.eval(), palette, ckpt


def _batched_generate(model: IGPT, n, prefix, batch_size, seed, progress, sampling):
    """model.generate in batches of ``batch_size``; batch i is seeded with seed + i."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    chunks = []
    for i, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        chunks.append(
            model.generate(
                m,
                prefix=None if prefix is None else prefix[start : start + m],
                seed=None if seed is None else seed + i,
                progress=progress,
                **sampling,
            )
        )
    return torch.cat(chunks)


def unconditional(
    model: IGPT,
    n: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """``n`` images sampled from scratch: int64 (n, n_px^2) palette ids on the model's device.

    Sampling arguments are ``IGPT.generate``'s. Images are drawn ``batch_size`` at a time;
    batch i uses seed + i, so a seed reproduces the images for a given batch size.
    """
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return _batched_generate(model, n, None, batch_size, seed, progress, sampling)


def prefix_length(n_px: int, rows: int | None = None, n_prefix: int | None = None) -> int:
    """Raster positions kept by a completion: ``rows * n_px``, or ``n_prefix``; half by default."""
    if rows is not None and n_prefix is not None:
        raise ValueError(f"give rows or n_prefix, not both (got rows={rows}, n_prefix={n_prefix})")
    if n_prefix is None:
        rows = n_px // 2 if rows is None else rows
        if not isinstance(rows, int) or not 0 <= rows <= n_px:
            raise ValueError(f"rows must be an int in [0, n_px={n_px}], got {rows!r}")
        return rows * n_px
    if not isinstance(n_prefix, int) or not 0 <= n_prefix <= n_px * n_px:
        raise ValueError(f"n_prefix must be an int in [0, n_px^2={n_px * n_px}], got {n_prefix!r}")
    return n_prefix


def complete(
    model: IGPT,
    tokens,
    *,
    rows: int | None = None,
    n_prefix: int | None = None,
    n_samples: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Complete images from their top rows (or any raster-order prefix).

    Args:
        model: an AR ``IGPT``.
        tokens: int (N, n_px^2) or (N, n_px, n_px) palette ids of the images to complete.
        rows: keep the top ``rows`` rows of every image (default: half of them).
        n_prefix: keep the first ``n_prefix`` pixels in raster order instead of whole rows.
        n_samples: completions per image.
        temperature, top_k, top_p: as in ``IGPT.generate``.
        seed: reproducible completions (for a given batch_size); None uses torch's RNG.
        batch_size: sequences sampled at once (N * n_samples are sampled in all).
        progress: tqdm bars over the positions.

    Returns:
        int64 (N, n_samples, n_px^2) on the model's device; ``[:, :, :p]`` equals the kept
        prefix of each image.
    """
    cfg = model.config
    tokens = check_tokens(tokens, dims=(2, 3), shape_hint="(N, n_px^2) or (N, n_px, n_px)")
    tokens = tokens.reshape(len(tokens), -1).long()
    if tokens.shape[1] != cfg.n_positions:
        raise ValueError(
            f"tokens must hold n_px^2 = {cfg.n_positions} pixels per image (the model's size), "
            f"got {tokens.shape[1]}"
        )
    p = prefix_length(cfg.n_px, rows, n_prefix)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    device = model.transformer.wte.weight.device
    prefix = tokens[:, :p].to(device).repeat_interleave(n_samples, dim=0)  # (N * S, p)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out = _batched_generate(model, len(prefix), prefix, batch_size, seed, progress, sampling)
    return out.view(len(tokens), n_samples, cfg.n_positions)


# --------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------


def _rgb(tokens: torch.Tensor, palette) -> np.ndarray:
    """Palette ids (..., n_px^2) -> uint8 RGB (..., n_px, n_px, 3)."""
    from igpt.palette import Palette

    if not isinstance(palette, Palette):
        palette = Palette(palette)
    tokens = torch.as_tensor(tokens).cpu().long()
    n_px = math.isqrt(tokens.shape[-1])
    if n_px * n_px != tokens.shape[-1]:
        raise ValueError(f"tokens must hold a square image per row, got {tokens.shape[-1]} pixels")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= len(palette)):
        raise ValueError(
            f"tokens must lie in [0, {len(palette)}) for this palette, got "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    rgb = palette.dequantize(tokens).numpy()  # (..., n_px^2, 3)
    return rgb.reshape(*tokens.shape[:-1], n_px, n_px, 3)


def _tile(cells: np.ndarray, scale: int, pad: int) -> np.ndarray:
    """(R, C, n, n, 3) images -> one uint8 picture with ``pad`` background pixels around each."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    cells = cells.repeat(scale, axis=2).repeat(scale, axis=3)  # (R, C, n*s, n*s, 3)
    R, C, h, w, _ = cells.shape
    grid = np.full((R * h + (R + 1) * pad, C * w + (C + 1) * pad, 3), BACKGROUND, np.uint8)
    for r in range(R):
        for c in range(C):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = cells[r, c]
    return grid


def sample_grid(
    originals, completions, palette, *, n_prefix: int = 0, scale: int = 1, pad: int = 2
) -> np.ndarray:
    """Draw samples as one uint8 RGB picture (H, W, 3).

    Args:
        originals: None for unconditional samples, or int (N, n_px^2) palette ids of the
            images that were completed.
        completions: int (N, S, n_px^2) with originals (S completions per image), or
            (M, n_px^2) samples without them.
        palette: ``igpt.palette.Palette`` (or its (K, 3) 0..255 centroids).
        n_prefix: pixels of each original the model was given (raster order).
        scale: each pixel becomes a scale x scale block.
        pad: background pixels between and around the cells.

    With originals each row shows an image: its first n_prefix pixels with the rest grey
    (what the model saw), its S completions, then the original, so the picture has S + 2
    columns. Without them the M samples fill a near-square grid, row by row.
    Each side is cells * n_px * scale + (cells + 1) * pad pixels.
    """
    completions = torch.as_tensor(completions)
    if originals is None:
        samples = _rgb(completions.reshape(-1, completions.shape[-1]), palette)  # (M, n, n, 3)
        M, n_px = samples.shape[0], samples.shape[1]
        C = math.ceil(math.sqrt(M))
        R = math.ceil(M / C)
        cells = np.full((R * C, n_px, n_px, 3), BACKGROUND, np.uint8)
        cells[:M] = samples
        return _tile(cells.reshape(R, C, n_px, n_px, 3), scale, pad)
    originals = torch.as_tensor(originals)
    if completions.dim() != 3 or originals.dim() != 2 or len(originals) != len(completions):
        raise ValueError(
            "with originals (N, n_px^2), completions must be (N, S, n_px^2); got originals "
            f"{tuple(originals.shape)} and completions {tuple(completions.shape)}"
        )
    if not 0 <= n_prefix <= originals.shape[1]:
        raise ValueError(f"n_prefix must be in [0, {originals.shape[1]}], got {n_prefix}")
    orig = _rgb(originals, palette)  # (N, n, n, 3)
    masked = orig.reshape(len(orig), -1, 3).copy()
    masked[:, n_prefix:] = GREY
    cells = np.concatenate(
        [masked.reshape(orig.shape)[:, None], _rgb(completions, palette), orig[:, None]], axis=1
    )  # (N, S + 2, n, n, 3)
    return _tile(cells, scale, pad)


def completion_labels(n_samples: int) -> list[tuple[str, str]]:
    """(long, short) names of a completion grid's columns, left to right."""
    middle = [(f"sample {i}", str(i)) for i in range(1, n_samples + 1)]
    return [("given", "in"), *middle, ("original", "orig")]


def label_columns(picture: np.ndarray, labels, cell: int, pad: int) -> np.ndarray:
    """``picture`` (a grid of ``cell``-wide columns) under a strip naming each column; a
    label too wide for its column gives way to its short form."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height = font.getbbox("Ag")[3] + 2 * pad
    strip = Image.new("RGB", (picture.shape[1], height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for c, (long, short) in enumerate(labels):
        text = long if draw.textlength(long, font=font) <= cell else short
        x = pad + c * (cell + pad) + (cell - draw.textlength(text, font=font)) / 2
        draw.text((max(x, 0), pad), text, fill=(20, 20, 20), font=font)
    return np.concatenate([np.asarray(strip), picture], axis=0)


def save_grid(
    path,
    originals,
    completions,
    palette,
    *,
    n_prefix: int = 0,
    scale: int = 1,
    pad: int = 2,
    tokens_path=None,
    labels: bool = False,
) -> Path:
    """Write ``sample_grid(...)`` as a PNG at ``path`` (and the raw tokens as .npy).

    ``labels`` (with originals) adds a strip above the grid naming its columns: what the
    model was given, each completion, the original.

    ``tokens_path``, when given, receives ``completions`` as an int64 .npy, the ids exactly
    as sampled. Both files are written through a temporary file and a rename. Returns the
    PNG's path.
    """
    from PIL import Image

    picture = sample_grid(originals, completions, palette, n_prefix=n_prefix, scale=scale, pad=pad)
    if labels and originals is not None:
        n_samples = torch.as_tensor(completions).shape[1]
        cell = math.isqrt(torch.as_tensor(originals).shape[1]) * scale
        picture = label_columns(picture, completion_labels(n_samples), cell, pad)
    path = Path(path)
    atomic_write(path, lambda f: Image.fromarray(picture).save(f, format="PNG"))
    if tokens_path is not None:
        ids = torch.as_tensor(completions).cpu().long().numpy()
        atomic_write(tokens_path, lambda f: np.save(f, ids))
    return path
