"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so ``torch.load(weights_only=True)`` reads it. It is written to a temporary file in
the same folder, flushed to disk, then renamed over the target: a crash mid-save leaves the
previous checkpoint intact and never a half-written one under the final name.

Layout of the dict: ``model`` (state dict), ``config`` (IGPTConfig fields), ``step``,
``palette`` (float32 (K, 3) or absent), and whatever the caller adds (``optimizer``,
``scheduler``, ``rng`` ...); the model's generative objective goes under ``objective``
(``objective_of`` reads it). A run directory holds ``ckpt_XXXXXXXX.pt`` files;
``latest_checkpoint(run_dir)`` picks the one with the highest step.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from igpt._io import atomic_write
from igpt.config import IGPTConfig
from igpt.model import IGPT
from igpt.objectives import objective_of  # noqa: F401  (public name of igpt.checkpoint)

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_path(run_dir, step: int) -> Path:
    """Where step ``step`` of a run is saved."""
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint with the highest step in ``run_dir``, or None if there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def atomic_torch_save(obj, path) -> None:
    """torch.save to ``path`` through a temporary file and a rename (all or nothing)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_state(model: IGPT, *, step: int = 0, palette=None, state_dict=None, **extra):
    """The dict ``save_checkpoint`` writes: ``model`` (``state_dict``, default the model's
    own), ``config``, ``step``, ``palette`` (float32 (K, 3) on the CPU) and ``extra``."""
    state = {
        "model": model.state_dict() if state_dict is None else state_dict,
        "config": model.config.to_dict(),
        "step": int(step),
    }
    if palette is not None:
        centroids = getattr(palette, "centroids", palette)
        state["palette"] = torch.as_tensor(centroids, dtype=torch.float32).cpu()
    state.update(extra)
    return state


def save_checkpoint(path, model: IGPT, *, step: int = 0, palette=None, **extra) -> Path:
    """Save ``model`` (weights + config), ``step``, the palette and ``extra`` entries.

    ``extra`` values must be made of tensors, numbers, strings, lists, tuples and dicts
    (optimizer and scheduler ``state_dict()``s are). Returns the path written.
    """
    atomic_torch_save(checkpoint_state(model, step=step, palette=palette, **extra), path)
    return Path(path)


def resolve_checkpoint(path_or_dir) -> Path:
    """A checkpoint file itself, or the latest checkpoint of a run directory."""
    p = Path(path_or_dir)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"no ckpt_*.pt checkpoint in run directory {p}")
        return latest
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(path_or_dir, map_location="cpu") -> dict:
    """Read a checkpoint (file or run directory) with ``weights_only=True``."""
    return torch.load(resolve_checkpoint(path_or_dir), map_location=map_location, weights_only=True)


def load_model(path_or_dir, device=None):
    """Rebuild the model of a checkpoint: returns ``(model, palette_or_None, checkpoint)``.

    The palette comes back as an ``igpt.palette.Palette`` when the checkpoint has one.
    """
    ckpt = load_checkpoint(path_or_dir)
    model = IGPT(IGPTConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    if device is not None:
        model.to(device)
    palette = None
    if "palette" in ckpt:
        from igpt.palette import Palette

        palette = Palette(ckpt["palette"])
    return model, palette, ckpt
