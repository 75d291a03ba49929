"""Plain-PyTorch reference of every op, with the exact signatures of the public ops.

These functions define what the kernels must compute. Tests compare kernels against them
(run in float64), benchmarks use them as the "eager PyTorch" baseline, and the public ops
fall back to them where no kernel can run (``backend="torch"``). Each one validates its
inputs with the same checks as the public op, so a bad call fails the same way everywhere.

The ``check_*`` functions are shared with the public ops in ``attention.py``, ``ln_mlp.py``
and ``palette.py``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from igpt_kernels._dispatch import check_tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (32, 64, 96, 128)  # the Triton attention kernel's list; the reference takes any
NORMS = ("rms", "layer")
ACTIVATIONS = ("quick_gelu", "gelu")
# The one limit on palette size, which the model config imports too: token ids 0..65535 fit
# the uint16 token cache.
MAX_COLORS = 65536


def compiling() -> bool:
    """True while ``torch.compile`` traces: value checks that read tensor data are skipped
    then (a data-dependent branch would break the graph)."""
    return torch.compiler.is_compiling()


def readable(t: torch.Tensor) -> bool:
    """Whether checks may read ``t``'s values: not while compiling, and not on a fake or
    meta tensor (shape propagation has no values to read)."""
    return not compiling() and t.device.type != "meta" and not is_fake(t)


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
    """Raise TypeError unless ``value`` is a real number (not a bool), ValueError unless it
    is finite and > 0."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        need = "a positive finite number" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {need}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def check_attention(q, k, v, causal, key_padding_mask, sm_scale) -> None:
    """Validate the arguments of ``attention``; raise TypeError/ValueError naming the culprit."""
    check_tensor("q", q, dims=4, dtypes=FLOATS)
    check_tensor("k", k, dims=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, dims=4, dtypes=(q.dtype,), device=q.device)
    B, H, Nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k must be (B, H, Nk, D) = ({B}, {H}, Nk, {D}) to match q, got {tuple(k.shape)}"
        )
    Nk = k.shape[2]
    if D == 0:
        raise ValueError(f"q must have head_dim D >= 1, got shape {tuple(q.shape)}")
    if Nq > Nk:
        raise ValueError(f"q has more positions than k (Nq={Nq} > Nk={Nk}); need Nq <= Nk")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if key_padding_mask is not None:
        check_tensor(
            "key_padding_mask", key_padding_mask, dims=2, dtypes=(torch.bool,), device=q.device
        )
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"key_padding_mask must be (B, Nk) = ({B}, {Nk}), got "
                f"{tuple(key_padding_mask.shape)}"
            )
    check_positive("sm_scale", sm_scale, allow_none=True)


def attention_mask(Nq, Nk, causal, key_padding_mask, device):
    """The boolean (B or 1, 1, Nq, Nk) mask of visible keys, or None when all are visible.

    Causal masking is bottom-right aligned: query i sees key j iff j <= i + (Nk - Nq).
    """
    mask = None
    if causal:
        i = torch.arange(Nq, device=device)[:, None]
        j = torch.arange(Nk, device=device)[None, :]
        mask = (j <= i + (Nk - Nq))[None, None]  # (1, 1, Nq, Nk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        mask = pad if mask is None else mask & pad
    return mask


def propagate_nan(o, q):
    """o with NaN in every row whose query holds a NaN or an inf, as PyTorch's math gives.

    PyTorch's fused CPU kernel returns zeros for such a query (its running max skips NaN).
    ``0 * sum(q)`` (summed in float32 or wider, so large finite 16-bit rows cannot overflow)
    is 0 for a finite row and NaN otherwise. On the CPU it is added only when q has such a
    row, so finite inputs keep SDPA's output tensor itself (what autograd saves, and its
    (B, n, H, D) layout); on a GPU (no host sync), while compiling and on fake tensors
    (no values to read) it is always added, laid out as o.
    """
    if q.device.type == "cpu" and readable(q) and bool(torch.isfinite(q).all()):
        return o
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    nan = (0.0 * q.sum(-1, keepdim=True, dtype=wide)).to(o.dtype)  # (B, H, Nq, 1)
    return (o.transpose(1, 2) + nan.transpose(1, 2)).transpose(1, 2)


