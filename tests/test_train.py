"""igpt.train and the pieces it is built on (igpt.objectives, igpt.batches): objectives and
masks, activation checkpointing, the trainer, bit-for-bit resume, the non-finite guard, gloo
DDP and FSDP2 (2 processes == 1 process at the same global batch), the LR search, the CLI."""

import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import latest_checkpoint, load_checkpoint, load_model
from igpt.objectives import MaskRows, ar_loss, bert_loss, bert_mask, objective_of
from igpt.palette import Palette
from igpt.train import (
    TrainConfig,
    Trainer,
    apply_checkpointing,
    lr_lambda_factory,
    lr_search,
    pretrain,
    rng_state,
    set_rng_state,
)

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2}


@pytest.fixture(scope="module", autouse=True)
def _module_setup(tmp_path_factory, one_thread):
    """One token cache for the module (the digits are tokenized once, not per test), and one
    CPU thread (see conftest's ``one_thread``), in the subprocesses too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGPT_CACHE", str(tmp_path_factory.mktemp("token_cache")))
        mp.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
        yield


def _cfg(tmp_path, name="run", **kw):
    base = dict(
        model="igpt-tiny",
        n_px=8,
        data="digits",
        steps=6,
        batch_size=8,
        lr=3e-3,
        log_every=1,
        ckpt_every=3,
        val_size=16,
        out=str(tmp_path / name),
        progress=False,
        model_overrides=TINY,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def palette_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("palette") / "palette.npy"
    g = torch.Generator().manual_seed(0)
    Palette(torch.rand(16, 3, generator=g) * 255).save(path)
    return str(path)


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# ----------------------------------------------------------------------------- objectives


def test_bert_mask_statistics():
    m = bert_mask((256, 1024), 0.15, seed=0)
    assert m.dtype == torch.bool and m.shape == (256, 1024)
    assert abs(m.float().mean().item() - 0.15) < 0.003
    # independence: per-position rates are all near p and neighbours are uncorrelated
    assert (m.float().mean(0) - 0.15).abs().max() < 0.1
    a, b = m[:, :-1].float().flatten(), m[:, 1:].float().flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01
    assert m.sum(1).float().std() == pytest.approx(math.sqrt(1024 * 0.15 * 0.85), rel=0.15)
    assert not bert_mask((4, 9), 0.0, seed=0).any() and bert_mask((4, 9), 1.0, seed=0).all()
    assert torch.equal(bert_mask((5, 7), 0.3, seed=3), bert_mask((5, 7), 0.3, seed=3))
    assert torch.equal(bert_mask((5, 7), 0.3, seed=3), bert_mask((5, 7), 0.3, seed=(3,)))
    assert not torch.equal(bert_mask((5, 7), 0.3, seed=(3, 1)), bert_mask((5, 7), 0.3, seed=3))
    with pytest.raises(ValueError, match="probability"):
        bert_mask((2, 2), 1.5, seed=0)


def test_mask_rows_are_the_mask_whatever_the_batching(monkeypatch):
    """Any row range, read in any order and batch size, is that slice of the whole mask
    (across block boundaries too), so every device and batch size sees one mask."""
    import igpt.objectives

    monkeypatch.setattr(igpt.objectives, "MASK_BLOCK", 8)
    whole = bert_mask((21, 16), 0.3, seed=(5, 2))
    rows = MaskRows((21, 16), 0.3, seed=(5, 2))
    for bs in (1, 3, 8, 21):
        got = torch.cat([rows(s, s + bs) for s in reversed(range(0, 21, bs))][::-1])
        assert torch.equal(got, whole)
    assert rows(19, 40).shape == (2, 16) and rows(21, 30).shape == (0, 16)


def test_objective_is_read_from_one_key_and_old_finetune_checkpoints():
    assert objective_of({"objective": "bert"}) == "bert"
    assert objective_of({"finetune": {"objective": "bert"}}) == "bert"  # before one key
    assert objective_of({}) == "ar"


def _model(n_colors=8):
    model = IGPT(IGPTConfig(n_px=4, n_colors=n_colors, **TINY))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def test_ar_loss_is_mean_cross_entropy():
    model, tokens = _model(), torch.randint(0, 8, (3, 16))
    ref = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    assert torch.allclose(ar_loss(model, tokens), ref)
    assert torch.allclose(ar_loss(model, tokens, reduction="sum"), ref * 48)


def test_bert_loss_counts_masked_positions_only():
    model, tokens = _model(), torch.randint(0, 8, (3, 16))
    mask = bert_mask(tokens.shape, 0.4, seed=1)
    logits = model(tokens, bert_mask=mask)
    ref = F.cross_entropy(logits[mask], tokens[mask])
    assert torch.allclose(bert_loss(model, tokens, mask=mask), ref)
    # the targets at unmasked positions do not matter
    other = torch.where(mask, tokens, (tokens + 1) % 8)
    out = bert_loss(model, other, mask=mask)
    ref2 = F.cross_entropy(model(other, bert_mask=mask)[mask], tokens[mask])
    assert torch.allclose(out, ref2)
    assert torch.allclose(bert_loss(model, tokens, 0.4, seed=1), ref)
    empty = bert_loss(model, tokens, mask=torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_generative_loss_is_fp32_whatever_the_logits_dtype():
    from igpt.objectives import generative_loss

    logits, tokens = torch.randn(2, 5, 8, dtype=torch.float64) * 4, torch.randint(0, 8, (2, 5))
    ref = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    low = generative_loss(logits.to(torch.bfloat16), tokens)
    assert low.dtype == torch.float32
    # the bf16 logits' rounding only (~3 digits), not a bf16 log-softmax's
    assert low.item() == pytest.approx(ref.item(), rel=1e-2)
    with pytest.raises(ValueError, match="reduction"):
        generative_loss(logits, tokens, reduction="none")


def test_checkpointing_gives_the_same_gradients_and_state_dict():
    """Moved here from test_model.py: recomputation is the trainer's, not the model's."""
    torch.manual_seed(1)
    model = IGPT(IGPTConfig(n_px=4, n_colors=16, **{**TINY, "n_layer": 3}))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    keys = list(model.state_dict())
    x = torch.randint(0, 16, (2, 16))
    grads = []
    for every in (0, 1, 2):
        model.zero_grad()
        apply_checkpointing(model, every)
        assert list(model.state_dict()) == keys
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g in grads[1:]:
        for a, b in zip(grads[0], g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="every must be an int >= 0, got -1"):
        apply_checkpointing(model, -1)


def test_checkpointing_recomputes_only_chosen_blocks_in_training(monkeypatch):
    import copy

    import igpt.memplan

    calls = []
    real = igpt.memplan.checkpoint
    monkeypatch.setattr(
        igpt.memplan, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = apply_checkpointing(
        IGPT(IGPTConfig(n_px=4, n_colors=8, n_layer=5, n_embd=64, n_head=2)), 2
    )
    x = torch.randint(0, 8, (2, 16))
    model(x).sum().backward()
    assert len(calls) == 3  # blocks 0, 2, 4
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert len(calls) == 3  # no recomputation without gradients or in eval mode
    twin = copy.deepcopy(model).train()  # a copy recomputes its own blocks, not the original's
    twin(x).sum().backward()
    assert len(calls) == 6 and model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert all(p.grad is not None for p in twin.parameters())
    apply_checkpointing(model.train(), 0)
    model(x).sum().backward()
    assert len(calls) == 6


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda_factory(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expect = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1])
    assert expect[2] == got[2]


# ----------------------------------------------------------------------------- trainer


def test_loss_drops_on_digits(tmp_path):
    summary = pretrain(
        _cfg(tmp_path, steps=30, batch_size=16, lr=1e-2, log_every=1, ckpt_every=30, val_size=64)
    )
    losses = _losses(tmp_path / "run")
    assert losses[0] == pytest.approx(math.log(16), abs=0.05)  # zero head: uniform logits
    assert np.mean(losses[-5:]) < losses[0] - 0.6, losses
    assert summary["val_loss"] < losses[0] - 0.5 and summary["val_bits_per_token"] == pytest.approx(
        summary["val_loss"] / math.log(2)
    )
    # the literature's bits/dim: per sub-pixel, three per token (pixel)
    assert summary["val_bits_per_dim"] == pytest.approx(summary["val_bits_per_token"] / 3)
    assert "val_bpd" not in summary
    run = tmp_path / "run"
    conf = json.loads((run / "config.json").read_text())
    assert conf["train"]["steps"] == 30 and conf["model"]["n_colors"] == 16
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "palette.npy").is_file()
    model, palette, ckpt = load_model(run)  # what evaluation and sampling load
    assert len(palette) == 16 and ckpt["step"] == 30 and ckpt["objective"] == "ar"


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_kill_and_resume_is_bit_for_bit(tmp_path, monkeypatch, palette_file, objective):
    kw = dict(objective=objective, palette=palette_file, steps=4, ckpt_every=2)
    cfg = _cfg(tmp_path, "full", **kw)
    pretrain(cfg)
    full = _losses(cfg.out)
    assert len(full) == 4

    killed = _cfg(tmp_path, "killed", **kw)
    real_step = Trainer.train_step

    def dies_in_step_4(self, step):
        if step == 3:  # the process dies after logging step 3, past the checkpoint at 2
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(killed)
    monkeypatch.undo()
    assert latest_checkpoint(killed.out).name == "ckpt_00000002.pt"
    assert len(_losses(killed.out)) == 3  # step 3 was logged, but is not in the checkpoint
    pretrain(killed, resume=True)
    assert _losses(killed.out) == full  # bit-for-bit, and the log has no duplicate rows
    a = load_checkpoint(cfg.out)["model"]
    b = load_checkpoint(killed.out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_logged_row_has_a_loss_and_resume_logs_the_same_rows(
    tmp_path, monkeypatch, palette_file
):
    """Validation (step 2) and checkpoint (step 3) steps off the log_every grid: each row
    still has `loss`, and a run resumed at step 3 averages the same windows as one that ran
    straight through."""
    kw = dict(palette=palette_file, steps=5, log_every=4, ckpt_every=3, val_every=2)
    full = _cfg(tmp_path, "full", **kw)
    pretrain(full)
    rows = [json.loads(x) for x in (Path(full.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 5]
    assert all("loss" in r for r in rows) and "val_loss" in rows[0]

    killed = _cfg(tmp_path, "killed", **kw)
    real_step = Trainer.train_step

    def dies_in_step_5(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        pretrain(killed)
    monkeypatch.undo()
    assert latest_checkpoint(killed.out).name == "ckpt_00000003.pt"
    pretrain(killed, resume=True)
    assert _losses(killed.out) == _losses(full.out)


@pytest.mark.parametrize(
    "field, value",
    [
        ("mask_prob", 1.5),
        ("checkpointing", -1),
        ("n_colors", 0),
        ("val_size", 0),
        ("grad_clip", -1.0),
    ],
)
def test_config_names_the_bad_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must .*got {value!r}"):
        _cfg(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", "3e-3"),
        ("weight_decay", float("nan")),
        ("weight_decay", -0.1),
        ("grad_clip", float("inf")),
        ("mask_prob", 0.0),
        ("val_frac", 0.0),
        ("val_frac", 1.0),
        ("steps", 0),
        ("steps", True),
        ("steps", 2.5),
        ("batch_size", 0),
        ("grad_accum", 0),
        ("log_every", 0),
        ("ckpt_every", -5),
        ("seed", -1),
        ("warmup_steps", -1),
        ("warmup_steps", 7),  # more than steps=6
        ("n_px", 0),
        ("betas", (1.0, 0.95)),
        ("betas", (0.9, float("nan"))),
        ("betas", (0.9,)),
        ("progress", "yes"),
    ],
)
def test_config_refuses_non_finite_and_out_of_range_values(tmp_path, field, value):
    """Refused when the config is built, before any data is read (`--lr inf` used to train
    and write NaN checkpoints); the message names the field, its flag and the value."""
    with pytest.raises(ValueError, match=rf"^{field} must .*got {re.escape(repr(value))}"):
        _cfg(tmp_path, **{field: value})
    assert not (tmp_path / "run").exists()


def test_progress_bars_only_on_a_terminal_unless_asked(tmp_path, palette_file, monkeypatch):
    from tqdm.contrib.logging import _TqdmLoggingHandler

    from igpt.train import progress_enabled

    class Tty:
        def isatty(self):
            return True

    assert progress_enabled(None, Tty()) and not progress_enabled(None, io.StringIO())
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, Tty())
    assert TrainConfig().progress is None  # auto
    # while training, log lines go through tqdm.write (not glued onto a bar)
    seen = []
    real_step = Trainer.train_step

    def step(self, s):
        seen.append(any(isinstance(h, _TqdmLoggingHandler) for h in logging.root.handlers))
        return real_step(self, s)

    monkeypatch.setattr(Trainer, "train_step", step)
    handler = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(handler)
    try:
        pretrain(_cfg(tmp_path, palette=palette_file, steps=2, ckpt_every=2, val_size=4))
    finally:
        logging.root.removeHandler(handler)
    assert seen == [True, True] and handler in logging.root.handlers + [handler]


def test_palette_file_and_n_colors_must_agree(tmp_path, palette_file):
    with pytest.raises(ValueError, match="has 16 colours but n_colors is 8"):
        Trainer(_cfg(tmp_path, palette=palette_file, n_colors=8))


def test_resume_refuses_other_settings(tmp_path, palette_file):
    pretrain(_cfg(tmp_path, steps=3, palette=palette_file))
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(_cfg(tmp_path, steps=3, palette=palette_file, batch_size=4, resume=True))
    with pytest.raises(FileExistsError, match="--resume"):  # never silently mix two runs
        pretrain(_cfg(tmp_path, steps=3, palette=palette_file))
    # every change that would make the run meaningless is named, with both values
    again = dict(steps=3, palette=palette_file, resume=True)
    for change, said in [
        (dict(batch_size=4), "batch_size 8 there, 4 now"),
        (dict(objective="bert"), "objective 'ar' there, 'bert' now"),
        (dict(data="npz:/x.npz"), "data 'digits' there, 'npz:/x.npz' now"),
        (dict(model_overrides={**TINY, "n_layer": 3}), "model_overrides"),
        (dict(n_px=4), "n_px 8 there, 4 now"),
        (dict(seed=1), "seed 0 there, 1 now"),
        (dict(val_frac=0.2), "val_frac 0.1 there, 0.2 now"),
        (dict(n_colors=8, palette=None), "n_colors 16 there, 8 now"),
    ]:
        with pytest.raises(ValueError, match=re.escape(said)) as e:
            pretrain(_cfg(tmp_path, **{**again, **change}))
        assert "cannot resume" in str(e.value) and "ckpt_00000003.pt" in str(e.value)
    other = tmp_path / "other.npy"
    Palette(torch.full((16, 3), 7.0)).save(other)
    with pytest.raises(ValueError, match="is not the run's 16-colour palette"):
        pretrain(_cfg(tmp_path, **{**again, "palette": str(other)}))
    with pytest.raises(ValueError, match=r"at step 3, past steps=2; pass --steps 3"):
        pretrain(_cfg(tmp_path, **{**again, "steps": 2}))


def test_a_finished_run_can_be_extended(tmp_path, palette_file, caplog):
    """--resume --steps 6 on a finished 4-step run: from step 4 on, the LR of a run planned
    for 6 steps with the first run's warm-up (2 steps, not repeated; the default for 6
    steps would be 1), so the cosine ends at 0 on the new last step."""
    kw = dict(palette=palette_file, ckpt_every=2, val_size=4, warmup_steps=2)
    first = _cfg(tmp_path, "ext", steps=4, **kw)
    pretrain(first)
    rows4 = (Path(first.out) / "metrics.jsonl").read_text().splitlines()
    with caplog.at_level(logging.INFO, logger="igpt"):
        summary = pretrain(dataclasses.replace(first, steps=6, warmup_steps=None, resume=True))
    assert summary["step"] == 6 and "changed settings: steps: 4 -> 6" in caplog.text
    rows = [json.loads(x) for x in (Path(first.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (Path(first.out) / "metrics.jsonl").read_text().splitlines()[:4] == rows4
    plan4, plan6 = lr_lambda_factory(4, 2), lr_lambda_factory(6, 2)
    lrs = [r["lr"] for r in rows]  # the LR step s (row s + 1) used
    assert lrs[:4] == [3e-3 * plan4(s) for s in range(4)]
    assert lrs[4:] == [3e-3 * plan6(s) for s in (4, 5)]
    assert lrs[4] == pytest.approx(3e-3 * 0.5) and lrs[3] == 3e-3 * plan4(3)
    # the same numbers as a run planned for 6 steps from the start takes at steps 5 and 6
    planned = _cfg(tmp_path, "planned", steps=6, **kw)
    pretrain(planned)
    assert [r["lr"] for r in map(json.loads, open(Path(planned.out) / "metrics.jsonl"))][4:] == lrs[
        4:
    ]
    ckpt = load_checkpoint(first.out)
    assert ckpt["step"] == 6 and ckpt["warmup"] == 2
    assert json.loads((Path(first.out) / "config.json").read_text())["train"]["steps"] == 6
    # a changed lr applies from the resume step on (the optimizer's saved lr does not win)
    pretrain(dataclasses.replace(first, steps=8, warmup_steps=None, lr=1e-3, resume=True))
    lrs = [json.loads(x)["lr"] for x in (Path(first.out) / "metrics.jsonl").open()]
    assert lrs[6:] == [1e-3 * lr_lambda_factory(8, 2)(s) for s in (6, 7)]


def test_resume_passes_over_a_damaged_checkpoint_and_stale_temp_files(
    tmp_path, palette_file, caplog
):
    kw = dict(palette=palette_file, steps=4, ckpt_every=2, val_size=4)
    full = _cfg(tmp_path, "full", **kw)
    pretrain(full)
    damaged = _cfg(tmp_path, "damaged", **kw)
    pretrain(damaged)
    newest = Path(damaged.out) / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    stale = Path(damaged.out) / ".ckpt_00000004.pt.x1y2z3w4.tmp"
    stale.write_bytes(b"what a kill left")
    with caplog.at_level(logging.WARNING):
        summary = pretrain(damaged, resume=True)
    assert "ckpt_00000004.pt is damaged" in caplog.text
    assert "using " + str(Path(damaged.out) / "ckpt_00000002.pt") in caplog.text
    assert summary["step"] == 4 and _losses(damaged.out) == _losses(full.out)
    a, b = load_checkpoint(full.out)["model"], load_checkpoint(damaged.out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(Path(damaged.out).glob(".*tmp"))


def test_sharded_checkpoints_resume_bit_for_bit_past_a_damaged_one(tmp_path, palette_file, caplog):
    """--checkpoint-format sharded on one process: ckpt_N.dcp directories, a resume from the
    newest intact one that matches the run that was never stopped, bit for bit."""
    kw = dict(palette=palette_file, steps=4, ckpt_every=2, val_size=4)
    full = _cfg(tmp_path, "full", **kw)
    pretrain(full)
    sharded = _cfg(tmp_path, "sharded", checkpoint_format="sharded", **kw)
    pretrain(sharded)
    assert _losses(sharded.out) == _losses(full.out)
    newest = Path(sharded.out) / "ckpt_00000004.dcp"
    assert latest_checkpoint(sharded.out) == newest and not list(Path(sharded.out).glob("*.pt"))
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        summary = pretrain(sharded, resume=True)
    assert "ckpt_00000004.dcp is damaged" in caplog.text and summary["step"] == 4
    assert _losses(sharded.out) == _losses(full.out)
    a, b = load_checkpoint(full.out)["model"], load_checkpoint(sharded.out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --checkpoint takes a sharded directory as it takes a file: its weights, gathered
    start = Trainer(_cfg(tmp_path, "from", init_from=str(newest), **kw))
    start.close()
    got = start.raw_model.state_dict()
    assert start.step == 0 and all(torch.equal(b[k], got[k]) for k in b)


def _killed_at(cfg: TrainConfig, step: int, monkeypatch) -> None:
    """Run ``cfg`` until the process dies at the start of step ``step`` (0-based)."""
    real_step = Trainer.train_step

    def dies(self, s):
        if s == step:
            raise KeyboardInterrupt
        return real_step(self, s)

    monkeypatch.setattr(Trainer, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.undo()


def test_fp16_trains_with_a_gradient_scaler_and_resumes_bit_for_bit(
    tmp_path, monkeypatch, palette_file
):
    """--precision fp16 on the CPU's float16 autocast: it trains, the scaler's scale is
    logged and saved, and a killed run resumes with it bit for bit."""
    kw = dict(palette=palette_file, steps=4, ckpt_every=2, val_size=4)
    cfg = _cfg(tmp_path, "fp16", precision="fp16", **kw)
    summary = pretrain(cfg)
    fp16 = _losses(cfg.out)
    assert all(map(math.isfinite, fp16)) and fp16[-1] < fp16[0] and summary["skipped"] == 0
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in rows]
    assert all(0 < x <= 2.0**16 and math.log2(x).is_integer() for x in scales)
    assert load_checkpoint(cfg.out)["scaler"]["scale"] == scales[-1]

    killed = _cfg(tmp_path, "killed", precision="fp16", **kw)
    _killed_at(killed, 3, monkeypatch)
    pretrain(killed, resume=True)
    assert _losses(killed.out) == fp16
    with pytest.raises(ValueError, match="fp16.*--fsdp"):
        _cfg(tmp_path, precision="fp16", fsdp=True)


def test_fp16_overflow_is_the_scalers_to_skip_not_the_guards(tmp_path, monkeypatch, palette_file):
    """Scaled gradients that overflow: the scaler skips the step and halves its scale; the
    non-finite guard does not count it (ten in a row would stop the run)."""
    cfg = _cfg(tmp_path, palette=palette_file, steps=3, ckpt_every=3, precision="fp16")
    real = Trainer.loss_sum

    def overflowing(self, tokens, mask):
        s = real(self, tokens, mask)
        return s * 1e30 if self.step == 1 else s  # finite loss, infinite scaled gradients

    monkeypatch.setattr(Trainer, "loss_sum", overflowing)
    trainer = Trainer(cfg)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # no overflow of its own
    seen = []
    for step in range(3):
        before = [p.detach().clone() for p in trainer.raw_model.parameters()]
        trainer.step = step
        trainer.train_step(step)
        after = list(trainer.raw_model.parameters())
        moved = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        seen.append((moved, trainer.scaler.get_scale()))
    trainer.close()
    assert seen == [(True, 8.0), (False, 4.0), (True, 4.0)]
    assert trainer.guard.skipped == 0


@pytest.mark.slow  # inductor compiles a forward and a backward: 20-90 s on 2 busy cores
def test_compile_trains_as_eager_does(tmp_path, palette_file):
    """--compile: the first steps' losses are eager's to float tolerance, through inductor."""
    kw = dict(palette=palette_file, steps=3, ckpt_every=3, val_size=4, device="cpu")
    losses = {}
    for compile_ in (False, True):  # the steps alone: validation would compile a second graph
        trainer = Trainer(_cfg(tmp_path, f"compile_{compile_}", compile=compile_, **kw))
        trainer.model.train()
        losses[compile_] = [trainer.train_step(s)["loss"] for s in range(3)]
        trainer.close()
    assert trainer.forward.compiled is not None and trainer.forward.compile_seconds > 0
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, palette_file, caplog):
    """Where compile cannot run (here: its first call fails as without a C++ compiler), a
    warning says so and the run trains eagerly: the losses of a run without --compile."""
    from torch._dynamo.exc import BackendCompilerFailed

    def cannot(module, **kw):
        def call(*a, **k):
            raise BackendCompilerFailed("inductor", RuntimeError("no working C++ compiler"), None)

        return call

    kw = dict(palette=palette_file, steps=2, ckpt_every=2, val_size=4)
    eager = _losses(pretrain(_cfg(tmp_path, "eager", **kw))["out"])
    monkeypatch.setattr(torch, "compile", cannot)
    with caplog.at_level(logging.WARNING):
        out = pretrain(_cfg(tmp_path, "fallback", compile=True, **kw))["out"]
    assert "--compile: torch.compile cannot run here (BackendCompilerFailed" in caplog.text
    assert "training without it" in caplog.text and _losses(out) == eager


def _tensorboard_scalars(run_dir) -> dict:
    """``{tag: [(step, value), ...]}`` read back from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_report_to_tensorboard_logs_the_metrics_rows_and_purges_redone_steps(
    tmp_path, monkeypatch, palette_file
):
    """--report-to tensorboard: every number of every metrics.jsonl row, at its step, read
    back from the event files; a resumed run's redone steps replace the killed run's."""
    pytest.importorskip("tensorboard")
    kw = dict(palette=palette_file, steps=4, ckpt_every=2, val_size=4, report_to="tensorboard")
    cfg = _cfg(tmp_path, **kw)
    _killed_at(cfg, 3, monkeypatch)  # logged step 3, past the checkpoint at 2
    pretrain(cfg, resume=True)
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    scalars = _tensorboard_scalars(cfg.out)
    assert {"loss", "lr", "grad_norm", "val_loss", "tokens_per_s"} <= set(scalars)
    for key in ("loss", "lr", "val_loss"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        np.testing.assert_allclose(scalars[key], want, rtol=1e-6)  # float32 events
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]  # step 3 once: the redone one


