"""The dispatcher's verdicts (issues 31 and 32): keyed by what they judged, never cleared by a
later pass, merged across processes, never made of a transient failure, and the PyTorch
fallback pinned once one of its sub-kernels failed. On the CPU through the test seams (a fake
GPU name, clock and cache folder; fake backends and judges)."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from test_dispatch import CPU, FakeBackends, _dispatcher, choose

from igpt_kernels import _build, _dispatch, attention, reference
from igpt_kernels._dispatch import Dispatcher, JudgeUnavailable
from igpt_kernels._dispatch_cache import environment, merge_entry, merge_verdicts

attention_module = importlib.import_module("igpt_kernels.attention")
ln_gemm_module = importlib.import_module("igpt_kernels.ln_gemm")
GPU = "Fake GPU 9000"
OK = {"ok": True, "tensor": "out", "err": 1e-3, "torch_err": 1e-3, "ratio": 1}
FAIL = {"ok": False, "tensor": "dq", "err": 0.5, "torch_err": 1e-3, "ratio": 500}
REFUSED = {"ok": False, "error": "RuntimeError: no kernel image for this GPU"}
NAMES = ["triton", "sdpa-flash"]


def _entries(tmp_path):
    (path,) = tmp_path.glob("dispatch-*.json")
    return json.loads(path.read_text())["entries"]


# --------------------------------------------------------------------------------------
# trusted: a FAIL is never trusted, a remembered choice only with its verdict
# --------------------------------------------------------------------------------------


def test_trusted_needs_a_recorded_pass():
    trusted = Dispatcher.trusted
    assert trusted({"verdicts": {"triton": OK}}, "triton", "sdpa")
    assert not trusted({"verdicts": {"triton": FAIL}}, "triton", "sdpa")
    assert not trusted({"verdicts": {"triton": {"ok": 0}}}, "triton", "sdpa")
    assert not trusted({"verdicts": {}}, "triton", "sdpa") and not trusted(None, "triton", "sdpa")
    assert trusted(None, "sdpa", "sdpa") and trusted(None, "sdpa-math", "sdpa")


@pytest.mark.parametrize("busy", ["fixed", "capturing"])
def test_a_failed_static_kernel_stays_off_in_fixed_mode_and_while_capturing(tmp_path, busy):
    d = _dispatcher(tmp_path, capturing=lambda: busy == "capturing")
    if busy == "fixed":
        d.set_mode("fixed")
    run = FakeBackends(d.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    key = d.key("attention", {}, NAMES)
    d.record(GPU, key, {"triton": FAIL, "sdpa-flash": OK})
    assert d.choose("attention", {}, NAMES, "triton", CPU, run, judge=run.judge, safe="sdpa") == (
        "sdpa"
    )
    d.record(GPU, key, {"triton": OK})  # a later pass (a selftest) does not clear the FAIL
    assert d.choose("attention", {}, NAMES, "triton", CPU, run, judge=run.judge, safe="sdpa") == (
        "sdpa"
    )
    assert run.calls == [] and run.judged == []


@pytest.mark.parametrize("verdicts", [{"triton": FAIL}, {}], ids=["failed", "unjudged"])
def test_a_remembered_choice_is_used_only_with_its_passing_verdict(tmp_path, verdicts):
    """A file whose entry names triton as the choice but records it failed (or records no
    verdict at all) does not make triton run: the kind of call is measured again, and a
    FAIL is neither judged nor timed again."""
    d = _dispatcher(tmp_path)
    key = d.key("op", {}, NAMES)
    entry = {"backend": "triton", "ms": {"triton": 1.0}, "verdicts": verdicts}
    d.cache_path(GPU).write_text(json.dumps({**d.header(GPU), "entries": {key: entry}}))
    run = FakeBackends(d.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    assert choose(d, "op", {}, NAMES, "triton", run) == ("sdpa-flash" if verdicts else "triton")
    if verdicts:
        assert run.judged == ["sdpa-flash"] and "triton" not in run.calls
        assert not _entries(tmp_path)[key]["verdicts"]["triton"]["ok"]
    else:
        assert run.judged == NAMES  # judged before it runs, not taken on the file's word


# --------------------------------------------------------------------------------------
# merging: per key, per verdict, FAIL sticky; two processes saving in turns
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", [True, False], ids=["file", "memory only"])
def test_record_merges_verdicts_and_keeps_a_fail(tmp_path, file):
    """In memory as in the file (without a file no save can merge the table back)."""
    d = _dispatcher(tmp_path if file else False)
    key = d.key("attention", {}, NAMES)
    d.record(GPU, key, {"triton": FAIL})
    d.record(GPU, key, {"sdpa-flash": OK})
    d.record(GPU, key, {"triton": OK})
    (row,) = d.table()
    assert row["verdicts"] == {"triton": FAIL, "sdpa-flash": OK}
    if file:
        assert _entries(tmp_path)[key]["verdicts"] == row["verdicts"]


def test_merge_rules():
    assert merge_verdicts({"a": FAIL}, {"a": OK, "b": OK}) == {"a": FAIL, "b": OK}
    assert merge_verdicts({"a": OK}, {"a": FAIL}) == {"a": FAIL}
    old = {"backend": "b", "ms": {"b": 2.0}, "verdicts": {"a": FAIL, "b": OK}}
    new = {"backend": "a", "ms": {"a": 1.0, "b": 2.0}, "verdicts": {"a": OK, "b": OK}}
    merged = merge_entry(old, new)  # a stale pass of "a" chose it: the FAIL wins, b runs
    assert merged["backend"] == "b" and merged["verdicts"]["a"] == FAIL
    alone = merge_entry({"verdicts": {"a": FAIL}}, {"backend": "a", "ms": {"a": 1.0}})
    assert "backend" not in alone  # nothing left that passed: the next call measures


@pytest.mark.parametrize("file", [True, False], ids=["file", "memory only"])
def test_a_measured_choice_keeps_a_fail_recorded_before(tmp_path, file):
    d = _dispatcher(tmp_path if file else False)
    d.record(GPU, d.key("op", {}, NAMES), {"triton": FAIL})
    run = FakeBackends(d.clock, {"triton": 1.0, "sdpa-flash": 2.0})  # its judge passes both
    assert choose(d, "op", {}, NAMES, "triton", run) == "sdpa-flash"
    assert run.judged == ["sdpa-flash"] and set(run.calls) == {"sdpa-flash"}
    (row,) = d.table()
    assert row["verdicts"]["triton"] == FAIL and "triton" in row["dropped"]


def test_two_processes_saving_in_turns_keep_each_others_entries(tmp_path):
    """Both read the (empty) file first; then each writes its own keys, alternately: every
    save must merge with what the file holds at that moment."""
    a, b = _dispatcher(tmp_path), _dispatcher(tmp_path)
    for d in (a, b):
        d._table(GPU, load=True)
    for n, d in enumerate((a, b, a, b)):
        choose(d, "op", {"n": n}, ["x", "y"], "x", FakeBackends(d.clock, {"x": 1.0, "y": 2.0}))
    assert sorted(_entries(tmp_path)) == [a.key("op", {"n": n}, ["x", "y"]) for n in range(4)]


def test_a_fail_another_process_wrote_wins_over_a_stale_pass(tmp_path):
    a, b = _dispatcher(tmp_path), _dispatcher(tmp_path)
    run = FakeBackends(a.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    assert choose(a, "op", {}, NAMES, "triton", run) == "triton"
    b._table(GPU, load=True)  # b has read triton's pass
    key = a.key("op", {}, NAMES)
    a.record(GPU, key, {"triton": FAIL})  # then a real call of a's fails it
    b.record(GPU, key, {"sdpa-flash": OK})  # b saves: the FAIL in the file stays
    entry = _entries(tmp_path)[key]
    assert entry["verdicts"]["triton"] == FAIL and entry["backend"] == "sdpa-flash"
    run_b = FakeBackends(b.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    assert choose(b, "op", {}, NAMES, "triton", run_b) == "sdpa-flash"  # b took the merge in


# --------------------------------------------------------------------------------------
# transient failures leave no verdict
# --------------------------------------------------------------------------------------


def _no_oracle(names):
    raise JudgeUnavailable("OutOfMemoryError: CUDA out of memory building the oracle")


def _oom_verdicts(names):
    oom = {"ok": False, "tensors": [], "error": "OutOfMemoryError: CUDA out of memory"}
    return {n: oom if n == "triton" else {"ok": True, "tensors": [], "error": None} for n in names}


class _OomWhileTimed(FakeBackends):
    def __call__(self, name):
        if name == "triton":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return super().__call__(name)


@pytest.mark.parametrize("how", ["oracle", "candidate", "timing"])
def test_a_transient_failure_leaves_no_verdict_and_runs_pytorch(tmp_path, how):
    d = _dispatcher(tmp_path)
    run = (_OomWhileTimed if how == "timing" else FakeBackends)(
        d.clock, {"triton": 1.0, "sdpa-flash": 2.0}
    )
    judge = {"oracle": _no_oracle, "candidate": _oom_verdicts, "timing": run.judge}[how]
    with pytest.warns(RuntimeWarning, match="could not run on this call") as seen:
        got = d.choose("op", {}, NAMES, "triton", CPU, run, judge=judge, safe="sdpa")
    assert got == "sdpa"
    assert not any("failed PyTorch's check" in str(w.message) for w in seen)
    assert d.table() == [] and not list(tmp_path.iterdir())  # nothing kept, nothing written
    run2 = FakeBackends(d.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    assert choose(d, "op", {}, NAMES, "triton", run2) == "triton"  # judged again, passes


# --------------------------------------------------------------------------------------
# the PyTorch fallback pinned to SDPA's math kernel once a sub-kernel failed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["measure", "fixed", "capturing"])
def test_a_failed_sdpa_kernel_pins_the_fallback_to_math(tmp_path, mode):
    d = _dispatcher(tmp_path, capturing=lambda: mode == "capturing")
    if mode == "fixed":
        d.set_mode("fixed")
    outputs = {"triton": torch.zeros(3), "sdpa-flash": torch.zeros(3)}  # both wrong
    run = FakeBackends(d.clock, {"triton": 1.0, "sdpa-flash": 2.0}, outputs)
    d.record(GPU, d.key("op", {}, NAMES), {"sdpa-flash": FAIL})
    with pytest.warns(RuntimeWarning) if mode == "measure" else _quiet():
        assert choose(d, "op", {}, NAMES, "triton", run) == "sdpa-math"
    assert choose(d, "op", {}, NAMES, "triton", run) == "sdpa-math"  # remembered / settled


def test_a_refusing_sdpa_kernel_leaves_sdpa_to_pick(tmp_path):
    d = _dispatcher(tmp_path, mode="fixed")
    d.record(GPU, d.key("op", {}, NAMES), {"sdpa-flash": REFUSED})
    run = FakeBackends(d.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    assert choose(d, "op", {}, NAMES, "triton", run) == "sdpa"


def test_sdpa_math_runs_igpts_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 32, generator=g) for n in (5, 9, 9))
    pad = torch.rand(2, 9, generator=g) > 0.3
    for mask in (None, pad):
        got = attention_module.run_backend("sdpa-math", q, k, v, True, mask, 0.2)
        want = reference.attention(q, k, v, causal=True, key_padding_mask=mask, sm_scale=0.2)
        torch.testing.assert_close(got, want)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# what a verdict is keyed by
# --------------------------------------------------------------------------------------


def test_header_names_sources_cuda_and_driver():
    env = environment()
    assert {"torch", "triton", "igpt_kernels", "sources", "cuda", "driver"} <= set(env)
    assert env["sources"] == _build.kernel_sources_digest()
    assert environment() is env  # computed once per process
    if not torch.cuda.is_available():
        assert env["driver"] is None and env["cuda"] == torch.version.cuda


def test_editing_a_kernel_source_makes_old_verdicts_unused(tmp_path):
    pkg = tmp_path / "copy" / "igpt_kernels"
    shutil.copytree(_build.PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    src = _build.source_dir()
    if src is not None and src.parent != _build.PACKAGE:
        shutil.copytree(src, tmp_path / "copy" / "csrc")
    before = _build.kernel_sources_digest(pkg)
    assert before == _build.kernel_sources_digest()  # the copy digests as the package
    kernels = pkg / "attention_kernels.py"
    kernels.write_text(kernels.read_text() + "# edited\n")
    after = _build.kernel_sources_digest(pkg)
    assert after != before
    old = _dispatcher(tmp_path, versions={**environment(), "sources": before})
    old.record(GPU, old.key("op", {}, NAMES), {"triton": OK})
    new = _dispatcher(tmp_path, versions={**environment(), "sources": after})
    assert new.cache_path(GPU) != old.cache_path(GPU)
    run = FakeBackends(new.clock, {"triton": 1.0, "sdpa-flash": 2.0})
    new.set_mode("fixed")
    assert choose(new, "op", {}, NAMES, "triton", run) == "sdpa"  # the old pass is not read
    old.set_mode("fixed")
    assert choose(old, "op", {}, NAMES, "triton", run) == "triton"


def test_settings_that_change_the_code_are_in_the_keys(monkeypatch):
    q = torch.empty(1, 2, 8, 96)
    _, fields = attention_module.call_kind(q, q, q, True, None)
    assert fields["hd96"] == "pad" and "autotune" in fields
    monkeypatch.setattr(attention_module, "HD96_SPLIT", True)
    assert attention_module.call_kind(q, q, q, True, None)[1]["hd96"] == "split"
    assert "hd96" not in attention_module.call_kind(q[..., :64], q[..., :64], q[..., :64], True,
                                                    None)[1]  # fmt: skip
    monkeypatch.setattr(importlib.import_module("igpt_kernels._triton"), "AUTOTUNE", False)
    assert attention_module.call_kind(q, q, q, True, None)[1]["autotune"] is False
    x = torch.empty(4, 32)
    can = {"triton": None}
    assert ln_gemm_module.call_kind(x, can, {})[1]["tf32"] is False
    torch.backends.fp32_precision = "tf32"
    try:
        assert ln_gemm_module.call_kind(x, can, {})[1]["tf32"] is True
        assert ln_gemm_module.call_kind(x.half(), can, {})[1]["tf32"] is False
    finally:
        torch.backends.fp32_precision = "none"


# --------------------------------------------------------------------------------------
# a settled choice: no key, no candidates, and forgotten when the table changes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", [True, False], ids=["file", "memory only"])
def test_a_settled_choice_skips_the_key_and_follows_the_table(tmp_path, monkeypatch, file):
    d = _dispatcher(tmp_path if file else False)
    monkeypatch.setattr(_dispatch, "DISPATCH", d)
    real_kind = attention_module.call_kind
    kinds = []
    monkeypatch.setattr(attention_module, "call_kind", lambda *a: kinds.append(1) or real_kind(*a))
    monkeypatch.setattr(
        attention_module, "sdpa_kernel_reason", lambda kern, *a: None if kern == "flash" else "no"
    )
    q, k, v = (torch.randn(1, 2, 8, 80) for _ in range(3))  # D=80: sdpa-flash only
    names, fields = real_kind(q, k, v, True, None)
    key = d.key("attention", fields, names)
    d.record(GPU, key, {"sdpa-flash": OK})
    entry = d._table(GPU, load=True)[key]
    entry.update(backend="sdpa-flash", ms={"sdpa-flash": 1.0})
    assert attention_module.choose_backend(q, k, v) == "sdpa-flash"
    assert attention_module.choose_backend(q, k, v) == "sdpa-flash"
    assert len(kinds) == 1  # the second call looked nothing up but its signature
    d.set_mode("fixed")  # a setting changes: so may the choice
    assert attention_module.choose_backend(q, k, v) == "sdpa"
    d.set_mode("measure")
    assert attention_module.choose_backend(q, k, v) == "sdpa-flash"
    d.record(GPU, key, {"sdpa-flash": FAIL})  # the table changes: the settled choice goes
    assert attention_module.choose_backend(q, k, v) == "sdpa-math"
    torch.testing.assert_close(attention(q, k, v), reference.attention(q, k, v))
