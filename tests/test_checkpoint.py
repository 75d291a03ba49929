"""Checkpoints: round trip, latest-step lookup, atomic writes that survive a crash, one clear
error for every file that is not an igpt checkpoint, the newest intact one of a run."""

import logging
import os
import stat

import pytest
import torch

from igpt import IGPT, IGPTConfig
from igpt._io import atomic_write_text, remove_stale_temp_files
from igpt.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    checkpoint_path,
    checkpoint_state,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    load_model,
    run_checkpoints,
    save_checkpoint,
)
from igpt.rundir import RunDir


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
    # one sentence, naming the file and the refused class: never torch's 40 lines
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refuses to unpickle" in msg
    assert "Evil" in msg and "untrusted source" in msg


def _damaged(tmp_path):
    """A good checkpoint's bytes, and files made from them as a careless copy would."""
    good = tmp_path / "good.pt"
    save_checkpoint(good, _model(), step=1)
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "tail cut": data[:-7],
        "empty": b"",
        "random bytes": os.urandom(3000),
        "text": b"hello, not a checkpoint\n",
    }
    for name, payload in files.items():
        (tmp_path / f"{name.replace(' ', '_')}.pt").write_bytes(payload)
    return {name: tmp_path / f"{name.replace(' ', '_')}.pt" for name in files}


@pytest.mark.parametrize("reader", [load_checkpoint, load_model])
def test_unreadable_checkpoints_raise_one_line_naming_the_file(tmp_path, reader):
    for kind, path in _damaged(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            reader(path)
        msg = str(e.value)
        assert isinstance(e.value, ValueError) and str(path) in msg and "\n" not in msg, kind
        want = {"empty": "empty", "truncated": "truncated", "tail cut": "truncated"}
        assert want.get(kind, "not a torch checkpoint") in msg, (kind, msg)


def test_checkpoint_without_model_or_config_is_refused(tmp_path):
    torch.save({"step": 3, "config": {}}, tmp_path / "a.pt")
    torch.save({"model": {}}, tmp_path / "b.pt")
    torch.save([1, 2], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"a.pt is not an igpt checkpoint: it has no 'model'"):
        load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"b.pt .*no 'config'"):
        load_model(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"c.pt holds a list"):
        load_checkpoint(tmp_path / "c.pt")
    # a config that is not one, and weights of another model
    model = _model()
    torch.save({"model": model.state_dict(), "config": {"n_pix": 4}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=r"d.pt: its 'config' entry .*n_pix"):
        load_model(tmp_path / "d.pt")
    other = IGPTConfig(n_px=4, n_layer=2, n_head=1, n_embd=32, n_colors=8).to_dict()
    torch.save({"model": model.state_dict(), "config": other}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match=r"e.pt: its weights do not fit its own config"):
        load_model(tmp_path / "e.pt")


def test_latest_intact_checkpoint_passes_over_a_damaged_newer_one(tmp_path, caplog):
    for step in (2, 4, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), _model(), step=step)
    assert latest_intact_checkpoint(tmp_path)[0].name == "ckpt_00000006.pt"
    newest = checkpoint_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:100])
    checkpoint_path(tmp_path, 4).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        path, ckpt = latest_intact_checkpoint(tmp_path)
    assert path.name == "ckpt_00000002.pt" and ckpt["step"] == 2
    assert "using " in caplog.text and "ckpt_00000006.pt, ckpt_00000004.pt" in caplog.text
    checkpoint_path(tmp_path, 2).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint of .* can be read"):
        latest_intact_checkpoint(tmp_path)
    assert latest_intact_checkpoint(tmp_path / "none") is None
    with pytest.raises(CheckpointError, match="ckpt_00000006.pt is damaged"):
        load_checkpoint(tmp_path)  # a directory's latest is read as it is, and named


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        save_checkpoint(tmp_path / "b.pt", _model())
        (tmp_path / "c.txt").write_text("x")  # what open() gives, for comparison
        os.umask(0o077)
        atomic_write_text(tmp_path / "d.json", "{}")
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode == {"a.json": 0o644, "b.pt": 0o644, "c.txt": 0o644, "d.json": 0o600}


