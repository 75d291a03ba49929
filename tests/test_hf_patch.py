"""transformers' ImageGPT patched onto igpt's kernels (igpt.hf_patch) against itself unpatched.

Random-weight models of several shapes, head dims the Triton kernel takes (16 is not one,
32 is) and ones it cannot (24, 80): logits, loss, every gradient, generate, the classifier,
padding, the fallbacks, Trainer, gradient checkpointing, torch.compile, and the processor's
tokens on real photographs.
"""

import importlib.util

import numpy as np
import pytest
import torch

import igpt_kernels
from igpt import hf_patch
from igpt.hf_patch import (
    apply_igpt_kernels_to_imagegpt,
    igpt_kernels_for_imagegpt,
    mlp_fallback_reason,
    quantize_clusters,
    revert_igpt_kernels_to_imagegpt,
)

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.imagegpt.modeling_imagegpt")

ATOL, RTOL = 2e-5, 1e-5  # float32: a few ulps of the logits' scale
# (n_embd, n_head): head dims 24, 32, 80 and 16
SHAPES = [(48, 2), (64, 2), (160, 2), (64, 4)]


@pytest.fixture(autouse=True)
def _unpatched(one_thread):
    """Every test starts and ends with transformers' own code."""
    revert_igpt_kernels_to_imagegpt()
    yield
    revert_igpt_kernels_to_imagegpt()


def make(cls=modeling.ImageGPTForCausalImageModeling, n_embd=48, n_head=2, n_layer=2, **kw):
    """A random-weight model (norm weights too, so ln_2 is not the identity), no dropout."""
    settings = dict(
        vocab_size=17, n_positions=64, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, num_labels=3,
    )  # fmt: skip
    config = transformers.ImageGPTConfig(**{**settings, **kw})
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
    return model


