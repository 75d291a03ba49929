"""The igpt command: every command of the design is there, and `igpt info` reports."""

import subprocess
import sys

import pytest

from igpt.cli import build_parser, main

DESIGN_COMMANDS = ("fit-palette", "pretrain", "probe", "finetune", "sample", "bench", "demo")


def test_every_design_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(DESIGN_COMMANDS) <= set(sub.choices)


def test_info_names_the_backends(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert "torch:" in out and "quantize on CPU:" in out and "attention, ln_mlp on CPU" in out


def test_python_dash_m_is_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "igpt", "--help"], capture_output=True, text=True, check=True
    )
    assert all(name in done.stdout for name in DESIGN_COMMANDS)


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as e:
        main(["paint"])
    assert e.value.code == 2
