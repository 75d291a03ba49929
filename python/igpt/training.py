"""What pre-training (``igpt.train``) and fine-tuning (``igpt.finetune``) share: one policy each.

    device = resolve_device(cfg.device, local_rank=d.local_rank if d.world > 1 else None)
    amp = uses_bf16(cfg.precision, device)          # bf16 autocast over fp32 master weights
    dtype = amp_dtype(cfg.precision, device)        # bf16, fp16 or None (fp32)
    with autocast(device, dtype is not None, dtype): loss = ...
    scaler = grad_scaler(dtype, device)               # fp16's loss scaling (else a no-op)
    forward = Compiled(model, cfg.compile)             # torch.compile, eager where it fails
    guard = NonFiniteGuard()                          # skip and count a non-finite step
    if guard.check(step, loss, grad_norm, lr): optimizer.step()
    finite, grad_norm = guarded_step(optimizer, scaler, guard, params, step=s, loss=l, clip=c)
    found = open_resume(run, cfg.resume, check)       # the resume check, one message
    restore_optimizer_settings(optimizer, lr=..., betas=..., weight_decay=..., factor=...)

Both trainers resolve the device the same way (a name, or CUDA when visible; under torchrun
a process's own GPU), read the mixed precision from their config (``PRECISIONS``), skip a
step whose loss or gradient norm is not finite and count it (and give up, naming the
learning rate, after ``NONFINITE_LIMIT`` such steps in a row), refuse a resume whose fixed
settings differ with one message that names each, and, after restoring an optimizer's
state, put back the run's own lr, betas and weight decay (the state brought back the old
run's).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

__all__ = [
    "PRECISIONS",
    "NONFINITE_LIMIT",
    "NonFiniteGuard",
    "resolve_device",
    "uses_bf16",
    "amp_dtype",
    "autocast",
    "grad_scaler",
    "guarded_step",
    "mixed_precision",
    "Compiled",
    "open_resume",
    "refuse_resume",
    "restore_optimizer_settings",
]

log = logging.getLogger(__name__)

# fp16: autocast in float16 with a gradient scaler, for GPUs without bf16 (V100, T4)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# non-finite steps in a row after which a run stops: a few are the loss spikes of appendix A,
# this many say the learning rate is too high (or the weights are broken)
NONFINITE_LIMIT = 10


def resolve_device(want: str | None, *, local_rank: int | None = None) -> torch.device:
    """The device a run trains on: ``want`` ("cpu", "cuda", "cuda:1"), or (None) CUDA when a
    GPU is visible, else the CPU. ``local_rank`` (under torchrun) picks the process's own GPU
    when ``want`` names no index. A ValueError names ``device`` when it does not exist here.
    """
    if want is None:
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(want)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"--device {want!r} is not a device name igpt runs on; use cpu, cuda or cuda:N"
        )
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"--device {want!r} but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {want!r} but only {n} CUDA GPU(s) are visible")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` runs on ``device``: "auto" bf16 on CUDA and None
    (fp32) on the CPU, "bf16" and "fp16" theirs, "fp32" None."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision, device.type) == ("auto", "cuda"):
        return torch.bfloat16
    return None


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` ("auto": bf16 on CUDA, fp32 on the CPU; "bf16"; "fp16";
    "fp32") runs bf16 autocast on ``device``."""
    return amp_dtype(precision, device) == torch.bfloat16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
    """Autocast in ``dtype`` (default bf16) on ``device`` over fp32 master weights (a no-op
    when not ``enabled``)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=enabled)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for training in ``dtype`` on ``device``: enabled for fp16
    only (fp16 gradients underflow without loss scaling; bf16 and fp32 need none). A step
    whose scaled gradients overflow is skipped by the scaler, which halves its scale."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


class NonFiniteGuard:
    """The non-finite policy of both trainers: a step whose loss or gradient norm is not
    finite is skipped (no optimizer step) and counted; ``limit`` of them in a row raise
    FloatingPointError naming the learning rate."""

    def __init__(self, skipped: int = 0, *, limit: int = NONFINITE_LIMIT):
        self.skipped, self.limit, self.in_a_row = skipped, limit, 0

    def check(self, step: int, loss: float, grad_norm: float, lr: float) -> bool:
        """True when the step may be taken; else counts it, warns, and (at the limit) raises."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        log.warning(
            "step %d: non-finite loss %s / grad norm %s; step skipped (%d so far)",
            *(step, loss, grad_norm, self.skipped),
        )
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"the loss or gradient was not finite in {self.in_a_row} steps in a row (up to "
                f"step {step}); lower the learning rate (now {lr:g}) or check the weights"
            )
        return False


