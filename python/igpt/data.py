"""Images in, palette tokens out: the public entry points of the data path.

    data = load_images("cifar10:~/data/cifar-10-batches-py", split="train")
    data.images                     # uint8 (N, H, W, 3) RGB
    data.labels, data.classes       # int64 (N,) and class names, or None
    tokens = tokenize(data.images, palette, n_px=32)   # int64 (N, 1024), raster order
    train_idx, val_idx = holdout_split(len(data), frac=0.1)   # the paper's 10% (sec. 3.1)
    lazy = load_images("imagenet64:~/data/imagenet64", lazy=True)   # lists, reads by slices
    tokens, labels = cached_tokens("folder:~/imagenet", "train", palette, 64)  # uint16 memmap

Dataset specs (README.md, "Pretraining on your data"):

- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 0..16 grey
  levels scaled to 0..255 and repeated to RGB, labels 0-9). Needs no download.
- ``cifar10:DIR`` / ``cifar100:DIR``: the python-pickle batch folders
  (``cifar-10-batches-py``, ``cifar-100-python``), or a folder that contains one.
- ``folder:DIR``: one sub-folder per class of PIL-readable files. If DIR holds ``train`` and
  ``test`` (or ``val``) sub-folders they are the splits (ImageNet's ``train/CLASS/*.JPEG``,
  ``val/CLASS/*``). Unreadable files are skipped and counted (a warning says how many),
  never a crash.
- ``npz:FILE``: an ``.npz`` with ``images`` (N, H, W, 3) uint8 and optional ``labels`` (and
  optional ``classes``), or a bare ``.npy`` of images. ``train_images``/``test_images`` (and
  ``train_labels``/``test_labels``) keys give explicit splits.
- ``imagenet32:DIR`` / ``imagenet64:DIR``: the Downsampled ImageNet release (Chrabaszcz et
  al. 2017): ``train_data_batch_1..10`` and ``val_data`` (pickles or ``.npz``) holding
  ``data`` uint8 (N, 3 * n * n) channel-first and ``labels`` 1..1000 (read as 0..999); see
  ``igpt.imagesets``.

Splits: ``"train"``, ``"test"`` and ``"all"``. Sources that come without a test split
(digits, a folder or npz without split entries) are split deterministically: the last 20%
of a fixed permutation (digits: the last 20% in file order) is ``"test"``. ``"all"`` is
every image. The validation set used while training is carved out of ``"train"`` with
``holdout_split``; the batches a run draws from the rest come from ``igpt.batches``.

The work is done in ``igpt.readers`` (whole splits), ``igpt.imagesets`` (lazy readers),
``igpt.transforms`` (resizing, tokenising, augmentations) and ``igpt.tokens`` (the token
cache); every public name of those is importable from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from igpt.imagesets import ArraySource, ImageSet, image_side, open_images
from igpt.readers import (
    IMAGE_SUFFIXES,
    SPLITS,
    TEST_FRACTION,
    ImageData,
    check_labels,
    load_cifar,
    load_digits,
    load_folder,
    load_npz,
    parse_spec,
    split_fixed,
)
from igpt.tokens import (
    CHUNK,
    READ_ERRORS,
    available_cores,
    build_entry,
    cache_key,
    palette_hash,
    read_entry,
)
from igpt.transforms import (
    check_images,
    holdout_split,
    pad_crop_flip,
    pad_crop_flip_tokens,
    random_resized_crop,
    resize,
    tokenize,
)
from igpt_kernels.reference import MAX_COLORS

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "TEST_FRACTION",
    "CHUNK",
    "ImageData",
    "ImageSet",
    "TokenCache",
    "available_cores",
    "cached_tokens",
    "check_images",
    "check_labels",
    "default_cache_dir",
    "holdout_split",
    "image_side",
    "load_images",
    "open_images",
    "pad_crop_flip",
    "pad_crop_flip_tokens",
    "palette_hash",
    "parse_spec",
    "prepare_tokens",
    "random_resized_crop",
    "resize",
    "tokenize",
]

log = logging.getLogger(__name__)


def load_images(
    spec: str,
    split: str = "train",
    *,
    size: int | None = None,
    lazy: bool = False,
    progress: bool | None = None,
) -> ImageData | ImageSet:
    """Read a data set by spec (see the module docstring) and split.

    Args:
        spec: ``digits``, ``cifar10:DIR``, ``cifar100:DIR``, ``folder:DIR``, ``npz:FILE``,
            ``imagenet32:DIR`` or ``imagenet64:DIR``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: folder specs only: the square side every image is brought to (centre crop to a
            square, then bilinear resize). By default images keep their size when all share
            one, and otherwise go to the smallest short side among them (at most 256).
        lazy: return an ``ImageSet`` that lists the split and reads it by slices
            (``igpt.imagesets``) instead of the whole split in memory.
        progress: with ``lazy``, a bar over a folder's header scan once it takes over 2 s
            (None: where stderr is a terminal).

    Returns:
        ImageData with uint8 (N, H, W, 3) images, int64 labels or None, class names or None;
        with ``lazy``, an ImageSet of the same rows.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, arg = parse_spec(spec)
    if lazy:
        return open_images(spec, split, size=size, progress=progress)
    if kind == "digits":
        return split_fixed(load_digits(), split, permute=False)
    if kind in ("cifar10", "cifar100"):
        return load_cifar(arg, kind, split)
    if kind == "folder":
        return load_folder(arg, split, size)
    if kind == "npz":
        return load_npz(arg, split)
    return open_images(spec, split).load()


