"""igpt and transformers' ImageGPT: model conversion, and directories both can read.

Both use GPT-2 parameter names. transformers stores its linear layers as ``Conv1D`` with
weights (in, out), the transpose of nn.Linear's (out, in); everything else maps one to one.
HF's ``wte`` has n_colors + 1 rows (the last is SOS, as here) and ``lm_head`` has n_colors.

    HF(input_ids=[SOS] + x[:-1]).logits == IGPT(x)       (to float error)

Classifiers: ``ImageGPTForImageClassification`` mean-pools the final norm's output over every
position and applies a bias-free ``score`` Linear; ``igpt.finetune.IGPTClassifier`` with
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

Hub ids go through transformers' own download code (``cached_file``). transformers is
imported only inside the functions that need it, so igpt does not need it otherwise; a
local directory is read and written without it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from igpt._io import atomic_write_bytes, atomic_write_text
from igpt.config import ACTIVATIONS, IGPTConfig
from igpt.model import IGPT

log = logging.getLogger(__name__)

_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers, not weights
_CAUSAL, _CLASSIFIER = "ImageGPTForCausalImageModeling", "ImageGPTForImageClassification"

# transformers.ImageGPTConfig's defaults, for config.json files that leave keys out (HF
# writes only what differs from them). tests/test_hf.py checks them against transformers.
HF_CONFIG_DEFAULTS = {
    "vocab_size": 513,
    "n_positions": 1024,
    "n_embd": 512,
    "n_layer": 24,
    "n_head": 8,
    "n_inner": None,
    "activation_function": "quick_gelu",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}
# The processor's settings for igpt's palettes: pixels / 127.5 - 1, as the clusters.
_PROCESSOR = {
    "image_processor_type": "ImageGPTImageProcessor",
    "do_resize": True,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_color_quantize": True,
}


# ----------------------------------------------------------------------------- configs


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
    if hf_config.activation_function not in ACTIVATIONS:
        raise ValueError(
            f"activation_function={hf_config.activation_function!r} is not "
            f"supported; igpt has {ACTIVATIONS}"
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


def hf_config_dict(config: IGPTConfig, n_classes: int | None = None) -> dict:
    """The ``config.json`` contents of a model with ``config`` (a classifier with
    ``n_classes``), every key written, no dropout (igpt has none)."""
    if config.norm != "rms" or not config.bias:
        raise ValueError(
            f"transformers' ImageGPT has RMS norms and biased linears; this model "
            f"has norm={config.norm!r}, bias={config.bias}"
        )
    d = {
        "model_type": "imagegpt",
        "architectures": [_CAUSAL if n_classes is None else _CLASSIFIER],
        **HF_CONFIG_DEFAULTS,
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "activation_function": config.activation,
        "layer_norm_epsilon": config.eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": False,
    }
    if n_classes is not None:
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(n_classes)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(n_classes)}
    return d


# ----------------------------------------------------------------------------- models


def from_hf(model_or_state_dict, *, n_head: int | None = None):
    """Build igpt's model from a transformers ImageGPT model or its state dict.

    ``ImageGPTForCausalImageModeling`` and ``ImageGPTModel`` give an ``IGPT`` (the latter
    has no ``lm_head``: the returned head stays zero and a warning is logged);
    ``ImageGPTForImageClassification`` (or a state dict with ``score.weight``) gives an
    ``igpt.finetune.IGPTClassifier`` with HF's ``score`` as its ``head`` (bias zero and
    frozen, as HF's head has none) and a zero ``lm_head``. A state dict needs ``n_head``.
    The result is in float32 on the CPU; move it with ``.to()``.
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
    return _from_hf_state_dict(sd, config, n_head)


def _from_hf_state_dict(sd, config, n_head):
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if "wte.weight" not in sd:
        raise ValueError("this does not look like an ImageGPT state dict: no 'wte.weight'")
    cfg = _config_from_hf(config) if config is not None else _config_from_state_dict(sd, n_head)
    model = IGPT(cfg)
    score = sd.pop("score.weight", None)
    ours = {}
    for k, v in sd.items():
        if k.endswith(_HF_BUFFERS):
            continue
        if _CONV1D.search(k):
            v = v.t()
        ours[k if k == "lm_head.weight" else "transformer." + k] = v.float()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected:
        raise ValueError(f"unexpected ImageGPT weights: {unexpected}")
    if missing and missing != ["lm_head.weight"]:
        raise ValueError(f"ImageGPT weights missing: {missing}")
    if score is not None:
        return _classifier_with_head(model, score.float())
    if missing:
        log.warning("the ImageGPT model has no lm_head; the logit head is left at zero")
    return model


