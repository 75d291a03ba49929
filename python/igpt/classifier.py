"""The fine-tuned classifier: a class head on a pretrained iGPT, its inference and loading.

    clf = IGPTClassifier(model, n_classes=10)              # head on mean-pooled n^L, zeros
    preds = predict(clf, tokens)                           # BERT: a mask ensemble (sec. 4.6)
    acc = evaluate(clf, test_tokens, test_labels)
    clf, palette, ckpt = load_classifier("runs/ft/best.pt")

The head reads the average-pooled n^L = ln_f(h^L) (or, with ``layer=l``, the pooled n^l of
an earlier layer, as the probe's features) and starts at zero, so the first predictions are
uniform. Training it is ``igpt.finetune``'s job; this module holds what inference needs and
imports neither the trainers nor the transformers interop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from igpt import hf_format
from igpt._checks import long_rows, token_rows
from igpt.features import resolve_layers
from igpt.model import IGPT
from igpt.objectives import MASK_PROB, MaskRows, check_objective
from igpt.probe import as_labels, modal_prediction
from igpt.training import autocast, resolve_device, uses_bf16

__all__ = ["IGPTClassifier", "predict", "evaluate", "load_classifier", "resolve_model_device"]


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
        self.layer = L if layer is None else resolve_layers([layer], L)[0]
        self.n_classes = n_classes
        self.head = nn.Linear(model.config.n_embd, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_hf_score(cls, model: IGPT, score: torch.Tensor) -> IGPTClassifier:
        """A classifier on ``model`` whose head is transformers' bias-free ``score`` weight
        (n_classes, d); the head's bias stays zero and frozen (``requires_grad=False``)."""
        clf = cls(model, score.shape[0])
        with torch.no_grad():
            clf.head.weight.copy_(score)
        clf.head.bias.requires_grad_(False)
        return clf

    @classmethod
    def from_pretrained(cls, path_or_hub_id) -> IGPTClassifier:
        """A transformers ``ImageGPTForImageClassification`` directory or hub id (float32,
        CPU); a ValueError says so when it holds a causal model, which has no class head."""
        config, weights, score = hf_format.read_pretrained(path_or_hub_id)
        if score is None:
            raise ValueError(
                f"{path_or_hub_id} holds a causal ImageGPT model, not a classifier "
                "(ImageGPTForImageClassification); load it with IGPT.from_pretrained"
            )
        model = hf_format.load_converted(IGPT(config), weights, score=score)
        return cls.from_hf_score(model, score)

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


def resolve_model_device(device, model) -> torch.device:
    """``device`` resolved as every trainer does (``igpt.training.resolve_device``), or
    (None) the device ``model``'s parameters are on."""
    if device is None:
        return next(model.parameters()).device
    return resolve_device(str(device))


@torch.no_grad()
def predict(
    classifier: IGPTClassifier,
    tokens,
    *,
    objective: str = "ar",
    n_masks: int = 1,
    mask_prob: float = MASK_PROB,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    progress: bool = False,
) -> np.ndarray:
    """Class predictions (N,) int64. BERT: the modal class over ``n_masks`` masks (sec. 4.6).

    Mask m is ``igpt.objectives.bert_mask((N, n), mask_prob, seed=seed + 1 + m)``, the masks
    of ``igpt.probe.bert_ensemble_probe``, the same on every device and for every batch
    size; ties between classes are broken at random with ``seed`` (``modal_prediction``).
    """
    tokens = token_rows(tokens, "tokens", shape_hint="(N, n)")  # a memmap: batch by batch
    check_objective(objective)
    device = resolve_model_device(device, classifier)
    classifier.to(device)
    was_training = classifier.training
    classifier.eval()
    N, n = tokens.shape
    runs = n_masks if objective == "bert" else 1
    preds = np.empty((runs, N), dtype=np.int64)
    bf16 = autocast(device, uses_bf16("auto", device))  # bf16 on CUDA, as in training
    try:
        for r in range(runs):
            mask = MaskRows((N, n), mask_prob, seed=seed + 1 + r) if objective == "bert" else None
            for s in tqdm(range(0, N, batch_size), desc="predict", disable=not progress):
                x = long_rows(tokens[s : s + batch_size]).to(device)
                m = mask(s, s + batch_size).to(device) if mask is not None else None
                with bf16:
                    _, logits = classifier(x, m, generative=False)
                preds[r, s : s + len(x)] = logits.argmax(1).cpu().numpy()
    finally:
        classifier.train(was_training)
    return preds[0] if runs == 1 else modal_prediction(preds, seed=seed)


def evaluate(classifier: IGPTClassifier, tokens, labels, **kw) -> float:
    """Accuracy of ``predict(classifier, tokens, **kw)`` against integer ``labels``."""
    y = as_labels(labels, len(tokens), "labels")
    return float((predict(classifier, tokens, **kw) == y).mean())


def load_classifier(path_or_dir, device=None):
    """A fine-tuned classifier from a checkpoint: ``(classifier, palette_or_None, ckpt)``.

    Pass ``best.pt`` of a fine-tuning run for its best hold-out weights, or the run
    directory for its latest checkpoint.
    """
    from igpt.checkpoint import read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(path_or_dir)
    ckpt = read_checkpoint(path)
    return (*classifier_from_checkpoint(ckpt, path, device), ckpt)


def classifier_from_checkpoint(ckpt: dict, path, device=None):
    """``(classifier, palette_or_None)`` of a fine-tuning checkpoint already read from
    ``path`` (named in errors): what ``load_classifier`` builds."""
    from igpt.checkpoint import model_from_checkpoint

    if "head" not in ckpt or "finetune" not in ckpt:
        raise ValueError(f"{path} is not a fine-tuning checkpoint (it has no class head)")
    model, palette = model_from_checkpoint(ckpt, path)
    info = ckpt["finetune"]
    clf = IGPTClassifier(model, int(info["n_classes"]), layer=int(info["layer"]))
    clf.head.load_state_dict(ckpt["head"])
    if not info.get("head_bias", True):
        clf.head.bias.requires_grad_(False)  # fine-tuned without a bias: it stays zero
    if device is not None:
        clf.to(device)
    return clf, palette
