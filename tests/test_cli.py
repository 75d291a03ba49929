"""The igpt command: every command of the design is there, `igpt info` reports, flags come
from config dataclasses, and user errors leave as one line (a traceback with -v)."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import save_checkpoint
from igpt.cli import build_parser, main
from igpt.commands._common import (
    UsageError,
    config_from_args,
    dataclass_arguments,
    int_list,
    labelled_splits,
    open_checkpoint,
    pick_device,
)

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


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command_shows_the_traceback(where, tmp_path):
    argv = ["probe", "--checkpoint", str(tmp_path / "missing.pt")]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    assert build_parser().parse_args(argv).verbose is True
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(argv)
    assert build_parser().parse_args(["info"]).verbose is False


# ----------------------------------------------------------------------------- _common


@dataclasses.dataclass
class Settings:
    steps: int = dataclasses.field(default=10, metadata={"help": "optimizer steps"})
    lr: float | None = dataclasses.field(
        default=None, metadata={"help": "peak LR", "default_text": "from the size"}
    )
    mode: str = dataclasses.field(default="ar", metadata={"choices": ("ar", "bert")})
    fsdp: bool = False
    progress: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    per_class: tuple[int, ...] = (4, 25)
    out: Path = Path("runs/x")
    init_from: str | None = dataclasses.field(default=None, metadata={"flag": "--checkpoint"})
    extra: dict = dataclasses.field(default_factory=dict)


def _parser(**kw):
    parser = argparse.ArgumentParser()
    dataclass_arguments(parser, Settings, skip=("extra",), **kw)
    return parser


def test_dataclass_arguments_defaults_round_trip():
    args = _parser().parse_args([])
    assert config_from_args(Settings, args) == Settings()


def test_dataclass_arguments_parse_every_kind_of_field():
    argv = ["--steps", "3", "--lr", "0.5", "--mode", "bert", "--fsdp", "--no-progress"]
    argv += ["--betas", "0.8", "0.9", "--per-class", "1", "2", "3", "--out", "o"]
    argv += ["--checkpoint", "c.pt"]
    cfg = config_from_args(Settings, _parser().parse_args(argv), extra={"a": 1})
    assert cfg == Settings(
        steps=3,
        lr=0.5,
        mode="bert",
        fsdp=True,
        progress=False,
        betas=(0.8, 0.9),
        per_class=(1, 2, 3),
        out=Path("o"),
        init_from="c.pt",
        extra={"a": 1},
    )
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "gpt"])  # choices from the metadata
    with pytest.raises(SystemExit):
        _parser().parse_args(["--steps", "many"])


def test_dataclass_arguments_help_shows_each_default_once():
    text = _parser(helps={"steps": "how long"}).format_help()
    assert "how long (default: 10)" in text and "peak LR (default: from the size)" in text
    assert "--no-fsdp" in text and "default: 0.9 0.95" in text and "--checkpoint CHECKPOINT" in text
    assert "--extra" not in text


def test_dataclass_arguments_refuse_what_they_cannot_parse():
    with pytest.raises(TypeError, match="'extra'.*skip"):
        dataclass_arguments(argparse.ArgumentParser(), Settings)
    with pytest.raises(ValueError, match="lacks"):
        dataclass_arguments(argparse.ArgumentParser(), Settings, skip=("extra", "nope"))


def test_pick_device_and_int_list_raise_usage_errors(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="not a device name"):
        pick_device("toaster")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UsageError, match="use --device cpu"):
        pick_device("cuda")
    assert int_list(["4,25", "400"]) == [4, 25, 400]
    with pytest.raises(UsageError, match="--layers expects integers"):
        int_list("a,b", "--layers")


def test_open_checkpoint_is_the_shared_preamble(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(tmp_path / "run" / "ckpt_00000003.pt", objective="bert", step=3)
    args = argparse.Namespace(checkpoint=str(tmp_path / "run"), device="cpu", objective=None)
    got, model, palette, ckpt, objective = open_checkpoint(args)
    assert got == path and isinstance(model, IGPT) and len(palette) == 16
    assert ckpt["step"] == 3 and objective == "bert"
    args.objective = "ar"  # the flag wins over the checkpoint's own
    assert open_checkpoint(args)[-1] == "ar"
    with pytest.raises(UsageError, match="igpt probe needs --checkpoint"):
        open_checkpoint(argparse.Namespace(checkpoint=None, command="probe"))
    bare = tiny_checkpoint(tmp_path / "bare.pt", palette=False)
    with pytest.raises(UsageError, match="holds no palette"):
        open_checkpoint(argparse.Namespace(checkpoint=str(bare), device="cpu"))


def test_labelled_splits_take_the_first_images(tmp_path):
    import numpy as np

    train, test = labelled_splits("digits", 7)
    assert len(train) == len(test) == 7 and train.labels is not None
    np.savez(tmp_path / "x.npz", images=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(UsageError, match="no labels"):
        labelled_splits(f"npz:{tmp_path / 'x.npz'}", None, splits=("train",))
