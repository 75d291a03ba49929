"""Colour palettes: k-means fitting, the ``Palette`` object, and a preview picture.

iGPT shortens sequences 3x by replacing every RGB pixel with the index of the nearest of K
(512) k-means colours (paper sec. 3.2). A ``Palette`` holds those K colours as float32
(K, 3) in 0..255 RGB and maps images to tokens and back through ``igpt_kernels.quantize``.

transformers' ``ImageGPTImageProcessor.clusters`` and OpenAI's ``kmeans_centers.npy`` store
the same colours in [-1, 1] space (x / 127.5 - 1); ``Palette.from_hf`` / ``to_hf`` convert.

    palette = fit_palette(images, k=512, seed=0)   # images: uint8 (..., 3)
    tokens = palette.quantize(images)              # int64 (...)
    rgb = palette.dequantize(tokens)               # uint8 (..., 3)
    palette.save("palette.npy"); Palette.load("palette.npy")

Fitting runs k-means++ seeding then Lloyd iterations on a random sample of pixels, with
identical colours merged (their counts become sample weights): scikit-learn's KMeans on the
CPU, a torch implementation on a GPU whose assignment step is the quantize kernel itself.

``save_preview`` draws the swatches and a few images before/after quantization;
``igpt fit-palette --data SPEC --k 512 --out palette.npy`` (``igpt.commands.fit_palette``)
fits on a data set and writes the .npy and that PNG (same stem).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

import igpt_kernels
from igpt import hf_format
from igpt.data.base import report_unreadable
from igpt_kernels.reference import MAX_COLORS

log = logging.getLogger(__name__)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(x).__name__}")


class Palette:
    """K colours, float32 (K, 3) in 0..255 RGB, that pixels are quantized to.

    Args:
        centroids: (K, 3) float tensor or numpy array in 0..255 RGB, 1 <= K <= 65536,
            finite. Stored as a float32 CPU tensor in ``.centroids``.
    """

    def __init__(self, centroids):
        c = _as_tensor(centroids, "centroids").detach()
        if c.dtype.is_complex or not (c.dtype.is_floating_point or c.dtype == torch.uint8):
            raise TypeError(f"centroids must be a float array, got {c.dtype}")
        c = c.to("cpu", torch.float32).contiguous()
        if c.dim() != 2 or c.shape[1] != 3 or not 1 <= c.shape[0] <= MAX_COLORS:
            raise ValueError(
                f"centroids must be (K, 3) with 1 <= K <= {MAX_COLORS}, got {tuple(c.shape)}"
            )
        if not torch.isfinite(c).all():
            raise ValueError("centroids contain NaN or infinite values")
        lo, hi = float(c.min()), float(c.max())
        if lo < -1e-3 or hi > 255 + 1e-3:
            hint = " (they look like [-1, 1] values: use Palette.from_hf)" if hi <= 1 else ""
            raise ValueError(f"centroids must lie in 0..255 RGB, got [{lo:g}, {hi:g}]{hint}")
        self.centroids = c.clamp_(0, 255)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.centroids.shape[0]

    def __repr__(self) -> str:
        return f"Palette(K={len(self)})"

    def on(self, device) -> torch.Tensor:
        """The centroids as a float32 tensor on ``device`` (cached per device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.centroids
        if device not in self._on_device:
            self._on_device[device] = self.centroids.to(device)
        return self._on_device[device]

    def quantize(self, images, *, backend: str = "auto") -> torch.Tensor:
        """Nearest-colour token of every pixel.

        Args:
            images: uint8 numpy array or torch tensor (..., 3) RGB. Runs on the tensor's
                device (numpy arrays on the CPU).
            backend: passed to ``igpt_kernels.quantize``.

        Returns:
            int64 tensor (...) of indices in [0, K), on the input's device.
        """
        pixels = _as_tensor(images, "images")
        return igpt_kernels.quantize(pixels, self.on(pixels.device), backend=backend)

    def dequantize(self, tokens) -> torch.Tensor:
        """The colour of each token: integer (...) -> uint8 tensor (..., 3), rounded."""
        tokens = _as_tensor(tokens, "tokens")
        return igpt_kernels.dequantize(tokens, self.on(tokens.device))

    def save(self, path) -> None:
        """Write the centroids as a float32 (K, 3) .npy file in 0..255 RGB.

        Written through a temporary file and a rename, so a crash never leaves a truncated
        palette behind (a run directory's ``palette.npy`` is reused when present). As with
        ``np.save``, ``.npy`` is appended to a path without it.
        """
        from igpt._io import atomic_write

        path = Path(path)
        if path.suffix != ".npy":
            path = path.with_name(path.name + ".npy")
        atomic_write(path, lambda f: np.save(f, self.centroids.numpy()))

    @classmethod
    def load(cls, path) -> Palette:
        """Read a palette written by ``save`` (a (K, 3) .npy in 0..255 RGB).

        OpenAI's ``kmeans_centers.npy`` is in [-1, 1] space: use
        ``Palette.from_hf(np.load(path))`` for it.
        """
        path = Path(path)
        try:
            centroids = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError) as e:  # damaged, pickled or not a .npy file
            raise ValueError(
                f"palette file {path} is not a (K, 3) .npy array ({e}); write it with "
                "igpt fit-palette or Palette.save"
            ) from e
        try:
            return cls(centroids)
        except (TypeError, ValueError) as e:
            raise ValueError(f"palette file {path}: {e}") from e

    @classmethod
    def from_hf(cls, clusters) -> Palette:
        """From [-1, 1] clusters (HF ``ImageGPTImageProcessor.clusters``, OpenAI's file)."""
        c = _as_tensor(np.asarray(clusters, dtype=np.float64), "clusters")
        return cls(((c + 1.0) * 127.5).clamp(0, 255))

    def to_hf(self) -> np.ndarray:
        """The centroids in [-1, 1] space (x / 127.5 - 1), float32 (K, 3) numpy array."""
        return (self.centroids.double() / 127.5 - 1.0).float().numpy()

    @classmethod
    def from_pretrained(cls, path_or_hub_id) -> Palette:
        """The palette of a transformers ImageGPT directory or hub id, from its
        ``preprocessor_config.json`` (``load_palette``)."""
        return load_palette(path_or_hub_id)

    def save_pretrained(self, directory, *, n_px: int | None = None) -> Path:
        """Write ``preprocessor_config.json`` that ``ImageGPTImageProcessor`` reads, with
        this palette as its ``clusters`` (``save_palette``; ``n_px`` defaults to the side of
        the model saved in ``directory``)."""
        return save_palette(self, directory, n_px=n_px)


