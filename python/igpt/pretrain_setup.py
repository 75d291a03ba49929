"""The set-up of a pre-training run, step by step: what ``igpt.train.Trainer`` builds.

    init_cfg = init_config(cfg.init_from)            # --checkpoint's architecture
    check_resumable(cfg, path, ckpt)                   # the resume check (RESUME_FIXED)
    palette = run_palette(cfg, run, dist, palette, ckpt, data)
    batches, val_idx, val_tokens = run_data(cfg, dist, palette, data)
    loader = run_loader(cfg, dist, batches, start_step, device)   # the rank's rows, ahead
    model = run_model(cfg, len(palette), init_cfg, init, device, resume)
    warmup = run_warmup(cfg, ckpt, n_train)
    schedule = lr_lambda_factory(cfg.steps, warmup)

Each function assigns one piece of the run from the config; the trainer calls them in order,
in plain sight. The policies shared with fine-tuning (the resume verdict, the optimizer
settings restored) come from ``igpt.training``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np
import torch

from igpt.batches import GlobalBatches, ImageSource, StepLoader, TokenSource
from igpt.checkpoint import (
    CheckpointError,
    architecture_differences,
    load_checkpoint,
    load_weights,
    model_config,
    read_checkpoint,
    resolve_checkpoint,
)
from igpt.config import IGPTConfig
from igpt.distributed import Distributed
from igpt.memplan import apply_checkpointing
from igpt.model import IGPT
from igpt.rundir import RunDir
from igpt.trainconfig import RESUME_FIXED, TrainConfig
from igpt.training import refuse_resume, restore_optimizer_settings

__all__ = [
    "init_config",
    "init_checkpoint",
    "lr_lambda_factory",
    "check_resumable",
    "run_warmup",
    "run_optimizer",
    "apply_resumed_settings",
    "check_architecture",
    "run_palette",
    "run_data",
    "run_loader",
    "augmentation",
    "run_model",
    "micro_batch",
    "run_config",
]

log = logging.getLogger(__name__)


def init_config(init_from) -> IGPTConfig:
    """The model config of the checkpoint a run starts from (read without its tensors: a
    file memory-mapped, a sharded directory's state.pt alone)."""
    path = resolve_checkpoint(init_from)
    return model_config(read_checkpoint(path, mmap=True, tensors=False), path)


def init_checkpoint(cfg, palette) -> dict:
    """The checkpoint of ``init_from`` for a run that starts from it: a ValueError when it
    holds no palette and none is given (``palette`` or ``cfg.palette``)."""
    init = load_checkpoint(cfg.init_from)
    if "palette" not in init and palette is None and cfg.palette is None:
        # a palette fitted afresh would give the weights' colour indices other colours
        raise ValueError(
            f"init_from {cfg.init_from} (--checkpoint) holds no palette, so images cannot be "
            "tokenised as its weights expect; pass the palette it was trained with (--palette)"
        )
    return init


def lr_lambda_factory(steps: int, warmup: int):
    """Multiplier of the peak LR at step s: linear warm-up to 1, then cosine to 0."""

    def lr_lambda(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return lr_lambda


def check_resumable(cfg: TrainConfig, path: Path, ckpt: dict) -> None:
    """A ValueError unless the checkpoint at ``path`` was made by a run that shares
    ``cfg``'s ``RESUME_FIXED`` settings and palette, and is not past ``cfg.steps``; the
    other settings that changed are logged."""
    from igpt.palette import Palette

    if "train_config" not in ckpt or "step" not in ckpt:
        raise CheckpointError(
            f"{path} is not a pre-training checkpoint (it has no train_config or step); "
            "start from its weights with --checkpoint and a new --out instead"
        )
    old = TrainConfig.from_dict(ckpt["train_config"])
    fixed = [f for f in RESUME_FIXED if getattr(old, f) != getattr(cfg, f)]
    if cfg.objective == "bert" and old.mask_prob != cfg.mask_prob:
        fixed.append("mask_prob")
    diff = [f"{f} {getattr(old, f)!r} there, {getattr(cfg, f)!r} now" for f in fixed]
    saved = Palette(ckpt["palette"]) if "palette" in ckpt else None
    if cfg.palette is not None and saved is not None:
        given = Palette.load(cfg.palette)
        if given.centroids.shape != saved.centroids.shape or not torch.equal(
            given.centroids, saved.centroids
        ):
            diff.append(f"palette: {cfg.palette} is not the run's {len(saved)}-colour palette")
    if cfg.n_colors is not None and saved is not None and cfg.n_colors != len(saved):
        diff.append(f"n_colors {len(saved)} there, {cfg.n_colors} now")
    refuse_resume(cfg.out, path, diff, int(ckpt["step"]), cfg.steps)
    same = set(RESUME_FIXED) | {"out", "resume", "mask_prob", "palette", "n_colors"}
    if cfg.warmup_steps is None:  # the run's own warm-up is kept
        same.add("warmup_steps")
    changed = [
        f"{f.name}: {getattr(old, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in same and getattr(old, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        log.info("resuming %s with changed settings: %s", path, "; ".join(changed))


def run_warmup(cfg: TrainConfig, ckpt: dict | None, n_train: int) -> int:
    """``cfg.warmup_steps``, else the resumed run's own (never repeated), else one epoch
    but at most 10% of the steps (and at least 1)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    epoch = max(1, n_train // cfg.batch_size)
    if ckpt is not None:  # checkpoints before "warmup" was saved: the rule at their steps
        planned = TrainConfig.from_dict(ckpt["train_config"]).steps
        return int(ckpt.get("warmup", max(1, min(epoch, planned // 10))))
    return max(1, min(epoch, cfg.steps // 10))


def run_optimizer(cfg: TrainConfig, model, device, ckpt: dict | None, n_train: int):
    """(Adam, its warm-up + cosine LambdaLR, the warm-up steps) of a run (the resumed run's
    own warm-up, ``run_warmup``); Adam is fused on CUDA."""
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.Adam(
        model.parameters(), cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused
    )
    warmup = run_warmup(cfg, ckpt, n_train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(cfg.steps, warmup))
    return optimizer, scheduler, warmup


def apply_resumed_settings(cfg: TrainConfig, optimizer, scheduler, step: int) -> None:
    """After a restore, ``cfg``'s lr, betas and weight decay (the optimizer's state brought
    back the old run's, the scheduler its peak lr) from ``step`` on, on the schedule planned
    for ``cfg.steps``: the same numbers, bit for bit, when nothing changed."""
    factor = scheduler.lr_lambdas[0](step)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    restore_optimizer_settings(
        optimizer, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, factor=factor
    )
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def check_architecture(path: Path, ckpt: dict, mcfg: IGPTConfig) -> None:
    """A ValueError naming the fields in which the run's model differs from the checkpoint's."""
    diff = architecture_differences(path, ckpt, mcfg)
    if diff:
        raise ValueError(
            f"cannot resume from {path}: it holds another architecture ({'; '.join(diff)}); "
            "pass the run's --model and --n-px, or use another --out"
        )


def run_palette(cfg: TrainConfig, run: RunDir, d: Distributed, palette, ckpt, data):
    """The palette of a run: the checkpoint's, the one given, ``cfg.palette``, or a fit."""
    from igpt.data import holdout_split, load_images, resize
    from igpt.palette import Palette, fit_palette, fit_palette_on

    if ckpt is not None and "palette" in ckpt:
        return Palette(ckpt["palette"])
    if palette is not None:
        return palette
    if cfg.palette is not None:
        loaded = Palette.load(cfg.palette)
        if cfg.n_colors is not None and len(loaded) != cfg.n_colors:
            raise ValueError(
                f"palette {cfg.palette} has {len(loaded)} colours but n_colors is "
                f"{cfg.n_colors}; drop --n-colors or pass a matching palette"
            )
        return loaded
    # No checkpoint yet, so this run starts at step 0: fit afresh (deterministic for the
    # seed) rather than trust a palette.npy left by an earlier run in this directory.
    # palette.npy only carries the palette from rank 0 to the other ranks.
    path = run.path / "palette.npy"
    if d.is_main:
        k = cfg.n_colors or cfg.data_defaults()["n_colors"]
        # read lazily: only the images holding the sampled pixels, never the whole set
        images = data.images if data is not None else load_images(cfg.data, lazy=True)
        # the training part only: the hold-out must not shape the tokens it is scored on
        rows = holdout_split(len(images), cfg.val_frac, seed=0)[0]
        rows = rows[np.random.default_rng(cfg.seed).permutation(len(rows))[:4096]]
        log.info("fitting a %d-colour palette on %d images", k, len(rows))
        if data is not None:
            fitted = fit_palette(resize(images[rows], cfg.n_px), k=k, seed=cfg.seed)
        else:  # the same pixels as above would draw (fit_palette_on's contract)
            fitted = fit_palette_on(images, k, n_px=cfg.n_px, rows=rows, seed=cfg.seed)
        fitted.save(path)
    d.barrier()
    return Palette.load(path)


def run_data(cfg: TrainConfig, d: Distributed, palette, data):
    """(GlobalBatches, val_idx, val_tokens): a uint16 token memmap (or images to augment,
    read lazily: a batch's rows at a time, never the whole split), split 90/10 with the
    hold-out capped at ``val_size``; validation is never augmented."""
    from igpt.data import cached_tokens, holdout_split, load_images, tokenize

    if cfg.augment != "none":
        images = data.images if data is not None else load_images(cfg.data, lazy=True)
        source = ImageSource(images, palette, cfg.n_px, augmentation(cfg))
    elif data is not None:
        source = TokenSource(tokenize(data.images, palette, cfg.n_px).numpy())
    else:
        cache = functools.partial(
            cached_tokens, cfg.data, "train", palette, cfg.n_px, cache_dir=cfg.cache_dir
        )
        # every rank asks for the entry: its lock makes the others wait while one builds
        # it (no collective that a build of hours would time out), then each maps it
        source = TokenSource(cache()[0])
    train_idx, val_idx = holdout_split(len(source), cfg.val_frac, seed=0)
    if len(train_idx) == 0:
        raise ValueError(f"data {cfg.data!r} has no training images after the hold-out")
    val_idx = val_idx if cfg.val_size is None else val_idx[: cfg.val_size]
    batches = GlobalBatches(source, train_idx, cfg.batch_size, seed=cfg.seed)
    return batches, val_idx, source.plain(val_idx)


def run_loader(cfg: TrainConfig, d: Distributed, batches: GlobalBatches, start: int, device):
    """This rank's rows of every step's global batch from ``start`` on (``StepLoader``):
    made ahead by ``cfg.dataloader_num_workers`` processes, pinned on CUDA unless
    ``dataloader_pin_memory`` is False; the same tensors as made inline, bit for bit."""
    share = cfg.batch_size // d.world
    return StepLoader(
        batches,
        slice(d.rank * share, (d.rank + 1) * share),
        start=start,
        stop=cfg.steps,
        workers=cfg.dataloader_num_workers,
        pin_memory=cfg.dataloader_pin_memory and device.type == "cuda",
        prefetch=cfg.dataloader_prefetch_factor,
    )


def augmentation(cfg: TrainConfig):
    from igpt.data import pad_crop_flip, random_resized_crop

    if cfg.augment == "cifar":
        return pad_crop_flip
    return functools.partial(random_resized_crop, n_px=cfg.n_px)


def run_model(cfg: TrainConfig, n_colors: int, init_cfg, init, device, resume=None) -> IGPT:
    """The run's model on ``device``: fresh for ``cfg.model`` (the same on every rank), or
    ``init_from``'s architecture and weights; with ``cfg.checkpointing`` applied. With
    ``resume`` (path, checkpoint), a ValueError unless its architecture is the same."""
    ckpt = resume[1] if resume is not None else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if init_cfg is not None:
        if ckpt is None and (init_cfg.n_px, init_cfg.n_colors) != (cfg.n_px, n_colors):
            raise ValueError(
                f"init_from {cfg.init_from} holds a model for n_px={init_cfg.n_px} and "
                f"{init_cfg.n_colors} colours, but this run has n_px={cfg.n_px} and a "
                f"{n_colors}-colour palette; drop --n-px/--palette or match them"
            )
        mcfg = init_cfg
    else:
        mcfg = IGPTConfig.from_name(
            cfg.model, n_px=cfg.n_px, n_colors=n_colors, **cfg.model_overrides
        )
    if resume is not None:
        check_architecture(*resume, mcfg)
    model = IGPT(mcfg)
    if init is not None:
        load_weights(model, init, resolve_checkpoint(cfg.init_from))
        log.info("starting from the weights of %s", resolve_checkpoint(cfg.init_from))
    return apply_checkpointing(model.to(device), cfg.checkpointing)


def micro_batch(cfg: TrainConfig, world: int) -> int:
    """Rows per process and micro-step: the global batch over ``world * grad_accum``, which
    must divide it (a ValueError naming both otherwise)."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by world_size * grad_accum = "
            f"{world} * {cfg.grad_accum}"
        )
    return cfg.batch_size // (world * cfg.grad_accum)


def run_config(cfg: TrainConfig, model: IGPT, world: int, warmup: int, n, palette) -> dict:
    """What ``config.json`` records of a run: its resolved settings (``train``, the memory
    plan's included), the model, ``n = (n_train, n_val)`` and the warm-up it runs."""
    return {
        "train": cfg.to_dict(),
        "model": model.config.to_dict(),
        "world_size": world,
        "warmup_steps": warmup,
        "n_train": int(n[0]),
        "n_val": int(n[1]),
        "palette_colors": len(palette),
        "torch": torch.__version__,
    }
