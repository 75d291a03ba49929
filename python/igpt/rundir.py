"""A run directory, as pre-training and fine-tuning both keep one.

    run = RunDir("runs/x")                  # is_main=False on the other torchrun ranks
    run = RunDir("runs/x", report_to="tensorboard")   # metrics rows to a tracker as well
    latest = run.check_fresh(resume)        # the latest checkpoint's name, or None
    found = run.resume_checkpoint(resume)   # (path, checkpoint) of the newest intact one, or None
    run.truncate_metrics(step)              # drop rows a killed run logged past it
    run.append_metrics([{"step": 1, "loss": 2.3}])
    run.save_checkpoint(state, step, keep=3)
    run.save_sharded_checkpoint(tensors, state, step, keep=3, barrier=d.barrier)  # all ranks
    run.plot("loss_curve.png", [("loss (nats / token)", [("loss", "train")])])

It holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step, with at least
``step``), ``ckpt_XXXXXXXX.pt`` files or ``ckpt_XXXXXXXX.dcp`` directories (sharded,
``igpt.sharded``) and the PNG curves. JSON and checkpoints are written
atomically (``igpt._io``): a crash leaves the old file or the new one, and the temporary
files of writes a kill interrupted are removed when the run directory is opened again. Only
the main process writes; the others may read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from igpt._io import atomic_write_text, remove_stale_temp_files
from igpt.checkpoint import (
    atomic_torch_save,
    checkpoint_path,
    latest_checkpoint,
    latest_intact_checkpoint,
    run_checkpoints,
)
from igpt.sharded import save_sharded
from igpt.trackers import open_trackers

log = logging.getLogger(__name__)

# metric names older versions logged -> today's. "val_bpd" was bits per token (a pixel's
# palette colour), not the literature's bits per sub-pixel dimension (a third of it).
RENAMED = {"val_bpd": "val_bits_per_token"}


def _current_names(row):
    """A metrics row with ``RENAMED`` keys under their new names (bits/dim added beside)."""
    if not isinstance(row, dict) or not RENAMED.keys() & row.keys():
        return row
    row = {RENAMED.get(k, k): v for k, v in row.items()}
    bits = row.get("val_bits_per_token")
    if isinstance(bits, (int, float)) and "val_bits_per_dim" not in row:
        row["val_bits_per_dim"] = bits / 3
    return row


class RunDir:
    """The files of one run under ``path`` (created by the main process, which also removes
    the temporary files a killed run left there). ``report_to`` (``igpt.trackers``: "none",
    "tensorboard", "wandb") sends every metrics row to that tracker too (main process)."""

    def __init__(self, path, *, is_main: bool = True, report_to: str = "none"):
        self.path, self.is_main = Path(path), is_main
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.trackers = open_trackers(report_to, self.path, is_main=is_main)

    def close(self) -> None:
        """Flush and close the trackers (``report_to``)."""
        self.trackers.close()

    def check_fresh(self, resume: bool) -> Path | None:
        """The latest checkpoint to resume from (None: start at step 0).

        Raises FileExistsError when the directory holds checkpoints and ``resume`` is
        False: two runs are never silently mixed in one directory.
        """
        latest = latest_checkpoint(self.path)
        if latest is not None and not resume:
            raise FileExistsError(
                f"{self.path} already holds checkpoints (latest {latest.name}); pass "
                "--resume (resume=True) to continue that run, or choose another --out"
            )
        if resume and latest is None:
            log.info("resume: no checkpoint in %s yet; starting from step 0", self.path)
        return latest

    def resume_checkpoint(self, resume: bool, map_location="cpu") -> tuple[Path, dict] | None:
        """``check_fresh``, then ``(path, checkpoint)`` of the newest checkpoint that reads
        back (a damaged newer one is passed over with a warning naming both), or None. A
        sharded one comes without its tensors (``sharded``: its path), which the trainer
        loads shard by shard."""
        if self.check_fresh(resume) is None:
            return None
        return latest_intact_checkpoint(self.path, map_location=map_location, tensors=False)

    def write_json(self, name: str, obj) -> Path:
        """``obj`` as indented JSON in ``name``, atomically (main process only)."""
        path = self.path / name
        if self.is_main:
            atomic_write_text(path, json.dumps(obj, indent=2))
        return path

    def append_metrics(self, rows: list[dict]) -> None:
        """Append rows to metrics.jsonl (main process only)."""
        if self.is_main and rows:
            with open(self.metrics_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            self.trackers.log(rows)

    def read_metrics(self) -> list[dict]:
        """The logged rows; a line half-written when a process died is skipped. Rows of
        older versions come back under today's names (``RENAMED``)."""
        rows = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(_current_names(json.loads(line)))
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop rows past ``step``, the step a run (re)starts from: a killed run may have
        logged steps its last checkpoint does not hold, and they are about to be redone."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        keep = [
            r
            for r in self.read_metrics()
            if isinstance(r, dict) and r.get("step", step + 1) <= step
        ]
        # atomic: a crash here must not lose the rows that are kept
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    def save_checkpoint(self, state: dict, step: int, *, keep: int = 0) -> Path:
        """Write ``state`` as ``ckpt_<step>.pt`` atomically and keep the newest ``keep``
        checkpoints (0 keeps all). Main process only; returns the path."""
        path = checkpoint_path(self.path, step)
        if self.is_main:
            atomic_torch_save(state, path)
            self._prune(keep)
        return path

    def save_sharded_checkpoint(
        self, tensors: dict, state: dict, step: int, *, keep: int = 0, barrier=lambda: None
    ) -> Path:
        """Write ``ckpt_<step>.dcp`` (``igpt.sharded.save_sharded``: ``tensors`` sharded, one
        file per rank; ``state`` rank 0's) atomically and keep the newest ``keep``
        checkpoints. A collective: every rank calls it; returns the path."""
        path = save_sharded(
            checkpoint_path(self.path, step, sharded=True),
            tensors,
            state,
            is_main=self.is_main,
            barrier=barrier,
        )
        if self.is_main:
            self._prune(keep)
        return path

    def _prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints, files or directories (0: none)."""
        for old in run_checkpoints(self.path)[:-keep] if keep > 0 else []:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)

    def plot(self, name: str, panels, *, title: str | None = None) -> Path | None:
        """A PNG of metrics against step, one panel per ``(ylabel, [(key, label), ...])``.

        Rows with ``key`` give a line; keys starting with ``val`` are drawn with markers.
        Returns None without matplotlib or on a non-main process.
        """
        if not self.is_main:
            return None
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return None
        rows = self.read_metrics()
        fig = Figure(figsize=(4.5 * len(panels) + 1.5, 4), dpi=100)  # outside pyplot's state
        axes = fig.subplots(1, len(panels))
        for ax, (ylabel, series) in zip(list(getattr(axes, "flat", [axes])), panels, strict=True):
            for key, label in series:
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    style = "o-" if key.startswith("val") else "-"
                    ax.plot(*zip(*pts, strict=True), style, label=label, markersize=3)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = self.path / name
        fig.savefig(path)
        return path
