"""The references and the PyTorch backends ("sdpa", "cublas"): any head dim, NaN propagation,
refused scales, integer token dtypes, and tracing under torch.compile(fullgraph=True)."""

import importlib
import math

import pytest
import torch
from test_attention import _loop_attention  # the definition, one query at a time
from test_ln_mlp import _grads, _weights

from igpt_kernels import attention, dequantize, ln_linear, ln_mlp, reference
from igpt_kernels._dispatch import triton_interpreting
from igpt_kernels._triton import HAS_TRITON

attention_module = importlib.import_module("igpt_kernels.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or (DEVICE == "cpu" and not triton_interpreting()),
    reason="needs Triton (compiled on a GPU, or TRITON_INTERPRET=1 on the CPU)",
)
MASKS = ["causal", "none", "pad", "causal+pad"]


def _inputs(B, H, Nq, Nk, D, mask, dtype=torch.float64, device="cpu", empty_rows=False):
    q = torch.randn(B, H, Nq, D, dtype=dtype, device=device)
    k = torch.randn(B, H, Nk, D, dtype=dtype, device=device)
    v = torch.randn(B, H, Nk, D, dtype=dtype, device=device)
    pad = None
    if "pad" in mask:
        pad = torch.rand(B, Nk, device=device) > 0.3
        pad[:, -1] = True
        if empty_rows:
            pad[-1] = False  # the last batch row sees no key at all
    return q, k, v, "causal" in mask, pad


# --------------------------------------------------------------------------------------
# any head dim, on the reference and on "sdpa"
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 7, 16, 80])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("Nq,Nk", [(6, 6), (3, 9), (1, 9)])
def test_any_head_dim_matches_definition(D, mask, backend, Nq, Nk):
    q, k, v, causal, pad = _inputs(2, 2, Nq, Nk, D, mask, empty_rows=True)
    o = attention(q, k, v, causal=causal, key_padding_mask=pad, backend=backend)
    expect = _loop_attention(q, k, v, causal, pad, 1 / math.sqrt(D))
    torch.testing.assert_close(o, expect, rtol=1e-10, atol=1e-10)
    if pad is not None:
        assert torch.equal(o[-1], torch.zeros_like(o[-1]))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("Nq,Nk", [(17, 17), (5, 17)])
