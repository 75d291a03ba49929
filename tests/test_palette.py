"""Palette quantization: the reference, the C++/CUDA kernels and their lookup table against
an fp64 brute force, parity with transformers' ImageGPT processor, fitting, ``Palette``."""

import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt import palette as ip
from igpt_kernels import dequantize, quantize, reference
from igpt_kernels import palette as kp

ROOT = Path(__file__).resolve().parents[1]


def _brute(pixels, palette):
    """fp64 nearest colour, lowest index on exact ties (torch.argmin keeps the first)."""
    p = pixels.reshape(-1, 3).double()
    d = ((p[:, None, :] - palette.double()[None]) ** 2).sum(-1)  # (n, K)
    return d.argmin(1).reshape(pixels.shape[:-1])


def _dist64(pixels, palette):
    p = pixels.reshape(-1, 3).cpu().double()
    return ((p[:, None, :] - palette.cpu().double()[None]) ** 2).sum(-1)  # (n, K)


# (backend, lut): the compiled kernels, directly and through the lookup table
COMPILED = [
    ("cpu", False),
    ("cpu", True),
    pytest.param("cuda", False, marks=pytest.mark.cuda),
    pytest.param("cuda", True, marks=pytest.mark.cuda),
]


def _fixed_palette(K):
    """The same random (K, 3) palette on every call, so cached lookup tables are reused."""
    return torch.rand(K, 3, generator=torch.Generator().manual_seed(K)) * 255


def _run(pixels, palette, backend, lut):
    if backend == "cpu":
        why = kp._compiled_unavailable("cpu", pixels)
        if why is not None:
            pytest.skip(why)
    device = "cuda" if backend == "cuda" else "cpu"
    out = quantize(pixels.to(device), palette.to(device), backend=backend, lut=lut)
    assert out.device.type == device and out.dtype == torch.int64
    return out.cpu()


@pytest.fixture(scope="module")
def photos():
    """scikit-learn's two sample photographs (china, flower), every 4th row and column."""
    from sklearn.datasets import load_sample_images

    return [
        torch.from_numpy(np.ascontiguousarray(im[::4, ::4])) for im in load_sample_images().images
    ]


@pytest.fixture(scope="module")
def photo_palette(photos):
    return ip.fit_palette([p.numpy() for p in photos], k=64, sample=20_000, seed=0)


# --------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 16, 512, 4096])
@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (7, 5, 3), (2, 3, 11, 3)])
def test_reference_matches_brute_force(K, shape):
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    palette = torch.rand(K, 3) * 255
    tokens = quantize(pixels, palette, backend="torch")
    assert tokens.shape == shape[:-1] and tokens.dtype == torch.int64
    assert torch.equal(tokens, _brute(pixels, palette))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_ties_pick_lowest_index(backend):
    palette = torch.tensor([[10.0, 10, 10], [0, 0, 0], [20, 20, 20], [0, 0, 0]])
    pixels = torch.tensor([[5, 5, 5], [15, 15, 15], [0, 0, 0]], dtype=torch.uint8)
    assert quantize(pixels, palette, backend=backend).tolist() == [0, 0, 1]


def test_dequantize_round_trip():
    palette = torch.rand(64, 3) * 255
    tokens = torch.randint(0, 64, (4, 9))
    rgb = dequantize(tokens, palette)
    assert rgb.dtype == torch.uint8 and rgb.shape == (4, 9, 3)
    rounded = palette.round()
    assert torch.equal(rgb, rounded.to(torch.uint8)[tokens])
    # quantizing the colours again finds a palette entry of exactly that colour
    again = quantize(rgb, rounded)
    assert torch.equal(rounded[again], rgb.float())


@pytest.mark.parametrize("fn", [quantize, reference.quantize])
@pytest.mark.parametrize(
    "pixels,palette,exc,words",
    [
        (torch.zeros(4, 3), torch.rand(8, 3), TypeError, "pixels must have dtype"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.rand(8, 3), ValueError, "pixels must be"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.rand(8, 4), ValueError, "palette must be"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.rand(8, 3).double(), TypeError, "palette"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.full((2, 3), float("nan")), ValueError, "NaN"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.rand(0, 3), ValueError, "1 <= K"),
    ],
)
def test_quantize_bad_input(fn, pixels, palette, exc, words):
    with pytest.raises(exc, match=words):
        fn(pixels, palette)


