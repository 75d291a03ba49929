"""Benchmark the fused norm-MLP (and the norm-prologue qkv GEMM) against PyTorch.

    python benchmarks/bench_ln_mlp.py [--quick] [--out DIR] [--norm rms] [--activation gelu]
        [--backends eager,compile,triton,cublas,auto] [--dry-run]
    igpt bench ln_mlp

Shapes: T = 32768 tokens (8 images at 64x64), d in {512, 1024, 1536}, h = 4d, bfloat16.
For each shape and provider it reports forward and forward+backward time (median ms, and
TFLOP/s of the GEMMs), the bytes autograd saves for backward (saved-tensor hooks, counting
activations only: the weights are shared by every provider and left out), the memory the
forward's graph holds (allocator delta, a hook-free cross-check that leaves out x) and the
peak memory of one training step.

Providers, all in the same run: "eager", ``x + fc2(act(fc1(norm(x))))`` in plain PyTorch
with the norm in fp32 (what ``backend="torch"``, ``igpt_kernels.reference``, computes);
"compile", torch.compile of that function; "triton", ``ln_mlp(backend="triton")`` (fused
Triton GEMMs); "cublas", ``ln_mlp(backend="cublas")`` (cuBLAS GEMMs around the Triton norm
and elementwise kernels); "auto", ``ln_mlp(backend="auto")``, whose first call times the
eligible backends (``auto_choice`` in its row says which it keeps). The ``ln_linear`` rows
time ``linear(norm(x))`` for the qkv projection (n = 3d) the same ways (no "cublas"). Ratios
are against compile and eager of the same shape. Writes OUT/ln_mlp.json and OUT/ln_mlp.md
(with the GPU, versions and commit); on a machine without a CUDA GPU it says so and exits
0, unless ``--dry-run``, which runs tiny shapes on the CPU (plumbing only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script

import importlib  # noqa: E402

import common  # noqa: E402

from igpt_kernels import ln_linear, ln_mlp, reference  # noqa: E402

PROVIDERS = ("eager", "compile", "triton", "cublas", "auto")


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


DEVICE = "cuda"  # --dry-run sets "cpu"


def _weights(d, n, dtype, norm):
    device = DEVICE
    return (
        torch.ones(d, device=device, dtype=dtype) + 0.1 * torch.randn(d, device=device),
        None if norm == "rms" else 0.1 * torch.randn(d, device=device, dtype=dtype),
        torch.randn(n, d, device=device, dtype=dtype) / d**0.5,
        0.1 * torch.randn(n, device=device, dtype=dtype),
    )


def _auto_choice(op, fn_inputs, **opts):
    """The backend "auto" keeps for this call (timing it now if this is the first)."""
    module = importlib.import_module(f"igpt_kernels.{op}")  # ln_mlp.py or ln_linear.py
    seen = {}
    real = module._ln_mlp_on if op == "ln_mlp" else module._ln_linear_on

    def spy(name, *args):
        seen["name"] = name
        return real(name, *args)

    attr = "_ln_mlp_on" if op == "ln_mlp" else "_ln_linear_on"
    setattr(module, attr, spy)
    try:
        fn_inputs()
    finally:
        setattr(module, attr, real)
    return seen.get("name")


def _run_providers(op, providers, chosen, inputs, flops, dy):
    rows = []
    for name, fn in providers:
        if name not in chosen:
            continue
        try:
            row = measure(name, fn, inputs, flops, dy)
        except Exception as e:  # a backend refusing this shape or GPU: record it, go on
            row = {"provider": name, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        if name == "auto":
            row["auto_choice"] = _auto_choice(op, lambda f=fn: f(*inputs))
        rows.append(row)
    return rows


def bench_mlp(T, d, dtype, norm, activation, chosen=PROVIDERS):
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

    def backend(name):
        return lambda *a: ln_mlp(*a, **opts, backend=name)

    providers = [("eager", eager), ("compile", torch.compile(eager))]
    providers += [(name, backend(name)) for name in ("triton", "cublas", "auto")]
    with torch.no_grad():
        want = eager(*inputs).float()
        err = {}
        for name, fn in providers[2:]:
            if name in chosen:
                try:
                    err[name] = (fn(*inputs).float() - want).abs().max().item()
                except Exception:  # noqa: BLE001 - recorded by measure below
                    err[name] = None
    rows = _run_providers("ln_mlp", providers, chosen, inputs, flops, dy)
    for r in rows:
        r.update(op="ln_mlp", T=T, d=d, h=h, dtype=str(dtype)[6:], **opts)
        r["max_abs_diff_vs_eager"] = err.get(r["provider"], 0.0)
    return rows


def bench_linear(T, d, dtype, norm, chosen=PROVIDERS):
    n = 3 * d
    x = torch.randn(T, d, device=DEVICE, dtype=dtype)
    inputs = [
        t.requires_grad_() if t is not None else None for t in (x, *_weights(d, n, dtype, norm))
    ]
    dy = torch.randn(T, n, device=DEVICE, dtype=dtype)

    def eager(*a):
        return eager_linear(*a, norm=norm)

    def backend(name):
        return lambda *a: ln_linear(*a, norm=norm, backend=name)

    providers = [("eager", eager), ("compile", torch.compile(eager))]
    providers += [(name, backend(name)) for name in ("triton", "auto")]
    rows = _run_providers("ln_linear", providers, chosen, inputs, 2 * T * d * n, dy)
    for r in rows:
        r.update(op="ln_linear", T=T, d=d, h=n, dtype=str(dtype)[6:], norm=norm)
    return rows


def add_ratios(rows):
    """speedup_vs_compile / _vs_eager (fwd+bwd) and saved_vs_eager for each row that ran
    (a ratio is left out where its baseline did not run)."""
    base = {(r["op"], r["d"], r["provider"]): r for r in rows if "fwd_bwd_ms" in r}
    for r in rows:
        if "fwd_bwd_ms" not in r:
            continue
        for other in ("compile", "eager"):
            b = base.get((r["op"], r["d"], other))
            if b is not None:
                r[f"speedup_vs_{other}"] = b["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        eager = base.get((r["op"], r["d"], "eager"))
        if eager and r["saved_gib"] is not None and eager["saved_gib"]:
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
    "auto_choice",
    "error",
]


def parse(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--norm", default="rms", choices=reference.NORMS)
    p.add_argument("--activation", default="gelu", choices=reference.ACTIVATIONS)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument(
        "--backends", default=",".join(PROVIDERS), help="comma-separated providers to time"
    )
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (plumbing)")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    bad = sorted(set(args.backends) - set(PROVIDERS))
    if bad or not args.backends:
        p.error(f"--backends takes a comma-separated list of {', '.join(PROVIDERS)}; got {bad}")
    if args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    return args


def main(argv=None):
    global DEVICE
    args = parse(argv)
    if not (torch.cuda.is_available() or args.dry_run):
        common.exit_without_gpu("ln_mlp", dry_run=True)
    if args.dry_run:
        DEVICE, dtype, dims, tokens = "cpu", torch.float32, [32], 64
    else:
        DEVICE, dtype = "cuda", torch.bfloat16
        dims = [512] if args.quick else [512, 1024, 1536]
        tokens = 8192 if args.quick else args.tokens
    rows = []
    for d in dims:  # results are written after each d, so a time limit keeps what ran
        rows += bench_mlp(tokens, d, dtype, args.norm, args.activation, args.backends)
        rows += bench_linear(tokens, d, dtype, args.norm, args.backends)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        add_ratios(rows)
        path = common.write("ln_mlp", rows, args.out)
        env = common.env()
        text = (
            f"T={tokens}, {str(dtype)[6:]}, norm={args.norm}, activation={args.activation}, "
            f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['commit']}"
            f"\n\n{common.table(rows, COLUMNS)}\n"
        )
        path.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
