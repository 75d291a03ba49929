"""IGPT: causality, the BERT path, init, features, parameter counts, config, errors."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igpt import IGPT, IGPTConfig


def tiny(**kw):
    fields = dict(n_px=4, n_layer=2, n_head=2, n_embd=64, n_colors=16)
    fields.update(kw)
    return IGPT(IGPTConfig(**fields))


def _randomize_head(model):
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a zero head hides everything


def test_ar_is_causal():
    model = tiny()
    _randomize_head(model)
    x = torch.randint(0, 16, (2, 16))
    base = model(x)
    for j in (0, 5, 15):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 16
        out = model(y)
        # logits[:, i] predicts token i from tokens < i: positions <= j cannot change
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=0)
        if j < 15:
            assert (out[:, j + 1 :] - base[:, j + 1 :]).abs().max() > 1e-6


def test_bert_sees_both_directions_and_zeroes_masked_tokens():
    model = tiny()
    _randomize_head(model)
    x = torch.randint(0, 16, (1, 16))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 3] = True
    base = model(x, bert_mask=mask)
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 16
    assert (model(y, bert_mask=mask)[0, 3] - base[0, 3]).abs().max() > 1e-6  # sees the future
    z = x.clone()
    z[0, 3] = (z[0, 3] + 1) % 16  # the masked token's value is invisible
    torch.testing.assert_close(model(z, bert_mask=mask), base, rtol=0, atol=0)


def test_zero_head_gives_uniform_logits_and_log_k_loss():
    model = tiny()
    x = torch.randint(0, 16, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 16)
    assert torch.count_nonzero(logits) == 0
    loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    torch.testing.assert_close(loss, torch.log(torch.tensor(16.0)))


def test_residual_projections_are_depth_scaled():
    model = tiny(n_layer=8, n_embd=128, n_head=4)
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / 4) < 0.001  # 1 / sqrt(2 * 8) = 1 / 4


def _naive_features(model, x, bert_mask=None):
    h = model.embed(x, bert_mask)
    feats = []
    for block in model.transformer.h:
        feats.append(block.ln_1(h).mean(1))
        h = h + block.attn(block.ln_1(h), bert_mask is None)
        n = block.ln_2(h)
        h = h + block.mlp.c_proj(F.silu(1.702 * block.mlp.c_fc(n)) / 1.702)
    feats.append(model.transformer.ln_f(h).mean(1))
    return torch.stack(feats, 1)


@pytest.mark.parametrize("bert", [False, True])
def test_features_match_a_naive_layer_loop(bert):
    model = tiny()
    x = torch.randint(0, 16, (3, 16))
    mask = torch.rand(3, 16) < 0.15 if bert else None
    f = model.features(x, bert_mask=mask)
    assert f.shape == (3, 3, 64) and f.dtype == torch.float32
    torch.testing.assert_close(f, _naive_features(model, x, mask), rtol=1e-5, atol=1e-5)
    hidden = model.hidden_states(x, bert_mask=mask)
    torch.testing.assert_close(f[:, -1], hidden.mean(1), rtol=1e-6, atol=1e-6)


def test_layer_norm_and_gelu_variant_runs_and_trains():
    model = tiny(norm="layer", activation="gelu", bias=False)
    assert model.transformer.ln_f.bias is None
    assert all(not n.endswith("c_fc.bias") for n, _ in model.named_parameters())
    model2 = tiny(norm="layer")
    assert model2.transformer.ln_f.bias is not None
    x = torch.randint(0, 16, (2, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_shorter_sequences_are_allowed():
    model = tiny()
    assert model(torch.randint(0, 16, (2, 5))).shape == (2, 5, 16)


# paper sec. 3.3: S 76M and L 1362M at 32x32, M 455M and XL 6801M at 64x64
PAPER = [
    ("igpt-s", 32, 76e6),
    ("igpt-m", 64, 455e6),
    ("igpt-l", 32, 1362e6),
    ("igpt-xl", 64, 6801e6),
]


@pytest.mark.parametrize("name,n_px,paper", PAPER)
def test_parameter_counts_match_the_paper(name, n_px, paper):
    with torch.device("meta"):
        model = IGPT(IGPTConfig.from_name(name, n_px=n_px))
    # The paper's figures agree with the count without position embeddings to 0.5%; the full
    # count (which grows with n_px) is within 1%.
    assert abs(model.num_params(position_embeddings=False) / paper - 1) < 0.005
    assert abs(model.num_params() / paper - 1) < 0.01


def test_config_round_trip_and_overrides(tmp_path):
    cfg = IGPTConfig.from_name("igpt-s", n_px=48, n_colors=256, norm="layer")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_px) == (24, 512, 8, 48)
    assert cfg.vocab_size == 257 and cfg.sos_id == 256 and cfg.n_positions == 2304
    cfg.save(tmp_path / "config.json")
    assert IGPTConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
        ({"norm": "batch"}, "norm must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"n_px": 0}, "n_px must be a positive int"),
        ({"n_colors": 70000}, "n_colors must be at most"),
    ],
)
def test_bad_config_raises(kwargs, words):
    with pytest.raises(ValueError, match=words):
        IGPTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"bias": "no"}, TypeError, "bias must be True or False, got 'no'"),
        ({"bias": 1}, TypeError, "bias must be True or False"),
        ({"eps": math.nan}, ValueError, "eps must be finite and > 0, got nan"),
        ({"eps": math.inf}, ValueError, "eps must be finite and > 0"),
        ({"eps": 0.0}, ValueError, "eps must be finite and > 0"),
        ({"eps": -1e-5}, ValueError, "eps must be finite and > 0"),
        ({"eps": "1e-5"}, TypeError, "eps must be a positive number"),
        ({"eps": True}, TypeError, "eps must be a positive number"),
        ({"n_px": 32.0}, TypeError, "n_px must be a positive int, got 32.0"),
        ({"n_layer": True}, TypeError, "n_layer must be a positive int, got True"),
        ({"n_head": "8"}, TypeError, "n_head must be a positive int"),
        ({"n_colors": -3}, ValueError, "n_colors must be a positive int"),
        ({"norm": None}, ValueError, "norm must be one of"),
        ({"activation": ["gelu"]}, ValueError, "activation must be one of"),
    ],
)
def test_config_fields_are_type_checked(kwargs, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        IGPTConfig(**kwargs)


def test_config_constants_are_the_kernels_and_the_colour_limit_is_the_palettes():
    from igpt.config import ACTIVATIONS, MAX_COLORS, NORMS
    from igpt.palette import Palette
    from igpt_kernels import reference

    assert (NORMS, ACTIVATIONS, MAX_COLORS) == (reference.NORMS, reference.ACTIVATIONS, 65536)
    # the largest palette is a valid model: ids 0..65535 (uint16 caches), SOS id 65536
    palette = Palette(torch.zeros(MAX_COLORS, 3))
    cfg = IGPTConfig(n_px=2, n_layer=1, n_head=1, n_embd=32, n_colors=len(palette))
    assert cfg.sos_id == 65536 and cfg.vocab_size == 65537
    tokens = torch.from_numpy(np.array([[0, 65535, 7, 65535]], dtype=np.uint16))
    assert IGPT(cfg)(tokens).shape == (1, 4, MAX_COLORS)
    with pytest.raises(ValueError, match="n_colors must be at most 65536"):
        IGPTConfig(n_colors=MAX_COLORS + 1)


def test_numpy_ints_and_int_eps_are_normalised(tmp_path):
    cfg = IGPTConfig(n_px=np.int64(4), n_layer=1, n_head=2, n_embd=64, eps=1)
    assert type(cfg.n_px) is int and type(cfg.eps) is float
    cfg.save(tmp_path / "c.json")
    assert IGPTConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("n_embd,n_head", [(64, 4), (48, 2), (40, 5)])
def test_any_head_dim_runs_on_the_cpu(n_embd, n_head):
    """Head dims 16, 24 and 8: the config and the model take them; only the Triton kernel
    keeps a list of head dims, and the CPU path does not use it."""
    model = tiny(n_embd=n_embd, n_head=n_head)
    _randomize_head(model)
    x = torch.randint(0, 16, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 16) and torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    out = model.eval().generate(2, temperature=0)
    with torch.no_grad():
        again = model(out).argmax(-1)
    assert torch.equal(again, out)  # greedy: each token is the argmax given the ones before


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown model name 'igpt-q'"):
        IGPTConfig.from_name("igpt-q")
    with pytest.raises(ValueError, match="unknown IGPTConfig fields"):
        IGPTConfig.from_dict({"n_px": 32, "colours": 3})


@pytest.mark.parametrize(
    "tokens,mask,exc,words",
    [
        (torch.zeros(2, 16), None, TypeError, "integer tensor"),
        (torch.zeros(16, dtype=torch.long), None, TypeError, r"\(B, n\)"),
        (torch.zeros(2, 17, dtype=torch.long), None, ValueError, "n <= n_px"),
        (torch.full((2, 4), 16), None, ValueError, r"\[0, n_colors=16\)"),
        (torch.full((2, 4), -1), None, ValueError, "got values in"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), TypeError, "bert_mask must be"),
        (
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(2, 5, dtype=torch.bool),
            ValueError,
            "bert_mask must have",
        ),
    ],
)
def test_bad_tokens_raise(tokens, mask, exc, words):
    with pytest.raises(exc, match=words):
        tiny()(tokens, bert_mask=mask)


@pytest.mark.parametrize(
    "backend,bert",
    [pytest.param("inductor", False, marks=pytest.mark.slow), ("aot_eager", True)],
)
def test_compiled_fullgraph_forward_and_backward_equal_eager(backend, bert):
    """No host sync or graph break in forward: torch.compile(fullgraph=True) traces it whole
    (inductor generates its own CPU code, so it agrees to float32 rounding, not bitwise)."""
    torch._dynamo.reset()
    model = tiny()
    _randomize_head(model)
    x = torch.randint(0, 16, (2, 16))
    mask = torch.rand(2, 16) < 0.3 if bert else None
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = compiled(x, mask)
    expect = model(x, mask)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    grads = []
    for out in (got, expect):
        model.zero_grad()
        F.cross_entropy(out.flatten(0, 1), x.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
