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
from igpt.commands.finetune import near_chance

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
def test_missing_gpu_is_a_clear_exit(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = ["--device", "cuda", "--out", str(tmp_path / "x")]
    if command != "demo":
        path = tmp_path / "tiny.pt"
        model = IGPT(IGPTConfig(n_px=4, n_layer=1, n_head=1, n_embd=32, n_colors=8))
        save_checkpoint(path, model, palette=torch.rand(8, 3) * 255)
        args += ["--checkpoint", str(path)]
    with pytest.raises(SystemExit) as e:
        main([command, *args])
    err = capsys.readouterr().err  # refused while parsing: one line, argparse's status 2
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--device 'cuda' but no CUDA GPU is visible; use --device cpu" in err


def test_user_errors_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="igpt probe: checkpoint .*missing.pt does not exist"):
        main(["probe", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])


def test_probe_draws_no_bars_into_a_log_and_has_progress_flags(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    argv = ["probe", "--checkpoint", str(ckpt), "--limit", "60", "--per-class", "none"]
    argv += ["--no-baselines", "--concat", "0", "--cs", "1", "--out", str(tmp_path / "p")]
    main(argv)  # stderr is captured here, not a terminal: no bars
    err = capsys.readouterr().err
    assert "\r" not in err and "features:" not in err
    for command in ("probe", "finetune"):  # the flags pretrain and demo have
        assert build_parser().parse_args([command, "--no-progress"]).progress is False
        assert build_parser().parse_args([command, "--progress"]).progress is True
    help_text = build_parser()._subparsers._group_actions[0].choices["probe"].format_help()
    assert "default None" not in help_text and "checkpoint's own" in help_text


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


@pytest.mark.parametrize("command", ["probe", "finetune"])
def test_probe_and_finetune_refuse_an_unlabelled_split_in_one_line(
    command, tiny_checkpoint, tmp_path
):
    """They read the token cache now; a split without labels is refused as before."""
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images)
    argv = [command, "--checkpoint", str(tiny_checkpoint(tmp_path / "m.pt")), "--device", "cpu"]
    argv += ["--data", f"npz:{tmp_path / 'x.npz'}", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="has no labels in its 'train' split; this command"):
        main([*argv, "--cache-dir", str(tmp_path / "cache")])


# ----------------------------------------------------------------------------- parse-time checks


