"""``igpt sample``: unconditional samples or completions from an AR checkpoint, as a PNG grid."""

from __future__ import annotations

from igpt.commands._common import (
    UsageError,
    add_common_arguments,
    count,
    number,
    pick_device,
    read_palette,
)
from igpt.train import progress_enabled


def add_arguments(parser) -> None:
    """Arguments of ``igpt sample``."""
    add_common_arguments(parser, "checkpoint", "device", "seed", "batch_size")
    a = parser.add_argument
    a("--n", type=count(1), default=16, help="images to sample or complete")
    a(
        "--complete-from",
        "--data",  # the design's common flag name for a data spec
        dest="complete_from",
        metavar="DATA",
        default=None,
        help="complete images of this dataset spec (digits, cifar10:DIR, ...) instead of "
        "sampling from scratch",
    )
    a("--split", default="test", help="split of --complete-from (test)")
    a("--rows", type=count(0), default=None, help="top rows kept (default: half)")
    a("--n-samples", type=count(1), default=4, help="completions per image (4)")
    a("--temperature", type=number(least=0), default=1.0, help="0 = greedy (1.0)")
    a("--top-k", type=count(1), default=None, help="sample among the k likeliest")
    a("--top-p", type=number(above=0, most=1), default=None, help="nucleus sampling mass")
    a("--palette", default=None, help=".npy palette if the checkpoint has none")
    a("--out", default="samples.png", help="PNG to write (samples.png)")
    a("--tokens-out", default=None, help="also save the raw tokens (.npy)")
    a("--scale", type=count(1), default=4, help="pixel size in the PNG (4)")


def _palette(args, palette, n_colors: int):
    """The checkpoint's palette, or ``--palette``'s; it must have the model's colour count."""
    if args.palette is not None:
        palette = read_palette(args.palette, "--palette")
    if palette is None:
        raise UsageError("the checkpoint holds no palette; pass --palette FILE.npy")
    if len(palette) != n_colors:
        raise UsageError(
            f"the palette has {len(palette)} colours but the model was trained "
            f"on n_colors={n_colors}"
        )
    return palette


def run(args) -> None:
    """``igpt sample``: unconditional samples or completions of a dataset, as a PNG grid."""
    from igpt.sample import complete, load_for_sampling, prefix_length, save_grid, unconditional

    if args.checkpoint is None:
        raise UsageError("igpt sample needs --checkpoint (a checkpoint file or run directory)")
    model, palette, _ = load_for_sampling(args.checkpoint, device=pick_device(args.device))
    cfg = model.config
    palette = _palette(args, palette, cfg.n_colors)
    sampling = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size or 64,
        progress=progress_enabled(None),
    )
    if args.complete_from is None:
        originals, n_prefix = None, 0
        samples = unconditional(model, args.n, **sampling)
    else:
        from igpt.data import load_images, tokenize

        data = load_images(args.complete_from, args.split)
        originals = tokenize(data.images[: args.n], palette, cfg.n_px)
        n_prefix = prefix_length(cfg.n_px, rows=args.rows)
        samples = complete(
            model, originals, n_prefix=n_prefix, n_samples=args.n_samples, **sampling
        )
    path = save_grid(
        args.out,
        originals,
        samples,
        palette,
        n_prefix=n_prefix,
        scale=args.scale,
        tokens_path=args.tokens_out,
    )
    what = "unconditional samples" if originals is None else "completions"
    print(f"wrote {len(samples.view(-1, cfg.n_positions))} {what} to {path}")
    if args.tokens_out:
        print(f"raw tokens in {args.tokens_out}")
