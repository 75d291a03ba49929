"""Mutation testing, one module at a time, time-boxed: ``make mutation [MODULES="a b"]``.

    python tools/mutation.py training generation --budget 300 --write TESTING.md

mutmut 3 (``pip install -e ".[mutation]"``) makes small bugs in a copy of the code (an
operator, a constant, a comparison flipped; an argument dropped) and runs the tests that
reach the mutated function; a mutant the tests pass "survived". mutmut names a mutant's
module after its file's path and strips only a leading ``src/``, so this repository's
``python/igpt`` would be ``python.igpt`` to it and the tests, which import ``igpt``, would
never reach a mutant. Each module is therefore staged under ``build/mutation/<name>/``
as ``src/igpt``, ``src/igpt_kernels``, ``src/csrc`` and ``tests/`` with a pyproject that
holds that module's ``[tool.mutmut]`` settings: the one file to mutate and its own tests.
mutmut puts ``mutants/src`` first on ``sys.path``, so the mutated copy is imported, not the
editable install.

A module's run stops after ``--budget`` seconds (SIGINT: mutmut saves what it checked);
the mutants not reached by then are counted as "not checked". The score is killed (timeouts
included) over the checked mutants less the equivalent ones that
``tools/mutation_equivalent.json`` lists, with the reason each cannot change behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.json"
PYTEST_ARGS = ["-x", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
# lines not mutated: an error's or a log line's wording is not behaviour (the tests that
# match messages pin those); the condition that raises, on its own line, is mutated
SKIP_LINES = [r"^\s*raise \w+\(", r"^\s*log\.\w+\("]
MARK = "<!-- mutation scores: tools/mutation.py --write -->"


@dataclasses.dataclass(frozen=True)
class Target:
    """One module: its file, its own tests (pytest arguments) and, when only part of the
    file is the subject, the functions to mutate (``name`` or ``Class.method``)."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()


TARGETS = {
    "trust": Target(
        "igpt_kernels/trust.py",
        ("tests/test_trust.py", "tests/test_selftest.py", "-k", "not random"),
    ),
    "dispatch": Target(
        "igpt_kernels/_dispatch.py", ("tests/test_dispatch.py", "tests/test_dispatch_verdicts.py")
    ),
    "tokens": Target(
        "python/igpt/data/cache.py", ("tests/test_prepare.py", "tests/test_data_cache.py")
    ),
    "training": Target(
        "python/igpt/training.py",
        (
            "tests/test_train.py",
            "-k",
            "guard or device or norm or refuse or restore or autocast or open_resume",
        ),
    ),
    "generation": Target(
        "python/igpt/generation.py",
        (
            "tests/test_sample.py",
            "-k",
            "not cli and not grid and not png and not bert and not triton",
        ),
        (
            *("KVCache.for_model", "KVCache.positions", "KVCache.update"),
            *("FixedShapeKVCache.positions", "FixedShapeKVCache.update"),
            *("FixedShapeStep.__init__", "FixedShapeStep._run", "FixedShapeStep.__call__"),
            *("check_generate_args", "check_prefix", "sample", "next_token"),
        ),  # not FixedShapeStep._capture: CUDA graphs, which a CPU run never reaches
    ),
    "probe": Target(
        "python/igpt/probe.py",
        (
            "tests/test_probe.py",
            "-k",
            "separable or layers or ties or low_data or holdout or window or refits",
        ),
        ("_choose_C", "linear_probe", "probe_layers", "_window"),
    ),
    "finetune": Target(
        "python/igpt/finetune.py",
        ("tests/test_finetune.py", "-k", "patience or stop_early"),
        ("stop_early", "Finetuner._evaluate_and_keep_best", "Finetuner._restore_best"),
    ),
    "hf_patch": Target(
        "python/igpt/hf_patch.py",
        ("tests/test_hf_patch.py", "-k", "not trainer and not compile and not processor"),
        ("_padding_from_mask", "fallback_reason", "mlp_fallback_reason", "_global_hooks"),
    ),
}


def staged_path(target: Target) -> str:
    """The target's file in the staged ``src/`` layout."""
    return "src/" + target.path.removeprefix("python/")


def module_name(target: Target) -> str:
    return staged_path(target).removeprefix("src/").removesuffix(".py").replace("/", ".")


def mutant_globs(target: Target) -> list[str]:
    """mutmut's names for the mutants of ``target.functions`` (all of the file if none)."""
    mod = module_name(target)
    if not target.functions:
        return [f"{mod}.*"]
    globs = []
    for f in target.functions:
        cls, _, name = f.rpartition(".")
        mangled = f"x\u01c1{cls}\u01c1{name}" if cls else f"x_{name}"
        globs.append(f"{mod}.{mangled}__mutmut_*")
    return globs


