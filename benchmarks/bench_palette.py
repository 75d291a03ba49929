"""Palette quantization and fitting throughput against the ways a user would otherwise do it.

First (``--quick`` on a machine without a GPU runs only this, in under a minute; with a
GPU, ``--quick`` goes on with the 2^20-pixel rows below): the C++ direct kernel
(``lut=False``) on 2^20 random pixels with random palettes of K = 16, 64 and 512 colours,
with one thread (wall time, and process CPU time: the per-core rate, less sensitive to other
work on the machine) and with all threads, per version of the kernel (instruction set, and
the whole palette against the 16^3 boxes of the RGB cube); the lookup table's build time; and
transformers' numpy way and torch's matmul way in the same run. The rows name the CPU model
and the version that ``quantize`` uses (``IGPT_CPU_ISA`` picks another).

Then quantizing 2^20 and 2^24 RGB pixels (the sample photographs of scikit-learn, tiled) to a
512-colour palette fitted on them, in pixels/s:

- ``numpy (HF)``: transformers' ImageGPT processor's path: pixels to [-1, 1], then
  a^2 - 2ab + b^2 against the clusters and argmin (chunks of 2^16 pixels, so that the
  (n, K) float64 matrix fits in memory);
- ``torch matmul``: |x|^2 - 2 x c^T + |c|^2 and argmin in fp32 (chunks of 2^16 pixels on
  the CPU, 2^22 on a GPU);
- ``cpu direct`` / ``cpu lut``: the C++ kernel, and its 2^24-entry lookup table (warm: the
  table already built; ``lut build`` is the one-off cost per palette);
- the same for ``cuda`` when a GPU is present.

Then fitting 512 colours on 10^6 sampled pixels (the photos with +-3 jitter so that there
are many distinct colours): scikit-learn on the CPU, the torch k-means on a GPU.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import env, parser, table, time_ms, wall_ms, write

from igpt.palette import fit_palette
from igpt_kernels import palette as kp
from igpt_kernels import quantize

log = logging.getLogger(__name__)


def photo_pixels(n: int, seed: int = 0) -> np.ndarray:
    """n RGB pixels (n, 3) uint8: scikit-learn's two sample photos, tiled."""
    from sklearn.datasets import load_sample_images

    px = np.concatenate([im.reshape(-1, 3) for im in load_sample_images().images])
    return np.resize(px, (n, 3))


