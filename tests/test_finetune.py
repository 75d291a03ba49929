"""igpt.finetune: the classifier, the joint loss, learning on digits, resume, BERT predictions."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from igpt import IGPT, IGPTConfig
from igpt.finetune import IGPTClassifier, evaluate, finetune, load_classifier, predict

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n_px=4, n_layer=2):
    return IGPT(IGPTConfig(n_px=n_px, n_layer=n_layer, n_head=2, n_embd=64, n_colors=16))


def synthetic(n, seed=0):
    """Tokens whose colour range carries the class: class c draws half of its tokens from
    colours 4c..4c+3 and the rest uniformly."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 4, n)
    t = g.integers(0, 16, (n, 16))
    t = np.where(g.random((n, 16)) < 0.5, 4 * y[:, None] + g.integers(0, 4, (n, 16)), t)
    return torch.from_numpy(t), torch.from_numpy(y)


def test_classifier_head_starts_at_zero_and_reads_the_chosen_layer():
    model = tiny(n_layer=3)
    tokens = torch.randint(0, 16, (5, 16))
    clf = IGPTClassifier(model, 7)
    gen, logits = clf(tokens)
    assert logits.shape == (5, 7) and torch.count_nonzero(logits) == 0  # uniform at first
    torch.testing.assert_close(gen, model(tokens))
    torch.nn.init.normal_(clf.head.weight)
    feats = model.features(tokens)
    _, logits = clf(tokens)
    torch.testing.assert_close(logits, clf.head(feats[:, 3]))
    early = IGPTClassifier(model, 7, layer=1)
    early.head.load_state_dict(clf.head.state_dict())
    gen, logits = early(tokens, generative=False)
    assert gen is None
    torch.testing.assert_close(logits, clf.head(feats[:, 1]))
    with pytest.raises(ValueError, match="n_classes"):
        IGPTClassifier(model, 1)


@pytest.mark.slow
def test_finetune_on_digits_beats_chance():
    from igpt.data import load_images, tokenize
    from igpt.palette import fit_palette

    train, test = load_images("digits", "train"), load_images("digits", "test")
    palette = fit_palette(train.images, k=16)
    x, xt = tokenize(train.images, palette, 8), tokenize(test.images, palette, 8)
    model = tiny(n_px=8)
    res = finetune(
        model, x, train.labels, steps=150, batch_size=32, lr=3e-3, eval_every=50, progress=False
    )
    assert res["step"] == 150 and res["best_step"] in (50, 100, 150)
    acc = evaluate(res["classifier"], xt, test.labels)
    assert acc > 0.25  # chance is 0.1; a from-scratch tiny model under the joint loss


