"""Where the whole-split readers were before ``igpt.data`` became one module per data kind:
their names, re-exported (new code imports from ``igpt.data`` and its kind modules)."""

from igpt.data import load_cifar, load_digits, load_folder, load_npz
from igpt.data.base import (
    IMAGE_SUFFIXES,
    SPLITS,
    TEST_FRACTION,
    ImageData,
    NumpyOnlyUnpickler,
    available_cores,
    check_labels,
    split_fixed,
    split_rows,
    unpickle,
)
from igpt.data.cifar import cifar_files, find_cifar_dir, read_cifar_batch
from igpt.data.folder import class_files, class_names, common_size, folder_parts
from igpt.data.npz import as_rgb_uint8, check_npz_parts, npz_member
from igpt.data.sources import SOURCES, parse_spec

KINDS = tuple(k for k, s in SOURCES.items() if s.arg is not None)

__all__ = [
    "IMAGE_SUFFIXES",
    "KINDS",
    "SPLITS",
    "TEST_FRACTION",
    "ImageData",
    "NumpyOnlyUnpickler",
    "as_rgb_uint8",
    "available_cores",
    "check_labels",
    "check_npz_parts",
    "cifar_files",
    "class_files",
    "class_names",
    "common_size",
    "find_cifar_dir",
    "folder_parts",
    "load_cifar",
    "load_digits",
    "load_folder",
    "load_npz",
    "npz_member",
    "parse_spec",
    "read_cifar_batch",
    "split_fixed",
    "split_rows",
    "unpickle",
]
