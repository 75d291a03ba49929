"""What every data kind shares: ``Source`` (the one class a kind defines), ``ImageData`` (a
split in memory), ``ImageSet`` (a split listed, read by slices), the row sources behind it,
splits, labels, and the one rule for unreadable files.

A kind's module (``digits``, ``cifar``, ``folder``, ``npz``, ``imagenet``) subclasses
``Source``; ``igpt.data.sources.SOURCES`` names an instance of it, and everything else (the
spec parser, ``load_images``, ``open_images``, the cache key, the CLI help, the training
defaults) reads that table.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igpt.transforms import check_images

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SHOWN = 5  # unreadable files a warning names (then a count of the rest)


# ----------------------------------------------------------------------------- a data kind


class Source:
    """One data kind, read from a spec ``NAME`` or ``NAME:ARG`` (subclass it once per kind).

    Attributes: ``name`` (the spec's kind), ``arg`` (what follows the colon, e.g. ``"DIR"``;
    None for a kind without one), ``help`` (one line for ``--data``), ``side`` (the side of
    every image where the format fixes one, else None) and ``defaults`` (``n_px`` and
    ``n_colors`` a run on this kind starts from).
    """

    name = ""
    arg: str | None = "DIR"
    help = ""
    side: int | None = None
    defaults = {"n_px": 32, "n_colors": 512}

    def usage(self) -> str:
        """How a spec of this kind is written: ``folder:DIR``, ``digits``."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    def open(self, arg, split: str, *, size=None, n_px=None, progress=None) -> ImageSet:
        """The ``ImageSet`` of ``split`` (listed, not loaded); eager reading is ``.load()``.

        ``size`` and ``n_px`` matter only where images differ in size (folders): ``size``
        brings every image to size x size; with ``n_px`` (the side the images are tokenised
        at) images of differing sizes go straight to n_px x n_px, one resize each.
        """
        raise NotImplementedError

    def files(self, arg, split: str) -> tuple[Path, list[Path], list[Path]]:
        """(root, files, folders): every file ``open`` reads for ``split``, named as the
        reader names them (symlinks followed as it follows them), and every folder whose
        listing decides which files those are. A kind without files gives ``(root, [], [])``.
        """
        raise NotImplementedError

    def spec_key(self, arg) -> str:
        """The spec with its path made absolute (symlinks resolved)."""
        return self.name if arg is None else f"{self.name}:{Path(arg).resolve()}"


def stamp(path) -> list:
    """[path, size, mtime_ns] of ``path``, following symlinks as a reader opening it does."""
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def files_digest(root: Path, files) -> str:
    """A digest of (path under ``root``, size, mtime_ns) of every file of ``files``."""
    h = hashlib.sha256()
    in_root = Path(root).is_dir()
    for p in files:
        _, size, mtime = stamp(p)
        rel = os.path.relpath(p, root) if in_root else Path(p).name
        h.update(f"{rel}|{size}|{mtime}\n".encode())
    return h.hexdigest()[:16]


def walk_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) under ``root``, sorted, hidden names left out, following symlinked
    folders (a folder reached twice, as through a link loop, is listed once)."""
    files, dirs, seen = [], [], set()
    for top, subdirs, names in os.walk(root, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.append(Path(top))
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [Path(top) / n for n in names if not n.startswith(".")]
    return sorted(files), dirs


# ----------------------------------------------------------------------------- unreadable files


def report_unreadable(where: str, paths, total: int, count: int | None = None) -> None:
    """The one rule for files that cannot be read: a warning naming how many and the first
    few; a ValueError where every one of ``total`` files is unreadable. ``count``: how many
    are unreadable where ``paths`` holds only the first few (default: ``len(paths)``)."""
    paths = [str(p) for p in paths]
    count = len(paths) if count is None else count
    if not count:
        return
    shown = ", ".join(paths[:SHOWN])
    if count >= total:
        raise ValueError(
            f"{where}: all {total} files are unreadable (e.g. {shown}); they must be images "
            "PIL can open"
        )
    more = f" and {count - SHOWN} more" if count > SHOWN else ""
    log.warning("%s: skipped %d unreadable file(s): %s%s", where, count, shown, more)


# ----------------------------------------------------------------------------- images, labels


@dataclass
class ImageData:
    """A set of images with optional labels.

    images: uint8 numpy (N, H, W, 3) RGB. labels: int64 numpy (N,) or None. classes: class
    names (index = label) or None. skipped: files that could not be read (folder specs);
    unreadable: their paths, where known.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    skipped: int = 0
    unreadable: list = field(default_factory=list)

    def __post_init__(self):
        check_images(self.images)
        if self.labels is not None:
            self.labels = check_labels(self.labels).reshape(-1)
            if len(self.labels) != len(self.images):
                raise ValueError(
                    f"labels has {len(self.labels)} entries but images has {len(self.images)}"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int | None:
        """Number of classes (from ``classes``, else from the labels), or None."""
        if self.classes is not None:
            return len(self.classes)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    def subset(self, idx) -> ImageData:
        """The images (and labels) at integer indices ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        return ImageData(self.images[idx], labels, self.classes)


def check_labels(labels, name: str = "labels") -> np.ndarray:
    """``labels`` as int64 class indices, or a ValueError that counts the bad ones.

    Integers >= 0 pass, and so do floats with integer values (3.0, as a reader may store
    them); 3.7, NaN and negative labels are refused rather than truncated, so that a file
    of scores or of -1 "unlabelled" markers never trains a classifier in silence.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.dtype == np.bool_ or y.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(y) | (y != np.round(y))))
        if bad:
            raise ValueError(
                f"{name}: {bad} of {y.size} labels are not whole numbers (e.g. "
                f"{y[~np.isfinite(y) | (y != np.round(y))].flat[0].item()!r}); labels are class "
                "indices 0, 1, 2 ..."
            )
    negative = int(np.count_nonzero(y < 0))
    if negative:
        first = y[y < 0].flat[0].item()
        raise ValueError(
            f"{name}: {negative} of {y.size} labels are negative (e.g. {first!r}); "
            "labels are class indices 0, 1, 2 ...: leave unlabelled images out"
        )
    return y.astype(np.int64)


