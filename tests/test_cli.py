"""The igpt command: every command of the design is there, and `igpt info` reports."""

import subprocess
import sys

import pytest
import torch

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import save_checkpoint
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


@pytest.mark.parametrize("command", ["probe", "finetune", "sample", "demo"])
def test_missing_gpu_is_a_clear_exit(command, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = ["--device", "cuda", "--out", str(tmp_path / "x")]
    if command != "demo":
        path = tmp_path / "tiny.pt"
        model = IGPT(IGPTConfig(n_px=4, n_layer=1, n_head=1, n_embd=32, n_colors=8))
        save_checkpoint(path, model, palette=torch.rand(8, 3) * 255)
        args += ["--checkpoint", str(path)]
    with pytest.raises(SystemExit, match="no CUDA GPU is visible; use --device cpu"):
        main([command, *args])


def test_user_errors_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="igpt probe: checkpoint .*missing.pt does not exist"):
        main(["probe", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
