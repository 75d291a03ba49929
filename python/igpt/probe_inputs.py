"""What every probe of ``igpt.probe`` shares: its inputs checked, the hold-out, the per-layer
verdict.

    x = as_features(feats, "train_feats")              # (N, D) float numpy
    y = as_labels(labels, len(x), "train_labels")      # (N,) int64, refused if not classes
    fit, val = stratified_holdout(y, 0.1, seed=0)      # index arrays
    res = layer_verdict(rows)                          # best layer by hold-out accuracy
    res = scored(result, predict, x, y, test_feats, test_labels)   # train and test accuracy

The linear probe (``igpt.probe``), the attentive probe (``igpt.attentive``) and the k-NN probe
(``igpt.knn``) all take their hyper-parameters from the same hold-out of the training rows
and rank layers by its accuracy, never by the test set's.
"""

from __future__ import annotations

import numpy as np
import torch

from igpt.data import check_labels

__all__ = ["as_features", "as_labels", "stratified_holdout", "layer_verdict", "scored"]


def as_features(x, name: str, ndim: int = 2) -> np.ndarray:
    """``x`` (a tensor or numpy array) as a float numpy array of ``ndim`` dimensions; a
    TypeError/ValueError names ``name``, the shape that came and the one needed."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a float tensor or numpy array, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = {2: "(N, D)", 3: "(N, layers, d) or (N, T, d)", 4: "(N, layers, T, d)"}[ndim]
        hint = " (pick one layer, e.g. feats[:, l])" if ndim == 2 and x.ndim == 3 else ""
        raise ValueError(f"{name} must be {shape}, got shape {x.shape}{hint}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x


def as_labels(y, n: int, name: str) -> np.ndarray:
    """``y`` as int64 class indices (N,) for ``n`` rows: ``igpt.data.check_labels`` refuses
    3.7 and negative labels (with their count) instead of truncating them."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype == np.bool_ or y.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be integer labels (N,), got {y.dtype} {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} feature rows")
    return check_labels(y, name)


def stratified_holdout(labels: np.ndarray, val_frac: float, seed: int):
    """Stratified (fit, val) index split with at least one of each class in val, if it can."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    if counts.min() >= 2:
        n_val = min(max(len(classes), round(val_frac * n)), n - len(classes))
        from sklearn.model_selection import train_test_split

        fit, val = train_test_split(
            np.arange(n), test_size=n_val, stratify=labels, random_state=int(rng.integers(2**31))
        )
        return np.sort(fit), np.sort(val)
    n_val = max(1, round(val_frac * n))
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def layer_verdict(rows: list[dict]) -> dict:
    """``{"rows", "best_layer", "best"}`` of per-layer rows ({layer, val_acc, test_acc, ...}):
    the best layer by hold-out accuracy (the earliest among ties), never by test accuracy."""
    j = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"] or 0.0, -i))
    return {"rows": rows, "best_layer": rows[j]["layer"], "best": rows[j]}


def scored(result: dict, predict, x, y, test_feats, test_labels) -> dict:
    """``result`` with the training accuracy of ``predict`` (feats -> labels) on ``x``, ``y``
    and, with a test set, the test accuracy (``test_acc`` None and ``n_test`` 0 without)."""
    result = {**result, "train_acc": float((predict(x) == y).mean()), "test_acc": None}
    result.update(n_train=len(x), n_test=0)
    if test_feats is not None:
        xt = as_features(test_feats, "test_feats", ndim=x.ndim)
        if tuple(xt.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"test_feats rows have shape {tuple(xt.shape[1:])}, train_feats rows "
                f"{tuple(x.shape[1:])}"
            )
        yt = as_labels(test_labels, len(xt), "test_labels")
        result["test_acc"] = float((predict(xt) == yt).mean())
        result["n_test"] = len(xt)
    return result