def test_resume_takes_the_same_steps_as_an_uninterrupted_run(tmp_path):
    x, y = synthetic(64)
    kw = dict(steps=4, batch_size=8, lr=1e-3, eval_every=2, progress=False, seed=1)
    torch.manual_seed(0)
    whole = finetune(tiny(), x, y, out_dir=tmp_path / "whole", **kw)
    torch.manual_seed(0)
    finetune(tiny(), x, y, out_dir=tmp_path / "split", **{**kw, "steps": 2})
    assert sorted(p.name for p in (tmp_path / "split").glob("ckpt_*.pt")) == ["ckpt_00000002.pt"]
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the process died while appending a row
    torch.manual_seed(5)  # a different init: every weight must come from the checkpoint
    resumed = finetune(tiny(), x, y, out_dir=tmp_path / "split", resume=True, **kw)
    assert resumed["step"] == 4 and resumed["history"] == whole["history"]
    a = torch.load(tmp_path / "whole" / "ckpt_00000004.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt_00000004.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    torch.testing.assert_close(a["head"], b["head"], rtol=0, atol=0)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("gen_loss" in r for r in rows)
    whole_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    assert rows == whole_rows  # the same losses, bit for bit
    with pytest.raises(FileExistsError, match="resume"):
        finetune(tiny(), x, y, out_dir=tmp_path / "whole", **kw)
    clf, _, ckpt = load_classifier(tmp_path / "whole" / "best.pt")
    assert ckpt["step"] == whole["best_step"]
    np.testing.assert_array_equal(predict(clf, x), predict(whole["classifier"], x))


def test_resume_extends_and_refuses_only_what_would_make_the_run_meaningless(tmp_path):
    from igpt.finetune import FinetuneConfig, Finetuner

    x, y = synthetic(32)
    kw = dict(steps=2, batch_size=8, lr=1e-3, eval_every=2, progress=False, out_dir=tmp_path)
    finetune(tiny(), x, y, **kw)
    again = {**kw, "resume": True}
    for change, said in [
        (dict(batch_size=4), "batch_size 8 there, 4 now"),
        (dict(objective="bert"), "objective 'ar' there, 'bert' now"),
        (dict(joint=False), "joint True there, False now"),
        (dict(layer=1), "layer 2 there, 1 now"),
        (dict(seed=3), "seed 0 there, 3 now"),
    ]:
        with pytest.raises(ValueError, match=re.escape(said)) as e:
            finetune(tiny(), x, y, **{**again, **change})
        assert "cannot resume" in str(e.value) and "ckpt_00000002.pt" in str(e.value)
    with pytest.raises(ValueError, match="n_classes 4 there, 6 now"):
        finetune(tiny(), x, y, n_classes=6, **again)
    with pytest.raises(ValueError, match="model n_layer 2 there, 3 now"):
        finetune(tiny(n_layer=3), x, y, **again)
    with pytest.raises(ValueError, match=r"at step 2, past steps=1; pass --steps 2"):
        finetune(tiny(), x, y, **{**again, "steps": 1})
    # allowed: more steps and another learning rate, which the saved optimizer must not undo
    cfg = FinetuneConfig(**{**again, "steps": 4, "lr": 5e-4, "weight_decay": 0.01})
    t = Finetuner(tiny(), cfg, x, y)
    assert t.state["step"] == 2
    # the model's group and (issue 26: the zero-initialised head's own rate) the head's
    assert [(g["lr"], g["weight_decay"]) for g in t.opt.param_groups] == [
        (5e-4, 0.01),
        (1e-2, 0.01),
    ]
    assert t.fit()["step"] == 4


def test_resume_with_a_damaged_checkpoint_says_so(tmp_path):
    from igpt.checkpoint import CheckpointError

    x, y = synthetic(16)
    kw = dict(steps=1, batch_size=4, eval_every=1, progress=False, out_dir=tmp_path)
    finetune(tiny(), x, y, **kw)
    (tmp_path / "ckpt_00000001.pt").write_bytes(b"PK\x03\x04 cut")
    (tmp_path / ".ckpt_00000002.pt.abcd_123.tmp").write_bytes(b"left by a kill")
    with pytest.raises(CheckpointError, match=r"ckpt_00000001.pt are all damaged"):
        finetune(tiny(), x, y, resume=True, **{**kw, "steps": 2})
    assert not list(tmp_path.glob(".*.tmp"))  # removed when the run directory was opened


def test_bert_classifier_only_loss_learns_and_mask_ensemble_is_seeded():
    x, y = synthetic(160)
    model = tiny()
    res = finetune(
        model,
        x[:128],
        y[:128],
        objective="bert",
        joint=False,
        n_masks=3,
        steps=20,
        batch_size=16,
        lr=3e-3,
        eval_every=20,
        progress=False,
    )
    assert res["settings"]["joint"] is False
    clf = res["classifier"]
    kw = dict(objective="bert", n_masks=5, seed=3)
    np.testing.assert_array_equal(predict(clf, x[128:], **kw), predict(clf, x[128:], **kw))
    assert evaluate(clf, x[128:], y[128:], **kw) > 0.7  # chance is 0.25


def test_bert_finetune_checkpoints_say_bert_so_sampling_refuses_them(tmp_path):
    from igpt.checkpoint import load_checkpoint
    from igpt.sample import load_for_sampling

    x, y = synthetic(16)
    kw = dict(objective="bert", steps=1, batch_size=4, eval_every=1, progress=False)
    finetune(tiny(), x, y, out_dir=tmp_path, **kw)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["objective"] == "bert" and "objective" not in ckpt["finetune"]  # one key
    for path in (tmp_path, tmp_path / "best.pt"):
        with pytest.raises(ValueError, match="BERT"):
            load_for_sampling(path)


def test_finetune_rejects_bad_arguments(tmp_path):
    x, y = synthetic(16)
    with pytest.raises(ValueError, match="objective"):
        finetune(tiny(), x, y, objective="mlm")
    with pytest.raises(ValueError, match="out_dir"):
        finetune(tiny(), x, y, resume=True)
    with pytest.raises(ValueError, match="train_labels"):
        finetune(tiny(), x, y[:5])
    with pytest.raises(ValueError, match=r"n_classes=3\), got labels in \[0, 3\]"):
        finetune(tiny(), x, y, n_classes=3)  # synthetic labels go up to 3
    with pytest.raises(ValueError, match="hold-out set is empty"):  # not NaN accuracies
        finetune(tiny(), x, y, val_tokens=x[:0], val_labels=y[:0])


def test_igpt_finetune_command_runs_and_resumes(tmp_path, capsys):
    from igpt.checkpoint import save_checkpoint
    from igpt.cli import main
    from igpt.data import load_images
    from igpt.palette import fit_palette

    palette = fit_palette(load_images("digits", "train").images, k=16)
    save_checkpoint(tmp_path / "pre.pt", tiny(n_px=8), step=3, palette=palette, objective="ar")
    argv = [
        "finetune",
        "--checkpoint",
        str(tmp_path / "pre.pt"),
        "--data",
        "digits",
        "--limit",
        "80",
        "--batch-size",
        "8",
        "--eval-every",
        "3",
        "--lr",
        "1e-3",
        "--out",
        str(tmp_path / "ft"),
    ]
    main([*argv, "--steps", "3"])
    first = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert first["step"] == 3 and first["settings"]["objective"] == "ar"
    assert "test accuracy" in capsys.readouterr().out
    main([*argv, "--steps", "6", "--resume"])
    second = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert second["step"] == 6 and [h["step"] for h in second["history"]] == [3, 6]
    assert 0.0 <= second["test_acc"] <= 1.0
    assert (tmp_path / "ft" / "finetune.png").read_bytes()[:4] == b"\x89PNG"
    clf, palette_back, _ = load_classifier(tmp_path / "ft")
    assert clf.n_classes == 10 and len(palette_back) == 16


@pytest.mark.cuda
def test_finetune_on_cuda_bf16_learns():
    x, y = synthetic(160)
    res = finetune(
        tiny(n_px=4).cuda(),
        x[:128],
        y[:128],
        steps=30,
        batch_size=16,
        lr=3e-3,
        eval_every=15,
        progress=False,
        device="cuda",
    )
    assert next(res["classifier"].parameters()).is_cuda
    assert evaluate(res["classifier"], x[128:], y[128:]) > 0.7  # chance is 0.25


def test_finetune_tokenises_augmented_images_every_step():
    from igpt.data import pad_crop_flip, tokenize
    from igpt.palette import fit_palette

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(40) % 2
    palette = fit_palette(images, k=16)
    calls = []

    def augment(batch, *, rng):
        calls.append(len(batch))
        return pad_crop_flip(batch, pad=1, rng=rng)

    res = finetune(
        tiny(),
        tokenize(images, palette, 4),
        labels,
        steps=3,
        batch_size=8,
        eval_every=3,
        train_images=images,
        palette=palette,
        augment=augment,
        progress=False,
    )
    assert calls == [8, 8, 8] and res["step"] == 3
    with pytest.raises(ValueError, match="augment needs"):
        finetune(tiny(), tokenize(images, palette, 4), labels, augment=augment, steps=1)


def test_a_non_finite_step_is_skipped_and_counted_as_in_pretraining(monkeypatch):
    """One non-finite policy for both trainers (issue 21): fine-tuning skips and counts a
    non-finite step (it used to raise), and gives up after NONFINITE_LIMIT in a row."""
    import igpt.finetune
    from igpt.training import NONFINITE_LIMIT

    x, y = synthetic(32)
    real, calls = igpt.finetune.F.cross_entropy, []

    def spiky(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(igpt.finetune.F, "cross_entropy", spiky)
    torch.manual_seed(0)
    model = tiny()
    res = finetune(model, x, y, steps=3, batch_size=8, eval_every=3, progress=False)
    assert res["step"] == 3 and res["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ft = igpt.finetune.Finetuner(model, igpt.finetune.FinetuneConfig(steps=3), x, y)
    monkeypatch.setattr(igpt.finetune.F, "cross_entropy", lambda *a, **k: real(*a, **k) * np.nan)
    for s in range(NONFINITE_LIMIT - 1):
        ft._step(s)
    assert ft.guard.skipped == ft.state["skipped"] == NONFINITE_LIMIT - 1
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        ft._step(NONFINITE_LIMIT)


def test_finetune_reads_its_mixed_precision_from_the_config():
    from igpt.finetune import FinetuneConfig, Finetuner

    x, y = synthetic(16)
    ft = Finetuner(tiny(), FinetuneConfig(precision="bf16", steps=1, batch_size=8), x, y)
    assert ft.autocast.fast_dtype == torch.bfloat16 and ft.autocast._enabled
    assert not Finetuner(tiny(), FinetuneConfig(steps=1), x, y).autocast._enabled  # auto, CPU
    with pytest.raises(ValueError, match="precision"):
        FinetuneConfig(precision="fp8")


def test_finetune_compile_trains_through_torch_compile(monkeypatch):
    """--compile: every training forward goes through what torch.compile returned."""
    from igpt.finetune import FinetuneConfig, Finetuner

    calls = []

    def spy(module, **kw):
        def call(*a, **k):
            calls.append(type(module).__name__)
            return module(*a, **k)

        return call

    monkeypatch.setattr(torch, "compile", spy)
    x, y = synthetic(16)
    Finetuner(tiny(), FinetuneConfig(compile=True, steps=2, batch_size=8), x, y).fit()
    assert calls == ["IGPTClassifier"] * 2
    with pytest.raises(ValueError, match="compile must be True or False"):
        FinetuneConfig(compile="yes")


def test_finetune_report_to_tensorboard_logs_its_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from igpt.finetune import FinetuneConfig, Finetuner

    x, y = synthetic(16)
    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=2, batch_size=8, out_dir=str(out), report_to="tensorboard")
    Finetuner(tiny(), cfg, x, y).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    np.testing.assert_allclose(got, [(r["step"], r["loss"]) for r in rows if "loss" in r], 1e-6)


def test_finetune_fp16_steps_through_a_gradient_scaler(tmp_path):
    """--precision fp16: float16 autocast, a scaler whose scale a resume brings back."""
    from igpt.finetune import FinetuneConfig, Finetuner

    x, y = synthetic(16)
    cfg = FinetuneConfig(precision="fp16", steps=2, batch_size=8, out_dir=str(tmp_path / "ft"))
    ft = Finetuner(tiny(), cfg, x, y)
    assert ft.autocast.fast_dtype == torch.float16 and ft.scaler.is_enabled()
    ft.fit()
    scale = ft.scaler.get_scale()
    assert 0 < scale <= 2.0**16 and ft.guard.skipped == 0
    again = Finetuner(tiny(), dataclasses.replace(cfg, steps=3, resume=True), x, y)
    assert again.scaler.get_scale() == scale and again.state["step"] == 2


def test_head_lr_gives_the_head_its_own_rate_and_resume_restores_both(tmp_path):
    from igpt.finetune import FinetuneConfig, Finetuner

    x, y = synthetic(32)
    kw = dict(steps=2, batch_size=8, eval_every=2, progress=False, out_dir=str(tmp_path / "r"))
    t = Finetuner(tiny(), FinetuneConfig(lr=1e-4, head_lr=1e-2, **kw), x, y)
    assert [g["lr"] for g in t.opt.param_groups] == [1e-4, 1e-2]
    assert t.opt.param_groups[1]["params"] == list(t.clf.head.parameters())
    t.fit()
    again = FinetuneConfig(lr=2e-4, head_lr=3e-2, resume=True, **{**kw, "steps": 3})
    assert [g["lr"] for g in Finetuner(tiny(), again, x, y).opt.param_groups] == [2e-4, 3e-2]
    with pytest.raises(ValueError, match="head_lr"):
        FinetuneConfig(head_lr=0.0)
    # a run made with one rate for the whole classifier resumes under a head rate and back
    one = dict(kw, out_dir=str(tmp_path / "one"))
    Finetuner(tiny(), FinetuneConfig(head_lr=None, **one), x, y).fit()
    two = Finetuner(tiny(), FinetuneConfig(resume=True, **{**one, "steps": 3}), x, y)
    assert [g["lr"] for g in two.opt.param_groups] == [1e-4, 1e-2] and two.fit()["step"] == 3
    back = FinetuneConfig(head_lr=None, resume=True, **{**one, "steps": 4})
    assert Finetuner(tiny(), back, x, y).fit()["step"] == 4


# ----------------------------------------------------------------------------- token cache


@pytest.mark.parametrize("n_px, pad", [(8, 4), (5, 1), (32, 4)])
def test_pad_crop_flip_on_tokens_is_pad_crop_flip_on_the_images_tokenised(n_px, pad):
    """Pixels only move and a palette quantizes each pixel alone: for images already
    n_px x n_px, augmenting the tokens equals tokenising the augmented images, exactly."""
    from igpt.data import pad_crop_flip, pad_crop_flip_tokens, tokenize
    from igpt.palette import fit_palette

    images = np.random.default_rng(n_px).integers(0, 256, (6, n_px, n_px, 3), dtype=np.uint8)
    palette = fit_palette(images, k=16)
    tokens = tokenize(images, palette, n_px).numpy().astype(np.uint16)  # as the cache holds
    for seed in range(4):
        want = tokenize(
            pad_crop_flip(images, pad=pad, rng=np.random.default_rng(seed)), palette, n_px
        )
        got = pad_crop_flip_tokens(tokens, n_px, pad=pad, rng=np.random.default_rng(seed))
        assert got.dtype == np.int64 and np.array_equal(got, want.numpy())
    with pytest.raises(ValueError, match="n_px \\* n_px"):
        pad_crop_flip_tokens(tokens[:, :-1], n_px)


def test_finetune_batches_from_a_memmap_tokens_or_lazy_images_are_those_of_the_images(tmp_path):
    """The batches a fine-tuning run trains on: token augmentation on a uint16 memmap and
    image augmentation on a lazy ImageSet give the in-memory images' batches."""
    import functools

    from igpt.data import ArraySource, ImageSet, pad_crop_flip, pad_crop_flip_tokens, tokenize
    from igpt.finetune import FinetuneConfig, example_batches
    from igpt.palette import fit_palette

    images = np.random.default_rng(0).integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    palette = fit_palette(images, k=16)
    tokens = tokenize(images, palette, 4).numpy().astype(np.uint16)
    tokens.tofile(tmp_path / "t.u16")
    mm = np.memmap(tmp_path / "t.u16", np.uint16, "r", shape=tokens.shape)
    lazy = ImageSet(ArraySource(images), None, None)
    assert np.array_equal(lazy[[5, 2, 5]], images[[5, 2, 5]])  # order and repeats kept
    cfg, rows = FinetuneConfig(batch_size=8, seed=3), np.arange(3, 30)
    flip = functools.partial(pad_crop_flip_tokens, n_px=4)
    runs = [
        example_batches(cfg, tokens, rows, images, palette, pad_crop_flip, 4),
        example_batches(cfg, mm, rows, None, None, None, 4, flip),
        example_batches(cfg, mm, rows, lazy, palette, pad_crop_flip, 4),
    ]
    for step in range(5):  # past an epoch of 27 rows
        first, *others = (b.tokens(step) for b in runs)
        assert all(torch.equal(first, other) for other in others)


def _prepare_digits(tmp_path, palette, n_px):
    from igpt.cli import main

    palette.save(tmp_path / "palette.npy")
    for split in ("train", "test"):
        main(["prepare", "--data", "digits", "--n-px", str(n_px), "--palette",
              str(tmp_path / "palette.npy"), "--split", split, "--cache-dir",
              str(tmp_path / "cache"), "--workers", "0", "--no-progress"])  # fmt: skip


def test_igpt_finetune_after_prepare_reads_no_image_and_trains_as_on_the_images(
    tmp_path, capsys, no_images
):
    """`igpt finetune --augment cifar` on prepared digits (8x8 at n_px 8): the tokens are
    augmented, no image is read, and the run is the one the images would give."""
    from igpt.checkpoint import load_model, save_checkpoint
    from igpt.cli import main
    from igpt.commands._common import labelled_splits
    from igpt.data import pad_crop_flip, tokenize
    from igpt.finetune import FinetuneConfig
    from igpt.palette import fit_palette

    train, test = labelled_splits("digits", 40)
    palette = fit_palette(train.images, k=16)
    save_checkpoint(tmp_path / "pre.pt", tiny(n_px=8), step=3, palette=palette, objective="ar")
    _prepare_digits(tmp_path, palette, 8)
    model, _, _ = load_model(tmp_path / "pre.pt")
    cfg = FinetuneConfig(steps=2, eval_every=2, batch_size=8, lr=1e-3, n_masks=5, device="cpu")
    cfg.out_dir = str(tmp_path / "images")
    x = tokenize(train.images, palette, 8)
    kw = dict(n_classes=10, train_images=train.images, palette=palette, augment=pad_crop_flip)
    want = finetune(model, x, train.labels, config=cfg, **kw)
    want_acc = evaluate(want["classifier"], tokenize(test.images, palette, 8), test.labels)
    capsys.readouterr()

    no_images()
    main(["finetune", "--checkpoint", str(tmp_path / "pre.pt"), "--data", "digits",
          "--limit", "40", "--steps", "2", "--eval-every", "2", "--batch-size", "8",
          "--lr", "1e-3", "--augment", "cifar", "--device", "cpu",
          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "ft")])  # fmt: skip
    got = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert got["history"] == want["history"] and got["test_acc"] == want_acc
    # the losses of every step: the augmented batches were the same
    rows = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("images", "ft")]
    assert rows[0] == rows[1] and len(rows[0].splitlines()) == 2
    head = load_classifier(tmp_path / "ft" / "best.pt")[0].head.weight
    assert torch.equal(head, want["classifier"].head.weight.detach())
    assert "test accuracy" in capsys.readouterr().out


