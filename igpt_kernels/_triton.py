"""Import Triton where it is installed, or a stand-in so kernel modules still import.

Kernel modules write ``from igpt_kernels._triton import HAS_TRITON, tl, triton`` and decorate
their kernels as usual. Without Triton the decorators return the function unchanged and
``HAS_TRITON`` is False, so dispatch never launches them.

Also the plumbing every op shares, so a new op copies none of it: the one autotune switch
(``AUTOTUNE``, env ``IGPT_AUTOTUNE``), config lists (``configs``), a kernel with its configs
and autotuner (``Tuned``, whose ``launch`` honours the switch) and the SM count.
"""

import os
import warnings
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs (macOS, Windows) have no Triton
    HAS_TRITON = False

    def _identity_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = SimpleNamespace(
        jit=_identity_decorator,
        autotune=_identity_decorator,
        heuristics=_identity_decorator,
        Config=lambda *a, **k: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length(),
    )
    tl = SimpleNamespace(constexpr=int)

__all__ = [
    "AUTOTUNE",
    "HAS_TRITON",
    "Tuned",
    "autotuning",
    "configs",
    "device_arch",
    "sm_count",
    "tl",
    "triton",
]


# --------------------------------------------------------------------------------------
# what every Triton op shares: the autotune switch, config lists, launching, the GPU size
# --------------------------------------------------------------------------------------

_LEGACY_AUTOTUNE_ENV = ("IGPT_ATTENTION_AUTOTUNE", "IGPT_LN_MLP_AUTOTUNE")


def _autotune_from_env() -> bool:
    """IGPT_AUTOTUNE=0 turns autotuning off for every op (the per-op names still work)."""
    value = os.environ.get("IGPT_AUTOTUNE")
    for name in _LEGACY_AUTOTUNE_ENV:
        if name in os.environ:
            warnings.warn(
                f"{name} is deprecated; set IGPT_AUTOTUNE instead", DeprecationWarning, stacklevel=2
            )
            value = os.environ[name] if value is None else value
    return value != "0"


# Autotuning compiles and times every config of a kernel once per autotune key (shapes,
# dtypes, flags). False (IGPT_AUTOTUNE=0) launches the first config of each list instead:
# quick compiles for the GPU tests, possibly slower kernels.
AUTOTUNE = _autotune_from_env()


def autotuning() -> bool:
    """``AUTOTUNE`` as it is now (tests and users may set it after import): a verdict judged
    the autotuned launch or the default config, so it is part of the dispatch keys."""
    return AUTOTUNE


# IGPT_AUTOTUNE_LOG=FILE appends one JSON line per autotuning (kernel, key, every config's
# time in ms, the winner): what the autotuner saw on a GPU, for tuning the config lists.
AUTOTUNE_LOG = os.environ.get("IGPT_AUTOTUNE_LOG")


def _log_tuning(tuner, keys) -> None:
    import json

    timings = getattr(tuner, "configs_timings", None) or {}
    row = {
        "kernel": getattr(tuner.base_fn, "__name__", str(tuner.base_fn)),
        "keys": [str(k) for k in keys],
        "best": str(tuner.cache[next(iter(keys))]),
        "ms": {str(c): t if isinstance(t, float) else list(t) for c, t in timings.items()},
    }
    with open(AUTOTUNE_LOG, "a") as f:
        f.write(json.dumps(row) + "\n")


def configs(names, rows, **fixed):
    """triton.Configs from rows of (*block sizes named by ``names``, num_warps, num_stages)."""
    return [
        triton.Config(
            {**dict(zip(names, row[:-2], strict=True)), **fixed},
            num_warps=row[-2],
            num_stages=row[-1],
        )
        for row in rows
    ]


def device_arch(device) -> int:
    """The config family of a device: 90 for Hopper and later, 80 for Ampere/Ada (and for
    the interpreter, whose single config list is the same for both)."""
    if device.type == "cuda":
        import torch

        return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    return 80


class Tuned:
    """A kernel, its configs (the first is the default) and its autotuner over them.

    ``config_list`` is one list, or a dict of lists per ``device_arch`` (90, 80) where the
    architectures need different tiles (register pressure differs: sm_80's mma.sync keeps
    operands in registers that sm_90a's wgmma reads from shared memory).
    """

    def __init__(self, kernel, config_list, key):
        self.kernel = kernel
        if not isinstance(config_list, dict):
            config_list = {90: config_list, 80: config_list}
        self.by_arch = config_list
        self._key = key
        self._tuners = {}

    def launch(self, grid, *args, **kwargs):
        """Run autotuned (``AUTOTUNE``) or with the default config of the device's list.

        grid: a function of the config's meta-parameters to the launch grid.
        """
        config_list = self.by_arch[device_arch(args[0].device)]
        if AUTOTUNE:
            key = id(config_list)
            if key not in self._tuners:
                self._tuners[key] = triton.autotune(config_list, key=self._key)(self.kernel)
            tuner = self._tuners[key]
            seen = set(tuner.cache) if AUTOTUNE_LOG else None
            tuner[grid](*args, **kwargs)
            if AUTOTUNE_LOG and len(tuner.cache) > len(seen):
                _log_tuning(tuner, set(tuner.cache) - seen)
            return
        config = config_list[0]
        self.kernel[grid(config.kwargs)](
            *args,
            **kwargs,
            **config.kwargs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter), so tests
    at tiny shapes exercise the split paths that fill a GPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
