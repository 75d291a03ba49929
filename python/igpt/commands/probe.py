"""``igpt probe``: linear probes of every layer of a checkpoint, low-data probes, baselines."""

from __future__ import annotations

import logging
from pathlib import Path

from igpt.commands._common import (
    UsageError,
    add_common_arguments,
    int_list,
    labelled_splits,
    open_checkpoint,
    pick_device,
)

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """Arguments of ``igpt probe``."""
    add_common_arguments(
        parser, "checkpoint", "data", "objective", "batch_size", "out", "device", "seed"
    )
    # objective: the checkpoint's own by default; the flag is for checkpoints that do not
    # record one (a BERT model must be probed with masked inputs)
    parser.set_defaults(batch_size=64, out="runs/probe", objective=None)
    a = parser.add_argument
    a("--layers", nargs="+", default=None, help="layers to probe, e.g. 0,8,16,24 (default: all)")
    a(
        "--per-class",
        nargs="+",
        default=["4,25,400"],
        help="low-data probes with k labels per class at the best layer (default 4,25,400; "
        "'none' skips them)",
    )
    a("--subsets", type=int, default=5, help="random subsets per k (default 5)")
    a("--concat", type=int, default=5, help="layers concatenated around the best (default 5)")
    a(
        "--cs",
        default=None,
        help="L2 strengths C to choose from, e.g. 0.01,1,100 (default 1e-4..1e2)",
    )
    a(
        "--method",
        choices=("lbfgs", "sgd"),
        default="lbfgs",
        help="lbfgs (scikit-learn, the paper's) or sgd (GPU, for large sets)",
    )
    a("--bert-masks", type=int, default=5, help="masks in a BERT model's ensemble (default 5)")
    a("--no-baselines", action="store_true", help="skip the raw-pixel and random-init probes")
    a("--limit", type=int, default=None, help="use the first N images per split")
    a("--cache-dir", default=None, help="feature cache (default OUT/cache)")


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(c) for c in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"{flag} needs numbers like 0.01,1,100, got {text!r}") from None


def run(args) -> None:
    """``igpt probe``: probe every layer of a checkpoint on a labelled dataset."""
    from igpt.probe import evaluate
    from igpt.reporting import summary_text, write_report

    device = pick_device(args.device)
    path, model, palette, ckpt, objective = open_checkpoint(args, device=device)
    layers = int_list(args.layers, "--layers") if args.layers else None
    per_class = [] if args.per_class == ["none"] else int_list(args.per_class, "--per-class")
    train, test = labelled_splits(args.data, args.limit)
    out = Path(args.out)
    log.info(
        "probing %s (%s, L=%d) on %s: %d train, %d test images",
        *(path, objective, model.config.n_layer, args.data, len(train), len(test)),
    )
    results = evaluate(
        model,
        palette,
        train,
        test,
        layers=layers,
        per_class=per_class,
        n_subsets=args.subsets,
        baselines=not args.no_baselines,
        concat=args.concat,
        method=args.method,
        Cs=_floats(args.cs, "--cs") if args.cs else None,
        objective=objective,
        n_masks=args.bert_masks,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        cache_dir=Path(args.cache_dir) if args.cache_dir else out / "cache",
        cache_key=f"{path.resolve()}|{path.stat().st_mtime_ns}|step={ckpt.get('step')}|{args.data}",
    )
    results = {"checkpoint": str(path), "data": args.data, **results}
    paths = write_report(results, out)
    print(summary_text(results))
    print(f"\nwrote {paths['json']}, {paths['table']} and {paths['png']}")
