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
(default ``~/.cache/igpt``), one file per GPU name and torch/triton/igpt_kernels versions,
written atomically (temporary file + ``os.replace``) and merged with what other processes
wrote; a file whose header names other versions (or format 1, whose choices were never
judged) is ignored. Format::

    {"format": 2, "gpu": "NVIDIA H200",
     "versions": {"torch": "2.13.0", "triton": "3.9.0", "igpt_kernels": "0.1.0"},
     "entries": {"<key>": {"backend": "sdpa-cudnn",
                           "ms": {"triton": 0.41, "sdpa-cudnn": 0.33},
                           "dropped": {"sdpa-flash": "RuntimeError: ..."},
                           "verdicts": {"triton": {"ok": true, "tensor": "dq",
                                                   "err": 0.0039, "torch_err": 0.0078,
                                                   "ratio": 0.5}, ...}}}}

``igpt selftest`` records verdicts without a choice (an entry with only "verdicts").

Unverified means unused: a static choice never times or judges. While ``torch.compile``
traces or a CUDA graph is captured, ``"auto"`` takes a remembered choice, else the static
kernel only where this GPU's table records a passing verdict for the kind of call, else the
PyTorch backend; under ``IGPT_DISPATCH=fixed`` (``set_dispatch("fixed")``) it takes the
static kernel where verified, else the PyTorch backend. An explicit
backend name runs what it names, unjudged. On the CPU ``"auto"`` is the static choice (the
reference; the quantizer's C++ kernel).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from igpt_kernels import trust
from igpt_kernels._triton import HAS_TRITON
from igpt_kernels._version import VERSION

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "sdpa", "cublas", "cuda", "cpu", "torch")
MODES = ("measure", "fixed")
OURS = ("triton", "cublas", "cuda", "cpu")  # this package's kernels: a failure of theirs warns
FORMAT = 2  # 2: entries carry PyTorch's verdicts (format-1 files hold unjudged choices)
UNNAMED = "(a GPU not yet named: first seen while compiling)"


