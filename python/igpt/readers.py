"""Whole splits in memory: ``ImageData``, the spec parser and the readers behind
``igpt.data.load_images`` (the lazy readers that list, not load, are ``igpt.imagesets``).

Dataset specs: ``digits``, ``cifar10:DIR``, ``cifar100:DIR``, ``folder:DIR``,
``npz:FILE``, ``imagenet32:DIR`` and ``imagenet64:DIR``; see ``igpt.data`` for what each
holds and how the splits are made.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igpt.transforms import check_images, read_image, square

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
KINDS = ("cifar10", "cifar100", "folder", "npz", "imagenet32", "imagenet64")


@dataclass
class ImageData:
    """A set of images with optional labels.

    images: uint8 numpy (N, H, W, 3) RGB. labels: int64 numpy (N,) or None. classes: class
    names (index = label) or None. skipped: files that could not be read (folder specs).
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    skipped: int = 0

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


# ----------------------------------------------------------------------------- specs, splits


def available_cores() -> int:
    """The CPU cores this process may run on (the default number of workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:DIR"`` -> ``("cifar10", "DIR")``; ``"digits"`` -> ``("digits", None)``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        return kind, None
    if kind in KINDS and sep and arg:
        return kind, os.path.expanduser(arg)
    raise ValueError(
        f"unknown data spec {spec!r}; use digits, cifar10:DIR, cifar100:DIR, folder:DIR, "
        "npz:FILE, imagenet32:DIR or imagenet64:DIR"
    )


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


def load_digits() -> ImageData:
    """scikit-learn's 1797 8x8 digits as uint8 RGB (0..16 scaled to 0..255), labels 0-9."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    grey = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    images = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    return ImageData(images, d.target.astype(np.int64), [str(c) for c in d.target_names])


# ----------------------------------------------------------------------------- cifar


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


def find_cifar_dir(root: Path, kind: str) -> Path:
    """The folder of the CIFAR batch files: ``root`` or its ``cifar-10-batches-py`` /
    ``cifar-100-python``; a FileNotFoundError saying what to download otherwise."""
    marker = "data_batch_1" if kind == "cifar10" else "train"
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    for cand in (root, root / sub):
        if (cand / marker).is_file():
            return cand
    raise FileNotFoundError(
        f"{kind}: no {marker} in {root} or {root / sub}; point the spec at the extracted "
        f"python version of the data set ({sub} from https://www.cs.toronto.edu/~kriz/cifar.html)"
    )


def cifar_files(root: str, kind: str, split: str) -> tuple[list[Path], list[str] | None]:
    """(batch files of ``split`` in order, class names or None) of a CIFAR folder."""
    d = find_cifar_dir(Path(root), kind)
    if kind == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta, names_key = "batches.meta", "label_names"
    else:
        files = {"train": ["train"], "test": ["test"]}
        meta, names_key = "meta", "fine_label_names"
    wanted = files["train"] + files["test"] if split == "all" else files[split]
    paths = []
    for name in wanted:
        if not (d / name).is_file():
            raise FileNotFoundError(f"{kind}: missing batch file {d / name}")
        paths.append(d / name)
    classes = None
    if (d / meta).is_file():
        names = unpickle(d / meta).get(names_key)
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return paths, classes


