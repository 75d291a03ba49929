"""All-or-nothing file writes: a crash leaves the old file or the new one, never half of one.

The content goes to a temporary file ``.<name>.<8 random characters>.tmp`` in the target's
folder, is flushed to disk, and is then renamed over the target (a rename within one file
system is atomic). The temporary file is created with mode 0666 less the umask, as
``open()`` creates files, so the result has the mode of every other file of the folder.
A process killed mid-write leaves its temporary file behind; ``remove_stale_temp_files``
removes such leftovers of one folder (the run directory does on start) and nothing else,
among them the temporary directories of sharded checkpoints (``igpt.sharded``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# ".<target name>.<8 of [a-z0-9_]>.tmp": this module's names (and tempfile.mkstemp's, which
# it used before); nothing else of a run directory looks like it
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path``: (file descriptor, its path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp  # the umask applies, as for open()
        except FileExistsError:
            continue


def atomic_write(path, write) -> Path:
    """Call ``write(f)`` with a binary file object, then move the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(payload))


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files (and sharded checkpoints' temporary directories) that
    killed atomic writes left in ``folder`` (not inside its sub-folders); only names of this
    module's pattern. Returns the paths removed.

    Call it only where no other process is writing into ``folder`` at the same time.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if not TEMP_NAME.match(p.name) or p.is_symlink():
            continue
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info(
            "removed %d temporary file(s) a killed run left in %s: %s",
            *(len(removed), folder, ", ".join(p.name for p in removed)),
        )
    return removed
