"""Palette quantization and fitting throughput against the ways a user would otherwise do it.

Quantizing 2^20 and 2^24 RGB pixels (the sample photographs of scikit-learn, tiled) to a
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
import time
from functools import partial

import numpy as np
import torch
from common import env, parser, table, time_ms, write

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


def measure_ms(fn, slow_s: float = 2.0) -> float:
    """Median time of fn in ms; a single run when one run already takes over slow_s."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    once = time.perf_counter() - t0
    if once > slow_s:
        return once * 1e3
    return time_ms(fn, warmup=1, rep=5)


def main(argv=None) -> list[dict]:
    p = parser("palette quantization and fitting vs numpy (HF) and torch matmul + argmin")
    p.add_argument("--k", type=int, default=512, help="palette size (default %(default)s)")
    p.add_argument("--no-fit", action="store_true", help="skip the fitting benchmark")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24]
    fit_px = photo_pixels(200_000)
    palette = fit_palette(fit_px, k=args.k, sample=200_000, seed=0)
    pal = palette.centroids
    clusters = palette.to_hf().astype(np.float64)  # what the HF processor holds
    have_cpu = kp._compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8)) is None
    cuda = torch.cuda.is_available()
    rows = []
    numpy_rate = {}  # pixels -> numpy (HF) Mpix/s, the baseline of "x numpy"

    def add(method, n, ms, **extra):
        rows.append({"method": method, "pixels": n, "ms": ms, "Mpix/s": n / ms / 1e3, **extra})
        log.info(
            "%-18s n=2^%d %10.2f ms %10.1f Mpix/s", method, n.bit_length() - 1, ms, n / ms / 1e3
        )

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
    for row in rows:
        if "Mpix/s" in row and base:
            rate = numpy_rate.get(row["pixels"], base)
            row["x numpy"] = row["Mpix/s"] / rate
    if not args.no_fit:
        g = np.random.default_rng(0)
        jitter = g.integers(-3, 4, (1_000_000, 3))
        pixels = np.clip(photo_pixels(1_000_000).astype(np.int64) + jitter, 0, 255).astype(np.uint8)
        distinct = len(np.unique(pixels, axis=0))
        for device in (["cuda"] if cuda else []) + ["cpu"]:
            t0 = time.perf_counter()
            fit_palette(pixels, k=args.k, sample=1_000_000, seed=0, device=device)
            if cuda:
                torch.cuda.synchronize()
            s = time.perf_counter() - t0
            rows.append(
                {
                    "method": f"fit {device}",
                    "pixels": 1_000_000,
                    "ms": s * 1e3,
                    "distinct": distinct,
                }
            )
            log.info(
                "fit %d colours on 10^6 pixels (%d distinct) on %s: %.2f s",
                args.k,
                distinct,
                device,
                s,
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for row in rows:
        row["load_avg"] = load  # other work on the machine skews CPU timings
    path = write("palette", rows, args.out)
    print(table(rows, ["method", "pixels", "ms", "Mpix/s", "x numpy", "note"]))
    print(f"\n{env()}\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
