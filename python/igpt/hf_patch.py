"""One call makes transformers' own ImageGPT run on igpt's kernels (Liger-Kernel's convention).

    from igpt.hf import apply_igpt_kernels_to_imagegpt
    apply_igpt_kernels_to_imagegpt()                 # before from_pretrained: the classes
    apply_igpt_kernels_to_imagegpt(model)            # or one loaded model, in place

What changes, and only where the result is transformers' own (to float rounding):

- ``attention``: ``ImageGPTAttention`` runs ``igpt_kernels.attention`` (causal, bottom-right
  aligned, so a block of new queries over the KV cache is right) instead of materialising
  the (N x N) probabilities, with HF's padding mask turned into a key-padding mask.
- ``norm_mlp``: ``ImageGPTBlock`` runs its second RMS norm, MLP and residual as one
  ``igpt_kernels.ln_mlp`` call on the same parameters (Conv1D weights are passed as
  transposed views, so gradients land in HF's tensors).
- ``processor``: the colour quantization of ``ImageGPTImageProcessorPil`` (numpy) and of
  ``ImageGPTImageProcessor`` (torch; needs torchvision) goes through
  ``igpt_kernels.quantize`` and gives transformers' tokens exactly; see ``quantize_clusters``
  for the argument and the tie rule.

The class patch sets ``forward`` on transformers' two classes; patching a model moves its
modules to igpt's subclasses of them (``patched_class``: gradient checkpointing keeps
working, and the model pickles). Parameters, buffers and state-dict keys are untouched: a
patched model saves, loads and trains as before. A call the kernels cannot express runs
transformers' original code for that call: ``output_attentions``, a ``head_mask``,
``reorder_and_upcast_attn``, cross-attention, attention dropout while training
(``fallback_reason``), a mask that is not a padding mask or leaves a query with no key to
see (``_padding_from_mask``: read once per forward, never while compiling or capturing),
an activation other than quick_gelu / gelu. On the CPU,
``"auto"`` picks the kernels' PyTorch references (SDPA's fused CPU attention without
padding); on a GPU the fastest verified kernel.

At patch time the transformers source is checked for the structure this module relies on;
a transformers whose ImageGPT has moved on is refused with one line naming its version.
Patching twice is harmless; ``revert_igpt_kernels_to_imagegpt`` (or the context manager
``igpt_kernels_for_imagegpt``) restores transformers' code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import logging
import math
import sys

import numpy as np
import torch

import igpt_kernels
from igpt_kernels._seen import MISSING, SeenTensors
from igpt_kernels._settings import matmul_allows_tf32
from igpt_kernels.palette import clear_nearest
from igpt_kernels.reference import neighbour_table, readable

log = logging.getLogger(__name__)

_MODELING = "transformers.models.imagegpt.modeling_imagegpt"
_PROCESSORS = {  # module -> the nearest-cluster function its processor calls by global name
    "transformers.models.imagegpt.image_processing_pil_imagegpt": "color_quantize",
    "transformers.models.imagegpt.image_processing_imagegpt": "color_quantize_torch",
}
# Fragments of transformers' source this module's forwards re-state; any one missing means
# the code moved on and the patch could compute something else, so it refuses.
_NEEDED = {
    ("ImageGPTAttention", "forward"): (
        "self.c_attn(current_states).split(self.split_size, dim=2)",
        "curr_cache.update(key, value, self.layer_idx",
        "self._merge_heads(attn_output, self.num_heads, self.head_dim)",
        "self.c_proj(attn_output)",
        "self.resid_dropout(attn_output)",
        "return attn_output, attn_weights",
    ),
    ("ImageGPTAttention", "_attn"): (
        "self.bias[:, :, key_length - query_length : key_length, :key_length]",
        "attn_weights = attn_weights + attention_mask",
        "self.attn_dropout(attn_weights)",
    ),
    ("ImageGPTBlock", "forward"): (
        "hidden_states = self.ln_2(hidden_states)",
        "feed_forward_hidden_states = self.mlp(hidden_states)",
        "hidden_states = residual + feed_forward_hidden_states",
        "return (hidden_states,) + outputs",
    ),
    ("ImageGPTMLP", "forward"): ("self.c_fc(", "self.act(", "self.c_proj(", "self.dropout("),
    ("ImageGPTLayerNorm", "forward"): (
        "torch.sqrt(torch.mean(torch.square(tensor), axis=-1, keepdim=True) + self.eps)",
        "tensor * self.weight",
    ),
}
_ATTENTION_ARGS = (
    "hidden_states",
    "layer_past",
    "attention_mask",
    "use_cache",
    "output_attentions",
)
_ORIGINAL: dict = {}  # (class name, attribute) -> transformers' function, filled by _check
_MASKS = SeenTensors(most=4)  # the last masks' _padding_from_mask answers (one per forward)


def _version() -> str:
    import transformers

    return transformers.__version__


def _refuse(what: str):
    return RuntimeError(
        f"transformers {_version()}: {what}, so igpt's ImageGPT patch cannot vouch for its "
        "numbers (it was written against transformers 5.x, tested with 5.25); upgrade igpt or "
        "run without apply_igpt_kernels_to_imagegpt"
    )


def _modeling():
    try:
        return importlib.import_module(_MODELING)
    except ImportError as e:
        raise _refuse(f"{_MODELING} does not import ({e})") from e


def _check_modeling():
    """transformers' ImageGPT modeling module, after checking the structure relied on; fills
    ``_ORIGINAL`` with its own functions (not ours, should the classes be patched already)."""
    mod = _modeling()
    for (cls_name, attr), fragments in _NEEDED.items():
        cls = getattr(mod, cls_name, None)
        fn = getattr(cls, attr, None) if cls is not None else None
        if fn is None:
            raise _refuse(f"ImageGPT has no {cls_name}.{attr}")
        fn = _ORIGINAL.get((cls_name, attr), fn) if _is_ours(fn) else fn
        source = inspect.getsource(fn)
        missing = [f for f in fragments if f not in source]
        if missing:
            raise _refuse(f"{cls_name}.{attr} no longer contains {missing[0]!r}")
        _ORIGINAL[(cls_name, attr)] = fn
    params = inspect.signature(_ORIGINAL[("ImageGPTAttention", "forward")]).parameters
    if any(p not in params for p in _ATTENTION_ARGS):
        raise _refuse(f"ImageGPTAttention.forward no longer takes {_ATTENTION_ARGS}")
    return mod


def _is_ours(fn) -> bool:
    return getattr(getattr(fn, "__func__", fn), "__igpt_patch__", False)


def _ours(fn):
    fn.__igpt_patch__ = True
    return fn


# ----------------------------------------------------------------------------- attention


def _padding_from_mask(mask, n_query: int):
    """``(key_padding_mask or None, reason or None)`` from HF's 4D attention mask.

    HF hands every layer a (B, 1, Nq, Nk) additive mask (0 = attend, dtype min = padding)
    or None. It is a key-padding mask when every query row is the same; a query that then
    sees no key at all (left padding before the first real token) gets a uniform average
    from HF's softmax of equal minimum scores, which no kernel reproduces: fallback.

    HF passes one mask object to every layer of a forward, so its values are read once
    per forward (one host sync, at the first layer: ``_mask_facts``) and the answer kept
    while that tensor is unchanged (``igpt_kernels._seen``). Where its values cannot be read
    without breaking something (``torch.compile`` tracing, a fake tensor, a CUDA graph being
    captured) and no answer is kept, transformers' own attention takes the call.
    """
    if mask is None:
        return None, None
    if mask.dim() != 4 or mask.shape[1] != 1:
        return None, f"an attention mask of shape {tuple(mask.shape)}"
    if torch.compiler.is_compiling() or not readable(mask):
        return None, "an attention mask while torch.compile traces (its values are not read)"
    facts = _MASKS.get(mask, n_query)
    if facts is MISSING:
        if mask.is_cuda and torch.cuda.is_current_stream_capturing():
            return None, "an attention mask first seen while a CUDA graph is captured"
        facts = _mask_facts(mask, n_query)
        _MASKS.put(mask, facts, n_query)
    return facts


def _mask_facts(mask, n_query: int):
    """``_padding_from_mask``'s answer for a readable mask: its four properties computed on
    the mask's device and read in one ``tolist()`` (one host sync)."""
    if mask.dtype == torch.bool:
        keep = mask
        values_ok = torch.ones((), dtype=torch.bool, device=mask.device)
    else:
        keep = mask == 0
        values_ok = (keep | (mask == torch.finfo(mask.dtype).min)).all()
    kpm = keep[:, 0, 0, :]  # (B, Nk)
    offset = kpm.shape[1] - n_query  # bottom-right causal: query 0 sees keys 0..offset
    flags = torch.stack(
        [values_ok, (keep == keep[:, :, :1, :]).all(), kpm.all(), kpm[:, : offset + 1].any(1).all()]
    )
    values_ok, same_rows, every_key, first_sees = flags.tolist()
    if not values_ok:
        return None, "an attention mask with values other than 0 and the dtype's minimum"
    if not same_rows:
        return None, "an attention mask that differs between queries"
    if every_key:
        return None, None
    if not first_sees:
        return None, "an attention mask that leaves a query with no key to attend"
    return kpm, None


