"""``igpt consolidate CKPT OUT``: a sharded checkpoint gathered into one checkpoint file.

    igpt consolidate runs/xl runs/xl-weights.pt      # a run directory: its latest checkpoint
    igpt consolidate runs/xl/ckpt_00050000.dcp xl.pt

A sharded checkpoint (``ckpt_XXXXXXXX.dcp``, written by ``igpt pretrain --fsdp``) holds each
rank's shards; the file holds the whole model, its config, step and palette and the run's
other entries, as a ``ckpt_XXXXXXXX.pt`` of one process, without the optimizer state (a run
resumes from the sharded directory itself, on any number of processes). Every command that
takes a checkpoint reads the directory as well; ``igpt export-hf CKPT DIR`` writes it as a
transformers directory. The gathered model must fit this machine's memory once.
"""

from __future__ import annotations

from pathlib import Path

from igpt.commands._common import UsageError


def add_arguments(parser) -> None:
    """Arguments of ``igpt consolidate``."""
    parser.add_argument(
        "checkpoint", help="sharded checkpoint (a .dcp directory) or a run directory (its latest)"
    )
    parser.add_argument("out", help="checkpoint file to write (.pt)")


def consolidate(checkpoint, out) -> Path:
    """The sharded checkpoint ``checkpoint`` (or a run directory's latest, sharded or not)
    as one checkpoint file ``out``: model, config, step, palette and the run's entries, no
    optimizer state. Returns ``out``."""
    from igpt.checkpoint import atomic_torch_save, read_checkpoint, resolve_checkpoint

    ckpt = read_checkpoint(resolve_checkpoint(checkpoint))
    ckpt.pop("sharded", None)
    ckpt.pop("optimizer", None)
    ckpt.pop("optimizer_format", None)
    atomic_torch_save(ckpt, out)
    return Path(out)


def run(args) -> None:
    """``igpt consolidate``: write the file and say where it is."""
    from igpt.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"OUT {out} is a directory; igpt consolidate writes a checkpoint file")
    written = consolidate(path, out)
    print(f"wrote {written} (from {path})")
