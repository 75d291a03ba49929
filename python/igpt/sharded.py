"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories, one shard per rank.

    save_sharded(run_dir / "ckpt_00000500.dcp", tensors, state, is_main=rank == 0, barrier=b)
    why = sharded_damage(path)                 # None when it reads back, else the reason
    state = read_sharded_state(path)           # the small dict, without the tensors
    load_sharded(path, tensors)                # fills ``tensors`` in place (a collective)

A sharded checkpoint is a directory ``ckpt_XXXXXXXX.dcp`` in DCP's layout: ``.metadata``
(what every tensor is and where its bytes lie), ``__<rank>_0.distcp`` (the bytes that rank
wrote: under FSDP2 its own shards of the weights and of Adam's state, nothing gathered) and
``state.pt``, what is not sharded (config, step, palette, scheduler, RNG ...), written by
rank 0 with ``torch.save`` and read with ``weights_only=True``. DCP reshards on load, so
such a checkpoint resumes on another number of processes, or on one.

Writes are all or nothing, like a checkpoint file's: the ranks write into a temporary
directory ``.ckpt_XXXXXXXX.dcp.<8 characters>.tmp`` that rank 0 renames once every rank
has finished and ``.metadata`` and ``state.pt`` are on disk. ``sharded_damage`` is the
check a resume runs before it trusts one: both files read back, and every shard file holds
the bytes ``.metadata`` places in it (a copy cut short is caught, as for a ``.pt`` file).
DCP's ``.metadata`` is a pickle: read sharded checkpoints only from sources you trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch

__all__ = [
    "SUFFIX",
    "STATE_FILE",
    "save_sharded",
    "sharded_damage",
    "read_sharded_state",
    "load_sharded",
]

SUFFIX = ".dcp"
# what is not sharded: rank 0's small torch.save file inside the directory
STATE_FILE = "state.pt"
# the temporary directory's fixed 8 characters (igpt._io's temporary names): every rank
# must know it without a message, and only one save runs per run directory at a time
_PARTIAL = "partial_"


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _alone() -> bool:
    """No process group is up: DCP reads and writes as one process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns at every one-process call that it assumes one process, which is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def save_sharded(path, tensors: dict, state: dict, *, is_main: bool, barrier) -> Path:
    """Write ``tensors`` (a dict of state dicts: plain tensors or FSDP2's DTensors) with
    ``torch.distributed.checkpoint.save`` and ``state`` (small, not sharded: rank 0's) as
    the sharded checkpoint ``path``, atomically. A collective: every rank calls it, with
    its own shards; ``barrier()`` waits for every rank (a no-op on one process)."""
    from igpt._io import atomic_write

    path = Path(path)
    tmp = path.parent / f".{path.name}.{_PARTIAL}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save of this step left
        tmp.mkdir(parents=True)
    barrier()
    with _quiet_single_process():  # rank 0 writes .metadata once every rank wrote its shards
        _dcp().save(tensors, checkpoint_id=str(tmp), no_dist=_alone())
    if is_main:
        atomic_write(tmp / STATE_FILE, lambda f: torch.save(state, f))
        if path.exists():  # a damaged checkpoint of this step that a resume passed over
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    barrier()
    return path


def _fsync_dir(folder: Path) -> None:
    """Flush a rename in ``folder`` to disk (where the OS lets a directory be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sharded_damage(path) -> str | None:
    """Why the sharded checkpoint ``path`` cannot be read back (None: it can): a missing or
    unreadable ``.metadata`` or ``state.pt``, or a shard file missing or shorter than the
    bytes ``.metadata`` places in it. Reads no tensor."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    for name in (".metadata", STATE_FILE):
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"it has no {name} (a save that never finished)"
    try:
        metadata = _dcp().FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001  (a damaged pickle fails in any way)
        return f"its .metadata cannot be read ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for name, end in sorted(need.items()):
        f = path / name
        size = f.stat().st_size if f.is_file() else None
        if size is None:
            return f"its shard file {name} is missing"
        if size < end:
            return f"its shard file {name} is cut short ({size} of {end} bytes)"
    return None


def read_sharded_state(path) -> dict:
    """The ``state.pt`` of the sharded checkpoint ``path`` (``weights_only``): everything
    but the sharded tensors."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def load_sharded(path, tensors: dict, *, local: bool = False) -> dict:
    """Fill ``tensors`` (state dicts shaped as the ones saved: this rank's shards, or full
    tensors) in place from the sharded checkpoint ``path``; returns it. A collective when a
    process group is up, unless ``local`` (one process reads on its own)."""
    with _quiet_single_process():
        _dcp().load(tensors, checkpoint_id=str(path), no_dist=local or _alone())
    return tensors