def _pixel_array(pixels_or_images) -> np.ndarray:
    """Flatten uint8 (..., 3) images (numpy, torch or a list of arrays) to (N, 3) uint8."""
    if isinstance(pixels_or_images, (list, tuple)):
        parts = [_pixel_array(p) for p in pixels_or_images]
        return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)
    if isinstance(pixels_or_images, torch.Tensor):
        pixels_or_images = pixels_or_images.detach().cpu().numpy()
    if not isinstance(pixels_or_images, np.ndarray):
        raise TypeError(
            "pixels_or_images must be a uint8 numpy array, torch tensor or a list of them, "
            f"got {type(pixels_or_images).__name__}"
        )
    a = pixels_or_images
    if a.dtype != np.uint8:
        raise TypeError(f"pixels_or_images must be uint8 RGB, got dtype {a.dtype}")
    if a.ndim < 1 or a.shape[-1] != 3:
        raise ValueError(f"pixels_or_images must be (..., 3) RGB, got shape {a.shape}")
    return a.reshape(-1, 3)


def fit_palette(
    pixels_or_images, k: int = 512, *, sample: int = 1_000_000, seed: int = 0, device=None
) -> Palette:
    """Fit a K-colour palette with k-means (k-means++ seeding, then Lloyd iterations).

    Args:
        pixels_or_images: uint8 (..., 3) RGB pixels or images (numpy, torch, or a list).
        k: number of colours, 1 <= k <= 65536.
        sample: at most this many pixels, drawn at random (without replacement), are fitted.
        seed: the fit is deterministic for a given seed and input.
        device: None or "cpu" fits with scikit-learn's KMeans; a CUDA device with the torch
            k-means whose assignment step is the CUDA quantize kernel.

    Identical colours are merged with their counts as sample weights, which gives the same
    k-means objective as fitting every pixel and is much faster on real images. With fewer
    than k distinct colours the palette holds each of them once and repeats the last one to
    make up k entries (quantize never picks a repeat: the lowest index wins ties); a warning
    says so. Centroids are never NaN.
    """
    if not isinstance(k, int) or not 1 <= k <= MAX_COLORS:
        raise ValueError(f"k must be an int in [1, {MAX_COLORS}], got {k!r}")
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    pixels = _pixel_array(pixels_or_images)
    if pixels.shape[0] == 0:
        raise ValueError("pixels_or_images holds no pixels")
    rng = np.random.default_rng(seed)
    if pixels.shape[0] > sample:
        pixels = pixels[rng.choice(pixels.shape[0], size=sample, replace=False)]
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    if len(colours) <= k:
        if len(colours) < k:
            log.warning(
                "only %d distinct colours for k=%d: the palette repeats the last one",
                len(colours),
                k,
            )
        pad = np.repeat(colours[-1:], k - len(colours), axis=0)
        return Palette(np.concatenate([colours, pad]).astype(np.float32))
    if device is not None and torch.device(device).type != "cpu":
        return Palette(_kmeans_torch(colours, counts, k, seed=seed, device=device).cpu())
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed)
    km.fit(colours.astype(np.float64), sample_weight=counts.astype(np.float64))
    return Palette(np.clip(km.cluster_centers_, 0, 255).astype(np.float32))


