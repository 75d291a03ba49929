"""``npz:FILE``: an ``.npz`` with ``images`` (N, H, W, 3) uint8 and optional ``labels`` (and
optional ``classes``), or a bare ``.npy`` of images. ``train_images``/``test_images`` (and
``train_labels``/``test_labels``) keys give explicit splits; otherwise the last 20% of a fixed
permutation is ``"test"``.

Rows are read straight from the file: an uncompressed member (``numpy.savez``) by offset, a
compressed one (``numpy.savez_compressed``) decompressed forward from the last position read.
A file that cannot be read by rows is read whole (``load_npz``), which also says what is
wrong with a damaged one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from igpt.data.base import (
    ArraySource,
    Concat,
    ImageData,
    ImageSet,
    Source,
    check_labels,
    split_fixed,
    split_rows,
)

log = logging.getLogger(__name__)


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
                raise ValueError(f"{self.what()} has .npy format {version}, which is not read")
            self.shape, fortran, self.dtype = read_header(f)
            self.header_len = f.tell()
        if fortran or self.dtype.hasobject or not self.shape:
            raise ValueError(
                f"{self.what()} is not a plain C-ordered array (dtype {self.dtype}, "
                f"shape {self.shape}); store it with numpy.savez"
            )
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.offset = self._data_offset()
        self._handle = None

    def what(self) -> str:
        """How messages name the array."""
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


def load_npz(path: str, split: str) -> ImageData:
    """A whole ``npz:`` split in memory; a ValueError naming the file where it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} does not exist")
    try:
        return _read_npz(path, split)
    except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, OSError) as e:
        # numpy reads members lazily: a damaged archive can fail at any key, not only here
        raise ValueError(
            f"npz: cannot read {path} ({type(e).__name__}: {e}); it must be a .npz from "
            "numpy.savez (or a .npy from numpy.save): write it again"
        ) from e


def _read_npz(path: Path, split: str) -> ImageData:
    with open(path, "rb") as f:
        magic = f.read(6)
    if not (magic.startswith(b"PK\x03\x04") or magic == b"\x93NUMPY"):
        # numpy would try to unpickle it, and say so: not what the file's owner needs to hear
        raise ValueError(
            f"npz: {path} is neither a .npz nor a .npy (its first bytes are not numpy's); "
            "write it with numpy.savez (or numpy.save)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:  # a damaged header, or a .npy of pickled objects
        raise ValueError(
            f"npz: {path} is not a .npz or .npy of arrays ({e}); write it with numpy.savez"
        ) from e
    if isinstance(loaded, np.ndarray):  # a bare .npy of images
        return split_fixed(ImageData(as_rgb_uint8(loaded, path)), split)
    with loaded as z:
        keys = set(z.files)
        classes = [str(c) for c in npz_member(z, "classes", path)] if "classes" in keys else None
        if "train_images" in keys and "test_images" in keys:
            names = ["train", "test"] if split == "all" else [split]
            parts = []
            for s in names:
                labels = npz_member(z, f"{s}_labels", path) if f"{s}_labels" in keys else None
                if labels is not None:
                    labels = check_labels(labels, f"npz: {s}_labels in {path}")
                images = as_rgb_uint8(npz_member(z, f"{s}_images", path), path)
                parts.append(ImageData(images, labels, classes))
            if len(parts) == 1:
                return parts[0]
            check_npz_parts(
                path,
                {s: p.images.shape[1:3] for s, p in zip(names, parts, strict=True)},
                {s: p.labels is not None for s, p in zip(names, parts, strict=True)},
            )
            return ImageData(
                np.concatenate([p.images for p in parts]),
                None if parts[0].labels is None else np.concatenate([p.labels for p in parts]),
                classes,
            )
        if "images" not in keys:
            raise ValueError(
                f"npz: {path} has keys {sorted(keys)}; it needs 'images' (N, H, W, 3) uint8 "
                "and optionally 'labels', or 'train_images' and 'test_images'"
            )
        labels = (
            check_labels(npz_member(z, "labels", path), f"npz: labels in {path}")
            if "labels" in keys
            else None
        )
        data = ImageData(as_rgb_uint8(npz_member(z, "images", path), path), labels, classes)
    return split_fixed(data, split)


def check_npz_parts(path, sizes: dict, labelled: dict) -> None:
    """A one-line ValueError naming ``path`` where its train and test parts cannot make one
    split "all": ``sizes`` maps each part to its image (H, W), ``labelled`` to whether it
    has labels."""
    if len(set(map(tuple, sizes.values()))) > 1:
        shown = ", ".join(f"{k}_images {h}x{w}" for k, (h, w) in sizes.items())
        raise ValueError(
            f"npz: {path} holds {shown}: split 'all' needs one image size; read 'train' and "
            "'test' apart, or store both parts at one size"
        )
    if len(set(labelled.values())) > 1:
        have = next(k for k, v in labelled.items() if v)
        lack = next(k for k, v in labelled.items() if not v)
        raise ValueError(
            f"npz: {path} has {have}_labels but no {lack}_labels: split 'all' needs labels for "
            f"both parts or for neither; add {lack}_labels, or read {have!r} alone"
        )


def npz_member(z, key: str, path: Path) -> np.ndarray:
    """``z[key]`` of an open .npz; numpy reads members lazily, so a member of pickled
    objects is found only here."""
    try:
        return z[key]
    except ValueError as e:
        raise ValueError(
            f"npz: {key!r} in {path} cannot be read ({e}); store plain arrays (numpy.savez)"
        ) from e


def as_rgb_uint8(x: np.ndarray, path) -> np.ndarray:
    """Accept (N, H, W, 3) uint8, and (N, H, W) or (N, H, W, 1) grey by repeating."""
    if x.dtype != np.uint8:
        raise ValueError(
            f"npz: images in {path} must be uint8 (0..255), got {x.dtype}; convert them "
            "with .astype(np.uint8) after scaling to 0..255"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"npz: images in {path} must be (N, H, W, 3), got {x.shape}")
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- rows


def open_npz(path: Path, split: str, spec: str) -> ImageSet:
    """Map an npz's images; a file the lazy path cannot map is read whole by ``load_npz``,
    which also says what is wrong with a damaged one."""
    try:
        return _map_npz(path, split, spec)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        log.info("npz %s cannot be read by rows (%s): reading it whole", path, e)
    data = load_npz(str(path), split)
    return ImageSet(
        ArraySource(data.images), data.labels, data.classes, shape=data.images.shape[1:3],
        name=spec,
    )  # fmt: skip


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
            raise ValueError(f"npz: {m.what()} is not uint8 (N, H, W, 3)")
    source = members[0] if len(members) == 1 else Concat(members)
    have = [y is not None for y in labels]
    all_labels = np.concatenate(labels) if all(have) and have else None
    if all_labels is not None and len(all_labels) != source.count():
        raise ValueError(f"{spec}: {len(all_labels)} labels for {source.count()} images")
    rows = None if explicit else split_rows(source.count(), split)
    shape = tuple(members[0].shape[1:3])
    return ImageSet(source, all_labels, classes, rows=rows, shape=shape, name=spec)


class Npz(Source):
    """An ``.npz`` (or ``.npy``) of images (see the module docstring)."""

    name, arg = "npz", "FILE"
    help = "an .npz of images (and labels), or an .npy of images"

    def open(self, arg, split, *, size=None, n_px=None, progress=None) -> ImageSet:
        """The split's rows, mapped from the file where it can be read by rows."""
        return open_npz(Path(arg), split, f"npz:{arg}")

    def files(self, arg, split):
        """The one file."""
        return Path(arg), [Path(arg)], []
