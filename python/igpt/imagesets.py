"""Readers that list, not load: a split of any data spec as an ``ImageSet`` read by slices.

    s = open_images("folder:~/imagenet", "train")   # lists the files, decodes nothing
    len(s), s.labels, s.classes, s.shape            # shape: (H, W) every image comes out at
    part = s.read(0, 1024)                          # ImageData of rows 0..1023
    part = s.take([5, 17, 9000])                    # any rows (sorted internally)
    s.load()                                        # the whole split, as load_images gives

Memory is bounded by what one read returns plus, at most, one source file held open:

- ``folder:`` lists ``CLASS/*`` files (ImageNet's ``train/CLASS/*.JPEG``, ``val/CLASS/*``) and
  reads only each file's header to find the sizes; reading decodes just the rows asked for.
- ``npz:`` reads the rows asked for of an uncompressed member (``numpy.savez``) straight from
  the file; a compressed one (``numpy.savez_compressed``) is decompressed forward from the
  last position read.
- ``cifar10:``/``cifar100:`` and the Downsampled ImageNet pickles hold one batch file at a time.
- ``imagenet32:DIR`` / ``imagenet64:DIR`` (Chrabaszcz et al. 2017, "A Downsampled Variant of
  ImageNet"): ``train_data_batch_1`` .. ``train_data_batch_10`` (the train split) and
  ``val_data`` (the test split), in DIR or one level below it (``Imagenet32_train/``,
  ``Imagenet32_val/``), each either a Python pickle or a ``.npz`` of a dict with ``data``,
  uint8 (N, 3 * n * n), one image per row as its red, then green, then blue n x n plane
  (channel-first, raster order), and ``labels``, N ints 1..1000 (the train batches also hold
  ``mean``, unused). Labels come out as 0..999. Any other file is refused, naming the file.

A pickled batch must be unpickled whole (numpy arrays in a pickle cannot be mapped), so for
the pickles memory is one batch file (about 1.5 GB for ImageNet 64x64 train batches; the
``.npz`` release is read a chunk at a time).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from igpt.readers import (
    ImageData,
    as_rgb_uint8,
    available_cores,
    check_labels,
    check_npz_parts,
    cifar_files,
    class_files,
    common_size,
    folder_parts,
    load_digits,
    load_npz,
    parse_spec,
    read_cifar_batch,
    split_rows,
    unpickle,
)
from igpt.transforms import read_image, square

log = logging.getLogger(__name__)


class ImageSet:
    """One split of a data set, read by slices of rows.

    Args:
        source: reads rows: ``source.get(idx)`` -> (uint8 (m, H, W, 3), bool (len(idx),)
            mask of the rows it could read).
        labels: int64 (N,) or None; classes: names or None.
        rows: the source's rows that make this split (sorted), or None for all of them.
        shape: (H, W) of every image read, or None where it varies (folders, unsized).
        name: what the set is called in messages.
    """

    def __init__(self, source, labels, classes, *, rows=None, shape=None, name="", skipped=0):
        self.source, self.classes, self.shape, self.name = source, classes, shape, name
        n = source.count() if rows is None else len(rows)
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        if labels is not None and self.rows is not None:
            labels = np.asarray(labels)[self.rows]
        self.labels = labels
        self.skipped = skipped  # files a listing found unreadable (folders)
        self._n = n

    def __len__(self) -> int:
        return self._n

    def take(self, idx) -> ImageData:
        """The images (and labels) at rows ``idx`` of this set; unreadable files are dropped
        and counted in ``skipped``. Rows come back in ascending order."""
        idx = np.unique(np.asarray(idx, np.int64))
        if len(idx) and (idx[0] < 0 or idx[-1] >= len(self)):
            raise IndexError(f"rows {idx[0]}..{idx[-1]} outside a set of {len(self)} images")
        src = idx if self.rows is None else self.rows[idx]
        images, ok = self.source.get(src)
        labels = None if self.labels is None else self.labels[idx][ok]
        out = ImageData(images, labels, self.classes)
        out.skipped = int(len(idx) - ok.sum())
        return out

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
                "read, so the rows no longer match their tokens; remove the unreadable files"
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
        """The whole set in memory."""
        out = self.take(np.arange(len(self)))
        out.skipped += self.skipped
        return out


# ----------------------------------------------------------------------------- sources


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


class NpyRows:
    """Rows of one .npy array, inside an .npz or alone, read without loading the rest.

    ``transform`` turns the raw rows into uint8 (m, H, W, 3) (e.g. the channel-first rows
    of Downsampled ImageNet). Handles to the file are per process (dropped when pickled), so
    a worker process opens its own.
    """

    def __init__(self, path: Path, member: str | None, transform=None):
        self.path, self.member, self.transform = Path(path), member, transform
        with self._open_member() as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"{self._what()} has .npy format {version}, which is not read")
            self.shape, fortran, self.dtype = read_header(f)
            self.header_len = f.tell()
        if fortran or self.dtype.hasobject or not self.shape:
            raise ValueError(
                f"{self._what()} is not a plain C-ordered array (dtype {self.dtype}, "
                f"shape {self.shape}); store it with numpy.savez"
            )
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.offset = self._data_offset()
        self._handle = None

    def _what(self) -> str:
        return f"{self.member!r} in {self.path}" if self.member else str(self.path)

    def _open_member(self):
        if self.member is None:
            return open(self.path, "rb")
        # the member's file keeps the archive's file open after the ZipFile closes
        with zipfile.ZipFile(self.path) as zf:
            return zf.open(self.member + ".npy")

    def _data_offset(self) -> int | None:
        """Where the array's bytes start in the file, or None where they are compressed."""
        if self.member is None:
            return self.header_len
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo(self.member + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(self.path, "rb") as f:  # the local header: 30 bytes, name, extra field
            f.seek(info.header_offset)
            local = f.read(30)
        name_len, extra_len = (
            int.from_bytes(local[26:28], "little"),
            int.from_bytes(local[28:30], "little"),
        )
        return info.header_offset + 30 + name_len + extra_len + self.header_len

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def __del__(self):
        if isinstance(getattr(self, "_handle", None), int):
            with contextlib.suppress(OSError):
                os.close(self._handle)

    def count(self) -> int:
        """Number of rows."""
        return int(self.shape[0])

    def raw(self, idx) -> np.ndarray:
        """The stored rows ``idx`` (sorted), as stored."""
        idx = np.asarray(idx, np.int64)
        if len(idx) == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        if self.offset is not None:
            return self._pread(idx)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if self._handle is None or self._handle[1] > lo:  # a compressed member: rewind
            self._handle = (self._open_member(), 0)
        f, pos = self._handle
        f.seek(self.header_len + lo * self.row_bytes)  # forward: decompresses what it skips
        buf = f.read((hi - lo) * self.row_bytes)
        self._handle = (f, hi)
        block = np.frombuffer(buf, self.dtype).reshape(hi - lo, *self.shape[1:])
        return block[idx - lo]

    def _pread(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of an uncompressed array, read with ``os.pread``: a block where the
        rows lie close, else row by row. Not a memory map: pages a map has touched stay in
        the process's resident memory, which would then grow with the file."""
        if self._handle is None:
            self._handle = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(idx), -1).view(np.uint8)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo <= 2 * len(idx) + 16:
            buf = os.pread(
                self._handle, (hi - lo) * self.row_bytes, self.offset + lo * self.row_bytes
            )
            block = np.frombuffer(buf, np.uint8).reshape(hi - lo, self.row_bytes)
            flat[:] = block[idx - lo]
            return out
        for j, i in enumerate(idx):
            buf = os.pread(self._handle, self.row_bytes, self.offset + int(i) * self.row_bytes)
            flat[j] = np.frombuffer(buf, np.uint8)
        return out

    def get(self, idx):
        """(uint8 images of rows ``idx``, all-True mask)."""
        x = self.raw(idx)
        x = self.transform(x) if self.transform is not None else as_rgb_uint8(x, self.path)
        return np.ascontiguousarray(x), np.ones(len(idx), bool)


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


class FolderSource:
    """Files decoded on demand, each centre-cropped and resized to ``size`` when set."""

    def __init__(self, paths, sizes):
        self.paths = list(paths)
        self.sizes = np.asarray(sizes, np.int64)  # per file: its part's square side, 0 = none

    def count(self) -> int:
        """Number of files."""
        return len(self.paths)

    def get(self, idx):
        """(decoded images of the readable files among ``idx``, mask of those)."""
        images, ok = [], np.zeros(len(idx), bool)
        for j, i in enumerate(idx):
            img = read_image(self.paths[i])
            if img is None:
                continue
            images.append(square(img, int(self.sizes[i])) if self.sizes[i] else img)
            ok[j] = True
        if not images:
            return np.zeros((0, 1, 1, 3), np.uint8), ok
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"folder: images of shapes {sorted(shapes)[:3]} in one read; open the set "
                "with size= to bring them to one size"
            )
        return np.stack(images), ok


