"""Feature extraction for linear probes: images/s for all L + 1 pooled features.

Ours: ``igpt.probe.extract_features`` (one pass per batch through ``IGPT.features``, the
Triton kernels, bf16 autocast, fp32 pooling, features copied to the host) and the bare
``IGPT.features`` call on the GPU. Baseline: transformers' ImageGPT with the same weights
(``igpt.hf.to_hf``) under bf16 autocast, ``output_hidden_states=True``, then the same
pooling a user would write (each block's ln_1 on its input hidden state, ln_f's output for
the last) — the features agree with ours to bf16 error, reported as ``max_abs_diff``.
Default: iGPT-S at 32x32 (1024 tokens), batch 64. GPU only: on a CPU it says so and exits.

    python benchmarks/bench_probe.py [--quick] [--model igpt-s] [--images 1024]
"""

from __future__ import annotations

import sys

import common
import torch
from common import parser, peak_gib, table, time_ms, write

from igpt import IGPT, IGPTConfig
from igpt.hf import to_hf
from igpt.probe import extract_features


def hf_features(hf, tokens, batch_size, sos_id):
    """All L + 1 pooled features the transformers way: (N, L + 1, d) float32 on the GPU."""
    blocks = hf.transformer.h
    out = []
    for s in range(0, len(tokens), batch_size):
        x = tokens[s : s + batch_size]
        sos = x.new_full((len(x), 1), sos_id)
        ids = torch.cat([sos, x[:, :-1]], dim=1)  # (B, n): HF(input_ids=[SOS] + x[:-1])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            hs = hf.transformer(
                input_ids=ids, output_hidden_states=True, use_cache=False
            ).hidden_states
            # hs[l] = h^l for l < L (block l's input), hs[L] = ln_f(h^L)
            pooled = [blocks[i].ln_1(h).float().mean(1) for i, h in enumerate(hs[:-1])]
            pooled.append(hs[-1].float().mean(1))
        out.append(torch.stack(pooled, dim=1))
    return torch.cat(out)


def ours_on_gpu(model, tokens, batch_size):
    """The bare ``IGPT.features`` pass, features left on the GPU (no host copy)."""
    out = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for s in range(0, len(tokens), batch_size):
            out.append(model.features(tokens[s : s + batch_size]))
    return torch.cat(out)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="igpt-s", help="named size (default igpt-s)")
    p.add_argument("--n-px", type=int, default=32, help="image side (default 32)")
    p.add_argument("--images", type=int, default=None, help="images per pass (default 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        common.exit_without_gpu("probe")

    n_images = args.images or (256 if args.quick else 1024)
    rep = 2 if args.quick else 5
    cfg = IGPTConfig.from_name(args.model, n_px=args.n_px)
    torch.manual_seed(0)
    model = IGPT(cfg).cuda().eval()
    hf = to_hf(model).cuda().eval()
    tokens = torch.randint(0, cfg.n_colors, (n_images, cfg.n_positions), device="cuda")
    host_tokens = tokens.cpu()
    B = args.batch_size

    reference = hf_features(hf, tokens, B, cfg.sos_id)
    candidates = {
        "transformers ImageGPT (bf16, output_hidden_states)": lambda: hf_features(
            hf, tokens, B, cfg.sos_id
        ),
        "igpt IGPT.features (bf16, on GPU)": lambda: ours_on_gpu(model, tokens, B),
        "igpt extract_features (to host)": lambda: extract_features(
            model, host_tokens, batch_size=B, progress=False
        ),
    }
    rows = []
    for name, fn in candidates.items():
        feats = fn()
        diff = (feats.to(reference.device) - reference).abs().max().item()
        ms = time_ms(fn, warmup=1, rep=rep)
        rows.append(
            {
                "impl": name,
                "model": args.model,
                "n_px": args.n_px,
                "batch": B,
                "images": n_images,
                "layers": cfg.n_layer + 1,
                "ms": ms,
                "images_per_s": n_images / (ms / 1e3),
                "peak_gib": peak_gib(fn),
                "max_abs_diff": diff,
            }
        )
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
    print(
        table(rows, ["impl", "images", "ms", "images_per_s", "speedup", "peak_gib", "max_abs_diff"])
    )
    print(f"wrote {write('probe', rows, args.out)}")


if __name__ == "__main__":
    sys.exit(main())
