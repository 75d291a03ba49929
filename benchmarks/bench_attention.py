"""Benchmark: the Triton flash attention against PyTorch SDPA's flash, cuDNN and
memory-efficient backends, each selected explicitly, in the same run.

Shapes (B, H, N, D) are iGPT's: S at 32x32 and 64x64, L at 48x48 (head dim 96), M at 64x64;
causal (AR) and not (BERT); forward, backward and forward+backward. Throughput is counted
with the FlashAttention convention: 4 B H N^2 D flops forward, halved when causal, the
backward 2.5x the forward. A decode section times one query over a long KV cache (the
sampling case) and reports the bandwidth of reading K and V.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16] [--out DIR]
    igpt bench attention

Writes OUT/attention.json (rows + environment) and prints Markdown tables; x_NAME is
SDPA-NAME's time over ours (above 1: the Triton kernel is faster). A backend that cannot
run a case (not built, unsupported GPU or head dim) is recorded as NAME_error. No new shape
starts after --budget seconds (autotuning compiles many configs on the first calls). Needs
a CUDA GPU: elsewhere it says so and exits 0.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from common import parser, table, time_ms, write

SHAPES = {  # name: (B, H, N, D)
    "S@32x32": (16, 8, 1024, 64),
    "S@64x64": (8, 8, 4096, 64),
    "L@48x48": (8, 16, 2304, 96),
    "M@64x64": (4, 8, 4096, 128),
}
DECODE_SHAPES = {  # name: (B, H, Nk, D), one query each
    "S@64x64 B=1": (1, 8, 4096, 64),
    "L@48x48 B=8": (8, 16, 2304, 96),
    "M@64x64 B=4": (4, 8, 4096, 128),
}
MODES = ("fwd", "bwd", "fwd+bwd")
SDPA = ("flash", "cudnn", "efficient")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"
BUDGET_S = 120  # start no new shape after this long: gpu_check.sh runs each bench under 150 s


def flops(B, H, N, D, causal, mode):
    fwd = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def _provider(name, causal):
    """o = f(q, k, v) for one provider, or a string saying why it cannot run."""
    if name == "triton":
        from igpt_kernels import attention

        return lambda q, k, v: attention(q, k, v, causal=causal, backend="triton")
    try:
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(name)
    except (ImportError, AttributeError) as e:
        return f"unavailable ({e})"

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _timer(fn, q, k, v, mode, rep):
    """A closure timing one mode, after checking it runs at all."""
    leaves = [t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v)]
    do = torch.randn_like(q)
    if mode == "fwd":
        fn(*leaves)
        return lambda: time_ms(lambda: fn(*leaves), rep=rep)
    if mode == "bwd":
        o = fn(*leaves)
        torch.autograd.grad(o, leaves, do, retain_graph=True)
        return lambda: time_ms(
            lambda: torch.autograd.grad(o, leaves, do, retain_graph=True), rep=rep
        )

    def step():
        torch.autograd.grad(fn(*leaves), leaves, do)

    step()
    return lambda: time_ms(step, rep=rep)


def _measure(name, causal, q, k, v, mode, rep):
    """(milliseconds, None) or (None, why it did not run)."""
    fn = _provider(name, causal)
    if isinstance(fn, str):
        return None, fn
    try:
        timer = _timer(fn, q, k, v, mode, rep)
        return timer(), None
    except Exception as e:  # a backend refusing this shape, dtype or GPU: record, go on
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        print(f"  {name} {mode}: {why}", flush=True)
        return None, why


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def _compare(row, causal, q, k, v, mode, rep, unit, amount):
    """Time every provider on one case. Fills ``row`` with NAME_ms, NAME_UNIT (amount per
    millisecond) and x_NAME = SDPA's time / ours (above 1: the Triton kernel is faster)."""
    for name in ("triton", *SDPA):
        ms, why = _measure(name, causal, q, k, v, mode, rep)
        row[f"{name}_ms"] = ms
        row[f"{name}_{unit}"] = ms and amount / ms
        if why:
            row[f"{name}_error"] = why
    for name in SDPA:
        ours, theirs = row["triton_ms"], row[f"{name}_ms"]
        row[f"x_{name}"] = theirs / ours if ours and theirs else None
    ratios = ", ".join(f"x {n} {_fmt(row[f'x_{n}'])}" for n in SDPA)
    ours = _fmt(row[f"triton_{unit}"])
    print(f"{row['shape']} causal={causal} {row['mode']}: {ours} {unit}, {ratios}", flush=True)
    return row


