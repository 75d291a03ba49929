"""The attentive probe (AIM-style): learned queries cross-attend over a layer's frozen tokens.

    feats = token_features(model, tokens, layers=[4])        # (N, 1, T, d) float16
    res = attentive_probe(feats[:, 0], y, test_feats[:, 0], y_test)
    res = attentive_layers(model, tokens, y, test_tokens, y_test, layers=None)   # every layer

A linear probe sees one vector per image, the mean of its tokens; the attentive probe sees
the tokens and learns where to look (El-Nouby et al. 2024, AIM: "attentive probing").
Its head (``AttentiveHead``): the frozen token features standardised per dimension,
keys and values by one linear map, a few learned queries (``n_queries``, default 1)
attending with ``n_heads`` heads, their outputs averaged, then a linear classifier; trained
with AdamW and a cosine schedule on the training rows minus a stratified hold-out, the
weights of the epoch best on the hold-out kept (the latest among ties; that accuracy ranks
the layers), then scored on the test set.

Memory. Per-token features are n_px^2 times the pooled ones (iGPT-S on CIFAR-10's 60,000
images: 60,000 x 1,024 x 512 floats, 126 GB per layer), so ``token_features`` keeps
n^l (the block's own normalised input, as the pooled features) averaged over a
``grid`` x ``grid`` grid of image patches (default 8: 64 tokens per image, each the mean of
its patch's tokens), in float16. ``attentive_layers`` extracts as many layers per pass over
the data as fit in ``max_bytes`` (default 4 GiB; iGPT-S on CIFAR-10 at grid 8: 3.7 GiB per
layer, one layer a pass), each pass stopping after its deepest layer, and refuses (naming
the sizes) when one layer alone does not fit.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt._checks import long_rows, token_rows
from igpt.features import resolve_layers
from igpt.model import IGPT
from igpt.objectives import MASK_PROB, MaskRows
from igpt.probe_inputs import as_features, as_labels, layer_verdict, scored, stratified_holdout

__all__ = [
    "AttentiveHead",
    "attentive_probe",
    "attentive_layers",
    "token_features",
    "token_feature_bytes",
    "DEFAULT_GRID",
    "DEFAULT_MAX_BYTES",
]

log = logging.getLogger(__name__)

DEFAULT_GRID = 8
DEFAULT_MAX_BYTES = 4 * 2**30


# ----------------------------------------------------------------------------- features


def _grid_tokens(n_tokens: int, grid: int | None) -> tuple[int, int]:
    """(n_px, side of the kept grid) for images of ``n_tokens`` tokens."""
    n_px = math.isqrt(n_tokens)
    if n_px * n_px != n_tokens:
        raise ValueError(f"tokens must hold n_px * n_px per image, got {n_tokens}")
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
        raise ValueError(f"grid must be a positive int or None (every token), got {grid!r}")
    return n_px, n_px if grid is None else min(grid, n_px)


def token_feature_bytes(n_images: int, n_layers: int, n_tokens: int, d: int, grid) -> int:
    """Bytes ``token_features`` holds for these sizes (float16)."""
    _, side = _grid_tokens(n_tokens, grid)
    return n_images * n_layers * side * side * d * 2


def _pool_grid(n: torch.Tensor, n_px: int, side: int) -> torch.Tensor:
    """(B, n_px^2, d) raster tokens -> (B, side^2, d): the mean of each patch."""
    if side == n_px:
        return n
    B, _, d = n.shape
    img = n.float().transpose(1, 2).reshape(B, d, n_px, n_px)  # (B, d, n_px, n_px)
    return F.adaptive_avg_pool2d(img, side).flatten(2).transpose(1, 2)  # (B, side^2, d)


def _token_pass(model: IGPT, x, mask, layer_ids: list[int], n_px: int, side: int):
    """n^l of ``layer_ids`` for one batch, pooled to the grid: (B, len(layer_ids), T, d)."""
    L = model.config.n_layer
    want, stop = set(layer_ids), max(layer_ids)
    h = model.embed(x, mask)  # (B, n, d)
    got = {}
    for i, block in enumerate(model.transformer.h):
        if i in want:
            got[i] = _pool_grid(block.ln_1(h), n_px, side)
        if i == stop:
            break
        h = block(h, mask is None)
    if L in want:
        got[L] = _pool_grid(model.transformer.ln_f(h), n_px, side)
    return torch.stack([got[i] for i in layer_ids], dim=1)


@torch.no_grad()
def token_features(
    model: IGPT,
    tokens,
    *,
    layers: Sequence[int] | None = None,
    grid: int | None = DEFAULT_GRID,
    batch_size: int = 64,
    bert_mask_seed: int | None = None,
    bert_mask_prob: float = MASK_PROB,
    device=None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token features of some layers, averaged over a grid of image patches, in float16.

    Args:
        model: an ``IGPT`` (put in eval mode for the pass, and restored after).
        tokens: integer (N, n_px^2) tensor or numpy array (a memmap is read a batch at a time).
        layers: which n^l to keep (ints, negative counting from L; None: all). The pass stops
            after the deepest one.
        grid: keep ``grid`` x ``grid`` tokens per image, each the mean of its patch (None: all
            n_px^2 tokens); a grid larger than n_px keeps them all.
        batch_size, device, progress: as in ``igpt.features.extract_features``.
        bert_mask_seed, bert_mask_prob: None runs the AR input; an int the BERT input with
            ``extract_features``'s mask for that seed.

    Returns:
        float16 CPU tensor (N, len(layers), T, d), T = min(grid, n_px)^2; for layer l < L
        the tokens of ln_1 of block l's input, for L those of ln_f (the pooled features of
        ``extract_features`` are their means over all n_px^2 tokens).
    """
    if not isinstance(model, IGPT):
        raise TypeError(f"model must be an igpt.IGPT, got {type(model).__name__}")
    tokens = token_rows(tokens, "tokens", shape_hint="(N, n_px * n_px)")
    ids = resolve_layers(layers, model.config.n_layer)
    N, n = tokens.shape
    n_px, side = _grid_tokens(n, grid)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    mask = (
        MaskRows((N, n), bert_mask_prob, seed=bert_mask_seed)
        if bert_mask_seed is not None
        else None
    )
    out = torch.empty(N, len(ids), side * side, model.config.n_embd, dtype=torch.float16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, N, batch_size), "token features", disable=not progress):
            x = long_rows(tokens[s : s + batch_size]).to(device)
            m = mask(s, s + batch_size).to(device) if mask is not None else None
            with autocast:
                out[s : s + batch_size] = _token_pass(model, x, m, ids, n_px, side).cpu()
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the probe


