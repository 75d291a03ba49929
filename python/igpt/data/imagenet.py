"""``imagenet32:DIR`` / ``imagenet64:DIR``: the Downsampled ImageNet release (Chrabaszcz et
al. 2017, "A Downsampled Variant of ImageNet").

``train_data_batch_1`` .. ``train_data_batch_10`` (the train split) and ``val_data`` (the
test split), in DIR or one level below it (``Imagenet32_train/``, ``Imagenet32_val/``), each
either a Python pickle or a ``.npz`` of a dict with ``data``, uint8 (N, 3 * n * n), one image
per row as its red, then green, then blue n x n plane (channel-first, raster order), and
``labels``, N ints 1..1000 (the train batches also hold ``mean``, unused). Labels come out
as 0..999. Any other file is refused, naming the file.

A pickled batch must be unpickled whole (numpy arrays in a pickle cannot be mapped), so for
the pickles memory is one batch file (about 1.5 GB for ImageNet 64x64 train batches; the
``.npz`` release is read a chunk at a time).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from igpt.data.base import BatchFiles, Concat, ImageSet, Source, unpickle
from igpt.data.npz import NpyRows


def imagenet_files(root: Path, n: int, split: str) -> list[Path]:
    """The Downsampled ImageNet files of ``split`` under ``root`` (or one level below)."""
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet{n}: {root} is not a directory")
    dirs = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    pattern = {"train": r"train_data_batch_(\d+)", "test": r"val_data()"}
    wanted = ("train", "test") if split == "all" else (split,)
    out = []
    for s in wanted:
        found = {}
        for d in dirs:
            for p in d.iterdir():
                m = re.fullmatch(pattern[s] + r"(\.npz)?", p.name)
                if m and p.is_file():
                    found.setdefault(int(m.group(1) or 0), p)
        if not found:
            name = "train_data_batch_1" if s == "train" else "val_data"
            raise FileNotFoundError(
                f"imagenet{n}: no {name} (or {name}.npz) in {root} or its sub-folders; point "
                f"the spec at the extracted Imagenet{n} release (image-net.org, downsample)"
            )
        out += [found[k] for k in sorted(found)]
    return out


class ImagenetRead:
    """Reads one Downsampled ImageNet file of n x n images (see the module docstring)."""

    def __init__(self, n: int):
        self.n = n

    def rows(self, x: np.ndarray) -> np.ndarray:
        """uint8 (m, 3 * n * n) channel-first rows -> (m, n, n, 3)."""
        return x.reshape(len(x), 3, self.n, self.n).transpose(0, 2, 3, 1)

    def labels(self, y, path) -> np.ndarray:
        """Labels 1..1000 -> 0..999, refused where any is outside 1..1000."""
        y = np.asarray(y).reshape(-1)
        if y.dtype.kind not in "iu" or len(y) and (y.min() < 1 or y.max() > 1000):
            raise ValueError(
                f"{path} is not a Downsampled ImageNet file: its labels must be ints 1..1000"
            )
        return y.astype(np.int64) - 1

    def refuse(self, path, why: str):
        """The one-line ValueError for a file of another format."""
        return ValueError(
            f"{path} is not a Downsampled ImageNet {self.n}x{self.n} file ({why}); it needs a "
            f"pickle or .npz of a dict with 'data' uint8 (N, {3 * self.n * self.n}) and "
            "'labels' 1..1000"
        )

    def __call__(self, path):
        """(images uint8 (m, n, n, 3), labels 0..999) of a whole pickled file."""
        try:
            d = unpickle(path)
        except ValueError as e:
            raise self.refuse(path, "not a pickle of numpy arrays") from e
        if "data" not in d or "labels" not in d:
            raise self.refuse(path, f"keys {sorted(d)}")
        x = np.asarray(d["data"])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * self.n * self.n:
            raise self.refuse(path, f"data is {x.dtype} {x.shape}")
        y = self.labels(d["labels"], path)
        if len(y) != len(x):
            raise self.refuse(path, f"{len(x)} images but {len(y)} labels")
        return self.rows(x), y


def open_imagenet(root: Path, n: int, split: str, spec: str) -> ImageSet:
    read = ImagenetRead(n)
    sources, labels = [], []
    for path in imagenet_files(root, n, split):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK\x03\x04"):
            sources.append(imagenet_npz(path, read))
            with np.load(path, allow_pickle=False) as z:
                labels.append(read.labels(z["labels"], path))
            if len(labels[-1]) != sources[-1].count():
                raise read.refuse(path, f"{sources[-1].count()} images, {len(labels[-1])} labels")
        elif magic[:1] == b"\x80":  # a pickle (protocol 2 or later)
            y = read(path)[1]  # held one file at a time: labels and counts
            sources.append(BatchFiles([path], [len(y)], read))
            labels.append(y)
        else:
            raise read.refuse(path, "neither a pickle nor an .npz")
    source = sources[0] if len(sources) == 1 else Concat(sources)
    return ImageSet(source, np.concatenate(labels), None, shape=(n, n), name=spec)


def imagenet_npz(path: Path, read: ImagenetRead) -> NpyRows:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
        if "data.npy" not in names or "labels.npy" not in names:
            raise read.refuse(path, f"members {sorted(names)}")
        member = NpyRows(path, "data", transform=read.rows)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise read.refuse(path, f"{type(e).__name__}: {e}") from e
    if member.dtype != np.uint8 or member.shape[1:] != (3 * read.n * read.n,):
        raise read.refuse(path, f"data is {member.dtype} {member.shape}")
    return member


class Imagenet(Source):
    """Downsampled ImageNet at side ``n`` (32 or 64)."""

    def __init__(self, n: int):
        self.n = self.side = n
        self.name = f"imagenet{n}"
        self.help = f"the Downsampled ImageNet {n}x{n} files (pickles or .npz)"

    def open(self, arg, split, *, size=None, n_px=None, progress=None) -> ImageSet:
        """The split's files, one pickle (or a chunk of an .npz) held at a time."""
        return open_imagenet(Path(arg), self.n, split, f"{self.name}:{arg}")

    def files(self, arg, split):
        """The split's batch files and the folders searched for them."""
        root = Path(arg)
        files = imagenet_files(root, self.n, split)
        return root, files, [root] + sorted(p for p in root.iterdir() if p.is_dir())
