"""Benchmark the fused norm-MLP (and the norm-prologue qkv GEMM) against PyTorch.

    python benchmarks/bench_ln_mlp.py [--quick] [--out DIR] [--norm rms] [--activation gelu]
    igpt bench ln_mlp

Shapes: T = 32768 tokens (8 images at 64x64), d in {512, 1024, 1536}, h = 4d, bfloat16.
For each shape and provider it reports forward and forward+backward time (median ms, and
TFLOP/s of the GEMMs), the bytes autograd saves for backward (saved-tensor hooks, counting
activations only: the weights are shared by every provider and left out), the memory the
forward's graph holds (allocator delta, a hook-free cross-check that leaves out x) and the
peak memory of one training step.

Providers, all in the same run: "eager", ``x + fc2(act(fc1(norm(x))))`` in plain PyTorch
with the norm in fp32 (as ``igpt_kernels.reference``); "compile", torch.compile of that
function; "triton", ``igpt_kernels.ln_mlp`` (fused Triton GEMMs, the default);
"triton-cublas", its internal variant with cuBLAS GEMMs and Triton norm/elementwise
kernels. The ``ln_linear`` rows time ``linear(norm(x))`` for the qkv projection (n = 3d)
the same ways. Ratios are against compile and eager of the same shape. Writes
OUT/ln_mlp.json and OUT/ln_mlp.md; on a machine without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script

import common  # noqa: E402

from igpt_kernels import ln_linear, ln_mlp, reference  # noqa: E402


def eager_mlp(x, nw, nb, w1, b1, w2, b2, norm, activation):
    """What a user would write: x + fc2(act(fc1(norm(x)))), the norm's statistics in fp32."""
    n = reference.normalize(x, nw, nb, norm, 1e-5)
    return x + F.linear(reference.activate(F.linear(n, w1, b1), activation), w2, b2)


def eager_linear(x, nw, nb, w, b, norm):
    return F.linear(reference.normalize(x, nw, nb, norm, 1e-5), w, b)


def saved_bytes(fn, params) -> int | None:
    """Bytes of the distinct non-parameter storages autograd saves while fn() runs."""
    skip = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    except RuntimeError:  # a compiled graph may refuse saved-tensor hooks
        return None
    return sum(seen.values())


def held_bytes(fn) -> int | None:
    """GPU memory the autograd graph of fn() keeps after it returns, less its output.

    A cross-check of ``saved_bytes`` that needs no hooks: it counts what the forward
    allocated and kept for backward (inputs such as x were allocated before, so they are
    left out for every provider).
    """
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = fn()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - y.untyped_storage().nbytes()
    del y
    return held


def measure(name, fn, inputs, flops, dy):
    """One row: forward and forward+backward times, saved bytes and peak memory of fn."""
    params = inputs[1:]

    def fwd():
        return fn(*inputs)

    def step():
        y = fn(*inputs)
        torch.autograd.grad(y, [t for t in inputs if t is not None], dy)

    fwd_ms = common.time_ms(fwd)
    step_ms = common.time_ms(step)
    saved = saved_bytes(fwd, params)
    held = held_bytes(fwd)
    return {
        "provider": name,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": step_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_bwd_tflops": 3 * flops / step_ms / 1e9,
        "saved_gib": None if saved is None else saved / 2**30,
        "held_gib": None if held is None else held / 2**30,
        "peak_gib": common.peak_gib(step),
    }


DEVICE = "cuda"  # a dry run on the CPU (TRITON_INTERPRET=1) may set "cpu"


def _weights(d, n, dtype, norm):
    device = DEVICE
    return (
        torch.ones(d, device=device, dtype=dtype) + 0.1 * torch.randn(d, device=device),
        None if norm == "rms" else 0.1 * torch.randn(d, device=device, dtype=dtype),
        torch.randn(n, d, device=device, dtype=dtype) / d**0.5,
        0.1 * torch.randn(n, device=device, dtype=dtype),
    )


