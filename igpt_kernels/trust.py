"""PyTorch judges the kernels: a candidate backend is trusted for a kind of call only if its
output and every gradient the call needs agree with a trusted PyTorch oracle as closely as
PyTorch's own computation in the call's dtype does.

For one call (or a slice of it, see below) with inputs x and a fixed random cotangent g:

    oracle     the reference ("torch") on x upcast to float64 (float32 inputs) or float32
               (16-bit inputs), autocast off: the output and its vector-Jacobian products
    pytorch    the reference on x as given, under the caller's autocast: PyTorch's own
               computation in the call's dtype
    candidate  the backend being judged, on x as given

and for each tensor t (the output, then the gradient of each input that needs one):

    err(t)   = max |candidate - oracle|          torch_err(t) = max |pytorch - oracle|
    bound(t) = m * torch_err(t) + u * eps(dtype) * max(max |oracle|, 1e-3)
    m = 2 for the output, 3 for gradients (flash-attention's test rule);

the floor keeps a candidate from failing where PyTorch happens to be nearly exact: one unit
of rounding at the oracle's scale for 16-bit dtypes (u = 1), whose errors come from rounding
inputs and outputs and so are a stable yardstick, and u = 8 for float32, whose errors come
from the order of accumulation (a kernel summing in another order than PyTorch may land a
few units away; 8 eps is still a ten-thousandth of a 1% error). A NaN or inf where the
oracle is finite (or a finite value where it is not) is an infinite error. The candidate
passes when every tensor is within its bound. The oracle is never a kernel of ours.

Large calls are judged on a slice that runs the same kernel code: the first few
(batch, head) rows of attention (``slice_heads``), the first few thousand tokens of the
norm-MLP (``slice_rows``), so that the float64 reference never costs the memory the kernels
exist to save.

The palette quantizer is integer-valued: its tokens must equal ``exact_tokens`` (float64
distances, the lowest index on exact ties) on a sample of the call's pixels.
"""

from __future__ import annotations

import math

import torch

OUT_MULTIPLE = 2.0
GRAD_MULTIPLE = 3.0
MIN_SCALE = 1e-3
FLOOR_UNITS = {torch.float32: 8.0}  # the rounding floor in eps of the dtype (default 1)
MAX_HEADS = 4  # (batch, head) rows of attention judged at most
MAX_ROWS = 4096  # tokens of ln_mlp / ln_linear judged at most
MAX_PIXELS = 4096  # pixels of a quantize call compared at most
SEED = 20261207


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float32 (and float64) inputs, float32 for 16-bit ones."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _upcast(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad) if _is_float(t) else t


