"""What several ``igpt`` commands share: dataclass flags, the device, the checkpoint preamble.

    add_common_arguments(parser, "checkpoint", "data", "device")   # flags with one meaning
    dataclass_arguments(parser, TrainConfig, skip=("model_overrides",))
    cfg = config_from_args(TrainConfig, args, progress=not args.no_progress)
    device = pick_device(args.device)
    path, model, palette, ckpt, objective = open_checkpoint(args, device=device)
    train, test = labelled_splits(args.data, args.limit)

A user's mistake raises ``UsageError`` (a ``ValueError``); ``igpt.cli.main`` prints it as one
line, or the traceback with ``-v``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

__all__ = [
    "UsageError",
    "add_common_arguments",
    "dataclass_arguments",
    "config_from_args",
    "pick_device",
    "open_checkpoint",
    "labelled_splits",
    "int_list",
]


class UsageError(ValueError):
    """A command given something it cannot use; the message says what to pass instead."""


# ----------------------------------------------------------------------------- dataclass flags


def _unwrap_optional(tp):
    """(inner type, True) for ``X | None`` / ``Optional[X]``, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag_kwargs(name: str, tp) -> dict:
    """argparse keywords (type, nargs, action) for a field of annotation ``tp``."""
    tp, _ = _unwrap_optional(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        return {"type": Path}
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis and items[0] in (int, float, str):
            return {"type": items[0], "nargs": "+"}
        if items and all(i is items[0] for i in items) and items[0] in (int, float, str):
            return {"type": items[0], "nargs": len(items)}
    raise TypeError(
        f"dataclass_arguments cannot make a flag for field {name!r} of type {tp!r}; "
        "pass it in skip=(...) and add the flag by hand"
    )


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def dataclass_arguments(
    parser: argparse.ArgumentParser, cls, *, skip=(), helps: dict | None = None
) -> None:
    """Add one flag per field of the dataclass ``cls``: ``--field-name``, dest ``field_name``.

    The type comes from the annotation (int, float, str, Path, ``X | None``, a tuple of one
    item type: ``nargs``), the default from the field, so defaults are stated once. Field
    metadata may give ``help`` (shown with the default), ``choices``, ``flag`` (another flag
    name, e.g. ``--checkpoint`` for ``init_from``), ``metavar`` and ``default_text`` (how to
    show a None default, e.g. "one epoch"). Bools become ``--flag/--no-flag``. ``skip`` names
    fields to leave out; ``helps`` replaces some fields' help text (name -> text).
    """
    hints = typing.get_type_hints(cls)
    unknown = set(skip) | set(helps or {})
    unknown -= {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"skip/helps name fields {sorted(unknown)} that {cls.__name__} lacks")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = f.metadata
        kwargs = _flag_kwargs(f.name, hints[f.name])
        default = _default(f)
        text = (helps or {}).get(f.name, meta.get("help", ""))
        if default is None:
            shown = meta.get("default_text", "none")
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, tuple):
            shown = " ".join(str(v) for v in default)
        else:
            shown = "%(default)s"
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
        if "choices" in meta:
            kwargs["choices"] = tuple(meta["choices"])
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if "flag" in meta and "metavar" not in kwargs and "action" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, dest=f.name, default=default, help=text, **kwargs)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """``cls(...)`` from the parsed flags of ``dataclass_arguments``; ``overrides`` win.

    Fields that have no flag (skipped) and no override keep their dataclass default.
    """
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and hasattr(args, f.name)
    }
    values.update(overrides)
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)  # argparse gives lists for nargs; configs hold tuples
    return cls(**values)


