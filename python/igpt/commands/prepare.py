"""``igpt prepare``: tokenise a data set's split once into the token cache, so that
``pretrain``, ``probe`` and ``finetune`` start without touching images.

    igpt prepare --data folder:~/imagenet --n-px 64 --palette palette.npy --workers 16

Streams in chunks, in ``--workers`` processes, resumably: run the same command again after
an interruption and it continues from the last complete chunk (``igpt.data.cache``). Under
torchrun every rank may run it: one prepares, the others wait for it, and rank 0 reports.

A second start finds the entry by checking the folders the reader listed (one ``stat``
each), not every image: a file added, removed or renamed, or a symlink re-pointed, is seen;
an image rewritten in place under the same name in a large folder needs ``--verify``, which
stats every file.
"""

from __future__ import annotations

from igpt.commands._common import add_common_arguments, count, read_palette


def add_arguments(parser) -> None:
    """Arguments of ``igpt prepare``."""
    add_common_arguments(parser, "data")
    parser.add_argument(
        "--n-px", type=count(1), required=True, help="image side the tokens are made at"
    )
    parser.add_argument(
        "--palette", required=True, help="the palette .npy (igpt fit-palette writes one)"
    )
    parser.add_argument(
        "--workers",
        type=count(0),
        default=None,
        help="processes that decode, resize and quantize (0: this one; default: the cores "
        "available)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "test", "all"),
        default="train",
        help="which split (default %(default)s: what pretrain reads)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="token cache root (default: $IGPT_CACHE or ~/.cache/igpt)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="stat every file the reader reads (else only the folders it listed) to find "
        "changes since the tokens were made",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def run(args) -> None:
    """``igpt prepare``: build (or find) the cache entry and print where it is."""
    from igpt.data import prepare_tokens
    from igpt.distributed import dist_env

    palette = read_palette(args.palette)
    info = prepare_tokens(
        args.data,
        args.split,
        palette,
        args.n_px,
        cache_dir=args.cache_dir,
        workers=args.workers,
        progress=False if args.no_progress else None,
        verify=args.verify,
    )
    if dist_env()[0] != 0:
        return
    state = "tokenised now" if info.built else "already prepared"
    skipped = f", {info.skipped} unreadable file(s) skipped" if info.skipped else ""
    print(f"{args.data} ({args.split} split, n_px {args.n_px}): {state}{skipped}")
    print(f"  cache: {info.path}")
    print(f"  {info.images:,} images, {_size(info.bytes)} on disk")
