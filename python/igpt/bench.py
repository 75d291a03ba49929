"""The benchmark scripts of a source checkout, found and run (``igpt bench`` calls this).

The scripts live in ``benchmarks/bench_NAME.py`` beside the package sources (an editable
install, as ``make`` sets up); each compares a kernel or the whole model against the
PyTorch way in the same run and writes JSON under ``--out``. Each runs as its own Python
process, as ``python benchmarks/bench_NAME.py``, so its folder (with ``common.py``) is on
its import path without this process's ``sys.path`` changing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    """Names of the benchmarks found in the checkout (bench_NAME.py -> NAME)."""
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def run_benchmarks(names=None, *, out="benchmarks/results", quick: bool = False) -> None:
    """Run the benchmarks ``names`` (default: all) one after the other.

    Raises FileNotFoundError outside a source checkout, ValueError for an unknown name, and
    ``subprocess.CalledProcessError`` when a script fails (its own traceback is printed).
    """
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"igpt bench needs a source checkout: {BENCH_DIR} does not exist")
    names = list(names or available())
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {available()}")
    for name in names:
        log.info("running benchmark %s", name)
        argv = ["--out", str(out)] + (["--quick"] if quick else [])
        subprocess.run([sys.executable, str(BENCH_DIR / f"bench_{name}.py"), *argv], check=True)
