"""Interop with transformers' ImageGPT: logits, pooled features and round trips agree."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import save_checkpoint
from igpt.finetune import IGPTClassifier
from igpt.hf import (
    HF_CONFIG_DEFAULTS,
    from_hf,
    from_pretrained,
    load_any,
    save_pretrained,
    to_hf,
)
from igpt.palette import Palette

transformers = pytest.importorskip("transformers")


def _hf_model(cls_name="ImageGPTForCausalImageModeling", n_px=4, **kw):
    fields = dict(vocab_size=17, n_positions=n_px * n_px, n_embd=64, n_layer=2, n_head=2)
    cfg = transformers.ImageGPTConfig(**{**fields, **kw}, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # non-zero everything, so every mapped weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_input(x, sos):
    return torch.cat([torch.full((x.shape[0], 1), sos), x[:, :-1]], dim=1)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_logits_agree_with_hf(activation):
    hf = _hf_model(activation_function=activation)
    ours = from_hf(hf).eval()
    assert ours.config.n_px == 4 and ours.config.n_colors == 16
    x = torch.randint(0, 16, (3, 16))
    with torch.no_grad():
        expect = hf(input_ids=_hf_input(x, 16)).logits
        got = ours(x)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_classification_pooling_agrees_with_features():
    hf = _hf_model("ImageGPTForImageClassification", num_labels=3)
    ours = from_hf(hf).eval()
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        out = hf(input_ids=_hf_input(x, 16), output_hidden_states=True)
        feats = ours.model.features(x)
        _, logits = ours(x, generative=False)
    pooled = out.hidden_states[-1].mean(dim=1)  # HF's hidden_states[-1] is after ln_f
    torch.testing.assert_close(feats[:, -1], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[:, -1] @ hf.score.weight.T, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


def test_base_model_and_state_dict_inputs():
    hf = _hf_model("ImageGPTModel")
    ours = from_hf(hf)
    assert torch.count_nonzero(ours.lm_head.weight) == 0
    full = _hf_model()
    again = from_hf(full.state_dict(), n_head=2)
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            again(x), full(input_ids=_hf_input(x, 16)).logits, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="n_head"):
        from_hf(full.state_dict())


def test_round_trip_through_hf_is_exact():
    model = IGPT(IGPTConfig(n_px=4, n_layer=2, n_head=2, n_embd=64, n_colors=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    back = from_hf(to_hf(model))
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            to_hf(model)(input_ids=_hf_input(x, 16)).logits, model(x), rtol=1e-5, atol=1e-5
        )


def test_unsupported_conversions_raise():
    with pytest.raises(ValueError, match="RMS norms and biased linears"):
        to_hf(IGPT(IGPTConfig(n_px=4, n_layer=1, n_head=2, n_embd=64, norm="layer")))
    with pytest.raises(TypeError, match="model_or_state_dict"):
        from_hf(42)
    with pytest.raises(ValueError, match="not a square"):
        from_hf(
            transformers.ImageGPTForCausalImageModeling(
                transformers.ImageGPTConfig(n_positions=15, n_embd=64, n_layer=1, n_head=2)
            )
        )


def _igpt_model(**kw):
    cfg = dict(n_px=4, n_layer=2, n_head=2, n_embd=64, n_colors=16)
    model = IGPT(IGPTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _igpt_classifier(n_classes=3):
    clf = IGPTClassifier(_igpt_model(), n_classes).eval()
    with torch.no_grad():
        clf.head.weight.normal_(std=0.5)
    return clf


def _assert_same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in skip:
            assert torch.equal(sa[k], sb[k]), k


def test_config_defaults_are_transformers():
    cfg = transformers.ImageGPTConfig()
    assert {k: getattr(cfg, k) for k in HF_CONFIG_DEFAULTS} == HF_CONFIG_DEFAULTS


def test_causal_model_and_palette_round_trip_through_transformers(tmp_path):
    """igpt -> HF dir -> transformers -> HF dir -> igpt: the same bits and logits."""
    model = _igpt_model()
    palette = Palette(torch.rand(16, 3) * 255)
    model.save_pretrained(tmp_path / "a", palette=palette)
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "a").eval()
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "a")
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=_hf_input(x, 16)).logits, model(x), rtol=1e-5, atol=1e-5
        )
    image = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ids = processor(images=Image.fromarray(image), return_tensors="pt")["input_ids"]
    assert torch.equal(ids[0], palette.quantize(image).flatten())  # the processor's tokens
    hf.save_pretrained(tmp_path / "b")
    processor.save_pretrained(tmp_path / "b")
    back = IGPT.from_pretrained(tmp_path / "b")
    _assert_same_weights(model, back)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    again = Palette.from_pretrained(tmp_path / "b")
    assert torch.equal(again.centroids, palette.centroids)
    # what transformers' processor itself saved reads back to the same clusters
    clusters = json.loads((tmp_path / "b" / "preprocessor_config.json").read_text())["clusters"]
    assert np.array_equal(np.asarray(clusters, np.float32), palette.to_hf())


def test_palette_without_igpt_centroids_comes_from_the_clusters(tmp_path, caplog):
    palette = Palette(torch.rand(16, 3) * 255)
    palette.save_pretrained(tmp_path, n_px=4)
    path = tmp_path / "preprocessor_config.json"
    d = json.loads(path.read_text())
    d["clusters"][0] = [0.0, 0.0, 0.0]  # edited on the HF side: the exact copy is stale
    path.write_text(json.dumps(d))
    got = Palette.from_pretrained(tmp_path)
    assert "no longer match" in caplog.text
    assert torch.equal(got.centroids[0], torch.full((3,), 127.5))
    torch.testing.assert_close(got.centroids[1:], palette.centroids[1:], rtol=0, atol=1e-4)
    del d["igpt_centroids"]
    path.write_text(json.dumps(d))
    assert torch.equal(Palette.from_pretrained(tmp_path).centroids, got.centroids)
    with pytest.raises(ValueError, match="n_px"):
        palette.save_pretrained(tmp_path / "empty")


def test_hf_classifier_loads_into_igpt_classifier(tmp_path):
    hf = _hf_model("ImageGPTForImageClassification", num_labels=3)
    clf = from_hf(hf)
    assert isinstance(clf, IGPTClassifier) and clf.layer == clf.model.config.n_layer
    assert torch.equal(clf.head.weight, hf.score.weight)
    assert torch.count_nonzero(clf.head.bias) == 0 and not clf.head.bias.requires_grad
    hf.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path)
    _assert_same_weights(clf, again)
    x = torch.randint(0, 16, (3, 16))
    with torch.no_grad():
        expect = hf(input_ids=_hf_input(x, 16)).logits
        torch.testing.assert_close(again(x, generative=False)[1], expect, rtol=1e-5, atol=1e-5)


def test_igpt_classifier_round_trips_through_transformers(tmp_path):

    clf = _igpt_classifier()
    x = torch.randint(0, 16, (3, 16))
    with torch.no_grad():
        ours = clf(x, generative=False)[1]
        torch.testing.assert_close(
            to_hf(clf)(input_ids=_hf_input(x, 16)).logits, ours, rtol=1e-5, atol=1e-5
        )
    save_pretrained(clf, tmp_path / "a")
    hf = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "a").eval()
    assert hf.config.num_labels == 3
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=_hf_input(x, 16)).logits, ours, rtol=1e-5, atol=1e-5
        )
    hf.save_pretrained(tmp_path / "b")
    back = from_pretrained(tmp_path / "b")
    # HF's classifier has no generative head: the one read back is zero, the rest identical
    _assert_same_weights(clf, back, skip=("model.lm_head.weight",))
    assert torch.count_nonzero(back.model.lm_head.weight) == 0
    with torch.no_grad():
        assert torch.equal(back(x, generative=False)[1], ours)


def test_classifiers_hf_cannot_hold_are_refused():
    clf = _igpt_classifier()
    with torch.no_grad():
        clf.head.bias.fill_(0.1)
    with pytest.raises(ValueError, match="bias-free score head"):
        to_hf(clf)
    with pytest.raises(ValueError, match="reads layer 1"):
        to_hf(IGPTClassifier(_igpt_model(), 3, layer=1))


def test_any_head_dim_converts_and_runs():
    """n_embd=64 with 4 heads (head dim 16): converts, and runs on the CPU like HF."""
    hf = _hf_model(n_head=4)
    ours = from_hf(hf).eval()
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        expect = hf(input_ids=_hf_input(x, 16)).logits
        torch.testing.assert_close(ours(x), expect, rtol=1e-5, atol=1e-5)


def test_load_any_reads_checkpoints_and_hf_dirs(tmp_path, caplog):
    model = _igpt_model()
    palette = Palette(torch.rand(16, 3) * 255)
    save_checkpoint(tmp_path / "run" / "ckpt_00000003.pt", model, step=3, palette=palette)
    (tmp_path / "run" / "config.json").write_text("{}")  # a run directory's own config
    model.save_pretrained(tmp_path / "hf", palette=palette)
    for where in (tmp_path / "run", tmp_path / "run" / "ckpt_00000003.pt", tmp_path / "hf"):
        got, got_palette = load_any(where)
        _assert_same_weights(model, got)
        assert torch.equal(got_palette.centroids, palette.centroids)
    model.save_pretrained(tmp_path / "bare")
    assert load_any(tmp_path / "bare")[1] is None

    clf = _igpt_classifier()
    save_pretrained(clf, tmp_path / "clf")
    got, _ = load_any(tmp_path / "clf")
    assert isinstance(got, IGPT) and "holds a classifier" in caplog.text
    _assert_same_weights(clf.model, got, skip=("lm_head.weight",))
    assert type(IGPT.from_pretrained(tmp_path / "clf")) is IGPT


def test_bad_pretrained_dirs_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        IGPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not 'imagegpt'"):
        IGPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "imagegpt"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        IGPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        IGPT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Palette.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="RMS norms"):
        _igpt_model(norm="layer").save_pretrained(tmp_path / "x")


def test_export_and_import_checkpoints(tmp_path):
    from igpt.checkpoint import load_model
    from igpt.commands.export_hf import export_checkpoint
    from igpt.commands.import_hf import import_pretrained
    from igpt.finetune import load_classifier

    model = _igpt_model()
    palette = Palette(torch.rand(16, 3) * 255)
    save_checkpoint(tmp_path / "run" / "ckpt_00000005.pt", model, step=5, palette=palette)
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf")
    _assert_same_weights(model, from_hf(hf))
    out = import_pretrained(tmp_path / "hf", tmp_path / "imported.pt")
    back, back_palette, ckpt = load_model(out)
    _assert_same_weights(model, back)
    assert torch.equal(back_palette.centroids, palette.centroids) and ckpt["objective"] == "ar"
    # a fine-tuning checkpoint exports as HF's classifier (its head bias must be zero)
    clf = _igpt_classifier()
    info = {"n_classes": 3, "layer": clf.layer}
    save_checkpoint(
        tmp_path / "ft.pt", clf.model, palette=palette, head=clf.head.state_dict(), finetune=info
    )
    export_checkpoint(tmp_path / "ft.pt", tmp_path / "hf_clf")
    x = torch.randint(0, 16, (2, 16))
    hf_clf = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf_clf")
    with torch.no_grad():
        ours = load_classifier(tmp_path / "ft.pt")[0].eval()(x, generative=False)[1]
        theirs = hf_clf.eval()(input_ids=_hf_input(x, 16)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    export_checkpoint(tmp_path / "ft.pt", tmp_path / "hf_lm", head=False)
    assert type(IGPT.from_pretrained(tmp_path / "hf_lm")) is IGPT


def test_load_any_says_it_drops_a_head_and_load_classifier_keeps_it(tmp_path, caplog):
    from igpt.hf import load_classifier

    clf, palette = _igpt_classifier(), Palette(torch.rand(16, 3) * 255)
    info = {"n_classes": 3, "layer": clf.layer}
    ft = tmp_path / "ft.pt"
    save_checkpoint(ft, clf.model, palette=palette, head=clf.head.state_dict(), finetune=info)
    with caplog.at_level("WARNING"):
        model, _ = load_any(ft)
    assert type(model) is IGPT and "load_classifier" in caplog.text and str(ft) in caplog.text
    x = torch.randint(0, 16, (2, 16))
    hf_dir = save_pretrained(clf, tmp_path / "hf_clf", palette=palette)
    for path in (ft, hf_dir):
        got, got_palette = load_classifier(path)
        assert got.n_classes == 3 and torch.equal(got_palette.centroids, palette.centroids)
        with torch.no_grad():
            want = clf.eval()(x, generative=False)[1]
            torch.testing.assert_close(got.eval()(x, generative=False)[1], want)
    with pytest.raises(ValueError, match="not a classifier"):
        load_classifier(save_pretrained(_igpt_model(), tmp_path / "hf_lm"))
    from igpt.classifier import IGPTClassifier as Classifier

    direct = Classifier.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(x, generative=False)[1], want)
    assert not direct.head.bias.requires_grad


# ----------------------------------------------------------------------------- the commands


def _hf_dir(path, palette=None):
    """A transformers-written ImageGPT directory (4x4, 16 colours), with ``palette``'s
    preprocessor_config.json when given."""
    _hf_model().save_pretrained(path)
    if palette is not None:
        palette.save_pretrained(path)
    return path


def _one_line(e) -> str:
    """The message of a command's SystemExit, which must be a single line."""
    text = str(e.value.code)
    assert "\n" not in text, text
    return text