def bench_mlp(T, d, dtype, norm, activation):
    h = 4 * d
    x = torch.randn(T, d, device=DEVICE, dtype=dtype)
    nw, nb, w1, b1 = _weights(d, h, dtype, norm)
    w2 = torch.randn(d, h, device=DEVICE, dtype=dtype) / h**0.5
    b2 = 0.1 * torch.randn(d, device=DEVICE, dtype=dtype)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, nw, nb, w1, b1, w2, b2)]
    dy = torch.randn_like(x)
    flops = 4 * T * d * h
    opts = dict(norm=norm, activation=activation)

    def eager(*a):
        return eager_mlp(*a, **opts)

    compiled = torch.compile(eager)

    def triton_fused(*a):
        return ln_mlp(*a, **opts, backend="triton")

    def triton_cublas(*a):
        return ln_mlp(*a, **opts, backend="triton", _variant="cublas")

    with torch.no_grad():
        want = eager(*inputs).float()
        err = {
            name: (fn(*inputs).float() - want).abs().max().item()
            for name, fn in (("triton", triton_fused), ("triton-cublas", triton_cublas))
        }
    providers = [
        ("eager", eager),
        ("compile", compiled),
        ("triton", triton_fused),
        ("triton-cublas", triton_cublas),
    ]
    rows = [measure(name, fn, inputs, flops, dy) for name, fn in providers]
    for r in rows:
        r.update(op="ln_mlp", T=T, d=d, h=h, dtype=str(dtype)[6:], **opts)
        r["max_abs_diff_vs_eager"] = err.get(r["provider"], 0.0)
    return rows


def bench_linear(T, d, dtype, norm):
    n = 3 * d
    x = torch.randn(T, d, device=DEVICE, dtype=dtype)
    inputs = [
        t.requires_grad_() if t is not None else None for t in (x, *_weights(d, n, dtype, norm))
    ]
    dy = torch.randn(T, n, device=DEVICE, dtype=dtype)

    def eager(*a):
        return eager_linear(*a, norm=norm)

    def triton_fused(*a):
        return ln_linear(*a, norm=norm, backend="triton")

    providers = [("eager", eager), ("compile", torch.compile(eager)), ("triton", triton_fused)]
    rows = [measure(name, fn, inputs, 2 * T * d * n, dy) for name, fn in providers]
    for r in rows:
        r.update(op="ln_linear", T=T, d=d, h=n, dtype=str(dtype)[6:], norm=norm)
    return rows


def add_ratios(rows):
    """speedup_vs_compile / _vs_eager (fwd+bwd) and saved_vs_eager for each row."""
    base = {(r["op"], r["d"], r["provider"]): r for r in rows}
    for r in rows:
        eager, comp = base[(r["op"], r["d"], "eager")], base[(r["op"], r["d"], "compile")]
        r["speedup_vs_compile"] = comp["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        r["speedup_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if r["saved_gib"] is not None and eager["saved_gib"]:
            r["saved_vs_eager"] = r["saved_gib"] / eager["saved_gib"]


COLUMNS = [
    "op",
    "d",
    "provider",
    "fwd_ms",
    "fwd_bwd_ms",
    "fwd_bwd_tflops",
    "speedup_vs_compile",
    "speedup_vs_eager",
    "saved_gib",
    "saved_vs_eager",
    "held_gib",
    "peak_gib",
]


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--norm", default="rms", choices=reference.NORMS)
    p.add_argument("--activation", default="gelu", choices=reference.ACTIVATIONS)
    p.add_argument("--tokens", type=int, default=32768)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ln_mlp: no CUDA GPU here; the Triton kernels are benchmarked on a GPU only")
        return 0
    dims = [512] if args.quick else [512, 1024, 1536]
    tokens = 8192 if args.quick else args.tokens
    rows = []
    for d in dims:  # results are written after each d, so a time limit keeps what ran
        rows += bench_mlp(tokens, d, torch.bfloat16, args.norm, args.activation)
        rows += bench_linear(tokens, d, torch.bfloat16, args.norm)
        torch.cuda.empty_cache()
        add_ratios(rows)
        path = common.write("ln_mlp", rows, args.out)
        text = (
            f"T={tokens}, bf16, norm={args.norm}, activation={args.activation}, "
            f"{common.env()['device']}\n\n{common.table(rows, COLUMNS)}\n"
        )
        path.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
