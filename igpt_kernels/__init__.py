"""igpt_kernels: the hand-written kernels behind igpt, usable on their own.

Ops (see each module's docstring for shapes, dtypes and limits):
    attention(q, k, v, *, causal, key_padding_mask, sm_scale, backend)
    ln_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, ...)
    ln_linear(x, norm_weight, norm_bias, weight, bias, *, norm, eps, backend)
    quantize(pixels, palette, *, backend), dequantize(tokens, palette)
``igpt_kernels.reference`` holds the plain-PyTorch reference of each, same signatures.
The kernel launches are ``torch.library`` custom ops, ``torch.ops.igpt.*`` (see
``igpt_kernels._ops``), which ``torch.compile`` and ``torch.export`` keep as single nodes.

``backend="auto"`` on a GPU times the eligible backends once per kind of call and keeps the
fastest: ``dispatch_table()`` lists what it learned, ``set_dispatch("fixed")`` (or
``IGPT_DISPATCH=fixed``) turns the measuring off (see ``igpt_kernels._dispatch``).
"""

from igpt_kernels._dispatch import dispatch_table, set_dispatch
from igpt_kernels.attention import attention
from igpt_kernels.ln_mlp import ln_linear, ln_mlp
from igpt_kernels.palette import dequantize, quantize

__all__ = [
    "attention",
    "ln_mlp",
    "ln_linear",
    "quantize",
    "dequantize",
    "dispatch_table",
    "set_dispatch",
]
__version__ = "0.1.0"
