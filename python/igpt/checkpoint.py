"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so ``torch.load(weights_only=True)`` reads it. It is written to a temporary file in
the same folder, flushed to disk, then renamed over the target: a crash mid-save leaves the
previous checkpoint intact and never a half-written one under the final name.

Layout of the dict: ``model`` (state dict), ``config`` (IGPTConfig fields), ``step``,
``palette`` (float32 (K, 3) or absent), and whatever the caller adds (``optimizer``,
``scheduler``, ``rng`` ...); the model's generative objective goes under ``objective``
(``objective_of`` reads it). A run directory holds ``ckpt_XXXXXXXX.pt`` files, or sharded
checkpoints, ``ckpt_XXXXXXXX.dcp`` directories (``igpt.sharded``: one shard per rank, written
by ``torch.distributed.checkpoint``); ``latest_checkpoint(run_dir)`` picks the one with the
highest step. Every reader takes a sharded one as well: ``read_checkpoint`` gathers its
weights into one state dict on the CPU (without the optimizer state), and ``tensors=False``
reads only its small ``state.pt``, for a resume that loads the shards itself.

A directory in transformers' ImageGPT layout (``igpt.hf.is_pretrained_dir``: a
``config.json`` with ``model_type`` "imagegpt") is read as the step-0 checkpoint of its
weights (``objective`` "ar", the palette of its ``preprocessor_config.json`` when it has
one), so every place that takes a checkpoint takes such a directory. A run directory is
told apart by its ``ckpt_*.pt`` files; a directory that is both is refused.

Reading one that is not an igpt checkpoint (empty, truncated, random bytes, a pickle of
arbitrary objects, a dict without ``model`` or ``config``) raises ``CheckpointError``, a
ValueError whose message names the file and says what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

from igpt import hf_format
from igpt._io import atomic_write
from igpt.config import IGPTConfig
from igpt.model import IGPT
from igpt.objectives import objective_of  # noqa: F401  (public name of igpt.checkpoint)
from igpt.palette import Palette
from igpt.sharded import SUFFIX, load_sharded, read_sharded_state, sharded_damage

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt_(\d+)\.(?:pt|dcp)$")
# what every igpt checkpoint holds (checkpoint_state writes both)
REQUIRED_KEYS = ("model", "config")


class CheckpointError(ValueError):
    """A file that cannot be read as an igpt checkpoint; the message names it and says why."""


def checkpoint_path(run_dir, step: int, *, sharded: bool = False) -> Path:
    """Where step ``step`` of a run is saved (``sharded``: the ``.dcp`` directory)."""
    return Path(run_dir) / f"ckpt_{step:08d}{SUFFIX if sharded else '.pt'}"


def is_sharded(path) -> bool:
    """Whether ``path`` names a sharded checkpoint (a ``.dcp`` directory, intact or not)."""
    p = Path(path)
    return p.suffix == SUFFIX and (p.is_dir() or not p.exists())


def run_checkpoints(run_dir) -> list[Path]:
    """The ``ckpt_XXXXXXXX.pt`` files and ``.dcp`` directories of ``run_dir``, oldest step
    first (none: ``[]``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint with the highest step in ``run_dir``, or None if there is none.

    It only looks at names; ``latest_intact_checkpoint`` also reads them."""
    found = run_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(
    run_dir, map_location="cpu", *, tensors: bool = True
) -> tuple[Path, dict] | None:
    """``(path, checkpoint)`` of the newest checkpoint of ``run_dir`` that reads back
    (``tensors=False``: a sharded one without its tensors, see ``read_checkpoint``).

    A damaged newer one (a truncated copy, a disk that filled up) is passed over with a
    warning naming it and the one used instead. None without checkpoints; CheckpointError
    when every one is damaged.
    """
    found = run_checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        try:
            ckpt = read_checkpoint(path, map_location=map_location, tensors=tensors)
        except CheckpointError as e:
            log.warning("%s", e)
            damaged.append(path)
            continue
        if damaged:
            log.warning(
                "using %s: the newer %s cannot be read (see above); training redoes the "
                "steps after %s",
                *(path, ", ".join(p.name for p in damaged), path.name),
            )
        return path, ckpt
    if damaged:
        raise CheckpointError(
            f"no checkpoint of {Path(run_dir)} can be read ({', '.join(p.name for p in damaged)} "
            "are all damaged); start afresh in another --out"
        )
    return None


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