def _first_loss(run_dir) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_cli_import_hf_then_pretrain_start_from_the_hf_weights(tmp_path, digits_palette):
    from igpt.cli import main
    from igpt.train import TrainConfig, Trainer

    hf_dir = _hf_dir(tmp_path / "hf", digits_palette)
    main(["import-hf", str(hf_dir), str(tmp_path / "imported.pt")])
    expect = from_pretrained(hf_dir)
    # the loss of the HF weights on the first batch, with the batches pretrain draws
    settings = dict(data="digits", steps=1, batch_size=4, device="cpu", progress=False)
    ref = Trainer(TrainConfig(init_from=str(hf_dir), out=str(tmp_path / "ref"), **settings))
    _assert_same_weights(expect, ref.raw_model)
    assert torch.equal(ref.palette.centroids, digits_palette.centroids)
    tokens = ref.batches.tokens(0)
    with torch.no_grad():
        loss = float(ref.loss_sum(tokens, None)) / tokens.numel()
    for name, source in (("file", tmp_path / "imported.pt"), ("dir", hf_dir)):
        out = tmp_path / f"run_{name}"
        argv = ["pretrain", "--checkpoint", str(source), "--data", "digits", "--steps", "1"]
        main([*argv, "--batch-size", "4", "--device", "cpu", "--out", str(out)])
        assert _first_loss(out) == pytest.approx(loss, rel=1e-6), name
        run_config = json.loads((out / "config.json").read_text())
        assert run_config["model"] == expect.config.to_dict()
        assert torch.equal(torch.from_numpy(np.load(out / "palette.npy")), digits_palette.centroids)
    # a directory without preprocessor_config.json takes the palette from --palette
    bare = _hf_dir(tmp_path / "bare")
    digits_palette.save(tmp_path / "p.npy")
    argv = ["pretrain", "--checkpoint", str(bare), "--palette", str(tmp_path / "p.npy")]
    out = tmp_path / "run_bare"
    main([*argv, "--steps", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    assert torch.equal(torch.from_numpy(np.load(out / "palette.npy")), digits_palette.centroids)


def test_cli_sample_and_probe_take_an_hf_dir(tmp_path, digits_palette):
    from igpt.cli import main

    hf_dir = _hf_dir(tmp_path / "hf", digits_palette)
    png, tokens = tmp_path / "s.png", tmp_path / "s.npy"
    argv = ["sample", "--checkpoint", str(hf_dir), "--n", "2", "--tokens-out", str(tokens)]
    main([*argv, "--device", "cpu", "--out", str(png)])
    sampled = np.load(tokens)
    assert sampled.shape == (2, 16) and sampled.max() < 16 and Image.open(png).size[0] > 0
    argv = ["probe", "--checkpoint", str(hf_dir), "--data", "digits", "--limit", "60"]
    argv += ["--per-class", "none", "--no-baselines", "--concat", "0", "--cs", "1"]
    main([*argv, "--device", "cpu", "--out", str(tmp_path / "probe")])
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["checkpoint"] == str(hf_dir) and report["objective"] == "ar"
    assert [r["layer"] for r in report["layers"]["rows"]] == [0, 1, 2]


def test_cli_export_hf_of_a_run_dir_loads_in_transformers(tmp_path, digits_palette):
    from igpt.checkpoint import load_model
    from igpt.cli import main

    model = _igpt_model()
    save_checkpoint(tmp_path / "run" / "ckpt_00000003.pt", model, step=3, palette=digits_palette)
    (tmp_path / "run" / "config.json").write_text("{}")  # a run directory's own config
    main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
    assert np.array_equal(np.asarray(processor.clusters), digits_palette.to_hf())
    x = torch.randint(0, 16, (3, 16))
    with torch.no_grad():
        ours = load_model(tmp_path / "run")[0].eval()(x)
        torch.testing.assert_close(hf(input_ids=_hf_input(x, 16)).logits, ours)
    # the exported directory is a checkpoint too, and the run directory is still a run's
    back, palette, ckpt = load_model(tmp_path / "hf")
    _assert_same_weights(model, back)
    assert ckpt["step"] == 0 and ckpt["objective"] == "ar"
    assert load_model(tmp_path / "run")[2]["step"] == 3


def test_cli_finetune_without_head_bias_exports_to_hf_classifier(tmp_path, digits_palette):
    from igpt.cli import main
    from igpt.finetune import load_classifier

    save_checkpoint(tmp_path / "m.pt", _igpt_model(), palette=digits_palette, objective="ar")
    ft = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(tmp_path / "m.pt"), "--data", "digits"]
    argv += ["--limit", "40", "--steps", "2", "--eval-every", "1", "--batch-size", "8"]
    main([*argv, "--n-masks", "1", "--no-head-bias", "--device", "cpu", "--out", str(ft)])
    clf, _, ckpt = load_classifier(ft / "best.pt")
    assert ckpt["finetune"]["head_bias"] is False and ckpt["finetune"]["n_classes"] == 10
    assert torch.count_nonzero(clf.head.bias) == 0 and not clf.head.bias.requires_grad
    assert torch.count_nonzero(clf.head.weight) > 0  # the head did train
    reads = []
    real_load = torch.load
    with pytest.MonkeyPatch.context() as mp:  # a large checkpoint is read once, not thrice
        mp.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
        main(["export-hf", str(ft / "best.pt"), str(tmp_path / "hf")])
    assert len(reads) == 1
    hf = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 16, (3, 16))
    with torch.no_grad():
        ours = clf.eval()(x, generative=False)[1]
        torch.testing.assert_close(hf(input_ids=_hf_input(x, 16)).logits, ours)
    # a head with a trained bias: refused, saying how to get an exportable one
    biased = {**ckpt, "head": {**ckpt["head"], "bias": torch.full((10,), 0.1)}}
    torch.save(biased, tmp_path / "biased.pt")
    with pytest.raises(SystemExit) as e:
        main(["export-hf", str(tmp_path / "biased.pt"), str(tmp_path / "hf2")])
    assert "--no-head-bias" in _one_line(e) and "--no-head" in _one_line(e)
    main(["export-hf", str(tmp_path / "biased.pt"), str(tmp_path / "hf2"), "--no-head"])
    assert type(IGPT.from_pretrained(tmp_path / "hf2")) is IGPT


