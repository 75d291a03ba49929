"""The judge (igpt_kernels/trust.py): its rule on constructed errors, what it samples, and
the mutation corpus (tests/judge_corpus.py): every fault fails it in bf16, fp16 and fp32,
forward and backward; correct kernels on random calls pass; ``auto`` never returns a
faulty kernel."""

import contextlib
import importlib
import math
import random
import warnings

import judge_corpus as corpus
import pytest
import torch

from igpt_kernels import _dispatch, ln_gemm, trust
from igpt_kernels._dispatch import JudgeUnavailable, judge_call

attention_module = importlib.import_module("igpt_kernels.attention")
ln_mlp_module = importlib.import_module("igpt_kernels.ln_mlp")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def judge_attention(spec, fault, dtype, grad, *, seed=0, packed=False, install=None,
                    device="cpu"):  # fmt: skip
    """The verdict on "triton" of ``auto``'s own judge for one attention call, with the
    corpus's kernel (``fault`` None: correct) installed as our custom ops (``install``: a
    context of one's own, e.g. ``corpus.around_real``)."""
    q, k, v, pad, causal, scale = corpus.attention_call(spec, dtype, grad, seed, packed, device)
    with corpus.installed(fault) if install is None else install:
        return attention_module.call_judge(q, k, v, causal, pad, scale)(["triton"])["triton"]


def judge_mlp(spec, fault, dtype, grad, *, seed=0, install=None, device="cpu"):
    """The same for one ln_mlp call (``auto``'s row sample)."""
    x, params, norm, activation, residual = corpus.mlp_call(spec, dtype, grad, seed, device)

    def fn(name, x, *params):
        return ln_mlp_module._ln_mlp_on(name, x, params, norm, 1e-5, activation, residual)

    with corpus.installed(fault) if install is None else install:
        judge = ln_gemm.call_judge(x, params, fn, ln_mlp_module.ARG_NAMES)
        return judge(["triton"])["triton"]


def judge_fault(fault, dtype, grad, install=None, device="cpu"):
    f = corpus.BY_NAME[fault]
    if f.op == "attention":
        spec = corpus.ATTENTION_CALLS[f.call]
        if f.call == "decode_wide" and device == "cuda":  # B * H >= a GPU's SMs: one launch
            spec = (48, 4, *spec[2:])
        return judge_attention(spec, fault, dtype, grad, packed=f.call == "packed",
                               install=install, device=device)  # fmt: skip
    return judge_mlp(corpus.MLP_CALLS[f.call], fault, dtype, grad, install=install, device=device)


# --------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------


def _cases():
    for f in corpus.FAULTS:
        for dname in DTYPES:
            modes = (False, True) if f.where == "fwd" else (True,)
            if f.call.startswith("decode"):
                modes = (False,)  # the flash-decoding path serves calls without gradients
            for grad in modes:
                kind = "bwd" if grad else "fwd"
                yield pytest.param(f.name, dname, grad, id=f"{f.name}-{dname}-{kind}")


@pytest.mark.parametrize("fault,dname,grad", list(_cases()))
def test_every_fault_of_the_corpus_fails_the_judge(fault, dname, grad):
    verdict = judge_fault(fault, DTYPES[dname], grad)
    assert verdict["error"] is None, verdict["error"]  # judged, not refused
    assert not verdict["ok"], f"{fault} passed: {verdict['tensors']}"


def test_the_corpus_has_what_the_issue_asks_for():
    assert len(corpus.FAULTS) >= 15
    assert {f.where for f in corpus.FAULTS} == {"fwd", "bwd"}
    assert {f.op for f in corpus.FAULTS} == {"attention", "ln_mlp"}


@pytest.mark.parametrize("dname", DTYPES)
def test_the_correct_corpus_kernel_passes_the_calls_its_faults_fail(dname):
    for name, spec in corpus.ATTENTION_CALLS.items():
        for grad in (False, True):
            v = judge_attention(spec, None, DTYPES[dname], grad, packed=name == "packed")
            assert v["ok"], (name, grad, trust.describe(v))
    for name, spec in corpus.MLP_CALLS.items():
        v = judge_mlp(spec, None, DTYPES[dname], True)
        assert v["ok"], (name, trust.describe(v))


