"""Sampling: KV-cache generation against full recomputation, seeds, prefixes, top-k/top-p,
argument errors, completions, PNG grids, BERT refusal and the ``igpt sample`` command."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from igpt import IGPT, IGPTConfig
from igpt.checkpoint import save_checkpoint
from igpt.generation import next_token
from igpt.palette import Palette
from igpt.sample import complete, load_for_sampling, sample_grid, save_grid, unconditional

N_PX, K = 8, 16
T = N_PX * N_PX


def tiny(**kw):
    fields = dict(n_px=N_PX, n_layer=2, n_head=2, n_embd=64, n_colors=K)
    fields.update(kw)
    model = IGPT(IGPTConfig(**fields)).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a zero head gives uniform logits
    return model


@torch.no_grad()
def greedy_by_recomputation(model, n, prefix=None):
    """Greedy decoding that runs the whole sequence through forward() at every step."""
    x = torch.zeros(n, model.config.n_positions, dtype=torch.long)
    p = 0 if prefix is None else prefix.shape[1]
    if p:
        x[:, :p] = prefix
    for t in range(p, model.config.n_positions):
        x[:, t] = model(x[:, : t + 1])[:, t].argmax(-1)  # logits[:, t] only sees x[:, :t]
    return x


@pytest.mark.parametrize("p", [0, 1, 27, T - 1])
def test_greedy_with_cache_equals_recomputation(p):
    model = tiny()
    prefix = torch.randint(0, K, (3, p))
    cached = model.generate(3, prefix=prefix, temperature=0)
    assert cached.dtype == torch.int64 and cached.shape == (3, T)
    torch.testing.assert_close(cached, greedy_by_recomputation(model, 3, prefix), rtol=0, atol=0)


def test_greedy_with_cache_equals_recomputation_layernorm_gelu():
    model = tiny(norm="layer", activation="gelu", n_layer=3, n_head=1)
    out = model.generate(2, temperature=0)
    torch.testing.assert_close(out, greedy_by_recomputation(model, 2), rtol=0, atol=0)
    assert_greedy_consistent(model, out, 0, atol=1e-5)  # the GPU tests' check, checked here
    out[0, 5] = (out[0, 5] + 1) % K
    with pytest.raises(AssertionError, match="below the max"):
        assert_greedy_consistent(model, out, 0, atol=1e-5)


def test_fixed_shape_step_equals_the_sliced_cache():
    """cuda_graph=True's step (whole cache, masked; eager off the GPU) samples the same."""
    model = tiny()
    prefix = torch.randint(0, K, (3, 10))
    eager = model.generate(3, prefix=prefix, temperature=0)
    assert torch.equal(model.generate(3, prefix=prefix, temperature=0, cuda_graph=True), eager)
    assert torch.equal(model.generate(2, seed=4, cuda_graph=True), model.generate(2, seed=4))


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_decoding_through_the_cache_gives_forwards_logits(fixed_shape):
    """The trunk with a KVCache (prefill, then one token a step) is forward's computation."""
    from igpt.generation import FixedShapeStep

    model = tiny()
    x = torch.randint(0, K, (3, T))
    with torch.no_grad():
        expect = model(x)  # (3, T, K)
        cache = model.kv_cache(3)
        sos = torch.full((3, 1), model.config.sos_id)
        got = [model.decode(torch.cat([sos, x[:, :9]], dim=1), cache)]  # predicts token 9
        step = FixedShapeStep(model, cache) if fixed_shape else model.decode
        for t in range(9, T - 1):
            got.append(step(x[:, t : t + 1], cache))  # predicts token t + 1
    assert cache[0].pos == (10 if fixed_shape else T)  # the fixed step keeps its own position
    if fixed_shape:
        with pytest.raises(ValueError, match="one token per step, got 2"):
            model.decode(x[:, :2], step.caches)
    torch.testing.assert_close(torch.stack(got, dim=1), expect[:, 9:], rtol=1e-5, atol=1e-5)


