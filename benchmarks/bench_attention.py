"""Benchmark: every attention backend, with igpt's masks, and what backend="auto" picks.

Providers, in the same run, all computing igpt's semantics (bottom-right causal, key
padding, zero rows): "triton" (the Triton kernels), "sdpa-flash", "sdpa-efficient",
"sdpa-cudnn" (PyTorch SDPA restricted to one kernel, as ``attention(backend="sdpa")``
calls it; a kernel that cannot express the mask is not run), "sdpa" (PyTorch's pick among
those), "eager" (softmax(q k^T * scale + mask) v written out, what a user would write),
"compile" (torch.compile of eager) and "auto" (``attention(backend="auto")``: its first
call per key times the eligible backends; ``auto_choice`` says which one it keeps).

Shapes (B, H, N, D) are iGPT's: S at 32x32 and 64x64, L at 48x48 (head dim 96), M at 64x64;
causal (AR) and not (BERT), optionally padded; forward, backward and forward+backward.
Throughput uses the FlashAttention convention: 4 B H N^2 D flops forward, halved when
causal, the backward 2.5x the forward. A decode section times one query over a long KV cache
(the sampling case) and reports the bandwidth of reading K and V.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16] [--masks causal,none]
        [--backends triton,sdpa-cudnn,...] [--out DIR] [--dry-run]
    igpt bench attention

Writes OUT/attention.json (rows + environment: GPU, versions, commit) and OUT/attention.md,
and prints the Markdown tables. ``auto_vs_best_torch`` is the best PyTorch provider's time
over auto's (at least 1: auto is as fast as anything PyTorch offers). A provider that cannot
run a case is recorded as NAME_error. No new shape starts after --budget seconds. Needs a
CUDA GPU; ``--dry-run`` runs tiny shapes on the CPU instead (plumbing only, no numbers to
keep), and without either it says so and exits 0.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config as functorch_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script

import common  # noqa: E402

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
DRY_SHAPES = {"tiny": (1, 2, 64, 32)}
DRY_DECODE = {"tiny B=1": (1, 2, 64, 32)}
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = (
    "triton",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "sdpa",
    "eager",
    "compile",
    "auto",
)
TORCH_PROVIDERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa", "eager", "compile")
MASKS = ("causal", "none", "pad", "causal+pad")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BUDGET_S = 120  # start no new shape after this long: gpu_check.sh runs each bench under 150 s


def flops(B, H, N, D, causal, mode):
    fwd = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def eager_attention(q, k, v, mask, scale):
    """What a user would write: softmax(q k^T * scale + mask) v, in q's dtype."""
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    return p @ v


# The "bwd" timing re-runs one graph's backward (retain_graph=True), which a compiled
# backward refuses when it donates its saved buffers; it is compiled lazily, at the first
# backward, so the switch is set for the whole run rather than around the forward.
functorch_config.donated_buffer = False


def provider(name, causal, pad, scale, Nq, Nk, device):
    """o = f(q, k, v) for one provider, or a string saying why it cannot run this case."""
    attn = importlib.import_module("igpt_kernels.attention")
    from igpt_kernels import reference

    if name in ("eager", "compile"):
        mask = reference.attention_mask(Nq, Nk, causal, pad, device)

        def eager(q, k, v):
            return eager_attention(q, k, v, mask, scale)

        return eager if name == "eager" else torch.compile(eager)
    if name == "auto":
        return lambda q, k, v: attn.attention(
            q, k, v, causal=causal, key_padding_mask=pad, sm_scale=scale, backend="auto"
        )
    return lambda q, k, v: attn.run_backend(name, q, k, v, causal, pad, scale)


def ineligible(name, q, k, causal, pad):
    """Why igpt would never route this case to ``name`` (None: it may)."""
    attn = importlib.import_module("igpt_kernels.attention")
    if name.startswith("sdpa-"):
        return attn.sdpa_kernel_reason(name.removeprefix("sdpa-"), q, k, causal, pad)
    if name == "triton":
        return attn.triton_reason(q)
    return None