def _random_attention_spec(rng: random.Random):
    D = rng.choice([32, 64, 96, 128])
    kind = rng.choice(["full", "causal", "kv_cache", "decode", "padded", "causal_padded"])
    B, H = rng.randint(1, 3), rng.randint(1, 6)
    Nk = rng.randint(2, 200)
    Nq = {"kv_cache": rng.randint(1, Nk), "decode": rng.randint(1, min(16, Nk))}.get(kind, Nk)
    causal = kind in ("causal", "kv_cache", "decode", "causal_padded")
    padding = "some" if kind.endswith("padded") else None
    return (B, H, Nq, Nk, D, causal, padding)


def rejected_random_calls(dname, install=None, device="cpu", calls=50):
    """The random calls (``calls`` attention calls, a fifth as many ln_mlp calls: ragged
    lengths, head dims 32-128, padding, Nq < Nk, decoding, packed layouts) on which the
    installed kernel (default: the corpus's correct one) fails the judge."""
    rng = random.Random(f"judge-{dname}")
    rejected = []
    for seed in range(calls):
        spec = _random_attention_spec(rng)
        grad = spec[2] > 16 or rng.random() < 0.5
        packed = spec[2] == spec[3] and rng.random() < 0.5
        v = judge_attention(spec, None, DTYPES[dname], grad, seed=seed, packed=packed,
                            install=install, device=device)  # fmt: skip
        if not v["ok"]:
            rejected.append((spec, grad, trust.describe(v)))
    for seed in range(calls // 5):
        T, d, h = rng.randint(1, 700), rng.choice([16, 48, 64]), rng.choice([32, 96, 128])
        norm = rng.choice(["rms", "layer"])
        spec = (T, d, h, norm, rng.choice(["quick_gelu", "gelu"]), norm == "layer",
                rng.random() < 0.5)  # fmt: skip
        v = judge_mlp(spec, None, DTYPES[dname], True, seed=seed, install=install,
                      device=device)  # fmt: skip
        if not v["ok"]:
            rejected.append((spec, trust.describe(v)))
    return rejected


@pytest.mark.slow
@pytest.mark.parametrize("dname", DTYPES)
def test_no_correct_kernel_is_rejected_on_random_calls(dname):
    assert not rejected_random_calls(dname)


@pytest.mark.cuda
@pytest.mark.parametrize("dname", DTYPES)
def test_real_kernels_pass_the_judge_on_random_calls(dname):
    """On a GPU, our compiled kernels themselves, on the same random calls."""
    assert not rejected_random_calls(dname, contextlib.nullcontext(), "cuda")


def _around_cases():
    for fault in corpus.AROUND_REAL:
        f = corpus.BY_NAME[fault]
        for dname in DTYPES:
            grads = (False,) if f.call.startswith("decode") else (True,)
            if f.where == "fwd" and not f.call.startswith("decode"):
                grads = (False, True)
            for grad in grads:
                yield pytest.param(fault, dname, grad, id=f"{fault}-{dname}-{grad}")


@pytest.mark.cuda
@pytest.mark.parametrize("fault,dname,grad", list(_around_cases()))
def test_faults_around_the_real_kernels_fail_the_judge(fault, dname, grad):
    """On a GPU: the compiled kernels with one thing wrong around them (their real
    rounding, not the corpus's)."""
    verdict = judge_fault(fault, DTYPES[dname], grad, corpus.around_real(fault), "cuda")
    assert verdict["error"] is None, verdict["error"]
    assert not verdict["ok"], f"{fault} passed: {verdict['tensors']}"


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_kernel_that_never_attends_the_last_key_fails(grad):
    """The issue's case: non-causal B=1, H=4, N=1024, D=64 in bf16. The old rule (a floor
    at the tensor's largest element) passed it, forward and backward."""
    spec = (1, 4, 1024, 1024, 64, False, None)
    assert judge_attention(spec, None, torch.bfloat16, grad)["ok"]
    assert not judge_attention(spec, "drop_last_key", torch.bfloat16, grad)["ok"]


def test_bf16_kernel_that_drops_the_last_8_keys_fails():
    spec = (1, 4, 1024, 1024, 64, False, None)
    q, k, v, pad, causal, scale = corpus.attention_call(spec, torch.bfloat16, False)

    def fn(name, q, k, v, pad):
        if name == "dropped":
            k, v = k[:, :, :-8], v[:, :, :-8]
            name = "torch"
        return attention_module.run_backend(name, q, k, v, False, pad, scale)

    judge = trust.Judge(fn, (q, k, v, pad), attention_module.ARG_NAMES, False,
                        trust.head_sample((q, k, v, pad)))  # fmt: skip
    assert judge.verdict("torch")["ok"]
    assert not judge.verdict("dropped")["ok"]


def test_auto_never_returns_a_faulty_kernel(monkeypatch, tmp_path):
    """Through the real ``attention``/``ln_mlp`` on a faked GPU: a faulty kernel is judged,
    dropped with a warning, and the call runs PyTorch's backend."""
    monkeypatch.setattr(attention_module, "triton_unavailable", lambda t, n: None)
    for fault in ("padding_leaks", "heads_from_4_scaled", "lse_off", "drop_last_key"):
        for dtype in DTYPES.values():  # a new dispatcher each: nothing remembered
            d = _dispatch.Dispatcher(device_name=lambda dev: "Fake GPU", cache_dir=False)
            d.clock = _StepClock()
            monkeypatch.setattr(_dispatch, "DISPATCH", d)
            q, k, v, pad, causal, _ = corpus.attention_call(
                corpus.ATTENTION_CALLS["padded"], dtype, True, seed=hash(fault) % 100
            )
            with corpus.installed(fault), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                chosen = attention_module.choose_backend(q, k, v, causal=causal,
                                                         key_padding_mask=pad)  # fmt: skip
            assert chosen != "triton", (fault, dtype)
            messages = [str(w.message) for w in caught]
            assert any("failed PyTorch's check" in m for m in messages), (fault, messages)


class _StepClock:
    """A clock where every run takes 1 ms (the choice among passing kernels is moot)."""

    def __init__(self):
        self.t = 0.0

    def mark(self):
        self.t += 1.0
        return self.t

    def sync(self):
        pass

    def elapsed_ms(self, a, b):
        return b - a


# --------------------------------------------------------------------------------------
# the rule on constructed errors
# --------------------------------------------------------------------------------------


def _rule(value_err, torch_err, multiple=2.0, dtype=torch.float16, scale=1.0, rows=4):
    """judge_tensor on rows of ``scale`` where PyTorch is off by ``torch_err`` everywhere
    and the candidate by ``value_err`` in its last row only."""
    oracle = torch.full((rows, 8), scale, dtype=torch.float64)
    pytorch = oracle + torch_err
    value = oracle.clone()
    value[-1, 3] += value_err
    return trust.judge_tensor(value, oracle, pytorch, multiple, dtype)


def test_bound_is_multiple_of_pytorch_error_plus_a_floor_per_row():
    eps = torch.finfo(torch.float16).eps
    floor = eps * 1.0
    bound = 2.0 * 1e-3 + floor
    assert _rule(bound * 0.99, 1e-3)["ok"]
    assert not _rule(bound * 1.01, 1e-3)["ok"]
    r = _rule(bound * 1.01, 1e-3)
    assert r["row"] == 3 and r["bound"] == pytest.approx(bound)
    # gradients get 3x
    assert _rule(3e-3 + floor * 0.99, 1e-3, multiple=trust.GRAD_MULTIPLE)["ok"]
    assert not _rule(3e-3 + floor * 1.01, 1e-3, multiple=trust.GRAD_MULTIPLE)["ok"]


def test_float32_floor_is_eight_units():
    eps = torch.finfo(torch.float32).eps
    assert _rule(8 * eps * 0.99, 0.0, dtype=torch.float32)["ok"]
    assert not _rule(8 * eps * 1.01, 0.0, dtype=torch.float32)["ok"]


def test_a_row_is_judged_at_its_own_size_not_the_largest_elements():
    """A fault of 1% in a row 100x smaller than the tensor's largest: the old per-tensor
    floor (eps x the largest |oracle|) let it through; per row it fails."""
    oracle = torch.ones(64, 16, dtype=torch.float64)
    oracle[0] = 100.0
    pytorch = oracle * (1 + 2**-12)
    value = oracle.clone()
    value[7:15] *= 1.01
    assert not trust.judge_tensor(value, oracle, pytorch, 2.0, torch.float16)["ok"]
    assert trust.judge_tensor(pytorch, oracle, pytorch, 2.0, torch.float16)["ok"]
    old_bound = 2 * 100 * 2**-12 + torch.finfo(torch.float16).eps * 100
    assert (value - oracle).abs().max() < old_bound  # what the per-tensor rule allowed


def test_compared_with_the_oracle_not_with_pytorch():
    """A candidate equal to PyTorch's own low-precision result passes; one off the oracle by
    PyTorch's error in the other direction, three times over, fails (it would pass a
    comparison against PyTorch's result with bound 2x its error + floor only by chance)."""
    oracle = torch.randn(16, 8, dtype=torch.float64)
    pytorch = oracle + 1e-2
    assert trust.judge_tensor(pytorch, oracle, pytorch, 2.0, torch.float32)["ok"]
    assert not trust.judge_tensor(oracle + 3e-2, oracle, pytorch, 2.0, torch.float32)["ok"]
    assert trust.judge_tensor(oracle - 1.9e-2, oracle, pytorch, 2.0, torch.float32)["ok"]


def test_non_finite_values_are_infinite_errors():
    o = torch.tensor([[1.0, 2.0], [3.0, math.nan]], dtype=torch.float64)
    assert not trust.judge_tensor(torch.tensor([[1.0, math.nan], [3.0, math.nan]]), o, o, 2.0,
                                  torch.float32)["ok"]  # fmt: skip
    assert not trust.judge_tensor(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), o, o, 2.0,
                                  torch.float32)["ok"]  # fmt: skip
    assert trust.judge_tensor(torch.tensor([[1.0, 2.0], [3.0, math.inf]]), o, o, 2.0,
                              torch.float32)["ok"]  # fmt: skip
    assert not trust.judge_tensor(torch.ones(3), torch.ones(2), torch.ones(2), 2.0,
                                  torch.float32)["ok"]  # fmt: skip


