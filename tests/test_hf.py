"""Interop with transformers' ImageGPT: logits, pooled features and round trips agree."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import save_checkpoint
from igpt.finetune import IGPTClassifier
from igpt.hf import HF_CONFIG_DEFAULTS, from_hf, from_pretrained, load_any, to_hf
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
    from igpt.hf import save_pretrained

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
    from igpt.hf import save_pretrained

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
    from igpt.finetune import load_classifier
    from igpt.hf import export_checkpoint, import_pretrained

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
