"""The measured "auto" dispatch, on the CPU: an injected clock, fake backends and a fake GPU
name stand in for CUDA events, kernels and a device."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from igpt_kernels import _dispatch, attention, dispatch_table, ln_linear, ln_mlp, reference
from igpt_kernels._dispatch import Dispatcher, median_ms

attention_module = importlib.import_module("igpt_kernels.attention")
ln_mlp_module = importlib.import_module("igpt_kernels.ln_mlp")
ln_linear_module = importlib.import_module("igpt_kernels.ln_linear")
VERSIONS = {"torch": "1.0", "triton": "2.0", "igpt_kernels": "3.0"}


class FakeClock:
    """Milliseconds that pass only when a fake backend says so."""

    def __init__(self):
        self.now = 0.0

    def mark(self):
        return self.now

    def sync(self):
        pass

    def elapsed_ms(self, a, b):
        return b - a


class FakeBackends:
    """run(name) for Dispatcher.choose: each call costs COST[name] fake ms and is logged;
    ``judge(names)`` passes a backend whose output is the right one (ones(3))."""

    def __init__(self, clock, costs, outputs=None, fail=()):
        self.clock, self.costs, self.fail = clock, costs, set(fail)
        self.outputs = outputs or {}
        self.calls, self.judged = [], []

    def __call__(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name}: no kernel for this GPU")
        self.clock.now += self.costs[name]
        return self.outputs.get(name, torch.ones(3))

    def judge(self, names):
        self.judged += names
        verdicts = {}
        for name in names:
            if name in self.fail:
                verdicts[name] = {"ok": False, "tensors": [], "error": "RuntimeError: no kernel"}
                continue
            err = (self.outputs.get(name, torch.ones(3)) - torch.ones(3)).abs().max().item()
            row = {"tensor": "out", "err": err, "torch_err": 1e-7, "bound": 1e-6, "ratio": err}
            verdicts[name] = {"ok": err <= 1e-6, "tensors": [row], "error": None}
        return verdicts


def choose(d, op, fields, names, static, run, safe="sdpa"):
    """Dispatcher.choose on the CPU (a fake GPU) with the fake backends' judge."""
    return d.choose(op, fields, names, static, CPU, run, judge=run.judge, safe=safe)


def _dispatcher(tmp_path, clock=None, **kwargs):
    kwargs.setdefault("versions", VERSIONS)
    kwargs.setdefault("mode", "measure")
    kwargs.setdefault("capturing", lambda: False)
    return Dispatcher(
        clock=clock or FakeClock(),
        device_name=lambda device: "Fake GPU 9000",
        cache_dir=tmp_path,
        **kwargs,
    )


CPU = torch.device("cpu")


def test_median_of_reps_after_warmup():
    clock = FakeClock()
    costs = iter([100.0, 100.0, 3.0, 1.0, 2.0, 50.0, 4.0])  # 2 warm-up runs, then 5 timed

    def fn():
        clock.now += next(costs)

    assert median_ms(fn, clock, warmup=2, reps=5) == 3.0


def test_fastest_eligible_backend_wins(tmp_path):
    d = _dispatcher(tmp_path)
    run = FakeBackends(d.clock, {"triton": 2.0, "sdpa-flash": 1.0, "sdpa-cudnn": 1.5})
    names = ["triton", "sdpa-flash", "sdpa-cudnn"]
    assert choose(d, "op", {"n": 1}, names, "triton", run) == "sdpa-flash"
    assert set(run.calls) == set(names)
    assert run.judged == names  # PyTorch judges every candidate, the static one included
    # remembered: the next call with the same key times nothing
    run.calls.clear()
    assert choose(d, "op", {"n": 1}, names, "triton", run) == "sdpa-flash"
    assert run.calls == []
    # another key is timed afresh
    assert choose(d, "op", {"n": 2}, names, "triton", run) == "sdpa-flash"
    assert run.calls


