"""Fine-tuning: a class head on a pretrained iGPT, trained with L_GEN + L_CLF (sec. 3.4).

    clf = IGPTClassifier(model, n_classes=10)              # head on mean-pooled n^L, zeros
    res = finetune(model, tokens, labels, n_classes=10, steps=1000, out_dir="runs/ft")
    acc = evaluate(res["classifier"], test_tokens, test_labels)

The head reads the average-pooled n^L = ln_f(h^L) (or, with ``layer=l``, the pooled n^l of
an earlier layer, as the probe's features) and starts at zero, so the first predictions are
uniform. The loss is the joint L_GEN + L_CLF (the paper's choice; L_GEN is the model's AR
or BERT objective) or L_CLF alone (``joint=False``). Adam with the pre-training betas
(0.9, 0.95), a constant learning rate (no cosine schedule), early stopping on hold-out
accuracy. BERT models see masked inputs in training and evaluation, and the evaluation can
ensemble several masks (sec. 4.6, ``n_masks``).

Runs with ``out_dir`` write ``config.json``, ``metrics.jsonl``, ``finetune.png`` (losses and
hold-out accuracy), ``ckpt_XXXXXXXX.pt`` (the latest state, for ``resume``) and ``best.pt``
(the best hold-out weights), the checkpoints atomically:
a crash loses at most the steps since the last checkpoint. Batches, masks and augmentations
are drawn from generators seeded by (seed, step), so a resumed run takes the same steps as
one that never stopped. The ``igpt finetune`` command wraps it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from igpt.model import IGPT
from igpt.probe import MaskRows, _as_labels, _as_tokens, _resolve_layers, modal_prediction

log = logging.getLogger(__name__)

OBJECTIVES = ("ar", "bert")


class IGPTClassifier(nn.Module):
    """An ``IGPT`` with a zero-initialised linear class head on average-pooled features.

    Args:
        model: the pretrained ``IGPT`` (shared, not copied).
        n_classes: number of classes.
        layer: which pooled feature the head reads: None (or L) for n^L = ln_f(h^L), the
            paper's fine-tuning choice; l < L for the pooled ln_1 of block l's input.
    """

    def __init__(self, model: IGPT, n_classes: int, *, layer: int | None = None):
        super().__init__()
        if not isinstance(model, IGPT):
            raise TypeError(f"model must be an igpt.IGPT, got {type(model).__name__}")
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        L = model.config.n_layer
        self.model = model
        self.layer = L if layer is None else _resolve_layers([layer], L)[0]
        self.n_classes = n_classes
        self.head = nn.Linear(model.config.n_embd, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens, bert_mask=None, *, generative: bool = True):
        """(gen_logits (B, n, n_colors) or None, class_logits (B, n_classes) float32).

        tokens: int (B, n); bert_mask: bool (B, n) for a BERT model (True = masked), None
        for AR. ``generative=False`` skips the output head (and the blocks above ``layer``).
        """
        m = self.model
        run_all = generative or self.layer == m.config.n_layer
        n_L, pooled = m.trunk(tokens, bert_mask, pool_layers=[self.layer], run_all=run_all)
        gen_logits = m.lm_head(n_L) if generative else None
        pooled = pooled[:, 0]  # (B, d)
        return gen_logits, self.head(pooled).float()


def generative_loss(gen_logits, tokens, bert_mask=None) -> torch.Tensor:
    """L_GEN: AR cross-entropy over every position, or BERT over the masked positions only."""
    logits = gen_logits.float()
    if bert_mask is None:
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    if not bert_mask.any():
        return logits.sum() * 0.0  # nothing masked in this batch: no generative signal
    return F.cross_entropy(logits[bert_mask], tokens[bert_mask])


def _resolve_device(device, model):
    if device is None:
        return next(model.parameters()).device
    return torch.device(device)


@torch.no_grad()
def predict(
    classifier: IGPTClassifier,
    tokens,
    *,
    objective: str = "ar",
    n_masks: int = 1,
    mask_prob: float = 0.15,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    progress: bool = False,
) -> np.ndarray:
    """Class predictions (N,) int64. BERT: the modal class over ``n_masks`` masks (sec. 4.6).

    Mask m is ``igpt.probe.bert_mask((N, n), mask_prob, seed=seed + 1 + m)``, the masks of
    ``bert_ensemble_probe``, the same on every device and for every batch size; ties
    between classes are broken at random with ``seed`` (``igpt.probe.modal_prediction``).
    """
    tokens = _as_tokens(tokens)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    device = _resolve_device(device, classifier)
    classifier.to(device)
    was_training = classifier.training
    classifier.eval()
    N, n = tokens.shape
    runs = n_masks if objective == "bert" else 1
    preds = np.empty((runs, N), dtype=np.int64)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        for r in range(runs):
            mask = None
            if objective == "bert":
                mask = MaskRows((N, n), mask_prob, seed=seed + 1 + r)
            for s in tqdm(range(0, N, batch_size), desc="predict", disable=not progress):
                x = tokens[s : s + batch_size].to(device, torch.long)
                m = mask(s, s + batch_size).to(device) if mask is not None else None
                with autocast:
                    _, logits = classifier(x, m, generative=False)
                preds[r, s : s + len(x)] = logits.argmax(1).cpu().numpy()
    finally:
        classifier.train(was_training)
    return preds[0] if runs == 1 else modal_prediction(preds, seed=seed)


def evaluate(classifier: IGPTClassifier, tokens, labels, **kw) -> float:
    """Accuracy of ``predict(classifier, tokens, **kw)`` against integer ``labels``."""
    y = _as_labels(labels, len(tokens), "labels")
    return float((predict(classifier, tokens, **kw) == y).mean())


def load_classifier(path_or_dir, device=None):
    """A fine-tuned classifier from a checkpoint: ``(classifier, palette_or_None, ckpt)``.

    Pass ``best.pt`` of a fine-tuning run for its best hold-out weights, or the run
    directory for its latest checkpoint.
    """
    from igpt.checkpoint import load_model

    model, palette, ckpt = load_model(path_or_dir)
    if "head" not in ckpt or "finetune" not in ckpt:
        raise ValueError(f"{path_or_dir} is not a fine-tuning checkpoint (it has no class head)")
    info = ckpt["finetune"]
    clf = IGPTClassifier(model, int(info["n_classes"]), layer=int(info["layer"]))
    clf.head.load_state_dict(ckpt["head"])
    if device is not None:
        clf.to(device)
    return clf, palette, ckpt


def plot_curves(metrics_path, png_path) -> Path | None:
    """Training losses and hold-out accuracy against step, from a run's metrics.jsonl, as a PNG."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for key, label in (("loss", "total"), ("clf_loss", "L_CLF"), ("gen_loss", "L_GEN")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), label=label, linewidth=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.legend(fontsize=8)
    acc = [(r["step"], 100 * r["val_acc"]) for r in rows if "val_acc" in r]
    if acc:
        ax_acc.plot(*zip(*acc, strict=True), marker="o", markersize=3)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("hold-out accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def finetune(
    model: IGPT,
    train_tokens,
    train_labels,
    *,
    n_classes: int | None = None,
    val_tokens=None,
    val_labels=None,
    val_frac: float = 0.1,
    objective: str = "ar",
    joint: bool = True,
    layer: int | None = None,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    eval_every: int = 100,
    patience: int | None = None,
    mask_prob: float = 0.15,
    n_masks: int = 1,
    train_images: np.ndarray | None = None,
    palette=None,
    augment: Callable | None = None,
    out_dir=None,
    resume: bool = False,
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> dict:
    """Fine-tune ``model`` with a class head; returns the classifier at its best hold-out step.

    Args:
        model: a pretrained ``IGPT`` (trained in place).
        train_tokens: integer (N, n) tokens; train_labels: integer (N,).
        n_classes: default ``max(label) + 1``.
        val_tokens, val_labels: the hold-out set for early stopping; without them,
            ``val_frac`` of the training set is held out (``igpt.data.holdout_split``).
        objective: the model's generative objective, "ar" or "bert" (BERT inputs are masked
            with ``mask_prob`` in training and evaluation).
        joint: True trains L_GEN + L_CLF, False L_CLF alone.
        layer: which pooled layer the head reads (default: n^L), see ``IGPTClassifier``.
        steps, batch_size, lr, betas, weight_decay: Adam at a constant rate, with the
            pre-training betas. grad_clip: clip the gradient norm (None: off, as the trainer).
        eval_every: steps between hold-out evaluations (and checkpoints).
        patience: stop after this many evaluations without a better hold-out accuracy;
            None trains all ``steps``. Either way the best weights are restored at the end.
        n_masks: BERT masks per hold-out image, modal prediction (sec. 4.6).
        train_images, palette, augment: with ``augment`` (e.g. ``igpt.data.pad_crop_flip``),
            each batch is ``augment(train_images[idx], rng=rng)`` tokenised with ``palette``
            instead of ``train_tokens[idx]``.
        out_dir: a run directory for config.json, metrics.jsonl, checkpoints and best.pt.
        resume: continue from the latest checkpoint in ``out_dir``.
        seed: batches, masks, augmentations and the hold-out split.
        device: default the model's device. CUDA runs under bf16 autocast.

    Returns:
        dict with ``classifier`` (best weights), ``best_val_acc``, ``best_step``, ``step``
        (the last step trained), ``stopped_early`` and ``history`` (one dict per evaluation).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run to continue)")
    tokens = _as_tokens(train_tokens, "train_tokens")
    labels = torch.from_numpy(_as_labels(train_labels, len(tokens), "train_labels"))
    if augment is not None and (train_images is None or palette is None):
        raise ValueError("augment needs train_images (uint8 (N, H, W, 3)) and palette")
    if train_images is not None and len(train_images) != len(tokens):
        raise ValueError(f"train_images has {len(train_images)} images, tokens {len(tokens)}")
    if val_tokens is None:
        from igpt.data import holdout_split

        fit, val = holdout_split(len(tokens), val_frac, seed)
        val_tokens, val_labels = tokens[val], labels[val]
        tokens, labels = tokens[fit], labels[fit]
        train_images = train_images[fit] if train_images is not None else None
    val_tokens = _as_tokens(val_tokens, "val_tokens")
    val_y = _as_labels(val_labels, len(val_tokens), "val_labels")
    if len(tokens) < 1:
        raise ValueError("no training examples left after the hold-out split")
    seen = np.concatenate([labels.numpy(), val_y])
    n_classes = n_classes or int(seen.max()) + 1
    if seen.min() < 0 or seen.max() >= n_classes:
        raise ValueError(
            f"train_labels and val_labels must lie in [0, n_classes={n_classes}), got labels "
            f"in [{seen.min()}, {seen.max()}]"
        )

    device = _resolve_device(device, model)
    clf = IGPTClassifier(model, n_classes, layer=layer).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    settings = dict(
        n_classes=n_classes,
        layer=clf.layer,
        objective=objective,
        joint=joint,
        lr=lr,
        batch_size=batch_size,
        steps=steps,
        seed=seed,
        mask_prob=mask_prob,
    )
    state = dict(step=0, best_val_acc=-1.0, best_step=0, evals_since_best=0, history=[])
    out = Path(out_dir) if out_dir is not None else None
    best_weights = None  # without out_dir, the best state lives in memory (on the CPU)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        latest = latest_checkpoint(out)
        if latest is not None and not resume:
            raise FileExistsError(
                f"{out} already holds checkpoints; pass resume=True or a new out_dir"
            )
        if resume and latest is not None:
            ckpt = load_checkpoint(latest)
            if int(ckpt["finetune"]["n_classes"]) != n_classes:
                raise ValueError(
                    f"{latest} has {ckpt['finetune']['n_classes']} classes, "
                    f"the data has {n_classes}"
                )
            model.load_state_dict(ckpt["model"])
            clf.head.load_state_dict(ckpt["head"])
            opt.load_state_dict(ckpt["optimizer"])
            state.update({k: ckpt["state"][k] for k in state})
            log.info(
                "resumed %s at step %d (best hold-out acc %.4f at step %d)",
                latest,
                state["step"],
                state["best_val_acc"],
                state["best_step"],
            )
        elif resume:
            log.warning("resume=True but %s holds no checkpoint: starting from step 0", out)
        (out / "config.json").write_text(
            json.dumps({"model": model.config.to_dict(), "finetune": settings}, indent=2)
        )
        metrics_path = out / "metrics.jsonl"
        kept = []
        if metrics_path.is_file():  # drop rows logged after the checkpoint we resume from
            for line in metrics_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line half-written when the process died
                if row["step"] <= state["step"]:
                    kept.append(row)
        _write_jsonl(metrics_path, kept)

    def save(path, with_optimizer):
        # `objective` at the top level, as pre-training writes it: sampling refuses BERT
        # checkpoints and probing masks their inputs by reading it.
        extra = dict(
            head=clf.head.state_dict(), finetune=settings, state=state, objective=objective
        )
        if with_optimizer:
            extra["optimizer"] = opt.state_dict()
        return save_checkpoint(path, model, step=state["step"], palette=palette, **extra)

    def evaluate_now():
        nonlocal best_weights
        acc = evaluate(
            clf,
            val_tokens,
            val_y,
            objective=objective,
            n_masks=n_masks,
            mask_prob=mask_prob,
            seed=seed,
            batch_size=max(batch_size, 64),
            device=device,
        )
        state["history"].append({"step": state["step"], "val_acc": acc})
        if acc > state["best_val_acc"]:
            state.update(best_val_acc=acc, best_step=state["step"], evals_since_best=0)
            if out is not None:
                save(out / "best.pt", with_optimizer=False)
            else:
                best_weights = {
                    k: v.detach().to("cpu", copy=True) for k, v in clf.state_dict().items()
                }
        else:
            state["evals_since_best"] += 1
        log.info(
            "step %d: hold-out acc %.4f (best %.4f at step %d)",
            state["step"],
            acc,
            state["best_val_acc"],
            state["best_step"],
        )

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    clf.train()
    stopped_early = False
    pending = []
    bar = tqdm(total=steps, initial=state["step"], desc="finetune", disable=not progress)
    while state["step"] < steps:
        if patience is not None and state["evals_since_best"] >= patience:
            stopped_early = True
            log.info(
                "early stop at step %d: no better hold-out accuracy in %d evaluations",
                state["step"],
                patience,
            )
            break
        step = state["step"]
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(len(tokens), size=min(batch_size, len(tokens)), replace=False)
        if augment is not None:
            from igpt.data import tokenize

            x = tokenize(augment(train_images[idx], rng=rng), palette, model.config.n_px)
        else:
            x = tokens[idx]
        x = x.to(device, torch.long)
        y = labels[idx].to(device)
        mask = None
        if objective == "bert":
            mask = torch.from_numpy(rng.random(tuple(x.shape)) < mask_prob).to(device)
        with autocast:
            gen_logits, logits = clf(x, mask, generative=joint)
        l_clf = F.cross_entropy(logits, y)
        l_gen = generative_loss(gen_logits, x, mask) if joint else None
        loss = l_clf + l_gen if joint else l_clf
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(clf.parameters(), grad_clip)
        opt.step()
        state["step"] = step + 1
        row = {"step": step + 1, "loss": loss.item(), "clf_loss": l_clf.item()}
        if l_gen is not None:
            row["gen_loss"] = l_gen.item()
        pending.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if state["step"] % eval_every == 0 or state["step"] == steps:
            evaluate_now()
            pending[-1]["val_acc"] = state["history"][-1]["val_acc"]
            if out is not None:
                with open(out / "metrics.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in pending)
                path = save(out / f"ckpt_{state['step']:08d}.pt", with_optimizer=True)
                for old in out.glob("ckpt_*.pt"):  # keep the latest only: they hold Adam's state
                    if old != path:
                        old.unlink(missing_ok=True)
            pending = []
    bar.close()

    if state["best_val_acc"] < 0:  # resumed a finished run or steps already reached
        evaluate_now()
    if out is not None and (out / "best.pt").is_file():
        best = load_checkpoint(out / "best.pt", map_location=device)
        model.load_state_dict(best["model"])
        clf.head.load_state_dict(best["head"])
    elif best_weights is not None:
        clf.load_state_dict(best_weights)
    if out is not None:
        plot_curves(out / "metrics.jsonl", out / "finetune.png")
    if math.isfinite(state["best_val_acc"]):
        log.info(
            "best hold-out accuracy %.4f at step %d", state["best_val_acc"], state["best_step"]
        )
    return {
        "classifier": clf,
        "best_val_acc": state["best_val_acc"],
        "best_step": state["best_step"],
        "step": state["step"],
        "stopped_early": stopped_early,
        "history": state["history"],
        "settings": settings,
    }


# ----------------------------------------------------------------------------- igpt finetune


def add_arguments(parser) -> None:
    """Arguments of ``igpt finetune``."""
    from igpt.cli import add_common_arguments

    shared = "checkpoint data objective steps batch_size lr out resume device seed".split()
    add_common_arguments(parser, *shared)
    parser.set_defaults(objective=None, steps=1000, batch_size=32, lr=1e-4, out="runs/finetune")
    parser.add_argument(
        "--clf-only", action="store_true", help="train L_CLF alone (default: L_GEN + L_CLF)"
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="pooled layer the head reads (default: n^L)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=100, help="steps between hold-out evaluations"
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="evaluations without improvement before stopping"
    )
    parser.add_argument(
        "--augment",
        choices=("auto", "none", "cifar"),
        default="auto",
        help="training augmentation: cifar = pad 4, random crop, flip (auto: for cifar specs)",
    )
    parser.add_argument(
        "--n-masks", type=int, default=5, help="masks in a BERT model's evaluation ensemble"
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N images per split")


def run(args) -> None:
    """``igpt finetune``: fine-tune a checkpoint on a labelled dataset, report test accuracy."""
    from igpt.checkpoint import load_model, objective_of, resolve_checkpoint
    from igpt.data import load_images, pad_crop_flip, parse_spec, tokenize

    source = args.checkpoint
    if source is None:
        if not (args.resume and latest_checkpoint(args.out)):
            raise SystemExit("igpt finetune needs --checkpoint FILE_OR_RUN_DIR")
        source = args.out  # the run's own latest checkpoint holds the model
    path = resolve_checkpoint(source)
    from igpt.cli import pick_device

    device = pick_device(args.device)
    model, palette, ckpt = load_model(path, device=device)
    if palette is None:
        raise SystemExit(f"{path} holds no palette, so images cannot be tokenised")
    objective = args.objective or objective_of(ckpt)
    splits = {}
    for split in ("train", "test"):
        data = load_images(args.data, split)
        if data.labels is None:
            raise SystemExit(f"--data {args.data} has no labels in its {split!r} split")
        splits[split] = data.subset(np.arange(min(args.limit, len(data)))) if args.limit else data
    train, test = splits["train"], splits["test"]
    n_px = model.config.n_px
    x, xt = tokenize(train.images, palette, n_px), tokenize(test.images, palette, n_px)
    is_cifar = parse_spec(args.data)[0].startswith("cifar")
    augment = (
        pad_crop_flip if args.augment == "cifar" or (args.augment == "auto" and is_cifar) else None
    )
    n_classes = train.num_classes or int(max(train.labels.max(), test.labels.max())) + 1
    log.info(
        "fine-tuning %s (%s, %s) on %s: %d train, %d test images",
        path,
        objective,
        "L_CLF" if args.clf_only else "L_GEN + L_CLF",
        args.data,
        len(x),
        len(xt),
    )
    res = finetune(
        model,
        x,
        train.labels,
        n_classes=n_classes,
        objective=objective,
        joint=not args.clf_only,
        layer=args.layer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        patience=args.patience,
        n_masks=args.n_masks,
        train_images=train.images,
        palette=palette,
        augment=augment,
        out_dir=args.out,
        resume=args.resume,
        seed=args.seed,
        device=device,
    )
    test_acc = evaluate(
        res["classifier"],
        xt,
        test.labels,
        objective=objective,
        n_masks=args.n_masks,
        seed=args.seed,
        device=device,
        progress=True,  # the whole test set, n_masks times for BERT
    )
    summary = {k: res[k] for k in ("best_val_acc", "best_step", "step", "stopped_early")}
    summary.update(
        test_acc=test_acc,
        checkpoint=str(path),
        data=args.data,
        settings=res["settings"],
        history=res["history"],
    )
    out = Path(args.out)
    tmp = out / "finetune.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "finetune.json")
    print(
        f"best hold-out accuracy {res['best_val_acc']:.4f} at step {res['best_step']}; "
        f"test accuracy {test_acc:.4f}"
        + (f" ({args.n_masks}-mask ensemble)" if objective == "bert" else "")
    )
    print(f"wrote {out / 'best.pt'}, {out / 'finetune.json'} and {out / 'finetune.png'}")
