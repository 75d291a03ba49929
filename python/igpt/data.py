"""Images in, palette tokens out: readers, resizing, augmentations, hold-out, token cache.

    data = load_images("cifar10:~/data/cifar-10-batches-py", split="train")
    data.images                     # uint8 (N, H, W, 3) RGB
    data.labels, data.classes       # int64 (N,) and class names, or None
    tokens = tokenize(data.images, palette, n_px=32)   # int64 (N, 1024), raster order
    train_idx, val_idx = holdout_split(len(data), frac=0.1)   # the paper's 10% (sec. 3.1)

Dataset specs (DESIGN.md):

- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 0..16 grey
  levels scaled to 0..255 and repeated to RGB, labels 0-9). Needs no download.
- ``cifar10:DIR`` / ``cifar100:DIR``: the python-pickle batch folders
  (``cifar-10-batches-py``, ``cifar-100-python``), or a folder that contains one.
- ``folder:DIR``: one sub-folder per class of PIL-readable files. If DIR holds ``train`` and
  ``test`` (or ``val``) sub-folders they are the splits. Unreadable files are skipped and
  counted (a warning says how many), never a crash.
- ``npz:FILE``: an ``.npz`` with ``images`` (N, H, W, 3) uint8 and optional ``labels`` (and
  optional ``classes``), or a bare ``.npy`` of images. ``train_images``/``test_images`` (and
  ``train_labels``/``test_labels``) keys give explicit splits.

Splits: ``"train"``, ``"test"`` and ``"all"``. Sources that come without a test split
(digits, a folder or npz without split entries) are split deterministically: the last 20%
of a fixed permutation (digits: the last 20% in file order) is ``"test"``. ``"all"`` is
every image. The validation set used while training is carved out of ``"train"`` with
``holdout_split``; the batches a run draws from the rest come from ``igpt.batches``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igpt._io import atomic_write_bytes
from igpt_kernels.reference import MAX_COLORS

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


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
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
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


def check_images(images, name: str = "images") -> None:
    """Raise unless ``images`` is a uint8 numpy array (N, H, W, 3)."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 RGB, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be (N, H, W, 3), got shape {images.shape}")


# ----------------------------------------------------------------------------- readers


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:DIR"`` -> ``("cifar10", "DIR")``; ``"digits"`` -> ``("digits", None)``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        return kind, None
    if kind in ("cifar10", "cifar100", "folder", "npz") and sep and arg:
        return kind, os.path.expanduser(arg)
    raise ValueError(
        f"unknown data spec {spec!r}; use digits, cifar10:DIR, cifar100:DIR, folder:DIR or npz:FILE"
    )


