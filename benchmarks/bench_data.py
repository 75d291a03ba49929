"""Tokenising a data set into the token cache: wall time, images/s and peak memory against N.

Two synthetic sets, made once (kept in --data-dir, default /tmp/igpt_bench_data):

- a ``folder:`` of N 256x256 JPEGs in 10 class folders (smooth colour fields with noise, so
  that they decode like photographs), tokenised at n_px 32;
- an ``npz:`` of N 64x64 images (``numpy.savez`` layout, written a block at a time),
  tokenised at n_px 64.

Each measurement is one fresh process (``--one``) building a fresh cache entry of split
"all"; this script samples the memory of that process and all its children every 20 ms
(``/proc``) and reports the peak of their sum: RSS, as the issue measured it, and PSS
(forked workers share pages with their parent, which RSS counts once per process), and the
CPU seconds of the process and of its workers (where the work went). Rows:

- ``stream wK``: ``igpt.data.cached_tokens`` with K worker processes (the streaming path);
- ``in-memory``: the token cache as it was before it streamed (the whole split decoded by
  ``load_images``, tokenised into int64, then uint16 bytes, then written), copied below, at
  the sizes it survives (``--old-max`` images).

    python benchmarks/bench_data.py --quick        # about 2 minutes on 2 busy cores
    python benchmarks/bench_data.py                # npz 4k/32k, JPEGs 600/2400 (+ --large)

Goals (issue 24, 2 cores): peak at 32,000 npz images within 15% of the peak at 4,000 (and
2,400 vs 600 JPEGs); 2 workers >= 1.7x one worker's images/s on the JPEG folder. One and
two workers run ``--repeat`` times in turns (w1, w2, w1, w2, ...): the worker ratio is the
median of the runs' ratios, since one run's ratio moved between 1.3x and 2.1x on this VM.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from common import parser, table, write

COLUMNS = ["set", "N", "n_px", "path", "run", "seconds", "images_per_s", "cpu_main_s",
           "cpu_workers_s", "peak_rss_mib", "peak_pss_mib"]  # fmt: skip


# ----------------------------------------------------------------------------- data sets


def _smooth_images(n: int, side: int, seed: int) -> np.ndarray:
    """n uint8 (side, side, 3) images: bilinear colour fields plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)
    corners = rng.uniform(0, 255, (n, 4, 3)).astype(np.float32)
    top = corners[:, 0, None] * (1 - t[None, :, None]) + corners[:, 1, None] * t[None, :, None]
    bot = corners[:, 2, None] * (1 - t[None, :, None]) + corners[:, 3, None] * t[None, :, None]
    img = top[:, None] * (1 - t[None, :, None, None]) + bot[:, None] * t[None, :, None, None]
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpegs(root: Path, n: int) -> Path:
    """A folder of n 256x256 JPEGs in 10 class folders (made once)."""
    from PIL import Image

    folder = root / f"jpeg_{n}"
    if (folder / "done").exists():
        return folder
    for start in range(0, n, 100):
        images = _smooth_images(min(100, n - start), 256, seed=start)
        for j, img in enumerate(images):
            cls = folder / f"c{(start + j) % 10}"
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(cls / f"{start + j:07d}.jpg", quality=90)
    (folder / "done").touch()
    return folder


def make_npz(root: Path, n: int, side: int = 64) -> Path:
    """An uncompressed .npz (numpy.savez's layout) of n side x side images, written a block
    at a time so that making it needs no more memory than reading it."""
    path = root / f"npz_{n}.npz"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, side, side, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, 1000):
                f.write(_smooth_images(min(1000, n - start), side, seed=start).tobytes())
        buf = io.BytesIO()
        np.save(buf, np.arange(n) % 10)
        zf.writestr("labels.npy", buf.getvalue())
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- one run


def old_cached_tokens(spec: str, palette, n_px: int, cache_dir: Path) -> int:
    """The token cache before it streamed (igpt.data.cached_tokens up to this change): the
    whole split in memory, int64 tokens, a uint16 copy, its bytes, then the files."""
    from igpt._io import atomic_write_bytes
    from igpt.data import load_images, tokenize

    data = load_images(spec, "all")
    tokens = tokenize(data.images, palette, n_px)
    folder = cache_dir / "tokens" / "old"
    folder.mkdir(parents=True, exist_ok=True)
    arr = tokens.numpy().astype(np.uint16)
    atomic_write_bytes(folder / "tokens.u16", arr.tobytes())
    if data.labels is not None:
        buf = io.BytesIO()
        np.save(buf, data.labels)
        atomic_write_bytes(folder / "labels.npy", buf.getvalue())
    meta = {"shape": list(arr.shape), "has_labels": data.labels is not None}
    atomic_write_bytes(folder / "meta.json", json.dumps(meta).encode())
    return len(arr)


