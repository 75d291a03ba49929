"""``igpt selftest``: every kernel present on this machine against PyTorch, in one command.

    igpt selftest [--interpret] [--json PATH]

Prints one row per check (op, backend, case, max error, PyTorch's own error, ratio,
verdict) and a summary line; exits with status 1 when any check failed, naming what failed.
On a GPU it checks the Triton kernels, the SDPA kernels, the cuBLAS variant and the CUDA and
C++ quantizers, and records each verdict in the dispatch cache (what ``backend="auto"``
trusts); on a CPU the C++ quantizer and the references, and with ``--interpret`` the Triton
kernels under Triton's interpreter on tiny shapes (see ``igpt_kernels.selftest``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``igpt selftest``."""
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="also run the Triton kernels under Triton's interpreter (CPU, tiny shapes)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON here")


def run(args) -> None:
    """``igpt selftest``: the table, the summary, the JSON file; status 1 on a failure."""
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton decides interpreted or compiled when the kernels are defined (at import),
        # so the interpreter needs a fresh process with the switch set
        cmd = [sys.executable, "-m", "igpt", "selftest", "--interpret"]
        cmd += ["--json", args.json] if args.json else []
        done = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False)
        if done.returncode:
            raise SystemExit(done.returncode)
        return
    from igpt_kernels.selftest import format_table, selftest

    report = selftest(interpret=args.interpret)
    print(format_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    if not report["ok"]:
        raise SystemExit(1)
