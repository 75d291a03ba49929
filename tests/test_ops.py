"""The kernels as torch.library custom ops (each registered beside its launcher): opcheck on
every op, and torch.compile(fullgraph=True) / torch.export of a whole IGPT with the kernels
as single nodes, plus meta-device and FakeTensor shape propagation.

On the CPU the Triton ops run under TRITON_INTERPRET=1 (conftest); the model tests force
``backend="auto"`` onto them with a dispatcher that treats the CPU as a GPU ("fixed" mode:
Triton where it can run), and also run the default CPU path (the plain-PyTorch reference).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, needs_triton
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode

from igpt import IGPT, IGPTConfig
from igpt_kernels import _dispatch, reference
from igpt_kernels.ln_linear import ln_linear_op
from igpt_kernels.ln_mlp import ln_mlp_op

FORWARD_OPS = {"igpt.attention.default", "igpt.ln_mlp.default"}
BACKWARD_OPS = {"igpt.attention_backward.default", "igpt.ln_mlp_backward.default"}


def _opcheck(op, args):
    torch.library.opcheck(op, args)  # raises OpCheckError on any failed sub-test


# --------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake tensors, AOT dispatch (static and dynamic)
# --------------------------------------------------------------------------------------


def _attention_inputs(Nq, Nk, dtype, mask, D=32):
    q = torch.randn(2, 2, Nq, D, dtype=dtype, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, Nk, D, dtype=dtype, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 2, Nk, D, dtype=dtype, device=DEVICE, requires_grad=True)
    pad = None
    if "pad" in mask:
        pad = torch.rand(2, Nk, device=DEVICE) > 0.3
        pad[:, -1] = True
    return q, k, v, pad, "causal" in mask


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask,Nq,Nk", [("causal", 8, 8), ("none", 8, 8), ("causal+pad", 5, 9)])
def test_opcheck_attention(dtype, mask, Nq, Nk):
    q, k, v, pad, causal = _attention_inputs(Nq, Nk, dtype, mask)
    _opcheck(torch.ops.igpt.attention.default, (q, k, v, pad, causal, 0.25))
    o, lse = torch.ops.igpt.attention(q, k, v, pad, causal, 0.25)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    # what the op computes is igpt's attention (the kernel tests check it in detail)
    expect = reference.attention(q, k, v, causal=causal, key_padding_mask=pad, sm_scale=0.25)
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(o, expect, atol=tol, rtol=tol)
    detached = [t.detach() for t in (q, k, v, o)]
    do = torch.randn_like(o)
    args = (do, *detached, lse, pad, causal, 0.25)
    _opcheck(torch.ops.igpt.attention_backward.default, args)
    _opcheck(torch.ops.igpt.attention_decode.default, (*detached[:3], pad, causal, 0.25, 2))


def _ln_mlp_args(dtype, norm, with_bias, T=12, d=16, h=32):
    def p(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype, device=DEVICE)).requires_grad_()

    x2 = p(T, d)
    nw = p(d)
    nb = p(d) if norm == "layer" else None
    b1, b2 = (p(h), p(d)) if with_bias else (None, None)
    return x2, nw, nb, p(h, d, scale=0.2), b1, p(d, h, scale=0.2), b2


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["fused", "cublas"])
@pytest.mark.parametrize(
    "norm,with_bias,residual", [("rms", False, True), ("layer", True, False), ("layer", True, True)]
)
@pytest.mark.slow
def test_opcheck_ln_mlp(dtype, variant, norm, with_bias, residual):
    args = _ln_mlp_args(dtype, norm, with_bias)
    opts = (norm, 1e-5, "quick_gelu", residual, variant)
    _opcheck(torch.ops.igpt.ln_mlp.default, (*args, *opts, True))
    inference = [None if t is None else t.detach() for t in args]  # needs_grad=False: no grad
    _opcheck(torch.ops.igpt.ln_mlp.default, (*inference, *opts, False))
    y = ln_mlp_op(*args, *opts, True)[0]
    expect = reference.ln_mlp(*args, norm=norm, eps=1e-5, residual=residual)
    tol = 5e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y, expect, atol=tol, rtol=tol)
    # the backward op, with some gradients not asked for
    x2, nw, nb, w1, b1, w2, b2 = (None if t is None else t.detach() for t in args)
    _, mean, rstd, z = torch.ops.igpt.ln_mlp(x2, nw, nb, w1, b1, w2, b2, *opts, True)
    dy = torch.randn_like(y)
    need = [True, True, nb is not None, False, with_bias, True, False]
    saved = (dy, x2, mean, rstd, z, nw, nb, w1, w2, norm, "quick_gelu", residual, variant)
    _opcheck(torch.ops.igpt.ln_mlp_backward.default, (*saved, with_bias, with_bias, need))


@needs_triton
def test_backward_of_an_inference_forward_raises():
    """needs_grad=False saves nothing: differentiating it is refused, not read out of bounds."""
    args = _ln_mlp_args(torch.float32, "rms", False)
    y = ln_mlp_op(*args, "rms", 1e-5, "quick_gelu", True, "fused", False)[0]
    with pytest.raises(ValueError, match="needs_grad=False"):
        y.sum().backward()
    x2, nw, nb, w, b, _, _ = _ln_mlp_args(torch.float32, "layer", True)
    y = ln_linear_op(x2, nw, nb, w, b, "layer", 1e-5, False)[0]
    with pytest.raises(ValueError, match="needs_grad=False"):
        y.sum().backward()


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_opcheck_ln_linear(dtype, norm):
    x2, nw, nb, w, b, _, _ = _ln_mlp_args(dtype, norm, True)
    _opcheck(torch.ops.igpt.ln_linear.default, (x2, nw, nb, w, b, norm, 1e-5, True))
    inference = [None if t is None else t.detach() for t in (x2, nw, nb, w, b)]
    _opcheck(torch.ops.igpt.ln_linear.default, (*inference, norm, 1e-5, False))
    y, mean, rstd = torch.ops.igpt.ln_linear(x2, nw, nb, w, b, norm, 1e-5, True)
    expect = reference.ln_linear(x2, nw, nb, w, b, norm=norm, eps=1e-5)
    tol = 5e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y, expect, atol=tol, rtol=tol)
    args = [t.detach() for t in (torch.randn_like(y), x2, mean, rstd)]
    w_args = [None if t is None else t.detach() for t in (nw, nb, w)]
    need = [True, False, nb is not None, True, True]
    _opcheck(torch.ops.igpt.ln_linear_backward.default, (*args, *w_args, norm, True, need))


def _compiled_palette_available():
    from igpt_kernels import palette

    return palette.compiled_unavailable("cpu", torch.zeros(1, 3, dtype=torch.uint8)) is None


@pytest.mark.skipif(not _compiled_palette_available(), reason="igpt_kernels._C is not built")
@pytest.mark.parametrize("lut", [False, True, None])
def test_opcheck_quantize(lut):
    palette = torch.rand(16, 3) * 255
    pixels = torch.randint(0, 256, (3, 5, 3), dtype=torch.uint8)
    _opcheck(torch.ops.igpt.quantize.default, (pixels, palette, lut))
    tokens = torch.ops.igpt.quantize(pixels, palette, lut)
    assert torch.equal(tokens, reference.quantize(pixels, palette))


def test_quantize_compiles_as_one_node():
    if not _compiled_palette_available():
        pytest.skip("igpt_kernels._C is not built")
    from igpt_kernels import quantize

    torch._dynamo.reset()
    palette = torch.rand(16, 3) * 255
    pixels = torch.randint(0, 256, (4, 3), dtype=torch.uint8)
    graphs = []

    def grab(gm, inputs):
        graphs.append(gm)
        return gm

    fn = torch.compile(lambda p: quantize(p, palette, backend="cpu"), fullgraph=True, backend=grab)
    assert torch.equal(fn(pixels), reference.quantize(pixels, palette))
    (graph,) = graphs
    assert _igpt_nodes(graph) == {"igpt.quantize.default": 1}


# --------------------------------------------------------------------------------------
# whole models: compile, export, meta and fake tensors
# --------------------------------------------------------------------------------------


class _Verified(_dispatch.Dispatcher):
    """A dispatcher whose table says PyTorch verified every kernel for every kind of call
    (what ``igpt selftest`` and earlier measured calls record on a real GPU)."""

    @staticmethod
    def trusted(entry, name, safe) -> bool:
        return True


def _force_triton(monkeypatch):
    """Make ``backend="auto"`` take the Triton ops: a fixed-mode dispatcher (Triton where it
    can run and verified, here everywhere) that treats the CPU as a GPU under the
    interpreter."""
    if DEVICE == "cpu":
        if not _triton_interpreting():
            pytest.skip("needs Triton and TRITON_INTERPRET=1 on the CPU")
        dispatcher = _Verified(
            device_name=lambda device: "interpreter", mode="fixed", cache_dir=False
        )
    else:
        dispatcher = _Verified(mode="fixed", cache_dir=False)
    monkeypatch.setattr(_dispatch, "DISPATCH", dispatcher)


@pytest.fixture(params=["triton", "reference"])
def kernels(request, monkeypatch):
    """Which kernels ``backend="auto"`` takes: "triton" (``_force_triton``) or "reference"
    (the default CPU path)."""
    if request.param == "triton":
        _force_triton(monkeypatch)
    return request.param


def _triton_interpreting():
    from igpt_kernels._triton import HAS_TRITON

    return HAS_TRITON and _dispatch.triton_interpreting()


def _tiny(**overrides):
    fields = dict(n_px=4, n_layer=2, n_head=1, n_embd=32, n_colors=16, **overrides)
    with torch.device(DEVICE):
        model = IGPT(IGPTConfig(**fields))
    torch.nn.init.normal_(model.lm_head.weight, 0.0, 0.5)  # the zero init hides the trunk
    return model


def _igpt_nodes(gm) -> dict:
    return dict(
        collections.Counter(
            str(n.target) for n in gm.graph.nodes if str(n.target).startswith("igpt.")
        )
    )


def _grads(model, logits, tokens):
    model.zero_grad()
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bert", [False, True])
def test_compile_fullgraph_forward_backward_equal_eager(kernels, bert):
    torch._dynamo.reset()
    model = _tiny()
    tokens = torch.randint(0, 16, (2, 16), device=DEVICE)
    mask = torch.rand(2, 16, device=DEVICE) < 0.3 if bert else None
    graphs = []

    def grab(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=grab, bw_compiler=grab)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = compiled(tokens, mask)
    expect = model(tokens, mask)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model, got, tokens), _grads(model, expect, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    forward, backward = graphs
    L = model.config.n_layer
    if kernels == "triton":
        # each kernel call is one node, forward and backward
        assert _igpt_nodes(forward) == {op: L for op in FORWARD_OPS}
        assert _igpt_nodes(backward) == {op: L for op in BACKWARD_OPS}
    else:
        assert _igpt_nodes(forward) == {} and _igpt_nodes(backward) == {}


@pytest.mark.slow
def test_compile_inductor_with_triton_ops(monkeypatch):
    """inductor calls the custom ops as extern kernels and generates the rest (the reference
    path under inductor is tests/test_model.py's)."""
    _force_triton(monkeypatch)
    torch._dynamo.reset()
    model = _tiny()
    tokens = torch.randint(0, 16, (2, 16), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(tokens)
    expect = model(tokens)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    for a, b in zip(_grads(model, got, tokens), _grads(model, expect, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_export_forward_and_training_graph_equal_eager(kernels):
    model = _tiny()
    tokens = torch.randint(0, 16, (2, 16), device=DEVICE)
    exported = torch.export.export(model, (tokens,))
    L = model.config.n_layer
    if kernels == "triton":
        assert _igpt_nodes(exported.graph_module) == {op: L for op in FORWARD_OPS}
    else:
        assert _igpt_nodes(exported.graph_module) == {}
    got = exported.module()(tokens)
    expect = model(tokens)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    # the default export is the training IR: gradients flow through the exported module
    # (its parameters are the model's own) via the ops' registered autograd
    for a, b in zip(_grads(model, got, tokens), _grads(model, expect, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the inference IR keeps the kernels as single nodes too
    decomposed = exported.run_decompositions()
    if kernels == "triton":
        assert _igpt_nodes(decomposed.graph_module) == {op: L for op in FORWARD_OPS}
    torch.testing.assert_close(decomposed.module()(tokens), expect, rtol=1e-5, atol=1e-6)


def test_meta_device_model():
    cfg = IGPTConfig(n_px=8, n_layer=2, n_head=2, n_embd=64, n_colors=16)
    with torch.device("meta"):
        model = IGPT(cfg)
        tokens = torch.zeros(3, 40, dtype=torch.long)
        logits = model(tokens)
        mask = torch.zeros(3, 40, dtype=torch.bool)
        bert = model(tokens, mask)
    assert logits.device.type == "meta" and logits.shape == (3, 40, 16)
    assert bert.shape == (3, 40, 16)


def test_meta_tensors_through_the_ops():
    q = torch.empty(2, 3, 5, 64, device="meta", dtype=torch.float16)
    k = torch.empty(2, 3, 9, 64, device="meta", dtype=torch.float16)
    o, lse = torch.ops.igpt.attention(q, k, k, None, True, 0.125)
    assert (o.shape, o.dtype, lse.shape, lse.dtype) == (
        q.shape,
        torch.float16,
        (2, 3, 5),
        torch.float32,
    )
    x2 = torch.empty(7, 64, device="meta")
    w1, w2 = torch.empty(256, 64, device="meta"), torch.empty(64, 256, device="meta")
    y, mean, rstd, z = torch.ops.igpt.ln_mlp(
        x2, None, None, w1, None, w2, None, "layer", 1e-5, "gelu", True, "fused", True
    )
    assert [tuple(t.shape) for t in (y, mean, rstd, z)] == [(7, 64), (7,), (7,), (7, 256)]
    pixels = torch.empty(4, 6, 3, dtype=torch.uint8, device="meta")
    tokens = torch.ops.igpt.quantize(pixels, torch.empty(16, 3, device="meta"), None)
    assert tokens.shape == (4, 6) and tokens.dtype == torch.int64


def test_fake_tensor_model(kernels):
    """FakeTensorMode propagates shapes through the model, on the Triton ops' fake impls
    (kernels="triton") or the reference."""
    with FakeTensorMode():
        model = _tiny()
        tokens = torch.zeros(2, 16, dtype=torch.long, device=DEVICE)
        logits = model(tokens)
        logits.sum().backward()
        assert logits.shape == (2, 16, 16)
        assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_fake_tensor_quantize():
    if not _compiled_palette_available():
        pytest.skip("igpt_kernels._C is not built")
    from igpt_kernels import quantize

    with FakeTensorMode():
        pixels = torch.zeros(2, 7, 3, dtype=torch.uint8)
        tokens = quantize(pixels, torch.zeros(16, 3), backend="cpu")
        assert tokens.shape == (2, 7) and tokens.dtype == torch.int64
