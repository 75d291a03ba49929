"""igpt_kernels: the hand-written kernels behind igpt, usable on their own.

Ops (see each module's docstring for shapes, dtypes and limits):
    attention(q, k, v, *, causal, key_padding_mask, sm_scale, backend)
    ln_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, ...)
    ln_linear(x, norm_weight, norm_bias, weight, bias, *, norm, eps, backend)
    quantize(pixels, palette, *, backend), dequantize(tokens, palette)
``igpt_kernels.reference`` holds the plain-PyTorch reference of each, same signatures.
The kernel launches are ``torch.library`` custom ops, ``torch.ops.igpt.*``, each registered
beside its launcher (``attention``, ``ln_mlp``, ``ln_linear``, ``palette``), which
``torch.compile`` and ``torch.export`` keep as single nodes.

The package's attributes ``attention``, ``ln_mlp`` and ``ln_linear`` are the functions, which
hide the submodules of the same names: reach a submodule's other names with
``from igpt_kernels.attention import run_backend`` (never ``import igpt_kernels.attention as
m``, which gives the function). No module of the package needs another's module object.

``backend="auto"`` on a GPU has PyTorch judge the eligible backends once per kind of call
(output and every gradient against a float64 reference, within 2x / 3x of PyTorch's own
error: ``igpt_kernels.trust``), times those that pass and keeps the fastest;
``dispatch_table()`` lists the choices and verdicts, ``set_dispatch("fixed")`` (or
``IGPT_DISPATCH=fixed``) turns the measuring off, and then, as while compiling or capturing,
only a kernel verified on that GPU is used, else the PyTorch backend (see
``igpt_kernels._dispatch``). ``selftest()`` (``igpt selftest``) checks every kernel here.
"""

from igpt_kernels._dispatch import dispatch_table, set_dispatch
from igpt_kernels._version import VERSION
from igpt_kernels.attention import attention
from igpt_kernels.ln_linear import ln_linear
from igpt_kernels.ln_mlp import ln_mlp
from igpt_kernels.palette import dequantize, quantize
from igpt_kernels.selftest import selftest

__all__ = [
    "attention",
    "ln_mlp",
    "ln_linear",
    "quantize",
    "dequantize",
    "dispatch_table",
    "set_dispatch",
    "selftest",
]
__version__ = VERSION
