"""Checkpoints under FSDP2: each rank's peak host memory while it saves and resumes, gathered
(``--checkpoint-format full``: one file gathered on rank 0) against sharded (``sharded``: a
``torch.distributed.checkpoint`` directory, each rank its shards).

Each measurement is one ``torchrun --nproc-per-node K`` launch of this script (``--one``) on
the CPU (gloo): every rank builds the trainer of ``igpt pretrain --fsdp``, takes one step
and then, its peak RSS reset (``/proc/self/clear_refs``), saves (phase ``save``); a second
launch builds the trainer with ``--resume`` from that checkpoint (phase ``resume``) and a
third builds it in an empty directory (phase ``fresh``: what a resume costs without any
checkpoint, the baseline of ``resume``). A row per rank: RSS before, the peak (VmHWM) and
the peak above the RSS before, in MiB, and the seconds the phase took.

    python benchmarks/bench_checkpoint.py                 # igpt-s at 16x16, 2 ranks
    python benchmarks/bench_checkpoint.py --model igpt-tiny --quick
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parser, table, write

COLUMNS = ["format", "phase", "rank", "rss_before_mib", "peak_mib", "peak_above_mib", "seconds",
           "checkpoint_mib"]  # fmt: skip
FORMATS = ("full", "sharded")


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Start VmHWM again from the RSS now (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def _config(args, out: Path, fmt: str, resume: bool, palette=None):
    from igpt.train import TrainConfig

    return TrainConfig(
        palette=palette,
        model=args.model,
        n_px=args.n_px,
        data="digits",
        steps=2,
        batch_size=2 * args.nproc,
        val_size=2,
        log_every=1,
        ckpt_every=1000,
        fsdp=True,
        device="cpu",
        checkpoint_format=fmt,
        out=str(out),
        progress=False,
        resume=resume,
        keep_checkpoints=0,
    )


def one(args) -> None:
    """One rank of one launch: measure ``args.phase`` and write its row."""
    import torch
    import torch.distributed as dist

    from igpt.train import Trainer

    torch.set_num_threads(1)
    out = Path(args.dir)
    fresh = args.phase == "fresh"
    if args.phase == "save":
        t = Trainer(_config(args, out, args.format, resume=False))
        t.model.train()
        t.train_step(0)
        t.step = 1
        t.plot()  # matplotlib imported before the measurement, not in it
    dist.barrier() if dist.is_initialized() else None
    _reset_peak()
    before, t0 = _status("VmRSS"), time.perf_counter()
    if args.phase == "save":
        t.save()
    else:
        target = out.parent / f"fresh_{args.format}" if fresh else out
        palette = str(out / "palette.npy") if fresh else None  # no fit in the measurement
        t = Trainer(_config(args, target, args.format, resume=not fresh, palette=palette))
    seconds = time.perf_counter() - t0
    row = {
        "format": args.format,
        "phase": args.phase,
        "rank": t.dist.rank,
        "rss_before_mib": before,
        "peak_mib": _status("VmHWM"),
        "peak_above_mib": _status("VmHWM") - before,
        "seconds": seconds,
        "step": t.step,
    }
    Path(args.rows, f"{args.format}_{args.phase}_{t.dist.rank}.json").write_text(json.dumps(row))
    t.close()


def _size_mib(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 2**20


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="igpt-s")
    p.add_argument("--n-px", type=int, default=16)
    p.add_argument("--world", dest="nproc", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse_hidden())
    p.add_argument("--phase", choices=("save", "resume", "fresh"))
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--dir")
    p.add_argument("--rows")
    args = p.parse_args(argv)
    if args.one:
        return one(args)
    if args.quick:
        args.model = "igpt-tiny"
    work = Path(tempfile.mkdtemp(prefix="igpt_bench_ckpt_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IGPT_CACHE": str(work / "cache")}
    rows = []
    try:
        for fmt in FORMATS:
            run = work / fmt
            for phase in ("save", "resume", "fresh"):
                rows_dir = work / "rows"
                rows_dir.mkdir(exist_ok=True)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                cmd += ["--nproc-per-node", str(args.nproc), __file__, "--one"]
                cmd += ["--phase", phase, "--format", fmt, "--dir", str(run)]
                cmd += ["--rows", str(rows_dir), "--model", args.model, "--n-px", str(args.n_px)]
                cmd += ["--world", str(args.nproc)]
                subprocess.run(cmd, check=True, env=env)
                ckpt = next(iter(sorted(run.glob("ckpt_*"))), None)
                for f in sorted(rows_dir.glob("*.json")):
                    row = json.loads(f.read_text())
                    row["checkpoint_mib"] = _size_mib(ckpt) if ckpt is not None else None
                    rows.append({**row, "model": args.model, "n_px": args.n_px})
                    f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, COLUMNS))
    print(f"wrote {write('checkpoint', rows, args.out)}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