def test_failing_or_disagreeing_backends_are_dropped(tmp_path):
    d = _dispatcher(tmp_path)
    outputs = {"triton": torch.ones(3), "sdpa-efficient": torch.tensor([1.0, 1.0, 2.0])}
    costs = {"triton": 3.0, "sdpa-flash": 1.0, "sdpa-efficient": 0.5, "sdpa-cudnn": 2.0}
    run = FakeBackends(d.clock, costs, outputs, fail={"sdpa-flash"})
    names = list(costs)
    with pytest.warns(RuntimeWarning, match="'sdpa-efficient' failed PyTorch's check") as seen:
        assert choose(d, "op", {}, names, "triton", run) == "sdpa-cudnn"
    assert len(seen) == 1  # one warning; a backend that raises is only logged
    (row,) = d.table()
    assert set(row["dropped"]) == {"sdpa-flash", "sdpa-efficient"}
    assert "no kernel" in row["dropped"]["sdpa-flash"]
    assert set(row["ms"]) == {"triton", "sdpa-cudnn"}
    assert not row["verdicts"]["sdpa-efficient"]["ok"] and row["verdicts"]["triton"]["ok"]
    assert set(run.calls) == {"triton", "sdpa-cudnn"}  # what failed the check is never timed


def test_no_timing_when_fixed_on_cpu_compiling_or_capturing(tmp_path, monkeypatch):
    """Nothing verified yet: fixed, capturing and compiling take the PyTorch backend."""
    names = ["triton", "sdpa-flash"]
    costs = {"triton": 2.0, "sdpa-flash": 1.0}
    fixed = _dispatcher(tmp_path, mode="fixed")
    run = FakeBackends(fixed.clock, costs)
    assert choose(fixed, "op", {}, names, "triton", run) == "sdpa"
    cpu = Dispatcher(clock=FakeClock(), versions=VERSIONS, cache_dir=tmp_path, mode="measure")
    assert choose(cpu, "op", {}, names, "triton", run) == "triton"  # a CPU device: static
    capturing = _dispatcher(tmp_path, capturing=lambda: True)
    assert choose(capturing, "op", {}, names, "triton", run) == "sdpa"
    compiling = _dispatcher(tmp_path)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose(compiling, "op", {}, names, "triton", run) == "sdpa"
    assert run.calls == [] and run.judged == []
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_compiling_takes_a_remembered_choice(tmp_path, monkeypatch):
    d = _dispatcher(tmp_path)
    run = FakeBackends(d.clock, {"triton": 2.0, "sdpa-flash": 1.0})
    assert choose(d, "op", {}, ["triton", "sdpa-flash"], "triton", run) == "sdpa-flash"
    run.calls.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose(d, "op", {}, ["triton", "sdpa-flash"], "triton", run) == "sdpa-flash"
    assert run.calls == []