def test_report_to_wandb_without_wandb_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where it is not installed
    with pytest.raises(ImportError, match=r'pip install "igpt\[wandb\]"'):
        Trainer(_cfg(tmp_path, report_to="wandb"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="report_to must be one of"):
        _cfg(tmp_path, report_to="mlflow")


def test_crash_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, palette_file):
    cfg = _cfg(tmp_path, palette=palette_file, steps=4, ckpt_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4) dies half-written
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in Path(cfg.out).glob("*.pt")) == ["ckpt_00000002.pt"]
    assert not list(Path(cfg.out).glob(".*tmp"))
    summary = pretrain(cfg, resume=True)
    assert summary["step"] == 4


def test_non_finite_steps_are_skipped_and_reported(tmp_path, monkeypatch, palette_file, caplog):
    cfg = _cfg(tmp_path, palette=palette_file, steps=4, ckpt_every=4)
    real = Trainer.loss_sum
    seen = {}

    def spiky(self, tokens, mask):
        s = real(self, tokens, mask)
        if self.step == 2:
            seen["before"] = [p.detach().clone() for p in self.raw_model.parameters()]
            return s * float("nan")
        return s

    real_step = Trainer.train_step

    def check_step(self, step):
        out = real_step(self, step)
        if step == 2:
            after = list(self.raw_model.parameters())
            assert all(torch.equal(a, b) for a, b in zip(seen["before"], after, strict=True))
        return out

    monkeypatch.setattr(Trainer, "loss_sum", spiky)
    monkeypatch.setattr(Trainer, "train_step", check_step)
    summary = pretrain(cfg)
    assert summary["skipped"] == 1 and "non-finite" in caplog.text
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1]
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["val_loss"])


