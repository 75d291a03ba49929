"""The pre-training step as ``igpt pretrain`` runs it: eager against ``--compile``.

Two trainers of the same run (``igpt.train.Trainer``, one process, the CPU unless a GPU is
visible): one eager, one with ``compile=True``. The compiled one's first step is timed
alone (``compile_s``: Dynamo + inductor, forward and backward); then both take ``--steps``
steps in turns (eager, compiled, eager, ...) and the rows give the median wall time of a
step, tokens/s and the speed-up over eager. The first losses of the two are printed side by
side (they agree to float tolerance: ``tests/test_train.py``). Inductor's caches go to a
fresh folder (``TORCHINDUCTOR_CACHE_DIR``), so ``compile_s`` is a cold compile.

    python benchmarks/bench_pretrain.py --quick        # igpt-tiny at 16x16, batch 8
    python benchmarks/bench_pretrain.py --model igpt-s --n-px 32 --batch-size 16
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

# a cold compile: inductor's caches in a fresh folder (set it to measure a warm one)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="igpt_inductor_"))
import torch  # noqa: E402
from common import parser, table, write

COLUMNS = ["mode", "model", "n_px", "batch", "compile_s", "step_ms", "tokens_per_s", "speedup"]


def _trainer(args, out: Path, compile_: bool):
    from igpt.train import TrainConfig, Trainer

    cfg = TrainConfig(
        model=args.model,
        n_px=args.n_px,
        data="digits",
        steps=1000,
        batch_size=args.batch_size,
        val_size=2,
        out=str(out / f"compile_{compile_}"),
        progress=False,
        compile=compile_,
        palette=args.palette,
    )
    t = Trainer(cfg)
    t.model.train()
    return t


def _step_ms(trainer, step: int) -> tuple[float, float]:
    start = time.perf_counter()
    loss = trainer.train_step(step)["loss"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, loss


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="igpt-tiny")
    p.add_argument("--n-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--palette", default=None, help="palette .npy (default: fit one once)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 5
    work = Path(tempfile.mkdtemp(prefix="igpt_bench_pretrain_"))
    eager = _trainer(args, work, False)
    args.palette = args.palette or str(eager.run.path / "palette.npy")
    compiled = _trainer(args, work, True)
    first_eager = _step_ms(eager, 0)
    first_compiled = _step_ms(compiled, 0)
    compile_ms = first_compiled[0]
    print(f"first losses: eager {first_eager[1]:.6f}, compiled {first_compiled[1]:.6f}")
    times = {"eager": [], "compile": []}
    for s in range(1, args.steps + 1):
        times["eager"].append(_step_ms(eager, s)[0])
        times["compile"].append(_step_ms(compiled, s)[0])
    tokens = args.batch_size * args.n_px**2
    base = statistics.median(times["eager"])
    rows = []
    for mode, ts in times.items():
        ms = statistics.median(ts)
        rows.append(
            {
                "mode": mode,
                "model": args.model,
                "n_px": args.n_px,
                "batch": args.batch_size,
                "compile_s": compile_ms / 1e3 if mode == "compile" else None,
                "step_ms": ms,
                "tokens_per_s": tokens / ms * 1e3,
                "speedup": base / ms,
                "compiled": compiled.forward.compiled is not None,
            }
        )
    eager.close()
    compiled.close()
    print(table(rows, COLUMNS))
    print(f"wrote {write('pretrain', rows, args.out)}")


if __name__ == "__main__":
    main()