def tokens(batch=3, n=21, vocab=16):
    return torch.randint(0, vocab, (batch, n))


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.fixture
def calls(monkeypatch):
    """How often each kernel ran (the patch looks them up on igpt_kernels at call time)."""
    count = {"attention": 0, "ln_mlp": 0}
    for name in count:
        real = getattr(igpt_kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            count[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(igpt_kernels, name, counted)
    return count


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("n_embd, n_head", SHAPES)
@pytest.mark.parametrize("where", ["classes", "instance"])
def test_logits_loss_and_every_gradient_match(n_embd, n_head, where, calls):
    model = make(n_embd=n_embd, n_head=n_head).train()
    x = tokens()
    ref = model(x, labels=x)
    ref.loss.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    keys = list(model.state_dict())
    params = [p.data_ptr() for p in model.parameters()]
    apply_igpt_kernels_to_imagegpt(None if where == "classes" else model)
    out = model(x, labels=x)
    out.loss.backward()
    assert calls == {"attention": 2, "ln_mlp": 2}
    close(out.logits, ref.logits)
    close(out.loss, ref.loss)
    got = grads(model)
    assert got.keys() == ref_grads.keys() and len(got) == len(params)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert list(model.state_dict()) == keys
    assert [p.data_ptr() for p in model.parameters()] == params


@pytest.mark.parametrize("n_embd, n_head", [(48, 2), (160, 2)])
def test_greedy_generate_is_token_identical_with_the_cache(n_embd, n_head, calls):
    model = make(n_embd=n_embd, n_head=n_head).eval()
    sos = torch.full((2, 1), model.config.vocab_size - 1)
    with torch.no_grad():  # scale the logits up so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    ref = model.generate(sos, max_length=40, do_sample=False, use_cache=True)
    apply_igpt_kernels_to_imagegpt(model)
    got = model.generate(sos, max_length=40, do_sample=False, use_cache=True)
    assert torch.equal(got, ref)
    assert calls["attention"] == 2 * 39  # every step of both layers, over the cache


def test_kv_cache_blocks_are_bottom_right_aligned():
    """A block of 5 new queries over a 9-token cache: only bottom-right causal is right."""
    model = make().eval()
    x = tokens(2, 14)
    with torch.no_grad():
        ref = model(x).logits
        apply_igpt_kernels_to_imagegpt(model)
        cache = model(x[:, :9], use_cache=True).cache
        got = model(x[:, 9:], cache=cache, use_cache=True).logits
    close(got, ref[:, 9:])


def test_classifier_logits_and_loss_match(calls):
    model = make(modeling.ImageGPTForImageClassification, n_embd=160, n_head=2).eval()
    x, labels = tokens(4, 30), torch.tensor([0, 2, 1, 2])
    ref = model(x, labels=labels)
    apply_igpt_kernels_to_imagegpt()
    got = model(x, labels=labels)
    close(got.logits, ref.logits)
    close(got.loss, ref.loss)
    assert calls["attention"] == 2


def test_padding_mask_and_hidden_states_match(calls):
    """Right padding and a gap run the kernel with a key-padding mask; left padding, where
    a query sees no key, falls back (HF's softmax of equal minimum scores is a uniform
    average no kernel computes) and still matches."""
    model = make().eval()
    x = tokens(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, 4:6] = 0
    ref = model(x, attention_mask=mask, output_hidden_states=True)
    apply_igpt_kernels_to_imagegpt(model)
    got = model(x, attention_mask=mask, output_hidden_states=True)
    assert calls["attention"] == 2
    close(got.logits, ref.logits)
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(got.hidden_states, ref.hidden_states, strict=True):
        close(a, b)
    mask[2, :3] = 0  # left padding
    revert_igpt_kernels_to_imagegpt(model)
    ref = model(x, attention_mask=mask)
    apply_igpt_kernels_to_imagegpt(model)
    close(model(x, attention_mask=mask).logits, ref.logits)
    assert calls["attention"] == 2  # fell back


def test_left_padded_batch_generates_the_same_tokens():
    model = make().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    x = torch.tensor([[16, 16, 16, 3, 4], [16, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ref = model.generate(x, attention_mask=mask, max_length=20, do_sample=False, pad_token_id=16)
    apply_igpt_kernels_to_imagegpt(model)
    got = model.generate(x, attention_mask=mask, max_length=20, do_sample=False, pad_token_id=16)
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- fallbacks


def test_output_attentions_falls_back_with_the_weights(calls):
    model = make().eval()
    x = tokens()
    ref = model(x, output_attentions=True)
    apply_igpt_kernels_to_imagegpt(model)
    got = model(x, output_attentions=True)
    assert calls["attention"] == 0 and calls["ln_mlp"] == 2
    assert len(got.attentions) == 2
    for a, b in zip(got.attentions, ref.attentions, strict=True):
        close(a, b)
    close(got.logits, ref.logits)


@pytest.mark.parametrize(
    "settings, kernel_calls",
    [
        ({"reorder_and_upcast_attn": True}, 0),
        ({"attn_pdrop": 0.3}, 0),  # dropout on the probabilities while training
        ({"resid_pdrop": 0.3}, 2),  # the MLP's output dropout: ln_mlp without its residual
        ({"scale_attn_by_inverse_layer_idx": True}, 2),  # a softmax scale: the kernel
        ({"scale_attn_weights": False}, 2),
    ],
)
def test_config_fallbacks_train_as_transformers_does(settings, kernel_calls, calls):
    model = make(**settings).train()
    x = tokens()
    torch.manual_seed(1)
    ref = model(x, labels=x)
    ref.loss.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    apply_igpt_kernels_to_imagegpt(model)
    torch.manual_seed(1)  # the same dropout masks, drawn in the same order
    got = model(x, labels=x)
    got.loss.backward()
    assert calls["attention"] == kernel_calls
    close(got.logits, ref.logits)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads(model)[name], g, atol=1e-5, rtol=1e-4, msg=name)


class ScaledAdapter(torch.nn.Module):
    """A stand-in for an adapter (PEFT's LoRA) or a quantized layer in place of a Conv1D:
    it keeps the layer's ``weight`` and ``bias`` but computes something else."""

    def __init__(self, base):
        super().__init__()
        self.base, self.weight, self.bias = base, base.weight, base.bias

    def forward(self, x):
        return 1.5 * self.base(x)


@pytest.mark.parametrize("where", ["adapter", "subclass", "hook", "pre-hook", "global hook"])
def test_mlp_modules_that_do_more_keep_transformers_code(where, calls):
    """The fused norm-MLP reads the weights; a module in their place that computes anything
    else, or a hook that watches one, must not be bypassed."""
    model = make().eval()
    x = tokens()
    mlp = model.transformer.h[1].mlp
    handle = None
    if where == "adapter":
        mlp.c_proj = ScaledAdapter(mlp.c_proj)
    elif where == "subclass":
        mlp.c_fc.__class__ = type("Quantized", (type(mlp.c_fc),), {})
    elif where == "hook":
        handle = mlp.c_fc.register_forward_hook(lambda m, i, o: o * 2)
    elif where == "pre-hook":
        handle = model.transformer.h[1].ln_2.register_forward_pre_hook(lambda m, i: (i[0] * 3,))
    else:
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(type(m).__name__)
        )
    ref = model(x).logits
    apply_igpt_kernels_to_imagegpt(model)
    try:
        close(model(x).logits, ref)
    finally:
        if handle is not None:
            handle.remove()
    if where == "global hook":
        assert calls["ln_mlp"] == 0 and "Conv1D" in seen
    else:
        assert calls["ln_mlp"] == 1  # the untouched block still fuses
    assert calls["attention"] == 2
    assert mlp_fallback_reason(model.transformer.h[0]) is None


def test_unsupported_activation_and_cross_attention_fall_back(calls):
    model = make(activation_function="gelu_new", add_cross_attention=True).eval()
    x, enc = tokens(), torch.randn(3, 7, 48)
    # use_cache=False: transformers' own cross-attention fails with a cache (is_updated)
    ref = model(x, encoder_hidden_states=enc, use_cache=False).logits
    plain = model(x).logits
    apply_igpt_kernels_to_imagegpt(model)
    close(model(x, encoder_hidden_states=enc, use_cache=False).logits, ref)
    close(model(x).logits, plain)
    assert calls["ln_mlp"] == 0
    # each call's self-attention (the cross-attention modules fall back)
    assert calls["attention"] == 4


def test_exact_gelu_runs_the_fused_mlp(calls):
    model = make(activation_function="gelu").eval()
    x = tokens()
    ref = model(x).logits
    apply_igpt_kernels_to_imagegpt(model)
    close(model(x).logits, ref)
    assert calls["ln_mlp"] == 2


def test_custom_4d_mask_falls_back(calls):
    model = make().eval()
    x = tokens(2, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, 3, 1] = -5.0  # a bias, not a padding mask
    layer = model.transformer.h[0].attn
    hidden = torch.randn(2, 6, 48)
    ref = layer(hidden, attention_mask=mask)[0]
    apply_igpt_kernels_to_imagegpt(model)
    close(layer(hidden, attention_mask=mask)[0], ref)
    assert calls["attention"] == 0
    close(model(x).logits, model(x).logits)


# ----------------------------------------------------------------------------- patching


def test_patching_twice_is_harmless_and_revert_restores(calls):
    attn_fwd, block_fwd = modeling.ImageGPTAttention.forward, modeling.ImageGPTBlock.forward
    model = make().eval()
    x = tokens()
    ref = model(x).logits
    for _ in range(2):
        apply_igpt_kernels_to_imagegpt()
        apply_igpt_kernels_to_imagegpt(model)
    close(model(x).logits, ref)
    assert calls == {"attention": 2, "ln_mlp": 2}  # each block once, not wrapped twice
    revert_igpt_kernels_to_imagegpt(model)
    revert_igpt_kernels_to_imagegpt()
    assert modeling.ImageGPTAttention.forward is attn_fwd
    assert modeling.ImageGPTBlock.forward is block_fwd
    assert all("forward" not in vars(m) for m in model.modules())
    assert {type(b) for b in model.transformer.h} == {modeling.ImageGPTBlock}
    torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)
    assert calls == {"attention": 2, "ln_mlp": 2}


def test_parts_can_be_patched_alone(calls):
    model = make().eval()
    x = tokens()
    apply_igpt_kernels_to_imagegpt(model, attention=False)
    model(x)
    assert calls == {"attention": 0, "ln_mlp": 2}
    revert_igpt_kernels_to_imagegpt(model)
    apply_igpt_kernels_to_imagegpt(norm_mlp=False)
    model(x)
    assert calls == {"attention": 2, "ln_mlp": 2}


def test_context_manager_restores_the_state_before_it(calls):
    pil = pytest.importorskip("transformers.models.imagegpt.image_processing_pil_imagegpt")
    quantize_fn = pil.color_quantize
    model = make().eval()
    x = tokens()
    with igpt_kernels_for_imagegpt(model) as patched:
        assert patched is model
        model(x)
        assert pil.color_quantize is not quantize_fn
    assert calls["attention"] == 2
    assert pil.color_quantize is quantize_fn
    assert all("forward" not in vars(m) for m in model.modules())
    assert {type(b) for b in model.transformer.h} == {modeling.ImageGPTBlock}
    apply_igpt_kernels_to_imagegpt(processor=False)
    with igpt_kernels_for_imagegpt(attention=False):
        pass
    model(x)  # the class patch from before the block is still there
    assert calls["attention"] == 4


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(TypeError, match="attention must be True or False"):
        apply_igpt_kernels_to_imagegpt(attention="yes")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_igpt_kernels_to_imagegpt(object())
    with pytest.raises(ValueError, match="holds no transformers ImageGPT blocks"):
        apply_igpt_kernels_to_imagegpt(torch.nn.Linear(2, 2))


def test_a_changed_transformers_is_refused_in_one_line(monkeypatch):
    needed = dict(hf_patch._NEEDED)
    needed[("ImageGPTBlock", "forward")] = ("self.some_new_norm(hidden_states)",)
    monkeypatch.setattr(hf_patch, "_NEEDED", needed)
    with pytest.raises(RuntimeError) as e:
        apply_igpt_kernels_to_imagegpt()
    assert f"transformers {transformers.__version__}" in str(e.value)
    assert "ImageGPTBlock.forward" in str(e.value) and "\n" not in str(e.value)
    assert "forward" not in vars(modeling.ImageGPTBlock) or not hf_patch._is_ours(
        modeling.ImageGPTBlock.forward
    )


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("where", ["classes", "instance"])
def test_gradient_checkpointing_matches(where, calls):
    model = make(n_embd=64, n_head=2).train()
    model.gradient_checkpointing_enable()
    x = tokens()
    ref = model(x, labels=x)
    ref.loss.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    apply_igpt_kernels_to_imagegpt(None if where == "classes" else model)
    got = model(x, labels=x)
    got.loss.backward()
    assert calls == {"attention": 4, "ln_mlp": 4}  # forward, then again in the recomputation
    close(got.loss, ref.loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads(model)[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="transformers' Trainer needs accelerate"
)
def test_one_trainer_step_matches(tmp_path):
    from torch.utils.data import Dataset

    class Images(Dataset):
        def __init__(self):
            self.x = tokens(8, 16)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    def step(patch):
        torch.manual_seed(0)
        model = make()
        if patch:
            apply_igpt_kernels_to_imagegpt(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patch)), max_steps=1, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", optim="sgd",
            logging_steps=1, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Images())
        loss = trainer.train().training_loss
        return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}

    ref_loss, ref = step(False)
    loss, got = step(True)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, w in ref.items():
        torch.testing.assert_close(got[name], w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torch_compile_matches():
    model = make().eval()
    x = tokens()
    ref = model(x).logits
    apply_igpt_kernels_to_imagegpt(model)
    compiled = torch.compile(model)
    close(compiled(x).logits, ref)
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    close(compiled(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits)


# ----------------------------------------------------------------------------- processor


def photos(size):
    """Real photographs as PIL images: scikit-learn's two samples (china, flower) and, where
    matplotlib is installed, its Grace Hopper portrait (scikit-image's are not installed)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = [Image.fromarray(im) for im in load_sample_images().images]
    if importlib.util.find_spec("matplotlib") is not None:
        from matplotlib.cbook import get_sample_data

        with get_sample_data("grace_hopper.jpg") as f:
            images.append(Image.open(f).convert("RGB"))
    return [im.resize(size) for im in images]


def processor_classes():
    found = []
    for module, name in [
        ("transformers.models.imagegpt.image_processing_pil_imagegpt", "ImageGPTImageProcessorPil"),
        ("transformers.models.imagegpt.image_processing_imagegpt", "ImageGPTImageProcessor"),
    ]:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:  # the torch processor needs torchvision
            found.append(pytest.param(None, marks=pytest.mark.skip(reason=f"{name}: no import")))
    return found


def palettes():
    """512 colours: k-means-like (pixels averaged in groups), exact duplicates (ties in
    every arithmetic), and colours half-way between pixel values (ties before rounding)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    px = np.concatenate([im.reshape(-1, 3) for im in load_sample_images().images]).astype(float)
    means = px[rng.integers(0, len(px), (512, 8))].mean(1)
    dupes = np.concatenate([means[:256], means[:256]])
    halves = np.floor(means) + 0.5
    return {"means": means, "duplicates": dupes, "halves": halves}


@pytest.mark.parametrize("processor_cls", processor_classes())
@pytest.mark.parametrize("kind", ["means", "duplicates", "halves"])
def test_processor_tokens_identical_on_photographs(processor_cls, kind):
    clusters = palettes()[kind] / 127.5 - 1
    processor = processor_cls(clusters=clusters.tolist(), size={"height": 48, "width": 40})
    images = photos((320, 213)) + photos((97, 131))
    ref = processor(images, return_tensors="pt")["input_ids"]
    apply_igpt_kernels_to_imagegpt(attention=False, norm_mlp=False)
    got = processor(images, return_tensors="pt")["input_ids"]
    assert got.dtype == ref.dtype and torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_clusters_matches_on_every_colour_class(dtype):
    """Random 8-bit colours, off-grid values, float32 and float64 clusters, and one cluster:
    the same tokens as transformers' numpy function, whichever path decides them."""
    pil = pytest.importorskip("transformers.models.imagegpt.image_processing_pil_imagegpt")
    rng = np.random.default_rng(1)
    clusters = (palettes()["means"] / 127.5 - 1).astype(dtype)
    grid = rng.integers(0, 256, (20000, 3)).astype(np.float32) / np.float32(127.5) - 1
    off_grid = rng.uniform(-1, 1, (3000, 3)).astype(np.float32)
    for x in (grid, off_grid, grid.reshape(2, 100, 100, 3)):
        ref = pil.color_quantize(x, clusters)
        got = quantize_clusters(x, clusters, pil.color_quantize)
        assert isinstance(got, np.ndarray) and got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)
    one = quantize_clusters(grid, clusters[:1], pil.color_quantize)
    np.testing.assert_array_equal(one, np.zeros(len(grid), np.int64))


def test_quantize_clusters_torch_inputs_and_non_float_fallback():
    def original(x, clusters):  # transformers' torch function, restated
        d = (x**2).sum(1)[:, None] - 2 * x @ clusters.t() + (clusters**2).sum(1)[None, :]
        return d.argmin(1)

    rng = np.random.default_rng(2)
    clusters = torch.from_numpy(palettes()["halves"] / 127.5 - 1).float()
    x = torch.from_numpy(rng.integers(0, 256, (20000, 3))).float() / 127.5 - 1
    got = quantize_clusters(x, clusters, original)
    assert torch.is_tensor(got) and torch.equal(got, original(x, clusters))
    half = x.half()
    torch.testing.assert_close(
        quantize_clusters(half, clusters.half(), original), original(half, clusters.half())
    )


def test_only_near_ties_reach_transformers_function():
    pil = pytest.importorskip("transformers.models.imagegpt.image_processing_pil_imagegpt")
    clusters = palettes()["means"] / 127.5 - 1
    x = np.asarray(photos((160, 107))[0], np.float32).reshape(-1, 3) / np.float32(127.5) - 1
    rows = []

    def spy(a, c):
        rows.append(len(a.reshape(-1, 3)))
        return pil.color_quantize(a, c)

    np.testing.assert_array_equal(
        quantize_clusters(x, clusters, spy), pil.color_quantize(x, clusters)
    )
    # float64 clusters: transformers rounds in float64 where it matters, so only (nearly)
    # exact ties are left to it, none among these k-means-like colours
    assert len(rows) <= 1 and sum(rows) < 1e-3 * len(x)
    rows.clear()  # float32 clusters: float32's rounding leaves about 1% to it
    c32 = clusters.astype(np.float32)
    np.testing.assert_array_equal(quantize_clusters(x, c32, spy), pil.color_quantize(x, c32))
    assert len(rows) <= 1 and sum(rows) < 0.05 * len(x)


def test_a_patched_model_pickles_and_copies_patched():
    import copy
    import pickle

    model = make().eval()
    x = tokens()
    apply_igpt_kernels_to_imagegpt(model)
    ref = model(x).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.transformer.h[0]).__name__ == "ImageGPTBlockWithIgptKernels"
        torch.testing.assert_close(clone(x).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_match(dtype, calls):
    """float64 to float64 rounding; bfloat16 within twice transformers' own bfloat16 error
    (both against the float64 model)."""
    model = make().double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits of order 1, so errors are not hidden
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    exact = model(x, attention_mask=mask).logits
    model.to(dtype)
    ref = model(x, attention_mask=mask).logits
    apply_igpt_kernels_to_imagegpt(model)
    got = model(x, attention_mask=mask).logits
    assert got.dtype == dtype and calls == {"attention": 2, "ln_mlp": 2}
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact, atol=1e-10, rtol=1e-10)
    else:
        hf_error = (ref.double() - exact).abs().max()
        assert 0 < (got.double() - exact).abs().max() <= 2 * hf_error


