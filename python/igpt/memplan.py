"""The trainer's side of ``igpt.memory``: ``--max-memory``, ``--offload-activations``, the
predicted-against-measured peak, and the step back to a smaller plan after an OOM.

    memory = TrainMemory(trainer)     # plans, and applies the plan to the trainer's settings
    with memory.offload(): loss = forward_and_loss(...)     # backward outside it
    stats = memory.step(trainer)      # train_step, redone under the next plan after an OOM

With ``max_memory`` set, ``igpt.memory.plan`` picks the fastest micro-batch x accumulation,
checkpointing and activation offload (and FSDP under torchrun) whose predicted peak fits;
the trainer then runs ``grad_accum``, ``checkpointing`` and ``offload_activations`` as the
plan says (its ``cfg`` holds the resolved values, and so does ``config.json``; the global
batch does not change). ``offload_activations`` alone offloads with the settings given.

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

import dataclasses
import logging

import torch

from igpt import memory

log = logging.getLogger(__name__)

__all__ = ["TrainMemory", "nothing_fits_message"]

RESET_AFTER = 1  # steps of this plan after which the peak statistics are reset
MEASURE_AFTER = 3  # ... and after which the peak is read (steps 2 and 3 measured)


def nothing_fits_message(p: memory.Plan, max_memory) -> str:
    """The ValueError text when no plan fits: the smallest plan's peak and what would fit."""
    fmt = memory.format_size
    msg = (
        f"max_memory {max_memory!r}: no plan fits {fmt(p.memory_bytes)} per GPU on "
        f"{p.gpus} GPU(s); the smallest ({p.describe()}) needs {fmt(p.needed_bytes)}"
    )
    if p.needed_gpus:
        msg += f", or {p.needed_gpus} GPUs of {fmt(p.memory_bytes)}"
    return msg + "; raise --max-memory, lower --batch-size or train on more GPUs"