def fallback_reason(module, *, output_attentions=False, head_mask=None, encoder=None):
    """Why ``module`` (an ImageGPTAttention) runs transformers' own code for this call, or
    None when igpt's attention takes it. The mask is judged separately (``_padding_from_mask``).
    """
    if output_attentions:
        return "output_attentions=True (the kernels never form the probabilities)"
    if head_mask is not None:
        return "a head_mask"
    if module.is_cross_attention or encoder is not None:
        return "cross-attention"
    if module.reorder_and_upcast_attn:
        return "reorder_and_upcast_attn=True"
    if module.training and module.attn_dropout.p > 0:
        return f"attention dropout {module.attn_dropout.p} while training"
    return None


def _softmax_scale(module, head_dim: int) -> float:
    scale = 1.0 / math.sqrt(head_dim) if module.scale_attn_weights else 1.0
    if module.scale_attn_by_inverse_layer_idx:
        scale /= float(module.layer_idx + 1)
    return scale


@_ours
def attention_forward(
    self,
    hidden_states,
    layer_past=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    use_cache=False,
    output_attentions=False,
    **kwargs,
):
    """``ImageGPTAttention.forward`` through ``igpt_kernels.attention`` (same arguments and
    outputs; the attention weights are None), or transformers' own for what it cannot do."""
    why = fallback_reason(
        self,
        output_attentions=output_attentions,
        head_mask=kwargs.get("head_mask"),
        encoder=encoder_hidden_states,
    )
    kpm = None
    if why is None:
        kpm, why = _padding_from_mask(attention_mask, hidden_states.shape[1])
    if why is not None:
        log.debug("ImageGPTAttention: transformers' own attention for %s", why)
        return _ORIGINAL[("ImageGPTAttention", "forward")](
            self,
            hidden_states,
            layer_past=layer_past,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
    bsz, seq_len, _ = hidden_states.shape
    H, D = self.num_heads, self.head_dim
    query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
    query = query.view(bsz, seq_len, H, D).transpose(1, 2)  # (B, H, n, D)
    key = key.view(bsz, -1, H, D).transpose(1, 2)
    value = value.view(bsz, -1, H, D).transpose(1, 2)
    if layer_past is not None:
        cache = getattr(layer_past, "self_attention_cache", layer_past)  # EncoderDecoderCache
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, H, past+n, D)
    if kpm is not None:
        kpm = kpm.to(query.device).expand(bsz, key.shape[2])
    # one new query sees every key (bottom-right alignment): no causal mask to build
    out = igpt_kernels.attention(
        query,
        key,
        value,
        causal=seq_len > 1,
        key_padding_mask=kpm,
        sm_scale=_softmax_scale(self, D),
    )
    out = out.transpose(1, 2).reshape(bsz, seq_len, H * D)  # (B, n, d)
    return self.resid_dropout(self.c_proj(out)), None