def test_mode_from_environment_and_bad_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_DISPATCH", "fixed")
    assert Dispatcher().mode == "fixed"
    monkeypatch.setenv("IGPT_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="IGPT_DISPATCH must be one of"):
        _ = Dispatcher().mode
    with pytest.raises(ValueError, match="dispatch mode must be one of"):
        _dispatch.set_dispatch("sometimes")
    monkeypatch.setattr(_dispatch, "DISPATCH", _dispatcher(tmp_path))
    _dispatch.set_dispatch("fixed")
    assert _dispatch.DISPATCH.mode == "fixed"


# --------------------------------------------------------------------------------------
# the cache file
# --------------------------------------------------------------------------------------


def test_cache_file_written_atomically_and_read_back(tmp_path, monkeypatch):
    d = _dispatcher(tmp_path)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    run = FakeBackends(d.clock, {"triton": 2.0, "cublas": 1.0})
    assert choose(d, "ln_mlp", {"d": 512}, ["triton", "cublas"], "triton", run, "torch") == "cublas"
    (path,) = tmp_path.iterdir()  # no temporary file left behind
    assert path.name.startswith("dispatch-") and path.suffix == ".json"
    ((tmp, dest),) = replaced
    assert Path(dest) == path and Path(tmp).parent == tmp_path  # same folder: atomic replace
    assert not Path(tmp).exists()
    data = json.loads(path.read_text())
    assert data["format"] == 2 and data["gpu"] == "Fake GPU 9000" and data["versions"] == VERSIONS
    (key,) = data["entries"]
    assert key.startswith("ln_mlp|d=512|of=triton,cublas")
    assert data["entries"][key]["backend"] == "cublas"
    assert set(data["entries"][key]["ms"]) == {"triton", "cublas"}

    # a new process with the same versions reads the choice back and times nothing
    fresh = _dispatcher(tmp_path)
    run2 = FakeBackends(fresh.clock, {"triton": 1.0, "cublas": 9.0})
    names = ["triton", "cublas"]
    assert choose(fresh, "ln_mlp", {"d": 512}, names, "triton", run2, "torch") == "cublas"
    assert run2.calls == []
    assert [r["backend"] for r in fresh.table()] == ["cublas"]


def test_cache_ignored_after_a_version_change_or_when_corrupt(tmp_path):
    d = _dispatcher(tmp_path)
    run = FakeBackends(d.clock, {"triton": 2.0, "cublas": 1.0})
    choose(d, "ln_mlp", {}, ["triton", "cublas"], "triton", run)
    (old,) = tmp_path.iterdir()

    newer = _dispatcher(tmp_path, versions={**VERSIONS, "torch": "1.1"})
    assert newer.cache_path("Fake GPU 9000") != old
    run2 = FakeBackends(newer.clock, {"triton": 1.0, "cublas": 2.0})
    assert choose(newer, "ln_mlp", {}, ["triton", "cublas"], "triton", run2) == "triton"
    assert run2.calls  # timed again

    # a file at the right path whose header names other versions (e.g. copied) is ignored too
    header_liar = _dispatcher(tmp_path)
    data = json.loads(old.read_text())
    data["versions"]["triton"] = "0.0"
    old.write_text(json.dumps(data))
    run3 = FakeBackends(header_liar.clock, {"triton": 1.0, "cublas": 2.0})
    assert choose(header_liar, "ln_mlp", {}, ["triton", "cublas"], "triton", run3) == "triton"
    assert run3.calls

    old.write_text("{not json")
    broken = _dispatcher(tmp_path)
    run4 = FakeBackends(broken.clock, {"triton": 3.0, "cublas": 2.0})
    assert choose(broken, "ln_mlp", {}, ["triton", "cublas"], "triton", run4) == "cublas"
    assert json.loads(old.read_text())["entries"]  # rewritten whole


def test_two_processes_merge_their_entries(tmp_path):
    a, b = _dispatcher(tmp_path), _dispatcher(tmp_path)
    choose(a, "op", {"n": 1}, ["x", "y"], "x", FakeBackends(a.clock, {"x": 1.0, "y": 2.0}))
    choose(b, "op", {"n": 2}, ["x", "y"], "x", FakeBackends(b.clock, {"x": 2.0, "y": 1.0}))
    (path,) = tmp_path.iterdir()
    entries = json.loads(path.read_text())["entries"]
    assert sorted(e["backend"] for e in entries.values()) == ["x", "y"]


# --------------------------------------------------------------------------------------
# through the public ops: which candidates "auto" times
# --------------------------------------------------------------------------------------

ATTENTION_COSTS = {"triton": 4.0, "sdpa-flash": 1.0, "sdpa-efficient": 2.0, "sdpa-cudnn": 3.0}


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """The CPU as a "GPU" for the dispatcher, with a fake clock; yields the dispatcher."""
    d = _dispatcher(tmp_path)
    monkeypatch.setattr(_dispatch, "DISPATCH", d)
    return d


def _fake_attention_backends(monkeypatch, clock, costs):
    tried = []

    def run_backend(name, q, k, v, causal, key_padding_mask, scale):
        tried.append(name)
        clock.now += costs.get(name, 100.0)
        return reference.attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, sm_scale=scale
        )

    monkeypatch.setattr(attention_module, "run_backend", run_backend)
    return tried


