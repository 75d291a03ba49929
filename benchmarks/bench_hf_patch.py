"""transformers' own ImageGPT, unpatched against ``apply_igpt_kernels_to_imagegpt``, one run.

The issue's workload: iGPT-S-shaped layers (d 512, 8 heads) at n_px 32 (1024 tokens),
batch 8, 2 layers, float32, random weights, no dropout. Measured on the same model and
inputs, unpatched then patched in place:

    train step      forward, loss, backward, AdamW step, zero_grad (median ms)
    saved bytes     what autograd keeps for the backward of one forward + loss, counted with
                    ``saved_tensors_hooks`` (unique storages, the parameters left out); on
                    a GPU also the peak ``max_memory_allocated`` of forward + backward
    generate        greedy ``generate`` from SOS with the KV cache (tokens/s), and whether
                    both runs gave the same tokens
    processor       ``ImageGPTImageProcessor`` (the Pil one without torchvision) on 32 crops
                    of scikit-learn's two photographs at 64^2 with 512 k-means clusters (images/s),
                    and whether the tokens are identical

Goals (CPU): saved bytes <= 0.7x, train step >= 1.5x, generate >= 1.3x with identical
tokens, processor >= 10x with identical tokens. Ratios are unpatched / patched (higher is
better), except saved bytes (patched / unpatched). The timed rows run unpatched and patched
in turns (``common.interleaved_ms``: revert, run, patch, run, ...; medians of 3 train steps,
5 generates and 9 processor calls each), so that the machine drifting between the two
sides' runs does not land on one of them. On the CPU two more rows give the share
of each side's operator time in the dense layers' GEMMs (``mm``/``addmm``, one profiled
run each), which the patch leaves as they are: their ratio, 1 / the unpatched share, is
the most any change outside those GEMMs can gain.

    python benchmarks/bench_hf_patch.py [--quick] [--n-px 32] [--batch 8] [--layers 2]
    python benchmarks/bench_hf_patch.py --generate-only --new-tokens 1023   # a whole 32^2 image
    igpt bench hf_patch

``--generate-only``: only the generate row, ``--reps`` generates per side in turns
(medians), from SOS to ``--new-tokens`` new tokens (default 64; 1023 completes a 32² image,
where the attention over up to 1023 cached keys is a real share of each step).

``--quick``: n_px 16, batch 2, fewer tokens and images (a smoke test, not a measurement).
Writes OUT/hf_patch.json and prints a Markdown table.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from common import interleaved_ms, parser, peak_gib, table, write

from igpt.hf_patch import apply_igpt_kernels_to_imagegpt, revert_igpt_kernels_to_imagegpt

log = logging.getLogger(__name__)


def make_model(n_px: int, layers: int):
    import transformers

    config = transformers.ImageGPTConfig(
        vocab_size=513, n_positions=n_px * n_px, n_embd=512, n_head=8, n_layer=layers,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.ImageGPTForCausalImageModeling(config)


def saved_bytes(model, x) -> int:
    """Bytes autograd saves for the backward of one forward + loss (unique storages that are
    not parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x).loss
    del loss
    return sum(seen.values())


def dense_share(fn) -> float | None:
    """The share of ``fn()``'s operator time (CPU profiler, self times) spent in ``mm`` and
    ``addmm``: the dense layers (Conv1D, lm_head), the same GEMMs patched or not (the
    attention's own products are ``bmm`` in transformers and inside SDPA when patched).
    1 / share bounds what replacing everything else can gain. None on a GPU."""
    if torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return (times.get("aten::mm", 0) + times.get("aten::addmm", 0)) / sum(times.values())


