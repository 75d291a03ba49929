"""The whole linear evaluation of a model: what ``igpt probe`` and the demo run.

    results = evaluate(model, palette, train, test)     # ImageData splits, or
    results = evaluate(model, palette, TokenSplit(*cached_tokens(spec, "train", palette, 32)),
                       TokenSplit(*cached_tokens(spec, "test", palette, 32)))   # no images

Features of every layer (``igpt.features``), the probes of ``igpt.probe`` on them (every
layer, the concatenation around the best, low-data probes, the BERT mask ensemble), and the
same probes of two baselines: raw pixels at the model's n_px and a randomly initialised
model of the same size. ``igpt.reporting`` turns the result into a table, JSON and figures.

Token splits (``TokenSplit``, e.g. the uint16 memmap of the token cache) are read a batch at
a time and never touch images; their raw-pixel baseline can only see each token's palette
colour, so it is the image as the model sees it, not its pixels (the result says which).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

from igpt._checks import long_rows, token_rows
from igpt.attentive import attentive_layers
from igpt.data.cache import TokenSplit  # defined with the token cache; imported from here too
from igpt.features import extract_features, random_init_model, raw_pixel_features, resolve_layers
from igpt.knn import knn_layers
from igpt.model import IGPT
from igpt.probe import (
    as_labels,
    bert_ensemble_probe,
    linear_probe,
    low_data_probe,
    probe_layers,
    sgd_probe,
)

log = logging.getLogger(__name__)

RAW_BATCH = 4096  # tokens turned into palette colours per block for the raw-pixel baseline
PROBES = ("linear", "attentive", "knn")


def evaluate(
    model: IGPT,
    palette,
    train,
    test,
    *,
    layers: Sequence[int] | None = None,
    probes: Sequence[str] = ("linear",),
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
    attentive: dict | None = None,
    progress: bool = True,
) -> dict:
    """The whole linear evaluation of a model on labelled images (``igpt probe``, the demo).

    Probes every layer (``probe_layers``), k labels per class at the best layer (L-BFGS only),
    the BERT mask ensemble, and with ``baselines`` the same of raw pixels (the images at the
    model's n_px; of token splits, the palette colours) and of a random model of that size.

    Args:
        model, palette: the model and the palette that tokenises its images.
        train, test: ``igpt.data.ImageData`` with labels, or ``TokenSplit`` (or a
            ``(tokens, labels)`` pair): tokens at the model's n_px, read batch by batch.
        layers: layers to probe (default all); per_class, n_subsets: the low-data probes.
        probes: the probes of every layer, on one split: ``linear`` (and the linear probes
            above and below), ``attentive`` (``igpt.attentive.attentive_layers`` with the
            keywords in ``attentive``: grid, max_bytes, epochs ...), ``knn`` (``knn_layers``).
        low_data_baselines: the low-data probes of both baselines too, on the same subsets.
        concat: layers concatenated around the best one (0 skips it).
        method: "lbfgs" or "sgd"; Cs: the L2 strengths L-BFGS chooses from (default 1e-4..1e2).
        objective: "ar", or "bert" for masked inputs; n_masks: masks in the BERT ensemble.
        batch_size, device, cache_dir, cache_key, progress: as in ``extract_features``.
        seed: the masks, the hold-outs, the subsets and the random model.

    Returns:
        dict with ``objective``, ``n_train``, ``n_test``, ``n_layer``, ``layers`` and, as they
        ran, ``low_data``, ``bert_ensemble``, ``raw_pixels`` (its ``pixels`` says what it
        saw: ``"images at n_px"`` or ``"palette colours at n_px"``), ``random_init`` and
        ``low_data_baselines``; ``probes``, and ``attentive``, ``knn`` as ``layers`` is.
    """
    probes = check_probes(probes)
    train, test = (as_split(s) for s in (train, test))
    _check_labelled(train, test, method, Cs)
    lbfgs_kw = {"seed": seed} if Cs is None else {"seed": seed, "Cs": list(Cs)}
    kw = lbfgs_kw if method == "lbfgs" else {"seed": seed, "device": device}
    n_px, L = model.config.n_px, model.config.n_layer
    (x, y), (xt, yt) = _tokens_and_labels(train, test, palette, n_px)
    ids = resolve_layers(layers, L)
    feat_kw = dict(batch_size=batch_size, layers=ids, device=device, progress=progress)
    feat_kw["bert_mask_seed"] = seed if objective == "bert" else None
    features = functools.partial(_split_features, (x, xt), cache_dir, cache_key, feat_kw)
    low = _low_data(per_class, n_subsets, method, progress, y, yt, lbfgs_kw)
    results = {"objective": objective, "n_train": len(x), "n_test": len(xt), "n_layer": L}
    results["probes"], data = probes, ((x, y), (xt, yt))
    common = dict(method=method, progress=progress, kw=kw, low=low)
    pooled = features(model, "model") if {"linear", "knn"} & set(probes) else None
    if "linear" in probes:
        results.update(_model_probes(pooled, (y, yt), ids, concat, **common))
    results.update(_other_probes(model, probes, pooled, data, feat_kw, seed, attentive))
    if "linear" in probes and objective == "bert" and n_masks > 1:
        cache = (cache_dir, None if cache_key is None else f"{cache_key}|ensemble")
        lbfgs = {} if method == "sgd" or Cs is None else {"Cs": list(Cs)}
        results["bert_ensemble"] = _bert_ensemble(model, data, results, feat_kw, n_masks,
                                                  seed, cache, lbfgs)  # fmt: skip
    if "linear" in probes and baselines:
        results.update(_baselines(model, palette, (train, test), data, ids, features,
                                  low_data_baselines, **common, seed=seed))  # fmt: skip
    return results


def _bert_ensemble(model, data, results, feat_kw, n_masks, seed, cache, lbfgs) -> dict:
    """``bert_ensemble_probe`` at the linear probe's best layer, for ``evaluate``."""
    (x, y), (xt, yt) = data
    return bert_ensemble_probe(
        model, x, y, xt, yt, layer=results["layers"]["best_layer"], n_masks=n_masks,
        seed=seed, batch_size=feat_kw["batch_size"], device=feat_kw["device"],
        cache_dir=cache[0], cache_key=cache[1], progress=feat_kw["progress"], **lbfgs,
    )  # fmt: skip


def _other_probes(model, probes, pooled, data, feat_kw, seed, attentive) -> dict:
    """``evaluate``'s k-NN probe (of the pooled features) and attentive probe (of the token
    features, ``attentive``: keywords of ``attentive_layers``) of every layer, as asked."""
    (x, y), (xt, yt) = data
    out, name = {}, "pretrained model"
    ids, progress, device = feat_kw["layers"], feat_kw["progress"], feat_kw["device"]
    if "knn" in probes:
        out["knn"] = knn_layers(
            pooled[0], y, pooled[1], yt, layer_ids=ids, seed=seed, progress=progress,
            name=name, device=device,
        )  # fmt: skip
    if "attentive" in probes:
        kw = {k: feat_kw[k] for k in ("layers", "batch_size", "bert_mask_seed", "device")}
        out["attentive"] = attentive_layers(
            model, x, y, xt, yt, **kw, progress=progress, name=name, seed=seed,
            **(attentive or {}),
        )  # fmt: skip
    return out


def check_probes(probes) -> list[str]:
    """``probes`` as a list of names from ``PROBES`` (a comma-separated string is split);
    a ValueError names an unknown one or an empty list."""
    names = probes.split(",") if isinstance(probes, str) else list(probes)
    names = [str(p).strip() for p in names if str(p).strip()]
    bad = [p for p in names if p not in PROBES]
    if bad or not names:
        raise ValueError(f"probes must be some of {list(PROBES)}, got {probes!r}")
    return list(dict.fromkeys(names))


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


def as_split(split):
    """``split`` as ``evaluate`` reads it: ``ImageData`` or ``TokenSplit`` as they are, a
    ``(tokens, labels)`` pair as a ``TokenSplit``; a TypeError for anything else."""
    if isinstance(split, TokenSplit) or hasattr(split, "images"):
        return split
    if isinstance(split, tuple) and len(split) == 2:
        return TokenSplit(*split)
    raise TypeError(
        f"a split must be igpt.data.ImageData, igpt.evaluation.TokenSplit or a (tokens, labels) "
        f"pair, got {type(split).__name__}"
    )


def split_tokens(split, palette, n_px: int):
    """The tokens of a split: a ``TokenSplit``'s own (checked, not converted), or the
    images tokenised at ``n_px``."""
    if not isinstance(split, TokenSplit):
        from igpt.data import tokenize

        return tokenize(split.images, palette, n_px)
    tokens = token_rows(split.tokens, "tokens", shape_hint="(N, n_px * n_px)")
    if tokens.shape[1] != n_px * n_px:
        raise ValueError(
            f"tokens must have n_px * n_px = {n_px * n_px} per image (the model's n_px "
            f"{n_px}), got {tokens.shape[1]}"
        )
    return tokens


def _tokens_and_labels(train, test, palette, n_px: int):
    """((tokens, int64 labels) of train, the same of test) for ``evaluate``."""
    out = []
    for name, split in (("train", train), ("test", test)):
        tokens = split_tokens(split, palette, n_px)
        out.append((tokens, as_labels(split.labels, len(tokens), f"{name} labels")))
    return out


def raw_pixels(split, tokens, palette, n_px: int):
    """The raw-pixel baseline's features of a split and what they saw: the images resized
    to ``n_px``, or, for a ``TokenSplit``, the palette colours of its tokens (a block of
    rows at a time: the features are the only whole-split copy)."""
    if not isinstance(split, TokenSplit):
        from igpt.data import resize

        return raw_pixel_features(resize(split.images, n_px)), f"images at n_px {n_px}"
    parts = [
        raw_pixel_features(long_rows(tokens[s : s + RAW_BATCH]), palette=palette)
        for s in range(0, len(tokens), RAW_BATCH)
    ]
    return torch.cat(parts), f"palette colours at n_px {n_px}"


def _baselines(model, palette, splits, data, ids, features, low_data, *, method, progress,
               seed, kw, low):  # fmt: skip
    """``evaluate``'s baselines: raw pixels at the model's n_px, and a randomly initialised
    model of the same size, probed alike (and, with ``low_data``, their low-data probes)."""
    n_px = model.config.n_px
    (x, y), (xt, yt) = data
    (raw_x, pixels), (raw_xt, _) = (
        raw_pixels(s, t, palette, n_px) for s, t in zip(splits, (x, xt), strict=True)
    )
    raw = [raw_x, raw_xt]
    fit = linear_probe if method == "lbfgs" else sgd_probe
    out = {"raw_pixels": {**fit(raw[0], y, raw[1], yt, **kw), "pixels": pixels}}
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
