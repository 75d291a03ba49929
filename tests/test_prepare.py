"""The data path at scale: lazy readers, streaming and resumable tokenisation, igpt prepare,
Downsampled ImageNet, the palette from a sample. Every result is checked against the
in-memory path (``load_images`` + ``tokenize``, the code the cache ran before it streamed)
and the reference quantizer."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import igpt.data.cache
import igpt.data.folder
from igpt.data import (
    ImageSet,
    cached_tokens,
    load_images,
    open_images,
    prepare_tokens,
    resize,
    tokenize,
)
from igpt.palette import Palette, fit_palette, fit_palette_on
from igpt_kernels import reference


def _palette(k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Palette(torch.rand(k, 3, generator=g) * 255)


def _rand_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _old_tokens(spec, split, palette, n_px, size=None):
    """The tokens the in-memory cached_tokens wrote: the whole split, then tokenize (a folder
    of mixed sizes: each image brought to n_px at once, ``size=n_px``)."""
    data = load_images(spec, split, size=size)
    return tokenize(data.images, palette, n_px).numpy().astype(np.uint16), data.labels


def _folder(root, n_per_class=5, sizes=((20, 16), (16, 16), (24, 30)), fmt="png"):
    rng = np.random.default_rng(1)
    for c, cls in enumerate(("cat", "dog", "owl")):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            h, w = sizes[(c + i) % len(sizes)]
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / cls / f"{i}.{fmt}")
    return root


def _cifar(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8), b"labels": [1] * 7}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def _imagenet(root, n, *, npz=False, batches=(5, 3), val=4, sub=True):
    """Tiny files in the Downsampled ImageNet format: dicts of 'data' (N, 3*n*n) uint8
    channel-first rows and 'labels' 1..1000 (train batches also 'mean')."""
    rng = np.random.default_rng(3)
    train = root / f"Imagenet{n}_train" if sub else root
    valdir = root / f"Imagenet{n}_val" if sub else root
    train.mkdir(parents=True, exist_ok=True)
    valdir.mkdir(parents=True, exist_ok=True)
    made = {}
    names = [(train, f"train_data_batch_{i + 1}", m) for i, m in enumerate(batches)]
    for folder, name, m in names + [(valdir, "val_data", val)]:
        d = {
            "data": rng.integers(0, 256, (m, 3 * n * n), dtype=np.uint8),
            "labels": list(rng.integers(1, 1001, m)),
        }
        if name.startswith("train"):
            d["mean"] = d["data"].mean(0)
        if npz:
            np.savez(folder / f"{name}.npz", data=d["data"], labels=np.array(d["labels"]))
        else:
            (folder / name).write_bytes(pickle.dumps(d))
        made[name] = d
    return made


SPECS = ["digits", "npz", "npz_split", "npz_compressed", "folder", "folder_splits", "cifar"]


def _spec(kind, tmp_path):
    if kind == "digits":
        return "digits"
    if kind == "npz":
        np.savez(tmp_path / "d.npz", images=_rand_images(23, 6, 6), labels=np.arange(23) % 4)
        return f"npz:{tmp_path / 'd.npz'}"
    if kind == "npz_split":
        imgs = _rand_images(13, 5, 5)
        np.savez(tmp_path / "s.npz", train_images=imgs[:9], test_images=imgs[9:])
        return f"npz:{tmp_path / 's.npz'}"
    if kind == "npz_compressed":
        np.savez_compressed(tmp_path / "c.npz", images=_rand_images(17, 6, 6))
        return f"npz:{tmp_path / 'c.npz'}"
    if kind == "folder":
        return f"folder:{_folder(tmp_path / 'f')}"
    if kind == "folder_splits":
        _folder(tmp_path / "g" / "train", sizes=((12, 12),))
        _folder(tmp_path / "g" / "val", n_per_class=2, sizes=((12, 12),))
        return f"folder:{tmp_path / 'g'}"
    return f"cifar10:{_cifar(tmp_path)}"


# ----------------------------------------------------------------------------- lazy readers


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_lazy_reader_reads_what_load_images_returns(tmp_path, kind, split):
    spec = _spec(kind, tmp_path)
    whole = load_images(spec, split)
    lazy = load_images(spec, split, lazy=True)
    assert isinstance(lazy, ImageSet) and len(lazy) == len(whole)
    assert lazy.classes == whole.classes
    got = lazy.load()
    assert np.array_equal(got.images, whole.images)
    assert (got.labels is None) == (whole.labels is None)
    if whole.labels is not None:
        assert np.array_equal(got.labels, whole.labels)
    mid = len(whole) // 2
    part = lazy.read(mid - 1, mid + 1)  # a slice, any offset
    assert np.array_equal(part.images, whole.images[mid - 1 : mid + 1])
    picked = lazy.take([len(whole) - 1, 0, 1])  # any rows: back in ascending order
    assert np.array_equal(picked.images, whole.images[[0, 1, len(whole) - 1]])


def test_lazy_npz_reads_rows_from_the_file_without_loading_it(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", images=_rand_images(40, 8, 8))
    s = open_images(f"npz:{tmp_path / 'd.npz'}", "all")
    assert s.source.offset is not None  # uncompressed: read straight from the file
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load of the images"))
    assert np.array_equal(s.read(30, 35).images, _rand_images(40, 8, 8)[30:35])


def test_folder_lazy_reader_lists_without_decoding(tmp_path, monkeypatch, caplog):
    root = _folder(tmp_path / "f")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(igpt.data.folder, "read_image", lambda p: pytest.fail("decoded " + str(p)))
    s = open_images(f"folder:{root}", "all")
    assert len(s) == 15 and s.skipped == 1 and "skipped 1 unreadable" in caplog.text
    assert s.shape == (16, 16)  # mixed sizes: the smallest short side, from the headers


@pytest.mark.parametrize("progress, disable", [(None, None), (True, False), (False, True)])
def test_the_header_scan_bar_follows_progress(tmp_path, monkeypatch, progress, disable):
    """The scan of a folder's headers (minutes for ImageNet) gets a bar after 2 s: on a
    terminal by default, never with progress=False (``igpt prepare --no-progress``)."""
    bars = []

    class Bar:
        def __init__(self, **kw):
            bars.append(kw)
            self.n = 0

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            bars[-1]["counted"] = self.n

    monkeypatch.setattr(igpt.data.folder, "tqdm", Bar)
    spec = f"folder:{_folder(tmp_path / 'f')}"
    assert len(load_images(spec, "all", lazy=True, progress=progress)) == 15
    assert bars and all(kw["disable"] is disable and kw["delay"] == 2 for kw in bars)
    assert sum(kw["counted"] for kw in bars) == sum(kw["total"] for kw in bars) == 15


def test_the_parallel_header_scan_gives_the_serial_shapes_in_order(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f", n_per_class=7)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    paths = sorted(root.rglob("*.png"))
    serial = igpt.data.folder.image_shapes(paths)
    assert None in serial and len({s for s in serial if s}) == 3  # the three sizes, one broken
    parent, real = os.getpid(), igpt.data.folder._chunk_shapes

    def in_a_child(chunk):
        assert os.getpid() != parent, "the parallel scan read headers in the parent"
        return real(chunk)

    # pickled by name, as the pool sends it: the forked children find this one there
    in_a_child.__module__, in_a_child.__qualname__ = "igpt.data.folder", "_chunk_shapes"
    monkeypatch.setattr(igpt.data.folder, "_chunk_shapes", in_a_child)
    monkeypatch.setattr(igpt.data.folder, "SCAN_PARALLEL", 1)
    monkeypatch.setattr(igpt.data.folder, "SCAN_CHUNK", 4)
    monkeypatch.setattr(igpt.data.folder, "available_cores", lambda: 2)
    assert igpt.data.folder.image_shapes(paths) == serial


# ----------------------------------------------------------------------------- imagenet


@pytest.mark.parametrize("npz", [False, True])
@pytest.mark.parametrize("n", [32, 64])
def test_downsampled_imagenet_reader(tmp_path, n, npz):
    made = _imagenet(tmp_path, n, npz=npz)
    spec = f"imagenet{n}:{tmp_path}"
    train, test = load_images(spec, "train"), load_images(spec, "test")
    assert train.images.shape == (8, n, n, 3) and test.images.shape == (4, n, n, 3)
    d = made["train_data_batch_2"]
    first = d["data"][0].reshape(3, n, n)  # red plane, green plane, blue plane
    assert np.array_equal(train.images[5], first.transpose(1, 2, 0))
    assert train.images[5, 0, 1, 2] == d["data"][0][2 * n * n + 1]  # blue of pixel (0, 1)
    assert train.labels[5] == d["labels"][0] - 1 and test.labels.max() <= 999
    every = load_images(spec, "all", lazy=True)
    assert len(every) == 12 and np.array_equal(every.read(6, 10).images[2:], test.images[:2])


def test_downsampled_imagenet_refuses_other_files(tmp_path):
    _imagenet(tmp_path, 32, sub=False)
    bad = tmp_path / "train_data_batch_2"
    bad.write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [1, 2]}))
    with pytest.raises(ValueError, match=r"train_data_batch_2 is not a Downsampled ImageNet 32x"):
        load_images(f"imagenet32:{tmp_path}", "train", lazy=True)
    bad.write_bytes(b"GIF89a not a batch at all")
    with pytest.raises(ValueError, match=r"train_data_batch_2 is not a .*neither a pickle"):
        load_images(f"imagenet32:{tmp_path}", "train")
    bad.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 5]}))
    with pytest.raises(ValueError, match=r"train_data_batch_2 .*labels must be ints 1..1000"):
        load_images(f"imagenet32:{tmp_path}", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train_data_batch_1"):
        load_images(f"imagenet64:{tmp_path / 'empty'}", "train")
    with pytest.raises(ValueError, match=r"train_data_batch_1 is not a .* 64x64 file"):
        load_images(f"imagenet64:{tmp_path}", "train")  # 32x32 rows
    with pytest.raises(ValueError, match="imagenet32:DIR"):
        load_images("imagenet16:/x")


# ----------------------------------------------------------------------------- token cache


@pytest.mark.parametrize("kind", SPECS)
def test_streamed_cache_has_the_in_memory_tokens_and_a_full_key(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(igpt.data.cache, "CHUNK", 4)  # several chunks even for tiny sets
    spec, pal = _spec(kind, tmp_path), _palette()
    size = 4 if kind == "folder" else None  # the one folder of mixed sizes
    for split in ("train", "all"):
        old, old_labels = _old_tokens(spec, split, pal, 4, size)
        tokens, labels = cached_tokens(spec, split, pal, 4, cache_dir=tmp_path / "c", workers=0)
        assert tokens.dtype == np.uint16 and np.array_equal(tokens, old)
        name, record = igpt.data.cache.cache_key(spec, split, pal, 4)
        meta = json.loads((tmp_path / "c" / "tokens" / name / "meta.json").read_text())
        assert meta["key"] == record and record["split"] == split and record["n_px"] == 4
        assert {"spec", "palette", "resize", "code", "files"} <= set(record)
        assert (labels is None) == (old_labels is None)
        if labels is not None:
            assert np.array_equal(labels, old_labels)


def test_streamed_tokens_equal_the_reference_quantizer(tmp_path):
    spec, pal = _spec("folder", tmp_path), _palette(64)
    tokens, _ = cached_tokens(spec, "all", pal, 8, cache_dir=tmp_path / "c", workers=0)
    images = load_images(spec, "all", size=8).images  # mixed sizes: each one resized once
    ref = reference.quantize(torch.from_numpy(images), pal.centroids).reshape(len(images), -1)
    assert np.array_equal(tokens.astype(np.int64), ref.numpy())


def test_the_lookup_table_path_gives_the_reference_tokens(tmp_path, monkeypatch):
    # big sets quantize through the palette's 2^24-entry table, built before workers fork:
    # a threshold of 0 pixels sends this small set the same way
    from igpt_kernels import palette as kernels_palette

    monkeypatch.setitem(kernels_palette.LUT_WORK, "cpu", 1)
    spec, pal = _spec("folder", tmp_path), _palette(16, seed=7)
    tokens, _ = cached_tokens(spec, "all", pal, 8, cache_dir=tmp_path / "c", workers=2)
    images = load_images(spec, "all", size=8).images
    ref = reference.quantize(torch.from_numpy(images), pal.centroids).reshape(len(images), -1)
    assert np.array_equal(tokens.astype(np.int64), ref.numpy())


def test_worker_processes_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(igpt.data.cache, "CHUNK", 3)
    spec, pal = _spec("folder", tmp_path), _palette()
    one, _ = cached_tokens(spec, "all", pal, 8, cache_dir=tmp_path / "a", workers=0)
    two, _ = cached_tokens(spec, "all", pal, 8, cache_dir=tmp_path / "b", workers=2)
    assert np.array_equal(one, two) and len(one) == 15


class _Failing:
    """A palette that stops the build (as a kill would) at its ``fail_at``-th chunk."""

    def __init__(self, palette, fail_at=None):
        self.palette, self.fail_at, self.calls = palette, fail_at, 0
        self.centroids = palette.centroids

    def __len__(self):
        return len(self.palette)

    def quantize(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.palette.quantize(images)


def _entry(cache):
    (entry,) = (cache / "tokens").iterdir()
    return entry


@pytest.mark.parametrize("moment", ["first_chunk", "after_3_chunks", "between_writes", "finish"])
def test_an_interrupted_build_resumes_to_the_same_bytes(tmp_path, monkeypatch, moment):
    monkeypatch.setattr(igpt.data.cache, "CHUNK", 2)
    np.savez(tmp_path / "d.npz", images=_rand_images(15, 6, 6), labels=np.arange(15) % 3)
    spec, pal = f"npz:{tmp_path / 'd.npz'}", _palette()
    clean, clean_labels = cached_tokens(spec, "all", pal, 4, cache_dir=tmp_path / "ref", workers=0)
    cache = tmp_path / "c"
    failing = _Failing(pal, fail_at={"first_chunk": 1, "after_3_chunks": 4}.get(moment))
    real_write = igpt.data.cache.atomic_write_bytes
    writes = {"n": 0}

    def write_then_fail(path, payload):
        # between_writes: chunk 3's tokens are on disk, progress.json does not say so yet;
        # finish: tokens.u16 is in place, meta.json never came
        writes["n"] += path.name == "progress.json"
        if (moment == "between_writes" and writes["n"] == 3) or path.name == "meta.json":
            raise KeyboardInterrupt("killed")
        return real_write(path, payload)

    if moment in ("between_writes", "finish"):
        monkeypatch.setattr(igpt.data.cache, "atomic_write_bytes", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        cached_tokens(spec, "all", failing, 4, cache_dir=cache, workers=0)
    entry = _entry(cache)
    assert not (entry / "meta.json").exists()  # nothing half-written is an entry
    with pytest.raises(OSError):
        igpt.data.cache.read_entry(entry)
    monkeypatch.setattr(igpt.data.cache, "atomic_write_bytes", real_write)
    progress = entry / "progress.json"
    done_before = json.loads(progress.read_text())["chunks"] if progress.exists() else 0
    resumed = _Failing(pal)
    tokens, labels = cached_tokens(spec, "all", resumed, 4, cache_dir=cache, workers=0)
    assert (entry / "tokens.u16").read_bytes() == (
        _entry(tmp_path / "ref") / "tokens.u16"
    ).read_bytes()
    assert np.array_equal(tokens, clean) and np.array_equal(labels, clean_labels)
    assert resumed.calls == 8 - done_before  # only the chunks not done before
    assert sorted(p.name for p in entry.iterdir()) == [
        ".lock",
        "labels.npy",
        "meta.json",
        "tokens.u16",
    ]


KILLED_BUILD = """
import sys, time
import igpt.data.cache
from igpt.data import cached_tokens
from igpt.palette import Palette
import numpy as np

