"""Shared benchmark plumbing: timing, the environment row, JSON output and tables.

Every ``bench_*.py`` script exposes ``main(argv=None)``, runs the PyTorch baselines a user
would otherwise write in the same process, and writes one JSON file whose rows carry
``env()``: date, GPU or CPU, versions and git commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from igpt.reporting import format_table

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    """Where and with what a measurement was taken."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import igpt_kernels

        kernels_version = igpt_kernels.__version__
    except ImportError:
        kernels_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "igpt_kernels": kernels_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
    }


def time_ms(fn, *, warmup: int = 3, rep: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(rep):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def interleaved_ms(runs: dict, *, warmup: int = 1, rep: int = 5) -> dict:
    """Median wall ms of each ``runs[name] = (setup, fn)``, measured in turns: ``setup()``
    then ``fn()`` for each name, ``rep`` rounds, so that the machine drifting (other
    people's jobs, clocks) weighs on every side alike instead of on whichever ran last."""
    times = {name: [] for name in runs}
    for i in range(warmup + rep):
        for name, (setup, fn) in runs.items():
            setup()
            ms = wall_ms(fn)
            if i >= warmup:
                times[name].append(ms)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def wall_ms(fn) -> float:
    """Wall ms of one ``fn()``, the GPU's queue drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def peak_gib(fn) -> float | None:
    """Peak GPU memory allocated while ``fn()`` runs, in GiB (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


NO_GPU = 3  # igpt.bench reads this exit status as "skipped: needs a CUDA GPU"


def exit_without_gpu(name: str, dry_run: bool = False) -> None:
    """Leave with status NO_GPU and one line on stderr when a GPU-only script has none."""
    hint = " (--dry-run runs tiny shapes on the CPU)" if dry_run else ""
    print(f"bench_{name}: no CUDA GPU here, nothing measured{hint}", file=sys.stderr)
    raise SystemExit(NO_GPU)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --out and --quick."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON output")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    return p


def write(name: str, rows: list[dict], out: str) -> Path:
    """Write ``{"env": env(), "rows": rows}`` to OUT/NAME.json and return the path."""
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env(), "rows": rows}, indent=2))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats to 3 significant)."""
    return format_table(rows, columns, float_format=".3g")
