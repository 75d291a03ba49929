"""``igpt pretrain``: flags from ``TrainConfig``'s fields, the summary printed as JSON.

``torchrun --nproc-per-node K -m igpt pretrain ...`` runs it on K processes; only rank 0
prints.
"""

from __future__ import annotations

import json

from igpt.commands._common import config_from_args, dataclass_arguments
from igpt.distributed import dist_env
from igpt.train import TrainConfig, lr_search, pretrain


def add_arguments(parser) -> None:
    """Flags of ``igpt pretrain``: one per TrainConfig field, and ``--lr-search``."""
    dataclass_arguments(parser, TrainConfig, skip=("model_overrides",))
    parser.add_argument(
        "--lr-search", action="store_true", help="sec. 3.4: try 0.01, 0.003, ... in order"
    )


def run(args) -> None:
    """Pre-train (or search the learning rate) and print the summary."""
    cfg = config_from_args(TrainConfig, args)
    result = lr_search(cfg) if args.lr_search else pretrain(cfg)
    if dist_env()[0] == 0:
        print(json.dumps(result, indent=2))
