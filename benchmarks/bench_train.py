"""Benchmark: one training step at 64x64 context (4096 tokens), bf16, against PyTorch and HF.

The issue's workload: iGPT-S at 64^2, batch 8, bf16 autocast over fp32 master weights, AR
cross-entropy. Each provider is timed two ways, in the same run, on the same random tokens:

    fwd+bwd   forward, loss, backward (the issue's reference figures are this)
    step      forward, loss, backward, Adam step (fused), zero_grad

Providers (all the same size: wte, wpe, L pre-norm blocks, ln_f, untied 512-way head):

    igpt            igpt.IGPT (the attention and ln_mlp kernels), no activation checkpointing
    igpt ckpt=k     the same with apply_checkpointing(model, k) (recompute every k-th block)
    igpt plan=X     the same under ``igpt.memory.plan``'s plan for X per GPU (40GiB): its
                    micro-batch x accumulation (same global batch), checkpointing, offload
    sdpa eager      a nanoGPT-style model: nn.Linear + F.scaled_dot_product_attention
    sdpa compile    the same under torch.compile
    hf              transformers' ImageGPTForCausalImageModeling
    hf ckpt         the same with gradient_checkpointing_enable()

Reports tokens/s (batch x 4096 / median step time) and peak GiB (torch.cuda.max_memory_
allocated over a steady-state step: weights, gradients, Adam state and activations), and,
per model size, each provider's ratios to "sdpa compile" and "sdpa eager". Beside the
measured peak: ``predicted_gib``, ``igpt.memory.estimate``'s peak for the igpt providers and
sdpa eager (none for the compiled and HF models, which the memory model does not cover),
and ``measured_vs_predicted``. A second table, ``train_plans.json``, is ``igpt plan``'s
choice per model size for 24, 40 and 80 GiB (predicted, needs no GPU). The issue's
goals, read off one run: iGPT-S batch 8 at >= 1.2x sdpa-compile tokens/s with <= 0.5x its
peak; iGPT-M batch 8 in <= 16 GiB; iGPT-L batch 8 with Adam in <= 40 GiB at >= 1.0x
sdpa-eager tokens/s.

    python benchmarks/bench_train.py [--quick] [--models igpt-s,igpt-m,igpt-l] [--batch 8]
    igpt bench train

``igpt bench train`` runs iGPT-S only (it has a time budget; see BUDGET_S); pass
``--models`` for M and L. Writes OUT/train.json after every provider (a later OOM or
failure loses nothing) and prints a Markdown table. Without a GPU it runs a tiny CPU version
(n_px=8, 2 layers, fp32) as a smoke test of the script; its numbers are not a measurement.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, table, time_ms, write  # noqa: E402

from igpt import memory  # noqa: E402

BUDGET_S = 130  # igpt bench runs under a 150 s timeout: start no provider after this long
PLAN_BUDGETS_GIB = (24, 40, 80)


class SDPABlock(nn.Module):
    """A nanoGPT block with iGPT's choices: RMS norm, quick GELU, biased linears."""

    def __init__(self, d: int, n_head: int, eps: float):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.RMSNorm(d, eps=eps)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.RMSNorm(d, eps=eps)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)  # 3 x (B, N, d)
        q, k, v = (t.view(B, N, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, hd)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, N, d))
        h = self.c_fc(self.ln_2(x))  # (B, N, 4d)
        return x + self.mlp_proj(h * torch.sigmoid(1.702 * h))


