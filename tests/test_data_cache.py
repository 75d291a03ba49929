"""The data layer of issue 33: the token cache serves only the tokens of the data as it is now
(the key covers the files the reader reads, through symlinks, the tokenising code and
in-memory ``data=``), a second start stats no image file, one rule for unreadable files, a
mixed folder resized once, and a sixth data kind added with one module and one line. (The
killed build that resumes, labelled or not, is in test_prepare.py.)"""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_prepare import _palette, _rand_images

import igpt.data.cache
from igpt.data import (
    SOURCES,
    ArraySource,
    ImageData,
    ImageSet,
    Source,
    cached_tokens,
    image_side,
    load_images,
    open_images,
    prepare_tokens,
    tokenize,
)
from igpt.data.base import split_rows
from igpt.palette import Palette
from igpt.transforms import square


def _class_folders(root, seed=0, n=3, side=8):
    """root/a/0.png .. root/b/{n-1}.png of random pixels; returns the images in row order."""
    images = _rand_images(2 * n, side, side, seed)
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(images[c * n + i]).save(root / cls / f"{i}.png")
    return images


def _truncated_png(path, side=8):
    """A PNG whose header reads but whose pixels do not: a copy cut short."""
    Image.fromarray(_rand_images(1, side, side, 7)[0]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- the key


def test_symlinked_class_folders_are_in_the_key(tmp_path):
    real, other, data = tmp_path / "real", tmp_path / "other", tmp_path / "data"
    first_images = _class_folders(real)
    other_images = _class_folders(other, seed=5)
    data.mkdir()
    for cls in ("a", "b"):
        (data / cls).symlink_to(real / cls, target_is_directory=True)
    spec, pal, cache = f"folder:{data}", _palette(), tmp_path / "c"
    tokens, _ = cached_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0)
    assert np.array_equal(tokens.astype(np.int64), tokenize(first_images, pal, 8).numpy())
    for cls in ("a", "b"):  # the links now point at another data set
        (data / cls).unlink()
        (data / cls).symlink_to(other / cls, target_is_directory=True)
    tokens, _ = cached_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0)
    assert np.array_equal(tokens.astype(np.int64), tokenize(other_images, pal, 8).numpy())
    # an image edited in place behind a link: the name, so the folder's listing, is the same
    edited = _rand_images(1, 8, 8, seed=9)[0]
    Image.fromarray(edited).save(other / "a" / "0.png")
    st = (other / "a" / "0.png").stat()
    os.utime(other / "a" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    info = prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0, verify=True)
    assert info.built
    tokens, _ = cached_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0)
    assert np.array_equal(tokens[0].astype(np.int64), tokenize(edited[None], pal, 8).numpy()[0])


def test_the_tokenising_code_version_is_in_the_key(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", images=_rand_images(6, 4, 4))
    spec, pal, cache = f"npz:{tmp_path / 'd.npz'}", _palette(), tmp_path / "c"
    assert prepare_tokens(spec, "all", pal, 4, cache_dir=cache, workers=0).built
    assert not prepare_tokens(spec, "all", pal, 4, cache_dir=cache, workers=0).built
    monkeypatch.setattr(igpt.data.cache, "TOKENS_VERSION", igpt.data.cache.TOKENS_VERSION + 1)
    info = prepare_tokens(spec, "all", pal, 4, cache_dir=cache, workers=0)
    assert info.built  # another version of the code: another entry
    record = json.loads((info.path / "meta.json").read_text())["key"]
    assert record["code"] == igpt.data.cache.TOKENS_VERSION and record["resize"]


def test_data_in_memory_never_poisons_the_entry_of_its_spec(tmp_path):
    pal, cache = _palette(), tmp_path / "c"
    full = load_images("digits", "train")
    part = full.subset(np.arange(10))
    few, _ = cached_tokens("digits", "train", pal, 8, cache_dir=cache, data=part, workers=0)
    assert len(few) == 10
    tokens, labels = cached_tokens("digits", "train", pal, 8, cache_dir=cache, workers=0)
    assert len(tokens) == len(full) and len(labels) == len(full)
    flipped = ImageData(part.images[:, ::-1].copy(), part.labels, part.classes)
    other, _ = cached_tokens("digits", "train", pal, 8, cache_dir=cache, data=flipped, workers=0)
    assert np.array_equal(other.astype(np.int64), tokenize(flipped.images, pal, 8).numpy())


def _age(root, seconds=60):
    """Date every folder under ``root`` back: a watch list is written only for settled ones."""
    for top, _, _ in os.walk(root):
        st = os.stat(top)
        os.utime(top, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def test_a_second_start_stats_no_image_file(tmp_path, monkeypatch):
    monkeypatch.setattr(igpt.data.cache, "WATCH_FILES", 2)  # a large folder, in small
    images = _class_folders(tmp_path / "f", n=4)
    _age(tmp_path / "f")
    spec, pal, cache = f"folder:{tmp_path / 'f'}", _palette(), tmp_path / "c"
    first = prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0)
    assert first.built and first.images == len(images)
    real_stat, seen = os.stat, []

    def counting_stat(path, *a, **k):
        seen.append(str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", counting_stat)
    again = prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0)
    assert not again.built and again.path == first.path
    assert seen and not [p for p in seen if p.endswith(".png")]  # the folders, not the files
    assert {str(tmp_path / "f" / c) for c in ("a", "b")} <= set(seen)
    seen.clear()
    checked = prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0, verify=True)
    assert not checked.built and len([p for p in seen if p.endswith(".png")]) >= len(images)