def test_stale_temp_files_are_removed_and_only_igpts(tmp_path):
    atomic_write_text(tmp_path / "keep.json", "{}")
    stale = [tmp_path / ".ckpt_00000004.pt.k3j_x9aq.tmp", tmp_path / ".config.json.abcd1234.tmp"]
    others = [tmp_path / ".notes.tmp", tmp_path / "x.abcd1234.tmp", tmp_path / ".a.b.TOOLONG99.tmp"]
    for p in stale + others:
        p.write_bytes(b"half")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".ckpt_1.pt.abcd1234.tmp").write_bytes(b"other folder")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in others) and not any(p.exists() for p in stale)
    assert (tmp_path / "sub" / ".ckpt_1.pt.abcd1234.tmp").exists()


# ----------------------------------------------------------------------------- sharded (DCP)


def _save_sharded(run: RunDir, model, step: int):
    """A sharded checkpoint of ``model`` at ``step`` as the trainer writes one (one process)."""
    state = checkpoint_state(model, step=step, state_dict={}, palette=torch.rand(8, 3) * 255)
    del state["model"]
    return run.save_sharded_checkpoint({"model": model.state_dict()}, state, step, keep=2)


def test_sharded_checkpoint_round_trip_latest_and_prune(tmp_path):
    """A ``.dcp`` directory is a checkpoint like a ``.pt`` file: the newest step of a run,
    its weights gathered by every reader, its state alone with ``tensors=False``; ``keep``
    prunes directories and files alike."""
    run, model = RunDir(tmp_path), _model()
    torch.nn.init.normal_(model.lm_head.weight)
    save_checkpoint(checkpoint_path(tmp_path, 1), model, step=1)
    for step in (2, 3):
        path = _save_sharded(run, model, step)
    assert path.name == "ckpt_00000003.dcp" and {".metadata", "state.pt"} <= set(
        p.name for p in path.iterdir()
    )
    assert [p.name for p in run_checkpoints(tmp_path)] == ["ckpt_00000002.dcp", path.name]
    assert latest_checkpoint(tmp_path) == path
    back, palette, ckpt = load_model(tmp_path)
    assert ckpt["step"] == 3 and ckpt["sharded"] == str(path) and len(palette) == 8
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    found, state = latest_intact_checkpoint(tmp_path, tensors=False)
    assert found == path and "model" not in state and state["step"] == 3


@pytest.mark.parametrize("damage", ["cut_shard", "no_metadata", "no_state"])
def test_damaged_sharded_checkpoint_is_passed_over(tmp_path, caplog, damage):
    run, model = RunDir(tmp_path), _model()
    _save_sharded(run, model, 2)
    newest = _save_sharded(run, model, 4)
    if damage == "cut_shard":
        shard = newest / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (newest / (".metadata" if damage == "no_metadata" else "state.pt")).unlink()
    with caplog.at_level(logging.WARNING):
        path, ckpt = latest_intact_checkpoint(tmp_path, tensors=False)
    assert path.name == "ckpt_00000002.dcp" and ckpt["step"] == 2
    assert "ckpt_00000004.dcp is damaged" in caplog.text
    with pytest.raises(CheckpointError, match="ckpt_00000004.dcp is damaged"):
        load_checkpoint(newest)


def test_a_sharded_save_killed_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """The ranks write into a temporary directory that only a finished save renames; the
    next run removes it."""
    import torch.distributed.checkpoint as dcp

    run, model = RunDir(tmp_path), _model()
    _save_sharded(run, model, 2)

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        _save_sharded(run, model, 4)
    monkeypatch.undo()
    assert [p.name for p in run_checkpoints(tmp_path)] == ["ckpt_00000002.dcp"]
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".ckpt_00000004.dcp.partial_.tmp"]
    RunDir(tmp_path)  # a run opening the directory removes what the killed save left
    assert not list(tmp_path.glob(".*.tmp"))


def test_consolidate_and_export_hf_gather_a_sharded_checkpoint(tmp_path, capsys):
    """``igpt consolidate`` writes one file of the whole model; ``igpt export-hf`` takes the
    sharded directory as it takes a file."""
    from igpt.cli import main

    run, model = RunDir(tmp_path / "run"), _model()
    torch.nn.init.normal_(model.lm_head.weight)
    path = _save_sharded(run, model, 3)
    main(["consolidate", str(run.path), str(tmp_path / "one.pt")])
    assert "wrote" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "one.pt", weights_only=True)
    assert ckpt["step"] == 3 and "sharded" not in ckpt and "palette" in ckpt
    back, _, _ = load_model(tmp_path / "one.pt")
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pytest.importorskip("transformers")
    main(["export-hf", str(path), str(tmp_path / "hf")])
    back = IGPT.from_pretrained(tmp_path / "hf")
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