def load_images(spec: str, split: str = "train", *, size: int | None = None) -> ImageData:
    """Read a data set by spec (see the module docstring) and split.

    Args:
        spec: ``digits``, ``cifar10:DIR``, ``cifar100:DIR``, ``folder:DIR`` or ``npz:FILE``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: folder specs only: the square side every image is brought to (centre crop to a
            square, then bilinear resize). By default images keep their size when all share
            one, and otherwise go to the smallest short side among them (at most 256).

    Returns:
        ImageData with uint8 (N, H, W, 3) images, int64 labels or None, class names or None.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, arg = parse_spec(spec)
    if kind == "digits":
        return _split_fixed(_load_digits(), split, permute=False)
    if kind in ("cifar10", "cifar100"):
        return _load_cifar(arg, kind, split)
    if kind == "folder":
        return _load_folder(arg, split, size)
    return _load_npz(arg, split)


def _split_fixed(data: ImageData, split: str, permute: bool = True) -> ImageData:
    """Deterministic train/test split of a source that has none: the last 20% is test."""
    if split == "all":
        return data
    n = len(data)
    order = np.random.default_rng(0).permutation(n) if permute else np.arange(n)
    n_train = n - int(round(n * TEST_FRACTION))
    idx = np.sort(order[:n_train]) if split == "train" else np.sort(order[n_train:])
    out = data.subset(idx)
    out.skipped = data.skipped
    return out


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    images = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    return ImageData(images, d.target.astype(np.int64), [str(c) for c in d.target_names])


class _NumpyOnlyUnpickler(pickle.Unpickler):
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


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _find_cifar_dir(root: Path, kind: str) -> Path:
    marker = "data_batch_1" if kind == "cifar10" else "train"
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    for cand in (root, root / sub):
        if (cand / marker).is_file():
            return cand
    raise FileNotFoundError(
        f"{kind}: no {marker} in {root} or {root / sub}; point the spec at the extracted "
        f"python version of the data set ({sub} from https://www.cs.toronto.edu/~kriz/cifar.html)"
    )


def _load_cifar(root: str, kind: str, split: str) -> ImageData:
    d = _find_cifar_dir(Path(root), kind)
    if kind == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key, meta, names_key = "labels", "batches.meta", "label_names"
    else:
        files = {"train": ["train"], "test": ["test"]}
        label_key, meta, names_key = "fine_labels", "meta", "fine_label_names"
    wanted = files["train"] + files["test"] if split == "all" else files[split]
    images, labels = [], []
    for name in wanted:
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"{kind}: missing batch file {path}")
        batch = _unpickle(path)
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # (n, C, H, W)
        images.append(x.transpose(0, 2, 3, 1))  # (n, 32, 32, 3)
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    classes = None
    if (d / meta).is_file():
        names = _unpickle(d / meta).get(names_key)
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageData(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


def _read_image(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many kinds of errors on bad files
        log.debug("skipping unreadable image %s: %s", path, e)
        return None


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then bilinear resize to size x size."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _resize_one(image[top : top + s, left : left + s], size)


def _load_folder(root: str, split: str, size: int | None) -> ImageData:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder: {root} is not a directory")
    split_dirs = {"train": ["train"], "test": ["test", "val"]}
    has_splits = (root / "train").is_dir() and any((root / s).is_dir() for s in split_dirs["test"])
    if has_splits:
        if split == "all":
            parts = [_load_folder(str(root), s, size) for s in ("train", "test")]
            return _concat(parts)
        sub = next(root / s for s in split_dirs[split] if (root / s).is_dir())
        # labels follow the train folder's classes, also where the test folder lacks some
        return _read_class_folders(sub, size, classes=_class_names(root / "train"))
    return _split_fixed(_read_class_folders(root, size), split)


def _class_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


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
    """Images of ``root/CLASS/...``; label = index of CLASS in ``classes`` (default: the
    sorted sub-folders of ``root`` themselves)."""
    present = _class_names(root)
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
    from tqdm.auto import tqdm

    files = [
        (label, path)
        for label, cls in enumerate(classes)
        if cls in present
        for path in sorted((root / cls).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    images, labels, skipped = [], [], 0
    # a bar for folders big enough to take a while to decode
    for label, path in tqdm(files, desc=f"reading {root}", unit="file", disable=len(files) < 2000):
        img = _read_image(path)
        if img is None:
            skipped += 1
            continue
        images.append(img)
        labels.append(label)
    if skipped:
        log.warning("folder %s: skipped %d unreadable file(s)", root, skipped)
    if not images:
        raise ValueError(f"folder: no readable images under {root} ({skipped} unreadable)")
    shapes = {im.shape for im in images}
    if size is None and len(shapes) > 1:
        size = min(256, min(min(s[:2]) for s in shapes))
        log.info("folder %s: images differ in size; bringing all to %dx%d", root, size, size)
    if size is not None:
        images = [_square(im, size) for im in images]
    return ImageData(np.stack(images), np.asarray(labels, np.int64), classes, skipped=skipped)


def _load_npz(path: str, split: str) -> ImageData:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} does not exist")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a bare .npy of images
        return _split_fixed(ImageData(_as_rgb_uint8(loaded, path)), split)
    with loaded as z:
        keys = set(z.files)
        classes = [str(c) for c in z["classes"]] if "classes" in keys else None
        if "train_images" in keys and "test_images" in keys:
            names = ["train", "test"] if split == "all" else [split]
            parts = []
            for s in names:
                labels = z[f"{s}_labels"] if f"{s}_labels" in keys else None
                parts.append(ImageData(_as_rgb_uint8(z[f"{s}_images"], path), labels, classes))
            if len(parts) == 1:
                return parts[0]
            return ImageData(
                np.concatenate([p.images for p in parts]),
                None if parts[0].labels is None else np.concatenate([p.labels for p in parts]),
                classes,
            )
        if "images" not in keys:
            raise KeyError(
                f"npz: {path} has keys {sorted(keys)}; it needs 'images' (N, H, W, 3) uint8 "
                "and optionally 'labels', or 'train_images' and 'test_images'"
            )
        labels = z["labels"] if "labels" in keys else None
        data = ImageData(_as_rgb_uint8(z["images"], path), labels, classes)
    return _split_fixed(data, split)


def _as_rgb_uint8(x: np.ndarray, path) -> np.ndarray:
    """Accept (N, H, W, 3) uint8, and (N, H, W) or (N, H, W, 1) grey by repeating."""
    if x.dtype != np.uint8:
        raise TypeError(f"npz: images in {path} must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"npz: images in {path} must be (N, H, W, 3), got {x.shape}")
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- resizing


def _resize_one(image: np.ndarray, n_px: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == n_px and image.shape[1] == n_px:
        return image
    out = Image.fromarray(image).resize((n_px, n_px), resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


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
        out[i] = _resize_one(im, n_px)
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
        out[i] = _resize_one(crop, n_px)
    return out


def pad_crop_flip(
    images: np.ndarray, *, pad: int = 4, rng: np.random.Generator | None = None
) -> np.ndarray:
    """CIFAR augmentation: reflection-pad by ``pad``, random crop back to (H, W), and a
    horizontal flip with probability 1/2 (paper, fine-tuning on CIFAR). uint8 in and out."""
    check_images(images)
    rng = rng if rng is not None else np.random.default_rng()
    N, H, W, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    tops = rng.integers(0, 2 * pad + 1, size=N)
    lefts = rng.integers(0, 2 * pad + 1, size=N)
    flips = rng.random(N) < 0.5
    rows = tops[:, None] + np.arange(H)[None]  # (N, H)
    cols = lefts[:, None] + np.arange(W)[None]  # (N, W)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return np.ascontiguousarray(
        padded[np.arange(N)[:, None, None], rows[:, :, None], cols[:, None]]
    )


# ----------------------------------------------------------------------------- token cache


def palette_hash(palette) -> str:
    """A short hex digest of the palette's float32 centroids."""
    c = getattr(palette, "centroids", palette)
    c = torch.as_tensor(c, dtype=torch.float32).cpu().contiguous().numpy()
    return hashlib.sha256(c.tobytes()).hexdigest()[:16]


