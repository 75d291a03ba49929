"""The compile gate: every Triton kernel compiles clean for sm_90a and sm_80, no GPU needed.

benchmarks/compile_report.py compiles the launchers' real launches (model strides, Triton's
own specialisation) with the ptxas Triton ships, in worker processes with TRITON_INTERPRET
unset (this process interprets). The gate compiles a subset of the full matrix so that it
stays near three minutes on two cores (``compile_report --subset gate``), on both
architectures (sm_90a and sm_80) each:

- attention (forward, backward preprocess, dK/dV, dQ), default configs: bf16 causal+padded
  at head dims 64, 96 and 128, bf16 unmasked at 64 and 128, fp32 (tf32x3) causal+padded
  at 128; every other listed config in bf16 causal+padded at 64 ("narrow" list) and 128
  ("wide" list); the 96 = 64 + 32 forward in bf16 causal+padded;
- flash decoding (the split forward and its combine kernel): causal+padded, bf16 at 64,
  96 and 128, fp32 at 96;
- ln_mlp with LayerNorm (norm statistics, ln_fc, the proj, dn and dgrad GEMMs, both
  weight-gradient GEMMs, norm backward), default configs in bf16, fp32 and autocast (bf16
  GEMMs over fp32 activations); every other listed config in bf16.

fp16 (whose code differs from bf16's only in conversions), RMSNorm, ln_linear, the other
masks and head dims are compiled by the full matrix only: ``make compile-report`` compiles
all of it and writes the table into benchmarks/RESULTS.md.

The palette's CUDA kernels are compiled with nvcc (when there is one) for both
architectures and checked for spills the same way.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "compile_report.py"
pytest.importorskip("triton")
sys.path.insert(0, str(REPORT.parent))
import compile_report  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every compile of the gate subset (one subprocess; its pool compiles in parallel)."""
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, str(REPORT), "--subset", "gate", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if not out.exists():
        pytest.fail(f"compile_report.py wrote no rows:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def _offenders(rows, check):
    bad = [r for r in rows if check(r)]
    return "\n".join(
        f"{r['kernel']} {r['config']} {r['dtype']} {r['mode']} D={r['D']} sm_{r['arch']}: "
        + "; ".join(r["problems"])
        for r in bad
    )


def test_every_kernel_and_case_is_covered(rows):
    """The gate compiled each kernel for each architecture and dtype it promises."""
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    attention = ["attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"]
    ln = ["norm_stats", "ln_fc", "mm (proj)", "mm (dgrad)", "mm (dn)", "wgrad (dw1)"]
    ln += ["wgrad (dw2)", "norm_bwd"]
    want = {(k, a, d) for k in attention for a in (90, 80) for d in ("bf16", "fp32")}
    decode = ("attn_decode", "attn_combine")
    want |= {(k, a, d) for k in decode for a in (90, 80) for d in ("bf16", "fp32")}
    want |= {(k, a, d) for k in ln for a in (90, 80) for d in ("bf16", "fp32", "mix")}
    assert not want - seen, sorted(want - seen)
    fwd = {(r["dtype"], r["D"], r["mode"]) for r in rows if r["kernel"] == "attn_fwd"}
    gated = {
        (dtype, D, mode)
        for dtype in compile_report.DTYPES
        for D in compile_report.HEAD_DIMS
        for mode in compile_report.ATTN_MODES
        if compile_report._gated(dtype, D, mode)
    }
    assert gated <= fwd, sorted(gated - fwd)
    assert ("bf16", 96, "causal+pad (96=64+32)") in fwd  # the head-dim split path
    extra = {r["kernel"] for r in rows if not r["default"]}
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "ln_fc", "mm (proj)"} <= extra


def test_no_compile_errors(rows):
    assert not _offenders(rows, lambda r: "error" in r)


def test_no_register_spills(rows):
    assert not _offenders(
        rows, lambda r: "error" not in r and (r["spill_stores"] or r["spill_loads"])
    )


def test_shared_memory_within_the_architecture(rows):
    limit = compile_report.SMEM_LIMIT_KIB
    assert not _offenders(rows, lambda r: "error" not in r and r["smem_kib"] > limit[r["arch"]])


def test_tensor_core_instructions(rows):
    """16-bit dots (and fp32 attention's tf32x3) use wgmma on sm_90a; the decode kernel's
    16-query tile uses mma.sync by design (wgmma needs 64 rows)."""
    assert not _offenders(rows, lambda r: any("expected" in p for p in r["problems"]))
    decode = [r for r in rows if r["kernel"] == "attn_decode" and r["arch"] == 90]
    assert decode and all(r["family"] == "mma.sync" for r in decode)


def test_no_problems_at_all(rows):
    """Everything the report calls a problem (also ptxas warnings) fails the gate."""
    assert not _offenders(rows, lambda r: r["problems"])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (a CUDA toolkit) is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_palette_cuda_kernels_compile_without_spills(arch, tmp_path):
    """palette_cuda.cu includes no torch headers, so nvcc compiles it on its own."""
    done = subprocess.run(
        ["nvcc", "-c", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
         str(ROOT / "csrc" / "palette_cuda.cu"), "-o", str(tmp_path / "palette.o")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    assert spills, done.stderr[-2000:]
    assert all(s == ("0", "0") for s in spills), done.stderr[-4000:]
