"""Probing while pretraining: the paper's figure 3 from a user's own run.

    igpt pretrain --probe-every 100 [--probe-data SPEC] [--probe-layers 2 4] [--probe knn]

Every ``probe_every`` steps (and at the last step) the trainer validates and then probes: the
features of a few layers (default L/4, L/2, 3L/4 and L) of a fixed labelled sample from the
token cache (``probe_size`` images of ``probe_data``'s training split, half as many of its
test split, or of the rest of the training split when it has no test split) are extracted
with the model in eval mode, and a probe (``linear``: ``igpt.probe.linear_probe`` with C from
``PROBE_CS``; ``knn``; ``attentive``, on 4 x 4 patch means of the tokens) is fitted on the
first and scored on the second. One
row per layer goes to ``metrics.jsonl``: ``step``, ``val_loss``, ``layer``, ``probe`` (its
kind), ``probe_acc`` (test accuracy, 0..1), ``probe_s`` (its wall time) and ``probe_share``
(that time over the wall time since the previous probe ended, the probe included). The run
directory gets ``probe_vs_loss.png``: probe accuracy against validation loss (figure 3) and
against step, one line per layer; the progress bar shows the best layer's accuracy.

Cost. The sample is fixed, so a probe costs the same whatever the data set's size: a forward
pass over 1.5 x ``probe_size`` images (about the work of 1.5 x probe_size / (3 x batch_size)
training steps) and one small fit per layer. At the defaults (512 + 256 images) a probe is
meant to take at most ``TARGET_SHARE`` (10%) of the run's time; past ``WARN_SHARE`` (25%) a
warning says to raise ``--probe-every`` or lower ``--probe-size``.

Under torchrun the probe runs on rank 0 only while the others wait at a barrier; with FSDP
(parameters sharded across processes) it is switched off with a warning.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from igpt.attentive import attentive_probe, token_features
from igpt.features import extract_features, resolve_layers
from igpt.knn import knn_probe
from igpt.probe import linear_probe

__all__ = ["TrainingProbe", "default_probe_layers", "plot_probe_vs_loss", "PROBE_CS"]

log = logging.getLogger(__name__)

PROBE_CS = (0.01, 0.1, 1.0)  # the L2 strengths the in-training linear probe chooses from
TARGET_SHARE = 0.10
WARN_SHARE = 0.25
PLOT = "probe_vs_loss.png"
ATTENTIVE_GRID = 4  # the in-training attentive probe's tokens: 4 x 4 patch means an image


def default_probe_layers(n_layer: int) -> list[int]:
    """L/4, L/2, 3L/4 and L (rounded, without repeats, at least layer 1)."""
    return sorted({max(1, round(n_layer * q)) for q in (0.25, 0.5, 0.75)} | {n_layer})


def _sample(tokens, labels, n: int, rng, exclude=None):
    """``n`` random rows (sorted; not in ``exclude``) as int64 tokens and labels."""
    pool = np.setdiff1d(np.arange(len(tokens)), exclude if exclude is not None else [])
    idx = np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))
    return idx, torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64)), labels[idx]


def _probe_splits(cfg, palette):
    """(train tokens, labels), (test tokens, labels): the fixed labelled sample."""
    from igpt.data import cached_tokens

    spec = cfg.probe_data or cfg.data
    kw = dict(cache_dir=cfg.cache_dir, progress=False)
    tokens, labels = cached_tokens(spec, "train", palette, cfg.n_px, **kw)
    if labels is None:
        raise ValueError(
            f"probe_data {spec!r} has no labels; --probe-every needs a labelled --probe-data"
        )
    rng = np.random.default_rng(cfg.seed)
    idx, x, y = _sample(tokens, labels, cfg.probe_size, rng)
    try:
        test, test_labels = cached_tokens(spec, "test", palette, cfg.n_px, **kw)
    except (ValueError, FileNotFoundError, KeyError) as e:
        log.info("probe: %s has no test split (%s); scoring on other training images", spec, e)
        test, test_labels = None, None
    if test_labels is None:
        _, xt, yt = _sample(tokens, labels, cfg.probe_size // 2, rng, exclude=idx)
    else:
        _, xt, yt = _sample(test, test_labels, cfg.probe_size // 2, rng)
    if len(xt) == 0 or len(np.unique(y)) < 2:
        raise ValueError(f"probe_data {spec!r} gives too few labelled images for a probe")
    return (x, y), (xt, yt)


class TrainingProbe:
    """The probe a ``Trainer`` runs every ``cfg.probe_every`` steps (off when 0).

    ``due(step)`` says whether a step validates and probes, ``run(trainer, row)`` probes
    after the validation row ``row`` is logged, ``postfix`` is what the progress bar shows.
    """

    def __init__(self, cfg, *, n_layer: int, palette, dist):
        self.every = cfg.probe_every if not dist.sharded else 0
        if cfg.probe_every and dist.sharded:
            log.warning("--probe-every is off under FSDP: the probe needs the whole model")
        self.cfg, self.dist, self.postfix = cfg, dist, {}
        self.kind, self.last_end, self.warned = cfg.probe_kind, time.perf_counter(), False
        try:
            self.layers = (
                resolve_layers(list(cfg.probe_layers), n_layer)
                if cfg.probe_layers
                else default_probe_layers(n_layer)
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"probe_layers (--probe-layers): {e}") from None
        self.data = _probe_splits(cfg, palette) if self.every and dist.is_main else None

    def due(self, step: int) -> bool:
        """Whether ``step`` probes (every ``probe_every`` steps, and the run's last)."""
        return bool(self.every) and (step % self.every == 0 or step == self.cfg.steps)

    def run(self, trainer, row: dict) -> None:
        """Probe the model after ``row`` (the step's metrics, with its validation loss) and
        log one row per layer; rank 0 probes, the others wait."""
        if not self.due(row["step"]):
            return
        if self.dist.is_main:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # the run's own RNG streams stay untouched
                accs = self._accuracies(trainer.raw_model, trainer.device)
            seconds = time.perf_counter() - t0
            share = seconds / max(time.perf_counter() - self.last_end, 1e-9)
            base = {"step": row["step"], "val_loss": row.get("val_loss"), "probe": self.kind}
            rows = [
                {**base, "layer": layer, "probe_acc": acc, "probe_s": seconds, "probe_share": share}
                for layer, acc in accs.items()
            ]
            trainer.run.append_metrics(rows)
            self._report(row["step"], accs, seconds, share)
            plot_probe_vs_loss(trainer.run.read_metrics(), trainer.run.path / PLOT)
        self.dist.barrier()
        self.last_end = time.perf_counter()

    def _accuracies(self, model, device) -> dict[int, float]:
        (x, y), (xt, yt) = self.data
        kw = dict(layers=self.layers, device=device, progress=False)
        if self.kind == "attentive":
            f, ft = (token_features(model, t, grid=ATTENTIVE_GRID, **kw) for t in (x, xt))
            fit = attentive_probe
        else:
            f, ft = (extract_features(model, t, **kw) for t in (x, xt))
            fit = knn_probe if self.kind == "knn" else _linear
        return {
            layer: fit(f[:, j], y, ft[:, j], yt, seed=self.cfg.seed)["test_acc"]
            for j, layer in enumerate(self.layers)
        }

    def _report(self, step: int, accs: dict, seconds: float, share: float) -> None:
        best = max(accs, key=accs.get)
        self.postfix = {"probe": f"{100 * accs[best]:.1f}%@{best}"}
        text = ", ".join(f"layer {k} {100 * v:.1f}%" for k, v in accs.items())
        log.info("step %d: %s probe %s (%.1f s, %.0f%% of the time since the last probe)",
                 step, self.kind, text, seconds, 100 * share)  # fmt: skip
        if share > WARN_SHARE and not self.warned:
            self.warned = True
            log.warning(
                "the probe took %.0f%% of the run's time since the last one (meant: at most "
                "%.0f%%); raise --probe-every or lower --probe-size",
                100 * share, 100 * TARGET_SHARE,
            )  # fmt: skip


def _linear(f, y, ft, yt, *, seed):
    return linear_probe(f, y, ft, yt, Cs=PROBE_CS, seed=seed, max_iter=200)


def plot_probe_vs_loss(rows: list[dict], path) -> None:
    """``probe_vs_loss.png``: probe accuracy against validation loss (the paper's figure 3;
    the loss axis runs from high to low, so training goes left to right) and against step,
    one line per layer, from the ``probe_acc`` rows of ``metrics.jsonl``."""
    from matplotlib.figure import Figure

    from igpt._io import atomic_write

    probe_rows = [r for r in rows if "probe_acc" in r]
    if not probe_rows:
        return
    fig = Figure(figsize=(10, 4), dpi=110)
    ax_loss, ax_step = fig.subplots(1, 2)
    for layer in sorted({r["layer"] for r in probe_rows}):
        pts = sorted((r["step"], r.get("val_loss"), 100 * r["probe_acc"])
                     for r in probe_rows if r["layer"] == layer)  # fmt: skip
        with_loss = [(v, a) for _, v, a in pts if v is not None]
        if with_loss:
            ax_loss.plot(*zip(*with_loss, strict=True), "o-", markersize=3, label=f"layer {layer}")
        ax_step.plot([p[0] for p in pts], [p[2] for p in pts], "o-", markersize=3,
                     label=f"layer {layer}")  # fmt: skip
    ax_loss.invert_xaxis()
    ax_loss.set_xlabel("validation loss (nats / token), falling as training goes on")
    ax_step.set_xlabel("step")
    kind = probe_rows[-1].get("probe", "linear")
    for ax in (ax_loss, ax_step):
        ax.set_ylabel(f"{kind} probe test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Probe accuracy while pretraining (cf. the paper's figure 3)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