def _spec_key(spec: str) -> str:
    kind, arg = parse_spec(spec)
    return kind if arg is None else f"{kind}:{Path(arg).resolve()}"


def _source_fingerprint(spec: str) -> str:
    """A digest of the files behind ``spec`` (relative path, size, mtime of each), so that a
    data set edited or replaced in place gets a new cache entry instead of stale tokens."""
    kind, arg = parse_spec(spec)
    if arg is None:
        return kind  # bundled with scikit-learn
    root = Path(arg)
    if kind in ("cifar10", "cifar100"):
        root = _find_cifar_dir(root, kind)
    if not root.exists():
        raise FileNotFoundError(f"{kind}: {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$IGPT_CACHE`` or ``~/.cache/igpt``."""
    return Path(os.environ.get("IGPT_CACHE", Path.home() / ".cache" / "igpt"))


def cached_tokens(
    spec: str,
    split: str,
    palette,
    n_px: int,
    *,
    cache_dir=None,
    data: ImageData | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens of a whole split through an on-disk uint16 memmap cache.

    The cache is keyed by the data spec (with its absolute path), the name, size and
    modification time of every file behind it, split, n_px and the palette's hash. The
    first call reads and tokenizes the images (``data`` if given, else
    ``load_images(spec, split)``) and writes ``tokens.u16`` + ``meta.json`` (+
    ``labels.npy``) atomically; later calls only map the file, never touching images.

    Returns:
        (tokens, labels): a read-only uint16 memmap (N, n_px * n_px) and int64 labels or
        None. Convert batches with ``torch.from_numpy(tokens[idx].astype(np.int64))``.
    """
    if len(palette) > MAX_COLORS:  # every palette id fits a uint16
        raise ValueError(
            f"a uint16 cache holds at most {MAX_COLORS} colours, palette has {len(palette)}"
        )
    key_src = json.dumps(
        {
            "spec": _spec_key(spec),
            "source": _source_fingerprint(spec),
            "split": split,
            "n_px": n_px,
            "palette": palette_hash(palette),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "tokens" / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        tokens = np.memmap(folder / "tokens.u16", np.uint16, "r", shape=tuple(meta["shape"]))
        labels = np.load(folder / "labels.npy") if meta["has_labels"] else None
        return tokens, labels
    if data is None:
        data = load_images(spec, split)
    tokens = tokenize(data.images, palette, n_px)
    folder.mkdir(parents=True, exist_ok=True)
    arr = tokens.numpy().astype(np.uint16)
    atomic_write_bytes(folder / "tokens.u16", arr.tobytes())
    if data.labels is not None:
        buf = io.BytesIO()
        np.save(buf, data.labels)
        atomic_write_bytes(folder / "labels.npy", buf.getvalue())
    meta = {
        "shape": list(arr.shape),
        "has_labels": data.labels is not None,
        "key": json.loads(key_src),
    }
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())  # written last
    log.info("token cache: wrote %s (%d x %d)", folder, *arr.shape)
    mm = np.memmap(folder / "tokens.u16", np.uint16, "r", shape=arr.shape)
    return mm, data.labels
