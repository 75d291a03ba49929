"""The settings of a pre-training run: ``TrainConfig`` (saved as the run's ``config.json``).

    cfg = TrainConfig(model="igpt-tiny", data="digits", steps=500, out="runs/digits")
    cfg = TrainConfig.from_dict(json.loads(Path("runs/digits/config.json").read_text())["train"])

Every value is checked when the config is built (a ValueError naming the field and its
flag), before data are read or a palette is fitted. ``setting`` declares a field with its
``igpt`` flag's help, so the command line and the library state each default once;
``progress_enabled`` is the rule for tqdm bars that every command follows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from igpt.config import SIZES
from igpt.data.base import Source
from igpt.data.sources import SOURCES, data_defaults, specs_text
from igpt.memory import parse_size
from igpt.objectives import MASK_PROB, OBJECTIVES
from igpt.trackers import REPORT_TO
from igpt.training import PRECISIONS

__all__ = [
    "TrainConfig",
    "RESUME_FIXED",
    "AUGMENTS",
    "CHECKPOINT_FORMATS",
    "PRECISIONS",
    "DATA_DEFAULTS",
    "OTHER_DATA_DEFAULTS",
    "setting",
    "progress_enabled",
]

AUGMENTS = ("none", "crop", "cifar")
# how checkpoints are written: "full" one gathered file (rank 0), "sharded" a
# torch.distributed.checkpoint directory (each rank its shards), "auto" sharded under FSDP
CHECKPOINT_FORMATS = ("auto", "full", "sharded")
PROBE_KINDS = ("linear", "knn", "attentive")
# n_px and the palette size when a config leaves them None (the grey digits need 16 colours)
# each data kind's own (its Source's ``defaults``, igpt.data.sources), and the general ones
DATA_DEFAULTS = {kind: dict(source.defaults) for kind, source in SOURCES.items()}
OTHER_DATA_DEFAULTS = dict(Source.defaults)
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
    data: str = setting("digits", specs_text())
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
        "auto",
        "auto: bf16 autocast on CUDA, fp32 on the CPU; fp16: float16 autocast with a gradient "
        "scaler, for GPUs without bf16 (V100, T4)",
        choices=PRECISIONS,
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
    dataloader_num_workers: int = setting(
        0,
        "processes that make each step's batch ahead of it (torch DataLoader; 0: inline); the "
        "batches are the same, bit for bit",
    )
    dataloader_pin_memory: bool = setting(True, "pin the batches for the copy to the GPU")
    dataloader_prefetch_factor: int | None = setting(
        None, "batches each worker makes ahead", default_text="2 with workers"
    )
    report_to: str = setting(
        "none",
        "also send the metrics.jsonl rows to tensorboard (<out>/tensorboard) or wandb "
        '(main process; pip install "igpt[tensorboard]" / "igpt[wandb]")',
        choices=REPORT_TO,
    )
    compile: bool = setting(
        False,
        "train through torch.compile (our kernels stay custom ops in the graph); where it "
        "cannot run, a warning says why and training goes on eagerly",
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
    checkpoint_format: str = setting(
        "auto",
        "full: one ckpt_N.pt gathered on rank 0; sharded: a ckpt_N.dcp directory in which each "
        "rank writes and reads only its shards (torch.distributed.checkpoint); auto: sharded "
        "under --fsdp",
        choices=CHECKPOINT_FORMATS,
    )
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
    # probing while pretraining (igpt.train_probe): figure 3 from the run's own metrics
    probe_every: int = setting(
        0,
        "validate and probe every N steps (0: off): probe rows in metrics.jsonl and "
        "probe_vs_loss.png (figure 3)",
    )
    probe_data: str | None = setting(None, "labelled data the probe samples", default_text="--data")
    probe_layers: tuple[int, ...] | None = setting(
        None, "layers the probe reads", default_text="L/4 L/2 3L/4 L"
    )
    probe_size: int = setting(512, "training images the probe fits on (half as many score it)")
    probe_kind: str = setting(
        "linear", "the probe run while pretraining", choices=PROBE_KINDS, flag="--probe"
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
            ("model", tuple(SIZES)),
            ("objective", OBJECTIVES),
            ("precision", PRECISIONS),
            ("augment", AUGMENTS),
            ("checkpoint_format", CHECKPOINT_FORMATS),
            ("report_to", REPORT_TO),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # checked here, before data are read and a palette is fitted, not at the first step
        # (`--lr inf` would otherwise train and write NaN checkpoints)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            _check_int(self, name, 1)
        for name in ("checkpointing", "val_every", "keep_checkpoints", "seed", "probe_every"):
            _check_int(self, name, 0)
        for name in ("dataloader_num_workers",):
            _check_int(self, name, 0)
        _check_int(self, "probe_size", 4)
        if self.probe_kind not in PROBE_KINDS:
            raise ValueError(
                f"probe_kind must be one of {PROBE_KINDS}, got {self.probe_kind!r} (--probe)"
            )
        if self.probe_layers is not None:
            self.probe_layers = tuple(self.probe_layers)
        for name, lo in (("warmup_steps", 0), ("val_size", 1), ("n_px", 1), ("n_colors", 1)):
            _check_int(self, name, lo, optional=True)
        for name, lo in (("dataloader_prefetch_factor", 1),):
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
        for name in ("fsdp", "resume", "compile", "dataloader_pin_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.precision == "fp16" and self.fsdp:
            raise ValueError(
                "precision 'fp16' (--precision) does not run under --fsdp (its gradient scaler "
                "is not sharded); use --precision bf16 or fp32 with --fsdp, or DDP with fp16"
            )
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
        return data_defaults(self.data)

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
