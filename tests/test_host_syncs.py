"""No host syncs on the hot path (issue 31, item 5): GPU ``quantize`` reads its palette's values
once per palette tensor (not on every call), and the transformers patch reads an attention
mask's values once per forward (not per layer) and not at all while ``torch.compile`` traces,
on a fake tensor or while a CUDA graph is captured. On the CPU the GPU path is taken through
the dispatcher's seam (``DISPATCH.device_name``) and reads are counted; the ``cuda`` tests
capture the calls in a CUDA graph, which any host read would break."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from igpt import hf_patch
from igpt_kernels import _dispatch, trust
from igpt_kernels import palette as kp
from igpt_kernels._dispatch import Dispatcher

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.imagegpt.modeling_imagegpt")


def _compiled_module_or_skip():
    if kp.compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8)) is not None:
        pytest.skip("the compiled palette module is not available")


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """The CPU as a GPU for ``quantize``'s checked path, with fresh palette records."""
    d = Dispatcher(device_name=lambda device: "Fake GPU", cache_dir=tmp_path, mode="measure")
    monkeypatch.setattr(_dispatch, "DISPATCH", d)
    monkeypatch.setattr(kp, "_verdicts", {})
    monkeypatch.setattr(kp, "_palettes", type(kp._palettes)())
    return d


@pytest.fixture
def palette_reads(monkeypatch):
    """Counts of host copies (``.cpu()``) and finiteness checks of the palette ``pal``."""
    reads = {"cpu": 0, "isfinite": 0, "pal": None}
    real_cpu, real_isfinite = torch.Tensor.cpu, torch.isfinite

    def ours(t):
        return reads["pal"] is not None and t.data_ptr() == reads["pal"].data_ptr()

    def cpu(self, *args, **kwargs):
        reads["cpu"] += ours(self)
        return real_cpu(self, *args, **kwargs)

    def isfinite(t):
        reads["isfinite"] += ours(t)
        return real_isfinite(t)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch, "isfinite", isfinite)
    return reads


def test_gpu_quantize_reads_its_palette_once_per_tensor(fake_gpu, palette_reads):
    _compiled_module_or_skip()
    pal = torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 255
    pixels = torch.randint(0, 256, (40, 3), dtype=torch.uint8)
    want = trust.exact_tokens(pixels, pal)
    palette_reads["pal"] = pal
    for _ in range(4):
        assert torch.equal(kp.quantize(pixels, pal, lut=False), want)
    assert (palette_reads["cpu"], palette_reads["isfinite"]) == (1, 1)
    pal.add_(0.0)  # an in-place change: the values are read again
    kp.quantize(pixels, pal, lut=False)
    assert (palette_reads["cpu"], palette_reads["isfinite"]) == (2, 2)
    pal[0] = float("nan")  # and checked again: a palette made non-finite in place is refused
    with pytest.raises(ValueError, match="NaN or infinite"):
        kp.quantize(pixels, pal, lut=False)


def test_gpu_quantize_traces_whole_under_compile(fake_gpu):
    _compiled_module_or_skip()
    pal = torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 255
    pixels = torch.randint(0, 256, (40, 3), dtype=torch.uint8)
    want = kp.quantize(pixels, pal, lut=False)  # checked eagerly first: the device is verified

    @torch.compile(fullgraph=True, backend="eager")
    def tokens(px):
        return kp.quantize(px, pal, lut=False)

    assert torch.equal(tokens(pixels), want)


# --------------------------------------------------------------------------------------
# the transformers patch's attention mask
# --------------------------------------------------------------------------------------


def _mask(B=2, Nq=4, Nk=6, pad_last=2):
    keep = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    keep[1, ..., Nk - pad_last :] = False
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_a_mask_is_read_once_per_forward_not_per_layer(monkeypatch):
    real = hf_patch._mask_facts
    reads = []
    monkeypatch.setattr(hf_patch, "_mask_facts", lambda *a: reads.append(1) or real(*a))
    mask = _mask()
    first = hf_patch._padding_from_mask(mask, 4)
    for _layer in range(5):
        assert hf_patch._padding_from_mask(mask, 4) is first
    assert len(reads) == 1 and torch.equal(first[0], mask[:, 0, 0, :] == 0)
    mask.add_(0.0)  # changed in place: read again
    hf_patch._padding_from_mask(mask, 4)
    assert len(reads) == 2


def test_a_patched_forward_reads_its_mask_once(monkeypatch):
    torch.manual_seed(0)
    config = transformers.ImageGPTConfig(
        vocab_size=17, n_positions=64, n_embd=32, n_head=2, n_layer=3,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    model = modeling.ImageGPTForCausalImageModeling(config).eval()
    ids = torch.randint(0, 16, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=attention_mask).logits
        hf_patch.apply_igpt_kernels_to_imagegpt(model, processor=False)
        try:
            real = hf_patch._mask_facts
            reads = []
            monkeypatch.setattr(hf_patch, "_mask_facts", lambda *a: reads.append(1) or real(*a))
            got = model(ids, attention_mask=attention_mask).logits
        finally:
            hf_patch.revert_igpt_kernels_to_imagegpt(model)
    assert len(reads) <= 1  # one per forward (none where transformers passes no mask)
    torch.testing.assert_close(got[attention_mask.bool()], want[attention_mask.bool()])


def test_a_mask_is_never_read_while_tracing_or_on_a_fake_tensor():
    mask = _mask()

    @torch.compile(fullgraph=True, backend="eager")  # a host read breaks the graph: an error
    def traced(m):
        kpm, why = hf_patch._padding_from_mask(m, 4)
        return m + 1 if kpm is None else kpm

    torch.testing.assert_close(traced(mask), mask + 1)  # transformers' attention takes it
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(mask)
        kpm, why = hf_patch._padding_from_mask(fake, 4)
    assert kpm is None and "not read" in why


# --------------------------------------------------------------------------------------
# on a GPU: under CUDA graph capture
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_quantize_is_captured_in_a_cuda_graph():
    why = kp.compiled_unavailable("cuda", torch.zeros(1, 3, dtype=torch.uint8, device="cuda"))
    if why is not None:
        pytest.skip(why)
    pal = torch.rand(64, 3, device="cuda") * 255
    pixels = torch.randint(0, 256, (4096, 3), dtype=torch.uint8, device="cuda")
    want = kp.quantize(pixels, pal, lut=False)  # first sight: checked, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = kp.quantize(pixels, pal, lut=False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_cuda_mask_checks_are_captured_in_a_cuda_graph():
    mask = _mask().cuda()
    seen = hf_patch._padding_from_mask(mask, 4)  # read once, outside capture
    fresh = _mask().cuda()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        again = hf_patch._padding_from_mask(mask, 4)
        kpm, why = hf_patch._padding_from_mask(fresh, 4)  # unseen: not read, HF's attention
    assert again is seen and kpm is None and "captured" in why
