"""igpt.probe: features against a naive loop, the cache, probes, low-data subsets, ensembles."""

import json

import numpy as np
import pytest
import torch

from igpt import IGPT, IGPTConfig, evaluation, probe
from igpt.probe_inputs import stratified_holdout

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n_layer=3, **kw):
    fields = dict(n_px=4, n_layer=n_layer, n_head=2, n_embd=64, n_colors=16)
    fields.update(kw)
    return IGPT(IGPTConfig(**fields))


def naive_features(model, tokens, bert_mask=None):
    """f^l from the definition, one layer at a time: mean_i ln_1^l(h^l), then mean_i ln_f(h^L)."""
    with torch.no_grad():
        h = model.embed(tokens, bert_mask)
        out = []
        for block in model.transformer.h:
            out.append(block.ln_1(h).mean(dim=1))
            h = block(h, bert_mask is None)
        out.append(model.transformer.ln_f(h).mean(dim=1))
    return torch.stack(out, dim=1)


def blobs(n, n_classes=4, dim=16, seed=0):
    """Linearly separable classes: y = argmax(x W), keeping points with a margin of 1.

    The points fill space (no clusters), so with shuffled labels a probe can only memorise.
    """
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(123).normal(size=(dim, n_classes))
    x = rng.normal(size=(4 * n, dim))
    logits = np.sort(x @ w, axis=1)
    x = x[logits[:, -1] - logits[:, -2] > 1.0][:n]
    assert len(x) == n
    return x.astype(np.float32), (x @ w).argmax(1)


@pytest.mark.parametrize("bert", [False, True])
def test_features_equal_naive_per_layer_loop(bert):
    model = tiny()
    tokens = torch.randint(0, 16, (11, 16))
    seed = 3 if bert else None
    feats = probe.extract_features(model, tokens, batch_size=4, bert_mask_seed=seed, progress=False)
    mask = probe.bert_mask(tokens.shape, seed=3) if bert else None
    assert feats.dtype == torch.float32 and feats.shape == (11, 4, 64)
    torch.testing.assert_close(feats, naive_features(model, tokens, mask), rtol=1e-5, atol=1e-5)
    some = probe.extract_features(
        model, tokens, layers=[0, -1], bert_mask_seed=seed, progress=False
    )
    torch.testing.assert_close(some, feats[:, [0, 3]])


def test_bert_eval_mask_is_blockwise_and_batch_independent(monkeypatch):
    from igpt import objectives  # probe's masks are the objective's (one scheme)

    monkeypatch.setattr(objectives, "MASK_BLOCK", 8)
    whole = probe.bert_mask((21, 16), 0.3, seed=5)
    assert whole.shape == (21, 16) and 0.15 < whole.float().mean() < 0.45
    rows = probe.MaskRows((21, 16), 0.3, seed=5)
    parts = [rows(s, s + 5) for s in range(0, 21, 5)]  # batches straddle the blocks
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert not torch.equal(probe.bert_mask((21, 16), 0.3, seed=6), whole)
    assert not torch.equal(whole[:8], whole[8:16])  # each block has its own generator


def test_features_cache_is_hit_on_second_run(tmp_path):
    model = tiny(n_layer=2)
    tokens = torch.randint(0, 16, (6, 16))
    calls = []
    original = model.features

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    model.features = counting
    kw = dict(batch_size=4, cache_dir=tmp_path, cache_key="ckpt-a:digits", progress=False)
    first = probe.extract_features(model, tokens, **kw)
    assert len(calls) == 2  # two batches
    second = probe.extract_features(model, tokens, **kw)
    assert len(calls) == 2  # read from disk
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    probe.extract_features(model, tokens, layers=[1], **kw)  # another layer set: recompute
    assert len(calls) == 4
    other = tokens.clone()
    other[0, 0] = (other[0, 0] + 1) % 16
    probe.extract_features(model, other, **kw)  # another dataset under the same key: recompute
    assert len(calls) == 6


