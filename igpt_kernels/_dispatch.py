"""Backend names, their resolution, the measured ``"auto"`` choice, and the shared checks.

Every public op takes ``backend="auto"``. ``resolve`` turns a name into a concrete backend
given which backends the op has and why each one can or cannot run the inputs at hand; for
``"auto"`` it gives the static choice (the first runnable backend of a fixed order).

On a GPU, ``"auto"`` then goes one step further (``Dispatcher.choose``): the first call per
key has PyTorch judge every eligible implementation on the call's own inputs, times those
that pass and keeps the fastest.

    key   = op, GPU name, and the op's fields (dtype, mask kind, head dim, power-of-two
            length buckets, grad or not, ...) plus the names of the eligible candidates,
            so anything that changes eligibility gives a new key.
    judge = ``trust.Judge``: the candidate's output and every gradient the call needs
            against a trusted PyTorch oracle (the reference in float64, or float32 for
            16-bit inputs), within 2x (output) / 3x (gradients) of PyTorch's own error in
            the call's dtype plus a rounding floor; on a slice of large calls. A candidate
            that fails is dropped with one warning; one that raises is dropped and logged.
            The PyTorch backend ("sdpa" for attention, "torch" for the others) needs no
            verdict and is what runs when nothing else passed.
    time  = the median of ``reps`` runs after ``warmup`` runs (and one first run that
            compiles/autotunes), each bracketed by CUDA events, as ``triton.testing.do_bench``
            does. Forward only, or forward + backward when the call needs gradients.

Choices and verdicts live in memory and in ``$XDG_CACHE_HOME/igpt/dispatch-<hash>.json``
(default ``~/.cache/igpt``), one file per header: the GPU name and ``versions``, which name
everything that decides what a verdict judged (``_dispatch_cache.environment``: torch,
triton, igpt_kernels, a digest of the kernel sources, the CUDA runtime and driver), so an
edit of a kernel, a ``git pull`` of an editable install or a driver update makes the old
verdicts unused; the settings that change the code that runs (attention's head-dim-96 mode,
TF32 for float32 GEMMs, autotuning on or off) are fields of the key. A file whose header
differs (or format 1, whose choices were never judged) is ignored. Written atomically
(temporary file + ``os.replace``) under a lock on the folder, merged with what other
processes wrote, per key and per verdict: a FAIL is never overwritten by a later pass for
the same key and backend (in ``record``, in a measured entry, in the file's merge), and a
choice that failed is replaced by the fastest one that has not. Format::

    {"format": 2, "gpu": "NVIDIA H200",
     "versions": {"torch": "2.13.0", "triton": "3.9.0", "igpt_kernels": "0.1.0",
                  "sources": "3f9c...", "cuda": "12.8", "driver": 12080},
     "entries": {"<key>": {"backend": "sdpa-cudnn",
                           "ms": {"triton": 0.41, "sdpa-cudnn": 0.33},
                           "dropped": {"sdpa-flash": "RuntimeError: ..."},
                           "verdicts": {"triton": {"ok": true, "tensor": "dq",
                                                   "err": 0.0039, "torch_err": 0.0078,
                                                   "ratio": 0.5}, ...}}}}

``igpt selftest`` records verdicts without a choice (an entry with only "verdicts").

A transient failure is no verdict: when PyTorch's check cannot run (``judge`` raises
``JudgeUnavailable``, e.g. no memory for the oracle) or a candidate runs out of memory, the
call runs the PyTorch backend, nothing is kept and the next call of its kind is judged again.
The PyTorch backend is pinned where it could pick a failed kernel: once an SDPA kernel
("sdpa-<kernel>") failed the check on a kind of call, that kind's fallback is "sdpa-math"
(PyTorch's math kernel) rather than "sdpa" (``safe_backend``).

Unverified means unused: a static choice never times or judges. While ``torch.compile``
traces or a CUDA graph is captured, ``"auto"`` takes a remembered choice, else the static
kernel only where this GPU's table records a passing verdict for the kind of call, else the
PyTorch backend; under ``IGPT_DISPATCH=fixed`` (``set_dispatch("fixed")``) it takes the
static kernel where verified, else the PyTorch backend. An explicit
backend name runs what it names, unjudged. On the CPU ``"auto"`` is the static choice (the
reference; the quantizer's C++ kernel).

Once a call's choice is settled (taken from the table, or static), later calls with the same
signature (the tuple of values its key, candidates and static choice are made of) get it from
one dictionary look-up (``settled``), a few microseconds, until the table, the mode or a
collaborator changes.

The collaborators ``DISPATCH.device_name``, ``.clock`` and ``.cache_dir`` are the test seams:
tests and outside checks fake a GPU by setting them (see ``Dispatcher``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import warnings
from pathlib import Path

import torch

from igpt_kernels import trust
from igpt_kernels._dispatch_cache import (
    environment,
    failed,
    merge_entry,
    merge_tables,
    read_entries,
    save_merged,
)
from igpt_kernels._triton import HAS_TRITON

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "sdpa", "cublas", "cuda", "cpu", "torch")
MODES = ("measure", "fixed")
OURS = ("triton", "cublas", "cuda", "cpu")  # this package's kernels: a failure of theirs warns
# A PyTorch backend that lets PyTorch pick among sub-kernels, and what it is pinned to once
# one of those ("<prefix><kernel>") failed PyTorch's check on a kind of call: "sdpa" would
# let PyTorch pick the failed flash/efficient/cuDNN kernel again; its math kernel would not.
PINNED = {"sdpa": ("sdpa-", "sdpa-math")}
# Exceptions that say "not now" rather than "wrong": a verdict of theirs is not kept.
TRANSIENT = ("OutOfMemoryError",)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
FORMAT = 2  # 2: entries carry PyTorch's verdicts (format-1 files hold unjudged choices)
UNNAMED = "(a GPU not yet named: first seen while compiling)"
SETTLED_MOST = 4096  # signatures remembered at most (then forgotten all at once)


def triton_interpreting() -> bool:
    """True when Triton kernels run in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class JudgeUnavailable(RuntimeError):
    """PyTorch's check could not run on this call (building the oracle failed, e.g. out of
    memory): a passing state, not a verdict on any kernel. ``judge(names)`` raises it;
    ``Dispatcher.choose`` then keeps no verdict and runs the PyTorch backend for the call."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Unjudged(Exception):
    """Inside ``Dispatcher.choose``: the measurement stopped on a transient failure."""


def transient(verdict: dict) -> bool:
    """Whether a verdict records a transient failure (``"transient": True``, or a candidate
    that ran out of memory), which says nothing about the kernel and is never kept."""
    error = verdict.get("error") or ""
    return verdict.get("transient") is True or error.startswith(TRANSIENT)


def safe_backend(entry: dict | None, safe: str) -> str:
    """The PyTorch backend for the kind of call of ``entry``: ``safe``, or its pinned form
    (``PINNED``) once one of its sub-kernels failed PyTorch's check there (wrong numbers;
    a sub-kernel that only refused the shape leaves PyTorch's pick alone)."""
    pin = PINNED.get(safe)
    if pin is None or not entry:
        return safe
    prefix, pinned = pin
    for name, verdict in (entry.get("verdicts") or {}).items():
        if name.startswith(prefix) and failed(verdict) and not verdict.get("error"):
            return pinned
    return safe


