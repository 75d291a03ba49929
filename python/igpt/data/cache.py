"""The token cache: a split tokenised once into a uint16 memmap, in bounded chunks, resumably.

    record = base_record(spec_key, split, palette, n_px)    # what made the tokens
    record["files"], watch = fingerprint(source, arg, split)
    build_entry(image_set, palette, n_px, folder, key=record, workers=2)
    tokens, labels = read_entry(folder)                     # uint16 memmap (N, n_px * n_px)

**The key.** An entry is named by a digest of everything that made its tokens: the spec
(absolute path), split, n_px, the palette's hash, the resize rule, ``TOKENS_VERSION`` (the
tokenising code) and ``files``, a digest of (path, size, mtime_ns) of every file the reader
reads, listed as the reader lists them (symlinked folders followed). Tokens of in-memory
``data=`` are keyed by a digest of the data itself instead of the files.

**A cheap second start.** Computing ``files`` stats every file (ImageNet: 1.28M). So beside
the entries, ``index/<digest of the record without files>.json`` holds the entry last built
for the spec and a *watch list*: [path, size, mtime_ns] of every folder the reader listed,
and of every file where a set has at most ``WATCH_FILES`` of them (cifar, npz, imagenet) or
its kind lists no folders.
A start whose watch list is unchanged uses that entry after a few thousand ``stat`` calls
(one per folder), none per image; any difference sends it to the full fingerprint. So a
start detects, without ``verify``: a file added, removed or renamed in any listed folder (the
folder's mtime changes), a symlink re-pointed (its folder's entry changes, and the folder
reached is another), and any change to the files of a set of at most ``WATCH_FILES`` files.
It does not detect an image rewritten in place under the same name in a large folder (its
folder's listing is unchanged): ``verify=True`` (``igpt prepare --verify``) stats every
file and detects that too. A watch list is not written while any folder in it changed in
the last ``SETTLE_S`` seconds, so a change within the file system's timestamp grain of the
listing is still seen (the next start takes the full path).

An entry is a folder ``tokens/<key>/`` holding ``tokens.u16`` (N x n_px² uint16, raster
order), ``labels.npy`` (int64, when the set has labels) and ``meta.json`` (shape, labels or
not, the key's record), written last: an entry without ``meta.json`` is never read as tokens.

**Building** goes one chunk of ``CHUNK`` images at a time: worker processes read, decode,
resize and quantize a chunk (``ImageSet.read``, ``resize``, the palette's C++ kernel, as
``tokenize`` does), this process appends it to ``tokens.u16.part`` (and, for a labelled
set, ``labels.part``); after each chunk the files are flushed to disk and ``progress.json``
records how many chunks and rows are done. Killed at any moment, the next build cuts the
part files back to what ``progress.json`` records and goes on from the next chunk, labelled
or not, so its tokens are the bytes an uninterrupted build writes. Memory holds a few chunks
at a time, whatever the set's size. One process builds an entry at a time (a lock file in
the entry); others wait for it and then read what it wrote.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from igpt._io import atomic_write_bytes
from igpt.data.base import SHOWN, available_cores, files_digest, report_unreadable, stamp
from igpt.transforms import resize

log = logging.getLogger(__name__)

CHUNK = 256  # images per chunk: resumable at this grain, a few of them in memory
PARTS = ("tokens.u16.part", "labels.part", "progress.json")
# raise whenever the same files could give other tokens (resizing, quantizing, row order)
TOKENS_VERSION = 2
RESIZE_RULE = "PIL bilinear to n_px; mixed-size folders: centre square, one resize to n_px"
WATCH_FILES = 64  # sets of at most this many files have every file checked on each start
SETTLE_S = 2.0  # a watch list is written only once its folders are this old


class TokenSplit(NamedTuple):
    """A labelled split as tokens: what ``igpt.evaluation.evaluate`` takes in place of
    ``ImageData``.

    ``tokens``: integer (N, n_px * n_px) numpy array or tensor in raster order (e.g. the
    uint16 memmap ``igpt.data.cached_tokens`` returns, read a batch at a time);
    ``labels``: integer (N,) or None. ``TokenSplit(*cached_tokens(...))`` builds one."""

    tokens: Any
    labels: Any


# ----------------------------------------------------------------------------- key


def palette_hash(palette) -> str:
    """A short hex digest of the palette's float32 centroids."""
    c = getattr(palette, "centroids", palette)
    c = torch.as_tensor(c, dtype=torch.float32).cpu().contiguous().numpy()
    return hashlib.sha256(c.tobytes()).hexdigest()[:16]