def test_extract_features_rejects_bad_input():
    model = tiny(n_layer=1)
    with pytest.raises(TypeError, match="tokens"):
        probe.extract_features(model, torch.rand(2, 16), progress=False)
    with pytest.raises(ValueError, match="layer 5"):
        probe.extract_features(model, torch.zeros(2, 16, dtype=torch.long), layers=[5])


def test_probe_separable_is_near_perfect_and_shuffled_is_chance():
    x, y = blobs(600)
    xt, yt = blobs(400, seed=1)
    res = probe.linear_probe(x, y, xt, yt, Cs=(0.01, 100.0))
    assert res["test_acc"] >= 0.97 and res["val_acc"] >= 0.95
    assert res["C"] == 100.0 and len(res["val_curve"]) == 2
    shuffled = np.random.default_rng(0).permutation(y)
    res = probe.linear_probe(x, shuffled, xt, yt, Cs=(0.01, 1.0))
    assert abs(res["test_acc"] - 0.25) < 0.1


def test_probe_layers_finds_the_informative_layer():
    x, y = blobs(300)
    xt, yt = blobs(200, seed=1)
    noise = np.random.default_rng(2)
    train = np.stack([noise.normal(size=x.shape), x, noise.normal(size=x.shape)], axis=1)
    test = np.stack([noise.normal(size=xt.shape), xt, noise.normal(size=xt.shape)], axis=1)
    res = probe.probe_layers(
        train, y, test, yt, layer_ids=[4, 5, 6], concat=2, Cs=(0.1,), progress=False
    )
    assert [r["layer"] for r in res["rows"]] == [4, 5, 6]
    assert res["best_layer"] == 5 and res["best"]["test_acc"] > 0.9
    assert max(res["rows"][0]["test_acc"], res["rows"][2]["test_acc"]) < 0.5
    assert 5 in res["concat"]["layers"] and len(res["concat"]["layers"]) == 2


