"""``igpt_kernels.selftest()``: every kernel present on this machine against PyTorch, on a
fixed set of awkward shapes, by the rule ``backend="auto"`` trusts (``igpt_kernels.trust``).

What runs where:

- a GPU: the Triton attention (main and flash-decoding paths) and each SDPA kernel that can
  express the case; the Triton ln_mlp (fused and "cublas" variants) and ln_linear, also
  under bf16 autocast; the CUDA and C++ quantizers (direct and through the lookup table).
  Each verdict is recorded in the dispatch cache under the kind of call it covers, so a
  static choice (compile, capture, ``IGPT_DISPATCH=fixed``) may then take that kernel.
- a CPU: the C++ quantizer, and the references against their definitions (a plain float64
  softmax attention and a norm-MLP written out here); with ``interpret=True`` (which needs
  ``TRITON_INTERPRET=1`` set before igpt_kernels is imported: ``igpt selftest --interpret``
  does that) also the Triton kernels under Triton's interpreter, on tiny float32/float16
  shapes (the interpreter computes bfloat16 wrongly).

Cases cover ragged lengths (not a multiple of any block), Nq < Nk (a KV-cache decode),
key padding with rows that see no key, head dims 32/64/96/128, float16/bfloat16/float32,
the output and every gradient; both norms and activations, with and without biases;
quantizer palettes of 16 and 512 colours with exact ties.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from igpt_kernels import ln_gemm, palette, reference, trust
from igpt_kernels._dispatch import DISPATCH, OURS, gpu_name, triton_interpreting
from igpt_kernels.attention import ARG_NAMES as ATTENTION_ARGS
from igpt_kernels.attention import call_kind, run_backend, triton_reason
from igpt_kernels.attention_sdpa import SDPA_KERNELS, sdpa_kernel_reason
from igpt_kernels.ln_linear import ARG_NAMES as LINEAR_ARGS
from igpt_kernels.ln_linear import call_fields as linear_fields
from igpt_kernels.ln_linear import ln_linear
from igpt_kernels.ln_mlp import ARG_NAMES as MLP_ARGS
from igpt_kernels.ln_mlp import call_fields as mlp_fields
from igpt_kernels.ln_mlp import ln_mlp

# (B, H, Nq, Nk, D, causal, padding, dtype, grad); padding: None, "some" (random keys
# off) or "empty" (the first keys off, so the first causal queries see no key)
GPU_ATTENTION = [
    (2, 3, 77, 77, 64, True, None, "bf16", True),
    (1, 2, 45, 150, 96, True, "empty", "fp16", True),
    (2, 2, 100, 100, 32, False, "some", "fp32", True),
    (1, 4, 257, 257, 128, True, "some", "bf16", True),
    (2, 2, 1, 300, 64, True, None, "bf16", False),  # flash-decoding, split keys
    (1, 3, 5, 129, 128, True, "empty", "fp16", False),
]
CPU_ATTENTION = [
    (1, 2, 19, 19, 32, True, None, "fp32", True),
    (1, 1, 7, 23, 64, True, "empty", "fp16", True),
    (1, 2, 1, 40, 96, True, None, "fp32", False),  # flash-decoding
    (2, 1, 12, 12, 128, False, "some", "fp32", True),
]
# (T, d, h, norm, activation, biases, residual, dtype, autocast)
GPU_MLP = [
    (300, 256, 1024, "rms", "quick_gelu", False, True, "bf16", False),
    (77, 96, 160, "layer", "gelu", True, False, "fp16", False),
    (130, 64, 256, "layer", "quick_gelu", True, True, "fp32", False),
    (200, 128, 512, "rms", "quick_gelu", True, True, "fp32", True),  # bf16 autocast
]
CPU_MLP = [
    (13, 32, 64, "rms", "quick_gelu", False, True, "fp32", False),
    (9, 48, 96, "layer", "gelu", True, False, "fp16", False),
]
GPU_LINEAR = [(150, 128, 384, "layer", True, "bf16"), (33, 64, 192, "rms", False, "fp32")]
CPU_LINEAR = [(11, 32, 96, "layer", True, "fp32")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFINITION_TOL = 1e-9  # the references against their definitions, both in float64


def _row(op, backend, case, verdict=None, *, skip=None, seconds=0.0) -> dict:
    """One line of the report from a ``trust.Judge`` verdict (or a skip with its reason)."""
    row = {"op": op, "backend": backend, "case": case, "seconds": round(seconds, 3)}
    if skip is None and verdict.get("error") and backend not in OURS:
        skip = f"PyTorch's kernel refused this case here: {verdict['error']}"
    if skip is not None:
        return {**row, "verdict": "skip", "note": skip}
    worst = trust.worst(verdict) or {}
    return {
        **row,
        "verdict": "pass" if verdict["ok"] else "FAIL",
        "tensor": worst.get("tensor"),
        "max_err": trust.rounded(worst.get("err")),
        "torch_err": trust.rounded(worst.get("torch_err")),
        "ratio": trust.rounded(worst.get("ratio")),
        "note": verdict.get("error") or ("" if verdict["ok"] else trust.describe(verdict)),
    }


def _record(op, device, names, fields, verdicts) -> None:
    """Store the verdicts under the kind of call they cover (GPUs only)."""
    gpu = gpu_name(device)
    if gpu is not None and verdicts:
        key = DISPATCH.key(op, fields, names)
        DISPATCH.record(gpu, key, {n: trust.compact(v) for n, v in verdicts.items()})


def _judge_all(op, fn, tensors, arg_names, grad, backends, case, yardstick="torch"):
    """Rows for each backend, and the verdicts, of one case (the oracle computed once, on
    the whole case; ``yardstick`` as ``trust.Judge``'s)."""
    start = time.perf_counter()
    judge = trust.Judge(fn, tensors, arg_names, grad, yardstick=yardstick)
    rows, verdicts = [], {}
    for name in backends:
        t0 = time.perf_counter()
        verdicts[name] = judge.verdict(name)
        spent = time.perf_counter() - t0 + (t0 - start if not rows else 0.0)
        rows.append(_row(op, name, case, verdicts[name], seconds=spent))
    return rows, verdicts


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def _attention_inputs(B, H, Nq, Nk, D, padding, dtype, grad, device):
    gen = torch.Generator().manual_seed(Nq * 1000 + Nk + D)

    def t(n):
        x = torch.randn(B, H, n, D, generator=gen).to(device, dtype)
        return x.requires_grad_(grad)

    pad = None
    if padding == "some":
        pad = torch.rand(B, Nk, generator=gen) > 0.3
        pad[:, -1] = True
    elif padding == "empty":
        pad = torch.ones(B, Nk, dtype=torch.bool)
        pad[:, : Nk - Nq + 3] = False  # the first causal queries see no key at all
    return t(Nq), t(Nk), t(Nk), None if pad is None else pad.to(device)


def _attention_case(spec, device, on_gpu) -> list[dict]:
    B, H, Nq, Nk, D, causal, padding, dname, grad = spec
    dtype = DTYPES[dname]
    case = (
        f"B={B} H={H} Nq={Nq} Nk={Nk} D={D} {'causal' if causal else 'full'}"
        f"{'+pad(' + padding + ')' if padding else ''} {dname}{' +grad' if grad else ''}"
    )
    q, k, v, pad = _attention_inputs(B, H, Nq, Nk, D, padding, dtype, grad, device)
    scale = 1.0 / math.sqrt(D)
    backends = [] if triton_reason(q) else ["triton"]
    if on_gpu:
        backends += [
            f"sdpa-{kern}"
            for kern in SDPA_KERNELS
            if sdpa_kernel_reason(kern, q, k, causal, pad) is None
        ]
    if not backends:
        return [_row("attention", "triton", case, skip=triton_reason(q))]

    def fn(name, q, k, v, pad):
        return run_backend(name, q, k, v, causal, pad, scale)

    rows, verdicts = _judge_all(
        "attention", fn, (q, k, v, pad), ATTENTION_ARGS, grad, backends, case, "eager"
    )
    with torch.set_grad_enabled(grad):
        names, fields = call_kind(q, k, v, causal, pad)
    _record("attention", device, names, fields, {n: verdicts[n] for n in names if n in verdicts})
    return rows


# --------------------------------------------------------------------------------------
# ln_mlp and ln_linear
# --------------------------------------------------------------------------------------


def _param(gen, shape, dtype, device, grad, scale=1.0, shift=0.0):
    x = shift + scale * torch.randn(*shape, generator=gen)
    return x.to(device, dtype).requires_grad_(grad)


def _mlp_case(spec, device) -> list[dict]:
    T, d, h, norm, act, biases, residual, dname, autocast = spec
    dtype = DTYPES[dname]
    case = (
        f"T={T} d={d} h={h} {norm} {act}{' +biases' if biases else ''}"
        f"{' +residual' if residual else ''} {dname}{' autocast(bf16)' if autocast else ''}"
    )
    gen = torch.Generator().manual_seed(T * 7 + d)
    x = _param(gen, (T, d), dtype, device, True)
    params = (
        _param(gen, (d,), dtype, device, True, 0.1, 1.0),
        _param(gen, (d,), dtype, device, True, 0.1) if norm == "layer" and biases else None,
        _param(gen, (h, d), dtype, device, True, d**-0.5),
        _param(gen, (h,), dtype, device, True, 0.1) if biases else None,
        _param(gen, (d, h), dtype, device, True, h**-0.5),
        _param(gen, (d,), dtype, device, True, 0.1) if biases else None,
    )
    opts = dict(norm=norm, activation=act, residual=residual)
    reasons, fields = mlp_fields(x, params, norm, act, residual)
    backends = [n for n, why in reasons.items() if why is None]
    if not backends:
        return [_row("ln_mlp", "triton", case, skip=reasons["triton"])]

    def fn(name, x, *params):
        return ln_mlp(x, *params, **opts, backend=name)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        rows, verdicts = _judge_all("ln_mlp", fn, (x, *params), MLP_ARGS, True, backends, case)
        names, fields = ln_gemm.call_kind(x, reasons, fields)
    _record("ln_mlp", device, names, fields, verdicts)
    return rows


def _linear_case(spec, device) -> list[dict]:
    T, d, n, norm, biases, dname = spec
    dtype = DTYPES[dname]
    case = f"T={T} d={d} n={n} {norm}{' +biases' if biases else ''} {dname}"
    gen = torch.Generator().manual_seed(T * 11 + d)
    x = _param(gen, (T, d), dtype, device, True)
    params = (
        _param(gen, (d,), dtype, device, True, 0.1, 1.0),
        _param(gen, (d,), dtype, device, True, 0.1) if norm == "layer" and biases else None,
        _param(gen, (n, d), dtype, device, True, d**-0.5),
        _param(gen, (n,), dtype, device, True, 0.1) if biases else None,
    )
    reasons, fields = linear_fields(x, params, norm)
    if reasons["triton"] is not None:
        return [_row("ln_linear", "triton", case, skip=reasons["triton"])]

    def fn(name, x, *params):
        return ln_linear(x, *params, norm=norm, backend=name)

    rows, verdicts = _judge_all("ln_linear", fn, (x, *params), LINEAR_ARGS, True, ["triton"], case)
    names, fields = ln_gemm.call_kind(x, reasons, fields)
    _record("ln_linear", device, names, fields, verdicts)
    return rows


# --------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------


def _tie_palette(K, gen):
    """K colours in 0..255 with exact ties: a duplicated colour, and pairs two apart so that
    the pixel between them is equally near to both (the lowest index must win)."""
    pal = torch.randint(0, 256, (K, 3), generator=gen).float()
    pal[1] = pal[0]  # a duplicate: its pixels must get index 0
    pal[2] = torch.tensor([10.0, 20.0, 30.0])
    pal[3] = torch.tensor([12.0, 20.0, 30.0])  # (11, 20, 30) ties 2 and 3
    return pal


def _quantize_case(K, backend, lut, device) -> dict:
    case = f"K={K} {'lookup table' if lut else 'direct'} with ties"
    gen = torch.Generator().manual_seed(K)
    pal = _tie_palette(K, gen)
    pixels = torch.randint(0, 256, (4099, 3), generator=gen, dtype=torch.uint8)
    pixels[:3] = torch.tensor([[11, 20, 30], [10, 20, 30], [12, 20, 30]], dtype=torch.uint8)
    pixels[3] = pal[0].to(torch.uint8)
    pixels, pal = pixels.to(device), pal.to(device)
    start = time.perf_counter()
    try:
        tokens = palette.quantize(pixels, pal, backend=backend, lut=lut)
        check = trust.check_tokens(pixels, pal, tokens)
    except Exception as e:  # noqa: BLE001 - a kernel failing on this machine is a FAIL row
        check = {"ok": False, "wrong": None, "first": f"{type(e).__name__}: {trust.first_line(e)}"}
    spent = time.perf_counter() - start
    row = {"op": "quantize", "backend": backend, "case": case, "seconds": round(spent, 3)}
    return {
        **row,
        "verdict": "pass" if check["ok"] else "FAIL",
        "tensor": "tokens",
        "max_err": check["wrong"],
        "torch_err": 0,
        "ratio": None,
        "note": "" if check["ok"] else check["first"],
    }


def _quantize_rows(on_gpu) -> list[dict]:
    rows = []
    cpu = torch.zeros(1, 3, dtype=torch.uint8)
    for kind, device in (("cpu", torch.device("cpu")), ("cuda", torch.device("cuda"))):
        if kind == "cuda" and not on_gpu:
            continue
        why = palette.compiled_unavailable(kind, cpu.to(device))
        for K in (16, 512):
            for lut in (False, True) if kind == "cuda" else (False,):
                if why is not None:
                    case = f"K={K} {'lookup table' if lut else 'direct'}"
                    rows.append(_row("quantize", kind, case, skip=why))
                else:
                    rows.append(_quantize_case(K, kind, lut, device))
    return rows


# --------------------------------------------------------------------------------------
# the references against their definitions (float64)
# --------------------------------------------------------------------------------------


def _attention_definition(q, k, v, causal, pad, scale):
    """softmax(q k^T scale + mask) v written out, zeros where a query sees no key."""
    Nq, Nk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * scale
    keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
    keep = keep[None, None] & (True if pad is None else pad[:, None, None, :])
    s = s.masked_fill(~keep, -math.inf)
    p = torch.where(keep.any(-1, keepdim=True), torch.softmax(s, -1), 0.0).nan_to_num(0.0)
    return p @ v


def _mlp_definition(x, nw, nb, w1, b1, w2, b2, norm, act, residual):
    mu = x.mean(-1, keepdim=True) if norm == "layer" else 0.0
    n = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * nw
    n = n + nb if nb is not None else n
    z = F.linear(n, w1, b1)
    a = z * torch.sigmoid(1.702 * z) if act == "quick_gelu" else F.gelu(z)
    y = F.linear(a, w2, b2)
    return x + y if residual else y


def _definition_row(op, case, got, want) -> dict:
    err = (got - want).abs().max().item()
    ok = err <= DEFINITION_TOL * max(1.0, want.abs().max().item())
    row = {"op": op, "backend": "torch", "case": case + " vs definition", "seconds": 0.0}
    note = "" if ok else f"the reference differs from its definition by {err:.3g}"
    return {**row, "verdict": "pass" if ok else "FAIL", "tensor": "out", "max_err": err,
            "torch_err": None, "ratio": None, "note": note}  # fmt: skip


def _reference_rows() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for Nq, Nk, causal, padded in ((9, 9, True, False), (4, 13, True, True), (6, 6, False, True)):
        q, k, v = (
            torch.randn(2, 2, n, 32, generator=gen, dtype=torch.float64) for n in (Nq, Nk, Nk)
        )
        pad = (torch.rand(2, Nk, generator=gen) > 0.4) if padded else None
        if pad is not None:
            pad[0, :] = False if not causal else pad[0, :]  # a batch row with no key at all
        got = reference.attention(q, k, v, causal=causal, key_padding_mask=pad, sm_scale=0.3)
        want = _attention_definition(q, k, v, causal, pad, 0.3)
        case = f"Nq={Nq} Nk={Nk} {'causal' if causal else 'full'}{'+pad' if padded else ''} fp64"
        rows.append(_definition_row("attention", case, got, want))
    for norm, act, residual in (("rms", "quick_gelu", True), ("layer", "gelu", False)):
        x = torch.randn(5, 24, generator=gen, dtype=torch.float64)
        w = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in
             ((24,), (24,), (40, 24), (40,), (24, 40), (24,))]  # fmt: skip
        w[1] = w[1] if norm == "layer" else None
        got = reference.ln_mlp(x, *w, norm=norm, activation=act, residual=residual)
        rows.append(
            _definition_row(
                "ln_mlp", f"{norm} {act} fp64", got, _mlp_definition(x, *w, norm, act, residual)
            )
        )
    return rows


