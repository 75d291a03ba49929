"""attention: the reference against float64 definitions, the Triton kernel against the
reference (interpreted on the CPU, compiled on a GPU), and the errors of both."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import poison_allocations, set_autotune

from igpt_kernels import attention, reference
from igpt_kernels._dispatch import triton_interpreting
from igpt_kernels._triton import HAS_TRITON


def _loop_attention(q, k, v, causal, pad, scale):
    """One query at a time in float64: the definition, with no broadcasting tricks."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.zeros(B, H, Nq, D, dtype=torch.float64)
    for b in range(B):
        for i in range(Nq):
            keys = [
                j
                for j in range(Nk)
                if (not causal or j <= i + Nk - Nq) and (pad is None or bool(pad[b, j]))
            ]
            if not keys:
                continue
            s = q[b, :, i, None, :].double() @ k[b][:, keys].double().transpose(-1, -2)
            p = torch.softmax(s * scale, dim=-1)  # (H, 1, len(keys))
            out[b, :, i] = (p @ v[b][:, keys].double())[:, 0]
    return out


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (5, 5), (17, 17), (3, 17), (1, 9)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_reference_matches_definition(Nq, Nk, causal, padded):
    B, H, D = 2, 3, 32
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (Nq, Nk, Nk))
    pad = torch.rand(B, Nk) > 0.3 if padded else None
    if pad is not None:
        pad[1] = False  # a batch row with every key padded: its output must be zero
    o = attention(q, k, v, causal=causal, key_padding_mask=pad, backend="torch")
    expect = _loop_attention(q, k, v, causal, pad, 1 / math.sqrt(D))
    torch.testing.assert_close(o, expect, rtol=1e-12, atol=1e-12)
    if pad is not None:
        assert torch.equal(o[1], torch.zeros_like(o[1]))


