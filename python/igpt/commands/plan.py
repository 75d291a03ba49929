"""``igpt plan``: the fastest way to train a model size at a batch size in a GPU's memory.

    igpt plan --model igpt-l --n-px 64 --batch-size 8 --memory 40GiB [--gpus N] [--json]

Prints the plan ``igpt.memory.plan`` picks (micro-batch x accumulation, checkpointing,
activation offload, FSDP) with its predicted peak and the breakdown, or says that nothing
fits and what would. Predicted from the memory model, not measured.
"""

from __future__ import annotations

import argparse
import json

from igpt.commands._common import count
from igpt.config import SIZES, IGPTConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``igpt plan``."""
    a = parser.add_argument
    a("--model", default="igpt-s", choices=list(SIZES), help="named size (default %(default)s)")
    a("--n-px", type=count(1), default=32, help="image side in pixels (default %(default)s)")
    a("--batch-size", type=count(1), required=True, help="global batch (images per optimizer step)")
    a("--memory", type=_size, required=True, help="memory per GPU: 40GiB, 40GB, 24G or bytes")
    a("--gpus", type=count(1), default=1, help="GPUs to train on (default 1)")
    a("--objective", choices=("ar", "bert"), default="ar", help="(default %(default)s)")
    a("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="(default bf16)")
    a("--optimizer", choices=("adam", "sgd"), default="adam", help="(default %(default)s)")
    a("--no-offload", action="store_true", help="do not consider activation offload")
    a("--json", action="store_true", help="print the plan as one JSON object")


def _size(text: str) -> int:
    """``--memory`` in bytes, read while parsing: a size that is none exits 2 with one line."""
    from igpt.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args) -> None:
    """``igpt plan``: print the plan (a table, or JSON with ``--json``)."""
    from igpt import memory

    config = IGPTConfig.from_name(args.model, n_px=args.n_px)
    p = memory.plan(
        config,
        batch_size=args.batch_size,
        memory_bytes=args.memory,
        gpus=args.gpus,
        objective=args.objective,
        precision=args.precision,
        optimizer=args.optimizer,
        allow_offload=not args.no_offload,
    )
    if args.json:
        print(json.dumps({"model": args.model, "n_px": args.n_px, **p.to_dict()}))
        return
    fmt = memory.format_size
    what = f"{args.model} at {args.n_px}x{args.n_px}, batch {args.batch_size}"
    print(f"{what} in {fmt(p.memory_bytes)} per GPU on {args.gpus} GPU(s) (predicted):")
    if p.fits:
        print(f"  plan: {p.describe()}")
    else:
        print(f"  nothing fits. The smallest plan: {p.describe()}")
        print(f"  it needs {fmt(p.needed_bytes)} per GPU", end="")
        if p.needed_gpus:
            print(f", or {p.needed_gpus} GPUs of {fmt(p.memory_bytes)}", end="")
        print(".")
    if len(p.alternatives) > 1:
        print("  fastest of each policy that fits (step time relative to the plan):")
        for a in p.alternatives:
            ck = f"every {a['checkpointing']}" if a["checkpointing"] else "off"
            dist = (" FSDP" if a["fsdp"] else " DDP") if p.gpus > 1 else ""
            print(
                f"    {a['micro_batch']:>3} x {a['accumulation']:<3} checkpointing {ck:<9}"
                f"offload {'on ' if a['offload'] else 'off'}{dist}  "
                f"peak {fmt(a['predicted_peak_bytes']):>10}  time x{a['relative_time']:.2f}"
            )
    e = p.estimate
    print("  the plan's memory:")
    rows = [
        ("parameters", e.parameters),
        ("gradients", e.gradients),
        ("optimizer", e.optimizer),
        ("activations", e.activations),
        ("logits and loss", e.logits),
        ("largest transient", e.transient),
        ("peak", e.peak),
    ]
    if e.host:
        rows.append(("pinned host (offload)", e.host))
    for name, value in rows:
        print(f"  {name:>22}: {fmt(value)}")
