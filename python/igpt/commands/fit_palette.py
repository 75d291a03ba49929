"""``igpt fit-palette``: fit a k-means colour palette on a data set; write the .npy and a PNG."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from igpt.commands._common import add_common_arguments, pick_device

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """Arguments of ``igpt fit-palette``."""
    add_common_arguments(parser, "data", "n_px", "seed", "device")
    parser.add_argument("--k", type=int, default=512, help="colours (default %(default)s)")
    parser.add_argument(
        "--sample",
        type=int,
        default=1_000_000,
        help="pixels drawn at random to fit on (default %(default)s)",
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
    from igpt.data import load_images, resize
    from igpt.palette import fit_palette, save_preview

    images = load_images(args.data, split="train").images
    if args.n_px is not None:
        images = resize(images, args.n_px)
    n, h, w = images.shape[:3]
    log.info("fitting %d colours on %s: %d images of %dx%d", args.k, args.data, n, h, w)
    start = time.perf_counter()
    device = None if args.device is None else pick_device(args.device)
    palette = fit_palette(images, k=args.k, sample=args.sample, seed=args.seed, device=device)
    log.info("fitted in %.1f s", time.perf_counter() - start)
    path = _output_path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette.save(path)
    rng = np.random.default_rng(args.seed)
    shown = images[np.sort(rng.choice(len(images), size=min(6, len(images)), replace=False))]
    save_preview(palette, shown, path.with_suffix(".png"))
    log.info("wrote %s and %s", path, path.with_suffix(".png"))