def triton_unavailable(t: torch.Tensor, name: str) -> str | None:
    """None if the Triton kernels can take tensor ``t`` (called ``name``), else why not."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton; Linux only)"
    if t.dtype == torch.float64:
        return (
            "float64 has no Triton kernel (float64 is not a Triton dtype); use float32, "
            "float16 or bfloat16, or backend='torch'"
        )
    if t.is_cuda:
        return None
    if triton_interpreting() and t.device.type == "cpu":
        if t.dtype == torch.bfloat16:
            return (
                "bfloat16 cannot run under TRITON_INTERPRET=1 (Triton's interpreter computes "
                "bfloat16 wrongly); use float32 or float16 on the CPU, or a CUDA tensor"
            )
        return None
    return (
        f"Triton needs CUDA tensors, got {name} on {t.device} (on the CPU it runs only "
        "under TRITON_INTERPRET=1, for tests)"
    )


def resolve(op: str, backend: str, reasons: dict[str, str | None], auto_order: tuple[str, ...]):
    """Pick the backend for one call of ``op``.

    ``reasons`` maps each backend the op has to ``None`` when it can run these inputs, or to
    a sentence saying why not. ``"torch"`` (the reference) can always run. ``"auto"`` takes
    the first runnable backend of ``auto_order`` and falls back to ``"torch"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        for name in auto_order:
            if reasons.get(name, "unavailable") is None:
                return name
        return "torch"
    if backend not in reasons:
        have = ", ".join(repr(b) for b in ("auto", *reasons, "torch"))
        raise ValueError(f"{op} has no {backend!r} backend; use one of {have}")
    why = reasons[backend]
    if why is not None:
        raise ValueError(f"{op} cannot use backend={backend!r} here: {why}")
    return backend


def needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (None entries skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grad_run(fn, tensors):
    """run(name) for ``Dispatcher.choose``: one call ``fn(name, *tensors)``, with a backward
    through detached copies when the call needs gradients (nothing reaches ``.grad``);
    returns the detached output."""

    def run(name):
        if not needs_grad(*tensors):
            return fn(name, *tensors)
        leaves = [
            None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors
        ]
        y = fn(name, *leaves)
        want = [t for t in leaves if t is not None and t.requires_grad]
        torch.autograd.grad(y, want, torch.ones_like(y))
        return y.detach()

    return run


def check_tensor(name: str, t, *, dims=None, dtypes=None, device=None) -> None:
    """Raise TypeError/ValueError naming ``name`` if ``t`` is not a tensor of the given kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype)[6:]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def bucket(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): the length buckets of the keys."""
    return 1 << max(0, int(n) - 1).bit_length()


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


class EventClock:
    """CUDA events as a clock: ``mark()`` records one, ``elapsed_ms(a, b)`` reads two after
    ``sync()``. Tests pass a clock of their own with the same three methods."""

    def mark(self):
        """Record an event on the current stream."""
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        """Wait for the GPU, so recorded events can be read."""
        torch.cuda.synchronize()

    def elapsed_ms(self, a, b) -> float:
        """Milliseconds between two recorded events."""
        return a.elapsed_time(b)


def median_ms(fn, clock, *, warmup: int = 2, reps: int = 5) -> float:
    """Median time of ``fn()`` over ``reps`` runs after ``warmup`` runs, in milliseconds."""
    for _ in range(warmup):
        fn()
    marks = []
    for _ in range(reps):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.sync()
    return statistics.median(clock.elapsed_ms(a, b) for a, b in marks)


def _default_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------------------
# the dispatcher
# --------------------------------------------------------------------------------------


class Dispatcher:
    """Measured ``"auto"``: times the eligible backends once per key and remembers the best.

    Every collaborator can be replaced, so the logic runs on a CPU in tests:
    ``clock`` (``EventClock()``), ``device_name`` (device -> GPU name, or None where auto is
    static: by default the CUDA device's name, None for any other device), ``capturing``
    (whether a CUDA graph is being captured), ``versions`` (the cache file's header;
    default ``_dispatch_cache.environment()``), ``cache_dir`` (default
    ``$XDG_CACHE_HOME/igpt`` or ``~/.cache/igpt``; False: no file). ``device_name``,
    ``clock`` and ``cache_dir`` are the documented test seams: set them on ``DISPATCH`` (or
    pass them here) to fake a GPU on a CPU; setting any attribute forgets the settled
    choices (``settle``), which were made under the old one.
    """

    def __init__(
        self,
        *,
        clock=None,
        device_name=None,
        capturing=None,
        versions=None,
        cache_dir=None,
        mode=None,
        warmup=2,
        reps=5,
    ):
        self.clock = clock
        self.device_name = device_name or self._cuda_name
        self.capturing = capturing or _default_capturing
        self.versions = versions
        self.cache_dir = cache_dir
        self.warmup, self.reps = warmup, reps
        self._mode = None
        if mode is not None:
            self.set_mode(mode)
        self._entries: dict[str, dict[str, dict]] = {}  # gpu -> key -> entry
        self._loaded: set[str] = set()
        self._names: dict = {}
        self._warned_write = False
        # (op, signature) -> the backend a call of that signature got from a settled
        # choice: later calls skip the key, the candidates and the table (``settled``).
        # Emptied whenever the table, the mode or a collaborator changes.
        self._settled: dict = {}

    def __setattr__(self, name, value):
        """Setting a collaborator (``device_name``, ``cache_dir``, ...) or the mode forgets
        the settled choices, which were made under the old one."""
        super().__setattr__(name, value)
        if name != "_settled" and "_settled" in self.__dict__:
            self._settled.clear()

    def settle(self, op: str, sig, backend: str) -> None:
        """Remember that calls of ``op`` with signature ``sig`` run ``backend`` until the
        table or a setting changes. ``sig`` must determine the call's key, its candidates
        and its static choice (each op builds it from the same values)."""
        if len(self._settled) >= SETTLED_MOST:
            self._settled.clear()
        self._settled[(op, sig)] = backend

    # -- settings ------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """Choose how auto decides, one of ``MODES`` (overrides IGPT_DISPATCH)."""
        if mode not in MODES:
            raise ValueError(f"dispatch mode must be one of {MODES}, got {mode!r}")
        self._mode = mode

    @property
    def mode(self) -> str:
        """The mode set, else IGPT_DISPATCH's (default "measure")."""
        if self._mode is None:
            env = os.environ.get("IGPT_DISPATCH", "measure")
            if env not in MODES:
                raise ValueError(f"IGPT_DISPATCH must be one of {MODES}, got {env!r}")
            self._mode = env
        return self._mode

    def _cuda_name(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._names:
            if torch.compiler.is_compiling():
                return UNNAMED  # still a GPU (static order); nothing is looked up or timed
            self._names[index] = torch.cuda.get_device_name(index)
        return self._names[index]

    def gpu(self, device: torch.device) -> str | None:
        """The name auto measures under for ``device``, None where auto stays static."""
        return self.device_name(device)

    # -- the choice ----------------------------------------------------------------------

    @staticmethod
    def key(op: str, fields: dict, names) -> str:
        """The cache key of one kind of call: the op, its fields and the candidates."""
        parts = [op, *(f"{k}={v}" for k, v in fields.items()), "of=" + ",".join(names)]
        return "|".join(parts)

    def choose(self, op, fields, names, static, device, run, *, judge, safe, sig=None) -> str:
        """The backend ``"auto"`` runs for one call.

        names: the eligible candidates; static: the fixed choice (``resolve``'s); safe: the
        PyTorch backend, trusted without a check (pinned by ``safe_backend`` once one of its
        sub-kernels failed); run(name): runs the call once on that backend (forward, or
        forward + backward) for timing; judge(names): a verdict per name
        (``trust.Judge.verdict``), or ``JudgeUnavailable``. A candidate runs only once a
        verdict of this GPU's table (this process or the cache file) says it passed for
        this kind of call and none says it failed. With ``sig``, a choice taken from the
        table (not one just measured, nor one made while compiling or capturing) is
        settled for that signature (``settle``).
        """
        gpu = self.gpu(device)
        if gpu is None:
            return static
        if set(names) <= {safe}:  # nothing of ours can run it: nothing to judge or time
            if sig is not None:
                self.settle(op, sig, safe)
            return safe
        key = self.key(op, fields, names)
        busy = torch.compiler.is_compiling() or self.capturing()
        entries = self._table(gpu, load=not busy)
        hit = entries.get(key)
        fallback = safe_backend(hit, safe)
        fixed = self.mode == "fixed"
        chosen = None if fixed else (hit or {}).get("backend")
        if chosen in (safe, fallback):
            chosen = fallback
        elif chosen not in names or not self.trusted(hit, chosen, safe):
            chosen = None
        if chosen is None and (fixed or busy or gpu == UNNAMED):  # static, where verified
            verified = static != safe and self.trusted(hit, static, safe)
            chosen = static if verified else fallback
            if busy or gpu == UNNAMED:
                return chosen  # the table may hold more once read: nothing settled
        if chosen is not None:
            if sig is not None:
                self.settle(op, sig, chosen)
            return chosen
        try:
            entry = self._measure(op, key, names, safe, run, judge, hit)
        except _Unjudged as e:
            warnings.warn(
                f"igpt_kernels: PyTorch's check of {op} could not run on this call ({e}); "
                f"it runs PyTorch's backend, and the next call of this kind is judged again",
                RuntimeWarning,
                stacklevel=4,
            )
            return fallback
        entries[key] = merge_entry(hit, entry)
        self._settled.clear()
        log.info("igpt_kernels %s on %s: %s (ms %s)", key, gpu, entry["backend"], entry["ms"])
        self._save(gpu)  # which may merge in another process's verdicts
        chosen = entries[key].get("backend")
        return safe_backend(entries[key], safe) if chosen in (None, safe) else chosen

    @staticmethod
    def trusted(entry: dict | None, name: str, safe: str) -> bool:
        """Whether ``name`` may run for the kind of call of ``entry``: the PyTorch backend
        (and its pinned form) always, one of ours only with a passing verdict recorded
        there (a FAIL is never overwritten by a pass: ``_dispatch_cache.merge_verdicts``)."""
        if name == safe or name == PINNED.get(safe, (None, None))[1]:
            return True
        verdict = ((entry or {}).get("verdicts") or {}).get(name)
        return isinstance(verdict, dict) and verdict.get("ok") is True

    def _measure(self, op, key, names, safe, run, judge, hit) -> dict:
        """Judge and time the candidates of one kind of call: the new entry. Raises
        ``_Unjudged`` on a transient failure (no verdict of it is kept)."""
        known = (hit or {}).get("verdicts") or {}
        stuck = {n: known[n] for n in names if n != safe and failed(known.get(n))}
        try:
            verdicts = judge([n for n in names if n != safe and n not in stuck])
        except JudgeUnavailable as e:
            raise _Unjudged(e.reason) from e
        for name, verdict in verdicts.items():
            if transient(verdict):
                raise _Unjudged(f"{name}: {trust.describe(verdict)}")
        clock = self.clock if self.clock is not None else EventClock()
        ms, dropped = {}, {n: "failed PyTorch's check earlier" for n in stuck}
        for name in names:
            verdict = verdicts.get(name, stuck.get(name, {"ok": True}))
            if name in stuck:
                continue
            if not verdict["ok"]:
                dropped[name] = "failed PyTorch's check: " + trust.describe(verdict)
                if verdict.get("error") is None or name in OURS:
                    warn_untrusted(op, key, name, verdict)
                else:  # an SDPA kernel refusing this GPU or shape: expected, recorded
                    log.info("igpt_kernels: %s failed on %s: %s", name, key, verdict["error"])
                continue
            try:
                run(name)  # the first run compiles or autotunes; not timed
                ms[name] = median_ms(
                    lambda n=name: run(n), clock, warmup=self.warmup, reps=self.reps
                )
            except OUT_OF_MEMORY as e:
                raise _Unjudged(f"{name} ran out of memory while timed") from e
            except Exception as e:  # noqa: BLE001 - a backend refusing this GPU or shape
                dropped[name] = f"{type(e).__name__}: {trust.first_line(e)}"
                log.debug("igpt_kernels: %s failed while timing: %s", name, dropped[name])
        compact = {n: trust.compact(v) for n, v in verdicts.items()}
        everything = {**stuck, **compact}
        return {
            "backend": min(ms, key=ms.get) if ms else safe_backend({"verdicts": everything}, safe),
            "ms": {n: round(t, 6) for n, t in ms.items()},
            "dropped": dropped,
            "verdicts": compact,
        }

    def record(self, gpu: str, key: str, verdicts: dict) -> None:
        """Store verdicts (``trust.compact`` form) for one kind of call of ``gpu`` without a
        timed choice (``selftest``), merged with those recorded before (a FAIL stays): a
        later call of that kind times only what passed, and a static choice (compile,
        capture, ``IGPT_DISPATCH=fixed``) may take a kernel that passed."""
        entries = self._table(gpu, load=True)
        entries[key] = merge_entry(entries.get(key), {"verdicts": dict(verdicts)})
        self._settled.clear()
        self._save(gpu)

    # -- the table and its file ------------------------------------------------------------

    def _table(self, gpu: str, *, load: bool) -> dict:
        """The in-memory entries of ``gpu``, merged with its file on first use."""
        entries = self._entries.setdefault(gpu, {})
        if load and gpu not in self._loaded:
            self._loaded.add(gpu)
            entries.update(merge_tables(self._read(gpu), entries))
            self._settled.clear()
        return entries

    def table(self) -> list[dict]:
        """Every remembered choice: rows of gpu, key, backend and the times (ms) measured."""
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                gpu = self.gpu(torch.device("cuda", i))
                if gpu is not None:
                    self._table(gpu, load=True)
        return [
            {"gpu": gpu, "key": key, **entry}
            for gpu, entries in sorted(self._entries.items())
            for key, entry in sorted(entries.items())
        ]

    def header(self, gpu: str) -> dict:
        """What a cache file must match to be read: format, GPU name and versions (by
        default ``_dispatch_cache.environment()``: versions, kernel sources, CUDA, driver)."""
        versions = self.versions if self.versions is not None else environment()
        return {"format": FORMAT, "gpu": gpu, "versions": versions}

    def cache_path(self, gpu: str) -> Path | None:
        """The JSON file of ``gpu``'s choices under these versions (None: no file)."""
        if self.cache_dir is False:
            return None
        if self.cache_dir is not None:
            base = Path(self.cache_dir)
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "igpt"
        header = json.dumps(self.header(gpu), sort_keys=True)
        return base / f"dispatch-{hashlib.sha256(header.encode()).hexdigest()[:16]}.json"

    def _read(self, gpu: str) -> dict:
        return read_entries(self.cache_path(gpu), self.header(gpu))

    def _save(self, gpu: str) -> None:
        """Write ``gpu``'s table, merged with what the file holds now (other processes'
        entries kept, per key and per verdict, a FAIL sticky), and take the merge in."""
        path = self.cache_path(gpu)
        if path is None:
            return
        mine = self._entries.setdefault(gpu, {})
        try:
            mine.update(save_merged(path, self.header(gpu), mine))
            self._settled.clear()
        except OSError as e:
            if not self._warned_write:
                self._warned_write = True
                log.warning("igpt_kernels: cannot write the dispatch cache %s (%s)", path, e)


DISPATCH = Dispatcher()


def choose(op, device, backend, reasons, auto_order, describe, run, judge, safe, sig=None):
    """The backend of one call of ``op``: ``resolve`` for a named backend or where ``"auto"``
    is static (the CPU), else on a GPU the measured choice among the candidates that pass
    PyTorch's check (``Dispatcher.choose``).

    describe(): (candidate names, key fields) of this call; run(name): see ``grad_run``;
    judge(names): see ``judge_call``; safe: the PyTorch backend; sig: the call's signature
    for ``settled`` (None: nothing settled), built from everything that decides
    ``reasons``, ``describe()`` and the device.
    """
    d = DISPATCH
    on_gpu = d.gpu(device) is not None
    static = resolve(op, backend, reasons, auto_order if on_gpu else ())
    if backend != "auto" or not on_gpu:
        if sig is not None and backend == "auto":
            d.settle(op, sig, static)
        return static
    names, fields = describe()
    return d.choose(op, fields, names, static, device, run, judge=judge, safe=safe, sig=sig)


def settled(op: str, sig):
    """The backend ``"auto"`` gave the last call of ``op`` with signature ``sig`` while the
    table and the settings stayed as they are, else None: a few dictionary look-ups instead
    of the key, the candidates and the verdict checks (``Dispatcher.settle``). Never while
    ``torch.compile`` traces, which must see the whole choice."""
    if torch.compiler.is_compiling():
        return None
    return DISPATCH._settled.get((op, sig))


def gpu_name(device) -> str | None:
    """The GPU name the dispatcher works under for ``device`` (None: "auto" is static there,
    as on the CPU)."""
    return DISPATCH.gpu(device)


def judge_call(fn, tensors, arg_names, grad, sample=None, yardstick="torch"):
    """judge(names) for ``choose``: a verdict for each backend name, each candidate run on
    the call itself (``tensors``) and compared with the oracle on ``sample(tensors)``
    (``trust.head_sample``, ``trust.row_sample``; None: the whole call), built once, only
    when something is judged; ``yardstick``: the backend that is PyTorch's own computation
    in the call's dtype. Raises ``JudgeUnavailable`` when the check cannot run."""

    def judge(names):
        if not names:
            return {}
        try:
            part = None if sample is None else sample(tensors)
            j = trust.Judge(fn, tensors, arg_names, grad, part, yardstick=yardstick)
            return {name: j.verdict(name) for name in names}
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: judge nothing now
            why = f"PyTorch's check could not run ({type(e).__name__}: {trust.first_line(e)})"
            raise JudgeUnavailable(why) from e

    return judge


def warn_untrusted(op: str, key: str, name: str, verdict: dict) -> None:
    """The one warning for a candidate that failed PyTorch's check on a kind of call."""
    warnings.warn(
        f"igpt_kernels: {op} backend {name!r} failed PyTorch's check on this GPU for "
        f"{key}: {trust.describe(verdict)}; backend='auto' does not use it for these calls "
        f"(it runs the fastest backend that passed, else PyTorch's). Run `igpt selftest` and "
        f"report its output; backend={name!r} still forces it.",
        RuntimeWarning,
        stacklevel=4,
    )


def set_dispatch(mode: str) -> None:
    """``"measure"`` (the default): on a GPU, ``backend="auto"`` has PyTorch judge the
    eligible backends once per key, times those that pass and keeps the fastest.
    ``"fixed"``: the static choice (as ``IGPT_DISPATCH=fixed``): one of our kernels only
    where this GPU's table records it as verified for the kind of call, else the PyTorch
    backend. This call overrides the environment variable."""
    DISPATCH.set_mode(mode)


def dispatch_table() -> list[dict]:
    """The choices and verdicts ``backend="auto"`` has learned (this process and the cache
    file of each visible GPU): a list of ``{"gpu", "key", "backend", "ms", "dropped",
    "verdicts"}`` (``backend``, ``ms``, ``dropped`` absent where ``igpt selftest`` recorded
    only verdicts; each verdict ``{"ok", "tensor", "err", "torch_err", "ratio"}``)."""
    return DISPATCH.table()
