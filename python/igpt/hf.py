"""igpt and transformers' ImageGPT: live models converted both ways, classifiers included.

The format itself (config mapping, weight names and the Conv1D layout, reading and writing
directories) is ``igpt.hf_format``; this module builds models from it:

    HF(input_ids=[SOS] + x[:-1]).logits == IGPT(x)       (to float error)

Classifiers: ``ImageGPTForImageClassification`` mean-pools the final norm's output over every
position and applies a bias-free ``score`` Linear; ``igpt.classifier.IGPTClassifier`` with
the default ``layer`` pools the same n^L = ln_f(h^L) over the same positions, so with the
same [SOS] + x[:-1] input convention the logits agree. HF pools padded positions too (its
``attention_mask`` does not reach the pooling); igpt has no padding, so the two agree for
inputs without an attention mask (or an all-ones one). HF's head has no bias: ``from_hf``
gives a head whose bias is zero and frozen (``requires_grad=False``), and ``to_hf`` refuses
a head with a non-zero bias, which HF could not represent.

Directories in transformers' layout (``save_pretrained`` / ``from_pretrained``):

    config.json                  what ``transformers.ImageGPTConfig`` reads
    model.safetensors            HF's parameter names and Conv1D layout
    preprocessor_config.json     the palette as ``ImageGPTImageProcessor.clusters``

``load_any`` reads any model igpt can (checkpoint, run directory, transformers directory);
``load_classifier`` any classifier. ``apply_igpt_kernels_to_imagegpt`` (``igpt.hf_patch``)
runs transformers' own ImageGPT on igpt's kernels instead. transformers is imported only
inside the functions that need it, so igpt does not need it otherwise; a local directory is
read and written without it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from igpt import hf_format
from igpt.checkpoint import load_any
from igpt.classifier import IGPTClassifier
from igpt.classifier import load_classifier as load_classifier_checkpoint
from igpt.hf_format import HF_CONFIG_DEFAULTS, hf_config_dict, is_pretrained_dir
from igpt.hf_patch import (
    apply_igpt_kernels_to_imagegpt,
    igpt_kernels_for_imagegpt,
    revert_igpt_kernels_to_imagegpt,
)
from igpt.model import IGPT
from igpt.palette import Palette, load_palette, save_palette

log = logging.getLogger(__name__)

__all__ = [
    "HF_CONFIG_DEFAULTS",
    "from_hf",
    "to_hf",
    "hf_state_dict",
    "hf_config_dict",
    "from_pretrained",
    "save_pretrained",
    "is_pretrained_dir",
    "load_any",
    "load_classifier",
    "load_palette",
    "save_palette",
    "apply_igpt_kernels_to_imagegpt",
    "revert_igpt_kernels_to_imagegpt",
    "igpt_kernels_for_imagegpt",
]


# ----------------------------------------------------------------------------- models


def from_hf(model_or_state_dict, *, n_head: int | None = None):
    """Build igpt's model from a transformers ImageGPT model or its state dict.

    ``ImageGPTForCausalImageModeling`` and ``ImageGPTModel`` give an ``IGPT`` (the latter
    has no ``lm_head``: the returned head stays zero and a warning is logged);
    ``ImageGPTForImageClassification`` (or a state dict with ``score.weight``) gives an
    ``igpt.classifier.IGPTClassifier`` with HF's ``score`` as its ``head`` (bias zero and
    frozen, as HF's head has none) and a zero ``lm_head``. A state dict needs ``n_head``.
    The result is in float32 on the CPU; move it with ``.to()``.
    """
    if isinstance(model_or_state_dict, dict):
        sd, hf_config = dict(model_or_state_dict), None
    elif hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        sd, hf_config = model_or_state_dict.state_dict(), model_or_state_dict.config
    else:
        raise TypeError(
            "model_or_state_dict must be a transformers ImageGPT model or a state "
            f"dict, got {type(model_or_state_dict).__name__}"
        )
    ours, score = hf_format.split_hf_state_dict(sd)
    if hf_config is not None:
        config = hf_format.config_from_hf(hf_config)
    else:
        bare = {k.removeprefix("transformer."): v for k, v in ours.items()}
        config = hf_format.config_from_state_dict(bare, n_head)
    return _build(config, ours, score)


def _build(config, ours: dict, score: torch.Tensor | None):
    """The IGPT (or, with HF's ``score`` weight, the IGPTClassifier) holding ``ours``."""
    model = hf_format.load_converted(IGPT(config), ours, score=score)
    return model if score is None else IGPTClassifier.from_hf_score(model, score)


def hf_state_dict(model_or_classifier) -> tuple[dict, dict]:
    """``(state_dict, config.json dict)`` of an IGPT or IGPTClassifier in transformers'
    names and Conv1D layout (detached CPU tensors, contiguous, the model's dtype)."""
    clf = model_or_classifier if isinstance(model_or_classifier, IGPTClassifier) else None
    model = clf.model if clf is not None else model_or_classifier
    if not isinstance(model, IGPT):
        raise TypeError(
            f"expected an igpt.IGPT or IGPTClassifier, got {type(model_or_classifier).__name__}"
        )
    if clf is not None:
        _check_exportable(clf)
    hf_dict = hf_config_dict(model.config, None if clf is None else clf.n_classes)
    sd = hf_format.to_hf_layout(model.state_dict(), drop_lm_head=clf is not None)
    if clf is not None:
        sd["score.weight"] = clf.head.weight.detach().cpu().contiguous()
    return sd, hf_dict


def _check_exportable(clf: IGPTClassifier) -> None:
    """Refuse a classifier transformers' ImageGPTForImageClassification cannot hold."""
    L = clf.model.config.n_layer
    if clf.layer != L:
        raise ValueError(
            f"HF's classifier pools the final norm's output (layer {L}); "
            f"this classifier reads layer {clf.layer}"
        )
    bias = clf.head.bias
    if bias is not None and torch.count_nonzero(bias):
        raise ValueError(
            "transformers' ImageGPTForImageClassification has a bias-free score head; this "
            f"classifier's head has a non-zero bias (max |b| = {bias.abs().max():.3g}). "
            "Fine-tune with the bias frozen at zero (head.bias.requires_grad_(False))"
        )


def to_hf(model_or_classifier):
    """Convert to transformers (float32, CPU, eval mode): an ``IGPT`` into
    ``ImageGPTForCausalImageModeling``, an ``IGPTClassifier`` (default ``layer``, zero head
    bias) into ``ImageGPTForImageClassification``. Needs norm="rms" and bias=True, the only
    layout transformers' ImageGPT has."""
    import transformers

    sd, hf_dict = hf_state_dict(model_or_classifier)
    hf_cfg = transformers.ImageGPTConfig.from_dict(hf_dict)
    hf = getattr(transformers, hf_dict["architectures"][0])(hf_cfg)
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith(hf_format.HF_BUFFERS)]
    if missing or unexpected:
        raise RuntimeError(
            f"weight names did not line up: missing {missing}, unexpected {unexpected}"
        )
    return hf.eval()


