"""igpt.attentive: the head against plain attention, bounded token features, known answers."""

import json
import math

import numpy as np
import pytest
import torch

from igpt import IGPT, IGPTConfig, attentive, evaluation, probe

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n_layer=3, n_px=4):
    return IGPT(IGPTConfig(n_px=n_px, n_layer=n_layer, n_head=2, n_embd=32, n_colors=16))


def planted(n, n_classes=4, tokens=8, dim=16, seed=0):
    """Token sets where one token at a random place carries its class's direction: an
    attentive probe finds it; the mean of the tokens dilutes it by ``tokens``."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(n_classes, dim))
    y = rng.integers(0, n_classes, n)
    x = rng.normal(size=(n, tokens, dim))
    x[np.arange(n), rng.integers(0, tokens, n)] += 6 * directions[y]
    return x.astype(np.float32), y


def naive_head(head, x):
    """The head as written in AIM: k, v = W x + b per token, softmax(q k / sqrt(hd)) v."""
    B, T, d = x.shape
    H, Q = head.n_heads, len(head.query)
    hd = d // H
    x = (x - head.mean) / head.std
    k, v = head.kv(x).view(B, T, 2, H, hd).unbind(2)  # (B, T, H, hd)
    q = head.query.view(Q, H, hd)
    att = (torch.einsum("qhe,bthe->bhqt", q, k) / math.sqrt(hd)).softmax(-1)
    o = torch.einsum("bhqt,bthe->bqhe", att, v).reshape(B, Q, d)
    return head.head(o.mean(1))


def test_head_in_its_cheap_order_is_plain_cross_attention():
    head = attentive.AttentiveHead(24, 5, n_queries=3, n_heads=4)
    with torch.no_grad():
        head.query.normal_()
        head.kv.bias.normal_()
        head.mean.normal_()
        head.std.uniform_(0.5, 2)
    x = torch.randn(7, 9, 24, dtype=torch.float64)
    head = head.double()
    torch.testing.assert_close(head(x), naive_head(head, x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="n_heads must divide"):
        attentive.AttentiveHead(24, 5, n_heads=5)


def test_separable_tokens_give_100_percent_and_shuffled_labels_chance():
    x, y = planted(240)
    xt, yt = planted(200, seed=1)
    res = probe.attentive_probe(x, y, xt, yt, seed=0, device="cpu")
    assert res["test_acc"] == 1.0 and res["val_acc"] == 1.0 and 1 <= res["epoch"]
    shuffled = np.random.default_rng(0).permutation(y)
    res = probe.attentive_probe(x, shuffled, xt, yt, seed=0, device="cpu")
    assert abs(res["test_acc"] - 0.25) < 0.1
    with pytest.raises(ValueError, match=r"\(N, T, d\)"):
        probe.attentive_probe(x[:, 0], y)


def test_token_features_average_to_the_pooled_features():
    model = tiny()
    tokens = torch.randint(0, 16, (5, 16))
    pooled = probe.extract_features(model, tokens, progress=False)
    every = attentive.token_features(model, tokens, grid=None, progress=False)
    assert every.dtype == torch.float16 and every.shape == (5, 4, 16, 32)
    torch.testing.assert_close(every.float().mean(2), pooled, rtol=0, atol=5e-3)
    grid = attentive.token_features(model, tokens, grid=2, layers=[1, -1], progress=False)
    assert grid.shape == (5, 2, 4, 32)  # 2 x 2 patch means of the 4 x 4 tokens
    torch.testing.assert_close(grid.float().mean(2), pooled[:, [1, 3]], rtol=0, atol=5e-3)
    patch = every[:, 1].float().view(5, 2, 2, 2, 2, 32)[:, 0, :, 0, :].mean((1, 2))
    torch.testing.assert_close(grid[:, 0, 0].float(), patch, rtol=0, atol=5e-3)  # top left


def test_attentive_layers_hold_at_most_max_bytes_per_pass(monkeypatch):
    model = tiny(n_layer=3)
    x = torch.randint(0, 16, (24, 16))
    xt = torch.randint(0, 16, (12, 16))
    y, yt = np.arange(24) % 2, np.arange(12) % 2
    passes = []
    real = attentive.token_features

    def counted(model, tokens, *, layers, **kw):
        passes.append(list(layers))
        return real(model, tokens, layers=layers, **kw)

    monkeypatch.setattr(attentive, "token_features", counted)
    one_layer = attentive.token_feature_bytes(36, 1, 16, 32, 2)
    res = attentive.attentive_layers(
        model, x, y, xt, yt, grid=2, max_bytes=2 * one_layer, progress=False, min_steps=5
    )
    assert [r["layer"] for r in res["rows"]] == [0, 1, 2, 3] and res["tokens"] == 4
    assert passes == [[0, 1], [0, 1], [2, 3], [2, 3]]  # train and test, two layers a pass
    with pytest.raises(ValueError, match="max_bytes"):
        attentive.attentive_layers(model, x, y, xt, yt, grid=2, max_bytes=one_layer - 1)


def test_evaluate_runs_only_the_probes_asked_and_reports_them(tmp_path):
    from igpt.reporting import summary_text, write_report

    model = tiny(n_layer=2)
    x, xt = torch.randint(0, 16, (40, 16)), torch.randint(0, 16, (20, 16))
    y, yt = np.arange(40) % 2, np.arange(20) % 2
    res = evaluation.evaluate(
        model, None, (x, y), (xt, yt), probes="attentive,knn", attentive={"min_steps": 5},
        progress=False,
    )  # fmt: skip
    assert res["probes"] == ["attentive", "knn"] and "layers" not in res
    assert [r["layer"] for r in res["attentive"]["rows"]] == [0, 1, 2]
    assert [r["layer"] for r in res["knn"]["rows"]] == [0, 1, 2]
    text = summary_text(res)
    assert "## Attentive probe per layer" in text and "## k-NN probe per layer" in text
    assert "## Probes side by side" in text
    paths = write_report(res, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert set(saved["attentive"]) >= {"rows", "best_layer", "best"}
    assert paths["png"].stat().st_size > 1000
    with pytest.raises(ValueError, match="probes must be some of"):
        evaluation.evaluate(model, None, (x, y), (xt, yt), probes="linear,svm")


@pytest.mark.parametrize("source", ["checkpoint", "hf"])
def test_igpt_probe_attentive_and_knn_from_a_checkpoint_or_hf_directory(
    source, tmp_path, capsys, tiny_checkpoint, digits_palette
):
    from igpt.checkpoint import load_model
    from igpt.cli import main

    path = tiny_checkpoint(tmp_path / "run" / "ckpt_00000003.pt", step=3)
    if source == "hf":
        model, palette, _ = load_model(path)
        path = model.save_pretrained(tmp_path / "hf", palette=palette)
    out = tmp_path / "out"
    main(
        ["probe", "--checkpoint", str(path), "--data", "digits", "--limit", "120",
         "--probe", "attentive,knn", "--token-grid", "4", "--layers", "all", "--out", str(out)]
    )  # fmt: skip
    report = json.loads((out / "probe.json").read_text())
    assert report["probes"] == ["attentive", "knn"] and "layers" not in report
    for name in ("attentive", "knn"):
        rows = report[name]["rows"]
        assert [r["layer"] for r in rows] == [0, 1, 2]
        assert all(0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in rows)
    assert report["attentive"]["tokens"] == 16
    text = (out / "probe.md").read_text()
    assert "Attentive probe per layer (16 tokens per image)" in text and "k-NN" in text
    assert "Probes side by side" in capsys.readouterr().out


def test_igpt_probe_refuses_an_unknown_probe(capsys):
    from igpt.cli import main

    with pytest.raises(SystemExit):
        main(["probe", "--checkpoint", "x", "--data", "digits", "--probe", "linear,svm"])
    assert "probes must be some of" in capsys.readouterr().err


@pytest.mark.cuda
def test_token_features_and_probes_on_cuda_match_cpu():
    model = tiny()
    tokens = torch.randint(0, 16, (6, 16))
    cpu = attentive.token_features(model, tokens, grid=2, progress=False).float()
    gpu = attentive.token_features(model, tokens, grid=2, device="cuda", progress=False).float()
    torch.testing.assert_close(gpu, cpu, rtol=0.05, atol=0.05)  # bf16 autocast on the GPU
    x, y = planted(240)
    xt, yt = planted(200, seed=1)
    assert probe.attentive_probe(x, y, xt, yt, device="cuda")["test_acc"] == 1.0
