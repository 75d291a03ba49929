"""What several ``igpt`` commands share: dataclass flags, the device, the checkpoint preamble.

    add_common_arguments(parser, "checkpoint", "data", "device")   # flags with one meaning
    dataclass_arguments(parser, TrainConfig, skip=("model_overrides",))
    cfg = config_from_args(TrainConfig, args, progress=not args.no_progress)
    saved = run_settings(args, "runs/x/config.json", TrainConfig, section="train")  # --resume
    parser.add_argument("--n", type=count(1))          # a hand-written flag, checked
    device = pick_device(args.device)
    path, model, palette, ckpt, objective = open_checkpoint(args, device=device)
    train, test = labelled_splits(args.data, args.limit)      # ImageData, decoded
    train, test = token_splits(args.data, palette, 32, args.limit)   # the token cache

A user's mistake raises ``UsageError`` (a ``ValueError``); ``igpt.cli.main`` prints it as one
line, or the traceback with ``-v``. Odd values are refused while parsing, before anything is
read: ``count``/``number`` are the ``type=`` of hand-written flags, float fields of a config
take finite numbers only, and ``dataclass_arguments`` builds the whole config right after
parsing (``run_parse_checks``), so its ``__post_init__`` speaks for each of its flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path

__all__ = [
    "UsageError",
    "count",
    "number",
    "run_parse_checks",
    "add_common_arguments",
    "dataclass_arguments",
    "config_from_args",
    "given_flags",
    "run_settings",
    "Given",
    "GivenFlag",
    "GivenTrue",
    "pick_device",
    "open_checkpoint",
    "labelled_splits",
    "token_splits",
    "read_palette",
    "int_list",
    "int_items",
    "flat",
]


class UsageError(ValueError):
    """A command given something it cannot use; the message says what to pass instead."""


# ----------------------------------------------------------------------------- checked types


def count(least: int = 1, *, none: str | None = None):
    """``type=`` of an int flag that must be ``>= least``: ``count(1)`` for sizes and steps.

    ``none`` names a word that stands for None (e.g. "none" for "skip it")."""

    def parse(text):
        if none is not None and str(text).lower() == none:
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return value

    parse.__name__ = "int"  # argparse's own messages say "invalid int value"
    return parse


def number(*, above: float | None = None, least: float | None = None, most: float | None = None):
    """``type=`` of a float flag: finite, and ``> above`` / ``>= least`` / ``<= most`` if given."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= above is not None and not value > above
        bad |= least is not None and not value >= least
        bad |= most is not None and not value <= most
        if bad:
            limits = ((">", above), (">=", least), ("<=", most))
            bounds = [f"{op} {v:g}" for op, v in limits if v is not None]
            what = " ".join(["a finite number", " and ".join(bounds)]).strip()
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def run_parse_checks(args: argparse.Namespace) -> None:
    """The checks that need every flag at once, run right after parsing: the configs of
    ``dataclass_arguments`` and ``--device``. Raises ``UsageError`` naming the flag."""
    for check in getattr(args, "_parse_checks", ()):
        check(args)
    if getattr(args, "device", None) is not None:
        pick_device(args.device)


def _config_check(cls, flags: dict[str, str]):
    """A parse check that builds ``cls`` from the parsed flags, so that its ``__post_init__``
    refuses odd values before a command reads a file; the error names the flag."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    def check(args):
        # the fields with flags, and hand-written flags of other fields (e.g. --out for
        # out_dir); a None there means "the command decides later" (e.g. the objective)
        values = {
            name: _config_value(getattr(args, name))
            for name in names
            if hasattr(args, name) and (name in flags or getattr(args, name) is not None)
        }
        try:
            cls(**values)
        except (ValueError, TypeError) as e:
            text = str(e)
            named = [(m.start(), f) for f, flag in flags.items() if (m := _word(f).search(text))]
            flag = flags[min(named)[1]] if named else None
            where = f"argument {flag}: " if flag and not _word(flag).search(text) else ""
            raise UsageError(f"{where}{text}") from e

    return check


def _word(name: str):
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


# ----------------------------------------------------------------------------- given flags


def _mark_given(namespace, dest: str) -> None:
    # a new frozenset each time: argparse copies a sub-command's namespace into the parent's
    namespace._given = frozenset(getattr(namespace, "_given", ())) | {dest}


class Given(argparse.Action):
    """``action=`` of a store flag that also records that it was given (``given_flags``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class GivenFlag(argparse.BooleanOptionalAction):
    """``--flag/--no-flag`` that also records that it was given (``given_flags``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest)


class GivenTrue(argparse.Action):
    """``store_true`` that also records that it was given (``given_flags``)."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(
            option_strings, dest, nargs=0, default=default, required=required, help=help
        )

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        _mark_given(namespace, self.dest)