def fit_palette_on(
    image_set,
    k: int = 512,
    *,
    n_px: int | None = None,
    rows=None,
    max_images: int | None = None,
    sample: int = 1_000_000,
    seed: int = 0,
    device=None,
    block: int = 1024,
) -> Palette:
    """``fit_palette`` on images read through a lazy reader, a block of images at a time.

    Args:
        image_set: an ``igpt.data.ImageSet`` (``len``, ``take_rows(rows)``, ``shape``).
        k, sample, seed, device: as ``fit_palette``.
        n_px: bring the images to n_px x n_px first (as ``igpt.data.resize``); None keeps
            the set's own size (``image_set.shape`` must then be set).
        rows: the set's rows to fit on, in this order; None: all of them, or a seeded random
            ``max_images`` of them when the set has more.
        block: images read at once.

    The result equals ``fit_palette(images, k, sample=sample, seed=seed)`` on the images of
    ``rows`` stacked in memory: the same ``sample`` pixel positions are drawn, and only the
    images that hold one of them are read. Memory: ``sample`` pixels and one block of images.
    """
    from igpt.transforms import resize

    if rows is None:
        rows = np.arange(len(image_set))
        if max_images is not None and len(rows) > max_images:
            pick = np.random.default_rng(seed).choice(len(rows), size=max_images, replace=False)
            rows = np.sort(pick)
    rows = np.asarray(rows, np.int64)
    h, w = (n_px, n_px) if n_px is not None else image_set.shape
    per_image = h * w
    total = len(rows) * per_image
    if total == 0:
        raise ValueError("image_set holds no pixels")
    if total > sample:  # the draw fit_palette makes, on the pixel positions alone
        wanted = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))
    else:
        wanted = np.arange(total)
    pos = wanted // per_image  # position in ``rows`` of each wanted pixel
    parts, unreadable, asked = [], [], 0
    for a in range(0, len(rows), block):
        sel = (pos >= a) & (pos < a + block)
        if not sel.any():
            continue
        need = rows[np.unique(pos[sel])]
        data, ok = image_set.take_rows(need)
        images = data.images if n_px is None else resize(data.images, n_px)
        got = np.unique(need)[ok]  # take returns the readable rows in ascending order
        # an unreadable file's pixels are left out, as prepare leaves out its tokens
        keep = np.isin(rows[pos[sel]], got)
        which = np.searchsorted(got, rows[pos[sel]][keep])
        at = (wanted[sel] % per_image)[keep]
        parts.append(images.reshape(len(images), per_image, 3)[which, at])
        unreadable += data.unreadable
        asked += len(ok)
    report_unreadable(getattr(image_set, "name", "") or "images to fit on", unreadable, asked)
    pixels = np.concatenate(parts)
    return fit_palette(pixels, k, sample=max(sample, len(pixels)), seed=seed, device=device)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(M,) squared distances of points x (M, 3) to centres c (M, 3) or (3,)."""
    return (x - c).square().sum(-1)


def _segment_sums(labels: torch.Tensor, values: torch.Tensor, k: int):
    """Per-label sums of values (M, 4) -> (k, 3) and (k,) in fp64, deterministically.

    Sorting by label and differencing a cumulative sum at the segment ends gives the same
    bits on every run (index_add_ on a GPU adds in whatever order its atomics land).
    """
    order = torch.argsort(labels, stable=True)
    csum = torch.cat([values.new_zeros(1, values.shape[1]), values[order].cumsum(0)])
    counts = torch.bincount(labels, minlength=k)  # (k,) integer: exact in any order
    ends = counts.cumsum(0)
    sums = csum[ends] - csum[ends - counts]  # (k, 4)
    return sums[:, :3], sums[:, 3]


def _kmeans_torch(
    colours: np.ndarray,
    counts: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    device="cuda",
    max_iter: int = 300,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Weighted k-means in torch: greedy k-means++ seeding, then Lloyd iterations.

    colours: (M, 3) distinct uint8 colours with M > k; counts: (M,) their weights. The
    assignment step is ``igpt_kernels.quantize`` on the uint8 colours (the CUDA kernel on a
    GPU). A cluster left empty is re-seeded with the point farthest from its centre, as
    scikit-learn does. Stops when the total squared centre shift is below
    ``tol * mean per-channel variance`` (scikit-learn's rule) or after ``max_iter`` steps.
    Returns float32 (k, 3) centres on ``device``; deterministic for a seed and device.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    px = torch.from_numpy(np.ascontiguousarray(colours)).to(device)  # (M, 3) uint8
    x = px.float()
    w = torch.from_numpy(counts.astype(np.float32)).to(device)  # (M,)
    trials = 2 + int(np.log(k))  # scikit-learn's number of local trials
    # k-means++: each new centre is the best of a few candidates drawn with probability
    # proportional to weight * squared distance to the nearest centre so far
    centres = torch.empty(k, 3, device=device)
    centres[0] = x[torch.multinomial(w, 1, generator=gen)[0]]
    closest = _sq_dist(x, centres[0])  # (M,)
    for i in range(1, k):
        # M > k distinct colours: some point is not a centre yet, so the weights sum > 0
        cand = torch.multinomial(w * closest, trials, replacement=True, generator=gen)
        d = torch.minimum(closest[None], _sq_dist(x[None], x[cand][:, None]))  # (trials, M)
        best = torch.argmin((d * w).sum(1))  # a tensor: no host sync per centre
        centres[i], closest = x[cand[best]], d[best]
    weighted = torch.cat([x * w[:, None], w[:, None]], 1).double()  # (M, 4): w*rgb, w
    variance = float(((x - (w[:, None] * x).sum(0) / w.sum()).square() * w[:, None]).sum())
    threshold = tol * variance / float(w.sum()) / 3
    for _ in range(max_iter):
        labels = igpt_kernels.quantize(px, centres, lut=False)  # (M,)
        sums, mass = _segment_sums(labels, weighted, k)  # (k, 3), (k,)
        new = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-12)[:, None], centres)
        new = new.float()
        empty = (mass == 0).nonzero().flatten()
        if len(empty):
            far = _sq_dist(x, centres[labels]).argsort(descending=True, stable=True)
            far = far[: len(empty)]
            new[empty] = x[far]
            log.info("k-means: re-seeded %d empty clusters", len(empty))
        shift = float((new - centres).square().sum())
        centres = new
        if shift <= threshold:
            break
    return centres.clamp_(0, 255)


# ----------------------------------------------------------------------------- preview


def save_preview(palette: Palette, images: np.ndarray, path, *, n_images: int = 6) -> None:
    """Write a PNG: the palette's swatches (index order) over a few images before/after."""
    from igpt.reporting import figure

    k = len(palette)
    cols = int(np.ceil(np.sqrt(k)))
    swatch = np.full((int(np.ceil(k / cols)) * cols, 3), 255, np.uint8)
    swatch[:k] = palette.centroids.round().to(torch.uint8).numpy()
    swatch = swatch.reshape(-1, cols, 3)
    shown = images[: min(n_images, len(images))]
    after = palette.dequantize(palette.quantize(shown)).numpy()
    n = max(len(shown), 1)
    fig = figure(figsize=(max(6.0, 1.6 * n), 9.0))
    grid = fig.add_gridspec(3, n, height_ratios=[2, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.imshow(swatch, interpolation="nearest")
    ax.set_title(f"{k}-colour palette (index order, row-major)")
    ax.axis("off")
    for i in range(len(shown)):
        for row, (im, label) in enumerate([(shown[i], "original"), (after[i], "quantized")], 1):
            a = fig.add_subplot(grid[row, i])
            a.imshow(im, interpolation="nearest")
            a.set_xticks([]), a.set_yticks([])
            if i == 0:
                a.set_ylabel(label)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def save_palette(palette: Palette, directory, *, n_px: int | None = None) -> Path:
    """Write ``preprocessor_config.json`` for ``ImageGPTImageProcessor``: the palette as its
    ``clusters`` ([-1, 1], float32 values), images resized to ``n_px`` x ``n_px`` (default:
    the side of the ``config.json`` in ``directory``). The exact 0..255 centroids ride
    along under ``igpt_centroids`` (transformers keeps the key), so igpt reads the palette
    back bit for bit; the clusters stay what transformers quantizes with."""
    if n_px is None:
        n_px = hf_format.pretrained_n_px(directory)
    return hf_format.write_processor_config(
        directory, palette.to_hf(), palette.centroids, n_px=n_px
    )


def load_palette(path_or_hub_id) -> Palette:
    """The ``Palette`` of a ``preprocessor_config.json`` (directory or hub id): its
    ``clusters``, or the exact ``igpt_centroids`` when they still give those clusters."""
    path, d = hf_format.read_processor_config(path_or_hub_id)
    if d.get("clusters") is None:
        raise ValueError(f"{path} has no clusters (the processor's colour palette)")
    clusters = np.asarray(d["clusters"], dtype=np.float32)
    exact = d.get("igpt_centroids")
    if exact is not None:
        palette = Palette(np.asarray(exact, dtype=np.float32))
        if np.array_equal(palette.to_hf(), clusters):
            return palette
        log.warning("%s: igpt_centroids no longer match the clusters; using the clusters", path)
    return Palette.from_hf(clusters)