# ----------------------------------------------------------------------------- issue 32: the rule
# of the mask check itself, so that an off-by-one in it cannot hide behind a fallback that
# still matches (a query that sees no key falls back; every other mask runs the kernel)


def hf_mask(keep_rows, n_query):
    """HF's additive (B, 1, n_query, Nk) mask from per-row key flags (1 = attend)."""
    keep = torch.tensor(keep_rows, dtype=torch.bool)[:, None, None, :].expand(-1, 1, n_query, -1)
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize(
    "keep, n_query, falls_back",
    [
        ([[0, 1, 1, 1, 1]], 5, True),  # one left-pad token: query 0 sees no key
        ([[0, 0, 1, 1, 1]], 5, True),
        ([[1, 0, 1, 1, 1]], 5, False),  # a gap after the first key: every query sees key 0
        ([[1, 1, 1, 1, 0]], 5, False),  # right padding
        ([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], 5, True),  # one row is enough
        ([[0, 0, 0, 0, 1]], 1, False),  # one new query after a padded past sees key 4
        ([[0, 0, 0, 1, 0]], 1, False),
        ([[0, 0, 0, 0, 1]], 2, True),  # the first of two new queries sees keys 0..3 only
        ([[0, 0, 0, 1, 1]], 2, False),
    ],
)
def test_a_query_with_no_key_falls_back_and_only_it(keep, n_query, falls_back):
    kpm, why = hf_patch._padding_from_mask(hf_mask(keep, n_query), n_query)
    if falls_back:
        assert kpm is None and why == "an attention mask that leaves a query with no key to attend"
    else:
        assert why is None and torch.equal(kpm, torch.tensor(keep, dtype=torch.bool))
    bool_kpm, bool_why = hf_patch._padding_from_mask(hf_mask(keep, n_query) == 0, n_query)
    assert bool_why == why and (bool_kpm is None) == (kpm is None)