def test_multiples_are_two_for_outputs_and_three_for_gradients(monkeypatch):
    seen = []
    real = trust.judge_tensor

    def spy(value, oracle, pytorch, multiple, dtype, units=None, least=0.0):
        seen.append(multiple)
        return real(value, oracle, pytorch, multiple, dtype, units, least)

    monkeypatch.setattr(trust, "judge_tensor", spy)
    x, w = (torch.randn(5, 4, requires_grad=True) for _ in range(2))
    judge = trust.Judge(lambda name, x, w: x * w, (x, w), ("x", "w"), grad=True)
    verdict = judge.verdict("torch")
    assert [r["tensor"] for r in verdict["tensors"]] == ["out", "dx", "dw"]
    assert seen == [trust.OUT_MULTIPLE, trust.GRAD_MULTIPLE, trust.GRAD_MULTIPLE] == [2, 3, 3]


# --------------------------------------------------------------------------------------
# what is sampled
# --------------------------------------------------------------------------------------


def test_head_sample_covers_every_structural_class():
    q = torch.randn(8, 8, 5, 4)
    pad = torch.ones(8, 5, dtype=torch.bool)
    pad[5, 1:] = False  # batch 5 sees the fewest keys
    s = trust.head_sample((q, q, q, pad))
    pairs = set(zip(s.b.tolist(), s.h.tolist(), strict=True))
    assert len(pairs) == trust.MAX_PAIRS
    assert {(0, 0), (7, 7), (0, 7), (7, 0), (1, 4)} <= pairs
    assert any(b == 5 for b, _ in pairs)
    small = trust.head_sample((q[:2, :3], q[:2, :3], q[:2, :3], None))
    assert len(set(zip(small.b.tolist(), small.h.tolist(), strict=True))) == 6  # all


