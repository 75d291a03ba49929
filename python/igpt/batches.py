"""Training batches as a pure function of (seed, step), for pre-training and fine-tuning.

    source = TokenSource(tokens)                      # or ImageSource(images, palette, ...)
    batches = GlobalBatches(source, train_idx, batch_size=64, seed=0)
    x = batches.tokens(step, slice(0, 32))            # rows 0..31 of step's global batch
    m = batches.mask(step, n=64, mask_prob=0.15)       # its BERT mask (B, n)

The global batch of step s is a consecutive slice of a fresh permutation of ``train_idx``
per epoch, so an epoch visits every image once, a resumed run sees what an uninterrupted
one would, and K processes that each take rows rank::K see the batch one process would.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from igpt._rng import seed_of
from igpt.objectives import bert_mask


class TokenSource:
    """Rows of pre-tokenised images: an integer (N, n) array (e.g. a uint16 memmap).

    Args:
        tokens: the rows, converted to int64 a batch at a time.
        augment: None, or ``augment(tokens, *, rng) -> tokens`` applied to each training
            batch (int64 numpy (B, n)) with one generator per batch, drawn as
            ``ImageSource(per_row=False)`` draws it (e.g. a ``pad_crop_flip_tokens``
            partial: the batches of the same augmentation on the images, tokenised).
    """

    def __init__(self, tokens, augment: Callable | None = None):
        self.tokens, self.augment = tokens, augment

    def __len__(self) -> int:
        return len(self.tokens)

    def plain(self, idx) -> torch.Tensor:
        """int64 tokens (len(idx), n) of rows ``idx``."""
        return torch.from_numpy(np.asarray(self.tokens[idx]).astype(np.int64))

    def take(self, idx, key: tuple[int, ...], first_row: int) -> torch.Tensor:
        """The training tokens of rows ``idx``: ``plain``, augmented when there is ``augment``."""
        x = self.plain(idx)
        if self.augment is None:
            return x
        out = self.augment(x.numpy(), rng=augment_rng(key, first_row))
        return torch.from_numpy(np.asarray(out, np.int64))


def augment_rng(key: tuple[int, ...], row: int) -> np.random.Generator:
    """The generator of the augmentation of the batch ``key`` (seed, step) from ``row`` on."""
    return np.random.default_rng(seed_of(*key, row, 3))


class ImageSource:
    """Images tokenised per batch after a random augmentation.

    Args:
        images: uint8 (N, H, W, 3), or a lazy ``igpt.imagesets.ImageSet`` (``images[idx]``
            reads only rows ``idx``: a batch at a time, never the whole split).
        palette: an ``igpt.palette.Palette``; n_px: the side the tokens are made at.
        augment: ``augment(images, *, rng) -> images`` (``igpt.data.pad_crop_flip``,
            a ``random_resized_crop`` partial ...).
        per_row: True draws each row's augmentation from its own generator, seeded by
            its row in the global batch, so K processes crop as one does; False draws the
            whole batch from one generator in one call.
    """

    def __init__(self, images, palette, n_px: int, augment: Callable, *, per_row: bool = True):
        self.images, self.palette, self.n_px = images, palette, n_px
        self.augment, self.per_row = augment, per_row

    def __len__(self) -> int:
        return len(self.images)

    def plain(self, idx) -> torch.Tensor:
        """int64 tokens of rows ``idx`` without augmentation (validation)."""
        from igpt.data import tokenize

        return tokenize(self.images[idx], self.palette, self.n_px)

    def take(self, idx, key: tuple[int, ...], first_row: int) -> torch.Tensor:
        """int64 tokens of rows ``idx`` augmented with generators seeded by ``key``."""
        from igpt.data import tokenize

        batch = self.images[np.asarray(idx)]  # the batch's rows only, read once
        if self.per_row:
            parts = [
                self.augment(batch[j : j + 1], rng=augment_rng(key, first_row + j))
                for j in range(len(batch))
            ]
            images = np.concatenate(parts)
        else:
            images = self.augment(batch, rng=augment_rng(key, first_row))
        return tokenize(images, self.palette, self.n_px)


class GlobalBatches:
    """The global batch of every step: its data indices, tokens and BERT mask.

    Args:
        source: a ``TokenSource`` or ``ImageSource``.
        train_idx: int (N,) rows of ``source`` to train on.
        batch_size: the global batch (all processes, all micro-steps).
        seed: the run's seed.
    """

    def __init__(self, source, train_idx, batch_size: int, *, seed: int):
        self.source, self.train_idx = source, np.asarray(train_idx, dtype=np.int64)
        self.batch_size, self.seed = int(batch_size), int(seed)
        if len(self.train_idx) == 0:
            raise ValueError("train_idx is empty: there is nothing to train on")
        self._perm = (None, None)  # (epoch, permutation): batches walk epochs in order

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed_of(self.seed, epoch, 1))
            self._perm = (epoch, torch.randperm(len(self.train_idx), generator=g).numpy())
        return self._perm[1]

    def indices(self, step: int) -> np.ndarray:
        """Data indices (batch_size,) of the global batch of ``step``."""
        B, N = self.batch_size, len(self.train_idx)
        pos = np.arange(step * B, (step + 1) * B, dtype=np.int64)
        out = np.empty(B, np.int64)
        for epoch in np.unique(pos // N):
            sel = pos // N == epoch
            out[sel] = self._epoch_perm(int(epoch))[pos[sel] % N]
        return self.train_idx[out]

    def tokens(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """int64 tokens (len(rows), n) of the global batch of ``step``, rows ``rows``."""
        idx = self.indices(step)[rows]
        return self.source.take(idx, (self.seed, step), rows.start or 0)

    def mask(self, step: int, n: int, mask_prob: float) -> torch.Tensor:
        """The BERT mask bool (batch_size, n) of the global batch of ``step``."""
        return bert_mask((self.batch_size, n), mask_prob, seed=(self.seed, step, 2))


class _StepRows(torch.utils.data.Dataset):
    """Item ``s``: rows ``rows`` of the global batch of step ``s`` (what a worker makes)."""

    def __init__(self, batches: GlobalBatches, rows: slice):
        self.batches, self.rows = batches, rows

    def __len__(self) -> int:
        return 2**62  # any step; the sampler says which, in order

    def __getitem__(self, step: int) -> torch.Tensor:
        return self.batches.tokens(int(step), self.rows)


class StepLoader:
    """One process's rows of every step's global batch, made ahead by a ``DataLoader``.

    ``get(step)`` gives ``batches.tokens(step, rows)``: the same tensor, bit for bit, made
    by ``workers`` processes ahead of the step (``prefetch`` steps each), pinned for a fast
    copy to the GPU when ``pin_memory``; the steps ``start``, ``start + 1`` ... are made in
    order, one pass whose workers live for the whole run. A step asked for out of that
    order (a step redone after running out of memory, a test's own) is made inline. With
    no workers and no pinning, every step is made inline, as without a loader.
    """

    def __init__(
        self,
        batches: GlobalBatches,
        rows: slice,
        *,
        start: int,
        stop: int,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int | None = None,
    ):
        self.batches, self.rows, self.next = batches, rows, start
        self._it = None
        if (workers > 0 or pin_memory) and stop > start:
            loader = torch.utils.data.DataLoader(
                _StepRows(batches, rows),
                batch_size=None,  # an item is already a batch
                sampler=range(start, stop),
                num_workers=workers,
                pin_memory=pin_memory,
                prefetch_factor=prefetch if workers > 0 else None,
                persistent_workers=False,  # one pass over every step: they live for the run
            )
            self._it = iter(loader)

    def get(self, step: int) -> torch.Tensor:
        """int64 tokens (rows, n): this process's rows of the global batch of ``step``."""
        if self._it is not None and step == self.next:
            self.next += 1
            return next(self._it)
        return self.batches.tokens(step, self.rows)

    def close(self) -> None:
        """Stop the workers (they also stop with the process)."""
        self._it = None
