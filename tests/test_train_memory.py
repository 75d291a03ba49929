"""The trainer under a memory budget (igpt.memplan): --offload-activations gives the same
numbers, --max-memory runs igpt.memory's plan, an out-of-memory step is redone under the
next plan, a budget nothing fits is refused, and the peak check's bookkeeping."""

import json
import math
from pathlib import Path

import pytest
import torch

from igpt import IGPTConfig, memory
from igpt.memplan import TrainMemory
from igpt.palette import Palette
from igpt.train import TrainConfig, Trainer, pretrain

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2}
# igpt-tiny (TINY) at 8x8, batch 8, fp32 on the CPU: 4.5 MB fits micro-batch 4 x 2 with block
# 0 recomputed (peak 4.19 MB); the next plan down is micro-batch 2 x 4, no checkpointing
BUDGET = "4.5MB"


@pytest.fixture(scope="module", autouse=True)
def _module_setup(tmp_path_factory, one_thread):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGPT_CACHE", str(tmp_path_factory.mktemp("token_cache")))
        yield


@pytest.fixture(scope="module")
def palette_file(tmp_path_factory):
    """16 greys (the digits are grey): a palette file, so no test fits one."""
    path = tmp_path_factory.mktemp("greys") / "greys.npy"
    Palette(torch.linspace(0, 255, 16).unsqueeze(1).expand(16, 3).contiguous()).save(path)
    return str(path)


