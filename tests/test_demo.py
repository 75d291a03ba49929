"""igpt demo end to end with a tiny step count: every artefact exists, every number is finite."""

import json
import math

import pytest

from igpt.cli import main


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow  # ~60-90 s on 2 cores
def test_demo_writes_every_artefact_with_finite_numbers(tmp_path, capsys, caplog, one_thread):
    caplog.set_level("INFO")
    out = tmp_path / "demo"
    main(
        [
            "demo",
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--limit",
            "300",
            "--per-class",
            "3",
            "--no-progress",
        ]
    )
    artefacts = ("report.md", "probe_by_layer.png", "probe_vs_loss.png", "loss.png")
    for name in (*artefacts, "completions.png", "metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    n_layer = 4  # igpt-tiny
    for model in ("pretrained", "random init"):
        layers = m["probe"][model]["layers"]
        assert [r["layer"] for r in layers] == list(range(n_layer + 1))
        assert all(_finite(r["val_acc"]) and _finite(r["test_acc"]) for r in layers)
    assert _finite(m["raw_pixels"]["test_acc"])
    for name in ("attentive", "knn"):  # the three probes at every layer
        layers = m["probes"][name]["layers"]
        assert [r["layer"] for r in layers] == list(range(n_layer + 1))
        assert all(0 <= r["test_acc"] <= 1 for r in layers)
    points = m["while_training"]["points"]  # figure 3: a probe at each of the 4 steps
    assert sorted({p["step"] for p in points}) == [1, 2, 3, 4]
    assert all(_finite(p["val_loss"]) and 0 <= p["probe_acc"] <= 1 for p in points)
    assert _finite(m["pretrain"]["val_loss"]) and m["pretrain"]["step"] == 4
    assert set(m["low_data"]) == {"pretrained", "random init", "raw pixels"}
    assert all(_finite(r["mean"]) and len(r["accs"]) == 5 for r in m["low_data"].values())
    report = (out / "report.md").read_text()
    assert "![completions](completions.png)" in report and "raw pixels" in report
    assert "## What the numbers show" in report and "random subsets" in report
    assert "over 5 random subsets" in report and "chosen by accuracy on a hold-out" in report
    assert "## Probing while pretraining (the paper's figure 3)" in report
    assert "![probe accuracy vs validation loss](probe_vs_loss.png)" in report
    assert "## Three probes at every layer" in report and "## k-NN probe per layer" in report
    assert "## Attentive probe per layer" in report
    logged = caplog.text  # the two blocks of per-layer lines say which model they probe
    assert "pretrained model, layer 0:" in logged and "random-init model, layer 0:" in logged
    from PIL import Image

    height = Image.open(out / "completions.png").size[1]
    assert height > 8 * (16 * 4) + 9 * 2  # the grid (8 rows of 16 px x4) and a labels strip
    summary = capsys.readouterr().out
    assert "igpt demo done" in summary and str(out / "report.md") in summary
