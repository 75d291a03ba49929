"""Pre-training (paper sec. 2.1, 3.1-3.4, appendix A): objectives, trainer, ``igpt pretrain``.

Objectives, on palette tokens x (B, n):

    AR    L = -mean_i log p(x_i | x_<i)           (SOS prepended inside the model)
    BERT  L = -mean_{i in M} log p(x_i | x_[not M])  M: each position masked with p = 0.15

The trainer: Adam(0.9, 0.95), no weight decay, linear warm-up then cosine decay to 0, bf16
autocast on the GPU over fp32 master weights, gradient accumulation, activation
checkpointing (none / every k-th block), a guard that skips non-finite steps (the loss
spikes of appendix A) and reports them, validation loss in nats and bits per dimension on a
10% hold-out, the learning-rate search of sec. 3.4, checkpoints that resume bit-for-bit,
and torchrun (DDP, or FSDP2 ``fully_shard``) across GPUs or CPU processes (gloo).

    from igpt.train import TrainConfig, pretrain
    summary = pretrain(TrainConfig(model="igpt-tiny", n_px=16, data="digits", steps=500,
                                   out="runs/digits"))

Determinism: the images of step s and its BERT mask are a pure function of (seed, s) over
the *global* batch, so a resumed run reproduces the uninterrupted one bit-for-bit and K
processes see the same global batch as one process (each takes rows rank::K of it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from igpt._io import atomic_write_text
from igpt.checkpoint import (
    atomic_torch_save,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from igpt.config import IGPTConfig
from igpt.model import IGPT

log = logging.getLogger(__name__)

OBJECTIVES = ("ar", "bert")
PRECISIONS = ("auto", "bf16", "fp32")
AUGMENTS = ("none", "crop", "cifar")
# sec. 3.4: "we sequentially try the learning rates 0.01, 0.003, 0.001, 0.0003, ..."
LR_GRID = (0.01, 0.003, 0.001, 0.0003, 0.0001, 3e-5, 1e-5)


# ----------------------------------------------------------------------------- objectives


def bert_mask(shape, p: float = 0.15, generator: torch.Generator | None = None, device=None):
    """Bool mask (True = masked), each position independently with probability ``p``.

    Drawn on ``generator``'s device (the CPU by default), then moved to ``device``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask probability must lie in [0, 1], got {p!r}")
    gen_device = generator.device if generator is not None else "cpu"
    m = torch.rand(tuple(shape), generator=generator, device=gen_device) < p
    return m if device is None else m.to(device)


def _ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    # fp32 log-softmax whatever the autocast dtype: bf16 loses ~3 digits of the loss.
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction=reduction)


