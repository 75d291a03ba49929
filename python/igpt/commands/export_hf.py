"""``igpt export-hf CKPT DIR``: an igpt checkpoint to a transformers ImageGPT directory.

    igpt export-hf runs/s32 hf/s32          # run directory: its latest checkpoint
    igpt export-hf runs/s32/ft/best.pt hf/s32-clf

Writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (the palette
as the processor's ``clusters``), so ``ImageGPTForCausalImageModeling.from_pretrained`` and
``ImageGPTImageProcessor.from_pretrained`` load it. A fine-tuning checkpoint becomes an
``ImageGPTForImageClassification`` unless ``--no-head``. Weights only: no optimizer state.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """Arguments of ``igpt export-hf``."""
    parser.add_argument("checkpoint", help="checkpoint file, or a run directory (its latest)")
    parser.add_argument("out", help="directory to write (created; files in it are replaced)")
    parser.add_argument(
        "--no-head",
        action="store_true",
        help="export a fine-tuned classifier's causal model only, without its class head",
    )


def run(args) -> None:
    """``igpt export-hf``: write the directory and say where it is."""
    from igpt.checkpoint import resolve_checkpoint
    from igpt.hf import export_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(path, args.out, head=not args.no_head)
    print(f"wrote {out} (from {path})")