def one(mode: str, spec: str, n_px: int, palette_path: str) -> None:
    """Build one fresh cache entry; print {"images", "seconds"} as JSON."""
    from igpt.data import cached_tokens
    from igpt.palette import Palette

    palette = Palette.load(palette_path)
    palette.quantize(np.zeros((1, 1, 3), np.uint8))  # load the C++ kernel before the clock
    with tempfile.TemporaryDirectory() as cache:
        start, cpu = time.perf_counter(), os.times()
        if mode == "old":
            n = old_cached_tokens(spec, palette, n_px, Path(cache))
        else:
            workers = int(mode[len("w") :])
            tokens, _ = cached_tokens(
                spec, "all", palette, n_px, cache_dir=cache, workers=workers, progress=False
            )
            n = len(tokens)
        seconds, end = time.perf_counter() - start, os.times()
    # CPU seconds of this process and of its (reaped) workers: how much of the work is
    # parallel (they too grow on a machine busy with other work)
    main_cpu = end.user + end.system - cpu.user - cpu.system
    workers_cpu = end.children_user + end.children_system - cpu.children_user - cpu.children_system
    print(json.dumps({"images": n, "seconds": seconds, "cpu_main_s": main_cpu,
                      "cpu_workers_s": workers_cpu}))  # fmt: skip


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes summed over ``pid`` and all its descendants (Linux /proc). RSS
    counts pages a forked worker shares with its parent in both; PSS splits them."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # ended between listing and reading
    return rss, pss


def measure(mode: str, spec: str, n_px: int, palette_path: str) -> dict:
    """Run ``one`` in a fresh process; its result plus the peak RSS of its process tree."""
    cmd = [sys.executable, __file__, "--one", mode, spec, str(n_px), palette_path]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {spec} failed:\n{err.decode()[-2000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return {**result, "peak_rss_mib": peak_rss / 2**20, "peak_pss_mib": peak_pss / 2**20}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    """Make the sets, measure every (set, N, mode), print a table, write JSON."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/igpt_bench_data", help="where the sets go")
    p.add_argument("--old-max", type=int, default=32_000, help="largest N for the old path")
    p.add_argument("--large", action="store_true", help="also 10,000 JPEGs and 128,000 npz")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of 1 and 2 workers per set, in turns (default 3; --quick 1)",
    )
    p.add_argument(
        "--one", nargs=4, metavar=("MODE", "SPEC", "N_PX", "PALETTE"), help=argparse_hidden()
    )
    args = p.parse_args(argv)
    if args.one:
        return one(args.one[0], args.one[1], int(args.one[2]), args.one[3])
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    palette_path = root / "palette.npy"
    if not palette_path.exists():
        from igpt.palette import fit_palette

        fit_palette(_smooth_images(64, 64, seed=99), k=512, sample=200_000, seed=0).save(
            palette_path
        )
    if args.quick:
        sets = [("jpeg", 200, 32), ("jpeg", 800, 32), ("npz", 1000, 64), ("npz", 8000, 64)]
    else:
        sets = [("jpeg", 600, 32), ("jpeg", 2400, 32), ("npz", 4000, 64), ("npz", 32_000, 64)]
        if args.large:
            sets += [("jpeg", 10_000, 32), ("npz", 128_000, 64)]
    rows = []
    for kind, n, n_px in sets:
        made = make_jpegs(root, n) if kind == "jpeg" else make_npz(root, n)
        spec = f"folder:{made}" if kind == "jpeg" else f"npz:{made}"
        repeat = args.repeat or (1 if args.quick else 3)
        modes = ["w1", "w2"] * repeat + (["old"] if n <= args.old_max else [])
        for i, mode in enumerate(modes):
            r = measure(mode, spec, n_px, str(palette_path))
            name = "in-memory" if mode == "old" else f"stream {mode}"
            run = i // 2 if mode != "old" else 0
            row = {"set": kind, "N": n, "n_px": n_px, "path": name, "run": run, **r}
            row["images_per_s"] = r["images"] / r["seconds"]
            rows.append(row)
            print(table([row], COLUMNS), flush=True)
    _summary(rows)
    print(table(rows, COLUMNS))
    print("wrote", write("bench_data", rows, args.out))


def argparse_hidden():
    """argparse's marker for a flag left out of --help (``--one``: this script's own)."""
    import argparse

    return argparse.SUPPRESS


def _summary(rows: list[dict]) -> None:
    """The goals' ratios: peak at the largest N over the smallest (the highest peak of each
    N's runs), workers 2 over 1 (the median over the runs made in turns, and the range)."""
    for kind in ("jpeg", "npz"):
        for path in ("stream w1", "stream w2", "in-memory"):
            sel = [r for r in rows if r["set"] == kind and r["path"] == path]
            ns = sorted({r["N"] for r in sel})
            if len(ns) >= 2:
                peak = {(n, m): max(r[m] for r in sel if r["N"] == n)
                        for n in ns for m in ("peak_rss_mib", "peak_pss_mib")}  # fmt: skip
                a, b = ns[0], ns[-1]
                ratios = [
                    f"{m} {peak[b, m] / peak[a, m]:.3f}" for m in ("peak_rss_mib", "peak_pss_mib")
                ]
                print(f"{kind} {path}: peak at N={b} / N={a}: {', '.join(ratios)}")
        for n in sorted({r["N"] for r in rows if r["set"] == kind}):
            runs = {}
            for r in rows:
                if r["set"] == kind and r["N"] == n and r["path"].startswith("stream"):
                    runs.setdefault(r["run"], {})[r["path"]] = r["images_per_s"]
            ratios = sorted(v["stream w2"] / v["stream w1"] for v in runs.values() if len(v) == 2)
            if ratios:
                print(
                    f"{kind} N={n}: 2 workers / 1 worker images/s = {np.median(ratios):.2f} "
                    f"(median of {len(ratios)} runs in turns; {ratios[0]:.2f}-{ratios[-1]:.2f})"
                )


if __name__ == "__main__":
    main()
