"""``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 0..16 grey
levels scaled to 0..255 and repeated to RGB, labels 0-9). Needs no download; no test split
of its own, so the last 20% in file order is ``"test"``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from igpt.data.base import ArraySource, ImageData, ImageSet, Source, split_rows


def load_digits() -> ImageData:
    """scikit-learn's 1797 8x8 digits as uint8 RGB (0..16 scaled to 0..255), labels 0-9."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    grey = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    images = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    return ImageData(images, d.target.astype(np.int64), [str(c) for c in d.target_names])


class Digits(Source):
    """The bundled 8x8 digits."""

    name, arg, side = "digits", None, 8
    help = "scikit-learn's bundled 8x8 digits (no download)"
    defaults = {"n_px": 16, "n_colors": 16}

    def open(self, arg, split, *, size=None, n_px=None, progress=None) -> ImageSet:
        """The split's rows of the digits held in memory (the last 20% is test)."""
        d = load_digits()
        rows = split_rows(len(d), split, permute=False)
        return ImageSet(ArraySource(d.images), d.labels, d.classes, rows=rows, shape=(8, 8))

    def files(self, arg, split):
        """No files of ours: the digits come with scikit-learn."""
        return Path("."), [], []
