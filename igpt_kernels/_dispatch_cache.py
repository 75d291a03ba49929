"""The dispatcher's memory of verdicts and choices: how two records of one kind of call merge,
what the cache file's header holds, and reading and writing that file.

Merging is per key and per verdict, and a failed verdict is sticky: a later pass for the same
key and backend (a selftest on synthetic inputs, another process's run, a stale in-memory
table) never clears a FAIL that a real call recorded. A choice whose backend is FAILED after a
merge falls back to the fastest remaining backend of its timings that has not failed (or to
none, so the next call measures again).

The header names everything that decides what a verdict judged (``environment``): the
torch, Triton and package versions, a digest of the kernel sources (``_build``), the CUDA
runtime torch was built with and the driver; the GPU name is the header's own field. A file
whose header differs is never read, so editing a kernel or updating a driver makes the old
verdicts unused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from igpt_kernels import _build
from igpt_kernels._version import VERSION

try:
    import fcntl
except ImportError:  # not POSIX: saves are still atomic, only not serialised
    fcntl = None

log = logging.getLogger(__name__)


def failed(verdict) -> bool:
    """Whether a stored verdict records a FAIL (``{"ok": False, ...}``)."""
    return isinstance(verdict, dict) and verdict.get("ok") is False


def merge_verdicts(old: dict | None, new: dict | None) -> dict:
    """``old`` updated by ``new``, name by name, except that a FAIL in ``old`` stays."""
    out = dict(old or {})
    for name, verdict in (new or {}).items():
        if failed(out.get(name)) and not failed(verdict):
            continue
        out[name] = verdict
    return out


def merge_entry(old: dict | None, new: dict | None) -> dict:
    """One kind of call's record: ``new``'s choice and timings over ``old``'s, the verdicts
    merged (``merge_verdicts``) and the drops of both; a chosen backend that has failed
    is replaced by the fastest timed one that has not (no choice if none is left)."""
    if not old or not new:
        return dict(old or new or {})
    entry = {**old, **new}
    entry["verdicts"] = merge_verdicts(old.get("verdicts"), new.get("verdicts"))
    if "dropped" in old or "dropped" in new:
        entry["dropped"] = {**old.get("dropped", {}), **new.get("dropped", {})}
    verdicts = entry["verdicts"]
    if failed(verdicts.get(entry.get("backend"))):
        ms = {n: t for n, t in (entry.get("ms") or {}).items() if not failed(verdicts.get(n))}
        entry.pop("backend")
        if ms:
            entry["backend"] = min(ms, key=ms.get)
    return entry


def merge_tables(old: dict, new: dict) -> dict:
    """Two tables (key -> entry) merged key by key (``merge_entry``), ``new`` over ``old``."""
    return {key: merge_entry(old.get(key), new.get(key)) for key in old.keys() | new.keys()}


# --------------------------------------------------------------------------------------
# the header
# --------------------------------------------------------------------------------------


def _cuda_driver() -> int | None:
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)  # absent from CPU builds
    if getter is None or not torch.cuda.is_available():
        return None
    try:
        return int(getter())
    except (RuntimeError, OSError):
        return None


@functools.cache
def environment() -> dict:
    """The header's ``versions``, computed once per process: torch, triton, igpt_kernels,
    ``sources`` (``_build.kernel_sources_digest``), ``cuda`` (the runtime torch was built
    with, None without CUDA) and ``driver`` (the CUDA driver's version, None without a GPU)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "igpt_kernels": VERSION,
        "sources": _build.kernel_sources_digest(),
        "cuda": torch.version.cuda,
        "driver": _cuda_driver(),
    }


# --------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------


def read_entries(path: Path | None, header: dict) -> dict:
    """The entries of the cache file at ``path`` if its header is ``header``, else {}."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("igpt_kernels: ignoring unreadable dispatch cache %s (%s)", path, e)
        return {}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in header.items()):
        log.info("igpt_kernels: ignoring dispatch cache %s: written for other versions", path)
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {
        k: e
        for k, e in entries.items()
        if isinstance(e, dict)
        and (isinstance(e.get("backend"), str) or isinstance(e.get("verdicts"), dict))
    }


@contextlib.contextmanager
def locked(folder: Path):
    """An exclusive lock on ``folder`` itself (no lock file), so that a read-merge-write of
    the cache by one process does not interleave with another's; a no-op without flock."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def save_merged(path: Path, header: dict, mine: dict) -> dict:
    """Merge ``mine`` (key -> entry) with what the file at ``path`` holds now (another
    process may have written since it was read) and write the result atomically (temporary
    file + ``os.replace``); returns the merged table. Raises OSError if it cannot write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        entries = merge_tables(read_entries(path, header), mine)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dispatch-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**header, "entries": entries}, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return entries