def side_rows(model, x, sos, new_tokens: int) -> dict:
    """One side's untimed figures: greedy tokens, saved bytes, peak memory, dense shares."""
    out = {}

    def generate():
        out["tokens"] = model.generate(
            sos, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )

    def fwd_bwd():
        model(x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        model.eval()
        generate()
        out["gen_dense"] = dense_share(generate)
    model.train()
    out["saved_mib"] = saved_bytes(model, x) / 2**20
    out["peak_gib"] = peak_gib(fwd_bwd)
    out["train_dense"] = dense_share(fwd_bwd)
    return out


def timed_rows(model, x, sos, new_tokens: int, reps: int) -> dict:
    """Train step and generate, unpatched and patched in turns (``interleaved_ms``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sides = {
        "hf": lambda: revert_igpt_kernels_to_imagegpt(model, processor=False),
        "patched": lambda: apply_igpt_kernels_to_imagegpt(model, processor=False),
    }

    def step():
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def generate():
        with torch.no_grad():
            model.generate(
                sos, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    model.eval()
    gen = interleaved_ms({k: (f, generate) for k, f in sides.items()}, rep=reps + 2)
    model.train()
    train = interleaved_ms({k: (f, step) for k, f in sides.items()}, rep=reps)
    return {k: {"train_ms": train[k], "tokens_s": sos.numel() * new_tokens / (gen[k] / 1e3)}
            for k in sides}  # fmt: skip


def generate_rows(args) -> list[dict]:
    """The generate row alone: ``args.reps`` greedy generates per side, in turns, medians;
    whether the two sides' tokens are identical."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(args.n_px, args.layers).to(device).eval()
    sos = torch.full((args.gen_batch, 1), model.config.vocab_size - 1, device=device)
    tokens = {}

    def side(name, patch):
        def setup():
            if patch:
                apply_igpt_kernels_to_imagegpt(model, processor=False)
            else:
                revert_igpt_kernels_to_imagegpt(model, processor=False)

        def run():
            with torch.no_grad():
                tokens[name] = model.generate(
                    sos, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False,
                )  # fmt: skip

        return setup, run

    ms = interleaved_ms({"hf": side("hf", False), "patched": side("patched", True)}, rep=args.reps)
    revert_igpt_kernels_to_imagegpt(model, processor=False)
    rate = {k: sos.numel() * args.new_tokens / (t / 1e3) for k, t in ms.items()}
    return [
        {"metric": f"generate {args.new_tokens} tokens (tokens/s)", "hf": rate["hf"],
         "patched": rate["patched"], "ratio": rate["patched"] / rate["hf"], "goal": ">= 1.2",
         "identical": bool(torch.equal(tokens["hf"], tokens["patched"])),
         "n_px": args.n_px, "batch": args.gen_batch, "layers": args.layers, "d": 512}
    ]  # fmt: skip


def x_device(model):
    return next(model.parameters()).device


def photos(n: int, side: int):
    """n crops of scikit-learn's two sample photographs (china, flower), as PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        im = images[i % 2]
        top, left = rng.integers(0, 100), rng.integers(0, 200)
        crops.append(Image.fromarray(im[top : top + 320, left : left + 420]))
    return crops


def clusters(quick: bool, k: int = 512):
    """k colours in [-1, 1]: a k-means palette of 10^5 photo pixels (``igpt.palette``; quick:
    k photo pixels with +-0.5 jitter, no fitting)."""
    from sklearn.datasets import load_sample_images

    from igpt.palette import fit_palette

    px = np.concatenate([im.reshape(-1, 3) for im in load_sample_images().images])
    rng = np.random.default_rng(0)
    if quick:
        centres = px[rng.integers(0, len(px), k)] + rng.uniform(-0.5, 0.5, (k, 3))
    else:
        centres = fit_palette(px[rng.integers(0, len(px), 100_000)], k=k, seed=0).centroids
    return np.asarray(centres, np.float64) / 127.5 - 1


def processor_rows(n_images: int, side: int, reps: int, quick: bool) -> dict:
    from transformers import ImageGPTImageProcessor  # the Pil one without torchvision

    processor = ImageGPTImageProcessor(
        clusters=clusters(quick).tolist(), size={"height": side, "width": side}
    )
    images = photos(n_images, side)
    result = {}

    def runner(name):
        def run():
            result[name] = processor(images, return_tensors="pt")["input_ids"]

        return run

    sides = {
        "hf": (revert_igpt_kernels_to_imagegpt, runner("hf")),
        "patched": (lambda: apply_igpt_kernels_to_imagegpt(attention=False, norm_mlp=False),
                    runner("patched")),
    }  # fmt: skip
    ms = interleaved_ms(sides, rep=3 * reps)
    revert_igpt_kernels_to_imagegpt()
    return {
        "processor": type(processor).__name__,
        "hf_images_s": n_images / (ms["hf"] / 1e3),
        "patched_images_s": n_images / (ms["patched"] / 1e3),
        "identical": bool(torch.equal(result["hf"], result["patched"])),
    }


def model_rows(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(args.n_px, args.layers).to(device).train()
    x = torch.randint(0, 512, (args.batch, args.n_px * args.n_px), device=device)
    sos = torch.full((args.gen_batch, 1), model.config.vocab_size - 1, device=device)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    got = {}
    for name in ("hf", "patched"):  # each from the same weights
        if name == "patched":
            apply_igpt_kernels_to_imagegpt(model, processor=False)
        model.load_state_dict(start)
        got[name] = side_rows(model, x, sos, args.new_tokens)
    for name, times in timed_rows(model, x, sos, args.new_tokens, args.reps).items():
        got[name].update(times)
    revert_igpt_kernels_to_imagegpt(model, processor=False)
    hf, ours = got["hf"], got["patched"]
    rows = [
        {"metric": "train step (ms)", "hf": hf["train_ms"], "patched": ours["train_ms"],
         "ratio": hf["train_ms"] / ours["train_ms"], "goal": ">= 1.5"},
        {"metric": "saved for backward (MiB)", "hf": hf["saved_mib"], "patched": ours["saved_mib"],
         "ratio": ours["saved_mib"] / hf["saved_mib"], "goal": "<= 0.7"},
        {"metric": "generate (tokens/s)", "hf": hf["tokens_s"], "patched": ours["tokens_s"],
         "ratio": ours["tokens_s"] / hf["tokens_s"], "goal": ">= 1.3",
         "identical": bool(torch.equal(hf["tokens"], ours["tokens"]))},
    ]  # fmt: skip
    if hf["train_dense"] is not None:  # the CPU's bound: the dense GEMMs stay as they are
        for what, key, goal in (
            ("train fwd+bwd", "train_dense", ">= 1.5"),
            ("generate", "gen_dense", ">= 1.3"),
        ):
            rows.append(
                {"metric": f"{what}: share in dense GEMMs (mm, addmm)", "hf": hf[key],
                 "patched": ours[key], "ratio": 1 / hf[key], "goal": f"ceiling for {goal}"}
            )  # fmt: skip
    if hf["peak_gib"] is not None:
        rows.append(
            {"metric": "fwd+bwd peak (GiB)", "hf": hf["peak_gib"], "patched": ours["peak_gib"],
             "ratio": ours["peak_gib"] / hf["peak_gib"], "goal": "-"}
        )  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n-px", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--images", type=int, default=32, help="photos for the processor")
    p.add_argument("--side", type=int, default=64, help="the processor's output side")
    p.add_argument("--generate-only", action="store_true", help="only the generate row")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each generate adds")
    p.add_argument("--reps", type=int, default=None, help="timed runs per side")
    args = p.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 3)
    args.gen_batch, args.new_tokens = (2, 8) if args.quick else (args.batch, args.new_tokens)
    if args.generate_only:
        rows = generate_rows(args)
        write("hf_patch_generate", rows, args.out)
        print(table(rows, ["metric", "hf", "patched", "ratio", "goal", "identical"]))
        return
    if args.quick:
        args.n_px, args.batch, args.images = 16, 2, 4
    shape = {"n_px": args.n_px, "batch": args.batch, "layers": args.layers, "d": 512, "heads": 8}
    rows = [{**r, **shape} for r in model_rows(args)]
    proc = processor_rows(args.images, args.side, args.reps, args.quick)
    rows.append(
        {"metric": f"processor {args.images} photos at {args.side}^2 (images/s)",
         "hf": proc["hf_images_s"], "patched": proc["patched_images_s"],
         "ratio": proc["patched_images_s"] / proc["hf_images_s"], "goal": ">= 10",
         "identical": proc["identical"], "processor": proc["processor"]}
    )  # fmt: skip
    path = write("hf_patch", rows, args.out)
    print(table(rows, ["metric", "hf", "patched", "ratio", "goal", "identical"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