def available_cores() -> int:
    """The CPU cores this process may run on (the default number of workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_rows(n: int, split: str, permute: bool = True) -> np.ndarray | None:
    """Sorted rows of ``split`` in a source of ``n`` images without its own test split: the
    last 20% of a fixed permutation (or of file order) is test; None for ``"all"``."""
    if split == "all":
        return None
    order = np.random.default_rng(0).permutation(n) if permute else np.arange(n)
    n_train = n - int(round(n * TEST_FRACTION))
    return np.sort(order[:n_train]) if split == "train" else np.sort(order[n_train:])


def split_fixed(data: ImageData, split: str, permute: bool = True) -> ImageData:
    """Deterministic train/test split of a source that has none: the last 20% is test."""
    idx = split_rows(len(data), split, permute)
    if idx is None:
        return data
    out = data.subset(idx)
    out.skipped = data.skipped
    return out


# ----------------------------------------------------------------------------- lazy sets


class ImageSet:
    """One split of a data set, read by slices of rows.

    Args:
        source: reads rows: ``source.get(idx)`` -> (uint8 (m, H, W, 3), bool (len(idx),)
            mask of the rows it could read); ``source.path(i)``, where it has one, names
            the file of row ``i`` in warnings.
        labels: int64 (N,) or None; classes: names or None.
        rows: the source's rows that make this split (sorted), or None for all of them.
        shape: (H, W) of every image read, or None where it varies (folders, unsized).
        name: what the set is called in messages.
        unreadable: paths the listing already found unreadable (folders).
    """

    def __init__(self, source, labels, classes, *, rows=None, shape=None, name="", unreadable=()):
        self.source, self.classes, self.shape, self.name = source, classes, shape, name
        n = source.count() if rows is None else len(rows)
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        if labels is not None and self.rows is not None:
            labels = np.asarray(labels)[self.rows]
        self.labels = labels
        self.unreadable = list(unreadable)
        self._n = n

    @property
    def skipped(self) -> int:
        """Files the listing found unreadable."""
        return len(self.unreadable)

    def __len__(self) -> int:
        return self._n

    def take(self, idx) -> ImageData:
        """The images (and labels) at rows ``idx`` of this set; unreadable files are dropped,
        counted in ``skipped`` and named in ``unreadable``. Rows come back in ascending order."""
        return self.take_rows(idx)[0]

    def take_rows(self, idx) -> tuple[ImageData, np.ndarray]:
        """(``take(idx)``, bool mask over ``np.unique(idx)`` of the rows it could read)."""
        idx = np.unique(np.asarray(idx, np.int64))
        if len(idx) and (idx[0] < 0 or idx[-1] >= len(self)):
            raise IndexError(f"rows {idx[0]}..{idx[-1]} outside a set of {len(self)} images")
        src = idx if self.rows is None else self.rows[idx]
        images, ok = self.source.get(src)
        labels = None if self.labels is None else self.labels[idx][ok]
        out = ImageData(images, labels, self.classes)
        out.skipped = int(len(idx) - ok.sum())
        name = getattr(self.source, "path", lambda i: f"row {i}")
        out.unreadable = [str(name(int(i))) for i in src[~ok]]
        return out, ok

    def __getitem__(self, idx) -> np.ndarray:
        """The images at rows ``idx`` (ints) in that order, repeats included, as
        ``images[idx]`` of an array gives them (a lazy ``train_images`` of fine-tuning).
        A ValueError names a file that cannot be read: rows must keep matching tokens."""
        idx = np.asarray(idx, np.int64)
        rows, where = np.unique(idx, return_inverse=True)
        data = self.take(rows)
        if data.skipped:
            raise ValueError(
                f"{self.name or 'images'}: {data.skipped} of rows {rows.tolist()[:8]} cannot be "
                f"read ({', '.join(data.unreadable[:SHOWN])}), so the rows no longer match "
                "their tokens; remove the unreadable files"
            )
        return data.images[where.reshape(-1)]

    def read(self, start: int, stop: int) -> ImageData:
        """Rows ``start`` .. ``stop - 1`` (see ``take``)."""
        return self.take(np.arange(start, min(stop, len(self))))

    def head(self, n: int) -> ImageSet:
        """The first ``n`` rows as a set of their own, still listed, not loaded."""
        rows = (np.arange(len(self)) if self.rows is None else self.rows)[:n]
        out = ImageSet(self.source, None, self.classes, rows=rows, shape=self.shape, name=self.name)
        out.labels = None if self.labels is None else self.labels[:n]
        return out

    def load(self) -> ImageData:
        """The whole set in memory. Files that cannot be decoded are skipped and named in a
        warning (``report_unreadable``; the listing warned about those it found), a set of
        nothing else is a ValueError; ``skipped`` counts both."""
        out = self.take(np.arange(len(self)))
        report_unreadable(self.name or "images", out.unreadable, len(self))
        out.unreadable = self.unreadable + out.unreadable
        out.skipped = len(out.unreadable)
        return out


class ArraySource:
    """Rows of an array already in memory (digits, a small npz)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def count(self) -> int:
        """Number of images."""
        return len(self.images)

    def get(self, idx):
        """(images of rows ``idx``, all-True mask)."""
        return np.ascontiguousarray(self.images[idx]), np.ones(len(idx), bool)


