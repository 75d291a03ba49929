"""Interop with transformers' ImageGPT: logits, pooled features and round trips agree."""

import pytest
import torch

from igpt import IGPT, IGPTConfig
from igpt.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")


def _hf_model(cls_name="ImageGPTForCausalImageModeling", n_px=4, **kw):
    cfg = transformers.ImageGPTConfig(
        vocab_size=17,
        n_positions=n_px * n_px,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        **kw,
    )
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
        feats = ours.features(x)
    pooled = out.hidden_states[-1].mean(dim=1)  # HF's hidden_states[-1] is after ln_f
    torch.testing.assert_close(feats[:, -1], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[:, -1] @ hf.score.weight.T, out.logits, rtol=1e-5, atol=1e-5)


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
