"""Linear probes: how good are the features of every layer (paper sec. 2.3-2.4, 4.1-4.7).

    res = probe_layers(train_feats, y_train, test_feats, y_test)
    res["best_layer"], res["rows"]                     # (layer, val_acc, test_acc) per layer
    low = low_data_probe(train_feats[:, l], y_train, test_feats[:, l], y_test, per_class=(4, 25))

The features come from ``igpt.features`` (``extract_features``, re-exported here). The probe
is the paper's: features standardised, multinomial logistic regression with L-BFGS
(scikit-learn), the L2 strength C chosen on a 10% hold-out of the training set, then refit on
train + hold-out and scored on the test set. ``sgd_probe`` is the same probe trained with SGD
(momentum 0.9, cosine schedule) on the GPU, for feature sets where L-BFGS is too slow.

BERT models see masked inputs at evaluation too (``bert_mask_seed``); sec. 4.6's ensemble
takes the modal prediction over 5 independent masks, ties broken at random with a seed
(``modal_prediction``, ``bert_ensemble_probe``). Baselines: ``raw_pixel_features`` (of the
images resized to the model's n_px) and ``random_init_model``. ``igpt.reporting`` writes the
table, JSON and the accuracy-vs-depth PNG (``write_report``, re-exported here);
``igpt.evaluation.evaluate`` runs them all on a model, as ``igpt probe`` and the demo do.

Beside the linear probe, two others on the same split, re-exported here: the attentive probe
(``igpt.attentive``: ``attentive_probe`` of one layer's token features, ``attentive_layers``
of a model's layers, ``token_features``), learned queries cross-attending over the frozen
tokens as AIM reports it, and the k-NN probe (``igpt.knn``: ``knn_probe``, ``knn_layers``),
a weighted vote of the most cosine-similar training images.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt.attentive import (  # noqa: F401  (public names of igpt.probe)
    attentive_layers,
    attentive_probe,
    token_features,
)
from igpt.features import (  # noqa: F401  (raw_pixel_features, random_init_model: public here)
    extract_features,
    random_init_model,
    raw_pixel_features,
    resolve_layers,
)
from igpt.knn import knn_layers, knn_probe  # noqa: F401  (public names of igpt.probe)
from igpt.model import IGPT
from igpt.objectives import MaskRows, bert_mask  # noqa: F401  (public names of igpt.probe)
from igpt.probe_inputs import (  # noqa: F401  (as_labels: public here)
    as_features,
    as_labels,
    layer_verdict,
    scored,
    stratified_holdout,
)
from igpt.reporting import (  # noqa: F401  (public names of igpt.probe)
    format_table,
    plot_accuracy_vs_depth,
    summary_text,
    write_report,
)

log = logging.getLogger(__name__)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))


# ----------------------------------------------------------------------------- probes


def _fit_logreg(x, y, C, max_iter, warm=None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = warm if warm is not None else LogisticRegression(max_iter=max_iter, warm_start=True)
    clf.set_params(C=C)
    # One BLAS thread: L-BFGS makes many small matrix products, and BLAS threads that
    # spin-wait beside torch's OpenMP threads made each fit 4-30x slower on 2 cores.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.debug("L-BFGS did not converge in %d iterations for C=%g", max_iter, C)
    return clf


def linear_probe(
    train_feats,
    train_labels,
    test_feats=None,
    test_labels=None,
    *,
    val_frac: float = 0.1,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """The paper's linear probe: L-BFGS logistic regression with C chosen on a hold-out.

    Features are standardised (mean 0, std 1 per dimension, statistics from the fitting
    rows). For every C in ``Cs`` a multinomial logistic regression is fitted on the training
    rows minus a stratified ``val_frac`` hold-out and scored on the hold-out; the best C
    (the smallest among ties) is refitted on all training rows and scored on the test set.

    Args:
        train_feats: float (N, D) tensor or array; train_labels: integer (N,).
        test_feats, test_labels: (M, D) and (M,), or None to skip the test score.
        val_frac: fraction of the training rows held out to choose C (and to report
            ``val_acc``, which ``probe_layers`` ranks layers by); 0 skips the hold-out and
            needs a single C.
        Cs: inverse L2 strengths to try.
        seed: the hold-out split.
        max_iter: L-BFGS iterations per fit.

    Returns:
        dict with ``C``, ``val_acc``, ``test_acc`` (None without a test set), ``train_acc``,
        ``val_curve`` (list of {C, val_acc}), ``n_train``, ``n_test``, ``n_classes``, and
        ``classifier``: the refitted scikit-learn pipeline (``.predict(feats)``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = as_features(train_feats, "train_feats")
    y = as_labels(train_labels, len(x), "train_labels")
    if len(np.unique(y)) < 2:
        raise ValueError(f"train_labels must hold at least two classes, got {np.unique(y)}")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be positive numbers, got {Cs}")
    if val_frac == 0 and len(Cs) > 1:
        raise ValueError(f"val_frac=0 leaves no hold-out to choose among Cs={Cs}; pass one C")

    best, curve = _choose_C(x, y, Cs, val_frac, seed, max_iter)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=best["C"], max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(x, y)
    result = {**best, "val_curve": curve, "n_classes": int(len(np.unique(y))), "classifier": pipe}
    return scored(result, pipe.predict, x, y, test_feats, test_labels)


def _choose_C(x, y, Cs, val_frac, seed, max_iter) -> tuple[dict, list[dict]]:
    """The C with the best hold-out accuracy (the smallest among ties) and the curve of every
    C's accuracy; with ``val_frac`` 0, the one C given and no curve."""
    from sklearn.preprocessing import StandardScaler

    if val_frac == 0:
        return {"C": Cs[0], "val_acc": None}, []
    fit, val = stratified_holdout(y, val_frac, seed)
    scaler = StandardScaler().fit(x[fit])
    xf, xv = scaler.transform(x[fit]), scaler.transform(x[val])
    clf, curve = None, []
    for C in Cs:  # ascending C, each fit warm-started from the previous solution
        clf = _fit_logreg(xf, y[fit], C, max_iter, warm=clf)
        curve.append({"C": C, "val_acc": float((clf.predict(xv) == y[val]).mean())})
    return max(curve, key=lambda r: r["val_acc"]), curve  # first max = strongest regularisation


def _window(center: int, k: int, n: int) -> list[int]:
    """k consecutive indices in [0, n) centred on ``center`` (shifted to fit)."""
    k = min(k, n)
    start = min(max(center - k // 2, 0), n - k)
    return list(range(start, start + k))


def _log_row(name: str, row: dict, reg: str) -> None:
    """One logged line per probed layer, naming the features it belongs to."""
    val = row["val_acc"] if row["val_acc"] is not None else math.nan
    layer, test = row["layer"], row["test_acc"]
    log.info("%s, layer %d: val %.4f test %.4f (%s=%g)", name, layer, val, test, reg, row[reg])


def probe_layers(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    layer_ids: Sequence[int] | None = None,
    concat: int = 5,
    method: str = "lbfgs",
    progress: bool = True,
    name: str = "features",
    **probe_kw,
) -> dict:
    """Probe every layer, pick the best on the hold-out, and probe k layers around it.

    Args:
        train_feats, test_feats: float (N, K, d) / (M, K, d), e.g. ``extract_features``.
        train_labels, test_labels: integer (N,) / (M,).
        layer_ids: the layer number of each of the K slices (default 0..K-1).
        concat: also probe the concatenation of this many consecutive layers centred on the
            best one (sec. 4.4 uses 5); 0 or 1 skips it.
        method: "lbfgs" (``linear_probe``) or "sgd" (``sgd_probe``, for large feature sets).
        progress: show a tqdm bar.
        name: what the features are, at the start of each logged line (e.g. "pretrained").
        probe_kw: passed to the probe (``linear_probe``: val_frac, Cs, seed, max_iter).

    Returns:
        dict with ``rows`` (one {layer, val_acc, test_acc, C or weight_decay} per layer),
        ``best_layer`` (by
        hold-out accuracy, never by test accuracy), ``best`` (its row) and ``concat`` ({layers,
        val_acc, test_acc, C} or None).
    """
    probes = {"lbfgs": linear_probe, "sgd": sgd_probe}
    if method not in probes:
        raise ValueError(f"method must be one of {list(probes)}, got {method!r}")
    fit = probes[method]
    if probe_kw.get("val_frac", 0.1) <= 0:
        raise ValueError(
            "probe_layers ranks layers by hold-out accuracy: val_frac must be > 0, got "
            f"{probe_kw['val_frac']!r}"
        )
    x = as_features(train_feats, "train_feats", ndim=3)
    xt = as_features(test_feats, "test_feats", ndim=3)
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"train_feats {x.shape} and test_feats {xt.shape} differ in (K, d)")
    K = x.shape[1]
    ids = list(range(K)) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != K:
        raise ValueError(f"layer_ids names {len(ids)} layers but the features have {K}")
    reg = "C" if method == "lbfgs" else "weight_decay"
    rows = []
    for j in tqdm(range(K), desc="probe layers", unit="layer", disable=not progress):
        r = fit(x[:, j], train_labels, xt[:, j], test_labels, **probe_kw)
        rows.append(
            {"layer": ids[j], "val_acc": r["val_acc"], "test_acc": r["test_acc"], reg: r[reg]}
        )
        _log_row(name, rows[-1], reg)
    result = {**layer_verdict(rows), "concat": None}
    j_best = ids.index(result["best_layer"])
    if concat > 1 and K > 1:
        win = _window(j_best, concat, K)
        r = fit(
            x[:, win].reshape(len(x), -1),
            train_labels,
            xt[:, win].reshape(len(xt), -1),
            test_labels,
            **probe_kw,
        )
        result["concat"] = {
            "layers": [ids[j] for j in win],
            "val_acc": r["val_acc"],
            "test_acc": r["test_acc"],
            reg: r[reg],
        }
    return result


def class_balanced_subsets(labels, k: int, *, n_subsets: int = 5, seed: int = 0) -> list:
    """``n_subsets`` index arrays, each with exactly ``k`` rows of every class.

    Subset i is drawn with numpy's generator seeded by (seed, k, i), so subsets differ from
    one another and across seeds, and are the same on every run.
    """
    y = as_labels(labels, len(labels), "labels")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (labels per class) must be a positive int, got {k!r}")
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        c = classes[counts.argmin()]
        raise ValueError(f"class {c} has {counts.min()} examples, fewer than k={k} per class")
    by_class = [np.flatnonzero(y == c) for c in classes]
    subsets = []
    for i in range(n_subsets):
        rng = np.random.default_rng([seed, int(k), i])
        idx = np.concatenate([rng.choice(ix, size=k, replace=False) for ix in by_class])
        subsets.append(np.sort(idx))
    return subsets


def low_data_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    per_class: Sequence[int] = (4, 25, 400),
    n_subsets: int = 5,
    seed: int = 0,
    progress: bool = True,
    **probe_kw,
) -> dict:
    """Linear probes on k labelled examples per class (sec. 4.7, table 4).

    For each k, ``n_subsets`` class-balanced subsets of the training set are probed (C chosen
    on a hold-out inside the subset, one example per class at least) and scored on the whole
    test set. Values of k larger than the smallest class are skipped with a warning.

    Returns:
        dict with ``rows``: one {per_class, n_train, mean, std, accs} per k (std is the
        sample standard deviation over subsets; 0 for one subset).
    """
    x = as_features(train_feats, "train_feats")
    y = as_labels(train_labels, len(x), "train_labels")
    smallest = int(np.unique(y, return_counts=True)[1].min())
    rows = []
    for k in per_class:
        if k > smallest:
            log.warning("skipping %d per class: the smallest class has %d examples", k, smallest)
            continue
        subsets = class_balanced_subsets(y, k, n_subsets=n_subsets, seed=seed)
        accs = []
        for idx in tqdm(subsets, desc=f"{k} per class", unit="subset", disable=not progress):
            r = linear_probe(x[idx], y[idx], test_feats, test_labels, seed=seed, **probe_kw)
            accs.append(r["test_acc"])
        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        rows.append(
            {
                "per_class": int(k),
                "n_train": len(subsets[0]),
                "mean": float(np.mean(accs)),
                "std": std,
                "accs": accs,
            }
        )
    return {"rows": rows}


def sgd_probe(
    train_feats,
    train_labels,
    test_feats=None,
    test_labels=None,
    *,
    epochs: int = 10,
    batch_size: int = 1024,
    lr: float = 0.1,
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    momentum: float = 0.9,
    min_steps: int = 500,
    val_frac: float = 0.1,
    seed: int = 0,
    device=None,
) -> dict:
    """The linear probe trained with SGD on a GPU, for feature sets too large for L-BFGS.

    Standardised features, a zero-initialised linear layer, cross-entropy, SGD with momentum
    0.9 and a cosine learning-rate schedule over ``epochs`` (at least ``min_steps`` steps,
    so small sets are not under-trained); the weight decay is chosen on a
    stratified ``val_frac`` hold-out, then the probe is retrained on all training rows.
    The features are moved to ``device`` (default: cuda when available) whole.

    Returns:
        dict with ``weight_decay``, ``val_acc``, ``test_acc``, ``train_acc``, ``val_curve``,
        ``n_train``, ``n_test``, ``n_classes`` and ``classifier`` (a function feats -> labels).
    """
    x = as_features(train_feats, "train_feats")
    y = as_labels(train_labels, len(x), "train_labels")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_classes = int(y.max()) + 1
    xs = torch.as_tensor(x, dtype=torch.float32, device=device)
    ys = torch.as_tensor(y, device=device)

    hp = dict(lr=lr, momentum=momentum, epochs=epochs, batch_size=batch_size)
    hp.update(min_steps=min_steps, seed=seed, n_classes=n_classes)
    curve = []
    if val_frac > 0:
        fit, val = stratified_holdout(y, val_frac, seed)
        for wd in weight_decays:
            acc = float((_sgd_head(xs, ys, fit, wd, **hp)(x[val]) == y[val]).mean())
            curve.append({"weight_decay": float(wd), "val_acc": acc})
        best = max(curve, key=lambda r: r["val_acc"])
    else:
        best = {"weight_decay": float(weight_decays[0]), "val_acc": None}
    predict = _sgd_head(xs, ys, np.arange(len(x)), best["weight_decay"], **hp)
    result = {**best, "val_curve": curve, "n_classes": n_classes, "classifier": predict}
    return scored(result, predict, x, y, test_feats, test_labels)


def _sgd_head(xs, ys, idx, wd, *, lr, momentum, epochs, batch_size, min_steps, seed, n_classes):
    """A zero-initialised linear head trained with SGD on rows ``idx`` of the standardised
    ``xs``; returns its predict function (feats -> labels, numpy)."""
    device = xs.device
    mean = xs[idx].mean(0)
    std = xs[idx].std(0).clamp_min(1e-6)
    g = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Linear(xs.shape[1], n_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    steps = max(epochs * math.ceil(len(idx) / batch_size), min_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    idx_t = torch.as_tensor(idx, device=device)
    step = 0
    while step < steps:  # epochs of fresh permutations until the schedule ends
        perm = idx_t[torch.randperm(len(idx_t), generator=g).to(device)]
        for s in range(0, len(perm), batch_size):
            b = perm[s : s + batch_size]
            loss = F.cross_entropy(head((xs[b] - mean) / std), ys[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break

    @torch.no_grad()
    def predict(feats):
        f = torch.as_tensor(as_features(feats, "feats"), dtype=torch.float32)
        out = [
            head((f[s : s + 65536].to(device) - mean) / std).argmax(1).cpu()
            for s in range(0, len(f), 65536)
        ]
        return torch.cat(out).numpy()

    return predict


# ----------------------------------------------------------------------------- BERT ensembles


def modal_prediction(predictions, *, seed: int = 0) -> np.ndarray:
    """The most common prediction per example across M predictions (sec. 4.6's ensemble).

    Args:
        predictions: integer (M, N): M predictions (e.g. one per BERT mask) of N examples.
        seed: ties between equally common classes are broken uniformly at random with
            numpy's generator seeded by ``seed``: the same seed gives the same answer.

    Returns:
        int64 (N,).
    """
    p = predictions.detach().cpu().numpy() if isinstance(predictions, torch.Tensor) else predictions
    p = np.asarray(p)
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.integer) or p.size == 0:
        raise ValueError(
            f"predictions must be a non-empty integer (M, N) array, got {p.dtype} {p.shape}"
        )
    if p.min() < 0:
        raise ValueError(f"predictions must be class indices >= 0, got {p.min()}")
    M, N = p.shape
    counts = np.zeros((N, int(p.max()) + 1), dtype=np.int64)
    np.add.at(counts, (np.broadcast_to(np.arange(N), (M, N)), p), 1)
    top = counts == counts.max(axis=1, keepdims=True)  # (N, C): the tied winners
    noise = np.random.default_rng(seed).random(counts.shape)
    return np.where(top, noise, -1.0).argmax(axis=1).astype(np.int64)


def bert_ensemble_probe(
    model: IGPT,
    train_tokens,
    train_labels,
    test_tokens,
    test_labels,
    *,
    layer: int = -1,
    n_masks: int = 5,
    mask_prob: float = 0.15,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    cache_dir=None,
    cache_key: str | None = None,
    progress: bool = True,
    **probe_kw,
) -> dict:
    """Linear probe of a BERT model with masked inputs and the 5-mask ensemble (sec. 4.6).

    The probe is fitted on features of the training images under one mask (seed ``seed``);
    every test image is then seen under ``n_masks`` independent masks (seeds seed+1 ...),
    and the ensemble predicts the modal class, ties broken at random with ``seed``.

    Returns:
        dict with ``layer``, ``C``, ``val_acc``, ``single_mask_acc`` (mean test accuracy of
        one mask), ``mask_accs``, ``ensemble_acc`` and ``n_masks``.
    """
    layer_id = resolve_layers([layer], model.config.n_layer)[0]
    kw = dict(
        batch_size=batch_size,
        layers=[layer_id],
        bert_mask_prob=mask_prob,
        device=device,
        cache_dir=cache_dir,
        cache_key=cache_key,
        progress=progress,
    )
    train_f = extract_features(model, train_tokens, bert_mask_seed=seed, **kw)[:, 0]
    res = linear_probe(train_f, train_labels, seed=seed, **probe_kw)
    yt = as_labels(test_labels, len(test_tokens), "test_labels")
    preds = []
    for m in range(n_masks):
        f = extract_features(model, test_tokens, bert_mask_seed=seed + 1 + m, **kw)[:, 0]
        preds.append(res["classifier"].predict(f.numpy()))
    preds = np.stack(preds)
    ens = modal_prediction(preds, seed=seed)
    mask_accs = [float((p == yt).mean()) for p in preds]
    return {
        "layer": layer_id,
        "C": res["C"],
        "val_acc": res["val_acc"],
        "single_mask_acc": float(np.mean(mask_accs)),
        "mask_accs": mask_accs,
        "ensemble_acc": float((ens == yt).mean()),
        "n_masks": n_masks,
    }
