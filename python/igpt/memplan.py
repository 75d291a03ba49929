"""The trainer's side of ``igpt.memory``: ``--max-memory``, ``--offload-activations``, the
predicted-against-measured peak, and the step back to a smaller plan after an OOM.

    memory = TrainMemory(cfg, model.config, dist=d, device=device, amp=amp, run=run)
    trainer.apply_memory(memory.settings)      # the trainer applies what the plan says
    p = memory.next_plan()                     # after an OOM: the next smaller plan, or None
    trainer.apply_memory(memory.adopt(p, step=s))
    memory.check_peak(step, steps)             # the predicted against the measured peak
    apply_checkpointing(model, every)          # recompute every k-th block in the backward

With ``max_memory`` set, ``igpt.memory.plan`` picks the fastest micro-batch x accumulation,
checkpointing and activation offload (and FSDP under torchrun) whose predicted peak fits;
``TrainMemory.settings`` says which ``grad_accum``, ``checkpointing`` and
``offload_activations`` to run, and the trainer applies them itself (its ``cfg`` then holds
the resolved values, and so does ``config.json``; the global batch does not change).
``offload_activations`` alone offloads with the settings given.

On CUDA the peak is checked: ``torch.cuda.max_memory_allocated`` is reset after the first
step (Adam's state is allocated and Triton autotunes then) and read after the third; the
log, the next metrics row and ``memory.json`` in the run directory show it beside the
prediction. On the CPU nothing is measured (one log line says so).

After ``torch.cuda.OutOfMemoryError`` in a step, the gradients are dropped, the cache is
emptied, and the step is redone under the next plan: ``plan(..., memory_bytes=peak - 1)``,
the fastest whose predicted peak is strictly smaller (same FSDP choice: the model is
wrapped already). Nothing of the step is lost: its batch is a function of (seed, step), and
the optimizer, scheduler and counters move only when a step completes. Bit-reproducible
means: two runs with the same plan give the same bits; a run that stepped back matches,
bit for bit, a run that switched to the new plan's settings at the same step, but not a run
that used either plan throughout, since another accumulation split sums the gradient in
another order (float addition is not associative), and so do the steps after it. The step
back is per process: under torchrun a rank that does not hit the error waits in the
collective, so it serves one GPU (or ranks that all run out together). A resumed run plans
afresh from ``max_memory``; to resume a run that stepped back bit for bit, pass the
settings its ``memory.json`` records (``--grad-accum``, ``--checkpointing``, offload).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import checkpoint

from igpt.memory import Plan, format_size, parse_size, plan
from igpt.model import IGPT

log = logging.getLogger(__name__)

__all__ = ["TrainMemory", "apply_checkpointing", "nothing_fits_message"]

RESET_AFTER = 1  # steps of this plan after which the peak statistics are reset
MEASURE_AFTER = 3  # ... and after which the peak is read (steps 2 and 3 measured)


def nothing_fits_message(p: Plan, max_memory) -> str:
    """The ValueError text when no plan fits: the smallest plan's peak and what would fit."""
    fmt = format_size
    msg = (
        f"max_memory {max_memory!r}: no plan fits {fmt(p.memory_bytes)} per GPU on "
        f"{p.gpus} GPU(s); the smallest ({p.describe()}) needs {fmt(p.needed_bytes)}"
    )
    if p.needed_gpus:
        msg += f", or {p.needed_gpus} GPUs of {fmt(p.memory_bytes)}"
    return msg + "; raise --max-memory, lower --batch-size or train on more GPUs"