def test_igpt_finetune_augments_lazily_read_images_at_another_side(tmp_path, monkeypatch):
    """Digits (8x8) at n_px 4: the augmentation needs the images, read lazily per batch."""
    import igpt.data
    from igpt.checkpoint import load_model, save_checkpoint
    from igpt.cli import main
    from igpt.commands._common import labelled_splits
    from igpt.data import pad_crop_flip, tokenize
    from igpt.finetune import FinetuneConfig
    from igpt.palette import fit_palette

    train, _ = labelled_splits("digits", 30)
    palette = fit_palette(train.images, k=16)
    save_checkpoint(tmp_path / "pre.pt", tiny(n_px=4), palette=palette, objective="ar")
    model, _, _ = load_model(tmp_path / "pre.pt")
    cfg = FinetuneConfig(steps=2, eval_every=2, batch_size=8, out_dir=str(tmp_path / "images"))
    kw = dict(n_classes=10, train_images=train.images, palette=palette, augment=pad_crop_flip)
    finetune(model, tokenize(train.images, palette, 4), train.labels, config=cfg, **kw)
    monkeypatch.setattr("igpt.commands.finetune.IN_MEMORY", 0)  # as a set too large to load
    lazy, reads = [], []
    real, get = igpt.data.load_images, igpt.data.ImageSet.__getitem__
    monkeypatch.setattr(igpt.data, "load_images", lambda *a, **k: lazy.append(k) or real(*a, **k))
    monkeypatch.setattr(
        igpt.data.ImageSet, "__getitem__", lambda s, i: reads.append(i) or get(s, i)
    )
    main(["finetune", "--checkpoint", str(tmp_path / "pre.pt"), "--limit", "30",
          "--steps", "2", "--eval-every", "2", "--batch-size", "8", "--augment", "cifar",
          "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
          "--out", str(tmp_path / "ft")])  # fmt: skip
    assert lazy and all(k.get("lazy") is True for k in lazy)  # never the whole split in memory
    assert [len(rows) for rows in reads] == [8, 8]  # one read of a batch's rows per step
    rows = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("images", "ft")]
    assert rows[0] == rows[1]