def data_digest(data) -> str:
    """A digest of in-memory ``ImageData``: its images' shape and bytes and its labels."""
    h = hashlib.sha256(repr(data.images.shape).encode())
    h.update(np.ascontiguousarray(data.images).data)
    if data.labels is not None:
        h.update(np.ascontiguousarray(data.labels, np.int64).data)
    return h.hexdigest()[:16]


def base_record(spec_key: str, split: str, palette, n_px: int, data=None) -> dict:
    """What made the tokens, but for the files: spec (absolute), split, n_px, palette, the
    resize rule and the code's version; with ``data``, a digest of it."""
    record = {
        "spec": spec_key,
        "split": split,
        "n_px": n_px,
        "palette": palette_hash(palette),
        "resize": RESIZE_RULE,
        "code": TOKENS_VERSION,
    }
    if data is not None:
        record["data"] = data_digest(data)
    return record


def entry_name(record: dict) -> str:
    """The digest that names the entry (or index file) of ``record``."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def fingerprint(source, arg, split: str) -> tuple[str, list]:
    """(digest of (path, size, mtime_ns) of every file ``source`` reads for ``split``, the
    watch list a later start checks: see the module docstring)."""
    root, files, dirs = source.files(arg, split)
    watch = [stamp(d) for d in dirs]  # before the files: a change meanwhile shows next time
    digest = files_digest(root, files)
    if len(files) <= WATCH_FILES or not dirs:  # no folder listing to stand for them
        watch += [stamp(f) for f in files]
    return digest, watch


def spec_key(spec: str) -> str:
    """The spec with its path made absolute."""
    from igpt.data.sources import source_of

    source, arg = source_of(spec)
    return source.spec_key(arg)


def source_fingerprint(spec: str, split: str = "all") -> str:
    """A digest of (path, size, mtime_ns) of every file the reader of ``spec`` reads for
    ``split``, so that a data set edited or replaced in place gets a new cache entry."""
    from igpt.data.sources import source_of

    source, arg = source_of(spec)
    return fingerprint(source, arg, split)[0]


def cache_key(spec: str, split: str, palette, n_px: int) -> tuple[str, dict]:
    """(entry name, the record it digests) of ``spec``'s split as its files are now."""
    record = base_record(spec_key(spec), split, palette, n_px)
    record["files"] = source_fingerprint(spec, split)
    return entry_name(record), record


