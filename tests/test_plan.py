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
    with pytest.raises(SystemExit, match="memory size must be"):
        main(["plan", "--model", "igpt-s", "--batch-size", "8", "--memory", "40 gigs"])


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
