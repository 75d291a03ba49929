"""Pixels to pixels and pixels to tokens: decoding one file, squaring, resizing, tokenising,
the training augmentations and the hold-out split.

    resize(images, 32)                      # uint8 (N, H, W, 3) -> (N, 32, 32, 3), PIL bilinear
    tokenize(images, palette, n_px=32)      # int64 (N, 1024), raster order
    pad_crop_flip(images, rng=rng)          # CIFAR augmentation
    pad_crop_flip_tokens(tokens, 32, rng=rng)   # the same on n_px x n_px tokens (no images)
    train_idx, val_idx = holdout_split(n)   # the paper's 10% (sec. 3.1)

Every function takes and returns uint8 (N, H, W, 3) RGB numpy images; the one-image helpers
(``read_image``, ``square``, ``resize_one``) are what the readers and the token cache's
worker processes call on each file, so that the images a set is tokenised from are the
images ``load_images`` returns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def check_images(images, name: str = "images") -> None:
    """Raise unless ``images`` is a uint8 numpy array (N, H, W, 3)."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 RGB, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be (N, H, W, 3), got shape {images.shape}")


# ----------------------------------------------------------------------------- one image


def read_image(path: Path) -> np.ndarray | None:
    """The file at ``path`` decoded as uint8 (H, W, 3) RGB, or None where PIL cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return rgb8(im)
    except Exception as e:  # PIL raises many kinds of errors on bad files
        log.debug("skipping unreadable image %s: %s", path, e)
        return None


def rgb8(im) -> np.ndarray:
    """A PIL image as uint8 (H, W, 3) RGB; 16-bit grey ("I;16", or "I" holding 0..65535, as
    PIL opens 16-bit PNGs) is scaled to 8 bits, where ``convert("RGB")`` would clip it."""
    if im.mode.startswith("I;16") or im.mode == "I":
        x = np.asarray(im).astype(np.float64)
        grey = np.round(np.clip(x, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then bilinear resize to size x size."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize_one(image[top : top + s, left : left + s], size)


def resize_one(image: np.ndarray, n_px: int) -> np.ndarray:
    """One uint8 (H, W, 3) image brought to (n_px, n_px, 3) by PIL's bilinear filter."""
    from PIL import Image

    if image.shape[0] == n_px and image.shape[1] == n_px:
        return image
    out = Image.fromarray(image).resize((n_px, n_px), resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------- resizing


def resize(images: np.ndarray, n_px: int) -> np.ndarray:
    """Bilinear resize to (N, n_px, n_px, 3) uint8, as transformers' ImageGPT processor does.

    PIL's bilinear filter (anti-aliased when shrinking), the same call the processor makes.
    Images that already have the size are returned unchanged (no copy).
    """
    check_images(images)
    if not isinstance(n_px, int) or n_px < 1:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    if images.shape[1] == n_px and images.shape[2] == n_px:
        return images
    out = np.empty((len(images), n_px, n_px, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = resize_one(im, n_px)
    return out


def tokenize(images: np.ndarray, palette, n_px: int, *, batch_size: int = 1024) -> torch.Tensor:
    """Resize to n_px, then quantize with ``palette``: int64 tensor (N, n_px * n_px), raster.

    ``palette`` is an ``igpt.palette.Palette`` (or anything with its ``quantize``). Work is
    done in batches of ``batch_size`` images to bound memory; from 10 batches on, a tqdm
    bar shows the progress.
    """
    from tqdm.auto import tqdm

    check_images(images)
    out = torch.empty((len(images), n_px * n_px), dtype=torch.int64)
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="tokenize", unit="batch", disable=len(starts) < 10):
        chunk = np.ascontiguousarray(resize(images[s : s + batch_size], n_px))
        out[s : s + len(chunk)] = palette.quantize(chunk).reshape(len(chunk), -1).cpu()
    return out


def holdout_split(n: int, frac: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation indices: ``round(n * frac)`` held out (sec. 3.1: 10%).

    Deterministic for a given ``seed``; both index arrays are sorted int64.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"frac must lie in [0, 1), got {frac!r}")
    perm = np.random.default_rng(seed).permutation(int(n))
    n_val = int(round(n * frac))
    if n_val == 0 and frac > 0 and n > 1:
        n_val = 1
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


# ----------------------------------------------------------------------------- augmentations


def random_resized_crop(
    images: np.ndarray,
    n_px: int,
    *,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Inception-style random resized crop of every image, then bilinear resize to n_px.

    A crop of area ``scale`` x the image's and aspect ratio in ``ratio`` (log-uniform) is
    drawn per image (10 tries, else the central largest crop), as torchvision's
    ``RandomResizedCrop``. Returns uint8 (N, n_px, n_px, 3).
    """
    check_images(images)
    rng = rng if rng is not None else np.random.default_rng()
    N, H, W, _ = images.shape
    out = np.empty((N, n_px, n_px, 3), np.uint8)
    log_r = np.log(ratio)
    for i in range(N):
        for _ in range(10):
            area = H * W * rng.uniform(*scale)
            r = float(np.exp(rng.uniform(*log_r)))
            w = int(round(np.sqrt(area * r)))
            h = int(round(np.sqrt(area / r)))
            if 0 < w <= W and 0 < h <= H:
                top = int(rng.integers(0, H - h + 1))
                left = int(rng.integers(0, W - w + 1))
                break
        else:
            h = w = min(H, W)
            top, left = (H - h) // 2, (W - w) // 2
        crop = np.ascontiguousarray(images[i, top : top + h, left : left + w])
        out[i] = resize_one(crop, n_px)
    return out


def pad_crop_flip(
    images: np.ndarray, *, pad: int = 4, rng: np.random.Generator | None = None
) -> np.ndarray:
    """CIFAR augmentation: reflection-pad by ``pad``, random crop back to (H, W), and a
    horizontal flip with probability 1/2 (paper, fine-tuning on CIFAR). uint8 in and out."""
    check_images(images)
    return _pad_crop_flip(images, pad, rng)


def pad_crop_flip_tokens(
    tokens, n_px: int, *, pad: int = 4, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``pad_crop_flip`` of tokens (N, n_px * n_px) in raster order, with the same draws.

    Reflection padding, cropping and flipping only move pixels, and a palette quantizes
    each pixel alone, so for images already n_px x n_px (which ``tokenize`` does not
    resize) ``pad_crop_flip_tokens(tokenize(x), n_px, rng=g)`` equals
    ``tokenize(pad_crop_flip(x, rng=g'))`` for generators g, g' in the same state: the
    augmentation needs only the token cache, never the images. Returns int64 (N, n_px²).
    """
    t = np.asarray(tokens)
    if t.ndim != 2 or t.dtype.kind not in "iu" or t.shape[1] != n_px * n_px:
        raise ValueError(
            f"tokens must be integer (N, n_px * n_px = {n_px * n_px}), got {t.dtype} {t.shape}"
        )
    grid = t.astype(np.int64).reshape(len(t), n_px, n_px, 1)  # one "channel": the token
    return _pad_crop_flip(grid, pad, rng).reshape(len(t), n_px * n_px)


def _pad_crop_flip(x: np.ndarray, pad: int, rng) -> np.ndarray:
    """The moves of ``pad_crop_flip`` on any (N, H, W, C) array; the draws come from ``rng``
    in one order (tops, lefts, flips), whatever the array holds."""
    rng = rng if rng is not None else np.random.default_rng()
    N, H, W, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    tops = rng.integers(0, 2 * pad + 1, size=N)
    lefts = rng.integers(0, 2 * pad + 1, size=N)
    flips = rng.random(N) < 0.5
    rows = tops[:, None] + np.arange(H)[None]  # (N, H)
    cols = lefts[:, None] + np.arange(W)[None]  # (N, W)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return np.ascontiguousarray(
        padded[np.arange(N)[:, None, None], rows[:, :, None], cols[:, None]]
    )