# ----------------------------------------------------------------------------- norm + MLP


def _activation_name(act) -> str | None:
    """ln_mlp's name for HF's activation module, or None when ln_mlp has no such one."""
    kind = type(act).__name__
    if kind == "QuickGELUActivation":
        return "quick_gelu"
    if kind == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return None


def mlp_fallback_reason(block) -> str | None:
    """Why ``block``'s ln_2 -> MLP runs transformers' own code, or None when one
    ``ln_mlp`` call on its parameters computes exactly what those modules would.

    The fused call reads the weights, so it is right only while each module is the plain
    transformers one that nobody watches: an adapter or a quantized layer in place of
    ``c_fc``/``c_proj`` (PEFT's LoRA, bitsandbytes), a subclass, or a forward hook on any of
    them would be bypassed, so each of those keeps transformers' modules."""
    mod = sys.modules[_MODELING]
    conv1d = importlib.import_module("transformers.pytorch_utils").Conv1D
    expect = {
        "ln_2": (block.ln_2, mod.ImageGPTLayerNorm),
        "mlp": (block.mlp, mod.ImageGPTMLP),
        "mlp.c_fc": (block.mlp.c_fc, conv1d),
        "mlp.c_proj": (block.mlp.c_proj, conv1d),
    }
    for name, (module, cls) in expect.items():
        if type(module) is not cls:
            return f"{name} is a {type(module).__name__}, not transformers' {cls.__name__}"
    for name, module in [*((n, m) for n, (m, _) in expect.items()), ("mlp.act", block.mlp.act)]:
        if module._forward_hooks or module._forward_pre_hooks:
            return f"forward hooks on {name}"
    if _global_hooks():
        return "global module forward hooks"
    return None


