"""igpt.memory.plan and ``igpt plan``: answers for every size, consistent across budgets."""

import dataclasses
import json

import pytest

from igpt import IGPTConfig, memory
from igpt.cli import main

GIB = 2**30
SIZES = ["igpt-s", "igpt-m", "igpt-l", "igpt-xl"]


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("n_px", [32, 48, 64])
def test_answers_for_every_size_and_gpu_count(name, n_px):
    config = IGPTConfig.from_name(name, n_px=n_px)
    for gpus in (1, 2, 4, 8):
        p = memory.plan(config, batch_size=8, memory_bytes=40 * GIB, gpus=gpus)
        assert p.micro_batch * p.accumulation * gpus == 8
        if p.fits:
            assert p.predicted_peak_bytes <= 40 * GIB
            assert p.predicted_peak_bytes == p.estimate.peak
        else:
            assert p.needed_bytes == p.predicted_peak_bytes > 40 * GIB
            assert p.needed_gpus is None or p.needed_gpus > gpus


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_more_memory_never_gives_a_slower_plan(name, gpus):
    config = IGPTConfig.from_name(name, n_px=64)
    previous = None
    for gib in (8, 16, 24, 40, 80, 141):
        p = memory.plan(config, batch_size=8, memory_bytes=gib * GIB, gpus=gpus)
        if previous is not None and previous.fits:
            assert p.fits
            assert p.step_seconds <= previous.step_seconds
            # the plan that fitted before fits here too
            assert previous.predicted_peak_bytes <= gib * GIB
        previous = p


def test_the_issues_goals_are_planned():
    large = memory.plan(IGPTConfig.from_name("igpt-l", n_px=64), batch_size=8, memory_bytes="40GiB")
    medium = memory.plan(
        IGPTConfig.from_name("igpt-m", n_px=64), batch_size=8, memory_bytes="16GiB"
    )
    assert large.fits and large.predicted_peak_bytes <= 40 * GIB
    assert medium.fits and medium.predicted_peak_bytes <= 16 * GIB


def test_nothing_fits_says_what_would():
    config = IGPTConfig.from_name("igpt-xl", n_px=64)
    p = memory.plan(config, batch_size=8, memory_bytes="24GiB")
    assert not p.fits and p.needed_bytes > 24 * GIB
    assert p.needed_gpus is not None
    again = memory.plan(config, batch_size=8, memory_bytes="24GiB", gpus=p.needed_gpus)
    assert again.fits
    roomy = memory.plan(config, batch_size=8, memory_bytes=p.needed_bytes)
    assert roomy.fits


def test_checkpointing_recomputes_fewer_blocks_when_there_is_room():
    config = IGPTConfig.from_name("igpt-l", n_px=64)
    tight = memory.plan(config, batch_size=8, memory_bytes="24GiB", allow_offload=False)
    roomy = memory.plan(config, batch_size=8, memory_bytes="80GiB", allow_offload=False)
    assert tight.fits and roomy.fits
    assert roomy.recomputed <= tight.recomputed
    assert roomy.step_seconds <= tight.step_seconds


def test_bad_arguments():
    config = IGPTConfig.from_name("igpt-s", n_px=32)
    with pytest.raises(ValueError, match="divide by gpus"):
        memory.plan(config, batch_size=6, memory_bytes="40GiB", gpus=4)
    with pytest.raises(ValueError, match="memory size"):
        memory.plan(config, batch_size=8, memory_bytes="lots")


