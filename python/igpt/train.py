"""Pre-training (paper sec. 2.1, 3.1-3.4, appendix A): the trainer and the LR search.

    from igpt.train import TrainConfig, pretrain
    summary = pretrain(TrainConfig(model="igpt-tiny", n_px=16, data="digits", steps=500,
                                   out="runs/digits"))

Adam(0.9, 0.95), no weight decay, linear warm-up then cosine decay to 0, bf16 autocast on
the GPU over fp32 master weights (or fp16 with a gradient scaler: ``precision="fp16"``),
gradient accumulation, activation checkpointing (every k-th block, ``apply_checkpointing``),
a guard that skips non-finite steps (the loss spikes of appendix A), validation loss in nats
per token, bits per token and bits per dimension (per sub-pixel, the literature's bits/dim)
on a 10% hold-out, the learning-rate search of sec. 3.4, and torchrun (DDP, or FSDP2
``fully_shard``).

Resume and extension: ``resume=True`` continues the run in ``out`` from its newest checkpoint
that reads back (a damaged newer one is passed over with a warning). The settings that
define what is trained on what (``RESUME_FIXED``: the model, the data and its split, the
objective, the global batch, the seed, the palette) must match the checkpoint's run; the
others may change. ``steps`` may be raised (or lowered, not below the checkpoint's step) to
extend a run, finished or not: from the resume step on, the learning rate follows the
schedule a run started with the new ``steps`` would have had, with the run's original
warm-up (never repeated), so the cosine now ends at 0 on the new last step; a finished
2000-step run extended to 4000 steps goes on at half the peak rate and decays to 0 at 4000.
A changed ``lr``, ``betas`` or ``weight_decay`` takes effect from the resume step on.

The pieces live beside it: the config in ``igpt.trainconfig``, the set-up steps in
``igpt.pretrain_setup``, the policies shared with fine-tuning (device, mixed precision, the
non-finite guard, the resume verdict) in ``igpt.training``, the memory plan and activation
checkpointing in ``igpt.memplan``, the objectives and their masks in ``igpt.objectives``, the batch
of every step in ``igpt.batches``, the process group in ``igpt.distributed``, the run's
files in ``igpt.rundir``. The batch of step s and its mask are a pure function of (seed, s)
over the global batch, so a resumed run reproduces the uninterrupted one bit for bit and K
processes see the batch one process would (each takes its own rows of it).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from igpt._rng import rng_state, set_rng_state
from igpt.checkpoint import checkpoint_state
from igpt.distributed import Distributed, dist_env, init_distributed
from igpt.memory import activation_offload, format_size
from igpt.memplan import TrainMemory, apply_checkpointing
from igpt.objectives import MaskRows, ar_loss, bert_loss, bert_mask, generative_loss
from igpt.pretrain_setup import (
    apply_resumed_settings,
    check_resumable,
    init_checkpoint,
    init_config,
    lr_lambda_factory,
    micro_batch,
    run_config,
    run_data,
    run_loader,
    run_model,
    run_optimizer,
    run_palette,
)
from igpt.rundir import RunDir
from igpt.train_probe import TrainingProbe
from igpt.trainconfig import RESUME_FIXED, TrainConfig, progress_enabled, setting
from igpt.training import (
    Compiled,
    NonFiniteGuard,
    guarded_step,
    mixed_precision,
    open_resume,
    resolve_device,
    uses_bf16,
)

__all__ = [
    "Trainer",
    "pretrain",
    "lr_search",
    "LR_GRID",
    # re-exported: their home is igpt.trainconfig / igpt.pretrain_setup / igpt.memplan /
    # igpt.objectives / igpt._rng / igpt.distributed
    "TrainConfig",
    "RESUME_FIXED",
    "setting",
    "progress_enabled",
    "lr_lambda_factory",
    "apply_checkpointing",
    "ar_loss",
    "bert_loss",
    "bert_mask",
    "rng_state",
    "set_rng_state",
    "init_distributed",
]

log = logging.getLogger(__name__)

# sec. 3.4: "we sequentially try the learning rates 0.01, 0.003, 0.001, 0.0003, ..."
LR_GRID = (0.01, 0.003, 0.001, 0.0003, 0.0001, 3e-5, 1e-5)
# Sub-pixels per pixel. A token is one pixel's palette colour; the literature's bits/dim
# counts each of a pixel's 3 sub-pixels as a dimension, so bits/dim = bits per token / 3
# (of a palette's code, so not comparable with bits/dim of models of raw 8-bit sub-pixels).
CHANNELS = 3
VAL_LINE = "step %d: val loss %.4f nats, %.4f bits per token (%.4f bits/dim)"


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """One pre-training run. ``Trainer(cfg).fit()`` trains and returns a summary dict.

    Args:
        config: the run's TrainConfig.
        palette: an ``igpt.palette.Palette`` to use instead of ``config.palette`` / a fit.
        data: an ``igpt.data.ImageData`` to train on instead of reading ``config.data``
            (its images are not cached on disk).
    """

    def __init__(self, config: TrainConfig, *, palette=None, data=None):
        init_cfg = init_config(config.init_from) if config.init_from is not None else None
        if config.n_px is None:  # the image size comes with the weights
            config = dataclasses.replace(config, n_px=init_cfg.n_px)
        self.cfg = cfg = config
        self.dist = d = Distributed(cfg.device, fsdp=cfg.fsdp)
        micro_batch(cfg, d.world)  # refused before any file is written
        self.device = resolve_device(cfg.device, local_rank=d.local_rank if d.world > 1 else None)
        self.amp = uses_bf16(cfg.precision, self.device)
        self.autocast, self.scaler = mixed_precision(cfg.precision, self.device)  # fp16: scaler
        self.run = RunDir(cfg.out, is_main=d.is_main, report_to=cfg.report_to)
        d.barrier()
        found = open_resume(self.run, cfg.resume, functools.partial(check_resumable, cfg))
        resume_from, ckpt = found if found is not None else (None, None)
        init = init_checkpoint(cfg, palette) if ckpt is None and init_cfg is not None else None
        self.palette = run_palette(cfg, self.run, d, palette, ckpt or init, data)
        self.batches, self.val_idx, self.val_tokens = run_data(cfg, d, self.palette, data)
        self.raw_model = run_model(cfg, len(self.palette), init_cfg, init, self.device, found)
        # --max-memory's plan (or the settings given): applied here, before the model is wrapped
        self.memory = TrainMemory(
            cfg, self.raw_model.config, dist=d, device=self.device, amp=self.amp, run=self.run
        )
        self.apply_memory(self.memory.settings)
        self.model = d.wrap(self.raw_model, self.device, bf16=self.amp)
        self.forward = Compiled(self.model, cfg.compile)  # self.model itself without --compile
        self.probe = TrainingProbe(
            cfg, n_layer=self.raw_model.config.n_layer, palette=self.palette, dist=d
        )
        n_train = len(self.batches.train_idx)  # the warm-up's epoch
        self.optimizer, self.scheduler, self.warmup = run_optimizer(
            cfg, self.model, self.device, ckpt, n_train
        )
        self.step, self.guard = 0, NonFiniteGuard()
        if ckpt is not None:
            self._restore(ckpt)
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.run.truncate_metrics(self.step)
        self._write_config()
        self.loader = run_loader(cfg, d, self.batches, self.step, self.device)

    def apply_memory(self, settings: dict) -> None:
        """Run with ``settings`` (``TrainMemory.settings``: grad_accum, checkpointing,
        offload_activations, fsdp) from now on: ``cfg`` records them, the micro-batch
        follows, the model recomputes the blocks they say."""
        cfg = dataclasses.replace(
            self.cfg,
            **{k: settings[k] for k in ("grad_accum", "checkpointing", "offload_activations")},
        )
        if settings["fsdp"]:
            self.dist.sharded = True  # a plan shards only under torchrun (gpus = world > 1)
        self.cfg, self.micro = cfg, micro_batch(cfg, self.dist.world)
        apply_checkpointing(self.raw_model, cfg.checkpointing)

    # -- training -------------------------------------------------------------------------

    def loss_sum(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch (mask None: AR, else BERT)."""
        with self.autocast, activation_offload(self.cfg.offload_activations):
            logits = self.forward(tokens, bert_mask=mask)
            return generative_loss(logits, tokens, mask, reduction="sum")

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of ``step``. Returns its statistics."""
        cfg, d, n = self.cfg, self.dist, self.cfg.n_px * self.cfg.n_px
        mask = self.batches.mask(step, n, cfg.mask_prob) if cfg.objective == "bert" else None
        denom = max(float(mask.sum()) if mask is not None else float(cfg.batch_size * n), 1.0)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        local = self.loader.get(step)  # this rank's rows of the global batch
        for m in range(cfg.grad_accum):
            lo = m * self.micro
            tokens = local[lo : lo + self.micro].to(self.device, non_blocking=True)
            rows = slice(self.loader.rows.start + lo, self.loader.rows.start + lo + self.micro)
            mb_mask = None if mask is None else mask[rows].to(self.device, non_blocking=True)
            with d.sync(self.model, m == cfg.grad_accum - 1):
                s = self.loss_sum(tokens, mb_mask)
                # DDP/FSDP average gradients over ranks; scaling by world makes the result
                # the gradient of (global summed loss / global count).
                self.scaler.scale(s * (d.world / denom)).backward()
            total += s.detach().double()
        loss = d.all_reduce(total).item() / denom
        lr = self.optimizer.param_groups[0]["lr"]
        finite, grad_norm = guarded_step(
            *(self.optimizer, self.scaler, self.guard, self.model.parameters()),
            step=step,
            loss=loss,
            clip=cfg.grad_clip,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped_step": not finite}

    def _step_or_step_back(self) -> dict:
        """``train_step(self.step)``; after an out-of-memory error, redone under the memory
        plan's next one (re-raised without ``max_memory`` or when no smaller plan fits)."""
        while True:
            try:
                stats = self.train_step(self.step)
                break
            except torch.cuda.OutOfMemoryError:
                p = self.memory.next_plan()
                if p is None:
                    raise
                log.warning(
                    "step %d ran out of memory under the plan predicted at %s; redoing it",
                    *(self.step, format_size(self.memory.plan.predicted_peak_bytes)),
                )
            # outside the handler: the traceback no longer holds the step's tensors
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.apply_memory(self.memory.adopt(p, step=self.step))
        self.memory.check_peak(self.step, self.cfg.steps)
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Hold-out ``val_loss`` (nats per token), ``val_bits_per_token`` (nats / ln 2) and
        ``val_bits_per_dim`` (per sub-pixel, a third: ``CHANNELS``). BERT uses a fixed mask
        (seeded) so evaluations are comparable across steps."""
        cfg, V = self.cfg, len(self.val_tokens)
        if V == 0:
            return {}
        val_mask = MaskRows(self.val_tokens.shape, cfg.mask_prob, seed=(cfg.seed, 4))
        was_training = self.model.training
        self.model.eval()
        show = self.dist.is_main and progress_enabled(cfg.progress)
        total = _validation_totals(self, val_mask if cfg.objective == "bert" else None, show)
        self.model.train(was_training)
        nats = (total[0] / total[1].clamp(min=1)).item()
        bits = nats / math.log(2)
        return {"val_loss": nats, "val_bits_per_token": bits, "val_bits_per_dim": bits / CHANNELS}

    def fit(self) -> dict:
        """Train from ``self.step`` to ``cfg.steps``; returns the final metrics."""
        with logging_redirect_tqdm():  # log lines above the bar, not glued onto it
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.model.train()
        desc = f"pretrain {cfg.model} {cfg.objective}"
        show = self.dist.is_main and progress_enabled(cfg.progress)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, disable=not show)
        window, t_last = [], time.perf_counter()
        # the rows logged up to the step we start from: a run resumed when already finished
        # still reports its final loss and validation loss (lr_search compares them)
        last = {k: v for r in self.run.read_metrics() if "probe" not in r for k, v in r.items()}
        while self.step < cfg.steps:
            stats = self._step_or_step_back()
            self.step += 1
            window.append(stats["loss"])
            bar.update(1)
            evaluate = self.step == cfg.steps or (cfg.val_every and self.step % cfg.val_every == 0)
            evaluate = evaluate or self.probe.due(self.step)  # a probe row has its val loss
            checkpoint = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
            # Validation and checkpoint steps are log steps too: every metrics.jsonl row then
            # carries `loss`, and a run resumed from a checkpoint averages the same windows.
            if self.step % cfg.log_every == 0 or evaluate or checkpoint:
                now = time.perf_counter()
                row = _metrics_row(self, stats, window, now - t_last)
                window, t_last = [], now
                bar.set_postfix(loss=f"{row['loss']:.4f}", **self.probe.postfix)
                row.update(self.evaluate() if evaluate else {})
                row.update(self.memory.metrics())
                last.update(row)
                self._log(row)
            if checkpoint:
                self.save()
        bar.close()
        self.plot()
        summary = {
            "step": self.step,
            "skipped": self.guard.skipped,
            "out": str(self.run.path),
            **last,
        }
        self.run.write_json("summary.json", summary)
        return summary

    # -- bookkeeping ----------------------------------------------------------------------

    def _log(self, row: dict) -> None:
        self.run.append_metrics([row])
        if "val_loss" in row and self.dist.is_main:
            keys = ("step", "val_loss", "val_bits_per_token", "val_bits_per_dim")
            log.info(VAL_LINE, *map(row.get, keys))
        self.probe.run(self, row)  # probe rows follow the validation row of their step

    def _write_config(self) -> None:
        n = (len(self.batches.train_idx), len(self.val_idx))
        conf = run_config(self.cfg, self.raw_model, self.dist.world, self.warmup, n, self.palette)
        self.run.write_json("config.json", conf)
        if self.dist.is_main:
            self.palette.save(self.run.path / "palette.npy")

    def save(self) -> Path | None:
        """Write ``ckpt_<step>.pt`` (rank 0) or the sharded ``ckpt_<step>.dcp`` (every rank
        its shards; ``checkpoint_format``) atomically, and prune old ones."""
        path = _write_checkpoint(self)
        self.plot()
        self.dist.barrier()
        return path if self.dist.is_main else None

    def _restore(self, ckpt: dict) -> None:
        self.dist.load_state_dicts(self.model, self.raw_model, self.optimizer, ckpt)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.guard = NonFiniteGuard(int(ckpt.get("skipped", 0)))
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        if "scaler" in ckpt and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        apply_resumed_settings(self.cfg, self.optimizer, self.scheduler, self.step)

    def plot(self) -> Path | None:
        """Write ``loss_curve.png`` (train and validation loss against step)."""
        cfg = self.cfg
        series = [("loss", "train"), ("val_loss", "validation")]
        title = f"{cfg.model} {cfg.objective} on {cfg.data}"
        return self.run.plot("loss_curve.png", [("loss (nats / token)", series)], title=title)

    def close(self) -> None:
        """Close the trackers; destroy the process group if this trainer created it."""
        self.run.close()
        if getattr(self, "loader", None) is not None:  # absent when __init__ failed
            self.loader.close()
        self.dist.close()


def _write_checkpoint(trainer: Trainer) -> Path:
    """``Trainer.save``'s checkpoint: sharded (``checkpoint_format`` "sharded", or "auto"
    under FSDP: each rank writes its shards) or one full file gathered on rank 0."""
    t, d, keep = trainer, trainer.dist, trainer.cfg.keep_checkpoints
    extra = dict(
        scheduler=t.scheduler.state_dict(),
        rng=rng_state(),
        train_config=t.cfg.to_dict(),
        objective=t.cfg.objective,
        skipped=t.guard.skipped,
        warmup=t.warmup,
        **({"scaler": t.scaler.state_dict()} if t.scaler.is_enabled() else {}),
    )
    fmt = t.cfg.checkpoint_format
    if fmt == "sharded" or (fmt == "auto" and d.sharded):
        tensors = d.sharded_state(t.model, t.raw_model, t.optimizer)
        state = checkpoint_state(t.raw_model, step=t.step, palette=t.palette, state_dict={})
        del state["model"]  # in the shards
        state.update(extra)
        return t.run.save_sharded_checkpoint(tensors, state, t.step, keep=keep, barrier=d.barrier)
    model_sd, optim_sd = d.state_dicts(t.model, t.raw_model, t.optimizer)
    state = checkpoint_state(
        t.raw_model,
        step=t.step,
        palette=t.palette,
        state_dict=model_sd,
        optimizer=optim_sd,
        optimizer_format=d.optimizer_format,
        **extra,
    )
    return t.run.save_checkpoint(state, t.step, keep=keep)


def _metrics_row(trainer: Trainer, stats: dict, window: list, seconds: float) -> dict:
    """A metrics.jsonl row: the mean loss of the steps since the last row, and its speed."""
    tokens = trainer.cfg.batch_size * trainer.cfg.n_px**2 * len(window)
    return {
        "step": trainer.step,
        "loss": float(np.mean(window)),
        "lr": stats["lr"],
        "grad_norm": stats["grad_norm"],
        "skipped": trainer.guard.skipped,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        **({"loss_scale": trainer.scaler.get_scale()} if trainer.scaler.is_enabled() else {}),
    }


def _validation_totals(trainer: Trainer, val_mask: MaskRows | None, show: bool) -> torch.Tensor:
    """(summed loss, token count) over the hold-out, float64, summed over processes: each
    takes every world-th micro-batch; a rank short of one reruns row 0 at weight 0, so that
    every rank runs the same forwards (FSDP)."""
    d, tokens_all, device = trainer.dist, trainer.val_tokens, trainer.device
    V, bs = len(tokens_all), max(1, trainer.micro)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in tqdm(range(math.ceil(V / (bs * d.world))), "validation", disable=not show):
        lo = (b * d.world + d.rank) * bs
        hi, weight = min(lo + bs, V), 1.0
        if lo >= V:
            lo, hi, weight = 0, 1, 0.0
        tokens = tokens_all[lo:hi].to(device)
        mask = val_mask(lo, hi).to(device) if val_mask is not None else None
        s = trainer.loss_sum(tokens, mask).double()
        count = float(mask.sum()) if mask is not None else float(tokens.numel())
        total += torch.stack([s, s.new_tensor(count)]) * weight
    return d.all_reduce(total)


def pretrain(config: TrainConfig | None = None, *, palette=None, data=None, **overrides) -> dict:
    """Run one pre-training job: ``pretrain(TrainConfig(...))`` or ``pretrain(steps=100, ...)``.

    Returns the summary (final step, loss, val_loss, val_bits_per_token, val_bits_per_dim,
    skipped, out).
    """
    cfg = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    trainer = Trainer(cfg, palette=palette, data=data)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def lr_search(config: TrainConfig, lrs=LR_GRID, *, palette=None, data=None) -> dict:
    """Sec. 3.4: train with each LR of ``lrs`` in order (each run in ``out/lr_<lr>``) and
    stop once the final validation loss rises. Returns ``{"best_lr", "runs"}`` and writes it
    to ``out/lr_search.json``."""
    d = Distributed(config.device)  # one process group for all the runs
    runs = []
    try:
        for lr in lrs:
            out = str(Path(config.out) / f"lr_{lr:g}")
            summary = pretrain(config, palette=palette, data=data, lr=lr, out=out)
            runs.append({"lr": lr, "val_loss": summary.get("val_loss"), "out": out})
            log.info("lr search: lr %g -> val loss %s", lr, summary.get("val_loss"))
            if len(runs) > 1 and runs[-1]["val_loss"] > runs[-2]["val_loss"]:
                break
    finally:
        d.close()
    best = min(runs, key=lambda r: r["val_loss"])
    result = {"best_lr": best["lr"], "best_out": best["out"], "runs": runs}
    RunDir(config.out, is_main=dist_env()[0] == 0).write_json("lr_search.json", result)
    return result