# ---------------------------------------------------------------- issue 32 (tests branch): begin
# early stopping: patience counts evaluations without a better hold-out accuracy (a tie is
# not better), and the run ends with the weights of the first best evaluation


def test_stop_early_after_exactly_patience_evaluations_without_a_better_accuracy():
    from igpt.finetune import stop_early

    for since in range(6):
        assert not stop_early({"step": 7, "evals_since_best": since}, None)
    assert [stop_early({"step": 7, "evals_since_best": n}, 3) for n in range(6)] == [
        *(False, False, False, True, True, True)
    ]
    assert [stop_early({"step": 7, "evals_since_best": n}, 1) for n in range(3)] == [
        *(False, True, True)
    ]


def with_fixed_accuracies(monkeypatch, accs, heads, n_val):
    """Replace the hold-out evaluation by ``accs`` in turn, checking what it is asked."""
    import igpt.finetune
    from igpt.objectives import MASK_PROB

    accs = iter(accs)

    def fixed_accuracy(clf, tokens, labels, **kw):
        assert tokens.shape == (n_val, 16) and len(labels) == n_val
        assert kw == dict(objective="ar", n_masks=1, mask_prob=MASK_PROB, seed=5, batch_size=64,
                          device=torch.device("cpu"))  # fmt: skip
        heads.append(clf.head.weight.detach().clone())
        return next(accs)

    monkeypatch.setattr(igpt.finetune, "evaluate", fixed_accuracy)


