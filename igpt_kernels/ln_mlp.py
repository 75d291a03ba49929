"""Fused pre-norm MLP: y = x + proj(act(fc(norm(x)))).

x: (..., d); weights in nn.Linear layout (fc_weight (h, d), proj_weight (d, h)). norm "rms"
(x / sqrt(mean(x^2) + eps) * w, iGPT's) or "layer"; activation "quick_gelu" (x *
sigmoid(1.702 x), iGPT's) or "gelu" (erf).

Backends: "torch" (``reference.ln_mlp``). The Triton kernel is not built yet; asking for
backend="triton" raises a ValueError that says so.
"""

from __future__ import annotations

from igpt_kernels import reference
from igpt_kernels._dispatch import resolve


def _triton_unavailable(x) -> str | None:
    return "the Triton ln_mlp kernel is not implemented yet"


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
    """Norm -> fc -> activation -> proj (+ residual), differentiable in x and every weight.

    Args:
        x: (..., d) float16, bfloat16 or float32 (float64 on the "torch" backend).
        norm_weight: (d,) or None; norm_bias: (d,) or None (must be None for norm="rms").
        fc_weight: (h, d); fc_bias: (h,) or None.
        proj_weight: (d, h); proj_bias: (d,) or None.
        norm: "rms" or "layer". eps: the norm's epsilon.
        activation: "quick_gelu" or "gelu". residual: add x to the output.
        backend: "auto", "triton" or "torch".

    Returns:
        y: (..., d) in x's dtype.
    """
    reference.check_ln_mlp(
        x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, norm, eps, activation
    )
    name = resolve("ln_mlp", backend, {"triton": _triton_unavailable(x)}, ("triton",))
    return reference.ln_mlp(
        x,
        norm_weight,
        norm_bias,
        fc_weight,
        fc_bias,
        proj_weight,
        proj_bias,
        norm=norm,
        eps=eps,
        activation=activation,
        residual=residual,
        backend=name,
    )
