"""Pre-training (paper sec. 2.1, 3.1-3.4, appendix A): the config, the trainer, the LR search.

    from igpt.train import TrainConfig, pretrain
    summary = pretrain(TrainConfig(model="igpt-tiny", n_px=16, data="digits", steps=500,
                                   out="runs/digits"))

Adam(0.9, 0.95), no weight decay, linear warm-up then cosine decay to 0, bf16 autocast on
the GPU over fp32 master weights, gradient accumulation, activation checkpointing (every
k-th block, ``apply_checkpointing``), a guard that skips non-finite steps (the loss spikes
of appendix A), validation loss in nats per token, bits per token and bits per dimension
(per sub-pixel, the literature's bits/dim) on a 10% hold-out, the learning-rate search of
sec. 3.4, and torchrun (DDP, or FSDP2 ``fully_shard``).

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

The pieces live beside it: the objectives and their masks in ``igpt.objectives``, the batch
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.contrib.logging import logging_redirect_tqdm

from igpt._rng import rng_state, set_rng_state
from igpt.batches import GlobalBatches, ImageSource, TokenSource
from igpt.checkpoint import (
    CheckpointError,
    architecture_differences,
    checkpoint_state,
    load_checkpoint,
    load_weights,
    model_config,
    read_checkpoint,
    resolve_checkpoint,
)
from igpt.config import IGPTConfig
from igpt.distributed import Distributed, dist_env, init_distributed
from igpt.memory import parse_size
from igpt.memplan import TrainMemory
from igpt.model import IGPT
from igpt.objectives import (
    MASK_PROB,
    OBJECTIVES,
    MaskRows,
    ar_loss,
    bert_loss,
    bert_mask,
    generative_loss,
)
from igpt.rundir import RunDir

__all__ = [
    "TrainConfig",
    "Trainer",
    "pretrain",
    "lr_search",
    "apply_checkpointing",
    "lr_lambda_factory",
    "setting",
    # re-exported: their home is igpt.objectives / igpt._rng / igpt.distributed
    "ar_loss",
    "bert_loss",
    "bert_mask",
    "rng_state",
    "set_rng_state",
    "init_distributed",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
AUGMENTS = ("none", "crop", "cifar")
# n_px and the palette size when a config leaves them None (the grey digits need 16 colours)
DATA_DEFAULTS = {"digits": {"n_px": 16, "n_colors": 16}}
OTHER_DATA_DEFAULTS = {"n_px": 32, "n_colors": 512}
# sec. 3.4: "we sequentially try the learning rates 0.01, 0.003, 0.001, 0.0003, ..."
LR_GRID = (0.01, 0.003, 0.001, 0.0003, 0.0001, 3e-5, 1e-5)
# What a resumed run must share with the run of its checkpoint: the architecture, the data
# and its train/hold-out split, the objective, the global batch and the seed that draws the
# batch of every step. Any other setting may change on resume (steps: see the module doc).
RESUME_FIXED = (
    "model",
    "model_overrides",
    "n_px",
    "init_from",
    "data",
    "val_frac",
    "objective",
    "batch_size",
    "seed",
)
# Sub-pixels per pixel. A token is one pixel's palette colour; the literature's bits/dim
# counts each of a pixel's 3 sub-pixels as a dimension, so bits/dim = bits per token / 3
# (of a palette's code, so not comparable with bits/dim of models of raw 8-bit sub-pixels).
CHANNELS = 3
VAL_LINE = "step %d: val loss %.4f nats, %.4f bits per token (%.4f bits/dim)"


def progress_enabled(progress: bool | None, stream=None) -> bool:
    """Whether to draw tqdm bars: ``progress`` if set, else (None: auto) only when ``stream``
    (default stderr, where tqdm draws) is a terminal, so logs and pipes get no bars."""
    if progress is not None:
        return bool(progress)
    import sys

    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def setting(default, help: str, **meta):
    """A config dataclass field: its default, and its ``igpt`` flag's help text and other
    ``metadata`` (``choices``, ``flag``, ``default_text``; see
    ``igpt.commands._common.dataclass_arguments``). A dict default is copied per instance."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a pre-training run needs; saved as ``config.json`` in the run directory.

    ``batch_size`` is the global batch (all processes, all accumulation micro-steps): it
    must divide by ``world_size * grad_accum``. Building a config reads no file; the
    trainer resolves what depends on one (``n_px`` from ``init_from``). Every value is
    checked here (non-finite or out-of-range ones raise a ValueError naming the field).

    With ``resume``, the ``RESUME_FIXED`` fields and the palette must be the run's; a new
    ``steps`` extends (or shortens) the run: from the resume step on, the learning rate is
    the one a run started with the new ``steps`` would have (the cosine re-planned to reach
    0 on the new last step), the warm-up the run's own and never repeated.
    """

    model: str = setting("igpt-tiny", "named size: igpt-tiny, igpt-s, igpt-m, igpt-l, igpt-xl")
    n_px: int | None = setting(
        None,
        "image side in pixels",
        default_text="16 for digits, else 32; with --checkpoint, its own",
    )
    data: str = setting(
        "digits", "digits (bundled), cifar10:DIR, cifar100:DIR, folder:DIR or npz:FILE"
    )
    objective: str = setting("ar", "generative objective", choices=OBJECTIVES)
    steps: int = setting(
        1000,
        "optimizer steps; raise it with --resume to extend a run: the cosine is re-planned to "
        "end at the new last step (from the resume step on, the LR of a run started with "
        "these steps), the warm-up is not repeated",
    )
    batch_size: int = setting(64, "global batch size (all processes and micro-steps)")
    grad_accum: int = setting(1, "gradient accumulation micro-steps")
    lr: float = setting(3e-3, "peak learning rate")
    warmup_steps: int | None = setting(
        None, "LR warm-up steps", default_text="one epoch, <= 10%% of steps; on resume the run's"
    )
    weight_decay: float = setting(0.0, "Adam weight decay")
    betas: tuple[float, float] = setting((0.9, 0.95), "Adam betas")
    grad_clip: float = setting(0.0, "clip the gradient norm (0: off)")
    mask_prob: float = setting(MASK_PROB, "BERT masking probability")
    checkpointing: int = setting(0, "activation checkpointing: 0 off, 1 every block, k every k-th")
    precision: str = setting(
        "auto", "auto: bf16 autocast on CUDA, fp32 on the CPU", choices=PRECISIONS
    )
    fsdp: bool = setting(False, "shard with FSDP2 fully_shard (under torchrun)")
    max_memory: str | None = setting(
        None,
        "GPU memory budget (40GiB, 24G): train under igpt.memory.plan's fastest plan that "
        "fits (micro-batch x accumulation, checkpointing, offload; see igpt plan)",
        default_text="off",
    )
    offload_activations: bool = setting(
        False, "keep saved activations in pinned CPU memory until the backward"
    )
    augment: str = setting(
        "none",
        "train-time augmentation: crop (random resized crop) or cifar (pad-crop-flip)",
        choices=AUGMENTS,
    )
    palette: str | None = setting(
        None, "palette .npy (Palette.save)", default_text="fit one on the training images"
    )
    n_colors: int | None = setting(None, "colours to fit", default_text="16 for digits, else 512")
    val_frac: float = setting(0.1, "hold-out fraction")
    val_size: int | None = setting(2048, "cap on the validation images")
    val_every: int = setting(0, "validate every N steps (0: at the end and with checkpoints)")
    log_every: int = setting(10, "a metrics.jsonl row every N steps")
    ckpt_every: int = setting(500, "checkpoint every N steps")
    keep_checkpoints: int = setting(3, "checkpoints kept (0 keeps all)")
    seed: int = setting(0, "random seed")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ...", default_text="cuda when available")
    out: str = setting("runs/pretrain", "output directory")
    resume: bool = setting(
        False,
        "continue from the newest intact checkpoint in --out (the model, data, objective, "
        "batch size, seed and palette must be the run's; other settings may change)",
    )
    cache_dir: str | None = setting(
        None, "token cache", default_text="$IGPT_CACHE or ~/.cache/igpt"
    )
    progress: bool | None = setting(
        None, "tqdm progress bars", default_text="when stderr is a terminal"
    )
    model_overrides: dict = setting({}, "IGPTConfig fields to override on the named size")
    init_from: str | None = setting(
        None,
        "start from this checkpoint's weights, architecture and "
        "palette (a file, a run directory or a transformers ImageGPT "
        "directory); the optimizer and schedule start afresh",
        flag="--checkpoint",
    )

    def __post_init__(self):
        self.betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("precision", PRECISIONS),
            ("augment", AUGMENTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # checked here, before data are read and a palette is fitted, not at the first step
        # (`--lr inf` would otherwise train and write NaN checkpoints)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            _check_int(self, name, 1)
        for name in ("checkpointing", "val_every", "keep_checkpoints", "seed"):
            _check_int(self, name, 0)
        for name, lo in (("warmup_steps", 0), ("val_size", 1), ("n_px", 1), ("n_colors", 1)):
            _check_int(self, name, lo, optional=True)
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps must be <= steps ({self.steps}), got {self.warmup_steps!r}"
                f"{_flag('warmup_steps')}"
            )
        _check_float(self, "lr", "> 0", lambda v: v > 0)
        _check_float(self, "weight_decay", ">= 0", lambda v: v >= 0)
        _check_float(self, "grad_clip", ">= 0 (0: off)", lambda v: v >= 0)
        _check_float(self, "mask_prob", "in (0, 1]", lambda v: 0 < v <= 1, "lie")
        _check_float(self, "val_frac", "in (0, 1)", lambda v: 0 < v < 1, "lie")
        b = self.betas
        if not (
            isinstance(b, tuple)
            and len(b) == 2
            and all(_is_real(x) and math.isfinite(x) and 0 <= x < 1 for x in b)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {b!r}{_flag('betas')}")
        for name in ("fsdp", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True, False or None (auto), got {self.progress!r}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict, got {self.model_overrides!r}")
        if self.n_px is None and self.init_from is None:
            self.n_px = self.data_defaults()["n_px"]
        if self.max_memory is not None:  # checked before any work, like the fields above
            try:
                parse_size(self.max_memory)
            except ValueError as e:
                raise ValueError(f"max_memory: {e}") from None

    def data_defaults(self) -> dict:
        """``n_px`` and ``n_colors`` for ``data`` when the config leaves them None."""
        return DATA_DEFAULTS.get(self.data, OTHER_DATA_DEFAULTS)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (what config.json and checkpoints hold)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config ``to_dict`` wrote (keys it does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _flag(name: str) -> str:
    return f" (--{name.replace('_', '-')})"


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(cfg, name: str, lo: int, *, optional: bool = False) -> None:
    """A ValueError unless ``cfg.<name>`` is an int >= ``lo`` (or None when optional)."""
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = "a positive int" if lo == 1 else f"an int >= {lo}"
        what = f"None or {what}" if optional else what
        raise ValueError(f"{name} must be {what}, got {v!r}{_flag(name)}")


def _check_float(cfg, name: str, want: str, ok, verb: str = "be") -> None:
    """A ValueError unless ``cfg.<name>`` is a finite number for which ``ok`` holds."""
    v = getattr(cfg, name)
    if not (_is_real(v) and math.isfinite(v) and ok(v)):
        text = f"a finite number {want}" if verb == "be" else want
        raise ValueError(f"{name} must {verb} {text}, got {v!r}{_flag(name)}")


def _init_config(init_from) -> IGPTConfig:
    """The model config of the checkpoint a run starts from (read without its tensors)."""
    path = resolve_checkpoint(init_from)
    return model_config(read_checkpoint(path, mmap=True), path)


def _init_checkpoint(cfg, palette) -> dict:
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


# ----------------------------------------------------------------------------- checkpointing


class _Recompute:
    """A block's forward that keeps no activations in training: the backward reruns it."""

    def __init__(self, forward):
        self.forward = forward  # the bound forward of the block (its parameters stay put)

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() and self.forward.__self__.training:
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def apply_checkpointing(model: IGPT, every: int) -> IGPT:
    """Activation checkpointing: blocks 0, k, 2k ... of ``model.transformer.h`` recompute
    their activations in the backward (k = ``every``; 0 turns it off again).

    The block's ``forward`` is replaced on the instance, so the module tree, the parameter
    names and the state dict keys do not change, and DDP / FSDP2 wrap the model as usual.
    Only training forwards with gradients recompute; evaluation runs as before.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"every must be an int >= 0, got {every!r}")
    for i, block in enumerate(model.transformer.h):
        block.__dict__.pop("forward", None)  # undo an earlier call
        if every and i % every == 0:
            block.forward = _Recompute(block.forward)
    return model


# ----------------------------------------------------------------------------- set-up


def _pick_device(want: str | None, d: Distributed) -> torch.device:
    """The run's device: ``want``, or CUDA when available; a process's own GPU under torchrun."""
    device = torch.device(want or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={want!r} but CUDA is not available; use --device cpu")
        if d.world > 1 and device.index is None:
            device = torch.device("cuda", d.local_rank)
    return device


def _check_resumable(cfg: TrainConfig, path: Path, ckpt: dict) -> None:
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
    if diff:
        raise ValueError(
            f"cannot resume {cfg.out} from {path.name}: it was trained with other settings "
            f"({'; '.join(diff)}); pass the run's values, or start a new run in another --out"
        )
    step = int(ckpt["step"])
    if step > cfg.steps:
        raise ValueError(
            f"cannot resume {cfg.out}: {path.name} is at step {step}, past steps={cfg.steps}; "
            f"pass --steps {step} or more"
        )
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


def _warmup_steps(cfg: TrainConfig, ckpt: dict | None, n_train: int) -> int:
    """``cfg.warmup_steps``, else the resumed run's own (never repeated), else one epoch
    but at most 10% of the steps (and at least 1)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    epoch = max(1, n_train // cfg.batch_size)
    if ckpt is not None:  # checkpoints before "warmup" was saved: the rule at their steps
        planned = TrainConfig.from_dict(ckpt["train_config"]).steps
        return int(ckpt.get("warmup", max(1, min(epoch, planned // 10))))
    return max(1, min(epoch, cfg.steps // 10))


def _apply_resumed_settings(cfg: TrainConfig, optimizer, scheduler, step: int) -> None:
    """After a restore, ``cfg``'s lr, betas and weight decay (the optimizer's state brought
    back the old run's, the scheduler its peak lr) from ``step`` on, on the schedule planned
    for ``cfg.steps``: the same numbers, bit for bit, when nothing changed."""
    plan = scheduler.lr_lambdas[0]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for g in optimizer.param_groups:
        g.update(initial_lr=cfg.lr, lr=cfg.lr * plan(step), betas=cfg.betas)
        g["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _check_architecture(path: Path, ckpt: dict, mcfg: IGPTConfig) -> None:
    """A ValueError naming the fields in which the run's model differs from the checkpoint's."""
    diff = architecture_differences(path, ckpt, mcfg)
    if diff:
        raise ValueError(
            f"cannot resume from {path}: it holds another architecture ({'; '.join(diff)}); "
            "pass the run's --model and --n-px, or use another --out"
        )


def _run_palette(cfg: TrainConfig, run: RunDir, d: Distributed, palette, ckpt, data):
    """The palette of a run: the checkpoint's, the one given, ``cfg.palette``, or a fit."""
    from igpt.data import holdout_split, load_images, resize
    from igpt.palette import Palette, fit_palette

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
        images = data.images if data is not None else load_images(cfg.data).images
        # the training part only: the hold-out must not shape the tokens it is scored on
        images = images[holdout_split(len(images), cfg.val_frac, seed=0)[0]]
        sample = images[np.random.default_rng(cfg.seed).permutation(len(images))[:4096]]
        log.info("fitting a %d-colour palette on %d images", k, len(sample))
        fit_palette(resize(sample, cfg.n_px), k=k, seed=cfg.seed).save(path)
    d.barrier()
    return Palette.load(path)


def _run_data(cfg: TrainConfig, d: Distributed, palette, data):
    """(GlobalBatches, val_idx, val_tokens): a uint16 token memmap (or images to augment),
    split 90/10 with the hold-out capped at ``val_size``; validation is never augmented."""
    from igpt.data import cached_tokens, holdout_split, load_images, tokenize

    if cfg.augment != "none":
        images = (data or load_images(cfg.data)).images
        source = ImageSource(images, palette, cfg.n_px, _augmentation(cfg))
    elif data is not None:
        source = TokenSource(tokenize(data.images, palette, cfg.n_px).numpy())
    else:
        cache = functools.partial(
            cached_tokens, cfg.data, "train", palette, cfg.n_px, cache_dir=cfg.cache_dir
        )
        if d.is_main:  # rank 0 fills the cache, the others then only map it
            cache()
        d.barrier()
        source = TokenSource(cache()[0])
    train_idx, val_idx = holdout_split(len(source), cfg.val_frac, seed=0)
    if len(train_idx) == 0:
        raise ValueError(f"data {cfg.data!r} has no training images after the hold-out")
    val_idx = val_idx if cfg.val_size is None else val_idx[: cfg.val_size]
    batches = GlobalBatches(source, train_idx, cfg.batch_size, seed=cfg.seed)
    return batches, val_idx, source.plain(val_idx)


def _augmentation(cfg: TrainConfig):
    from igpt.data import pad_crop_flip, random_resized_crop

    if cfg.augment == "cifar":
        return pad_crop_flip
    return functools.partial(random_resized_crop, n_px=cfg.n_px)


def _run_model(cfg: TrainConfig, n_colors: int, init_cfg, init, device, resume=None) -> IGPT:
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
        _check_architecture(*resume, mcfg)
    model = IGPT(mcfg)
    if init is not None:
        load_weights(model, init, resolve_checkpoint(cfg.init_from))
        log.info("starting from the weights of %s", resolve_checkpoint(cfg.init_from))
    return apply_checkpointing(model.to(device), cfg.checkpointing)


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
        init_cfg = _init_config(config.init_from) if config.init_from is not None else None
        if config.n_px is None:  # the image size comes with the weights
            config = dataclasses.replace(config, n_px=init_cfg.n_px)
        self.cfg = cfg = config
        self.dist = d = Distributed(cfg.device, fsdp=cfg.fsdp)
        if cfg.batch_size % (d.world * cfg.grad_accum):
            raise ValueError(
                f"batch_size {cfg.batch_size} must divide by world_size * grad_accum = "
                f"{d.world} * {cfg.grad_accum}"
            )
        self.micro = cfg.batch_size // (d.world * cfg.grad_accum)
        self.device = _pick_device(cfg.device, d)
        self.amp = cfg.precision == "bf16" or (cfg.precision, self.device.type) == ("auto", "cuda")
        # bf16 autocast over fp32 master weights
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)
        self.run = RunDir(cfg.out, is_main=d.is_main)
        d.barrier()
        found = self.run.resume_checkpoint(cfg.resume)
        resume_from, ckpt = found if found is not None else (None, None)
        if ckpt is not None:
            _check_resumable(cfg, resume_from, ckpt)
        init = _init_checkpoint(cfg, palette) if ckpt is None and init_cfg is not None else None
        self.palette = _run_palette(cfg, self.run, d, palette, ckpt or init, data)
        self.batches, self.val_idx, self.val_tokens = _run_data(cfg, d, self.palette, data)
        self.raw_model = _run_model(cfg, len(self.palette), init_cfg, init, self.device, found)
        self.memory = TrainMemory(self)  # --max-memory's plan: sets cfg, micro, checkpointing
        self.model = d.wrap(self.raw_model, self.device, bf16=self.amp)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused
        )
        self.warmup = _warmup_steps(cfg, ckpt, len(self.batches.train_idx))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(cfg.steps, self.warmup)
        )
        self.step = self.skipped = 0
        if ckpt is not None:
            self._restore(ckpt)
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.run.truncate_metrics(self.step)
        self._write_config()

    # -- training -------------------------------------------------------------------------

    def loss_sum(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch (mask None: AR, else BERT)."""
        with self.autocast, self.memory.offload(self):
            logits = self.model(tokens, bert_mask=mask)
            return generative_loss(logits, tokens, mask, reduction="sum")

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of ``step``. Returns its statistics."""
        cfg, d, n = self.cfg, self.dist, self.cfg.n_px * self.cfg.n_px
        mask = self.batches.mask(step, n, cfg.mask_prob) if cfg.objective == "bert" else None
        denom = max(float(mask.sum()) if mask is not None else float(cfg.batch_size * n), 1.0)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in range(cfg.grad_accum):
            lo = d.rank * (cfg.batch_size // d.world) + m * self.micro
            rows = slice(lo, lo + self.micro)
            tokens = self.batches.tokens(step, rows).to(self.device, non_blocking=True)
            mb_mask = None if mask is None else mask[rows].to(self.device, non_blocking=True)
            with d.sync(self.model, m == cfg.grad_accum - 1):
                s = self.loss_sum(tokens, mb_mask)
                # DDP/FSDP average gradients over ranks; scaling by world makes the result
                # the gradient of (global summed loss / global count).
                (s * (d.world / denom)).backward()
            total += s.detach().double()
        loss = d.all_reduce(total).item() / denom
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        grad_norm = float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.skipped += 1
            log.warning(
                "step %d: non-finite loss %s / grad norm %s; step skipped (%d so far)",
                *(step, loss, grad_norm, self.skipped),
            )
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped_step": not finite}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Hold-out ``val_loss`` (nats per token), ``val_bits_per_token`` (nats / ln 2) and
        ``val_bits_per_dim`` (per sub-pixel, a third: ``CHANNELS``). BERT uses a fixed mask
        (seeded) so evaluations are comparable across steps."""
        from tqdm.auto import tqdm

        cfg, d, V = self.cfg, self.dist, len(self.val_tokens)
        if V == 0:
            return {}
        n = self.val_tokens.shape[1]
        val_mask = MaskRows((V, n), cfg.mask_prob, seed=(cfg.seed, 4))
        was_training = self.model.training
        self.model.eval()
        bs = max(1, self.micro)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        show = d.is_main and progress_enabled(cfg.progress)
        for b in tqdm(range(math.ceil(V / (bs * d.world))), "validation", disable=not show):
            lo = (b * d.world + d.rank) * bs
            hi, weight = min(lo + bs, V), 1.0
            if lo >= V:  # every rank must run the same forwards (FSDP)
                lo, hi, weight = 0, 1, 0.0
            tokens = self.val_tokens[lo:hi].to(self.device)
            mask = val_mask(lo, hi).to(self.device) if cfg.objective == "bert" else None
            s = self.loss_sum(tokens, mask).double()
            count = float(mask.sum()) if mask is not None else float(tokens.numel())
            total += torch.stack([s, s.new_tensor(count)]) * weight
        d.all_reduce(total)
        self.model.train(was_training)
        nats = (total[0] / total[1].clamp(min=1)).item()
        bits = nats / math.log(2)
        return {"val_loss": nats, "val_bits_per_token": bits, "val_bits_per_dim": bits / CHANNELS}

    def fit(self) -> dict:
        """Train from ``self.step`` to ``cfg.steps``; returns the final metrics."""
        with logging_redirect_tqdm():  # log lines above the bar, not glued onto it
            return self._fit()

    def _fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.model.train()
        desc = f"pretrain {cfg.model} {cfg.objective}"
        show = self.dist.is_main and progress_enabled(cfg.progress)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, disable=not show)
        window, t_last = [], time.perf_counter()
        # the rows logged up to the step we start from: a run resumed when already finished
        # still reports its final loss and validation loss (lr_search compares them)
        last = {k: v for row in self.run.read_metrics() for k, v in row.items()}
        while self.step < cfg.steps:
            stats = self.memory.step(self)  # train_step, redone under a smaller plan after OOM
            self.step += 1
            window.append(stats["loss"])
            bar.update(1)
            evaluate = self.step == cfg.steps or (cfg.val_every and self.step % cfg.val_every == 0)
            checkpoint = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
            # Validation and checkpoint steps are log steps too: every metrics.jsonl row then
            # carries `loss`, and a run resumed from a checkpoint averages the same windows.
            if self.step % cfg.log_every == 0 or evaluate or checkpoint:
                now = time.perf_counter()
                row = self._row(stats, window, now - t_last)
                window, t_last = [], now
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                row.update(self.evaluate() if evaluate else {})
                row.update(self.memory.metrics())
                last.update(row)
                self._log(row)
            if checkpoint:
                self.save()
        bar.close()
        self.plot()
        summary = {"step": self.step, "skipped": self.skipped, "out": str(self.run.path), **last}
        self.run.write_json("summary.json", summary)
        return summary

    # -- bookkeeping ----------------------------------------------------------------------

    def _row(self, stats: dict, window: list, seconds: float) -> dict:
        tokens = self.cfg.batch_size * self.cfg.n_px**2 * len(window)
        return {
            "step": self.step,
            "loss": float(np.mean(window)),
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "skipped": self.skipped,
            "tokens_per_s": tokens / max(seconds, 1e-9),
        }

    def _log(self, row: dict) -> None:
        self.run.append_metrics([row])
        if "val_loss" in row and self.dist.is_main:
            keys = ("step", "val_loss", "val_bits_per_token", "val_bits_per_dim")
            log.info(VAL_LINE, *map(row.get, keys))

    def _write_config(self) -> None:
        conf = {
            "train": self.cfg.to_dict(),
            "model": self.raw_model.config.to_dict(),
            "world_size": self.dist.world,
            "warmup_steps": self.warmup,
            "n_train": int(len(self.batches.train_idx)),
            "n_val": int(len(self.val_idx)),
            "palette_colors": len(self.palette),
            "torch": torch.__version__,
        }
        self.run.write_json("config.json", conf)
        if self.dist.is_main:
            self.palette.save(self.run.path / "palette.npy")

    def save(self) -> Path | None:
        """Write ``ckpt_<step>.pt`` atomically (rank 0) and prune old ones."""
        d = self.dist
        model_sd, optim_sd = d.state_dicts(self.model, self.raw_model, self.optimizer)
        state = checkpoint_state(
            self.raw_model,
            step=self.step,
            palette=self.palette,
            state_dict=model_sd,
            optimizer=optim_sd,
            scheduler=self.scheduler.state_dict(),
            rng=rng_state(),
            train_config=self.cfg.to_dict(),
            objective=self.cfg.objective,
            skipped=self.skipped,
            warmup=self.warmup,
            optimizer_format=d.optimizer_format,
        )
        path = self.run.save_checkpoint(state, self.step, keep=self.cfg.keep_checkpoints)
        self.plot()
        d.barrier()
        return path if d.is_main else None

    def _restore(self, ckpt: dict) -> None:
        self.dist.load_state_dicts(self.model, self.raw_model, self.optimizer, ckpt)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.skipped = int(ckpt.get("skipped", 0))
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        _apply_resumed_settings(self.cfg, self.optimizer, self.scheduler, self.step)

    def plot(self) -> Path | None:
        """Write ``loss_curve.png`` (train and validation loss against step)."""
        cfg = self.cfg
        series = [("loss", "train"), ("val_loss", "validation")]
        title = f"{cfg.model} {cfg.objective} on {cfg.data}"
        return self.run.plot("loss_curve.png", [("loss (nats / token)", series)], title=title)

    def close(self) -> None:
        """Destroy the process group if this trainer created it."""
        self.dist.close()


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
