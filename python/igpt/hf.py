"""Conversion between igpt.IGPT and transformers' ImageGPT models.

Both use GPT-2 parameter names. transformers stores its linear layers as ``Conv1D`` with
weights (in, out), the transpose of nn.Linear's (out, in); everything else maps one to one.
HF's ``wte`` has n_colors + 1 rows (the last is SOS, as here) and ``lm_head`` has n_colors.

    HF(input_ids=[SOS] + x[:-1]).logits == IGPT(x)       (to float error)

transformers is imported only inside these functions, so igpt does not need it otherwise.
"""

from __future__ import annotations

import logging
import math
import re

from igpt.config import IGPTConfig
from igpt.model import IGPT

log = logging.getLogger(__name__)

_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _config_from_hf(hf_config) -> IGPTConfig:
    n_px = math.isqrt(hf_config.n_positions)
    if n_px * n_px != hf_config.n_positions:
        raise ValueError(f"n_positions={hf_config.n_positions} is not a square image size")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"n_inner={hf_config.n_inner} is not supported; igpt uses 4 * n_embd")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False is not supported")
    if hf_config.activation_function not in ("quick_gelu", "gelu"):
        raise ValueError(
            f"activation_function={hf_config.activation_function!r} is not "
            "supported; igpt has 'quick_gelu' and 'gelu'"
        )
    return IGPTConfig(
        n_px=n_px,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        n_colors=hf_config.vocab_size - 1,
        norm="rms",
        activation=hf_config.activation_function,
        bias=True,
        eps=hf_config.layer_norm_epsilon,
    )


def _config_from_state_dict(sd, n_head) -> IGPTConfig:
    if n_head is None:
        raise ValueError(
            "a bare state dict does not record n_head; pass n_head=... or the HF model itself"
        )
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.search(r"h\.(\d+)\.", k)))
    vocab, n_embd = sd["wte.weight"].shape
    n_px = math.isqrt(sd["wpe.weight"].shape[0])
    return IGPTConfig(n_px=n_px, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_colors=vocab - 1)


def from_hf(model_or_state_dict, *, n_head: int | None = None) -> IGPT:
    """Build an IGPT from a transformers ImageGPT model or its state dict.

    Accepts ``ImageGPTForCausalImageModeling``, ``ImageGPTModel`` and
    ``ImageGPTForImageClassification`` (the latter two have no ``lm_head``: the returned
    head stays zero and a warning is logged), or a state dict of any of them together with
    ``n_head``. The result is in float32 on the CPU; move it with ``.to()``.
    """
    if isinstance(model_or_state_dict, dict):
        sd, config = dict(model_or_state_dict), None
    elif hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        sd, config = model_or_state_dict.state_dict(), model_or_state_dict.config
    else:
        raise TypeError(
            "model_or_state_dict must be a transformers ImageGPT model or a state "
            f"dict, got {type(model_or_state_dict).__name__}"
        )
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if "wte.weight" not in sd:
        raise ValueError("this does not look like an ImageGPT state dict: no 'wte.weight'")
    cfg = _config_from_hf(config) if config is not None else _config_from_state_dict(sd, n_head)
    model = IGPT(cfg)
    ours = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k.startswith("score."):
            continue  # HF's causal-mask buffers and its classification head
        if _CONV1D.search(k):
            v = v.t()
        ours[k if k == "lm_head.weight" else "transformer." + k] = v.float()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected:
        raise ValueError(f"unexpected ImageGPT weights: {unexpected}")
    if missing and missing != ["lm_head.weight"]:
        raise ValueError(f"ImageGPT weights missing: {missing}")
    if missing:
        log.warning("the ImageGPT model has no lm_head; the logit head is left at zero")
    return model


def to_hf(model: IGPT):
    """Convert an IGPT into a transformers ``ImageGPTForCausalImageModeling`` (float32, CPU).

    Needs norm="rms" and bias=True, the only layout transformers' ImageGPT has.
    """
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    cfg = model.config
    if cfg.norm != "rms" or not cfg.bias:
        raise ValueError(
            f"transformers' ImageGPT has RMS norms and biased linears; this model "
            f"has norm={cfg.norm!r}, bias={cfg.bias}"
        )
    hf_cfg = ImageGPTConfig(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function=cfg.activation,
        layer_norm_epsilon=cfg.eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = ImageGPTForCausalImageModeling(hf_cfg)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().float().cpu()
        name = k.removeprefix("transformer.")
        sd[k] = v.t().contiguous() if _CONV1D.search(name) else v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(
            f"weight names did not line up: missing {missing}, unexpected {unexpected}"
        )
    return hf.eval()
