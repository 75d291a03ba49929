"""``igpt demo``: the whole idea end to end on bundled real data, in minutes on a CPU.

    pixels -> palette -> AR pretraining (probed as it trains) -> three probes at every layer
    -> completions

On the default data (scikit-learn's scanned handwritten digits, 10 classes, upscaled to
16x16 RGB) it fits a palette, pretrains a small AR model with a linear probe of a few layers
every ``steps // PROBES_WHILE_TRAINING`` steps (``igpt.train_probe``: the paper's figure 3,
probe accuracy against validation loss), probes every layer's pooled features with the
linear and k-NN probes and its tokens with the attentive probe, beside two baselines (raw
pixels at the model's n_px and a randomly initialised model of the same size) with
``igpt.evaluation.evaluate``, as ``igpt probe`` does, repeats the linear probe with a few
labels per class over several random subsets, and completes held-out digits from their top
half. Everything lands in ``--out``:

    report.md          the numbers and the pictures, for a person to read
    metrics.json       the same numbers, for a program to read
    probe_by_layer.png probe accuracy against depth (the paper's figure 2), three probes
    probe_vs_loss.png  probe accuracy against validation loss while training (figure 3)
    loss.png           training and validation loss
    completions.png    held-out digits: the top half given, completions, the original
    pretrain/          the run directory (config.json, metrics.jsonl, checkpoints)

``--steps``, ``--model``, ``--n-px`` and ``--data`` scale it up (CIFAR-10, a folder).
``igpt.commands.demo`` is the command; it prints a one-screen summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from igpt._io import atomic_write_text

log = logging.getLogger(__name__)

# what the report keeps of the pre-training summary (bits per token = nats / ln 2, bits per
# dimension = bits per token / 3; metrics.json of older versions said val_bpd for the first)
PRETRAIN_KEYS = (
    "step",
    "loss",
    "val_loss",
    "val_bits_per_token",
    "val_bits_per_dim",
    "skipped",
)

DEFAULTS = {"steps": 600, "batch_size": 32, "lr": 3e-3}
# probes during pretraining (points per line of figure 3), at the validation steps (every
# steps // 5), so that they add no validation of their own
PROBES_WHILE_TRAINING = 5
PROBE_SIZE = 192  # labelled images each of them fits on (96 more score it)
ATTENTIVE = {"grid": 4}  # the attentive probe sees 4 x 4 patch means of each digit's tokens


@contextlib.contextmanager
def _stage(name: str, timings: dict):
    """Log a stage and record its wall time in ``timings[name]``."""
    log.info("demo: %s", name)
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 2)


def run_demo(
    out="runs/demo",
    *,
    data: str = "digits",
    model: str = "igpt-tiny",
    n_px: int | None = None,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    per_class: int = 10,
    n_subsets: int = 5,
    n_complete: int = 8,
    n_samples: int = 4,
    limit: int | None = None,
    device=None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the demo and return the metrics written to ``out/metrics.json``.

    Args:
        out: output folder (created; an earlier demo there is replaced).
        data: data spec (``digits``, ``cifar10:DIR``, ``folder:DIR``, ``npz:FILE`` ...);
            needs labels for the probes.
        model, n_px: model size and image side (n_px None: 16 for digits, 32 otherwise).
        steps, batch_size, lr: pretraining length, global batch, peak learning rate.
        per_class, n_subsets: the low-data probe's labels per class and random subsets.
        n_complete, n_samples: held-out images to complete and completions per image.
        limit: use only the first ``limit`` images of each split (quick runs, tests).
        device: "cpu", "cuda", ... (default: cuda when available).
        seed: seeds the palette, the model, the batches, the probes and the samples.
        progress: tqdm bars.
    """
    from igpt.checkpoint import load_model
    from igpt.evaluation import evaluate
    from igpt.train import TrainConfig, pretrain

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out, timings, t_start = Path(out), {}, time.perf_counter()
    run_dir = out / "pretrain"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo always starts from scratch
    with _stage("load data", timings):
        train, test = _labelled(data, limit)
    with _stage("fit palette and pretrain", timings):
        cfg = TrainConfig(
            model=model, n_px=n_px, data=data, steps=steps, batch_size=batch_size, lr=lr,
            out=str(run_dir), device=device, seed=seed, ckpt_every=steps,
            log_every=max(1, steps // 50), val_every=max(1, steps // 5), progress=progress,
            probe_every=max(1, steps // PROBES_WHILE_TRAINING), probe_size=PROBE_SIZE,
        )  # fmt: skip
        summary = pretrain(cfg, data=train)
    net, palette, _ = load_model(run_dir, device=device)
    net.eval()
    with _stage(f"probe every layer, low data ({per_class} labels per class)", timings):
        results = evaluate(
            net, palette, train, test, per_class=(per_class,), n_subsets=n_subsets,
            low_data_baselines=True, seed=seed, progress=progress, attentive=ATTENTIVE,
            probes=("linear", "attentive", "knn"),
        )  # fmt: skip
    with _stage("complete held-out images", timings):
        _completions(net, palette, test, out, n_complete, n_samples, seed, progress)
    with _stage("write report", timings):
        for src, dst in (
            ("loss_curve.png", "loss.png"),
            ("probe_vs_loss.png", "probe_vs_loss.png"),
        ):
            if (run_dir / src).is_file():
                shutil.copyfile(run_dir / src, out / dst)
        timings["total"] = round(time.perf_counter() - t_start, 2)
        metrics = _metrics(results, summary, net, palette, data, model, timings)
        metrics["while_training"] = while_training(run_dir)
        _write_report(out, metrics, results)
    return metrics


def _labelled(data: str, limit: int | None):
    """The train and test splits of ``data`` (first ``limit`` each), which need labels."""
    import numpy as np

    from igpt.data import load_images

    splits = [load_images(data, split) for split in ("train", "test")]
    if any(s.labels is None for s in splits):
        raise ValueError(f"data {data!r} has no labels; the demo's probes need them")
    return [s if limit is None else s.subset(np.arange(min(limit, len(s)))) for s in splits]


def _completions(net, palette, test, out: Path, n_complete, n_samples, seed, progress):
    """Complete the first ``n_complete`` test images from their top half; write the grid."""
    from igpt.data import tokenize
    from igpt.sample import complete, save_grid

    n_px = net.config.n_px
    rows = n_px // 2
    originals = tokenize(test.images[:n_complete], palette, n_px)
    originals = originals.to(next(net.parameters()).device)
    done = complete(net, originals, rows=rows, n_samples=n_samples, seed=seed, progress=progress)
    scale = max(1, 64 // n_px)
    save_grid(
        out / "completions.png", originals, done, palette, n_prefix=rows * n_px, scale=scale,
        labels=True,
    )  # fmt: skip


def _metrics(results, summary, net, palette, data, model, timings) -> dict:
    """``metrics.json``: what ran, the pretraining losses, and the probes' accuracies."""
    low = {"pretrained": results.get("low_data"), **results.get("low_data_baselines", {})}

    def layers(res):
        concat = res.get("concat") and {
            k: res["concat"][k] for k in ("layers", "val_acc", "test_acc")
        }
        rows = [{k: r[k] for k in ("layer", "val_acc", "test_acc")} for r in res["rows"]]
        return {"best_layer": res["best_layer"], "concat": concat or None, "layers": rows}

    return {
        "data": data,
        "n_train": results["n_train"],
        "n_test": results["n_test"],
        "model": model,
        "n_px": net.config.n_px,
        "n_colors": len(palette),
        "params": net.num_params(),
        "device": str(next(net.parameters()).device),
        "pretrain": {k: summary.get(k) for k in PRETRAIN_KEYS},
        "probe": {
            "pretrained": layers(results["layers"]),
            "random init": layers(results["random_init"]),
        },
        "probes": {name: layers(results[name]) for name in ("attentive", "knn")},
        "raw_pixels": {k: results["raw_pixels"][k] for k in ("val_acc", "test_acc")},
        "low_data": {
            name: {k: r["rows"][0][k] for k in ("per_class", "mean", "std", "accs")}
            for name, r in low.items()
            if r and r["rows"]  # no row: fewer than per_class images in some class
        },
        "wall_s": timings,
    }


def pct(x) -> str:
    """``x`` as a percentage with one decimal; "-" for None or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _write_report(out: Path, m: dict, results: dict) -> None:
    """``metrics.json``, ``probe_by_layer.png`` and ``report.md``: the probe section is
    ``igpt.reporting.summary_text``, the Markdown ``igpt probe`` writes."""
    from igpt.reporting import depth_figure, summary_text

    title = f"Probes on {m['data']}: accuracy vs depth"
    depth_figure(results, out / "probe_by_layer.png", title=title)
    atomic_write_text(out / "metrics.json", json.dumps(m, indent=2))
    pre = m["pretrain"]
    lines = [
        f"# igpt demo on `{m['data']}`",
        "",
        f"Model {m['model']} ({m['params'] / 1e6:.2f}M parameters), pretrained with the AR "
        f"objective for {pre['step']} steps on {m['n_px']}x{m['n_px']} images "
        f"quantized to {m['n_colors']} colours ({m['n_train']} training images, {m['n_test']} test "
        f"images; device {m['device']}; {m['wall_s']['total']:.0f} s in all).",
        "",
        f"Final validation loss: {pre['val_loss']:.3f} nats per token (pixel), "
        f"{pre['val_bits_per_token']:.3f} bits per token, "
        f"{pre['val_bits_per_dim']:.3f} bits per dimension (sub-pixel; of the palette's "
        "tokens, not comparable with bits/dim of models of raw 8-bit sub-pixels).",
        "",
        "Linear probes: L-BFGS logistic regression, L2 chosen on a 10% hold-out; layer 0 is the "
        "embeddings, the last is after the final norm; raw pixels are the images at "
        f"{m['n_px']}x{m['n_px']}, as the model sees them. Beside it, on the same split: the "
        "attentive probe (a learned query cross-attending over the layer's tokens, here "
        f"{ATTENTIVE['grid']}x{ATTENTIVE['grid']} patch means, then a linear head; AdamW) and "
        "the k-NN probe (cosine similarity, weighted vote, k chosen on the same hold-out).",
        "",
        "## What the numbers show",
        "",
        *_findings(m),
        "",
        summary_text(results),
        "",
        "![accuracy vs depth](probe_by_layer.png)",
        "",
        *_three_probes_text(m),
        *_figure3_text(m),
        "## Training",
        "",
        "![loss](loss.png)",
        "",
        "## Completions",
        "",
        "Each row: the top half given to the model (rest grey), its completions, the original "
        "(the columns are named above the picture).",
        "",
        "![completions](completions.png)",
        "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in m["wall_s"].items()),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _findings(m: dict) -> list[str]:
    """The report's reading of its numbers, in words: does pretraining beat the baselines,
    which layer won and how it was chosen, what the low-data probe averaged."""
    pre, rnd = m["probe"]["pretrained"], m["probe"]["random init"]
    best = next(r for r in pre["layers"] if r["layer"] == pre["best_layer"])
    peak = max(pre["layers"], key=lambda r: r["test_acc"])
    rnd_best = next(r for r in rnd["layers"] if r["layer"] == rnd["best_layer"])
    raw = m["raw_pixels"]["test_acc"]
    gain_rnd, gain_raw = best["test_acc"] - rnd_best["test_acc"], best["test_acc"] - raw
    verdict = "beat both baselines" if min(gain_rnd, gain_raw) > 0 else "do not beat both baselines"
    lines = [
        f"- The pretrained model's features {verdict}: {pct(best['test_acc'])} test accuracy "
        f"at its best layer, against {pct(rnd_best['test_acc'])} for a randomly initialised "
        f"model of the same size ({100 * gain_rnd:+.1f} points) and {pct(raw)} for raw pixels "
        f"({100 * gain_raw:+.1f} points). What pretraining bought is the gap to the random model.",
        f"- The best layer, {pre['best_layer']} of {len(pre['layers']) - 1}, was chosen by "
        f"accuracy on a hold-out of the training images ({pct(best['val_acc'])}), never by "
        "test accuracy; the plot shows test accuracy, so its peak "
        + (
            f"is at layer {peak['layer']} ({pct(peak['test_acc'])}): the two differ by "
            "the noise of a small hold-out and test set."
            if peak["layer"] != pre["best_layer"]
            else "is at the same layer."
        ),
    ]
    low = m["low_data"].get("pretrained")
    if low:
        n = len(low["accs"])
        lines.append(
            f"- With {low['per_class']} labels per class the pretrained features reach "
            f"{pct(low['mean'])} ± {pct(low['std'])} (mean ± std over {n} random subsets of "
            "the training set, the same subsets for every feature set)."
        )
    return lines


def while_training(run_dir: Path) -> dict:
    """The probe rows the pretraining logged (``igpt.train_probe``): the points of figure 3,
    and what they cost (seconds in all, and the mean share of the time between probes)."""
    from igpt.rundir import RunDir

    rows = [r for r in RunDir(run_dir).read_metrics() if "probe_acc" in r]
    keys = ("step", "val_loss", "layer", "probe_acc")
    per_probe = {r["step"]: r for r in rows}.values()  # one row per probe for its cost
    return {
        "probe": rows[0]["probe"] if rows else None,
        "points": [{k: r[k] for k in keys} for r in rows],
        "seconds": round(sum(r["probe_s"] for r in per_probe), 2),
        "mean_share": sum(r["probe_share"] for r in per_probe) / max(len(per_probe), 1),
    }


def _figure3_text(m: dict) -> list[str]:
    """The report's figure 3 section: the plot, and in words how the probe accuracy moved as
    the validation loss fell."""
    wt = m.get("while_training") or {}
    pts = [p for p in wt.get("points", []) if p["val_loss"] is not None]
    if not pts:
        return []
    last_step = max(p["step"] for p in pts)
    final = {p["layer"]: p["probe_acc"] for p in pts if p["step"] == last_step}
    layer = max(final, key=final.get)
    line = sorted((p["step"], p["val_loss"], p["probe_acc"]) for p in pts if p["layer"] == layer)
    (s0, l0, a0), (s1, l1, a1) = line[0], line[-1]
    r = _correlation([p[1] for p in line], [p[2] for p in line])
    trend = (
        "lower loss went with better features, as in the paper's figure 3"
        if r < -0.5
        else "the accuracy did not follow the loss closely here (few, noisy points)"
    )
    return [
        "## Probing while pretraining (the paper's figure 3)",
        "",
        f"A {wt['probe']} probe of layers {sorted(final)} on a fixed sample of labelled images "
        f"ran {len(line)} times during pretraining. At layer {layer}, the best at the end, "
        f"the validation loss fell from {l0:.3f} (step {s0}) to {l1:.3f} (step {s1}) nats per "
        f"token while the probe's test accuracy went from {pct(a0)} to {pct(a1)}; the "
        f"correlation of loss and accuracy over the {len(line)} probes is {r:+.2f}: {trend}. "
        f"The probes took {wt['seconds']:.0f} s in all, {100 * wt['mean_share']:.0f}% of the "
        "time between them on average.",
        "",
        "![probe accuracy vs validation loss](probe_vs_loss.png)",
        "",
    ]


def _correlation(a, b) -> float:
    """Pearson's r of two sequences (0 when one is constant or shorter than 2)."""
    import numpy as np

    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _three_probes_text(m: dict) -> list[str]:
    """The report's words on the linear, attentive and k-NN probes at every layer."""
    names = {"linear": m["probe"]["pretrained"], **m.get("probes", {})}
    best = {}
    for name, res in names.items():
        row = next(r for r in res["layers"] if r["layer"] == res["best_layer"])
        best[name] = (res["best_layer"], row["test_acc"])
    shown = {"linear": "linear", "attentive": "attentive", "knn": "k-NN"}
    said = "; ".join(f"{shown[n]} {pct(a)} at layer {lay}" for n, (lay, a) in best.items())
    top = shown[max(best, key=lambda n: best[n][1])]
    compare = ""
    if "attentive" in best:
        lin = {r["layer"]: r["test_acc"] for r in m["probe"]["pretrained"]["layers"]}
        att = {r["layer"]: r["test_acc"] for r in m["probes"]["attentive"]["layers"]}
        wins = sum(att[k] > lin[k] for k in att if k in lin)
        gap = 100 * (best["attentive"][1] - best["linear"][1])
        compare = (
            f" At their best layers the attentive probe is {gap:+.1f} points from the linear "
            f"one, and above it at {wins} of {len(att)} layers."
        )
    return [
        "## Three probes at every layer",
        "",
        f"Each probe's best layer (chosen on the hold-out) and its test accuracy: {said}. "
        f"The {top} probe reads the most out of these features.{compare} The attentive "
        "probe sees the "
        "tokens rather than their mean, so where it beats the linear probe, the class "
        "information sits in some places of the image more than in the average; the k-NN "
        "probe trains nothing, so it says how far images of a class cluster together "
        "(the per-layer numbers are in the tables above; the depth plot draws all three).",
        "",
    ]
