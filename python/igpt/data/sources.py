"""The one table of data kinds: ``SOURCES`` maps a spec's kind to its ``Source``.

The spec parser, ``load_images``, ``open_images``, ``image_side``, the token cache's key,
the ``--data`` help of every command and the training defaults all read it. Adding a kind
is one module with a ``Source`` subclass and one line here.
"""

from __future__ import annotations

import os

from igpt.data.base import Source
from igpt.data.cifar import Cifar
from igpt.data.digits import Digits
from igpt.data.folder import Folder
from igpt.data.imagenet import Imagenet
from igpt.data.npz import Npz

SOURCES: dict[str, Source] = {
    "digits": Digits(),
    "cifar10": Cifar("cifar10"),
    "cifar100": Cifar("cifar100"),
    "folder": Folder(),
    "npz": Npz(),
    "imagenet32": Imagenet(32),
    "imagenet64": Imagenet(64),
}


def specs_text() -> str:
    """Every kind as a spec is written, for messages: ``digits, cifar10:DIR, ... or X``."""
    usages = [s.usage() for s in SOURCES.values()]
    return ", ".join(usages[:-1]) + " or " + usages[-1] if len(usages) > 1 else usages[0]


def data_help() -> str:
    """The ``--data`` help of every command: each kind and its one line (argparse text,
    with its default)."""
    kinds = "; ".join(f"{s.usage()}: {s.help}" for s in SOURCES.values())
    return f"the data set: {kinds} (default %(default)s)"


def source_of(spec: str) -> tuple[Source, str | None]:
    """(the ``Source`` of ``spec``'s kind, its argument with ``~`` expanded, or None)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    kind, sep, arg = spec.partition(":")
    source = SOURCES.get(kind)
    if source is not None and source.arg is None and not sep:
        return source, None
    if source is not None and source.arg is not None and sep and arg:
        return source, os.path.expanduser(arg)
    raise ValueError(f"unknown data spec {spec!r}; use {specs_text()}")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:DIR"`` -> ``("cifar10", "DIR")``; ``"digits"`` -> ``("digits", None)``."""
    source, arg = source_of(spec)
    return source.name, arg


def data_defaults(spec: str) -> dict:
    """``n_px`` and ``n_colors`` a run on ``spec`` starts from (its kind's ``defaults``);
    the general ones where ``spec`` names no kind."""
    kind = spec.partition(":")[0] if isinstance(spec, str) else None
    source = SOURCES.get(kind)
    return dict(source.defaults if source is not None else Source.defaults)
