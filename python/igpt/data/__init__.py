"""Images in, palette tokens out: the public entry points of the data path.

    data = load_images("cifar10:~/data/cifar-10-batches-py", split="train")
    data.images                     # uint8 (N, H, W, 3) RGB
    data.labels, data.classes       # int64 (N,) and class names, or None
    tokens = tokenize(data.images, palette, n_px=32)   # int64 (N, 1024), raster order
    train_idx, val_idx = holdout_split(len(data), frac=0.1)   # the paper's 10% (sec. 3.1)
    lazy = open_images("imagenet64:~/data/imagenet64")    # lists, reads by slices
    tokens, labels = cached_tokens("folder:~/imagenet", "train", palette, 64)  # uint16 memmap

Data specs: one ``Source`` per kind, one module each, all named in ``SOURCES``
(``igpt.data.sources``), which the spec parser, the readers, the token cache's key, the
``--data`` help and the training defaults read:

- ``digits`` (``igpt.data.digits``): scikit-learn's bundled 8x8 digits, no download.
- ``cifar10:DIR`` / ``cifar100:DIR`` (``igpt.data.cifar``): the python-pickle batch folders.
- ``folder:DIR`` (``igpt.data.folder``): one sub-folder per class of image files, optional
  ``train``/``val`` (or ``test``) split folders; symlinked class folders are followed.
- ``npz:FILE`` (``igpt.data.npz``): an ``.npz`` of ``images`` (and ``labels``), or of
  ``train_images``/``test_images``; or a bare ``.npy`` of images.
- ``imagenet32:DIR`` / ``imagenet64:DIR`` (``igpt.data.imagenet``): the Downsampled ImageNet.

Adding a kind is one module with a ``Source`` subclass and one line in ``SOURCES``.

Splits: ``"train"``, ``"test"`` and ``"all"``. Sources that come without a test split
(digits, a folder or npz without split entries) are split deterministically: the last 20%
of a fixed permutation (digits: the last 20% in file order) is ``"test"``. ``"all"`` is
every image. The validation set used while training is carved out of ``"train"`` with
``holdout_split``; the batches a run draws from the rest come from ``igpt.batches``.

Unreadable files, one rule everywhere (``load_images``, the lazy readers, the token cache,
``igpt fit-palette``): skipped, with a warning that counts them and names the first few; a
set where every file is unreadable is a ValueError. The token cache (``igpt.data.cache``)
is keyed by everything that made the tokens; see there for what a second start checks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from igpt.data import cache
from igpt.data.base import (
    IMAGE_SUFFIXES,
    SPLITS,
    TEST_FRACTION,
    ArraySource,
    ImageData,
    ImageSet,
    Source,
    available_cores,
    check_labels,
    split_fixed,
)
from igpt.data.cache import (
    CHUNK,
    READ_ERRORS,
    TokenSplit,
    build_entry,
    cache_key,
    palette_hash,
    read_entry,
)
from igpt.data.sources import SOURCES, data_defaults, data_help, parse_spec, source_of
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
    "CHUNK",
    "IMAGE_SUFFIXES",
    "SOURCES",
    "SPLITS",
    "TEST_FRACTION",
    "ArraySource",
    "ImageData",
    "ImageSet",
    "Source",
    "TokenCache",
    "TokenSplit",
    "available_cores",
    "cache_key",
    "cached_tokens",
    "check_images",
    "check_labels",
    "data_defaults",
    "data_help",
    "default_cache_dir",
    "holdout_split",
    "image_side",
    "load_cifar",
    "load_digits",
    "load_folder",
    "load_images",
    "load_npz",
    "open_images",
    "pad_crop_flip",
    "pad_crop_flip_tokens",
    "palette_hash",
    "parse_spec",
    "prepare_tokens",
    "random_resized_crop",
    "resize",
    "split_fixed",
    "tokenize",
]

log = logging.getLogger(__name__)


def open_images(
    spec: str,
    split: str = "train",
    *,
    size: int | None = None,
    n_px: int | None = None,
    progress: bool | None = None,
) -> ImageSet:
    """An ``ImageSet`` of a data spec's split: listed, not loaded (its kind's ``Source``).

    ``open_images(spec, split).load()`` is ``load_images(spec, split)``. ``size``: folder
    specs only, the square side every image is brought to (centre crop, bilinear resize);
    by default images keep their size when all share one, and otherwise go to ``n_px``
    where given (the side they are tokenised at: one resize each), else to the smallest
    short side among them (at most 256). ``progress``: a bar over a folder's header scan
    once it takes over 2 s (None: where stderr is a terminal).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source, arg = source_of(spec)
    return source.open(arg, split, size=size, n_px=n_px, progress=progress)


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
            ``imagenet32:DIR``, ``imagenet64:DIR`` (any kind of ``SOURCES``).
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: folder specs only: as ``open_images``.
        lazy: return the ``ImageSet`` of ``open_images`` (listed, read by slices) instead
            of the whole split in memory.
        progress: a bar over a folder's header scan once it takes over 2 s (None: where
            stderr is a terminal).

    Returns:
        ImageData with uint8 (N, H, W, 3) images, int64 labels or None, class names or None;
        with ``lazy``, an ImageSet of the same rows.
    """
    images = open_images(spec, split, size=size, progress=progress)
    return images if lazy else images.load()


def image_side(spec: str, split: str = "train", *, size: int | None = None) -> int | None:
    """The side of the square images a split comes out at, or None where they are not one
    square size: from the kind where it fixes one (no file read), else from the lazy
    listing (``open_images``: an npz's header, a folder's file headers)."""
    source, _ = source_of(spec)
    if source.side is not None:
        return source.side
    shape = open_images(spec, split, size=size).shape
    return shape[0] if shape is not None and shape[0] == shape[1] else None


def load_digits() -> ImageData:
    """The whole bundled digits set (``igpt.data.digits``)."""
    return load_images("digits", "all")


def load_cifar(root: str, kind: str, split: str) -> ImageData:
    """A whole CIFAR split in memory."""
    return load_images(f"{kind}:{root}", split)


def load_folder(root: str, split: str, size: int | None) -> ImageData:
    """A whole ``folder:`` split in memory."""
    return load_images(f"folder:{root}", split, size=size)


def load_npz(path: str, split: str) -> ImageData:
    """A whole ``npz:`` split in memory."""
    return load_images(f"npz:{path}", split)


# ----------------------------------------------------------------------------- token cache


def default_cache_dir() -> Path:
    """``$IGPT_CACHE`` or ``~/.cache/igpt``."""
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
    verify: bool = False,
) -> TokenCache:
    """Make sure the token cache entry of (spec, split, palette, n_px) exists; say where.

    The entry is keyed by what made its tokens (``igpt.data.cache``): with ``data`` (in
    memory, tokenised in place of reading ``spec``) by a digest of the data itself, else by
    the files the reader reads. A start whose watch list (every listed folder) is unchanged
    takes the entry it recorded without a ``stat`` per image; ``verify`` stats every file
    anyway (catching an image rewritten in place under the same name in a large folder).
    A complete entry is only checked; otherwise the split is tokenised in chunks by
    ``workers`` processes, resuming an interrupted build, while any other process asking
    for the same entry waits for it.
    """
    if len(palette) > MAX_COLORS:  # every palette id fits a uint16
        raise ValueError(
            f"a uint16 cache holds at most {MAX_COLORS} colours, palette has {len(palette)}"
        )
    if not isinstance(n_px, int) or n_px < 1:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source, arg = source_of(spec)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    record = cache.base_record(source.spec_key(arg), split, palette, n_px, data)
    index = root / "index" / f"{cache.entry_name(record)}.json"
    if data is None and not verify:
        name = cache.watched_entry(index)
        found = name is not None and _entry_info(root / "tokens" / name, built=False)
        if found:
            return found
    watch = None
    if data is None:
        record["files"], watch = cache.fingerprint(source, arg, split)
    folder = root / "tokens" / cache.entry_name(record)
    info = _entry_info(folder, built=False)
    if not info:
        if (folder / "meta.json").is_file():
            # a damaged entry (a full disk, a hand edit) is rebuilt, never read as tokens
            log.warning("token cache: %s is damaged; tokenising again", folder)
        if data is not None:
            images = ImageSet(ArraySource(data.images), data.labels, data.classes, name=spec)
        else:
            images = open_images(spec, split, n_px=n_px, progress=progress)
        built = build_entry(
            images, palette, n_px, folder, key=record, workers=workers, progress=progress
        )
        info = _entry_info(folder, built=built)
        if not info:
            raise ValueError(f"token cache: {folder} cannot be read back after building it")
    if watch is not None:
        cache.write_index(index, folder.name, watch)
    return info


def _entry_info(folder: Path, *, built: bool) -> TokenCache | None:
    """The ``TokenCache`` of a complete entry, or None where it is missing or damaged."""
    try:
        tokens, _ = read_entry(folder)
        skipped = int(json.loads((folder / "meta.json").read_text()).get("skipped", 0))
    except READ_ERRORS as e:
        log.debug("token cache: %s cannot be read (%s)", folder, e)
        return None
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return TokenCache(folder, len(tokens), size, skipped, built)


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
    verify: bool = False,
):
    """Tokens of a whole split through an on-disk uint16 memmap cache (``prepare_tokens``).

    The first call tokenises the split (``data`` if given, else the lazy reader of
    ``open_images(spec, split)``) in chunks, in ``workers`` processes, resumably; the entry
    is complete only once ``meta.json`` is written, and later calls only map the file, never
    touching images.

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
        verify=verify,
    )
    return read_entry(info.path)