def ar_loss(model, tokens: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Autoregressive cross-entropy over all positions (nats per token).

    tokens: int (B, n) palette ids. The model prepends SOS, so logits[:, i] predicts
    tokens[:, i]. ``reduction="sum"`` returns the summed loss (the trainer normalises by
    the global token count).
    """
    return _ce(model(tokens), tokens, reduction)


def bert_loss(
    model,
    tokens: torch.Tensor,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """BERT cross-entropy on masked positions only (nats per masked token).

    Each position is masked independently with probability ``mask_prob`` (drawn from
    ``generator``) unless ``mask`` (bool (B, n), True = masked) is given. With no masked
    position the mean is 0 (and still differentiable).
    """
    if mask is None:
        mask = bert_mask(tokens.shape, mask_prob, generator, device=tokens.device)
    logits = model(tokens, bert_mask=mask)  # (B, n, K)
    total = _ce(logits[mask], tokens[mask], "sum") if mask.any() else logits.sum() * 0.0
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a pre-training run needs; saved as ``config.json`` in the run directory.

    ``batch_size`` is the global batch (all processes, all accumulation micro-steps); it
    must divide by ``world_size * grad_accum``. ``warmup_steps=None`` warms up for one epoch
    (the paper's choice), at most 10% of ``steps``. ``n_colors=None`` fits 16 colours for the
    bundled grey digits and 512 otherwise; ``palette`` (a .npy written by
    ``Palette.save``) skips the fit. ``init_from`` (a checkpoint file or run directory, e.g. a
    model converted from transformers' ImageGPT and saved with ``save_checkpoint``) starts
    from its weights, architecture, image size and palette instead of a fresh model; the
    optimizer and schedule start afresh.
    """

    model: str = "igpt-tiny"
    n_px: int | None = None  # None: 16 for digits, 32 otherwise
    data: str = "digits"
    objective: str = "ar"
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.0  # 0 = off
    mask_prob: float = 0.15
    checkpointing: int = 0  # activation checkpointing: 0 off, k = every k-th block
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    fsdp: bool = False
    augment: str = "none"  # none | crop (random resized crop) | cifar (pad-crop-flip)
    palette: str | None = None
    n_colors: int | None = None
    val_frac: float = 0.1
    val_size: int | None = 2048  # cap on the validation images (None: all)
    val_every: int = 0  # 0: only at the end (and with every checkpoint)
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3  # 0 keeps all
    seed: int = 0
    device: str | None = None
    out: str = "runs/pretrain"
    resume: bool = False
    cache_dir: str | None = None
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 < self.val_frac < 1.0:
            raise ValueError(f"val_frac must lie in (0, 1), got {self.val_frac!r}")
        # checked here, before data are read and a palette is fitted, not at the first step
        for name in ("checkpointing", "val_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name, lo in (("warmup_steps", 0), ("val_size", 1), ("n_px", 1), ("n_colors", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < lo):
                raise ValueError(f"{name} must be None or an int >= {lo}, got {v!r}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1], got {self.mask_prob!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.n_px is None and self.init_from is not None:
            self.n_px = _init_config(self.init_from).n_px
        if self.n_px is None:
            self.n_px = 16 if self.data == "digits" else 32

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _init_config(init_from) -> IGPTConfig:
    """The model config of the checkpoint a run starts from (read without its tensors)."""
    path = resolve_checkpoint(init_from)
    return IGPTConfig.from_dict(torch.load(path, mmap=True, weights_only=True)["config"])


def lr_lambda_factory(steps: int, warmup: int):
    """Multiplier of the peak LR at step s: linear warm-up to 1, then cosine to 0."""

    def lr_lambda(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return lr_lambda


# ----------------------------------------------------------------------------- distributed


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str | None = None) -> bool:
    """Initialise torch.distributed from torchrun's env vars when WORLD_SIZE > 1.

    NCCL for CUDA devices, gloo for the CPU. Returns True if this call created the group.
    """
    _, world, local_rank = _dist_env()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _barrier():
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """torch / numpy / python / cuda RNG states as tensors and numbers (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SplitMix64), for per-step generators."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


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
        self.cfg = cfg = config
        self._own_group = init_distributed(cfg.device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(
                f"batch_size {cfg.batch_size} must divide by world_size * grad_accum = "
                f"{self.world} * {cfg.grad_accum}"
            )
        self.micro = cfg.batch_size // (self.world * cfg.grad_accum)
        self.device = self._pick_device()
        self.amp = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.device.type == "cuda"
        )
        self.out = Path(cfg.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        _barrier()

        resume_from = latest_checkpoint(self.out)
        if resume_from is not None and not cfg.resume:
            raise FileExistsError(
                f"{self.out} already holds checkpoints (latest {resume_from.name}); pass "
                "--resume (resume=True) to continue that run, or choose another --out"
            )
        if cfg.resume and resume_from is None:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", self.out)
        ckpt = load_checkpoint(resume_from) if resume_from is not None else None
        if ckpt is not None:
            self._check_resumable(ckpt)

        init = None
        if ckpt is None and cfg.init_from is not None:
            init = load_checkpoint(cfg.init_from)
        self.palette = self._get_palette(palette, ckpt if ckpt is not None else init, data)
        self._load_tokens(data)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if cfg.init_from is not None:
            mcfg = _init_config(cfg.init_from)  # the architecture comes with the weights
            if (mcfg.n_px, mcfg.n_colors) != (cfg.n_px, len(self.palette)):
                raise ValueError(
                    f"init_from {cfg.init_from} holds a model for n_px={mcfg.n_px} and "
                    f"{mcfg.n_colors} colours, but this run has n_px={cfg.n_px} and a "
                    f"{len(self.palette)}-colour palette; drop --n-px/--palette or match them"
                )
        else:
            mcfg = IGPTConfig.from_name(
                cfg.model, n_px=cfg.n_px, n_colors=len(self.palette), **cfg.model_overrides
            )
        self.raw_model = IGPT(mcfg)
        if init is not None:
            self.raw_model.load_state_dict(init["model"])
            log.info("starting from the weights of %s", resolve_checkpoint(cfg.init_from))
        self.raw_model.to(self.device)
        self.raw_model.set_checkpointing(cfg.checkpointing)
        self.model = self._wrap(self.raw_model)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            **({"fused": True} if self.device.type == "cuda" else {}),
        )
        steps_per_epoch = max(1, len(self.train_idx) // cfg.batch_size)
        self.warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else max(1, min(steps_per_epoch, cfg.steps // 10))
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(cfg.steps, self.warmup)
        )
        self.step = 0
        self.skipped = 0
        self._perm_cache: dict[int, torch.Tensor] = {}
        if ckpt is not None:
            self._restore(ckpt)
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.metrics_path = self.out / "metrics.jsonl"
        if self.is_main:
            self._truncate_metrics()
            self._write_config()

    # -- set-up ---------------------------------------------------------------------------

    def _pick_device(self) -> torch.device:
        want = self.cfg.device
        if want is None:
            want = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(want)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={want!r} but CUDA is not available; use --device cpu")
            if self.world > 1 and device.index is None:
                device = torch.device("cuda", _dist_env()[2])
        return device

    def _check_resumable(self, ckpt: dict) -> None:
        old = TrainConfig.from_dict(ckpt.get("train_config", {}))
        fixed = ("model", "n_px", "data", "objective", "batch_size", "steps", "seed", "init_from")
        diff = [f for f in fixed if getattr(old, f) != getattr(self.cfg, f)]
        if diff:
            desc = ", ".join(f"{f}: {getattr(old, f)!r} -> {getattr(self.cfg, f)!r}" for f in diff)
            raise ValueError(
                f"cannot resume {self.cfg.out}: the checkpoint was made with different "
                f"settings ({desc}); pass the original flags or use a new --out"
            )

    def _get_palette(self, palette, ckpt, data):
        from igpt.data import holdout_split, load_images, resize
        from igpt.palette import Palette, fit_palette

        if ckpt is not None and "palette" in ckpt:
            return Palette(ckpt["palette"])
        if palette is not None:
            return palette
        if self.cfg.palette is not None:
            loaded = Palette.load(self.cfg.palette)
            if self.cfg.n_colors is not None and len(loaded) != self.cfg.n_colors:
                raise ValueError(
                    f"palette {self.cfg.palette} has {len(loaded)} colours but n_colors is "
                    f"{self.cfg.n_colors}; drop --n-colors or pass a matching palette"
                )
            return loaded
        # No checkpoint yet, so this run starts at step 0: fit afresh (deterministic for the
        # seed) rather than trust a palette.npy left by an earlier run in this directory,
        # which may have had other data or another n_colors. palette.npy only carries the
        # palette from rank 0 to the other ranks.
        path = self.out / "palette.npy"
        if self.is_main:
            k = self.cfg.n_colors or (16 if self.cfg.data == "digits" else 512)
            images = data.images if data is not None else load_images(self.cfg.data).images
            # fitted on the training part only: the hold-out (the same split _load_tokens
            # makes) must not shape the tokens it is scored on
            images = images[holdout_split(len(images), self.cfg.val_frac, seed=0)[0]]
            sample = images[np.random.default_rng(self.cfg.seed).permutation(len(images))[:4096]]
            log.info("fitting a %d-colour palette on %d images", k, len(sample))
            fit_palette(resize(sample, self.cfg.n_px), k=k, seed=self.cfg.seed).save(path)
        _barrier()
        return Palette.load(path)

    def _load_tokens(self, data) -> None:
        """Train/validation tokens: a uint16 memmap of the whole train split, split 90/10."""
        from igpt.data import cached_tokens, holdout_split, load_images

        cfg = self.cfg
        if cfg.augment != "none":
            self.images = (data or load_images(cfg.data)).images
            n = len(self.images)
            self.tokens = None
        else:
            self.images = None
            if data is not None:
                from igpt.data import tokenize

                self.tokens = tokenize(data.images, self.palette, cfg.n_px).numpy()
            else:
                if self.is_main:  # rank 0 fills the cache, the others then only map it
                    cached_tokens(
                        cfg.data, "train", self.palette, cfg.n_px, cache_dir=cfg.cache_dir
                    )
                _barrier()
                self.tokens, _ = cached_tokens(
                    cfg.data, "train", self.palette, cfg.n_px, cache_dir=cfg.cache_dir
                )
            n = len(self.tokens)
        self.train_idx, val_idx = holdout_split(n, cfg.val_frac, seed=0)
        if cfg.val_size is not None:
            val_idx = val_idx[: cfg.val_size]
        self.val_idx = val_idx
        if len(self.train_idx) == 0:
            raise ValueError(f"data {cfg.data!r} has no training images after the hold-out")
        # Validation is always on un-augmented images.
        if self.images is not None:
            from igpt.data import tokenize

            self.val_tokens = tokenize(self.images[val_idx], self.palette, cfg.n_px)
        else:
            self.val_tokens = torch.from_numpy(np.asarray(self.tokens[val_idx]).astype(np.int64))

    def _wrap(self, model):
        if self.cfg.fsdp:
            if not self.distributed:
                log.warning("--fsdp without torchrun: training on one process unsharded")
                return model
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if self.amp
                else MixedPrecisionPolicy()
            )
            for block in model.transformer.h:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            return model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        return model

    # -- data -----------------------------------------------------------------------------

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(_seed_of(self.cfg.seed, epoch, 1))
            self._perm_cache = {epoch: torch.randperm(len(self.train_idx), generator=g)}
        return self._perm_cache[epoch]

    def batch_indices(self, step: int) -> np.ndarray:
        """Data indices of the global batch of ``step``: consecutive slices of a fresh
        permutation of the training images per epoch (a pure function of seed and step)."""
        B, N = self.cfg.batch_size, len(self.train_idx)
        pos = np.arange(step * B, (step + 1) * B, dtype=np.int64)
        out = np.empty(B, np.int64)
        for epoch in np.unique(pos // N):
            sel = pos // N == epoch
            out[sel] = self._epoch_perm(int(epoch)).numpy()[pos[sel] % N]
        return self.train_idx[out]

    def batch_tokens(self, step: int, rows: slice) -> torch.Tensor:
        """int64 tokens (len(rows), n) of the global batch of ``step``, rows ``rows``."""
        idx = self.batch_indices(step)[rows]
        if self.images is None:
            return torch.from_numpy(np.asarray(self.tokens[idx]).astype(np.int64))
        from igpt.data import pad_crop_flip, random_resized_crop, tokenize

        start = rows.start or 0
        imgs = []
        for j, i in enumerate(idx):  # per-image RNG: same crops whatever the world size
            rng = np.random.default_rng(_seed_of(self.cfg.seed, step, start + j, 3))
            im = self.images[i : i + 1]
            if self.cfg.augment == "cifar":
                imgs.append(pad_crop_flip(im, rng=rng))
            else:
                imgs.append(random_resized_crop(im, self.cfg.n_px, rng=rng))
        return tokenize(np.concatenate(imgs), self.palette, self.cfg.n_px)

    def batch_mask(self, step: int) -> torch.Tensor:
        """The BERT mask (B, n) of the global batch of ``step``."""
        g = torch.Generator().manual_seed(_seed_of(self.cfg.seed, step, 2))
        n = self.cfg.n_px * self.cfg.n_px
        return bert_mask((self.cfg.batch_size, n), self.cfg.mask_prob, g)

    # -- training -------------------------------------------------------------------------

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _sync_context(self, sync: bool):
        if self.cfg.fsdp and self.distributed:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if self.distributed and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def loss_sum(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch (the objective of the run)."""
        with self._autocast():
            if self.cfg.objective == "ar":
                return ar_loss(self.model, tokens, reduction="sum")
            return bert_loss(self.model, tokens, mask=mask, reduction="sum")

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of ``step``. Returns its statistics."""
        cfg, n = self.cfg, self.cfg.n_px * self.cfg.n_px
        mask = self.batch_mask(step) if cfg.objective == "bert" else None
        denom = float(mask.sum()) if mask is not None else float(cfg.batch_size * n)
        denom = max(denom, 1.0)
        per_rank = cfg.batch_size // self.world
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in range(cfg.grad_accum):
            lo = self.rank * per_rank + m * self.micro
            rows = slice(lo, lo + self.micro)
            tokens = self.batch_tokens(step, rows).to(self.device, non_blocking=True)
            mb_mask = None if mask is None else mask[rows].to(self.device, non_blocking=True)
            with self._sync_context(m == cfg.grad_accum - 1):
                s = self.loss_sum(tokens, mb_mask)
                # DDP/FSDP average gradients over ranks; scaling by world makes the result
                # the gradient of (global summed loss / global count).
                (s * (self.world / denom)).backward()
            total += s.detach().double()
        loss = _all_reduce(total).item() / denom
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        grad_norm = float(
            grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        )
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.skipped += 1
            log.warning(
                "step %d: non-finite loss %s / grad norm %s; step skipped (%d so far)",
                step,
                loss,
                grad_norm,
                self.skipped,
            )
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped_step": not finite}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss on the hold-out in nats per token and bits per dimension.

        A dimension is one token (one pixel's palette colour), so bits/dim = nats / ln 2.
        BERT uses a fixed mask (seeded) so evaluations are comparable across steps.
        """
        cfg, n = self.cfg, self.cfg.n_px * self.cfg.n_px
        V = len(self.val_tokens)
        if V == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        if cfg.objective == "bert":
            g = torch.Generator().manual_seed(_seed_of(cfg.seed, 4))
            val_mask = bert_mask((V, n), cfg.mask_prob, g)
        bs = max(1, self.micro)
        n_batches = math.ceil(V / (bs * self.world))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        from tqdm.auto import tqdm

        bar = tqdm(
            range(n_batches),
            desc="validation",
            unit="batch",
            leave=False,
            disable=not (self.is_main and cfg.progress),
        )
        for b in bar:
            lo = (b * self.world + self.rank) * bs
            idx = torch.arange(lo, min(lo + bs, V))
            weight = 1.0
            if len(idx) == 0:  # every rank must run the same forwards (FSDP)
                idx, weight = torch.arange(1), 0.0
            tokens = self.val_tokens[idx].to(self.device)
            mask = val_mask[idx].to(self.device) if cfg.objective == "bert" else None
            s = self.loss_sum(tokens, mask).double()
            count = float(mask.sum()) if mask is not None else float(tokens.numel())
            total += torch.stack([s, s.new_tensor(count)]) * weight
        _all_reduce(total)
        self.model.train(was_training)
        nats = (total[0] / total[1].clamp(min=1)).item()
        return {"val_loss": nats, "val_bpd": nats / math.log(2)}

    def fit(self) -> dict:
        """Train from ``self.step`` to ``cfg.steps``; returns the final metrics."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.model.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=f"pretrain {cfg.model} {cfg.objective}",
            disable=not (self.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        window, t_last = [], time.perf_counter()
        # the rows logged up to the step we start from: a run resumed when already finished
        # still reports its final loss and validation loss (lr_search compares them)
        last = {}
        for row in self._read_metrics():
            last.update(row)
        tokens_per_step = cfg.batch_size * cfg.n_px * cfg.n_px
        while self.step < cfg.steps:
            stats = self.train_step(self.step)
            self.step += 1
            window.append(stats["loss"])
            bar.update(1)
            row = None
            evaluate = self.step == cfg.steps or (cfg.val_every and self.step % cfg.val_every == 0)
            checkpoint = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
            # Validation and checkpoint steps are log steps too: every metrics.jsonl row then
            # carries `loss`, and a run resumed from a checkpoint averages the same windows.
            if self.step % cfg.log_every == 0 or evaluate or checkpoint:
                now = time.perf_counter()
                row = {
                    "step": self.step,
                    "loss": float(np.mean(window)),
                    "lr": stats["lr"],
                    "grad_norm": stats["grad_norm"],
                    "skipped": self.skipped,
                    "tokens_per_s": tokens_per_step * len(window) / max(now - t_last, 1e-9),
                }
                window, t_last = [], now
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if evaluate:
                row.update(self.evaluate())
            if row is not None:
                last.update(row)
                self._log(row)
            if checkpoint:
                self.save()
        bar.close()
        if self.is_main:
            self.plot()
        summary = {"step": self.step, "skipped": self.skipped, "out": str(self.out), **last}
        if self.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    # -- bookkeeping ----------------------------------------------------------------------

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if "val_loss" in row:
            log.info(
                "step %d: val loss %.4f nats, %.4f bits/dim",
                row["step"],
                row["val_loss"],
                row["val_bpd"],
            )

    def _read_metrics(self) -> list[dict]:
        rows = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
        return rows

    def _truncate_metrics(self) -> None:
        """Drop log rows past the step we (re)start from: a killed run may have logged
        steps that its last checkpoint does not hold, and they are about to be redone."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a half-written last line
        # atomic: a crash here must not lose the rows that are kept
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def _write_config(self) -> None:
        conf = {
            "train": self.cfg.to_dict(),
            "model": self.raw_model.config.to_dict(),
            "world_size": self.world,
            "warmup_steps": self.warmup,
            "n_train": int(len(self.train_idx)),
            "n_val": int(len(self.val_idx)),
            "palette_colors": len(self.palette),
            "torch": torch.__version__,
        }
        atomic_write_text(self.out / "config.json", json.dumps(conf, indent=2))
        self.palette.save(self.out / "palette.npy")

    def _state_dicts(self) -> tuple[dict, dict]:
        if self.cfg.fsdp and self.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (
                get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.optimizer, options=opts),
            )
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def save(self) -> Path | None:
        """Write ``ckpt_<step>.pt`` atomically (rank 0) and prune old ones."""
        model_sd, optim_sd = self._state_dicts()  # a collective under FSDP
        path = checkpoint_path(self.out, self.step)
        if self.is_main:
            state = {
                "model": model_sd,
                "config": self.raw_model.config.to_dict(),
                "step": self.step,
                "palette": self.palette.centroids.clone(),
                "optimizer": optim_sd,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "train_config": self.cfg.to_dict(),
                "objective": self.cfg.objective,
                "skipped": self.skipped,
                "optimizer_format": "fsdp_full" if self.cfg.fsdp and self.distributed else "torch",
            }
            atomic_torch_save(state, path)
            self._prune()
            self.plot()
        _barrier()
        return path if self.is_main else None

    def _prune(self) -> None:
        keep = self.cfg.keep_checkpoints
        if keep <= 0:
            return
        ckpts = sorted(self.out.glob("ckpt_*.pt"))
        for p in ckpts[:-keep]:
            p.unlink(missing_ok=True)

    def _restore(self, ckpt: dict) -> None:
        fsdp_format = ckpt.get("optimizer_format") == "fsdp_full"
        if self.cfg.fsdp and self.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            if not fsdp_format:
                raise ValueError("resuming an FSDP run needs a checkpoint written with --fsdp")
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ckpt["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=opts)
        else:
            if fsdp_format:
                raise ValueError("this checkpoint was written with --fsdp; resume with --fsdp")
            self.raw_model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.skipped = int(ckpt.get("skipped", 0))
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])

    def plot(self) -> Path | None:
        """Write ``loss_curve.png`` (train and validation loss against step)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self._read_metrics()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(f"{self.cfg.model} {self.cfg.objective} on {self.cfg.data}")
        if train or val:
            ax.legend()
        fig.tight_layout()
        path = self.out / "loss_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        """Destroy the process group if this trainer created it."""
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False


def pretrain(config: TrainConfig | None = None, *, palette=None, data=None, **overrides) -> dict:
    """Run one pre-training job: ``pretrain(TrainConfig(...))`` or ``pretrain(steps=100, ...)``.

    Returns the summary (final step, loss, val_loss, val_bpd, skipped, out).
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
    own = init_distributed(config.device)
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
        if own and dist.is_initialized():
            dist.destroy_process_group()
    best = min(runs, key=lambda r: r["val_loss"])
    result = {"best_lr": best["lr"], "best_out": best["out"], "runs": runs}
    if _dist_env()[0] == 0:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(config.out) / "lr_search.json", json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Flags of ``igpt pretrain``."""
    from igpt.cli import add_common_arguments

    add_common_arguments(
        parser,
        "model",
        "n_px",
        "data",
        "objective",
        "steps",
        "batch_size",
        "lr",
        "out",
        "resume",
        "checkpoint",
        "device",
        "seed",
        helps={
            "checkpoint": "start from this checkpoint's weights, architecture and palette (a "
            "file or a run directory); the optimizer and schedule start afresh"
        },
    )
    d = TrainConfig()
    a = parser.add_argument
    a("--palette", default=None, help="palette .npy (Palette.save); default: fit one on the data")
    a("--n-colors", type=int, default=None, help="colours to fit (default 16 for digits, else 512)")
    a("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps (default 1)")
    a("--warmup-steps", type=int, default=None, help="LR warm-up (default: one epoch, ≤10%%)")
    a("--weight-decay", type=float, default=0.0, help="Adam weight decay (default 0)")
    a("--grad-clip", type=float, default=0.0, help="clip the gradient norm (default 0: off)")
    a("--mask-prob", type=float, default=0.15, help="BERT masking probability (default 0.15)")
    a(
        "--checkpointing",
        type=int,
        default=0,
        help="activation checkpointing: 0 off, 1 every block, k every k-th (default 0)",
    )
    a("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    a("--fsdp", action="store_true", help="shard with FSDP2 fully_shard (under torchrun)")
    a("--augment", choices=AUGMENTS, default="none", help="train-time augmentation")
    a("--val-frac", type=float, default=0.1, help="hold-out fraction (default 0.1)")
    a("--val-size", type=int, default=d.val_size, help="cap on validation images")
    a("--val-every", type=int, default=0, help="validate every N steps (default: at the end)")
    a("--log-every", type=int, default=d.log_every, help="metrics.jsonl row every N steps")
    a("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint every N steps")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="0 keeps all")
    a("--cache-dir", default=None, help="token cache (default $IGPT_CACHE or ~/.cache/igpt)")
    a("--lr-search", action="store_true", help="sec. 3.4: try 0.01, 0.003, ... in order")
    a("--no-progress", action="store_true", help="no tqdm progress bar")


def config_from_args(args) -> TrainConfig:
    d = TrainConfig()
    return TrainConfig(
        model=args.model,
        n_px=args.n_px,
        data=args.data,
        objective=args.objective,
        steps=args.steps if args.steps is not None else d.steps,
        batch_size=args.batch_size if args.batch_size is not None else d.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else d.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        mask_prob=args.mask_prob,
        checkpointing=args.checkpointing,
        precision=args.precision,
        fsdp=args.fsdp,
        augment=args.augment,
        palette=args.palette,
        n_colors=args.n_colors,
        val_frac=args.val_frac,
        val_size=args.val_size,
        val_every=args.val_every,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
        device=args.device,
        out=args.out if args.out is not None else d.out,
        resume=args.resume,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        init_from=args.checkpoint,
    )


def run(args) -> None:
    """``igpt pretrain``."""
    cfg = config_from_args(args)
    if args.lr_search:
        result = lr_search(cfg)
        if _dist_env()[0] == 0:
            print(json.dumps(result, indent=2))
        return
    summary = pretrain(cfg)
    if _dist_env()[0] == 0:
        print(json.dumps(summary, indent=2))