def test_a_small_set_has_every_file_checked_on_a_second_start(tmp_path):
    path, pal, cache = tmp_path / "d.npz", _palette(), tmp_path / "c"
    np.savez(path, images=_rand_images(6, 4, 4))
    _age(tmp_path)
    os.utime(path, ns=(time.time_ns() - 60 * 10**9,) * 2)
    assert prepare_tokens(f"npz:{path}", "all", pal, 4, cache_dir=cache, workers=0).built
    assert len(list((cache / "index").iterdir())) == 1  # the watch list holds the file
    new = _rand_images(6, 4, 4, seed=3)
    np.savez(path, images=new)  # rewritten in place: the same name, size and folder
    info = prepare_tokens(f"npz:{path}", "all", pal, 4, cache_dir=cache, workers=0)
    tokens, _ = cached_tokens(f"npz:{path}", "all", pal, 4, cache_dir=cache, workers=0)
    assert info.built and np.array_equal(tokens.astype(np.int64), tokenize(new, pal, 4).numpy())


def test_prepare_verify_finds_an_image_rewritten_in_place(tmp_path, monkeypatch, capsys):
    from igpt.cli import main

    monkeypatch.setattr(igpt.data.cache, "WATCH_FILES", 2)
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "c"))
    _class_folders(tmp_path / "f")
    _age(tmp_path / "f")
    _palette().save(tmp_path / "p.npy")
    argv = ["prepare", "--data", f"folder:{tmp_path / 'f'}", "--n-px", "8", "--workers", "0"]
    argv += ["--palette", str(tmp_path / "p.npy"), "--split", "all"]
    main(argv)
    assert "tokenised now" in capsys.readouterr().out
    path = tmp_path / "f" / "b" / "1.png"
    Image.fromarray(_rand_images(1, 8, 8, seed=11)[0]).save(path)  # same name: same listing
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    main(argv)  # the folders' stamps alone: the documented blind spot
    assert "already prepared" in capsys.readouterr().out
    main([*argv, "--verify"])
    assert "tokenised now" in capsys.readouterr().out


def test_a_file_added_or_removed_is_seen_on_a_second_start(tmp_path, monkeypatch):
    monkeypatch.setattr(igpt.data.cache, "WATCH_FILES", 2)
    _class_folders(tmp_path / "f", n=3)
    _age(tmp_path / "f")
    spec, pal, cache = f"folder:{tmp_path / 'f'}", _palette(), tmp_path / "c"
    assert prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0).images == 6
    Image.fromarray(_rand_images(1, 8, 8, 3)[0]).save(tmp_path / "f" / "b" / "9.png")
    assert prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0).images == 7
    _age(tmp_path / "f")
    (tmp_path / "f" / "a" / "0.png").unlink()
    assert prepare_tokens(spec, "all", pal, 8, cache_dir=cache, workers=0).images == 6


# resume, labelled or not, killed for real: test_prepare.py, test_a_build_killed_with_sigkill_...


# ----------------------------------------------------------------------------- unreadable files


def _folder_with_a_truncated_png(root):
    images = _class_folders(root, n=3)
    _truncated_png(root / "b" / "bad.png")
    return images


def test_unreadable_files_are_skipped_and_named_everywhere(tmp_path, caplog):
    images = _folder_with_a_truncated_png(tmp_path / "f")
    spec, bad = f"folder:{tmp_path / 'f'}", str(tmp_path / "f" / "b" / "bad.png")
    with caplog.at_level(logging.WARNING):
        data = load_images(spec, "all")
    assert data.skipped == 1 and np.array_equal(data.images, images)
    assert "1 unreadable" in caplog.text and bad in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lazy = open_images(spec, "all").load()
    assert lazy.skipped == 1 and bad in caplog.text
    caplog.clear()
    pal = _palette()
    with caplog.at_level(logging.WARNING):
        info = prepare_tokens(spec, "all", pal, 8, cache_dir=tmp_path / "c", workers=0)
    assert info.images == 6 and info.skipped == 1
    assert "1 unreadable" in caplog.text and bad in caplog.text