def test_sdpa_backend_gradients_match_float64(mask, Nq, Nk):
    """float32 on "sdpa" against the float64 reference, forward and every gradient; rows that
    see no key have zero output and zero gradients."""
    q, k, v, causal, pad = _inputs(2, 2, Nq, Nk, 16, mask, torch.float32, DEVICE, True)
    do = torch.randn_like(q)
    out = []
    for backend, dtype in (("sdpa", torch.float32), ("torch", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = attention(*leaves, causal=causal, key_padding_mask=pad, sm_scale=0.3, backend=backend)
        o.backward(do.to(dtype))
        out.append([o.detach(), *(t.grad for t in leaves)])
    for name, got, want in zip(["o", "dq", "dk", "dv"], *out, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4, msg=name)
    if pad is not None:
        o, dq = out[0][0], out[0][1]
        assert not o[-1].any() and not dq[-1].any()
        assert torch.isfinite(out[0][2]).all() and torch.isfinite(out[0][3]).all()


@pytest.mark.parametrize("mask", ["causal", "none"])
def test_sdpa_flash_kernel_alone(mask):
    """One SDPA kernel by name, as "auto" times it ("sdpa-flash" is the CPU's fused kernel
    here), with bottom-right causal on Nq < Nk."""
    q, k, v, causal, _ = _inputs(1, 2, 4, 11, 32, mask, torch.float32, DEVICE)
    if DEVICE == "cuda":
        q, k, v = q.half(), k.half(), v.half()
    o = attention_module.run_backend("sdpa-flash", q, k, v, causal, None, 0.25)
    expect = _loop_attention(q.cpu(), k.cpu(), v.cpu(), causal, None, 0.25)
    torch.testing.assert_close(o.double().cpu(), expect, atol=2e-3, rtol=2e-3)


def test_triton_refuses_other_head_dims_and_auto_goes_around():
    """Replaces the head_dim 80 cases of test_attention.py::test_bad_input_raises: only the
    Triton backend keeps its list of head dims."""
    q, k, v = (torch.randn(1, 2, 4, 80, device=DEVICE) for _ in range(3))
    for fn in (attention, reference.attention):  # auto and the reference take it
        assert fn(q, k, v).shape == q.shape
    if HAS_TRITON:
        with pytest.raises(ValueError, match="head_dim 80 is not supported by the Triton kernel"):
            attention(q, k, v, backend="triton")


def test_small_transformers_imagegpt_runs():
    """n_embd=64, n_head=4: head dim 16, which the CPU refused before."""
    transformers = pytest.importorskip("transformers")
    from igpt.hf import from_hf

    cfg = transformers.ImageGPTConfig(
        vocab_size=17, n_positions=16, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )  # fmt: skip
    hf = transformers.ImageGPTForCausalImageModeling(cfg).eval()
    ours = from_hf(hf).eval()
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        expect = hf(input_ids=torch.cat([torch.full((2, 1), 16), x[:, :-1]], 1)).logits
        torch.testing.assert_close(ours(x), expect, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# NaN propagates; bad scales are refused
# --------------------------------------------------------------------------------------


def _backends(dtype):
    names = ["torch", "sdpa"]
    if HAS_TRITON and (DEVICE == "cuda" or triton_interpreting()) and dtype != torch.float64:
        names.append("triton")
    return names


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_on_every_backend(mask, dtype, where):
    q, k, v, causal, pad = _inputs(2, 1, 20, 20, 32, mask, dtype, DEVICE)
    if pad is not None:
        pad[:, :4] = True  # query 3 sees keys 0..3 in every case
    {"q": q, "k": k, "v": v}[where][0, 0, 3, 5] = float("nan")
    for backend in _backends(dtype):
        o = attention(q, k, v, causal=causal, key_padding_mask=pad, backend=backend)
        hit = o[0, 0, 3, 5:6] if where == "v" else o[0, 0, 3]  # a NaN in v: its column only
        assert hit.isnan().all(), (backend, "the row that attends the NaN")
        if where == "q":
            others = torch.cat([o[0, 0, :3], o[0, 0, 4:], o[1].flatten(0, 1)])
            assert torch.isfinite(others).all(), (backend, "rows that never meet the NaN")


def test_large_finite_half_queries_stay_finite_on_sdpa():
    """The NaN check sums each query row; in float16 a row of 600s (sum 76800) would
    overflow to inf and turn into a false NaN."""
    q = torch.full((1, 1, 4, 128), 600.0, dtype=torch.float16, device=DEVICE)
    k, v = (torch.randn(1, 1, 4, 128, device=DEVICE).half() for _ in range(2))
    for pad in (None, torch.tensor([[True, True, False, True]], device=DEVICE)):
        o = attention(q, k, v, key_padding_mask=pad, backend="sdpa")
        assert torch.isfinite(o).all()


@pytest.mark.parametrize(
    "value,exc",
    [
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (0.0, ValueError),
        (-0.5, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (torch.tensor(0.1), TypeError),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "sdpa", "auto"])
def test_bad_sm_scale_is_refused(value, exc, backend):
    q = torch.randn(1, 1, 3, 32)
    with pytest.raises(exc, match="sm_scale must be a positive finite number"):
        attention(q, q, q, sm_scale=value, backend=backend)
    with pytest.raises(exc, match="sm_scale"):
        reference.attention(q, q, q, sm_scale=value)


def test_number_like_sm_scale_is_taken():
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 1, 3, 32, dtype=torch.float64)
    torch.testing.assert_close(
        attention(q, q, q, sm_scale=np.float64(0.5)), attention(q, q, q, sm_scale=0.5)
    )


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1.0, "1e-5"])
def test_bad_eps_is_refused(eps):
    x = torch.randn(3, 32)
    w = dict(norm_weight=None, norm_bias=None, fc_weight=torch.randn(64, 32), fc_bias=None)
    with pytest.raises((ValueError, TypeError), match="eps must be a positive finite number"):
        ln_mlp(x, **w, proj_weight=torch.randn(32, 64), proj_bias=None, eps=eps)
    with pytest.raises((ValueError, TypeError), match="eps must be"):
        ln_linear(x, None, None, torch.randn(96, 32), None, eps=eps)


# --------------------------------------------------------------------------------------
# dequantize and the colour limit
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", reference.INT_DTYPES)
def test_dequantize_takes_every_integer_dtype(dtype):
    palette = torch.rand(100, 3) * 255  # ids that fit int8 too
    ids = torch.tensor([[0, 7], [99, 50]])
    got = dequantize(ids.to(dtype), palette)
    assert torch.equal(got, palette.round().to(torch.uint8)[ids])
    too_big = torch.tensor([0, 100]).to(dtype)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 100\).*\[0, 100\]"):
        dequantize(too_big, palette)