def test_dequantize_bad_input():
    palette = torch.rand(8, 3)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 8\)"):
        dequantize(torch.tensor([0, 8]), palette)
    with pytest.raises(TypeError, match="integer"):
        dequantize(torch.tensor([0.0]), palette)
    assert dequantize(torch.zeros(0, dtype=torch.long), palette).shape == (0, 3)


# --------------------------------------------------------------------------------------
# the compiled kernels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,lut", COMPILED)
@pytest.mark.parametrize("K", [1, 16, 512, 4096])
@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (7, 5, 3), (2, 3, 11, 3), (2, 0, 3), (1003, 3)])
def test_kernel_is_exact_nearest(backend, lut, K, shape):
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    palette = _fixed_palette(K)
    tokens = _run(pixels, palette, backend, lut)
    assert tokens.shape == shape[:-1]
    assert torch.equal(tokens, _brute(pixels, palette))
    assert torch.equal(tokens, reference.quantize(pixels, palette))  # no near-ties here


@pytest.mark.parametrize("backend,lut", COMPILED)
def test_kernel_on_photos(backend, lut, photos, photo_palette):
    palette = photo_palette.centroids
    for image in photos:
        tokens = _run(image, palette, backend, lut)
        assert torch.equal(tokens, _brute(image, palette))
        # the fp32 reference may only differ where two colours are (nearly) equally near
        ref = reference.quantize(image, palette)
        d = _dist64(image, palette)
        flat, ref_flat = tokens.flatten(), ref.flatten()
        gap = d[torch.arange(len(d)), ref_flat] - d[torch.arange(len(d)), flat]
        assert (gap[flat != ref_flat] <= 1e-3).all()


@pytest.mark.parametrize("backend,lut", COMPILED)
def test_exact_ties_pick_lowest_index(backend, lut):
    # integer colours with duplicates: many pixels are exactly equidistant from several
    levels = torch.tensor([0.0, 64, 128, 255])
    palette = levels[torch.randint(0, 4, (24, 3))]
    palette[5] = palette[17] = palette[2]
    pixels = torch.randint(0, 256, (5000, 3), dtype=torch.uint8)
    tokens = _run(pixels, palette, backend, lut)
    d = _dist64(pixels, palette)
    assert (d.min(1).values.unsqueeze(1) == d).sum(1).gt(1).any()  # the test has ties
    assert torch.equal(tokens, _brute(pixels, palette))
    fixed = torch.tensor([[10.0, 10, 10], [0, 0, 0], [20, 20, 20], [0, 0, 0]])
    px = torch.tensor([[5, 5, 5], [15, 15, 15], [0, 0, 0]], dtype=torch.uint8)
    assert _run(px, fixed, backend, lut).tolist() == [0, 0, 1]


# Colours at fp64 distance just below / above 10000 from black whose fp32 distance rounds to
# the other side of 10000: an fp32-only argmin picks index 0, the exact nearest is index 1.
NEAR_TIES = [
    [[100.0, 0, 0], [46.18720245361328, 88.69465637207031, 0]],  # d1 = 9999.99974 < 10000
    [[68.21770477294922, 73.11870574951172, 0], [100.0, 0, 0]],  # d0 = 10000.00037 > 10000
]


@pytest.mark.parametrize("backend,lut", COMPILED)
@pytest.mark.parametrize("colours", NEAR_TIES)
def test_fp32_near_ties_resolved_in_fp64(backend, lut, colours):
    palette = torch.tensor(colours, dtype=torch.float32)
    pixels = torch.zeros(3, 3, dtype=torch.uint8)
    assert _brute(pixels, palette).tolist() == [1, 1, 1]
    assert _run(pixels, palette, backend, lut).tolist() == [1, 1, 1]


@pytest.mark.parametrize("backend,lut", COMPILED)
def test_kernel_views_and_batches(backend, lut):
    palette = torch.rand(37, 3) * 255
    raw = torch.randint(0, 256, (3 * 1001 + 1,), dtype=torch.uint8)
    views = [
        raw[1:].view(1001, 3),  # misaligned start
        torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8).permute(1, 2, 0),  # channels first
        torch.randint(0, 256, (4, 2, 5, 5, 3), dtype=torch.uint8)[:, :, ::2],  # strided
    ]
    for pixels in views:
        assert torch.equal(_run(pixels, palette, backend, lut), _brute(pixels, palette))


