"""``cifar10:DIR`` / ``cifar100:DIR``: the python-pickle batch folders
(``cifar-10-batches-py``, ``cifar-100-python``), or a folder that contains one. Read one
batch file at a time; the batches are unpickled by an unpickler that admits numpy arrays
only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from igpt.data.base import BatchFiles, ImageSet, Source, check_labels, unpickle


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


class CifarRead:
    """A picklable ``read`` for ``BatchFiles`` of CIFAR batches."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, path):
        return read_cifar_batch(path, self.kind)


class Cifar(Source):
    """CIFAR-10 or CIFAR-100 (``kind``), python version."""

    side = 32

    def __init__(self, kind: str):
        self.name = kind
        self.help = f"the python version of {kind.upper().replace('CIFAR', 'CIFAR-')}"

    def open(self, arg, split, *, size=None, n_px=None, progress=None) -> ImageSet:
        """The split's batch files, read one at a time (labels read when listing)."""
        paths, classes = cifar_files(arg, self.name, split)
        labels = [read_cifar_batch(p, self.name)[1] for p in paths]  # one batch at a time
        source = BatchFiles(paths, [len(y) for y in labels], CifarRead(self.name))
        name = f"{self.name}:{arg}"
        return ImageSet(source, np.concatenate(labels), classes, shape=(32, 32), name=name)

    def files(self, arg, split):
        """The batch files of ``split`` and the meta file (the class names)."""
        d = find_cifar_dir(Path(arg), self.name)
        paths, _ = cifar_files(arg, self.name, split)
        meta = d / ("batches.meta" if self.name == "cifar10" else "meta")
        return d, paths + ([meta] if meta.is_file() else []), [d]
