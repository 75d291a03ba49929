"""transformers' ImageGPT format: configs, weight names and layouts, and its directories.

This is the format layer under ``igpt.hf``: it knows how transformers names and lays out an
ImageGPT model and its processor, and reads and writes their files, but it builds no model.
So the model, the palette and the checkpoint readers can use it without importing the
application code of ``igpt.hf`` (conversion of live models, classifiers, patches).

Both use GPT-2 parameter names. transformers stores its linear layers as ``Conv1D`` with
weights (in, out), the transpose of nn.Linear's (out, in); everything else maps one to one.
HF's ``wte`` has n_colors + 1 rows (the last is SOS, as here) and ``lm_head`` has n_colors.
A classifier's head is HF's bias-free ``score``.

Directories in transformers' layout:

    config.json                  what ``transformers.ImageGPTConfig`` reads
    model.safetensors            HF's parameter names and Conv1D layout
    preprocessor_config.json     the palette as ``ImageGPTImageProcessor.clusters``

Hub ids go through transformers' own download code (``cached_file``); transformers is
imported only there, so a local directory is read and written without it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from igpt._io import atomic_write_bytes, atomic_write_text
from igpt.config import ACTIVATIONS, IGPTConfig

log = logging.getLogger(__name__)

CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers, not weights
CAUSAL, CLASSIFIER = "ImageGPTForCausalImageModeling", "ImageGPTForImageClassification"

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
PROCESSOR = {
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


def config_from_hf(hf_config) -> IGPTConfig:
    """igpt's config of a ``transformers.ImageGPTConfig`` (or anything with its fields);
    a ValueError names the first field igpt's model cannot express."""
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


def config_from_state_dict(sd, n_head) -> IGPTConfig:
    """The config of a bare HF state dict (igpt's names, prefix removed), given ``n_head``."""
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
        "architectures": [CAUSAL if n_classes is None else CLASSIFIER],
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


# ----------------------------------------------------------------------------- weights


def split_hf_state_dict(sd: dict) -> tuple[dict, torch.Tensor | None]:
    """HF's state dict in igpt's names and nn.Linear layout (float32), and the classifier's
    ``score.weight`` (None for a causal or base model). Mask buffers are dropped."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if "wte.weight" not in sd:
        raise ValueError("this does not look like an ImageGPT state dict: no 'wte.weight'")
    score = sd.pop("score.weight", None)
    ours = {}
    for k, v in sd.items():
        if k.endswith(HF_BUFFERS):
            continue
        if CONV1D.search(k):
            v = v.t()
        ours[k if k == "lm_head.weight" else "transformer." + k] = v.float()
    return ours, None if score is None else score.float()


def load_converted(model, ours: dict, *, score=None, source=None):
    """Load ``split_hf_state_dict``'s weights into an igpt model; every weight must fit.

    A base model (no ``lm_head``) leaves the logit head at zero, with a warning. A
    classifier (its ``score`` weight given) has no ``lm_head`` either; with ``source`` (the
    directory) the caller drops the class head, which a warning names."""
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected:
        raise ValueError(f"unexpected ImageGPT weights: {unexpected}")
    if missing and missing != ["lm_head.weight"]:
        raise ValueError(f"ImageGPT weights missing: {missing}")
    if score is not None and source is not None:
        log.warning("%s holds a classifier; using its transformer, without the head", source)
    elif missing and score is None:
        log.warning("the ImageGPT model has no lm_head; the logit head is left at zero")
    return model


def to_hf_layout(sd: dict, *, drop_lm_head: bool = False) -> dict:
    """igpt's state dict in HF's Conv1D layout (detached CPU tensors, contiguous)."""
    out = {}
    for k, v in sd.items():
        if drop_lm_head and k == "lm_head.weight":
            continue  # HF's classifier has no generative head
        v = v.detach().cpu()
        out[k] = (v.t() if CONV1D.search(k) else v).contiguous()
    return out


# ----------------------------------------------------------------------------- directories


def resolve(path_or_hub_id, filename: str, *, required: bool = True) -> Path | None:
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


def read_json(path: Path) -> dict:
    """A JSON file's object; a ValueError names the file when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from e