def test_mask_check_reasons_and_the_all_visible_mask():
    full = hf_mask([[1, 1, 1]], 3)
    assert hf_patch._padding_from_mask(None, 3) == (None, None)
    assert hf_patch._padding_from_mask(full, 3) == (None, None)  # nothing masked: no mask
    assert "shape" in hf_patch._padding_from_mask(full[:, 0], 3)[1]
    assert "shape" in hf_patch._padding_from_mask(full.expand(-1, 2, -1, -1), 3)[1]
    other = full.clone()
    other[0, 0, 1, 2] = -1.0
    assert hf_patch._padding_from_mask(other, 3) == (
        None,
        "an attention mask with values other than 0 and the dtype's minimum",
    )
    causal = torch.zeros(1, 1, 3, 3).masked_fill(
        torch.ones(3, 3, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min
    )
    assert hf_patch._padding_from_mask(causal, 3) == (
        None,
        "an attention mask that differs between queries",
    )


def test_one_left_pad_token_falls_back_and_matches(calls):
    model = make().eval()
    x = tokens(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 0] = 0
    ref = model(x, attention_mask=mask).logits
    apply_igpt_kernels_to_imagegpt(model)
    close(model(x, attention_mask=mask).logits, ref)
    assert calls["attention"] == 0


def test_fallback_reason_names_each_thing_the_kernel_cannot_do():
    from types import SimpleNamespace

    def attn(**kw):
        plain = dict(is_cross_attention=False, reorder_and_upcast_attn=False, training=False)
        return SimpleNamespace(**{**plain, "attn_dropout": torch.nn.Dropout(0.0), **kw})

    why = hf_patch.fallback_reason
    assert why(attn()) is None and why(attn(training=True)) is None  # no dropout to draw
    assert why(attn(attn_dropout=torch.nn.Dropout(0.1))) is None  # eval: dropout is off
    drop = attn(training=True, attn_dropout=torch.nn.Dropout(0.1))
    assert why(drop) == "attention dropout 0.1 while training"
    assert why(attn(), output_attentions=True).startswith("output_attentions=True")
    assert why(attn(), head_mask=torch.ones(2)) == "a head_mask"
    assert why(attn(is_cross_attention=True)) == "cross-attention"
    assert why(attn(), encoder=torch.zeros(1)) == "cross-attention"
    assert why(attn(reorder_and_upcast_attn=True)) == "reorder_and_upcast_attn=True"


@pytest.mark.parametrize("where", ["ln_2", "mlp", "mlp.c_fc", "mlp.c_proj", "mlp.act"])
@pytest.mark.parametrize("kind", ["hook", "pre-hook"])
def test_mlp_fallback_reason_names_the_hooked_module(where, kind):
    block = make().transformer.h[0]
    module = block.get_submodule(where)
    if kind == "hook":
        handle = module.register_forward_hook(lambda m, i, o: None)
    else:
        handle = module.register_forward_pre_hook(lambda m, i: None)
    try:
        assert mlp_fallback_reason(block) == f"forward hooks on {where}"
    finally:
        handle.remove()
    assert mlp_fallback_reason(block) is None
    block.mlp.c_fc.__class__ = type("Quantized", (type(block.mlp.c_fc),), {})
    assert mlp_fallback_reason(block) == "mlp.c_fc is a Quantized, not transformers' Conv1D"
    block.mlp.c_fc.__class__ = block.mlp.c_proj.__class__
    register = torch.nn.modules.module.register_module_forward_pre_hook
    with register(lambda m, i: None):
        assert mlp_fallback_reason(block) == "global module forward hooks"
    assert mlp_fallback_reason(block) is None