def _cfg(tmp_path, palette, name="run", **kw):
    base = dict(
        model="igpt-tiny", n_px=8, data="digits", steps=4, batch_size=8, lr=3e-3, log_every=1,
        ckpt_every=4, val_size=8, out=str(tmp_path / name), progress=False,
        model_overrides=TINY, palette=palette, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _grads(trainer):
    """Gradients of the summed loss on the first micro-batch of step 0 (train mode)."""
    trainer.model.train()
    tokens = trainer.batches.tokens(0, slice(0, trainer.micro))
    trainer.model.zero_grad(set_to_none=True)
    trainer.loss_sum(tokens, None).backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad(set_to_none=True)
    return grads


def _recomputing(trainer):
    return ["forward" in block.__dict__ for block in trainer.raw_model.transformer.h]


# ----------------------------------------------------------------------------- offload


@pytest.mark.parametrize("every", [0, 1, 2])
def test_offload_gives_the_same_gradients_and_losses(tmp_path, palette_file, every):
    plain = Trainer(_cfg(tmp_path, palette_file, "plain", checkpointing=every))
    off = Trainer(
        _cfg(tmp_path, palette_file, "off", checkpointing=every, offload_activations=True)
    )
    assert _recomputing(off) == _recomputing(plain) == [every > 0, every == 1]
    la, lb = _losses(plain.fit()["out"]), _losses(off.fit()["out"])
    assert len(la) == 4 and la == lb  # bit for bit on the CPU
    # after training (the head starts at zero, so at step 0 the blocks' gradients are 0)
    a, b = _grads(plain), _grads(off)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(g.abs().sum() > 0 for g in a)


def _recorder(shapes):
    def pack(x):
        shapes.append(x.shape)
        return x

    return pack


def test_offload_takes_the_saved_tensors_in_training_only(tmp_path, palette_file):
    """save_on_cpu is innermost: an outer hook sees nothing autograd saves in the trainer's
    forward when offload is on, and everything when it is off."""
    seen = {}
    for offload in (False, True):
        t = Trainer(_cfg(tmp_path, palette_file, f"o{offload}", offload_activations=offload))
        t.model.train()
        tokens = t.batches.tokens(0, slice(0, 2))
        shapes = seen[offload] = []
        with torch.autograd.graph.saved_tensors_hooks(_recorder(shapes), lambda x: x):
            t.loss_sum(tokens, None)
    assert seen[True] == [] and len(seen[False]) > 10


# ----------------------------------------------------------------------------- --max-memory


def test_max_memory_runs_the_plan_and_matches_the_same_settings_by_hand(tmp_path, palette_file):
    t = Trainer(_cfg(tmp_path, palette_file, "planned", max_memory=BUDGET))
    want = memory.plan(
        t.raw_model.config, batch_size=8, memory_bytes=memory.parse_size(BUDGET),
        device="cpu", precision="fp32",
    )  # fmt: skip
    assert want.fits and (want.micro_batch, want.accumulation, want.checkpointing) == (4, 2, 2)
    assert t.memory.plan == want
    assert (t.micro, t.cfg.grad_accum, t.cfg.checkpointing) == (4, 2, 2)
    assert t.cfg.offload_activations is want.offload is False
    assert _recomputing(t) == [True, False]
    assert t.cfg.max_memory == BUDGET and t.cfg.batch_size == 8  # the global batch stays
    planned = _losses(t.fit()["out"])
    by_hand = _losses(
        pretrain(_cfg(tmp_path, palette_file, "by_hand", grad_accum=2, checkpointing=2))["out"]
    )
    assert len(planned) == 4 and planned == by_hand
    run = Path(t.run.path)
    assert json.loads((run / "config.json").read_text())["train"]["grad_accum"] == 2
    plans = json.loads((run / "memory.json").read_text())["plans"]
    assert [(p["from_step"], p["micro_batch"], p["checkpointing"]) for p in plans] == [(None, 4, 2)]
    assert "measured" not in plans[0]  # the CPU measures nothing


def test_max_memory_plans_offload_when_only_offload_fits(tmp_path, palette_file):
    # 2.46 MB: only micro-batch 1 with offload (2.45 MB) fits
    t = Trainer(_cfg(tmp_path, palette_file, max_memory=2_455_000))
    assert t.memory.plan.offload and t.cfg.offload_activations
    assert (t.micro, t.cfg.grad_accum) == (1, 8)
    assert all(math.isfinite(x) for x in _losses(t.fit()["out"]))


def test_offload_asked_for_stays_on_under_a_plan_without_it(tmp_path, palette_file):
    t = Trainer(_cfg(tmp_path, palette_file, max_memory=BUDGET, offload_activations=True))
    assert not t.memory.plan.offload and t.cfg.offload_activations
    t.apply_memory(t.memory.adopt(t.memory.next_plan(), step=0))
    assert t.cfg.offload_activations and t.cfg.grad_accum == 4


def test_nothing_fits_is_one_clear_error(tmp_path, palette_file):
    with pytest.raises(ValueError) as err:
        Trainer(_cfg(tmp_path, palette_file, max_memory="1MB"))
    text = str(err.value)
    t = Trainer(_cfg(tmp_path, palette_file, "ok"))
    config = t.raw_model.config
    smallest = memory.plan(config, batch_size=8, memory_bytes=10**6, device="cpu", precision="fp32")
    assert not smallest.fits
    assert "max_memory '1MB'" in text and memory.format_size(smallest.needed_bytes) in text
    assert "raise --max-memory" in text


@pytest.mark.parametrize("bad", ["lots", "0GiB", "-3G"])
def test_bad_max_memory_names_itself(tmp_path, palette_file, bad):
    with pytest.raises(ValueError, match="^max_memory: memory size must be .*got"):
        _cfg(tmp_path, palette_file, max_memory=bad)


def test_flags_come_from_the_config():
    from igpt.cli import build_parser
    from igpt.commands._common import config_from_args

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--max-memory", "40GiB", "--offload-activations"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.max_memory == "40GiB" and cfg.offload_activations is True
    cfg = config_from_args(TrainConfig, parser.parse_args(["pretrain"]))
    assert cfg.max_memory is None and cfg.offload_activations is False


def test_igpt_pretrain_max_memory_applies_the_plan(tmp_path, palette_file, capsys):
    from igpt import IGPTConfig
    from igpt.cli import main

    config = IGPTConfig.from_name("igpt-tiny", n_px=8, n_colors=16)
    cpu = dict(batch_size=4, device="cpu", precision="fp32")
    roomy = memory.plan(config, memory_bytes="40GiB", **cpu)
    budget = roomy.predicted_peak_bytes - 1  # the roomy plan just misses: another one runs
    want = memory.plan(config, memory_bytes=budget, **cpu)
    assert want.fits and (want.accumulation, want.checkpointing) != (1, 0)
    out = tmp_path / "cli"
    args = ["pretrain", "--n-px", "8", "--steps", "2", "--batch-size", "4", "--out", str(out)]
    args += ["--no-progress", "--device", "cpu", "--palette", palette_file, "--val-size", "4"]
    main(args + ["--max-memory", str(budget)])
    assert json.loads(capsys.readouterr().out)["step"] == 2
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["grad_accum"], train["checkpointing"], train["offload_activations"]) == (
        want.accumulation, want.checkpointing, want.offload,
    )  # fmt: skip
    plans = json.loads((out / "memory.json").read_text())["plans"]
    assert plans[0]["predicted_peak_bytes"] == want.predicted_peak_bytes <= budget


# ----------------------------------------------------------------------------- out of memory


def _oom_on_call(trainer, n):
    """Make the n-th call of trainer.loss_sum (0-based) raise an out-of-memory error."""
    real, calls = trainer.loss_sum, []

    def loss_sum(tokens, mask):
        calls.append(tokens.shape[0])
        if len(calls) == n + 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(tokens, mask)

    trainer.loss_sum = loss_sum
    return calls


