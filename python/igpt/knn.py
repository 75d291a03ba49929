"""The k-NN probe: a weighted vote of the nearest training images by cosine similarity.

    res = knn_probe(train_feats, y_train, test_feats, y_test)      # k chosen on a hold-out
    res = knn_layers(train_feats, y_train, test_feats, y_test, layer_ids=ids)   # every layer

What self-supervised runs commonly monitor: no training at all, so it measures how the
features cluster by class rather than whether a class is linearly separable. The features are
centred (the mean of the training rows, which removes the large component that mean-pooled
transformer features share) and L2-normalised, so the dot product is the cosine similarity;
each of the k most similar training rows votes for its class with weight exp(sim / T) (T =
0.07, the temperature of Wu et al. 2018 and DINO). k is chosen on a stratified hold-out of
the training rows (the largest k among ties); the test set is then scored against all of
them. Similarities are computed a block of test rows at a time (``BLOCK``), on the CPU or
the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from igpt.probe_inputs import as_features, as_labels, layer_verdict, scored, stratified_holdout

__all__ = ["knn_probe", "knn_layers", "knn_predict", "DEFAULT_KS", "TEMPERATURE"]

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 3, 5, 10, 20, 50, 100, 200)
TEMPERATURE = 0.07
BLOCK = 1024  # query rows per similarity block: BLOCK x N floats in memory at a time


def _normalised(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x - mean, dim=1)


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    ks: Sequence[int],
    n_classes: int,
    *,
    temperature: float = TEMPERATURE,
) -> dict[int, np.ndarray]:
    """Predictions of ``queries`` (M, D) for every k in ``ks`` by a weighted vote of their
    most cosine-similar rows of ``bank`` (N, D) (both already normalised; labels (N,) int64).

    Returns k -> int64 (M,). Ties of the vote go to the smaller class index.
    """
    k_max = min(max(ks), len(bank))
    out = {k: [] for k in ks}
    for s in range(0, len(queries), BLOCK):
        sim = queries[s : s + BLOCK] @ bank.T  # (b, N)
        top, idx = sim.topk(k_max, dim=1)  # sorted, most similar first
        weight = (top / temperature).exp()  # (b, k_max)
        onehot = torch.nn.functional.one_hot(bank_labels[idx], n_classes).to(weight.dtype)
        votes = (weight.unsqueeze(-1) * onehot).cumsum(dim=1)  # (b, k_max, C): votes of top-k
        for k in ks:
            out[k].append(votes[:, min(k, k_max) - 1].argmax(dim=1).cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def knn_probe(
    train_feats,
    train_labels,
    test_feats=None,
    test_labels=None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    val_frac: float = 0.1,
    seed: int = 0,
    device=None,
) -> dict:
    """The k-NN probe of one feature set: k chosen on a hold-out, then scored on the test set.

    Args:
        train_feats: float (N, D) tensor or array; train_labels: integer (N,).
        test_feats, test_labels: (M, D) and (M,), or None to skip the test score.
        ks: the neighbour counts to choose from (each at most the hold-out's bank size).
        temperature: the vote weight is exp(cosine similarity / temperature).
        val_frac: the stratified share of the training rows held out to choose k.
        seed: the hold-out split (the same split as ``linear_probe``'s for the same seed).
        device: where to compute the similarities (default: the CPU).

    Returns:
        dict with ``k``, ``val_acc``, ``test_acc`` (None without a test set), ``val_curve``
        (list of {k, val_acc}), ``train_acc`` (each training row among the bank it votes
        from, so near 1), ``n_train``, ``n_test``, ``n_classes`` and ``classifier``
        (a function feats -> labels, voting among all training rows).
    """
    x = as_features(train_feats, "train_feats")
    y = as_labels(train_labels, len(x), "train_labels")
    if len(np.unique(y)) < 2:
        raise ValueError(f"train_labels must hold at least two classes, got {np.unique(y)}")
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks
    ):
        raise ValueError(f"ks must be positive ints, got {list(ks)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    device = torch.device(device or "cpu")
    xs = torch.as_tensor(x, dtype=torch.float32, device=device)
    ys = torch.as_tensor(y, device=device)
    n_classes = int(y.max()) + 1
    fit, val = stratified_holdout(y, val_frac, seed)
    ks = sorted({int(k) for k in ks if k <= len(fit)} or {len(fit)})
    mean = xs[fit].mean(0)
    preds = knn_predict(
        _normalised(xs[fit], mean),
        ys[fit],
        _normalised(xs[val], mean),
        ks,
        n_classes,
        temperature=temperature,
    )
    curve = [{"k": k, "val_acc": float((preds[k] == y[val]).mean())} for k in ks]
    best = max(reversed(curve), key=lambda r: r["val_acc"])  # the largest k among ties
    mean_all = xs.mean(0)
    bank = _normalised(xs, mean_all)

    def classify(feats):
        q = torch.as_tensor(as_features(feats, "feats"), dtype=torch.float32, device=device)
        k = best["k"]
        return knn_predict(
            bank, ys, _normalised(q, mean_all), [k], n_classes, temperature=temperature
        )[k]

    result = {**best, "val_curve": curve, "n_classes": n_classes, "classifier": classify}
    return scored(result, classify, x, y, test_feats, test_labels)


def knn_layers(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    layer_ids: Sequence[int] | None = None,
    progress: bool = True,
    name: str = "features",
    **knn_kw,
) -> dict:
    """``knn_probe`` of every layer of (N, K, d) / (M, K, d) features (as ``probe_layers``).

    Returns:
        dict with ``rows`` (one {layer, val_acc, test_acc, k} per layer), ``best_layer`` (by
        hold-out accuracy) and ``best`` (its row).
    """
    x = as_features(train_feats, "train_feats", ndim=3)
    xt = as_features(test_feats, "test_feats", ndim=3)
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"train_feats {x.shape} and test_feats {xt.shape} differ in (K, d)")
    ids = list(range(x.shape[1])) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != x.shape[1]:
        raise ValueError(f"layer_ids names {len(ids)} layers but the features have {x.shape[1]}")
    rows = []
    for j in tqdm(range(len(ids)), desc="k-NN probe", unit="layer", disable=not progress):
        r = knn_probe(x[:, j], train_labels, xt[:, j], test_labels, **knn_kw)
        rows.append(
            {"layer": ids[j], "val_acc": r["val_acc"], "test_acc": r["test_acc"], "k": r["k"]}
        )
        log.info(
            "%s, k-NN, layer %d: val %.4f test %.4f (k=%d)",
            name,
            ids[j],
            r["val_acc"],
            r["test_acc"],
            r["k"],
        )
    return layer_verdict(rows)
