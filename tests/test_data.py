"""igpt.data: every reader on small files in the real format, resizing, tokens, cache, splits."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.data import (
    ImageData,
    cached_tokens,
    holdout_split,
    load_images,
    pad_crop_flip,
    random_resized_crop,
    resize,
    tokenize,
)
from igpt.palette import Palette


def _palette(k=16):
    return Palette(torch.rand(k, 3) * 255)


def _rand_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_digits_splits_are_deterministic_and_disjoint():
    train, test, all_ = (load_images("digits", s) for s in ("train", "test", "all"))
    assert all_.images.shape == (1797, 8, 8, 3) and all_.images.dtype == np.uint8
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert all_.images.max() == 255 and all_.classes == [str(i) for i in range(10)]
    assert np.array_equal(np.concatenate([train.images, test.images]), all_.images)
    assert np.array_equal(test.labels, load_images("digits", "test").labels)
    assert (all_.images[..., 0] == all_.images[..., 2]).all()  # grey as RGB


def _write_cifar(root, kind):
    rng = np.random.default_rng(0)

    def batch(n, key):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return {b"data": data, key: rng.integers(0, 10, n).tolist(), b"batch_label": b"x"}

    if kind == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir()
        for i in range(1, 6):
            (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(3, b"labels"), protocol=2))
        (d / "test_batch").write_bytes(pickle.dumps(batch(4, b"labels"), protocol=2))
        names = [f"c{i}".encode() for i in range(10)]
        (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    else:
        d = root / "cifar-100-python"
        d.mkdir()
        (d / "train").write_bytes(pickle.dumps(batch(6, b"fine_labels"), protocol=2))
        (d / "test").write_bytes(pickle.dumps(batch(2, b"fine_labels"), protocol=2))
        names = [f"f{i}".encode() for i in range(100)]
        (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    return d


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_reader(tmp_path, kind):
    d = _write_cifar(tmp_path, kind)
    train = load_images(f"{kind}:{tmp_path}", "train")  # the parent folder works too
    test = load_images(f"{kind}:{d}", "test")
    assert train.images.shape == ((15 if kind == "cifar10" else 6), 32, 32, 3)
    assert test.images.shape[0] == (4 if kind == "cifar10" else 2)
    assert train.labels.dtype == np.int64
    assert len(train.classes) == (10 if kind == "cifar10" else 100)
    # CHW row layout -> HWC: the red plane is the first 1024 bytes of a row.
    first = pickle.loads(
        (d / ("data_batch_1" if kind == "cifar10" else "train")).read_bytes(), encoding="bytes"
    )
    assert np.array_equal(train.images[0, :, :, 0].ravel(), first[b"data"][0, :1024])
    assert np.array_equal(train.images[0, :, :, 2].ravel(), first[b"data"][0, 2048:])


def test_cifar_refuses_foreign_pickles(tmp_path):
    d = _write_cifar(tmp_path, "cifar10")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": ImageData}))  # a class reference
    with pytest.raises(ValueError, match="test_batch as a CIFAR batch .*refusing"):
        load_images(f"cifar10:{d}", "test")  # refused, and the message names the file


def test_folder_reader_skips_corrupt_files(tmp_path, caplog):
    imgs = _rand_images(5, 10, 12)
    for cls, idx in (("cat", [0, 1, 2]), ("dog", [3, 4])):
        (tmp_path / cls).mkdir()
        for i in idx:
            Image.fromarray(imgs[i]).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    data = load_images(f"folder:{tmp_path}", "all")
    assert data.classes == ["cat", "dog"] and data.skipped == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert np.array_equal(data.images, imgs)
    assert "skipped 2 unreadable" in caplog.text
    train, test = load_images(f"folder:{tmp_path}", "train"), load_images(f"folder:{tmp_path}")
    assert len(train) == len(test) == 4  # default split is train
    assert len(load_images(f"folder:{tmp_path}", "test")) == 1


def test_folder_with_split_dirs_and_mixed_sizes(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (20 + i, 16) if cls == "a" else (16, 16)
                Image.fromarray(_rand_images(1, *size, seed=i)[0]).save(
                    tmp_path / split / cls / f"{i}.jpg"
                )
    train = load_images(f"folder:{tmp_path}", "train")
    test = load_images(f"folder:{tmp_path}", "test")
    assert train.images.shape == (6, 16, 16, 3) and test.images.shape == (4, 16, 16, 3)
    assert load_images(f"folder:{tmp_path}", "train", size=8).images.shape == (6, 8, 8, 3)


def test_folder_test_split_labels_follow_the_train_classes(tmp_path):
    img = _rand_images(1, 4, 4)[0]
    for split, classes in (("train", "abc"), ("test", "ac")):  # no "b" in the test folder
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(img).save(tmp_path / split / cls / "0.png")
    test = load_images(f"folder:{tmp_path}", "test")
    assert test.classes == ["a", "b", "c"] and test.labels.tolist() == [0, 2]
    assert load_images(f"folder:{tmp_path}", "all").labels.tolist() == [0, 1, 2, 0, 2]
    (tmp_path / "test" / "d").mkdir()
    Image.fromarray(img).save(tmp_path / "test" / "d" / "0.png")
    with pytest.raises(ValueError, match=r"\['d'\] that the train folder lacks"):
        load_images(f"folder:{tmp_path}", "test")


def test_npz_and_npy_readers(tmp_path):
    imgs = _rand_images(10, 6, 6)
    labels = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    np.save(tmp_path / "d.npy", imgs)
    np.savez(tmp_path / "s.npz", train_images=imgs[:7], test_images=imgs[7:])
    all_ = load_images(f"npz:{tmp_path / 'd.npz'}", "all")
    assert np.array_equal(all_.images, imgs) and all_.labels.tolist() == labels.tolist()
    tr, te = (load_images(f"npz:{tmp_path / 'd.npz'}", s) for s in ("train", "test"))
    assert len(tr) == 8 and len(te) == 2
    assert not set(map(bytes, tr.images)) & set(map(bytes, te.images))
    npy = load_images(f"npz:{tmp_path / 'd.npy'}", "all")
    assert np.array_equal(npy.images, imgs) and npy.labels is None
    split = load_images(f"npz:{tmp_path / 's.npz'}", "test")
    assert np.array_equal(split.images, imgs[7:])
    np.savez(tmp_path / "bad.npz", pixels=imgs)
    with pytest.raises(ValueError, match="bad.npz has keys .*needs 'images'"):
        load_images(f"npz:{tmp_path / 'bad.npz'}")


def test_bad_specs():
    for spec in ("mnist", "cifar10", "folder:", "digits:x"):
        with pytest.raises(ValueError, match="data spec"):
            load_images(spec)
    with pytest.raises(ValueError, match="split"):
        load_images("digits", "validation")


def test_resize_matches_pil_bilinear():
    imgs = _rand_images(3, 8, 8)
    out = resize(imgs, 16)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(imgs[1]).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(out[1], ref)
    assert resize(imgs, 8) is imgs


def test_resize_matches_transformers_processor():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "ImageGPTImageProcessorPil", transformers.ImageGPTImageProcessor)
    imgs = _rand_images(2, 13, 13)
    proc = cls(clusters=np.zeros((1, 3)), size={"height": 7, "width": 7}, do_color_quantize=False)
    ref = np.asarray(proc(list(imgs), return_tensors="np")["pixel_values"])  # [-1, 1]
    if ref.shape[1] == 3:  # channels first
        ref = ref.transpose(0, 2, 3, 1)
    ours = resize(imgs, 7).astype(np.float32) / 127.5 - 1
    assert np.abs(ref - ours).max() < 1e-5


def test_tokenize_is_resize_then_quantize():
    imgs = _rand_images(5, 8, 8)
    pal = _palette()
    tokens = tokenize(imgs, pal, 4, batch_size=2)
    assert tokens.shape == (5, 16) and tokens.dtype == torch.int64
    ref = pal.quantize(resize(imgs, 4)).reshape(5, 16)
    assert torch.equal(tokens, ref)


def test_holdout_split():
    tr, va = holdout_split(100)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va])) == list(range(100))
    assert np.array_equal(va, holdout_split(100)[1])
    assert not np.array_equal(va, holdout_split(100, seed=1)[1])
    assert len(holdout_split(5, 0.0)[1]) == 0


def test_token_cache_equality_and_reuse(tmp_path, monkeypatch):
    pal = _palette()
    ref = tokenize(load_images("digits", "train").images, pal, 8)
    tokens, labels = cached_tokens("digits", "train", pal, 8, cache_dir=tmp_path)
    assert tokens.dtype == np.uint16 and np.array_equal(tokens.astype(np.int64), ref.numpy())
    assert len(labels) == len(tokens)

    def no_images(*a, **k):
        raise AssertionError("a cached epoch must not read images")

    monkeypatch.setattr("igpt.data.open_images", no_images)
    again, labels2 = cached_tokens("digits", "train", pal, 8, cache_dir=tmp_path)
    assert np.array_equal(again, tokens) and np.array_equal(labels, labels2)
    with pytest.raises(AssertionError):  # another palette is another cache entry
        cached_tokens("digits", "train", _palette(8), 8, cache_dir=tmp_path)


def test_token_cache_sees_a_data_file_replaced_in_place(tmp_path):
    pal = _palette()
    path = tmp_path / "d.npz"
    np.savez(path, images=_rand_images(10, 4, 4))
    first, _ = cached_tokens(f"npz:{path}", "all", pal, 4, cache_dir=tmp_path / "cache")
    first = np.array(first)
    new = _rand_images(12, 4, 4, seed=1)
    np.savez(path, images=new)  # same path, other images (and another size and mtime)
    again, _ = cached_tokens(f"npz:{path}", "all", pal, 4, cache_dir=tmp_path / "cache")
    assert again.shape == (12, 16) and not np.array_equal(again[:10], first)
    assert np.array_equal(again.astype(np.int64), tokenize(new, pal, 4).numpy())


def test_pad_crop_flip():
    imgs = _rand_images(64, 32, 32)
    out = pad_crop_flip(imgs, rng=np.random.default_rng(0))
    assert out.shape == imgs.shape and out.dtype == np.uint8
    # every output is a shifted (and maybe flipped) copy: the centre 24x24 of the original
    # appears inside the output
    for i in range(8):
        o, x = out[i], imgs[i]
        found = False
        for cand in (o, o[:, ::-1]):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    a = cand[4 + dy : 28 + dy, 4 + dx : 28 + dx]
                    if np.array_equal(a, x[4:28, 4:28]):
                        found = True
        assert found
    assert not np.array_equal(out, imgs)


def test_random_resized_crop():
    imgs = _rand_images(6, 40, 30)
    out = random_resized_crop(imgs, 16, rng=np.random.default_rng(0))
    assert out.shape == (6, 16, 16, 3) and out.dtype == np.uint8
    same = random_resized_crop(imgs, 16, rng=np.random.default_rng(0))
    assert np.array_equal(out, same)
    full = random_resized_crop(imgs, 16, scale=(1.0, 1.0), ratio=(0.75, 0.75))
    assert np.array_equal(full, resize(imgs, 16))


@pytest.mark.parametrize("damage", ["meta.json", "tokens.u16", "labels.npy"])
def test_token_cache_rebuilds_a_damaged_entry(tmp_path, damage, caplog):
    pal = _palette()
    path = tmp_path / "d.npz"
    images = _rand_images(10, 4, 4)
    np.savez(path, images=images, labels=np.arange(10) % 2)
    cached_tokens(f"npz:{path}", "all", pal, 4, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    target = entry / damage
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # a cut copy
    tokens, labels = cached_tokens(f"npz:{path}", "all", pal, 4, cache_dir=tmp_path / "cache")
    assert "damaged" in caplog.text and str(entry) in caplog.text
    assert np.array_equal(tokens.astype(np.int64), tokenize(images, pal, 4).numpy())
    assert labels.tolist() == (np.arange(10) % 2).tolist()
    caplog.clear()
    cached_tokens(f"npz:{path}", "all", pal, 4, cache_dir=tmp_path / "cache")
    assert "damaged" not in caplog.text  # the rebuilt entry reads back


def test_cifar_batches_of_the_wrong_content_name_the_file(tmp_path):
    d = _write_cifar(tmp_path, "cifar10")
    only_data = {b"data": np.zeros((2, 3072), np.uint8)}
    (d / "test_batch").write_bytes(pickle.dumps(only_data, protocol=2))
    with pytest.raises(ValueError, match="test_batch is not a cifar10 batch.*'labels'"):
        load_images(f"cifar10:{d}", "test")
    (d / "test_batch").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="test_batch is not a CIFAR batch"):
        load_images(f"cifar10:{d}", "test")
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match="test_batch.*1 of 2 labels are negative"):
        load_images(f"cifar10:{d}", "test")
