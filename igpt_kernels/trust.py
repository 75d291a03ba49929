"""PyTorch judges the kernels: a candidate backend is trusted for a kind of call only if its
output and every gradient the call needs agree with a trusted PyTorch oracle, row by row, as
closely as PyTorch's own computation in the call's dtype does.

The candidate runs **the call itself**: the same tensors, shapes, strides, launch and
autotune config as the call it is to serve. Only the oracle is restricted, to a sample of
the call that covers each structural class of it (``Sample``), so that the float64
reference never costs the memory the kernels exist to save:

    attention  whole (batch, head) pairs, every query and key of each: the first and last
               batch and head, a head past the first group of four in a later batch, the
               batch with the fewest visible keys, then seeded random pairs, at most
               ``MAX_PAIRS`` (``head_sample``); each pair's output and gradients depend on
               that pair's inputs only, so the oracle of the pair is exact.
    ln_mlp     rows: the first and last rows, the rows around the last multiples of 16-128
    ln_linear  (the ragged last tiles), rows past the first 4096, then seeded random rows, at
               most ``MAX_ROWS`` (``row_sample``). The cotangent is zero on the other rows,
               so the candidate's weight gradients (sums over rows) are exactly the sampled
               rows' sums, which the oracle computes.

With inputs x, a fixed random cotangent g (``cotangent``) and the sample S:

    candidate  the backend judged, on the whole call: output and vector-Jacobian products
    oracle     the reference ("torch") on S's inputs upcast to float64 (float32 inputs) or
               float32 (16-bit inputs), autocast off
    pytorch    the reference on S's inputs as given, under the caller's autocast: PyTorch's
               own computation in the call's dtype

and for each tensor t (the output, then the gradient of each input that needs one), row
by row (a row: the last dimension; a query's output, a key's gradient, a token's output):

    err(r)   = max_j |candidate - oracle|         torch_err(r) = max_j |pytorch - oracle|
    bound(r) = m * torch_err(r) + u * eps * max(max_j |oracle|, typical(t), MIN_SCALE)
    m = 2 for the output, 3 for gradients (flash-attention's test rule)

where eps is the computing dtype's (autocast's where it applies) and typical(t) the median
of the largest |oracle| of the tensor's rows that are not all zero (the output's for a
gradient that is zero everywhere). A fault in one row (the ragged
last block, the last query, a padded row) is weighed against that row's size and
PyTorch's error there, not hidden under the largest element of the tensor. The floor is
one unit of rounding for 16-bit dtypes (u = 1: their errors come from rounding inputs and
outputs) and u = 8 for float32 (accumulation order), at the row's size or the tensor's
typical size, whichever is larger: a row whose value is a cancellation (the gradient of a
query that sees one key is 0) is as inexact as the terms it sums, for any kernel. 16-bit
gradients get u = 4: a flash backward takes Delta = rowsum(dO * O) from the output
rounded to the dtype, which leaves such a row a few units of the typical row off (SDPA's
flash kernel as much as ours), where eager PyTorch's autograd cancels exactly; float32
gradients get u = 32 for the same reason (faults there are thousands of units off).

For 16-bit calls two more checks: the root mean square error over the whole sample
(``rms_check``) and, for bfloat16, the call's float16 twin (``fp16_twin``), where a fault
of 1% is eight rounding units instead of one. A NaN or inf where the oracle is finite (or the
reverse) is an infinite error. The candidate passes when every row of every tensor is within
its bound. The oracle is never a kernel of ours.

Cost of a first call: the candidate's own call once more, and the oracle on the sample:
for attention ``MAX_PAIRS`` heads at the call's length in float64 or float32, computed a
few pairs at a time so no part holds over ``PAIR_ELEMENTS`` scores (README, "What auto
trusts", has the numbers at iGPT-S/M/L shapes).

The palette quantizer is integer-valued: its tokens must equal ``exact_tokens`` (float64
distances, the lowest index on exact ties) on a sample of the call's pixels.
"""

from __future__ import annotations

import contextlib
import math

import torch