class TrainMemory:
    """A trainer's memory settings: the plan it runs (None without ``max_memory``), the
    offload switch, the peak check and the step back.

    Building it plans from ``trainer.cfg`` and ``trainer.raw_model.config`` and sets, on the
    trainer, ``cfg`` (the plan's ``grad_accum``, ``checkpointing``, ``offload_activations``),
    ``micro`` and the model's checkpointing, and ``dist.sharded`` when the plan shards; call
    it after the model is built and before it is wrapped. Raises ValueError when nothing
    fits.
    """

    def __init__(self, trainer):
        cfg, d = trainer.cfg, trainer.dist
        self.device = trainer.device
        cpu_fp32 = self.device.type == "cpu" and not trainer.amp
        self.options = dict(
            batch_size=cfg.batch_size,
            gpus=d.world,
            objective=cfg.objective,
            # the CPU's reference path is modelled in fp32 only; bf16 anywhere as on CUDA
            precision="fp32" if not trainer.amp else "bf16",
            device="cpu" if cpu_fp32 else "cuda",
            mask_prob=cfg.mask_prob,
        )
        self.config = trainer.raw_model.config
        self.plan = self.plans = None
        self._steps, self._pending = 0, {}
        self._asked_offload = cfg.offload_activations  # --offload-activations: on in every plan
        if cfg.max_memory is None:
            self.apply(trainer, cfg)
            return
        if cfg.grad_accum != 1 or cfg.checkpointing:
            log.warning("--max-memory: the plan replaces --grad-accum and --checkpointing")
        p = memory.plan(
            self.config,
            memory_bytes=memory.parse_size(cfg.max_memory),
            fsdp=True if cfg.fsdp and d.world > 1 else None,
            **self.options,
        )
        if not p.fits:
            raise ValueError(nothing_fits_message(p, cfg.max_memory))
        if p.fsdp:
            d.sharded = True  # gpus = world > 1: under torchrun
        self.plans = []
        self.adopt(trainer, p, step=None)  # None: from the start (or the resumed step)
        if self.device.type != "cuda":
            log.info(
                "the peak memory check needs CUDA: on %s only the plan is applied", self.device
            )

    # -- settings -------------------------------------------------------------------------

    def apply(self, trainer, cfg) -> None:
        """Run ``trainer`` with ``cfg``'s grad_accum and checkpointing from now on."""
        d = trainer.dist
        if cfg.batch_size % (d.world * cfg.grad_accum):
            raise ValueError(
                f"batch_size {cfg.batch_size} must divide by world_size * grad_accum = "
                f"{d.world} * {cfg.grad_accum}"
            )
        trainer.cfg = cfg
        trainer.micro = cfg.batch_size // (d.world * cfg.grad_accum)
        from igpt.train import apply_checkpointing  # igpt.train imports this module

        apply_checkpointing(trainer.raw_model, cfg.checkpointing)

    def adopt(self, trainer, p: memory.Plan, *, step: int | None) -> None:
        """Make ``p`` the plan ``trainer`` runs from ``step`` on (and record it)."""
        self.plan = p
        cfg = dataclasses.replace(
            trainer.cfg,
            grad_accum=p.accumulation,
            checkpointing=p.checkpointing,
            offload_activations=p.offload or self._asked_offload,
        )
        self.apply(trainer, cfg)
        self.plans.append({"from_step": step, **_plan_row(p)})
        self._steps = 0
        log.info("memory plan from %s: %s (predicted)", _when(step), p.describe())
        self._write(trainer)

    def offload(self, trainer):
        """The context of forward + loss: activation offload when the run asks for it (a
        forward without gradients saves nothing, so evaluation is unaffected)."""
        return memory.activation_offload(trainer.cfg.offload_activations)

    # -- the step -------------------------------------------------------------------------

    def step(self, trainer) -> dict:
        """``trainer.train_step(trainer.step)``; after an out-of-memory error, redone under
        the next plan (re-raised without ``max_memory`` or when no smaller plan fits)."""
        while True:
            try:
                stats = trainer.train_step(trainer.step)
                break
            except torch.cuda.OutOfMemoryError:
                p = self.next_plan()
                if p is None:
                    raise
                log.warning(
                    "step %d ran out of memory under the plan predicted at %s; redoing it",
                    *(trainer.step, memory.format_size(self.plan.predicted_peak_bytes)),
                )
            # outside the handler: the traceback no longer holds the step's tensors
            trainer.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.adopt(trainer, p, step=trainer.step)
        self._check_peak(trainer)
        return stats

    def next_plan(self) -> memory.Plan | None:
        """The fastest plan with a strictly smaller predicted peak (same FSDP choice)."""
        if self.plan is None:
            return None
        p = memory.plan(
            self.config,
            memory_bytes=self.plan.predicted_peak_bytes - 1,
            fsdp=self.plan.fsdp,
            **self.options,
        )
        return p if p.fits else None

    def _check_peak(self, trainer) -> None:
        """Reset the peak after the plan's first step, read it after its third (or at the
        run's last step, when that comes sooner)."""
        self._steps += 1
        if self.plan is None or self.device.type != "cuda" or "measured" in self.plans[-1]:
            return
        final = trainer.step + 1 >= trainer.cfg.steps
        if self._steps == RESET_AFTER and not final:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._steps >= MEASURE_AFTER or final:
            measured = torch.cuda.max_memory_allocated(self.device)
            predicted = self.plan.predicted_peak_bytes
            self.plans[-1]["measured"] = {"peak_bytes": measured, "steps": self._steps}
            self._pending = {"predicted_peak_bytes": predicted, "measured_peak_bytes": measured}
            log.info(
                "peak memory: predicted %s, measured %s (measured / predicted %.3f)",
                *(memory.format_size(predicted), memory.format_size(measured)),
                measured / predicted,
            )
            self._write(trainer)

    def metrics(self) -> dict:
        """The measured and predicted peak, once, for the next metrics row (else {})."""
        out, self._pending = self._pending, {}
        return out

    def _write(self, trainer) -> None:
        trainer.run.write_json("memory.json", {"plans": self.plans, **self.options})


def _when(step: int | None) -> str:
    return "the start" if step is None else f"step {step}"


def _plan_row(p: memory.Plan) -> dict:
    keys = ("micro_batch", "accumulation", "checkpointing", "recomputed", "offload", "fsdp")
    return {**{k: getattr(p, k) for k in keys}, "predicted_peak_bytes": p.predicted_peak_bytes}
