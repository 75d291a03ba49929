"""``igpt import-hf DIR OUT``: a transformers ImageGPT directory to an igpt checkpoint.

    igpt import-hf hf/imagegpt-small imagegpt-small.pt
    igpt pretrain --checkpoint imagegpt-small.pt --data folder:/data/my_images --out runs/ft-s

The checkpoint holds the weights, the config and the palette (from the directory's
``preprocessor_config.json``), at step 0 with the AR objective. Every ``--checkpoint`` also
takes the transformers directory itself; this command is for keeping one file. DIR may be a
hub id when transformers can reach the hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

from igpt.commands._common import UsageError

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """Arguments of ``igpt import-hf``."""
    parser.add_argument("directory", help="transformers ImageGPT directory (or hub id)")
    parser.add_argument("out", help="checkpoint file to write")


def _check_source(directory: str) -> None:
    """Refuse a local path that is not a transformers ImageGPT directory."""
    from igpt.hf_format import is_pretrained_dir

    p = Path(directory)
    if not p.exists() and (p.is_absolute() or directory.startswith((".", "~")) or len(p.parts) > 2):
        # a hub id is "name" or "owner/name"; anything else is a local path
        raise FileNotFoundError(f"DIR {p} does not exist (and it is not a hub id)")
    if p.is_file():
        raise UsageError(f"DIR {p} is a file, not a transformers ImageGPT directory")
    if p.is_dir() and not is_pretrained_dir(p):
        raise UsageError(
            f"DIR {p} is not a transformers ImageGPT directory (it has no config.json with "
            "model_type 'imagegpt'); igpt export-hf writes one"
        )


def import_pretrained(path_or_hub_id, out) -> Path:
    """A transformers ImageGPT directory (or hub id) to an igpt checkpoint file ``out``
    (weights, config and palette, step 0, objective "ar"), which every ``--checkpoint``
    takes. Returns ``out``."""
    from igpt.checkpoint import load_any, save_checkpoint

    model, palette = load_any(path_or_hub_id)
    return save_checkpoint(out, model, step=0, palette=palette, objective="ar")


def run(args) -> None:
    """``igpt import-hf``: write the checkpoint and say where it is."""

    _check_source(args.directory)
    local = Path(args.directory).is_dir()
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"OUT {out} is a directory; igpt import-hf writes a checkpoint file")
    try:
        written = import_pretrained(args.directory, out)
    except OSError as e:
        if local:
            raise
        # neither here nor on the hub: transformers' own message runs over several lines
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UsageError(
            f"DIR {args.directory} does not exist here, and reading it as a hub id failed "
            f"({lines[0] if lines else type(e).__name__})"
        ) from e
    if local and not (Path(args.directory) / "preprocessor_config.json").is_file():
        log.warning(
            "%s has no preprocessor_config.json, so %s holds no palette: the commands that "
            "tokenise images need one (igpt pretrain takes --palette)",
            *(args.directory, written),
        )
    print(f"wrote {written} (from {args.directory})")
