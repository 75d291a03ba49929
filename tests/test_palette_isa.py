"""The C++ quantizer's versions per instruction set (AVX-512, AVX2, baseline x86-64), with
and without the boxes of the RGB cube: each way that this CPU runs gives the same tokens as
the others, as the reference and as an fp64 brute force, ties and fp32 near-ties included;
IGPT_CPU_ISA picks the version."""

from pathlib import Path

import pytest
import torch

from igpt_kernels import _build, reference
from igpt_kernels import palette as kp

ISAS = ["default", "avx2", "avx512"]
CPU_FLAG = {"avx2": "avx2", "avx512": "avx512f"}  # /proc/cpuinfo flag of each version


@pytest.fixture(scope="module")
def ext():
    """The compiled module; it must be built from these sources (it has quantize_isa)."""
    why = kp._compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8))
    if why is not None:
        pytest.skip(why)
    module = kp._load_ext()
    assert hasattr(module, "quantize_isa"), (
        f"{kp.extension_status()['path']} was built from older sources: rebuild it "
        "(`make install`, or delete it to compile at first use)"
    )
    return module


def _cpu_flags() -> set[str] | None:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _need(ext, isa):
    if isa not in ext.cpu_isas():
        flag = CPU_FLAG.get(isa, isa)
        pytest.skip(f"this CPU has no {flag} (the {isa} version cannot run here)")


