"""The whole linear evaluation of a model: what ``igpt probe`` and the demo run.

    results = evaluate(model, palette, train, test)

Features of every layer (``igpt.features``), the probes of ``igpt.probe`` on them (every
layer, the concatenation around the best, low-data probes, the BERT mask ensemble), and the
same probes of two baselines: raw pixels at the model's n_px and a randomly initialised
model of the same size. ``igpt.reporting`` turns the result into a table, JSON and figures.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from igpt.features import extract_features, random_init_model, raw_pixel_features, resolve_layers
from igpt.model import IGPT
from igpt.probe import (
    bert_ensemble_probe,
    linear_probe,
    low_data_probe,
    probe_layers,
    sgd_probe,
)

log = logging.getLogger(__name__)


def evaluate(
    model: IGPT,
    palette,
    train,
    test,
    *,
    layers: Sequence[int] | None = None,
    per_class: Sequence[int] = (4, 25, 400),
    n_subsets: int = 5,
    baselines: bool = True,
    low_data_baselines: bool = False,
    concat: int = 5,
    method: str = "lbfgs",
    Cs: Sequence[float] | None = None,
    objective: str = "ar",
    n_masks: int = 5,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
    cache_dir=None,
    cache_key: str | None = None,
    progress: bool = True,
) -> dict:
    """The whole linear evaluation of a model on labelled images (``igpt probe``, the demo).

    Probes every layer (``probe_layers``), then k labels per class at the best layer
    (``low_data_probe``, L-BFGS only), the BERT mask ensemble for a BERT model, and with
    ``baselines`` the same probes of raw pixels (the images resized to the model's n_px, the
    input the model sees) and of a randomly initialised model of the same size.

    Args:
        model, palette: the model and the palette that tokenises its images.
        train, test: ``igpt.data.ImageData`` with labels.
        layers: layers to probe (default all); per_class, n_subsets: the low-data probes.
        low_data_baselines: also run the low-data probes on both baselines (at the random
            model's best layer), with the same subsets.
        concat: layers concatenated around the best one (0 skips it).
        method: "lbfgs" or "sgd"; Cs: the L2 strengths L-BFGS chooses from (default 1e-4..1e2).
        objective: "ar", or "bert" for masked inputs; n_masks: masks in the BERT ensemble.
        batch_size, device, cache_dir, cache_key, progress: as in ``extract_features``.
        seed: the masks, the hold-outs, the subsets and the random model.

    Returns:
        dict with ``objective``, ``n_train``, ``n_test``, ``n_layer``, ``layers`` and, as they
        ran, ``low_data``, ``bert_ensemble``, ``raw_pixels``, ``random_init`` and
        ``low_data_baselines`` (name -> ``low_data_probe`` result).
    """
    from igpt.data import tokenize

    _check_labelled(train, test, method, Cs)
    lbfgs_kw = {"seed": seed} if Cs is None else {"seed": seed, "Cs": list(Cs)}
    kw = lbfgs_kw if method == "lbfgs" else {"seed": seed, "device": device}
    n_px, L = model.config.n_px, model.config.n_layer
    x, xt = tokenize(train.images, palette, n_px), tokenize(test.images, palette, n_px)
    y, yt = train.labels, test.labels
    ids = resolve_layers(layers, L)
    feat_kw = dict(batch_size=batch_size, layers=ids, device=device, progress=progress)
    feat_kw["bert_mask_seed"] = seed if objective == "bert" else None
    features = functools.partial(_split_features, (x, xt), cache_dir, cache_key, feat_kw)

    low = _low_data(per_class, n_subsets, method, progress, y, yt, lbfgs_kw)
    results = {"objective": objective, "n_train": len(x), "n_test": len(xt), "n_layer": L}
    common = dict(method=method, progress=progress, kw=kw, low=low)
    results.update(_model_probes(features(model, "model"), (y, yt), ids, concat, **common))
    if objective == "bert" and n_masks > 1:
        results["bert_ensemble"] = bert_ensemble_probe(
            model, x, y, xt, yt, layer=results["layers"]["best_layer"], n_masks=n_masks,
            seed=seed, batch_size=batch_size, device=device, cache_dir=cache_dir,
            cache_key=None if cache_key is None else f"{cache_key}|ensemble",
            progress=progress, **({} if method == "sgd" or Cs is None else {"Cs": list(Cs)}),
        )  # fmt: skip
    if baselines:
        results.update(
            _baselines(model, (train, test), ids, features, low_data_baselines, **common, seed=seed)
        )
    return results


def _model_probes(feats, labels, ids, concat, *, method, progress, kw, low) -> dict:
    """The model's probes of every layer, and the low-data probes at the best one."""
    (f, ft), (y, yt) = feats, labels
    layers = probe_layers(
        f,
        y,
        ft,
        yt,
        layer_ids=ids,
        concat=concat,
        method=method,
        progress=progress,
        name="pretrained model",
        **kw,
    )
    out = {"layers": layers}
    if low is not None:
        j = ids.index(out["layers"]["best_layer"])
        out["low_data"] = low(f[:, j], ft[:, j])
    return out


def _split_features(tokens, cache_dir, cache_key, feat_kw, model, tag):
    """``extract_features`` of the train and test tokens, cached under keys naming ``tag``."""
    keys = [None if cache_key is None else f"{cache_key}|{s}|{tag}" for s in ("train", "test")]
    return [
        extract_features(model, t, cache_dir=cache_dir, cache_key=k, **feat_kw)
        for t, k in zip(tokens, keys, strict=True)
    ]


def _check_labelled(train, test, method, Cs) -> None:
    """Refuse unlabelled splits; say that ``Cs`` does not apply to the SGD probe."""
    for name, split in (("train", train), ("test", test)):
        if split.labels is None:
            raise ValueError(f"{name} has no labels; a linear probe needs labelled images")
    if method == "sgd" and Cs is not None:
        log.warning("Cs applies to the L-BFGS probe; --method sgd chooses a weight decay")


def _baselines(model, splits, ids, features, low_data, *, method, progress, seed, kw, low):
    """``evaluate``'s baselines: raw pixels at the model's n_px, and a randomly initialised
    model of the same size, probed alike (and, with ``low_data``, their low-data probes)."""
    from igpt.data import resize

    (y, yt), images = (d.labels for d in splits), [d.images for d in splits]
    raw = [raw_pixel_features(resize(im, model.config.n_px)) for im in images]
    fit = linear_probe if method == "lbfgs" else sgd_probe
    out = {"raw_pixels": fit(raw[0], y, raw[1], yt, **kw)}
    fresh = random_init_model(model.config, seed=seed).to(next(model.parameters()).device)
    rf, rft = features(fresh, f"random-init-{seed}")
    out["random_init"] = probe_layers(
        rf,
        y,
        rft,
        yt,
        layer_ids=ids,
        concat=0,
        method=method,
        progress=progress,
        name="random-init model",
        **kw,
    )
    if low_data and low is not None:
        j = ids.index(out["random_init"]["best_layer"])
        out["low_data_baselines"] = {
            "random init": low(rf[:, j], rft[:, j]),
            "raw pixels": low(*raw),
        }
    return out


def _low_data(per_class, n_subsets, method, progress, y, yt, probe_kw):
    """``feats, test_feats -> low_data_probe(...)`` for ``evaluate``, or None if none run."""
    if not per_class:
        return None
    if method == "sgd":
        log.info("low-data probes use L-BFGS; skipped with --method sgd")
        return None
    return lambda f, ft: low_data_probe(
        f, y, ft, yt, per_class=per_class, n_subsets=n_subsets, progress=progress, **probe_kw
    )