# --------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------


def selftest(*, interpret: bool | None = None, device=None) -> dict:
    """Check every kernel present here against PyTorch; the report as a dict.

    Args:
        interpret: also run the Triton kernels under Triton's interpreter on the CPU (needs
            ``TRITON_INTERPRET=1`` set before igpt_kernels was imported). Default: whether
            it is set.
        device: the GPU to check (default: the current CUDA device, if any).

    Returns:
        ``{"ok", "rows", "device", "interpret", "versions", "seconds", "summary"}``; each row
        ``{"op", "backend", "case", "verdict" ("pass", "FAIL", "skip"), "tensor",
        "max_err", "torch_err", "ratio", "note", "seconds"}``. ``ok`` is False when any row
        failed. On a GPU each verdict is also recorded in the dispatch cache.
    """
    start = time.perf_counter()
    interpret = triton_interpreting() if interpret is None else interpret
    if interpret and not triton_interpreting():
        raise ValueError(
            "interpret=True needs TRITON_INTERPRET=1 in the environment before igpt_kernels "
            "is imported (run `igpt selftest --interpret`, which sets it)"
        )
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    dev = torch.device(device) if device is not None else torch.device("cuda" if on_gpu else "cpu")
    rows = _quantize_rows(on_gpu) + _reference_rows()
    if on_gpu or interpret:
        kernel_dev = dev if on_gpu else torch.device("cpu")
        for spec in GPU_ATTENTION if on_gpu else CPU_ATTENTION:
            rows += _attention_case(spec, kernel_dev, on_gpu)
        for spec in GPU_MLP if on_gpu else CPU_MLP:
            rows += _mlp_case(spec, kernel_dev)
        for spec in GPU_LINEAR if on_gpu else CPU_LINEAR:
            rows += _linear_case(spec, kernel_dev)
    else:
        why = "no GPU here; `igpt selftest --interpret` runs them under Triton's interpreter"
        rows.append(_row("attention, ln_mlp, ln_linear", "triton", "-", skip=why))
    return _report(rows, dev, interpret, time.perf_counter() - start)