def _brute(pixels, palette, chunk=4096):
    """fp64 nearest colour, lowest index on exact ties (torch.argmin keeps the first)."""
    out = []
    for s in range(0, len(pixels), chunk):
        d = ((pixels[s : s + chunk].double()[:, None, :] - palette.double()[None]) ** 2).sum(-1)
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _inputs(K, n, kind):
    """(pixels (n, 3) uint8, palette (K, 3) float32) of one kind: random colours; integer
    colours with duplicates (exact ties); half-integer colours (pixels exactly between two)."""
    pixels = torch.randint(0, 256, (n, 3), dtype=torch.uint8)
    if kind == "random":
        palette = torch.rand(K, 3) * 255
    elif kind == "duplicates":
        palette = torch.randint(0, 256, (K, 3)).float()
        dup = palette[K // 2 :: 3]
        palette[K // 2 :: 3] = palette[: len(dup)].clone()
    else:
        palette = torch.randint(0, 64, (K, 3)).float() * 4 + 0.5
    return pixels, palette


def test_module_records_its_sources(ext):
    assert ext.build_info()["sources"] == _build.sources_digest(_build.source_dir())


def test_prebuilt_from_other_sources_is_refused():
    info = {"torch": "2.13.0", "cxx11_abi": True, "cuda": False, "sources": "0123abcd"}
    assert _build.prebuilt_mismatch(info, "2.13.0", True, "0123abcd") is None
    assert "other sources" in _build.prebuilt_mismatch(info, "2.13.0", True, "4567ef00")
    assert _build.prebuilt_mismatch(info, "2.13.0", True) is None  # nothing to compare with
    assert _build.prebuilt_mismatch({**info, "sources": None}, "2.13.0", True, "4567ef00") is None


def test_versions_listed(ext):
    isas = ext.cpu_isas()
    assert isas[-1] == "default" and set(isas) <= set(ISAS)
    assert ext.cpu_isa() in isas
    flags = _cpu_flags()
    if flags is not None:  # every version the CPU has is offered, and the best is the default
        offered = [isa for isa in ISAS[1:] if CPU_FLAG[isa] in flags and "fma" in flags]
        assert set(offered) <= set(isas)


# K = 1, 2, odd, the padding edge 16/17, 512, 4096 and 65536; n leaves tails of every length
CASES = [(1, 7), (2, 1001), (5, 33), (16, 4099), (17, 1023), (64, 4096), (512, 2049)]
CASES += [(4096, 515), (65536, 37)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["random", "duplicates", "half"])
@pytest.mark.parametrize("K,n", CASES)
def test_versions_agree(ext, isa, kind, K, n):
    _need(ext, isa)
    pixels, palette = _inputs(K, n, kind)
    expect = _brute(pixels, palette)
    if kind != "random":  # integer and half-integer distances are exact in the fp32 reference
        assert torch.equal(expect, reference.quantize(pixels, palette, backend="torch"))
    for boxes in (0, 1, -1):  # the whole palette, the boxes, and the automatic choice
        got = ext.quantize_isa(pixels, palette, isa, boxes)
        assert got.dtype == torch.int64 and got.shape == (n,)
        assert torch.equal(got, expect), f"boxes={boxes}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["random", "duplicates", "half"])
def test_versions_agree_where_boxes_are_automatic(ext, isa, kind):
    _need(ext, isa)
    pixels, palette = _inputs(512, 1 << 16, kind)  # n * K = 2^25: boxes by default
    expect = _brute(pixels, palette)
    if kind != "random":
        assert torch.equal(expect, reference.quantize(pixels, palette, backend="torch"))
    assert torch.equal(ext.quantize_isa(pixels, palette, isa), expect)
    assert torch.equal(ext.quantize_isa(pixels, palette, isa, 0, 1), expect)  # 1 thread
    assert torch.equal(ext.quantize(pixels, palette), expect)


def test_boxes_on_clustered_pixels_and_far_colours(ext):
    # pixels in a few boxes only; colours far outside 0..255 and duplicated across boxes
    centres = torch.randint(0, 256, (5, 3))
    pixels = centres[torch.randint(0, 5, (6000,))] + torch.randint(-6, 7, (6000, 3))
    pixels = pixels.clamp(0, 255).to(torch.uint8)
    palette = torch.cat([torch.rand(300, 3) * 255, torch.tensor([[1e6, 0, 0], [-3e4, 5, 5]])])
    palette = torch.cat([palette, palette[:40]])
    expect = _brute(pixels, palette)
    for isa in ext.cpu_isas():
        for boxes in (0, 1):
            assert torch.equal(ext.quantize_isa(pixels, palette, isa, boxes), expect)


# fp32 rounds these to the wrong side: the fp64 re-scan must give index 1 in every version
NEAR_TIES = [
    [[100.0, 0, 0], [46.18720245361328, 88.69465637207031, 0]],
    [[68.21770477294922, 73.11870574951172, 0], [100.0, 0, 0]],
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("colours", NEAR_TIES)
def test_versions_resolve_fp32_near_ties(ext, isa, colours):
    _need(ext, isa)
    # pad with far colours so that the two near ones sit in different lanes and steps
    palette = torch.cat([torch.full((40, 3), 255.0), torch.tensor(colours)])
    palette = palette[torch.tensor([40] + list(range(40)) + [41])]  # indices 0 and 41
    pixels = torch.zeros(9, 3, dtype=torch.uint8)
    assert _brute(pixels, palette).tolist() == [41] * 9
    for boxes in (0, 1):
        assert ext.quantize_isa(pixels, palette, isa, boxes).tolist() == [41] * 9


@pytest.mark.parametrize("K", [3, 7, 15, 16, 33])  # one padding entry for W = 4, 8 and 16
def test_colours_beyond_the_padding(ext, K):
    # colours 1e16 away and more: the padding must never win (it did at 1e15 once)
    palette = torch.full((K, 3), 1e16)
    palette[:, 1] = torch.arange(K, 0, -1) * 1e15  # the last one is the nearest
    palette[:, 2] = torch.linspace(-3e17, 3e17, K)
    pixels = torch.randint(0, 256, (50, 3), dtype=torch.uint8)
    expect = _brute(pixels, palette)
    for isa in ext.cpu_isas():
        for boxes in (0, 1):
            assert torch.equal(ext.quantize_isa(pixels, palette, isa, boxes), expect)


def test_exact_ties_lowest_index(ext):
    palette = torch.tensor([[10.0, 10, 10], [0, 0, 0], [20, 20, 20], [0, 0, 0]])
    palette = torch.cat([palette, torch.full((30, 3), 200.0), palette])  # ties across steps
    pixels = torch.tensor([[5, 5, 5], [15, 15, 15], [0, 0, 0], [200, 200, 200]], dtype=torch.uint8)
    for isa in ext.cpu_isas():
        for boxes in (0, 1):
            assert ext.quantize_isa(pixels, palette, isa, boxes).tolist() == [0, 0, 1, 4]


def test_env_var_picks_version(ext, monkeypatch):
    pixels, palette = _inputs(64, 999, "duplicates")
    expect = _brute(pixels, palette)
    for isa in ext.cpu_isas():
        monkeypatch.setenv("IGPT_CPU_ISA", isa)
        assert ext.cpu_isa() == isa
        assert torch.equal(ext.quantize(pixels, palette), expect)
        assert torch.equal(ext.quantize_isa(pixels, palette, "auto"), expect)
    monkeypatch.delenv("IGPT_CPU_ISA")
    assert ext.cpu_isa() == ext.cpu_isas()[0]


@pytest.mark.parametrize("isa", ["avx1024", "AVX2", "sse"])
def test_unknown_version_says_which(ext, monkeypatch, isa):
    pixels, palette = _inputs(4, 10, "random")
    with pytest.raises(ValueError, match=f"got '{isa}'") as e:
        ext.quantize_isa(pixels, palette, isa)
    assert "default" in str(e.value)
    monkeypatch.setenv("IGPT_CPU_ISA", isa)
    with pytest.raises(ValueError, match="IGPT_CPU_ISA"):
        ext.quantize(pixels, palette)
    with pytest.raises(ValueError, match="isa must name"):
        ext.quantize_isa(pixels, palette, "")
    with pytest.raises(ValueError, match="boxes must be"):
        ext.quantize_isa(pixels, palette, "default", 2)


@pytest.mark.slow
def test_lut_same_in_every_version(ext, monkeypatch):
    palette = _inputs(48, 1, "duplicates")[1]
    luts = {}
    for isa in ext.cpu_isas():
        monkeypatch.setenv("IGPT_CPU_ISA", isa)
        luts[isa] = ext.build_lut(palette)
    pixels = torch.randint(0, 256, (20000, 3), dtype=torch.uint8)
    expect = _brute(pixels, palette)
    for isa, lut in luts.items():
        assert torch.equal(ext.lut_gather(pixels, lut), expect), isa