class Slow(Palette):
    def quantize(self, images, **kw):
        time.sleep(0.3)  # time for the parent to kill it mid-build
        return super().quantize(images, **kw)

igpt.data.cache.CHUNK = 2
pal = Slow(np.load(sys.argv[2]))
cached_tokens(sys.argv[1], "all", pal, 4, cache_dir=sys.argv[3], workers=int(sys.argv[4]))
"""


class _Counting(Palette):
    """Counts ``quantize`` calls: one per chunk a build with ``workers=0`` makes."""

    calls = 0

    def quantize(self, images, **kw):
        type(self).calls += 1
        return super().quantize(images, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("workers, labelled", [(0, False), (2, False), (0, True)])
def test_a_build_killed_with_sigkill_resumes_skipping_its_finished_chunks(
    tmp_path, monkeypatch, workers, labelled
):
    # labelled or not (an unlabelled set once restarted from chunk 0: issue 33)
    labels = {"labels": np.arange(40) % 3} if labelled else {}
    np.savez(tmp_path / "d.npz", images=_rand_images(40, 6, 6), **labels)
    spec, pal = f"npz:{tmp_path / 'd.npz'}", _palette()
    pal.save(tmp_path / "p.npy")
    pal = Palette.load(tmp_path / "p.npy")
    (tmp_path / "kill.py").write_text(KILLED_BUILD)
    cache = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(tmp_path / "kill.py"), spec, str(tmp_path / "p.npy"), str(cache)]
    proc = subprocess.Popen([*args, str(workers)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                progress = json.loads(next(cache.glob("tokens/*/progress.json")).read_text())
                if progress["chunks"] >= 3:
                    break
            except (StopIteration, ValueError, OSError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed"
        # with workers: the builder alone, and its workers must not keep the entry locked
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    entry = _entry(cache)
    import fcntl

    with open(entry / ".lock", "a+b") as f:
        for _ in range(200):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            pytest.fail("the killed build's lock is still held")
        fcntl.flock(f, fcntl.LOCK_UN)
    done = json.loads((entry / "progress.json").read_text())["chunks"]
    assert not (entry / "meta.json").exists() and 3 <= done < 20
    monkeypatch.setattr(igpt.data.cache, "CHUNK", 2)
    monkeypatch.setattr(_Counting, "calls", 0)
    counting = _Counting(np.load(tmp_path / "p.npy"))
    tokens, got = cached_tokens(spec, "all", counting, 4, cache_dir=cache, workers=0)
    assert _Counting.calls == 20 - done  # the finished chunks were not read again
    clean, _ = cached_tokens(spec, "all", pal, 4, cache_dir=tmp_path / "ref", workers=0)
    assert (entry / "tokens.u16").read_bytes() == (
        _entry(tmp_path / "ref") / "tokens.u16"
    ).read_bytes()
    assert np.array_equal(tokens, clean)
    assert (got is None) != labelled
    if labelled:
        assert got.tolist() == (np.arange(40) % 3).tolist()


def test_another_process_waits_for_the_builder(tmp_path):
    import threading

    np.savez(tmp_path / "d.npz", images=_rand_images(6, 4, 4))
    spec, pal = f"npz:{tmp_path / 'd.npz'}", _palette()
    name, _ = igpt.data.cache.cache_key(spec, "all", pal, 4)
    folder = tmp_path / "c" / "tokens" / name
    got = {}
    with igpt.data.cache.entry_lock(folder):  # a builder at work
        t = threading.Thread(
            target=lambda: got.update(
                info=prepare_tokens(spec, "all", pal, 4, cache_dir=tmp_path / "c")
            )
        )
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not (folder / "meta.json").exists()
    t.join(60)
    assert got["info"].images == 6 and got["info"].built


# ----------------------------------------------------------------------------- palette


@pytest.mark.parametrize("sample", [500, 10**6])
def test_palette_from_a_lazy_reader_is_the_in_memory_fit(tmp_path, sample):
    spec = _spec("folder", tmp_path)
    whole = resize(load_images(spec, "train").images, 8)
    lazy = load_images(spec, "train", lazy=True)
    expect = fit_palette(whole, k=8, sample=sample, seed=3)
    got = fit_palette_on(lazy, k=8, n_px=8, sample=sample, seed=3, block=5)
    assert torch.equal(got.centroids, expect.centroids)
    rows = np.random.default_rng(0).permutation(len(lazy))[:7]  # in this order (train.py's)
    expect = fit_palette(whole[rows], k=8, sample=200, seed=1)
    got = fit_palette_on(lazy, k=8, n_px=8, rows=rows, sample=200, seed=1, block=3)
    assert torch.equal(got.centroids, expect.centroids)


def test_palette_from_a_sample_of_images(tmp_path):
    np.savez(tmp_path / "d.npz", images=_rand_images(50, 4, 4))
    lazy = load_images(f"npz:{tmp_path / 'd.npz'}", "all", lazy=True)
    rows = np.sort(np.random.default_rng(5).choice(50, 10, replace=False))
    got = fit_palette_on(lazy, k=4, max_images=10, seed=5)
    expect = fit_palette(lazy.take(rows).images, k=4, seed=5)
    assert torch.equal(got.centroids, expect.centroids)


# ----------------------------------------------------------------------------- igpt prepare


def test_prepare_command_then_training_reads_no_images(tmp_path, monkeypatch, capsys):
    from igpt.cli import main

    np.savez(tmp_path / "d.npz", images=_rand_images(30, 6, 6), labels=np.arange(30) % 2)
    spec, pal = f"npz:{tmp_path / 'd.npz'}", _palette()
    pal.save(tmp_path / "p.npy")
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    argv = ["prepare", "--data", spec, "--n-px", "4", "--palette", str(tmp_path / "p.npy")]
    main([*argv, "--workers", "0"])
    out = capsys.readouterr().out
    entry = _entry(tmp_path / "cache")
    assert str(entry) in out and "24 images" in out and "train" in out
    assert "tokenised now" in out and "on disk" in out
    with monkeypatch.context() as m:
        m.setattr("igpt.data.open_images", lambda *a, **k: pytest.fail("read images"))
        tokens, labels = cached_tokens(spec, "train", Palette.load(tmp_path / "p.npy"), 4)
    assert tokens.shape == (24, 16) and len(labels) == 24
    main([*argv, "--split", "all"])
    assert "already" not in capsys.readouterr().out  # another split: built, not found


def test_prepare_command_refuses_bad_flags(tmp_path):
    from igpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(
            ["prepare", "--data", "digits", "--n-px", "4", "--palette", "p.npy", "--workers", "-1"]
        )
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(
            ["prepare", "--data", "digits", "--palette", str(tmp_path / "nope.npy"), "--n-px", "4"]
        )
    assert "nope.npy" in str(e.value.code)


def test_fit_palette_command_fits_what_the_whole_split_gives(tmp_path):
    from igpt.cli import main

    np.savez(tmp_path / "d.npz", images=_rand_images(60, 6, 6))
    spec, out = f"npz:{tmp_path / 'd.npz'}", tmp_path / "p.npy"
    main(["fit-palette", "--data", spec, "--k", "8", "--sample", "900", "--n-px", "4"]
         + ["--out", str(out), "--seed", "2"])  # fmt: skip
    expect = fit_palette(resize(load_images(spec).images, 4), k=8, sample=900, seed=2)
    assert torch.equal(Palette.load(out).centroids, expect.centroids)
    assert out.with_suffix(".png").stat().st_size > 1000