def test_cli_json(capsys):
    main(["plan", "--model", "igpt-l", "--n-px", "64", "--batch-size", "8", "--memory", "40GiB",
          "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    for key in ("fits", "micro_batch", "accumulation", "checkpointing", "offload",
                "predicted_peak_bytes"):  # fmt: skip
        assert key in out
    assert out["fits"] and out["predicted_peak_bytes"] <= 40 * GIB


def test_cli_text_and_errors(capsys):
    main(["plan", "--model", "igpt-xl", "--n-px", "64", "--batch-size", "8", "--memory", "24G"])
    text = capsys.readouterr().out
    assert "nothing fits" in text and "8 GPUs of 22.4 GiB" in text  # 24G = 24e9 bytes
    # refused while parsing (issue 26): exit 2, the reason on stderr in one line
    for bad in ("40 gigs", "40XB"):
        with pytest.raises(SystemExit) as e:
            main(["plan", "--model", "igpt-s", "--batch-size", "8", "--memory", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "memory size must be" in err and err.count("\n") == 1


def test_alternatives_fit_and_are_not_faster():
    config = IGPTConfig.from_name("igpt-l", n_px=64)
    p = memory.plan(config, batch_size=8, memory_bytes="40GiB")
    assert len(p.alternatives) >= 2
    first = p.alternatives[0]
    assert (first["micro_batch"], first["checkpointing"], first["offload"]) == (
        p.micro_batch,
        p.checkpointing,
        p.offload,
    )
    for a in p.alternatives:
        assert a["predicted_peak_bytes"] <= 40 * GIB
        assert a["relative_time"] >= 1.0
    assert [a["relative_time"] for a in p.alternatives] == sorted(
        a["relative_time"] for a in p.alternatives
    )


@pytest.mark.parametrize("fsdp", [False, True])
def test_fsdp_can_be_fixed(fsdp):
    """A trainer stepping back after an OOM keeps its wrapping: plan(fsdp=...) holds to it."""
    config = IGPTConfig.from_name("igpt-l", n_px=64)
    free = memory.plan(config, batch_size=8, memory_bytes="40GiB", gpus=8)
    held = memory.plan(config, batch_size=8, memory_bytes="40GiB", gpus=8, fsdp=fsdp)
    assert held.fsdp is fsdp
    assert all(a["fsdp"] is fsdp for a in held.alternatives)
    assert {a["fsdp"] for a in free.alternatives} == {False, True}
    if free.fsdp is fsdp:  # the same choice; only the alternatives of the other kind go
        assert dataclasses.replace(held, alternatives=()) == dataclasses.replace(
            free, alternatives=()
        )


def _bench_train():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_bench_train_predictions_and_plans_are_the_memory_models():
    """The CPU-runnable half of benchmarks/bench_train.py: its predicted peaks and its
    plan table (the measured half needs a GPU)."""
    bench = _bench_train()
    sizes = [(m, IGPTConfig.from_name(m, n_px=64)) for m in ("igpt-s", "igpt-m", "igpt-l")]
    rows = bench.plan_rows(sizes, 8)
    cases = [(m, c, g) for m, c in sizes for g in (24, 40, 80)]
    assert [(r["model"], r["memory_gib"]) for r in rows] == [(m, g) for m, _, g in cases]
    for r, (_, config, gib) in zip(rows, cases, strict=True):
        p = memory.plan(config, batch_size=8, memory_bytes=gib * GIB)
        assert p.fits and r["fits"] and r["predicted_gib"] == p.predicted_peak_bytes / GIB
        assert r["plan"] == p.describe()
    xl = bench.plan_rows([("igpt-xl", IGPTConfig.from_name("igpt-xl", n_px=64))], 8, (24,))
    assert not xl[0]["fits"] and xl[0]["plan"].startswith("nothing fits (needs ")
    large = sizes[2][1]
    pol = bench.policy("igpt plan=40GiB", large, 8, "cuda")
    p = memory.plan(large, batch_size=8, memory_bytes="40GiB")
    assert (pol["micro"], pol["accumulation"], pol["checkpointing"], pol["offload"]) == (
        p.micro_batch, p.accumulation, p.checkpointing, p.offload,
    )  # fmt: skip
    assert bench.predicted_peak("igpt plan=40GiB", large, 8, "step", "cuda") == p.estimate.peak
    ck = memory.estimate(large, batch_size=8, checkpointing=1, optimizer="sgd")
    assert bench.predicted_peak("igpt ckpt=1", large, 8, "fwd+bwd", "cuda") == ck.peak
    sdpa = memory.estimate(large, batch_size=8, kernels="sdpa")
    assert bench.predicted_peak("sdpa eager", large, 8, "step", "cuda") == sdpa.peak
    assert bench.predicted_peak("sdpa compile", large, 8, "step", "cuda") is None
    with pytest.raises(ValueError, match="nothing fits"):
        bench.policy("igpt plan=1GiB", large, 8, "cuda")
