"""Experiment trackers: the rows of ``metrics.jsonl`` sent to TensorBoard or Weights & Biases.

    trackers = open_trackers("tensorboard", run_dir, is_main=rank == 0)   # imports checked
    trackers.log([{"step": 10, "loss": 2.31, "lr": 3e-3}])   # what append_metrics writes
    trackers.close()

``--report-to`` takes transformers' names: ``none`` (the default), ``tensorboard`` (event
files in ``<run>/tensorboard``, for ``tensorboard --logdir``) and ``wandb``. Only the main
process reports. Every number of a row is logged under its ``metrics.jsonl`` key at the
row's ``step``. The trackers are optional extras (``pip install "igpt[tensorboard]"`` or
``"igpt[wandb]"``), imported only when asked for; a missing one is an ImportError that says
what to install, raised before any training.

A resumed run redoes the steps after its checkpoint: TensorBoard is told to purge the
events from the first step logged again (``purge_step``), as ``metrics.jsonl`` drops its
rows past the checkpoint. Weights & Biases continues the run directory's own run (its id
is kept in ``<run>/wandb_id``), with the run's ``config.json`` as its config; its project
is ``$WANDB_PROJECT``, else "igpt". Both start at the first row logged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["REPORT_TO", "open_trackers", "Trackers"]

REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


def scalars(row: dict) -> dict:
    """The entries of ``row`` that a tracker can plot: finite ints and floats, not ``step``.
    A row of one layer (the probes while pretraining: ``layer`` k) gives its ``probe*``
    numbers as ``probe_acc/layer_k`` and so on, one curve per layer, not one zig-zag."""
    layer = row.get("layer")
    out = {}
    for k, v in row.items():
        if k in ("step", "layer") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[f"{k}/layer_{layer}" if layer is not None and k.startswith("probe") else k] = v
    return out


class _TensorBoard:
    """Scalars in ``<run>/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "--report-to tensorboard needs the tensorboard package: "
                'pip install "igpt[tensorboard]"'
            ) from e
        self._make = SummaryWriter
        self.log_dir, self.writer = run_dir / TENSORBOARD_DIR, None

    def log(self, rows: list[dict]) -> None:
        if self.writer is None:  # the first row logged: events from its step on are replaced
            self.writer = self._make(log_dir=str(self.log_dir), purge_step=rows[0].get("step"))
        for row in rows:
            for key, value in scalars(row).items():
                self.writer.add_scalar(key, value, global_step=row.get("step"))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandB:
    """One wandb run per run directory (resumed with it)."""

    def __init__(self, run_dir: Path):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                '--report-to wandb needs the wandb package: pip install "igpt[wandb]" '
                "(then `wandb login`, or WANDB_MODE=offline)"
            ) from e
        self.wandb, self.run_dir, self.run = wandb, run_dir, None

    def _start(self):
        id_file, conf = self.run_dir / "wandb_id", self.run_dir / "config.json"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = self.wandb.util.generate_id()
            id_file.write_text(run_id)
        return self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "igpt"),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=json.loads(conf.read_text()) if conf.is_file() else {},
        )

    def log(self, rows: list[dict]) -> None:
        self.run = self.run or self._start()
        for row in rows:
            self.run.log(scalars(row), step=row.get("step"))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Trackers:
    """The trackers of one run (none on a process that is not the main one)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, rows: list[dict]) -> None:
        """Send ``rows`` (``metrics.jsonl`` rows, each with ``step``) to every tracker."""
        if rows:
            for t in self.trackers:
                t.log(rows)

    def close(self) -> None:
        """Flush and close every tracker (a no-op without any)."""
        for t in self.trackers:
            t.close()
        self.trackers = []


def open_trackers(report_to: str, run_dir, *, is_main: bool = True) -> Trackers:
    """The trackers ``report_to`` names (``REPORT_TO``) for the run in ``run_dir``; none on
    a process that is not ``is_main``. A ValueError for an unknown name; an ImportError
    naming the extra to install (checked here, before any training)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r} (--report-to)")
    if not is_main or report_to == "none":
        return Trackers([])
    run_dir = Path(run_dir)
    if report_to == "tensorboard":
        return Trackers([_TensorBoard(run_dir)])
    return Trackers([_WandB(run_dir)])