@pytest.mark.parametrize("K", [1, 16, 512, 4096])
def test_lut_matches_direct(K):
    """The table of every RGB colour equals the direct kernel on (a sample of) them."""
    palette = _fixed_palette(K)
    table = _lut_or_skip(palette)
    assert table.shape == (1 << 24,) and table.dtype == torch.int16
    keys = torch.arange(1 << 24) if K <= 16 else torch.randint(0, 1 << 24, (1 << 20,))
    colours = torch.stack([keys >> 16, (keys >> 8) & 255, keys & 255], -1).to(torch.uint8)
    direct = quantize(colours, palette, backend="cpu", lut=False)
    assert torch.equal(table[keys].long(), direct)
    assert torch.equal(quantize(colours, palette, backend="cpu", lut=True), direct)


def _lut_or_skip(palette):
    why = kp._compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8))
    if why is not None:
        pytest.skip(why)
    return kp.get_lut(palette)


@pytest.mark.slow
def test_lut_int32_above_32768_colours():
    palette = torch.rand(40000, 3) * 255
    table = _lut_or_skip(palette)
    assert table.dtype == torch.int32
    pixels = torch.randint(0, 256, (300, 3), dtype=torch.uint8)
    assert torch.equal(quantize(pixels, palette, backend="cpu", lut=True), _brute(pixels, palette))
    assert torch.equal(quantize(pixels, palette, backend="cpu", lut=False), _brute(pixels, palette))


def test_auto_switches_to_lut_once_it_pays(monkeypatch):
    palette = torch.rand(32, 3) * 255
    _lut_or_skip(torch.rand(1, 3))
    monkeypatch.setitem(kp.LUT_WORK, "cpu", 32 * 1000)  # build after 1000 pixels
    pixels = torch.randint(0, 256, (600, 3), dtype=torch.uint8)
    first = quantize(pixels, palette)
    entry = kp._lut_entry(palette)
    assert entry["lut"] is None and entry["seen"] == 600
    second = quantize(pixels, palette)  # 1200 pixels seen: the table is built and used
    assert entry["lut"] is not None
    assert torch.equal(first, second) and torch.equal(first, _brute(pixels, palette))


