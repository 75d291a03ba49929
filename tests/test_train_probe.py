"""igpt.train_probe: probe rows in metrics.jsonl and figure 3 while pretraining on the digits."""

import json

import pytest

from igpt.train import TrainConfig, pretrain
from igpt.train_probe import TrainingProbe, default_probe_layers, plot_probe_vs_loss

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}


@pytest.fixture(scope="module", autouse=True)
def _module_setup(tmp_path_factory, one_thread):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGPT_CACHE", str(tmp_path_factory.mktemp("token_cache")))
        yield


def _cfg(tmp_path, **kw):
    base = dict(model="igpt-tiny", n_px=8, data="digits", steps=4, batch_size=8, log_every=1,
                ckpt_every=4, val_size=16, out=str(tmp_path / "run"), progress=False,
                model_overrides=TINY, probe_every=2, probe_size=60)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _rows(tmp_path):
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_pretraining_with_probe_every_writes_probe_rows_and_figure_3(tmp_path, caplog):
    caplog.set_level("INFO", logger="igpt")
    summary = pretrain(_cfg(tmp_path))
    rows = _rows(tmp_path)
    probes = [r for r in rows if "probe_acc" in r]
    assert [(r["step"], r["layer"]) for r in probes] == [(2, 1), (2, 2), (4, 1), (4, 2)]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r and "probe" not in r}
    for r in probes:  # each probe row carries its step's validation loss
        assert r["val_loss"] == val[r["step"]] and r["probe"] == "linear"
        assert 0 <= r["probe_acc"] <= 1 and r["probe_s"] > 0 and 0 < r["probe_share"] <= 1
    assert (tmp_path / "run" / "probe_vs_loss.png").stat().st_size > 1000
    assert "probe_acc" not in summary and summary["step"] == 4
    assert "step 4: linear probe layer 1" in caplog.text


def test_probe_kind_layers_and_data_are_the_flags(tmp_path):
    from igpt.cli import main

    main(["pretrain", "--n-px", "8", "--steps", "2", "--batch-size", "8", "--val-size", "8",
          "--out", str(tmp_path / "run"), "--probe-every", "1", "--probe", "knn",
          "--probe-layers", "0", "-1", "--probe-data", "digits", "--probe-size", "40",
          "--no-progress"])  # fmt: skip
    probes = [r for r in _rows(tmp_path) if "probe_acc" in r]
    assert [(r["step"], r["layer"], r["probe"]) for r in probes] == [
        (1, 0, "knn"), (1, 4, "knn"), (2, 0, "knn"), (2, 4, "knn")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="probe_layers .*layer 5 is out of range"):
        pretrain(_cfg(tmp_path, out=str(tmp_path / "bad"), probe_layers=(5,)))
    with pytest.raises(ValueError, match="probe_kind must be one of"):
        _cfg(tmp_path, probe_kind="svm")
    with pytest.raises(ValueError, match="probe_every"):
        _cfg(tmp_path, probe_every=-1)


def test_the_attentive_probe_runs_while_pretraining(tmp_path):
    pretrain(_cfg(tmp_path, steps=2, probe_kind="attentive", probe_size=40))
    probes = [r for r in _rows(tmp_path) if "probe_acc" in r]
    assert [(r["step"], r["layer"], r["probe"]) for r in probes] == [
        (2, 1, "attentive"), (2, 2, "attentive")
    ]  # fmt: skip


def test_default_layers_are_a_few_spread_over_depth():
    assert default_probe_layers(24) == [6, 12, 18, 24]
    assert default_probe_layers(4) == [1, 2, 3, 4]
    assert default_probe_layers(2) == [1, 2]
    assert default_probe_layers(1) == [1]


class _Dist:
    def __init__(self, is_main, sharded=False):
        self.is_main, self.sharded, self.barriers = is_main, sharded, 0

    def barrier(self):
        self.barriers += 1


def test_other_ranks_only_wait_and_fsdp_switches_the_probe_off(tmp_path, caplog):
    other = _Dist(is_main=False)
    probe = TrainingProbe(_cfg(tmp_path), n_layer=2, palette=None, dist=other)
    assert probe.data is None and probe.due(2) and not probe.due(3)
    probe.run(trainer=None, row={"step": 2, "val_loss": 1.0})  # no data, no model: waits
    assert other.barriers == 1
    sharded = TrainingProbe(_cfg(tmp_path), n_layer=2, palette=None, dist=_Dist(True, True))
    assert not sharded.due(2) and "off under FSDP" in caplog.text


def test_figure_3_plots_accuracy_against_validation_loss(tmp_path):
    rows = [{"step": s, "val_loss": 2.5 - s / 10} for s in (1, 2, 3)]
    rows += [{"step": s, "val_loss": 2.5 - s / 10, "layer": lay, "probe_acc": 0.1 * s + lay / 10,
              "probe": "linear"} for s in (1, 2, 3) for lay in (1, 2)]  # fmt: skip
    plot_probe_vs_loss(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    plot_probe_vs_loss(rows[:3], tmp_path / "none.png")  # no probe rows: no figure
    assert not (tmp_path / "none.png").exists()
