"""``igpt pretrain``: flags from ``TrainConfig``'s fields, the summary printed as JSON.

``igpt pretrain --out RUN --resume`` alone continues the run in RUN: the settings come from
its ``config.json``, and a flag typed beside ``--resume`` overrides the run's value (refused,
as ever, where it would make another run: ``igpt.train.RESUME_FIXED``).

``torchrun --nproc-per-node K -m igpt pretrain ...`` runs it on K processes; only rank 0
prints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from igpt.commands._common import config_from_args, dataclass_arguments, run_settings
from igpt.distributed import dist_env
from igpt.train import TrainConfig, lr_search, pretrain

log = logging.getLogger(__name__)

# what a resumed run does not take from its config.json: where and how this process runs
# (the palette comes back from the checkpoint itself)
NOT_RESUMED = ("out", "resume", "device", "progress", "cache_dir", "palette")


def add_arguments(parser) -> None:
    """Flags of ``igpt pretrain``: one per TrainConfig field, and ``--lr-search``."""
    dataclass_arguments(parser, TrainConfig, skip=("model_overrides",))
    parser.add_argument(
        "--lr-search", action="store_true", help="sec. 3.4: try 0.01, 0.003, ... in order"
    )


def run(args) -> None:
    """Pre-train (or search the learning rate) and print the summary."""
    saved = {}
    if args.resume:
        path = Path(args.out) / "config.json"
        saved = run_settings(args, path, TrainConfig, section="train", skip=NOT_RESUMED)
        if saved:
            log.info("resuming with the settings of %s, except the flags given", path)
    cfg = config_from_args(TrainConfig, args, **saved)
    result = lr_search(cfg) if args.lr_search else pretrain(cfg)
    if dist_env()[0] == 0:
        print(json.dumps(result, indent=2))