def _classifier_with_head(model: IGPT, weight: torch.Tensor):
    from igpt.finetune import IGPTClassifier

    clf = IGPTClassifier(model, weight.shape[0])
    with torch.no_grad():
        clf.head.weight.copy_(weight)
    clf.head.bias.requires_grad_(False)  # HF's score has no bias: keep it zero when trained
    return clf


def _is_classifier(obj) -> bool:
    from igpt.finetune import IGPTClassifier

    return isinstance(obj, IGPTClassifier)


def hf_state_dict(model_or_classifier) -> tuple[dict, dict]:
    """``(state_dict, config.json dict)`` of an IGPT or IGPTClassifier in transformers'
    names and Conv1D layout (detached CPU tensors, contiguous, the model's dtype)."""
    clf = model_or_classifier if _is_classifier(model_or_classifier) else None
    model = clf.model if clf is not None else model_or_classifier
    if not isinstance(model, IGPT):
        raise TypeError(
            f"expected an igpt.IGPT or IGPTClassifier, got {type(model_or_classifier).__name__}"
        )
    if clf is not None:
        if clf.layer != model.config.n_layer:
            raise ValueError(
                f"HF's classifier pools the final norm's output (layer {model.config.n_layer}); "
                f"this classifier reads layer {clf.layer}"
            )
        bias = clf.head.bias
        if bias is not None and torch.count_nonzero(bias):
            raise ValueError(
                "transformers' ImageGPTForImageClassification has a bias-free score head; this "
                f"classifier's head has a non-zero bias (max |b| = {bias.abs().max():.3g}). "
                "Fine-tune with the bias frozen at zero (head.bias.requires_grad_(False))"
            )
    hf_dict = hf_config_dict(model.config, None if clf is None else clf.n_classes)
    sd = {}
    for k, v in model.state_dict().items():
        if clf is not None and k == "lm_head.weight":
            continue  # HF's classifier has no generative head
        v = v.detach().cpu()
        sd[k] = v.t() if _CONV1D.search(k) else v
    if clf is not None:
        sd["score.weight"] = clf.head.weight.detach().cpu()
    return {k: v.contiguous() for k, v in sd.items()}, hf_dict


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
    missing = [k for k in missing if not k.endswith(_HF_BUFFERS)]
    if missing or unexpected:
        raise RuntimeError(
            f"weight names did not line up: missing {missing}, unexpected {unexpected}"
        )
    return hf.eval()


# ----------------------------------------------------------------------------- directories


def _resolve(path_or_hub_id, filename: str, *, required: bool = True) -> Path | None:
    """``filename`` in a local directory, or from the hub through transformers' cache."""
    local = Path(path_or_hub_id)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"{local} has no {filename}")
            return None
        return path
    try:
        from transformers.utils import cached_file
    except ImportError as e:
        raise FileNotFoundError(
            f"{path_or_hub_id} is not a directory, and reading a hub id needs transformers "
            "(pip install transformers)"
        ) from e
    path = cached_file(
        str(path_or_hub_id), filename, _raise_exceptions_for_missing_entries=required
    )
    return None if path is None else Path(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from e


def _read_weights(path_or_hub_id) -> dict:
    from safetensors.torch import load_file

    single = _resolve(path_or_hub_id, "model.safetensors", required=False)
    if single is not None:
        return load_file(single)
    index = _resolve(path_or_hub_id, "model.safetensors.index.json", required=False)
    if index is not None:
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(_resolve(path_or_hub_id, s)).items()}
    legacy = _resolve(path_or_hub_id, "pytorch_model.bin", required=False)
    if legacy is not None:  # weights_only: a pickle that holds code is refused
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path_or_hub_id} has no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin"
    )


def is_pretrained_dir(path) -> bool:
    """Whether ``path`` is a local directory in transformers' ImageGPT layout."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "imagegpt"
    except (OSError, ValueError, AttributeError):
        return False


def from_pretrained(path_or_hub_id, *, classifier: bool = True):
    """Load a transformers ImageGPT directory or hub id: an ``IGPT`` (causal or base
    model) or an ``IGPTClassifier`` (``ImageGPTForImageClassification``), as ``from_hf``.
    ``classifier=False`` gives a classifier's ``IGPT`` without its class head."""
    d = _read_json(_resolve(path_or_hub_id, "config.json"))
    if d.get("model_type") != "imagegpt":
        raise ValueError(
            f"{path_or_hub_id}: config.json has model_type={d.get('model_type')!r}, not 'imagegpt'"
        )
    config = SimpleNamespace(**{**HF_CONFIG_DEFAULTS, **d})
    model = _from_hf_state_dict(_read_weights(path_or_hub_id), config, None)
    if not classifier and _is_classifier(model):
        log.warning(
            "%s holds a classifier; using its transformer, without the head", path_or_hub_id
        )
        model = model.model
    return model


