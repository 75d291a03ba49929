"""``igpt demo``: the whole idea end to end on bundled real data, in minutes on a CPU.

    pixels -> palette -> AR pretraining -> linear probes at every layer -> completions

On the default data (scikit-learn's scanned handwritten digits, 10 classes, upscaled to
16x16 RGB) it fits a palette, pretrains a small AR model, probes every layer's pooled
features beside two baselines (raw pixels and a randomly initialised model of the same
size), repeats the probe with a few labels per class over several random subsets, and
completes held-out digits from their top half. Everything lands in ``--out``:

    report.md          the numbers and the pictures, for a person to read
    metrics.json       the same numbers, for a program to read
    probe_by_layer.png linear-probe accuracy against depth (the paper's figure 2)
    loss.png           training and validation loss
    completions.png    held-out digits: the top half given, completions, the original
    pretrain/          the run directory (config.json, metrics.jsonl, checkpoints)

``--steps``, ``--model``, ``--n-px`` and ``--data`` scale it up (CIFAR-10, a folder).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULTS = {"steps": 600, "batch_size": 32, "lr": 3e-3}


def _stage(name: str, timings: dict):
    """Context manager that logs a stage and records its wall time in ``timings``."""

    class _Stage:
        def __enter__(self):
            log.info("demo: %s", name)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 2)

    return _Stage()


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
    from igpt.data import load_images, tokenize
    from igpt.probe import (
        extract_features,
        linear_probe,
        low_data_probe,
        plot_accuracy_vs_depth,
        probe_layers,
        random_init_model,
        raw_pixel_features,
    )
    from igpt.sample import complete, save_grid
    from igpt.train import TrainConfig, pretrain

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = Path(out)
    run_dir = out / "pretrain"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo always starts from scratch
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    with _stage("load data", timings):
        train = load_images(data, "train")
        test = load_images(data, "test")
        if train.labels is None or test.labels is None:
            raise ValueError(f"data {data!r} has no labels; the demo's probes need them")
        if limit is not None:
            train, test = (
                train.subset(np.arange(min(limit, len(train)))),
                test.subset(np.arange(min(limit, len(test)))),
            )

    with _stage("fit palette and pretrain", timings):
        cfg = TrainConfig(
            model=model,
            n_px=n_px,
            data=data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            out=str(run_dir),
            device=device,
            seed=seed,
            ckpt_every=steps,
            log_every=max(1, steps // 50),
            val_every=max(1, steps // 5),
            progress=progress,
        )
        summary = pretrain(cfg, data=train)

    net, palette, ckpt = load_model(run_dir, device=device)
    net.eval()
    n_px = net.config.n_px
    dev = next(net.parameters()).device

    with _stage("tokenize", timings):
        train_tok = tokenize(train.images, palette, n_px)
        test_tok = tokenize(test.images, palette, n_px)

    with _stage("probe every layer", timings):
        feats = {}
        models = {"pretrained": net, "random init": random_init_model(net, seed=seed).to(dev)}
        for name, m in models.items():
            feats[name] = (
                extract_features(m, train_tok, progress=progress),
                extract_features(m, test_tok, progress=progress),
            )
        layers = {
            name: probe_layers(
                feats[name][0],
                train.labels,
                feats[name][1],
                test.labels,
                concat=5,
                progress=progress,
                seed=seed,
            )
            for name in models
        }
        pixels = (raw_pixel_features(train.images), raw_pixel_features(test.images))
        raw = linear_probe(pixels[0], train.labels, pixels[1], test.labels, seed=seed)

    with _stage(f"low-data probe ({per_class} labels per class)", timings):
        low = {}
        sets = {
            "pretrained": [f[:, layers["pretrained"]["best_layer"]] for f in feats["pretrained"]],
            "random init": [
                f[:, layers["random init"]["best_layer"]] for f in feats["random init"]
            ],
            "raw pixels": pixels,
        }
        for name, (tr, te) in sets.items():
            res = low_data_probe(
                tr,
                train.labels,
                te,
                test.labels,
                per_class=(per_class,),
                n_subsets=n_subsets,
                seed=seed,
                progress=False,
            )
            if not res["rows"]:  # fewer than per_class images in some class
                continue
            low[name] = {k: res["rows"][0][k] for k in ("per_class", "mean", "std", "accs")}

    with _stage("complete held-out images", timings):
        rows = n_px // 2
        originals = test_tok[:n_complete].to(dev)
        completions = complete(
            net, originals, rows=rows, n_samples=n_samples, seed=seed, progress=progress
        )
        save_grid(
            out / "completions.png",
            originals,
            completions,
            palette,
            n_prefix=rows * n_px,
            scale=max(1, 64 // n_px),
        )

    with _stage("write report", timings):
        plot_accuracy_vs_depth(
            layers,
            out / "probe_by_layer.png",
            baselines={"raw pixels": raw["test_acc"]},
            title=f"Linear probe on {data}: accuracy vs depth",
        )
        if (run_dir / "loss_curve.png").is_file():
            shutil.copyfile(run_dir / "loss_curve.png", out / "loss.png")
        timings["total"] = round(time.perf_counter() - t_start, 2)
        metrics = {
            "data": data,
            "n_train": len(train),
            "n_test": len(test),
            "model": model,
            "n_px": n_px,
            "n_colors": len(palette),
            "params": net.num_params(),
            "device": str(dev),
            "pretrain": {
                k: summary.get(k) for k in ("step", "loss", "val_loss", "val_bpd", "skipped")
            },
            "probe": {
                name: {
                    "best_layer": res["best_layer"],
                    "concat": None
                    if res["concat"] is None
                    else {k: res["concat"][k] for k in ("layers", "val_acc", "test_acc")},
                    "layers": [
                        {k: r[k] for k in ("layer", "val_acc", "test_acc")} for r in res["rows"]
                    ],
                }
                for name, res in layers.items()
            },
            "raw_pixels": {"val_acc": raw["val_acc"], "test_acc": raw["test_acc"]},
            "low_data": low,
            "wall_s": timings,
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "report.md").write_text(_report(metrics))
    return metrics


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _report(m: dict) -> str:
    """The Markdown report: what ran, the probe table, the baselines and the pictures."""
    pre, rnd = m["probe"]["pretrained"], m["probe"]["random init"]
    best = pre["layers"][pre["best_layer"]]
    rbest = rnd["layers"][rnd["best_layer"]]
    lines = [
        f"# igpt demo on `{m['data']}`",
        "",
        f"Model {m['model']} ({m['params'] / 1e6:.2f}M parameters), pretrained with the AR "
        f"objective for {m['pretrain']['step']} steps on {m['n_px']}x{m['n_px']} images "
        f"quantized to {m['n_colors']} colours ({m['n_train']} training images, {m['n_test']} test "
        f"images; device {m['device']}; {m['wall_s']['total']:.0f} s in all).",
        "",
        f"Final validation loss: {m['pretrain']['val_loss']:.3f} nats/token "
        f"({m['pretrain']['val_bpd']:.3f} bits/token).",
        "",
        "## Linear probes (L-BFGS logistic regression, L2 chosen on a 10% hold-out)",
        "",
        "| features | best layer | hold-out acc | test acc |",
        "|---|---|---|---|",
        f"| iGPT, pretrained | {pre['best_layer']} | {_pct(best['val_acc'])} | "
        f"{_pct(best['test_acc'])} |",
        f"| iGPT, random init (same size) | {rnd['best_layer']} | {_pct(rbest['val_acc'])} | "
        f"{_pct(rbest['test_acc'])} |",
    ]
    for name, res in m["probe"].items():
        c = res["concat"]
        if c is not None:
            lines.append(
                f"| iGPT, {name}, layers {c['layers'][0]}-{c['layers'][-1]} "
                f"concatenated | - | {_pct(c['val_acc'])} | {_pct(c['test_acc'])} |"
            )
    lines += [
        f"| raw pixels | - | {_pct(m['raw_pixels']['val_acc'])} | "
        f"{_pct(m['raw_pixels']['test_acc'])} |",
        "",
        "Every layer (0 = the embeddings, the last = after the final norm):",
        "",
        "| layer | pretrained test acc | random-init test acc |",
        "|---|---|---|",
    ]
    for a, b in zip(pre["layers"], rnd["layers"], strict=True):
        lines.append(f"| {a['layer']} | {_pct(a['test_acc'])} | {_pct(b['test_acc'])} |")
    if m["low_data"]:
        k = next(iter(m["low_data"].values()))["per_class"]
        lines += [
            "",
            f"## Low data: {k} labels per class, mean ± std over random subsets",
            "",
            "| features | test acc |",
            "|---|---|",
        ]
        for name, r in m["low_data"].items():
            lines.append(f"| {name} | {_pct(r['mean'])} ± {100 * r['std']:.1f} |")
    lines += [
        "",
        "![accuracy vs depth](probe_by_layer.png)",
        "",
        "## Training",
        "",
        "![loss](loss.png)",
        "",
        "## Completions",
        "",
        "Each row: the top half given to the model (rest grey), its completions, the original.",
        "",
        "![completions](completions.png)",
        "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in m["wall_s"].items()),
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """Flags of ``igpt demo``."""
    from igpt.cli import add_common_arguments

    add_common_arguments(
        parser, "model", "n_px", "data", "steps", "batch_size", "lr", "device", "seed"
    )
    parser.set_defaults(out="runs/demo", **DEFAULTS)
    parser.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    parser.add_argument(
        "--per-class",
        type=int,
        default=10,
        help="labels per class in the low-data probe (default %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N images of each split (a quick look)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> None:
    """``igpt demo``: run everything, then print a one-screen summary."""
    from igpt.cli import pick_device

    m = run_demo(
        args.out,
        data=args.data,
        model=args.model,
        n_px=args.n_px,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        per_class=args.per_class,
        limit=args.limit,
        device=str(pick_device(args.device)),
        seed=args.seed,
        progress=not args.no_progress,
    )
    pre = m["probe"]["pretrained"]
    best = pre["layers"][pre["best_layer"]]
    rnd = m["probe"]["random init"]
    print(f"\nigpt demo done in {m['wall_s']['total']:.0f} s on {m['device']}")
    print(f"  validation loss      {m['pretrain']['val_loss']:.3f} nats/token")
    print(f"  probe, pretrained    {_pct(best['test_acc'])} test acc (layer {pre['best_layer']})")
    print(f"  probe, random init   {_pct(rnd['layers'][rnd['best_layer']]['test_acc'])}")
    if pre["concat"] is not None:
        print(
            f"  probe, pretrained, {len(pre['concat']['layers'])} layers concatenated "
            f"{_pct(pre['concat']['test_acc'])}"
        )
    print(f"  probe, raw pixels    {_pct(m['raw_pixels']['test_acc'])}")
    for name, r in m["low_data"].items():
        print(f"  {r['per_class']}/class, {name:<11} {_pct(r['mean'])} ± {100 * r['std']:.1f}")
    out = Path(args.out)
    print(f"\n  report      {out / 'report.md'}")
    for f in ("probe_by_layer.png", "loss.png", "completions.png", "metrics.json"):
        print(f"  {f:<11} {out / f}")