def test_batches_are_a_function_of_the_step(tmp_path, palette_file):
    t = Trainer(_cfg(tmp_path, palette=palette_file, batch_size=500))
    train_idx = t.batches.train_idx
    n = len(train_idx)
    seen = np.concatenate([t.batches.indices(s) for s in range(3)])  # 1500 > one epoch
    assert sorted(seen[:n]) == sorted(train_idx)  # an epoch visits every image once
    assert np.array_equal(t.batches.indices(2), t.batches.indices(2))
    assert not set(seen) & set(t.val_idx)
    t.close()


def test_run_dir_bookkeeping(tmp_path):
    """What pre-training and fine-tuning share: the fresh-or-resume check, metrics that a
    killed run left half-written, pruning, atomic JSON."""
    from igpt.rundir import RunDir

    run = RunDir(tmp_path / "r")
    assert run.check_fresh(resume=False) is None and run.check_fresh(resume=True) is None
    run.append_metrics([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "lo')  # the process died mid-row
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.truncate_metrics(2)
    assert run.read_metrics() == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    for step in (1, 2, 3):
        run.save_checkpoint({"step": step}, step, keep=2)
    assert sorted(p.name for p in run.path.glob("*.pt")) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    with pytest.raises(FileExistsError, match=r"latest ckpt_00000003.pt.*--resume"):
        run.check_fresh(resume=False)
    assert run.check_fresh(resume=True).name == "ckpt_00000003.pt"
    assert json.loads(run.write_json("s.json", {"a": [1]}).read_text()) == {"a": [1]}
    assert not list(run.path.glob(".*tmp"))
    other = RunDir(tmp_path / "r", is_main=False)  # another rank: reads, never writes
    other.append_metrics([{"step": 9}])
    other.truncate_metrics(0)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_image_batches_augment_per_row_or_per_batch():
    from igpt.batches import GlobalBatches, ImageSource
    from igpt.data import pad_crop_flip

    images = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    palette = Palette(torch.rand(8, 3, generator=torch.Generator().manual_seed(0)) * 255)
    calls = []

    def augment(x, *, rng):
        calls.append(len(x))
        return pad_crop_flip(x, pad=2, rng=rng)

    per_row = GlobalBatches(ImageSource(images, palette, 6, augment), np.arange(20), 8, seed=1)
    whole = per_row.tokens(3)
    assert calls == [1] * 8 and torch.equal(per_row.tokens(3, slice(2, 5)), whole[2:5])
    calls.clear()
    source = ImageSource(images, palette, 6, augment, per_row=False)
    per_batch = GlobalBatches(source, np.arange(20), 8, seed=1)
    assert torch.equal(per_batch.tokens(3), per_batch.tokens(3)) and calls == [8, 8]
    assert not torch.equal(per_batch.tokens(3), per_batch.tokens(4))
    with pytest.raises(ValueError, match="train_idx is empty"):
        GlobalBatches(source, np.arange(0), 8, seed=1)


def test_palette_is_fitted_afresh_and_without_the_holdout(tmp_path, monkeypatch):
    from igpt import palette as palette_module
    from igpt.data import load_images, resize

    seen = []
    real_fit = palette_module.fit_palette_on  # a lazy read of the sampled images only

    def recording_fit(image_set, k, *, rows, **kw):
        seen.append(rows)
        return real_fit(image_set, k, rows=rows, **kw)

    monkeypatch.setattr(palette_module, "fit_palette_on", recording_fit)
    t = Trainer(_cfg(tmp_path))
    t.close()
    images = resize(load_images("digits").images, 8)
    assert sorted(seen[0]) == sorted(t.batches.train_idx)  # < 4096 images: all of them
    whole = palette_module.fit_palette(images[seen[0]], k=len(t.palette), seed=0)
    assert torch.equal(t.palette.centroids, whole.centroids)  # as if read into memory
    # a run that died before its first checkpoint left palette.npy; the next run in that
    # directory asks for another palette size and must get it, not the stale file
    t = Trainer(_cfg(tmp_path, n_colors=8))
    t.close()
    assert len(t.palette) == 8 and len(seen) == 2


def test_augmented_training_and_checkpointing_policy(tmp_path, palette_file, monkeypatch):
    import igpt.memplan
    from igpt.data import tokenize

    t = Trainer(_cfg(tmp_path, "aug", palette=palette_file, augment="cifar"))
    rows = slice(0, 8)
    batch = t.batches.tokens(0, rows)
    assert torch.equal(batch, t.batches.tokens(0, rows))  # a function of the step
    plain = tokenize(t.batches.source.images[t.batches.indices(0)[rows]], t.palette, 8)
    assert not torch.equal(batch, plain)  # the images were augmented
    # rows 4..7 alone (another process's share) are augmented as within the whole batch
    assert torch.equal(t.batches.tokens(0, slice(4, 8)), batch[4:])
    t.close()

    calls = []
    real = igpt.memplan.checkpoint
    monkeypatch.setattr(
        igpt.memplan, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    kw = dict(palette=palette_file, augment="cifar", steps=2)
    recomputed = pretrain(_cfg(tmp_path, "ckpt", checkpointing=1, **kw))
    assert len(calls) == 2 * TINY["n_layer"]  # every block of both training forwards
    stored = pretrain(_cfg(tmp_path, "plain", **kw))
    assert len(calls) == 2 * TINY["n_layer"]
    # recomputation changes memory, never the numbers
    np.testing.assert_allclose(_losses(recomputed["out"]), _losses(stored["out"]), rtol=1e-6)


def test_dataloader_workers_give_the_inline_batches_bit_for_bit(tmp_path, palette_file):
    """--dataloader-num-workers 2: the batches made ahead in worker processes are the ones
    made inline (augmented images here), so the run is the same bit for bit; a step asked
    for out of order (a step redone) is made inline."""
    kw = dict(palette=palette_file, augment="crop", steps=3, ckpt_every=3, val_size=4)
    inline = pretrain(_cfg(tmp_path, "inline", **kw))
    trainer = Trainer(_cfg(tmp_path, "workers", dataloader_num_workers=2, **kw))
    try:
        assert trainer.loader._it is not None
        summary = trainer.fit()
        assert trainer.loader.next == 3
        assert torch.equal(trainer.loader.get(1), trainer.batches.tokens(1, slice(0, 8)))
    finally:
        trainer.close()
    assert _losses(summary["out"]) == _losses(inline["out"])
    a, b = load_checkpoint(inline["out"])["model"], load_checkpoint(summary["out"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="dataloader_num_workers must be an int >= 0"):
        _cfg(tmp_path, dataloader_num_workers=-1)


def test_augmentation_reads_images_lazily_a_batch_at_a_time(tmp_path, palette_file, monkeypatch):
    """--augment: the split is opened lazily and read a batch's rows at a time (and the
    capped hold-out once), never whole."""
    import igpt.data
    from igpt.imagesets import ImageSet

    opened, reads = [], []
    real_load, real_take = igpt.data.load_images, ImageSet.take

    def load_images(spec, *a, **k):
        opened.append(k.get("lazy"))
        return real_load(spec, *a, **k)

    def take(self, idx):
        reads.append(len(np.unique(idx)))
        return real_take(self, idx)

    monkeypatch.setattr(igpt.data, "load_images", load_images)
    monkeypatch.setattr(ImageSet, "take", take)
    kw = dict(palette=palette_file, augment="crop", steps=3, ckpt_every=3, val_size=16)
    pretrain(_cfg(tmp_path, **kw))
    assert opened == [True]
    assert sorted(reads) == [8, 8, 8, 16]  # three batches of 8, the hold-out; of 1797 images


def test_figures_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    """The PNGs igpt draws (loss curves, the probe's depth figure, the palette preview) are
    Figure objects of their own: a notebook's backend is not switched, no figure is left
    open in pyplot."""
    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np, torch
from pathlib import Path
from igpt.palette import Palette, save_preview
from igpt.reporting import plot_accuracy_vs_depth
from igpt.rundir import RunDir
out = Path({str(tmp_path)!r})
run = RunDir(out / "run")
run.append_metrics([{{"step": 1, "loss": 2.0}}, {{"step": 2, "loss": 1.5, "val_loss": 1.7}}])
assert run.plot("curve.png", [("loss", [("loss", "train"), ("val_loss", "val")])]).is_file()
rows = [{{"layer": i, "test_acc": 0.1 * i}} for i in range(3)]
plot_accuracy_vs_depth({{"probe": rows}}, out / "depth.png")
images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
save_preview(Palette(torch.rand(4, 3) * 255), images, out / "palette.png")
print(matplotlib.get_backend(), plt.get_fignums())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["svg", "[]"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("depth.png", "palette.png"))


def test_lr_search_stops_when_validation_rises(tmp_path, monkeypatch):
    vals = {0.01: 3.0, 0.003: 2.0, 0.001: 2.5, 0.0003: 1.0}
    tried = []

    def fake_pretrain(config, *, palette=None, data=None, lr, out):
        tried.append(lr)
        return {"val_loss": vals[lr]}

    monkeypatch.setattr("igpt.train.pretrain", fake_pretrain)
    result = lr_search(_cfg(tmp_path), lrs=tuple(vals))
    assert tried == [0.01, 0.003, 0.001] and result["best_lr"] == 0.003
    assert json.loads((tmp_path / "run" / "lr_search.json").read_text())["best_lr"] == 0.003


# ----------------------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    pretrain(TrainConfig.from_dict(cfg_dict))  # destroys its process group when done
    # Leave without the interpreter's teardown: in about one full-suite run in five, a gloo
    # (FSDP2) worker aborted there ("terminate called without an active exception") after
    # its work and files were complete. A failure during the run still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn_two(cfg: TrainConfig) -> None:
    """Run ``cfg`` on 2 gloo processes. The free port is found before the processes bind it,
    so another program can take it in between: only then is it tried again, on a new port
    (nothing is written before the process group exists)."""
    import torch.multiprocessing as mp

    for attempt in range(3):
        try:
            mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, join=True)
            return
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise


@pytest.mark.slow  # two processes: 10-60 s on 2 cores
def test_two_gloo_processes_match_one(tmp_path, palette_file):
    """BERT, the harder case: the loss is normalised by the masked count of the *global*
    batch, which neither process sees alone. Each DDP process's rows come from a DataLoader
    worker, and its checkpoint is written sharded (DCP dedups the replicated tensors)."""

    kw = dict(objective="bert", palette=palette_file, steps=3, ckpt_every=3, device="cpu")
    one = _cfg(tmp_path, "one", grad_accum=2, **kw)  # same global batch, 2 micro-steps
    pretrain(one)
    ddp = dict(checkpointing=1, dataloader_num_workers=1, checkpoint_format="sharded")
    two = _cfg(tmp_path, "two", **ddp, **kw)  # and recomputation under DDP
    _spawn_two(two)
    assert latest_checkpoint(two.out).name == "ckpt_00000003.dcp"
    a, b = _losses(one.out), _losses(two.out)
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-5)
    ma, mb = load_checkpoint(one.out)["model"], load_checkpoint(two.out)["model"]
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two processes: 10-60 s on 2 cores
@pytest.mark.parametrize("checkpoint_format", ["auto", "full"])
def test_fsdp2_two_processes_match_one_and_resume(tmp_path, palette_file, checkpoint_format):
    """fully_shard over gloo, with activation checkpointing: same losses as one process; its
    checkpoints (auto: sharded, each rank its own shard file; full: gathered on rank 0) load
    as plain models and resume under FSDP bit-for-bit; a sharded one also on one process."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")

    kw = dict(palette=palette_file, steps=4, ckpt_every=2, device="cpu", keep_checkpoints=0)
    one = _cfg(tmp_path, "one", **kw)
    pretrain(one)
    kw.update(checkpoint_format=checkpoint_format)
    two = _cfg(tmp_path, "two", fsdp=True, checkpointing=1, **kw)
    _spawn_two(two)
    full = _losses(two.out)
    np.testing.assert_allclose(_losses(one.out), full, rtol=1e-5)
    model, _, _ = load_model(two.out)  # evaluation loads either as a plain model
    assert model.config.n_layer == TINY["n_layer"]
    newest = latest_checkpoint(two.out)
    if checkpoint_format == "auto":
        assert newest.name == "ckpt_00000004.dcp"
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in newest.iterdir()}
        shutil.copytree(two.out, tmp_path / "alone")
        shutil.rmtree(newest)
    else:
        assert newest.name == "ckpt_00000004.pt"
        newest.unlink()
    resumed = dataclasses.replace(two, resume=True)
    _spawn_two(resumed)
    assert _losses(two.out) == full
    if checkpoint_format == "auto":  # DCP reshards: the two ranks' step 4 on one process
        alone = dataclasses.replace(two, out=str(tmp_path / "alone"), fsdp=False, steps=6)
        pretrain(alone, resume=True)
        pretrain(dataclasses.replace(one, steps=6, resume=True))
        assert _losses(alone.out)[:4] == full
        np.testing.assert_allclose(_losses(alone.out), _losses(one.out), rtol=1e-5)


@pytest.mark.slow  # three interpreters started twice: 20-60 s on 2 cores
def test_torchrun_fsdp_writes_sharded_checkpoints_and_resumes_bit_for_bit(tmp_path, palette_file):
    """The command a user types: ``torchrun --nproc-per-node 2 -m igpt pretrain --fsdp`` on
    the CPU writes DCP directories (a shard file per rank) and resumes from one exactly."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += ["--nproc-per-node", "2", "-m", "igpt", "pretrain", "--fsdp", "--device", "cpu"]
    args = ["--n-px", "8", "--steps", "4", "--ckpt-every", "2", "--batch-size", "8"]
    args += ["--palette", palette_file, "--val-size", "4", "--log-every", "1", "--no-progress"]
    args += ["--keep-checkpoints", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(launch + args, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    full = _losses(out)
    newest = out / "ckpt_00000004.dcp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.pt"} <= {
        p.name for p in newest.iterdir()
    }
    shutil.rmtree(newest)
    res = subprocess.run(launch + args + ["--resume"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _losses(out) == full and len(full) == 4 and newest.is_dir()


def test_grad_accumulation_matches_one_big_batch(tmp_path, palette_file):
    kw = dict(palette=palette_file, steps=2, ckpt_every=2, val_size=4)
    a = _losses(pretrain(_cfg(tmp_path, "a", **kw))["out"])
    b = _losses(pretrain(_cfg(tmp_path, "b", grad_accum=4, **kw))["out"])
    np.testing.assert_allclose(a, b, rtol=1e-5)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_smoke(tmp_path, capsys):
    from igpt.cli import build_parser, main

    help_ = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    for flag in ("--objective", "--resume", "--fsdp", "--grad-accum", "--lr-search"):
        assert flag in help_
    out = tmp_path / "cli"
    args = ["pretrain", "--n-px", "8", "--steps", "2", "--batch-size", "4", "--out", str(out)]
    args += ["--no-progress", "--device", "cpu", "--objective", "bert", "--n-colors", "8"]
    args += ["--log-every", "1"]
    # `python -m igpt` is the command torchrun runs
    res = subprocess.run(
        [sys.executable, "-m", "igpt", *args], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)
    assert first["step"] == 2 and math.isfinite(first["val_loss"])
    assert len(_losses(out)) == 2 and (out / "ckpt_00000002.pt").is_file()
    assert json.loads((out / "config.json").read_text())["model"]["n_colors"] == 8
    main(args + ["--resume"])  # already finished: resumes at the end and trains nothing
    again = json.loads(capsys.readouterr().out)
    assert again["step"] == 2 and len(_losses(out)) == 2
    # and still reports the run's final numbers (summary.json is not emptied either)
    assert again["loss"] == first["loss"] and again["val_loss"] == first["val_loss"]
    assert json.loads((out / "summary.json").read_text())["val_loss"] == first["val_loss"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_bf16_training_with_checkpointing(tmp_path, palette_file):
    """bf16 autocast over fp32 master weights, fused Adam, the GPU kernels, recomputation."""
    cfg = _cfg(
        tmp_path,
        palette=palette_file,
        device="cuda",
        steps=20,
        batch_size=16,
        lr=1e-2,
        checkpointing=1,
        ckpt_every=10,
        keep_checkpoints=0,
    )
    summary = pretrain(cfg)
    losses = _losses(cfg.out)
    assert all(math.isfinite(x) for x in losses) and summary["skipped"] == 0
    assert np.mean(losses[-5:]) < losses[0] - 0.3
    ckpt = load_checkpoint(cfg.out)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    (Path(cfg.out) / "ckpt_00000020.pt").unlink()
    pretrain(cfg, resume=True)
    torch.testing.assert_close(_losses(cfg.out), losses, rtol=1e-3, atol=1e-3)


def test_init_from_starts_at_the_checkpoints_weights_and_palette(tmp_path, palette_file):
    first = _cfg(tmp_path, "first", palette=palette_file, steps=2, ckpt_every=2)
    pretrain(first)
    trained, trained_palette, _ = load_model(first.out)
    # another model name and no n_px: the architecture and image size come with the weights
    second = _cfg(
        tmp_path, "second", model="igpt-s", n_px=None, steps=1, lr=1e-12, init_from=first.out
    )
    assert second.n_px is None  # a config reads no file: the trainer resolves n_px
    trainer = Trainer(second)
    try:
        assert trainer.cfg.n_px == trained.config.n_px
        assert trainer.raw_model.config == trained.config
        assert torch.equal(trainer.palette.centroids, trained_palette.centroids)
        for a, b in zip(
            trainer.raw_model.state_dict().values(), trained.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b)
        assert trainer.step == 0  # weights only: the optimizer and schedule start afresh
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="init_from .* n_px=8"):
        Trainer(_cfg(tmp_path, "third", n_px=16, init_from=first.out))


# ----------------------------------------------------------------------------- kill -9

# The child trains and SIGKILLs itself at a chosen moment: no `finally`, no `except`, no
# flush runs, as when the machine or the OOM killer stops a run.
_KILLED_CHILD = """
import json, os, signal, sys
import torch
from igpt.train import TrainConfig, Trainer, pretrain

cfg, moment, at = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
if moment == "step":  # in the middle of the training step `at`
    real_step = Trainer.train_step
    def train_step(self, step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, step)
    Trainer.train_step = train_step
else:  # part-way through writing the checkpoint of step `at`
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == at and "optimizer" in obj:
            f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
pretrain(cfg)
"""


_KILL_RUN = dict(steps=6, ckpt_every=2, val_size=4, keep_checkpoints=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, palette_file):
    """The run the killed ones must reproduce (trained once for the module)."""
    cfg = _cfg(tmp_path_factory.mktemp("kill"), "full", palette=palette_file, **_KILL_RUN)
    pretrain(cfg)
    return Path(cfg.out)


@pytest.mark.parametrize(
    "moment, at, truncate",
    [
        ("step", 3, False),  # during training, past the checkpoint of step 2
        ("save", 4, False),  # during the checkpoint write of step 4
        ("step", 5, True),  # during training, and the latest checkpoint (4) then truncated
    ],
)
@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical_and_leaves_no_temp_files(
    tmp_path, palette_file, uninterrupted, moment, at, truncate
):
    killed = _cfg(tmp_path, "killed", palette=palette_file, **_KILL_RUN)
    res = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, json.dumps(killed.to_dict()), moment, str(at)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -9, res.stderr
    run = Path(killed.out)
    latest = latest_checkpoint(run)
    assert latest.name == ("ckpt_00000004.pt" if truncate else "ckpt_00000002.pt")
    if moment == "save":
        assert len(list(run.glob(".ckpt_00000004.pt.*.tmp"))) == 1  # what the kill left
    if truncate:
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    summary = pretrain(killed, resume=True)
    assert summary["step"] == 6 and _losses(run) == _losses(uninterrupted)
    a, b = load_checkpoint(uninterrupted), load_checkpoint(run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert sorted(p.name for p in run.glob("*.pt")) == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert (
        summary["val_loss"] == json.loads((uninterrupted / "summary.json").read_text())["val_loss"]
    )


def test_old_metrics_files_are_read_under_the_new_names(tmp_path):
    from igpt.rundir import RunDir

    run = RunDir(tmp_path / "old")
    run.metrics_path.write_text('{"step": 2, "loss": 1.0, "val_loss": 0.6931, "val_bpd": 1.5}\n')
    (row,) = run.read_metrics()
    assert "val_bpd" not in row and row["val_bits_per_token"] == 1.5
    assert row["val_bits_per_dim"] == 0.5 and row["val_loss"] == 0.6931


def test_one_device_resolver_and_one_precision_policy_for_both_trainers():
    from igpt.training import resolve_device, uses_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_device("cpu") == cpu and resolve_device("cpu", local_rank=3) == cpu
    assert resolve_device(None) == (cuda if torch.cuda.is_available() else cpu)
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("tpu")
    assert [uses_bf16(p, cpu) for p in ("auto", "bf16", "fp32")] == [False, True, False]
    assert [uses_bf16(p, cuda) for p in ("auto", "bf16", "fp32")] == [True, True, False]
    with pytest.raises(ValueError, match="precision"):
        uses_bf16("fp8", cpu)


def test_tracker_scalars_key_probe_rows_by_layer():
    from igpt.trackers import scalars

    row = {"step": 5, "layer": 2, "probe": "linear", "probe_acc": 0.5, "val_loss": 1.25}
    assert scalars(row) == {"probe_acc/layer_2": 0.5, "val_loss": 1.25}
    plain = {"step": 5, "loss": 2.0, "lr": 1e-3, "skipped": True, "nan": float("nan")}
    assert scalars(plain) == {"loss": 2.0, "lr": 1e-3}


# ---------------------------------------------------------------- issue 32 (tests branch): begin
# the non-finite guard's rule itself, without a run around it


def test_the_guard_skips_a_non_finite_gradient_norm_with_a_finite_loss(caplog):
    from igpt.training import NonFiniteGuard

    guard = NonFiniteGuard()
    assert guard.check(0, 2.5, 1.0, 1e-3) and guard.skipped == 0
    for bad in (math.inf, -math.inf, math.nan):
        assert not guard.check(1, 2.5, bad, 1e-3)  # finite loss, broken gradient
        assert not guard.check(1, bad, 1.0, 1e-3)  # broken loss, finite gradient norm
    assert guard.skipped == guard.in_a_row == 6
    assert "step skipped (6 so far)" in caplog.text
    assert NonFiniteGuard(4).skipped == 4  # a resumed run keeps counting


def test_the_guard_gives_up_after_limit_in_a_row_and_a_finite_step_resets_the_run():
    from igpt.training import NonFiniteGuard

    guard = NonFiniteGuard(limit=3)
    for _ in range(5):  # 2 bad, 1 good, again and again: never 3 in a row
        assert not guard.check(0, math.nan, 1.0, 0.1)
        assert not guard.check(1, 1.0, math.inf, 0.1)
        assert guard.in_a_row == 2
        assert guard.check(2, 1.0, 1.0, 0.1) and guard.in_a_row == 0
    assert guard.skipped == 10
    guard.check(3, math.nan, 1.0, 0.1)
    guard.check(4, math.nan, 1.0, 0.1)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(up to step 5\).*now 0.1"):
        guard.check(5, math.nan, 1.0, 0.1)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_a_trainer_skips_a_step_whose_loss_is_finite_but_gradient_norm_is_not(
    tmp_path, palette_file, monkeypatch
):
    t = Trainer(_cfg(tmp_path, palette=palette_file))
    before = [p.detach().clone() for p in t.raw_model.parameters()]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(math.inf))
    stats = t.train_step(0)
    assert math.isfinite(stats["loss"]) and stats["skipped_step"] and t.guard.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, t.raw_model.parameters(), strict=True))
    t.close()


def test_the_guard_starts_from_a_resumed_count_with_no_run_in_a_row():
    from igpt.training import NONFINITE_LIMIT, NonFiniteGuard

    guard = NonFiniteGuard(7)
    assert (guard.skipped, guard.in_a_row, guard.limit) == (7, 0, NONFINITE_LIMIT)
    for step in range(NONFINITE_LIMIT - 1):
        assert not guard.check(step, math.nan, 1.0, 0.1)
    with pytest.raises(FloatingPointError, match=f"{NONFINITE_LIMIT} steps in a row"):
        guard.check(99, math.nan, 1.0, 0.1)
    assert guard.skipped == 7 + NONFINITE_LIMIT


def test_resolve_device_picks_the_rank_gpu_only_when_none_is_named(monkeypatch):
    from igpt.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = torch.device
    assert resolve_device(None) == cuda("cuda") and resolve_device("cuda") == cuda("cuda")
    assert resolve_device(None, local_rank=1) == cuda("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == cuda("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == cuda("cuda", 0)  # named: kept
    assert resolve_device("cuda:1") == cuda("cuda", 1)
    assert resolve_device("cpu", local_rank=1) == cuda("cpu")
    with pytest.raises(ValueError, match=r"'cuda:2' but only 2 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    for bad in ("meta", "gpu", 3.5):
        with pytest.raises(ValueError, match="not a device name"):
            resolve_device(bad)


def test_autocast_is_bf16_on_the_device_and_off_when_not_enabled():
    from igpt.training import autocast

    on = autocast(torch.device("cpu"), True)
    assert on.device == "cpu" and on.fast_dtype == torch.bfloat16 and on._enabled
    assert not autocast(torch.device("cpu"), False)._enabled
    with autocast(torch.device("cpu"), True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with warnings.catch_warnings():  # without a GPU, torch warns and disables it
        warnings.simplefilter("ignore")
        assert autocast(torch.device("cuda"), True).fast_dtype == torch.bfloat16  # not fp16


def test_refuse_resume_names_each_setting_or_the_step_past_the_end():
    from igpt.training import refuse_resume

    refuse_resume("runs/a", "runs/a/ckpt_00000004.pt", [], 4, 4)  # step == steps: resumable
    refuse_resume("runs/a", "runs/a/ckpt_00000004.pt", [], 3, 4)
    with pytest.raises(ValueError) as e:
        refuse_resume("runs/a", "runs/a/ckpt_00000004.pt", ["lr 0.1 there, 0.2 now", "x"], 4, 9)
    msg = str(e.value)
    assert msg.startswith("cannot resume runs/a from ckpt_00000004.pt: it was trained with")
    assert "(lr 0.1 there, 0.2 now; x)" in msg
    with pytest.raises(ValueError, match=r"ckpt_00000005.pt is at step 5, past steps=4; "):
        refuse_resume("runs/a", "runs/a/ckpt_00000005.pt", [], 5, 4)


def test_open_resume_checks_what_it_found_and_nothing_else():
    from igpt.training import open_resume

    class Run:
        def __init__(self, found):
            self.found, self.asked = found, []

        def resume_checkpoint(self, resume):
            self.asked.append(resume)
            return self.found

    checked = []
    assert open_resume(Run(None), True, lambda *a: checked.append(a)) is None and not checked
    run = Run(("ckpt.pt", {"step": 3}))
    assert open_resume(run, False, lambda *a: checked.append(a)) == ("ckpt.pt", {"step": 3})
    assert checked == [("ckpt.pt", {"step": 3})] and run.asked == [False]


def test_restore_optimizer_settings_puts_back_this_runs_rates_betas_and_decay():
    from igpt.training import restore_optimizer_settings

    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=9.0, betas=(0.1, 0.2))
    restore_optimizer_settings(opt, lr=[0.5, 2.0], betas=[0.8, 0.9], weight_decay=0.3, factor=0.1)
    for g, peak in zip(opt.param_groups, (0.5, 2.0), strict=True):
        assert g["initial_lr"] == peak and g["lr"] == pytest.approx(peak * 0.1)
        assert g["betas"] == (0.8, 0.9) and g["weight_decay"] == 0.3
    restore_optimizer_settings(opt, lr=0.25, betas=(0.7, 0.6), weight_decay=0.0)
    assert [(g["lr"], g["initial_lr"]) for g in opt.param_groups] == [(0.25, 0.25)] * 2
    with pytest.raises(ValueError, match="lr has 3 rates for 2 parameter groups"):
        restore_optimizer_settings(opt, lr=(1.0, 2.0, 3.0), betas=(0.9, 0.9), weight_decay=0.0)


# ---------------------------------------------------------------- issue 32 (tests branch): end