def test_fit_palette_skips_an_unreadable_file_like_prepare(tmp_path, caplog):
    from igpt.cli import main

    _folder_with_a_truncated_png(tmp_path / "f")
    out = tmp_path / "p.npy"
    with caplog.at_level(logging.WARNING):
        main(["fit-palette", "--data", f"folder:{tmp_path / 'f'}", "--k", "4", "--out", str(out)]
             + ["--images", "100"])  # fmt: skip
    assert Palette.load(out).centroids.shape == (4, 3)
    assert "1 unreadable" in caplog.text and "bad.png" in caplog.text


def test_a_set_of_only_unreadable_files_is_one_clear_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        _truncated_png(tmp_path / "f" / cls / "x.png")
    spec = f"folder:{tmp_path / 'f'}"
    with pytest.raises(ValueError, match="unreadable"):
        load_images(spec, "all")
    with pytest.raises(ValueError, match="unreadable"):
        prepare_tokens(spec, "all", _palette(), 8, cache_dir=tmp_path / "c", workers=0)


def test_a_mixed_folder_goes_to_n_px_in_one_resize(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "f" / "a").mkdir(parents=True)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 40), (6, 9))]
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "f" / "a" / f"{i}.png")
    pal, n_px = _palette(64), 16
    tokens, _ = cached_tokens(
        f"folder:{tmp_path / 'f'}", "all", pal, n_px, cache_dir=tmp_path / "c", workers=0
    )
    expect = np.stack([square(img, n_px) for img in images])  # each image resized once
    assert np.array_equal(tokens.astype(np.int64), tokenize(expect, pal, n_px).numpy())


# ----------------------------------------------------------------------------- a sixth kind


class _Grey(Source):
    """All a sixth kind's module holds: ``grey:FILE``, a .npy of (N, H, W) grey images."""

    name, arg = "grey", "FILE"
    help = "a .npy of grey images"
    defaults = {"n_px": 8, "n_colors": 4}

    def open(self, arg, split, *, size=None, n_px=None, progress=None):
        images = np.repeat(np.load(arg)[..., None], 3, axis=-1)
        rows = split_rows(len(images), split)
        return ImageSet(ArraySource(images), None, None, rows=rows, shape=images.shape[1:3])

    def files(self, arg, split):
        return Path(arg), [Path(arg)], []


def test_a_sixth_kind_is_one_module_and_one_line(tmp_path, monkeypatch, capsys):
    from igpt.cli import main
    from igpt.trainconfig import TrainConfig

    monkeypatch.setitem(SOURCES, "grey", _Grey())  # the one line, in igpt/data/sources.py
    grey = _rand_images(10, 5, 5)[..., 0]
    np.save(tmp_path / "g.npy", grey)
    spec = f"grey:{tmp_path / 'g.npy'}"
    data = load_images(spec, "all")
    assert np.array_equal(data.images, np.repeat(grey[..., None], 3, axis=-1))
    assert len(open_images(spec, "train")) == 8 and len(load_images(spec, "test")) == 2
    assert image_side(spec) == 5
    pal, cache = _palette(), tmp_path / "c"
    tokens, labels = cached_tokens(spec, "all", pal, 4, cache_dir=cache, workers=0)
    assert labels is None
    assert np.array_equal(tokens.astype(np.int64), tokenize(data.images, pal, 4).numpy())
    np.save(tmp_path / "g.npy", grey[:7])  # its files are in the key
    assert len(cached_tokens(spec, "all", pal, 4, cache_dir=cache, workers=0)[0]) == 7
    assert TrainConfig(data=spec).data_defaults() == {"n_px": 8, "n_colors": 4}
    assert TrainConfig(data=spec).n_px == 8
    with pytest.raises(ValueError, match="grey:FILE"):
        load_images("gray:x")  # the spec error lists every kind
    for command in ("prepare", "fit-palette", "probe"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "grey:FILE" in capsys.readouterr().out.replace("\n", " ")


def test_sources_table_names_every_kind():
    for kind, source in SOURCES.items():
        assert source.name == kind and source.help and set(source.defaults) == {"n_px", "n_colors"}
    assert {"digits", "cifar10", "cifar100", "folder", "npz", "imagenet32", "imagenet64"} <= set(
        SOURCES
    )


def test_the_names_of_the_old_modules_stay_importable():
    import igpt.evaluation
    import igpt.imagesets
    import igpt.readers
    import igpt.tokens

    for module in (igpt.readers, igpt.imagesets, igpt.tokens):
        assert all(hasattr(module, name) for name in module.__all__)
    assert igpt.readers.KINDS == tuple(k for k in SOURCES if k != "digits")
    assert igpt.imagesets.FORMAT_SIDES == {
        "digits": 8, "cifar10": 32, "cifar100": 32, "imagenet32": 32, "imagenet64": 64
    }  # fmt: skip
    assert igpt.evaluation.TokenSplit is igpt.data.TokenSplit
    assert igpt.tokens.spec_key("digits") == "digits"