def test_finetune_head_bias_is_frozen_at_zero_and_fixed_on_resume(tmp_path):
    from igpt.finetune import FinetuneConfig, finetune

    x, y = torch.randint(0, 16, (12, 16)), torch.arange(12) % 3
    kw = dict(steps=2, eval_every=1, batch_size=4, out_dir=str(tmp_path / "ft"), device="cpu")
    res = finetune(_igpt_model(), x, y, head_bias=False, **kw)
    head = res["classifier"].head
    assert torch.count_nonzero(head.bias) == 0 and torch.count_nonzero(head.weight) > 0
    with pytest.raises(ValueError, match="head_bias False there, True now"):
        finetune(_igpt_model(), x, y, head_bias=True, resume=True, **{**kw, "steps": 3})
    with pytest.raises(ValueError, match="head_bias"):
        FinetuneConfig(head_bias="no")


def test_cli_hf_bad_inputs_are_one_line(tmp_path, digits_palette):
    from igpt.cli import main

    hf_dir = _hf_dir(tmp_path / "hf", digits_palette)
    bare = _hf_dir(tmp_path / "bare")  # no preprocessor_config.json: no palette
    (tmp_path / "plain").mkdir()
    both = _hf_dir(tmp_path / "both", digits_palette)
    save_checkpoint(both / "ckpt_00000001.pt", _igpt_model(), step=1, palette=digits_palette)
    broken = _hf_dir(tmp_path / "broken", digits_palette)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    run = tmp_path / "run"
    save_checkpoint(run / "ckpt_00000002.pt", _igpt_model(), step=2, palette=digits_palette)
    out = str(tmp_path / "out")
    cases = [
        (["import-hf", str(tmp_path / "missing"), out + ".pt"], "does not exist"),
        (["import-hf", str(tmp_path / "plain"), out + ".pt"], "not a transformers ImageGPT"),
        (["import-hf", str(hf_dir), str(tmp_path / "plain")], "is a directory"),
        (["export-hf", str(tmp_path / "missing"), out], "does not exist"),
        (["export-hf", str(tmp_path / "plain"), out], "not a transformers ImageGPT"),
        (["export-hf", str(hf_dir), str(run)], "is a run directory"),
        (["export-hf", str(both), out], "both a run directory"),
        (["probe", "--checkpoint", str(bare), "--out", out], "holds no palette"),
        (["sample", "--checkpoint", str(broken), "--out", out + ".png"], "not a readable"),
        (["pretrain", "--checkpoint", str(bare), "--steps", "1", "--out", out], "no palette"),
    ]
    for argv, expect in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, *(["--device", "cpu"] if argv[0] in ("probe", "sample") else [])])
        assert expect in _one_line(e), (argv, e.value.code)
    assert not (run / "config.json").exists()  # the refused export wrote nothing there