def numpy_hf(pixels: np.ndarray, clusters: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """The numpy nearest-cluster search of transformers' ImageGPT processor, in chunks."""
    out = np.empty(len(pixels), np.int64)
    b = clusters.T
    b2 = np.sum(np.square(b), axis=0)
    for s in range(0, len(pixels), chunk):
        a = pixels[s : s + chunk].astype(np.float32) / 127.5 - 1  # rescale + normalize
        d = np.sum(np.square(a), axis=1)[:, None] - 2 * np.matmul(a, b) + b2[None, :]
        out[s : s + chunk] = np.argmin(d, axis=1)
    return out


def torch_matmul(pixels: torch.Tensor, palette: torch.Tensor, chunk: int) -> torch.Tensor:
    """|x|^2 - 2 x c^T + |c|^2, argmin: the fp32 matmul way, in chunks of pixels."""
    out = torch.empty(pixels.shape[0], dtype=torch.int64, device=pixels.device)
    c2 = palette.square().sum(1)
    for s in range(0, pixels.shape[0], chunk):
        x = pixels[s : s + chunk].float()
        d = x.square().sum(1, keepdim=True) - 2 * x @ palette.T + c2
        out[s : s + chunk] = d.argmin(1)
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def best_of(fn, reps: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) of fn, each the best of reps runs after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return min(wall), min(cpu)


def kernel_rows(quick: bool) -> list[dict]:
    """The C++ direct kernel per K, thread count and version, the table build, numpy and
    torch, on 2^20 random pixels and random palettes (see the module docstring)."""
    ext = kp._load_ext()
    n, reps = 1 << 20, 3 if quick else 7
    base_n = 1 << (16 if quick else 18)  # numpy and torch: their rate, on fewer pixels
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (n, 3), generator=g, dtype=torch.uint8)
    common = {"cpu": cpu_model(), "isa": ext.cpu_isa(), "pixels": n}
    rows = []

    def add(method, K, ms, cpu_ms=None, pixels=n, **extra):
        row = {**common, "method": method, "K": K, "pixels": pixels, "ms": ms}
        row["Mpix/s"] = pixels / ms / 1e3
        if cpu_ms is not None:  # process CPU time: all of its threads, the per-core rate
            row["Mpix/s per core"] = pixels / cpu_ms / 1e3
        rows.append({**row, **extra})
        log.info("%-30s K=%-4d %9.1f ms %8.2f Mpix/s", method, K, ms, row["Mpix/s"])
        return row

    for K in (16, 64, 512):
        pal = torch.rand(K, 3, generator=g) * 255
        expect = ext.quantize_isa(px, pal, "default", 0)
        ways = [(isa, boxes) for isa in ext.cpu_isas() for boxes in (0, 1)]
        for isa, boxes in ways:  # each version, one thread
            run = partial(ext.quantize_isa, px, pal, isa, boxes, 1)
            assert torch.equal(run(), expect), f"{isa} boxes={boxes} differs"
            wall, cpu = best_of(run, reps if isa == common["isa"] else 1)
            add(f"direct {isa} {'boxes' if boxes else 'whole'} 1 thread", K, wall, cpu)
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())  # OpenMP's default
        for label, run in (
            ("direct 1 thread", partial(ext.quantize_isa, px, pal, "auto", -1, 1)),
            ("direct all threads", partial(quantize, px, pal, backend="cpu", lut=False)),
        ):
            assert torch.equal(run(), expect)
            wall, cpu = best_of(run, reps)
            add(f"cpu {label}", K, wall, cpu if "1 thread" in label else None, threads=threads)
        sub, sub_np = px[:base_n], px[:base_n].numpy()
        clusters = pal.double().numpy() / 127.5 - 1  # the HF processor's colour space
        wall, cpu = best_of(partial(numpy_hf, sub_np, clusters), 1)
        numpy_row = add("numpy (HF)", K, wall, cpu, pixels=base_n)
        wall, cpu = best_of(partial(torch_matmul, sub, pal, 1 << 16), 1)
        add("torch matmul cpu", K, wall, cpu, pixels=base_n)
        for row in rows:
            if row["K"] == K:
                row["x numpy"] = row["Mpix/s"] / numpy_row["Mpix/s"]
        if K == 512:
            ms = best_of(lambda pal=pal: ext.build_lut(pal), 1 if quick else 3)[0]
            rows.append({**common, "method": "cpu lut build", "K": K, "ms": ms, "pixels": 1 << 24})
            log.info("cpu lookup table build, K=%d: %.1f ms", K, ms)
    return rows


def measure_ms(fn, slow_s: float = 2.0) -> float:
    """Median time of fn in ms; a single run when one run already takes over slow_s."""
    once = wall_ms(fn)
    if once > slow_s * 1e3:
        return once
    return time_ms(fn, warmup=1, rep=5)


def lut_build_ms(pal: torch.Tensor, have_cpu: bool, cuda: bool) -> dict:
    """{device: ms} to build the lookup table of ``pal`` (CUDA after a warm-up build)."""
    lut_build = {}
    if (
        cuda
        and kp._compiled_unavailable("cuda", torch.zeros(1, 3, dtype=torch.uint8).cuda()) is None
    ):
        pal_cuda = pal.cuda()
        kp.get_lut(pal_cuda)  # warm-up: module load and first launch
        kp._luts.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kp.get_lut(pal_cuda)
        torch.cuda.synchronize()
        lut_build["cuda"] = (time.perf_counter() - t0) * 1e3
    if have_cpu:
        t0 = time.perf_counter()
        kp.get_lut(pal)
        lut_build["cpu"] = (time.perf_counter() - t0) * 1e3
    return lut_build