def test_head_sample_oracle_in_parts_of_bounded_size(monkeypatch):
    monkeypatch.setattr(trust, "PAIR_ELEMENTS", 2 * 5 * 5)
    q = torch.randn(3, 3, 5, 4)
    s = trust.head_sample((q, q, q, None))
    parts = s.parts((q, q, q, None))
    assert [p[0].shape[0] for p in parts] == [2, 2, 2, 2]  # MAX_PAIRS of the 9
    assert torch.equal(torch.cat([p[0] for p in parts]), s.pick(q, "out"))


def test_row_sample_covers_ends_ragged_tiles_and_rows_past_4096():
    s = trust.row_sample((torch.empty(2, 2600, 3),))
    rows = set(s.rows.tolist())
    assert len(rows) == trust.MAX_ROWS
    assert {0, 1, 5198, 5199, 4095, 4096} <= rows
    assert {5119, 5120, 5183, 5184} <= rows  # around the last multiples of 128 and 64
    assert set(trust.row_sample((torch.empty(7, 3),)).rows.tolist()) == set(range(7))


def test_row_sample_cotangent_is_zero_off_the_sample():
    s = trust.RowSample(torch.tensor([1, 4]))
    g = s.cotangent(torch.empty(2, 3, 5))
    assert g.reshape(6, 5)[[0, 2, 3, 5]].abs().sum() == 0
    assert torch.equal(g.reshape(6, 5)[[1, 4]], s.part_cotangent(torch.empty(2, 5), 0))