def model_config(ckpt: dict, path) -> IGPTConfig:
    """The IGPTConfig of a checkpoint read from ``path``; CheckpointError if it is not one."""
    try:
        return IGPTConfig.from_dict(dict(ckpt["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its 'config' entry is not an IGPTConfig ({e})") from e


def architecture_differences(path, ckpt: dict, config: IGPTConfig) -> list[str]:
    """How ``config`` differs from the model config of the checkpoint read from ``path``:
    one "field <theirs> there, <ours> now" per field (empty: the same architecture)."""
    theirs = model_config(ckpt, path)
    return [
        f"{f.name} {getattr(theirs, f.name)!r} there, {getattr(config, f.name)!r} now"
        for f in dataclasses.fields(IGPTConfig)
        if getattr(theirs, f.name) != getattr(config, f.name)
    ]


def load_weights(model: IGPT, ckpt: dict, path) -> IGPT:
    """``model.load_state_dict(ckpt["model"])``; CheckpointError naming ``path`` and what
    does not fit when the weights are not those of ``model``'s config."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: its weights do not fit its own config ({_mismatch(model, ckpt['model'])}); "
            "the file was not written by igpt.checkpoint.save_checkpoint"
        ) from e
    return model


def _mismatch(model, weights) -> str:
    """A short account of how ``weights`` differ from ``model``'s state dict."""
    want = model.state_dict()
    have = weights if isinstance(weights, dict) else {}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shape = [k for k in want if k in have and getattr(have[k], "shape", None) != want[k].shape]
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for keys, what in ((missing, "missing"), (extra, "unexpected"), (shape, "of other shape"))
        if keys
    ]
    return ", ".join(parts) or "tensors of other types"


def resolve_checkpoint(path_or_dir) -> Path:
    """A checkpoint file itself, the latest checkpoint of a run directory, or a transformers
    ImageGPT directory itself (``read_checkpoint`` reads it as a step-0 checkpoint).

    FileNotFoundError for a missing path or a directory that is neither; CheckpointError for
    a directory that is both (an ImageGPT ``config.json`` beside ``ckpt_*.pt`` files).
    """
    p = Path(path_or_dir)
    if p.is_dir() and is_sharded(p):
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        pretrained = hf_format.is_pretrained_dir(p)
        if latest is not None and pretrained:
            raise CheckpointError(
                f"{p} is both a run directory ({latest.name}) and a transformers ImageGPT "
                "directory (its config.json); pass the checkpoint file itself, or keep the "
                "two in separate directories"
            )
        if pretrained:
            return p
        if latest is None:
            raise FileNotFoundError(
                f"no ckpt_*.pt checkpoint in run directory {p}, and it is not a transformers "
                "ImageGPT directory (no config.json with model_type 'imagegpt')"
            )
        return latest
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def _read_pretrained(path: Path, map_location) -> dict:
    """The step-0 checkpoint of the transformers ImageGPT directory ``path``."""
    try:
        model, palette = load_any(path)
    except OSError:
        raise  # a missing weights file names itself
    except Exception as e:  # noqa: BLE001  (a damaged config or weights file fails in any way)
        lines = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path} is not a readable transformers ImageGPT directory "
            f"({type(e).__name__}: {lines[0] if lines else 'no message'})"
        ) from e
    if map_location is not None and str(map_location) != "cpu":
        model.to(map_location)
    return checkpoint_state(model, step=0, palette=palette, objective="ar")


def read_checkpoint(path, map_location="cpu", *, mmap: bool = False, tensors: bool = True) -> dict:
    """``torch.load(path, weights_only=True)`` of one file, with every way it can fail turned
    into a CheckpointError naming ``path``; the result is a dict with ``model`` and ``config``.

    A pickle of anything but tensors, numbers, strings and containers stays refused. A
    transformers ImageGPT directory gives the step-0 checkpoint of its weights (``mmap`` does
    not apply: safetensors are read as they are). A sharded checkpoint (``.dcp``) gives its
    ``state.pt`` with ``sharded`` (its path) and, unless ``tensors=False``, ``model``: its
    weights gathered into one state dict (the optimizer's shards stay on disk).
    """
    path = Path(path)
    if is_sharded(path):
        return _read_sharded(path, map_location, tensors)
    if path.is_dir():
        if hf_format.is_pretrained_dir(path):
            return _read_pretrained(path, map_location)
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; load_checkpoint(dir) reads a run "
            "directory's latest checkpoint"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (bytes that are not a checkpoint fail in any way)
        raise CheckpointError(_why_unreadable(path, e)) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not an igpt checkpoint (a dict with "
            f"{' and '.join(REQUIRED_KEYS)}); write one with igpt.checkpoint.save_checkpoint"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not an igpt checkpoint: it has no {' or '.join(repr(k) for k in missing)} "
            f"entry (it has {sorted(map(str, ckpt))[:8]}); write one with "
            "igpt.checkpoint.save_checkpoint"
        )
    return ckpt