class TrainMemory:
    """A trainer's memory settings: the plan it runs (None without ``max_memory``), the
    settings that plan asks for, the peak check and the next plan after an OOM.

    Building it plans from ``cfg`` (a ``TrainConfig``) and ``model_config``; it changes
    nothing of the trainer: ``settings`` holds ``grad_accum``, ``checkpointing`` and
    ``offload_activations`` (and ``fsdp``: whether the plan shards), for the trainer to
    apply. Raises ValueError when nothing fits.
    """

    def __init__(self, cfg, model_config, *, dist, device, amp: bool, run):
        self.device, self.run = device, run
        cpu_fp32 = device.type == "cpu" and not amp
        self.options = dict(
            batch_size=cfg.batch_size,
            gpus=dist.world,
            objective=cfg.objective,
            # the CPU's reference path is modelled in fp32 only; bf16 anywhere as on CUDA
            precision="fp32" if not amp else "bf16",
            device="cpu" if cpu_fp32 else "cuda",
            mask_prob=cfg.mask_prob,
        )
        self.config = model_config
        self.plan = self.plans = None
        self._steps, self._pending = 0, {}
        self._asked_offload = cfg.offload_activations  # --offload-activations: on in every plan
        keys = ("grad_accum", "checkpointing", "offload_activations")
        self.settings = {k: getattr(cfg, k) for k in keys} | {"fsdp": False}
        if cfg.max_memory is None:
            return
        if cfg.grad_accum != 1 or cfg.checkpointing:
            log.warning("--max-memory: the plan replaces --grad-accum and --checkpointing")
        p = plan(
            self.config,
            memory_bytes=parse_size(cfg.max_memory),
            fsdp=True if cfg.fsdp and dist.world > 1 else None,
            **self.options,
        )
        if not p.fits:
            raise ValueError(nothing_fits_message(p, cfg.max_memory))
        self.plans = []
        self.adopt(p, step=None)  # None: from the start (or the resumed step)
        if device.type != "cuda":
            log.info("the peak memory check needs CUDA: on %s only the plan is applied", device)

    def adopt(self, p: Plan, *, step: int | None) -> dict:
        """Make ``p`` the plan from ``step`` on (and record it); returns its ``settings``."""
        self.plan = p
        self.settings = {
            "grad_accum": p.accumulation,
            "checkpointing": p.checkpointing,
            "offload_activations": p.offload or self._asked_offload,
            "fsdp": p.fsdp,
        }
        self.plans.append({"from_step": step, **_plan_row(p)})
        self._steps = 0
        log.info("memory plan from %s: %s (predicted)", _when(step), p.describe())
        self._write()
        return self.settings

    def next_plan(self) -> Plan | None:
        """The fastest plan with a strictly smaller predicted peak (same FSDP choice), or
        None (without ``max_memory``, or when none fits)."""
        if self.plan is None:
            return None
        p = plan(
            self.config,
            memory_bytes=self.plan.predicted_peak_bytes - 1,
            fsdp=self.plan.fsdp,
            **self.options,
        )
        return p if p.fits else None

    def check_peak(self, step: int, steps: int) -> None:
        """After the plan's step ``step`` (0-based) of a ``steps``-step run: reset the peak
        after the plan's first step, read it after its third (or at the run's last step,
        when that comes sooner)."""
        self._steps += 1
        if self.plan is None or self.device.type != "cuda" or "measured" in self.plans[-1]:
            return
        final = step + 1 >= steps
        if self._steps == RESET_AFTER and not final:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._steps >= MEASURE_AFTER or final:
            measured = torch.cuda.max_memory_allocated(self.device)
            predicted = self.plan.predicted_peak_bytes
            self.plans[-1]["measured"] = {"peak_bytes": measured, "steps": self._steps}
            self._pending = {"predicted_peak_bytes": predicted, "measured_peak_bytes": measured}
            log.info(
                "peak memory: predicted %s, measured %s (measured / predicted %.3f)",
                *(format_size(predicted), format_size(measured)),
                measured / predicted,
            )
            self._write()

    def metrics(self) -> dict:
        """The measured and predicted peak, once, for the next metrics row (else {})."""
        out, self._pending = self._pending, {}
        return out

    def _write(self) -> None:
        self.run.write_json("memory.json", {"plans": self.plans, **self.options})


def _when(step: int | None) -> str:
    return "the start" if step is None else f"step {step}"


def _plan_row(p: Plan) -> dict:
    keys = ("micro_batch", "accumulation", "checkpointing", "recomputed", "offload", "fsdp")
    return {**{k: getattr(p, k) for k in keys}, "predicted_peak_bytes": p.predicted_peak_bytes}


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
