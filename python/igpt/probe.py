"""Linear probes: how good are the features of every layer (paper sec. 2.3-2.4, 4.1-4.7).

    feats = extract_features(model, tokens)            # (N, L + 1, d) float32, f^0 .. f^L
    res = probe_layers(train_feats, y_train, test_feats, y_test)
    res["best_layer"], res["rows"]                     # (layer, val_acc, test_acc) per layer
    low = low_data_probe(train_feats[:, l], y_train, test_feats[:, l], y_test, per_class=(4, 25))

f^l is the mean over positions of n^l, the block's own normalised input (``IGPT.features``),
computed for every layer in one forward pass. The probe is the paper's: features
standardised, multinomial logistic regression with L-BFGS (scikit-learn), the L2 strength
C chosen on a 10% hold-out of the training set, then refit on train + hold-out and scored on
the test set. ``sgd_probe`` is the same probe trained with SGD (momentum 0.9, cosine
schedule) on the GPU, for feature sets where L-BFGS is too slow.

BERT models see masked inputs at evaluation too (``bert_mask_seed``); sec. 4.6's ensemble
takes the modal prediction over 5 independent masks, ties broken at random with a seed
(``modal_prediction``, ``bert_ensemble_probe``). Baselines: ``raw_pixel_features`` and
``random_init_model``. ``write_report`` writes the table, JSON and the accuracy-vs-depth PNG.
The ``igpt probe`` command runs the whole evaluation on a checkpoint and a dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt.model import IGPT

log = logging.getLogger(__name__)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- inputs


def _as_tokens(tokens, name: str = "tokens") -> torch.Tensor:
    if isinstance(tokens, np.ndarray):
        if tokens.dtype.kind == "u" and tokens.dtype != np.uint8:
            tokens = tokens.astype(np.int64)  # e.g. igpt.data's uint16 token cache
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"{name} must be an integer tensor or numpy array (N, n), got {type(tokens).__name__}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() != 2:
        raise TypeError(
            f"{name} must be an integer (N, n) array, got {tokens.dtype} {tuple(tokens.shape)}"
        )
    return tokens


def _as_features(x, name: str, ndim: int = 2) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a float tensor or numpy array, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = "(N, D)" if ndim == 2 else "(N, layers, d)"
        hint = " (pick one layer, e.g. feats[:, l])" if ndim == 2 and x.ndim == 3 else ""
        raise ValueError(f"{name} must be {shape}, got shape {x.shape}{hint}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x


def _as_labels(y, n: int, name: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must be integer labels (N,), got {y.dtype} {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} feature rows")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- features


MASK_BLOCK = 4096  # rows of an evaluation mask drawn from one generator


class MaskRows:
    """Rows [start, stop) of the BERT evaluation mask of an (N, n) dataset, drawn lazily.

    Each position is masked independently with probability ``prob`` (sec. 2.2, p = 0.15), by
    ``igpt.train.bert_mask``. Rows come in blocks of ``MASK_BLOCK``, block b from a CPU
    generator seeded by (seed, b), so the mask depends only on (seed, N, n): the same on every
    device and for every batch size, without ever holding all N rows' random numbers. The
    last two blocks drawn are kept.
    """

    def __init__(self, shape, prob: float = 0.15, *, seed: int):
        if not 0.0 < prob < 1.0:
            raise ValueError(f"prob must be in (0, 1), got {prob}")
        self.N, self.n = (int(v) for v in shape)
        self.prob, self.seed = prob, int(seed)
        self._blocks: dict[int, torch.Tensor] = {}

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._blocks:
            from igpt.train import bert_mask as draw  # the pre-training objective's masks

            seed = int(np.random.SeedSequence([self.seed, b]).generate_state(1)[0])
            rows = min(MASK_BLOCK, self.N - b * MASK_BLOCK)
            self._blocks = {k: v for k, v in self._blocks.items() if k == b - 1}
            self._blocks[b] = draw((rows, self.n), self.prob, torch.Generator().manual_seed(seed))
        return self._blocks[b]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """bool (stop - start, n), True = masked."""
        stop = min(stop, self.N)
        parts = [
            self._block(b)[max(start - b * MASK_BLOCK, 0) : stop - b * MASK_BLOCK]
            for b in range(start // MASK_BLOCK, -(-stop // MASK_BLOCK))
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.n, dtype=torch.bool)


def bert_mask(shape, prob: float = 0.15, *, seed: int) -> torch.Tensor:
    """The whole BERT evaluation mask (N, n) for ``seed``: bool, True = masked.

    ``extract_features(..., bert_mask_seed=seed)`` uses exactly this mask (see ``MaskRows``).
    """
    return MaskRows(shape, prob, seed=seed)(0, int(shape[0]))


def _fingerprint_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy


def _cache_path(model, tokens, layers, bert_mask_seed, mask_prob, cache_dir, cache_key) -> Path:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_VERSION}|{layers}|{bert_mask_seed}|{mask_prob}|".encode())
    if cache_key is not None:
        h.update(f"key:{cache_key}|".encode())
    else:  # no key: the weights themselves name the model
        for name, t in model.state_dict().items():
            h.update(name.encode())
            _fingerprint_tensor(h, t)
    _fingerprint_tensor(h, tokens)  # a different dataset never hits, whatever the key says
    return Path(cache_dir) / f"features_{h.hexdigest()}.pt"


def _resolve_layers(layers, n_layer: int) -> list[int]:
    if layers is None:
        return list(range(n_layer + 1))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layers must be ints in [0, {n_layer}], got {layer!r}")
        l_ = int(layer) + (n_layer + 1 if layer < 0 else 0)
        if not 0 <= l_ <= n_layer:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0..{n_layer}")
        out.append(l_)
    if not out:
        raise ValueError("layers is empty; pass None for all layers")
    return out


@torch.no_grad()
def extract_features(
    model: IGPT,
    tokens,
    *,
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
    bert_mask_seed: int | None = None,
    bert_mask_prob: float = 0.15,
    device=None,
    cache_dir=None,
    cache_key: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled features of every layer for a whole dataset, in one pass per batch.

    Args:
        model: an ``IGPT``. It is put in eval mode for the pass (and restored after).
        tokens: integer (N, n) tensor or numpy array of palette tokens.
        batch_size: images per forward pass.
        layers: which of f^0 .. f^L to keep (ints, negative counts from L); None keeps all.
        bert_mask_seed: None runs the AR input. An int runs the BERT input with the mask
            ``bert_mask((N, n), bert_mask_prob, seed=bert_mask_seed)`` (masks at evaluation).
        device: where to run; None means the model's device. A model elsewhere is moved.
        cache_dir: a folder to cache the result in. The file name hashes ``cache_key``
            (or, without one, the model's weights), the tokens themselves, ``layers`` and the
            mask settings, so a second call with the same inputs reads the file instead of
            running the model.
        cache_key: a string naming the model (e.g. checkpoint path, step and data spec).
        progress: show a tqdm bar.

    Returns:
        float32 CPU tensor (N, len(layers), d): features[:, j] = f^{layers[j]}. On CUDA the
        model runs under bf16 autocast; the pooling is in float32.
    """
    if not isinstance(model, IGPT):
        raise TypeError(
            f"model must be an igpt.IGPT, got {type(model).__name__} (convert a transformers "
            "ImageGPT with igpt.hf.from_hf)"
        )
    tokens = _as_tokens(tokens)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    layer_ids = _resolve_layers(layers, model.config.n_layer)
    path = None
    if cache_dir is not None:
        path = _cache_path(
            model, tokens, layer_ids, bert_mask_seed, bert_mask_prob, cache_dir, cache_key
        )
        if path.is_file():
            log.info("features from cache %s", path)
            return torch.load(path, map_location="cpu", weights_only=True)["features"]

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if next(model.parameters()).device != device:
        log.info("moving the model to %s for feature extraction", device)
        model.to(device)
    N, n = tokens.shape
    mask = (
        MaskRows((N, n), bert_mask_prob, seed=bert_mask_seed)
        if bert_mask_seed is not None
        else None
    )
    out = torch.empty(N, len(layer_ids), model.config.n_embd, dtype=torch.float32)
    select = None if layer_ids == list(range(model.config.n_layer + 1)) else layer_ids
    was_training = model.training
    model.eval()
    try:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        starts = range(0, N, batch_size)
        for s in tqdm(starts, desc="features", unit="batch", disable=not progress):
            x = tokens[s : s + batch_size].to(device, torch.long, non_blocking=True)
            m = mask(s, s + batch_size).to(device) if mask is not None else None
            with autocast:
                f = model.features(x, bert_mask=m)  # (B, L + 1, d) float32
            out[s : s + batch_size] = (f if select is None else f[:, select]).float().cpu()
    finally:
        model.train(was_training)

    if path is not None:
        from igpt.checkpoint import atomic_torch_save

        atomic_torch_save({"features": out, "layers": layer_ids, "key": str(cache_key)}, path)
        log.info("cached features in %s", path)
    return out


