"""A corpus of bad inputs, tried as a careful user would (issue 16): every one is refused with
an error that names the culprit, and no command ends in a traceback without ``-v``.

Areas: the kernel API (``igpt_kernels``), the model API, the data readers, checkpoints, and
every ``igpt`` command. The command cases run in one Python subprocess that calls
``igpt.cli.main`` for each argument list in turn and reports its exit status and stderr
(``_run_cli``); a few real ``python -m igpt`` runs prove the path end to end. Every file
the cases need (a tiny checkpoint, damaged copies, bad data files) is made once per module.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import igpt_kernels as K
from igpt import IGPT, IGPTConfig
from igpt.checkpoint import load_checkpoint, load_model, save_checkpoint
from igpt.cli import main
from igpt.data import ImageData, check_labels, load_images
from igpt.palette import Palette

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_px=8, n_layer=1, n_head=1, n_embd=32, n_colors=16)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    return env


# ----------------------------------------------------------------------------- files


class _Evil:
    """A pickle that would run a command when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/igpt_pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file the cases read, made once: name -> path (str)."""
    d = tmp_path_factory.mktemp("bad")
    f = {}
    torch.manual_seed(0)
    palette = Palette(torch.rand(16, 3) * 255)
    model = IGPT(IGPTConfig(**TINY))
    f["ckpt"] = d / "tiny.pt"
    save_checkpoint(f["ckpt"], model, palette=palette, objective="ar")
    f["bert"] = d / "bert.pt"
    save_checkpoint(f["bert"], model, palette=palette, objective="bert")
    f["nopal"] = d / "nopal.pt"
    save_checkpoint(f["nopal"], model, objective="ar")
    good = f["ckpt"].read_bytes()
    f["truncated"] = d / "truncated.pt"
    f["truncated"].write_bytes(good[: len(good) // 2])
    f["empty"] = d / "empty.pt"
    f["empty"].write_bytes(b"")
    f["random"] = d / "random.pt"
    f["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["evil"] = d / "evil.pt"
    torch.save({"model": _Evil(), "config": TINY}, f["evil"])
    state = torch.load(f["ckpt"], weights_only=True)
    for key in ("model", "config"):
        f[f"no_{key}"] = d / f"no_{key}.pt"
        torch.save({k: v for k, v in state.items() if k != key}, f[f"no_{key}"])
    f["wrong_weights"] = d / "wrong_weights.pt"  # config says 64 wide, weights are 32
    torch.save({**state, "config": {**state["config"], "n_embd": 64}}, f["wrong_weights"])
    f["empty_run"] = d / "empty_run"
    f["empty_run"].mkdir()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(20) % 2
    f["npz"] = d / "ok.npz"
    np.savez(f["npz"], images=images, labels=labels)
    f["corrupt_npz"] = d / "corrupt.npz"
    f["corrupt_npz"].write_bytes(f["npz"].read_bytes()[:300])
    f["random_npz"] = d / "random.npz"
    f["random_npz"].write_bytes(rng.bytes(2048))
    f["pickled_npz"] = d / "pickled.npz"
    np.savez(f["pickled_npz"], images=np.array([object()], dtype=object))
    f["float_labels"] = d / "float_labels.npz"
    np.savez(f["float_labels"], images=images, labels=labels + 0.7)
    f["neg_labels"] = d / "neg_labels.npz"
    np.savez(f["neg_labels"], images=images, labels=-1 - labels)
    f["no_labels"] = d / "no_labels.npz"
    np.savez(f["no_labels"], images=images)
    f["no_images"] = d / "no_images.npz"
    np.savez(f["no_images"], pixels=images)
    f["float_images"] = d / "float_images.npz"
    np.savez(f["float_images"], images=images / 255.0)
    f["no_classes"] = d / "no_classes"
    f["no_classes"].mkdir()
    f["a_file"] = d / "a_file.txt"
    f["a_file"].write_text("not a folder")
    f["corrupt_palette"] = d / "corrupt_palette.npy"
    f["corrupt_palette"].write_bytes(b"\x93NUMPY garbage")
    f["palette8"] = d / "palette8.npy"
    Palette(torch.rand(8, 3) * 255).save(f["palette8"])
    f["cifar"] = d / "cifar"
    f["cifar"].mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (f["cifar"] / name).write_bytes(b"\x80\x04 damaged")
    return {k: str(v) for k, v in f.items()}


# ----------------------------------------------------------------------------- kernels


def _qkv(d=32, n=8):
    return [torch.randn(1, 2, n, d) for _ in range(3)]


KERNEL_CASES = {
    "attention q 3-d": (lambda q, k, v: K.attention(q[0], k[0], v[0]), ValueError, "q must"),
    "attention int q": (lambda q, k, v: K.attention(q.long(), k, v), TypeError, "q must"),
    "attention k shape": (lambda q, k, v: K.attention(q, k[:, :1], v), ValueError, "k and v"),
    "attention dtypes mixed": (lambda q, k, v: K.attention(q, k.half(), v), TypeError, "k must"),
    "attention sm_scale nan": (
        lambda q, k, v: K.attention(q, k, v, sm_scale=math.nan),
        ValueError,
        "sm_scale",
    ),
    "attention sm_scale -1": (
        lambda q, k, v: K.attention(q, k, v, sm_scale=-1.0),
        ValueError,
        "sm_scale",
    ),
    "attention sm_scale str": (
        lambda q, k, v: K.attention(q, k, v, sm_scale="a"),
        TypeError,
        "sm_scale",
    ),
    "attention backend": (lambda q, k, v: K.attention(q, k, v, backend="cuda"), ValueError, "cuda"),
    "attention mask shape": (
        lambda q, k, v: K.attention(q, k, v, key_padding_mask=torch.ones(1, 7, dtype=torch.bool)),
        ValueError,
        "key_padding_mask",
    ),
    "attention mask float": (
        lambda q, k, v: K.attention(q, k, v, key_padding_mask=torch.ones(1, 8)),
        TypeError,
        "key_padding_mask",
    ),
    "attention devices": (lambda q, k, v: K.attention(q.to("meta"), k, v), ValueError, "meta"),
}


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_attention_refuses(case):
    call, kind, words = KERNEL_CASES[case]
    with pytest.raises(kind, match=words):
        call(*_qkv())


def test_attention_refuses_an_infinite_sm_scale():
    with pytest.raises(ValueError, match="sm_scale"):
        K.attention(*_qkv(), sm_scale=math.inf)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_attention_propagates_nan_like_pytorch(backend):
    q, k, v = _qkv()
    q[0, 0, 3, 0] = math.nan
    out = K.attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 0, 3]).all()  # torch's SDPA: the row of a NaN query is NaN
    assert not torch.isnan(out[0, 1]).any()  # and nothing else


def test_reference_attention_takes_any_head_dim():
    q, k, v = _qkv(d=48)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(K.attention(q, k, v, backend="torch"), ref)


def _mlp(d=32, h=64):
    return dict(
        x=torch.randn(2, 4, d),
        norm_weight=torch.ones(d),
        norm_bias=None,  # the default norm is RMS, which has none
        fc_weight=torch.randn(h, d),
        fc_bias=torch.zeros(h),
        proj_weight=torch.randn(d, h),
        proj_bias=torch.zeros(d),
    )


LN_MLP_CASES = {
    "x int": ({"x": torch.zeros(2, 4, 32, dtype=torch.long)}, {}, TypeError, "x"),
    "fc_weight shape": ({"fc_weight": torch.randn(64, 31)}, {}, ValueError, "fc_weight"),
    "proj_weight shape": ({"proj_weight": torch.randn(31, 64)}, {}, ValueError, "proj_weight"),
    "norm_weight shape": ({"norm_weight": torch.ones(31)}, {}, ValueError, "norm_weight"),
    "fc_weight dtype": ({"fc_weight": torch.randn(64, 32).half()}, {}, TypeError, "fc_weight"),
    "norm": ({}, {"norm": "batch"}, ValueError, "norm"),
    "activation": ({}, {"activation": "relu6"}, ValueError, "activation"),
    "backend": ({}, {"backend": "gpu"}, ValueError, "backend"),
    "eps negative": ({}, {"eps": -1.0}, ValueError, "eps"),
}


@pytest.mark.parametrize("case", sorted(LN_MLP_CASES))
def test_ln_mlp_refuses(case):
    change, kw, kind, words = LN_MLP_CASES[case]
    with pytest.raises(kind, match=words):
        K.ln_mlp(**{**_mlp(), **change}, **kw)


PALETTE = torch.rand(16, 3) * 255
PIXELS = torch.randint(0, 256, (4, 3), dtype=torch.uint8)
QUANTIZE_CASES = {
    "quantize float pixels": (lambda: K.quantize(PIXELS.float(), PALETTE), TypeError, "pixels"),
    "quantize 4 channels": (
        lambda: K.quantize(torch.zeros(4, 4, dtype=torch.uint8), PALETTE),
        ValueError,
        "pixels",
    ),
    "quantize numpy": (lambda: K.quantize(PIXELS.numpy(), PALETTE), TypeError, "pixels"),
    "quantize palette (K, 4)": (
        lambda: K.quantize(PIXELS, torch.rand(16, 4)),
        ValueError,
        "palette",
    ),
    "quantize empty palette": (lambda: K.quantize(PIXELS, torch.rand(0, 3)), ValueError, "palette"),
    "quantize nan palette": (
        lambda: K.quantize(PIXELS, torch.full((16, 3), math.nan)),
        ValueError,
        "palette",
    ),
    "quantize backend": (lambda: K.quantize(PIXELS, PALETTE, backend="x"), ValueError, "backend"),
    "dequantize too large": (lambda: K.dequantize(torch.tensor([16]), PALETTE), ValueError, "16"),
    "dequantize negative": (lambda: K.dequantize(torch.tensor([-1]), PALETTE), ValueError, "-1"),
    "dequantize float": (lambda: K.dequantize(torch.tensor([1.5]), PALETTE), TypeError, "tokens"),
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_CASES))
def test_palette_ops_refuse(case):
    call, kind, words = QUANTIZE_CASES[case]
    with pytest.raises(kind, match=words):
        call()


def test_dequantize_takes_uint16_tokens():
    tokens = torch.tensor([1, 15], dtype=torch.uint16)  # the token cache's own dtype
    assert torch.equal(K.dequantize(tokens, PALETTE), K.dequantize(tokens.long(), PALETTE))


# ----------------------------------------------------------------------------- model

CONFIG_CASES = {
    "n_embd not divisible": (dict(n_embd=30, n_head=4), "divisible"),
    "n_layer 0": (dict(n_layer=0), "n_layer"),
    "n_px 0": (dict(n_px=0), "n_px"),
    "n_head 0": (dict(n_head=0), "n_head"),
    "n_colors 0": (dict(n_colors=0), "n_colors"),
    "norm": (dict(norm="batch"), "norm"),
    "activation": (dict(activation="relu6"), "activation"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_refuses(case):
    change, words = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=words):
        IGPTConfig(**{**TINY, **change})


@pytest.mark.parametrize(
    "change", [dict(bias="no"), dict(eps=math.nan), dict(eps=-1.0), dict(n_px=2.5)]
)
def test_config_type_checks_every_field(change):
    with pytest.raises((TypeError, ValueError), match=next(iter(change))):
        IGPTConfig(**{**TINY, **change})


def test_one_colour_limit_for_palettes_and_models():
    """Palettes and models share one limit, MAX_COLORS = 65,536 colours: both take it, both
    refuse one more (the model's start-of-sequence id is never stored in the palette's
    uint16 token files, so the vocabulary of 65,537 is fine)."""
    from igpt.config import MAX_COLORS
    from igpt.palette import fit_palette

    assert MAX_COLORS == 65536
    palette = Palette(torch.rand(MAX_COLORS, 3) * 255)
    assert len(palette) == MAX_COLORS
    config = IGPTConfig(**{**TINY, "n_colors": len(palette)})
    assert config.n_colors == MAX_COLORS and config.vocab_size == MAX_COLORS + 1
    with pytest.raises(ValueError, match=f"1 <= K <= {MAX_COLORS}"):
        Palette(torch.rand(MAX_COLORS + 1, 3) * 255)
    with pytest.raises(ValueError, match=f"n_colors must be at most {MAX_COLORS}"):
        IGPTConfig(**{**TINY, "n_colors": MAX_COLORS + 1})
    with pytest.raises(ValueError, match=rf"k must be an int in \[1, {MAX_COLORS}\]"):
        fit_palette(np.zeros((4, 8, 8, 3), np.uint8), k=MAX_COLORS + 1)


@pytest.fixture(scope="module")
def tiny_model():
    return IGPT(IGPTConfig(**TINY)).eval()


MODEL_CASES = {
    "tokens too large": (lambda m: m(torch.full((1, 64), 16)), ValueError, "n_colors"),
    "tokens negative": (lambda m: m(torch.full((1, 64), -1)), ValueError, "n_colors"),
    "tokens float": (lambda m: m(torch.zeros(1, 64)), TypeError, "tokens"),
    "tokens 1-d": (lambda m: m(torch.zeros(64, dtype=torch.long)), TypeError, "tokens"),
    "tokens too long": (lambda m: m(torch.zeros(1, 65, dtype=torch.long)), ValueError, "n_px"),
    "bert_mask shape": (
        lambda m: m(torch.zeros(1, 64, dtype=torch.long), torch.zeros(1, 63, dtype=torch.bool)),
        ValueError,
        "bert_mask",
    ),
    "generate n 0": (lambda m: m.generate(0), ValueError, "n must"),
    "generate temperature -1": (lambda m: m.generate(1, temperature=-1.0), ValueError, "temper"),
    "generate temperature nan": (
        lambda m: m.generate(1, temperature=math.nan),
        ValueError,
        "temper",
    ),
    "generate top_k 0": (lambda m: m.generate(1, top_k=0), ValueError, "top_k"),
    "generate top_p 1.5": (lambda m: m.generate(1, top_p=1.5), ValueError, "top_p"),
    "unknown size": (lambda m: IGPTConfig.from_name("igpt-huge"), ValueError, "igpt-huge"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_refuses(case, tiny_model):
    call, kind, words = MODEL_CASES[case]
    with pytest.raises(kind, match=words):
        call(tiny_model)


# ----------------------------------------------------------------------------- data readers

READER_CASES = {
    "npz missing": ("npz:{d}/missing.npz", FileNotFoundError, "missing.npz"),
    "npz truncated": ("npz:{corrupt_npz}", ValueError, "corrupt.npz"),
    "npz random bytes": ("npz:{random_npz}", ValueError, "random.npz"),
    "npz of pickled objects": ("npz:{pickled_npz}", ValueError, "pickled.npz"),
    "npz float labels": ("npz:{float_labels}", ValueError, "float_labels.npz.*20 of 20.*whole"),
    "npz negative labels": ("npz:{neg_labels}", ValueError, "neg_labels.npz.*20 of 20.*negative"),
    "npz without images": ("npz:{no_images}", ValueError, "no_images.npz.*'images'"),
    "npz float images": ("npz:{float_images}", ValueError, "float_images.npz.*uint8"),
    "folder missing": ("folder:{d}/nowhere", FileNotFoundError, "nowhere"),
    "folder without classes": ("folder:{no_classes}", FileNotFoundError, "no_classes"),
    "folder that is a file": ("folder:{a_file}", FileNotFoundError, "a_file"),
    "cifar missing": ("cifar10:{d}/nowhere", FileNotFoundError, "nowhere"),
    "cifar damaged": ("cifar10:{cifar}", ValueError, "data_batch_1"),
    "unknown spec": ("mnist", ValueError, "mnist"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_readers_refuse_naming_the_file(case, files):
    spec, kind, words = READER_CASES[case]
    with pytest.raises(kind, match=words):
        load_images(spec.format(d=Path(files["npz"]).parent, **files), "all")


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    (tmp_path / "a").mkdir()
    grey16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "a" / "x.png")
    assert Image.open(tmp_path / "a" / "x.png").mode.startswith("I")  # really 16 bits
    data = load_images(f"folder:{tmp_path}", "all")
    assert data.images[0, 0].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]


def test_8_bit_images_read_as_before(tmp_path):
    (tmp_path / "a").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a" / "x.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "a" / "y.png")  # 8-bit grey: "L"
    data = load_images(f"folder:{tmp_path}", "all")
    assert np.array_equal(data.images[0], rgb)
    assert np.array_equal(data.images[1], np.repeat(rgb[..., :1], 3, axis=-1))


@pytest.mark.parametrize(
    "labels, words",
    [
        ([0, 1, 3.7], "1 of 3 labels are not whole numbers"),
        ([0.5, 1.5, 2.0], "2 of 3 labels are not whole numbers"),
        ([0, math.nan, 1], "1 of 3 labels are not whole"),
        ([-1, -1, -2], "3 of 3 labels are negative"),
        ([0, 1, -1], "1 of 3 labels are negative"),
    ],
)
def test_labels_are_refused_not_truncated(labels, words):
    with pytest.raises(ValueError, match=words):
        check_labels(np.array(labels))
    images = np.zeros((3, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match=words):
        ImageData(images, np.array(labels))


def test_whole_float_labels_pass_and_strings_do_not():
    assert check_labels(np.array([0.0, 2.0])).tolist() == [0, 2]
    assert check_labels(np.array([0.0, 2.0])).dtype == np.int64
    with pytest.raises(TypeError, match="labels"):
        check_labels(np.array(["cat", "dog"]))


@pytest.mark.parametrize("labels", [[0, 1, 3.7] * 4, [-1, 0] * 6])
def test_probe_and_finetune_refuse_bad_labels(labels, tiny_model):
    from igpt.finetune import IGPTClassifier, evaluate
    from igpt.probe import linear_probe

    x = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(ValueError, match="labels.*(whole|negative)"):
        linear_probe(x, np.array(labels), x, np.array(labels))
    clf = IGPTClassifier(tiny_model, n_classes=2)
    with pytest.raises(ValueError, match="labels.*(whole|negative)"):
        evaluate(clf, torch.zeros(12, 64, dtype=torch.long), np.array(labels))


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_CASES = {
    "truncated": "truncated",
    "empty": "empty",
    "random bytes": "random",
    "malicious pickle": "evil",
    "without model": "no_model",
    "without config": "no_config",
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoints_that_are_not_are_refused_naming_the_file(case, files):
    path = files[CHECKPOINT_CASES[case]]
    with pytest.raises(ValueError, match=Path(path).name) as e:
        load_checkpoint(path)
    assert len(str(e.value).splitlines()) == 1
    assert not Path("/tmp/igpt_pwned").exists()


def test_weights_that_do_not_fit_the_config_are_refused(files):
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|wrong_weights"):
        load_model(files["wrong_weights"])


# ----------------------------------------------------------------------------- the command

RUNNER = r"""
import contextlib, io, json, logging, sys, traceback
from igpt.cli import main
results = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    logging.getLogger().handlers.clear()  # basicConfig binds to the stderr of the case
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:  # what the interpreter would do with it
            code = 1 if isinstance(e.code, str) else (e.code or 0)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = "uncaught"
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _run_cli(cases: list[list[str]]) -> list[dict]:
    """Run ``igpt.cli.main(argv)`` for each argv in one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# (argv, words the one error line must hold); {name} is a path from `files`, {out} a
# fresh output folder. Every argv is refused without reading more than it must.
CLI_CASES = [
    # info, bench
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "no_such_bench"], "no_such_bench"),
    # fit-palette
    (["fit-palette", "--k", "0"], "--k: must be an integer >= 1"),
    (["fit-palette", "--k", "-5"], "--k: must be an integer >= 1"),
    (["fit-palette", "--k", "many"], "--k: expects an integer"),
    (["fit-palette", "--sample", "0"], "--sample"),
    (["fit-palette", "--n-px", "0"], "--n-px"),
    (["fit-palette", "--seed", "-1"], "--seed"),
    (["fit-palette", "--device", "tpu"], "--device 'tpu'"),
    (["fit-palette", "--data", "mnist"], "mnist"),
    (["fit-palette", "--data", "npz:{corrupt_npz}"], "corrupt.npz"),
    (["fit-palette", "--data", "npz:{random_npz}"], "random.npz"),
    (["fit-palette", "--data", "folder:{out}/nowhere"], "nowhere"),
    (["fit-palette", "--data", "folder:{no_classes}"], "no_classes"),
    (["fit-palette", "--data", "cifar10:{cifar}"], "data_batch_1"),
    (["fit-palette", "--data", "npz:{pickled_npz}"], "pickled.npz"),
    (["fit-palette", "--data", "npz:{float_images}"], "float_images.npz"),
    (["fit-palette", "--data", "npz:{npz}", "--k", "70000", "--out", "{out}/p.npy"], "70000"),
    (["fit-palette", "--data", "npz:{npz}", "--k", "4", "--out", "{a_file}/p.npy"], "a_file"),
    # pretrain
    (["pretrain", "--steps", "0"], "--steps"),
    (["pretrain", "--steps", "-1"], "--steps"),
    (["pretrain", "--batch-size", "0"], "--batch-size"),
    (["pretrain", "--grad-accum", "0"], "--grad-accum"),
    (["pretrain", "--lr", "inf"], "--lr: must be a finite number"),
    (["pretrain", "--lr", "nan"], "--lr: must be a finite number"),
    (["pretrain", "--lr", "-1"], "--lr"),
    (["pretrain", "--lr", "0"], "--lr"),
    (["pretrain", "--val-frac", "1.5"], "--val-frac"),
    (["pretrain", "--mask-prob", "0"], "--mask-prob"),
    (["pretrain", "--weight-decay", "-1"], "--weight-decay"),
    (["pretrain", "--betas", "0.9", "nan"], "--betas"),
    (["pretrain", "--n-px", "0"], "--n-px"),
    (["pretrain", "--objective", "gpt"], "--objective"),
    (["pretrain", "--device", "tpu"], "--device 'tpu'"),
    (["pretrain", "--device", "cuda:x"], "--device 'cuda:x'"),
    (["pretrain", "--data", "npz:{corrupt_npz}", "--out", "{out}"], "corrupt.npz"),
    (["pretrain", "--checkpoint", "{truncated}", "--out", "{out}"], "truncated.pt"),
    (["pretrain", "--checkpoint", "{evil}", "--out", "{out}"], "evil.pt"),
    (["pretrain", "--checkpoint", "{no_model}", "--out", "{out}"], "no_model.pt"),
    (["pretrain", "--checkpoint", "{wrong_weights}", "--out", "{out}"], "wrong_weights.pt"),
    (["pretrain", "--palette", "{palette8}", "--n-colors", "16", "--out", "{out}"], "palette8.npy"),
    (["pretrain", "--out", "{a_file}/sub", "--data", "npz:{npz}", "--n-px", "8"], "a_file"),
    (["pretrain", "--model", "igpt-huge", "--out", "{out}"], "igpt-huge"),
    # probe
    (["probe", "--checkpoint", "{ckpt}", "--per-class", "-1"], "--per-class"),
    (["probe", "--checkpoint", "{ckpt}", "--per-class", "0"], "--per-class"),
    (["probe", "--checkpoint", "{ckpt}", "--per-class", "4,x"], "--per-class"),
    (["probe", "--checkpoint", "{ckpt}", "--subsets", "0"], "--subsets"),
    (["probe", "--checkpoint", "{ckpt}", "--concat", "-1"], "--concat"),
    (["probe", "--checkpoint", "{ckpt}", "--cs", "0"], "--cs"),
    (["probe", "--checkpoint", "{ckpt}", "--cs", "nan,1"], "--cs"),
    (["probe", "--checkpoint", "{ckpt}", "--cs", "abc"], "--cs"),
    (["probe", "--checkpoint", "{ckpt}", "--bert-masks", "0"], "--bert-masks"),
    (["probe", "--checkpoint", "{ckpt}", "--limit", "0"], "--limit"),
    (["probe", "--checkpoint", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["probe", "--checkpoint", "{ckpt}", "--layers", "x"], "--layers"),
    (["probe", "--checkpoint", "{ckpt}", "--device", "tpu"], "--device 'tpu'"),
    (["probe", "--out", "{out}"], "needs --checkpoint"),
    (["probe", "--checkpoint", "{out}/missing.pt"], "missing.pt"),
    (["probe", "--checkpoint", "{empty_run}"], "empty_run"),
    (["probe", "--checkpoint", "{truncated}", "--out", "{out}"], "truncated.pt"),
    (["probe", "--checkpoint", "{empty}", "--out", "{out}"], "empty.pt"),
    (["probe", "--checkpoint", "{random}", "--out", "{out}"], "random.pt"),
    (["probe", "--checkpoint", "{evil}", "--out", "{out}"], "evil.pt"),
    (["probe", "--checkpoint", "{no_model}", "--out", "{out}"], "no_model.pt"),
    (["probe", "--checkpoint", "{no_config}", "--out", "{out}"], "no_config.pt"),
    (["probe", "--checkpoint", "{wrong_weights}", "--out", "{out}"], "wrong_weights.pt"),
    (
        [
            "probe",
            "--checkpoint",
            "{ckpt}",
            "--cache-dir",
            "{a_file}/c",
            "--data",
            "npz:{npz}",
            "--out",
            "{out}",
        ],
        "a_file",
    ),  # fmt: skip
    (["probe", "--checkpoint", "{ckpt}", "--limit", "1", "--out", "{out}"], "two classes"),
    (["probe", "--checkpoint", "{nopal}", "--out", "{out}"], "nopal.pt"),
    (["probe", "--checkpoint", "{ckpt}", "--data", "npz:{neg_labels}", "--out", "{out}"], "neg"),
    (["probe", "--checkpoint", "{ckpt}", "--data", "npz:{float_labels}", "--out", "{out}"], "flo"),
    (["probe", "--checkpoint", "{ckpt}", "--data", "npz:{no_labels}", "--out", "{out}"], "labels"),
    (
        [
            "probe",
            "--checkpoint",
            "{ckpt}",
            "--layers",
            "9",
            "--out",
            "{out}",
            "--data",
            "npz:{npz}",
        ],
        "layer 9",
    ),  # fmt: skip
    # finetune
    (["finetune", "--checkpoint", "{ckpt}", "--steps", "0"], "--steps"),
    (["finetune", "--checkpoint", "{ckpt}", "--lr", "inf"], "--lr"),
    (["finetune", "--checkpoint", "{ckpt}", "--lr", "0"], "--lr"),
    (["finetune", "--checkpoint", "{ckpt}", "--lr", "-0.1"], "--lr"),
    (["finetune", "--checkpoint", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["finetune", "--checkpoint", "{ckpt}", "--patience", "0"], "--patience"),
    (["finetune", "--checkpoint", "{ckpt}", "--eval-every", "0"], "--eval-every"),
    (["finetune", "--checkpoint", "{ckpt}", "--n-masks", "0"], "--n-masks"),
    (["finetune", "--checkpoint", "{ckpt}", "--betas", "1", "2"], "--betas"),
    (["finetune", "--checkpoint", "{ckpt}", "--weight-decay", "-1"], "--weight-decay"),
    (["finetune", "--checkpoint", "{ckpt}", "--grad-clip", "-1"], "--grad-clip"),
    (["finetune", "--checkpoint", "{ckpt}", "--mask-prob", "2"], "--mask-prob"),
    (["finetune", "--checkpoint", "{ckpt}", "--seed", "-1"], "--seed"),
    (["finetune", "--checkpoint", "{ckpt}", "--limit", "0"], "--limit"),
    (["finetune", "--out", "{out}"], "needs --checkpoint"),
    (
        ["finetune", "--checkpoint", "{ckpt}", "--out", "{a_file}", "--data", "npz:{npz}"],
        "a_file.txt: it is a file where a directory is needed",
    ),  # fmt: skip
    (
        [
            "finetune",
            "--checkpoint",
            "{ckpt}",
            "--limit",
            "1",
            "--data",
            "npz:{npz}",
            "--out",
            "{out}",
        ],
        "n_classes",
    ),  # fmt: skip
    (["finetune", "--checkpoint", "{truncated}", "--out", "{out}"], "truncated.pt"),
    (["finetune", "--checkpoint", "{ckpt}", "--data", "npz:{neg_labels}", "--out", "{out}"], "neg"),
    (
        [
            "finetune",
            "--checkpoint",
            "{ckpt}",
            "--data",
            "npz:{npz}",
            "--layer",
            "9",
            "--out",
            "{out}",
        ],
        "layer 9",
    ),  # fmt: skip
    # sample
    (["sample", "--checkpoint", "{ckpt}", "--n", "0"], "--n: must be an integer >= 1"),
    (["sample", "--checkpoint", "{ckpt}", "--n", "-3"], "--n"),
    (["sample", "--checkpoint", "{ckpt}", "--temperature", "-1"], "--temperature"),
    (["sample", "--checkpoint", "{ckpt}", "--temperature", "nan"], "--temperature"),
    (["sample", "--checkpoint", "{ckpt}", "--top-k", "0"], "--top-k"),
    (["sample", "--checkpoint", "{ckpt}", "--top-p", "0"], "--top-p"),
    (["sample", "--checkpoint", "{ckpt}", "--top-p", "1.5"], "--top-p"),
    (["sample", "--checkpoint", "{ckpt}", "--scale", "0"], "--scale"),
    (["sample", "--checkpoint", "{ckpt}", "--rows", "-1"], "--rows"),
    (["sample", "--checkpoint", "{ckpt}", "--n-samples", "0"], "--n-samples"),
    (["sample", "--checkpoint", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["sample", "--checkpoint", "{ckpt}", "--device", "tpu"], "--device 'tpu'"),
    (["sample", "--n", "1"], "needs --checkpoint"),
    (["sample", "--checkpoint", "{truncated}", "--n", "1", "--out", "{out}/x.png"], "truncated.pt"),
    (["sample", "--checkpoint", "{empty}", "--n", "1", "--out", "{out}/x.png"], "empty.pt"),
    (["sample", "--checkpoint", "{random}", "--n", "1", "--out", "{out}/x.png"], "random.pt"),
    (["sample", "--checkpoint", "{evil}", "--n", "1", "--out", "{out}/x.png"], "evil.pt"),
    (["sample", "--checkpoint", "{no_model}", "--n", "1", "--out", "{out}/x.png"], "no_model.pt"),
    (["sample", "--checkpoint", "{no_config}", "--n", "1", "--out", "{out}/x.png"], "no_config"),
    (["sample", "--checkpoint", "{bert}", "--n", "1", "--out", "{out}/x.png"], "BERT"),
    (["sample", "--checkpoint", "{nopal}", "--n", "1", "--out", "{out}/x.png"], "--palette"),
    (["sample", "--checkpoint", "{ckpt}", "--palette", "{palette8}", "--n", "1"], "8 colours"),
    (
        ["sample", "--checkpoint", "{ckpt}", "--palette", "{corrupt_palette}", "--n", "1"],
        "corrupt_palette.npy",
    ),  # fmt: skip
    (["sample", "--checkpoint", "{ckpt}", "--palette", "{out}/none.npy", "--n", "1"], "none.npy"),
    (["sample", "--checkpoint", "{ckpt}", "--n", "1", "--out", "{a_file}/x.png"], "a_file"),
    (
        [
            "sample",
            "--checkpoint",
            "{ckpt}",
            "--n",
            "1",
            "--out",
            "{out}/x.png",
            "--tokens-out",
            "{a_file}/t.npy",
        ],
        "a_file",
    ),  # fmt: skip
    (
        ["sample", "--checkpoint", "{wrong_weights}", "--n", "1", "--out", "{out}/x.png"],
        "wrong_weights.pt",
    ),  # fmt: skip
    (["sample", "--checkpoint", "{ckpt}", "--split", "val", "--data", "digits", "--n", "1"], "val"),
    (
        [
            "sample",
            "--checkpoint",
            "{ckpt}",
            "--rows",
            "99",
            "--data",
            "npz:{npz}",
            "--n",
            "1",
            "--out",
            "{out}/x.png",
        ],
        "rows",
    ),  # fmt: skip
    (
        [
            "sample",
            "--checkpoint",
            "{ckpt}",
            "--data",
            "npz:{corrupt_npz}",
            "--n",
            "1",
            "--out",
            "{out}/x.png",
        ],
        "corrupt.npz",
    ),  # fmt: skip
    # demo
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--lr", "inf"], "--lr"),
    (["demo", "--per-class", "-1"], "--per-class"),
    (["demo", "--limit", "0"], "--limit"),
    (["demo", "--n-px", "0"], "--n-px"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--device", "tpu"], "--device 'tpu'"),
    (["demo", "--data", "npz:{corrupt_npz}", "--out", "{out}"], "corrupt.npz"),
    (["demo", "--model", "igpt-huge", "--out", "{out}"], "igpt-huge"),
    (["demo", "--out", "{a_file}"], "a_file"),
    # plan
    (["plan", "--batch-size", "0", "--memory", "40GiB"], "--batch-size"),
    (["plan", "--batch-size", "8", "--memory", "lots"], "--memory"),
    (["plan", "--batch-size", "8", "--memory", "0"], "--memory"),
    (["plan", "--batch-size", "8", "--memory", "40GiB", "--gpus", "0"], "--gpus"),
    (["plan", "--batch-size", "8", "--memory", "40GiB", "--n-px", "0"], "--n-px"),
    (["plan", "--batch-size", "8", "--memory", "40GiB", "--model", "igpt-huge"], "--model"),
    (["plan", "--batch-size", "8"], "--memory"),
]


@pytest.fixture(scope="module")
def cli_results(files, tmp_path_factory):
    """The outcome of every CLI case, run in one interpreter: {case id: (argv, words, out)}."""
    root = tmp_path_factory.mktemp("cli")
    cases = []
    for i, (argv, words) in enumerate(CLI_CASES):
        out = str(root / f"out{i}")
        cases.append(([a.format(out=out, **files) for a in argv], words))
    outcomes = _run_cli([argv for argv, _ in cases])
    return {" ".join(CLI_CASES[i][0]): (*cases[i], outcomes[i]) for i in range(len(cases))}


def _assert_one_line_error(argv, words, outcome):
    err = outcome["stderr"]
    assert outcome["code"] not in (0, "uncaught"), f"{argv}: exit {outcome['code']}\n{err}"
    assert "Traceback" not in err, f"{argv}:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith(f"igpt {argv[0]}:"), f"{argv}:\n{err}"
    assert words in last, f"{argv}: {words!r} not in the error line:\n{err}"
    errors = [line for line in lines if line.startswith("igpt ")]
    assert errors == [last], f"{argv}: more than one error line:\n{err}"


@pytest.mark.parametrize("case", [" ".join(argv) for argv, _ in CLI_CASES])
def test_cli_refuses_in_one_line(case, cli_results):
    argv, words, outcome = cli_results[case]
    _assert_one_line_error(argv, words, outcome)


def test_a_damaged_palette_file_of_pretrain_is_named(files, tmp_path):
    argv = ["pretrain", "--palette", files["corrupt_palette"], "--out", str(tmp_path)]
    (outcome,) = _run_cli([argv])
    _assert_one_line_error(argv, "corrupt_palette.npy", outcome)


def test_flags_are_refused_before_anything_is_read(cli_results):
    # argparse's status 2 means the parser refused it: no checkpoint or data was opened
    for case in (
        "probe --checkpoint {ckpt} --per-class -1",
        "pretrain --lr inf",
        "sample --checkpoint {ckpt} --n 0",
    ):
        assert cli_results[case][2]["code"] == 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, files):
    """A finished two-step pre-training run (igpt-tiny, 8x8) and a copy whose latest
    checkpoint holds another architecture."""
    from igpt.train import TrainConfig, pretrain

    root = tmp_path_factory.mktemp("runs")
    run = root / "run"
    torch.manual_seed(0)
    cfg = TrainConfig(
        data=f"npz:{files['npz']}", n_px=8, n_colors=8, steps=2, batch_size=4, ckpt_every=1,
        val_every=0, out=str(run), progress=False, cache_dir=str(root / "cache"),
    )  # fmt: skip
    pretrain(cfg)
    other = root / "other"
    shutil.copytree(run, other)
    latest = sorted(other.glob("ckpt_*.pt"))[-1]
    state = torch.load(latest, weights_only=True)
    small = IGPT(IGPTConfig(**{**TINY, "n_colors": 8}))
    state.update(model=small.state_dict(), config=small.config.to_dict())
    torch.save(state, latest)
    return {"run": str(run), "other": str(other), "cfg": cfg}


def test_resume_refusals_are_one_line(run_dir, files):
    common = ["--data", f"npz:{files['npz']}", "--n-px", "8", "--n-colors", "8", "--steps", "2"]
    common += [
        "--batch-size",
        "4",
        "--no-progress",
        "--cache-dir",
        str(Path(run_dir["run"]).parent),
    ]
    cases = [
        (["pretrain", *common, "--resume", "--out", run_dir["other"]], "architecture"),
        (["pretrain", *common, "--resume", "--out", run_dir["run"], "--model", "igpt-s"], "model"),
    ]
    for (argv, words), outcome in zip(cases, _run_cli([c for c, _ in cases]), strict=True):
        _assert_one_line_error(argv, words, outcome)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["sample", "--checkpoint", "{truncated}", "--n", "1", "--out", "{out}/x.png"],
            "truncated",
        ),
        (["probe", "--checkpoint", "{ckpt}", "--per-class", "-1"], "--per-class"),
        (["pretrain", "--lr", "inf"], "--lr"),
        (["fit-palette", "--data", "npz:{corrupt_npz}", "--out", "{out}/p.npy"], "corrupt.npz"),
    ],
)
@pytest.mark.slow
def test_python_dash_m_igpt_fails_in_one_line(argv, words, files, tmp_path):
    argv = [a.format(out=tmp_path, **files) for a in argv]
    done = subprocess.run(
        [sys.executable, "-m", "igpt", *argv], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    _assert_one_line_error(argv, words, {"code": done.returncode, "stderr": done.stderr})
    assert done.returncode in (1, 2)


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line_and_status_130(files, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", f"npz:{files['npz']}", "--n-px", "8", "--n-colors", "8"]
    argv += ["--steps", "100000", "--batch-size", "4", "--out", str(out), "--no-progress"]
    argv += ["--log-every", "1", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "igpt", *argv], stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        for _ in range(240):  # until the first step is logged: Ctrl-C hits a running step
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "igpt pretrain: interrupted" and "Traceback" not in err


def test_dash_v_after_the_command_shows_the_traceback(files, tmp_path):
    argv = [
        "sample",
        "--checkpoint",
        files["truncated"],
        "--n",
        "1",
        "--out",
        str(tmp_path / "x.png"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "igpt", *argv, "-v"], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 1 and "Traceback" in done.stderr and "truncated.pt" in done.stderr


# ----------------------------------------------------------------------------- in-process


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    from igpt.commands import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["info"])
    assert e.value.code == 130
    assert capsys.readouterr().err == "igpt info: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        main(["info", "-v"])


@pytest.mark.parametrize(
    "error, words",
    [
        (
            PermissionError(13, "Permission denied", "/data/out.png"),
            "cannot use /data/out.png: Permission denied; check the path and its permissions",
        ),  # fmt: skip
        (OSError(28, "No space left on device", "/data/ckpt.pt"), "No space left on device"),
        (IsADirectoryError(21, "Is a directory", "/data"), "cannot use /data: Is a directory"),
        (ValueError("first line\nsecond line"), "first line  (-v"),
    ],
)
def test_os_errors_are_one_line(error, words, monkeypatch):
    from igpt.commands import info

    def fails(args):
        raise error

    monkeypatch.setattr(info, "run", fails)
    with pytest.raises(SystemExit) as e:
        main(["info"])
    assert isinstance(e.value.code, str) and words in e.value.code
    assert "\n" not in e.value.code


def test_out_of_gpu_memory_is_one_line(monkeypatch):
    from igpt.commands import info

    def fails(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(info, "run", fails)
    with pytest.raises(SystemExit, match="out of GPU memory; lower --batch-size"):
        main(["info"])


def test_bugs_keep_their_traceback(monkeypatch):
    from igpt.commands import info

    def buggy(args):
        return {}["missing"]

    monkeypatch.setattr(info, "run", buggy)
    with pytest.raises(KeyError):
        main(["info"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
def test_permission_denied_out_is_one_line(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    argv = ["sample", "--checkpoint", files["ckpt"], "--n", "1", "--out", str(locked / "x.png")]
    (outcome,) = _run_cli([argv])
    _assert_one_line_error(argv, "Permission denied", outcome)


def test_unreadable_pickles_run_nothing(files):
    assert not Path("/tmp/igpt_pwned").exists()
    with zipfile.ZipFile(files["evil"]) as z:  # the file really holds the os.system call
        data = next(n for n in z.namelist() if n.endswith("data.pkl"))
        assert b"system" in z.read(data)


# ----------------------------------------------------------------------- a first hour (issue 26)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16])
def test_every_integer_token_dtype_gives_int64s_logits(dtype, tiny_model):
    tokens = torch.randint(0, 16, (2, 64))
    with torch.no_grad():
        want = tiny_model(tokens)
        got = tiny_model(tokens.to(dtype))
        bert = torch.rand(2, 64) < 0.5
        torch.testing.assert_close(tiny_model(tokens.to(dtype), bert), tiny_model(tokens, bert))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _nonfinite_copy(model, name="transformer.h.0.mlp.c_fc.weight"):
    bad = IGPT(model.config)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.get_parameter(name)[0, 0] = math.nan
    return bad.eval()


def test_generate_names_non_finite_weights(tiny_model):
    bad = _nonfinite_copy(tiny_model)
    with pytest.raises(ValueError, match=r"non-finite weights .*h\.0\.mlp\.c_fc\.weight"):
        bad.generate(2, seed=0)
    tiny_model.generate(1, seed=0)  # the finite model samples as before


def test_sample_names_the_checkpoint_with_non_finite_weights(files, tmp_path, tiny_model):
    ckpt = tmp_path / "nan.pt"
    palette = Palette(torch.rand(16, 3) * 255)
    save_checkpoint(ckpt, _nonfinite_copy(tiny_model), palette=palette, objective="ar")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(ckpt), "--n", "2", "--out", str(tmp_path / "s.png")])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert str(ckpt) in e.value.code and "non-finite weights" in e.value.code
    assert not (tmp_path / "s.png").exists()


def test_a_palette_that_does_not_fit_the_model_is_refused_naming_both_sizes(tmp_path):
    ckpt = tmp_path / "pal8.pt"
    save_checkpoint(ckpt, IGPT(IGPTConfig(**TINY)), palette=Palette(torch.rand(8, 3) * 255))
    with pytest.raises(ValueError, match=r"pal8\.pt.*8 colours.*n_colors=16"):
        load_model(ckpt)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(ckpt), "--n", "1", "--out", str(tmp_path / "s.png")])
    assert "8 colours" in e.value.code and "n_colors=16" in e.value.code


def test_npz_whose_train_and_test_parts_disagree_is_one_line(tmp_path):
    """Issue 26: with split "all", parts of other sizes, or labels on one part only, were a
    raw numpy concatenate error; both readers (whole and lazy) and the CLI name the file."""
    rng = np.random.default_rng(0)
    sizes = tmp_path / "sizes.npz"
    np.savez(
        sizes,
        train_images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        test_images=rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8),
    )
    labels = tmp_path / "labels.npz"
    np.savez(
        labels,
        train_images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        train_labels=np.arange(4),
        test_images=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
    )
    palette = tmp_path / "palette.npy"
    Palette(torch.rand(4, 3) * 255).save(palette)
    cases = [(sizes, r"train_images 8x8, test_images 6x6.*one image size"),
             (labels, r"has train_labels but no test_labels.*add test_labels")]  # fmt: skip
    for path, message in cases:
        for lazy in (False, True):
            with pytest.raises(ValueError, match=f"{path}.*{message}"):
                load_images(f"npz:{path}", "all", lazy=lazy)
        assert len(load_images(f"npz:{path}", "train")) == 4  # each part alone still reads
        argv = ["prepare", "--data", f"npz:{path}", "--n-px", "4", "--split", "all"]
        with pytest.raises(SystemExit) as e:
            main([*argv, "--palette", str(palette), "--cache-dir", str(tmp_path / "c")])
        line = str(e.value.code)
        assert "\n" not in line and str(path) in line and re.search(message, line)