# ----------------------------------------------------------------------------- opening


def open_images(
    spec: str, split: str = "train", *, size: int | None = None, progress: bool | None = None
) -> ImageSet:
    """An ``ImageSet`` of a data spec's split: listed, not loaded (see the module docstring).

    Rows, labels, splits and (folder) sizes are those of ``igpt.data.load_images``, so
    ``open_images(spec, split).load()`` equals ``load_images(spec, split)`` wherever every
    file can be read. ``progress``: a bar over a folder's header scan once it takes over
    2 s (None: where stderr is a terminal).
    """
    kind, arg = parse_spec(spec)
    if kind == "digits":
        d = load_digits()
        rows = split_rows(len(d), split, permute=False)
        return ImageSet(ArraySource(d.images), d.labels, d.classes, rows=rows, shape=(8, 8))
    if kind in ("cifar10", "cifar100"):
        paths, classes = cifar_files(arg, kind, split)
        labels = [read_cifar_batch(p, kind)[1] for p in paths]  # one batch at a time
        source = BatchFiles(paths, [len(y) for y in labels], _CifarRead(kind))
        return ImageSet(source, np.concatenate(labels), classes, shape=(32, 32), name=spec)
    if kind == "folder":
        return _open_folder(arg, split, size, spec, progress)
    if kind == "npz":
        return _open_npz(Path(arg), split, spec)
    return _open_imagenet(Path(arg), int(kind[len("imagenet") :]), split, spec)