def test_dequantize_refuses_non_integer_tokens():
    palette = torch.rand(4, 3) * 255
    for tokens in (torch.zeros(3), torch.zeros(3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="tokens must be an integer tensor"):
            dequantize(tokens, palette)
    with pytest.raises(ValueError, match=r"got values in \[-1, 0\]"):
        dequantize(torch.tensor([-1, 0], dtype=torch.int16), palette)


def test_one_colour_limit_fits_uint16_tokens():
    assert reference.MAX_COLORS == 65536 == torch.iinfo(torch.uint16).max + 1
    reference.check_palette(torch.zeros(reference.MAX_COLORS, 3))
    with pytest.raises(ValueError, match="1 <= K <= 65536"):
        reference.check_palette(torch.zeros(reference.MAX_COLORS + 1, 3))


# --------------------------------------------------------------------------------------
# ln_mlp's "cublas" backend (replaces the _variant="cublas" tests of test_ln_mlp.py)
# --------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "shape,norm,activation,biases,residual,dtype,tol",
    [
        ((7, 48), "layer", "gelu", True, False, torch.float32, (1e-5, 1e-4)),
        ((130, 96), "rms", "gelu", False, True, torch.float32, (1e-5, 1e-4)),
        ((7, 96), "rms", "quick_gelu", True, False, torch.float16, (4e-3, 1e-2)),
    ],
)
def test_cublas_backend_matches_float64(shape, norm, activation, biases, residual, dtype, tol):
    d = shape[-1]
    x, dy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = _weights(d, 4 * d, norm=norm, biases=biases)
    opts = dict(norm=norm, activation=activation, residual=residual)
    ref = _grads(ln_mlp, x, w, dy, **opts, backend="torch")
    low = {k: None if t is None else t.to(DEVICE, dtype) for k, t in w.items()}
    out = _grads(ln_mlp, x.to(DEVICE, dtype), low, dy.to(DEVICE), **opts, backend="cublas")
    atol, rtol = tol
    for name, r in ref.items():
        assert out[name].dtype == dtype, name
        scale = r.abs().max().item()
        torch.testing.assert_close(
            out[name].cpu().double(), r, atol=atol * scale, rtol=rtol, msg=name
        )


def test_cublas_backend_refuses_what_it_cannot_run():
    w = {k: None if t is None else t for k, t in _weights(32, 64).items()}
    with pytest.raises(ValueError, match="backend='cublas'.*float64 has no Triton kernel"):
        ln_mlp(torch.randn(3, 32, dtype=torch.float64), **w, backend="cublas")
    with pytest.raises(TypeError, match="_variant"):
        ln_mlp(torch.randn(3, 32, dtype=torch.float64), **w, _variant="cublas")
    with pytest.raises(ValueError, match="ln_linear has no 'cublas' backend"):
        ln_linear(torch.randn(3, 32), None, None, torch.randn(96, 32), None, backend="cublas")


