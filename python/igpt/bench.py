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


NO_GPU = 3  # a script's exit status when it needs a CUDA GPU and none is here (common.py)


def takes_dry_run(name: str) -> bool:
    """Whether ``bench_NAME.py`` has a ``--dry-run`` (tiny CPU shapes, plumbing only)."""
    return '"--dry-run"' in (BENCH_DIR / f"bench_{name}.py").read_text()


def run_benchmarks(names=None, *, out="benchmarks/results", quick=False, dry_run=False) -> dict:
    """Run the benchmarks ``names`` (default: all) one after the other.

    ``dry_run`` passes ``--dry-run`` (tiny CPU shapes) to the scripts that take it; asked
    of one that does not, or with none named, the others are left out. Returns
    ``{name: "ran" | "skipped: needs a CUDA GPU"}``. Raises FileNotFoundError outside a
    source checkout, ValueError for an unknown name, a ``--dry-run`` that a named script
    lacks, or when nothing could run (every script asked for needs a GPU), and
    ``subprocess.CalledProcessError`` when a script fails (its own traceback is printed).
    """
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"igpt bench needs a source checkout: {BENCH_DIR} does not exist")
    named = list(names or [])
    unknown = sorted(set(named) - set(available()))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {available()}")
    if dry_run:
        lacking = [n for n in named if not takes_dry_run(n)]
        if lacking:
            with_it = [n for n in available() if takes_dry_run(n)]
            raise ValueError(f"--dry-run: {lacking} have none; these do: {with_it}")
    todo = named or [n for n in available() if not dry_run or takes_dry_run(n)]
    outcome = {}
    for name in todo:
        log.info("running benchmark %s", name)
        argv = ["--out", str(out)] + (["--quick"] if quick else [])
        argv += ["--dry-run"] if dry_run else []
        script = str(BENCH_DIR / f"bench_{name}.py")
        done = subprocess.run([sys.executable, script, *argv])
        if done.returncode == NO_GPU:
            outcome[name] = "skipped: needs a CUDA GPU"
        elif done.returncode:
            raise subprocess.CalledProcessError(done.returncode, [sys.executable, script, *argv])
        else:
            outcome[name] = "ran"
    if outcome and all(v != "ran" for v in outcome.values()):
        hint = [n for n in outcome if takes_dry_run(n)]
        raise ValueError(
            f"nothing ran: every benchmark asked for needs a CUDA GPU ({', '.join(outcome)})"
            + (f"; --dry-run runs {', '.join(hint)} on tiny CPU shapes" if hint else "")
        )
    return outcome
