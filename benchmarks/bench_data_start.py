"""A second start of the token cache on a large folder: wall time and ``stat`` calls.

A ``folder:`` of N tiny PNGs (default 100,000, 8x8, in 100 class folders, about ImageNet's
files per folder; made once in --data-dir) is prepared at n_px 8, each step one fresh
process (``--one``) timing ``igpt.data.prepare_tokens`` alone (no interpreter start) and
counting its ``os.stat`` calls:

- ``first``: the build (header scan, decode, quantize; 2 workers);
- ``second``: the same call again: the entry found through the listed folders' stamps;
- ``verify``: again with ``verify=True``: every file listed and stat'ed, as every start did
  before issue 33;
- with ``--old TREE`` (a checkout of the code before, e.g. ``git archive ab0b553 python |
  tar -x -C TREE``), ``old first`` and ``old second`` run that code the same way: its
  second start fingerprinted every file.

The page cache is warm (the folder was just listed): on a network file system every
``stat`` costs a round trip, which is what the counts stand for.

    python benchmarks/bench_data_start.py [--n 100000] [--old /tmp/igpt_old]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import parser, table, write

COLUMNS = ["N", "code", "start", "seconds", "stat_calls", "images", "built"]
CLASSES = 100


def make_folder(root: Path, n: int) -> Path:
    """N random 8x8 PNGs in CLASSES class folders under root/folder_N (kept if there)."""
    from PIL import Image

    folder = root / f"folder_{n}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (folder / f"c{c:03d}").mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"c{i % CLASSES:03d}" / f"{i:07d}.png")
    old = time.time() - 60  # settled folders, as a data set is: their stamps can be kept
    for d in [folder, *folder.iterdir()]:
        os.utime(d, (old, old))
    (folder / ".complete").touch()
    return folder


def one(mode: str, spec: str, palette_path: str, cache: str) -> None:
    """One start in this process: time prepare_tokens, count os.stat; print a JSON line."""
    from igpt.data import prepare_tokens
    from igpt.palette import Palette

    palette = Palette.load(palette_path)
    calls = [0]
    real = os.stat

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    kwargs = {"verify": True} if mode == "verify" else {}
    os.stat = counting
    start = time.perf_counter()
    info = prepare_tokens(spec, "all", palette, 8, cache_dir=cache, workers=2, **kwargs)
    seconds = time.perf_counter() - start
    os.stat = real
    out = {"seconds": seconds, "stat_calls": calls[0], "images": info.images}
    print(json.dumps({**out, "built": info.built}))


def measure(mode: str, spec: str, palette: Path, cache: Path, pythonpath: str) -> dict:
    """Run ``one`` in a fresh process with ``pythonpath`` first; its JSON line."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--one", mode, spec, str(palette), str(cache)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    """Make the folder, run the starts, print a table, write JSON."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="files in the folder")
    p.add_argument("--data-dir", default="/tmp/igpt_bench_start", help="where the folder goes")
    p.add_argument("--old", default=None, help="a tree of the code before, to compare with")
    p.add_argument("--one", nargs=4, metavar=("MODE", "SPEC", "PALETTE", "CACHE"))
    args = p.parse_args(argv)
    if args.one:
        return one(*args.one)
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    n = 2_000 if args.quick else args.n
    folder = make_folder(root, n)
    palette = root / "palette.npy"
    from igpt.palette import Palette

    Palette(np.random.default_rng(0).uniform(0, 255, (16, 3)).astype(np.float32)).save(palette)
    ours = os.pathsep.join(p for p in sys.path if p)
    runs = [("this", m, ours) for m in ("first", "second", "verify", "second")]
    if args.old:
        old_path = os.pathsep.join([str(Path(args.old) / "python"), ours])
        runs += [("before", m, old_path) for m in ("first", "second")]
    rows = []
    for code, mode, path in runs:
        cache = root / f"cache_{code}"
        if mode == "first":
            shutil.rmtree(cache, ignore_errors=True)
        r = measure(mode, f"folder:{folder}", palette, cache, path)
        rows.append({"N": n, "code": code, "start": mode, **r})
        print(table(rows[-1:], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    print("wrote", write("bench_data_start", rows, args.out))


if __name__ == "__main__":
    main()
