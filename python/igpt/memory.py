"""How much GPU memory a training step takes, and the fastest way to fit it in a budget.

    est = memory.estimate(config, batch_size=8, objective="ar", precision="bf16")
    p = memory.plan(config, batch_size=64, memory_bytes="40GiB", gpus=1)

``estimate``, ``activation_offload``, ``parse_size``, ``format_size`` and the counts come
from ``igpt.memory_estimate`` (where the bytes are derived, term by term) and are
re-exported here; this module adds the planner: ``plan`` searches micro-batch x
accumulation, checkpointing, offload and FSDP for the fastest combination whose predicted
peak fits, ranking the candidates with a speed model (see ``plan``).

Use in a trainer: ``p = plan(config, batch_size=global_batch, memory_bytes=parse_size(
"40GiB"), gpus=world)``; train with micro-batch ``p.micro_batch`` and ``p.accumulation``
steps, checkpointing ``p.checkpointing``, FSDP if ``p.fsdp``, and forward + loss inside
``activation_offload(p.offload)``; compare ``torch.cuda.max_memory_allocated()`` after the
first steps with ``p.predicted_peak_bytes``; after an out-of-memory error, the next plan is
``plan(..., memory_bytes=p.predicted_peak_bytes - 1)`` (the fastest with a smaller peak).
``igpt.memplan.TrainMemory`` does all of this for ``igpt.train.Trainer`` (``--max-memory``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from igpt.config import IGPTConfig
from igpt.memory_estimate import (
    DEVICES,
    KERNELS,
    OBJECTIVES,
    OPTIMIZERS,
    PRECISIONS,
    Estimate,
    KernelPath,
    activation_offload,
    activations_saved,
    block_coefficients,
    checkpointed_blocks,
    estimate,
    flops_per_token,
    format_size,
    parameter_count,
    parameter_tensors,
    parse_size,
    path,
)

__all__ = [
    "Plan",
    "plan",
    # re-exported: their home is igpt.memory_estimate
    "Estimate",
    "KernelPath",
    "estimate",
    "path",
    "activation_offload",
    "activations_saved",
    "block_coefficients",
    "checkpointed_blocks",
    "parameter_count",
    "parameter_tensors",
    "parse_size",
    "format_size",
    "PRECISIONS",
    "OBJECTIVES",
    "OPTIMIZERS",
    "DEVICES",
    "KERNELS",
]

# The speed model's constants (see ``plan``).
GPU_FLOPS = 400e12  # achieved dense bf16 FLOP/s of one GPU
PCIE_BYTES_PER_S = 25e9  # host <-> device, each direction, not overlapped with compute
LINK_BYTES_PER_S = 150e9  # GPU <-> GPU collectives (NVLink class), not overlapped
MICRO_OVERHEAD_TOKENS = 512  # per micro-step fixed cost, in tokens' worth of compute


@dataclass(frozen=True)
class Plan:
    """One way to run a training step, with its predicted peak and relative step time.

    fits: whether predicted_peak_bytes <= memory_bytes. micro_batch x accumulation x gpus is
    the global batch. checkpointing: 0 off, k every k-th block (``recomputed`` of them).
    offload: activation offload. fsdp: FSDP2 across ``gpus`` (else DDP when gpus > 1).
    step_seconds: the speed model's step time (relative: compare plans, not clocks).
    needed_bytes / needed_gpus: when nothing fits, the smallest plan's peak on the given
    GPUs, and the fewest GPUs (a divisor of the batch) on which some plan fits, or None.
    alternatives: the fastest fitting plan of each policy (no checkpointing or offload,
    checkpointing, offload, both; per FSDP choice) as dicts with their predicted peak and
    ``relative_time`` (step time over the chosen plan's), fastest first.
    """

    fits: bool
    micro_batch: int
    accumulation: int
    checkpointing: int
    recomputed: int
    offload: bool
    fsdp: bool
    gpus: int
    predicted_peak_bytes: int
    memory_bytes: int
    step_seconds: float
    estimate: Estimate
    needed_bytes: int | None = None
    needed_gpus: int | None = None
    alternatives: tuple = ()

    def to_dict(self) -> dict:
        """The plan as a plain dict (for ``igpt plan --json``)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line a person reads."""
        ck = f"checkpoint every {self.checkpointing} ({self.recomputed} blocks recomputed)"
        parts = [
            f"micro-batch {self.micro_batch} x {self.accumulation} accumulation",
            ck if self.checkpointing else "no checkpointing",
            "activation offload" if self.offload else "no offload",
        ]
        if self.gpus > 1:
            parts.append(f"{'FSDP' if self.fsdp else 'DDP'} on {self.gpus} GPUs")
        return ", ".join(parts) + f": peak {format_size(self.predicted_peak_bytes)}"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _step_seconds(config, est, *, micro, accumulation, checkpointing, offload, gpus, fsdp,
                  objective) -> float:  # fmt: skip
    """The speed model (see ``plan``)."""
    c = config
    T = micro * c.n_positions
    block, head = flops_per_token(c, objective)
    recomputed = sum(checkpointed_blocks(c.n_layer, checkpointing))
    flops = T * (3 * (c.n_layer * block + head) + recomputed * block)
    efficiency = T / (T + MICRO_OVERHEAD_TOKENS)
    t = accumulation * flops / (GPU_FLOPS * efficiency)
    if offload:
        t += accumulation * 2 * est.host / PCIE_BYTES_PER_S
    if gpus > 1:
        P = parameter_count(c)
        ring = (gpus - 1) / gpus
        if fsdp:  # gather bf16 weights for forward and backward, reduce-scatter fp32 grads
            t += ring * (accumulation * 2 * 2 * P + 4 * P) / LINK_BYTES_PER_S
        else:  # one all-reduce of fp32 gradients (no_sync on the other micro-batches)
            t += 2 * ring * 4 * P / LINK_BYTES_PER_S
    return t


def _candidates(config, *, batch_size, gpus, objective, precision, optimizer, device,
                kernels, offload_options, mask_prob, fsdp_options):  # fmt: skip
    """Every plan on ``gpus`` GPUs (fitting or not), without the memory verdict."""
    per_rank = batch_size // gpus
    L = config.n_layer
    ks, seen = [0], set()
    for k in range(1, L + 1):  # one k per distinct number of recomputed blocks
        r = sum(checkpointed_blocks(L, k))
        if r not in seen:
            seen.add(r)
            ks.append(k)
    for fsdp in fsdp_options if gpus > 1 else (False,):
        for micro in _divisors(per_rank):
            for k in ks:
                for offload in offload_options:
                    acc = per_rank // micro
                    est = estimate(
                        config, batch_size=micro, objective=objective, precision=precision,
                        checkpointing=k, offload=offload, optimizer=optimizer,
                        world_size=gpus, fsdp=fsdp, device=device, accumulation=acc,
                        kernels=kernels, mask_prob=mask_prob,
                    )  # fmt: skip
                    secs = _step_seconds(
                        config, est, micro=micro, accumulation=acc, checkpointing=k,
                        offload=offload, gpus=gpus, fsdp=fsdp, objective=objective,
                    )  # fmt: skip
                    yield micro, acc, k, offload, fsdp, est, secs


def plan(
    config: IGPTConfig,
    *,
    batch_size: int,
    memory_bytes: int,
    gpus: int = 1,
    objective: str = "ar",
    precision: str = "bf16",
    optimizer: str = "adam",
    device: str = "cuda",
    kernels: str = "igpt",
    allow_offload: bool = True,
    mask_prob: float = 0.15,
    fsdp: bool | None = None,
) -> Plan:
    """The fastest training plan whose predicted peak fits ``memory_bytes`` per GPU.

    Searches, for the global ``batch_size`` on ``gpus`` GPUs (data parallel: each GPU takes
    batch_size / gpus images per step), every micro-batch dividing that with the matching
    accumulation, checkpointing off or every k-th block (one k per number of recomputed
    blocks), activation offload off or on, and DDP or FSDP when gpus > 1; predicts each
    one's peak with ``estimate`` and its step time with the speed model below; returns the
    fastest that fits (ties: the smaller peak). When nothing fits it returns the plan with
    the smallest peak, ``fits=False``, ``needed_bytes`` (that peak) and ``needed_gpus``
    (the fewest GPUs among the divisors of the batch on which some DDP or FSDP plan fits).
    ``fsdp`` None searches DDP and FSDP; True or False keeps to that one (a running trainer
    that steps back after an out-of-memory error cannot re-wrap its model).

    The speed model assumes: a step costs 3x the forward FLOPs (matmuls 2 x weights per
    token, attention 4 n d per token per layer, halved under the causal mask) plus one more
    forward of every recomputed block, at GPU_FLOPS (400 TFLOP/s) times an efficiency
    T / (T + 512) for a micro-batch of T tokens (a fixed per-micro-step cost); offload adds
    twice the offloaded bytes over PCIE_BYTES_PER_S (25 GB/s) per micro-batch, not
    overlapped (``save_on_cpu`` copies synchronously); DDP adds one ring all-reduce of the
    fp32 gradients, FSDP gathers the bf16 weights twice per micro-batch and
    reduce-scatters the fp32 gradients, over LINK_BYTES_PER_S (150 GB/s), not overlapped.
    Only the ranking of plans is meant; the seconds are not a prediction of wall time.
    """
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be a positive int, got {gpus!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size % gpus:
        raise ValueError(f"batch_size {batch_size} must divide by gpus = {gpus}")
    memory_bytes = parse_size(memory_bytes)
    opts = dict(objective=objective, precision=precision, optimizer=optimizer, device=device,
                kernels=kernels, mask_prob=mask_prob,
                offload_options=(False, True) if allow_offload else (False,),
                fsdp_options=(False, True) if fsdp is None else (bool(fsdp),))  # fmt: skip
    best, smallest, by_policy = _search(config, batch_size, gpus, memory_bytes, opts)
    fits = best is not None
    secs, peak, micro, acc, k, off, fsdp, est = best if fits else smallest
    return Plan(
        fits=fits,
        micro_batch=micro,
        accumulation=acc,
        checkpointing=k,
        recomputed=sum(checkpointed_blocks(config.n_layer, k)),
        offload=off,
        fsdp=fsdp,
        gpus=gpus,
        predicted_peak_bytes=peak,
        memory_bytes=memory_bytes,
        step_seconds=secs,
        estimate=est,
        needed_bytes=None if fits else peak,
        needed_gpus=None if fits else _needed_gpus(config, batch_size, gpus, memory_bytes, opts),
        alternatives=_alternatives(config, by_policy, secs),
    )


def _search(config, batch_size: int, gpus: int, memory_bytes: int, opts: dict):
    """(fastest fitting row or None, smallest-peak row, fastest fitting row per policy);
    a row is (seconds, peak, micro, accumulation, checkpointing, offload, fsdp, estimate)
    and rows compare by (seconds, peak)."""
    best, smallest, by_policy = None, None, {}
    for micro, acc, k, off, fsdp, est, secs in _candidates(
        config, batch_size=batch_size, gpus=gpus, **opts
    ):
        row = (secs, est.peak, micro, acc, k, off, fsdp, est)
        if est.peak <= memory_bytes:
            if best is None or row[:2] < best[:2]:
                best = row
            policy = (k > 0, off, fsdp)
            if policy not in by_policy or row[:2] < by_policy[policy][:2]:
                by_policy[policy] = row
        if smallest is None or (est.peak, secs) < (smallest[1], smallest[0]):
            smallest = row
    return best, smallest, by_policy


def _alternatives(config, by_policy: dict, secs: float) -> tuple:
    """The fastest fitting plan of each policy as dicts, fastest first, with its step time
    relative to the chosen plan's ``secs``."""
    return tuple(
        dict(
            micro_batch=r[2],
            accumulation=r[3],
            checkpointing=r[4],
            recomputed=sum(checkpointed_blocks(config.n_layer, r[4])),
            offload=r[5],
            fsdp=r[6],
            predicted_peak_bytes=r[1],
            relative_time=r[0] / secs,
        )
        for r in sorted(by_policy.values(), key=lambda r: r[:2])
    )


def _needed_gpus(config, batch_size: int, gpus: int, memory_bytes: int, opts: dict):
    """The fewest GPUs (a divisor of the batch, more than ``gpus``) on which some plan fits,
    or None."""
    for w in _divisors(batch_size):
        if w > gpus and any(
            e.peak <= memory_bytes
            for *_, e, _ in _candidates(config, batch_size=batch_size, gpus=w, **opts)
        ):
            return w
    return None