# the side every image of these formats has, whatever the files: no file need be opened
FORMAT_SIDES = {"digits": 8, "cifar10": 32, "cifar100": 32, "imagenet32": 32, "imagenet64": 64}


def image_side(spec: str, split: str = "train", *, size: int | None = None) -> int | None:
    """The side of the square images a split comes out at, or None where they are not one
    square size: from the format where it fixes one (no file read), else from the lazy
    listing (``open_images``: an npz's header, a folder's file headers)."""
    kind, _ = parse_spec(spec)
    if kind in FORMAT_SIDES:
        return FORMAT_SIDES[kind]
    shape = open_images(spec, split, size=size).shape
    return shape[0] if shape is not None and shape[0] == shape[1] else None


class _CifarRead:
    """A picklable ``read`` for ``BatchFiles`` of CIFAR batches."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, path):
        return read_cifar_batch(path, self.kind)


def _image_shape(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[::-1]  # PIL gives (W, H)
    except Exception as e:  # PIL raises many kinds of errors on bad files
        log.debug("skipping unreadable image %s: %s", path, e)
        return None


SCAN_CHUNK = 512  # headers a scanning process reads per task
SCAN_PARALLEL = 4096  # from this many files, the scan runs in processes (one per core)


def image_shapes(paths, desc: str = "reading headers", progress: bool | None = None) -> list:
    """(H, W) of each file from its header, None where unreadable, in order. From
    ``SCAN_PARALLEL`` files on (ImageNet: 1.28M) the headers are read by forked processes,
    one per available core, ``SCAN_CHUNK`` at a time; a bar shows once the scan takes over
    2 s (``progress``; None: where stderr is a terminal)."""
    bar = tqdm(total=len(paths), desc=desc, unit="file", delay=2,
               disable=None if progress is None else not progress)  # fmt: skip
    chunks = [paths[i : i + SCAN_CHUNK] for i in range(0, len(paths), SCAN_CHUNK)]
    cores = min(available_cores(), len(chunks))
    with bar, contextlib.ExitStack() as stack:
        if (
            len(paths) >= SCAN_PARALLEL
            and cores > 1
            and "fork" in multiprocessing.get_all_start_methods()
        ):
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(cores))
            results = pool.imap(_chunk_shapes, chunks)
        else:
            results = map(_chunk_shapes, chunks)
        shapes = []
        for part in results:
            shapes += part
            bar.update(len(part))
    return shapes


def _chunk_shapes(paths) -> list:
    return [_image_shape(p) for p in paths]


def _open_folder(root: str, split: str, size: int | None, spec: str, progress=None) -> ImageSet:
    """List a folder split; read only headers to find each part's size (``common_size``)."""
    parts, has_splits = folder_parts(root, split)
    paths, labels, sides, skipped, classes, shapes_seen = [], [], [], 0, None, set()
    for sub, part_classes in parts:
        files, classes = class_files(sub, part_classes)
        # a bar on a terminal once the scan takes over 2 s (ImageNet: 1.28M headers)
        shapes = image_shapes([p for _, p in files], f"reading headers in {sub}", progress)
        good = [(f, s) for f, s in zip(files, shapes, strict=True) if s is not None]
        skipped += len(files) - len(good)
        if not good:
            raise ValueError(f"folder: no readable images under {sub} ({len(files)} unreadable)")
        side = size if size is not None else common_size({s for _, s in good}, sub)
        shapes_seen.add((side, side) if side else good[0][1])
        paths += [p for (_, p), _ in good]
        labels += [label for (label, _), _ in good]
        sides += [side or 0] * len(good)
    if skipped:
        log.warning("folder %s: skipped %d unreadable file(s)", root, skipped)
    if has_splits and len(shapes_seen) > 1:
        raise ValueError(f"splits have different image shapes {sorted(shapes_seen)}; pass size=")
    rows = None if has_splits else split_rows(len(paths), split)
    labels = np.asarray(labels, np.int64)
    source = FolderSource(paths, sides)
    shape = tuple(shapes_seen.pop())
    return ImageSet(source, labels, classes, rows=rows, shape=shape, name=spec, skipped=skipped)