def test_low_data_subsets_have_exactly_k_per_class_and_differ():
    y = np.repeat(np.arange(5), 30)
    subsets = probe.class_balanced_subsets(y, 4, n_subsets=5, seed=0)
    for idx in subsets:
        assert np.array_equal(np.bincount(y[idx], minlength=5), np.full(5, 4))
        assert len(np.unique(idx)) == 20
    assert len({tuple(s) for s in subsets}) == 5
    again = probe.class_balanced_subsets(y, 4, n_subsets=5, seed=0)
    other = probe.class_balanced_subsets(y, 4, n_subsets=5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(subsets, again, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(subsets, other, strict=True))
    with pytest.raises(ValueError, match="fewer than k=31"):
        probe.class_balanced_subsets(y, 31)


def test_low_data_probe_reports_mean_and_std():
    x, y = blobs(400)
    xt, yt = blobs(200, seed=1)
    res = probe.low_data_probe(
        x, y, xt, yt, per_class=(2, 10, 1000), n_subsets=3, Cs=(1.0,), progress=False
    )
    assert [r["per_class"] for r in res["rows"]] == [2, 10]  # 1000 per class is skipped
    row = res["rows"][1]
    assert row["n_train"] == 40 and len(row["accs"]) == 3
    assert row["mean"] == pytest.approx(np.mean(row["accs"]))
    assert row["std"] == pytest.approx(np.std(row["accs"], ddof=1))
    assert row["mean"] > 0.5 and row["mean"] > res["rows"][0]["mean"]  # chance is 0.25


def test_modal_prediction_takes_the_mode_and_breaks_ties_by_seed():
    preds = np.array([[1, 0, 2], [1, 3, 2], [0, 3, 1], [2, 0, 1], [1, 4, 5]])
    # column 0: 1 wins 3-1-1; column 1: 0 and 3 tie; column 2: 2 and 1 tie
    out = probe.modal_prediction(preds, seed=0)
    assert out[0] == 1 and out[1] in (0, 3) and out[2] in (1, 2)
    np.testing.assert_array_equal(probe.modal_prediction(preds, seed=0), out)
    ties = np.tile(np.array([[0], [1]]), (1, 200))  # every column a 1-1 tie
    picks = [probe.modal_prediction(ties, seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(picks[0], picks[1])
    assert not np.array_equal(picks[0], picks[2])
    assert 50 < picks[0].sum() < 150  # both tied classes are picked, at random
    with pytest.raises(ValueError, match="predictions"):
        probe.modal_prediction(np.zeros(3, dtype=int))


def test_bert_ensemble_probe_runs_masked_and_is_seeded():
    model = tiny(n_layer=1)
    torch.nn.init.normal_(model.transformer.wte.weight, std=1.0)
    y = np.arange(40) % 2
    tokens = torch.randint(0, 8, (40, 16)) + 8 * torch.from_numpy(y)[:, None]  # class = range
    kw = dict(layer=-1, n_masks=3, seed=0, Cs=(1.0,), progress=False)
    a = probe.bert_ensemble_probe(model, tokens[:24], y[:24], tokens[24:], y[24:], **kw)
    b = probe.bert_ensemble_probe(model, tokens[:24], y[:24], tokens[24:], y[24:], **kw)
    assert a == b and a["n_masks"] == 3 and len(a["mask_accs"]) == 3
    assert a["ensemble_acc"] > 0.8


def test_sgd_probe_separable():
    x, y = blobs(600)
    xt, yt = blobs(200, seed=1)
    res = probe.sgd_probe(x, y, xt, yt, epochs=5, batch_size=64, weight_decays=(0.0, 1e-3))
    assert res["test_acc"] >= 0.95 and res["weight_decay"] in (0.0, 1e-3)


def test_baselines():
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    f = probe.raw_pixel_features(images)
    assert f.shape == (3, 48) and float(f.max()) <= 1.0
    np.testing.assert_allclose(f[1, :3].numpy(), images[1, 0, 0] / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="palette"):
        probe.raw_pixel_features(torch.zeros(3, 16, dtype=torch.long))
    model = tiny(n_layer=1)
    fresh = probe.random_init_model(model, seed=1)
    assert fresh.config == model.config
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    again = probe.random_init_model(model.config, seed=1)
    assert torch.equal(fresh.transformer.wte.weight, again.transformer.wte.weight)


def test_write_report(tmp_path):
    rows = [
        {"layer": i, "val_acc": 0.5 + i / 10, "test_acc": 0.4 + i / 10, "C": 1.0} for i in range(3)
    ]
    results = {
        "layers": {"rows": rows, "best_layer": 2, "best": rows[2], "concat": None},
        "raw_pixels": {"test_acc": 0.3, "classifier": object()},
        "low_data": {
            "rows": [{"per_class": 4, "n_train": 8, "mean": 0.5, "std": 0.1, "accs": [0.4, 0.6]}]
        },
    }
    paths = probe.write_report(results, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["layers"]["best_layer"] == 2 and "classifier" not in data["raw_pixels"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["table"].read_text()
    assert "| 2 | 0.7000 | 0.6000 |" in text and "50.00 ± 10.00" in text


@pytest.mark.cuda
def test_features_on_cuda_bf16_match_cpu():
    model = tiny(n_layer=2, n_px=8)
    tokens = torch.randint(0, 16, (70, 64))
    cpu = probe.extract_features(model, tokens, batch_size=32, progress=False)
    gpu = probe.extract_features(model, tokens, batch_size=32, device="cuda", progress=False)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu, cpu, rtol=5e-2, atol=5e-2)


def test_igpt_probe_command_writes_report_and_reuses_cache(
    tmp_path, capsys, caplog, tiny_checkpoint
):
    from igpt.cli import main

    tiny_checkpoint(tmp_path / "run" / "ckpt_00000007.pt", step=7, n_head=2, n_embd=64)
    argv = [
        "probe",
        "--checkpoint",
        str(tmp_path / "run"),
        "--data",
        "digits",
        "--limit",
        "150",
        "--per-class",
        "2",
        "--subsets",
        "2",
        "--cs",
        "1",
        "--concat",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    main(argv)
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert [r["layer"] for r in report["layers"]["rows"]] == [0, 1, 2]
    assert report["raw_pixels"]["test_acc"] > 0.5  # digits from raw pixels; chance is 0.1
    assert len(report["random_init"]["rows"]) == 3
    assert report["low_data"]["rows"][0]["per_class"] == 2
    assert (tmp_path / "out" / "depth.png").stat().st_size > 1000
    assert "best layer" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("*.tmp"))  # written through igpt._io
    cached = sorted((tmp_path / "out" / "cache").glob("features_*.pt"))
    assert len(cached) == 4  # pretrained and random-init, train and test
    caplog.clear()
    with caplog.at_level("INFO", logger="igpt"):  # igpt.features reads the cache
        main(argv)
    assert sum("features from cache" in r.message for r in caplog.records) == 4
    assert sorted((tmp_path / "out" / "cache").glob("features_*.pt")) == cached


def test_evaluate_is_the_probe_command_and_the_demo_baselines(tiny_checkpoint, tmp_path):
    """evaluation.evaluate: the raw-pixel baseline is of the images at the model's n_px, the
    low-data baselines use the same subsets, and the report writer takes its result."""
    from igpt.checkpoint import load_model
    from igpt.data import ImageData, load_images, resize
    from igpt.reporting import summary_text, write_report

    model, palette, _ = load_model(tiny_checkpoint(tmp_path / "m.pt"))
    train, test = (load_images("digits", s) for s in ("train", "test"))
    train, test = train.subset(np.arange(120)), test.subset(np.arange(80))
    res = evaluation.evaluate(
        model, palette, train, test, per_class=(3,), n_subsets=2, concat=0, Cs=[1.0],
        low_data_baselines=True, progress=False,
    )  # fmt: skip
    assert res["n_train"] == 120 and res["n_test"] == 80 and res["n_layer"] == 2
    raw = [probe.raw_pixel_features(resize(d.images, 8)) for d in (train, test)]
    direct = probe.linear_probe(raw[0], train.labels, raw[1], test.labels, Cs=[1.0])
    assert res["raw_pixels"]["test_acc"] == direct["test_acc"]
    low = probe.low_data_probe(
        raw[0], train.labels, raw[1], test.labels, per_class=(3,), n_subsets=2, Cs=[1.0],
        progress=False,
    )  # fmt: skip
    assert res["low_data_baselines"]["raw pixels"]["rows"][0]["accs"] == low["rows"][0]["accs"]
    assert set(res["low_data_baselines"]) == {"random init", "raw pixels"}
    assert "random init" in summary_text(res) and "raw pixels" in summary_text(res)
    paths = write_report(res, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["layers"]["best_layer"] in (0, 1, 2)
    with pytest.raises(ValueError, match="test has no labels"):
        evaluation.evaluate(model, palette, train, ImageData(test.images), progress=False)


def test_probe_masks_are_the_objectives_masks():
    from igpt import objectives

    assert probe.bert_mask is objectives.bert_mask and probe.MaskRows is objectives.MaskRows


@pytest.mark.cuda
def test_sgd_probe_on_cuda():
    x, y = blobs(600)
    xt, yt = blobs(200, seed=1)
    res = probe.sgd_probe(x, y, xt, yt, epochs=5, batch_size=64, device="cuda")
    assert res["test_acc"] >= 0.95


def test_igpt_probe_objective_flag_masks_a_checkpoint_that_records_none(tmp_path, digits_palette):
    from igpt.checkpoint import save_checkpoint
    from igpt.cli import main

    path = save_checkpoint(tmp_path / "m.pt", tiny(n_layer=1, n_px=8), palette=digits_palette)
    argv = ["probe", "--checkpoint", str(path), "--data", "digits", "--limit", "60"]
    argv += ["--per-class", "none", "--no-baselines", "--concat", "0", "--cs", "1"]
    argv += ["--bert-masks", "2", "--objective", "bert", "--out", str(tmp_path / "out")]
    main(argv)
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert report["objective"] == "bert" and report["bert_ensemble"]["n_masks"] == 2


# ----------------------------------------------------------------------------- token splits


def _memmap(path, tokens):
    """``tokens`` as the token cache holds them: a read-only uint16 memmap."""
    tokens = np.asarray(tokens, np.uint16)
    tokens.tofile(path)
    return np.memmap(path, np.uint16, "r", shape=tokens.shape)


def test_features_of_a_memmap_are_converted_a_batch_at_a_time(tmp_path, monkeypatch):
    from igpt import features

    model = tiny(n_layer=1)
    t = torch.randint(0, 16, (23, 16))
    mm = _memmap(tmp_path / "t.u16", t.numpy())
    expected = features.extract_features(model, t, batch_size=8, progress=False)
    seen = []
    real = features.long_rows
    monkeypatch.setattr(features, "long_rows", lambda rows: seen.append(len(rows)) or real(rows))
    got = features.extract_features(model, mm, batch_size=8, progress=False)
    assert torch.equal(got, expected) and seen == [8, 8, 7]  # never the whole set at once
    # the feature cache names a memmap's tokens as it names the same tokens in int64
    features.extract_features(model, t, cache_dir=tmp_path / "c", cache_key="k", progress=False)
    seen.clear()
    cached = features.extract_features(
        model, mm, cache_dir=tmp_path / "c", cache_key="k", progress=False
    )
    assert torch.equal(cached, expected) and len(list((tmp_path / "c").iterdir())) == 1
    assert seen == [23]  # the hash read one block of (at most 4096) rows; no batch ran
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        features.extract_features(model, mm[0], progress=False)


def test_evaluate_takes_token_splits_and_their_raw_pixels_are_palette_colours(
    tiny_checkpoint, tmp_path
):
    from igpt.checkpoint import load_model
    from igpt.data import load_images, tokenize
    from igpt.reporting import summary_text

    model, palette, _ = load_model(tiny_checkpoint(tmp_path / "m.pt"))
    train, test = (load_images("digits", s) for s in ("train", "test"))
    train, test = train.subset(np.arange(100)), test.subset(np.arange(60))
    kw = dict(per_class=(), concat=0, Cs=[1.0], progress=False)
    from_images = evaluation.evaluate(model, palette, train, test, **kw)
    x, xt = (tokenize(d.images, palette, 8) for d in (train, test))
    mm, mmt = _memmap(tmp_path / "x.u16", x), _memmap(tmp_path / "xt.u16", xt)
    split = evaluation.TokenSplit(mm, train.labels)
    from_tokens = evaluation.evaluate(model, palette, split, (mmt, test.labels), **kw)
    # the model and the random-init model see the same tokens: the same probes
    assert from_tokens["layers"]["rows"] == from_images["layers"]["rows"]
    assert from_tokens["random_init"]["rows"] == from_images["random_init"]["rows"]
    # raw pixels from tokens can only be their palette colours, and say so
    colours = [probe.raw_pixel_features(t, palette=palette) for t in (x, xt)]
    direct = probe.linear_probe(colours[0], train.labels, colours[1], test.labels, Cs=[1.0])
    assert from_tokens["raw_pixels"]["test_acc"] == direct["test_acc"]
    assert from_tokens["raw_pixels"]["pixels"] == "palette colours at n_px 8"
    assert from_images["raw_pixels"]["pixels"] == "images at n_px 8"
    assert "raw pixels (palette colours at n_px 8): test acc" in summary_text(from_tokens)
    with pytest.raises(ValueError, match="n_px \\* n_px = 64"):
        evaluation.evaluate(model, palette, split, (mmt[:, :16], test.labels), **kw)
    with pytest.raises(ValueError, match="test has no labels"):
        evaluation.evaluate(model, palette, split, (mmt, None), **kw)


def test_igpt_probe_after_prepare_reads_no_image(tiny_checkpoint, tmp_path, no_images):
    """`igpt prepare` of both splits, then `igpt probe` from the same cache with every image
    reader refusing: the probes of the image path, --limit rows of the memmap."""
    from igpt.checkpoint import load_model
    from igpt.cli import main
    from igpt.commands._common import token_splits
    from igpt.data import load_images

    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    model, palette, _ = load_model(ckpt)
    palette.save(tmp_path / "palette.npy")
    cache = str(tmp_path / "cache")
    for split in ("train", "test"):
        main(["prepare", "--data", "digits", "--n-px", "8", "--palette",
              str(tmp_path / "palette.npy"), "--split", split, "--cache-dir", cache,
              "--workers", "0", "--no-progress"])  # fmt: skip
    train, test = (load_images("digits", s).subset(np.arange(70)) for s in ("train", "test"))
    expected = evaluation.evaluate(
        model, palette, train, test, per_class=(), concat=0, Cs=[1.0], baselines=False,
        progress=False,
    )  # fmt: skip
    no_images()
    tokens = token_splits("digits", palette, 8, 70, cache_dir=cache)
    assert all(isinstance(s.tokens, np.memmap) and len(s.tokens) == 70 for s in tokens)
    assert all(len(s.labels) == 70 for s in tokens)
    assert str(tokens[0].tokens.filename).startswith(str(tmp_path / "cache" / "tokens"))
    main(["probe", "--checkpoint", str(ckpt), "--data", "digits", "--limit", "70",
          "--per-class", "none", "--no-baselines", "--concat", "0", "--cs", "1",
          "--cache-dir", cache, "--out", str(tmp_path / "out")])  # fmt: skip
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert report["n_train"] == 70 and report["n_test"] == 70
    assert report["layers"]["rows"] == json.loads(json.dumps(expected["layers"]["rows"]))
    assert sorted((tmp_path / "cache").glob("features_*.pt"))  # features beside the tokens


# ---------------------------------------------------------------- issue 32 (tests branch): begin
# the hold-out choice of C itself: the best accuracy, ties to the strongest regularisation


def test_linear_probe_picks_the_best_C_and_ties_go_to_the_strongest_regularisation(monkeypatch):
    x, y = blobs(120)
    _, val = stratified_holdout(y, 0.25, 3)
    acc_of_C = {0.01: 0.5, 0.1: 1.0, 1.0: 1.0, 10.0: 0.8}
    fitted = []

    class Fixed:  # a fit whose hold-out accuracy is acc_of_C[C]
        def predict(self, xv):
            assert len(xv) == len(val)
            wrong = round((1 - acc_of_C[self.C]) * len(val))
            return np.where(np.arange(len(val)) < wrong, y[val] + 1, y[val])

    def fake_fit(xf, yf, C, max_iter, warm=None):
        assert len(xf) == len(yf) == len(y) - len(val) and max_iter == 1000
        assert warm is (None if not fitted else fitted[-1])  # warm-started from the last
        clf = Fixed()
        clf.C = C
        fitted.append(clf)
        return clf

    monkeypatch.setattr(probe, "_fit_logreg", fake_fit)
    r = probe.linear_probe(x, y, Cs=[10.0, 0.1, 1.0, 0.01], val_frac=0.25, seed=3)
    assert [f.C for f in fitted] == [0.01, 0.1, 1.0, 10.0]  # ascending: strong to weak
    assert [p["C"] for p in r["val_curve"]] == [0.01, 0.1, 1.0, 10.0]
    fitted.clear()
    assert [p["val_acc"] for p in r["val_curve"]] == [0.5, 1.0, 1.0, 0.8]
    assert r["C"] == 0.1 and r["val_acc"] == 1.0  # 0.1 and 1.0 tie: the smaller C
    acc_of_C.update({0.01: 1.0})
    fitted.clear()
    assert probe.linear_probe(x, y, Cs=[10.0, 0.1, 1.0, 0.01], val_frac=0.25, seed=3)["C"] == 0.01
    acc_of_C.update({0.01: 0.5, 0.1: 0.5, 1.0: 0.5, 10.0: 0.8})
    fitted.clear()
    assert probe.linear_probe(x, y, Cs=[10.0, 0.1, 1.0, 0.01], val_frac=0.25, seed=3)["C"] == 10.0


def test_linear_probe_on_blobs_where_two_Cs_tie_keeps_the_smaller():
    x, y = blobs(200)
    r = probe.linear_probe(x, y, Cs=[100.0, 0.01, 1.0], val_frac=0.2)
    curve = {p["C"]: p["val_acc"] for p in r["val_curve"]}
    best = max(curve.values())
    assert sum(a == best for a in curve.values()) >= 2  # C = 1 and 100 both reach 0.975
    assert r["C"] == min(c for c, a in curve.items() if a == best) and r["val_acc"] == best


def test_holdout_is_stratified_with_every_class_on_both_sides_when_it_can():
    y = np.repeat(np.arange(4), 10)
    fit, val = stratified_holdout(y, 0.1, 0)
    assert sorted([*fit, *val]) == list(range(40)) and list(val) == sorted(val)
    assert np.bincount(y[val]).tolist() == [1, 1, 1, 1]  # 4 rows: one per class
    fit, val = stratified_holdout(y, 0.5, 0)
    assert np.bincount(y[val]).tolist() == [5, 5, 5, 5] and len(fit) == 20
    y = np.repeat(np.arange(3), 2)
    fit, val = stratified_holdout(y, 0.9, 0)  # at most n - classes held out: one of each left
    assert sorted(y[val].tolist()) == sorted(y[fit].tolist()) == [0, 1, 2]
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])  # a class of one: a plain random split
    splits = [stratified_holdout(y, 0.25, s) for s in range(6)]
    assert all(len(v) == 2 and sorted([*f, *v]) == list(range(8)) for f, v in splits)
    assert len({tuple(v) for _, v in splits}) > 1
    assert np.array_equal(stratified_holdout(y, 0.25, 3)[1], splits[3][1])
    assert len(stratified_holdout(y, 0.01, 0)[1]) == 1  # never empty
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_frac"):
            stratified_holdout(y, bad, 0)


def test_window_is_k_consecutive_layers_centred_and_shifted_to_fit():
    assert probe._window(5, 3, 10) == [4, 5, 6]
    assert probe._window(5, 4, 10) == [3, 4, 5, 6]
    assert probe._window(0, 3, 10) == [0, 1, 2]
    assert probe._window(9, 3, 10) == [7, 8, 9]
    assert probe._window(1, 5, 3) == [0, 1, 2]


def test_probe_layers_picks_the_best_hold_out_layer_earliest_among_ties(monkeypatch):
    val_of_layer = [0.0, 0.9, 0.7, 0.9, 0.2]  # 0.0 is an accuracy, not a missing one
    seen = []

    def fake_probe(x, y, xt, yt, **kw):
        layers = sorted({int(v) for v in x[0]})
        seen.append(layers)
        val = val_of_layer[layers[0]] if len(layers) == 1 else 0.95
        return {"val_acc": val, "test_acc": 1 - val, "C": float(len(layers))}

    monkeypatch.setattr(probe, "linear_probe", fake_probe)
    x = np.broadcast_to(np.arange(5.0)[None, :, None], (6, 5, 2)).copy()
    y = [0, 1] * 3
    r = probe.probe_layers(x, y, x, y, layer_ids=range(10, 15), progress=False, concat=3)
    assert seen == [[0], [1], [2], [3], [4], [0, 1, 2]]
    assert r["best_layer"] == 11 and r["best"]["val_acc"] == 0.9 and r["best"]["layer"] == 11
    assert r["best"]["C"] == 1.0 and r["best"]["test_acc"] == pytest.approx(0.1)
    assert r["concat"]["layers"] == [10, 11, 12] and r["concat"]["val_acc"] == 0.95
    assert [row["layer"] for row in r["rows"]] == [10, 11, 12, 13, 14]
    for concat in (0, 1):
        r = probe.probe_layers(x, y, x, y, progress=False, concat=concat)
        assert r["concat"] is None and r["best_layer"] == 1
    val_of_layer[4] = 0.99
    assert probe.probe_layers(x, y, x, y, progress=False)["best_layer"] == 4


def test_linear_probe_refits_the_chosen_C_standardised_and_checks_its_arguments():
    x, y = blobs(80, n_classes=2)
    r = probe.linear_probe(x, y, x[:10], y[:10], Cs=[0.5], val_frac=0, max_iter=77)
    assert r["C"] == 0.5 and r["val_acc"] is None and r["val_curve"] == []
    assert r["n_classes"] == 2 and r["train_acc"] == 1.0 and r["test_acc"] == 1.0
    (scale, scaler), (_, logreg) = r["classifier"].steps
    assert scale == "standardscaler" and np.allclose(scaler.mean_, x.mean(0), atol=1e-5)
    assert logreg.C == 0.5 and logreg.max_iter == 77
    assert (
        probe.linear_probe(x, y, Cs=[0.5, 2.0])["val_curve"]
        == probe.linear_probe(x, y, Cs=[0.5, 2.0], seed=0)["val_curve"]
    )  # seed 0 by default
    for Cs in ([], [0.0, 1.0], [-1.0]):
        with pytest.raises(ValueError, match="Cs must be positive numbers"):
            probe.linear_probe(x, y, Cs=Cs)
    with pytest.raises(ValueError, match="val_frac=0 leaves no hold-out"):
        probe.linear_probe(x, y, Cs=[1.0, 2.0], val_frac=0)
    with pytest.raises(ValueError, match="at least two classes"):
        probe.linear_probe(x, np.zeros(len(x), dtype=int))
    with pytest.raises(TypeError, match="train_feats must be"):
        probe.linear_probe(x.tolist(), y)
    with pytest.raises(ValueError, match=r"^train_labels has 79 labels for 80 feature rows"):
        probe.linear_probe(x, y[:-1])


def test_probe_layers_passes_its_settings_on_and_checks_them(monkeypatch):
    calls = []

    def fake(method):
        def fit(x, y, xt, yt, **kw):
            calls.append((method, x.shape[1], xt.shape, kw))
            return {"val_acc": 0.5, "test_acc": 0.5, "C": 1.0, "weight_decay": 0.1}

        return fit

    monkeypatch.setattr(probe, "linear_probe", fake("lbfgs"))
    monkeypatch.setattr(probe, "sgd_probe", fake("sgd"))
    x, y = np.zeros((6, 7, 2), np.float32), [0, 1] * 3
    r = probe.probe_layers(x, y, x[:4], y[:4], progress=False, val_frac=0.3, seed=2)
    assert len(calls) == 8 and calls[-1][:3] == ("lbfgs", 10, (4, 10))  # 5 layers by default
    assert all(kw == {"val_frac": 0.3, "seed": 2} for *_, kw in calls)
    assert r["concat"]["layers"] == [0, 1, 2, 3, 4] and r["concat"]["test_acc"] == 0.5
    calls.clear()
    r = probe.probe_layers(x[:, :1], y, x[:4, :1], y[:4], method="sgd", progress=False)
    assert [c[0] for c in calls] == ["sgd"] and r["concat"] is None  # one layer: no concat
    assert r["best"] == {"layer": 0, "val_acc": 0.5, "test_acc": 0.5, "weight_decay": 0.1}
    for kw, match in [
        (dict(method="adam"), "method must be one of"),
        (dict(val_frac=0), "val_frac must be > 0"),
        (dict(layer_ids=[1, 2]), "layer_ids names 2 layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            probe.probe_layers(x, y, x, y, progress=False, **kw)
    with pytest.raises(ValueError, match="differ in"):
        probe.probe_layers(x, y, x[:, :3], y, progress=False)
    with pytest.raises(ValueError, match=r"^test_feats must be \(N, layers, d\)"):
        probe.probe_layers(x, y, x[:, 0], y, progress=False)
    with pytest.raises(ValueError, match=r"^train_feats must be \(N, layers, d\)"):
        probe.probe_layers(x[:, 0], y, x, y, progress=False)
    calls.clear()
    r = probe.probe_layers(x[:, :2], y, x[:, :2], y, progress=False, concat=3)  # two layers
    assert r["concat"]["layers"] == [0, 1] and calls[-1][1:3] == (4, (6, 4))


# ---------------------------------------------------------------- issue 32 (tests branch): end