def test_count_and_number_refuse_odd_values_while_parsing():
    from igpt.commands._common import count, number

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=count(1))
    parser.add_argument("--rows", type=count(0, none="none"))
    parser.add_argument("--lr", type=number(above=0))
    parser.add_argument("--p", type=number(above=0, most=1))
    args = parser.parse_args(["--n", "3", "--rows", "none", "--lr", "1e-3", "--p", "1"])
    assert (args.n, args.rows, args.lr, args.p) == (3, None, 1e-3, 1.0)
    for argv in (["--n", "0"], ["--n", "-1"], ["--n", "2.5"], ["--rows", "-1"], ["--lr", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    for text in ("inf", "-inf", "nan", "0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="number"):
            number(above=0)(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"> 0 and <= 1, got '1.5'"):
        number(above=0, most=1)("1.5")


def test_int_items_check_each_item_and_flat_joins_them():
    from igpt.commands._common import flat, int_items

    parser = argparse.ArgumentParser()
    parser.add_argument("--k", nargs="+", type=int_items("--k", least=1, none="none"))
    assert flat(parser.parse_args(["--k", "4,25", "400"]).k) == [4, 25, 400]
    assert flat(parser.parse_args(["--k", "none"]).k) == []
    assert flat(None) is None
    for bad in ("-1", "0", "4,x", ","):
        with pytest.raises(SystemExit):
            parser.parse_args(["--k", bad])
    with pytest.raises(UsageError, match=">= 1"):
        int_list("4,0", "--k", least=1)


@dataclasses.dataclass
class Checked:
    steps: int = 10
    lr: float = 0.1
    batch_size: int = dataclasses.field(default=4, metadata={"min": 1})
    init_from: str | None = dataclasses.field(default=None, metadata={"flag": "--checkpoint"})

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps}")
        if self.init_from == "bad":
            raise ValueError(f"init_from {self.init_from!r} is not a checkpoint")


def test_dataclass_configs_are_checked_right_after_parsing():
    from igpt.commands._common import run_parse_checks

    parser = argparse.ArgumentParser()
    dataclass_arguments(parser, Checked)
    run_parse_checks(parser.parse_args(["--steps", "3"]))  # a good config passes
    with pytest.raises(UsageError, match="^argument --steps: steps must be a positive int"):
        run_parse_checks(parser.parse_args(["--steps", "0"]))
    with pytest.raises(UsageError, match="^argument --checkpoint: init_from 'bad'"):
        run_parse_checks(parser.parse_args(["--checkpoint", "bad"]))
    for argv in (["--lr", "inf"], ["--lr", "nan"], ["--batch-size", "0"]):  # type and metadata
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_every_error_of_the_parser_is_one_line(capsys):
    for argv in (["probe", "--bogus"], ["probe", "--per-class", "-1"], ["plan"], ["sample", "-n"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"igpt {argv[0]}: error: ") and "-h lists the flags" in err
    with pytest.raises(SystemExit):
        main(["probe", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_read_palette_names_the_flag_and_file(tmp_path):
    from igpt.commands._common import read_palette

    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match=r"--palette .*bad.npy is not a palette"):
        read_palette(tmp_path / "bad.npy")
    import numpy as np

    np.save(tmp_path / "shape.npy", np.zeros((4, 2)))
    with pytest.raises(UsageError, match="shape.npy is not a palette"):
        read_palette(tmp_path / "shape.npy")
    with pytest.raises(FileNotFoundError):
        read_palette(tmp_path / "missing.npy")


# ----------------------------------------------------------------------------- issue 26: resume


def test_pretrain_resume_alone_continues_the_run(tmp_path, digits_palette, monkeypatch, capsys):
    """`igpt pretrain --out RUN --resume` takes the run's own settings from its config.json;
    a flag typed beside it overrides, and is refused only where it would make another run."""
    import json

    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    digits_palette.save(tmp_path / "greys.npy")
    run = str(tmp_path / "run")
    here = ["--device", "cpu", "--no-progress"]
    main(["pretrain", "--out", run, "--n-px", "4", "--batch-size", "8", "--steps", "2",
          "--ckpt-every", "2", "--val-size", "8", "--lr", "1e-3", "--log-every", "1",
          "--palette", str(tmp_path / "greys.npy"), *here])  # fmt: skip
    capsys.readouterr()
    main(["pretrain", "--out", run, "--resume", "--steps", "3", *here])
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 3 and summary["out"] == run
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (train["n_px"], train["batch_size"], train["lr"], train["steps"]) == (4, 8, 1e-3, 3)
    assert train["resume"] is True and train["val_size"] == 8 and train["log_every"] == 1
    with pytest.raises(SystemExit, match="batch_size 8 there, 16 now"):
        main(["pretrain", "--out", run, "--resume", "--steps", "4", "--batch-size", "16", *here])


def test_finetune_resume_alone_continues_the_run(tmp_path, tiny_checkpoint, capsys):
    import json

    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    run = str(tmp_path / "ft")
    first = ["--steps", "2", "--eval-every", "2", "--batch-size", "8", "--limit", "40"]
    main(
        [
            "finetune",
            "--checkpoint",
            str(ckpt),
            "--out",
            run,
            *first,
            "--lr",
            "1e-3",
            "--device",
            "cpu",
        ]
    )
    capsys.readouterr()
    main(["finetune", "--out", run, "--resume", "--steps", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    test_labels = labelled_splits("digits", 40)[1].labels
    assert "test accuracy" in out
    assert ("near chance" in out) == (near_chance(summary["test_acc"], test_labels) is not None)
    assert summary["step"] == 4 and [h["step"] for h in summary["history"]] == [2, 4]
    assert summary["settings"]["lr"] == 1e-3 and summary["settings"]["batch_size"] == 8
    command = json.loads((tmp_path / "ft" / "command.json").read_text())["command"]
    assert command["limit"] == 40 and command["data"] == "digits"
    with pytest.raises(SystemExit, match="batch_size 8 there, 16 now"):
        main(["finetune", "--out", run, "--resume", "--steps", "6", "--batch-size", "16",
              "--device", "cpu"])  # fmt: skip


def test_unknown_model_sizes_are_refused_while_parsing(tmp_path, capsys):
    for argv in (
        ["pretrain", "--out", str(tmp_path / "x")],
        ["demo", "--out", str(tmp_path / "x")],
    ):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--model", "igpt-huge"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "igpt-huge" in err and err.count("\n") == 1
        assert not (tmp_path / "x").exists()  # nothing written: no palette, no run directory


def test_near_chance_is_measured_from_the_most_frequent_class():
    labels = [0] * 6 + [1] * 2 + [2] * 2  # always class 0: 0.6
    assert near_chance(0.6, labels) == 0.6 and near_chance(0.63, labels) == 0.6
    assert near_chance(0.65, labels) is None and near_chance(0.9, labels) is None
    assert near_chance(0.137, list(range(10)) * 5) == 0.1  # the 40-step run
    assert near_chance(0.384, list(range(10)) * 5) is None