def read_cifar_batch(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file: uint8 images (n, 32, 32, 3) and int64 labels (n,)."""
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    batch = unpickle(path)
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # (n, C, H, W)
        y = batch[label_key]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"{path} is not a {kind} batch: it needs 'data' (n, 3072) uint8 and "
            f"{label_key!r} (n,) ({type(e).__name__}: {e})"
        ) from e
    y = check_labels(y, f"{path}: {label_key}").reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.transpose(0, 2, 3, 1), y  # (n, 32, 32, 3)


def load_cifar(root: str, kind: str, split: str) -> ImageData:
    """A whole CIFAR split in memory."""
    paths, classes = cifar_files(root, kind, split)
    parts = [read_cifar_batch(path, kind) for path in paths]
    images = np.ascontiguousarray(np.concatenate([x for x, _ in parts]))
    return ImageData(images, np.concatenate([y for _, y in parts]), classes)


# ----------------------------------------------------------------------------- folder


def folder_parts(root: str, split: str) -> tuple[list[tuple[Path, list[str] | None]], bool]:
    """How a ``folder:`` spec's split is read: ([(class-folder root, classes or None)], whether
    the folder has its own split folders). Each part is sized on its own; without split
    folders the one part is the whole folder, split by ``split_rows`` afterwards."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder: {root} is not a directory")
    split_dirs = {"train": ["train"], "test": ["test", "val"]}
    has_splits = (root / "train").is_dir() and any((root / s).is_dir() for s in split_dirs["test"])
    if not has_splits:
        return [(root, None)], False
    # labels follow the train folder's classes, also where the test folder lacks some
    classes = class_names(root / "train")
    names = ("train", "test") if split == "all" else (split,)
    subs = [next(root / s for s in split_dirs[n] if (root / s).is_dir()) for n in names]
    return [(sub, classes) for sub in subs], True


def class_names(root: Path) -> list[str]:
    """The sorted names of ``root``'s sub-folders (hidden ones left out)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_files(root: Path, classes: list[str] | None = None):
    """(files, classes): ``(label, path)`` of every file under ``root/CLASS/`` in sorted order,
    label = index of CLASS in ``classes`` (default: the sorted sub-folders of ``root``)."""
    present = class_names(root)
    if not present:
        raise FileNotFoundError(f"folder: {root} has no class sub-folders (one per class)")
    if classes is None:
        classes = present
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(
            f"folder: {root} has class folders {unknown} that the train folder lacks; "
            f"every class needs training images (train classes: {classes})"
        )
    files = [
        (label, path)
        for label, cls in enumerate(classes)
        if cls in present
        for path in sorted((root / cls).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    return files, classes


def common_size(shapes, root) -> int | None:
    """The side images of ``shapes`` ((H, W, ...) each) are squared to: None when all share
    one shape, else the smallest short side among them, at most 256."""
    if len(shapes) <= 1:
        return None
    size = min(256, min(min(s[:2]) for s in shapes))
    log.info("folder %s: images differ in size; bringing all to %dx%d", root, size, size)
    return size


def load_folder(root: str, split: str, size: int | None) -> ImageData:
    """A whole ``folder:`` split in memory (see ``folder_parts``)."""
    parts, has_splits = folder_parts(root, split)
    data = [_read_class_folders(sub, size, classes) for sub, classes in parts]
    if not has_splits:
        return split_fixed(data[0], split)
    return data[0] if len(data) == 1 else _concat(data)


def _concat(parts: list[ImageData]) -> ImageData:
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"splits have different image shapes {sorted(shapes)}; pass size=")
    return ImageData(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        parts[0].classes,
        skipped=sum(p.skipped for p in parts),
    )


def _read_class_folders(root: Path, size: int | None, classes: list[str] | None = None):
    """Images of ``root/CLASS/...`` decoded (see ``class_files``)."""
    from tqdm.auto import tqdm

    files, classes = class_files(root, classes)
    images, labels, skipped = [], [], 0
    # a bar for folders big enough to take a while to decode
    for label, path in tqdm(files, desc=f"reading {root}", unit="file", disable=len(files) < 2000):
        img = read_image(path)
        if img is None:
            skipped += 1
            continue
        images.append(img)
        labels.append(label)
    if skipped:
        log.warning("folder %s: skipped %d unreadable file(s)", root, skipped)
    if not images:
        raise ValueError(f"folder: no readable images under {root} ({skipped} unreadable)")
    if size is None:
        size = common_size({im.shape for im in images}, root)
    if size is not None:
        images = [square(im, size) for im in images]
    return ImageData(np.stack(images), np.asarray(labels, np.int64), classes, skipped=skipped)


# ----------------------------------------------------------------------------- npz


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