def given_flags(args: argparse.Namespace) -> frozenset:
    """The dests of the flags typed on the command line (as opposed to their defaults):
    those of ``dataclass_arguments`` and of flags added with ``Given``/``GivenFlag``/
    ``GivenTrue``."""
    return frozenset(getattr(args, "_given", ()))


def run_settings(args: argparse.Namespace, path, names, *, section: str, skip=()) -> dict:
    """For ``--resume``: the settings a run recorded in its ``path`` (a JSON file, e.g. the
    run's ``config.json``, under ``section``) for ``names`` (field names, or a dataclass),
    less those whose flag was given (those override) and ``skip``; {} when the file or its
    section does not exist (a run that has not started, an older version's record). A
    UsageError when the file is not JSON."""
    import json

    path = Path(path)
    if not path.is_file():
        return {}
    if dataclasses.is_dataclass(names):
        names = [f.name for f in dataclasses.fields(names) if f.init]
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"--resume: {path} is not a run's record ({e}); use another --out") from e
    # a record of an older version may lack the section: the flags then say it all
    saved = record.get(section) if isinstance(record, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    given = given_flags(args) | set(skip)
    return {k: _config_value(saved[k]) for k in names if k in saved and k not in given}


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
        return {"action": GivenFlag}
    if tp is float:
        return {"type": number()}
    if tp in (int, str):
        return {"type": tp}
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        return {"type": Path}
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        item = number() if items and items[0] is float else items[0] if items else None
        if len(items) == 2 and items[1] is Ellipsis and items[0] in (int, float, str):
            return {"type": item, "nargs": "+"}
        if items and all(i is items[0] for i in items) and items[0] in (int, float, str):
            return {"type": item, "nargs": len(items)}
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
    item type: ``nargs``; float flags take finite numbers only), the default from the field, so
    defaults are stated once. Right after parsing, ``run_parse_checks`` builds ``cls`` from
    these flags (the other fields at their defaults), so that the dataclass's own checks
    refuse odd values, naming the flag, before a command reads anything. Field metadata may
    give ``help`` (shown with the default), ``choices``, ``flag`` (another flag name, e.g.
    ``--checkpoint`` for ``init_from``), ``metavar``, ``default_text`` (how to show a None
    default, e.g. "one epoch") and ``min`` (the least value of an int field). Bools become
    ``--flag/--no-flag``. ``skip`` names fields to leave out; ``helps`` replaces some fields'
    help text (name -> text).
    """
    hints = typing.get_type_hints(cls)
    flags = {}
    unknown = set(skip) | set(helps or {})
    unknown -= {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"skip/helps name fields {sorted(unknown)} that {cls.__name__} lacks")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = f.metadata
        kwargs = _flag_kwargs(f.name, hints[f.name])
        if "min" in meta and kwargs.get("type") is int:
            kwargs["type"] = count(meta["min"])
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
        kwargs.setdefault("action", Given)  # records the flags typed (--resume keeps the rest)
        parser.add_argument(flag, dest=f.name, default=default, help=text, **kwargs)
        flags[f.name] = flag
    checks = [*(parser.get_default("_parse_checks") or []), _config_check(cls, flags)]
    parser.set_defaults(_parse_checks=checks)


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
    return cls(**{k: _config_value(v) for k, v in values.items()})


def _config_value(v):
    return tuple(v) if isinstance(v, list) else v  # argparse gives lists for nargs


def int_list(text, name: str = "value", *, least: int | None = None) -> list[int]:
    """``"4,25 400"`` (or a list of such strings from ``nargs="+"``) -> [4, 25, 400].

    With ``least``, every value must be ``>= least``. Raises ``UsageError`` naming ``name``.
    """
    if isinstance(text, (list, tuple)):
        text = " ".join(str(t) for t in text)
    try:
        values = [int(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"{name} expects integers like 4,25,400, got {text!r}") from None
    if not values:
        raise UsageError(f"{name} expects integers like 4,25,400, got {text!r}")
    if least is not None and min(values) < least:
        raise UsageError(f"{name} expects integers >= {least}, got {text!r}")
    return values


def int_items(name: str, *, least: int | None = None, none: str | None = None):
    """``type=`` of an ``nargs="+"`` flag of integer lists like ``4,25 400``: each item is
    checked while parsing (``int_list``); ``none`` is a word that stands for no values."""

    def parse(text):
        if none is not None and text.lower() == none:
            return []
        try:
            return int_list(text, name, least=least)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name} ")) from None

    parse.__name__ = "int list"
    return parse


def flat(items) -> list | None:
    """The values of an ``nargs="+"`` flag of ``int_items``, as one list (None stays None)."""
    return None if items is None else [v for item in items for v in item]


# ----------------------------------------------------------------------------- shared flags


def _model_names() -> tuple:
    from igpt.config import SIZES

    return tuple(SIZES)


def _data_help() -> str:
    from igpt.data.sources import data_help

    return data_help()  # every kind of igpt.data.SOURCES, as it is when the parser is built


def add_common_arguments(
    parser: argparse.ArgumentParser, *names: str, helps: dict | None = None
) -> None:
    """Add the flags shared across commands (the table below), by name, with one meaning each.

    ``helps`` replaces the help text of some of them (name -> text) where a command gives
    the flag a more specific role."""
    specs = {
        "model": (
            ("--model",),
            dict(
                default="igpt-tiny",
                choices=_model_names(),  # an unknown size exits 2 while parsing
                help="named size: igpt-tiny, igpt-s, igpt-m, igpt-l, igpt-xl (default %(default)s)",
            ),
        ),
        "n_px": (("--n-px",), dict(type=count(1), default=None, help="image side in pixels")),
        "data": (
            ("--data",),
            dict(
                default="digits",
                help=_data_help() if "data" in names else "",
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
        "steps": (("--steps",), dict(type=count(1), default=None, help="optimizer steps")),
        "batch_size": (("--batch-size",), dict(type=count(1), default=None, help="batch size")),
        "lr": (("--lr",), dict(type=number(above=0), default=None, help="peak learning rate")),
        "out": (("--out",), dict(default=None, help="output directory")),
        "resume": (
            ("--resume",),
            dict(action="store_true", help="continue from the latest checkpoint in --out"),
        ),
        "checkpoint": (
            ("--checkpoint",),
            dict(
                default=None,
                help="checkpoint file, a run directory for its latest checkpoint, or a "
                "transformers ImageGPT directory",
            ),
        ),
        "device": (
            ("--device",),
            dict(default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"),
        ),
        "seed": (("--seed",), dict(type=count(0), default=0, help="random seed (default 0)")),
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
    from igpt.training import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def open_checkpoint(args: argparse.Namespace, *, source=None, device=None):
    """The preamble of the commands that read a model: ``--checkpoint`` -> model on a device.

    ``source`` replaces ``args.checkpoint`` (e.g. a run directory being resumed); ``device``
    defaults to ``pick_device(args.device)``. The objective is ``args.objective`` when set,
    else the checkpoint's own. Returns ``(path, model, palette, ckpt, objective)``; raises
    ``UsageError`` without a checkpoint or when it holds no palette. A transformers
    ImageGPT directory is a checkpoint like any other (``igpt.checkpoint.resolve_checkpoint``).
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
        how = " (a transformers directory keeps it in preprocessor_config.json)" * path.is_dir()
        raise UsageError(f"{path} holds no palette, so images cannot be tokenised{how}")
    objective = getattr(args, "objective", None) or objective_of(ckpt)
    return path, model, palette, ckpt, objective


