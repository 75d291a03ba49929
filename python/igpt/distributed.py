"""torchrun in one object: the process group, DDP or FSDP2, reductions and checkpoints.

    d = Distributed(device="cuda", fsdp=True)   # joins torchrun's group, if any
    model = d.wrap(raw_model, device, bf16=True)
    with d.sync(model, last_micro_step): loss.backward()
    d.all_reduce(total); d.barrier()
    model_sd, optim_sd = d.state_dicts(model, raw_model, optimizer)   # full, on rank 0's CPU
    tensors = d.sharded_state(model, raw_model, optimizer)    # each rank's own shards (DCP)

Without torchrun (WORLD_SIZE unset or 1) it is one process: rank 0, every call a no-op.
``sharded`` is True when parameters are split across processes (FSDP2 under torchrun).
A checkpoint holds either full state dicts (``state_dicts``: gathered on rank 0, one file)
or each rank's shards (``sharded_state``, written with ``torch.distributed.checkpoint`` by
``igpt.sharded``); evaluation reads both as plain models.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str | None = None) -> bool:
    """Initialise torch.distributed from torchrun's env vars when WORLD_SIZE > 1.

    NCCL for CUDA devices, gloo for the CPU. Returns True if this call created the group.
    """
    _, world, local_rank = dist_env()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


class Distributed:
    """This process's place in a run, and the calls that differ between 1 and K processes.

    Args:
        device: the run's device name (None: CUDA when available), for the backend choice.
        fsdp: shard parameters with FSDP2 ``fully_shard`` (under torchrun) instead of DDP.
    """

    def __init__(self, device: str | None = None, *, fsdp: bool = False):
        self._own_group = init_distributed(device)
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.local_rank = dist_env()[2] if self.active else 0
        self.is_main = self.rank == 0
        if fsdp and not self.active:
            log.warning("--fsdp without torchrun: training on one process unsharded")
        self.sharded = fsdp and self.active

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place; returns it."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        """Wait for every process."""
        if self.world > 1:
            dist.barrier()

    def wrap(self, model, device: torch.device, *, bf16: bool = False):
        """``model`` as it trains here: FSDP2 per block and whole, DDP, or itself."""
        if self.sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(
                **(dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {})
            )
            for block in model.transformer.h:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            return model
        if self.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model

    def sync(self, model, sync: bool):
        """Context for one micro-step's backward: reduce gradients only when ``sync``."""
        if self.sharded:
            model.set_requires_gradient_sync(sync)
        elif self.active and not sync:
            return model.no_sync()
        return contextlib.nullcontext()

    def state_dicts(self, model, raw_model, optimizer) -> tuple[dict, dict]:
        """Full model and optimizer state dicts (a collective when sharded: call on all)."""
        if not self.sharded:
            return raw_model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts),
        )

    @property
    def optimizer_format(self) -> str:
        """How ``state_dicts`` lays out the optimizer state: "fsdp_full" or "torch"."""
        return "fsdp_full" if self.sharded else "torch"

    def sharded_state(self, model, raw_model, optimizer) -> dict:
        """``{"model", "optimizer"}`` state dicts as they lie on this rank, keyed by parameter
        names (``torch.distributed.checkpoint.state_dict``): under FSDP2 this rank's shards
        (DTensors), nothing gathered; else the full tensors. What a sharded checkpoint
        holds; a collective when sharded."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        owner = model if self.sharded else raw_model
        return {
            "model": get_model_state_dict(owner),
            "optimizer": get_optimizer_state_dict(owner, optimizer),
        }

    def load_sharded_state(self, model, raw_model, optimizer, path) -> None:
        """Restore a sharded checkpoint's model and optimizer: each rank reads the bytes of
        its own shards from ``path`` (resharded when the run's processes differ from the
        ones that wrote it). A collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from igpt.sharded import load_sharded

        owner = model if self.sharded else raw_model
        tensors = load_sharded(path, self.sharded_state(model, raw_model, optimizer))
        set_model_state_dict(owner, tensors["model"])
        set_optimizer_state_dict(owner, optimizer, tensors["optimizer"])

    def load_state_dicts(self, model, raw_model, optimizer, ckpt: dict) -> None:
        """Restore what ``state_dicts`` saved into ``ckpt``, or (``ckpt["sharded"]``: a
        sharded checkpoint's path) what ``sharded_state`` saved (a collective when
        sharded)."""
        if "sharded" in ckpt:
            self.load_sharded_state(model, raw_model, optimizer, ckpt["sharded"])
            return
        written_sharded = ckpt.get("optimizer_format") == "fsdp_full"
        if self.sharded and not written_sharded:
            raise ValueError("resuming an FSDP run needs a checkpoint written with --fsdp")
        if written_sharded and not self.sharded:
            raise ValueError("this checkpoint was written with --fsdp; resume with --fsdp")
        if not self.sharded:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt["model"], options=opts)
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=opts)

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False
