"""Checkpoints: round trip, latest-step lookup, atomic writes that survive a crash."""

import pytest
import torch

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import (
    atomic_torch_save,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


def _model():
    return IGPT(IGPTConfig(n_px=4, n_layer=1, n_head=1, n_embd=32, n_colors=8))


def test_round_trip_and_latest(tmp_path):
    model = _model()
    torch.nn.init.normal_(model.lm_head.weight)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randint(0, 8, (1, 16))).sum().backward()
    opt.step()
    for step in (5, 40, 7):
        save_checkpoint(
            checkpoint_path(tmp_path, step),
            model,
            step=step,
            palette=torch.rand(8, 3) * 255,
            optimizer=opt.state_dict(),
        )
    assert latest_checkpoint(tmp_path).name == "ckpt_00000040.pt"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 40 and "optimizer" in ckpt
    back, _, _ = load_model(checkpoint_path(tmp_path, 5))
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ckpt_"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "x.pt")


def test_crash_mid_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_00000001.pt"
    atomic_torch_save({"step": 1}, path)

    def boom(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000001.pt"]  # no temp left


class Evil:
    """Stands for any pickled object a checkpoint must never bring to life."""


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "ckpt_00000003.pt"
    atomic_torch_save({"step": 3, "obj": Evil()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)
