"""The ``igpt`` command: the table of sub-commands and the one place user errors are printed.

Each sub-command is a module of ``igpt.commands`` with ``add_arguments(parser)`` and
``run(args)``; ``COMMANDS`` maps the command's name to ``(module, one-line help)``. The
library underneath neither prints nor exits: a user's mistake arrives here as an exception
and leaves as one line on stderr (exit status 1), or as the traceback with ``-v`` (before or
after the sub-command). A user's mistakes are ``ValueError`` (with ``UsageError`` and the
library's errors for a bad file's content, which name the file), ``OSError`` (a path that is
missing, unreadable or not writable, a full disk) and running out of GPU memory; anything
else is a bug and keeps its traceback. A bad flag (a bad value, a count below one, a
non-finite number, a config its dataclass refuses, a device that is not here) is refused
while parsing, before anything is read, as one line with exit status 2; Ctrl-C is one line
with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from igpt.commands._common import (  # noqa: F401  (igpt.cli's names before igpt.commands)
    UsageError,
    add_common_arguments,
    pick_device,
    run_parse_checks,
)

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("igpt.commands.info", "print versions, devices and which kernel backends can run"),
    "bench": ("igpt.commands.bench", "run benchmarks against the PyTorch baselines"),
    "fit-palette": (
        "igpt.commands.fit_palette",
        "fit a k-means colour palette on a data set (.npy + PNG)",
    ),
    "prepare": (
        "igpt.commands.prepare",
        "tokenise a data set once into the token cache (streamed, parallel, resumable)",
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
    "export-hf": (
        "igpt.commands.export_hf",
        "write a checkpoint as a transformers ImageGPT directory (weights and palette)",
    ),
    "import-hf": (
        "igpt.commands.import_hf",
        "read a transformers ImageGPT directory into an igpt checkpoint file",
    ),
    "consolidate": (
        "igpt.commands.consolidate",
        "gather a sharded checkpoint (.dcp, from --fsdp) into one checkpoint file",
    ),
    "demo": ("igpt.commands.demo", "pretrain -> probe -> sample end to end on bundled digits"),
    "plan": ("igpt.commands.plan", "the fastest training plan that fits a GPU's memory"),
    "selftest": (
        "igpt.commands.selftest",
        "check every kernel here against PyTorch (forward and gradients); exit 1 on a failure",
    ),
}

USER_ERRORS = (ValueError, OSError)  # UsageError, FileNotFoundError, PermissionError among them


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse's own print the usage first)."""

    def error(self, message):
        """Exit with status 2 and one line: the flag, what is wrong, where the help is."""
        self.exit(2, f"{self.prog}: error: {message}  ({self.prog} -h lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``igpt`` parser with every sub-command of ``COMMANDS``."""
    from igpt import __version__

    parser = _Parser(
        prog="igpt",
        description="Image GPT: train, probe, fine-tune and sample on hand-written kernels.",
    )
    verbose = dict(action="store_true", help="debug logging, and tracebacks for user errors")
    parser.add_argument("-v", "--verbose", **verbose)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, _parser=p)
        # after the sub-command too; SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", default=argparse.SUPPRESS, **verbose)
        importlib.import_module(module).add_arguments(p)
    return parser


def user_error_line(e: BaseException) -> str | None:
    """The one line for an error a user caused (see the module docstring), None for a bug."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of GPU memory; lower --batch-size (or see igpt plan for what fits)"
    if not isinstance(e, USER_ERRORS):
        return None
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        # the OS's own errors: "[Errno 13] Permission denied: 'x'" says less than this
        if isinstance(e, FileExistsError) and os.path.isfile(e.filename):
            return f"cannot use {e.filename}: it is a file where a directory is needed"
        return f"cannot use {e.filename}: {e.strerror}; check the path and its permissions"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def main(argv=None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, turn user errors into a line."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the sub-command's parser, which knows the flags that were meant
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        run_parse_checks(args)
    except UsageError as e:
        if args.verbose:
            raise
        args._parser.error(str(e))
    try:
        importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"igpt {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        line = user_error_line(e)
        if line is None or args.verbose:
            raise  # a bug: its traceback is what a report needs
        # a user's mistake (a path, a flag's value, a file's content): the line says what to do
        raise SystemExit(f"igpt {args.command}: {line}  (-v shows the traceback)") from e
