"""Fine-tuning: a class head on a pretrained iGPT, trained with L_GEN + L_CLF (sec. 3.4).

    res = finetune(model, tokens, labels, n_classes=10, steps=1000, out_dir="runs/ft")
    acc = evaluate(res["classifier"], test_tokens, test_labels)

The classifier (``IGPTClassifier``, ``predict``, ``evaluate``, ``load_classifier``) lives in
``igpt.classifier`` and is re-exported here. The loss is L_GEN + L_CLF (the paper's choice;
L_GEN is the model's AR or BERT objective, ``igpt.objectives``) or L_CLF alone
(``joint=False``). Adam with the pre-training betas at a constant rate, early stopping on
hold-out accuracy. BERT models see masked inputs in training and evaluation, and the
evaluation can ensemble several masks (sec. 4.6, ``n_masks``).

It runs on the skeleton pre-training runs on (``igpt.training``): the same device resolver,
the mixed precision its config names (``precision``: bf16 autocast on CUDA by default), a
non-finite step skipped and counted (``NonFiniteGuard``), one resume verdict and one
restore of the optimizer settings.

Resume (``resume=True``) continues from the run's latest checkpoint; ``steps`` may be
raised to extend a run (the rate is constant, so there is no schedule to re-plan) and a
new ``lr``, ``betas`` or ``weight_decay`` applies from the resume step on. The settings
that define the classifier (``FINETUNE_FIXED``, the number of classes, the architecture)
must match the checkpoint's, or the resume is refused naming each.

``finetune(...)`` is ``Finetuner(model, FinetuneConfig(...), tokens, labels).fit()``. It
shares its pieces with pre-training: batches from ``igpt.batches`` (a pure function of
(seed, step), so a resumed run takes the steps of one that never stopped) and the run
directory of ``igpt.rundir`` (``config.json``, ``metrics.jsonl``, ``finetune.png``, the
latest ``ckpt_XXXXXXXX.pt`` for ``resume`` and ``best.pt``, the best hold-out weights).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from igpt._checks import token_rows
from igpt.batches import GlobalBatches, ImageSource, TokenSource
from igpt.checkpoint import (
    CheckpointError,
    architecture_differences,
    atomic_torch_save,
    checkpoint_state,
    load_checkpoint,
)
from igpt.classifier import (  # re-exported: their home is igpt.classifier
    IGPTClassifier,
    evaluate,
    load_classifier,
    predict,
    resolve_model_device,
)
from igpt.model import IGPT
from igpt.objectives import MASK_PROB, OBJECTIVES, check_objective, generative_loss, objective_of
from igpt.probe import as_labels
from igpt.rundir import RunDir
from igpt.trackers import REPORT_TO
from igpt.trainconfig import progress_enabled, setting
from igpt.training import (
    PRECISIONS,
    Compiled,
    NonFiniteGuard,
    guarded_step,
    mixed_precision,
    open_resume,
    refuse_resume,
    restore_optimizer_settings,
)

__all__ = [
    "FinetuneConfig",
    "Finetuner",
    "finetune",
    "FINETUNE_FIXED",
    "DATA_ARGUMENTS",
    # re-exported: their home is igpt.classifier
    "IGPTClassifier",
    "predict",
    "evaluate",
    "load_classifier",
]

log = logging.getLogger(__name__)

# what a resumed fine-tuning run must share with its checkpoint's run: the head, the loss
# and the batch of every step (the architecture and n_classes are checked beside them)
FINETUNE_FIXED = ("n_classes", "layer", "joint", "head_bias", "batch_size", "seed")
# the class head's default learning rate: 100x the model's default (see FinetuneConfig)
HEAD_LR = 1e-2
# the keyword arguments of Finetuner (and finetune) that are data, not settings
DATA_ARGUMENTS = (
    *("n_classes", "val_tokens", "val_labels", "train_images", "palette", "augment"),
    "token_augment",
)


# ----------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    """The settings of one fine-tuning run (the data and the model are passed beside it)."""

    objective: str = setting(
        "ar",
        "the model's generative objective (BERT inputs are masked in training and evaluation)",
        choices=OBJECTIVES,
    )
    joint: bool = setting(True, "train L_GEN + L_CLF (False: L_CLF alone)")
    head_bias: bool = setting(
        True,
        "train a bias in the class head (False: none, frozen at zero, as transformers' "
        "ImageGPTForImageClassification, so igpt export-hf can export the classifier)",
    )
    layer: int | None = setting(None, "pooled layer the head reads", default_text="n^L")
    steps: int = setting(1000, "optimizer steps")
    batch_size: int = setting(32, "batch size")
    lr: float = setting(1e-4, "learning rate of the pretrained model (constant)")
    # the head starts at zero and must travel far, the pretrained weights only a little: at
    # one rate of 1e-4 the demo's model was still at chance after 40 steps (issue 26)
    head_lr: float | None = setting(
        HEAD_LR, "learning rate of the class head (constant; in Python, None: lr)"
    )
    betas: tuple[float, float] = setting((0.9, 0.95), "Adam betas (the pre-training ones)")
    weight_decay: float = setting(0.0, "Adam weight decay")
    grad_clip: float | None = setting(None, "clip the gradient norm", default_text="off")
    eval_every: int = setting(100, "steps between hold-out evaluations (and checkpoints)")
    patience: int | None = setting(
        None,
        "evaluations without a better hold-out accuracy before stopping",
        default_text="train every step",
    )
    mask_prob: float = setting(MASK_PROB, "BERT masking probability")
    n_masks: int = setting(1, "masks in a BERT model's evaluation ensemble (sec. 4.6)")
    val_frac: float = setting(0.1, "hold-out fraction when no hold-out set is given")
    out_dir: str | None = setting(
        None, "run directory (config, metrics, checkpoints, best.pt)", flag="--out"
    )
    resume: bool = setting(False, "continue from the latest checkpoint in the run directory")
    seed: int = setting(0, "batches, masks, augmentations and the hold-out split")
    precision: str = setting(
        "auto",
        "auto: bf16 autocast on CUDA, fp32 on the CPU; fp16: float16 autocast with a gradient "
        "scaler (GPUs without bf16)",
        choices=PRECISIONS,
    )
    device: str | None = setting(None, "cpu, cuda ...", default_text="the model's")
    compile: bool = setting(
        False, "train through torch.compile; eagerly, with a warning, where it cannot run"
    )
    report_to: str = setting(
        "none",
        "also send the metrics rows to tensorboard (<out>/tensorboard) or wandb",
        choices=REPORT_TO,
    )
    progress: bool | None = setting(
        None, "tqdm progress bars", default_text="when stderr is a terminal"
    )

    def __post_init__(self):
        # every hyper-parameter is checked here, before a model is loaded or a step taken:
        # an lr of inf or nan would train and write NaN checkpoints
        self.betas = tuple(self.betas)
        check_objective(self.objective)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        for name in ("steps", "batch_size", "eval_every", "n_masks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        p = self.patience
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"patience must be None or an int >= 1, got {p!r}")
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int)
        ):
            raise ValueError(f"layer must be None or an int, got {self.layer!r}")
        if not isinstance(self.head_bias, bool):
            raise ValueError(f"head_bias must be True or False, got {self.head_bias!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        _check_real("lr", self.lr, above=0)
        _check_real("weight_decay", self.weight_decay, least=0)
        if self.grad_clip is not None:
            _check_real("grad_clip", self.grad_clip, above=0)
        if self.head_lr is not None:
            _check_real("head_lr", self.head_lr, above=0)
        _check_real("mask_prob", self.mask_prob, above=0, most=1)
        _check_real("val_frac", self.val_frac, above=0, below=1)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            _check_real("betas", beta, least=0, below=1)
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir (the run to continue)")

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (``config.json`` holds them under ``config``)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        return d

    @property
    def rates(self) -> list[float]:
        """The learning rate of each of the optimizer's groups: one for the whole classifier,
        or (with ``head_lr``) the model's and the head's."""
        return [self.lr] if self.head_lr is None else [self.lr, self.head_lr]

    def settings(self, n_classes: int, layer: int) -> dict:
        """What a run records of its settings (config.json, the result's ``settings``)."""
        keys = ("objective", "joint", "head_bias", "lr", "head_lr", "batch_size", "steps", "seed")
        keys += ("mask_prob",)
        return {"n_classes": n_classes, "layer": layer, **{k: getattr(self, k) for k in keys}}


def _check_real(name, v, *, above=None, least=None, below=None, most=None) -> None:
    """Raise ValueError naming ``name`` unless ``v`` is a finite real number in the bounds."""
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    ok = ok and math.isfinite(v)
    ok = ok and (above is None or v > above) and (least is None or v >= least)
    ok = ok and (below is None or v < below) and (most is None or v <= most)
    if not ok:
        bounds = [f"> {above}"] * (above is not None) + [f">= {least}"] * (least is not None)
        bounds += [f"< {below}"] * (below is not None) + [f"<= {most}"] * (most is not None)
        raise ValueError(f"{name} must be a finite number {' and '.join(bounds)}, got {v!r}")


# ----------------------------------------------------------------------------- set-up


def split_examples(cfg: FinetuneConfig, tokens, labels, val_tokens, val_labels, images, n_classes):
    """The checked training and hold-out sets: ``(tokens, labels, train_idx, val_tokens,
    val_y, n_classes)``. ``tokens``, ``labels`` stay whole (a uint16 memmap is not copied)
    and ``train_idx`` names the rows trained on; without ``val_tokens``, ``cfg.val_frac``
    of the training set is held out. ``n_classes`` defaults to the largest label + 1."""
    tokens = token_rows(tokens, "train_tokens", shape_hint="(N, n)")
    labels = torch.from_numpy(as_labels(labels, len(tokens), "train_labels"))
    if images is not None and len(images) != len(tokens):
        raise ValueError(f"train_images has {len(images)} images, tokens {len(tokens)}")
    train_idx = np.arange(len(tokens))
    if val_tokens is None:
        from igpt.data import holdout_split

        train_idx, val = holdout_split(len(tokens), cfg.val_frac, cfg.seed)
        val_tokens, val_labels = tokens[val], labels[val]
    val_tokens = token_rows(val_tokens, "val_tokens", shape_hint="(N, n)")
    val_y = as_labels(val_labels, len(val_tokens), "val_labels")
    if len(train_idx) < 1:
        raise ValueError("no training examples left after the hold-out split")
    seen = np.concatenate([labels.numpy(), val_y])
    n_classes = n_classes or int(seen.max()) + 1
    if seen.min() < 0 or seen.max() >= n_classes:
        raise ValueError(
            f"train_labels and val_labels must lie in [0, n_classes={n_classes}), got "
            f"labels in [{seen.min()}, {seen.max()}]"
        )
    if n_classes < 2:  # what IGPTClassifier refuses, said before the hold-out's size
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if len(val_y) < 1:  # early stopping would compare NaN accuracies
        raise ValueError(
            f"the hold-out set is empty ({len(tokens)} training examples, val_frac "
            f"{cfg.val_frac}); pass val_tokens and val_labels, or more examples"
        )
    return tokens, labels, train_idx, val_tokens, val_y, n_classes


def example_batches(
    cfg: FinetuneConfig, tokens, train_idx, images, palette, augment, n_px: int, token_augment=None
):
    """The batch of every step (``GlobalBatches``) over rows ``train_idx``: rows of
    ``tokens`` (converted to int64 per batch), augmented by ``token_augment`` if given, or
    with ``augment`` the augmented ``images`` (an array or a lazy ``ImageSet``) tokenised
    with ``palette``; at most the whole training set per batch."""
    if augment is not None and (images is None or palette is None):
        raise ValueError("augment needs train_images (uint8 (N, H, W, 3)) and palette")
    if augment is not None and token_augment is not None:
        raise ValueError("pass augment (on images) or token_augment (on tokens), not both")
    if augment is not None:
        source = ImageSource(images, palette, n_px, augment, per_row=False)
    else:
        source = TokenSource(tokens, token_augment)
    batch = min(cfg.batch_size, len(train_idx))
    return GlobalBatches(source, train_idx, batch, seed=cfg.seed)


def check_resumable(run: RunDir, steps: int, settings: dict, model: IGPT, path, ckpt) -> None:
    """A ValueError unless the checkpoint at ``path`` is of a fine-tuning run with these
    ``settings``' ``FINETUNE_FIXED`` values, objective and architecture, not past ``steps``."""
    missing = [k for k in ("finetune", "head", "optimizer", "state") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a fine-tuning checkpoint (it has no {', '.join(missing)}); "
            "fine-tune from it with --checkpoint and a new --out instead"
        )
    # runs from before head_bias existed trained the bias
    old = {"head_bias": True, **ckpt["finetune"], "objective": objective_of(ckpt)}
    keys = [*FINETUNE_FIXED, "objective"] + ["mask_prob"] * (settings["objective"] == "bert")
    diff = [
        f"{k} {old.get(k)!r} there, {settings[k]!r} now" for k in keys if old.get(k) != settings[k]
    ]
    diff += ["model " + d for d in architecture_differences(path, ckpt, model.config)]
    refuse_resume(run.path, path, diff, int(ckpt["state"]["step"]), steps)


def finetune_checkpoint(ft: Finetuner, *, with_optimizer: bool) -> dict:
    """The checkpoint of fine-tuning run ``ft`` now: the model, the head, the run's state
    and settings (the objective once, at the top level: ``objective_of``), and with
    ``with_optimizer`` Adam's state (what ``resume`` needs; ``best.pt`` leaves it out)."""
    info = {k: v for k, v in ft.settings.items() if k != "objective"}
    extra = dict(head=ft.clf.head.state_dict(), state=ft.state, finetune=info)
    if with_optimizer:
        extra["optimizer"] = ft.opt.state_dict()
        extra.update({"scaler": ft.scaler.state_dict()} if ft.scaler.is_enabled() else {})
    step, objective = ft.state["step"], ft.cfg.objective
    return checkpoint_state(ft.model, step=step, palette=ft.palette, objective=objective, **extra)


def finetune_optimizer(cfg: FinetuneConfig, clf: IGPTClassifier) -> torch.optim.Adam:
    """Adam over the classifier: one group at ``lr``, or with ``head_lr`` the model's
    parameters at ``lr`` and the head's at ``head_lr`` (a run resumes with the same count)."""
    parts = [list(clf.parameters())]
    if cfg.head_lr is not None:
        parts = [list(clf.model.parameters()), list(clf.head.parameters())]
    groups = [{"params": ps, "lr": lr} for ps, lr in zip(parts, cfg.rates, strict=True)]
    return torch.optim.Adam(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)


def regroup(state: dict, optimizer) -> dict:
    """``state`` (an optimizer's state dict) with its parameters in ``optimizer``'s groups:
    a run saved with one group for the whole classifier resumes under a separate
    ``head_lr`` and back (the parameters keep their order: the model's, then the head's)."""
    saved, now = state["param_groups"], optimizer.param_groups
    if len(saved) == len(now):
        return state
    ids = [i for g in saved for i in g["params"]]
    groups, start = [], 0
    for g in now:
        groups.append({**saved[0], "params": ids[start : start + len(g["params"])]})
        start += len(g["params"])
    return {**state, "param_groups": groups}


def stop_early(state: dict, patience: int | None) -> bool:
    """Whether ``patience`` evaluations in a row brought no better hold-out accuracy."""
    if patience is None or state["evals_since_best"] < patience:
        return False
    log.info(
        "early stop at step %d: no better hold-out accuracy in %d evaluations",
        *(state["step"], patience),
    )
    return True


# ----------------------------------------------------------------------------- finetuner


class Finetuner:
    """One fine-tuning run: ``Finetuner(model, config, tokens, labels).fit()``.

    Args:
        model: a pretrained ``IGPT`` (trained in place).
        config: a ``FinetuneConfig``.
        train_tokens: integer (N, n) tokens; train_labels: integer (N,).
        n_classes: default ``max(label) + 1``.
        val_tokens, val_labels: the hold-out set for early stopping; without them,
            ``config.val_frac`` of the training set is held out.
        train_images, palette, augment: with ``augment`` (e.g. ``igpt.data.pad_crop_flip``),
            each batch is ``augment(train_images[idx], rng=rng)`` tokenised with ``palette``
            instead of ``train_tokens[idx]`` (a lazy ``ImageSet`` reads a batch's rows only).
        token_augment: or ``token_augment(tokens, rng=rng)`` on each batch's int64 tokens
            (e.g. a ``pad_crop_flip_tokens`` partial: ``pad_crop_flip``'s batches, no images).

    ``train_tokens`` may be ``cached_tokens``' uint16 memmap: rows become int64 per batch.
    """

    def __init__(
        self,
        model: IGPT,
        config: FinetuneConfig,
        train_tokens,
        train_labels,
        *,
        n_classes: int | None = None,
        val_tokens=None,
        val_labels=None,
        train_images: np.ndarray | None = None,
        palette=None,
        augment: Callable | None = None,
        token_augment: Callable | None = None,
    ):
        self.cfg = cfg = config
        tokens, self.labels, rows, self.val_tokens, self.val_y, self.n_classes = split_examples(
            cfg, train_tokens, train_labels, val_tokens, val_labels, train_images, n_classes
        )
        self.model, self.palette = model, palette
        self.device = resolve_model_device(cfg.device, model)
        self.autocast, self.scaler = mixed_precision(cfg.precision, self.device)
        self.clf = IGPTClassifier(model, self.n_classes, layer=cfg.layer).to(self.device)
        if not cfg.head_bias:
            self.clf.head.bias.requires_grad_(False)  # zero from IGPTClassifier, kept there
        self.opt = finetune_optimizer(cfg, self.clf)
        self.forward = Compiled(self.clf, cfg.compile)  # self.clf itself without --compile
        self.settings = cfg.settings(self.n_classes, self.clf.layer)
        self.batches = example_batches(
            cfg, tokens, rows, train_images, palette, augment, model.config.n_px, token_augment
        )
        self.state = dict(step=0, best_val_acc=-1.0, best_step=0, evals_since_best=0, history=[])
        self.state["skipped"] = 0
        self.guard = NonFiniteGuard()
        self.best_weights = None  # without a run directory, the best state lives in memory
        self.run = RunDir(cfg.out_dir, report_to=cfg.report_to) if cfg.out_dir else None
        if self.run is not None:
            self._open_run()

    def _open_run(self) -> None:
        check = functools.partial(
            check_resumable, self.run, self.cfg.steps, self.settings, self.model
        )
        found = open_resume(self.run, self.cfg.resume, check)
        if found is not None:
            latest, ckpt = found
            self.model.load_state_dict(ckpt["model"])
            self.clf.head.load_state_dict(ckpt["head"])
            self.opt.load_state_dict(regroup(ckpt["optimizer"], self.opt))
            self.scaler.load_state_dict(ckpt.get("scaler", self.scaler.state_dict()))
            cfg = self.cfg  # this run's settings, not the ones the optimizer state brought back
            restore_optimizer_settings(
                self.opt, lr=cfg.rates, betas=cfg.betas, weight_decay=cfg.weight_decay
            )
            self.state.update({k: ckpt["state"].get(k, 0) for k in self.state})
            self.guard = NonFiniteGuard(self.state["skipped"])
            s = self.state
            log.info(
                "resumed %s at step %d (best hold-out acc %.4f at step %d)",
                *(latest, s["step"], s["best_val_acc"], s["best_step"]),
            )
        conf = {"model": self.model.config.to_dict(), "finetune": self.settings}
        conf["config"] = self.cfg.to_dict()  # every setting: what `igpt finetune --resume` reads
        self.run.write_json("config.json", conf)
        self.run.truncate_metrics(self.state["step"])

    def _step(self, step: int) -> dict:
        """One optimizer step on the batch of ``step`` (skipped when not finite); returns
        its metrics row."""
        cfg = self.cfg
        x = self.batches.tokens(step).to(self.device, torch.long)
        y = self.labels[self.batches.indices(step)].to(self.device)
        mask = None
        if cfg.objective == "bert":
            mask = self.batches.mask(step, x.shape[1], cfg.mask_prob).to(self.device)
        with self.autocast:
            gen_logits, logits = self.forward(x, mask, generative=cfg.joint)
        l_clf = F.cross_entropy(logits, y)
        l_gen = generative_loss(gen_logits, x, mask) if cfg.joint else None
        loss = l_clf + l_gen if cfg.joint else l_clf
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        parts = (self.opt, self.scaler, self.guard, self.clf.parameters())
        guarded_step(*parts, step=step, loss=loss.item(), clip=cfg.grad_clip)
        self.opt.zero_grad(set_to_none=True)
        self.state["skipped"] = self.guard.skipped
        row = {"step": step + 1, "loss": loss.item(), "clf_loss": l_clf.item()}
        if l_gen is not None:
            row["gen_loss"] = l_gen.item()
        return row

    def _evaluate_and_keep_best(self) -> float:
        """Hold-out accuracy now; the best weights so far are kept (best.pt or in memory)."""
        cfg, s = self.cfg, self.state
        kw = dict(objective=cfg.objective, n_masks=cfg.n_masks, mask_prob=cfg.mask_prob)
        kw.update(seed=cfg.seed, batch_size=max(cfg.batch_size, 64), device=self.device)
        acc = evaluate(self.clf, self.val_tokens, self.val_y, **kw)
        s["history"].append({"step": s["step"], "val_acc": acc})
        if acc > s["best_val_acc"]:
            s.update(best_val_acc=acc, best_step=s["step"], evals_since_best=0)
            if self.run is not None:
                atomic_torch_save(
                    finetune_checkpoint(self, with_optimizer=False), self.run.path / "best.pt"
                )
            else:
                weights = self.clf.state_dict().items()
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights}
        else:
            s["evals_since_best"] += 1
        log.info(
            "step %d: hold-out acc %.4f (best %.4f at step %d)",
            *(s["step"], acc, s["best_val_acc"], s["best_step"]),
        )
        return acc

    def _restore_best(self) -> None:
        best = self.run.path / "best.pt" if self.run is not None else None
        if best is not None and best.is_file():
            ckpt = load_checkpoint(best, map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            self.clf.head.load_state_dict(ckpt["head"])
        elif self.best_weights is not None:
            self.clf.load_state_dict(self.best_weights)

    def fit(self) -> dict:
        """Train to ``steps`` (or an early stop); returns the classifier at its best step.

        The result holds ``classifier``, ``best_val_acc``, ``best_step``, ``step`` (the last
        step trained), ``stopped_early``, ``history`` (one dict per evaluation), ``settings``,
        ``skipped`` (steps skipped for a non-finite loss or gradient).
        """
        # log lines go through tqdm.write, above the bar rather than glued onto it
        with logging_redirect_tqdm():
            return self._fit()

    def _fit(self) -> dict:
        cfg, s = self.cfg, self.state
        self.clf.train()
        stopped_early, pending = False, []
        bar = tqdm(
            total=cfg.steps,
            initial=s["step"],
            desc="finetune",
            disable=not progress_enabled(cfg.progress),
        )
        while s["step"] < cfg.steps and not (stopped_early := stop_early(s, cfg.patience)):
            row = self._step(s["step"])
            s["step"] = row["step"]
            pending.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if s["step"] % cfg.eval_every == 0 or s["step"] == cfg.steps:
                row["val_acc"] = self._evaluate_and_keep_best()
                if self.run is not None:
                    self.run.append_metrics(pending)
                    # the latest checkpoint only: it holds Adam's state
                    self.run.save_checkpoint(
                        finetune_checkpoint(self, with_optimizer=True), s["step"], keep=1
                    )
                pending = []
        bar.close()
        if s["best_val_acc"] < 0:  # resumed a finished run or steps already reached
            self._evaluate_and_keep_best()
        self._restore_best()
        if self.run is not None:
            self.plot()
        if math.isfinite(s["best_val_acc"]):
            log.info("best hold-out accuracy %.4f at step %d", s["best_val_acc"], s["best_step"])
        keys = ("best_val_acc", "best_step", "step", "history", "skipped")
        return {
            "classifier": self.clf,
            "stopped_early": stopped_early,
            "settings": self.settings,
            **{k: s[k] for k in keys},
        }

    def plot(self):
        """``finetune.png``: the losses and the hold-out accuracy against step."""
        losses = [("loss", "total"), ("clf_loss", "L_CLF"), ("gen_loss", "L_GEN")]
        panels = [("loss (nats)", losses), ("hold-out accuracy", [("val_acc", "hold-out")])]
        return self.run.plot("finetune.png", panels)


def finetune(
    model: IGPT, train_tokens, train_labels, *, config: FinetuneConfig | None = None, **kwargs
) -> dict:
    """Fine-tune ``model`` with a class head; returns the classifier at its best hold-out step.

    ``kwargs`` are ``Finetuner``'s data arguments (``DATA_ARGUMENTS``: ``n_classes``,
    ``val_tokens``, ``val_labels``, ``train_images``, ``palette``, ``augment``,
    ``token_augment``) and
    ``FinetuneConfig`` fields (``steps=``, ``lr=``, ``objective=``, ``out_dir=`` ...), the
    latter applied over ``config``. See ``Finetuner.fit`` for the result.
    """
    data = {k: kwargs.pop(k) for k in DATA_ARGUMENTS if k in kwargs}
    cfg = dataclasses.replace(config, **kwargs) if config else FinetuneConfig(**kwargs)
    return Finetuner(model, cfg, train_tokens, train_labels, **data).fit()
