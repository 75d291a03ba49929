"""Compile every Triton kernel for sm_90a (H100/H200) and sm_80 (A100) without a GPU.

For each case (kernel, config, dtype, mask kind, head dim, architecture) this calls the
real launcher (``attention._attn_fwd``/``_attn_bwd``, ``ln_mlp.forward``/``backward``) on
meta tensors with the model's strides, records the launches instead of running them, and hands each
recorded launch to ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``
with the signature, constexprs and alignment attributes Triton's own JIT binder derives
from those arguments (so ``stride == 1`` becomes a constexpr, multiples of 16 get
``tt.divisibility``): the code the JIT would build on that GPU. ptxas (shipped with Triton)
reports registers and spills; the kernel metadata gives shared memory; the PTX the MMA
family (``wgmma.mma_async``, ``mma.sync`` or plain FMA).

A case fails on a compile error, on any spill store or load, on shared memory above the
architecture's per-block limit, and on a sm_90a kernel that does not use the instruction
family expected of it (``wgmma`` for every tensor-core dot of 16 rows x more, ``mma.sync``
for the flash-decoding kernel, whose BLOCK_M=16 is below wgmma's M=64).

    python benchmarks/compile_report.py                   # the whole matrix, a table
    python benchmarks/compile_report.py --subset gate     # what tests/test_compile.py runs
    python benchmarks/compile_report.py --results benchmarks/RESULTS.md   # and write it there

Runs with TRITON_INTERPRET unset (the kernels must import as GPU kernels), in a pool of
worker processes, with a fresh Triton cache per run (nothing is reused across runs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
# The largest dynamic shared memory one block may opt into (KiB): H100/H200 and A100.
SMEM_LIMIT_KIB = {90: 227, 80: 163}
DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (64, 96, 128)
ATTN_MODES = ("causal", "full", "causal+pad", "full+pad")
LN_DTYPES = ("bf16", "fp16", "fp32", "mix")  # mix: bf16 GEMMs over fp32 x (autocast)
# Model shapes: sequence length, the heads of the iGPT size with this head dim, batch.
SEQ, BATCH = 1024, 2
HEADS = {64: 8, 96: 16, 128: 8}
LN_D, LN_H, LN_T = 1024, 4096, 8192
DECODE_SPLITS = 4

# --------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------


def _gated(dtype, D, mode, rest=False) -> bool:
    """Whether the gate (tests/test_compile.py) compiles an attention case.

    The gate keeps to about three minutes on two cores, so it compiles the most telling
    cases of the full matrix: in bf16 the heaviest mask (causal+pad: the most registers) at
    every head dim and the plain one (full) at 64 and 128 (the "narrow" and "wide" config
    lists; 96 runs the wide configs padded to 128), fp32 (tf32x3: slow compiles, tiles sized
    against causal+pad) at 128 causal+pad, and the other configs in bf16 causal+pad at 64
    and 128. fp16 is left to the full matrix: its code differs from bf16's only in
    conversions.
    """
    if rest:
        return dtype == "bf16" and mode == "causal+pad" and D != 96
    if dtype == "bf16":
        return mode == "causal+pad" or (mode == "full" and D != 96)
    return dtype == "fp32" and D == 128 and mode == "causal+pad"


def attention_cases(subset: str) -> list[dict]:
    """Cases of the attention kernels (``full``: every one; ``gate``: see ``_gated``).

    Every default config in every dtype, head dim and mask kind, every other config in bf16
    for every mask kind, the flash-decoding kernels, and head dim 96 as 64 + 32.
    """
    full = subset == "full"
    cases = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for D in HEAD_DIMS:
                for mode in ATTN_MODES:
                    base = dict(op="attention", arch=arch, dtype=dtype, D=D, mode=mode)
                    if full or _gated(dtype, D, mode):
                        cases.append(dict(base, config=0))
                    if dtype == "bf16" and (full or _gated(dtype, D, mode, rest=True)):
                        cases.append(dict(base, config="rest"))
                for mode in ("causal", "causal+pad"):
                    # the gate: bf16 at every head dim, fp32 (tf32x3, its own tile) at 96
                    fp32_96 = dtype == "fp32" and D == 96
                    if full or (mode == "causal+pad" and (dtype == "bf16" or fp32_96)):
                        cases.append(dict(op="decode", arch=arch, dtype=dtype, D=D, mode=mode))
            # head dim 96 as 64 + 32 (attention.HD96_SPLIT), the forward's other path
            for mode in ATTN_MODES:
                if full or (dtype == "bf16" and mode == "causal+pad"):
                    split = dict(arch=arch, dtype=dtype, D=96, mode=mode, hd96="split")
                    cases.append(dict(split, op="attention", config=0))
    return cases


def ln_mlp_cases(subset: str) -> list[dict]:
    """ln_mlp: the forward and backward kernels of each norm kind in every dtype (``gate``:
    LayerNorm, the defaults in bf16, fp32 and autocast, bf16's other configs)."""
    full = subset == "full"
    cases = []
    for arch in ARCHS:
        for dtype in LN_DTYPES:
            for norm in ("layer", "rms"):
                if not (full or (norm == "layer" and dtype != "fp16")):
                    continue
                base = dict(op="ln_mlp", arch=arch, dtype=dtype, mode=norm)
                cases.append(dict(base, config=0))
                if dtype == "bf16" or (full and dtype == "mix"):
                    cases.append(dict(base, config="rest"))
            if full:
                cases.append(dict(op="ln_linear", arch=arch, dtype=dtype, mode="layer", config=0))
    return cases


def all_cases(subset: str) -> list[dict]:
    """Every case of the subset, ln_mlp's first: its cases are the longest (eight kernels,
    the other-configs case ~60 s of compiles), and the pool takes cases in order, so they
    would otherwise form the tail of the run on one worker."""
    return ln_mlp_cases(subset) + attention_cases(subset)


# --------------------------------------------------------------------------------------
# recording the launchers' launches (worker side)
# --------------------------------------------------------------------------------------


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@contextlib.contextmanager
def _recording(arch):
    """Record (fn, configs or None, args, kwargs) of every launch instead of running it,
    with the config lists the launchers choose for a GPU of ``arch``."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from igpt_kernels import _triton

    launches = []
    saved = JITFunction.run, Autotuner.run, _triton.device_arch, _triton.AUTOTUNE
    _triton.device_arch = lambda device: arch
    _triton.AUTOTUNE = True

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, None, args, kwargs))

    def tuned_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        launches.append((self.fn, self.configs, args, kwargs))

    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, _triton.device_arch, _triton.AUTOTUNE = saved


def _attention_launches(case):
    import importlib

    import torch

    attn = importlib.import_module("igpt_kernels.attention")
    attn.HD96_SPLIT = case.get("hd96") == "split"
    dtype = _torch_dtype(case["dtype"])
    D, H = case["D"], HEADS[case["D"]]
    B, n = BATCH, SEQ
    causal = case["mode"].startswith("causal")
    meta = dict(device="meta", dtype=dtype)
    pad = torch.empty(B, n, device="meta", dtype=torch.int8) if "pad" in case["mode"] else None
    with _recording(case["arch"]) as launches:
        if case["op"] == "decode":
            # one new query over the KV cache (2, B, H, n, D) of the sampler
            q = torch.empty(B, 1, 3 * H * D, **meta)[..., : H * D].view(B, 1, H, D).transpose(1, 2)
            cache = torch.empty(2, B, H, n, D, **meta)
            attn._attn_fwd(q, cache[0], cache[1], pad, causal, D**-0.5, num_splits=DECODE_SPLITS)
        else:
            # q, k, v: transposed views of the (B, n, 3 d) c_attn output
            qkv = torch.empty(B, n, 3 * H * D, **meta).view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k, v = qkv
            o = torch.empty(B, H, n, D, **meta)
            lse = torch.empty(B, H, n, device="meta", dtype=torch.float32)
            do = torch.empty(B, n, H * D, **meta).view(B, n, H, D).transpose(1, 2)
            attn._attn_fwd(q, k, v, pad, causal, D**-0.5)
            attn._attn_bwd(do, q, k, v, o, lse, pad, causal, D**-0.5)
    return launches


def _ln_mlp_launches(case):
    import torch

    from igpt_kernels.ln_linear import backward as linear_bwd
    from igpt_kernels.ln_linear import forward as linear_fwd
    from igpt_kernels.ln_mlp import backward as mlp_bwd
    from igpt_kernels.ln_mlp import forward as mlp_fwd

    name = case["dtype"]
    xdtype = torch.float32 if name == "mix" else _torch_dtype(name)
    wdtype = torch.bfloat16 if name == "mix" else xdtype
    d, h, T = LN_D, LN_H, LN_T
    layer = case["mode"] == "layer"

    def t(*shape, dtype=wdtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    x = t(T, d, dtype=xdtype)
    nw, nb = t(d, dtype=xdtype), (t(d, dtype=xdtype) if layer else None)
    norm = "layer" if layer else "rms"
    with _recording(case["arch"]) as launches:
        if case["op"] == "ln_linear":
            w = t(3 * d, d)
            y, mean, rstd = linear_fwd(x, nw, nb, w, t(3 * d), norm, 1e-5, True)
            mean = None if norm == "rms" else mean
            linear_bwd(torch.empty_like(y), x, mean, rstd, nw, nb, w, True, [True] * 5)
        else:
            w1, w2 = t(h, d), t(d, h)
            opts = (norm, 1e-5, "quick_gelu", True, "fused", True)
            y, mean, rstd, z = mlp_fwd(x, nw, nb, w1, t(h), w2, t(d), *opts)
            mean = None if norm == "rms" else mean
            cfg = (norm, "quick_gelu", True, "fused", True, True)
            mlp_bwd(torch.empty_like(y), x, mean, rstd, z, nw, nb, w1, w2, cfg, [True] * 7)
    return launches


def _label(fn, kwargs):
    """A readable name for a launch: the kernel, and for the shared GEMM kernels their use."""
    name = fn.__name__.removeprefix("_").removesuffix("_kernel")
    if name == "mm":
        use = "dgrad" if kwargs.get("DACT") else "proj" if kwargs.get("HAS_RESID") else "dn"
        return f"mm ({use})"
    if name == "wgrad":
        return "wgrad (dw1)" if kwargs.get("NORM_X") else "wgrad (dw2)"
    if name == "attn_fwd" and kwargs.get("SPLIT") is not None and kwargs.get("BLOCK_M") == 16:
        return "attn_decode"
    return name


def _config_text(cfg_kwargs, warps, stages):
    blocks = [
        cfg_kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T") if k in cfg_kwargs
    ]
    shape = "x".join(str(b) for b in blocks) if blocks else "-"
    return f"{shape}, {warps}w, {stages}s"


_PTXAS = re.compile(
    r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.DOTALL
)


_MEMO = {}  # compile results of this worker process, by kernel source, arch and options


def _compile(fn, args, kwargs, arch):
    """Compile one launch for sm_<arch> (90 means sm_90a); a result row without the labels."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    memo_key = (src.hash(), arch, repr(sorted(options.__dict__.items())))
    if memo_key in _MEMO:  # the same kernel from another case of this worker
        return dict(_MEMO[memo_key])
    # ptxas' -v log is the only report of spills, and a cached kernel has none: compile
    # every distinct kernel (the Triton cache of this run is fresh anyway)
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001  (any compiler failure is a result to report)
        return dict(error=f"{type(e).__name__}: {str(e)[:500]}")
    seconds = time.perf_counter() - start
    found = _PTXAS.search(log.getvalue())
    ptx = kernel.asm["ptx"]
    if "wgmma.mma_async" in ptx:
        family = "wgmma"
    elif "mma.sync" in ptx:
        family = "mma.sync"
    elif "tt.dot" in kernel.asm["ttir"]:
        family = "fma"
    else:
        family = "no dot"
    _MEMO[memo_key] = result = dict(
        regs=int(found.group(3)) if found else None,
        spill_stores=int(found.group(1)) if found else None,
        spill_loads=int(found.group(2)) if found else None,
        smem_kib=round(kernel.metadata.shared / 1024, 1),
        family=family,
        seconds=round(seconds, 2),
        warnings=[ln for ln in log.getvalue().splitlines() if "warning" in ln.lower()],
    )
    return dict(result)


def _expected_family(label, dtype, arch):
    """The instruction family a kernel must use, or None when any is acceptable."""
    if label in ("attn_combine", "attn_bwd_preprocess", "norm_stats", "norm_bwd"):
        return "no dot"
    if arch != 90:
        return None
    if label == "attn_decode":
        return "mma.sync"  # BLOCK_M=16 queries: below wgmma's M=64, mma.sync is the right call
    if dtype in ("bf16", "fp16", "mix"):
        return "wgmma"
    if label.startswith("attn"):
        return ("wgmma", "mma.sync")  # fp32's tf32x3 dots: tensor cores, tiles under 64 rows
    return None


def run_case(case: dict) -> list[dict]:
    """Compile one case (all the launches its launcher makes); one row per compile."""
    launches = _attention_launches(case) if case["op"] in ("attention", "decode") else None
    if launches is None:
        launches = _ln_mlp_launches(case)
    rows, seen = [], set()
    for fn, configs, args, kwargs in launches:
        label = _label(fn, kwargs)
        if case.get("hd96") == "split" and label != "attn_fwd":
            continue  # the split is the forward's alone: the other kernels are the D=96 case's
        if configs is None:
            if case.get("config") == "rest":
                continue  # fixed-config kernels are compiled with the defaults only
            variants = [(0, kwargs)]
        else:
            which = range(1, len(configs)) if case.get("config") == "rest" else [0]
            variants = [
                (i, dict(kwargs, **configs[i].all_kwargs())) for i in which if i < len(configs)
            ]
        for index, kw in variants:
            key = (label, index)
            if key in seen:  # ln_mlp launches some kernels twice with the same arguments
                continue
            seen.add(key)
            cfg = {k: v for k, v in kw.items() if k.startswith("BLOCK_")}
            row = dict(
                kernel=label,
                config=_config_text(cfg, kw.get("num_warps", 4), kw.get("num_stages", 3)),
                default=index == 0,
                dtype=case["dtype"],
                mode=case["mode"] + (" (96=64+32)" if case.get("hd96") == "split" else ""),
                D=case.get("D"),
                arch=case["arch"],
            )
            row.update(_compile(fn, args, kw, case["arch"]))
            row["problems"] = problems(row)
            rows.append(row)
    return rows


def problems(row) -> list[str]:
    """What is wrong with one compiled kernel (empty: it passes the gate)."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    out = []
    if row["regs"] is None:
        out.append("no ptxas register report")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["smem_kib"] > SMEM_LIMIT_KIB[row["arch"]]:
        out.append(f"shared memory {row['smem_kib']} KiB > {SMEM_LIMIT_KIB[row['arch']]} KiB")
    want = _expected_family(row["kernel"], row["dtype"], row["arch"])
    if want is not None and row["family"] not in (want if isinstance(want, tuple) else (want,)):
        out.append(f"uses {row['family']}, expected {want}")
    if row.get("warnings"):
        out.append("ptxas warnings: " + "; ".join(row["warnings"]))
    return out


def _worker_init(cache_dir):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "python"))


def compile_all(cases, workers=2) -> list[dict]:
    """Run the cases in ``workers`` processes (spawned: the parent may be interpreting)."""
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="igpt-triton-cache-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(cache,)) as pool:  # fmt: skip
            rows = []
            for done, case_rows in enumerate(pool.map(run_case, cases), 1):
                rows += case_rows
                bad = [f"{r['kernel']} {r['config']}: {'; '.join(r['problems'])}"
                       for r in case_rows if r["problems"]]  # fmt: skip
                print(f"[{done}/{len(cases)}] {cases[done - 1]} {bad or 'ok'}",
                      file=sys.stderr, flush=True)  # fmt: skip
            return rows


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def _cell(row):
    if "error" in row:
        return "**error**"
    if row["regs"] is None:
        return f"no ptxas report {row['smem_kib']:g}K {row['family']}"
    sp = row["spill_stores"] + row["spill_loads"]
    spill = f" **sp{sp}**" if sp else ""
    over = " **>smem**" if row["smem_kib"] > SMEM_LIMIT_KIB[row["arch"]] else ""
    return f"{row['regs']}r{spill} {row['smem_kib']:g}K{over} {row['family']}"


def table(rows) -> str:
    """One markdown line per (kernel, config, dtype, mode, D): sm_90a and sm_80 side by side."""
    grouped = {}
    for r in rows:
        key = (r["kernel"], r["D"] or 0, r["config"], r["dtype"], r["mode"])
        grouped.setdefault(key, {})[r["arch"]] = r
    lines = [
        "| kernel | D | config | dtype | mode | sm_90a | sm_80 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(grouped, key=lambda k: (k[0], k[1], not _is_default(grouped[k]), k[2:])):
        kernel, D, config, dtype, mode = key
        star = "*" if _is_default(grouped[key]) else ""
        cells = [_cell(grouped[key][a]) if a in grouped[key] else "·" for a in ARCHS]
        lines.append(f"| {kernel} | {D or '-'} | {star}{config} | {dtype} | {mode} | " +
                     " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def _is_default(by_arch):
    return any(r["default"] for r in by_arch.values())


def summary(rows, seconds) -> str:
    bad = [r for r in rows if r["problems"]]
    return (
        f"{len(rows)} compiles in {seconds:.0f} s, {len(bad)} with problems "
        f"(compile errors {sum('error' in r for r in rows)}, "
        f"spilling {sum(bool(r.get('spill_stores') or r.get('spill_loads')) for r in rows)})"
    )


def _header() -> str:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    day = datetime.date.today().isoformat()
    return f"{day}, commit {commit}, triton {triton.__version__}, no GPU (ahead-of-time compiles)"


SECTION = "## Compiled code"


def write_results(path: Path, text: str) -> None:
    """Replace (or append) the "Compiled code" section of RESULTS.md with ``text``."""
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subset", choices=("full", "gate"), default="full")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    p.add_argument("--from-json", type=Path, help="report these rows instead of compiling")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
    else:
        rows = compile_all(all_cases(args.subset), args.workers)
    seconds = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    text = (
        f"{SECTION}\n\n{_header()}, subset {args.subset!r}. `make compile-report` "
        "(benchmarks/compile_report.py) "
        "regenerates this; `tests/test_compile.py` gates a subset of it in `make test`.\n"
        f"Cell: registers/thread, **spP** spilled bytes (stores + loads), shared memory "
        f"(KiB; **>smem** above {SMEM_LIMIT_KIB[90]} KiB on sm_90a, {SMEM_LIMIT_KIB[80]} KiB "
        "on sm_80), instruction family in the PTX. `*` the default config.\n\n"
        f"{summary(rows, seconds)}.\n\n{table(rows)}\n"
    )
    print(text)
    for r in rows:
        if r["problems"]:
            print(f"PROBLEM {r['kernel']} {r['config']} {r['dtype']} {r['mode']} D={r['D']} "
                  f"sm_{r['arch']}: {'; '.join(r['problems'])}")  # fmt: skip
    if args.results:
        write_results(args.results, text)
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