OUT_MULTIPLE = 2.0
GRAD_MULTIPLE = 3.0
MIN_SCALE = 1e-3  # the smallest magnitude a floor is taken at
FLOOR_UNITS = {torch.float32: 8.0}  # the rounding floor in eps of the dtype (default 1)
GRAD_FLOOR_UNITS = {torch.float32: 32.0}  # ... of gradients (default 4: see above)
MAX_PAIRS = 8  # (batch, head) pairs of attention the oracle recomputes at most
PAIR_ELEMENTS = 1 << 25  # scores (Nq x Nk per pair) in one part of the oracle: 256 MiB f64
MAX_ROWS = 256  # rows of ln_mlp / ln_linear the oracle recomputes at most
RMS_MULTIPLE = 1.75  # 16-bit: the sample's rms error against PyTorch's (rms_check)
RMS_FLOOR = 0.1  # ... plus this many eps of the oracle's rms
RMS_MIN_ELEMENTS = 4096  # smaller samples are too few for a steady rms
FP16_FIT = 60000.0  # bfloat16 inputs up to this size have a float16 twin (fp16_twin)
MAX_PIXELS = 4096  # pixels of a quantize call compared at most
SEED = 20261207


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float32 (and float64) inputs, float32 for 16-bit ones."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a call on ``t`` computes in: autocast's for float32 inputs under autocast on
    t's device, else t's own. Its eps sets the rounding floor."""
    kind = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _upcast(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad) if _is_float(t) else t


def _randn(shape, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(SEED)
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def cotangent(shape, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """The fixed random cotangent of an output of ``shape`` (the same for every backend
    judged, so their gradients are comparable)."""
    return _randn(shape, device, dtype)


def evaluate(fn, name, tensors, grad: bool, cotangent_of=None):
    """[output, *gradients] of ``fn(name, *tensors)``, detached. With ``grad``, one gradient
    per input that requires grad: the vector-Jacobian product with ``cotangent_of(out)``
    (default ``cotangent``); without, no input requires grad, as under ``torch.no_grad``."""
    leaves = [
        t.detach().requires_grad_(grad and t.requires_grad) if _is_float(t) else t for t in tensors
    ]
    want = [t for t in leaves if _is_float(t) and t.requires_grad]
    with torch.enable_grad() if grad else torch.no_grad():
        out = fn(name, *leaves)
        if not want:
            return [out.detach()]
        if cotangent_of is None:
            g = cotangent(out.shape, out.device, out.dtype)
        else:
            g = cotangent_of(out)
        grads = torch.autograd.grad(out, want, g, allow_unused=True)
    grads = [torch.zeros_like(w) if d is None else d for d, w in zip(grads, want, strict=True)]
    return [out.detach(), *(d.detach() for d in grads)]


# --------------------------------------------------------------------------------------
# samples: which part of a call the oracle recomputes
# --------------------------------------------------------------------------------------


class Whole:
    """The whole call is the sample (``igpt selftest``'s small cases)."""

    def parts(self, tensors):
        """The oracle's inputs, in parts whose results ``join`` puts together."""
        return [tuple(tensors)]

    def cotangent(self, out):
        """The cotangent of the candidate's whole output."""
        return cotangent(out.shape, out.device, out.dtype)

    def part_cotangent(self, out, part: int):
        """The cotangent of part ``part``'s output: the whole call's, restricted to it."""
        return cotangent(out.shape, out.device, out.dtype)

    def pick(self, t, which):
        """The sampled part of the candidate's tensor ``t`` (the output when ``which`` is
        "out", else the gradient of input number ``which``), laid out as ``join``'s."""
        return t

    def join(self, parts, which):
        """One tensor from the parts' results for the same tensor."""
        return parts[0]


class HeadSample(Whole):
    """Whole (batch, head) pairs of an attention call (see ``head_sample``): the oracle runs
    them as a batch of one-head calls, a few pairs at a time."""

    def __init__(self, q, b, h, per_part: int):
        self.b, self.h, self.per_part = b, h, per_part
        self.g = None
        self.shape, self.device = q.shape, q.device

    def _spans(self):
        n = self.b.numel()
        return [slice(i, min(n, i + self.per_part)) for i in range(0, n, self.per_part)]

    def parts(self, tensors):
        q, k, v, pad = tensors
        out = []
        for s in self._spans():
            b, h = self.b[s], self.h[s]
            sub = [t[b, h].unsqueeze(1) for t in (q, k, v)]  # (P, 1, N, D) each
            out.append((*sub, None if pad is None else pad[b]))
        return out

    def _full_g(self):
        if self.g is None:
            self.g = cotangent(self.shape, self.device, torch.float32)
        return self.g

    def cotangent(self, out):
        return self._full_g().to(out.dtype)

    def part_cotangent(self, out, part: int):
        s = self._spans()[part]
        return self._full_g()[self.b[s], self.h[s]].unsqueeze(1).to(out.dtype)

    def pick(self, t, which):
        return t[self.b, self.h].unsqueeze(1)

    def join(self, parts, which):
        return torch.cat(parts)


class RowSample(Whole):
    """Rows of an op on x (..., d) (see ``row_sample``): the oracle runs the sampled rows
    with the parameters; the cotangent is zero on the other rows, so the candidate's
    parameter gradients are the sampled rows' sums too."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def parts(self, tensors):
        x, *params = tensors
        return [(x.reshape(-1, x.shape[-1])[self.rows.to(x.device)], *params)]

    def cotangent(self, out):
        g = torch.zeros_like(out).reshape(-1, out.shape[-1])
        rows = self.rows.to(out.device)
        g[rows] = cotangent((rows.numel(), out.shape[-1]), out.device, out.dtype)
        return g.reshape(out.shape)

    def pick(self, t, which):
        if which in ("out", 0):  # the output and x's gradient: per row of x
            return t.reshape(-1, t.shape[-1])[self.rows.to(t.device)]
        return t


def _pairs(B: int, H: int, pad, most: int) -> list[tuple[int, int]]:
    if B * H <= most:
        return [(b, h) for b in range(B) for h in range(H)]
    want = [(0, 0), (B - 1, H - 1), (0, H - 1), (B - 1, 0), (min(1, B - 1), min(4, H - 1))]
    if pad is not None:  # the batch with the fewest visible keys (padded rows, empty rows)
        want.append((int(pad.sum(1).argmin()), H // 2))
    gen = torch.Generator().manual_seed(SEED)
    for i in torch.randperm(B * H, generator=gen).tolist():
        want.append(divmod(i, H))
    return list(dict.fromkeys(want))[:most]


def head_sample(tensors, most: int = MAX_PAIRS) -> HeadSample:
    """The (batch, head) pairs of an attention call (q, k, v, pad) that the oracle
    recomputes: every pair up to ``most``, else the first and last batch and head, a head
    past the first four in the second batch, the batch with the fewest visible keys, then
    seeded random pairs. Each pair is judged whole: every query (the ragged last block, the
    last query, rows that see no key) and every key's gradient."""
    q, k, _, pad = tensors
    B, H, Nq, _ = q.shape
    b, h = zip(*_pairs(B, H, pad, most), strict=True)
    per_part = max(1, PAIR_ELEMENTS // max(1, Nq * k.shape[2]))
    return HeadSample(q, torch.tensor(b, device=q.device), torch.tensor(h, device=q.device),
                      per_part)  # fmt: skip


def row_sample(tensors, most: int = MAX_ROWS) -> RowSample:
    """The rows of x (..., d) (``tensors[0]``) that the oracle recomputes: all up to
    ``most``, else the first and last two, the rows on both sides of the last multiple of
    16, 32, 64 and 128 (ragged last tiles), rows past the first 4096 (the old slice), then
    seeded random rows."""
    x = tensors[0]
    T = x.numel() // max(1, x.shape[-1])
    if T <= most:
        return RowSample(torch.arange(T))
    want = [0, 1, T - 2, T - 1]
    for tile in (16, 32, 64, 128):
        edge = (T - 1) // tile * tile
        want += [edge - 1, edge]
    if T > 4096:
        want += [4095, 4096, (4096 + T) // 2]
    gen = torch.Generator().manual_seed(SEED)
    want += torch.randperm(T, generator=gen)[:most].tolist()
    rows = list(dict.fromkeys(r for r in want if 0 <= r < T))[:most]
    return RowSample(torch.tensor(sorted(rows)))


# --------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dimension), in float64."""
    t = t.double()
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])


def row_errors(value, oracle) -> torch.Tensor:
    """max |value - oracle| per row (float64, on the oracle's device): inf in a row where
    one has a NaN/inf that the other has not; non-finite oracle entries compare only by
    their finiteness. Shapes that differ give one infinite row."""
    if value.shape != oracle.shape:
        return torch.full((1,), math.inf, dtype=torch.float64)
    v, o = _rows(value).to(oracle.device), _rows(oracle)
    fo, fv = torch.isfinite(o), torch.isfinite(v)
    diff = torch.where(fo & fv, (v - o).abs().nan_to_num(0.0), 0.0)
    diff = torch.where(fo != fv, math.inf, diff)
    return diff.amax(dim=1) if diff.shape[1] else diff.new_zeros(diff.shape[0])


def _max_err(value, oracle) -> float:
    """The largest error of ``value`` against ``oracle`` over all rows (see row_errors)."""
    errs = row_errors(value, oracle)
    return errs.max().item() if errs.numel() else 0.0


def _ratio(err: float, torch_err: float) -> float:
    """The candidate's error in units of PyTorch's own (inf where PyTorch is exact and the
    candidate is not; 1 where both are exact)."""
    if torch_err > 0:
        return err / torch_err
    return 1.0 if err == 0 else math.inf


def _row_scales(oracle) -> torch.Tensor:
    o = _rows(oracle)
    o = torch.where(torch.isfinite(o), o.abs(), 0.0)
    return o.amax(dim=1) if o.shape[1] else o.new_zeros(o.shape[0])


def _rms(value, oracle) -> float:
    """The root mean square of value - oracle where both are finite (0 where none are)."""
    v, o = value.double().to(oracle.device), oracle.double()
    both = torch.isfinite(v) & torch.isfinite(o)
    return (v - o)[both].square().mean().sqrt().item() if both.any() else 0.0


def rms_check(value, oracle, pytorch, dtype) -> dict | None:
    """The statistic over the whole sample, for 16-bit dtypes on samples of at least
    ``RMS_MIN_ELEMENTS``: {"ok", "err", "torch_err", "bound"} of the root mean square
    errors, bound = ``RMS_MULTIPLE`` x PyTorch's + ``RMS_FLOOR`` eps x the oracle's rms;
    None where it does not apply. In bf16 a fault of 1% is about one rounding unit, which
    no row shows; over the sample it stands out against rounding, whose rms PyTorch's
    16-bit result (the output rounded once) measures steadily. Float32's error comes from
    the order of accumulation, no steady yardstick: its faults are left to the rows."""
    if dtype not in (torch.float16, torch.bfloat16) or oracle.numel() < RMS_MIN_ELEMENTS:
        return None
    if value.shape != oracle.shape:
        return None  # the rows already fail it
    err, torch_err = _rms(value, oracle), _rms(pytorch, oracle)
    scale = _rms(torch.zeros_like(oracle), oracle)
    bound = RMS_MULTIPLE * torch_err + RMS_FLOOR * torch.finfo(dtype).eps * scale
    return {"ok": err <= bound, "err": err, "torch_err": torch_err, "bound": bound}


def typical_scale(scales: torch.Tensor) -> float:
    """The median of the rows' largest |oracle| (``_row_scales``) over the rows that are
    not all zeros (0 if none): the tensor's typical size (rows of zeros, padded keys, say,
    do not set it)."""
    scales = scales[scales > 0]
    return scales.median().item() if scales.numel() else 0.0


def judge_tensor(value, oracle, pytorch, multiple: float, dtype, units=None, least=0.0):
    """The rule on one tensor: {"ok", "err", "torch_err", "bound", "ratio", "row", "rms"}:
    the numbers of its worst row (the largest err / bound) and ``rms_check``'s result.
    units: the floor in eps of ``dtype`` (default ``FLOOR_UNITS``'s); least: the smallest
    typical size (a gradient that cancels to 0 everywhere gets the output's)."""
    err, torch_err = row_errors(value, oracle), row_errors(pytorch, oracle)
    if err.shape != torch_err.shape:  # a wrong shape: one infinite row
        err = torch.full_like(torch_err, math.inf)
    if not err.numel():  # an empty call: nothing to be wrong
        return {"ok": True, "err": 0.0, "torch_err": 0.0, "bound": 0.0, "ratio": 1.0, "row": 0,
                "rms": None}  # fmt: skip
    scales = _row_scales(oracle)
    typical = typical_scale(scales) or least
    eps = torch.finfo(dtype).eps * (FLOOR_UNITS.get(dtype, 1.0) if units is None else units)
    bound = multiple * torch_err + eps * torch.clamp(scales, min=max(typical, MIN_SCALE))
    over = torch.where(bound > 0, err / bound, torch.where(err > 0, math.inf, 0.0))
    row = int(over.argmax())
    e, t = err[row].item(), torch_err[row].item()
    rms = rms_check(value, oracle, pytorch, dtype)
    return {
        "ok": bool((err <= bound).all()) and (rms is None or rms["ok"]),
        "err": e,
        "torch_err": t,
        "bound": bound[row].item(),
        "ratio": _ratio(e, t),
        "row": row,
        "rms": rms,
    }


class Judge:
    """The oracle and PyTorch's own result on a sample of one call, computed once;
    ``verdict(name)`` then runs a candidate backend on the whole call and judges it.

    fn(name, *tensors): the op on backend ``name`` ("torch" is the reference); tensors: its
    inputs (non-float ones, masks, pass through); arg_names: their names, for reports;
    grad: whether the call needs gradients (of the inputs that require grad); sample: what
    the oracle recomputes (``head_sample``, ``row_sample``; default the whole call);
    cast: run PyTorch and the candidates under autocast to this dtype (the twin's);
    twin: for a call computing in bfloat16, also judge its float16 twin (``fp16_twin``);
    yardstick: for 16-bit computations, the backend whose error is PyTorch's own (default
    "torch", the reference; attention passes "eager", since its reference upcasts).
    """

    def __init__(self, fn, tensors, arg_names, grad: bool, sample=None, *, cast=None,
                 twin=True, yardstick="torch"):  # fmt: skip
        self.fn, self.tensors, self.grad, self.cast = fn, tuple(tensors), grad, cast
        self.yardstick = yardstick
        self.sample = sample if sample is not None else Whole()
        first = next(t for t in tensors if _is_float(t))
        self.device_type = first.device.type
        self.dtype = cast or compute_dtype(first)
        needs = [i for i, t in enumerate(tensors) if grad and _is_float(t) and t.requires_grad]
        self.which = ["out", *needs]
        self.names = ["out"] + [f"d{arg_names[i]}" for i in needs]
        oracle, pytorch = [], []
        wide_dtype = oracle_dtype(first.dtype)
        for i, part in enumerate(self.sample.parts(self.tensors)):
            g = lambda out, i=i: self.sample.part_cotangent(out, i)  # noqa: E731
            wide = [_upcast(t, wide_dtype) for t in part]
            with torch.autocast(self.device_type, enabled=False):
                oracle.append(evaluate(fn, "torch", wide, grad, g))
            with self._context():
                pytorch.append(evaluate(fn, self._yardstick(), part, grad, g))
        self.oracle = self._joined(oracle)
        self.pytorch = self._joined(pytorch)
        self.out_scale = typical_scale(_row_scales(self.oracle[0]))  # floors of grads that are 0
        self.twin = fp16_twin(self, arg_names) if twin and self.dtype == torch.bfloat16 else None

    def _joined(self, parts):
        """One tensor per output/gradient from the parts' lists."""
        per_tensor = zip(*parts, strict=True)
        return [self.sample.join(list(p), w) for p, w in zip(per_tensor, self.which, strict=True)]

    def _yardstick(self) -> str:
        """The yardstick backend: the one given for 16-bit computations, the reference for
        float32 and wider, which computes in the call's dtype already."""
        return self.yardstick if self.dtype in (torch.float16, torch.bfloat16) else "torch"

    def _context(self):
        if self.cast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.cast)

    def verdict(self, name) -> dict:
        """{"ok", "tensors": [{"tensor", "err", "torch_err", "bound", "ratio", "row",
        "rms"}], "error"} for backend ``name`` (the twin's tensors named "... (fp16
        twin)"); an exception from the backend is a failed verdict, except running out of
        memory, which says nothing about the kernel and propagates."""
        try:
            with self._context():
                got = evaluate(self.fn, name, self.tensors, self.grad, self.sample.cotangent)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a backend refusing this GPU or shape
            return {"ok": False, "tensors": [], "error": f"{type(e).__name__}: {first_line(e)}"}
        rows, ok = [], True
        for i, (value, which) in enumerate(zip(got, self.which, strict=True)):
            multiple = OUT_MULTIPLE if i == 0 else GRAD_MULTIPLE
            units = None if i == 0 else GRAD_FLOOR_UNITS.get(self.dtype, 4.0)
            least = self.out_scale if i else 0.0
            picked = self.sample.pick(value, which)
            row = judge_tensor(picked, self.oracle[i], self.pytorch[i], multiple, self.dtype,
                               units, least)  # fmt: skip
            ok &= row.pop("ok")
            rows.append({"tensor": self.names[i], **row})
        if self.twin is not None:
            twin = self.twin.verdict(name)
            if twin["error"] is not None:
                return twin
            ok &= twin["ok"]
            rows += [{**r, "tensor": f"{r['tensor']} (fp16 twin)"} for r in twin["tensors"]]
        return {"ok": ok, "tensors": rows, "error": None}