# ----------------------------------------------------------------------------- token cache


def default_cache_dir() -> Path:
    """``$IGPT_CACHE`` or ``~/.cache/igpt``."""
    import os

    return Path(os.environ.get("IGPT_CACHE", Path.home() / ".cache" / "igpt"))


@dataclass
class TokenCache:
    """Where a split's tokens are: ``path`` (the entry folder), ``images`` tokenised,
    ``bytes`` on disk, ``skipped`` unreadable files, and whether this call ``built`` it."""

    path: Path
    images: int
    bytes: int
    skipped: int
    built: bool


def prepare_tokens(
    spec: str,
    split: str,
    palette,
    n_px: int,
    *,
    cache_dir=None,
    data: ImageData | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> TokenCache:
    """Make sure the token cache entry of (spec, split, palette, n_px) exists; say where.

    A complete entry is only checked; otherwise the split is tokenised in chunks by
    ``workers`` processes (``igpt.tokens``), resuming an interrupted build, while any other
    process asking for the same entry waits for it. ``data`` (in memory) replaces reading
    ``spec``, as in ``cached_tokens``.
    """
    if len(palette) > MAX_COLORS:  # every palette id fits a uint16
        raise ValueError(
            f"a uint16 cache holds at most {MAX_COLORS} colours, palette has {len(palette)}"
        )
    if not isinstance(n_px, int) or n_px < 1:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    name, record = cache_key(spec, split, palette, n_px)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "tokens" / name
    built = False
    try:
        tokens, _ = read_entry(folder)
    except READ_ERRORS as e:
        if (folder / "meta.json").is_file():
            # a damaged entry (a full disk, a hand edit) is rebuilt, never read as tokens
            log.warning("token cache: %s is damaged (%s); tokenising again", folder, e)
        if data is not None:
            images = ImageSet(ArraySource(data.images), data.labels, data.classes, name=spec)
        else:
            images = load_images(spec, split, lazy=True, progress=progress)
        built = build_entry(
            images, palette, n_px, folder, key=record, workers=workers, progress=progress
        )
        tokens, _ = read_entry(folder)
    meta_skipped = _skipped(folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return TokenCache(folder, len(tokens), size, meta_skipped, built)


def _skipped(folder: Path) -> int:
    import json

    return int(json.loads((folder / "meta.json").read_text()).get("skipped", 0))


def cached_tokens(
    spec: str,
    split: str,
    palette,
    n_px: int,
    *,
    cache_dir=None,
    data: ImageData | None = None,
    workers: int | None = None,
    progress: bool | None = None,
):
    """Tokens of a whole split through an on-disk uint16 memmap cache.

    The cache is keyed by the data spec (with its absolute path), the name, size and
    modification time of every file behind it, split, n_px and the palette's hash. The
    first call tokenises the split (``data`` if given, else the lazy reader of
    ``load_images(spec, split, lazy=True)``) in chunks, in ``workers`` processes, resumably
    (``prepare_tokens``); the entry is complete only once ``meta.json`` is written, and later
    calls only map the file, never touching images.

    Returns:
        (tokens, labels): a read-only uint16 memmap (N, n_px * n_px) and int64 labels or
        None. Convert batches with ``torch.from_numpy(tokens[idx].astype(np.int64))``.
    """
    info = prepare_tokens(
        spec,
        split,
        palette,
        n_px,
        cache_dir=cache_dir,
        data=data,
        workers=workers,
        progress=progress,
    )
    return read_entry(info.path)