def triton_interpreting() -> bool:
    """True when Triton kernels run in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "igpt_kernels": VERSION}


# --------------------------------------------------------------------------------------
# the dispatcher
# --------------------------------------------------------------------------------------


class Dispatcher:
    """Measured ``"auto"``: times the eligible backends once per key and remembers the best.

    Every collaborator can be replaced, so the logic runs on a CPU in tests:
    ``clock`` (``EventClock()``), ``device_name`` (device -> GPU name, or None where auto is
    static: by default the CUDA device's name, None for any other device), ``capturing``
    (whether a CUDA graph is being captured), ``versions`` (the cache file's header),
    ``cache_dir`` (default ``$XDG_CACHE_HOME/igpt`` or ``~/.cache/igpt``; False: no file).
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

    def choose(self, op, fields, names, static, device, run, *, judge, safe) -> str:
        """The backend ``"auto"`` runs for one call.

        names: the eligible candidates; static: the fixed choice (``resolve``'s); safe: the
        PyTorch backend, trusted without a check; run(name): runs the call once on that
        backend (forward, or forward + backward) for timing; judge(names): a verdict per
        name (``trust.Judge.verdict``). A candidate runs only once a verdict of this GPU's
        table (this process or the cache file) says it passed for this kind of call.
        """
        gpu = self.gpu(device)
        if gpu is None:
            return static
        if set(names) <= {safe}:
            return safe  # nothing of ours can run it: nothing to judge or time
        key = self.key(op, fields, names)
        busy = torch.compiler.is_compiling() or self.capturing()
        entries = self._table(gpu, load=not busy)
        hit = entries.get(key)
        if self.mode == "fixed":  # no measured choice: the static one, where verified
            return static if self.trusted(hit, static, safe) else safe
        chosen = (hit or {}).get("backend")
        if chosen in (*names, safe) and self.trusted(hit, chosen, safe):
            return chosen
        if busy or gpu == UNNAMED:
            return static if self.trusted(hit, static, safe) else safe
        try:
            entry = self._measure(op, key, names, safe, run, judge)
        except JudgeUnavailable as e:  # transient: no verdict, judged again on a later call
            warnings.warn(
                f"igpt_kernels: {e}; backend='auto' runs PyTorch's backend for this call",
                RuntimeWarning,
                stacklevel=4,
            )
            return safe
        entries[key] = {**(hit or {}), **entry}
        log.info("igpt_kernels %s on %s: %s (ms %s)", key, gpu, entry["backend"], entry["ms"])
        self._save(gpu)
        return entry["backend"]

    @staticmethod
    def trusted(entry: dict | None, name: str, safe: str) -> bool:
        """Whether ``name`` may run for the kind of call of ``entry``: the PyTorch backend
        always, one of ours only with a passing verdict recorded there."""
        if name == safe:
            return True
        verdict = ((entry or {}).get("verdicts") or {}).get(name)
        return isinstance(verdict, dict) and verdict.get("ok") is True

    def _measure(self, op, key, names, safe, run, judge) -> dict:
        verdicts = judge([n for n in names if n != safe])
        clock = self.clock if self.clock is not None else EventClock()
        ms, dropped = {}, {}
        for name in names:
            verdict = verdicts.get(name, {"ok": True})
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
            except Exception as e:  # noqa: BLE001 - a backend refusing this GPU or shape
                dropped[name] = f"{type(e).__name__}: {trust.first_line(e)}"
                log.debug("igpt_kernels: %s failed while timing: %s", name, dropped[name])
        return {
            "backend": min(ms, key=ms.get) if ms else safe,
            "ms": {n: round(t, 6) for n, t in ms.items()},
            "dropped": dropped,
            "verdicts": {n: trust.compact(v) for n, v in verdicts.items()},
        }

    def record(self, gpu: str, key: str, verdicts: dict) -> None:
        """Store verdicts (``trust.compact`` form) for one kind of call of ``gpu`` without a
        timed choice (``selftest``): a later call of that kind times only what passed, and
        a static choice (compile, capture, ``IGPT_DISPATCH=fixed``) may take a kernel that
        passed."""
        entries = self._table(gpu, load=True)
        entry = entries.setdefault(key, {})
        entry["verdicts"] = {**entry.get("verdicts", {}), **verdicts}
        self._save(gpu)

    # -- the table and its file ------------------------------------------------------------

    def _table(self, gpu: str, *, load: bool) -> dict:
        """The in-memory entries of ``gpu``, read from its file on first use."""
        entries = self._entries.setdefault(gpu, {})
        if load and gpu not in self._loaded:
            self._loaded.add(gpu)
            for key, entry in self._read(gpu).items():
                entries.setdefault(key, entry)
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
        """What a cache file must match to be read: format, GPU name and versions."""
        versions = self.versions if self.versions is not None else _versions()
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
        path = self.cache_path(gpu)
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("igpt_kernels: ignoring unreadable dispatch cache %s (%s)", path, e)
            return {}
        header = self.header(gpu)
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

    def _save(self, gpu: str) -> None:
        path = self.cache_path(gpu)
        if path is None:
            return
        entries = {**self._read(gpu), **self._entries.get(gpu, {})}
        data = {**self.header(gpu), "entries": entries}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dispatch-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            if not self._warned_write:
                self._warned_write = True
                log.warning("igpt_kernels: cannot write the dispatch cache %s (%s)", path, e)


DISPATCH = Dispatcher()


def choose(op, device, backend, reasons, auto_order, describe, run, judge, safe) -> str:
    """The backend of one call of ``op``: ``resolve`` for a named backend or where ``"auto"``
    is static (the CPU), else on a GPU the measured choice among the candidates that pass
    PyTorch's check (``Dispatcher.choose``).

    describe(): (candidate names, key fields) of this call; run(name): see ``grad_run``;
    judge(names): see ``judge_call``; safe: the PyTorch backend.
    """
    on_gpu = DISPATCH.gpu(device) is not None
    static = resolve(op, backend, reasons, auto_order if on_gpu else ())
    if backend != "auto" or not on_gpu:
        return static
    names, fields = describe()
    return DISPATCH.choose(op, fields, names, static, device, run, judge=judge, safe=safe)


def gpu_name(device) -> str | None:
    """The GPU name the dispatcher works under for ``device`` (None: "auto" is static there,
    as on the CPU)."""
    return DISPATCH.gpu(device)


class JudgeUnavailable(RuntimeError):
    """PyTorch's check could not run for a call (no memory for the oracle, say): it says
    nothing about the kernels, so no verdict is kept and that call runs PyTorch's backend."""


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