def save_pretrained(model_or_classifier, directory, *, palette=None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and, with ``palette``, its
    ``preprocessor_config.json``) to ``directory`` in transformers' layout, atomically
    per file. transformers' ``from_pretrained`` and igpt's read it. Returns the directory."""
    from safetensors.torch import save

    directory = Path(directory)
    sd, hf_dict = hf_state_dict(model_or_classifier)
    hf_dict["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "model.safetensors", save(sd, metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(hf_dict, indent=2) + "\n")
    if palette is not None:
        save_palette(palette, directory, n_px=math.isqrt(hf_dict["n_positions"]))
    return directory


# ----------------------------------------------------------------------------- palettes


def save_palette(palette, directory, *, n_px: int | None = None) -> Path:
    """Write ``preprocessor_config.json`` for ``ImageGPTImageProcessor``: the palette as its
    ``clusters`` ([-1, 1], float32 values), images resized to ``n_px`` x ``n_px`` (default:
    the side of the ``config.json`` in ``directory``). The exact 0..255 centroids ride
    along under ``igpt_centroids`` (transformers keeps the key), so igpt reads the palette
    back bit for bit; the clusters stay what transformers quantizes with."""
    directory = Path(directory)
    if n_px is None:
        if not is_pretrained_dir(directory):
            raise ValueError(
                f"n_px: {directory} has no ImageGPT config.json to take the image side "
                "from; pass n_px=..."
            )
        n_px = math.isqrt(_read_json(directory / "config.json")["n_positions"])
    if isinstance(n_px, bool) or not isinstance(n_px, int) or n_px < 1:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    d = {
        **_PROCESSOR,
        "size": {"height": n_px, "width": n_px},
        "clusters": palette.to_hf().tolist(),
        "igpt_centroids": palette.centroids.tolist(),
    }
    return atomic_write_text(directory / "preprocessor_config.json", json.dumps(d) + "\n")


def load_palette(path_or_hub_id):
    """The ``Palette`` of a ``preprocessor_config.json`` (directory or hub id): its
    ``clusters``, or the exact ``igpt_centroids`` when they still give those clusters."""
    from igpt.palette import Palette

    path = _resolve(path_or_hub_id, "preprocessor_config.json")
    d = _read_json(path)
    if d.get("clusters") is None:
        raise ValueError(f"{path} has no clusters (the processor's colour palette)")
    clusters = np.asarray(d["clusters"], dtype=np.float32)
    exact = d.get("igpt_centroids")
    if exact is not None:
        palette = Palette(np.asarray(exact, dtype=np.float32))
        if np.array_equal(palette.to_hf(), clusters):
            return palette
        log.warning("%s: igpt_centroids no longer match the clusters; using the clusters", path)
    return Palette.from_hf(clusters)


def load_any(path):
    """``(model, palette or None)`` from an igpt checkpoint file or run directory, or from a
    transformers ImageGPT directory (or hub id) with its palette when it has one.

    A directory holding a classifier gives its ``IGPT`` (the class head is dropped); use
    ``from_pretrained`` for the classifier itself.
    """
    p = Path(path)
    if p.is_file() or (p.is_dir() and not is_pretrained_dir(p)):
        from igpt.checkpoint import load_model

        model, palette, _ = load_model(p)
        return model, palette
    model = from_pretrained(path, classifier=False)
    has_palette = _resolve(path, "preprocessor_config.json", required=False) is not None
    return model, load_palette(path) if has_palette else None


def export_checkpoint(checkpoint, directory, *, head: bool = True) -> Path:
    """``igpt export-hf``: an igpt checkpoint (file or run directory) to a transformers
    directory, with its palette. A fine-tuning checkpoint becomes
    ``ImageGPTForImageClassification`` (``head=False``: its ``IGPT`` only, causal)."""
    from igpt.checkpoint import load_checkpoint, load_model

    if head and "head" in load_checkpoint(checkpoint):
        from igpt.finetune import load_classifier

        model, palette, _ = load_classifier(checkpoint)
    else:
        model, palette, _ = load_model(checkpoint)
    return save_pretrained(model, directory, palette=palette)


def import_pretrained(path_or_hub_id, out) -> Path:
    """``igpt import-hf``: a transformers ImageGPT directory (or hub id) to an igpt
    checkpoint file ``out`` (weights, config and palette, step 0, objective "ar"), which
    every ``--checkpoint`` takes. Returns ``out``."""
    from igpt.checkpoint import save_checkpoint

    model, palette = load_any(path_or_hub_id)
    return save_checkpoint(out, model, step=0, palette=palette, objective="ar")


from igpt.hf_patch import (  # noqa: E402,F401
    apply_igpt_kernels_to_imagegpt,
    igpt_kernels_for_imagegpt,
    revert_igpt_kernels_to_imagegpt,
)