@pytest.mark.parametrize(
    "D,Nq,Nk,causal,padded,expect",
    [
        (64, 8, 8, True, False, "sdpa-flash"),  # flash is the fastest and can run it
        (64, 3, 8, True, False, "sdpa-flash"),  # bottom-right causal, Nq < Nk
        (64, 8, 8, False, True, "sdpa-efficient"),  # padding: flash takes no mask
        (64, 8, 8, True, True, "sdpa-efficient"),
        (80, 8, 8, True, False, "sdpa-flash"),  # not a Triton head dim
    ],
)
def test_attention_auto_never_tries_an_ineligible_backend(
    fake_gpu, monkeypatch, D, Nq, Nk, causal, padded, expect
):
    tried = _fake_attention_backends(monkeypatch, fake_gpu.clock, ATTENTION_COSTS)
    # on the CPU SDPA's efficient and cuDNN kernels are out; pretend they are not
    monkeypatch.setattr(
        attention_module,
        "sdpa_kernel_reason",
        _cuda_like_reasons(attention_module.sdpa_kernel_reason),
    )
    q = torch.randn(2, 2, Nq, D, dtype=torch.float16)
    k, v = torch.randn(2, 2, Nk, D, dtype=torch.float16), torch.randn(2, 2, Nk, D).half()
    pad = torch.rand(2, Nk) > 0.3 if padded else None
    o = attention(q, k, v, causal=causal, key_padding_mask=pad)
    torch.testing.assert_close(o, reference.attention(q, k, v, causal=causal, key_padding_mask=pad))
    assert tried[-1] == expect  # the call itself ran the winner
    timed = set(tried) - {"torch", "eager"}  # the oracle and yardstick PyTorch's check runs
    if padded:
        assert "sdpa-flash" not in timed
    if D not in reference.HEAD_DIMS:
        assert "triton" not in timed
    (row,) = dispatch_table()
    assert row["backend"] == expect and set(row["ms"]) == timed
    assert (
        f"D={D}" in row["key"] and f"mask={attention_module._mask_kind(causal, pad)}" in row["key"]
    )


def _cuda_like_reasons(real):
    """sdpa_kernel_reason as it would answer for a CUDA float16 tensor of the same shape."""

    def reasons(kernel, q, k, causal, key_padding_mask):
        meta = torch.empty(q.shape, dtype=q.dtype, device="meta")

        class Cuda:  # the attributes sdpa_kernel_reason reads
            shape, dtype, is_cuda, device = meta.shape, meta.dtype, True, "cuda"

        return real(kernel, Cuda, k, causal, key_padding_mask)

    return reasons


def test_real_sdpa_kernel_reasons():
    """The eligibility table itself, on shapes that need no GPU to judge."""
    reason = attention_module.sdpa_kernel_reason
    q = torch.empty(1, 1, 4, 64, dtype=torch.float16)
    k = torch.empty(1, 1, 8, 64, dtype=torch.float16)
    pad = torch.ones(1, 8, dtype=torch.bool)
    assert reason("flash", q, k, True, None) is None  # the CPU flash kernel takes every case
    assert "cannot express key padding" in reason("flash", q, k, False, pad)
    assert "needs CUDA" in reason("efficient", q, k, True, None)
    cuda_reason = _cuda_like_reasons(reason)
    for kernel in ("flash", "efficient", "cudnn"):
        assert cuda_reason(kernel, q, k, True, None) is None
    for kernel, why in (("efficient", None), ("cudnn", None)):
        assert cuda_reason(kernel, q, k, True, pad) is why
    q32 = torch.empty(1, 1, 4, 64)
    assert "float16 and bfloat16 only" in cuda_reason("flash", q32, k, True, None)
    assert cuda_reason("efficient", q32, k, True, pad) is None
    assert "cuDNN" in cuda_reason("cudnn", q32, k, True, None)
    q20 = torch.empty(1, 1, 4, 20, dtype=torch.float16)
    assert all(cuda_reason(kern, q20, k, True, None) for kern in ("flash", "efficient", "cudnn"))
    assert "single key" in cuda_reason("cudnn", q, torch.empty(1, 1, 1, 64), True, None)


def test_attention_auto_on_cpu_stays_the_reference(monkeypatch):
    tried = _fake_attention_backends(monkeypatch, FakeClock(), ATTENTION_COSTS)
    q, k, v = (torch.randn(1, 2, 5, 32) for _ in range(3))
    attention(q, k, v)
    assert tried == ["torch"]


def test_attention_auto_times_forward_and_backward_without_touching_grad(fake_gpu, monkeypatch):
    monkeypatch.setattr(
        attention_module, "sdpa_kernel_reason", lambda kern, *a: None if kern == "flash" else "no"
    )
    seen = []
    real = attention_module.run_backend

    def run_backend(name, q, *rest):
        seen.append((name, q.requires_grad))
        fake_gpu.clock.now += {"triton": 2.0, "sdpa-flash": 1.0}.get(name, 0.0)
        return real("torch", q, *rest)

    monkeypatch.setattr(attention_module, "run_backend", run_backend)
    q, k, v = (torch.randn(1, 2, 5, 32, requires_grad=True) for _ in range(3))
    attention(q, k, v).sum().backward()
    assert {n for n, _ in seen} == {"triton", "sdpa-flash", "torch"}  # torch: PyTorch's check
    assert all(grad for _, grad in seen)
    assert "grad=True" in dispatch_table()[0]["key"]
    expect = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference.attention(*expect).sum().backward()
    for t, e in zip((q, k, v), expect, strict=True):  # the timing runs left .grad alone
        torch.testing.assert_close(t.grad, e.grad)