def _open_npz(path: Path, split: str, spec: str) -> ImageSet:
    """Map an npz's images; a file the lazy path cannot map is read whole by ``load_npz``,
    which also says what is wrong with a damaged one."""
    try:
        return _map_npz(path, split, spec)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        log.info("npz %s cannot be read by rows (%s): reading it whole", path, e)
    data = load_npz(str(path), split)
    return ImageSet(
        ArraySource(data.images), data.labels, data.classes, shape=data.images.shape[1:3]
    )


def _map_npz(path: Path, split: str, spec: str) -> ImageSet:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        member = NpyRows(path, None)
        return _npz_set([member], [None], None, split, spec, explicit=False)
    with zipfile.ZipFile(path) as zf:
        keys = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
    small = np.load(path, allow_pickle=False)  # members load only when indexed
    with small as z:
        classes = [str(c) for c in z["classes"]] if "classes" in keys else None
        if "train_images" in keys and "test_images" in keys:
            names = ["train", "test"] if split == "all" else [split]
            members = [NpyRows(path, f"{s}_images") for s in names]
            labels = [
                check_labels(z[f"{s}_labels"], f"npz: {s}_labels in {path}")
                if f"{s}_labels" in keys
                else None
                for s in names
            ]
            if len(names) == 2:
                check_npz_parts(
                    path,
                    {s: tuple(m.shape[1:3]) for s, m in zip(names, members, strict=True)},
                    {s: y is not None for s, y in zip(names, labels, strict=True)},
                )
            return _npz_set(members, labels, classes, split, spec, explicit=True)
        if "images" not in keys:
            raise ValueError(f"npz: {path} has no 'images'")
        labels = check_labels(z["labels"], f"npz: labels in {path}") if "labels" in keys else None
        return _npz_set([NpyRows(path, "images")], [labels], classes, split, spec, explicit=False)


def _npz_set(members, labels, classes, split, spec, *, explicit) -> ImageSet:
    for m in members:
        if m.dtype != np.uint8 or len(m.shape) not in (3, 4):
            raise ValueError(f"npz: {m._what()} is not uint8 (N, H, W, 3)")
    source = members[0] if len(members) == 1 else _Concat(members)
    have = [y is not None for y in labels]
    all_labels = np.concatenate(labels) if all(have) and have else None
    if all_labels is not None and len(all_labels) != source.count():
        raise ValueError(f"{spec}: {len(all_labels)} labels for {source.count()} images")
    rows = None if explicit else split_rows(source.count(), split)
    shape = tuple(members[0].shape[1:3])
    return ImageSet(source, all_labels, classes, rows=rows, shape=shape, name=spec)


class _Concat:
    """Rows of several sources one after the other (an npz's train and test parts)."""

    def __init__(self, sources):
        self.sources = sources
        self.ends = np.cumsum([s.count() for s in sources]).astype(np.int64)

    def count(self) -> int:
        return int(self.ends[-1])

    def get(self, idx):
        idx = np.asarray(idx, np.int64)
        which = np.searchsorted(self.ends, idx, side="right")
        parts = [
            self.sources[k].get(idx[which == k] - (self.ends[k - 1] if k else 0))[0]
            for k in np.unique(which)
        ]
        return np.concatenate(parts), np.ones(len(idx), bool)


# ----------------------------------------------------------------------------- imagenet


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


def _open_imagenet(root: Path, n: int, split: str, spec: str) -> ImageSet:
    read = ImagenetRead(n)
    sources, labels = [], []
    for path in imagenet_files(root, n, split):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK\x03\x04"):
            sources.append(_imagenet_npz(path, read))
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
    source = sources[0] if len(sources) == 1 else _Concat(sources)
    return ImageSet(source, np.concatenate(labels), None, shape=(n, n), name=spec)


def _imagenet_npz(path: Path, read: ImagenetRead) -> NpyRows:
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