def photo_rows(args, have_cpu: bool, rows: list[dict]) -> None:
    """Append the photo rows (see the module docstring) to ``rows``, writing them as they
    come so that partial results survive a time limit."""
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24]
    palette = fit_palette(photo_pixels(200_000), k=args.k, sample=200_000, seed=0)
    pal = palette.centroids
    clusters = palette.to_hf().astype(np.float64)  # what the HF processor holds
    cuda = torch.cuda.is_available()
    first = len(rows)
    numpy_rate = {}  # pixels -> numpy (HF) Mpix/s, the baseline of "x numpy"

    def add(method, n, ms, **extra):
        rows.append({"method": method, "pixels": n, "ms": ms, "Mpix/s": n / ms / 1e3, **extra})
        log.info(
            "%-18s n=2^%d %10.2f ms %10.1f Mpix/s", method, n.bit_length() - 1, ms, n / ms / 1e3
        )

    lut_build = lut_build_ms(pal, have_cpu, cuda)
    for device, ms in lut_build.items():
        rows.append({"method": f"{device} lut build", "pixels": 1 << 24, "ms": ms})
        log.info("%s lookup table build: %.1f ms", device, ms)
    for n in sizes:
        np_px = photo_pixels(n)
        px = torch.from_numpy(np_px)
        exact = quantize(px, pal, backend="cpu", lut=True) if have_cpu else None
        if cuda:  # the GPU rows first, so that a time limit cuts the slow CPU ones
            px_c, pal_c = px.cuda(), pal.cuda()
            ms = measure_ms(partial(torch_matmul, px_c, pal_c, 1 << 22))
            add("torch matmul cuda", n, ms)
            if "cuda" in lut_build:
                for lut in (False, True):
                    got = quantize(px_c, pal_c, backend="cuda", lut=lut).cpu()
                    assert exact is None or torch.equal(got, exact), "cuda != cpu tokens"
                    ms = measure_ms(partial(quantize, px_c, pal_c, backend="cuda", lut=lut))
                    add(f"cuda {'lut' if lut else 'direct'}", n, ms)
        if have_cpu:
            assert torch.equal(exact, quantize(px, pal, backend="cpu", lut=False))
            add("cpu direct", n, measure_ms(partial(quantize, px, pal, backend="cpu", lut=False)))
            ms = measure_ms(partial(quantize, px, pal, backend="cpu", lut=True))
            add("cpu lut", n, ms)
            add("cpu lut cold", n, ms + lut_build["cpu"], note="incl. table build")
        # the CPU baselines take minutes at 2^24; on a GPU machine 2^20 gives their rate
        if not cuda or n == sizes[0]:
            ms = measure_ms(partial(numpy_hf, np_px, clusters))
            add("numpy (HF)", n, ms)
            numpy_rate[n] = n / ms / 1e3
            add("torch matmul cpu", n, measure_ms(partial(torch_matmul, px, pal, 1 << 16)))
        write("palette", rows, args.out)  # partial results survive a time limit
    base = numpy_rate.get(sizes[0])
    for row in rows[first:]:
        if "Mpix/s" in row and base:
            rate = numpy_rate.get(row["pixels"], base)
            row["x numpy"] = row["Mpix/s"] / rate


def fit_rows(k: int) -> list[dict]:
    """Fitting k colours on 10^6 jittered photo pixels, on the GPU (if any) and the CPU."""
    g = np.random.default_rng(0)
    jitter = g.integers(-3, 4, (1_000_000, 3))
    pixels = np.clip(photo_pixels(1_000_000).astype(np.int64) + jitter, 0, 255).astype(np.uint8)
    distinct = len(np.unique(pixels, axis=0))
    cuda = torch.cuda.is_available()
    rows = []
    for device in (["cuda"] if cuda else []) + ["cpu"]:
        t0 = time.perf_counter()
        fit_palette(pixels, k=k, sample=1_000_000, seed=0, device=device)
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append({"method": f"fit {device}", "pixels": 1_000_000, "ms": s * 1e3})
        rows[-1]["distinct"] = distinct
        log.info(
            "fit %d colours on 10^6 pixels (%d distinct) on %s: %.2f s", k, distinct, device, s
        )
    return rows


def main(argv=None) -> list[dict]:
    p = parser("palette quantization and fitting vs numpy (HF) and torch matmul + argmin")
    p.add_argument("--k", type=int, default=512, help="palette size (default %(default)s)")
    p.add_argument("--no-fit", action="store_true", help="skip the fitting benchmark")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    have_cpu = kp._compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8)) is None
    kernel = kernel_rows(args.quick) if have_cpu else []
    rows = list(kernel)
    if not args.quick or torch.cuda.is_available():  # --quick on a GPU machine: its rows
        photo_rows(args, have_cpu, rows)
        if not args.no_fit:
            rows += fit_rows(args.k)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for row in rows:
        row["load_avg"] = load  # other work on the machine skews CPU timings
    path = write("palette", rows, args.out)
    print(table(kernel, ["method", "K", "pixels", "ms", "Mpix/s", "Mpix/s per core", "x numpy"]))
    if len(rows) > len(kernel):
        print(table(rows[len(kernel) :], ["method", "pixels", "ms", "Mpix/s", "x numpy", "note"]))
    print(f"\n{env()}\ncpu: {cpu_model()}\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