def mixed_precision(precision: str, device: torch.device):
    """``(autocast context, GradScaler)`` of ``precision`` on ``device`` (``amp_dtype``):
    the scaler is enabled for fp16 only, a no-op otherwise."""
    dtype = amp_dtype(precision, device)
    return autocast(device, dtype is not None, dtype), grad_scaler(dtype, device)


def _compile_failures() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile here (no C++ compiler, a backend
    that fails), as opposed to an error of the model's own."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError
    from torch._inductor.exc import InductorError

    return BackendCompilerFailed, InternalTorchDynamoError, InductorError


class Compiled:
    """``module`` called through ``torch.compile`` (``enabled``), or as it is.

    Our kernels are ``torch.library`` custom ops, so they stay in the graph as one node per
    call. Where compile cannot run (``torch.compile`` refuses this Python or platform, or
    its first call fails to compile: no C++ compiler, a backend error), a warning says why
    and every call runs eagerly from then on. ``compile_seconds``: the first call's time.
    """

    def __init__(self, module, enabled: bool):
        self.eager, self.compiled, self.compile_seconds = module, None, None
        if enabled:
            try:
                self.compiled = torch.compile(module)
            except RuntimeError as e:  # e.g. a Python that Dynamo does not support yet
                self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        lines = str(e).strip().splitlines()
        log.warning(
            "--compile: torch.compile cannot run here (%s: %s); training without it",
            *(type(e).__name__, lines[0] if lines else "no message"),
        )
        self.compiled = None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.compile_seconds is not None:
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except _compile_failures() as e:
            self._fall_back(e)
            return self.eager(*args, **kwargs)
        self.compile_seconds = time.perf_counter() - start
        log.info("--compile: the first call compiled in %.1f s", self.compile_seconds)
        return out


def guarded_step(optimizer, scaler, guard, parameters, *, step: int, loss: float, clip: float):
    """The end of a training step in both trainers, after the (scaled) backward: unscale the
    gradients, clip their norm to ``clip`` (0 or None: measure only), let ``guard`` judge it,
    step the optimizer through ``scaler`` and update its scale. Gradients that overflowed
    under fp16 are the scaler's to skip (it lowers its scale), not a non-finite step of the
    guard's. Returns ``(taken by the guard, gradient norm)``."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip else float("inf"))
    norm = float(getattr(norm, "full_tensor", lambda: norm)())  # a DTensor under FSDP2
    overflow = scaler.is_enabled() and not math.isfinite(norm)
    finite = guard.check(step, loss, 0.0 if overflow else norm, optimizer.param_groups[0]["lr"])
    if finite:
        scaler.step(optimizer)
    scaler.update()
    return finite, norm


def open_resume(run, resume: bool, check) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from: ``run.resume_checkpoint(resume)`` (None: start at
    step 0), passed to ``check(path, ckpt)`` (which raises when it may not be resumed)."""
    found = run.resume_checkpoint(resume)
    if found is not None:
        check(*found)
    return found


def refuse_resume(out, path, diff: list[str], step: int, steps: int) -> None:
    """The resume check's verdict: a ValueError naming each setting in ``diff`` (``"name
    X there, Y now"``) that the checkpoint at ``path`` was trained with, or its ``step`` past
    this run's ``steps``."""
    name = Path(path).name
    if diff:
        raise ValueError(
            f"cannot resume {out} from {name}: it was trained with other settings "
            f"({'; '.join(diff)}); pass the run's values, or start a new run in another --out"
        )
    if step > steps:
        raise ValueError(
            f"cannot resume {out}: {name} is at step {step}, past steps={steps}; "
            f"pass --steps {step} or more"
        )


def restore_optimizer_settings(
    optimizer, *, lr, betas, weight_decay: float, factor: float = 1.0
) -> None:
    """After ``optimizer.load_state_dict``: this run's ``lr`` (one for every group, or one
    per group; times the schedule's ``factor`` at the resume step), ``betas`` and
    ``weight_decay`` on every group, and ``initial_lr`` (the schedule's peak), replacing the
    old run's that the state brought back."""
    groups = optimizer.param_groups
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(groups)
    if len(lrs) != len(groups):
        raise ValueError(f"lr has {len(lrs)} rates for {len(groups)} parameter groups")
    for g, rate in zip(groups, lrs, strict=True):
        g.update(initial_lr=rate, lr=rate * factor, betas=tuple(betas), weight_decay=weight_decay)
