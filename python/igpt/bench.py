"""``igpt bench [NAME ...]``: run the benchmark scripts of a source checkout.

The scripts live in ``benchmarks/bench_NAME.py`` beside the package sources (an editable
install, as ``make`` sets up); each compares a kernel or the whole model against the
PyTorch way in the same run and writes JSON under ``--out``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    """Names of the benchmarks found in the checkout (bench_NAME.py -> NAME)."""
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON output")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")


def run(args) -> None:
    if not BENCH_DIR.is_dir():
        raise SystemExit(f"igpt bench needs a source checkout: {BENCH_DIR} does not exist")
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {available()}")
    sys.path.insert(0, str(BENCH_DIR))  # the scripts share benchmarks/common.py
    for name in names:
        spec = importlib.util.spec_from_file_location(
            f"bench_{name}", BENCH_DIR / f"bench_{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        argv = ["--out", args.out] + (["--quick"] if args.quick else [])
        log.info("running benchmark %s", name)
        module.main(argv)