def test_reference_matches_sdpa_and_scale():
    q, k, v = (torch.randn(2, 4, 33, 64, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        ours = attention(q, k, v, causal=causal, sm_scale=0.3)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_reference_gradients_finite_with_fully_masked_rows():
    q, k, v = (torch.randn(1, 2, 4, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[False, False, True, True]])
    o = attention(q, k, v, causal=True, key_padding_mask=pad)  # queries 0, 1 see no key
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_keeps_dtype(dtype):
    q = torch.randn(1, 1, 3, 32).to(dtype)
    assert attention(q, q, q).dtype == dtype


def _qkv(shape_q=(1, 2, 4, 32), shape_k=(1, 2, 4, 32), dtype=torch.float32):
    return (
        torch.randn(shape_q, dtype=dtype),
        torch.randn(shape_k, dtype=dtype),
        torch.randn(shape_k, dtype=dtype),
    )


@pytest.mark.parametrize("fn", [attention, reference.attention])
@pytest.mark.parametrize(
    "make,kwargs,exc,words",
    [
        # head_dim 80: every backend but "triton" takes it now (tests/test_reference.py
        # test_triton_refuses_other_head_dims_and_auto_goes_around checks the refusal)
        (lambda: _qkv((1, 2, 5, 32), (1, 2, 4, 32)), {}, ValueError, "Nq=5 > Nk=4"),
        (lambda: _qkv((1, 2, 4, 32), (1, 3, 4, 32)), {}, ValueError, "k must be"),
        (lambda: (torch.randn(2, 4, 32),) * 3, {}, ValueError, "q must have 4 dimensions"),
        (
            lambda: (
                torch.randn(1, 1, 4, 32),
                torch.randn(1, 1, 4, 32).double(),
                torch.randn(1, 1, 4, 32),
            ),
            {},
            TypeError,
            "k must have dtype",
        ),
        (lambda: (torch.zeros(1, 1, 4, 32, dtype=torch.int32),) * 3, {}, TypeError, "q must"),
        (
            lambda: _qkv(),
            {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)},
            ValueError,
            "key_padding_mask must be (B, Nk) = (1, 4)",
        ),
        (lambda: _qkv(), {"key_padding_mask": torch.ones(1, 4)}, TypeError, "key_padding_mask"),
        (lambda: _qkv(), {"sm_scale": -1.0}, ValueError, "sm_scale"),
        (lambda: _qkv(), {"causal": 1}, TypeError, "causal must be a bool"),
        (lambda: ([[1.0]],) * 3, {}, TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input_raises(fn, make, kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fn(*make(), **kwargs)


def test_unknown_backend_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="magic")
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        attention(q, k, v, backend="cuda")


# --------------------------------------------------------------------------------------
# the Triton kernel (interpreted on the CPU, compiled on a GPU)
# --------------------------------------------------------------------------------------

attention_module = importlib.import_module("igpt_kernels.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or (DEVICE == "cpu" and not triton_interpreting()),
    reason="needs Triton (compiled on a GPU, or TRITON_INTERPRET=1 on the CPU)",
)
TOLERANCES = [(torch.float32, 2e-5, 1e-4), (torch.float16, 5e-3, 5e-3)]
MASKS = ["causal", "none", "pad", "causal+pad"]


@pytest.fixture(autouse=True)
def _kernel_test_mode(monkeypatch):
    """Every buffer the kernels write starts as NaN, so a missed element fails the test.

    On a GPU, each kernel runs its default config (quick compiles);
    test_cuda_every_config_is_correct checks the other autotune candidates, and the
    interpreter runs through the autotuner (with its single config).
    """
    poison_allocations(monkeypatch)
    if DEVICE == "cuda":
        set_autotune(monkeypatch, False)


def _inputs(B, H, Nq, Nk, D, mask, dtype, empty_rows=False):
    """Fresh q, k, v and the (causal, key_padding_mask) of a mask kind.

    empty_rows: batch row 1 pads every key, and batch row 0 pads the first keys, so that
    (with causal) its first queries see nothing: those must get zero outputs and gradients.
    """
    q = torch.randn(B, H, Nq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, H, Nk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, H, Nk, D, device=DEVICE, dtype=dtype)
    pad = None
    if "pad" in mask:
        pad = torch.rand(B, Nk, device=DEVICE) > 0.25
        pad[:, -1] = True  # the last key is never padded unless a row is emptied below
        if empty_rows:
            pad[0, : min(3, Nk - 1)] = False
            pad[1] = False
    return q, k, v, "causal" in mask, pad


def _check_against_float64(q, k, v, causal, pad, atol, rtol, sm_scale=None, do=None):
    """Forward and dq, dk, dv of backend='triton' against the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = attention(*leaves, causal=causal, key_padding_mask=pad, sm_scale=sm_scale, backend="triton")
    do = torch.randn_like(o) if do is None else do
    o.backward(do)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = reference.attention(
        *leaves64, causal=causal, key_padding_mask=pad, sm_scale=sm_scale, backend="torch"
    )
    o64.backward(do.double())
    assert o.dtype == q.dtype and o.shape == q.shape
    torch.testing.assert_close(o.double(), o64, atol=atol, rtol=rtol)
    for name, got, expect in zip("qkv", leaves, leaves64, strict=True):
        torch.testing.assert_close(
            got.grad.double(), expect.grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}"
        )
    return o, leaves


# Every (mask, N), (mask, D) and (N, D) pair once, instead of the full cross product.
_SQUARE = [
    (n, d, mask)
    for i, mask in enumerate(MASKS)
    for j, n in enumerate((1, 17, 128, 130))
    for d in [(32, 64, 96, 128)[(i + j) % 4]]
]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("N,D,mask", _SQUARE)
def test_triton_matches_reference(N, D, mask, dtype, atol, rtol):
    B, H = (2, 1) if "pad" in mask else (1, 2)
    q, k, v, causal, pad = _inputs(B, H, N, N, D, mask, dtype)
    _check_against_float64(q, k, v, causal, pad, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize(
    "Nq,Nk,D,mask", [(17, 130, 32, "causal"), (1, 17, 64, "causal+pad"), (5, 128, 96, "none")]
)
def test_triton_fewer_queries_than_keys(Nq, Nk, D, mask, dtype, atol, rtol):
    """Nq < Nk, the KV-cache case: causal is bottom-right aligned. Inputs need grad, so
    even Nq <= 16 takes the main (differentiable) kernel."""
    q, k, v, causal, pad = _inputs(2, 1, Nq, Nk, D, mask, dtype)
    _check_against_float64(q, k, v, causal, pad, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize(
    "Nq,Nk,mask", [(70, 70, "causal+pad"), (17, 40, "causal"), (33, 33, "none")]
)
def test_triton_head_dim_96_split(Nq, Nk, mask, dtype, atol, rtol, monkeypatch):
    """Head dim 96 as 64 + 32 (HD96_SPLIT: two dots, two accumulators) against float64,
    through the main kernel (with its padded backward) and the flash-decoding path."""
    monkeypatch.setattr(attention_module, "HD96_SPLIT", True)
    assert attention_module._head_split(96) == (64, 32)
    q, k, v, causal, pad = _inputs(2, 2, Nq, Nk, 96, mask, dtype)
    _check_against_float64(q, k, v, causal, pad, atol, rtol)
    with torch.no_grad():  # Nq <= 16 and no grad: flash-decoding, split into chunks
        o = attention(q[:, :, -3:], k, v, causal=causal, key_padding_mask=pad, backend="triton")
    o64 = reference.attention(
        q[:, :, -3:].double(), k.double(), v.double(), causal=causal, key_padding_mask=pad
    )
    torch.testing.assert_close(o.double(), o64, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("mask", ["pad", "causal+pad"])
def test_triton_rows_without_keys_are_zero(mask):
    q, k, v, causal, pad = _inputs(2, 2, 17, 17, 32, mask, torch.float32, empty_rows=True)
    o, (dq, dk, dv) = _check_against_float64(q, k, v, causal, pad, 2e-5, 1e-4)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert not dq.grad[1].any() and not dk.grad[1].any() and not dv.grad[1].any()
    if causal:  # batch row 0's first three queries see only its three padded keys
        assert not o[0, :, :3].any() and not dq.grad[0, :, :3].any()


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_triton_strided_inputs_and_scale(dtype, atol, rtol):
    """q, k, v as the model passes them: transposed views of one (B, n, 3d) tensor, and a
    non-contiguous output gradient."""
    B, n, H, D = 2, 33, 2, 64
    qkv = torch.randn(B, n, 3 * H * D, device=DEVICE, dtype=dtype)
    q, k, v = (t.view(B, n, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    do = torch.randn(B, H, D, n, device=DEVICE, dtype=dtype).transpose(-1, -2)
    _check_against_float64(q, k, v, True, None, atol, rtol, sm_scale=0.2, do=do)


@needs_triton
@pytest.mark.parametrize(
    "Nq,blocks,extra,D,mask",
    [(1, 8, 2, 64, "causal"), (5, 6, 4, 32, "causal+pad"), (16, 4, 13, 96, "none")],
)
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_triton_decode_path(Nq, blocks, extra, D, mask, dtype, atol, rtol):
    """Few queries without grad: flash-decoding, keys split across programs, merged.

    Nk = blocks decode key blocks + extra keys (130, 100, 77 under the interpreter, whose
    blocks are 16 keys), so the keys split into several chunks on a GPU too (64-key blocks).
    """
    Nk = blocks * attention_module._DECODE_BLOCK_N + extra
    q, k, v, causal, pad = _inputs(1, 2, Nq, Nk, D, mask, dtype)
    assert attention_module.decode_splits(1, 2, Nq, Nk, torch.device(DEVICE)) > 1
    with torch.no_grad():
        o = attention(q, k, v, causal=causal, key_padding_mask=pad, backend="triton")
    o64 = reference.attention(
        q.double(), k.double(), v.double(), causal=causal, key_padding_mask=pad
    )
    torch.testing.assert_close(o.double(), o64, atol=atol, rtol=rtol)
    pad8 = None if pad is None else pad.to(torch.int8)
    for splits in (1, 3):  # one chunk (no merge) and an uneven split
        o, _ = attention_module._attn_fwd(
            q, k, v, pad8, causal, 1 / math.sqrt(D), num_splits=splits
        )
        torch.testing.assert_close(o.double(), o64, atol=atol, rtol=rtol)


@needs_triton
def test_triton_decode_rows_without_keys_are_zero():
    q, k, v, _, pad = _inputs(2, 1, 3, 70, 32, "pad", torch.float32, empty_rows=True)
    with torch.no_grad():
        o = attention(q, k, v, causal=True, key_padding_mask=pad, backend="triton")
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    o64 = reference.attention(q.double(), k.double(), v.double(), key_padding_mask=pad)
    torch.testing.assert_close(o.double(), o64, atol=2e-5, rtol=1e-4)


@needs_triton
def test_triton_backward_is_deterministic(monkeypatch):
    """Bitwise equal gradients from two runs with the same config (on the CPU, once through
    the autotuner and once without it, both with the one interpreter config)."""
    q, k, v, causal, pad = _inputs(1, 2, 130, 130, 32, "causal+pad", torch.float16)
    grads = []
    for autotune in (DEVICE == "cpu", False):  # the same config both times
        set_autotune(monkeypatch, autotune)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attention(*leaves, causal=causal, key_padding_mask=pad, backend="triton")
        o.sum().backward()  # dO is an expanded ones tensor: every stride is 0
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_decode_splits_heuristic():
    splits = attention_module.decode_splits
    cuda = torch.device("cuda")
    sms = attention_module._sm_count(cuda) if torch.cuda.is_available() else None
    cpu = torch.device("cpu")
    assert splits(1, 1, 17, 4096, cpu) == 1  # too many queries for the decode path
    assert splits(64, 64, 1, 4096, cpu) == 1  # enough (batch, head) pairs to fill the GPU
    assert splits(1, 1, 1, 10, cpu) == 1  # too few keys to be worth a split
    assert 1 < splits(1, 2, 1, 4096, cpu) <= attention_module.MAX_SPLITS
    if sms is not None:
        assert 1 < splits(1, 8, 1, 4096, cuda) <= attention_module.MAX_SPLITS


def test_grid_limits():
    """(batch, head) pairs ride the grid's first axis (2^31 - 1), blocks its second (65535):
    B * H past 65535 (8192 sampled images x 8 heads) is accepted, past 2^31 - 1 refused."""
    check = attention_module.check_grid
    check(8192 * 8, 64)
    check(attention_module.MAX_BATCH_HEADS, attention_module.MAX_GRID_Y)
    with pytest.raises(ValueError, match="B \\* H = 2147483648"):
        check(2**31, 1)
    with pytest.raises(ValueError, match="65536 blocks"):
        check(1, 65536)


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_triton_grid_order_many_heads(causal):
    """Many (batch, head) pairs with several query blocks each: every (bh, block) program
    lands on its own rows (the grid's axis 0 is B * H, axis 1 the blocks, causal reversed)."""
    q, k, v, causal, pad = _inputs(3, 5, 70, 70, 32, "causal" if causal else "none", torch.float32)
    _check_against_float64(q, k, v, causal, pad, 2e-5, 1e-4)


def test_backend_choice_and_reasons():
    q, k, v = _qkv()
    auto = attention(q, k, v, backend="auto")  # CPU tensors: the reference, bit for bit
    assert torch.equal(auto, reference.attention(q, k, v))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    with pytest.raises(ValueError, match="float64 is not a Triton dtype"):
        attention(q64, k64, v64, backend="triton")
    if triton_interpreting():
        bf = [t.bfloat16() for t in (q, k, v)]
        with pytest.raises(ValueError, match="computes bfloat16 wrongly"):
            attention(*bf, backend="triton")
    elif not torch.cuda.is_available() and HAS_TRITON:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            attention(q, k, v, backend="triton")


# --------------------------------------------------------------------------------------
# GPU: accuracy at the iGPT shapes, judged against PyTorch's own error
# --------------------------------------------------------------------------------------

# (B, H, N, D): iGPT-S at 32x32 and 64x64, iGPT-L at 48x48 (head dim 96), iGPT-M at 64x64,
# with B and H cut so that the float64 reference fits in memory.
IGPT_SHAPES = [(4, 8, 1024, 64), (1, 4, 4096, 64), (1, 4, 2304, 96), (1, 4, 4096, 128)]


def _errors(o, grads, o64, grads64):
    return [
        (a.double() - b).abs().max().item()
        for a, b in zip([o, *grads], [o64, *grads64], strict=True)
    ]


def _sdpa(q, k, v, causal, pad):
    mask = None
    if pad is not None:
        mask = reference.attention_mask(q.shape[2], k.shape[2], causal, pad, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and pad is None)


def _run(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return o, [t.grad for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,mask",
    [(shape, "causal") for shape in IGPT_SHAPES]
    + list(zip(IGPT_SHAPES, ["none", "pad", "causal+pad", "none"], strict=True))
    + [((2, 2, 1023, 32), "causal"), ((1, 2, 4095, 64), "none"), ((2, 2, 1000, 128), "causal+pad")],
)
def test_cuda_error_at_most_twice_sdpa(shape, mask, dtype):
    B, H, N, D = shape
    q, k, v, causal, pad = _inputs(B, H, N, N, D, mask, dtype)
    if pad is not None:
        pad[:, 0] = True  # no query without keys: SDPA would give NaN there
    do = torch.randn_like(q)
    o, grads = _run(
        lambda *t: attention(*t, causal=causal, key_padding_mask=pad, backend="triton"), q, k, v, do
    )
    o_pt, grads_pt = _run(lambda *t: _sdpa(*t, causal, pad), q, k, v, do)
    o64, grads64 = _run(
        lambda *t: reference.attention(*t, causal=causal, key_padding_mask=pad),
        *(t.double() for t in (q, k, v, do)),
    )
    ours = _errors(o, grads, o64, grads64)
    theirs = _errors(o_pt, grads_pt, o64, grads64)
    for name, a, b in zip(["o", "dq", "dk", "dv"], ours, theirs, strict=True):
        assert a <= 2 * b + 1e-5, f"{name}: kernel error {a:.3g} > 2 x SDPA's {b:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Nq,Nk,BH", [(1, 4096, (1, 8)), (4, 2304, (2, 16)), (16, 1024, (64, 8))])
def test_cuda_decode_error_at_most_twice_sdpa(Nq, Nk, BH, dtype):
    B, H = BH
    q, k, v, *_ = _inputs(B, H, Nq, Nk, 64, "causal", dtype)
    with torch.no_grad():
        o = attention(q, k, v, causal=True, backend="triton")
        mask = reference.attention_mask(Nq, Nk, True, None, q.device)
        o_pt = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o64 = reference.attention(q.double(), k.double(), v.double(), causal=True)
    ours, theirs = (x.double().sub(o64).abs().max().item() for x in (o, o_pt))
    assert ours <= 2 * theirs + 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("mask", ["causal+pad", "none"])
@pytest.mark.parametrize("D", [64, 96])
@pytest.mark.parametrize("index", range(4))
def test_cuda_every_config_is_correct(index, D, mask, monkeypatch):
    """Each autotune candidate in turn, on awkward sizes (N not a block multiple, Nq < Nk,
    head dim 96 padded to 128)."""
    for tuned in attention_module._TUNED.values():
        chosen = {a: [c[min(index, len(c) - 1)]] for a, c in tuned.by_arch.items()}
        monkeypatch.setattr(tuned, "by_arch", chosen)
    q, k, v, causal, pad = _inputs(2, 3, 257, 301, D, mask, torch.float16)
    _check_against_float64(q, k, v, causal, pad, 1e-2, 1e-2)


@pytest.mark.cuda
def test_cuda_float32_and_auto():
    q, k, v, causal, pad = _inputs(2, 2, 300, 300, 128, "causal+pad", torch.float32)
    _check_against_float64(q, k, v, causal, pad, 1e-4, 1e-4)
    o = attention(q, k, v, causal=causal, key_padding_mask=pad)  # auto -> triton on CUDA
    torch.testing.assert_close(
        o, attention(q, k, v, causal=causal, key_padding_mask=pad, backend="triton")
    )


def _tf32(x):
    """x rounded to TF32 (10 mantissa bits, to nearest with ties away), as cvt.rna.tf32.f32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32x3_matmul(a, b):
    """a @ b the way tf32x3 dots compute it: hi*hi + hi*lo + lo*hi, fp32 accumulation."""
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)


def test_tf32x3_dots_are_about_float32_accurate():
    """fp32 attention runs tf32x3 dots on the GPU. The interpreter ignores input_precision
    (it multiplies in fp32), so this emulates tf32x3's rounding in torch: the attention it
    computes stays within the tolerance the CUDA fp32 test uses (1e-4), as plain fp32 does,
    while single-pass TF32 would not."""
    q, k, v = (torch.randn(2, 2, 300, 128) for _ in range(3))
    o64 = reference.attention(q.double(), k.double(), v.double(), causal=False)

    def attn(matmul):
        p = torch.softmax(matmul(q, k.transpose(-1, -2)) / math.sqrt(128), -1)
        return matmul(p, v).double()

    errors = {
        name: (attn(mm) - o64).abs().max().item()
        for name, mm in [
            ("fp32", torch.matmul),
            ("tf32x3", _tf32x3_matmul),
            ("tf32", lambda a, b: _tf32(a) @ _tf32(b)),
        ]
    }
    assert errors["tf32x3"] < 1e-5 and errors["tf32x3"] < 4 * errors["fp32"] + 1e-6, errors
    assert errors["tf32"] > 1e-4, errors  # the emulation does round: one pass is not enough
