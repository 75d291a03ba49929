"""Benchmark: sampling throughput of ``IGPT.generate`` against transformers' ``generate``.

The issue's workload: 64 images at 32x32 (1024 tokens each) from iGPT-S, plain sampling
(temperature 1, no top-k/top-p) with a KV cache, on the same weights (``igpt.hf.to_hf``),
in the same run and dtype. Providers:

    igpt           IGPT.generate: preallocated cache, the attention kernel's decode path
    igpt+graph     the same with cuda_graph=True (each one-token step replayed as a graph)
    transformers   ImageGPTForCausalImageModeling.generate(do_sample=True, use_cache=True)

Reports tokens/s (images x 1024 / wall seconds, prefill included), the speed-up over
transformers and the peak GPU memory of each run. Weights are random (a non-zero head, so
the distributions are not uniform); the speed does not depend on them.

    python benchmarks/bench_sample.py [--quick] [--dtype bf16] [--out DIR]
    igpt bench sample

Writes OUT/sample.json after every provider (nothing is lost if a later one fails) and
prints a Markdown table. Without a GPU it runs a tiny CPU version (n_px=8, 2 layers, 4
images) as a smoke test of the script; its numbers are not a measurement.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, table, write  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BUDGET_S = 120  # igpt bench runs under a timeout: start no provider after this long


def _seconds(fn) -> tuple[float, float | None]:
    """(wall seconds, peak GiB) of one call of ``fn``; peak is None off the GPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return seconds, peak


def _hf_generate(hf, n, tokens, sos):
    """transformers' sampling loop from SOS for ``tokens`` new tokens."""
    ids = torch.full((n, 1), sos, dtype=torch.long, device=hf.device)
    return hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        use_cache=True,
        pad_token_id=sos,
    )


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--images", type=int, default=64, help="images per run (64)")
    args = p.parse_args(argv)

    from igpt import IGPT, IGPTConfig
    from igpt.hf import to_hf

    cuda = torch.cuda.is_available()
    if cuda:
        device, dtype, n = "cuda", DTYPES[args.dtype], args.images
        cfg = IGPTConfig.from_name("igpt-s", n_px=32)
        label = "igpt-s @ 32x32"
        if args.quick:
            n = min(n, 16)
    else:
        print("no CUDA GPU: running a tiny CPU smoke version (not a measurement)")
        device, dtype, n = "cpu", torch.float32, 4
        cfg = IGPTConfig(n_px=8, n_layer=2, n_head=2, n_embd=64, n_colors=16)
        label = "tiny @ 8x8 (cpu smoke)"
    torch.manual_seed(0)
    model = IGPT(cfg).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    hf = to_hf(model).to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    T = cfg.n_positions

    providers = {
        "igpt": lambda: model.generate(n, seed=0),
        "igpt+graph": lambda: model.generate(n, seed=0, cuda_graph=True),
        "transformers": lambda: _hf_generate(hf, n, T, cfg.sos_id),
    }
    warmups = {  # compile and autotune outside the timed call
        "igpt": providers["igpt"],
        "igpt+graph": providers["igpt+graph"],
        "transformers": lambda: _hf_generate(hf, n, 8, cfg.sos_id),
    }
    rows, start = [], time.perf_counter()
    for name, fn in providers.items():
        row = dict(model=label, dtype=str(dtype)[6:], images=n, tokens=n * T, provider=name)
        if time.perf_counter() - start > BUDGET_S:
            rows.append({**row, "note": f"skipped: over the {BUDGET_S} s budget"})
            continue
        try:
            warmups[name]()
            seconds, peak = _seconds(fn)
        except Exception as e:  # one failing provider must not lose the others' rows
            rows.append({**row, "note": f"failed: {type(e).__name__}: {e}"[:300]})
            write("sample", rows, args.out)
            continue
        rows.append({**row, "seconds": seconds, "tokens_per_s": n * T / seconds, "peak_gib": peak})
        write("sample", rows, args.out)
    base = next((r for r in rows if r["provider"] == "transformers" and "seconds" in r), None)
    for r in rows:
        if base and "seconds" in r:
            r["speedup_vs_hf"] = base["seconds"] / r["seconds"]
    path = write("sample", rows, args.out)
    cols = ["model", "dtype", "images", "provider", "seconds", "tokens_per_s", "speedup_vs_hf"]
    print(table(rows, cols + ["peak_gib", "note"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