@pytest.mark.cuda
@pytest.mark.parametrize("d", [512, 1024])
def test_cuda_cublas_bf16_error_at_most_twice_eager(d):
    x = torch.randn(8192, d, dtype=torch.float64, device="cuda")
    w = {k: None if t is None else t.cuda() for k, t in _weights(d, 4 * d).items()}
    dy = torch.randn_like(x)
    ref = _grads(ln_mlp, x, w, dy, backend="torch")
    low = {k: None if t is None else t.bfloat16() for k, t in w.items()}
    eager = _grads(ln_mlp, x.bfloat16(), low, dy, backend="torch")
    ours = _grads(ln_mlp, x.bfloat16(), low, dy, backend="cublas")
    for name, r in ref.items():
        err = (ours[name].double() - r).abs().max().item()
        eager_err = (eager[name].double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-6, (name, err, eager_err)


@pytest.mark.cuda
def test_cuda_cublas_autocast_error_at_most_twice_eager():
    x = torch.randn(4096, 512, dtype=torch.float64, device="cuda")
    w = {k: None if t is None else t.cuda() for k, t in _weights(512, 2048, norm="layer").items()}
    dy = torch.randn_like(x)
    ref = _grads(ln_mlp, x, w, dy, norm="layer", backend="torch")
    w32 = {k: None if t is None else t.float() for k, t in w.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _grads(ln_mlp, x.float(), w32, dy, norm="layer", backend="torch")
        ours = _grads(ln_mlp, x.float(), w32, dy, norm="layer", backend="cublas")
    for name, r in ref.items():
        assert ours[name].dtype == eager[name].dtype, name
        err = (ours[name].double() - r).abs().max().item()
        eager_err = (eager[name].double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-6, (name, err, eager_err)


@pytest.mark.cuda
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kernel", ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa", "triton"])
@pytest.mark.parametrize("Nq,Nk", [(257, 257), (100, 301)])
def test_cuda_every_backend_has_igpt_mask_semantics(kernel, mask, Nq, Nk):
    """Each SDPA kernel where sdpa_kernel_reason admits it: bottom-right causal, padding,
    rows with no key (zeros) and NaN propagation, against the float64 reference."""
    q, k, v, causal, pad = _inputs(2, 2, Nq, Nk, 64, mask, torch.float16, "cuda", True)
    name = kernel.removeprefix("sdpa-")
    if kernel.startswith("sdpa-") and attention_module.sdpa_kernel_reason(name, q, k, causal, pad):
        pytest.skip(f"{kernel} is not eligible for {mask}")
    do = torch.randn_like(q)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = attention_module.run_backend(kernel, *leaves, causal, pad, 0.125)
    o.backward(do)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = reference.attention(*leaves64, causal=causal, key_padding_mask=pad, sm_scale=0.125)
    o64.backward(do.double())
    grads, grads64 = [t.grad for t in leaves], [t.grad for t in leaves64]
    for got, want in zip([o, *grads], [o64, *grads64], strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)
    q[0, 0, -1, 0] = float("nan")
    with torch.no_grad():
        assert (
            attention_module.run_backend(kernel, q, k, v, causal, pad, 0.125)[0, 0, -1]
            .isnan()
            .all()
        )


# --------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) traces the references and the dispatch, on the CPU
# --------------------------------------------------------------------------------------


def _compiled_matches_eager(fn, inputs):
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = f(*leaves)
        out.backward(
            torch.ones_like(out) + 0.5 * torch.arange(out.numel()).view(out.shape) / out.numel()
        )
        results.append([out.detach(), *(t.grad for t in leaves if t.requires_grad)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", ["causal", "none", "causal+pad"])
def test_attention_traces_under_compile_fullgraph(mask):
    torch._dynamo.reset()
    q, k, v, causal, pad = _inputs(2, 2, 8, 8, 16, mask, torch.float32)

    def fn(q, k, v):
        return attention(q, k, v, causal=causal, key_padding_mask=pad)

    _compiled_matches_eager(fn, [q, k, v])


def test_ln_mlp_and_dequantize_trace_under_compile_fullgraph():
    torch._dynamo.reset()
    w = _weights(16, 32, dtype=torch.float32, norm="layer")

    def fn(x, nw, nb, w1, b1, w2, b2):
        return ln_mlp(x, nw, nb, w1, b1, w2, b2, norm="layer", activation="gelu") + ln_linear(
            x, nw, nb, w1[:16], None, norm="layer"
        )

    _compiled_matches_eager(fn, [torch.randn(5, 16), *w.values()])
    palette = torch.rand(10, 3) * 255
    tokens = torch.tensor([0, 9, 3], dtype=torch.int32)
    compiled = torch.compile(lambda t: dequantize(t, palette), fullgraph=True)
    assert torch.equal(compiled(tokens), dequantize(tokens, palette))
