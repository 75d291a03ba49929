"""The generative objectives (paper sec. 2.2), their masks and their loss, in one place.

On palette tokens x (B, n):

    AR    L = -mean_i log p(x_i | x_<i)             (SOS prepended inside the model)
    BERT  L = -mean_{i in M} log p(x_i | x_[not M])  M: each position masked with p = 0.15

    mask = bert_mask((B, n), 0.15, seed=(run_seed, step))  # the same on any device
    loss = generative_loss(model(tokens, bert_mask=mask), tokens, mask)

A BERT mask is named by a seed (an int or a tuple of ints): row block b (``MASK_BLOCK``
rows) is drawn on the CPU from a generator seeded by ``seed_of(*seed, b)``. So a mask
depends only on (seed, shape), never on the device, the batch size a caller reads it in,
or what was drawn before; pre-training, fine-tuning and probing all draw it this way.
A checkpoint records its model's objective under ``objective``; ``objective_of`` reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igpt._rng import seed_of

OBJECTIVES = ("ar", "bert")
MASK_PROB = 0.15  # sec. 2.2
MASK_BLOCK = 4096  # mask rows drawn from one generator


def check_objective(objective, name: str = "objective") -> str:
    """``objective`` itself if it is "ar" or "bert", else a ValueError naming ``name``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{name} must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def _check_prob(p) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask probability must lie in [0, 1], got {p!r}")
    return float(p)


class MaskRows:
    """Rows [start, stop) of the BERT mask of an (N, n) array, drawn lazily block by block.

    ``MaskRows(shape, p, seed=s)(a, b)`` equals ``bert_mask(shape, p, seed=s)[a:b]`` without
    ever holding all N rows; the last two blocks drawn are kept.
    """

    def __init__(self, shape, p: float = MASK_PROB, *, seed):
        self.N, self.n = (int(v) for v in shape)
        self.p = _check_prob(p)
        self.key = (int(seed),) if isinstance(seed, int) else tuple(int(s) for s in seed)
        self._blocks: dict[int, torch.Tensor] = {}

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._blocks:
            g = torch.Generator().manual_seed(seed_of(*self.key, b))
            rows = min(MASK_BLOCK, self.N - b * MASK_BLOCK)
            self._blocks = {k: v for k, v in self._blocks.items() if k == b - 1}
            self._blocks[b] = torch.rand((rows, self.n), generator=g) < self.p
        return self._blocks[b]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """bool (stop - start, n) on the CPU, True = masked."""
        stop = min(stop, self.N)
        parts = [
            self._block(b)[max(start - b * MASK_BLOCK, 0) : stop - b * MASK_BLOCK]
            for b in range(start // MASK_BLOCK, -(-stop // MASK_BLOCK))
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.n, dtype=torch.bool)


def bert_mask(shape, p: float = MASK_PROB, *, seed) -> torch.Tensor:
    """The BERT mask (N, n) named by ``seed``: bool on the CPU, True = masked.

    Each position is masked independently with probability ``p``; see the module docstring
    for how ``seed`` (an int or a tuple of ints) determines it.
    """
    return MaskRows(shape, p, seed=seed)(0, int(shape[0]))


def generative_loss(logits, tokens, mask=None, *, reduction: str = "mean") -> torch.Tensor:
    """L_GEN: cross-entropy over every position (AR, ``mask`` None) or the masked ones (BERT).

    logits (B, n, K), tokens int (B, n), mask bool (B, n). ``reduction`` "mean" is nats per
    scored token, "sum" the total. With nothing masked the loss is 0, still differentiable.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if mask is not None:
        if not mask.any():
            return logits.sum() * 0.0  # no generative signal in this batch
        logits, tokens = logits[mask], tokens[mask]
    # fp32 log-softmax whatever the autocast dtype: bf16 loses ~3 digits of the loss
    logits = logits.float().flatten(0, -2)
    return F.cross_entropy(logits, tokens.flatten(), reduction=reduction)


def ar_loss(model, tokens: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Autoregressive cross-entropy of ``model`` on tokens int (B, n), nats per token.

    The model prepends SOS, so logits[:, i] predicts tokens[:, i].
    """
    return generative_loss(model(tokens), tokens, reduction=reduction)


def bert_loss(
    model,
    tokens: torch.Tensor,
    mask_prob: float = MASK_PROB,
    *,
    seed=0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """BERT cross-entropy on the masked positions only (nats per masked token).

    ``mask`` (bool (B, n), True = masked) defaults to ``bert_mask(tokens.shape, mask_prob,
    seed=seed)``.
    """
    if mask is None:
        mask = bert_mask(tokens.shape, mask_prob, seed=seed).to(tokens.device)
    return generative_loss(model(tokens, bert_mask=mask), tokens, mask, reduction=reduction)


def objective_of(ckpt: dict, default: str = "ar") -> str:
    """The generative objective ("ar" or "bert") a checkpoint's model was trained with.

    Checkpoints record it as ``objective``; fine-tuning checkpoints written before that key
    was the only one kept it under ``finetune``. Checkpoints without either: ``default``.
    """
    return ckpt.get("objective") or ckpt.get("finetune", {}).get("objective") or default
