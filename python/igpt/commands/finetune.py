"""``igpt finetune``: fine-tune a checkpoint on a labelled data set, report test accuracy.

Flags come from ``FinetuneConfig``'s fields (``--out`` is its ``out_dir``), plus the data
ones; the run writes ``finetune.json`` (the summary) and ``command.json`` (the command's own
flags) beside the fine-tuning run's files.

Both splits come from the token cache (``igpt.data.cached_tokens``, the entry ``igpt
prepare`` and ``igpt pretrain`` use), batches are converted from its memmap one at a time,
and after ``igpt prepare`` no image is decoded. The CIFAR augmentation (pad, crop, flip)
only moves pixels, so where the images are already n_px x n_px (CIFAR at 32) it moves the
tokens instead (``pad_crop_flip_tokens``); at another side each batch's images are read
lazily (``load_images(..., lazy=True)``; a split under ``IN_MEMORY`` bytes is read once),
augmented and tokenised.

``igpt finetune --out RUN --resume`` alone continues the run in RUN: the settings come from
its ``config.json`` and ``command.json``; a flag typed beside ``--resume`` overrides the
run's value (refused, as ever, where it would make another run: ``FINETUNE_FIXED``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from igpt.commands._common import (
    Given,
    GivenTrue,
    UsageError,
    config_from_args,
    count,
    dataclass_arguments,
    open_checkpoint,
    pick_device,
    run_settings,
    token_splits,
)
from igpt.finetune import FinetuneConfig, evaluate, finetune
from igpt.objectives import OBJECTIVES
from igpt.trainconfig import progress_enabled

log = logging.getLogger(__name__)


# augmented images at another side than n_px are read whole up to this many bytes (CIFAR's
# 150 MB: a random batch would unpickle every batch file), else lazily, a batch at a time
IN_MEMORY = 1 << 30
# the command's own flags that command.json records for --resume
COMMAND_FLAGS = ("checkpoint", "data", "objective", "clf_only", "augment", "limit")
# what a resumed run does not take from its config.json: where and how this process runs
NOT_RESUMED = ("out_dir", "resume", "device", "progress")


def add_arguments(parser) -> None:
    """Flags of ``igpt finetune``: FinetuneConfig's fields, and the ones of the command."""

    def a(*flags, **kw):
        parser.add_argument(*flags, **{"action": Given, **kw})

    a("--checkpoint", default=None, help="checkpoint file, or a run directory for its latest")
    a("--data", default="digits", help="labelled data: digits, cifar10:DIR ... (default digits)")
    # where the command's meaning differs from the library's: the checkpoint's objective,
    # a run directory always, and a device picked like every command's
    a("--objective", choices=OBJECTIVES, default=None, help="default: the checkpoint's own")
    a("--out", dest="out_dir", default="runs/finetune", help="run directory (default %(default)s)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    skip = ("objective", "out_dir", "device", "joint", "val_frac")
    dataclass_arguments(parser, FinetuneConfig, skip=skip)
    parser.set_defaults(n_masks=5)  # sec. 4.6's ensemble for the test accuracy
    a(
        "--clf-only",
        action=GivenTrue,
        help="train L_CLF alone (default: L_GEN + L_CLF)",
    )
    a(
        "--augment",
        choices=("auto", "none", "cifar"),
        default="auto",
        help="training augmentation: cifar = pad 4, random crop, flip (auto: for cifar specs)",
    )
    a("--limit", type=count(1), default=None, help="use the first N images per split")
    a(
        "--cache-dir",
        default=None,
        help="token cache (default: $IGPT_CACHE or ~/.cache/igpt; as pretrain's and prepare's)",
    )


def _resumed(args) -> None:
    """For ``--resume``: the run's recorded flags and settings onto ``args``, except the
    flags typed now (they override) and where this process runs."""
    run = Path(args.out_dir)
    # the model comes from the run's own latest checkpoint unless --checkpoint is typed
    flags = [k for k in COMMAND_FLAGS if k != "checkpoint"]
    saved = run_settings(args, run / "command.json", flags, section="command")
    saved.update(
        run_settings(args, run / "config.json", FinetuneConfig, section="config", skip=NOT_RESUMED)
    )
    for k, v in saved.items():
        setattr(args, k, v)
    if saved:
        log.info("resuming %s with its recorded settings, except the flags given", run)


def _data(args, model, palette):
    """Both splits of ``--data`` from the token cache (``TokenSplit``), the class count, and
    the training augmentation as ``Finetuner``'s keywords: on the tokens where the images
    are already n_px x n_px, else on lazily read images."""
    import functools

    from igpt.data import image_side, load_images, pad_crop_flip, pad_crop_flip_tokens, parse_spec

    n_px = model.config.n_px
    cache, progress = args.cache_dir, args.progress
    limit = args.limit
    train, test = token_splits(args.data, palette, n_px, limit, cache_dir=cache, progress=progress)
    # the cache keeps labels, not class names: the classes are those the training labels
    # name (a single one is refused by the classifier, as a --limit too small for two)
    n_classes = int(train.labels.max()) + 1
    cifar = parse_spec(args.data)[0].startswith("cifar")
    data = {"n_classes": n_classes, "palette": palette}
    if args.augment == "cifar" or (args.augment == "auto" and cifar):
        if image_side(args.data, "train") == n_px:  # pixels move, tokens can move alike
            data["token_augment"] = functools.partial(pad_crop_flip_tokens, n_px=n_px)
        else:
            images = load_images(args.data, "train", lazy=True)
            images = images.head(limit) if limit else images
            if images.shape and len(images) * images.shape[0] * images.shape[1] * 3 <= IN_MEMORY:
                images = images.load().images  # one read, not one of a batch file per step
            data.update(train_images=images, augment=pad_crop_flip)
    return train, test, data


def run(args) -> None:
    """Fine-tune, evaluate on the test split, write finetune.json and print the accuracy."""
    from igpt.checkpoint import latest_checkpoint
    from igpt.rundir import RunDir

    if args.resume:
        _resumed(args)
    source = args.checkpoint
    if source is None:
        if not (args.resume and latest_checkpoint(args.out_dir)):
            raise UsageError("igpt finetune needs --checkpoint FILE_OR_RUN_DIR")
        source = args.out_dir  # the run's own latest checkpoint holds the model
    device = pick_device(args.device)
    path, model, palette, _, objective = open_checkpoint(args, source=source, device=device)
    train, test, data = _data(args, model, palette)
    log.info(
        "fine-tuning %s (%s, %s) on %s: %d train, %d test images",
        *(path, objective, "L_CLF" if args.clf_only else "L_GEN + L_CLF"),
        *(args.data, len(train.tokens), len(test.tokens)),
    )
    cfg = config_from_args(
        FinetuneConfig, args, objective=objective, joint=not args.clf_only, device=str(device)
    )
    run_dir = RunDir(cfg.out_dir)
    run_dir.check_fresh(cfg.resume)  # before command.json: never over another run's record
    record = {k: getattr(args, k) for k in COMMAND_FLAGS} | {"checkpoint": str(path)}
    run_dir.write_json("command.json", {"command": record})
    res = finetune(model, train.tokens, train.labels, config=cfg, **data)
    # the whole test set, n_masks times for BERT: a bar where stderr is a terminal (or asked)
    kw = dict(objective=objective, n_masks=cfg.n_masks, seed=cfg.seed, device=device)
    progress = progress_enabled(cfg.progress)
    test_acc = evaluate(res["classifier"], test.tokens, test.labels, progress=progress, **kw)
    summary = {k: res[k] for k in ("best_val_acc", "best_step", "step", "stopped_early")}
    summary.update(test_acc=test_acc, checkpoint=str(path), data=args.data)
    summary.update(settings=res["settings"], history=res["history"])
    out = Path(cfg.out_dir)
    RunDir(out).write_json("finetune.json", summary)
    ensemble = f" ({cfg.n_masks}-mask ensemble)" if objective == "bert" else ""
    print(
        f"best hold-out accuracy {res['best_val_acc']:.4f} at step {res['best_step']}; "
        f"test accuracy {test_acc:.4f}{ensemble}"
    )
    print(f"wrote {out / 'best.pt'}, {out / 'finetune.json'} and {out / 'finetune.png'}")
    chance = near_chance(test_acc, test.labels)
    if chance is not None:
        print(
            f"note: test accuracy {test_acc:.4f} is near chance ({chance:.4f}, always the most "
            f"frequent class): the classifier learned little in {res['step']} steps; train "
            "longer (--steps) or raise --lr"
        )


def near_chance(acc: float, labels) -> float | None:
    """The chance accuracy (the most frequent class's share of ``labels``) when ``acc`` is
    within a tenth of the way from it to 1, else None."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    chance = float(counts.max() / counts.sum())
    return chance if acc < chance + 0.1 * (1 - chance) else None