def watched_entry(index: Path) -> str | None:
    """The entry name ``index`` records, where every path of its watch list is as it was;
    None where anything differs or the index is missing or damaged."""
    try:
        saved = json.loads(index.read_text())
        for path, size, mtime in saved["watch"]:
            if stamp(path) != [path, size, mtime]:
                return None
        return str(saved["entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_index(index: Path, name: str, watch: list) -> None:
    """Record ``name`` and its watch list, unless a folder in it changed a moment ago."""
    if any(mtime > time.time_ns() - SETTLE_S * 1e9 for _, _, mtime in watch):
        return
    index.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(index, json.dumps({"entry": name, "watch": watch}).encode())


# ----------------------------------------------------------------------------- reading


def read_entry(folder: Path):
    """(tokens memmap, labels) of a complete entry; raises when any part is damaged or the
    entry is not complete (no ``meta.json``)."""
    meta = json.loads((folder / "meta.json").read_text())
    shape = tuple(int(v) for v in meta["shape"])
    if len(shape) != 2 or (folder / "tokens.u16").stat().st_size != 2 * shape[0] * shape[1]:
        raise ValueError(f"tokens.u16 does not hold the {shape} tokens meta.json records")
    tokens = np.memmap(folder / "tokens.u16", np.uint16, "r", shape=shape)
    labels = np.load(folder / "labels.npy") if meta["has_labels"] else None
    if labels is not None and len(labels) != shape[0]:
        raise ValueError(f"labels.npy has {len(labels)} labels for {shape[0]} images")
    return tokens, labels


READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError)


@contextlib.contextmanager
def entry_lock(folder: Path):
    """Hold the entry's lock file: one builder at a time, across processes and ranks."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("token cache: another process is preparing %s; waiting for it", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        _HELD.add(f.fileno())
        try:
            yield
        finally:
            _HELD.discard(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)


_HELD = set()  # descriptors of the lock files held here: forked workers close their copies


# ----------------------------------------------------------------------------- building


def build_entry(
    images,
    palette,
    n_px: int,
    folder: Path,
    *,
    key: dict,
    workers: int | None = None,
    chunk: int | None = None,
    progress: bool | None = None,
) -> bool:
    """Tokenise the ``ImageSet`` ``images`` into the entry ``folder`` (module docstring).

    Args:
        images: an ``igpt.data.ImageSet``; palette: with ``quantize`` and ``len``.
        key: the record ``cache_key`` gave, kept in ``meta.json``.
        workers: processes that read and resize (0: this process; None: the available
            cores, or 0 for a set of at most 4 chunks).
        chunk: images per chunk (default ``CHUNK``).
        progress: a tqdm bar with images/s; None: only where stderr is a terminal.

    Returns:
        False when another process had already completed the entry, True when built here.
    """
    chunk = CHUNK if chunk is None else int(chunk)
    with entry_lock(folder):
        if (folder / "meta.json").is_file():
            try:
                read_entry(folder)
                return False
            except READ_ERRORS:
                pass  # the caller said so; rebuilt below
        labelled = images.labels is not None
        plan = {"images": len(images), "chunk": int(chunk), "n_px": int(n_px), "key": key,
                "labels": labelled}  # fmt: skip
        state = _resume_state(folder, plan, n_px * n_px)
        n_chunks = -(-len(images) // chunk)
        if workers is None:  # processes pay off from a few chunks on
            workers = available_cores() if n_chunks > 4 else 0
        start = time.perf_counter()
        if state["chunks"] < n_chunks:
            _table_before_fork(palette, (len(images) - state["rows"]) * n_px * n_px)
            first = state["chunks"]
            with _chunk_results(images, palette, n_px, chunk, first, n_chunks, workers) as res:
                _write_chunks(res, folder, plan, state, progress, images)
        where = images.name or str(folder)
        report_unreadable(where, state["unreadable"], len(images), count=state["skipped"])
        _finish(folder, plan, state, labelled, images.skipped)
        took = time.perf_counter() - start
        log.info(
            "token cache: wrote %s (%d x %d) in %.1f s (%d workers)",
            folder, state["rows"], n_px * n_px, took, workers,
        )  # fmt: skip
        return True


def _resume_state(folder: Path, plan: dict, n: int) -> dict:
    """Where a build of ``plan`` starts: the state of an interrupted one with the part files
    cut back to it, or a fresh start with every old file of the entry removed."""
    try:
        state = json.loads((folder / "progress.json").read_text())
        if state["plan"] != plan:
            raise ValueError("another plan")
        rows = int(state["rows"])
        parts = (("tokens.u16.part", 2 * n), ("labels.part", 8))
        for name, width in parts if plan["labels"] else parts[:1]:
            path = folder / name
            if path.exists() and path.stat().st_size < rows * width:
                raise ValueError(f"{name} is shorter than progress.json records")
            if path.exists():
                os.truncate(path, rows * width)  # drop a chunk written after the last record
        if state["chunks"]:
            log.info("token cache: resuming %s after %d chunk(s)", folder, state["chunks"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name in ("meta.json", "tokens.u16", "labels.npy", *PARTS):
        (folder / name).unlink(missing_ok=True)
    return {"plan": plan, "chunks": 0, "rows": 0, "skipped": 0, "unreadable": []}


def _write_chunks(results, folder, plan, state, progress, images) -> None:
    from tqdm.auto import tqdm

    show = progress if progress is not None else _stderr_is_terminal()
    chunk = plan["chunk"]
    bar = tqdm(
        total=len(images),
        initial=min(state["chunks"] * chunk, len(images)),
        desc=f"tokenising {images.name or 'images'}",
        unit="img",
        disable=not show,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(bar)
        tok = stack.enter_context(open(folder / "tokens.u16.part", "ab"))
        files = [tok]
        if plan["labels"]:  # an unlabelled set has no labels.part to keep in step
            files.append(stack.enter_context(open(folder / "labels.part", "ab")))
        for tokens, labels, unreadable in results:
            tok.write(tokens.tobytes())
            if plan["labels"]:
                files[1].write(np.ascontiguousarray(labels, np.int64).tobytes())
            for f in files:  # on disk before progress.json says so
                f.flush()
                os.fsync(f.fileno())
            state["chunks"] += 1
            state["rows"] += len(tokens)
            state["skipped"] += len(unreadable)
            state["unreadable"] = (state["unreadable"] + unreadable)[:SHOWN]
            atomic_write_bytes(folder / "progress.json", json.dumps(state).encode())
            bar.update(min(chunk, len(images) - (state["chunks"] - 1) * chunk))


def _finish(folder: Path, plan: dict, state: dict, has_labels: bool, listed: int) -> None:
    """Turn the part files into the entry; ``meta.json`` last. Safe to repeat after a kill."""
    rows, width = state["rows"], plan["n_px"] ** 2
    part = folder / "tokens.u16.part"
    if part.exists() and part.stat().st_size == 2 * rows * width:
        os.replace(part, folder / "tokens.u16")  # else a kill came after this rename
    if (folder / "tokens.u16").stat().st_size != 2 * rows * width:
        raise ValueError(f"{folder}: tokens.u16 does not hold {rows} x {width} tokens")
    if has_labels:
        if (folder / "labels.part").exists():
            labels = np.fromfile(folder / "labels.part", np.int64)
            buf = io.BytesIO()
            np.save(buf, labels)
            atomic_write_bytes(folder / "labels.npy", buf.getvalue())
    meta = {"shape": [rows, width], "has_labels": has_labels, "key": plan["key"]}
    if state["skipped"] + listed:  # unreadable: found by the listing, or when decoding
        meta["skipped"] = state["skipped"] + listed
    atomic_write_bytes(folder / "meta.json", json.dumps(meta, indent=2).encode())  # written last
    for name in PARTS:
        (folder / name).unlink(missing_ok=True)


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ----------------------------------------------------------------------------- workers


def _table_before_fork(palette, pixels: int) -> None:
    """Build the palette's 2^24-entry lookup table here, once, when the pixels to quantize
    pay for it (``igpt_kernels.palette.LUT_WORK``): forked workers share it, where each
    would otherwise quantize its first millions of pixels directly and then build its own."""
    from igpt_kernels import palette as kernels_palette

    centroids = getattr(palette, "centroids", None)
    work = kernels_palette.LUT_WORK.get("cpu")
    if centroids is None or work is None or pixels < work // len(palette):
        return
    try:
        kernels_palette.get_lut(centroids.to("cpu", torch.float32).contiguous())
    except ValueError as e:  # no compiled kernels: quantize runs the reference
        log.debug("token cache: no lookup table (%s)", e)


_WORKER = {}  # a worker process's set, palette and side, given once by its initializer


def _worker_init(images, palette, n_px: int) -> None:
    _WORKER.update(images=images, palette=palette, n_px=n_px)
    # a forked child must not enter the parent's OpenMP thread pool (GNU OpenMP is not
    # fork-safe); one thread per worker is the parallelism anyway
    torch.set_num_threads(1)
    for fd in list(_HELD):  # a worker outliving a killed builder must not hold its lock
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    with contextlib.suppress(Exception):  # Linux: end with the builder, even on SIGKILL
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def read_chunk(images, palette, n_px: int, start: int, stop: int):
    """Rows ``start`` .. ``stop - 1`` of ``images`` read, brought to n_px x n_px and
    quantized: (uint16 tokens (m, n_px * n_px), labels (m,) or None, the paths of the files
    that could not be read)."""
    data = images.read(start, stop)
    tokens = np.zeros((0, n_px * n_px), np.uint16)
    if len(data.images):
        ids = palette.quantize(resize(data.images, n_px)).reshape(len(data.images), -1)
        tokens = ids.cpu().numpy().astype(np.uint16)
    return tokens, data.labels, data.unreadable


def _worker_chunk(start: int, stop: int):
    w = _WORKER
    return read_chunk(w["images"], w["palette"], w["n_px"], start, stop)


@contextlib.contextmanager
def _chunk_results(images, palette, n_px, chunk, first, n_chunks, workers):
    """Chunks ``first`` .. ``n_chunks - 1`` in order (``read_chunk``), made by ``workers``
    processes (a few chunks ahead, never more) or here."""
    bounds = [(i * chunk, min((i + 1) * chunk, len(images))) for i in range(first, n_chunks)]
    if workers <= 0 or not bounds:
        yield (read_chunk(images, palette, n_px, a, b) for a, b in bounds)
        return
    # fork: workers start at once with the set as it is here (a million paths are not
    # pickled), and never import the caller's __main__ (an unguarded script would run again
    # and wait on the entry's lock); they decode, resize and quantize on the CPU, one
    # thread each
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    if ctx.get_start_method() == "fork":
        # quantize one pixel here, so that the workers inherit what a first call sets up
        # (the compiled module) instead of each loading it
        palette.quantize(np.zeros((1, 3), np.uint8))
    with ctx.Pool(workers, initializer=_worker_init, initargs=(images, palette, n_px)) as pool:

        def ordered():
            pending = collections.deque()
            todo = iter(bounds)
            for a, b in todo:
                pending.append(pool.apply_async(_worker_chunk, (a, b)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                out = pending.popleft().get()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.apply_async(_worker_chunk, nxt))
                yield out

        yield ordered()