class BatchFiles:
    """Rows spread over batch files read whole, one at a time (CIFAR, ImageNet pickles).

    ``read(path) -> (images uint8 (n, H, W, 3), labels (n,))``; ``counts``: rows per file.
    """

    def __init__(self, paths, counts, read):
        self.paths, self.read = list(paths), read
        self.ends = np.cumsum(counts).astype(np.int64)
        self._cached = (None, None)

    def __getstate__(self):
        return {**self.__dict__, "_cached": (None, None)}

    def count(self) -> int:
        """Number of rows in all files."""
        return int(self.ends[-1]) if len(self.ends) else 0

    def get(self, idx):
        """(images of rows ``idx`` (sorted), all-True mask)."""
        idx = np.asarray(idx, np.int64)
        file_of = np.searchsorted(self.ends, idx, side="right")
        parts = []
        for f in np.unique(file_of):
            if self._cached[0] != f:
                self._cached = (None, None)  # free the last batch before reading the next
                self._cached = (f, self.read(self.paths[f])[0])
            start = 0 if f == 0 else self.ends[f - 1]
            parts.append(self._cached[1][idx[file_of == f] - start])
        if not parts:
            return np.zeros((0, 1, 1, 3), np.uint8), np.ones(0, bool)
        return np.ascontiguousarray(np.concatenate(parts)), np.ones(len(idx), bool)


class Concat:
    """Rows of several sources one after the other (an npz's train and test parts)."""

    def __init__(self, sources):
        self.sources = sources
        self.ends = np.cumsum([s.count() for s in sources]).astype(np.int64)

    def count(self) -> int:
        """Number of rows in all sources."""
        return int(self.ends[-1])

    def get(self, idx):
        """(images of rows ``idx`` (sorted), all-True mask)."""
        idx = np.asarray(idx, np.int64)
        which = np.searchsorted(self.ends, idx, side="right")
        parts = [
            self.sources[k].get(idx[which == k] - (self.ends[k - 1] if k else 0))[0]
            for k in np.unique(which)
        ]
        return np.concatenate(parts), np.ones(len(idx), bool)


# ----------------------------------------------------------------------------- pickles


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a CIFAR batch holds only numpy arrays"
        )


def unpickle(path: Path) -> dict:
    """A CIFAR batch file as a dict with str keys; a ValueError naming the file if it is
    damaged, not a pickle, or holds anything but numpy arrays, lists and bytes."""
    try:
        with open(path, "rb") as f:
            d = NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(
            f"cannot read {path} as a CIFAR batch ({type(e).__name__}: {e}); "
            "download and extract the python version of the data set again"
        ) from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR batch: it holds a {type(d).__name__}, not a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