def cotangent(shape) -> torch.Tensor:
    """The fixed random float64 cotangent of an output of ``shape`` (the same for every
    backend judged, so their gradients are comparable)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


def evaluate(fn, name, tensors, grad: bool):
    """[output, *gradients] of ``fn(name, *tensors)``, detached. With ``grad``, one gradient
    per input that requires grad (the vector-Jacobian product with ``cotangent``); without,
    no input requires grad, as in a call under ``torch.no_grad``."""
    leaves = [
        t.detach().requires_grad_(grad and t.requires_grad) if _is_float(t) else t for t in tensors
    ]
    want = [t for t in leaves if _is_float(t) and t.requires_grad]
    with torch.enable_grad() if grad else torch.no_grad():
        out = fn(name, *leaves)
        if not want:
            return [out.detach()]
        g = cotangent(out.shape).to(device=out.device, dtype=out.dtype)
        grads = torch.autograd.grad(out, want, g, allow_unused=True)
    grads = [torch.zeros_like(w) if d is None else d for d, w in zip(grads, want, strict=True)]
    return [out.detach(), *(d.detach() for d in grads)]


def _max_err(value, oracle) -> float:
    if value.shape != oracle.shape:
        return math.inf
    value, oracle = value.double(), oracle.double()
    finite = torch.isfinite(oracle)
    if not torch.equal(finite, torch.isfinite(value)):
        return math.inf  # a NaN/inf where the oracle has none, or the reverse
    if not finite.any():
        return 0.0
    return (value[finite] - oracle[finite]).abs().max().item()


def _ratio(err: float, torch_err: float) -> float:
    """The candidate's error in units of PyTorch's own (inf where PyTorch is exact and the
    candidate is not; 1 where both are exact)."""
    if torch_err > 0:
        return err / torch_err
    return 1.0 if err == 0 else math.inf


def _scale(oracle) -> float:
    finite = oracle[torch.isfinite(oracle)]
    return finite.abs().max().item() if finite.numel() else 0.0


class Judge:
    """The oracle and PyTorch's own error of one call, computed once; ``verdict(name)`` then
    judges a candidate backend against them.

    fn(name, *tensors): the op on backend ``name`` ("torch" is the reference); tensors: its
    inputs (non-float ones, masks, pass through); arg_names: their names, for reports;
    grad: whether the call needs gradients (of the inputs that require grad).
    """

    def __init__(self, fn, tensors, arg_names, grad: bool):
        self.fn, self.tensors, self.grad = fn, tuple(tensors), grad
        first = next(t for t in tensors if _is_float(t))
        self.dtype = first.dtype
        self.names = ["out"] + [
            f"d{n}"
            for n, t in zip(arg_names, tensors, strict=True)
            if grad and _is_float(t) and t.requires_grad
        ]
        wide = [_upcast(t, oracle_dtype(self.dtype)) for t in tensors]
        with torch.autocast(first.device.type, enabled=False):
            self.oracle = evaluate(fn, "torch", wide, grad)
        self.pytorch = evaluate(fn, "torch", tensors, grad)
        self.torch_errs = [_max_err(p, o) for p, o in zip(self.pytorch, self.oracle, strict=True)]

    def verdict(self, name) -> dict:
        """{"ok", "tensors": [{"tensor", "err", "torch_err", "bound", "ratio"}], "error"}
        for backend ``name``; an exception from the backend is a failed verdict."""
        try:
            got = evaluate(self.fn, name, self.tensors, self.grad)
        except Exception as e:  # noqa: BLE001 - a backend refusing this GPU or shape
            return {"ok": False, "tensors": [], "error": f"{type(e).__name__}: {first_line(e)}"}
        eps = torch.finfo(self.dtype).eps
        rows = []
        for i, (value, oracle) in enumerate(zip(got, self.oracle, strict=True)):
            err, torch_err = _max_err(value, oracle), self.torch_errs[i]
            floor = FLOOR_UNITS.get(self.dtype, 1.0) * eps * max(_scale(oracle), MIN_SCALE)
            bound = (OUT_MULTIPLE if i == 0 else GRAD_MULTIPLE) * torch_err + floor
            rows.append(
                {
                    "tensor": self.names[i] if i < len(self.names) else f"t{i}",
                    "err": err,
                    "torch_err": torch_err,
                    "bound": bound,
                    "ratio": _ratio(err, torch_err),
                }
            )
        return {"ok": all(r["err"] <= r["bound"] for r in rows), "tensors": rows, "error": None}


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
# slices of large calls
# --------------------------------------------------------------------------------------


def slice_heads(q, k, v, pad, most: int = MAX_HEADS):
    """(q, k, v, pad) restricted to at most ``most`` (batch, head) rows (views)."""
    B, H = q.shape[:2]
    if B * H <= most:
        return q, k, v, pad
    b = max(1, most // H)
    h = min(H, most)
    pad = None if pad is None else pad[:b]
    return q[:b, :h], k[:b, :h], v[:b, :h], pad


def slice_rows(x, most: int = MAX_ROWS):
    """x (..., d) restricted to its first ``most`` rows, as (rows, d)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.shape[0] <= most else x2[:most]


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