def stage(name: str, target: Target, where: Path) -> Path:
    """A fresh ``src/`` copy of the code and tests with this target's mutmut settings."""
    d = where / name
    shutil.rmtree(d, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "python" / "igpt", d / "src" / "igpt", ignore=ignore)
    shutil.copytree(ROOT / "igpt_kernels", d / "src" / "igpt_kernels", ignore=ignore)
    shutil.copytree(ROOT / "csrc", d / "src" / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "tests", d / "tests", ignore=ignore)
    settings = {
        "source_paths": ["src"],
        "only_mutate": [staged_path(target)],
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": PYTEST_ARGS,
        "do_not_mutate_patterns": SKIP_LINES,
    }
    lines = ['[tool.pytest.ini_options]\ntestpaths = ["tests"]']
    lines.append('markers = ["cuda: needs a CUDA GPU", "slow: longer CPU tests"]\n')
    lines.append("[tool.mutmut]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (d / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return d


def run_mutmut(d: Path, globs: list[str], budget: float, log) -> float:
    """``mutmut run`` in ``d``, one child at a time, stopped after ``budget`` seconds;
    returns the seconds it took."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # no PYTHONPATH: mutmut puts mutants/src first on its own sys.path (setting it for the
    # processes the tests start too made mutmut's stats run see no test reach a mutant), so
    # a test that runs ``python -m igpt ...`` in a new process exercises the original code
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", "1", *globs]
    start = time.monotonic()
    # a session of its own: mutmut's forked workers are in its process group, which is
    # stopped whole (a worker can outlive its parent's SIGINT)
    proc = subprocess.Popen(
        cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # mutmut stops its workers and saves the results
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of this run's own group
    except ProcessLookupError:
        pass
    return time.monotonic() - start


def results(d: Path, target: Target, globs: list[str]) -> dict[str, str]:
    """mutant name -> status ("killed", "survived", "timeout", "not checked", ...)."""
    sys.path.insert(0, str(d))  # mutmut's stats table; no mutated code is imported here
    from mutmut.stats import status_by_exit_code

    meta = d / "mutants" / (staged_path(target) + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {
        k: status_by_exit_code[v]
        for k, v in sorted(codes.items())
        if any(fnmatch.fnmatchcase(k, g) for g in globs)
    }


def score(name, status: dict[str, str], equivalent: dict[str, str], seconds, commit: str) -> dict:
    killed = [k for k, s in status.items() if s in ("killed", "timeout")]
    survived = [k for k, s in status.items() if s not in ("killed", "timeout", "not checked")]
    equiv = [k for k in survived if k in equivalent]
    alive = [k for k in survived if k not in equivalent]
    unchecked = [k for k, s in status.items() if s == "not checked"]
    judged = len(killed) + len(alive)
    return {
        "module": name,
        "mutants": len(status),
        "killed": len(killed),
        "equivalent": len(equiv),
        "survived": alive,
        "not_checked": len(unchecked),
        "score": None if judged == 0 else 100.0 * len(killed) / judged,
        "seconds": round(seconds),
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def commit() -> str:
    """HEAD, with "+changes" when the code or tests differ from it (what was staged)."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    head = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    git = ["git", "status", "--porcelain", "--", "python", "igpt_kernels", "tests"]
    changed = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if changed else "")


def table(rows: list[dict]) -> str:
    cpu = f"{os.cpu_count()} cores, {platform.machine()}"
    out = [
        f"Last runs on {cpu}, mutmut one child at a time (`build/mutation/scores.json`).\n",
        "| module | mutants | killed | equivalent | survived | not checked | score | time "
        "| commit | date (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = "-" if r["score"] is None else f"{r['score']:.0f}%"
        out.append(
            f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['equivalent']} | "
            f"{len(r['survived'])} | {r['not_checked']} | {s} | {r['seconds']} s "
            f"| {r.get('commit', '?')} | {r.get('date', '?')} |"
        )
    return "\n".join(out) + "\n"


def write_into(path: Path, text: str) -> None:
    """Replace the block between two ``MARK`` lines of ``path`` with ``text``."""
    doc = path.read_text()
    head, found, rest = doc.partition(MARK + "\n")
    _, found2, tail = rest.partition(MARK + "\n")
    if not (found and found2):
        raise SystemExit(f"{path} has no pair of lines {MARK!r} to write between")
    path.write_text(head + MARK + "\n" + text + MARK + "\n" + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"of {', '.join(TARGETS)} (default: all)")
    p.add_argument("--budget", type=float, default=300, help="seconds per module")
    p.add_argument("--where", type=Path, default=ROOT / "build" / "mutation")
    p.add_argument("--write", type=Path, help="put the score table into this file")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="run nothing: score the last runs again (after editing the equivalent list)",
    )
    args = p.parse_args(argv)
    names = args.modules or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown modules {unknown}; choose among {list(TARGETS)}")
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    scores = args.where / "scores.json"  # earlier runs of other modules are kept
    earlier = json.loads(scores.read_text()) if scores.is_file() else []
    rows = []
    for name in names:
        target, globs, d = TARGETS[name], mutant_globs(TARGETS[name]), args.where / name
        if args.rescore:
            last = next((r for r in earlier if r["module"] == name), None)
            if last is not None:
                status = results(d, target, globs)
                rows.append(score(name, status, equivalent, last["seconds"], last["commit"]))
                rows[-1]["date"] = last.get("date", "?")  # when it ran
            continue
        staged = commit()
        d = stage(name, target, args.where)
        print(f"{name}: mutating {target.path} for {args.budget:.0f} s (log {d}/mutmut.log)")
        with open(d / "mutmut.log", "w") as log:
            seconds = run_mutmut(d, globs, args.budget, log)
        rows.append(score(name, results(d, target, globs), equivalent, seconds, staged))
        for k in rows[-1]["survived"]:
            print(f"  survived: {k}   (cd {d} && mutmut show {k})")
    done = {r["module"] for r in rows}
    order = {name: i for i, name in enumerate(TARGETS)}
    rows = sorted(
        [*(r for r in earlier if r["module"] not in done), *rows],
        key=lambda r: order.get(r["module"], 99),
    )
    scores.write_text(json.dumps(rows, indent=1))
    text = table(rows)
    print(text)
    if args.write:
        write_into(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
