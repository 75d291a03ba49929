"""The ``igpt`` command: the table of sub-commands and the one place user errors are printed.

Each sub-command is a module of ``igpt.commands`` with ``add_arguments(parser)`` and
``run(args)``; ``COMMANDS`` maps the command's name to ``(module, one-line help)``. The
library underneath neither prints nor exits: a user's mistake arrives here as an exception
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``, ``UsageError``) and leaves as one
line on stderr, or as the traceback with ``-v`` (before or after the sub-command).
"""

from __future__ import annotations

import argparse
import importlib
import logging

from igpt.commands._common import (  # noqa: F401  (igpt.cli's names before igpt.commands)
    UsageError,
    add_common_arguments,
    pick_device,
)

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("igpt.commands.info", "print versions, devices and which kernel backends can run"),
    "bench": ("igpt.commands.bench", "run benchmarks against the PyTorch baselines"),
    "fit-palette": (
        "igpt.commands.fit_palette",
        "fit a k-means colour palette on a data set (.npy + PNG)",
    ),
    "pretrain": ("igpt.commands.pretrain", "pre-train an iGPT model (AR or BERT objective)"),
    "probe": (
        "igpt.commands.probe",
        "linear probes of every layer, low-data probes and baselines",
    ),
    "finetune": (
        "igpt.commands.finetune",
        "fine-tune a checkpoint as a classifier (L_GEN + L_CLF)",
    ),
    "sample": (
        "igpt.commands.sample",
        "sample or complete images from an AR checkpoint into a PNG grid",
    ),
    "demo": ("igpt.commands.demo", "pretrain -> probe -> sample end to end on bundled digits"),
    "plan": ("igpt.commands.plan", "the fastest training plan that fits a GPU's memory"),
}

USER_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    """The ``igpt`` parser with every sub-command of ``COMMANDS``."""
    from igpt import __version__

    parser = argparse.ArgumentParser(
        prog="igpt",
        description="Image GPT: train, probe, fine-tune and sample on hand-written kernels.",
    )
    verbose = dict(action="store_true", help="debug logging, and tracebacks for user errors")
    parser.add_argument("-v", "--verbose", **verbose)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        # after the sub-command too; SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", default=argparse.SUPPRESS, **verbose)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, turn user errors into a line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        importlib.import_module(args._module).run(args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        # a user's mistake (a path, a flag's value): the message says what to do
        raise SystemExit(f"igpt {args.command}: {e}  (-v shows the traceback)") from e
