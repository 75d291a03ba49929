"""The ``igpt`` command. Each sub-command lives in the module that does the work.

A command module defines ``add_arguments(parser)`` and ``run(args)``; ``COMMANDS`` maps the
command's name to ``(module, one-line help)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("igpt.cli", "print versions, devices and which kernel backends can run"),
    "bench": ("igpt.bench", "run benchmarks against the PyTorch baselines"),
    "fit-palette": ("igpt.palette", "fit a k-means colour palette on a data set (.npy + PNG)"),
    "pretrain": ("igpt.train", "pre-train an iGPT model (AR or BERT objective)"),
    "probe": ("igpt.probe", "linear probes of every layer, low-data probes and baselines"),
    "finetune": ("igpt.finetune", "fine-tune a checkpoint as a classifier (L_GEN + L_CLF)"),
    "sample": ("igpt.sample", "sample or complete images from an AR checkpoint into a PNG grid"),
    "demo": ("igpt.demo", "pretrain -> probe -> sample end to end on bundled digits"),
}


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


def pick_device(name: str | None):
    """``--device``: None means cuda when a GPU is visible, else cpu. Exits with a message
    that says what to do when the device named does not exist here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name!r} is not a device name ({e}); use cpu or cuda") from e
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise SystemExit(f"--device {name!r} but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= n:
            raise SystemExit(f"--device {name!r} but only {n} CUDA GPU(s) are visible")
    return device


def build_parser() -> argparse.ArgumentParser:
    from igpt import __version__

    parser = argparse.ArgumentParser(
        prog="igpt",
        description="Image GPT: train, probe, fine-tune and sample on hand-written kernels.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``igpt info`` (none)."""


def run(args) -> None:
    """``igpt info``: what is installed and which backend each op's "auto" picks here."""
    import platform

    import torch

    import igpt
    from igpt_kernels import palette
    from igpt_kernels._triton import HAS_TRITON

    cuda = torch.cuda.is_available()
    pixels = torch.zeros(1, 3, dtype=torch.uint8)
    cpu_quantize = palette._compiled_unavailable("cpu", pixels)
    if cuda:
        gpu_quantize = palette._compiled_unavailable("cuda", pixels.cuda())
        gpu_ops = "Triton kernels" if HAS_TRITON else "PyTorch reference (Triton missing)"
    rows = [
        ("igpt", igpt.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", "installed" if HAS_TRITON else "not installed"),
        ("gpu", torch.cuda.get_device_name() if cuda else "none"),
        ("attention, ln_mlp on CPU", "PyTorch reference"),
        ("quantize on CPU", "C++ kernel" if cpu_quantize is None else f"reference: {cpu_quantize}"),
        ("quantizer module", palette.extension_status()["summary"]),
    ]
    if cuda:
        rows += [
            ("attention, ln_mlp on GPU", gpu_ops),
            (
                "quantize on GPU",
                "CUDA kernel" if gpu_quantize is None else f"reference: {gpu_quantize}",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}: {value}")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        importlib.import_module(args._module).run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if args.verbose:
            raise
        # a user's mistake (a path, a flag's value): the message says what to do
        raise SystemExit(f"igpt {args.command}: {e}  (-v shows the traceback)") from e