def test_the_judged_launch_is_the_call_s_own():
    """A decode call with B * H >= the SM count takes the one-launch path; a fault only
    there is caught, since the candidate runs the call itself (the old 4-head slice took the
    split path and passed it)."""
    spec = corpus.ATTENTION_CALLS["decode_wide"]
    assert judge_attention(spec, None, torch.float16, False)["ok"]
    assert not judge_attention(spec, "decode_single_launch", torch.float16, False)["ok"]


def test_an_oracle_that_cannot_be_built_is_no_verdict():
    def fn(name, x):
        if name == "torch":
            raise torch.OutOfMemoryError("no memory for the oracle")
        return x

    x = torch.randn(3, 4)
    with pytest.raises(JudgeUnavailable, match="could not run"):
        judge_call(fn, (x,), ("x",), False)(["triton"])


def test_quantizer_check_reaches_past_the_first_pixels():
    """A wrong token in the last pixel of a large call, or deep inside it, is caught (a
    check of the first MAX_PIXELS pixels only would miss both)."""
    gen = torch.Generator().manual_seed(0)
    palette = torch.rand(16, 3, generator=gen) * 255
    pixels = torch.randint(0, 256, (trust.MAX_PIXELS * 3, 3), generator=gen, dtype=torch.uint8)
    tokens = trust.exact_tokens(pixels, palette)
    assert trust.check_tokens(pixels, palette, tokens)["ok"]
    inside = int(trust.sample_index(pixels.shape[0])[trust.MAX_PIXELS * 3 // 4])
    for where in (pixels.shape[0] - 1, inside):
        wrong = tokens.clone()
        wrong[where] = (wrong[where] + 1) % 16
        result = trust.check_tokens(pixels, palette, wrong)
        assert not result["ok"] and result["wrong"] == 1, where
        assert f"pixel {where} " in result["first"]
    assert inside > trust.MAX_PIXELS


def test_verdict_measures_the_candidate_against_the_oracle():
    """PyTorch's own result is off by +d: a candidate off by -1.9 d is within 2x PyTorch's
    error of the oracle (but 2.9 d from PyTorch's result); one off by +2.5 d is not."""
    d = 1e-2

    def fn(name, x):
        exact = x.double().sin()
        if name == "torch":  # PyTorch in float32 is off by d; the float64 oracle is exact
            return (exact + (d if x.dtype == torch.float32 else 0.0)).to(x.dtype)
        return (exact + {"below": -1.9 * d, "above": 2.5 * d}[name]).to(x.dtype)

    judge = trust.Judge(fn, (torch.randn(64, 8),), ("x",), grad=False)
    assert judge.verdict("below")["ok"]
    assert not judge.verdict("above")["ok"]


def test_an_empty_call_is_judged_without_error():
    q = torch.randn(2, 3, 0, 32)
    verdict = attention_module.call_judge(q, q, q, True, None, 32**-0.5)(["sdpa"])["sdpa"]
    assert verdict["ok"] and verdict["error"] is None
    x = torch.randn(0, 8, requires_grad=True)
    assert trust.Judge(lambda name, x: x * 2, (x,), ("x",), grad=True).verdict("torch")["ok"]