def _read_sharded(path: Path, map_location, tensors: bool) -> dict:
    """``read_checkpoint`` of a sharded checkpoint directory."""
    why = sharded_damage(path)
    if why is None:
        try:
            state = read_sharded_state(path)
        except Exception as e:  # noqa: BLE001  (bytes that are not a checkpoint fail in any way)
            why = f"its state.pt cannot be read: {type(e).__name__}"
    if why is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({why}); delete it or use an older checkpoint of the run"
        )
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path}: its state.pt is not an igpt checkpoint's (no config)")
    state["sharded"] = str(path)
    if tensors:
        weights = IGPT(model_config(state, path)).state_dict()
        state["model"] = load_sharded(path, {"model": weights}, local=True)["model"]
        if map_location is not None and str(map_location) != "cpu":
            state["model"] = {k: v.to(map_location) for k, v in state["model"].items()}
    return state


def _why_unreadable(path: Path, e: BaseException) -> str:
    """The one sentence for a file torch.load could not read."""
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return f"checkpoint {path} is empty (0 bytes): a write that never finished; delete it"
    with open(path, "rb") as f:
        torch_file = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not torch_file:
        return f"{path} is not a torch checkpoint (its {size} bytes are not a torch.save file)"
    if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(path):
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it holds a {found.group(1)} object" if found else "it holds arbitrary objects"
        return (
            f"igpt refuses to unpickle {path} (weights only: {what}): it is not an igpt "
            "checkpoint or it is from an untrusted source"
        )
    return (
        f"checkpoint {path} is damaged ({size} bytes, truncated or corrupt: "
        f"{type(e).__name__}); delete it or use an older checkpoint of the run"
    )


def load_checkpoint(path_or_dir, map_location="cpu") -> dict:
    """Read a checkpoint (file, run directory: its latest, or a transformers ImageGPT
    directory: a step-0 checkpoint of its weights) with ``weights_only=True``.

    Raises FileNotFoundError for a missing file or a directory without checkpoints and
    CheckpointError (a ValueError) for a file that is not an igpt checkpoint.
    """
    return read_checkpoint(resolve_checkpoint(path_or_dir), map_location)


def load_model(path_or_dir, device=None):
    """Rebuild the model of a checkpoint: returns ``(model, palette_or_None, checkpoint)``.

    ``path_or_dir`` is a file, a run directory or a transformers ImageGPT directory
    (``resolve_checkpoint``). The palette comes back as an ``igpt.palette.Palette`` when the
    checkpoint has one.
    """
    path = resolve_checkpoint(path_or_dir)
    ckpt = read_checkpoint(path)
    return (*model_from_checkpoint(ckpt, path, device), ckpt)


def model_from_checkpoint(ckpt: dict, path, device=None):
    """``(model, palette_or_None)`` of a checkpoint already read from ``path`` (named in
    errors): what ``load_model`` builds, for a caller that needs the dict as well."""
    model = load_weights(IGPT(model_config(ckpt, path)), ckpt, path)
    if device is not None:
        model.to(device)
    palette = Palette(ckpt["palette"]) if "palette" in ckpt else None
    if palette is not None and len(palette) != model.config.n_colors:
        raise CheckpointError(
            f"{path}: its palette has {len(palette)} colours but its model has "
            f"n_colors={model.config.n_colors}; the two must match (tokens are palette ids)"
        )
    return model, palette


def load_any(path):
    """``(model, palette or None)`` from an igpt checkpoint file or run directory, or from a
    transformers ImageGPT directory (or hub id) with its palette when it has one.

    A classifier (a fine-tuning checkpoint, or an ``ImageGPTForImageClassification``
    directory) gives its ``IGPT`` without the class head, and says so in a warning;
    ``igpt.hf.load_classifier`` keeps the head.
    """
    p = Path(path)
    if p.is_file() or (p.is_dir() and not hf_format.is_pretrained_dir(p)):
        model, palette, ckpt = load_model(p)
        if "head" in ckpt:
            log.warning(
                "%s holds a fine-tuned classifier; using its transformer, without the class "
                "head (igpt.hf.load_classifier keeps it)",
                p,
            )
        return model, palette
    model = IGPT.from_pretrained(path)
    has_palette = hf_format.has_processor_config(path)
    return model, Palette.from_pretrained(path) if has_palette else None
