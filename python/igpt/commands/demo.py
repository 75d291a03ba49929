"""``igpt demo``: pretrain -> probe -> sample end to end on the bundled digits; a summary."""

from __future__ import annotations

from pathlib import Path

from igpt.commands._common import add_common_arguments, count, pick_device
from igpt.train import progress_enabled


def add_arguments(parser) -> None:
    """Flags of ``igpt demo``."""
    from igpt.demo import DEFAULTS

    add_common_arguments(
        parser, "model", "n_px", "data", "steps", "batch_size", "lr", "device", "seed"
    )
    parser.set_defaults(out="runs/demo", **DEFAULTS)
    a = parser.add_argument
    a("--out", default="runs/demo", help="output folder (default %(default)s)")
    a(
        "--per-class",
        type=count(1),
        default=10,
        help="labels per class in the low-data probe (default %(default)s)",
    )
    a(
        "--limit",
        type=count(1),
        default=None,
        help="use only the first N images of each split (a quick look)",
    )
    a("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> None:
    """``igpt demo``: run everything, then print a one-screen summary."""
    from igpt.demo import pct, run_demo

    m = run_demo(
        args.out,
        data=args.data,
        model=args.model,
        n_px=args.n_px,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        per_class=args.per_class,
        limit=args.limit,
        device=str(pick_device(args.device)),
        seed=args.seed,
        progress=progress_enabled(False if args.no_progress else None),
    )
    pre = m["probe"]["pretrained"]
    best = pre["layers"][pre["best_layer"]]
    rnd = m["probe"]["random init"]
    print(f"\nigpt demo done in {m['wall_s']['total']:.0f} s on {m['device']}")
    print(f"  validation loss      {m['pretrain']['val_loss']:.3f} nats/token")
    print(f"  probe, pretrained    {pct(best['test_acc'])} test acc (layer {pre['best_layer']})")
    print(f"  probe, random init   {pct(rnd['layers'][rnd['best_layer']]['test_acc'])}")
    if pre["concat"] is not None:
        print(
            f"  probe, pretrained, {len(pre['concat']['layers'])} layers concatenated "
            f"{pct(pre['concat']['test_acc'])}"
        )
    print(f"  probe, raw pixels    {pct(m['raw_pixels']['test_acc'])}")
    for name, res in m.get("probes", {}).items():
        acc = next(r for r in res["layers"] if r["layer"] == res["best_layer"])["test_acc"]
        print(f"  {name + ' probe':<20} {pct(acc)} test acc (layer {res['best_layer']})")
    wt = m.get("while_training") or {}
    if wt.get("points"):
        print(f"  probes while training {wt['seconds']:.0f} s, {100 * wt['mean_share']:.0f}% of it")
    for name, r in m["low_data"].items():
        print(f"  {r['per_class']}/class, {name:<11} {pct(r['mean'])} ± {100 * r['std']:.1f}")
    out = Path(args.out)
    print(f"\n  report      {out / 'report.md'}")
    for f in ("probe_by_layer.png", "probe_vs_loss.png", "loss.png", "completions.png"):
        print(f"  {f:<11} {out / f}")
    print(f"  {'metrics.json':<11} {out / 'metrics.json'}")