def test_out_of_memory_steps_back_to_the_next_plan_and_redoes_the_step(tmp_path, palette_file):
    t = Trainer(_cfg(tmp_path, palette_file, "oom", max_memory=BUDGET))
    first = t.memory.plan
    # calls 0-3: steps 0 and 1 (2 micro-batches each); call 5: step 2's second micro-batch,
    # after the first one's backward has written gradients that the redo must not keep
    calls = _oom_on_call(t, 5)
    summary = t.fit()
    second = t.memory.plan
    assert second.predicted_peak_bytes < first.predicted_peak_bytes
    assert second == memory.plan(
        t.raw_model.config, batch_size=8, memory_bytes=first.predicted_peak_bytes - 1,
        device="cpu", precision="fp32", fsdp=False,
    )  # fmt: skip
    assert (t.micro, t.cfg.grad_accum, t.cfg.checkpointing) == (2, 4, 0)
    assert _recomputing(t) == [False, False]
    assert calls[:6] == [4, 4, 4, 4, 4, 4] and calls[6:10] == [2, 2, 2, 2]
    losses = _losses(summary["out"])
    assert summary["step"] == 4 and len(losses) == 4 and all(map(math.isfinite, losses))
    plans = json.loads((Path(summary["out"]) / "memory.json").read_text())["plans"]
    assert [(p["from_step"], p["accumulation"]) for p in plans] == [(None, 2), (2, 4)]

    # the same as a run told to switch to the second plan's settings at step 2
    ref = Trainer(_cfg(tmp_path, palette_file, "ref", grad_accum=2, checkpointing=2))
    expected = [ref.train_step(s)["loss"] for s in (0, 1)]
    ref.apply_memory(dict(grad_accum=4, checkpointing=0, offload_activations=False, fsdp=False))
    expected += [ref.train_step(s)["loss"] for s in (2, 3)]
    assert losses == expected


def test_out_of_memory_is_raised_without_a_plan_or_a_smaller_one(tmp_path, palette_file):
    t = Trainer(_cfg(tmp_path, palette_file, "noplan"))
    _oom_on_call(t, 0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        t.fit()
    # the smallest plan there is (micro-batch 1, offload): nothing below it
    t = Trainer(_cfg(tmp_path, palette_file, "smallest", max_memory=2_455_000))
    assert t.memory.next_plan() is None
    _oom_on_call(t, 3)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        t.fit()


# ----------------------------------------------------------------------------- peak check


def test_peak_check_resets_after_the_first_step_and_reads_after_the_third(
    tmp_path, palette_file, monkeypatch
):
    """The CUDA-only bookkeeping, run on the CPU with the two torch.cuda calls recorded."""
    events = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: events.append("read") or 7)
    t = Trainer(_cfg(tmp_path, palette_file, "peak", steps=5, max_memory=BUDGET))
    t.memory.device = torch.device("cuda")  # what a CUDA run has
    rows = []
    real_log = t._log
    monkeypatch.setattr(t, "_log", lambda row: rows.append(row) or real_log(row))
    t.fit()
    assert events == ["reset", "read"]
    measured = [r for r in rows if "measured_peak_bytes" in r]
    assert [r["step"] for r in measured] == [3]
    assert measured[0]["predicted_peak_bytes"] == t.memory.plan.predicted_peak_bytes
    assert measured[0]["measured_peak_bytes"] == 7
    plans = json.loads((Path(t.run.path) / "memory.json").read_text())["plans"]
    assert plans[0]["measured"] == {"peak_bytes": 7, "steps": 3}


def test_peak_check_of_a_one_step_run_reads_without_reset(tmp_path, palette_file, monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: events.append("read") or 7)
    t = Trainer(_cfg(tmp_path, palette_file, "one", steps=1, max_memory=BUDGET))
    t.memory.device = torch.device("cuda")
    t.fit()
    assert events == ["read"]


def test_train_memory_without_a_budget_keeps_the_settings(tmp_path, palette_file):
    t = Trainer(_cfg(tmp_path, palette_file, grad_accum=4, checkpointing=1))
    assert isinstance(t.memory, TrainMemory) and t.memory.plan is None
    assert (t.micro, t.cfg.grad_accum, t.cfg.checkpointing) == (2, 4, 1)
    assert not (Path(t.run.path) / "memory.json").exists()


def test_train_memory_returns_the_plan_and_leaves_the_config_alone(tmp_path, palette_file):
    """The plan is the trainer's to apply (issue 21): building TrainMemory changes no config."""
    from igpt.distributed import Distributed
    from igpt.rundir import RunDir

    cfg = _cfg(tmp_path, palette_file, max_memory=BUDGET)
    before = cfg.to_dict()
    config = IGPTConfig.from_name("igpt-tiny", n_px=8, n_colors=16, **TINY)
    run = RunDir(tmp_path / "plain")
    m = TrainMemory(
        cfg, config, dist=Distributed("cpu"), device=torch.device("cpu"), amp=False, run=run
    )
    assert cfg.to_dict() == before
    want = {"grad_accum": 2, "checkpointing": 2, "offload_activations": False, "fsdp": False}
    assert m.settings == want and (m.plan.accumulation, m.plan.checkpointing) == (2, 2)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_run_logs_the_measured_peak_beside_the_prediction(tmp_path, palette_file):
    summary = pretrain(_cfg(tmp_path, palette_file, "cuda", device="cuda", max_memory="40GiB"))
    plans = json.loads((Path(summary["out"]) / "memory.json").read_text())["plans"]
    measured = plans[0]["measured"]["peak_bytes"]
    assert measured > 0 and plans[0]["predicted_peak_bytes"] > 0
    rows = [
        json.loads(x) for x in (Path(summary["out"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["measured_peak_bytes"] for r in rows if "measured_peak_bytes" in r] == [measured]
