"""What ``backend="auto"`` costs per call once its choice is made (issue 31, item 6).

On a GPU, ``"auto"`` judges and times the candidates on the first call of a kind of call and
remembers the winner; every later call of that kind only looks the choice up. This measures
that look-up on the CPU through the dispatcher's test seams (``DISPATCH.device_name`` names
a fake GPU, ``DISPATCH.clock`` the CPU's clock, ``DISPATCH.cache_dir=False``: no file), so
the first call judges and chooses with the real CPU backends and the later ones take the
path a GPU takes (``WallClock`` times the first call's candidates):

    auto      the public op with ``backend="auto"`` (validation, the look-up, the backend)
    direct    the chosen backend's own call (``attention_module.run_backend(chosen, ...)``,
              ``ln_mlp``'s ``_ln_mlp_on(chosen, ...)``): the backend without the public
              op's validation or any dispatch
    overhead  auto - direct, in microseconds per call (validation included)

The difference of two noisy times of a few hundred microseconds is itself noisy on a shared
machine, so each case runs a second time with the backend replaced by a stub that returns
its first input (``stubbed``: the module's ``run_backend`` / ``_ln_mlp_on`` swapped after the
choice is made): ``auto`` then costs only the Python around the backend, and ``direct`` the
stub itself.

Each case times blocks of ``--calls`` calls of each side in turns and reports the medians of
the blocks, and the overhead between the two sides' fastest blocks (``overhead_min_us``: on
a loaded machine the least disturbed figure); tiny tensors keep the backends' own time, and
so the noise, small.

On a GPU (``--device cuda``, the default where one is visible) the dispatcher is the real
one (CUDA events, the GPU's name, a temporary cache folder) and the tensors are on the GPU;
each timed block ends with a synchronize.

    python benchmarks/bench_dispatch.py [--calls 500] [--rounds 15] [--device cpu|cuda]

Writes OUT/dispatch.json and prints a Markdown table.
"""

from __future__ import annotations

import importlib
import math
import statistics
import tempfile
import time

import torch
from common import parser, table, wall_ms, write

from igpt_kernels import _dispatch, attention, ln_mlp

attention_module = importlib.import_module("igpt_kernels.attention")
ln_mlp_module = importlib.import_module("igpt_kernels.ln_mlp")


class WallClock:
    """The CPU's own clock for ``DISPATCH.clock`` (CUDA events need a GPU): the first call
    of a kind times the CPU backends for real, and the fastest wins, as on a GPU."""

    mark = staticmethod(time.perf_counter)

    def sync(self):
        """Nothing is queued on a CPU."""

    def elapsed_ms(self, a, b):
        return (b - a) * 1e3


def use_dispatcher(device: str, cache_dir):
    """A fresh ``DISPATCH``: on the CPU its seams set so the CPU is a GPU named "Fake GPU"
    (the CPU's clock, no cache file); on a GPU the real one, caching under ``cache_dir``."""
    if device == "cpu":
        d = _dispatch.Dispatcher(
            clock=WallClock(), device_name=lambda dev: "Fake GPU", cache_dir=False, mode="measure"
        )
    else:
        d = _dispatch.Dispatcher(cache_dir=cache_dir, mode="measure")
    _dispatch.DISPATCH = d
    return d


DEVICE = "cpu"  # set by main


def _randn(*shape, g):
    return torch.randn(*shape, generator=g).to(DEVICE)


def attention_case(B, H, Nq, Nk, D, causal):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q = _randn(B, H, Nq, D, g=g).to(dtype)
    k, v = (_randn(B, H, Nk, D, g=g).to(dtype) for _ in range(2))
    scale = 1.0 / math.sqrt(D)
    chosen = attention_module.choose_backend(q, k, v, causal=causal)  # judged, timed, kept

    def auto():
        return attention(q, k, v, causal=causal)

    def direct():
        return attention_module.run_backend(chosen, q, k, v, causal, None, scale)

    return chosen, auto, direct


def ln_mlp_case(T, d):
    g = torch.Generator().manual_seed(0)
    x = _randn(T, d, g=g)
    params = (torch.ones(d, device=DEVICE), None, _randn(4 * d, d, g=g) / d**0.5, None)
    params += (_randn(d, 4 * d, g=g) / (2 * d**0.5), None)
    opts = ("rms", 1e-5, "quick_gelu", True)
    ln_mlp(x, *params)  # judged, timed, kept (on the CPU without Triton: only "torch")
    rows = [r for r in _dispatch.dispatch_table() if r["key"].startswith("ln_mlp")]
    chosen = rows[0]["backend"] if rows else "torch"

    def auto():
        return ln_mlp(x, *params)

    def direct():
        return ln_mlp_module._ln_mlp_on(chosen, x, params, *opts)

    return chosen, auto, direct


CASES = {
    "attention decode (B8 H8 Nq1 Nk256 D64)": lambda: attention_case(8, 8, 1, 256, 64, True),
    "attention causal (B1 H2 N16 D32)": lambda: attention_case(1, 2, 16, 16, 32, True),
    "ln_mlp (T8 d64)": lambda: ln_mlp_case(8, 64),
}


def stubbed(name):
    """The case's module with its backend call replaced by ``lambda name, x, *rest: x``."""
    module, attr = (
        (attention_module, "run_backend") if name.startswith("attention") else
        (ln_mlp_module, "_ln_mlp_on")
    )  # fmt: skip
    real = getattr(module, attr)

    def stub(chosen, x, *rest):
        return x

    setattr(module, attr, stub)
    return lambda: setattr(module, attr, real)


def measure(name, chosen, auto, direct, args):
    """One row: microseconds per call of each side, blocks timed in turns; the median of the
    blocks and their minimum (on a loaded machine the minimum is the least disturbed)."""
    blocks = {"auto": per_call_us(auto, args.calls), "direct": per_call_us(direct, args.calls)}
    us = {side: [] for side in blocks}
    for i in range(2 + args.rounds):  # two warm-up rounds
        for side, block in blocks.items():
            t = wall_ms(block) * 1e3 / args.calls
            if i >= 2:
                us[side].append(t)
    med = {side: statistics.median(t) for side, t in us.items()}
    low = {side: min(t) for side, t in us.items()}
    return {
        "case": name,
        "chosen": chosen,
        "auto_us": round(med["auto"], 1),
        "direct_us": round(med["direct"], 1),
        "overhead_us": round(med["auto"] - med["direct"], 1),
        "overhead_min_us": round(low["auto"] - low["direct"], 1),
    }


def per_call_us(fn, calls):
    def block():
        for _ in range(calls):
            fn()

    return block


def case_rows(name, make, args):
    """The case with its backend, then with the backend stubbed."""
    chosen, auto, direct = make()
    rows = [measure(name, chosen, auto, direct, args)]
    restore = stubbed(name)
    try:
        rows.append(measure(name + ", stubbed", chosen, auto, direct, args))
    finally:
        restore()
    return rows


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--calls", type=int, default=500, help="calls per timed block")
    p.add_argument("--rounds", type=int, default=15, help="blocks per side (medians)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.calls, args.rounds = min(args.calls, 100), min(args.rounds, 5)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        use_dispatcher(DEVICE, cache_dir)
        for name, make in CASES.items():
            rows += case_rows(name, make, args)
    for row in rows:
        row["device"] = DEVICE

    print(table(rows, ["case", "chosen", "auto_us", "direct_us", "overhead_us", "overhead_min_us"]))
    write("dispatch", rows, args.out)


if __name__ == "__main__":
    main()