def fp16_twin(judge: Judge, arg_names) -> Judge | None:
    """The float16 twin of a call computing in bfloat16: the same kernel, shapes and
    sample with float16 inputs (or under float16 autocast where bfloat16 came from
    autocast), whose 3 more mantissa bits show the faults of 1% that are one rounding unit
    in bfloat16. None where an input does not fit float16 (|x| > 60000)."""
    floats = [t for t in judge.tensors if _is_float(t)]
    if floats[0].dtype != torch.bfloat16:  # float32 inputs under bfloat16 autocast
        return Judge(judge.fn, judge.tensors, arg_names, judge.grad, judge.sample,
                     cast=torch.float16, twin=False, yardstick=judge.yardstick)  # fmt: skip
    for t in floats:
        if t.numel() and t.detach().abs().nan_to_num(0.0, 0.0, 0.0).amax() > FP16_FIT:
            return None
    twin = [_upcast(t, torch.float16) if _is_float(t) else t for t in judge.tensors]
    return Judge(
        judge.fn, twin, arg_names, judge.grad, judge.sample, twin=False, yardstick=judge.yardstick
    )


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    return (str(e).splitlines() or [""])[0][:200]


def worst(verdict: dict) -> dict | None:
    """The tensor of a verdict with the largest error relative to its bound (None: none)."""
    rows = verdict.get("tensors") or []
    return max(rows, key=lambda r: r["err"] / r["bound"] if r["bound"] else r["err"], default=None)