def test_compiled_backends_say_why(monkeypatch):
    pixels = torch.zeros(2, 3, dtype=torch.uint8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot use backend='cuda'.*CUDA tensors"):
            quantize(pixels, torch.rand(4, 3), backend="cuda")
    # without the compiled module: explicit "cpu" says why, "auto" warns once and falls back
    monkeypatch.setattr(kp, "_ext", None)
    monkeypatch.setattr(kp, "_ext_error", "igpt_kernels._C is not built (test)")
    monkeypatch.setattr(kp, "_warned", False)
    with pytest.raises(ValueError, match=r"cannot use backend='cpu'.*not built \(test\)"):
        quantize(pixels, torch.rand(4, 3), backend="cpu")
    with pytest.warns(RuntimeWarning, match="slow reference"):
        assert quantize(pixels, torch.rand(4, 3)).shape == (2,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(pixels, torch.rand(4, 3))  # only one warning


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_cuda_source_compiles_without_gpu(tmp_path):
    """palette_cuda.cu includes no torch headers, so plain nvcc compiles it anywhere."""
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", str(ROOT / "csrc" / "palette_cuda.cu")]
    result = subprocess.run(
        cmd + ["-o", str(tmp_path / "palette_cuda.o")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------
# parity with transformers' ImageGPT processor
# --------------------------------------------------------------------------------------


def _hf_processor(clusters):
    transformers = pytest.importorskip("transformers")
    for name in ("ImageGPTImageProcessorPil", "ImageGPTImageProcessor"):
        try:
            return getattr(transformers, name)(clusters=clusters, do_resize=False)
        except (AttributeError, ImportError):
            continue
    pytest.skip("no ImageGPT image processor in this transformers")


@pytest.mark.parametrize("which", ["photo", "random512"])
def test_hf_processor_parity(which, photos, photo_palette):
    palette = photo_palette if which == "photo" else ip.Palette(torch.rand(512, 3) * 255)
    processor = _hf_processor(palette.to_hf())
    for image in photos:
        ids = processor(images=[image.numpy()], return_tensors="np")["input_ids"][0]
        ids = torch.from_numpy(np.asarray(ids)).long()
        ours = palette.quantize(image).flatten()
        d = _dist64(image, palette.centroids)
        rows = torch.arange(len(d))
        best = d.min(1).values
        assert torch.equal(d[rows, ours], best)  # ours is the exact nearest
        # HF's a^2 - 2ab + b^2 in [-1, 1] space may differ only at (near-)ties
        differ = ids != ours
        assert differ.float().mean() < 1e-3
        assert (d[rows, ids][differ] - best[differ] <= 0.05).all()


# --------------------------------------------------------------------------------------
# igpt.palette: fitting and the Palette object
# --------------------------------------------------------------------------------------


def _blobs(n=4000, seed=0):
    """Pixels around a few colour centres, as images (n // 100, 10, 10, 3) uint8."""
    g = np.random.default_rng(seed)
    centres = g.uniform(20, 235, (12, 3))
    px = centres[g.integers(0, 12, n)] + g.normal(0, 8, (n, 3))
    return np.clip(px, 0, 255).astype(np.uint8).reshape(-1, 10, 10, 3)


def test_fit_is_deterministic_per_seed():
    images = _blobs()
    a = ip.fit_palette(images, k=16, sample=3000, seed=1)
    b = ip.fit_palette(torch.from_numpy(images), k=16, sample=3000, seed=1)
    c = ip.fit_palette(images, k=16, sample=3000, seed=2)
    assert len(a) == 16 and a.centroids.dtype == torch.float32
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    assert torch.isfinite(a.centroids).all() and a.centroids.min() >= 0 and a.centroids.max() <= 255


def test_fit_fewer_colours_than_k():
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    pixels = colours[np.random.default_rng(0).integers(0, 3, 300)]
    palette = ip.fit_palette(pixels, k=8)
    assert len(palette) == 8 and torch.isfinite(palette.centroids).all()
    tokens = palette.quantize(pixels)
    assert torch.equal(palette.dequantize(tokens), torch.from_numpy(pixels))  # lossless
    assert int(tokens.max()) < 3  # the repeats are never chosen


def test_fit_no_dead_clusters_with_heavy_duplicates():
    g = np.random.default_rng(0)
    colours = g.integers(0, 256, (40, 3)).astype(np.uint8)
    heavy = colours[np.minimum(g.geometric(0.3, 5000) - 1, 39)]  # a few colours dominate
    pixels = np.concatenate([colours, heavy])
    palette = ip.fit_palette(pixels, k=32, seed=0)
    assert torch.isfinite(palette.centroids).all()
    assert len(torch.unique(palette.centroids, dim=0)) == 32


def test_fit_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        ip.fit_palette(_blobs(), k=0)
    with pytest.raises(TypeError, match="uint8"):
        ip.fit_palette(np.zeros((4, 3), np.float32), k=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        ip.fit_palette(np.zeros((4, 4), np.uint8), k=2)
    with pytest.raises(ValueError, match="no pixels"):
        ip.fit_palette(np.zeros((0, 3), np.uint8), k=2)


def test_palette_api(tmp_path):
    centroids = np.random.default_rng(0).uniform(0, 255, (20, 3)).astype(np.float32)
    palette = ip.Palette(centroids)
    assert len(palette) == 20 and palette.centroids.dtype == torch.float32
    images = np.random.default_rng(1).integers(0, 256, (2, 5, 6, 3)).astype(np.uint8)
    tokens = palette.quantize(images)
    assert tokens.shape == (2, 5, 6) and tokens.dtype == torch.int64
    assert torch.equal(tokens, _brute(torch.from_numpy(images), palette.centroids))
    rgb = palette.dequantize(tokens.numpy())
    assert rgb.shape == (2, 5, 6, 3) and rgb.dtype == torch.uint8
    palette.save(tmp_path / "p.npy")
    assert torch.equal(ip.Palette.load(tmp_path / "p.npy").centroids, palette.centroids)
    palette.save(tmp_path / "q")  # np.save's rule: .npy is appended
    assert torch.equal(ip.Palette.load(tmp_path / "q.npy").centroids, palette.centroids)


def test_palette_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "palette.npy"
    ip.Palette(np.full((4, 3), 7, np.float32)).save(path)

    def dies_mid_write(f, arr, *a, **k):
        f.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ip.Palette(np.zeros((4, 3), np.float32)).save(path)
    monkeypatch.undo()
    assert float(ip.Palette.load(path).centroids[0, 0]) == 7.0  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["palette.npy"]


def test_hf_and_openai_round_trips(tmp_path):
    palette = ip.Palette(torch.rand(512, 3) * 255)
    clusters = palette.to_hf()
    assert clusters.shape == (512, 3) and clusters.min() >= -1 and clusters.max() <= 1
    back = ip.Palette.from_hf(clusters)
    assert torch.allclose(back.centroids, palette.centroids, atol=1e-4)
    # OpenAI's kmeans_centers.npy and HF's config store the same [-1, 1] numbers
    np.save(tmp_path / "kmeans_centers.npy", clusters)
    openai = ip.Palette.from_hf(np.load(tmp_path / "kmeans_centers.npy"))
    hf = ip.Palette.from_hf(clusters.tolist())
    assert torch.equal(openai.centroids, hf.centroids)
    assert ip.Palette.from_hf([[-1, -1, -1], [1, 1, 1]]).centroids.tolist() == [
        [0, 0, 0],
        [255, 255, 255],
    ]


@pytest.mark.parametrize(
    "centroids,exc,words",
    [
        (np.zeros((4, 2), np.float32), ValueError, r"\(K, 3\)"),
        (np.full((4, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.full((4, 3), -0.5, np.float32), ValueError, "from_hf"),
        (np.full((4, 3), 300, np.float32), ValueError, "0..255"),
        ([[1, 2, 3]], TypeError, "numpy array or torch.Tensor"),
    ],
)
def test_palette_bad_input(centroids, exc, words):
    with pytest.raises(exc, match=words):
        ip.Palette(centroids)


@pytest.mark.cuda
def test_palette_on_cuda(photos, photo_palette):
    image = photos[0].cuda()
    tokens = photo_palette.quantize(image)
    assert tokens.is_cuda
    assert torch.equal(tokens.cpu(), photo_palette.quantize(photos[0]))
    assert photo_palette.dequantize(tokens).is_cuda


def test_torch_kmeans_matches_sklearn_quality():
    """The GPU fitting path (run here on the CPU kernel): deterministic, finite, as good."""
    pixels = _blobs(6000).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    a = ip._kmeans_torch(colours, counts, 12, seed=0, device="cpu")
    b = ip._kmeans_torch(colours, counts, 12, seed=0, device="cpu")
    assert torch.equal(a, b) and a.shape == (12, 3) and torch.isfinite(a).all()

    def inertia(centroids):
        tokens = quantize(torch.from_numpy(pixels), centroids)
        return float((torch.from_numpy(pixels).float() - centroids[tokens]).square().sum())

    sk = ip.fit_palette(pixels, k=12, seed=0).centroids
    assert inertia(a) <= 1.05 * inertia(sk)


@pytest.mark.cuda
def test_fit_on_cuda():
    images = _blobs()
    a = ip.fit_palette(images, k=16, seed=0, device="cuda")
    assert torch.equal(a.centroids, ip.fit_palette(images, k=16, seed=0, device="cuda").centroids)
    assert torch.isfinite(a.centroids).all() and len(torch.unique(a.centroids, dim=0)) == 16


def test_fit_palette_command(tmp_path):
    from igpt.cli import main

    np.savez(tmp_path / "d.npz", images=_blobs(2000))
    main(["fit-palette", "--data", f"npz:{tmp_path / 'd.npz'}", "--k", "8", "--out", str(tmp_path)])
    palette = ip.Palette.load(tmp_path / "palette.npy")
    assert len(palette) == 8
    assert (tmp_path / "palette.png").stat().st_size > 1000


@pytest.mark.cuda
@pytest.mark.parametrize("K", [16, 512, 40000])
def test_cuda_matches_cpu_at_scale(K):
    """Many blocks, the wide-load paths and whole tables: CUDA and C++ give the same tokens."""
    palette = _fixed_palette(K)
    _lut_or_skip(torch.rand(1, 3))
    pixels = torch.randint(0, 256, ((1 << 20) + 5, 3), dtype=torch.uint8)
    cpu = quantize(pixels, palette, backend="cpu", lut=False)
    for view in (pixels, pixels[1:]):  # aligned and misaligned starts
        got = quantize(view.cuda(), palette.cuda(), backend="cuda", lut=False).cpu()
        assert torch.equal(got, cpu[len(pixels) - len(view) :])
        got = quantize(view.cuda(), palette.cuda(), backend="cuda", lut=True).cpu()
        assert torch.equal(got, cpu[len(pixels) - len(view) :])
    table = kp.get_lut(palette.cuda())
    assert table.is_cuda and table.dtype == (torch.int16 if K <= 32768 else torch.int32)
    if K <= 512:
        assert torch.equal(table.cpu(), kp.get_lut(palette))


# --------------------------------------------------------------------------------------
# the nearest-centre proof (transformers' processor tokens, igpt.hf_patch)
# --------------------------------------------------------------------------------------


def _exactly_clear(x, centres, best, margin):
    """The predicate itself: every other centre's fp64 squared distance exceeds best's by
    more than margin (all K centres, no table)."""
    d = _dist64(x, centres)
    d_best = d.gather(1, best[:, None])
    return (d.scatter(1, best[:, None], math.inf) - d_best > margin).all(1)


def _hard_case(dtype):
    """Centres with a duplicate; pixels: random, at centres, and at midpoints of neighbouring
    centres (ties in exact arithmetic); the proposed best is the fp64 nearest."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(200, 3, generator=g, dtype=torch.float64) * 2 - 1
    centres[7] = centres[3]
    mids = (centres[:100] + centres[100:]) / 2
    x = torch.cat([torch.rand(3000, 3, generator=g, dtype=torch.float64) * 2 - 1, centres, mids])
    x = x.to(dtype)
    best = _dist64(x, centres).argmin(1)
    return x, centres, best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [0, 2, 16, 199])
def test_clear_nearest_is_sound_and_matches_reference(dtype, m):
    x, centres, best = _hard_case(dtype)
    table = reference.neighbour_table(centres, m)
    assert table[0].shape == (200, m) and table[0].dtype == torch.int32
    margin = 1e-9
    exact = _exactly_clear(x, centres, best, margin)
    ref = reference.clear_nearest(x, centres, best, *table, margin)
    got = kp.clear_nearest(x, centres, best, *table, margin)
    assert got.dtype == torch.bool and torch.equal(got, ref)
    assert not (got & ~exact).any()  # never clear where a centre is within the margin
    assert not got[3003].item() and not got[3007].item()  # the duplicated centre: a tie
    if m == 199:  # every centre listed: the check is the predicate itself
        assert torch.equal(got, exact)
    if m >= 16:
        assert got.float().mean() > 0.9  # and it settles nearly every pixel
    wide = kp.clear_nearest(x, centres, best, *table, 1e-2)  # a wider margin clears fewer
    assert not (wide & ~got).any() and wide.sum() < got.sum()


def test_clear_nearest_without_the_module_runs_the_reference_in_chunks(monkeypatch):
    x, centres, best = _hard_case(torch.float32)
    table = reference.neighbour_table(centres, 16)
    ref = reference.clear_nearest(x, centres, best, *table, 1e-9)
    monkeypatch.setattr(kp, "_load_ext", lambda: None)
    monkeypatch.setattr(kp, "CLEAR_CHUNK", 1000)  # 3,300 rows: four chunks
    assert torch.equal(kp.clear_nearest(x, centres, best, *table, 1e-9), ref)
    empty = kp.clear_nearest(x[:0], centres, best[:0], *table, 1e-9)
    assert empty.shape == (0,) and empty.dtype == torch.bool


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda a: {**a, "best": a["best"] + 200}, "best must lie in [0, 200)"),
        (lambda a: {**a, "x": a["x"].half()}, "x must be float32 or float64"),
        (lambda a: {**a, "centres": a["centres"].float()}, "centres must be (K, 3) float64"),
        (lambda a: {**a, "best": a["best"][:-1]}, "best must be (n,) int64"),
    ],
)
def test_clear_nearest_bad_input(change, words):
    if kp.compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8)) is not None:
        pytest.skip("no compiled module")
    x, centres, best = _hard_case(torch.float64)
    near, near_dist, beyond = reference.neighbour_table(centres, 4)
    args = dict(x=x, centres=centres, best=best)
    bad = change(args)
    with pytest.raises(ValueError, match=re.escape(words)):
        kp.clear_nearest(bad["x"], bad["centres"], bad["best"], near, near_dist, beyond, 1e-9)
