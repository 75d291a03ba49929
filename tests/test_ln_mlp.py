"""ln_mlp: the reference against an independent float64 computation, and its errors."""

import importlib

import pytest
import torch
from kernel_utils import poison_allocations, saved_bytes, set_autotune

from igpt_kernels import ln_gemm, ln_mlp, reference


def _weights(d, h, dtype=torch.float64, norm="rms", biases=True):
    w = dict(
        norm_weight=1 + 0.1 * torch.randn(d, dtype=dtype),
        norm_bias=0.1 * torch.randn(d, dtype=dtype) if norm == "layer" and biases else None,
        fc_weight=torch.randn(h, d, dtype=dtype) / d**0.5,
        fc_bias=0.1 * torch.randn(h, dtype=dtype) if biases else None,
        proj_weight=torch.randn(d, h, dtype=dtype) / h**0.5,
        proj_bias=0.1 * torch.randn(d, dtype=dtype) if biases else None,
    )
    return w


def _by_hand(x, w, norm, eps, activation, residual):
    if norm == "rms":
        n = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w["norm_weight"]
    else:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        n = (x - mu) / torch.sqrt(var + eps) * w["norm_weight"]
        if w["norm_bias"] is not None:
            n = n + w["norm_bias"]
    a = n @ w["fc_weight"].T + (0 if w["fc_bias"] is None else w["fc_bias"])
    if activation == "quick_gelu":
        a = a / (1 + torch.exp(-1.702 * a))
    else:
        a = 0.5 * a * (1 + torch.erf(a / 2**0.5))
    y = a @ w["proj_weight"].T + (0 if w["proj_bias"] is None else w["proj_bias"])
    return x + y if residual else y


@pytest.mark.parametrize("shape", [(1, 32), (7, 48), (2, 5, 96)])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("biases,residual", [(True, True), (False, False)])
def test_reference_matches_definition(shape, norm, activation, biases, residual):
    d = shape[-1]
    x = torch.randn(shape, dtype=torch.float64)
    w = _weights(d, 4 * d, norm=norm, biases=biases)
    y = ln_mlp(x, **w, norm=norm, eps=1e-5, activation=activation, residual=residual)
    torch.testing.assert_close(
        y, _by_hand(x, w, norm, 1e-5, activation, residual), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_keeps_dtype(dtype):
    w = {k: None if v is None else v.to(dtype) for k, v in _weights(32, 64).items()}
    assert ln_mlp(torch.randn(3, 32).to(dtype), **w).dtype == dtype


@pytest.mark.parametrize("fn", [ln_mlp, reference.ln_mlp])
@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"fc_weight": torch.randn(64, 31)}, ValueError, "fc_weight must have shape"),
        ({"proj_weight": torch.randn(64, 32)}, ValueError, "proj_weight must have shape"),
        ({"fc_bias": torch.randn(63)}, ValueError, "fc_bias must have shape"),
        ({"norm_weight": torch.randn(32).double()}, TypeError, "norm_weight must have dtype"),
        ({"norm_bias": torch.randn(32)}, ValueError, "norm_bias must be None for norm='rms'"),
        ({"norm": "batch"}, ValueError, "norm must be one of"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"eps": 0.0}, ValueError, "eps must be a positive"),
        ({"x": torch.randn(3, 32).long()}, TypeError, "x must have dtype"),
        ({"fc_weight": None}, TypeError, "fc_weight must be a torch.Tensor, got NoneType"),
    ],
)
def test_bad_input_raises(fn, change, exc, words):
    args = {"x": torch.randn(3, 32), **_weights(32, 64, dtype=torch.float32), **change}
    with pytest.raises(exc, match=words):
        fn(**args)


# --------------------------------------------------------------------------------------
# the Triton kernels (interpreted on CPU) against the float64 reference
# --------------------------------------------------------------------------------------

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (4e-3, 1e-2)}  # (atol per max|ref|, rtol)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ln_mlp_module = importlib.import_module("igpt_kernels.ln_mlp")  # the package exports the function


