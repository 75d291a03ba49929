"""``igpt export-hf CKPT DIR``: an igpt checkpoint to a transformers ImageGPT directory.

    igpt export-hf runs/s32 hf/s32          # run directory: its latest checkpoint
    igpt export-hf runs/s32/ft/best.pt hf/s32-clf

Writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (the palette
as the processor's ``clusters``), so ``ImageGPTForCausalImageModeling.from_pretrained`` and
``ImageGPTImageProcessor.from_pretrained`` load it. A fine-tuning checkpoint becomes an
``ImageGPTForImageClassification`` unless ``--no-head``; its class head must have no bias
(HF's ``score`` has none), which ``igpt finetune --no-head-bias`` trains. Weights only: no
optimizer state.
"""

from __future__ import annotations

from pathlib import Path

from igpt.commands._common import UsageError


def add_arguments(parser) -> None:
    """Arguments of ``igpt export-hf``."""
    parser.add_argument(
        "checkpoint",
        help="checkpoint file, a run directory (its latest) or a transformers ImageGPT directory",
    )
    parser.add_argument("out", help="directory to write (created; files in it are replaced)")
    parser.add_argument(
        "--no-head",
        action="store_true",
        help="export a fine-tuned classifier's causal model only, without its class head",
    )


def _check_out(out: Path) -> None:
    """Refuse an output that would overwrite a run's own files (its config.json)."""
    from igpt.checkpoint import latest_checkpoint

    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT {out} is a file; igpt export-hf writes a directory")
    if latest_checkpoint(out) is not None:
        raise UsageError(
            f"OUT {out} is a run directory (it holds {latest_checkpoint(out).name}); its "
            "config.json would be replaced: export to a directory of its own"
        )


def _check_head(path: Path, ckpt: dict, head: bool) -> None:
    """Refuse a classifier whose trained head bias transformers' classifier cannot hold."""
    bias = ckpt.get("head", {}).get("bias") if head else None
    if bias is not None and bool(bias.count_nonzero()):
        raise UsageError(
            f"{path} is a classifier whose class head has a trained bias (max |b| = "
            f"{float(bias.abs().max()):.3g}), which transformers' ImageGPTForImageClassification "
            "has no place for; fine-tune with --no-head-bias, or export its causal model "
            "alone with --no-head"
        )


def export_checkpoint(checkpoint, directory, *, head: bool = True) -> Path:
    """An igpt checkpoint (file or run directory) to a transformers directory, with its
    palette. A fine-tuning checkpoint becomes ``ImageGPTForImageClassification``
    (``head=False``: its ``IGPT`` only, causal). Returns the directory."""
    from igpt.checkpoint import read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    return export_read(read_checkpoint(path), path, directory, head=head)


def export_read(ckpt: dict, path, directory, *, head: bool = True) -> Path:
    """``export_checkpoint`` of a checkpoint already read from ``path``: it is read once."""
    from igpt.checkpoint import model_from_checkpoint
    from igpt.classifier import classifier_from_checkpoint
    from igpt.hf import save_pretrained

    if head and "head" in ckpt:
        model, palette = classifier_from_checkpoint(ckpt, path)
    else:
        model, palette = model_from_checkpoint(ckpt, path)
    return save_pretrained(model, directory, palette=palette)


def run(args) -> None:
    """``igpt export-hf``: write the directory and say where it is."""
    from igpt.checkpoint import read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    _check_out(out)
    if out.resolve() == path.resolve():
        raise UsageError(f"OUT {out} is the directory being exported; pick another one")
    ckpt = read_checkpoint(path)
    _check_head(path, ckpt, head=not args.no_head)
    written = export_read(ckpt, path, out, head=not args.no_head)
    print(f"wrote {written} (from {path})")