def attention(q, k, v, *, causal=True, key_padding_mask=None, sm_scale=None, backend="auto"):
    """Reference scaled dot-product attention: softmax(q k^T * sm_scale + mask) v.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D) with Nq <= Nk and any head dim D >= 1; returns
    o: (B, H, Nq, D) in q's dtype. Scores and softmax are computed in float32 (float64 for
    float64 inputs). Without key padding this is PyTorch's ``scaled_dot_product_attention``
    (an explicit bottom-right mask when Nq < Nk); with padding, the explicit softmax below,
    where a query that sees no key gets a zero output and zero gradients, as the flash
    kernel does. A NaN in a query, or in a key or value it attends, makes its output NaN.
    ``backend`` is accepted for signature parity and must be "auto" or "torch".
    """
    check_attention(q, k, v, causal, key_padding_mask, sm_scale)
    if backend not in ("auto", "torch"):
        raise ValueError(f"the reference attention only runs backend='torch', got {backend!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    Nq, Nk = q.shape[2], k.shape[2]
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if key_padding_mask is None:
        mask = None if Nq == Nk else attention_mask(Nq, Nk, causal, None, q.device)
        # Every query sees at least one key, so PyTorch's own fused op computes the same
        # softmax without an N x N buffer on the CPU (tests check it against the loop).
        o = F.scaled_dot_product_attention(
            qc,
            kc,
            vc,
            attn_mask=mask,
            is_causal=causal and Nq == Nk,
            scale=scale,
        )
        return propagate_nan(o, qc).to(q.dtype)
    mask = attention_mask(Nq, Nk, causal, key_padding_mask, q.device)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = p.masked_fill(~mask, 0.0)  # rows with no visible key are NaN after softmax
    return torch.matmul(p, vc).to(q.dtype)


def attention_eager(q, k, v, *, causal=True, key_padding_mask=None, sm_scale=None,
                    backend="auto"):  # fmt: skip
    """The attention eager PyTorch code computes without upcasting: ``softmax(q k^T *
    sm_scale + mask) v`` with every matmul, the softmax's output and autograd in the inputs'
    dtype. Not a fallback (``attention`` is the accurate reference): the judge's yardstick
    of PyTorch's own rounding in a 16-bit dtype, as flash-attention's tests use it.
    A query that sees no key gets zeros. Same signature as ``attention``."""
    check_attention(q, k, v, causal, key_padding_mask, sm_scale)
    if backend not in ("auto", "torch"):
        raise ValueError(f"the eager attention only runs backend='torch', got {backend!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    mask = attention_mask(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk) in q's dtype
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)  # rows with no visible key are NaN after softmax
    return torch.matmul(p, v)


# --------------------------------------------------------------------------------------
# norm -> fc -> activation -> proj (+ residual)
# --------------------------------------------------------------------------------------


def _check_norm_input(x, norm, eps) -> None:
    """The checks ln_mlp and ln_linear share: x (..., d) float, a known norm, eps > 0."""
    check_tensor("x", x, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., d) with d >= 1, got shape {tuple(x.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    check_positive("eps", eps)


def _check_weights(x, given: dict, expect: dict, dims: str, norm, norm_bias) -> None:
    """Each weight in ``given`` (None = absent, allowed for optional ones) has x's dtype and
    device and the shape in ``expect``; RMS norms take no bias. ``dims`` names the sizes in
    the error message."""
    for name, t in given.items():
        if t is None:
            continue
        check_tensor(name, t, dtypes=(x.dtype,), device=x.device)
        if tuple(t.shape) != expect[name]:
            raise ValueError(
                f"{name} must have shape {expect[name]} (nn.Linear layout, {dims}), "
                f"got {tuple(t.shape)}"
            )
    if norm == "rms" and norm_bias is not None:
        raise ValueError(
            "norm_bias must be None for norm='rms' (RMS norm has no bias); "
            "use norm='layer' for a biased LayerNorm"
        )


def check_ln_mlp(
    x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, norm, eps, activation
) -> None:
    """Validate the arguments of ``ln_mlp``; raise TypeError/ValueError naming the culprit."""
    _check_norm_input(x, norm, eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    d = x.shape[-1]
    check_tensor("fc_weight", fc_weight, dims=2, dtypes=(x.dtype,), device=x.device)
    check_tensor("proj_weight", proj_weight, dims=2, dtypes=(x.dtype,), device=x.device)
    h = fc_weight.shape[0]
    expect = {
        "norm_weight": (d,),
        "norm_bias": (d,),
        "fc_weight": (h, d),
        "fc_bias": (h,),
        "proj_weight": (d, h),
        "proj_bias": (d,),
    }
    given = {
        "norm_weight": norm_weight,
        "norm_bias": norm_bias,
        "fc_weight": fc_weight,
        "fc_bias": fc_bias,
        "proj_weight": proj_weight,
        "proj_bias": proj_bias,
    }
    _check_weights(x, given, expect, f"d={d}, h={h}", norm, norm_bias)


def normalize(x, weight, bias, norm, eps):
    """RMS norm (x / sqrt(mean(x^2) + eps) * w) or LayerNorm over the last dim, in fp32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    w = None if weight is None else weight.to(xf.dtype)
    b = None if bias is None else bias.to(xf.dtype)
    d = x.shape[-1]
    if norm == "rms":
        y = F.rms_norm(xf, (d,), w, eps)
    else:
        y = F.layer_norm(xf, (d,), w, b, eps)
    return y.to(x.dtype)


def activate(x, activation):
    """iGPT's quick GELU, x * sigmoid(1.702 x), or the exact (erf) GELU."""
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


def ln_mlp(
    x,
    norm_weight,
    norm_bias,
    fc_weight,
    fc_bias,
    proj_weight,
    proj_bias,
    *,
    norm="rms",
    eps=1e-5,
    activation="quick_gelu",
    residual=True,
    backend="auto",
):
    """Reference y = x + proj(act(fc(norm(x)))) (without ``x +`` when residual=False).

    x: (..., d); norm_weight, norm_bias: (d,) or None; fc_weight: (h, d), fc_bias: (h,) or
    None; proj_weight: (d, h), proj_bias: (d,) or None, all in x's dtype and device.
    Returns (..., d). The norm's statistics are computed in fp32; the GEMMs run in x's dtype,
    as eager PyTorch would.
    """
    check_ln_mlp(
        x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, norm, eps, activation
    )
    if backend not in ("auto", "torch"):
        raise ValueError(f"the reference ln_mlp only runs backend='torch', got {backend!r}")
    n = normalize(x, norm_weight, norm_bias, norm, eps)
    y = F.linear(activate(F.linear(n, fc_weight, fc_bias), activation), proj_weight, proj_bias)
    return x + y if residual else y


# --------------------------------------------------------------------------------------
# palette quantization
# --------------------------------------------------------------------------------------


def check_palette(palette) -> None:
    """Validate a (K, 3) float32 palette of finite RGB values, 1 <= K <= MAX_COLORS.

    The finiteness check reads the values, so ``torch.compile`` tracing skips it."""
    check_tensor("palette", palette, dims=2, dtypes=(torch.float32,))
    if palette.shape[1] != 3 or not 1 <= palette.shape[0] <= MAX_COLORS:
        raise ValueError(
            f"palette must be (K, 3) with 1 <= K <= {MAX_COLORS}, got {tuple(palette.shape)}"
        )
    if readable(palette) and not torch.isfinite(palette).all():
        raise ValueError("palette contains NaN or infinite values")


def check_quantize(pixels, palette) -> None:
    """Validate the arguments of ``quantize``."""
    check_tensor("pixels", pixels, dtypes=(torch.uint8,))
    if pixels.dim() < 1 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be uint8 (..., 3) RGB, got shape {tuple(pixels.shape)}")
    check_palette(palette)
    if palette.device != pixels.device:
        raise ValueError(f"palette is on {palette.device} but pixels are on {pixels.device}")


INT_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)


def check_dequantize(tokens, palette) -> None:
    """Validate the arguments of ``dequantize``, including the range of the token ids.

    Any integer dtype is taken (uint16 is the package's token cache). The range check reads
    the values, so ``torch.compile`` tracing skips it."""
    check_palette(palette)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in INT_DTYPES:
        raise TypeError(f"tokens must be an integer tensor, got {str(tokens.dtype)[6:]}")
    if tokens.device != palette.device:
        raise ValueError(f"tokens are on {tokens.device} but palette is on {palette.device}")
    if tokens.numel() and readable(tokens):
        ids = token_ids(tokens)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= palette.shape[0]:
            raise ValueError(
                f"tokens must lie in [0, {palette.shape[0]}) for a palette of "
                f"{palette.shape[0]} colours, got values in [{lo}, {hi}]"
            )


def token_ids(tokens):
    """Integer tokens of any dtype as int64 indices (torch's uint16/32/64 lack min, max and
    indexing kernels)."""
    if tokens.dtype == torch.int64:
        return tokens
    if tokens.dtype == torch.uint64:
        # values >= 2^63 would wrap to negative int64 and be reported as out of range
        return tokens.view(torch.int64)
    return tokens.to(torch.int64)


def quantize(pixels, palette, *, backend="auto"):
    """Reference nearest-colour quantization.

    pixels: uint8 (..., 3) RGB; palette: float32 (K, 3) in 0..255. Returns int64 (...): the
    index of the palette colour at the smallest squared Euclidean distance, the lowest index
    on exact ties. Distances are exact differences squared in float32, in chunks so memory
    stays bounded for any input size.
    """
    check_quantize(pixels, palette)
    if backend not in ("auto", "torch"):
        raise ValueError(f"the reference quantize only runs backend='torch', got {backend!r}")
    flat = pixels.reshape(-1, 3)
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=pixels.device)
    chunk = max(1, (1 << 22) // palette.shape[0])
    for start in range(0, flat.shape[0], chunk):
        p = flat[start : start + chunk].float()  # (n, 3)
        dist = torch.zeros(p.shape[0], palette.shape[0], device=p.device)  # (n, K)
        for c in range(3):
            dist += (p[:, c, None] - palette[None, :, c]).square()
        out[start : start + chunk] = dist.argmin(dim=1)
    return out.reshape(pixels.shape[:-1])


def dequantize(tokens, palette):
    """Map token ids (...) back to uint8 RGB (..., 3) through the palette (rounded, clamped)."""
    check_dequantize(tokens, palette)
    return palette.round().clamp(0, 255).to(torch.uint8)[token_ids(tokens)]


# --------------------------------------------------------------------------------------
# norm -> linear (the qkv projection)
# --------------------------------------------------------------------------------------


def check_ln_linear(x, norm_weight, norm_bias, weight, bias, norm, eps) -> None:
    """Validate the arguments of ``ln_linear``; raise TypeError/ValueError naming the culprit."""
    _check_norm_input(x, norm, eps)
    d = x.shape[-1]
    check_tensor("weight", weight, dims=2, dtypes=(x.dtype,), device=x.device)
    n = weight.shape[0]
    expect = {"norm_weight": (d,), "norm_bias": (d,), "weight": (n, d), "bias": (n,)}
    given = {"norm_weight": norm_weight, "norm_bias": norm_bias, "weight": weight, "bias": bias}
    _check_weights(x, given, expect, f"d={d}, n={n}", norm, norm_bias)


def ln_linear(x, norm_weight, norm_bias, weight, bias, *, norm="rms", eps=1e-5, backend="auto"):
    """Reference linear(norm(x)): x (..., d), weight (n, d), bias (n,) or None -> (..., n).

    The norm's statistics are computed in fp32 and its output rounded to x's dtype before
    the GEMM, as eager PyTorch would.
    """
    check_ln_linear(x, norm_weight, norm_bias, weight, bias, norm, eps)
    if backend not in ("auto", "torch"):
        raise ValueError(f"the reference ln_linear only runs backend='torch', got {backend!r}")
    return F.linear(normalize(x, norm_weight, norm_bias, norm, eps), weight, bias)


def neighbour_table(centres, m: int):
    """Each centre's ``m`` nearest other centres: ``(near, near_dist, beyond)``, with
    ``near`` (K, m') int32 indices nearest first (m' = min(m, K - 1)), ``near_dist`` (K, m')
    float64 their distances and ``beyond`` (K,) float64 the distance to the nearest centre
    not in the row (+inf when there is none). ``centres``: (K, 3) float64."""
    K = centres.shape[0]
    m = max(0, min(m, K - 1))
    # differences squared and summed: cdist's GEMM form would lose float64 bits
    between = torch.cdist(centres, centres, compute_mode="donot_use_mm_for_euclid_dist")
    between.fill_diagonal_(math.inf)
    dist, near = torch.topk(between, min(m + 1, K - 1), dim=1, largest=False)  # nearest first
    beyond = dist[:, m] if m < K - 1 else torch.full((K,), math.inf, dtype=centres.dtype)
    return near[:, :m].to(torch.int32).contiguous(), dist[:, :m].contiguous(), beyond.contiguous()


def clear_nearest(x, centres, best, near, near_dist, beyond, margin: float):
    """(n,) bool: whether ``centres[best]`` is nearer to ``x`` than every other centre by more
    than ``margin`` in float64 squared distance, proven with ``neighbour_table``'s tables:
    every listed neighbour is checked, and the unlisted ones are bounded by the triangle
    inequality, |x - c_k| >= beyond[best] - |x - c_best|, which clears the margin when
    beyond^2 > 4 (|x - c_best|^2 + margin). True only where it holds; exact and near ties,
    and pixels the bound cannot settle, give False. x: (n, 3) float32/float64."""
    x = x.double()
    d_best = (x - centres[best]).square().sum(1)
    gaps = (x[:, None, :] - centres[near[best].long()]).square().sum(2) - d_best[:, None]
    bound = beyond[best].square() > 4 * (d_best + margin)
    return (gaps > margin).all(1) & bound