def _report(rows, device, interpret, seconds) -> dict:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "FAIL", "skip")}
    failed = sorted({f"{r['op']} {r['backend']}" for r in rows if r["verdict"] == "FAIL"})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    summary = (
        f"selftest {'FAILED' if failed else 'passed'} on {name}"
        f"{' (Triton interpreter)' if interpret and device.type != 'cuda' else ''}: "
        f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped in "
        f"{seconds:.1f} s" + (f"; failing: {', '.join(failed)}" if failed else "")
    )
    return {
        "ok": not failed,
        "rows": rows,
        "device": name,
        "interpret": bool(interpret),
        "versions": DISPATCH.header(name)["versions"],
        "seconds": round(seconds, 2),
        "summary": summary,
    }


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.3g}"


def format_table(report: dict) -> str:
    """The report as a text table (op, backend, case, max error, PyTorch's own error, ratio,
    verdict) and its one-line summary."""
    head = ("op", "backend", "case", "max error", "PyTorch's", "ratio", "verdict")
    lines = [head] + [
        (
            r["op"],
            r["backend"],
            r["case"],
            _fmt(r.get("max_err")),
            _fmt(r.get("torch_err")),
            _fmt(r.get("ratio")),
            r["verdict"]
            + (f" ({r['tensor']})" if r["verdict"] == "FAIL" and r.get("tensor") else ""),
        )
        for r in report["rows"]
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    notes = [f"  {r['op']} {r['backend']} {r['case']}: {r['note']}" for r in report["rows"]
             if r.get("note") and r["verdict"] != "pass"]  # fmt: skip
    return "\n".join(out + notes + [report["summary"]])