def describe(verdict: dict) -> str:
    """One phrase for a failed verdict: the exception, or each tensor out of its bound."""
    if verdict.get("error"):
        return verdict["error"]
    bad = [r for r in verdict.get("tensors", []) if not r["err"] <= r["bound"]]
    return "; ".join(
        f"{r['tensor']} max error {r['err']:.3g} vs PyTorch's own {r['torch_err']:.3g} "
        f"(bound {r['bound']:.3g})"
        for r in bad
    )


def compact(verdict: dict) -> dict:
    """A verdict as stored in the dispatch cache: ok, and the worst tensor's numbers."""
    row = worst(verdict)
    out = {"ok": bool(verdict["ok"])}
    if verdict.get("error"):
        out["error"] = verdict["error"]
    if row is not None:
        out.update(
            tensor=row["tensor"],
            err=rounded(row["err"]),
            torch_err=rounded(row["torch_err"]),
            ratio=rounded(row["ratio"]),
        )
    return out


def rounded(x: float | None):
    """4 significant digits; None for None, inf and NaN (which strict JSON cannot hold)."""
    return float(f"{x:.4g}") if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------


def exact_tokens(pixels, palette):
    """The nearest palette colour of each pixel (..., 3) by float64 distances, the lowest
    index on exact ties: what the compiled kernels promise."""
    p = pixels.reshape(-1, 3).double()
    c = palette.double()
    out = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
    chunk = max(1, (1 << 20) // c.shape[0])
    for start in range(0, p.shape[0], chunk):
        dist = (p[start : start + chunk, None, :] - c[None]).square().sum(-1)
        out[start : start + chunk] = dist.argmin(dim=1)
    return out.reshape(pixels.shape[:-1])


def sample_index(n: int, most: int = MAX_PIXELS):
    """Indices of the pixels compared: all of them up to ``most``, else evenly spread."""
    if n <= most:
        return torch.arange(n)
    return torch.linspace(0, n - 1, most).round().long()


def check_tokens(pixels, palette, tokens) -> dict:
    """{"ok", "checked", "wrong", "first"}: the call's tokens against ``exact_tokens`` on a
    sample of its pixels; ``first`` describes the first mismatch."""
    flat, got = pixels.reshape(-1, 3), tokens.reshape(-1)
    idx = sample_index(flat.shape[0]).to(flat.device)
    want = exact_tokens(flat[idx], palette)
    bad = (got[idx] != want).nonzero().flatten()
    out = {"ok": bad.numel() == 0, "checked": idx.numel(), "wrong": bad.numel(), "first": None}
    if bad.numel():
        i = bad[0].item()
        out["first"] = (
            f"pixel {idx[i].item()} {tuple(flat[idx[i]].tolist())}: token {got[idx[i]].item()}, "
            f"nearest {want[i].item()}"
        )
    return out
