"""``igpt probe``: linear probes of every layer of a checkpoint, low-data probes, baselines;
with ``--probe linear,attentive,knn`` also the attentive and k-NN probes of every layer.

Both splits come from the token cache (``igpt.data.cached_tokens``, the entry ``igpt
prepare`` and ``igpt pretrain`` use): after ``igpt prepare`` of each split the probe never
touches an image, and features are extracted a batch at a time from the memmap. The raw-pixel
baseline therefore sees each token's palette colour, the image as the model sees it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from igpt.attentive import DEFAULT_GRID
from igpt.commands._common import (
    add_common_arguments,
    count,
    flat,
    int_items,
    number,
    open_checkpoint,
    pick_device,
    token_splits,
)

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """Arguments of ``igpt probe``."""
    objective = "ar or bert, for a checkpoint that records none (default: the checkpoint's own)"
    add_common_arguments(
        parser,
        *("checkpoint", "data", "objective", "batch_size", "out", "device", "seed"),
        helps={"objective": objective},
    )
    # objective: the checkpoint's own by default; the flag is for checkpoints that do not
    # record one (a BERT model must be probed with masked inputs)
    parser.set_defaults(batch_size=64, out="runs/probe", objective=None)
    a = parser.add_argument
    a(
        "--layers",
        nargs="+",
        type=int_items("--layers", none="all"),
        default=None,
        help="layers to probe, e.g. 0,8,16,24, or all (default: all)",
    )
    a(
        "--per-class",
        nargs="+",
        type=int_items("--per-class", least=1, none="none"),
        default=[[4, 25, 400]],
        help="low-data probes with k labels per class at the best layer (default 4,25,400; "
        "'none' skips them)",
    )
    a(
        "--probe",
        type=_probe_names,
        default=["linear"],
        help="probes of every layer, on one split: linear (L-BFGS, the paper's; with it the "
        "low-data probes and baselines), attentive (learned queries over the layer's tokens, "
        "AIM-style), knn (cosine k-NN vote); comma-separated (default linear)",
    )
    a(
        "--token-grid",
        type=count(1),
        default=DEFAULT_GRID,
        help="attentive probe: keep a grid x grid of patch means of each image's tokens "
        "(default %(default)s)",
    )
    a(
        "--token-memory",
        type=_size,
        default="4GiB",
        help="attentive probe: the most memory the token features take; the layers are "
        "extracted in as few passes as fit (default %(default)s)",
    )
    a("--subsets", type=count(1), default=5, help="random subsets per k (default 5)")
    a("--concat", type=count(0), default=5, help="layers concatenated around the best (default 5)")
    a(
        "--cs",
        type=_floats,
        default=None,
        help="L2 strengths C to choose from, e.g. 0.01,1,100 (default 1e-4..1e2)",
    )
    a(
        "--method",
        choices=("lbfgs", "sgd"),
        default="lbfgs",
        help="lbfgs (scikit-learn, the paper's) or sgd (GPU, for large sets)",
    )
    a("--bert-masks", type=count(1), default=5, help="masks in a BERT model's ensemble (default 5)")
    a("--no-baselines", action="store_true", help="skip the raw-pixel and random-init probes")
    a("--limit", type=count(1), default=None, help="use the first N images per split")
    a(
        "--cache-dir",
        default=None,
        help="feature cache, and the token cache's root as pretrain's --cache-dir (default: "
        "features in OUT/cache, tokens in $IGPT_CACHE or ~/.cache/igpt)",
    )
    a(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal)",
    )


def _floats(text: str) -> list[float]:
    """``--cs``'s type: positive finite numbers like 0.01,1,100, refused while parsing."""
    positive = number(above=0)
    try:
        values = [positive(c) for c in text.replace(",", " ").split()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"needs positive numbers like 0.01,1,100, got {text!r}")
    return values


def _probe_names(text: str) -> list[str]:
    """``--probe``'s type: names of ``igpt.evaluation.PROBES``, comma-separated."""
    from igpt.evaluation import check_probes

    try:
        return check_probes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> int:
    """``--token-memory``'s type: a size like 4GiB or 500M, in bytes."""
    from igpt.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args) -> None:
    """``igpt probe``: probe every layer of a checkpoint on a labelled dataset."""
    from igpt.evaluation import evaluate
    from igpt.reporting import summary_text, write_report
    from igpt.trainconfig import progress_enabled

    device = pick_device(args.device)
    path, model, palette, ckpt, objective = open_checkpoint(args, device=device)
    layers, per_class = flat(args.layers) or None, flat(args.per_class)  # [] from "all"
    n_px, cache = model.config.n_px, args.cache_dir
    train, test = token_splits(
        args.data, palette, n_px, args.limit, cache_dir=cache, progress=args.progress
    )
    out = Path(args.out)
    log.info(
        "probing %s (%s, L=%d) on %s: %d train, %d test images",
        *(path, objective, model.config.n_layer, args.data, len(train.tokens), len(test.tokens)),
    )
    results = evaluate(
        model,
        palette,
        train,
        test,
        layers=layers,
        probes=args.probe,
        attentive={"grid": args.token_grid, "max_bytes": args.token_memory},
        per_class=per_class,
        n_subsets=args.subsets,
        baselines=not args.no_baselines,
        concat=args.concat,
        method=args.method,
        Cs=args.cs,
        objective=objective,
        n_masks=args.bert_masks,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        cache_dir=Path(cache) if cache else out / "cache",
        cache_key=f"{path.resolve()}|{path.stat().st_mtime_ns}|step={ckpt.get('step')}|{args.data}",
        progress=progress_enabled(args.progress),
    )
    results = {"checkpoint": str(path), "data": args.data, **results}
    paths = write_report(results, out)
    print(summary_text(results))
    print(f"\nwrote {paths['json']}, {paths['table']} and {paths['png']}")