def read_palette(path, flag: str = "--palette"):
    """``Palette.load(path)``, or a ``UsageError`` naming ``flag`` and the file when it is
    not a palette .npy (a missing file stays a ``FileNotFoundError``)."""
    from igpt.palette import Palette

    try:
        return Palette.load(path)
    except (ValueError, TypeError, EOFError) as e:
        raise UsageError(
            f"{flag} {path} is not a palette: it must be a (K, 3) .npy of 0..255 RGB "
            f"(igpt fit-palette writes one) ({e})"
        ) from e


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


def token_splits(
    spec: str,
    palette,
    n_px: int,
    limit: int | None = None,
    *,
    splits=("train", "test"),
    cache_dir=None,
    progress: bool | None = None,
) -> tuple:
    """The labelled ``TokenSplit`` of each split of ``--data spec`` from the token cache.

    ``igpt.data.cached_tokens``: the entry ``igpt prepare`` and ``igpt pretrain`` use (same
    key), so a prepared split is only mapped, never decoded; an unprepared one is tokenised
    into it on first use, with its progress bar. The tokens are a read-only uint16 memmap
    (N, n_px * n_px); ``limit`` keeps its first rows, a view, not a copy. Raises
    ``UsageError`` when a split has no labels (probes and classifiers need them).
    """
    from igpt.data import cached_tokens
    from igpt.evaluation import TokenSplit

    out = []
    for split in splits:
        tokens, labels = cached_tokens(
            spec, split, palette, n_px, cache_dir=cache_dir, progress=progress
        )
        if labels is None:
            raise UsageError(
                f"--data {spec} has no labels in its {split!r} split; this command needs labels"
            )
        out.append(
            TokenSplit(tokens[:limit], labels[:limit]) if limit else TokenSplit(tokens, labels)
        )
    return tuple(out)