def read_weights(path_or_hub_id) -> dict:
    """The state dict of a directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    single = resolve(path_or_hub_id, "model.safetensors", required=False)
    if single is not None:
        return load_file(single)
    index = resolve(path_or_hub_id, "model.safetensors.index.json", required=False)
    if index is not None:
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(resolve(path_or_hub_id, s)).items()}
    legacy = resolve(path_or_hub_id, "pytorch_model.bin", required=False)
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


def read_hf_config(path_or_hub_id) -> SimpleNamespace:
    """``config.json`` of an ImageGPT directory or hub id, with HF's defaults filled in."""
    d = read_json(resolve(path_or_hub_id, "config.json"))
    if d.get("model_type") != "imagegpt":
        raise ValueError(
            f"{path_or_hub_id}: config.json has model_type={d.get('model_type')!r}, not 'imagegpt'"
        )
    return SimpleNamespace(**{**HF_CONFIG_DEFAULTS, **d})


def read_pretrained(path_or_hub_id) -> tuple[IGPTConfig, dict, torch.Tensor | None]:
    """``(config, weights in igpt's names, score weight or None)`` of an ImageGPT directory."""
    config = config_from_hf(read_hf_config(path_or_hub_id))
    ours, score = split_hf_state_dict(read_weights(path_or_hub_id))
    return config, ours, score


def write_pretrained(directory, sd: dict, hf_dict: dict) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF's names), atomically per file."""
    from safetensors.torch import save

    directory = Path(directory)
    hf_dict = {**hf_dict, "dtype": str(next(iter(sd.values())).dtype).removeprefix("torch.")}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "model.safetensors", save(sd, metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(hf_dict, indent=2) + "\n")
    return directory


def save_model(directory, state_dict: dict, config: IGPTConfig, palette=None) -> Path:
    """An igpt causal model's weights (``state_dict``) and ``config`` as a transformers
    directory, with ``palette``'s processor config when given; returns the directory."""
    sd = to_hf_layout(state_dict)
    directory = write_pretrained(directory, sd, hf_config_dict(config))
    if palette is not None:
        palette.save_pretrained(directory, n_px=config.n_px)
    return directory


def pretrained_n_px(directory) -> int:
    """The image side of the model saved in ``directory`` (its config.json)."""
    directory = Path(directory)
    if not is_pretrained_dir(directory):
        raise ValueError(
            f"n_px: {directory} has no ImageGPT config.json to take the image side "
            "from; pass n_px=..."
        )
    return math.isqrt(read_json(directory / "config.json")["n_positions"])


def write_processor_config(directory, clusters, centroids, n_px: int) -> Path:
    """Write ``preprocessor_config.json``: ``clusters`` ([-1, 1]) for transformers, the exact
    0..255 ``centroids`` under ``igpt_centroids`` (transformers keeps the key)."""
    if isinstance(n_px, bool) or not isinstance(n_px, int) or n_px < 1:
        raise ValueError(f"n_px must be a positive int, got {n_px!r}")
    d = {
        **PROCESSOR,
        "size": {"height": n_px, "width": n_px},
        "clusters": clusters.tolist(),
        "igpt_centroids": centroids.tolist(),
    }
    return atomic_write_text(Path(directory) / "preprocessor_config.json", json.dumps(d) + "\n")


def read_processor_config(path_or_hub_id) -> tuple[Path, dict]:
    """``(path, contents)`` of the ``preprocessor_config.json`` of a directory or hub id."""
    path = resolve(path_or_hub_id, "preprocessor_config.json")
    return path, read_json(path)


def has_processor_config(path_or_hub_id) -> bool:
    """Whether the directory or hub id has a ``preprocessor_config.json``."""
    return resolve(path_or_hub_id, "preprocessor_config.json", required=False) is not None
