"""Input checks shared by the model and the training layer: one place for each kind."""

from __future__ import annotations

import numpy as np
import torch

from igpt_kernels.reference import readable


def _describe(x) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}"
    return type(x).__name__


def check_tokens(
    tokens,
    name: str = "tokens",
    *,
    dims: tuple[int, ...] = (2,),
    shape_hint: str = "(B, n)",
    n_colors: int | None = None,
) -> torch.Tensor:
    """``tokens`` as an integer torch tensor, or a TypeError/ValueError naming ``name``.

    Accepts torch tensors and numpy arrays of any integer dtype (numpy's unsigned types
    wider than uint8, e.g. igpt.data's uint16 token cache, become int64, which torch can
    index with). ``dims`` lists the allowed numbers of dimensions. With ``n_colors`` the
    values must lie in [0, n_colors): that reads the tensor's min and max, a host sync on a
    GPU, so hot paths leave it out and check where tokens are made.
    """
    if isinstance(tokens, np.ndarray):
        if tokens.dtype.kind == "u" and tokens.dtype != np.uint8:
            tokens = tokens.astype(np.int64)
        if tokens.dtype.kind in "iu":
            tokens = torch.from_numpy(np.ascontiguousarray(tokens))
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dtype.is_floating_point
        or tokens.dtype.is_complex
        or tokens.dtype == torch.bool
        or tokens.dim() not in dims
    ):
        raise TypeError(f"{name} must be an integer tensor {shape_hint}, got {_describe(tokens)}")
    if tokens.dtype in (torch.uint16, torch.uint32, torch.uint64):
        tokens = tokens.long()  # torch cannot index or compare every op with these
    if n_colors is not None and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= n_colors:
            raise ValueError(
                f"{name} must hold palette ids in [0, n_colors={n_colors}), got values in "
                f"[{lo}, {hi}]"
            )
    return tokens


def token_rows(tokens, name: str = "tokens", *, shape_hint: str = "(N, n)"):
    """``tokens`` checked as an integer (N, n) array whose rows are read a batch at a time.

    A numpy integer array (e.g. igpt.data's uint16 token cache, a memmap) comes back as it
    is, so that a split of any size is never converted to int64 at once: ``long_rows`` turns
    each batch. Anything else goes through ``check_tokens`` (a torch tensor)."""
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind in "iu":
        if tokens.ndim != 2:
            raise TypeError(
                f"{name} must be an integer tensor {shape_hint}, got {_describe(tokens)}"
            )
        return tokens
    return check_tokens(tokens, name, shape_hint=shape_hint)


def long_rows(rows) -> torch.Tensor:
    """A batch of rows of ``token_rows`` (numpy or torch) as an int64 torch tensor."""
    if isinstance(rows, np.ndarray):
        return torch.from_numpy(rows.astype(np.int64))
    return rows.long()


def check_bert_mask(bert_mask, shape: tuple[int, ...]) -> None:
    """A TypeError/ValueError unless ``bert_mask`` is a bool tensor of the tokens' ``shape``."""
    if not isinstance(bert_mask, torch.Tensor) or bert_mask.dtype != torch.bool:
        raise TypeError(
            f"bert_mask must be a bool tensor (B, n), True = masked, got {_describe(bert_mask)}"
        )
    if bert_mask.shape != shape:
        raise ValueError(
            f"bert_mask must have tokens' shape {tuple(shape)}, got {tuple(bert_mask.shape)}"
        )


def check_inputs(tokens, bert_mask, config) -> torch.Tensor:
    """``IGPT.forward``'s inputs checked against ``config``; returns ``tokens`` (B, n).

    Any integer dtype is taken (and widened to int64). Shapes and dtypes always; the value
    range only for CPU tensors outside ``torch.compile``: it needs the values, which is a
    host sync on a GPU and a graph break when compiled, so the training layer checks tokens
    where it makes them (igpt.data).
    """
    tokens = check_tokens(tokens)
    if tokens.dtype != torch.long:  # uint8, int16, int32, ...: the embedding takes int64
        tokens = tokens.long()
    if not 1 <= tokens.shape[1] <= config.n_positions:
        raise ValueError(
            f"tokens must have 1 <= n <= n_px^2 = {config.n_positions} positions, "
            f"got {tokens.shape[1]}"
        )
    if tokens.device.type == "cpu" and readable(tokens):
        check_tokens(tokens, n_colors=config.n_colors)
    if bert_mask is not None:
        check_bert_mask(bert_mask, tokens.shape)
    return tokens


def nonfinite_parameters(model) -> list[str]:
    """Names of ``model``'s parameters holding a NaN or an infinity (one host sync)."""
    named = list(model.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def check_finite_weights(model, source: str = "the model") -> None:
    """A ValueError naming ``source`` and its non-finite weights, if it has any."""
    bad = nonfinite_parameters(model)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"{source} has non-finite weights (NaN or inf in {', '.join(bad[:3])}{more}), so it "
            "cannot give probabilities to sample from; use an earlier checkpoint of the run"
        )