class SDPAGPT(nn.Module):
    """The PyTorch model a user would write: same sizes as IGPT, SDPA attention."""

    def __init__(self, cfg):
        super().__init__()
        self.sos = cfg.sos_id
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(
            SDPABlock(cfg.n_embd, cfg.n_head, cfg.eps) for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.RMSNorm(cfg.n_embd, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.n_colors, bias=False)

    def forward(self, tokens):
        B, N = tokens.shape
        ids = torch.cat([tokens.new_full((B, 1), self.sos), tokens[:, :-1]], dim=1)  # (B, N)
        x = self.wte(ids) + self.wpe(torch.arange(N, device=tokens.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, N, n_colors)


def _memory_path(device) -> dict:
    """The ``device`` / ``precision`` of igpt.memory that models this run (CUDA: bf16
    autocast; the CPU smoke version: the fp32 reference path)."""
    cuda = torch.device(device).type == "cuda"
    return {"device": "cuda" if cuda else "cpu", "precision": "bf16" if cuda else "fp32"}


def policy(provider: str, cfg, batch: int, device) -> dict:
    """How a provider runs its step: checkpointing, micro-batch, accumulation, offload (and
    the plan's description for ``igpt plan=X``). A ValueError when plan=X fits nothing."""
    if provider.startswith("igpt plan="):
        budget = provider.split("plan=")[1]
        p = memory.plan(cfg, batch_size=batch, memory_bytes=budget, **_memory_path(device))
        if not p.fits:
            raise ValueError(f"nothing fits {budget}: {p.describe()}")
        return {"checkpointing": p.checkpointing, "micro": p.micro_batch,
                "accumulation": p.accumulation, "offload": p.offload,
                "policy": p.describe()}  # fmt: skip
    k = int(provider.split("ckpt=")[1]) if provider.startswith("igpt ckpt=") else 0
    return {"checkpointing": k, "micro": batch, "accumulation": 1, "offload": False}


def predicted_peak(provider: str, cfg, batch: int, mode: str, device) -> int | None:
    """``igpt.memory.estimate``'s peak bytes for a provider's fwd+bwd (no optimizer state)
    or step (fused Adam); None for the models it does not cover (compiled, HF)."""
    path = _memory_path(device)
    if provider.startswith("igpt"):
        kernels = "igpt"
    elif provider == "sdpa eager" and path["device"] == "cuda":
        kernels = "sdpa"
    else:
        return None
    pol = policy(provider, cfg, batch, device)
    est = memory.estimate(
        cfg, batch_size=pol["micro"], checkpointing=pol["checkpointing"],
        offload=pol["offload"], accumulation=pol["accumulation"],
        optimizer="adam" if mode == "step" else "sgd", kernels=kernels, **path,
    )  # fmt: skip
    return est.peak


def plan_rows(sizes, batch: int, budgets_gib=PLAN_BUDGETS_GIB, device="cuda") -> list[dict]:
    """``igpt plan``'s choice for each (name, config) of ``sizes`` and each budget (GiB):
    predicted by the memory model, no GPU needed."""
    rows = []
    for name, cfg in sizes:
        for gib in budgets_gib:
            p = memory.plan(cfg, batch_size=batch, memory_bytes=gib * 2**30, **_memory_path(device))
            text = p.describe()
            if not p.fits:
                text = f"nothing fits (needs {memory.format_size(p.needed_bytes)}"
                text += f"; or {p.needed_gpus} GPUs)" if p.needed_gpus else ")"
            rows.append({"model": name, "n_px": cfg.n_px, "batch": batch, "memory_gib": gib,
                         "fits": p.fits, "plan": text,
                         "predicted_gib": p.predicted_peak_bytes / 2**30})  # fmt: skip
    return rows


def _build(provider: str, cfg, device, checkpointing: int = 0):
    """(module, forward(tokens) -> logits) for a provider name (``checkpointing``: igpt's)."""
    from igpt import IGPT
    from igpt.train import apply_checkpointing

    if provider.startswith("igpt"):
        model = IGPT(cfg)
        apply_checkpointing(model, checkpointing)
        model = model.to(device).train()
        return model, model
    if provider.startswith("sdpa"):
        model = SDPAGPT(cfg).to(device).train()
        fwd = torch.compile(model) if provider == "sdpa compile" else model
        return model, fwd
    from igpt.hf import to_hf

    hf = to_hf(IGPT(cfg)).to(device).train()
    if provider == "hf ckpt":  # renamed in transformers 5
        getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    sos = cfg.sos_id

    def fwd(tokens):
        ids = torch.cat([tokens.new_full((tokens.shape[0], 1), sos), tokens[:, :-1]], dim=1)
        return hf(input_ids=ids, use_cache=False).logits[..., : cfg.n_colors]

    return hf, fwd


def _measure(provider, cfg, batch, device, amp, reps, warmup):
    """Rows for one provider: fwd+bwd and step, each with tokens/s, the measured peak GiB
    and the memory model's prediction."""
    torch.manual_seed(0)
    pol = policy(provider, cfg, batch, device)
    module, fwd = _build(provider, cfg, device, pol["checkpointing"])
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.Adam(module.parameters(), lr=1e-4, betas=(0.9, 0.95), **fused)
    tokens = torch.randint(0, cfg.n_colors, (batch, cfg.n_positions), device=device)
    micro, acc = pol["micro"], pol["accumulation"]

    def fwd_bwd():
        for m in range(acc):  # the same global batch in `acc` micro-batches
            rows = tokens[m * micro : (m + 1) * micro]
            with memory.activation_offload(pol["offload"]):  # forward + loss only
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = fwd(rows)
                loss = F.cross_entropy(logits.float().flatten(0, 1), rows.flatten())
            (loss / acc).backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def only_grads():
        fwd_bwd()
        opt.zero_grad(set_to_none=True)

    rows = []
    for mode, fn in (("fwd+bwd", only_grads), ("step", step)):
        ms = time_ms(fn, warmup=warmup, rep=reps)
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        predicted = predicted_peak(provider, cfg, batch, mode, device)
        predicted = None if predicted is None else predicted / 2**30
        row = {
            "mode": mode,
            "ms": ms,
            "tokens_per_s": batch * cfg.n_positions / (ms / 1e3),
            "peak_gib": peak,
            "predicted_gib": predicted,
            "measured_vs_predicted": peak / predicted if peak and predicted else None,
        }
        rows.append({**row, **({"policy": pol["policy"]} if "policy" in pol else {})})
    return rows


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # drop compiled graphs (and the memory they hold)


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="igpt-s", help="comma-separated sizes (default igpt-s)")
    p.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--n-px", type=int, default=64, help="image side (default 64: 4096 tokens)")
    p.add_argument(
        "--providers",
        default="igpt,sdpa eager,sdpa compile,igpt ckpt=1,igpt ckpt=2,hf ckpt,hf,"
        "igpt plan=24GiB,igpt plan=40GiB",
        help="comma-separated providers, run in this order",
    )
    p.add_argument("--no-budget", action="store_true", help=f"ignore the {BUDGET_S} s budget")
    args = p.parse_args(argv)

    from igpt import IGPTConfig

    cuda = torch.cuda.is_available()
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    if cuda:
        device, amp = torch.device("cuda"), True
        sizes = [(m, IGPTConfig.from_name(m, n_px=args.n_px)) for m in args.models.split(",")]
        batch, reps, warmup = args.batch, (3 if args.quick else 10), 2
    else:
        print("no CUDA GPU: running a tiny CPU smoke version (not a measurement)")
        device, amp, batch, reps, warmup = torch.device("cpu"), False, 2, 1, 1
        sizes = [("tiny", IGPTConfig(n_px=8, n_layer=2, n_head=2, n_embd=64, n_colors=16))]
        providers = [p for p in providers if p != "sdpa compile"]  # needs a C++ toolchain

    plans = plan_rows(sizes, batch, device=device)  # predicted: written before any run
    plans_path = write("train_plans", plans, args.out)
    start, rows = time.perf_counter(), []
    for name, cfg in sizes:
        for provider in providers:
            row = {
                "model": name,
                "n_px": cfg.n_px,
                "tokens": cfg.n_positions,
                "batch": batch,
                "dtype": "bf16" if amp else "fp32",
                "provider": provider,
            }
            if not args.no_budget and time.perf_counter() - start > BUDGET_S:
                rows.append({**row, "note": f"skipped: over the {BUDGET_S} s budget"})
                continue
            try:
                for r in _measure(provider, cfg, batch, device, amp, reps, warmup):
                    rows.append({**row, **r})
            except torch.cuda.OutOfMemoryError:
                rows.append({**row, "note": "out of memory"})
            except Exception as e:  # one failing provider must not lose the others' rows
                rows.append({**row, "note": f"failed: {type(e).__name__}: {e}"[:300]})
            _free()
            write("train", rows, args.out)

    for r in rows:  # ratios against the two SDPA baselines of the same size and mode
        for base in ("sdpa compile", "sdpa eager"):
            b = next(
                (
                    x
                    for x in rows
                    if x["provider"] == base
                    and x["model"] == r["model"]
                    and x.get("mode") == r.get("mode")
                    and "ms" in x
                ),
                None,
            )
            if b is None or "ms" not in r:
                continue
            key = base.split()[1]
            r[f"speed_vs_{key}"] = r["tokens_per_s"] / b["tokens_per_s"]
            if r["peak_gib"] and b["peak_gib"]:
                r[f"mem_vs_{key}"] = r["peak_gib"] / b["peak_gib"]
    path = write("train", rows, args.out)
    cols = ["model", "batch", "provider", "mode", "tokens_per_s", "peak_gib", "predicted_gib"]
    cols += ["measured_vs_predicted", "speed_vs_compile", "mem_vs_compile", "speed_vs_eager"]
    cols += ["mem_vs_eager", "note"]
    print(table(rows, cols))
    print(table(plans, ["model", "n_px", "batch", "memory_gib", "plan", "predicted_gib"]))
    print(f"wrote {path} and {plans_path}")
    return rows


if __name__ == "__main__":
    main()