def int_list(text, name: str = "value") -> list[int]:
    """``"4,25 400"`` (or a list of such strings from ``nargs="+"``) -> [4, 25, 400]."""
    if isinstance(text, (list, tuple)):
        text = " ".join(str(t) for t in text)
    try:
        return [int(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"{name} expects integers like 4,25,400, got {text!r}") from None


# ----------------------------------------------------------------------------- shared flags


def add_common_arguments(
    parser: argparse.ArgumentParser, *names: str, helps: dict | None = None
) -> None:
    """Add the flags shared across commands (DESIGN.md), by name, with one meaning each.

    ``helps`` replaces the help text of some of them (name -> text) where a command gives
    the flag a more specific role."""
    specs = {
        "model": (
            ("--model",),
            dict(
                default="igpt-tiny",
                help="named size: igpt-tiny, igpt-s, igpt-m, igpt-l, igpt-xl (default %(default)s)",
            ),
        ),
        "n_px": (("--n-px",), dict(type=int, default=None, help="image side in pixels")),
        "data": (
            ("--data",),
            dict(
                default="digits",
                help="digits (bundled), cifar10:DIR, "
                "cifar100:DIR, folder:DIR or npz:FILE (default %(default)s)",
            ),
        ),
        "objective": (
            ("--objective",),
            dict(
                choices=("ar", "bert"),
                default="ar",
                help="generative objective (default %(default)s)",
            ),
        ),
        "steps": (("--steps",), dict(type=int, default=None, help="optimizer steps")),
        "batch_size": (("--batch-size",), dict(type=int, default=None, help="batch size")),
        "lr": (("--lr",), dict(type=float, default=None, help="peak learning rate")),
        "out": (("--out",), dict(default=None, help="output directory")),
        "resume": (
            ("--resume",),
            dict(action="store_true", help="continue from the latest checkpoint in --out"),
        ),
        "checkpoint": (
            ("--checkpoint",),
            dict(
                default=None, help="checkpoint file, or a run directory for its latest checkpoint"
            ),
        ),
        "device": (
            ("--device",),
            dict(default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"),
        ),
        "seed": (("--seed",), dict(type=int, default=0, help="random seed (default 0)")),
    }
    for name in names:
        flags, kwargs = specs[name]
        if helps and name in helps:
            kwargs = {**kwargs, "help": helps[name]}
        parser.add_argument(*flags, **kwargs)


# ----------------------------------------------------------------------------- device, data


def pick_device(name: str | None):
    """``--device``: None means cuda when a GPU is visible, else cpu.

    Raises ``UsageError`` naming what to pass when the device named does not exist here.
    """
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device name ({e}); use cpu or cuda") from e
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise UsageError(f"--device {name!r} but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= n:
            raise UsageError(f"--device {name!r} but only {n} CUDA GPU(s) are visible")
    return device


def open_checkpoint(args: argparse.Namespace, *, source=None, device=None):
    """The preamble of the commands that read a model: ``--checkpoint`` -> model on a device.

    ``source`` replaces ``args.checkpoint`` (e.g. a run directory being resumed); ``device``
    defaults to ``pick_device(args.device)``. The objective is ``args.objective`` when set,
    else the checkpoint's own. Returns ``(path, model, palette, ckpt, objective)``; raises
    ``UsageError`` without a checkpoint or when it holds no palette.
    """
    from igpt.checkpoint import load_model, objective_of, resolve_checkpoint

    source = args.checkpoint if source is None else source
    if source is None:
        command = getattr(args, "command", None) or "this command"
        raise UsageError(f"igpt {command} needs --checkpoint FILE_OR_RUN_DIR")
    path = resolve_checkpoint(source)
    device = pick_device(getattr(args, "device", None)) if device is None else device
    model, palette, ckpt = load_model(path, device=device)
    if palette is None:
        raise UsageError(f"{path} holds no palette, so images cannot be tokenised")
    objective = getattr(args, "objective", None) or objective_of(ckpt)
    return path, model, palette, ckpt, objective


def labelled_splits(spec: str, limit: int | None = None, splits=("train", "test")) -> tuple:
    """The labelled ``ImageData`` of each split of ``--data spec``, the first ``limit`` each.

    Raises ``UsageError`` when a split has no labels (probes and classifiers need them).
    """
    import numpy as np

    from igpt.data import load_images

    out = []
    for split in splits:
        data = load_images(spec, split)
        if data.labels is None:
            raise UsageError(
                f"--data {spec} has no labels in its {split!r} split; this command needs labels"
            )
        out.append(data.subset(np.arange(min(limit, len(data)))) if limit else data)
    return tuple(out)