@pytest.fixture(autouse=True)
def _default_configs_on_gpu(monkeypatch):
    """On a GPU each kernel runs its first config: autotuning would compile and time every
    candidate for every shape, dtype and flag set. test_cuda_every_config_is_correct checks
    the other candidates; the interpreter has a single config anyway."""
    if DEVICE == "cuda":
        set_autotune(monkeypatch, False)


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every tensor the kernels allocate with NaN, so an unwritten element fails."""
    return lambda: poison_allocations(monkeypatch)


def _grads(fn, x, w, dy, **kwargs):
    """(y, dx, d<weight> for every weight that is not None) of fn(x, **w) with upstream dy."""
    x = x.detach().clone().requires_grad_()
    w = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in w.items()}
    y = fn(x, **w, **kwargs)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "x": x.grad}
    out.update({k: v.grad for k, v in w.items() if v is not None})
    return out


def _cpu(out):
    """The tensors of a _grads result, on the CPU (where the float64 references are)."""
    return {k: v.cpu() for k, v in out.items()}


def _assert_matches(out, ref, dtype, check_dtype=True):
    atol, rtol = TOL[dtype]
    for name, r in ref.items():
        o = out[name]
        assert o.dtype == dtype or not check_dtype, name
        scale = r.abs().max().item()
        torch.testing.assert_close(o.double(), r, atol=atol * scale, rtol=rtol, msg=name)


def _compare(shape, norm, activation, biases, residual, dtype, poisoned=None, **kwargs):
    d = shape[-1]
    x = torch.randn(shape, dtype=torch.float64)
    w = _weights(d, 4 * d, norm=norm, biases=biases)
    dy = torch.randn(shape, dtype=torch.float64)
    opts = dict(norm=norm, eps=1e-5, activation=activation, residual=residual)
    ref = _grads(ln_mlp, x, w, dy, **opts, backend="torch")
    cast = {k: None if v is None else v.to(DEVICE, dtype) for k, v in w.items()}
    if poisoned is not None:
        poisoned()
    out = _grads(ln_mlp, x.to(DEVICE, dtype), cast, dy.to(DEVICE), **opts, **kwargs)
    _assert_matches(_cpu(out), ref, dtype)


# Each axis of the issue (dtype, T in {1, 7, 130}, d in {32, 48, 96}, both norms, both
# activations, biases on/off, residual on/off, leading dims) appears in at least two cases,
# without the full cross product (the interpreter runs kernels at numpy speed).
CASES = [
    ((1, 32), "rms", "quick_gelu", True, True, torch.float32),
    ((7, 48), "layer", "gelu", True, False, torch.float32),
    ((130, 96), "rms", "gelu", False, True, torch.float32),
    ((2, 65, 32), "layer", "quick_gelu", False, False, torch.float32),
    ((130, 48), "layer", "quick_gelu", True, True, torch.float16),
    ((7, 96), "rms", "quick_gelu", True, False, torch.float16),
    ((1, 1, 48), "rms", "gelu", False, True, torch.float16),
    ((7, 32), "layer", "gelu", False, True, torch.float16),
]


@pytest.mark.parametrize("shape,norm,activation,biases,residual,dtype", CASES)
def test_triton_matches_reference(shape, norm, activation, biases, residual, dtype, poisoned):
    _compare(shape, norm, activation, biases, residual, dtype, poisoned, backend="triton")


@pytest.mark.parametrize(
    "shape,norm,activation,biases,residual,dtype", [CASES[1], CASES[2], CASES[5]]
)
def test_cublas_variant_matches_reference(shape, norm, activation, biases, residual, dtype):
    _compare(shape, norm, activation, biases, residual, dtype, backend="cublas")


def test_odd_hidden_size_and_strided_weights(poisoned):
    """h not a multiple of any block, weights as transposed views (the kernels use strides)."""
    d, h = 40, 100
    x = torch.randn(7, d, dtype=torch.float64)
    w = _weights(d, h, norm="layer")
    w["fc_weight"] = w["fc_weight"].T.contiguous().T  # (h, d) with strides (1, h)
    w["proj_weight"] = w["proj_weight"].T.contiguous().T
    dy = torch.randn(7, d, dtype=torch.float64)
    opts = dict(norm="layer", activation="quick_gelu")
    ref = _grads(ln_mlp, x, w, dy, **opts, backend="torch")
    w32 = {k: v.to(DEVICE, torch.float32) for k, v in w.items()}  # .to keeps the strides
    assert not w32["fc_weight"].is_contiguous()
    poisoned()
    out = _grads(ln_mlp, x.to(DEVICE, torch.float32), w32, dy.to(DEVICE), **opts, backend="triton")
    _assert_matches(_cpu(out), ref, torch.float32)


def test_autotune_off_runs_the_first_config(monkeypatch):
    """AUTOTUNE=False launches the plain kernels with each list's first config: the same
    results, bit for bit, as the autotuner picking that config (the interpreter's only one)."""
    x = torch.randn(7, 32, device=DEVICE)
    w = {k: None if v is None else v.to(DEVICE, torch.float32) for k, v in _weights(32, 96).items()}
    dy = torch.randn(7, 32, device=DEVICE)
    runs = []
    for autotune in (DEVICE == "cpu", False):
        set_autotune(monkeypatch, autotune)
        runs.append(_grads(ln_mlp, x, w, dy, backend="triton"))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_strided_vector_weights():
    """Norm weight/bias and biases as stride-2 views with NaN in the gaps: read by stride."""
    x = torch.randn(7, 40, dtype=torch.float64)
    w = _weights(40, 100, norm="layer")
    dy = torch.randn(7, 40, dtype=torch.float64)
    ref = _grads(ln_mlp, x, w, dy, norm="layer", backend="torch")
    bases = {
        k: torch.stack([v, torch.full_like(v, float("nan"))], 1).to(DEVICE, torch.float32)
        for k, v in w.items()
        if v.dim() == 1
    }
    leaves = {k: b.requires_grad_() for k, b in bases.items()}
    args = {
        k: leaves[k][:, 0] if k in leaves else v.to(DEVICE, torch.float32) for k, v in w.items()
    }
    assert not args["fc_bias"].is_contiguous()
    y = ln_mlp(x.to(DEVICE, torch.float32), **args, norm="layer", backend="triton")
    y.backward(dy.to(DEVICE, torch.float32))
    got = {"y": y.detach(), **{k: b.grad[:, 0] for k, b in leaves.items()}}
    _assert_matches(_cpu(got), {k: ref[k] for k in got}, torch.float32)


def test_empty_input_gives_empty_output():
    w = {k: None if v is None else v.to(DEVICE, torch.float32) for k, v in _weights(32, 64).items()}
    y = ln_mlp(torch.randn(0, 5, 32, device=DEVICE), **w, backend="triton")
    assert y.shape == (0, 5, 32)


def test_split_token_reduction_is_deterministic(monkeypatch, poisoned):
    """Weight gradients reduced over several token splits, the norm backward over several
    row tiles per program: right, and bitwise repeatable."""
    monkeypatch.setattr(ln_gemm, "_MIN_TOKENS_PER_SPLIT", 32)
    monkeypatch.setattr(ln_gemm, "_SPLIT_ALIGN", 32)
    monkeypatch.setattr(ln_gemm, "_NORM_BWD_TILE", 64)  # 2 rows of d = 32 per step
    x = torch.randn(130, 32, dtype=torch.float64)
    w = _weights(32, 128, norm="layer")
    dy = torch.randn(130, 32, dtype=torch.float64)
    opts = dict(norm="layer", activation="gelu")
    ref = _grads(ln_mlp, x, w, dy, **opts, backend="torch")
    w32 = {k: v.to(DEVICE, torch.float32) for k, v in w.items()}
    poisoned()
    x32, dy = x.to(DEVICE, torch.float32), dy.to(DEVICE)
    first = _cpu(_grads(ln_mlp, x32, w32, dy, **opts, backend="triton"))
    _assert_matches(first, ref, torch.float32)
    again = _cpu(_grads(ln_mlp, x32, w32, dy, **opts, backend="triton"))
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_inference_only_forward(poisoned):
    """Without autograd the forward skips storing z; the output is the same."""
    x = torch.randn(7, 48)
    w = {k: None if v is None else v.float() for k, v in _weights(48, 192, norm="layer").items()}
    w64 = {k: None if v is None else v.double() for k, v in w.items()}
    ref = ln_mlp(x.double(), **w64, norm="layer")
    w = {k: None if v is None else v.to(DEVICE) for k, v in w.items()}
    poisoned()
    with torch.no_grad():
        y = ln_mlp(x.to(DEVICE), **w, norm="layer", backend="triton")
    torch.testing.assert_close(y.double().cpu(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("residual", [True, False])
def test_autocast_mixes_float32_norm_with_half_gemms(monkeypatch, residual):
    """CUDA autocast (simulated: the interpreter has no CUDA): fp32 x, norm and residual,
    fp16 GEMMs; y and every gradient in eager autocast's dtypes, close to float64."""
    monkeypatch.setattr(ln_mlp_module, "_autocast_dtype", lambda x: torch.float16)
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    w = _weights(48, 192, norm="layer")
    dy = torch.randn(2, 7, 48, dtype=torch.float64)
    opts = dict(norm="layer", activation="gelu", residual=residual)
    ref = _grads(ln_mlp, x, w, dy, **opts, backend="torch")
    w32 = {k: v.to(DEVICE, torch.float32) for k, v in w.items()}
    out = _cpu(
        _grads(ln_mlp, x.to(DEVICE, torch.float32), w32, dy.to(DEVICE), **opts, backend="triton")
    )
    assert out["y"].dtype == (torch.float32 if residual else torch.float16)
    assert all(out[k].dtype == torch.float32 for k in ["x", *w])
    _assert_matches(out, ref, torch.float16, check_dtype=False)


@pytest.mark.parametrize("norm,activation", [("rms", "quick_gelu"), ("layer", "gelu")])
def test_saves_at_most_half_of_eager(norm, activation):
    x = torch.randn(64, 32, dtype=torch.float16, device=DEVICE, requires_grad=True)
    w = {
        k: None if v is None else v.to(DEVICE)
        for k, v in _weights(32, 128, torch.float16, norm).items()
    }
    for t in w.values():
        if t is not None:
            t.requires_grad_()
    opts = dict(norm=norm, activation=activation)
    ours = saved_bytes(lambda: ln_mlp(x, **w, **opts, backend="triton"), w.values())
    eager = saved_bytes(lambda: reference.ln_mlp(x, **w, **opts), w.values())
    assert 0 < ours <= 0.5 * eager, (ours, eager)


def test_auto_uses_reference_for_cpu_tensors():
    x = torch.randn(3, 32)
    w = {k: None if v is None else v.float() for k, v in _weights(32, 64).items()}
    assert torch.equal(ln_mlp(x, **w), reference.ln_mlp(x, **w))


@pytest.mark.parametrize(
    "dtype,words",
    [(torch.float64, "float64 has no Triton kernel"), (torch.bfloat16, "bfloat16 cannot run")],
)
def test_triton_backend_refuses_what_it_cannot_run(dtype, words):
    if dtype == torch.bfloat16 and torch.cuda.is_available():
        pytest.skip("bfloat16 runs on the GPU")
    w = {k: None if v is None else v.to(dtype) for k, v in _weights(32, 64).items()}
    with pytest.raises(ValueError, match=words):
        ln_mlp(torch.randn(3, 32, dtype=dtype), **w, backend="triton")


# --------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16 at the benchmark shapes, judged against eager's own error
# --------------------------------------------------------------------------------------


def _eager_and_ours_errors(T, d, norm, activation, dtype, backend="triton"):
    """max |err| vs float64 of eager PyTorch and of the Triton op, per output/gradient."""
    x = torch.randn(T, d, dtype=torch.float64, device="cuda")
    w = {
        k: None if v is None else v.cuda()
        for k, v in _weights(d, 4 * d, norm=norm, biases=True).items()
    }
    dy = torch.randn(T, d, dtype=torch.float64, device="cuda")
    opts = dict(norm=norm, activation=activation)
    ref = _grads(ln_mlp, x, w, dy, **opts, backend="torch")
    low = {k: None if v is None else v.to(dtype) for k, v in w.items()}
    eager = _grads(ln_mlp, x.to(dtype), low, dy, **opts, backend="torch")
    ours = _grads(ln_mlp, x.to(dtype), low, dy, **opts, backend=backend)
    return {
        k: ((ours[k].double() - r).abs().max().item(), (eager[k].double() - r).abs().max().item())
        for k, r in ref.items()
    }


@pytest.mark.cuda
@pytest.mark.parametrize("d", [512, 1024, 1536])
@pytest.mark.parametrize("variant", ["triton", "cublas"])
def test_cuda_bf16_error_at_most_twice_eager(d, variant):
    errors = _eager_and_ours_errors(32768, d, "rms", "quick_gelu", torch.bfloat16, variant)
    for name, (ours, eager) in errors.items():
        assert ours <= 2 * eager + 1e-6, (name, ours, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_small_shapes_error_at_most_twice_eager(dtype):
    for name, (ours, eager) in _eager_and_ours_errors(130, 96, "layer", "gelu", dtype).items():
        assert ours <= 2 * eager + 1e-5, (name, ours, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("index", [1, 2])
def test_cuda_every_config_is_correct(index, monkeypatch):
    """Each autotune candidate past the default (index 0, which every other GPU test runs)
    in turn, at a size that is no multiple of any block."""
    for tuned in ln_gemm.TUNED.values():
        chosen = {a: [c[min(index, len(c) - 1)]] for a, c in tuned.by_arch.items()}
        monkeypatch.setattr(tuned, "by_arch", chosen)
    _compare((300, 96), "layer", "gelu", True, True, torch.float16, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["triton", "cublas"])
def test_cuda_autocast_error_at_most_twice_eager(variant):
    """The training loop's case: fp32 x and weights under bf16 autocast."""
    x = torch.randn(4096, 512, dtype=torch.float64, device="cuda")
    w = {k: v.cuda() for k, v in _weights(512, 2048, norm="layer").items()}
    dy = torch.randn_like(x)
    ref = _grads(ln_mlp, x, w, dy, norm="layer", backend="torch")
    w32 = {k: v.float() for k, v in w.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _grads(ln_mlp, x.float(), w32, dy, norm="layer", backend="torch")
        ours = _grads(ln_mlp, x.float(), w32, dy, norm="layer", backend=variant)
    for name, r in ref.items():
        assert ours[name].dtype == eager[name].dtype, name
        err = (ours[name].double() - r).abs().max().item()
        eager_err = (eager[name].double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-6, (name, err, eager_err)
