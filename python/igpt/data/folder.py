"""``folder:DIR``: one sub-folder per class of PIL-readable files.

If DIR holds ``train`` and ``test`` (or ``val``) sub-folders they are the splits
(ImageNet's ``train/CLASS/*.JPEG``, ``val/CLASS/*``); otherwise the last 20% of a fixed
permutation is ``"test"``. Class folders may be symlinks (an ImageNet subset), and are
followed. Listing reads only each file's header, to find the sizes; reading decodes just
the rows asked for. Where images differ in size they are centre-cropped to a square and
brought to one side: ``size`` where given, else the side they are tokenised at (``n_px``),
else the smallest short side among them (at most 256). Unreadable files are skipped and
named in a warning (``report_unreadable``); a folder of nothing else is a ValueError.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from igpt.data.base import (
    ImageSet,
    Source,
    available_cores,
    report_unreadable,
    split_rows,
    walk_files,
)
from igpt.transforms import read_image, square

log = logging.getLogger(__name__)

SCAN_CHUNK = 512  # headers a scanning process reads per task
SCAN_PARALLEL = 4096  # from this many files, the scan runs in processes (one per core)


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


def class_listing(root: Path, classes: list[str] | None = None):
    """(files, classes, folders): ``(label, path)`` of every file under ``root/CLASS/`` in
    sorted order, label = index of CLASS in ``classes`` (default: the sorted sub-folders of
    ``root``), and every folder listed on the way (symlinked ones followed)."""
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
    files, dirs = [], [root]
    for label, cls in enumerate(classes):
        if cls in present:
            found, walked = walk_files(root / cls)
            files += [(label, path) for path in found]
            dirs += walked
    return files, classes, dirs


def class_files(root: Path, classes: list[str] | None = None):
    """(files, classes) of ``class_listing``."""
    files, classes, _ = class_listing(root, classes)
    return files, classes


def common_size(shapes, root) -> int | None:
    """The side images of ``shapes`` ((H, W, ...) each) are squared to: None when all share
    one shape, else the smallest short side among them, at most 256."""
    if len(shapes) <= 1:
        return None
    size = min(256, min(min(s[:2]) for s in shapes))
    log.info("folder %s: images differ in size; bringing all to %dx%d", root, size, size)
    return size


# ----------------------------------------------------------------------------- headers


def image_shape(path: Path):
    """(H, W) of the image file at ``path`` from its header, or None where PIL cannot open it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[::-1]  # PIL gives (W, H)
    except Exception as e:  # PIL raises many kinds of errors on bad files
        log.debug("skipping unreadable image %s: %s", path, e)
        return None


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
    return [image_shape(p) for p in paths]


# ----------------------------------------------------------------------------- reading


class FolderRows:
    """Files decoded on demand, each centre-cropped and resized to its side when set."""

    def __init__(self, paths, sizes):
        self.paths = list(paths)
        self.sizes = np.asarray(sizes, np.int64)  # per file: its part's square side, 0 = none

    def count(self) -> int:
        """Number of files."""
        return len(self.paths)

    def path(self, i: int) -> Path:
        """The file of row ``i``."""
        return self.paths[i]

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


FolderSource = FolderRows  # its name before the kinds became Sources


class Folder(Source):
    """A folder of class sub-folders (see the module docstring)."""

    name = "folder"
    help = "one sub-folder per class of image files (train/ and val/ or test/ for splits)"

    def open(self, arg, split, *, size=None, n_px=None, progress=None) -> ImageSet:
        """List a folder split; read only headers to find each part's size."""
        parts, has_splits = folder_parts(arg, split)
        paths, labels, sides, bad, classes, shapes_seen = [], [], [], [], None, set()
        for sub, part_classes in parts:
            files, classes = class_files(sub, part_classes)
            # a bar on a terminal once the scan takes over 2 s (ImageNet: 1.28M headers)
            shapes = image_shapes([p for _, p in files], f"reading headers in {sub}", progress)
            good = [(f, s) for f, s in zip(files, shapes, strict=True) if s is not None]
            unreadable = [p for (_, p), s in zip(files, shapes, strict=True) if s is None]
            if not good:
                report_unreadable(f"folder {sub}", unreadable, len(files))  # raises
            bad += unreadable
            side = self.side_of({s for _, s in good}, sub, size, n_px)
            shapes_seen.add((side, side) if side else good[0][1])
            paths += [p for (_, p), _ in good]
            labels += [label for (label, _), _ in good]
            sides += [side or 0] * len(good)
        if has_splits and len(shapes_seen) > 1:
            raise ValueError(
                f"splits have different image shapes {sorted(shapes_seen)}; pass size="
            )
        report_unreadable(f"folder {arg}", bad, len(paths) + len(bad))
        rows = None if has_splits else split_rows(len(paths), split)
        labels = np.asarray(labels, np.int64)
        return ImageSet(
            FolderRows(paths, sides), labels, classes, rows=rows, shape=tuple(shapes_seen.pop()),
            name=f"folder:{arg}", unreadable=bad,
        )  # fmt: skip

    @staticmethod
    def side_of(shapes: set, root, size, n_px) -> int | None:
        """The square side a part's images go to (None: they keep their one shape)."""
        if size is not None:
            return size
        if len(shapes) > 1 and n_px is not None:
            return n_px  # one resize from each file's own size, never two
        return common_size(shapes, root)

    def files(self, arg, split):
        """Every file under the split's class folders and every folder listed for them."""
        root = Path(arg)
        parts, _ = folder_parts(arg, split)
        files, dirs = [], [root]
        for sub, part_classes in parts:
            listed, _, walked = class_listing(sub, part_classes)
            files += [p for _, p in listed]
            dirs += [d for d in walked if d != root]
        return root, files, dirs