class AttentiveHead(nn.Module):
    """Learned queries cross-attending over standardised tokens, then a linear classifier.

    x (B, T, d) -> logits (B, n_classes); ``n_heads`` must divide d. The tokens are
    standardised per dimension with ``mean``/``std`` (buffers, from the training rows, as the
    linear probe's features are), keys and values are one linear map ``kv`` (d -> 2d), the
    queries' outputs are averaged. Computed in the cheaper order: the key map folded into the
    queries (q . W_k x_t = (W_k^T q) . x_t; its bias is the same for every token, so the
    softmax drops it) and the value map applied after the weighted sum (W_v sum_t a_t x_t),
    the same head for O(T d) work per image and head instead of O(T d^2). Zero-initialised
    queries attend uniformly, so training starts from a linear probe of the mean token.
    """

    def __init__(self, d: int, n_classes: int, *, n_queries: int = 1, n_heads: int = 4):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"n_heads must divide the feature width {d}, got {n_heads}")
        self.n_heads = n_heads
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.query = nn.Parameter(torch.zeros(n_queries, d))
        self.kv = nn.Linear(d, 2 * d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        H, Q = self.n_heads, len(self.query)
        hd = d // H
        x = (x - self.mean) / self.std
        w_k, w_v = self.kv.weight.view(2, H, hd, d).unbind(0)  # (H, hd, d) each
        b_v = self.kv.bias.view(2, H, hd)[1]  # (H, hd)
        u = torch.einsum("qhe,hed->qhd", self.query.view(Q, H, hd), w_k)  # (Q, H, d)
        att = torch.einsum("btd,qhd->bqht", x, u).div(math.sqrt(hd)).softmax(-1)  # (B,Q,H,T)
        z = torch.einsum("bqht,btd->bqhd", att, x)  # (B, Q, H, d): weighted sums of tokens
        o = torch.einsum("bqhd,hed->bqhe", z, w_v) + b_v  # (B, Q, H, hd)
        return self.head(o.reshape(B, Q, d).mean(1))


def _heads(d: int, n_heads: int | None) -> int:
    return n_heads if n_heads is not None else next(h for h in (8, 4, 2, 1) if d % h == 0)


@torch.no_grad()
def _predict(head: nn.Module, x: torch.Tensor, device, batch_size: int) -> np.ndarray:
    head.eval()
    out = [
        head(x[s : s + batch_size].to(device).float()).argmax(1).cpu()
        for s in range(0, len(x), batch_size)
    ]
    head.train()
    return torch.cat(out).numpy()


def _train(head, opt, x, y, split, epochs, batch_size, seed) -> dict:
    """Train ``head`` on rows ``fit`` for ``epochs`` under a cosine schedule; returns the
    epoch best on rows ``val`` (the latest among ties), its accuracy and weights."""
    (fit, val), device = split, next(head.parameters()).device
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, epochs * math.ceil(len(fit) / batch_size)
    )
    ys = torch.as_tensor(y)
    best = {"val_acc": -1.0}
    for epoch in range(1, epochs + 1):
        for b in torch.as_tensor(fit)[torch.randperm(len(fit), generator=g)].split(batch_size):
            loss = F.cross_entropy(head(x[b].to(device).float()), ys[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = float((_predict(head, x[val], device, 1024) == y[val]).mean())
        if acc >= best["val_acc"]:  # the latest among ties: the most trained
            best = {"epoch": epoch, "val_acc": acc, "state": copy.deepcopy(head.state_dict())}
    return best


def attentive_probe(
    train_feats,
    train_labels,
    test_feats=None,
    test_labels=None,
    *,
    n_queries: int = 1,
    n_heads: int | None = None,
    epochs: int = 20,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    batch_size: int = 128,
    min_steps: int = 300,
    val_frac: float = 0.1,
    seed: int = 0,
    device=None,
) -> dict:
    """The attentive probe of one layer's token features (``AttentiveHead``, AdamW).

    Args:
        train_feats: float (N, T, d) tensor or array (e.g. ``token_features(...)[:, j]``);
            train_labels: integer (N,).
        test_feats, test_labels: (M, T, d) and (M,), or None to skip the test score.
        n_queries, n_heads: the head's learned queries and attention heads (default: the
            most of 8, 4, 2, 1 that divides d).
        epochs, lr, weight_decay, batch_size: AdamW with a cosine schedule to 0, over
            ``epochs`` passes of the fitting rows, more if that is under ``min_steps`` steps
            (small sets are not under-trained).
        val_frac: the stratified hold-out that picks the epoch kept (and ranks layers).
        seed: the hold-out, the head's initial weights and the batch order.
        device: where to train (default: cuda when available).

    Returns:
        dict with ``epoch`` (the one kept, 1-based), ``val_acc``, ``test_acc`` (None without
        a test set), ``train_acc``, ``n_train``, ``n_test``, ``n_classes`` and ``classifier``
        (feats -> labels).
    """
    x = torch.as_tensor(as_features(train_feats, "train_feats", ndim=3))
    y = as_labels(train_labels, len(x), "train_labels")
    if len(np.unique(y)) < 2:
        raise ValueError(f"train_labels must hold at least two classes, got {np.unique(y)}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("n_queries", n_queries)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_classes = int(y.max()) + 1
    fit, val = stratified_holdout(y, val_frac, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AttentiveHead(
            x.shape[2], n_classes, n_queries=n_queries, n_heads=_heads(x.shape[2], n_heads)
        )
    fit_x = x[torch.as_tensor(fit)].flatten(0, 1).float()  # (n_fit * T, d)
    head.mean.copy_(fit_x.mean(0))
    head.std.copy_(fit_x.std(0).clamp_min(1e-6))
    del fit_x
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(fit) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / per_epoch))
    best = _train(head.to(device), opt, x, y, (fit, val), epochs, batch_size, seed)
    head.load_state_dict(best.pop("state"))

    def classify(feats):
        f = torch.as_tensor(as_features(feats, "feats", ndim=3))
        return _predict(head, f, device, 1024)

    result = {**best, "n_classes": n_classes, "classifier": classify}
    return scored(result, classify, x, y, test_feats, test_labels)


def attentive_layers(
    model: IGPT,
    train_tokens,
    train_labels,
    test_tokens,
    test_labels,
    *,
    layers: Sequence[int] | None = None,
    grid: int | None = DEFAULT_GRID,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_size: int = 64,
    bert_mask_seed: int | None = None,
    device=None,
    progress: bool = True,
    name: str = "features",
    **probe_kw,
) -> dict:
    """``attentive_probe`` of every layer in ``layers`` (default all) of ``model``, with the
    token features of both splits held for as many layers at a time as fit in ``max_bytes``.

    Returns:
        dict with ``rows`` (one {layer, val_acc, test_acc, epoch} per layer), ``best_layer``
        (by hold-out accuracy), ``best``, ``grid`` (the side of the kept grid) and
        ``tokens`` (tokens per image the probe saw).
    """
    ids = resolve_layers(layers, model.config.n_layer)
    n, d = token_rows(train_tokens, "train_tokens").shape[1], model.config.n_embd
    n_images = len(train_tokens) + len(test_tokens)
    per_layer = token_feature_bytes(n_images, 1, n, d, grid)
    if per_layer > max_bytes:
        raise ValueError(
            f"the token features of one layer take {per_layer / 2**30:.2f} GiB for "
            f"{n_images} images at grid {grid}, over max_bytes {max_bytes / 2**30:.2f} GiB; "
            "raise max_bytes, lower grid or probe fewer images"
        )
    per_pass = max(1, max_bytes // per_layer)
    feat_kw = dict(
        grid=grid,
        batch_size=batch_size,
        bert_mask_seed=bert_mask_seed,
        device=device,
        progress=progress,
    )
    rows = []
    for s in range(0, len(ids), per_pass):
        group = ids[s : s + per_pass]
        f = token_features(model, train_tokens, layers=group, **feat_kw)
        ft = token_features(model, test_tokens, layers=group, **feat_kw)
        for j, layer in enumerate(group):
            r = attentive_probe(
                f[:, j], train_labels, ft[:, j], test_labels, device=device, **probe_kw
            )
            rows.append(
                {
                    "layer": layer,
                    "val_acc": r["val_acc"],
                    "test_acc": r["test_acc"],
                    "epoch": r["epoch"],
                }
            )
            log.info(
                "%s, attentive, layer %d: val %.4f test %.4f (epoch %d)",
                name,
                layer,
                r["val_acc"],
                r["test_acc"],
                r["epoch"],
            )
        del f, ft
    side = _grid_tokens(n, grid)[1]
    return {**layer_verdict(rows), "grid": side, "tokens": side * side}