@pytest.mark.parametrize(
    "patience, steps, run", [(None, 8, 0), (1, 3, 0), (2, 4, 0), (2, 4, 1), (3, 5, 0), (5, 8, 0)]
)
def test_patience_stops_the_run_and_ties_keep_the_earlier_best(
    monkeypatch, tmp_path, patience, steps, run
):
    """In memory and (run) from a run directory's best.pt."""
    accs, heads = [0.5, 0.6, 0.6, 0.4, 0.5, 0.6, 0.9, 0.1], []  # best at step 2, tied at 3
    with_fixed_accuracies(monkeypatch, accs, heads, n_val=3)
    x, y = synthetic(32)
    torch.manual_seed(0)
    out = {"out_dir": str(tmp_path / "run")} if run else {}
    kw = dict(steps=8, batch_size=8, eval_every=1, patience=patience, seed=5, progress=False)
    res = finetune(tiny(), x, y, **kw, **out)
    assert res["step"] == steps and len(heads) == steps
    assert res["history"] == [{"step": i + 1, "val_acc": a} for i, a in enumerate(accs[:steps])]
    best_step = 7 if steps == 8 else 2
    assert res["best_step"] == best_step and res["best_val_acc"] == [0.9, 0.6][steps < 8]
    torch.testing.assert_close(res["classifier"].head.weight, heads[best_step - 1])
    assert not torch.equal(heads[best_step - 1], heads[-1]) or best_step == steps
    if run:
        best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
        assert best["state"]["best_step"] == best_step and "optimizer" not in best


def test_a_better_accuracy_restarts_the_patience_count(monkeypatch):
    heads = []
    with_fixed_accuracies(monkeypatch, [0.5, 0.4, 0.6, 0.5, 0.5, 0.5, 0.5], heads, n_val=3)
    x, y = synthetic(32)
    kw = dict(steps=7, batch_size=8, eval_every=1, patience=2, seed=5, progress=False)
    res = finetune(tiny(), x, y, **kw)
    assert res["step"] == 5 and res["best_step"] == 3 and res["best_val_acc"] == 0.6


# ---------------------------------------------------------------- issue 32 (tests branch): end
