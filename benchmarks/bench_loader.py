"""Pre-training with ``--augment crop`` on a folder: step time with DataLoader workers against
inline, and peak memory against the folder's size, lazy reads against the whole split.

A ``folder:`` of N 256x256 JPEGs (``bench_data.make_jpegs``, made once in --data-dir).
Each row is one fresh process (``--one``, one thread) that builds ``igpt.train.Trainer``
(igpt-tiny cut to 2 layers of width 64, so that the model's step and the batch's making
weigh alike: ``--augment crop`` at n_px 16, global batch 32, a fixed 512-colour palette),
takes step 0,
then times ``--steps`` steps: the median wall ms of a step, and the peak RSS of the process
(and, with workers, the largest worker's), in MiB. Paths:

- ``lazy``: today's path, the split opened lazily (``load_images(spec, lazy=True)``) and
  read a batch's rows at a time; ``workers`` K > 0 makes the batches ahead in K processes
  (``--dataloader-num-workers``);
- ``in-memory``: the path it replaced, the whole split decoded first (``load_images(spec)``
  passed to the trainer as ``data``).

    python benchmarks/bench_loader.py --quick      # 300 and 1,200 JPEGs
    python benchmarks/bench_loader.py              # 600 and 2,400 JPEGs
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_data import make_jpegs
from common import parser, table, write

COLUMNS = ["N", "path", "workers", "step_ms", "peak_rss_mib", "worker_peak_rss_mib"]


def one(args) -> None:
    """One measurement: print its row as JSON."""
    import numpy as np
    import torch

    from igpt.data import load_images
    from igpt.palette import Palette
    from igpt.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="igpt_bench_loader_"))
    palette = out / "palette.npy"
    rng = np.random.default_rng(0)
    Palette(torch.from_numpy(rng.uniform(0, 255, (512, 3)).astype(np.float32))).save(palette)
    cfg = TrainConfig(
        model="igpt-tiny",
        model_overrides={"n_layer": 2, "n_embd": 64, "n_head": 2},
        n_px=16,
        data=args.data,
        augment="crop",
        steps=args.steps + 1,
        batch_size=32,
        val_size=16,
        palette=str(palette),
        out=str(out / "run"),
        progress=False,
        dataloader_num_workers=args.workers,
    )
    data = load_images(args.data) if args.path == "in-memory" else None
    t = Trainer(cfg, data=data)
    t.model.train()
    t.train_step(0)
    times = []
    for s in range(1, args.steps + 1):
        start = time.perf_counter()
        t.train_step(s)
        times.append((time.perf_counter() - start) * 1e3)
    t.close()
    row = {
        "N": args.n,
        "path": args.path,
        "workers": args.workers,
        "step_ms": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if args.workers
        else None,
    }
    print(json.dumps(row))


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/igpt_bench_data")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--one", action="store_true")
    p.add_argument("--data")
    p.add_argument("--n", type=int)
    p.add_argument("--path", choices=("lazy", "in-memory"))
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    if args.one:
        return one(args)
    small, large = (300, 1200) if args.quick else (600, 2400)
    root = Path(args.data_dir)
    plan = [(small, "lazy", 0), (small, "in-memory", 0), (large, "lazy", 0)]
    plan += [(large, "in-memory", 0), (large, "lazy", 2), (large, "lazy", 0)]
    rows = []
    for n, path, workers in plan:
        spec = f"folder:{make_jpegs(root, n)}"
        cmd = [sys.executable, __file__, "--one", "--data", spec, "--n", str(n)]
        cmd += ["--path", path, "--workers", str(workers), "--steps", str(args.steps)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, COLUMNS))
    print(f"wrote {write('loader', rows, args.out)}")


if __name__ == "__main__":
    main()