def _over_budget(started, budget, what):
    if time.monotonic() - started <= budget:
        return False
    print(f"skipping {what}: past the {budget:.0f} s budget", flush=True)
    return True


def bench_training(shapes, causal, dtype, rep, started, budget):
    """Rows of (shape, mode) with each provider's time and TFLOP/s."""
    rows = []
    for shape_name, (B, H, N, D) in shapes.items():
        if _over_budget(started, budget, f"{shape_name} causal={causal}"):
            continue
        q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype) for _ in range(3))
        for mode in MODES:
            row = {"shape": shape_name, "B": B, "H": H, "N": N, "D": D, "causal": causal}
            row.update(mode=mode, dtype=str(dtype)[6:])
            gflop = flops(B, H, N, D, causal, mode) / 1e9  # per ms: TFLOP/s
            rows.append(_compare(row, causal, q, k, v, mode, rep, "tflops", gflop))
    return rows


def bench_decode(shapes, dtype, rep, started, budget):
    """One new query over a KV cache (bottom-right causal = no mask for a single query),
    with the bandwidth of reading K and V once."""
    rows = []
    for shape_name, (B, H, Nk, D) in shapes.items():
        if _over_budget(started, budget, f"decode {shape_name}"):
            continue
        q = torch.randn(B, H, 1, D, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(B, H, Nk, D, device=DEVICE, dtype=dtype) for _ in range(2))
        megabytes = 2 * k.numel() * k.element_size() / 1e6  # per ms: GB/s
        row = {"shape": shape_name, "B": B, "H": H, "N": Nk, "D": D, "causal": True}
        row.update(mode="decode Nq=1", dtype=str(dtype)[6:])
        rows.append(_compare(row, False, q, k, v, "fwd", rep, "gbps", megabytes))
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds after which no new shape starts"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU here; the Triton attention benchmark needs one.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_attention: Triton is not installed; nothing to benchmark.")
        return 0
    dtype = DTYPES[args.dtype]
    started = time.monotonic()
    shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
    rep = 5 if args.quick else 20
    # Causal (the goal) first, then decode, then BERT; the first call at each head dim also
    # autotunes (compiles every config). Rows are written after each part, so a run cut
    # short by a timeout still leaves its results.
    budget = args.budget
    rows = bench_training(shapes, True, dtype, rep, started, budget)
    write("attention", rows, args.out)
    rows += bench_decode(DECODE_SHAPES, dtype, rep, started, budget)
    write("attention", rows, args.out)
    if not args.quick:
        rows += bench_training(shapes, False, dtype, rep, started, budget)
    path = write("attention", rows, args.out)
    print(
        table(
            [r for r in rows if "decode" not in r["mode"]],
            ["shape", "causal", "mode", "triton_tflops", "flash_tflops", "cudnn_tflops"]
            + ["efficient_tflops", "x_flash", "x_cudnn", "x_efficient"],
        )
    )
    print()
    print(
        table(
            [r for r in rows if "decode" in r["mode"]],
            ["shape", "mode", "triton_ms", "flash_ms", "cudnn_ms", "efficient_ms"]
            + ["triton_gbps", "x_flash", "x_cudnn", "x_efficient"],
        )
    )
    print(f"\nwrote {path} ({math.ceil(time.monotonic() - started)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