# ----------------------------------------------------------------------------- directories


def from_pretrained(path_or_hub_id, *, classifier: bool = True):
    """Load a transformers ImageGPT directory or hub id: an ``IGPT`` (causal or base
    model) or an ``IGPTClassifier`` (``ImageGPTForImageClassification``), as ``from_hf``.
    ``classifier=False`` gives a classifier's ``IGPT`` without its class head."""
    if not classifier:
        return IGPT.from_pretrained(path_or_hub_id)
    return _build(*hf_format.read_pretrained(path_or_hub_id))


def save_pretrained(model_or_classifier, directory, *, palette=None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and, with ``palette``, its
    ``preprocessor_config.json``) to ``directory`` in transformers' layout, atomically
    per file. transformers' ``from_pretrained`` and igpt's read it. Returns the directory."""
    sd, hf_dict = hf_state_dict(model_or_classifier)
    directory = hf_format.write_pretrained(directory, sd, hf_dict)
    if palette is not None:
        save_palette(palette, directory, n_px=math.isqrt(hf_dict["n_positions"]))
    return directory


def load_classifier(path) -> tuple[IGPTClassifier, Palette | None]:
    """``(classifier, palette or None)`` from a fine-tuning checkpoint (file or run
    directory) or a transformers ``ImageGPTForImageClassification`` directory (or hub id).
    A ValueError says so when ``path`` holds no class head."""
    p = Path(path)
    if p.is_file() or (p.is_dir() and not is_pretrained_dir(p)):
        clf, palette, _ = load_classifier_checkpoint(p)
        return clf, palette
    clf = IGPTClassifier.from_pretrained(path)
    return clf, load_palette(path) if hf_format.has_processor_config(path) else None
