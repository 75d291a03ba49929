"""``igpt bench [NAME ...]``: run the benchmark scripts against the PyTorch baselines."""

from __future__ import annotations

import subprocess


def add_arguments(parser) -> None:
    """Arguments of ``igpt bench``."""
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON output")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes on the CPU, to check the plumbing (no numbers to keep)",
    )


def run(args) -> None:
    """``igpt bench``: each benchmark in turn; a failing one stops the run with its status."""
    from igpt.bench import run_benchmarks

    try:
        outcome = run_benchmarks(args.names, out=args.out, quick=args.quick, dry_run=args.dry_run)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"igpt bench: {e.cmd[1]} failed with exit status {e.returncode}") from e
    for name, what in outcome.items():
        print(f"{name}: {what}")
    print(f"results in {args.out}")
