"""``igpt fit-palette``: fit a k-means colour palette on a data set; write the .npy and a PNG.

The pixels come from a seeded sample of the training split's images read through the lazy
readers (``igpt.data.open_images``), never the whole set in memory: with at most ``--images``
images (every image of sets that size or smaller) the palette is the one a fit on the whole
split in memory gives.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from igpt.commands._common import UsageError, add_common_arguments, count, pick_device

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """Arguments of ``igpt fit-palette``."""
    add_common_arguments(parser, "data", "n_px", "seed", "device")
    parser.add_argument("--k", type=count(1), default=512, help="colours (default %(default)s)")
    parser.add_argument(
        "--sample",
        type=count(1),
        default=1_000_000,
        help="pixels drawn at random to fit on (default %(default)s)",
    )
    parser.add_argument(
        "--images",
        type=count(1),
        default=50_000,
        help="images drawn at random (seeded) to draw the pixels from; a set with no more "
        "uses all of them (default %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="palette.npy",
        help="the .npy to write, or a directory for DIR/palette.npy; the PNG goes beside "
        "it with the same stem (default %(default)s)",
    )


def _output_path(out: str) -> Path:
    path = Path(out)
    return path if path.suffix == ".npy" else path / "palette.npy"


def run(args) -> None:
    """``igpt fit-palette``: fit on a data set, write the palette .npy and a preview PNG."""
    from igpt.data import open_images, resize
    from igpt.palette import fit_palette_on, save_preview

    # images of mixed sizes go straight to --n-px, as igpt prepare tokenises them
    images = open_images(args.data, "train", n_px=args.n_px)
    if len(images) == 0:
        raise UsageError(f"--data {args.data} has no training images to fit a palette on")
    h, w = (args.n_px, args.n_px) if args.n_px is not None else images.shape
    used = min(len(images), args.images)
    log.info("fitting %d colours on %s: %d of %d images of %dx%d", args.k, args.data, used,
             len(images), h, w)  # fmt: skip
    start = time.perf_counter()
    device = None if args.device is None else pick_device(args.device)
    palette = fit_palette_on(
        images,
        k=args.k,
        n_px=args.n_px,
        max_images=args.images,
        sample=args.sample,
        seed=args.seed,
        device=device,
    )
    log.info("fitted in %.1f s", time.perf_counter() - start)
    path = _output_path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette.save(path)
    rng = np.random.default_rng(args.seed)
    shown = images.take(rng.choice(len(images), size=min(6, len(images)), replace=False)).images
    if args.n_px is not None:
        shown = resize(shown, args.n_px)
    save_preview(palette, shown, path.with_suffix(".png"))
    log.info("wrote %s and %s", path, path.with_suffix(".png"))