def _global_hooks() -> bool:
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


@_ours
def block_forward(
    self,
    hidden_states,
    layer_past=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    use_cache=False,
    output_attentions=False,
    **kwargs,
):
    """``ImageGPTBlock.forward`` with ln_2 -> MLP -> residual as one ``igpt_kernels.ln_mlp``
    call; transformers' own block with cross-attention or an activation ln_mlp lacks."""
    activation = _activation_name(self.mlp.act)
    why = mlp_fallback_reason(self)
    if why is not None:
        log.debug("ImageGPTBlock: transformers' own norm + MLP for %s", why)
    if encoder_hidden_states is not None or activation is None or why is not None:
        return _ORIGINAL[("ImageGPTBlock", "forward")](
            self,
            hidden_states,
            layer_past,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
    attn_output, *outputs = self.attn(
        self.ln_1(hidden_states),
        layer_past=layer_past,
        attention_mask=attention_mask,
        use_cache=use_cache,
        output_attentions=output_attentions,
    )
    hidden_states = attn_output + hidden_states
    mlp = self.mlp
    dropout = self.training and mlp.dropout.p > 0  # HF drops the MLP's output, not x
    y = igpt_kernels.ln_mlp(
        hidden_states,
        self.ln_2.weight,
        None,
        mlp.c_fc.weight.t(),  # Conv1D keeps (in, out); ln_mlp takes nn.Linear's (out, in)
        mlp.c_fc.bias,
        mlp.c_proj.weight.t(),
        mlp.c_proj.bias,
        norm="rms",
        eps=self.ln_2.eps,
        activation=activation,
        residual=not dropout,
    )
    if dropout:
        y = hidden_states + mlp.dropout(y)
    return (y, *outputs)


# ----------------------------------------------------------------------------- processor

_NEIGHBOURS = 32  # clusters in each cluster's neighbour table (photos: nearly always enough)
_NEIGHBOUR_CACHE: dict = {}  # the last clusters' neighbour_table


def _error_margin(c, x_max: float, cuda: bool) -> float:
    """Twice the most transformers' float a^2 - 2ab + b^2 can move one squared distance,
    doubled again (two distances are compared), plus float64's error in our own check.

    With unit roundoff u and s = max|x_i| + max|c_i|: a^2, ab and b^2 (three-term sums of
    products) err by at most 4u|x|^2, 4u|x||c| (times 2) and 4u|c|^2; the two additions by
    u(|x| + |c|)^2 each: 6u(|x| + |c|)^2 <= 18u s^2 in all. The bound used is 36u s^2.

    u is float64's when the clusters are float64: numpy then promotes the pixels to float64
    for ab and b^2, and a^2, summed in the pixels' dtype, adds the same error to every
    cluster's distance of a pixel, which leaves its argmin alone; torch's matmul needs both
    in float64. Otherwise float32's, or TF32's on a CUDA GEMM that allows it.
    """
    span = x_max + float(c.abs().max())
    if c.dtype == torch.float64:
        unit = 2.0**-53
    elif cuda and matmul_allows_tf32():
        unit = 2.0**-11  # TF32 GEMMs keep 10 mantissa bits
    else:
        unit = 2.0**-24
    return 2 * 36 * unit * span * span + 1e-12 * (1 + span * span)


def _fast_path_problem(x, c, as_numpy: bool) -> str | None:
    if x.dtype not in (torch.float32, torch.float64) or c.dtype.is_complex:
        return f"pixels of dtype {x.dtype}"
    if not as_numpy and x.dtype != c.dtype:
        return f"pixels of {x.dtype} with clusters of {c.dtype}"  # transformers' matmul refuses
    if c.dim() != 2 or c.shape[1] != 3 or not 1 <= c.shape[0] <= 65536:
        return f"clusters of shape {tuple(c.shape)}"
    if not bool(torch.isfinite(c).all()):
        return "non-finite clusters"
    return None


def _neighbours(c):
    """``igpt_kernels.reference.neighbour_table`` of the float64 clusters ``c``; the last
    clusters' table is kept (a processor quantizes with the same ones each call)."""
    key = (str(c.device), hashlib.blake2b(c.cpu().numpy().tobytes(), digest_size=16).digest())
    if key not in _NEIGHBOUR_CACHE:
        _NEIGHBOUR_CACHE.clear()
        _NEIGHBOUR_CACHE[key] = neighbour_table(c, _NEIGHBOURS)
    return _NEIGHBOUR_CACHE[key]


def _clear_winner(x, c, best, margin: float):
    """Whether every other cluster is farther from x than c[best] by more than ``margin``
    (float64 squared distances): first ``igpt_kernels.palette.clear_nearest`` with the
    clusters' neighbour table, then the pixels it leaves open against all clusters."""
    clear = clear_nearest(x, c, best, *_neighbours(c), margin)
    open_ = (~clear).nonzero().squeeze(1)
    norms = c.square().sum(1)
    step = max(1, (1 << 20) // c.shape[0])
    for s in range(0, len(open_), step):
        rows = open_[s : s + step]
        d_all = norms - 2 * x[rows].double() @ c.t()  # (rows, K): |x - c_k|^2 - |x|^2
        d_other = d_all.scatter(1, best[rows, None], math.inf).amin(1)
        clear[rows] = d_other - d_all.gather(1, best[rows, None])[:, 0] > margin
    return clear


def quantize_clusters(x, clusters, original):
    """transformers' nearest-cluster tokens of normalised pixels, through igpt's kernel.

    ``x``: (..., 3) pixels in [-1, 1] (numpy or torch, float32/float64), ``clusters`` (K, 3)
    in the same space, ``original``: transformers' own function (``color_quantize`` or
    ``color_quantize_torch``), whose tokens this returns, as its type (numpy or torch, int64).

    The pixels are mapped back to 8-bit RGB (u = round((x + 1) 127.5), which HF's rescale
    and normalize came from) and the clusters to 0..255; ``igpt_kernels.quantize`` proposes
    the nearest colour k. Then, in float64 on x and the clusters themselves, every other
    cluster is shown farther than c_k by more than a bound on transformers' float rounding
    (``_error_margin``): its argmin of a^2 - 2ab + b^2 can then only be k. The pixels left
    (near-ties, exact ties included) are decided by ``original`` itself, so the tie rule is
    transformers': the first minimum of its float a^2 - 2ab + b^2 (``argmin``), the lowest
    index among distances equal in its arithmetic. The kernel's own rule (the exact nearest,
    lowest index on exact ties) thus never decides a token. Pixels of other dtypes, NaN and
    odd shapes go to ``original``.
    """
    as_numpy = isinstance(x, np.ndarray)
    xt = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
    ct = clusters if torch.is_tensor(clusters) else torch.from_numpy(np.asarray(clusters))
    xt = xt.reshape(-1, 3)
    why = _fast_path_problem(xt, ct, as_numpy)
    # the largest |x| (for the margin) is NaN or inf exactly when some pixel is
    x_max = float(xt.abs().amax()) if why is None and len(xt) else 0.0
    if why is None and not math.isfinite(x_max):
        why = "non-finite pixels"
    if why is not None or len(xt) == 0:
        log.debug("ImageGPT processor: transformers' own quantization for %s", why)
        return original(x, clusters)
    c64 = ct.to(xt.device, torch.float64)
    # the proposal only: its rounding need not be exact, the float64 check decides
    pixels = ((xt + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    best = igpt_kernels.quantize(pixels, ((c64 + 1) * 127.5).float())
    if c64.shape[0] == 1:
        return best.numpy() if as_numpy else best
    close = ~_clear_winner(xt, c64, best, _error_margin(ct, x_max, xt.is_cuda))
    if bool(close.any()):
        rows = xt[close]
        picked = original(rows.numpy() if as_numpy else rows, clusters)
        best[close] = torch.as_tensor(np.asarray(picked) if as_numpy else picked).to(best)
    return best.numpy() if as_numpy else best


def _processor_quantizer(original):
    @_ours
    def color_quantize(x, clusters):
        return quantize_clusters(x, clusters, original)

    color_quantize.__doc__ = (
        f"transformers' ``{original.__name__}`` through igpt_kernels.quantize, same tokens "
        "(igpt.hf_patch.quantize_clusters)."
    )
    return color_quantize


def _processor_modules():
    """The processor modules this transformers can import (the torch one needs torchvision),
    each checked for the function its ``_preprocess`` calls."""
    found = []
    for name, fn in _PROCESSORS.items():
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            log.debug("%s not patched: it does not import (%s)", name, e)
            continue
        current = getattr(mod, fn, None)
        original = _ORIGINAL.get((name, fn)) if _is_ours(current) else current
        classes = [
            c
            for c in vars(mod).values()
            if inspect.isclass(c) and c.__module__ == name and "_preprocess" in vars(c)
        ]
        if (
            original is None
            or not classes
            or any(f"{fn}(" not in inspect.getsource(c._preprocess) for c in classes)
        ):
            raise _refuse(f"{name} no longer quantizes through {fn}()")
        params = list(inspect.signature(original).parameters)
        if params[:2] != ["x", "clusters"]:
            raise _refuse(f"{name}.{fn} no longer takes (x, clusters)")
        _ORIGINAL[(name, fn)] = original
        found.append((mod, fn, original))
    return found


# ----------------------------------------------------------------------------- patching


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


# igpt's subclasses of transformers' modules: name -> (transformers' class, igpt's forward)
_PATCHED = {
    "ImageGPTAttentionWithIgptKernels": ("ImageGPTAttention", attention_forward),
    "ImageGPTBlockWithIgptKernels": ("ImageGPTBlock", block_forward),
}


def patched_class(name: str):
    """igpt's subclass ``name`` of a transformers ImageGPT module (``_PATCHED``), made once.

    Subclassing lets transformers' ``GradientCheckpointingLayer`` wrap igpt's block forward
    in its checkpointing as it wraps its own (replacing ``forward`` on the class would lose
    gradient checkpointing). Modules patched in place take these classes (same parameters,
    one more class in the MRO); the class patch takes their ``forward``. They are
    importable as ``igpt.hf_patch.<name>``, so a patched model pickles."""
    cls = globals().get(name)
    if cls is None:
        base_name, forward = _PATCHED[name]
        base = getattr(_check_modeling(), base_name)
        cls = type(name, (base,), {"forward": forward, "__module__": __name__})
        globals()[name] = cls
    return cls


def __getattr__(name):
    if name in _PATCHED:  # a pickled patched model, loaded in a fresh process
        return patched_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _model_modules(model, classes):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, classes)]
    if not found:
        raise ValueError(
            f"model: a {type(model).__name__} holds no transformers ImageGPT blocks; pass an "
            "ImageGPTModel, ImageGPTForCausalImageModeling or ImageGPTForImageClassification"
        )
    return found


def apply_igpt_kernels_to_imagegpt(
    model=None, *, attention: bool = True, norm_mlp: bool = True, processor: bool = True
):
    """Run transformers' ImageGPT on igpt's kernels, outputs unchanged (Liger's convention).

    Args:
        model: None patches transformers' ImageGPT classes, so every model (created before or
            after) uses the kernels; an ImageGPT model (or any module holding its blocks)
            patches that instance's modules in place: same parameters, same state-dict keys.
        attention: ``ImageGPTAttention`` through ``igpt_kernels.attention``.
        norm_mlp: each block's ln_2 -> MLP -> residual through ``igpt_kernels.ln_mlp``.
        processor: the colour quantization of both ImageGPT image processors (module-wide,
            also when ``model`` is given) through ``igpt_kernels.quantize``, same tokens.

    Returns:
        ``model`` (None without one). Calling it again is harmless; undo with
        ``revert_igpt_kernels_to_imagegpt``. Raises RuntimeError, naming the transformers
        version, when its ImageGPT code no longer has the structure the patch relies on.
    """
    _check_flags(attention=attention, norm_mlp=norm_mlp, processor=processor)
    mod = _check_modeling()
    quantizers = _processor_modules() if processor else []
    wanted = [n for n, on in zip(_PATCHED, (attention, norm_mlp), strict=True) if on]
    for cls in map(patched_class, wanted):
        base = cls.__bases__[0]
        if model is None:
            base.forward = vars(cls)["forward"]  # for the block: the checkpointing wrapper
        else:
            for m in _model_modules(model, (mod.ImageGPTAttention, mod.ImageGPTBlock)):
                if type(m) is base:
                    m.__class__ = cls  # same modules and parameters
    for pmod, name, original in quantizers:
        if not _is_ours(getattr(pmod, name)):
            setattr(pmod, name, _processor_quantizer(original))
    return model


def revert_igpt_kernels_to_imagegpt(model=None, *, processor: bool = True) -> None:
    """Undo ``apply_igpt_kernels_to_imagegpt``: transformers' own classes (``model=None``)
    or that model's modules, and (``processor=True``) the processors' quantization. Parts
    that were never patched are left as they are."""
    _check_flags(processor=processor)
    mod = _modeling()
    classes = (mod.ImageGPTAttention, mod.ImageGPTBlock)
    if model is None:
        for cls in classes:
            if _is_ours(vars(cls).get("forward")):
                cls.forward = _ORIGINAL[(cls.__name__, "forward")]
    else:
        for m in _model_modules(model, classes):
            if type(m).__name__ in _PATCHED:
                m.__class__ = type(m).__bases__[0]
    if processor:
        for name, fn in _PROCESSORS.items():
            pmod = sys.modules.get(name)
            if pmod is not None and _is_ours(getattr(pmod, fn, None)):
                setattr(pmod, fn, _ORIGINAL[(name, fn)])


def _snapshot(model):
    """Every attribute the patch may set, as it is now."""
    mod = _modeling()
    classes = (mod.ImageGPTAttention, mod.ImageGPTBlock)
    saved = [(cls, "forward", vars(cls)["forward"]) for cls in classes]
    if model is not None:
        for m in _model_modules(model, classes):
            saved.append((m, "__class__", type(m)))
    for name, fn in _PROCESSORS.items():
        with contextlib.suppress(ImportError):
            pmod = importlib.import_module(name)
            saved.append((pmod, fn, getattr(pmod, fn)))
    return saved


@contextlib.contextmanager
def igpt_kernels_for_imagegpt(
    model=None, *, attention: bool = True, norm_mlp: bool = True, processor: bool = True
):
    """``with igpt_kernels_for_imagegpt(model): ...``: ``apply_igpt_kernels_to_imagegpt`` for
    the block, then exactly the state before it (an earlier patch stays). Yields ``model``."""
    saved = _snapshot(model)
    try:
        yield apply_igpt_kernels_to_imagegpt(
            model, attention=attention, norm_mlp=norm_mlp, processor=processor
        )
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