def _timer(fn, q, k, v, mode, rep):
    """A closure timing one mode, after checking it runs at all."""
    leaves = [t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v)]
    do = torch.randn_like(q)
    if mode == "fwd":
        fn(*leaves)
        return lambda: common.time_ms(lambda: fn(*leaves), rep=rep), leaves
    if mode == "bwd":
        o = fn(*leaves)
        torch.autograd.grad(o, leaves, do, retain_graph=True)
        return lambda: common.time_ms(
            lambda: torch.autograd.grad(o, leaves, do, retain_graph=True), rep=rep
        ), leaves

    def step():
        torch.autograd.grad(fn(*leaves), leaves, do)

    step()
    return lambda: common.time_ms(step, rep=rep), leaves


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def compare(row, providers, causal, pad, q, k, v, mode, rep, unit, amount):
    """Time every provider on one case. Fills ``row`` with NAME_ms, NAME_UNIT (amount per
    millisecond), NAME_error, auto_choice and auto_vs_best_torch."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    for name in providers:
        why = ineligible(name, q, k, causal, pad)
        ms = None
        if why is None:
            fn = provider(name, causal, pad, scale, q.shape[2], k.shape[2], q.device)
            try:
                timer, leaves = _timer(fn, q, k, v, mode, rep)
                ms = timer()
                if name == "auto":
                    attn = importlib.import_module("igpt_kernels.attention")
                    row["auto_choice"] = attn.choose_backend(
                        *leaves, causal=causal, key_padding_mask=pad, sm_scale=scale
                    )
            except Exception as e:  # a backend refusing this shape, dtype or GPU: record it
                why = error_text(e)
        row[f"{name}_ms"] = ms
        row[f"{name}_{unit}"] = ms and amount / ms
        if why:
            row[f"{name}_error"] = why
    best = [row[f"{n}_ms"] for n in TORCH_PROVIDERS if row.get(f"{n}_ms")]
    auto = row.get("auto_ms")
    row["auto_vs_best_torch"] = min(best) / auto if best and auto else None
    print(
        f"{row['shape']} {row['mask']} {row['mode']}: auto={row.get('auto_choice')} "
        f"{_fmt(row.get(f'auto_{unit}'))} {unit}, x best torch {_fmt(row['auto_vs_best_torch'])}",
        flush=True,
    )
    return row


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def _over_budget(started, budget, what):
    if time.monotonic() - started <= budget:
        return False
    print(f"skipping {what}: past the {budget:.0f} s budget", flush=True)
    return True


def _pad(B, N, device):
    pad = torch.rand(B, N, device=device) > 0.1
    pad[:, 0] = True  # every query sees a key: eager's softmax would give NaN rows otherwise
    return pad


def bench_training(shapes, masks, providers, dtype, rep, started, budget, device):
    rows = []
    for shape_name, (B, H, N, D) in shapes.items():
        for mask in masks:
            if _over_budget(started, budget, f"{shape_name} {mask}"):
                continue
            q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
            causal, pad = "causal" in mask, _pad(B, N, device) if "pad" in mask else None
            for mode in MODES:
                row = {"shape": shape_name, "B": B, "H": H, "N": N, "D": D, "mask": mask}
                row.update(mode=mode, dtype=str(dtype)[6:])
                gflop = flops(B, H, N, D, causal, mode) / 1e9  # per ms: TFLOP/s
                rows.append(
                    compare(row, providers, causal, pad, q, k, v, mode, rep, "tflops", gflop)
                )
    return rows


def bench_decode(shapes, providers, dtype, rep, started, budget, device):
    """One new query over a KV cache (bottom-right causal = every key for a single query),
    with the bandwidth of reading K and V once."""
    rows = []
    for shape_name, (B, H, Nk, D) in shapes.items():
        if _over_budget(started, budget, f"decode {shape_name}"):
            continue
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, H, Nk, D, device=device, dtype=dtype) for _ in range(2))
        megabytes = 2 * k.numel() * k.element_size() / 1e6  # per ms: GB/s
        row = {"shape": shape_name, "B": B, "H": H, "N": Nk, "D": D, "mask": "causal"}
        row.update(mode="decode Nq=1", dtype=str(dtype)[6:])
        rows.append(compare(row, providers, True, None, q, k, v, "fwd", rep, "gbps", megabytes))
    return rows


def tables(rows, providers) -> str:
    train = [r for r in rows if "decode" not in r["mode"]]
    decode = [r for r in rows if "decode" in r["mode"]]
    head = ["shape", "mask", "mode"]
    tail = ["auto_choice", "auto_vs_best_torch"]
    return "\n\n".join(
        [
            common.table(train, head + [f"{p}_tflops" for p in providers] + tail),
            common.table(decode, head + [f"{p}_gbps" for p in providers] + tail),
        ]
    )


def parse(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--masks", default="causal,none", help=f"comma-separated, of {', '.join(MASKS)}")
    p.add_argument(
        "--backends", default=",".join(PROVIDERS), help="comma-separated providers to time"
    )
    p.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds after which no new shape starts"
    )
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (plumbing)")
    args = p.parse_args(argv)
    args.masks = [m for m in args.masks.split(",") if m]
    args.backends = [b for b in args.backends.split(",") if b]
    for kind, given, allowed in (
        ("mask", args.masks, MASKS),
        ("backend", args.backends, PROVIDERS),
    ):
        bad = sorted(set(given) - set(allowed))
        if bad or not given:
            p.error(f"--{kind}s takes a comma-separated list of {', '.join(allowed)}; got {bad}")
    return args


def main(argv=None):
    args = parse(argv)
    if not (torch.cuda.is_available() or args.dry_run):
        common.exit_without_gpu("attention", dry_run=True)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    dtype = torch.float32 if device == "cpu" else DTYPES[args.dtype]
    started = time.monotonic()
    if args.dry_run:
        shapes, decode, rep = DRY_SHAPES, DRY_DECODE, 1
    else:
        shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
        decode, rep = DECODE_SHAPES, 5 if args.quick else 20
    # Causal (the goal) first, then decode, then the other masks; rows are written after
    # each part, so a run cut short by a timeout still leaves its results.
    first, rest = args.masks[:1], args.masks[1:]
    rows = bench_training(shapes, first, args.backends, dtype, rep, started, args.budget, device)
    common.write("attention", rows, args.out)
    rows += bench_decode(decode, args.backends, dtype, rep, started, args.budget, device)
    common.write("attention", rows, args.out)
    if not args.quick:
        rows += bench_training(
            shapes, rest, args.backends, dtype, rep, started, args.budget, device
        )
    path = common.write("attention", rows, args.out)
    text = tables(rows, args.backends)
    env = common.env()
    header = f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['commit']}"
    path.with_suffix(".md").write_text(f"{header}, {str(dtype)[6:]}\n\n{text}\n")
    print(text)
    print(f"\nwrote {path} ({math.ceil(time.monotonic() - started)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