def test_seed_reproduces_and_different_seeds_differ():
    model = tiny()
    a = model.generate(4, seed=7)
    b = model.generate(4, seed=7)
    c = model.generate(4, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < K


def test_prefix_is_kept_unchanged():
    model = tiny()
    prefix = torch.randint(0, K, (3, 20), dtype=torch.int32)
    out = model.generate(3, prefix=prefix, seed=0)
    assert torch.equal(out[:, :20], prefix.long())
    shared = torch.randint(0, K, (11,))  # (p,) is the same prefix for every image
    out = model.generate(2, prefix=shared, seed=0)
    assert torch.equal(out[:, :11], shared.expand(2, -1))
    whole = torch.randint(0, K, (2, T))
    assert torch.equal(model.generate(2, prefix=whole), whole)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny()
    greedy = model.generate(3, temperature=0)
    assert torch.equal(model.generate(3, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(3, top_p=1e-6, temperature=2.0, seed=2), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    drawn = set(next_token(logits, 1.0, 2, None, g).tolist())
    assert drawn == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.23, 0.09, ...: 0.8 needs the top 2
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(next_token(logits, 1.0, None, 0.8, g).tolist()) == {0, 1}
    assert set(next_token(logits, 1.0, None, None, g).tolist()) == set(range(6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(prefix=torch.full((2, 3), K)), "prefix"),
        (dict(prefix=torch.zeros(3, 4, dtype=torch.long)), "prefix"),
        (dict(prefix=torch.zeros(2, T + 1, dtype=torch.long)), "prefix"),
        (dict(device="cuda"), "device"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny().generate(2, **kwargs)


def test_bad_types_raise():
    model = tiny()
    with pytest.raises(TypeError, match="prefix"):
        model.generate(2, prefix=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="n must"):
        model.generate(0)


def test_complete_keeps_rows_and_batches_reproducibly():
    model = tiny()
    images = torch.randint(0, K, (3, N_PX, N_PX))
    out = complete(model, images, rows=3, n_samples=2, seed=5, batch_size=4)
    assert out.shape == (3, 2, T)
    kept = images.reshape(3, 1, T)[..., : 3 * N_PX].expand(-1, 2, -1)
    assert torch.equal(out[..., : 3 * N_PX], kept)
    assert torch.equal(out, complete(model, images, rows=3, n_samples=2, seed=5, batch_size=4))
    greedy = complete(model, images, n_prefix=13, n_samples=1, temperature=0)
    assert torch.equal(
        greedy[:, 0], model.generate(3, prefix=images.reshape(3, T)[:, :13], temperature=0)
    )
    with pytest.raises(ValueError, match="not both"):
        complete(model, images, rows=2, n_prefix=5)
    with pytest.raises(ValueError, match="rows"):
        complete(model, images, rows=N_PX + 1)
    with pytest.raises(ValueError, match="n_px"):
        complete(model, torch.zeros(2, 10, dtype=torch.long))


def test_unconditional_batches_with_per_batch_seeds():
    model = tiny()
    out = unconditional(model, 5, seed=3, batch_size=2)
    assert out.shape == (5, T)
    assert torch.equal(out[:2], model.generate(2, seed=3))
    assert torch.equal(out[4:], model.generate(1, seed=5))


def _palette():
    return Palette(torch.rand(K, 3) * 255)


def test_grid_png_has_the_expected_size_and_grey_mask(tmp_path):
    palette = _palette()
    originals = torch.randint(0, K, (3, T))
    completions = torch.randint(0, K, (3, 2, T))
    path = save_grid(
        tmp_path / "grid.png",
        originals,
        completions,
        palette,
        n_prefix=2 * N_PX,
        scale=3,
        pad=2,
        tokens_path=tmp_path / "tokens.npy",
    )
    png = np.asarray(Image.open(path))
    cell = N_PX * 3
    assert png.shape == (3 * cell + 4 * 2, 4 * cell + 5 * 2, 3)  # 3 rows, 2 + 2 columns
    masked = png[2 : 2 + cell, 2 : 2 + cell]  # first cell: the first 2 rows, then grey
    assert (masked[2 * 3 :] == 128).all()
    first_px = palette.dequantize(originals[0, :1]).numpy()[0]
    assert (masked[0, 0] == first_px).all()
    last = png[2 : 2 + cell, -(2 + cell) : -2]  # last cell: the untouched original
    np.testing.assert_array_equal(
        last[::3, ::3], palette.dequantize(originals[0]).view(N_PX, N_PX, 3).numpy()
    )
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), completions.numpy())
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_unconditional_grid_is_near_square():
    picture = sample_grid(None, torch.randint(0, K, (5, T)), _palette(), pad=1)
    assert picture.shape == (2 * N_PX + 3, 3 * N_PX + 4, 3) and picture.dtype == np.uint8


def _checkpoint(tmp_path, objective):
    model = tiny()
    return save_checkpoint(
        tmp_path / "ckpt_00000001.pt", model, step=1, palette=_palette(), objective=objective
    )


def test_bert_checkpoints_are_refused(tmp_path):
    from igpt.cli import main

    path = _checkpoint(tmp_path, "bert")
    with pytest.raises(ValueError, match="BERT"):
        load_for_sampling(path)
    with pytest.raises(SystemExit, match="BERT"):
        main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.png")])
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        main(["sample", "--checkpoint", str(tmp_path / "nope.pt")])
    np.save(tmp_path / "p.npy", np.zeros((K + 1, 3), np.float32))
    (tmp_path / "ckpt_00000001.pt").unlink()
    _checkpoint(tmp_path, "ar")
    with pytest.raises(SystemExit, match="n_colors=16"):
        main(["sample", "--checkpoint", str(tmp_path), "--palette", str(tmp_path / "p.npy")])


def test_cli_completes_digits(tmp_path, capsys):
    from igpt.cli import build_parser, main

    _checkpoint(tmp_path, "ar")
    out, tokens = tmp_path / "s.png", tmp_path / "s.npy"
    argv = ["sample", "--checkpoint", str(tmp_path), "--n", "2", "--complete-from", "digits"]
    argv += ["--rows", "3", "--n-samples", "2", "--out", str(out), "--tokens-out", str(tokens)]
    main(argv + ["--scale", "2", "--top-k", "4", "--device", "cpu"])
    assert np.asarray(Image.open(out)).shape == (2 * 16 + 3 * 2, 4 * 16 + 5 * 2, 3)
    assert np.load(tokens).shape == (2, 2, T)
    assert "wrote 4 completions" in capsys.readouterr().out
    main(["sample", "--checkpoint", str(tmp_path), "--n", "3", "--out", str(out)])
    assert np.asarray(Image.open(out)).shape == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2, 3)
    parsed = build_parser().parse_args(["sample", "--checkpoint", "c", "--data", "digits"])
    assert parsed.complete_from == "digits"  # the design's common --data flag


def assert_greedy_consistent(model, out, p, atol):
    """Every sampled token after the prefix is the argmax, up to ``atol``, of the logits a
    full teacher-forced forward gives. Kernels' rounding can flip near-ties, after which
    free-running sequences diverge, so GPU tests check each step on its own instead."""
    with torch.no_grad():
        logits = model(out).float()  # (n, T, K)
    gap = logits.max(-1).values - logits.gather(-1, out[..., None])[..., 0]  # (n, T)
    assert gap[:, p:].max() <= atol, f"a sampled token is {gap[:, p:].max():.3g} below the max"


@pytest.mark.cuda
def test_cuda_greedy_with_cache_is_greedy_and_seeds_reproduce():
    model = tiny().cuda()
    prefix = torch.randint(0, K, (4, 9), device="cuda")
    for cuda_graph in (False, True):
        out = model.generate(4, prefix=prefix, temperature=0, cuda_graph=cuda_graph)
        assert torch.equal(out[:, :9], prefix)
        assert_greedy_consistent(model, out, 9, atol=2e-2)
        a = model.generate(4, seed=1, cuda_graph=cuda_graph)
        assert torch.equal(a, model.generate(4, seed=1, cuda_graph=cuda_graph))


@pytest.mark.cuda
def test_cuda_graph_is_captured_in_bf16(caplog):
    model = tiny(n_head=1).cuda().to(torch.bfloat16)
    out = model.generate(3, temperature=0, cuda_graph=True)
    assert "capture failed" not in caplog.text
    assert_greedy_consistent(model, out, 0, atol=0.25)


def test_cache_decode_through_the_triton_kernel_matches(monkeypatch):
    """The cache's strided views, the causal prefill and the Nq=1 decode steps through the
    Triton attention kernel (interpreted on a CPU) give the reference's greedy tokens."""
    import functools

    import igpt.model
    from igpt_kernels import attention
    from igpt_kernels._dispatch import triton_interpreting

    if not triton_interpreting():
        pytest.skip(
            "runs the kernel on the CPU under TRITON_INTERPRET=1 (the cuda tests cover GPUs)"
        )
    model = tiny(n_px=4)
    prefix = torch.randint(0, K, (2, 5))
    expect = model.generate(2, prefix=prefix, temperature=0)
    monkeypatch.setattr(igpt.model, "attention", functools.partial(attention, backend="triton"))
    out = model.generate(2, prefix=prefix, temperature=0, cuda_graph=True)  # masked whole cache
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    # the sliced cache must never be read past the slice: poison what is not written yet
    empty = IGPT.kv_cache

    def poisoned(*args, **kwargs):
        caches = empty(*args, **kwargs)
        for cache in caches:
            cache.kv.fill_(math.nan)
        return caches

    monkeypatch.setattr(IGPT, "kv_cache", poisoned)
    out = model.generate(2, prefix=prefix, temperature=0)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


# ------------------------------------------------------------------- issue 32: temperature


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Two colours with logits 0 and ln 3: colour 1 is drawn with probability
    3^(1/T) / (1 + 3^(1/T)) (0.9, 0.75 and 0.634 here), so ignoring T shows."""
    n = 20_000
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(n, -1)
    g = torch.Generator().manual_seed(0)
    drawn = next_token(logits, temperature, None, None, g).float().mean().item()
    odds = 3.0 ** (1 / temperature)
    assert abs(drawn - odds / (1 + odds)) < 0.015  # 4.5 standard errors at n = 20,000


def test_top_k_and_top_p_act_on_the_tempered_logits():
    """Logits ln 1, ln 2, ln 3: at T = 1 the probabilities are 1/6, 2/6, 3/6 and top_p = 0.6
    keeps two colours (3/6 < 0.6); at T = 0.5 they are 1/14, 4/14, 9/14 and it keeps one."""
    n = 20_000
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]])).expand(n, -1)
    g = torch.Generator().manual_seed(1)
    assert set(next_token(logits, 1.0, None, 0.6, g).tolist()) == {1, 2}
    assert set(next_token(logits, 0.5, None, 0.6, g).tolist()) == {2}  # 9/14 >= 0.6
    drawn = next_token(logits, 2.0, 2, None, g)
    share = (drawn == 2).float().mean().item()  # sqrt 3 / (sqrt 2 + sqrt 3) among the top 2
    assert set(drawn.tolist()) == {1, 2} and abs(share - 0.5505) < 0.015


def test_a_cold_temperature_reaches_the_sampler_through_every_entry_point():
    """generate, unconditional and complete pass temperature on: near 0 they are greedy."""
    model = tiny()
    greedy = model.generate(3, temperature=0)
    assert torch.equal(model.generate(3, temperature=1e-4, seed=0), greedy)
    assert torch.equal(unconditional(model, 3, temperature=1e-4, seed=0), greedy)
    images = model.generate(2, seed=1)
    done = complete(model, images, n_prefix=5, n_samples=2, temperature=1e-4, seed=0)
    expect = model.generate(2, prefix=images[:, :5], temperature=0)
    assert torch.equal(done[:, 0], expect) and torch.equal(done[:, 1], expect)


def test_top_k_and_top_p_at_their_edges():
    """top_k counts colours, not rows (a batch smaller than top_k); a colour is dropped
    once the likelier ones reach top_p exactly; top_p = 1 keeps all; n must be an int."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    drawn = {int(next_token(logits, 1.0, 2, None, g)) for _ in range(300)}
    assert drawn == {0, 1}  # one row, top_k = 2 < 6 colours
    halves = torch.log(torch.tensor([[4.0, 2.0, 2.0]])).expand(2000, -1)  # 1/2, 1/4, 1/4
    assert set(next_token(halves, 1.0, None, 0.5, g).tolist()) == {0}
    assert set(next_token(halves, 1.0, None, 0.51, g).tolist()) == {0, 1}
    model = tiny()
    assert torch.equal(model.generate(2, top_p=1.0, seed=3), model.generate(2, seed=3))
    out = model.generate(2)  # no seed: torch's own generator
    assert out.shape == (2, T) and int(out.min()) >= 0 and int(out.max()) < K
    for n in (True, 2.0):
        with pytest.raises(ValueError, match="n must be a positive int"):
            model.generate(n)


def test_every_position_after_the_prefill_is_decoded_once_and_the_cache_keeps_the_dtype(
    monkeypatch,
):
    """n_px^2 - p tokens need the prefill and n_px^2 - p - 1 one-token steps: the last
    token comes from its own logits, not from the step before's."""
    model = tiny()
    calls = []
    real = model.decode
    monkeypatch.setattr(
        model, "decode", lambda ids, cache: calls.append(ids.shape) or real(ids, cache)
    )
    model.generate(2, prefix=torch.zeros(2, 5, dtype=torch.long), seed=0)
    assert calls == [(2, 6)] + [(2, 1)] * (T - 6)
    assert len(model.kv_cache(2)) == model.config.n_layer
    assert model.kv_cache(2, dtype=torch.bfloat16)[0].kv.dtype == torch.bfloat16
    assert model.to(torch.bfloat16).kv_cache(2)[0].kv.dtype == torch.bfloat16
