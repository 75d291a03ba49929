"""Where the lazy readers were before ``igpt.data`` became one module per data kind: their
names, re-exported (new code imports from ``igpt.data`` and its kind modules)."""

from igpt.data import image_side, open_images
from igpt.data.base import ArraySource, BatchFiles, Concat, ImageSet
from igpt.data.folder import SCAN_CHUNK, SCAN_PARALLEL, FolderSource, image_shapes
from igpt.data.imagenet import ImagenetRead, imagenet_files
from igpt.data.npz import NpyRows
from igpt.data.sources import SOURCES

# the side every image of these kinds has, whatever the files: no file need be opened
FORMAT_SIDES = {k: s.side for k, s in SOURCES.items() if s.side is not None}

__all__ = [
    "FORMAT_SIDES",
    "SCAN_CHUNK",
    "SCAN_PARALLEL",
    "ArraySource",
    "BatchFiles",
    "Concat",
    "FolderSource",
    "ImageSet",
    "ImagenetRead",
    "NpyRows",
    "image_shapes",
    "image_side",
    "imagenet_files",
    "open_images",
]