@pytest.mark.parametrize("dtype,expect", [(torch.float32, "cublas"), (torch.float64, None)])
def test_ln_mlp_auto_candidates(fake_gpu, monkeypatch, dtype, expect):
    tried = []
    costs = {"triton": 3.0, "cublas": 1.0, "torch": 2.0}

    def on(name, x, params, *opts):
        tried.append(name)
        fake_gpu.clock.now += costs[name]
        norm, eps, activation, residual = opts
        return reference.ln_mlp(
            x, *params, norm=norm, eps=eps, activation=activation, residual=residual
        )

    monkeypatch.setattr(ln_mlp_module, "_ln_mlp_on", on)
    d = 32
    x = torch.randn(4, d, dtype=dtype)
    w = [torch.ones(d, dtype=dtype), None, torch.randn(4 * d, d, dtype=dtype), None]
    w += [torch.randn(d, 4 * d, dtype=dtype), None]
    ln_mlp(x, *w)
    if expect is None:  # float64: only the reference can run it, so nothing is timed
        assert tried == ["torch"] and dispatch_table() == []
        return
    assert set(tried) == {"triton", "cublas", "torch"} and tried[-1] == expect
    (row,) = dispatch_table()
    assert row["key"].startswith("ln_mlp|dtype=float32|autocast=off|T=4|d=32|h=128")


def test_ln_linear_auto_candidates(fake_gpu, monkeypatch):
    tried = []

    def on(name, x, params, norm, eps):
        tried.append(name)
        fake_gpu.clock.now += {"triton": 1.0, "torch": 2.0}[name]
        return reference.ln_linear(x, *params, norm=norm, eps=eps)

    monkeypatch.setattr(ln_linear_module, "_ln_linear_on", on)
    x = torch.randn(3, 32)
    ln_linear(x, torch.ones(32), None, torch.randn(96, 32), None)
    assert set(tried) == {"triton", "torch"} and tried[-1] == "triton"


@pytest.mark.parametrize(
    "D,verified,static", [(64, False, "sdpa"), (64, True, "triton"), (80, False, "sdpa")]
)
def test_fixed_dispatch_is_the_static_choice(fake_gpu, monkeypatch, D, verified, static):
    """IGPT_DISPATCH=fixed on a GPU: Triton where it can run and a verdict says it passed on
    this kind of call, else "sdpa"; nothing timed or judged."""
    monkeypatch.setenv("IGPT_DISPATCH", "fixed")
    fake_gpu._mode = None  # read the environment again
    tried = _fake_attention_backends(monkeypatch, fake_gpu.clock, ATTENTION_COSTS)
    q, k, v = (torch.randn(1, 2, 8, D, dtype=torch.float16) for _ in range(3))
    if verified:
        names, fields = attention_module.call_kind(q, k, v, True, None)
        fake_gpu.record("Fake GPU 9000", fake_gpu.key("attention", fields, names), OK_TRITON)
    attention(q, k, v)
    assert tried == [static]


OK_TRITON = {"triton": {"ok": True, "tensor": "out", "err": 1e-3, "torch_err": 1e-3, "ratio": 1}}


@pytest.mark.cuda
def test_cuda_auto_measures_once_and_caches(tmp_path, monkeypatch):
    """On a real GPU with CUDA events: the first auto call fills the table and the file, the
    choice is one of the candidates and its output matches the float64 reference."""
    d = Dispatcher(cache_dir=tmp_path, mode="measure")
    monkeypatch.setattr(_dispatch, "DISPATCH", d)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    o = attention(q, k, v, causal=True)
    (row,) = dispatch_table()
    assert row["gpu"] == torch.cuda.get_device_name()
    assert row["backend"] in row["ms"] and row["ms"][row["backend"]] == min(row["ms"].values())
    assert "triton" in row["ms"] or "triton" in row["dropped"]
    want = reference.attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(o.double(), want, atol=1e-2, rtol=1e-2)
    assert len(list(tmp_path.glob("dispatch-*.json"))) == 1
    attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], causal=True)  # the same bucket
    assert len(dispatch_table()) == 1
