"""What the judge costs a first call: PyTorch's check of a candidate against the call alone.

On a GPU, at iGPT-S@64^2 (8, 8, 4096, 64), iGPT-L@48^2 (8, 16, 2304, 96) and iGPT-M@64^2
(4, 8, 4096, 128), causal, forward + backward: the time of the call on SDPA (what the user
runs anyway), the time to build the judge of the call (the oracle on its head sample, the
eager yardstick, bf16's fp16 twin) and one verdict on our Triton kernel (it runs the call
once more), and their ratio. On the CPU (``--dry-run`` or no GPU) the same at small
shapes with PyTorch's SDPA as the candidate: the plumbing and the CPU's cost, not a GPU's.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env, parser, table, write  # noqa: E402

attention_module = importlib.import_module("igpt_kernels.attention")

GPU_SHAPES = {
    "S@64x64": (8, 8, 4096, 64),
    "L@48x48": (8, 16, 2304, 96),
    "M@64x64": (4, 8, 4096, 128),
}
CPU_SHAPES = {"tiny": (2, 4, 256, 64), "small": (4, 8, 1024, 64)}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _seconds(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def measure(shape, dtype, device, candidate) -> dict:
    """Seconds of one call (forward + backward on SDPA) and of judging ``candidate`` on it
    (the oracle, the yardstick, bf16's twin and the candidate's own run of the call)."""
    B, H, N, D = shape
    q, k, v = (
        torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    scale = D**-0.5

    def call():
        o = attention_module.run_backend("sdpa", q, k, v, True, None, scale)
        o.backward(torch.ones_like(o))

    call()  # warm
    call_s = min(_seconds(call) for _ in range(3))
    judge = attention_module.call_judge(q, k, v, True, None, scale)
    attention_module.run_backend(candidate, q, k, v, True, None, scale)  # compiled, tuned
    verdict = {}
    judge_s = _seconds(lambda: verdict.update(judge([candidate])[candidate]))
    return {"call_s": call_s, "judge_s": judge_s, "ok": verdict["ok"]}


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes (plumbing only)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    if args.quick or args.dry_run:
        shapes = dict(list(shapes.items())[:1])
    device = "cuda" if cuda else "cpu"
    dtypes = (torch.bfloat16, torch.float16) if cuda else (torch.float32,)
    candidate = "triton" if cuda else "sdpa"
    rows = []
    for label, shape in shapes.items():
        for dtype in dtypes:
            torch.manual_seed(0)
            row = {"shape": label, "BHND": "x".join(map(str, shape)), "dtype": str(dtype)[6:]}
            row["candidate"] = candidate
            try:
                row.update(measure(shape, dtype, device, candidate))
                row["judge_over_call"] = row["judge_s"] / row["call_s"]
            except Exception as e:  # one failing shape must not lose the others' rows
                row["note"] = f"failed: {type(e).__name__}: {e}"[:300]
            rows.append({**row, **env()})
            write("judge", rows, args.out)
    cols = ["shape", "BHND", "dtype", "candidate", "call_s", "judge_s", "judge_over_call", "ok"]
    print(table(rows, cols + ["note"]))
    print(f"wrote {write('judge', rows, args.out)}")


if __name__ == "__main__":
    main()