def raw_pixel_features(images_or_tokens, *, palette=None) -> torch.Tensor:
    """The raw-pixel baseline: each image as one flat float32 vector in [0, 1].

    Args:
        images_or_tokens: uint8 images (N, H, W, 3) (numpy or torch), or integer tokens
            (N, n) together with ``palette``, whose colours replace the tokens.
        palette: an ``igpt.palette.Palette`` (only for tokens).

    Returns:
        float32 (N, H * W * 3) or (N, n * 3).
    """
    x = images_or_tokens
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images_or_tokens must be a numpy array or tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == 3:
        return x.reshape(len(x), -1).float() / 255.0
    if x.dim() == 2 and not x.dtype.is_floating_point and x.dtype != torch.bool:
        if palette is None:
            raise ValueError("tokens need palette=... to turn them back into pixels")
        return palette.dequantize(x.cpu().long()).reshape(len(x), -1).float() / 255.0
    raise ValueError(
        "images_or_tokens must be uint8 images (N, H, W, 3) or integer tokens (N, n), got "
        f"{x.dtype} {tuple(x.shape)}"
    )


def random_init_model(model_or_config, *, seed: int = 0) -> IGPT:
    """A freshly initialised IGPT of the same size: the 'what did pretraining buy' baseline."""
    config = getattr(model_or_config, "config", model_or_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IGPT(config)


# ----------------------------------------------------------------------------- probes


def _holdout(labels: np.ndarray, val_frac: float, seed: int):
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

    x = _as_features(train_feats, "train_feats")
    y = _as_labels(train_labels, len(x), "train_labels")
    if len(np.unique(y)) < 2:
        raise ValueError(f"train_labels must hold at least two classes, got {np.unique(y)}")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be positive numbers, got {Cs}")
    if val_frac == 0 and len(Cs) > 1:
        raise ValueError(f"val_frac=0 leaves no hold-out to choose among Cs={Cs}; pass one C")

    curve = []
    if val_frac > 0:
        fit, val = _holdout(y, val_frac, seed)
        scaler = StandardScaler().fit(x[fit])
        xf, xv = scaler.transform(x[fit]), scaler.transform(x[val])
        clf = None
        for C in Cs:  # ascending C, each fit warm-started from the previous solution
            clf = _fit_logreg(xf, y[fit], C, max_iter, warm=clf)
            curve.append({"C": C, "val_acc": float((clf.predict(xv) == y[val]).mean())})
        best = max(curve, key=lambda r: r["val_acc"])  # first max = strongest regularisation
    else:
        best = {"C": Cs[0], "val_acc": None}

    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=best["C"], max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(x, y)
    result = {
        "C": best["C"],
        "val_acc": best["val_acc"],
        "train_acc": float((pipe.predict(x) == y).mean()),
        "test_acc": None,
        "val_curve": curve,
        "n_train": len(x),
        "n_test": 0,
        "n_classes": int(len(np.unique(y))),
        "classifier": pipe,
    }
    if test_feats is not None:
        xt = _as_features(test_feats, "test_feats")
        if xt.shape[1] != x.shape[1]:
            raise ValueError(f"test_feats has {xt.shape[1]} dims, train_feats {x.shape[1]}")
        yt = _as_labels(test_labels, len(xt), "test_labels")
        result["test_acc"] = float((pipe.predict(xt) == yt).mean())
        result["n_test"] = len(xt)
    return result


def _window(center: int, k: int, n: int) -> list[int]:
    """k consecutive indices in [0, n) centred on ``center`` (shifted to fit)."""
    k = min(k, n)
    start = min(max(center - k // 2, 0), n - k)
    return list(range(start, start + k))


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
    x = _as_features(train_feats, "train_feats", ndim=3)
    xt = _as_features(test_feats, "test_feats", ndim=3)
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
        log.info(
            "layer %d: val %.4f test %.4f (%s=%g)",
            ids[j],
            r["val_acc"] if r["val_acc"] is not None else math.nan,
            r["test_acc"],
            reg,
            r[reg],
        )
    j_best = max(range(K), key=lambda j: (rows[j]["val_acc"] or 0.0, -j))
    result = {"rows": rows, "best_layer": ids[j_best], "best": rows[j_best], "concat": None}
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
    y = _as_labels(labels, len(labels), "labels")
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
    x = _as_features(train_feats, "train_feats")
    y = _as_labels(train_labels, len(x), "train_labels")
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
    x = _as_features(train_feats, "train_feats")
    y = _as_labels(train_labels, len(x), "train_labels")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_classes = int(y.max()) + 1
    xs = torch.as_tensor(x, dtype=torch.float32, device=device)
    ys = torch.as_tensor(y, device=device)

    def train(idx, wd):
        mean = xs[idx].mean(0)
        std = xs[idx].std(0).clamp_min(1e-6)
        g = torch.Generator(device="cpu").manual_seed(seed)
        head = nn.Linear(x.shape[1], n_classes).to(device)
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
            f = torch.as_tensor(_as_features(feats, "feats"), dtype=torch.float32)
            out = [
                head((f[s : s + 65536].to(device) - mean) / std).argmax(1).cpu()
                for s in range(0, len(f), 65536)
            ]
            return torch.cat(out).numpy()

        return predict

    curve = []
    if val_frac > 0:
        fit, val = _holdout(y, val_frac, seed)
        for wd in weight_decays:
            acc = float((train(fit, wd)(x[val]) == y[val]).mean())
            curve.append({"weight_decay": float(wd), "val_acc": acc})
        best = max(curve, key=lambda r: r["val_acc"])
    else:
        best = {"weight_decay": float(weight_decays[0]), "val_acc": None}
    predict = train(np.arange(len(x)), best["weight_decay"])
    result = {
        **best,
        "train_acc": float((predict(x) == y).mean()),
        "test_acc": None,
        "val_curve": curve,
        "n_train": len(x),
        "n_test": 0,
        "n_classes": n_classes,
        "classifier": predict,
    }
    if test_feats is not None:
        xt = _as_features(test_feats, "test_feats")
        yt = _as_labels(test_labels, len(xt), "test_labels")
        result["test_acc"] = float((predict(xt) == yt).mean())
        result["n_test"] = len(xt)
    return result


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
    layer_id = _resolve_layers([layer], model.config.n_layer)[0]
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
    yt = _as_labels(test_labels, len(test_tokens), "test_labels")
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


# ----------------------------------------------------------------------------- reports


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, (list, tuple)):
            return ",".join(str(i) for i in v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_accuracy_vs_depth(
    curves: dict,
    path,
    *,
    n_layer: int | None = None,
    baselines: dict | None = None,
    title: str = "Linear probe accuracy vs depth",
) -> Path:
    """The paper's figure 2: probe accuracy against relative depth l / L, as a PNG.

    Args:
        curves: name -> ``probe_layers`` result (or its ``rows``); one line per name.
        path: the PNG to write.
        n_layer: L, the model's depth (default: the largest layer in the rows).
        baselines: name -> accuracy, drawn as horizontal dashed lines (e.g. raw pixels).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, res in curves.items():
        rows = res["rows"] if isinstance(res, dict) else res
        layers = [r["layer"] for r in rows]
        depth = max(n_layer or max(layers), 1)
        ax.plot(
            [lay / depth for lay in layers],
            [100 * r["test_acc"] for r in rows],
            marker="o",
            markersize=3,
            label=name,
        )
    for i, (name, acc) in enumerate((baselines or {}).items()):
        ax.axhline(100 * acc, linestyle="--", color=f"C{len(curves) + i}", label=name)
    ax.set_xlabel("relative depth l / L")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "classifier"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def write_report(results: dict, out_dir) -> dict:
    """Write ``probe.json``, ``probe.md`` (tables) and ``depth.png`` for a probe run.

    ``results`` holds ``layers`` (a ``probe_layers`` result) and optionally ``random_init``
    (the same for the baseline model), ``raw_pixels`` (a ``linear_probe`` result),
    ``low_data`` (a ``low_data_probe`` result) and ``bert_ensemble``. Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probe.json", "table": out / "probe.md", "png": out / "depth.png"}
    text = json.dumps(_jsonable(results), indent=2)
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(paths["json"])
    paths["table"].write_text(summary_text(results) + "\n")
    curves = {"pretrained": results["layers"]}
    if results.get("random_init"):
        curves["random init"] = results["random_init"]
    baselines = {}
    if results.get("raw_pixels"):
        baselines["raw pixels"] = results["raw_pixels"]["test_acc"]
    plot_accuracy_vs_depth(
        curves, paths["png"], n_layer=results.get("n_layer"), baselines=baselines
    )
    return paths


def summary_text(results: dict) -> str:
    """The Markdown summary of a probe run: per-layer table, baselines, low-data, BERT."""
    rows = results["layers"]["rows"]
    reg = "C" if rows and "C" in rows[0] else "weight_decay"
    parts = [
        "## Linear probe per layer",
        "",
        format_table(rows, ["layer", "val_acc", "test_acc", reg]),
    ]
    lay = results["layers"]
    lines = [f"best layer {lay['best_layer']}: test acc {lay['best']['test_acc']:.4f}"]
    if lay.get("concat"):
        c = lay["concat"]
        lines.append(f"concat of layers {c['layers']}: test acc {c['test_acc']:.4f}")
    if results.get("random_init"):
        r = results["random_init"]
        lines.append(
            f"random-init model, best layer {r['best_layer']}: test acc {r['best']['test_acc']:.4f}"
        )
    if results.get("raw_pixels"):
        lines.append(f"raw pixels: test acc {results['raw_pixels']['test_acc']:.4f}")
    if results.get("bert_ensemble"):
        b = results["bert_ensemble"]
        lines.append(
            f"BERT layer {b['layer']}: one mask {b['single_mask_acc']:.4f}, "
            f"{b['n_masks']}-mask ensemble {b['ensemble_acc']:.4f}"
        )
    parts += ["", *(f"- {line}" for line in lines)]
    if results.get("low_data"):
        rows = [
            {
                "per class": r["per_class"],
                "n_train": r["n_train"],
                "test acc": f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
            }
            for r in results["low_data"]["rows"]
        ]
        parts += [
            "",
            "## Low-data probe (mean ± std over subsets, %)",
            "",
            format_table(rows, ["per class", "n_train", "test acc"]),
        ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- igpt probe


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"expected integers like 4,25,400, got {text!r}") from None


def add_arguments(parser) -> None:
    """Arguments of ``igpt probe``."""
    from igpt.cli import add_common_arguments

    add_common_arguments(
        parser, "checkpoint", "data", "objective", "batch_size", "out", "device", "seed"
    )
    # objective: the checkpoint's own by default; the flag is for checkpoints that do not
    # record one (a BERT model must be probed with masked inputs)
    parser.set_defaults(batch_size=64, out="runs/probe", objective=None)
    parser.add_argument(
        "--layers", nargs="+", default=None, help="layers to probe, e.g. 0,8,16,24 (default: all)"
    )
    parser.add_argument(
        "--per-class",
        nargs="+",
        default=["4,25,400"],
        help="low-data probes with k labels per class at the best layer (default 4,25,400; "
        "'none' skips them)",
    )
    parser.add_argument("--subsets", type=int, default=5, help="random subsets per k (default 5)")
    parser.add_argument(
        "--concat", type=int, default=5, help="layers concatenated around the best (default 5)"
    )
    parser.add_argument(
        "--cs",
        default=None,
        help="L2 strengths C to choose from, e.g. 0.01,1,100 (default 1e-4..1e2)",
    )
    parser.add_argument(
        "--method",
        choices=("lbfgs", "sgd"),
        default="lbfgs",
        help="lbfgs (scikit-learn, the paper's) or sgd (GPU, for large sets)",
    )
    parser.add_argument(
        "--bert-masks", type=int, default=5, help="masks in a BERT model's ensemble (default 5)"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the raw-pixel and random-init probes"
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N images per split")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default OUT/cache)")


def _load_split(spec: str, split: str, limit: int | None):
    from igpt.data import load_images

    data = load_images(spec, split)
    if data.labels is None:
        raise SystemExit(f"--data {spec} has no labels in its {split!r} split; probes need labels")
    return data.subset(np.arange(min(limit, len(data)))) if limit else data


def run(args) -> None:
    """``igpt probe``: probe every layer of a checkpoint on a labelled dataset."""
    from igpt.checkpoint import load_model, objective_of, resolve_checkpoint
    from igpt.data import resize, tokenize

    if args.checkpoint is None:
        raise SystemExit("igpt probe needs --checkpoint FILE_OR_RUN_DIR")
    path = resolve_checkpoint(args.checkpoint)
    from igpt.cli import pick_device

    device = pick_device(args.device)
    model, palette, ckpt = load_model(path, device=device)
    if palette is None:
        raise SystemExit(f"{path} holds no palette, so images cannot be tokenised")
    objective = args.objective or objective_of(ckpt)
    n_px, L = model.config.n_px, model.config.n_layer
    layers = _resolve_layers(_int_list(" ".join(args.layers)), L) if args.layers else None
    per_class = [] if args.per_class == ["none"] else _int_list(" ".join(args.per_class))
    probe_kw = {"seed": args.seed}
    if args.cs:
        try:
            probe_kw["Cs"] = [float(c) for c in args.cs.replace(",", " ").split()]
        except ValueError:
            raise SystemExit(f"--cs needs numbers like 0.01,1,100, got {args.cs!r}") from None
    if args.method == "sgd":
        probe_kw = {"seed": args.seed, "device": device}

    train = _load_split(args.data, "train", args.limit)
    test = _load_split(args.data, "test", args.limit)
    x, xt = tokenize(train.images, palette, n_px), tokenize(test.images, palette, n_px)
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    key = f"{path.resolve()}|{path.stat().st_mtime_ns}|step={ckpt.get('step')}|{args.data}"
    bert_seed = args.seed if objective == "bert" else None
    log.info(
        "probing %s (%s, L=%d) on %s: %d train, %d test images",
        path,
        objective,
        L,
        args.data,
        len(x),
        len(xt),
    )

    def features(m, tokens, split, tag):
        return extract_features(
            m,
            tokens,
            batch_size=args.batch_size,
            layers=layers,
            bert_mask_seed=bert_seed,
            device=device,
            cache_dir=cache_dir,
            cache_key=f"{key}|{split}|{tag}",
        )

    ids = layers if layers is not None else list(range(L + 1))
    f, ft = features(model, x, "train", "model"), features(model, xt, "test", "model")
    results = {
        "checkpoint": str(path),
        "data": args.data,
        "objective": objective,
        "n_train": len(x),
        "n_test": len(xt),
        "n_layer": L,
    }
    results["layers"] = probe_layers(
        f,
        train.labels,
        ft,
        test.labels,
        layer_ids=ids,
        concat=args.concat,
        method=args.method,
        **probe_kw,
    )
    j = ids.index(results["layers"]["best_layer"])
    if per_class and args.method == "sgd":
        log.info("low-data probes use L-BFGS; skipped with --method sgd")
    elif per_class:
        results["low_data"] = low_data_probe(
            f[:, j],
            train.labels,
            ft[:, j],
            test.labels,
            per_class=per_class,
            n_subsets=args.subsets,
            **probe_kw,
        )
    del f, ft
    if objective == "bert" and args.bert_masks > 1:
        results["bert_ensemble"] = bert_ensemble_probe(
            model,
            x,
            train.labels,
            xt,
            test.labels,
            layer=results["layers"]["best_layer"],
            n_masks=args.bert_masks,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            cache_dir=cache_dir,
            cache_key=f"{key}|ensemble",
            **({} if args.method == "sgd" else {"Cs": probe_kw["Cs"]} if "Cs" in probe_kw else {}),
        )
    if not args.no_baselines:
        raw = [raw_pixel_features(resize(d.images, n_px)) for d in (train, test)]
        fit = linear_probe if args.method == "lbfgs" else sgd_probe
        results["raw_pixels"] = fit(raw[0], train.labels, raw[1], test.labels, **probe_kw)
        fresh = random_init_model(model.config, seed=args.seed).to(device)
        rf = features(fresh, x, "train", f"random-init-{args.seed}")
        rft = features(fresh, xt, "test", f"random-init-{args.seed}")
        results["random_init"] = probe_layers(
            rf,
            train.labels,
            rft,
            test.labels,
            layer_ids=ids,
            concat=0,
            method=args.method,
            **probe_kw,
        )
    paths = write_report(results, out)
    print(summary_text(results))
    print(f"\nwrote {paths['json']}, {paths['table']} and {paths['png']}")
