"""``igpt import-hf DIR OUT``: a transformers ImageGPT directory to an igpt checkpoint.

    igpt import-hf hf/imagegpt-small imagegpt-small.pt
    igpt pretrain --checkpoint imagegpt-small.pt --data folder:/data/my_images --out runs/ft-s

The checkpoint holds the weights, the config and the palette (from the directory's
``preprocessor_config.json``), at step 0 with the AR objective. Every ``--checkpoint`` also
takes the transformers directory itself; this command is for keeping one file.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """Arguments of ``igpt import-hf``."""
    parser.add_argument("directory", help="transformers ImageGPT directory (or hub id)")
    parser.add_argument("out", help="checkpoint file to write")


def run(args) -> None:
    """``igpt import-hf``: write the checkpoint and say where it is."""
    from igpt.hf import import_pretrained

    out = import_pretrained(args.directory, args.out)
    print(f"wrote {out} (from {args.directory})")
